"""LUNA16 converter on a miniature copy of LUNA16's real layout (subset folders of .mhd/.raw, annotations.csv).

The fixture scan has a non-trivial origin, anisotropic spacing and a direction that flips y and z, so a
converter that ignored any of them would put the spheres elsewhere. The expected voxel extents of the spheres
(``[first, last + 1)`` per axis) are worked out by hand below.
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

SPACING_XYZ = (0.7, 0.8, 2.5)
ORIGIN_XYZ = (-150.3, 120.2, -300.0)
DIRECTION = (1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, -1.0)  # y and z axes flipped
SIZE_XYZ = (20, 18, 12)
UID_A = "1.3.6.1.4.1.14519.5.2.1.6279.6001.100000000000000000000000000001"
UID_B = "1.3.6.1.4.1.14519.5.2.1.6279.6001.100000000000000000000000000002"


def world(index_xyz: tuple[float, float, float]) -> tuple[float, float, float]:
    """origin + D @ (spacing * index), written out for the diagonal D above."""
    signs = (1.0, -1.0, -1.0)
    return tuple(o + d * s * i for o, d, s, i in zip(ORIGIN_XYZ, signs, SPACING_XYZ, index_xyz))


def write_scan(path: Path) -> None:
    rng = np.random.default_rng(0)
    array = rng.integers(-1000, 400, size=SIZE_XYZ[::-1]).astype(np.int16)  # [Z, Y, X]
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(SPACING_XYZ)
    image.SetOrigin(ORIGIN_XYZ)
    image.SetDirection(DIRECTION)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))  # .mhd header + .raw data, like LUNA16


@pytest.fixture
def luna16_source(tmp_path: Path) -> Path:
    root = tmp_path / "luna16"
    write_scan(root / "subset0" / f"{UID_A}.mhd")
    write_scan(root / "subset1" / "subset1" / f"{UID_B}.mhd")  # the layout the subset zips unpack to
    centre_a = world((10, 5, 4))  # voxel (x=10, y=5, z=4)
    centre_small = world((3, 14, 9))
    rows = [
        ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"),
        (UID_A, *centre_a, 4.0),
        (UID_A, *centre_small, 0.5),
    ]
    (root / "annotations.csv").write_text("\n".join(",".join(str(v) for v in row) for row in rows) + "\n")
    # evaluationScript.zip unpacks to evaluationScript/evaluationScript/annotations/ (one row of a scan that is
    # not in this copy, which the converted dataset leaves out; -1: a finding without a diameter)
    excluded = root / "evaluationScript" / "evaluationScript" / "annotations" / "annotations_excluded.csv"
    excluded.parent.mkdir(parents=True)
    excluded.write_text(EXCLUDED_TEXT)
    return root


UID_ELSEWHERE = "1.3.6.1.4.1.14519.5.2.1.6279.6001.999999999999999999999999999999"
EXCLUDED_TEXT = (f"seriesuid,coordX,coordY,coordZ,diameter_mm\n{UID_A},-140.0,110.5,-305.25,-1\n"
                 f"{UID_ELSEWHERE},1.0,2.0,3.0,4.5\n{UID_B},-120.125,100.0,-290.0,3.75\n")


def test_mhd_fixture_is_real_metaimage(luna16_source: Path) -> None:
    lines = (luna16_source / "subset0" / f"{UID_A}.mhd").read_text().splitlines()
    header = dict(line.split(" = ", 1) for line in lines)
    assert header["ObjectType"] == "Image" and header["NDims"] == "3" and header["ElementType"] == "MET_SHORT"
    assert header["ElementDataFile"] == f"{UID_A}.raw"
    np.testing.assert_allclose([float(v) for v in header["TransformMatrix"].split()], DIRECTION)
    np.testing.assert_allclose([float(v) for v in header["ElementSpacing"].split()], SPACING_XYZ)
    np.testing.assert_allclose([float(v) for v in header["Offset"].split()], ORIGIN_XYZ)
    assert [int(v) for v in header["DimSize"].split()] == list(SIZE_XYZ)
    assert (luna16_source / "subset0" / f"{UID_A}.raw").is_file()


def test_luna16_boxes_match_hand_worked(luna16_source: Path, tmp_path: Path) -> None:
    out = convert_dataset("luna16", luna16_source, tmp_path / "converted", show_progress=False)
    summary = check_converted_dataset(out)
    assert sorted(summary.case_ids) == sorted([UID_A, UID_B])
    case = read_case(out, UID_A)
    # Nodule 1: centre voxel (z=4, y=5, x=10), radius 2 mm. Along x (0.7 mm) voxels up to floor(2/0.7)=2 away
    # are inside -> x 8..12; along y (0.8 mm) floor(2/0.8)=2 -> y 3..7; along z (2.5 mm) only z=4.
    # Nodule 2: 0.5 mm, smaller than a voxel -> only its centre voxel (z=9, y=14, x=3).
    expected = np.array([[4, 3, 8, 5, 8, 13], [9, 14, 3, 10, 15, 4]], dtype=float)
    ids, boxes = instance_voxel_extents(case.instance_map)
    np.testing.assert_array_equal(ids, [1, 2])
    np.testing.assert_array_equal(boxes, expected)
    assert case.instances == {1: 0, 2: 0}
    # the sphere is a sphere in mm, not a box: the corner voxel (z=4, y=3, x=8) is 2.13 mm away -> outside
    assert case.instance_map[4, 3, 8] == 0 and case.instance_map[4, 5, 8] == 1
    # geometry kept: origin, direction, spacing (z, y, x)
    np.testing.assert_allclose(case.origin, ORIGIN_XYZ)
    np.testing.assert_allclose(case.direction, DIRECTION)
    np.testing.assert_allclose(case.spacing, SPACING_XYZ[::-1])
    # the scan without annotations is a negative case
    assert read_case(out, UID_B).instances == {}
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["labels"] == {"0": "nodule"} and dataset["modality"] == {"0": "CT"}


def test_luna16_missing_column_is_named(luna16_source: Path, tmp_path: Path) -> None:
    path = luna16_source / "annotations.csv"
    path.write_text(path.read_text().replace("diameter_mm", "diameter"))
    with pytest.raises(ConversionError, match=r"annotations.csv: missing columns \['diameter_mm'\]"):
        convert_dataset("luna16", luna16_source, tmp_path / "converted", show_progress=False)
    assert not (tmp_path / "converted").exists()


def test_luna16_nodule_outside_scan_is_an_error(luna16_source: Path, tmp_path: Path) -> None:
    path = luna16_source / "annotations.csv"
    path.write_text(path.read_text() + f"{UID_A},500.0,500.0,500.0,5.0\n")
    with pytest.raises(ConversionError, match="lies outside the scan"):
        convert_dataset("luna16", luna16_source, tmp_path / "converted", show_progress=False)
    assert not (tmp_path / "converted").exists()


def test_luna16_keeps_reference_tables_beside_the_labels(luna16_source: Path, tmp_path: Path) -> None:
    path = luna16_source / "annotations.csv"
    path.write_text(path.read_text() + f"{UID_ELSEWHERE},1.0,2.0,3.0,6.0\n")  # a scan this copy lacks
    out = convert_dataset("luna16", luna16_source, tmp_path / "converted", show_progress=False)
    check_converted_dataset(out)  # the tables do not disturb the format check
    excluded = (out / "labelsTr" / "annotations_excluded.csv").read_text().splitlines()
    # the rows of the converted scans, text unchanged (-1 stays -1), the other scan's row left out
    assert excluded == ["seriesuid,coordX,coordY,coordZ,diameter_mm", f"{UID_A},-140.0,110.5,-305.25,-1",
                        f"{UID_B},-120.125,100.0,-290.0,3.75"]
    annotations = (out / "labelsTr" / "annotations.csv").read_text().splitlines()
    assert len(annotations) == 3 and annotations[1].startswith(f"{UID_A},") and UID_ELSEWHERE not in "".join(annotations)
    assert json.loads((out / "dataset.json").read_text())["luna16_reference"] == {
        "annotations": "labelsTr/annotations.csv", "annotations_excluded": "labelsTr/annotations_excluded.csv"}


def test_luna16_without_excluded_findings(luna16_source: Path, tmp_path: Path) -> None:
    import shutil

    shutil.rmtree(luna16_source / "evaluationScript")
    with pytest.raises(ConversionError, match=r"no file matches convert\.excluded_findings '\*\*/annotations_excluded"
                                              r"\.csv'.*evaluationScript\.zip of Zenodo record 3723295"):
        convert_dataset("luna16", luna16_source, tmp_path / "converted", show_progress=False)
    assert not (tmp_path / "converted").exists()
    out = convert_dataset("luna16", luna16_source, tmp_path / "converted", {"excluded_findings": None},
                          show_progress=False)
    assert not (out / "labelsTr" / "annotations_excluded.csv").exists()
    assert (out / "labelsTr" / "annotations.csv").is_file()
    assert json.loads((out / "dataset.json").read_text())["luna16_reference"]["annotations_excluded"] is None


def test_luna16_differing_copies_of_excluded_findings(luna16_source: Path, tmp_path: Path) -> None:
    (luna16_source / "annotations_excluded.csv").write_text(EXCLUDED_TEXT)  # an identical copy counts once
    convert_dataset("luna16", luna16_source, tmp_path / "a", show_progress=False)
    (luna16_source / "annotations_excluded.csv").write_text(EXCLUDED_TEXT.replace("3.75", "3.5"))
    with pytest.raises(ConversionError, match=r"annotations_excluded\.csv: differs from"):
        convert_dataset("luna16", luna16_source, tmp_path / "b", show_progress=False)
