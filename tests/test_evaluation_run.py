"""run_evaluation on a tiny converted dataset: files written, values, per-case table, clear errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from pretrain_det3d.evaluation import run_evaluation
from pretrain_det3d.evaluation.run import EvaluationInputError, load_ground_truth

SHAPE = (12, 16, 16)


def write_case(root: Path, case: str, instances: dict[int, tuple[tuple[slice, ...], int]]) -> None:
    labels = np.zeros(SHAPE, dtype=np.int16)
    for instance_id, (region, _) in instances.items():
        labels[region] = instance_id
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(labels), str(root / "labelsTr" / f"{case}.nii.gz"))
    meta = {"instances": {str(i): cls for i, (_, cls) in instances.items()}}
    (root / "labelsTr" / f"{case}.json").write_text(json.dumps(meta))


def write_prediction(folder: Path, case: str, boxes: list, scores: list, labels: list) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{case}.json").write_text(json.dumps({"boxes": boxes, "scores": scores, "labels": labels}))


@pytest.fixture()
def study(tmp_path: Path) -> tuple[Path, Path, list[str]]:
    converted = tmp_path / "converted" / "demo"
    converted.mkdir(parents=True)
    (converted / "dataset.json").write_text(json.dumps({"name": "demo", "labels": {"0": "lesion", "1": "cyst"}}))
    # case a: a class-0 object on voxels z 1..3, y 2..5, x 3..7 and a class-1 object; case b: empty; case c: one
    # object; predictions are the objects' boxes in nnDetection's convention [first - 1, last + 1] (data.boxes)
    write_case(converted, "a", {1: ((slice(1, 4), slice(2, 6), slice(3, 8)), 0),
                                2: ((slice(6, 10), slice(10, 14), slice(10, 15)), 1)})
    write_case(converted, "b", {})
    write_case(converted, "c", {1: ((slice(2, 5), slice(2, 5), slice(2, 5)), 0)})
    predictions = tmp_path / "predictions"
    write_prediction(predictions, "a", [[0, 1, 2, 4, 6, 8], [0, 0, 0, 1, 1, 1]], [0.9, 0.95], [0, 1])
    write_prediction(predictions, "b", [], [], [])
    write_prediction(predictions, "c", [[1, 1, 1, 5, 5, 5]], [0.6], [0])
    return predictions, converted, ["a", "b", "c"]


def test_ground_truth_boxes_come_from_the_instance_map(study) -> None:
    _, converted, _ = study
    gt = load_ground_truth(converted, "a")
    # by hand: [first - 1, last + 1] per axis (voxels z 1..3, y 2..5, x 3..7 and z 6..9, y 10..13, x 10..14)
    np.testing.assert_array_equal(gt.boxes, [[0, 1, 2, 4, 6, 8], [5, 9, 9, 10, 14, 15]])
    assert gt.labels.tolist() == [0, 1]


def test_run_evaluation_writes_metrics_and_case_table(study, tmp_path: Path) -> None:
    predictions, converted, cases = study
    out_json, out_csv = tmp_path / "metrics" / "fold0.json", tmp_path / "metrics" / "fold0_cases.csv"
    returned = run_evaluation(predictions, converted, cases, out_json, out_csv)
    metrics = json.loads(out_json.read_text())
    assert metrics == returned
    assert metrics["num_cases"] == 3 and metrics["num_gt"] == 3 and metrics["num_pred"] == 3
    # class 0: both objects found, no false positive -> 1; class 1: only a false positive -> 0; mean 0.5
    assert metrics["0_AP_IoU_0.10_MaxDet_100"] == 1.0
    assert metrics["1_AP_IoU_0.10_MaxDet_100"] == 0.0
    assert metrics["AP_IoU_0.10_MaxDet_100"] == pytest.approx(0.5)
    assert metrics["mAP_IoU_0.10_0.50_0.05_MaxDet_100"] == pytest.approx(0.5)
    # pooled FROC over 3 scans and 3 objects: FP .95, TP .9, TP .6 -> (0,0) (1/3,0) (1/3,2/3)
    # 1/8 and 1/4 lie on the flat start (0), every rate >= 1/2 reads 2/3
    assert metrics["FROC_score_IoU_0.10"] == pytest.approx(5 * (2 / 3) / 7)
    assert metrics["FROC_sens_IoU_0.10_FPI_0.25"] == pytest.approx(0.0)
    assert metrics["FROC_sens_IoU_0.10_FPI_1"] == pytest.approx(2 / 3)
    assert not list(out_json.parent.glob(".*tmp*"))  # atomic writes leave no temporary file

    table = pd.read_csv(out_csv)
    assert table["case"].tolist() == ["a", "b", "c"]
    assert table[["num_gt", "num_pred", "tp", "fp", "fn"]].values.tolist() == [[2, 2, 1, 1, 1], [0, 0, 0, 0, 0],
                                                                               [1, 1, 1, 0, 0]]
    assert table.loc[0, "best_score"] == pytest.approx(0.95)
    assert table.loc[0, "best_tp_score"] == pytest.approx(0.9)
    assert table.loc[0, "best_fp_score"] == pytest.approx(0.95)
    assert math.isnan(table.loc[1, "best_score"])


def test_missing_prediction_file_is_named(study, tmp_path: Path) -> None:
    predictions, converted, cases = study
    (predictions / "c.json").unlink()
    out_json = tmp_path / "m.json"
    with pytest.raises(EvaluationInputError, match=r"c\.json: prediction file of case 'c' not found"):
        run_evaluation(predictions, converted, cases, out_json, tmp_path / "m.csv")
    assert not out_json.exists()


def test_malformed_prediction_is_named(study, tmp_path: Path) -> None:
    predictions, converted, cases = study
    write_prediction(predictions, "a", [[1, 2, 3, 4, 6, 8]], [0.9, 0.8], [0, 0])
    with pytest.raises(EvaluationInputError, match=r"a\.json: 1 boxes, 2 scores"):
        run_evaluation(predictions, converted, cases, tmp_path / "m.json", tmp_path / "m.csv")
    (predictions / "b.json").write_text("{not json")
    with pytest.raises(EvaluationInputError, match=r"b\.json"):
        run_evaluation(predictions, converted, ["b"], tmp_path / "m.json", tmp_path / "m.csv")


def test_unknown_predicted_class_and_missing_ground_truth(study, tmp_path: Path) -> None:
    predictions, converted, cases = study
    write_prediction(predictions, "c", [[2, 2, 2, 5, 5, 5]], [0.6], [7])
    with pytest.raises(ValueError, match=r"case 'c': predicted labels \[7\]"):
        run_evaluation(predictions, converted, cases, tmp_path / "m.json", tmp_path / "m.csv")
    write_prediction(predictions, "zz", [], [], [])
    with pytest.raises(EvaluationInputError, match=r"zz\.nii\.gz: ground-truth file"):
        run_evaluation(predictions, converted, ["zz"], tmp_path / "m.json", tmp_path / "m.csv")
    (converted / "dataset.json").unlink()
    with pytest.raises(EvaluationInputError, match="dataset.json"):
        run_evaluation(predictions, converted, ["a"], tmp_path / "m.json", tmp_path / "m.csv")
