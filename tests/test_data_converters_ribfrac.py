"""RibFrac converter on a miniature copy of the challenge's on-disk format.

Fixture (what the Zenodo zips unpack to): ``ribfrac-train-images-1/Part1/RibFrac1-image.nii.gz`` (int16 CT),
``ribfrac-train-labels-1/Part1/RibFrac1-label.nii.gz`` (uint8 instance map), ``ribfrac-train-info-1.csv``
(``public_id,label_id,label_code``), a fracture-free case in ``Part2`` with its own CSV, a test image without
labels, and a macOS ``._`` resource fork. Geometry: spacing (x, y, z) = (0.75, 0.8, 1.25) mm, origin
(-150.5, 80.25, -300.0), direction diag(-1, 1, -1) (x and z flipped).

Hand-worked boxes, (z0, y0, x0, z1, y1, x1), max exclusive, array axes of the converted image:

- label 1 (code 3, buckle), voxels z 2..3, y 4..6, x 1..2               -> (2, 4, 1, 4, 7, 3)
- label 2 (code -1, type undefined), voxels z 5, y 0..1, x 9..11         -> (5, 0, 9, 6, 2, 12)
- label 3 (code 1, displaced), painted from world coordinates:
  x_w in [-157.25, -155.75]: i = (-150.5 - x_w) / 0.75 -> 9 .. 7
  y_w in [ 82.65,   83.45]:  j = (y_w - 80.25) / 0.8   -> 3 .. 4
  z_w in [-303.75, -302.5]:  k = (-300 - z_w) / 1.25   -> 3 .. 2
  -> voxels z 2..3, y 3..4, x 7..9                                        -> (2, 3, 7, 4, 5, 10)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nifti_fixtures import boxes_and_classes, make_image, write_image
from pretrain_det3d.data.converters.base import ConversionError
from pretrain_det3d.data.converters.ribfrac import RibFracConverter
from pretrain_det3d.data.dataset_format import check_converted_dataset
from pretrain_det3d.data.io import read_case, read_dataset_json

SIZE_XYZ = (12, 10, 8)
SPACING_XYZ = (0.75, 0.8, 1.25)
ORIGIN_XYZ = (-150.5, 80.25, -300.0)
DIRECTION = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0)

BOX_BUCKLE = (2, 4, 1, 4, 7, 3)
BOX_UNCERTAIN = (5, 0, 9, 6, 2, 12)
BOX_DISPLACED = (2, 3, 7, 4, 5, 10)
# world corners (x, y, z) of the displaced fracture, at voxel centres
DISPLACED_WORLD_CORNERS = ((-155.75, 82.65, -302.5), (-157.25, 83.45, -303.75))


def _image(array_zyx: np.ndarray) -> sitk.Image:
    return make_image(array_zyx, SPACING_XYZ, ORIGIN_XYZ, DIRECTION)


def _ct(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1000, 1500, SIZE_XYZ[::-1]).astype(np.int16)


def _label_case1() -> np.ndarray:
    label = np.zeros(SIZE_XYZ[::-1], dtype=np.uint8)  # [Z, Y, X]
    label[2:4, 4:7, 1:3] = 1
    label[5, 0:2, 9:12] = 2
    reference = _image(label)
    (i0, j0, k0), (i1, j1, k1) = (reference.TransformPhysicalPointToIndex(p) for p in DISPLACED_WORLD_CORNERS)
    label[min(k0, k1):max(k0, k1) + 1, min(j0, j1):max(j0, j1) + 1, min(i0, i1):max(i0, i1) + 1] = 3
    return label


@pytest.fixture
def ribfrac_source(tmp_path: Path) -> Path:
    root = tmp_path / "ribfrac"
    write_image(root / "ribfrac-train-images-1/Part1/RibFrac1-image.nii.gz", _image(_ct(1)))
    write_image(root / "ribfrac-train-labels-1/Part1/RibFrac1-label.nii.gz", _image(_label_case1()))
    (root / "ribfrac-train-images-1/Part1/._RibFrac1-image.nii.gz").write_bytes(b"\x00\x05\x16\x07 not an image")
    (root / "ribfrac-train-info-1.csv").write_text(
        "public_id,label_id,label_code\nRibFrac1,0,0\nRibFrac1,1,3\nRibFrac1,2,-1\nRibFrac1,3,1\n")
    write_image(root / "ribfrac-train-images-2/Part2/RibFrac2-image.nii.gz", _image(_ct(2)))
    write_image(root / "ribfrac-train-labels-2/Part2/RibFrac2-label.nii.gz",
           _image(np.zeros(SIZE_XYZ[::-1], dtype=np.uint8)))
    (root / "ribfrac-train-info-2.csv").write_text("public_id,label_id,label_code\nRibFrac2,0,0\n")
    write_image(root / "ribfrac-test-images/RibFrac501-image.nii.gz", _image(_ct(3)))
    return root


def test_one_fracture_class_keeps_undefined_types(ribfrac_source: Path, tmp_path: Path) -> None:
    out = tmp_path / "converted"
    RibFracConverter().convert(ribfrac_source, out, show_progress=False)
    summary = check_converted_dataset(out)
    assert summary.case_ids == ["RibFrac1", "RibFrac2"]  # the test image without labels is not converted
    assert summary.class_names == ["fracture"] and summary.modalities == ["CT"]
    boxes, classes = boxes_and_classes(out, "RibFrac1")
    assert boxes == [BOX_BUCKLE, BOX_UNCERTAIN, BOX_DISPLACED]
    assert classes == [0, 0, 0]
    assert boxes_and_classes(out, "RibFrac2") == ([], [])
    record = read_dataset_json(out)["conversion"]
    assert record["images_without_labels"] == ["RibFrac501"]
    assert record["dropped_uncertain"] == {}


def test_four_types_exclude_undefined_type(ribfrac_source: Path, tmp_path: Path) -> None:
    out = tmp_path / "converted"
    RibFracConverter({"classes": "types"}).convert(ribfrac_source, out, show_progress=False)
    assert check_converted_dataset(out).class_names == ["displaced", "nondisplaced", "buckle", "segmental"]
    boxes, classes = boxes_and_classes(out, "RibFrac1")
    assert boxes == [BOX_BUCKLE, BOX_DISPLACED]  # label 2 (code -1) erased, label 3 renumbered to 2
    assert classes == [2, 0]  # buckle (code 3) -> index 2, displaced (code 1) -> index 0
    record = read_dataset_json(out)["conversion"]
    assert record["dropped_uncertain"] == {"RibFrac1": [2]}
    assert record["label_ids"]["RibFrac1"] == [1, 3]


def test_one_class_can_drop_undefined_types(ribfrac_source: Path, tmp_path: Path) -> None:
    out = tmp_path / "converted"
    RibFracConverter({"uncertain": "drop"}).convert(ribfrac_source, out, show_progress=False)
    assert boxes_and_classes(out, "RibFrac1") == ([BOX_BUCKLE, BOX_DISPLACED], [0, 0])


def test_geometry_and_intensities_are_kept(ribfrac_source: Path, tmp_path: Path) -> None:
    out = tmp_path / "converted"
    RibFracConverter().convert(ribfrac_source, out, show_progress=False)
    converted = read_case(out, "RibFrac1")
    np.testing.assert_allclose(converted.spacing, SPACING_XYZ[::-1], rtol=1e-6)
    np.testing.assert_allclose(converted.origin, ORIGIN_XYZ, atol=1e-4)
    np.testing.assert_allclose(converted.direction, DIRECTION, atol=1e-6)
    np.testing.assert_array_equal(converted.image[0], _ct(1))
    # the world point at the displaced fracture's first corner lands in that instance of the converted map
    label = sitk.ReadImage(str(out / "labelsTr" / "RibFrac1.nii.gz"))
    i, j, k = label.TransformPhysicalPointToIndex(DISPLACED_WORLD_CORNERS[0])
    assert sitk.GetArrayFromImage(label)[k, j, i] == 3


def test_label_without_csv_row_names_the_label_file(ribfrac_source: Path, tmp_path: Path) -> None:
    csv = ribfrac_source / "ribfrac-train-info-1.csv"
    csv.write_text("public_id,label_id,label_code\nRibFrac1,0,0\nRibFrac1,1,3\nRibFrac1,2,-1\n")
    out = tmp_path / "converted"
    with pytest.raises(ConversionError, match=r"RibFrac1-label\.nii\.gz: label ids \[3\] have no row"):
        RibFracConverter().convert(ribfrac_source, out, show_progress=False)
    assert not out.exists()  # nothing half-written


def test_label_grid_must_match_image(ribfrac_source: Path, tmp_path: Path) -> None:
    label_path = ribfrac_source / "ribfrac-train-labels-1/Part1/RibFrac1-label.nii.gz"
    shifted = sitk.ReadImage(str(label_path))
    shifted.SetOrigin((ORIGIN_XYZ[0] + 2.0, ORIGIN_XYZ[1], ORIGIN_XYZ[2]))
    sitk.WriteImage(shifted, str(label_path))
    with pytest.raises(ConversionError, match=r"RibFrac1-label\.nii\.gz: origin"):
        RibFracConverter().convert(ribfrac_source, tmp_path / "converted", show_progress=False)


def test_unknown_code_and_bad_settings_are_refused(ribfrac_source: Path, tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match="'uncertain' must be 'drop'"):
        RibFracConverter({"classes": "types", "uncertain": "fracture"})
    with pytest.raises(ConversionError, match=r"'convert \(ribfrac\)\.class': unknown key; did you mean 'classes'"):
        RibFracConverter({"class": "types"})
    (ribfrac_source / "ribfrac-train-info-2.csv").write_text("public_id,label_id,label_code\nRibFrac2,1,7\n")
    with pytest.raises(ConversionError, match=r"ribfrac-train-info-2\.csv: line 2: unknown label_code 7"):
        RibFracConverter().convert(ribfrac_source, tmp_path / "converted", show_progress=False)


def test_dataset_json_records_source_and_licence(ribfrac_source: Path, tmp_path: Path) -> None:
    out = tmp_path / "converted"
    RibFracConverter().convert(ribfrac_source, out, show_progress=False)
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["name"] == "ribfrac" and meta["num_cases"] == 2
    assert "CC-BY-NC-4.0" in meta["licence"] and meta["source"].startswith("https://ribfrac")
    assert sorted(meta["conversion"]["info_csvs"]) == ["ribfrac-train-info-1.csv", "ribfrac-train-info-2.csv"]
