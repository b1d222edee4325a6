"""COCO-style average precision with nnDetection's definitions and key names.

Definitions (``nndet/evaluator/detection/coco.py`` and ``det.py``, ``BoxEvaluator.create(fast=False)``):

- AP at every IoU threshold of ``AP_IOU_THRESHOLDS`` = 0.1, 0.2, ..., 0.9 (nnDetection uses
  ``np.arange(0.1, 1.0, 0.1)``; we use the same values rounded to two decimals, which only matters for an IoU
  that equals a threshold to the last bit), key ``AP_IoU_0.10_MaxDet_100``;
- mAP over ``MAP_IOU_RANGE`` = (0.10, 0.50, 0.05), i.e. the 9 thresholds 0.10, 0.15, ..., 0.50, key
  ``mAP_IoU_0.10_0.50_0.05_MaxDet_100``;
- MaxDet 100: the 100 highest-scoring predictions per class and case (see ``matching``);
- per class, detections of all cases are pooled and sorted by score (stable, cases in the order given);
  precision is made monotone from the right and read at the 101 recall points 0, 0.01, ..., 1 (first
  detection whose recall reaches the point; 0 where the recall is never reached); AP is the mean of the 101
  values. Counts are accumulated in float32 as nnDetection does, so recall values that land exactly on a
  recall point resolve the same way as there;
- per-class keys carry the class index as prefix: ``0_AP_IoU_0.10_MaxDet_100`` (nnDetection prefixes the
  keys of ``dataset.json``'s ``labels``, which are the class indices);
- a class without ground truth in the evaluated cases has AP ``-1`` (nnDetection's placeholder);
- "over all classes" is the mean of the per-class values. nnDetection averages its whole precision array, which
  equals this mean whenever every class has ground truth; when a class has none, nnDetection lets its ``-1``
  placeholders into the mean, which we do not: the mean runs over the classes with ground truth (the
  pycocotools convention), and is ``-1`` if no class has any.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from pretrain_det3d.evaluation.matching import DEFAULT_MAX_DETECTIONS, BatchMatches, ClassMatches

#: IoU thresholds at which AP is reported (nnDetection ``BoxEvaluator.create(fast=False)``).
AP_IOU_THRESHOLDS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
#: (start, stop, step) of the IoU range averaged into mAP.
MAP_IOU_RANGE: tuple[float, float, float] = (0.1, 0.5, 0.05)
#: Number of recall points of the COCO interpolation (0, 0.01, ..., 1).
NUM_RECALL_POINTS = 101
#: Value reported where a metric is undefined because there is no ground truth (nnDetection's placeholder).
UNDEFINED = -1.0


def iou_range_thresholds(iou_range: Sequence[float] = MAP_IOU_RANGE) -> np.ndarray:
    """IoU thresholds of an ``(start, stop, step)`` range, both ends included, rounded to 2 decimals.

    Example:
        >>> iou_range_thresholds((0.1, 0.5, 0.05)).tolist()
        [0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5]
    """
    start, stop, step = (float(v) for v in iou_range)
    count = int(np.round((stop - start) / step)) + 1
    return np.round(np.linspace(start, stop, count), 2)


def evaluation_iou_thresholds(
    ap_thresholds: Sequence[float] = AP_IOU_THRESHOLDS, iou_range: Sequence[float] = MAP_IOU_RANGE
) -> np.ndarray:
    """Sorted union of the AP thresholds and the mAP range: the thresholds matching has to run at.

    Example:
        >>> evaluation_iou_thresholds((0.1, 0.5), (0.1, 0.2, 0.05)).tolist()
        [0.1, 0.15, 0.2, 0.5]
    """
    return np.union1d(np.round(np.asarray(ap_thresholds, dtype=np.float64), 2), iou_range_thresholds(iou_range))


def iou_key(value: float) -> str:
    """Two-decimal IoU text as it appears in nnDetection's keys (``0.1`` -> ``"0.10"``)."""
    return f"{value:.2f}"


def ap_key(iou: float, max_detections: int = DEFAULT_MAX_DETECTIONS, class_id: int | None = None) -> str:
    """Key of AP at one IoU, e.g. ``AP_IoU_0.10_MaxDet_100`` or ``0_AP_IoU_0.10_MaxDet_100``.

    Example:
        >>> ap_key(0.1), ap_key(0.5, 100, 1)
        ('AP_IoU_0.10_MaxDet_100', '1_AP_IoU_0.50_MaxDet_100')
    """
    prefix = "" if class_id is None else f"{class_id}_"
    return f"{prefix}AP_IoU_{iou_key(iou)}_MaxDet_{max_detections}"


