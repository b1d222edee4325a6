"""CTA-A converter on miniature NIfTI volumes and aneurysm masks (the layout documented in the converter).

The fixture volume has an oblique-free but non-identity direction (x flipped, y and z swapped), a non-trivial
origin and anisotropic spacing; the mask holds two separate aneurysms with the same value, which the default
rule (26-connected components) must split. Boxes are worked out by hand.
"""

from __future__ import annotations

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


def write_nifti(path: Path, array: np.ndarray) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(SPACING_XYZ)
    image.SetOrigin(ORIGIN_XYZ)
    image.SetDirection(DIRECTION)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))


@pytest.fixture
def cta_source(tmp_path: Path) -> Path:
    root = tmp_path / "cta_a"
    rng = np.random.default_rng(3)
    mask = np.zeros(SHAPE_ZYX, dtype=np.uint8)
    mask[2:5, 3:6, 4:8] = 1  # aneurysm 1: z 2..4, y 3..5, x 4..7
    mask[5, 6, 8] = 1  # touches aneurysm 1 only diagonally (z 5 vs 4, y 6 vs 5, x 8 vs 7): same component
    mask[7:9, 9:11, 1:3] = 1  # aneurysm 2, separate
    write_nifti(root / "images" / "case_001.nii.gz", rng.integers(-100, 600, SHAPE_ZYX).astype(np.int16))
    write_nifti(root / "labels" / "case_001.nii.gz", mask)
    write_nifti(root / "images" / "case_002.nii.gz", rng.integers(-100, 600, SHAPE_ZYX).astype(np.int16))
    write_nifti(root / "labels" / "case_002.nii.gz", np.zeros(SHAPE_ZYX, np.uint8))
    return root


def test_cta_a_components_match_hand_worked(cta_source: Path, tmp_path: Path) -> None:
    out = convert_dataset("cta_a", cta_source, tmp_path / "converted", show_progress=False)
    assert check_converted_dataset(out).case_ids == ["case_001", "case_002"]
    case = read_case(out, "case_001")
    ids, boxes = instance_voxel_extents(case.instance_map)
    # aneurysm 1 with its diagonal neighbour: z 2..5, y 3..6, x 4..8 -> [2, 3, 4, 6, 7, 9]; aneurysm 2 -> [7, 9, 1, 9, 11, 3]
    np.testing.assert_array_equal(ids, [1, 2])
    np.testing.assert_array_equal(boxes, [[2, 3, 4, 6, 7, 9], [7, 9, 1, 9, 11, 3]])
    np.testing.assert_allclose(case.direction, DIRECTION)
    np.testing.assert_allclose(case.origin, ORIGIN_XYZ)
    np.testing.assert_allclose(case.spacing, SPACING_XYZ[::-1])
    assert read_case(out, "case_002").instances == {}


def test_cta_a_label_values_rule(cta_source: Path, tmp_path: Path) -> None:
    mask = np.zeros(SHAPE_ZYX, dtype=np.uint8)
    mask[1:3, 1:3, 1:3] = 4
    mask[3:5, 3:5, 3:5] = 2  # touches value 4 diagonally, but is its own aneurysm by value
    write_nifti(cta_source / "labels" / "case_001.nii.gz", mask)
    out = convert_dataset("cta_a", cta_source, tmp_path / "converted", settings={"instances": "values"}, show_progress=False)
    _, boxes = instance_voxel_extents(read_case(out, "case_001").instance_map)
    np.testing.assert_array_equal(boxes, [[3, 3, 3, 5, 5, 5], [1, 1, 1, 3, 3, 3]])  # value 2 first, then 4


def test_cta_a_missing_mask_and_grid_mismatch_are_named(cta_source: Path, tmp_path: Path) -> None:
    (cta_source / "labels" / "case_002.nii.gz").unlink()
    with pytest.raises(ConversionError, match=r"case_002\.nii\.gz: mask of case 'case_002' is missing"):
        convert_dataset("cta_a", cta_source, tmp_path / "converted", show_progress=False)
    shifted = sitk.GetImageFromArray(np.zeros(SHAPE_ZYX, np.uint8))
    shifted.SetSpacing(SPACING_XYZ)
    shifted.SetDirection(DIRECTION)  # origin left at 0: a different grid
    sitk.WriteImage(shifted, str(cta_source / "labels" / "case_002.nii.gz"))
    with pytest.raises(ConversionError, match=r"case_002\.nii\.gz: grid .* differs from the image"):
        convert_dataset("cta_a", cta_source, tmp_path / "converted", show_progress=False)
    assert not (tmp_path / "converted").exists()
