"""AP / mAP: hand-worked values with 101-point interpolation, edge cases, and agreement with MONAI's COCOMetric."""

from __future__ import annotations

import numpy as np
import pytest
from monai.apps.detection.metrics.coco import COCOMetric
from monai.apps.detection.metrics.matching import matching_batch
from monai.data.box_utils import box_iou

from pretrain_det3d.evaluation.matching import match_case
from pretrain_det3d.evaluation.metrics import (
    AP_IOU_THRESHOLDS,
    MAP_IOU_RANGE,
    compute_ap_metrics,
    evaluation_iou_thresholds,
    interpolated_average_precision,
)

AP01 = "AP_IoU_0.10_MaxDet_100"
MAP = "mAP_IoU_0.10_0.50_0.05_MaxDet_100"
THRESHOLDS = evaluation_iou_thresholds()


def cube(z: float, y: float, x: float, size: float) -> list[float]:
    return [z, y, x, z + size, y + size, x + size]


def far_box(index: int) -> list[float]:
    """A box that overlaps no ground truth of these tests."""
    return cube(200 + 10 * index, 200, 200, 3)


def metrics_of(cases: list[tuple], class_ids: list[int]) -> dict[str, float]:
    """cases: (pred_boxes, pred_scores, pred_labels, gt_boxes, gt_labels)."""
    matches = [
        match_case(np.asarray(pb, float).reshape(-1, 6), ps, pl, np.asarray(gb, float).reshape(-1, 6), gl, THRESHOLDS)
        for pb, ps, pl, gb, gl in cases
    ]
    return compute_ap_metrics(matches, class_ids, THRESHOLDS)


