"""Greedy score-ordered matching of predicted boxes to ground-truth boxes, per class and case.

The rule is the one of the COCO evaluation as nnDetection applies it to 3D boxes
(``nndet/evaluator/detection/matching.py``):

- per class, only the ``max_detections`` highest-scoring predictions of a case take part (stable sort, so equal
  scores keep their input order);
- predictions are visited from the highest score down; each takes the still unmatched ground-truth box with the
  highest IoU, provided that IoU is at least the threshold (the threshold is capped at ``1 - 1e-10`` so that a
  threshold of 1.0 still accepts identical boxes);
- when two unmatched ground-truth boxes have the same IoU, the later one (higher index) wins, as in nnDetection;
- a prediction that finds no partner is a false positive; a ground-truth box nobody took is a false negative.

Ground-truth "ignore" flags of nnDetection are not used in this study (every converted instance counts).
IoUs are MONAI's ``box_iou`` numbers (standard mode ``(z0, y0, x0, z1, y1, x1)``, max exclusive, float32
arithmetic), computed by :func:`pretrain_det3d.data.boxes.pairwise_box_iou` in numpy so that evaluation jobs
do not pay for importing torch and MONAI.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from pretrain_det3d.data.boxes import pairwise_box_iou

#: nnDetection and MONAI evaluate the 100 highest-scoring predictions per class and case.
DEFAULT_MAX_DETECTIONS = 100
#: An IoU threshold is capped here so that a threshold of 1.0 still matches identical boxes.
MAX_EFFECTIVE_IOU_THRESHOLD = 1.0 - 1e-10


@dataclass(frozen=True)
class ClassMatches:
    """Matching result of one class in one case.

    Attributes:
        scores: float ``[D]`` scores of the evaluated predictions, highest first.
        pred_matched: bool ``[T, D]``; ``pred_matched[t, d]`` is True if prediction ``d`` is a true positive at
            IoU threshold ``t``.
        gt_matched: bool ``[T, G]``; True where ground-truth box ``g`` was found at threshold ``t``.
        pred_order: int ``[D]`` index of each evaluated prediction in the caller's arrays (of this class).
    """

    scores: np.ndarray
    pred_matched: np.ndarray
    gt_matched: np.ndarray
    pred_order: np.ndarray

    @property
    def num_gt(self) -> int:
        """Number of ground-truth boxes of this class in this case."""
        return int(self.gt_matched.shape[1])

    @property
    def num_pred(self) -> int:
        """Number of evaluated predictions (at most ``max_detections``)."""
        return int(self.scores.shape[0])


def greedy_match(ious: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Match predictions (rows, already in descending score order) to ground truth (columns) greedily.

    Returns int ``[D]``: the matched ground-truth column of each prediction, ``-1`` where unmatched.

    Example:
        >>> greedy_match(np.array([[0.6, 0.8], [0.9, 0.05]]), 0.5)  # first prediction takes column 1
        array([1, 0])
        >>> greedy_match(np.array([[0.6], [0.9]]), 0.5)  # the higher score wins, not the higher IoU
        array([ 0, -1])
    """
    if ious.ndim != 2:
        raise ValueError(f"expected an IoU matrix [D, G], got shape {ious.shape}")
    threshold = min(float(iou_threshold), MAX_EFFECTIVE_IOU_THRESHOLD)
    num_pred, num_gt = ious.shape
    assignment = np.full(num_pred, -1, dtype=np.int64)
    gt_taken = np.zeros(num_gt, dtype=bool)
    for pred_index in range(num_pred):
        candidates = (~gt_taken) & (ious[pred_index] >= threshold)
        if not candidates.any():
            continue
        masked = np.where(candidates, ious[pred_index], -np.inf)
        # Ties go to the highest column index, as in nnDetection's loop (``>=`` replaces the best so far).
        best = num_gt - 1 - int(np.argmax(masked[::-1]))
        assignment[pred_index] = best
        gt_taken[best] = True
    return assignment


def _as_boxes(boxes: np.ndarray | Sequence, name: str) -> np.ndarray:
    array = np.asarray(boxes, dtype=np.float64)
    if array.size == 0:
        return np.zeros((0, 6), dtype=np.float64)
    if array.ndim != 2 or array.shape[1] != 6:
        raise ValueError(f"{name} must have shape [N, 6] (z0, y0, x0, z1, y1, x1), got {array.shape}")
    return array


