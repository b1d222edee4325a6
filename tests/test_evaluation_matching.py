"""Greedy matching: hand-made cases, a brute-force reference, and MONAI's matching_batch."""

from __future__ import annotations

import numpy as np
import pytest
from monai.apps.detection.metrics.matching import matching_batch
from monai.data.box_utils import box_iou

from pretrain_det3d.evaluation.matching import greedy_match, match_case, match_class


def reference_greedy(ious: np.ndarray, threshold: float) -> list[int]:
    """Plain-loop statement of the rule: visit rows in order; best unmatched column with IoU >= threshold;
    among equal IoUs the later column."""
    threshold = min(threshold, 1 - 1e-10)
    taken: set[int] = set()
    out = []
    for row in ious:
        best, best_iou = -1, -1.0
        for col, value in enumerate(row):
            if col in taken or value < threshold:
                continue
            if value >= best_iou:
                best, best_iou = col, value
        if best >= 0:
            taken.add(best)
        out.append(best)
    return out


def cube(z: float, y: float, x: float, size: float) -> list[float]:
    return [z, y, x, z + size, y + size, x + size]


def test_higher_score_has_priority_over_higher_iou() -> None:
    ious = np.array([[0.3, 0.0], [0.9, 0.0]])  # rows already in score order
    assert greedy_match(ious, 0.2).tolist() == [0, -1]


def test_prediction_takes_highest_iou_among_unmatched() -> None:
    ious = np.array([[0.4, 0.7, 0.6], [0.5, 0.9, 0.55]])
    # row 0 takes column 1 (0.7); row 1 cannot have column 1 any more and takes column 2 (0.55 > 0.5)
    assert greedy_match(ious, 0.1).tolist() == [1, 2]


def test_threshold_is_inclusive_and_ties_go_to_later_column() -> None:
    assert greedy_match(np.array([[0.5]]), 0.5).tolist() == [0]
    assert greedy_match(np.array([[0.4999]]), 0.5).tolist() == [-1]
    assert greedy_match(np.array([[0.6, 0.6]]), 0.5).tolist() == [1]
    # a threshold of 1.0 still accepts an identical box
    assert greedy_match(np.array([[1.0]]), 1.0).tolist() == [0]


@pytest.mark.parametrize("seed", range(5))
def test_greedy_match_agrees_with_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    ious = rng.random((12, 7)) * (rng.random((12, 7)) < 0.5)
    ious[rng.random((12, 7)) < 0.1] = 0.5  # exact ties and values on the threshold
    for threshold in (0.1, 0.3, 0.5):
        assert greedy_match(ious, threshold).tolist() == reference_greedy(ious, threshold)


def test_match_class_sorts_by_score_and_keeps_max_detections() -> None:
    gt = np.array([cube(0, 0, 0, 4)])
    preds = np.array([cube(0, 0, 0, 4)] * 5)
    scores = np.array([0.1, 0.5, 0.3, 0.9, 0.2])
    result = match_class(preds, scores, gt, [0.1, 0.5], max_detections=3)
    assert result.scores.tolist() == [0.9, 0.5, 0.3]
    assert result.pred_order.tolist() == [3, 1, 2]
    assert result.pred_matched.tolist() == [[True, False, False], [True, False, False]]
    assert result.gt_matched.tolist() == [[True], [True]]


def test_match_class_uses_monai_iou_with_exclusive_max() -> None:
    gt = np.array([[0, 0, 0, 10, 10, 10.0]])
    pred = np.array([[0, 0, 0, 10, 10, 3.2]])  # IoU 320 / 1000 = 0.32
    result = match_class(pred, [1.0], gt, [0.3, 0.35])
    assert result.pred_matched[:, 0].tolist() == [True, False]


def test_match_case_keeps_classes_apart() -> None:
    gt = np.array([cube(0, 0, 0, 4), cube(10, 10, 10, 4)])
    preds = np.array([cube(0, 0, 0, 4), cube(10, 10, 10, 4)])
    out = match_case(preds, [0.9, 0.8], [1, 1], gt, [0, 1], [0.1])
    assert sorted(out) == [0, 1]
    assert out[0].num_pred == 0 and out[0].gt_matched.tolist() == [[False]]
    # the class-1 box on the class-0 object is a false positive; the other finds its object
    assert out[1].pred_matched.tolist() == [[False, True]]


def test_match_case_empty_inputs() -> None:
    assert match_case(np.zeros((0, 6)), [], [], np.zeros((0, 6)), [], [0.1]) == {}
    out = match_case(np.zeros((0, 6)), [], [], np.array([cube(0, 0, 0, 2)]), [0], [0.1, 0.5])
    assert out[0].gt_matched.shape == (2, 1) and out[0].num_pred == 0


def test_bad_shapes_raise() -> None:
    with pytest.raises(ValueError, match=r"\[N, 6\]"):
        match_class(np.zeros((2, 4)), [0.1, 0.2], np.zeros((0, 6)), [0.1])
    with pytest.raises(ValueError, match="labels"):
        match_case(np.zeros((2, 6)), [0.1, 0.2], [0], np.zeros((0, 6)), [], [0.1])


def random_case(rng: np.random.Generator, num_gt: int, num_pred: int, num_classes: int):
    gt_boxes = np.array([cube(*rng.uniform(0, 40, 3), rng.uniform(4, 12)) for _ in range(num_gt)]).reshape(-1, 6)
    gt_labels = rng.integers(0, num_classes, num_gt)
    jittered = gt_boxes[rng.integers(0, max(num_gt, 1), num_pred)] if num_gt else np.zeros((num_pred, 6))
    jittered = jittered + rng.normal(0, 2.0, (num_pred, 6))
    jittered[:, 3:] = np.maximum(jittered[:, 3:], jittered[:, :3] + 1)
    pred_boxes = jittered
    pred_labels = rng.integers(0, num_classes, num_pred)
    pred_scores = rng.random(num_pred)
    return pred_boxes, pred_scores, pred_labels, gt_boxes, gt_labels


@pytest.mark.parametrize("seed", range(4))
def test_matches_agree_with_monai_matching_batch(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    thresholds = [0.1, 0.3, 0.5, 0.7]
    max_detections = 20  # below the ~30 predictions per class, so truncation is exercised
    num_true_positives = 0
    for _ in range(5):
        case = random_case(rng, int(rng.integers(0, 8)), int(rng.integers(0, 60)), 2)
        ours = match_case(*case, thresholds, max_detections=max_detections)
        pred_boxes, pred_scores, pred_labels, gt_boxes, gt_labels = case
        monai = matching_batch(box_iou, thresholds, [pred_boxes], [pred_labels], [pred_scores], [gt_boxes],
                               [gt_labels], max_detections=max_detections)[0]
        assert sorted(ours) == sorted(int(c) for c in monai)
        for class_id, result in ours.items():
            np.testing.assert_array_equal(result.scores, monai[class_id]["dtScores"])
            np.testing.assert_array_equal(result.pred_matched, monai[class_id]["dtMatches"].astype(bool))
            np.testing.assert_array_equal(result.gt_matched, monai[class_id]["gtMatches"].astype(bool))
            num_true_positives += int(result.pred_matched.sum())
    assert num_true_positives > 0  # the comparison is not vacuous
