"""Case-level AP against the evaluation's own AP (evaluate_cases) on full case lists and on resamples."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from pretrain_det3d.analysis.case_ap import ap_of_cases, case_ap_data, match_cases
from pretrain_det3d.analysis.tables import AnalysisInputError
from pretrain_det3d.evaluation import evaluate_cases
from pretrain_det3d.evaluation.run import load_ground_truth, load_prediction

SHAPE = (12, 16, 16)
AP = "AP_IoU_0.10_MaxDet_100"
CASES = ["a", "b", "c", "d", "e", "f"]
FOLD_OF = {"a": 0, "b": 0, "c": 0, "d": 1, "e": 1, "f": 1}


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


def random_predictions(rng: np.random.Generator, gt_boxes: np.ndarray, gt_labels: np.ndarray) -> tuple:
    """Jittered copies of some ground-truth boxes plus random false positives, with random scores."""
    boxes, labels = [], []
    for box, label in zip(gt_boxes, gt_labels):
        if rng.random() < 0.7:
            shift = rng.integers(-1, 2, size=3)
            boxes.append(np.r_[box[:3] + shift, box[3:] + shift].tolist())
            labels.append(int(label) if rng.random() < 0.85 else 1 - int(label))
    for _ in range(int(rng.integers(0, 4))):
        start = rng.integers(0, 8, size=3)
        boxes.append(np.r_[start, start + rng.integers(2, 5, size=3)].astype(float).tolist())
        labels.append(int(rng.integers(0, 2)))
    # scores on a coarse grid so that ties across cases occur and the pooling order matters
    scores = (rng.integers(1, 10, size=len(boxes)) / 10).tolist()
    return boxes, scores, labels


@pytest.fixture()
def study(tmp_path: Path) -> dict:
    converted = tmp_path / "converted"
    root = converted / "demo"
    root.mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps({"name": "demo", "labels": {"0": "lesion", "1": "cyst"}}))
    rng = np.random.default_rng(3)
    for case in CASES:
        # 0-2 objects per case in separate z slabs (so instance ids stay consecutive), random classes
        instances = {}
        for instance_id in range(1, int(rng.integers(0, 3)) + 1):
            z = (instance_id - 1) * 6
            y, x = (int(v) for v in rng.integers(0, 12, size=2))
            instances[instance_id] = ((slice(z, z + 3), slice(y, y + 3), slice(x, x + 4)), int(rng.integers(0, 2)))
        write_case(root, case, instances)
    predictions = tmp_path / "predictions"
    for init in ("scratch", "mae"):
        for case in CASES:
            gt = load_ground_truth(root, case)
            boxes, scores, labels = random_predictions(rng, gt.boxes, gt.labels)
            write_prediction(predictions / "det" / init / "demo" / f"fold{FOLD_OF[case]}", case, boxes, scores, labels)
    runs = pd.DataFrame([dict(detector="det", initialisation=init, dataset="demo", fold=fold, metric=AP, value=0.5)
                         for init in ("scratch", "mae") for fold in (0, 1)])
    return dict(converted=converted, predictions=predictions, runs=runs)


def reference_ap(study: dict, init: str, case_list: list[str]) -> float:
    """AP from evaluate_cases with repeated cases renamed, so each copy is a scan of its own."""
    root = study["converted"] / "demo"
    names, gts, preds, seen = [], [], [], {}
    for case in case_list:
        seen[case] = seen.get(case, 0) + 1
        names.append(case if seen[case] == 1 else f"{case}__copy{seen[case]}")
        gts.append(load_ground_truth(root, case))
        preds.append(load_prediction(study["predictions"] / "det" / init / "demo" / f"fold{FOLD_OF[case]}", case))
    metrics, _ = evaluate_cases(names, gts, preds, [0, 1])
    return float(metrics[AP])


def test_full_case_list_equals_evaluate_cases(study: dict) -> None:
    data = case_ap_data(study["runs"], study["predictions"], study["converted"])
    assert data.cases_of("demo") == CASES
    for init in ("scratch", "mae"):
        expected = reference_ap(study, init, CASES)
        assert 0.0 < expected < 1.0  # a non-trivial AP, so the comparison can fail
        assert data.statistic_for("det", "demo", init)(CASES) == expected


def test_resample_with_duplicates_equals_evaluate_cases_on_renamed_copies(study: dict) -> None:
    data = case_ap_data(study["runs"], study["predictions"], study["converted"])
    statistic = data.statistic_for("det", "demo", "mae")
    root = study["converted"] / "demo"
    folders = {case: study["predictions"] / "det" / "mae" / "demo" / f"fold{FOLD_OF[case]}" for case in CASES}
    matches = match_cases({case: load_ground_truth(root, case) for case in CASES},
                          {case: load_prediction(folders[case], case) for case in CASES}, [0, 1])
    hand_made = ["c", "a", "c", "f", "a", "a"]
    assert statistic(hand_made) == reference_ap(study, "mae", hand_made)
    rng = np.random.default_rng(11)
    for _ in range(10):
        resample = [CASES[i] for i in rng.integers(0, len(CASES), size=len(CASES))]
        expected = reference_ap(study, "mae", resample)
        value = statistic(resample)
        assert (math.isnan(value) and expected == -1.0) or value == expected
        reference = ap_of_cases(matches, resample, [0, 1])  # the plain pooling the fast path must equal
        assert (math.isnan(value) and math.isnan(reference)) or value == reference


def test_duplicate_counts_twice_by_hand() -> None:
    """One case with a hit (0.9) and one with a miss (0.95): AP 0.5; doubling the hit case gives 2/3 recall
    after the miss, i.e. precision envelope 2/3 on all recall points."""
    from pretrain_det3d.evaluation.run import CaseBoxes

    gt = CaseBoxes(np.array([[0, 0, 0, 4, 4, 4.]]), np.array([0]))
    hit = CaseBoxes(gt.boxes, gt.labels, np.array([0.9]))
    miss = CaseBoxes(np.array([[8, 8, 8, 9, 9, 9.]]), np.array([0]), np.array([0.95]))
    matches = match_cases({"h": gt, "m": gt}, {"h": hit, "m": miss}, [0])
    assert ap_of_cases(matches, ["h", "m"], [0]) == pytest.approx(0.5 * 51 / 101)  # recall 0.5 then 1.0
    # pool: miss 0.95 (recall 0/3), hit 0.9 (1/3), hit 0.9 (2/3); precision envelope 2/3 up to recall 2/3
    assert ap_of_cases(matches, ["h", "m", "h"], [0]) == pytest.approx((2 / 3) * 67 / 101)
    assert math.isnan(ap_of_cases(match_cases({"e": CaseBoxes(np.zeros((0, 6)), np.zeros(0))},
                                              {"e": CaseBoxes(np.zeros((0, 6)), np.zeros(0), np.zeros(0))}, [0]),
                                  ["e"], [0]))


def test_unpaired_cases_and_missing_folders_are_named(study: dict) -> None:
    folder = study["predictions"] / "det" / "mae" / "demo" / "fold1"
    (folder / "f.json").unlink()
    pattern = r"det/(mae|scratch)/demo: predicts other cases than .*det/(mae|scratch)/demo.*'f'"
    with pytest.raises(AnalysisInputError, match=pattern):
        case_ap_data(study["runs"], study["predictions"], study["converted"])
    runs = pd.concat([study["runs"], study["runs"].assign(fold=7)])
    with pytest.raises(AnalysisInputError, match=r"fold7: prediction folder not found"):
        case_ap_data(runs, study["predictions"], study["converted"])
    with pytest.raises(AnalysisInputError, match=r"unknown case 'zz'"):
        ap_of_cases({}, ["zz"], [0])