def test_threshold_lists_are_nndetections() -> None:
    assert THRESHOLDS.tolist() == [0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6, 0.7, 0.8, 0.9]
    assert AP_IOU_THRESHOLDS == (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    assert MAP_IOU_RANGE == (0.1, 0.5, 0.05)


def test_perfect_predictions_give_ap_one_everywhere() -> None:
    gts = [cube(0, 0, 0, 5), cube(20, 20, 20, 8)]
    m = metrics_of([(gts, [0.9, 0.4], [0, 0], gts, [0, 0]), (gts[:1], [0.6], [0], gts[:1], [0])], [0])
    expected_keys = {MAP, "0_" + MAP} | {f"{p}AP_IoU_{t:.2f}_MaxDet_100" for t in AP_IOU_THRESHOLDS for p in ("", "0_")}
    assert set(m) == expected_keys
    assert all(value == 1.0 for value in m.values())


def test_empty_predictions_give_ap_zero() -> None:
    m = metrics_of([([], [], [], [cube(0, 0, 0, 5)], [0]), ([], [], [], [], [])], [0])
    assert m[AP01] == 0.0 and m[MAP] == 0.0 and m["0_" + AP01] == 0.0


def test_false_positive_above_true_positive_hand_worked() -> None:
    # 3 objects; ranked TP, FP, TP, FP, FP. recall 1/3,1/3,2/3,2/3,2/3; precision 1,1/2,2/3,1/2,2/5;
    # envelope 1,2/3,2/3,1/2,2/5. Recall points 0..0.33 (34 points) read 1; 0.34..0.66 (33) read 2/3;
    # 0.67..1 are never reached (0). AP = (34 + 33 * 2/3) / 101 = 56/101.
    gts = [cube(0, 0, 0, 5), cube(20, 0, 0, 5), cube(40, 0, 0, 5)]
    preds = [gts[0], far_box(0), gts[1], far_box(1), far_box(2)]
    m = metrics_of([(preds, [0.9, 0.8, 0.7, 0.6, 0.5], [0] * 5, gts, [0] * 3)], [0])
    assert m[AP01] == pytest.approx(56 / 101, abs=1e-12)


def test_recall_on_grid_points_hand_worked() -> None:
    # 2 objects split over 2 cases; pooled ranking TP(0.9, case a), FP(0.8, case b), TP(0.7, case b):
    # recall .5,.5,1; envelope 1,2/3,2/3. Points 0..0.5 (51) read 1, 0.51..1 (50) read 2/3.
    gt_a, gt_b = [cube(0, 0, 0, 5)], [cube(30, 30, 30, 5)]
    m = metrics_of([(gt_a, [0.9], [0], gt_a, [0]), ([far_box(0), gt_b[0]], [0.8, 0.7], [0, 0], gt_b, [0])], [0])
    assert m[AP01] == pytest.approx((51 + 50 * 2 / 3) / 101, abs=1e-12)
    assert interpolated_average_precision(np.array([False, True]), 1) == pytest.approx(0.5)


def test_map_is_mean_over_the_iou_range() -> None:
    gt = [[0, 0, 0, 10, 10, 10.0]]
    pred = [[0, 0, 0, 10, 10, 3.2]]  # IoU 0.32: found at 0.10 ... 0.30 (5 of the 9 range thresholds)
    m = metrics_of([(pred, [0.5], [0], gt, [0])], [0])
    assert m["AP_IoU_0.30_MaxDet_100"] == 1.0 and m["AP_IoU_0.40_MaxDet_100"] == 0.0
    assert m[MAP] == pytest.approx(5 / 9, abs=1e-12)


def test_two_classes_per_class_values_and_mean() -> None:
    gt0, gt1 = cube(0, 0, 0, 6), cube(30, 30, 30, 6)
    # class 0 perfect (AP 1); class 1: FP above its TP, 1 object -> AP 1/2
    case = ([gt0, far_box(0), gt1], [0.9, 0.8, 0.7], [0, 1, 1], [gt0, gt1], [0, 1])
    m = metrics_of([case], [0, 1])
    assert m["0_" + AP01] == 1.0
    assert m["1_" + AP01] == pytest.approx(0.5)
    assert m[AP01] == pytest.approx(0.75)
    assert m[MAP] == pytest.approx(0.75)


def test_class_without_ground_truth_is_minus_one_and_left_out_of_the_mean() -> None:
    gt0 = cube(0, 0, 0, 6)
    m = metrics_of([([gt0, far_box(0)], [0.9, 0.8], [0, 1], [gt0], [0])], [0, 1])
    assert m["1_" + AP01] == -1.0 and m["1_" + MAP] == -1.0
    assert m[AP01] == 1.0  # nnDetection would average in the -1 placeholder; we do not (documented)


def test_no_ground_truth_and_no_predictions_anywhere() -> None:
    m = metrics_of([([], [], [], [], []), ([], [], [], [], [])], [0])
    assert m[AP01] == -1.0 and m[MAP] == -1.0


def test_missing_threshold_is_an_error() -> None:
    matches = [match_case(np.zeros((0, 6)), [], [], np.zeros((0, 6)), [], [0.1])]
    with pytest.raises(ValueError, match="not among the matching thresholds"):
        compute_ap_metrics(matches, [0], [0.1])


def random_dataset(rng: np.random.Generator, num_cases: int, num_classes: int, max_pred: int):
    cases = []
    for case_index in range(num_cases):
        num_gt = int(rng.integers(0 if case_index else 1, 6))
        gt_boxes = np.array([cube(*rng.uniform(0, 50, 3), rng.uniform(4, 12)) for _ in range(num_gt)]).reshape(-1, 6)
        # case 0 holds one object of every class, so no class lacks ground truth (see the module docstring)
        gt_labels = np.arange(num_gt) % num_classes if case_index == 0 else rng.integers(0, num_classes, num_gt)
        num_pred = int(rng.integers(0, max_pred))
        source = gt_boxes[rng.integers(0, num_gt, num_pred)] if num_gt else rng.uniform(0, 50, (num_pred, 6))
        pred_boxes = source + rng.normal(0, rng.uniform(0.5, 3.0), (num_pred, 6))
        random_rows = rng.random(num_pred) < 0.3
        pred_boxes[random_rows, :3] = rng.uniform(0, 50, (int(random_rows.sum()), 3))
        pred_boxes[random_rows, 3:] = pred_boxes[random_rows, :3] + rng.uniform(3, 12, (int(random_rows.sum()), 3))
        pred_boxes[:, 3:] = np.maximum(pred_boxes[:, 3:], pred_boxes[:, :3] + 0.5)
        pred_labels = np.where(rng.random(num_pred) < 0.8,
                               np.r_[gt_labels, 0][np.minimum(rng.integers(0, num_gt + 1, num_pred), num_gt)],
                               rng.integers(0, num_classes, num_pred)).astype(np.int64)
        pred_scores = rng.random(num_pred)
        cases.append((pred_boxes, pred_scores, pred_labels, gt_boxes, gt_labels))
    return cases


@pytest.mark.parametrize(
    "seed,num_classes,max_pred", [(0, 1, 12), (1, 1, 30), (2, 2, 20), (3, 3, 25), (4, 1, 160), (5, 2, 260)]
)
def test_agrees_with_monai_coco_metric(seed: int, num_classes: int, max_pred: int) -> None:
    """MONAI's COCOMetric is a port of nnDetection's; with every class present in the ground truth (where
    nnDetection's class mean and ours coincide) and no ignore flags, both must give the same numbers.
    Large max_pred exercises the MaxDet-100 cut per class and case (checked below)."""
    rng = np.random.default_rng(seed)
    cases = random_dataset(rng, num_cases=6, num_classes=num_classes, max_pred=max_pred)
    class_names = [str(c) for c in range(num_classes)]
    coco = COCOMetric(classes=class_names, iou_list=AP_IOU_THRESHOLDS, iou_range=MAP_IOU_RANGE,
                      max_detection=(100,), verbose=False)
    pred_boxes, pred_scores, pred_labels, gt_boxes, gt_labels = (list(part) for part in zip(*cases))
    # FIELD-NOTES: the matching must run at the metric's own thresholds (coco.iou_thresholds)
    monai_matches = matching_batch(box_iou, coco.iou_thresholds, pred_boxes=pred_boxes, pred_classes=pred_labels,
                                   pred_scores=pred_scores, gt_boxes=gt_boxes, gt_classes=gt_labels,
                                   max_detections=100)
    monai_values = coco(monai_matches)[0]

    ours = metrics_of(cases, list(range(num_classes)))
    keys = [MAP] + [f"AP_IoU_{t:.2f}_MaxDet_100" for t in AP_IOU_THRESHOLDS]
    keys += [f"{c}_{k}" for c in class_names for k in keys]
    for key in keys:
        assert ours[key] == pytest.approx(monai_values[key], abs=1e-6), key
    # the comparison must see non-trivial values, and the large settings must really cut at MaxDet 100
    assert 0.0 < ours[AP01] < 1.0
    if max_pred > 200 or (num_classes == 1 and max_pred > 100):
        assert any(np.sum(labels == c) > 100 for labels in pred_labels for c in range(num_classes))
