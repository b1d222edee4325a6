"""Evaluation time (``evaluation.evaluate_cases``: AP, mAP, FROC, per-case table), side by side with MONAI's.

Ground truth and predictions are random boxes; predictions jitter half of the true boxes and add false
positives, so the matcher does real work at every IoU threshold.

The peer is MONAI's ``matching_batch`` (with ``monai.data.box_utils.box_iou``) followed by ``COCOMetric``
(AP at ``AP_IOU_THRESHOLDS`` and mAP over ``MAP_IOU_RANGE``, MaxDet 100) on the very same boxes. Both run in the
same process, their repeats interleaved (ours, MONAI, ours, ...) so that load from other jobs hits both alike;
``ratio`` = MONAI's median seconds over ours (above 1: ours is faster). Ours does more (FROC at 9 IoUs and the
per-case table); MONAI's does average recall, which ours does not. ``max_ap_difference`` is the largest
difference of the AP/mAP values the two report, a check that both measured the same work.

Run it alone (the full ``benchmark`` command also trains, loads and infers):

    python -m pretrain_det3d.benchmark.evaluation --cases 1000 --boxes 100 --repeats 5

Example:
    >>> measure_evaluation(num_cases=10, boxes_per_case=20, seed=0, repeats=1, compare=False)["seconds"] > 0
    True
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any, Callable, Sequence

import numpy as np

from pretrain_det3d.benchmark.timing import summarize
from pretrain_det3d.evaluation.metrics import AP_IOU_THRESHOLDS, MAP_IOU_RANGE
from pretrain_det3d.evaluation.run import CaseBoxes, evaluate_cases

DEFAULT_EVAL_CASES = 1000
DEFAULT_EVAL_BOXES = 100  # predicted boxes per case (nnDetection keeps up to 100)
DEFAULT_EVAL_REPEATS = 3
GT_FRACTION = 0.05  # true objects per predicted box
IMAGE_EXTENT = 128.0
MAX_DETECTIONS = 100


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


def monai_evaluation(gts: Sequence[CaseBoxes], preds: Sequence[CaseBoxes], class_ids: Sequence[int]) -> dict[str, float]:
    """MONAI's ``matching_batch`` + ``COCOMetric`` on our boxes (AP/mAP at our thresholds, MaxDet 100)."""
    from monai.apps.detection.metrics.coco import COCOMetric
    from monai.apps.detection.metrics.matching import matching_batch
    from monai.data.box_utils import box_iou

    coco = COCOMetric(classes=[str(c) for c in class_ids], iou_list=AP_IOU_THRESHOLDS, iou_range=MAP_IOU_RANGE,
                      max_detection=(MAX_DETECTIONS,), verbose=False)
    matches = matching_batch(box_iou, coco.iou_thresholds,
                             pred_boxes=[p.boxes for p in preds], pred_classes=[p.labels for p in preds],
                             pred_scores=[p.scores for p in preds], gt_boxes=[g.boxes for g in gts],
                             gt_classes=[g.labels for g in gts], max_detections=MAX_DETECTIONS)
    return coco(matches)[0]


def interleaved_repeats(functions: Sequence[Callable[[], object]], warmup: int, repeats: int) -> list[list[float]]:
    """Seconds of each function per repeat, the functions taking turns within every repeat."""
    if repeats <= 0 or warmup < 0:
        raise ValueError(f"need repeats > 0 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    for _ in range(warmup):
        for fn in functions:
            fn()
    seconds: list[list[float]] = [[] for _ in functions]
    for _ in range(repeats):
        for fn, times in zip(functions, seconds):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
    return seconds


def measure_evaluation(
    num_cases: int = DEFAULT_EVAL_CASES,
    boxes_per_case: int = DEFAULT_EVAL_BOXES,
    seed: int = 0,
    warmup: int = 0,
    repeats: int = DEFAULT_EVAL_REPEATS,
    compare: bool = True,
) -> dict[str, Any]:
    """Median seconds of ``evaluate_cases`` on ``num_cases`` x ``boxes_per_case`` boxes, and of MONAI's on the same.

    With ``compare`` the record also holds ``monai_seconds``, ``monai_timing``, ``ratio`` (MONAI's median over
    ours) and ``max_ap_difference``; without, those are ``None``.
    """
    ids, gts, preds = synthetic_cases(num_cases, boxes_per_case, seed)
    class_ids = [0]
    ours_result: dict[str, Any] = {}
    monai_result: dict[str, Any] = {}

    def ours() -> None:
        ours_result["metrics"] = evaluate_cases(ids, gts, preds, class_ids)[0]

    def monai() -> None:
        monai_result["metrics"] = monai_evaluation(gts, preds, class_ids)

    if compare:
        from monai.apps.detection.metrics.coco import COCOMetric  # noqa: F401  (import cost outside the clock)

    seconds = interleaved_repeats([ours, monai] if compare else [ours], warmup, repeats)
    timing = summarize(seconds[0])
    record: dict[str, Any] = {"seconds": timing["median_s"], "timing": timing, "num_cases": num_cases,
                              "boxes_per_case": boxes_per_case, "monai_seconds": None, "monai_timing": None,
                              "ratio": None, "max_ap_difference": None}
    if compare:
        monai_timing = summarize(seconds[1])
        theirs = monai_result["metrics"]
        shared = [key for key in theirs if key.startswith(("AP_", "mAP_")) and key in ours_result["metrics"]]
        record.update(monai_seconds=monai_timing["median_s"], monai_timing=monai_timing,
                      ratio=monai_timing["median_s"] / timing["median_s"],
                      max_ap_difference=max(abs(float(ours_result["metrics"][k]) - float(theirs[k])) for k in shared))
    return record


def format_evaluation(record: dict[str, Any]) -> str:
    """One line: our seconds, MONAI's and the ratio."""
    line = f"evaluation {record['num_cases']} cases x {record['boxes_per_case']} boxes: ours {record['seconds']:.3g} s"
    if record.get("monai_seconds") is not None:
        line += (f", MONAI matching_batch + COCOMetric {record['monai_seconds']:.3g} s, MONAI / ours "
                 f"{record['ratio']:.3g} (AP values differ by at most {record['max_ap_difference']:.2g})")
    return line


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=DEFAULT_EVAL_CASES)
    parser.add_argument("--boxes", type=int, default=DEFAULT_EVAL_BOXES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=DEFAULT_EVAL_REPEATS)
    parser.add_argument("--no-compare", action="store_true", help="time ours only")
    parser.add_argument("--json", help="also write the record here")
    args = parser.parse_args(argv)
    record = measure_evaluation(args.cases, args.boxes, args.seed, args.warmup, args.repeats, not args.no_compare)
    print(format_evaluation(record))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(record, handle, indent=2)


if __name__ == "__main__":
    main()
