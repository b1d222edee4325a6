"""Import of an nnDetection task folder (tests/import_fixtures.py: dataset.yaml, raw_splitted/, two modalities,
a gap in instance ids, an instance without voxels, a labelled test case); extents worked out by hand there."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from import_fixtures import DIRECTION, ORIGIN_XYZ, SPACING_XYZ, write_nndetection_task
from nifti_fixtures import boxes_and_classes

from pretrain_det3d.data.boxes import instance_voxel_extents
from pretrain_det3d.data.converters import ConversionError, convert_dataset
from pretrain_det3d.data.dataset_format import check_converted_dataset
from pretrain_det3d.data.io import read_case


def test_task_folder_converts_as_it_is(tmp_path: Path) -> None:
    task = write_nndetection_task(tmp_path / "src")
    out = convert_dataset("nndetection_task", task, tmp_path / "converted", {"licence": "CC-BY-4.0", "test_cases": True},
                          show_progress=False)
    summary = check_converted_dataset(out)
    assert summary.case_ids == ["case_a", "case_b"] and summary.test_case_ids == ["case_t"]
    assert summary.class_names == ["nodule", "mass"] and summary.modalities == ["CT", "PET"]
    # ids 1 and 3 become 1 and 2 (in increasing order), keeping their classes (mass, nodule)
    boxes, classes = boxes_and_classes(out, "case_a")
    assert boxes == [(1, 2, 3, 2, 5, 6), (4, 9, 10, 5, 10, 11)] and classes == [1, 0]
    assert boxes_and_classes(out, "case_b") == ([], [])
    test_case = read_case(out, "case_t", test=True)
    ids, extents = instance_voxel_extents(test_case.instance_map)
    assert extents.tolist() == [[2, 5, 6, 4, 6, 8]] and test_case.instances == {1: 0}
    # both channels and the geometry come through unchanged
    case = read_case(out, "case_a")
    assert case.image.shape == (2, 6, 12, 14)
    np.testing.assert_allclose(case.spacing, SPACING_XYZ[::-1])
    np.testing.assert_allclose(case.origin, ORIGIN_XYZ)
    np.testing.assert_allclose(case.direction, DIRECTION)
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["name"] == "Task100_Demo" and dataset["licence"] == "CC-BY-4.0"
    assert dataset["instances_without_voxels"] == {"case_a": [4]}


def test_options_name_and_no_test_cases(tmp_path: Path) -> None:
    task = write_nndetection_task(tmp_path / "src")
    out = convert_dataset("nndetection_task", task, tmp_path / "converted", {"name": "mine"}, show_progress=False)
    assert check_converted_dataset(out).test_case_ids == []  # test cases only when asked for
    assert json.loads((out / "dataset.json").read_text())["name"] == "mine"
    # the raw_splitted folder itself, with the description copied in, converts the same
    raw = task / "raw_splitted"
    (raw / "dataset.yaml").write_text((task / "dataset.yaml").read_text())
    again = convert_dataset("nndetection_task", raw, tmp_path / "again", show_progress=False)
    assert boxes_and_classes(again, "case_a") == boxes_and_classes(out, "case_a")


def test_bad_task_folders_are_named(tmp_path: Path) -> None:
    task = write_nndetection_task(tmp_path / "src")
    labels = task / "raw_splitted" / "labelsTr"
    (labels / "case_a.json").write_text(json.dumps({"instances": {"1": 1}}))  # id 3 without a class
    with pytest.raises(ConversionError, match=r"case_a\.json: instances \[3\] of case_a\.nii\.gz have no class"):
        convert_dataset("nndetection_task", task, tmp_path / "out", show_progress=False)
    (labels / "case_a.json").write_text(json.dumps({"instances": {"1": 2, "3": 0}}))  # class 2 of 2 classes
    with pytest.raises(ConversionError, match=r"case_a\.json: classes \{1: 2\}"):
        convert_dataset("nndetection_task", task, tmp_path / "out", show_progress=False)
    (labels / "case_a.json").write_text(json.dumps({"instances": {"1": 1, "3": 0}}))
    import shutil

    shutil.rmtree(task / "raw_splitted" / "labelsTs")
    with pytest.raises(ConversionError, match=r"raw_splitted: convert\.test_cases is true but imagesTs/ and labelsTs/"):
        convert_dataset("nndetection_task", task, tmp_path / "out", {"test_cases": True}, show_progress=False)
    (task / "raw_splitted" / "imagesTr" / "case_b_0001.nii.gz").unlink()
    with pytest.raises(ConversionError, match=r"imagesTr: case 'case_b' lacks channel\(s\) \[1\]"):
        convert_dataset("nndetection_task", task, tmp_path / "out", show_progress=False)
    (task / "dataset.yaml").unlink()
    with pytest.raises(ConversionError, match=r"no dataset\.json / dataset\.yaml / dataset\.yml"):
        convert_dataset("nndetection_task", task, tmp_path / "out", show_progress=False)
    with pytest.raises(ConversionError, match=r"'convert \(nndetection_task\)\.raw_folders': unknown key; did you mean 'raw_folder'"):
        convert_dataset("nndetection_task", task, tmp_path / "out", {"raw_folders": "x"}, show_progress=False)
    assert not (tmp_path / "out").exists()
