"""KiTS21 converter on a miniature copy of the ``neheller/kits21`` repository layout.

Fixture: ``kits21/kits21/data/case_0000{0,2}/`` with ``imaging.nii.gz``, ``aggregated_{MAJ,AND,OR}_seg.nii.gz``
and a ``segmentations/`` file (ignored), plus ``kits.json``. As in KiTS, SimpleITK's x axis is the slice axis:
size (x, y, z) = (6, 14, 12), spacing (3.0, 0.78, 0.78) mm, origin (112.5, -20.0, 340.25) and a permuted,
flipped direction; so the *last* array axis is the 3 mm one and the size filter must leave that one out.

Labels of case_00000's majority-vote map (array axes z, y, x; 1 kidney, 2 tumour, 3 cyst):

- tumour A: block z 2..5, y 2..5, x 1..2 plus one voxel (6, 6, 3) touching it only at a corner
  -> 26-connected: one instance, box (2, 2, 1, 7, 7, 4); in-plane extent 5 x 0.78 = 3.9 mm >= 3 mm
- tumour B: block z 7..10, y 8..12, x 4..5 -> box (7, 8, 4, 11, 13, 6); extent 3.12 and 3.9 mm
- tumour speck C: voxel (10, 2, 0) -> extent 0.78 mm < 3 mm: dropped (box (10, 2, 0, 11, 3, 1))
- tumour sheet E: z 11 only, y 0..5, x 4..5 -> 0.78 mm along array axis z (a fine axis): dropped, although it
  spans 4.68 mm along y and 6 mm along the slice axis x (box (11, 0, 4, 12, 6, 6))
- cyst: block z 2..5, y 9..12, x 0..1 -> box (2, 9, 0, 6, 13, 2), only with ``include_cysts``
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nifti_fixtures import boxes_and_classes, make_image, write_image
from pretrain_det3d.data.converters.base import ConversionError
from pretrain_det3d.data.converters.kits21 import KiTS21Converter
from pretrain_det3d.data.dataset_format import check_converted_dataset
from pretrain_det3d.data.io import read_case, read_dataset_json

SIZE_XYZ = (6, 14, 12)
SPACING_XYZ = (3.0, 0.78, 0.78)
ORIGIN_XYZ = (112.5, -20.0, 340.25)
DIRECTION = (0.0, 0.0, -1.0, 0.0, -1.0, 0.0, -1.0, 0.0, 0.0)

BOX_A = (2, 2, 1, 7, 7, 4)
BOX_B = (7, 8, 4, 11, 13, 6)
BOX_SPECK = (10, 2, 0, 11, 3, 1)
BOX_SHEET = (11, 0, 4, 12, 6, 6)
BOX_CYST = (2, 9, 0, 6, 13, 2)


def _image(array_zyx: np.ndarray) -> sitk.Image:
    return make_image(array_zyx, SPACING_XYZ, ORIGIN_XYZ, DIRECTION)


def _ct(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(40, 300, SIZE_XYZ[::-1]).astype(np.float32)


def _majority_map(with_tumour_b: bool = True) -> np.ndarray:
    seg = np.zeros(SIZE_XYZ[::-1], dtype=np.uint8)  # [Z, Y, X]
    seg[1:11, 1:13, 0:6] = 1  # kidney
    seg[2:6, 2:6, 1:3] = 2  # tumour A ...
    seg[6, 6, 3] = 2  # ... and its corner-touching voxel
    if with_tumour_b:
        seg[7:11, 8:13, 4:6] = 2
    seg[10, 2, 0] = 2  # speck
    seg[11, 0:6, 4:6] = 2  # sheet, thin along a fine axis
    seg[2:6, 9:13, 0:2] = 3  # cyst
    return seg


@pytest.fixture
def kits_source(tmp_path: Path) -> Path:
    repo = tmp_path / "kits21"
    data = repo / "kits21" / "data"
    case = data / "case_00000"
    write_image(case / "imaging.nii.gz", _image(_ct(0)))
    write_image(case / "aggregated_MAJ_seg.nii.gz", _image(_majority_map()))
    write_image(case / "aggregated_AND_seg.nii.gz", _image(_majority_map(with_tumour_b=False)))
    write_image(case / "aggregated_OR_seg.nii.gz", _image(_majority_map()))
    tumour_instance = (_majority_map() == 2).astype(np.uint8)
    write_image(case / "segmentations" / "tumor_instance-1_annotation-1.nii.gz", _image(tumour_instance))
    kidney_only = np.zeros(SIZE_XYZ[::-1], dtype=np.uint8)
    kidney_only[2:9, 2:9, 1:5] = 1
    write_image(data / "case_00002" / "imaging.nii.gz", _image(_ct(2)))
    write_image(data / "case_00002" / "aggregated_MAJ_seg.nii.gz", _image(kidney_only))
    write_image(data / "case_00002" / "aggregated_AND_seg.nii.gz", _image(kidney_only))
    (data / "kits.json").write_text(json.dumps([{"case_id": "case_00000"}, {"case_id": "case_00002"}]))
    return repo


def test_tumour_instances_from_majority_vote(kits_source: Path, tmp_path: Path) -> None:
    out = tmp_path / "converted"
    KiTS21Converter().convert(kits_source, out, show_progress=False)
    summary = check_converted_dataset(out)
    assert summary.case_ids == ["case_00000", "case_00002"] and summary.class_names == ["tumour"]
    assert boxes_and_classes(out, "case_00000") == ([BOX_A, BOX_B], [0, 0])
    assert boxes_and_classes(out, "case_00002") == ([], [])  # kidney only: a negative case
    record = read_dataset_json(out)["conversion"]
    assert record["segmentation"] == "aggregated_MAJ_seg.nii.gz"
    assert [d["box"] for d in record["dropped_components"]["case_00000"]] == [list(BOX_SPECK), list(BOX_SHEET)]


def test_cysts_as_second_class(kits_source: Path, tmp_path: Path) -> None:
    out = tmp_path / "converted"
    KiTS21Converter({"include_cysts": True}).convert(kits_source, out, show_progress=False)
    assert check_converted_dataset(out).class_names == ["tumour", "cyst"]
    assert boxes_and_classes(out, "case_00000") == ([BOX_A, BOX_B, BOX_CYST], [0, 0, 1])


def test_face_connectivity_splits_the_corner_voxel(kits_source: Path, tmp_path: Path) -> None:
    out = tmp_path / "converted"
    KiTS21Converter({"connectivity": 6, "min_extent_mm": 0}).convert(kits_source, out, show_progress=False)
    boxes, _ = boxes_and_classes(out, "case_00000")
    assert boxes == [(2, 2, 1, 6, 6, 3), (6, 6, 3, 7, 7, 4), BOX_B, BOX_SPECK, BOX_SHEET]


def test_other_aggregation_can_be_chosen(kits_source: Path, tmp_path: Path) -> None:
    out = tmp_path / "converted"
    KiTS21Converter({"segmentation": "aggregated_AND_seg.nii.gz"}).convert(kits_source, out, show_progress=False)
    assert boxes_and_classes(out, "case_00000") == ([BOX_A], [0])


def test_geometry_is_kept_and_data_folder_found_from_any_level(kits_source: Path, tmp_path: Path) -> None:
    for level, source in enumerate((kits_source, kits_source / "kits21", kits_source / "kits21" / "data")):
        out = tmp_path / f"converted{level}"
        KiTS21Converter().convert(source, out, show_progress=False)
        converted = read_case(out, "case_00000")
        np.testing.assert_allclose(converted.spacing, SPACING_XYZ[::-1], rtol=1e-6)
        np.testing.assert_allclose(converted.origin, ORIGIN_XYZ, atol=1e-4)
        np.testing.assert_allclose(converted.direction, DIRECTION, atol=1e-6)
        np.testing.assert_allclose(converted.image[0], _ct(0), rtol=1e-6)


def test_missing_imaging_asks_for_get_imaging(kits_source: Path, tmp_path: Path) -> None:
    case = kits_source / "kits21" / "data" / "case_00001"
    write_image(case / "aggregated_MAJ_seg.nii.gz", _image(_majority_map()))
    out = tmp_path / "converted"
    with pytest.raises(ConversionError, match=r"case_00001/imaging\.nii\.gz: CT volume is missing.*get_imaging"):
        KiTS21Converter().convert(kits_source, out, show_progress=False)
    assert not out.exists()


def test_unknown_label_value_and_settings_are_refused(kits_source: Path, tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match=r"'convert \(kits21\)\.include_cyst': unknown key; did you mean "
                                              r"'include_cysts'"):
        KiTS21Converter({"include_cyst": True})
    with pytest.raises(ConversionError, match=r"'convert \(kits21\)\.segmentation': Input should be "):
        KiTS21Converter({"segmentation": "aggregated_seg.nii.gz"})
    seg = _majority_map()
    seg[0, 0, 0] = 7
    write_image(kits_source / "kits21" / "data" / "case_00000" / "aggregated_MAJ_seg.nii.gz", _image(seg))
    with pytest.raises(ConversionError, match=r"aggregated_MAJ_seg\.nii\.gz: unknown label values \[7\]"):
        KiTS21Converter().convert(kits_source, tmp_path / "converted", show_progress=False)


def test_download_layout_with_publisher_image_names(kits_source: Path, tmp_path: Path) -> None:
    # what the workflow's download leaves: the repository archive unpacked into kits21/kits21-master/ and the CT
    # volumes under their server names master_{id}.nii.gz in the source root
    root = tmp_path / "raw_kits21"
    (root / "kits21").mkdir(parents=True)
    (kits_source).rename(root / "kits21" / "kits21-master")
    data = root / "kits21" / "kits21-master" / "kits21" / "data"
    for case in ("case_00000", "case_00002"):
        (data / case / "imaging.nii.gz").rename(root / f"master_{case[-5:]}.nii.gz")
    out = tmp_path / "converted"
    KiTS21Converter().convert(root, out, show_progress=False)
    assert check_converted_dataset(out).case_ids == ["case_00000", "case_00002"]
    assert boxes_and_classes(out, "case_00000") == ([BOX_A, BOX_B], [0, 0])
    np.testing.assert_allclose(read_case(out, "case_00000").image[0], _ct(0), rtol=1e-6)
