"""CTA-A converter on a miniature copy of Zenodo record 6801398's layout (real NIfTI files written with SimpleITK).

Fixture ``raw/CTA-A/`` (the record one level below the source root, as an unpacked archive leaves it)::

    imagesTr/Tr0001.nii.gz, Tr0002.nii.gz, Tr0003.nii.gz   + labelsTr/ with the same names
    imagesTs_internal/Ts0001.nii.gz                          + labelsTs_internal/
    imagesTs_external/ExtA0001.nii.gz, ExtB0001.nii.gz       + labelsTs_external/
    internal_instances.csv, external_instances.csv          instance_id, subset, ..., num_IAs

Volumes: 10 x 12 x 14 voxels (z, y, x), spacing (0.45, 0.45, 0.8) mm, origin (101.5, -20.25, 64.0), direction
with x flipped and y, z swapped. Masks (value 1), boxes (z0, y0, x0, z1, y1, x1) over the voxels, max exclusive:

- Tr0001: block z 2..4, y 3..5, x 4..7 -> (2, 3, 4, 5, 6, 8); voxel (5, 6, 8), touching the block only at a
  corner -> with 6-connectivity (default) its own instance (5, 6, 8, 6, 7, 9), with 26 part of the block
  (2, 3, 4, 6, 7, 9); block z 7..8, y 9..10, x 1..2 -> (7, 9, 1, 9, 11, 3). The CSV says 2 aneurysms.
- Tr0002: its mask has 9 slices instead of 10 (the record holds one such case): skipped and reported.
- Tr0003: block z 0..1, y 0..1, x 0..1 -> (0, 0, 0, 2, 2, 2).
- Ts0001 (internal test): block z 4..6, y 4..6, x 4..6 -> (4, 4, 4, 7, 7, 7).
- ExtA0001 (external test): block z 1..2, y 8..10, x 10..12 -> (1, 8, 10, 3, 11, 13).
- ExtB0001 (external test): two blocks (0, 0, 0, 2, 2, 2) and (6, 6, 6, 8, 8, 8); the CSV says 1 aneurysm.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from pretrain_det3d.data.boxes import instance_voxel_extents
from pretrain_det3d.data.converters import ConversionError, convert_dataset
from pretrain_det3d.data.dataset_format import check_converted_dataset
from pretrain_det3d.data.io import read_case

SHAPE_ZYX = (10, 12, 14)
SPACING_XYZ = (0.45, 0.45, 0.8)
ORIGIN_XYZ = (101.5, -20.25, 64.0)
DIRECTION = (-1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0)
CSV_HEADER = "instance_id,subset,institution_id,age,gender,is_ruptured,num_IAs\n"


def write_nifti(path: Path, array: np.ndarray) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(SPACING_XYZ)
    image.SetOrigin(ORIGIN_XYZ)
    image.SetDirection(DIRECTION)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=True)


def blocks(*regions: tuple[slice, slice, slice], shape: tuple[int, int, int] = SHAPE_ZYX) -> np.ndarray:
    mask = np.zeros(shape, dtype=np.uint8)
    for region in regions:
        mask[region] = 1
    return mask


def ct(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(-100, 600, SHAPE_ZYX).astype(np.int16)


MASKS = {
    ("train", "Tr0001"): blocks((slice(2, 5), slice(3, 6), slice(4, 8)), (slice(5, 6), slice(6, 7), slice(8, 9)),
                                (slice(7, 9), slice(9, 11), slice(1, 3))),
    ("train", "Tr0002"): blocks((slice(2, 4), slice(2, 4), slice(2, 4)), shape=(9, 12, 14)),
    ("train", "Tr0003"): blocks((slice(0, 2), slice(0, 2), slice(0, 2))),
    ("internal", "Ts0001"): blocks((slice(4, 7), slice(4, 7), slice(4, 7))),
    ("external", "ExtA0001"): blocks((slice(1, 3), slice(8, 11), slice(10, 13))),
    ("external", "ExtB0001"): blocks((slice(0, 2), slice(0, 2), slice(0, 2)), (slice(6, 8), slice(6, 8), slice(6, 8))),
}
FOLDERS = {"train": ("imagesTr", "labelsTr"), "internal": ("imagesTs_internal", "labelsTs_internal"),
           "external": ("imagesTs_external", "labelsTs_external")}


@pytest.fixture
def cta_source(tmp_path: Path) -> Path:
    source = tmp_path / "raw"
    record = source / "CTA-A"
    for seed, ((subset, case), mask) in enumerate(MASKS.items()):
        images, labels = FOLDERS[subset]
        write_nifti(record / images / f"{case}.nii.gz", ct(seed))
        write_nifti(record / labels / f"{case}.nii.gz", mask)
    (record / "internal_instances.csv").write_text(
        CSV_HEADER + "Tr0001,train,1,61,F,no,2\nTr0002,train,1,55,M,yes,1\nTr0003,train,2,70,F,no,1\n"
        "Ts0001,internal_test,1,48,M,no,1\n")
    (record / "external_instances.csv").write_text(
        CSV_HEADER + "ExtA0001,external_test,3,66,F,no,1\nExtB0001,external_test,4,59,M,yes,1\n")
    return source


def boxes(out: Path, case: str, test: bool = False) -> list[list[int]]:
    return instance_voxel_extents(read_case(out, case, test=test).instance_map)[1].tolist()


def test_all_subsets_with_test_cases_held_out_and_mismatch_skipped(cta_source: Path, tmp_path: Path) -> None:
    out = convert_dataset("cta_a", cta_source, tmp_path / "converted", show_progress=False)
    summary = check_converted_dataset(out)
    assert summary.case_ids == ["Tr0001", "Tr0003"]
    assert summary.test_case_ids == ["ExtA0001", "ExtB0001", "Ts0001"]
    assert boxes(out, "Tr0001") == [[2, 3, 4, 5, 6, 8], [5, 6, 8, 6, 7, 9], [7, 9, 1, 9, 11, 3]]
    assert boxes(out, "Tr0003") == [[0, 0, 0, 2, 2, 2]]
    assert boxes(out, "Ts0001", test=True) == [[4, 4, 4, 7, 7, 7]]
    assert boxes(out, "ExtA0001", test=True) == [[1, 8, 10, 3, 11, 13]]
    assert boxes(out, "ExtB0001", test=True) == [[0, 0, 0, 2, 2, 2], [6, 6, 6, 8, 8, 8]]
    case = read_case(out, "Tr0001")
    np.testing.assert_allclose(case.direction, DIRECTION)
    np.testing.assert_allclose(case.origin, ORIGIN_XYZ)
    np.testing.assert_allclose(case.spacing, SPACING_XYZ[::-1])
    np.testing.assert_array_equal(case.image[0], ct(0))
    assert case.instances == {1: 0, 2: 0, 3: 0}
    report = json.loads((out / "conversion_report.json").read_text())
    assert list(report["skipped_cases"]) == ["Tr0002"]
    assert report["skipped_cases"]["Tr0002"].startswith(str(cta_source / "CTA-A" / "labelsTr" / "Tr0002.nii.gz"))
    assert "size (14, 12, 9) differs from size (14, 12, 10)" in report["skipped_cases"]["Tr0002"]
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["num_cases"] == 2 and dataset["skipped_cases"] == report["skipped_cases"]
    assert dataset["conversion"]["count_mismatch"] == {"Tr0001": {"num_IAs": 2, "instances": 3},
                                                       "ExtB0001": {"num_IAs": 1, "instances": 2}}
    assert dataset["conversion"]["test_subsets"] == {"ExtA0001": "external_test", "ExtB0001": "external_test",
                                                     "Ts0001": "internal_test"}


def test_strict_stops_at_the_mismatched_case(cta_source: Path, tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match=r"CTA-A/labelsTr/Tr0002\.nii\.gz: size \(14, 12, 9\) differs"):
        convert_dataset("cta_a", cta_source, tmp_path / "converted", settings={"strict": True}, show_progress=False)
    assert not (tmp_path / "converted").exists()


def test_training_subset_only_and_26_connectivity(cta_source: Path, tmp_path: Path) -> None:
    out = convert_dataset("cta_a", cta_source / "CTA-A", tmp_path / "converted", show_progress=False,
                          settings={"subsets": ["train"], "connectivity": 26})
    summary = check_converted_dataset(out)
    assert summary.case_ids == ["Tr0001", "Tr0003"] and summary.test_case_ids == []
    assert boxes(out, "Tr0001") == [[2, 3, 4, 6, 7, 9], [7, 9, 1, 9, 11, 3]]  # the corner voxel joins the block
    assert json.loads((out / "dataset.json").read_text())["conversion"]["count_mismatch"] == {}


def test_label_values_rule(cta_source: Path, tmp_path: Path) -> None:
    mask = np.zeros(SHAPE_ZYX, dtype=np.uint8)
    mask[1:3, 1:3, 1:3] = 4
    mask[3:5, 3:5, 3:5] = 2  # touches value 4 diagonally, but is its own aneurysm by value
    write_nifti(cta_source / "CTA-A" / "labelsTr" / "Tr0003.nii.gz", mask)
    out = convert_dataset("cta_a", cta_source, tmp_path / "converted", show_progress=False,
                          settings={"instances": "values", "subsets": ["train"]})
    assert boxes(out, "Tr0003") == [[3, 3, 3, 5, 5, 5], [1, 1, 1, 3, 3, 3]]  # value 2 first, then 4


def test_missing_mask_is_skipped_and_reported(cta_source: Path, tmp_path: Path) -> None:
    (cta_source / "CTA-A" / "labelsTs_internal" / "Ts0001.nii.gz").unlink()
    out = convert_dataset("cta_a", cta_source, tmp_path / "converted", show_progress=False)
    skipped = json.loads((out / "conversion_report.json").read_text())["skipped_cases"]
    assert sorted(skipped) == ["Tr0002", "Ts0001"] and "mask of case 'Ts0001' is missing" in skipped["Ts0001"]
    assert check_converted_dataset(out).test_case_ids == ["ExtA0001", "ExtB0001"]


def test_unknown_settings_layout_and_repeated_names_are_refused(cta_source: Path, tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match=r"'convert \(cta_a\)\.images_dir': unknown key"):
        convert_dataset("cta_a", cta_source, tmp_path / "converted", settings={"images_dir": "images"})
    with pytest.raises(ConversionError, match=r"'convert \(cta_a\)\.subsets\[0\]': Input should be "):
        convert_dataset("cta_a", cta_source, tmp_path / "converted", settings={"subsets": ["test"]})
    with pytest.raises(ConversionError, match=r"'convert \(cta_a\)\.subsets': .*must include 'train'"):
        convert_dataset("cta_a", cta_source, tmp_path / "converted", settings={"subsets": ["internal_test"]})
    with pytest.raises(ConversionError, match=r"imagesTr: folder is missing; CTA-A \(Zenodo 6801398\) holds"):
        convert_dataset("cta_a", tmp_path / "raw" / "CTA-A" / "labelsTr", tmp_path / "converted", show_progress=False)
    write_nifti(cta_source / "CTA-A" / "imagesTs_internal" / "Tr0003.nii.gz", ct(9))
    with pytest.raises(ConversionError, match=r"imagesTs_internal/Tr0003\.nii\.gz: case name also used in subset "
                                              r"'train'"):
        convert_dataset("cta_a", cta_source, tmp_path / "converted", show_progress=False)
    assert not (tmp_path / "converted").exists()


def test_workflow_evaluates_the_test_subsets_as_held_out_cases() -> None:
    # the study schedules test-case prediction and evaluation for a dataset whose converter writes test cases
    import yaml

    from conftest import REPO
    from pretrain_det3d.config import datasets_with_test_cases

    config = yaml.safe_load((REPO / "config" / "paper.yaml").read_text())
    assert "cta_a" in datasets_with_test_cases(config)
    config["datasets"]["cta_a"]["convert"]["subsets"] = ["train"]
    assert "cta_a" not in datasets_with_test_cases(config)
    config["datasets"]["cta_a"]["convert"]["subsets"] = ["train", "external_test"]
    assert datasets_with_test_cases(config) == ["cta_a"]