def map_key(
    iou_range: Sequence[float] = MAP_IOU_RANGE,
    max_detections: int = DEFAULT_MAX_DETECTIONS,
    class_id: int | None = None,
) -> str:
    """Key of mAP over an IoU range, e.g. ``mAP_IoU_0.10_0.50_0.05_MaxDet_100``.

    Example:
        >>> map_key()
        'mAP_IoU_0.10_0.50_0.05_MaxDet_100'
    """
    prefix = "" if class_id is None else f"{class_id}_"
    start, stop, step = iou_range
    return f"{prefix}mAP_IoU_{iou_key(start)}_{iou_key(stop)}_{iou_key(step)}_MaxDet_{max_detections}"


def pool_detections(
    case_matches: Sequence[Mapping[int, ClassMatches]],
    class_ids: Sequence[int] | None,
    threshold_index: int,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Pool the evaluated detections of some classes over all cases, sorted by descending score.

    ``class_ids=None`` pools every class. Returns ``(scores [R], is_true_positive [R] bool, num_gt)``; the sort is
    stable, so equal scores keep case order, as in nnDetection.

    Example:
        >>> from pretrain_det3d.evaluation.matching import match_case
        >>> gt = np.array([[0, 0, 0, 4, 4, 4.]])
        >>> cases = [match_case(gt, [0.3], [0], gt, [0], [0.1]), match_case(gt, [0.7], [0], gt[:0], [], [0.1])]
        >>> pool_detections(cases, [0], 0)
        (array([0.7, 0.3]), array([False,  True]), 1)
    """
    scores, hits, num_gt = [], [], 0
    for matches in case_matches:
        for class_id, result in matches.items():
            if class_ids is not None and class_id not in class_ids:
                continue
            scores.append(result.scores)
            hits.append(result.pred_matched[threshold_index])
            num_gt += result.num_gt
    if not scores:
        return np.zeros(0), np.zeros(0, dtype=bool), 0
    all_scores, all_hits = np.concatenate(scores), np.concatenate(hits)
    order = np.argsort(-all_scores, kind="mergesort")
    return all_scores[order], all_hits[order], num_gt


def as_batch_matches(
    case_matches: Sequence[Mapping[int, ClassMatches]] | BatchMatches, num_thresholds: int
) -> BatchMatches:
    """``case_matches`` as flat arrays (``match_cases``'s result passes through unchanged)."""
    if isinstance(case_matches, BatchMatches):
        return case_matches
    return BatchMatches.from_case_matches(case_matches, num_thresholds)


def pool_batch(batch: BatchMatches, class_ids: Sequence[int] | None) -> tuple[np.ndarray, np.ndarray, int]:
    """``pool_detections`` at every threshold at once: ``(scores [R], is_true_positive [T, R], num_gt)``.

    The detections of ``batch`` are already in ``pool_detections``' concatenation order (case, class, rank), so
    the same stable sort gives the same order, ties included.

    Example:
        >>> from pretrain_det3d.evaluation.matching import match_cases
        >>> gt = np.array([[0, 0, 0, 4, 4, 4.]])
        >>> pool_batch(match_cases([gt, gt], [[0.3], [0.7]], [[0], [0]], [gt, gt[:0]], [[0], []], [0.1]), [0])
        (array([0.7, 0.3]), array([[False,  True]]), 1)
    """
    if class_ids is None:
        det_mask, num_gt = slice(None), len(batch.gt_class)
    else:
        wanted = np.asarray(list(class_ids), dtype=np.int64)
        det_mask = np.isin(batch.det_class, wanted)
        num_gt = int(np.count_nonzero(np.isin(batch.gt_class, wanted)))
    scores = batch.det_score[det_mask]
    order = np.argsort(-scores, kind="mergesort")
    return scores[order], batch.det_matched[:, det_mask][:, order], num_gt


def interpolated_average_precision(
    is_true_positive: np.ndarray, num_gt: int, num_recall_points: int = NUM_RECALL_POINTS
) -> float:
    """COCO's interpolated AP of detections already sorted by descending score; ``-1`` if ``num_gt == 0``.

    Example:
        >>> interpolated_average_precision(np.array([True, True]), 2)
        1.0
        >>> round(interpolated_average_precision(np.array([False, True]), 1), 6)  # precision 1/2 at every recall
        0.5
    """
    if num_gt <= 0:
        return UNDEFINED
    hits = np.asarray(is_true_positive, dtype=bool)
    # float32 as in nnDetection: recall values exactly on a recall point then compare the same way there.
    true_positives = np.cumsum(hits).astype(np.float32)
    false_positives = np.cumsum(~hits).astype(np.float32)
    recall = true_positives / num_gt
    # The k-th detection makes tp + fp = k >= 1, so no epsilon is needed (nnDetection adds np.spacing(1), which
    # only moves values by ~1e-16 and turns a perfect AP into 0.9999999999999999).
    precision = true_positives.astype(np.float64) / (true_positives.astype(np.float64) + false_positives)
    # Precision envelope: the best precision at this or any higher recall.
    precision = np.maximum.accumulate(precision[::-1])[::-1] if len(precision) else precision
    recall_points = np.linspace(0.0, 1.0, num_recall_points)
    positions = np.searchsorted(recall, recall_points, side="left")
    reachable = positions < len(precision)
    sampled = np.zeros(num_recall_points, dtype=np.float64)
    sampled[reachable] = precision[positions[reachable]]
    return float(np.mean(sampled))


def _class_mean(values: Sequence[float]) -> float:
    defined = [v for v in values if v != UNDEFINED]
    return float(np.mean(defined)) if defined else UNDEFINED


def compute_ap_metrics(
    case_matches: Sequence[Mapping[int, ClassMatches]] | BatchMatches,
    class_ids: Sequence[int],
    iou_thresholds: Sequence[float],
    ap_thresholds: Sequence[float] = AP_IOU_THRESHOLDS,
    iou_range: Sequence[float] = MAP_IOU_RANGE,
    max_detections: int = DEFAULT_MAX_DETECTIONS,
) -> dict[str, float]:
    """AP per IoU threshold and mAP, overall and per class, under nnDetection's key names.

    ``iou_thresholds`` are the thresholds the matching ran at (``evaluation_iou_thresholds``); every AP threshold
    and every threshold of the mAP range must be among them. ``case_matches`` is one ``match_case`` result per
    case or ``match_cases``' result for all of them (the same numbers; the latter is faster).

    Example:
        >>> from pretrain_det3d.evaluation.matching import match_case
        >>> gt = np.array([[0, 0, 0, 4, 4, 4.]]); ious = evaluation_iou_thresholds()
        >>> m = compute_ap_metrics([match_case(gt, [0.9], [0], gt, [0], ious)], [0], ious)
        >>> m["AP_IoU_0.10_MaxDet_100"], m["0_mAP_IoU_0.10_0.50_0.05_MaxDet_100"]
        (1.0, 1.0)
    """
    thresholds = np.round(np.asarray(iou_thresholds, dtype=np.float64), 2).tolist()

    def index_of(iou: float) -> int:
        rounded = round(float(iou), 2)
        if rounded not in thresholds:
            raise ValueError(f"IoU threshold {iou} was not among the matching thresholds {thresholds}")
        return thresholds.index(rounded)

    # per_class_ap[class][threshold index] for every threshold the metrics need; one pooling per class
    needed = sorted({index_of(t) for t in ap_thresholds} | {index_of(t) for t in iou_range_thresholds(iou_range)})
    batch = as_batch_matches(case_matches, len(thresholds))
    per_class_ap: dict[int, dict[int, float]] = {}
    for class_id in class_ids:
        _, hits, num_gt = pool_batch(batch, [class_id])
        per_class_ap[class_id] = {i: interpolated_average_precision(hits[i], num_gt) for i in needed}

    range_indices = [index_of(t) for t in iou_range_thresholds(iou_range)]
    results: dict[str, float] = {}
    class_map = {
        c: (UNDEFINED if per_class_ap[c][range_indices[0]] == UNDEFINED else float(
            np.mean([per_class_ap[c][i] for i in range_indices])))
        for c in class_ids
    }
    results[map_key(iou_range, max_detections)] = _class_mean(list(class_map.values()))
    for class_id in class_ids:
        results[map_key(iou_range, max_detections, class_id)] = class_map[class_id]
    for iou in ap_thresholds:
        threshold_index = index_of(iou)
        values = [per_class_ap[c][threshold_index] for c in class_ids]
        results[ap_key(iou, max_detections)] = _class_mean(values)
        for class_id, value in zip(class_ids, values):
            results[ap_key(iou, max_detections, class_id)] = value
    return results
