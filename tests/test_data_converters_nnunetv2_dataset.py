"""Import of an nnU-Net v2 dataset (tests/import_fixtures.py; extents worked out by hand in its docstring), and
both import converters run by the workflow from a config entry alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from import_fixtures import write_nndetection_task, write_nnunetv2_dataset
from nifti_fixtures import boxes_and_classes

from pretrain_det3d.data.boxes import instance_voxel_extents
from pretrain_det3d.data.converters import ConversionError, convert_dataset
from pretrain_det3d.data.dataset_format import check_converted_dataset
from pretrain_det3d.data.io import read_case

A = (2, 2, 2, 5, 5, 5)          # tumour A, 3 x 3 x 3
B = (2, 8, 8, 3, 9, 9)          # tumour B, one voxel
C = (4, 8, 11, 6, 10, 13)       # tumour C, two voxels touching by a corner
CYST = (3, 6, 10, 4, 8, 13)
ORGAN = (0, 0, 0, 1, 12, 14)


def convert(source: Path, out: Path, settings: dict | None = None) -> Path:
    return convert_dataset("nnunetv2_dataset", source, out, settings, show_progress=False)


def test_components_of_chosen_labels(tmp_path: Path) -> None:
    source = write_nnunetv2_dataset(tmp_path / "src")
    out = convert(source, tmp_path / "out", {"classes": ["tumour", "cyst"], "test_cases": True})
    summary = check_converted_dataset(out)
    assert summary.case_ids == ["case_a", "case_b"] and summary.test_case_ids == ["case_t"]  # case_u has no label
    assert summary.class_names == ["tumour", "cyst"] and summary.modalities == ["CT"]
    assert boxes_and_classes(out, "case_a") == ([A, B, C, CYST], [0, 0, 0, 1])  # the organ is background
    assert boxes_and_classes(out, "case_b") == ([], [])
    test_case = read_case(out, "case_t", test=True)
    assert instance_voxel_extents(test_case.instance_map)[1].tolist() == [[1, 3, 3, 3, 5, 5]]
    assert json.loads((out / "dataset.json").read_text())["name"] == "Dataset500_Demo"


def test_connectivity_size_filter_and_default_classes(tmp_path: Path) -> None:
    source = write_nnunetv2_dataset(tmp_path / "src")
    six = convert(source, tmp_path / "six", {"classes": ["tumour", "cyst"], "connectivity": 6})
    c1, c2 = (4, 8, 11, 5, 9, 12), (5, 9, 12, 6, 10, 13)
    assert boxes_and_classes(six, "case_a") == ([A, B, c1, c2, CYST], [0, 0, 0, 0, 1])
    # padded in-plane sides at 0.8 mm: A 3.2, B 1.6 (dropped: not > 2), C 2.4, cyst 2.4 x 3.2
    filtered = convert(source, tmp_path / "filtered", {"classes": ["tumour", "cyst"], "min_extent_mm": 2.0})
    assert boxes_and_classes(filtered, "case_a") == ([A, C, CYST], [0, 0, 1])
    dropped = json.loads((filtered / "dataset.json").read_text())["dropped_by_size_filter"]
    assert [d["box"] for d in dropped["case_a"]] == [list(B)]
    # no classes given: every label but background, in the order of their values
    everything = convert(source, tmp_path / "all")
    assert check_converted_dataset(everything).class_names == ["organ", "tumour", "cyst"]
    assert check_converted_dataset(everything).test_case_ids == []  # test cases only when asked for
    assert boxes_and_classes(everything, "case_a") == ([ORGAN, A, B, C, CYST], [0, 1, 1, 1, 2])


def test_instance_maps_as_they_are(tmp_path: Path) -> None:
    source = write_nnunetv2_dataset(tmp_path / "src")
    out = convert(source, tmp_path / "out", {"instances": "instance_map", "class_name": "finding"})
    assert check_converted_dataset(out).class_names == ["finding"]
    # values 1, 2, 3 are instances 1, 2, 3 whatever their shape: value 2 spans tumours A, B and C together
    assert boxes_and_classes(out, "case_a") == ([ORGAN, (2, 2, 2, 6, 10, 13), CYST], [0, 0, 0])


def test_bad_datasets_are_named(tmp_path: Path) -> None:
    source = write_nnunetv2_dataset(tmp_path / "src")
    description = json.loads((source / "dataset.json").read_text())
    with pytest.raises(ConversionError, match=r"dataset\.json: convert\.classes \['tumor'\] are not labels here"):
        convert(source, tmp_path / "out", {"classes": ["tumor"]})
    (source / "dataset.json").write_text(json.dumps({**description, "labels": {**description["labels"],
                                                                                "lesions": [2, 3]}}))
    with pytest.raises(ConversionError, match=r"labels \['lesions'\] are regions"):
        convert(source, tmp_path / "out", {"classes": ["lesions"]})
    (source / "dataset.json").write_text(json.dumps({**description, "numTraining": 3}))
    with pytest.raises(ConversionError, match=r"numTraining is 3 but imagesTr holds 2 cases"):
        convert(source, tmp_path / "out")
    (source / "dataset.json").write_text(json.dumps(description))
    (source / "labelsTr" / "case_b.nii.gz").unlink()
    with pytest.raises(ConversionError, match=r"labelsTr/case_b\.nii\.gz: missing: the label map of case 'case_b'"):
        convert(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_import_converters_work_from_a_config_entry_alone(tmp_path: Path, snakemake_runner) -> None:
    """A user's two datasets enter the workflow with config only: source entries with path:, dataset entries
    naming the import converters; Snakemake checks the copies, converts them and checks the results."""
    task = write_nndetection_task(tmp_path / "data")
    nnunet = write_nnunetv2_dataset(tmp_path / "data")
    config = yaml.safe_load((REPO / "tests" / "configs" / "smoke.yaml").read_text())
    config["datasets"].update({
        "my_task": {"source": "my_task", "converter": "nndetection_task", "modality": "CT",
                    "convert": {"licence": "CC-BY-4.0"}},
        "my_tumours": {"source": "my_tumours", "converter": "nnunetv2_dataset", "modality": "CT",
                       "convert": {"classes": ["tumour", "cyst"], "min_extent_mm": 2.0, "test_cases": True}},
    })
    config["sources"] = {
        "my_task": {"title": "My task", "homepage": "https://example.org", "licence": "CC-BY-4.0", "access": "open",
                    "path": str(task), "expected": ["dataset.*", "raw_splitted/imagesTr/*_0000.nii.gz"]},
        "my_tumours": {"title": "My tumours", "homepage": "https://example.org", "licence": "CC-BY-4.0",
                       "access": "open", "path": str(nnunet), "expected": ["dataset.json", "imagesTr/*"]},
    }
    configfile = tmp_path / "config.yaml"
    configfile.write_text(yaml.safe_dump(config))
    # the runner puts --configfile first, which would swallow targets given right after it
    snakemake_runner(tmp_path / "work", "--cores=1", "results/data/checks/my_task.json",
                     "results/data/checks/my_tumours.json", configfile=configfile)
    converted = tmp_path / "work" / "results" / "data" / "converted"
    assert boxes_and_classes(converted / "my_task", "case_a") == ([(1, 2, 3, 2, 5, 6), (4, 9, 10, 5, 10, 11)], [1, 0])
    assert boxes_and_classes(converted / "my_tumours", "case_a") == ([A, C, CYST], [0, 0, 1])
    check = json.loads((tmp_path / "work" / "results" / "data" / "checks" / "my_tumours.json").read_text())
    assert check["case_ids"] == ["case_a", "case_b"] and check["test_case_ids"] == ["case_t"]
    # in a study, the one with test cases gets the test-set target, the other does not
    from pretrain_det3d.config import datasets_with_test_cases

    config["study"]["datasets"] = ["my_task", "my_tumours"]
    assert datasets_with_test_cases(config) == ["my_tumours"]
