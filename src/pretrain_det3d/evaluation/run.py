"""Evaluate one run's predictions against the converted ground truth: metrics JSON and a per-case CSV.

Ground truth of a case = the boxes of the instance map ``labelsTr/{case}.nii.gz`` (``data.boxes``; MONAI standard
mode, converted-image voxels) with classes from ``labelsTr/{case}.json``; the classes of the study are the keys of
``dataset.json``'s ``labels``. Predictions are ``{predictions_dir}/{case}.json`` with ``boxes``, ``scores`` and
``labels`` in the same voxel frame.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import SimpleITK as sitk
from tqdm import tqdm

from pretrain_det3d.data.boxes import boxes_from_instance_map
from pretrain_det3d.data.errors import DatasetFormatError
from pretrain_det3d.data.io import instances_json_path, read_image
from pretrain_det3d.data.io import label_path as converted_label_path
from pretrain_det3d.evaluation.froc import FP_PER_SCAN, FROC_IOU_THRESHOLDS, compute_froc_metrics
from pretrain_det3d.evaluation.matching import DEFAULT_MAX_DETECTIONS, BatchMatches, match_cases
from pretrain_det3d.evaluation.metrics import (
    AP_IOU_THRESHOLDS,
    MAP_IOU_RANGE,
    compute_ap_metrics,
    evaluation_iou_thresholds,
)
from pretrain_det3d.utils.atomic import atomic_path, write_json

#: IoU at which the per-case table counts true positives, false positives and misses (the study's main IoU).
CASE_TABLE_IOU = 0.1
#: Columns of the per-case CSV, in order.
CASE_TABLE_COLUMNS = (
    "case", "num_gt", "num_pred", "num_evaluated", "tp", "fp", "fn", "best_score", "best_tp_score", "best_fp_score"
)


class EvaluationInputError(ValueError):
    """A ground-truth or prediction file is missing or malformed; the message starts with its path."""


@dataclass(frozen=True)
class CaseBoxes:
    """Boxes of one case: ground truth (``scores`` empty) or predictions.

    ``boxes`` float ``[N, 6]`` (z0, y0, x0, z1, y1, x1), ``labels`` int ``[N]``, ``scores`` float ``[N]``.
    """

    boxes: np.ndarray
    labels: np.ndarray
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0))


def read_class_ids(converted_root: str | os.PathLike) -> list[int]:
    """Class indices of a converted dataset: the keys of ``dataset.json``'s ``labels``, sorted.

    Example:
        >>> read_class_ids("results/data/converted/demo")  # doctest: +SKIP
        [0, 1]
    """
    path = Path(converted_root) / "dataset.json"
    if not path.is_file():
        raise EvaluationInputError(f"{path}: dataset.json not found (needed for the class list)")
    try:
        labels = json.loads(path.read_text())["labels"]
        return sorted(int(key) for key in labels)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise EvaluationInputError(f"{path}: expected 'labels' with integer class keys ({error!r})") from error


def load_ground_truth(converted_root: str | os.PathLike, case: str, test: bool = False) -> CaseBoxes:
    """Boxes and classes of one converted case, from ``labelsTr/{case}.nii.gz`` and ``labelsTr/{case}.json``
    (``labelsTs`` for a held-out test case, ``test``).

    Example:
        >>> gt = load_ground_truth("results/data/converted/demo", "case_000")  # doctest: +SKIP
        >>> gt.boxes.shape, gt.labels  # doctest: +SKIP
        ((2, 6), array([0, 0]))
    """
    label_path = converted_label_path(converted_root, case, test)
    meta_path = instances_json_path(converted_root, case, test)
    for path in (label_path, meta_path):
        if not path.is_file():
            raise EvaluationInputError(f"{path}: ground-truth file of case {case!r} not found")
    try:  # the project's one image reader: it refuses truncated files SimpleITK would zero-fill
        instance_map = sitk.GetArrayFromImage(read_image(label_path))
    except DatasetFormatError as error:
        raise EvaluationInputError(str(error)) from error
    try:
        instances = {int(k): int(v) for k, v in json.loads(meta_path.read_text())["instances"].items()}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as error:
        raise EvaluationInputError(f"{meta_path}: expected {{'instances': {{'1': 0, ...}}}} ({error!r})") from error
    ids, boxes = boxes_from_instance_map(instance_map)
    missing = [int(i) for i in ids if int(i) not in instances]
    if missing:
        raise EvaluationInputError(f"{meta_path}: instance ids {missing} of {label_path.name} have no class")
    labels = np.asarray([instances[int(i)] for i in ids], dtype=np.int64)
    return CaseBoxes(boxes=boxes, labels=labels)


def load_prediction(predictions_dir: str | os.PathLike, case: str) -> CaseBoxes:
    """Predicted boxes, scores and labels of one case from ``{predictions_dir}/{case}.json``.

    Example:
        >>> pred = load_prediction("results/predictions/retina_unet/scratch/demo/fold0", "case_000")  # doctest: +SKIP
    """
    path = Path(predictions_dir) / f"{case}.json"
    if not path.is_file():
        raise EvaluationInputError(f"{path}: prediction file of case {case!r} not found")
    try:
        record = json.loads(path.read_text())
        boxes = np.asarray(record["boxes"], dtype=np.float64).reshape(-1, 6)
        scores = np.asarray(record["scores"], dtype=np.float64).reshape(-1)
        labels = np.asarray(record["labels"], dtype=np.float64).reshape(-1)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise EvaluationInputError(
            f"{path}: expected {{'boxes': [[6 floats], ...], 'scores': [...], 'labels': [...]}} ({error!r})"
        ) from error
    if not (len(boxes) == len(scores) == len(labels)):
        raise EvaluationInputError(
            f"{path}: {len(boxes)} boxes, {len(scores)} scores and {len(labels)} labels differ in number"
        )
    if np.any(labels != np.round(labels)):
        raise EvaluationInputError(f"{path}: labels must be integer class indices")
    if not (np.all(np.isfinite(boxes)) and np.all(np.isfinite(scores))):
        raise EvaluationInputError(f"{path}: boxes and scores must be finite numbers")
    return CaseBoxes(boxes=boxes, labels=labels.astype(np.int64), scores=scores)


def _max_per_case(values: np.ndarray, cases: np.ndarray, num_cases: int) -> np.ndarray:
    """Largest value per case (``cases`` sorted ascending), NaN for a case without values."""
    out = np.full(num_cases, math.nan)
    if len(values):
        present, starts = np.unique(cases, return_index=True)
        out[present] = np.maximum.reduceat(values, starts)
    return out


def _case_table(
    case_ids: Sequence[str], ground_truth: Sequence[CaseBoxes], predictions: Sequence[CaseBoxes],
    batch: BatchMatches, index: int,
) -> pd.DataFrame:
    """Per-case counts at the matching threshold ``index`` over all classes (``CASE_TABLE_COLUMNS``)."""
    num_cases = len(case_ids)
    if num_cases == 0:
        return pd.DataFrame([], columns=list(CASE_TABLE_COLUMNS))
    hits = batch.det_matched[index]
    tp = np.bincount(batch.det_case[hits], minlength=num_cases)
    fp = np.bincount(batch.det_case[~hits], minlength=num_cases)
    num_gt = np.asarray([len(gt.labels) for gt in ground_truth], dtype=np.int64)
    columns = {
        "case": list(case_ids),
        "num_gt": num_gt,
        "num_pred": np.asarray([len(pred.labels) for pred in predictions], dtype=np.int64),
        "num_evaluated": np.bincount(batch.det_case, minlength=num_cases).astype(np.int64),
        "tp": tp.astype(np.int64),
        "fp": fp.astype(np.int64),
        "fn": num_gt - tp,
        "best_score": np.asarray([float(np.max(pred.scores)) if len(pred.scores) else math.nan
                                  for pred in predictions], dtype=np.float64),
        "best_tp_score": _max_per_case(batch.det_score[hits], batch.det_case[hits], num_cases),
        "best_fp_score": _max_per_case(batch.det_score[~hits], batch.det_case[~hits], num_cases),
    }
    return pd.DataFrame(columns, columns=list(CASE_TABLE_COLUMNS))


def evaluate_cases(
    case_ids: Sequence[str],
    ground_truth: Sequence[CaseBoxes],
    predictions: Sequence[CaseBoxes],
    class_ids: Sequence[int],
    ap_thresholds: Sequence[float] = AP_IOU_THRESHOLDS,
    iou_range: Sequence[float] = MAP_IOU_RANGE,
    froc_thresholds: Sequence[float] = FROC_IOU_THRESHOLDS,
    fp_per_scan: Sequence[float] = FP_PER_SCAN,
    max_detections: int = DEFAULT_MAX_DETECTIONS,
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Match every case and compute AP, mAP and FROC plus the per-case table (in memory).

    A predicted label outside ``class_ids`` is an error (it would silently count as nothing otherwise).

    Example:
        >>> gt = CaseBoxes(np.array([[0, 0, 0, 4, 4, 4.]]), np.array([0]))
        >>> pred = CaseBoxes(gt.boxes, gt.labels, np.array([0.9]))
        >>> metrics, table = evaluate_cases(["a"], [gt], [pred], [0])
        >>> metrics["AP_IoU_0.10_MaxDet_100"], int(table.loc[0, "tp"])
        (1.0, 1)
    """
    if not (len(case_ids) == len(ground_truth) == len(predictions)):
        raise ValueError("case_ids, ground_truth and predictions must have the same length")
    # One matching pass serves AP, mAP, FROC and the per-case table.
    extra = np.round(np.r_[np.asarray(froc_thresholds, dtype=np.float64), CASE_TABLE_IOU], 2)
    iou_thresholds = np.union1d(evaluation_iou_thresholds(ap_thresholds, iou_range), extra)
    table_index = iou_thresholds.tolist().index(round(CASE_TABLE_IOU, 2))
    known = set(int(c) for c in class_ids)

    for case, pred in zip(case_ids, predictions):
        unknown = sorted(set(pred.labels.tolist()) - known)
        if unknown:
            raise ValueError(f"case {case!r}: predicted labels {unknown} are not dataset classes {sorted(known)}")
    # all cases, classes and thresholds in one pass (the numbers of match_case, case by case)
    batch = match_cases([p.boxes for p in predictions], [p.scores for p in predictions],
                        [p.labels for p in predictions], [g.boxes for g in ground_truth],
                        [g.labels for g in ground_truth], iou_thresholds, max_detections)

    metrics: dict[str, Any] = {}
    metrics.update(compute_ap_metrics(batch, list(class_ids), iou_thresholds, ap_thresholds, iou_range,
                                      max_detections))
    metrics.update(compute_froc_metrics(batch, list(class_ids), iou_thresholds, froc_thresholds, fp_per_scan))
    metrics["num_cases"] = len(case_ids)
    metrics["num_gt"] = int(sum(len(gt.labels) for gt in ground_truth))
    metrics["num_pred"] = int(sum(len(pred.labels) for pred in predictions))
    metrics["classes"] = [int(c) for c in class_ids]
    table = _case_table(case_ids, ground_truth, predictions, batch, table_index)
    return metrics, table


