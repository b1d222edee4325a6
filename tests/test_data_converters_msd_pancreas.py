"""MSD Task07 Pancreas converter on a miniature copy of the Decathlon's on-disk format.

Fixture: ``Task07_Pancreas/dataset.json`` (MSD keys: modality, labels 0 background / 1 pancreas / 2 cancer,
numTraining, training list with ``./imagesTr/...`` paths, test list), ``imagesTr/``, ``labelsTr/``,
``imagesTs/`` and the macOS ``._pancreas_001.nii.gz`` forks that the published tar holds. Geometry: size
(x, y, z) = (12, 11, 7), spacing (0.8, 0.8, 2.5) mm, origin (-201.3, -180.9, -480.0), direction diag(1, -1, -1).
The slice axis is array axis z (2.5 mm); the size filter checks y and x (padded sides (n + 1) x 0.8 mm > 3 mm, i.e.
at least 3 voxels).

Labels of pancreas_001 (array axes z, y, x), hand-worked boxes (z0, y0, x0, z1, y1, x1), max exclusive:

- tumour T1: block z 2..3, y 3..6, x 3..6 plus voxel (4, 7, 7) touching it at a corner -> one 26-connected
  instance (2, 3, 3, 5, 8, 8)
- tumour T2: block z 5..6, y 0..3, x 8..11 -> (5, 0, 8, 7, 4, 12)
- speck: voxel (6, 9, 1) -> 0.8 mm in-plane, dropped by the 3 mm filter (box (6, 9, 1, 7, 10, 2))
- the pancreas (label 1) is background
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nifti_fixtures import boxes_and_classes, make_image, write_image
from pretrain_det3d.data.converters.base import ConversionError
from pretrain_det3d.data.converters.msd_pancreas import MSDPancreasConverter
from pretrain_det3d.data.dataset_format import check_converted_dataset
from pretrain_det3d.data.io import read_case, read_dataset_json

SIZE_XYZ = (12, 11, 7)
SPACING_XYZ = (0.8, 0.8, 2.5)
ORIGIN_XYZ = (-201.3, -180.9, -480.0)
DIRECTION = (1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, -1.0)

BOX_T1 = (2, 3, 3, 5, 8, 8)
BOX_T2 = (5, 0, 8, 7, 4, 12)
BOX_SPECK = (6, 9, 1, 7, 10, 2)


def _image(array_zyx: np.ndarray) -> sitk.Image:
    return make_image(array_zyx, SPACING_XYZ, ORIGIN_XYZ, DIRECTION)


def _ct(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1024, 2000, SIZE_XYZ[::-1]).astype(np.int16)


def _labels_case1() -> np.ndarray:
    seg = np.zeros(SIZE_XYZ[::-1], dtype=np.uint8)  # [Z, Y, X]
    seg[1:6, 2:9, 2:10] = 1  # pancreas
    seg[2:4, 3:7, 3:7] = 2
    seg[4, 7, 7] = 2
    seg[5:7, 0:4, 8:12] = 2
    seg[6, 9, 1] = 2
    return seg


def _msd_json(training: list[str], labels: dict | None = None) -> dict:
    return {
        "name": "Pancreas",
        "description": "Pancreas and cancer segmentation",
        "reference": "Memorial Sloan Kettering Cancer Center",
        "licence": "CC-BY-SA 4.0",
        "release": "1.0 04/05/2018",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": labels or {"0": "background", "1": "pancreas", "2": "cancer"},
        "numTraining": len(training),
        "numTest": 1,
        "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in training],
        "test": ["./imagesTs/pancreas_002.nii.gz"],
    }


@pytest.fixture
def msd_source(tmp_path: Path) -> Path:
    task = tmp_path / "msd" / "Task07_Pancreas"
    write_image(task / "imagesTr" / "pancreas_001.nii.gz", _image(_ct(1)))
    write_image(task / "labelsTr" / "pancreas_001.nii.gz", _image(_labels_case1()))
    pancreas_only = np.zeros(SIZE_XYZ[::-1], dtype=np.uint8)
    pancreas_only[2:5, 2:8, 2:8] = 1
    write_image(task / "imagesTr" / "pancreas_004.nii.gz", _image(_ct(4)))
    write_image(task / "labelsTr" / "pancreas_004.nii.gz", _image(pancreas_only))
    write_image(task / "imagesTs" / "pancreas_002.nii.gz", _image(_ct(2)))
    for folder in ("imagesTr", "labelsTr"):
        (task / folder / "._pancreas_001.nii.gz").write_bytes(b"\x00\x05\x16\x07Mac OS X resource fork")
    (task / "dataset.json").write_text(json.dumps(_msd_json(["pancreas_004", "pancreas_001"]), indent=4))
    return task


def test_tumour_instances_by_connected_components(msd_source: Path, tmp_path: Path) -> None:
    out = tmp_path / "converted"
    MSDPancreasConverter().convert(msd_source, out, show_progress=False)
    summary = check_converted_dataset(out)
    assert summary.case_ids == ["pancreas_001", "pancreas_004"]  # from dataset.json; ._ forks and imagesTs ignored
    assert summary.class_names == ["tumour"] and summary.modalities == ["CT"]
    assert boxes_and_classes(out, "pancreas_001") == ([BOX_T1, BOX_T2], [0, 0])
    assert boxes_and_classes(out, "pancreas_004") == ([], [])
    record = read_dataset_json(out)["conversion"]
    assert [d["box"] for d in record["dropped_components"]["pancreas_001"]] == [list(BOX_SPECK)]
    assert record["source_labels"]["2"] == "cancer"


def test_size_filter_can_be_switched_off(msd_source: Path, tmp_path: Path) -> None:
    out = tmp_path / "converted"
    MSDPancreasConverter({"min_extent_mm": 0}).convert(msd_source.parent, out, show_progress=False)  # parent as root
    assert boxes_and_classes(out, "pancreas_001") == ([BOX_T1, BOX_T2, BOX_SPECK], [0, 0, 0])


def test_geometry_and_intensities_are_kept(msd_source: Path, tmp_path: Path) -> None:
    out = tmp_path / "converted"
    MSDPancreasConverter().convert(msd_source, out, show_progress=False)
    converted = read_case(out, "pancreas_001")
    np.testing.assert_allclose(converted.spacing, SPACING_XYZ[::-1], rtol=1e-6)
    np.testing.assert_allclose(converted.origin, ORIGIN_XYZ, atol=1e-4)
    np.testing.assert_allclose(converted.direction, DIRECTION, atol=1e-6)
    np.testing.assert_array_equal(converted.image[0], _ct(1))


def test_listed_but_missing_label_names_the_file(msd_source: Path, tmp_path: Path) -> None:
    (msd_source / "labelsTr" / "pancreas_004.nii.gz").unlink()
    out = tmp_path / "converted"
    with pytest.raises(ConversionError, match=r"labelsTr/pancreas_004\.nii\.gz: listed in .*dataset\.json but missing"):
        MSDPancreasConverter().convert(msd_source, out, show_progress=False)
    assert not out.exists()


def test_other_task_or_labels_are_refused(msd_source: Path, tmp_path: Path) -> None:
    (msd_source / "dataset.json").write_text(json.dumps(_msd_json(["pancreas_001"], {"0": "background", "1": "liver"})))
    with pytest.raises(ConversionError, match=r"dataset\.json: \"labels\" has no label 2"):
        MSDPancreasConverter().convert(msd_source, tmp_path / "a", show_progress=False)
    (msd_source / "dataset.json").write_text(json.dumps(_msd_json(["pancreas_001"])))
    seg = _labels_case1()
    seg[0, 0, 0] = 3
    write_image(msd_source / "labelsTr" / "pancreas_001.nii.gz", _image(seg))
    with pytest.raises(ConversionError, match=r"pancreas_001\.nii\.gz: unknown label values \[3\]"):
        MSDPancreasConverter().convert(msd_source, tmp_path / "b", show_progress=False)
    with pytest.raises(ConversionError, match=r"'convert \(msd_pancreas\)\.min_size': unknown key"):
        MSDPancreasConverter({"min_size": 3})


def test_tar_unpacked_into_its_own_folder(msd_source: Path, tmp_path: Path) -> None:
    # the workflow's download unpacks Task07_Pancreas.tar (top folder Task07_Pancreas/) into raw/Task07_Pancreas/
    root = tmp_path / "raw_msd"
    (root / "Task07_Pancreas").mkdir(parents=True)
    msd_source.rename(root / "Task07_Pancreas" / "Task07_Pancreas")
    out = tmp_path / "converted"
    MSDPancreasConverter().convert(root, out, show_progress=False)
    assert boxes_and_classes(out, "pancreas_001") == ([BOX_T1, BOX_T2], [0, 0])
