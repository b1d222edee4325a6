"""FROC: sensitivity at fixed numbers of false positives per scan, with nnDetection's definitions.

Definitions (``nndet/evaluator/detection/froc.py``):

- detections of all classes and cases are pooled (each ground-truth object weighs the same whatever its class;
  matching itself is per class, see ``matching``), at most MaxDet 100 per class and case;
- walking the score threshold down over the distinct scores gives operating points (false positives per scan,
  sensitivity) = (cumulative FP / number of scans, cumulative TP / number of ground-truth objects), starting at
  (0, 0); tied scores enter together;
- the curve is read by linear interpolation at ``FP_PER_SCAN`` = 1/8, 1/4, 1/2, 1, 2, 4, 8 (``np.interp``: beyond
  the last operating point the final sensitivity holds; where several points share one FP rate the highest
  sensitivity counts); the FROC score is the mean of those 7 sensitivities;
- key names: ``FROC_score_IoU_0.10``, the curve ``FROC_curve_IoU_0.10`` (list over ``FROC_fpi_thresholds``),
  per class ``0_FROC_score_IoU_0.10`` and the class mean ``mc_FROC_score_IoU_0.10`` (nnDetection's names). We
  add flat scalars ``FROC_sens_IoU_0.10_FPI_0.125`` ... for the main IoU so that tables need no list parsing.

Deviations, where nnDetection's value is an artefact: without ground truth we report ``-1`` (undefined, like AP)
where nnDetection reports 0; when no detection is a true positive we report sensitivity 0 where nnDetection's
use of ``sklearn.metrics.roc_curve`` yields NaN; ``mc_`` averages over the classes with ground truth.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from pretrain_det3d.evaluation.matching import BatchMatches, ClassMatches
from pretrain_det3d.evaluation.metrics import AP_IOU_THRESHOLDS, UNDEFINED, as_batch_matches, iou_key, pool_batch

#: Average false positives per scan at which sensitivity is read (nnDetection and the LUNA16 challenge).
FP_PER_SCAN: tuple[float, ...] = (1 / 8, 1 / 4, 1 / 2, 1, 2, 4, 8)
#: IoU thresholds at which FROC is computed (nnDetection ``BoxEvaluator.create(fast=False)``).
FROC_IOU_THRESHOLDS: tuple[float, ...] = AP_IOU_THRESHOLDS
#: The IoU whose per-FP sensitivities are also written as flat scalar keys.
MAIN_FROC_IOU = 0.1


def froc_curve(
    sorted_scores: np.ndarray,
    is_true_positive: np.ndarray,
    num_gt: int,
    num_scans: int,
    fp_per_scan: Sequence[float] = FP_PER_SCAN,
) -> np.ndarray:
    """Sensitivity at each rate of ``fp_per_scan`` for detections sorted by descending score.

    Returns float ``[len(fp_per_scan)]``, all ``-1`` if ``num_gt == 0``.

    Example:
        >>> # 2 scans, 2 objects: TP (0.9), FP (0.8), TP (0.7); points (0,0) (0,.5) (.5,.5) (.5,1)
        >>> froc_curve(np.array([0.9, 0.8, 0.7]), np.array([True, False, True]), 2, 2, [0.25, 0.5, 1.0]).tolist()
        [0.5, 1.0, 1.0]
    """
    if num_scans <= 0:
        raise ValueError(f"FROC needs at least one scan, got num_scans={num_scans}")
    if num_gt <= 0:
        return np.full(len(fp_per_scan), UNDEFINED)
    scores = np.asarray(sorted_scores, dtype=np.float64)
    hits = np.asarray(is_true_positive, dtype=bool)
    if len(scores) and np.any(np.diff(scores) > 0):
        raise ValueError("froc_curve expects scores sorted in descending order")
    # Operating points at the last detection of every run of equal scores: tied detections enter together.
    last_of_run = np.r_[scores[1:] != scores[:-1], True] if len(scores) else np.zeros(0, dtype=bool)
    true_positives = np.cumsum(hits)[last_of_run]
    false_positives = np.cumsum(~hits)[last_of_run]
    fps = np.r_[0.0, false_positives / num_scans]
    sensitivity = np.r_[0.0, true_positives / num_gt]
    # np.interp returns the last of equal xp values, i.e. the highest sensitivity at a given FP rate.
    return np.interp(np.asarray(fp_per_scan, dtype=np.float64), fps, sensitivity)


def fp_key(rate: float) -> str:
    """Short text of an FP-per-scan rate: ``0.125``, ``0.25``, ``1``, ``8``."""
    return f"{rate:g}"


def compute_froc_metrics(
    case_matches: Sequence[Mapping[int, ClassMatches]] | BatchMatches,
    class_ids: Sequence[int],
    iou_thresholds: Sequence[float],
    froc_thresholds: Sequence[float] = FROC_IOU_THRESHOLDS,
    fp_per_scan: Sequence[float] = FP_PER_SCAN,
    main_iou: float = MAIN_FROC_IOU,
) -> dict[str, float | list[float]]:
    """FROC score and curve per IoU threshold, pooled and per class, under nnDetection's key names.

    The number of scans is the number of cases: a case without ground truth and without predictions still counts.
    ``case_matches`` is one ``match_case`` result per case or ``match_cases``' result for all of them.

    Example:
        >>> from pretrain_det3d.evaluation.matching import match_case
        >>> gt = np.array([[0, 0, 0, 4, 4, 4.]])
        >>> m = compute_froc_metrics([match_case(gt, [0.9], [0], gt, [0], [0.1])], [0], [0.1], [0.1])
        >>> m["FROC_score_IoU_0.10"], m["FROC_curve_IoU_0.10"]
        (1.0, [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    """
    thresholds = np.round(np.asarray(iou_thresholds, dtype=np.float64), 2).tolist()
    batch = as_batch_matches(case_matches, len(thresholds))
    num_scans = batch.num_cases
    results: dict[str, float | list[float]] = {}
    pooled: dict[int | None, tuple[np.ndarray, np.ndarray, int]] = {}  # one pooling per class set, all thresholds

    def pool(class_id: int | None) -> tuple[np.ndarray, np.ndarray, int]:
        if class_id not in pooled:
            pooled[class_id] = pool_batch(batch, class_ids if class_id is None else [class_id])
        return pooled[class_id]
    for iou in froc_thresholds:
        rounded = round(float(iou), 2)
        if rounded not in thresholds:
            raise ValueError(f"FROC IoU threshold {iou} was not among the matching thresholds {thresholds}")
        threshold_index = thresholds.index(rounded)
        scores, hits, num_gt = pool(None)
        curve = froc_curve(scores, hits[threshold_index], num_gt, num_scans, fp_per_scan)
        results[f"FROC_score_IoU_{iou_key(iou)}"] = UNDEFINED if num_gt == 0 else float(np.mean(curve))
        results[f"FROC_curve_IoU_{iou_key(iou)}"] = [float(v) for v in curve]
        if rounded == round(main_iou, 2):
            for rate, value in zip(fp_per_scan, curve):
                results[f"FROC_sens_IoU_{iou_key(iou)}_FPI_{fp_key(rate)}"] = float(value)
        class_scores = []
        for class_id in class_ids:
            scores, hits, num_gt = pool(class_id)
            curve = froc_curve(scores, hits[threshold_index], num_gt, num_scans, fp_per_scan)
            value = UNDEFINED if num_gt == 0 else float(np.mean(curve))
            results[f"{class_id}_FROC_score_IoU_{iou_key(iou)}"] = value
            if value != UNDEFINED:
                class_scores.append(value)
        results[f"mc_FROC_score_IoU_{iou_key(iou)}"] = float(np.mean(class_scores)) if class_scores else UNDEFINED
    results["FROC_fpi_thresholds"] = [float(r) for r in fp_per_scan]
    results["FROC_num_images"] = num_scans
    return results
