"""Evaluation time for a given number of cases and boxes (``evaluation.evaluate_cases``: AP, mAP, FROC).

Ground truth and predictions are random boxes; predictions jitter half of the true boxes and add false
positives, so the matcher does real work at every IoU threshold.

Example:
    >>> measure_evaluation(num_cases=10, boxes_per_case=20, seed=0, repeats=1)["seconds"] > 0
    True
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pretrain_det3d.benchmark.timing import summarize, time_repeats
from pretrain_det3d.evaluation.run import CaseBoxes, evaluate_cases

DEFAULT_EVAL_CASES = 50
DEFAULT_EVAL_BOXES = 100  # predicted boxes per case (nnDetection keeps up to 100)
GT_FRACTION = 0.05  # true objects per predicted box
IMAGE_EXTENT = 128.0


def synthetic_cases(num_cases: int, boxes_per_case: int, seed: int) -> tuple[list[str], list[CaseBoxes], list[CaseBoxes]]:
    """Random ground truth and predictions (class 0) for ``num_cases`` cases."""
    rng = np.random.default_rng(seed)
    ids, gts, preds = [], [], []
    for index in range(num_cases):
        n_gt = max(1, int(round(boxes_per_case * GT_FRACTION)))
        starts = rng.uniform(0, IMAGE_EXTENT - 20, (n_gt, 3))
        gt_boxes = np.hstack([starts, starts + rng.uniform(3, 20, (n_gt, 3))])
        hits = gt_boxes[rng.random(n_gt) < 0.5] + rng.normal(0, 1.0, (1, 6))
        n_fp = max(boxes_per_case - len(hits), 0)
        fp_starts = rng.uniform(0, IMAGE_EXTENT - 20, (n_fp, 3))
        fp_boxes = np.hstack([fp_starts, fp_starts + rng.uniform(3, 20, (n_fp, 3))])
        pred_boxes = np.vstack([hits.reshape(-1, 6), fp_boxes])
        pred_boxes[:, 3:] = np.maximum(pred_boxes[:, 3:], pred_boxes[:, :3] + 1)  # keep boxes non-empty
        ids.append(f"case_{index:03d}")
        gts.append(CaseBoxes(gt_boxes, np.zeros(n_gt, dtype=np.int64)))
        preds.append(CaseBoxes(pred_boxes, np.zeros(len(pred_boxes), dtype=np.int64), rng.random(len(pred_boxes))))
    return ids, gts, preds


def measure_evaluation(
    num_cases: int = DEFAULT_EVAL_CASES,
    boxes_per_case: int = DEFAULT_EVAL_BOXES,
    seed: int = 0,
    warmup: int = 0,
    repeats: int = 3,
) -> dict[str, Any]:
    """Median seconds of ``evaluate_cases`` over ``num_cases`` cases with ``boxes_per_case`` predictions each."""
    ids, gts, preds = synthetic_cases(num_cases, boxes_per_case, seed)
    seconds = time_repeats(lambda: evaluate_cases(ids, gts, preds, [0]), warmup=warmup, repeats=repeats)
    timing = summarize(seconds)
    return {"seconds": timing["median_s"], "timing": timing, "num_cases": num_cases,
            "boxes_per_case": boxes_per_case}