def run_evaluation(
    predictions_dir: str | os.PathLike,
    converted_root: str | os.PathLike,
    case_ids: Sequence[str],
    out_json: str | os.PathLike,
    out_csv: str | os.PathLike,
    test: bool = False,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate ``{predictions_dir}/{case}.json`` for ``case_ids``; write the metrics JSON and per-case CSV.

    Both files are written atomically; a missing or malformed file stops the run with an error naming it.
    ``test``: the cases are held-out test cases (ground truth in ``labelsTs``). ``extra`` entries are added to
    the metrics JSON (e.g. the post-processing the predictions used).

    Example:
        >>> run_evaluation("results/predictions/retina_unet/scratch/demo/fold0", "results/data/converted/demo",
        ...                ["case_000"], "results/metrics/retina_unet/scratch/demo/fold0.json",
        ...                "results/metrics/retina_unet/scratch/demo/fold0_cases.csv")  # doctest: +SKIP
    """
    class_ids = read_class_ids(converted_root)
    ground_truth, predictions = [], []
    for case in tqdm(case_ids, desc="evaluation: reading cases", unit="case"):
        ground_truth.append(load_ground_truth(converted_root, case, test))
        predictions.append(load_prediction(predictions_dir, case))
    metrics, table = evaluate_cases(case_ids, ground_truth, predictions, class_ids)
    metrics.update(extra or {})
    write_json(out_json, metrics)
    with atomic_path(out_csv) as tmp:
        table.to_csv(tmp, index=False)
    return metrics
