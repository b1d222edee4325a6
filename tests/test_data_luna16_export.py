"""LUNA16 CSV export: predicted voxel boxes back to the world centres of LUNA16's annotations.csv frame.

Round trip: a nodule placed at a known world centre is converted by the LUNA16 converter, its box is taken from
the instance map and exported; the CSV must give back the world centre (and hand-worked cases check the
half-voxel convention directly).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from pretrain_det3d.data.boxes import box_voxel_counts, boxes_from_instance_map
from pretrain_det3d.data.converters import convert_dataset
from pretrain_det3d.data.io import read_case, write_case
from pretrain_det3d.data.luna16_export import LUNA16_COLUMNS, box_centres_to_world, export_luna16_csv

UID = "1.3.6.1.4.1.14519.5.2.1.6279.6001.200000000000000000000000000001"


def test_box_centre_half_voxel_convention() -> None:
    image = sitk.Image([10, 10, 10], sitk.sitkInt16)
    image.SetOrigin((-5.0, 7.0, 100.0))
    image.SetSpacing((0.5, 2.0, 3.0))
    image.SetDirection((0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, -1.0))  # x and y swapped, z flipped
    # the mask's voxels z 2, y 4..5, x 1 give the box (1, 3, 0, 3, 6, 2) (one voxel of padding each side);
    # its centre index is (x=1, y=4.5, z=2), and by hand:
    # world = origin + D @ (spacing * idx) = (-5 + 2*4.5, 7 + 0.5*1, 100 - 3*2)
    mask = np.zeros((10, 10, 10), np.int16)
    mask[2, 4:6, 1] = 1
    _, boxes = boxes_from_instance_map(mask)
    assert boxes.tolist() == [[1, 3, 0, 3, 6, 2]]
    centres = box_centres_to_world(boxes, image)
    np.testing.assert_allclose(centres, [[4.0, 7.5, 94.0]])


def test_export_round_trip_through_converter(tmp_path: Path) -> None:
    root = tmp_path / "luna16"
    array = np.zeros((10, 16, 14), dtype=np.int16)  # [Z, Y, X]
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.6, 0.9, 2.0))
    image.SetOrigin((-170.0, -40.5, 35.25))
    image.SetDirection((-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0))
    (root / "subset3").mkdir(parents=True)
    sitk.WriteImage(image, str(root / "subset3" / f"{UID}.mhd"))
    centre = image.TransformContinuousIndexToPhysicalPoint((6.0, 8.0, 5.0))  # x, y, z voxel
    (root / "annotations.csv").write_text(
        "seriesuid,coordX,coordY,coordZ,diameter_mm\n" + f"{UID},{centre[0]},{centre[1]},{centre[2]},5.0\n")
    # the export does not need LUNA16's excluded findings (the CPM score does; tests/test_evaluation_luna16_cpm.py)
    converted = convert_dataset("luna16", root, tmp_path / "converted", {"excluded_findings": None},
                                show_progress=False)
    _, boxes = boxes_from_instance_map(read_case(converted, UID).instance_map)
    # the box of the painted sphere spans its voxels plus one: its voxel count times the spacing is the
    # 5 mm diameter to within one voxel per axis (spacing z, y, x = 2.0, 0.9, 0.6 mm)
    diameters_mm = box_voxel_counts(boxes)[0] * np.array([2.0, 0.9, 0.6])
    assert np.all(np.abs(diameters_mm - 5.0) <= np.array([2.0, 0.9, 0.6])), diameters_mm
    predictions = tmp_path / "predictions"
    predictions.mkdir()
    shifted = boxes[0] + np.array([0, 0, 1, 0, 0, 1])  # a second, weaker candidate one voxel along x
    (predictions / f"{UID}.json").write_text(json.dumps(
        {"boxes": [shifted.tolist(), boxes[0].tolist()], "scores": [0.25, 0.9], "labels": [0, 0]}))
    out_csv = tmp_path / "submission.csv"
    assert export_luna16_csv(predictions, converted, [UID], out_csv) == 2
    with open(out_csv) as handle:
        rows = list(csv.reader(handle))
    assert tuple(rows[0]) == LUNA16_COLUMNS
    assert rows[1][0] == UID and float(rows[1][4]) == pytest.approx(0.9)  # sorted by probability
    np.testing.assert_allclose([float(v) for v in rows[1][1:4]], centre, atol=1e-5)
    # one voxel further along array x is 0.6 mm along -x in the world (direction flips x)
    np.testing.assert_allclose([float(v) for v in rows[2][1:4]], np.add(centre, (-0.6, 0.0, 0.0)), atol=1e-5)


def test_missing_predictions_are_named(tmp_path: Path) -> None:
    write_case(tmp_path / "conv", "a", np.zeros((1, 4, 4, 4), np.int16), np.zeros((4, 4, 4), np.int16), {}, (1, 1, 1))
    with pytest.raises(FileNotFoundError, match=r"a\.json: predictions of case 'a' are missing"):
        export_luna16_csv(tmp_path / "pred", tmp_path / "conv", ["a"], tmp_path / "out.csv")
    assert not (tmp_path / "out.csv").exists()