def match_class(
    pred_boxes: np.ndarray,
    pred_scores: np.ndarray,
    gt_boxes: np.ndarray,
    iou_thresholds: Sequence[float],
    max_detections: int = DEFAULT_MAX_DETECTIONS,
) -> ClassMatches:
    """Match the predictions of one class in one case at every IoU threshold.

    Example:
        >>> gt = np.array([[0, 0, 0, 4, 4, 4.]])
        >>> m = match_class(np.array([[0, 0, 0, 4, 4, 4.], [0, 0, 0, 4, 4, 3.]]), np.array([0.2, 0.9]), gt, [0.1])
        >>> m.scores, m.pred_matched  # the 0.9 box is visited first and takes the only ground truth
        (array([0.9, 0.2]), array([[ True, False]]))
    """
    pred_boxes = _as_boxes(pred_boxes, "pred_boxes")
    gt_boxes = _as_boxes(gt_boxes, "gt_boxes")
    pred_scores = np.asarray(pred_scores, dtype=np.float64).reshape(-1)
    if pred_scores.shape[0] != pred_boxes.shape[0]:
        raise ValueError(f"{pred_boxes.shape[0]} predicted boxes but {pred_scores.shape[0]} scores")
    order = np.argsort(-pred_scores, kind="mergesort")[:max_detections]
    pred_boxes, scores = pred_boxes[order], pred_scores[order]

    num_thresholds = len(iou_thresholds)
    pred_matched = np.zeros((num_thresholds, len(scores)), dtype=bool)
    gt_matched = np.zeros((num_thresholds, len(gt_boxes)), dtype=bool)
    if len(scores) and len(gt_boxes):
        ious = pairwise_box_iou(pred_boxes, gt_boxes)  # [D, G]
        for threshold_index, threshold in enumerate(iou_thresholds):
            assignment = greedy_match(ious, threshold)
            found = assignment >= 0
            pred_matched[threshold_index] = found
            gt_matched[threshold_index, assignment[found]] = True
    return ClassMatches(scores=scores, pred_matched=pred_matched, gt_matched=gt_matched, pred_order=order)


def match_case(
    pred_boxes: np.ndarray,
    pred_scores: np.ndarray,
    pred_labels: np.ndarray,
    gt_boxes: np.ndarray,
    gt_labels: np.ndarray,
    iou_thresholds: Sequence[float],
    max_detections: int = DEFAULT_MAX_DETECTIONS,
) -> dict[int, ClassMatches]:
    """Match one case, class by class; the result holds every class present in the predictions or the truth.

    Example:
        >>> gt = np.array([[0, 0, 0, 4, 4, 4.]])
        >>> out = match_case(gt, np.array([0.5]), np.array([1]), gt, np.array([0]), [0.1])
        >>> sorted(out), out[0].num_gt, out[1].num_pred  # class 1 predicted but absent: a false positive
        ([0, 1], 1, 1)
    """
    pred_boxes = _as_boxes(pred_boxes, "pred_boxes")
    gt_boxes = _as_boxes(gt_boxes, "gt_boxes")
    pred_scores = np.asarray(pred_scores, dtype=np.float64).reshape(-1)
    pred_labels = np.asarray(pred_labels).reshape(-1).astype(np.int64)
    gt_labels = np.asarray(gt_labels).reshape(-1).astype(np.int64)
    if not (len(pred_boxes) == len(pred_scores) == len(pred_labels)):
        raise ValueError(
            f"predictions disagree in length: {len(pred_boxes)} boxes, {len(pred_scores)} scores, "
            f"{len(pred_labels)} labels"
        )
    if len(gt_boxes) != len(gt_labels):
        raise ValueError(f"{len(gt_boxes)} ground-truth boxes but {len(gt_labels)} labels")
    results: dict[int, ClassMatches] = {}
    for class_id in np.union1d(pred_labels, gt_labels).tolist():
        pred_mask, gt_mask = pred_labels == class_id, gt_labels == class_id
        results[int(class_id)] = match_class(
            pred_boxes[pred_mask], pred_scores[pred_mask], gt_boxes[gt_mask], iou_thresholds, max_detections
        )
    return results
