"""Detection examples: the best and the worst validation case of each dataset's best run, as image slices with boxes.

What is chosen, and how (the report caption ``workflow/report/detection_examples.rst`` says the same):

- best run of a dataset: the (detector, initialisation) with the highest mean of the statistics metric (default
  ``AP_IoU_0.10_MaxDet_100``) over its folds in the per-run table; ties go to the first detector by name, then the
  first initialisation in the report's order (scratch first). Runs whose metric is undefined (``-1``: no ground
  truth) rank last;
- its validation cases: every ``{case}.json`` of its prediction folders (each fold predicts the cases it held out);
- score of a case: its own AP@0.1, the study's main metric computed on that case alone (the evaluation's
  matching, at most 100 detections per class, COCO-interpolated AP, mean over the classes present in the case);
  only cases with ground truth have one. Best = highest AP, worst = lowest; ties go, for the best, to the case
  whose most confident false positive scores lowest and, for the worst, to the one whose most confident false
  positive scores highest, then to the case id. The worst is chosen among the other cases, so with two or more
  cases the two differ. When no case of the run has ground truth, the cases are ranked by their highest score
  instead (best: the least confident false positive);
- slices: the axial (z) and the coronal (y) slice through the centre of the case's focus box: its largest
  ground-truth box, or its highest-scoring prediction when it has no ground truth, or the volume's centre when it
  has neither;
- boxes drawn: every ground-truth box that intersects the slice, and the ``DEFAULT_TOP_K`` highest-scoring
  predictions with score at least ``DEFAULT_MIN_SCORE`` that intersect the slice and the view, with their scores;
  a prediction matched to a ground-truth box at IoU 0.1 (a true positive) is drawn solid, any other dashed.

Geometry follows ``data.boxes`` (nnDetection's convention): a box ``(z0, y0, x0, z1, y1, x1)`` is in
converted-image voxel coordinates, voxel ``i``'s centre at ``i``, and a mask's box runs from one voxel before its
first voxel to one voxel after its last (``[first - 1, last + 1]``). So a box meets slice ``k`` when ``lo < k < hi``,
and the image is drawn with pixel ``i`` covering ``[i - 0.5, i + 0.5]``: a rectangle's corners are the box's numbers. Pixels keep
the voxel spacing's aspect ratio. The view is a square of at least ``VIEW_MIN_MM`` (and ``VIEW_CONTEXT`` times the
focus box) around the focus box, cut to the image. The intensity window spans the ``WINDOW_PERCENTILES`` of the
whole volume (per modality of channel 0). Slices are shown in array order (row 0 at the top), not reoriented.

Everything is deterministic (no random draws, stable sorts, PDF without a creation date), and both files are
written atomically.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # files only; no display on cluster nodes

import matplotlib.lines  # noqa: E402
import matplotlib.patches  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import SimpleITK as sitk  # noqa: E402

from pretrain_det3d.analysis.case_ap import CASE_AP_IOU, ap_of_cases, match_cases  # noqa: E402
from pretrain_det3d.analysis.figures import PNG_DPI, initialisation_order  # noqa: E402
from pretrain_det3d.analysis.tables import (  # noqa: E402
    MAIN_METRIC,
    RUN_COLUMNS,
    UNDEFINED_METRIC_VALUE,
    AnalysisInputError,
    require_columns,
)
from pretrain_det3d.data.boxes import box_centre_indices  # noqa: E402
from pretrain_det3d.data.errors import DatasetFormatError  # noqa: E402
from pretrain_det3d.data.io import read_image  # noqa: E402
from pretrain_det3d.evaluation.run import CaseBoxes, load_ground_truth, load_prediction, read_class_ids  # noqa: E402
from pretrain_det3d.utils.atomic import atomic_path  # noqa: E402

LOGGER = logging.getLogger(__name__)

#: Voxel ``i`` is drawn over ``[i - PIXEL_HALF, i + PIXEL_HALF]``: box coordinates put voxel centres at integers.
PIXEL_HALF = 0.5
#: At most this many predictions are drawn per slice (the highest-scoring ones), each with its score.
DEFAULT_TOP_K = 5
#: Predictions scoring below this are not drawn.
DEFAULT_MIN_SCORE = 0.1
#: Intensity window: these percentiles of the volume, by modality of channel 0 (others use ``None``'s).
WINDOW_PERCENTILES: dict[str | None, tuple[float, float]] = {"CT": (0.5, 99.5), None: (1.0, 99.0)}
#: Percentiles are computed on at most about this many voxels (a regular subsample, so still deterministic).
WINDOW_MAX_VOXELS = 2_000_000
#: The view is a square of at least this many millimetres...
VIEW_MIN_MM = 100.0
#: ... and at least this many times the focus box's largest in-plane extent, around the focus box.
VIEW_CONTEXT = 4.0
#: The two slices of a case: (name, array axis cut, (row axis, column axis)).
PLANES: tuple[tuple[str, int, tuple[int, int]], ...] = (("axial", 0, (1, 2)), ("coronal", 1, (0, 2)))
AXIS_NAMES = ("z", "y", "x")
#: Colours (Okabe-Ito): ground truth and predictions; line styles keep true and false positives apart.
GT_COLOUR = "#009E73"
PRED_COLOUR = "#E69F00"
GT_LINEWIDTH = 2.4
PRED_LINEWIDTH = 1.0
TP_LINESTYLE = "-"
FP_LINESTYLE = "--"
#: Inches per slice panel, per dataset row (panels + row title) and for the legend.
PANEL_WIDTH = 2.7
ROW_HEIGHT = 3.3
LEGEND_HEIGHT = 0.5
#: ``Rectangle.get_gid()`` of drawn boxes, so a reader of the figure object (the tests) can tell them apart.
GT_GID = "ground_truth"
PRED_GID = "prediction"


@dataclass(frozen=True)
class BestRun:
    """The run group whose cases a dataset's row shows; ``value`` is NaN when its metric is undefined."""

    dataset: str
    detector: str
    initialisation: str
    metric: str
    value: float
    folds: tuple[int, ...]


@dataclass(frozen=True)
class CaseScore:
    """Per-case ranking data: AP at IoU 0.1 (NaN without ground truth) and the scores that break ties."""

    case: str
    fold: int
    num_gt: int
    num_pred: int
    ap: float
    max_fp_score: float
    max_score: float


@dataclass(frozen=True)
class CaseChoice:
    """A chosen case: its role ("best" / "worst"), its score and the rule that chose it (for the panel title)."""

    role: str
    score: CaseScore
    rule: str  # "AP" (per-case AP@0.1) or "max score" (no case with ground truth)


@dataclass(frozen=True)
class SliceView:
    """One drawn panel: a 2D slice, its geometry, the boxes on it and notes.

    ``gt_boxes`` and ``pred_boxes`` are in-plane rectangles ``(r0, c0, r1, c1)`` (rows, columns of ``image``, in box
    coordinates: the box's own numbers); ``limits`` is ``(r0, r1, c0, c1)`` of the view.
    """

    title: str
    plane: str
    index: int
    image: np.ndarray | None
    shape: tuple[int, int]
    aspect: float
    window: tuple[float, float]
    limits: tuple[float, float, float, float]
    gt_boxes: np.ndarray
    gt_labels: tuple[str, ...]
    pred_boxes: np.ndarray
    pred_texts: tuple[str, ...]
    pred_hits: tuple[bool, ...]
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class DatasetExamples:
    """One dataset's row: its title and its panels (best case, then worst case; each axial, then coronal)."""

    dataset: str
    title: str
    views: tuple[SliceView, ...] = field(default_factory=tuple)
    note: str = ""


# ---- choosing the run and the cases ---------------------------------------------------------------------------


def best_runs(runs: pd.DataFrame, metric: str = MAIN_METRIC) -> dict[str, BestRun]:
    """The best run group per dataset (see the module docstring), from the per-run table.

    Example:
        >>> runs = pd.DataFrame({"detector": ["d"] * 4, "initialisation": ["scratch", "scratch", "mae", "mae"],
        ...                      "dataset": ["x"] * 4, "fold": [0, 1, 0, 1], "metric": ["AP"] * 4,
        ...                      "value": [0.5, 0.3, 0.6, 0.4]})
        >>> best = best_runs(runs, "AP")["x"]
        >>> best.initialisation, round(best.value, 6), best.folds
        ('mae', 0.5, (0, 1))
    """
    require_columns(runs, RUN_COLUMNS, "per-run table")
    rows = runs.loc[runs["metric"] == metric].copy()
    if rows.empty:
        known = sorted(map(str, runs["metric"].unique()))
        raise AnalysisInputError(f"per-run table: metric {metric!r} not found (metrics: {known})")
    rows = rows.astype({"detector": str, "initialisation": str, "dataset": str})
    rows["value"] = pd.to_numeric(rows["value"], errors="coerce").astype(float)
    rows.loc[np.isclose(rows["value"], UNDEFINED_METRIC_VALUE), "value"] = np.nan
    order = initialisation_order(rows["initialisation"].unique().tolist())
    result = {}
    for dataset, part in rows.groupby("dataset", sort=True):
        candidates = []
        for (detector, initialisation), group in part.groupby(["detector", "initialisation"], sort=True):
            values = group["value"].to_numpy()
            mean = float(np.nanmean(values)) if np.isfinite(values).any() else math.nan
            rank_key = (0 if math.isfinite(mean) else 1, -mean if math.isfinite(mean) else 0.0, detector,
                        order.index(initialisation))
            folds = tuple(sorted(int(f) for f in group["fold"].unique()))
            candidates.append((rank_key, BestRun(str(dataset), detector, initialisation, metric, mean, folds)))
        result[str(dataset)] = min(candidates, key=lambda item: item[0])[1]
    return result


def _prediction_cases(folder: Path) -> list[str]:
    """Case ids of a prediction folder (hidden temporaries of atomic writes are skipped)."""
    if not folder.is_dir():
        raise AnalysisInputError(f"{folder}: prediction folder not found")
    return sorted(p.name[: -len(".json")] for p in folder.glob("*.json") if not p.name.startswith("."))


def _class_hits(pred: CaseBoxes, matches: Mapping) -> tuple[np.ndarray, np.ndarray]:
    """Per prediction of ``pred`` (its own order): whether it was evaluated and whether it is a true positive."""
    evaluated = np.zeros(len(pred.scores), dtype=bool)
    hits = np.zeros(len(pred.scores), dtype=bool)
    for class_id, result in matches.items():
        indices = np.flatnonzero(pred.labels == int(class_id))[result.pred_order]
        evaluated[indices] = True
        hits[indices] = result.pred_matched[0]
    return evaluated, hits


def score_cases(ground_truth: Mapping[str, CaseBoxes], predictions: Mapping[str, CaseBoxes],
                folds: Mapping[str, int], class_ids: Sequence[int]) -> tuple[list[CaseScore], dict[str, np.ndarray]]:
    """Per-case AP@0.1 and tie-break scores, plus each case's true-positive flags (per prediction, input order).

    Example:
        >>> gt = CaseBoxes(np.array([[0, 0, 0, 4, 4, 4.]]), np.array([0]))
        >>> pred = CaseBoxes(np.array([[8, 8, 8, 9, 9, 9.], [0, 0, 0, 4, 4, 4.]]), np.array([0, 0]),
        ...                  np.array([0.9, 0.6]))
        >>> scores, hits = score_cases({"a": gt}, {"a": pred}, {"a": 0}, [0])
        >>> round(scores[0].ap, 6), scores[0].max_fp_score, hits["a"].tolist()  # a miss ranked first: precision 1/2
        (0.5, 0.9, [False, True])
    """
    matches = match_cases(ground_truth, predictions, class_ids, CASE_AP_IOU)
    scores, hit_flags = [], {}
    for case in sorted(predictions):
        pred, gt = predictions[case], ground_truth[case]
        evaluated, hits = _class_hits(pred, matches[case])
        hit_flags[case] = hits
        false_positive_scores = pred.scores[evaluated & ~hits]
        ap = ap_of_cases(matches, [case], class_ids) if len(gt.labels) else math.nan
        scores.append(CaseScore(
            case=case, fold=int(folds[case]), num_gt=int(len(gt.labels)), num_pred=int(len(pred.scores)), ap=ap,
            max_fp_score=float(false_positive_scores.max()) if len(false_positive_scores) else -math.inf,
            max_score=float(pred.scores.max()) if len(pred.scores) else -math.inf))
    return scores, hit_flags


def choose_cases(scores: Sequence[CaseScore]) -> list[CaseChoice]:
    """The best and the worst case (one entry when there is a single case; none without cases).

    Example:
        >>> s = [CaseScore("a", 0, 1, 2, 1.0, 0.2, 0.9), CaseScore("b", 0, 1, 2, 1.0, 0.1, 0.9),
        ...      CaseScore("c", 1, 2, 2, 0.25, 0.8, 0.8), CaseScore("d", 1, 0, 1, math.nan, 0.99, 0.99)]
        >>> [(c.role, c.score.case, c.rule) for c in choose_cases(s)]
        [('best', 'b', 'AP'), ('worst', 'c', 'AP')]
    """
    with_gt = [s for s in scores if s.num_gt > 0]
    if with_gt:
        rule = "AP"
        best_key = lambda s: (-s.ap, s.max_fp_score, s.case)  # noqa: E731
        worst_key = lambda s: (s.ap, -s.max_fp_score, s.case)  # noqa: E731
        pool = with_gt
    else:  # no ground truth anywhere: the case with the least (most) confident false positive
        rule = "max score"
        best_key = lambda s: (s.max_score, s.case)  # noqa: E731
        worst_key = lambda s: (-s.max_score, s.case)  # noqa: E731
        pool = list(scores)
    if not pool:
        return []
    best = min(pool, key=best_key)
    choices = [CaseChoice("best", best, rule)]
    others = [s for s in pool if s.case != best.case]
    if others:
        choices.append(CaseChoice("worst", min(others, key=worst_key), rule))
    return choices


# ---- slices, windows and boxes --------------------------------------------------------------------------------


def focus_box(gt: CaseBoxes, pred: CaseBoxes, shape: Sequence[int]) -> tuple[np.ndarray, str]:
    """The box the slices go through: the largest ground-truth box (volume; first on ties), else the
    highest-scoring prediction, else the whole volume; with a word saying which.

    Example:
        >>> gt = CaseBoxes(np.array([[0, 0, 0, 2, 2, 2.], [4, 4, 4, 9, 9, 9.]]), np.array([0, 0]))
        >>> focus_box(gt, CaseBoxes(np.zeros((0, 6)), np.zeros(0, int)), (10, 10, 10))
        (array([4., 4., 4., 9., 9., 9.]), 'largest GT box')
    """
    if len(gt.boxes):
        volumes = np.prod(gt.boxes[:, 3:] - gt.boxes[:, :3], axis=1)
        return gt.boxes[int(np.argmax(volumes))].astype(float), "largest GT box"
    if len(pred.boxes):
        return pred.boxes[int(np.argmax(pred.scores))].astype(float), "top prediction"
    return np.array([-1, -1, -1, *shape], dtype=float), "volume centre"  # the box of every voxel


def slice_index(box: np.ndarray, axis: int, size: int) -> int:
    """The slice through the centre of ``box`` along ``axis`` (a half-way centre rounds up), kept in ``[0, size)``.

    Example:
        >>> slice_index(np.array([2, 0, 0, 5, 1, 1.]), 0, 10)  # voxels 3 and 4: centre 3.5
        4
    """
    centre = float(box_centre_indices(np.asarray(box, dtype=float).reshape(1, 6))[0, axis])
    return int(np.clip(math.floor(centre + 0.5), 0, size - 1))


def boxes_on_slice(boxes: np.ndarray, axis: int, index: int) -> np.ndarray:
    """Bool mask of the boxes that meet slice ``index`` (the voxel centred at ``index``) along ``axis``.

    Example:
        >>> boxes_on_slice(np.array([[2, 0, 0, 5, 1, 1.], [4, 0, 0, 6, 1, 1.]]), 0, 4).tolist()  # voxels 3-4, 5
        [True, False]
    """
    boxes = np.asarray(boxes, dtype=float).reshape(-1, 6)
    return (boxes[:, axis] < index) & (boxes[:, axis + 3] > index)


def in_plane(boxes: np.ndarray, axes: tuple[int, int]) -> np.ndarray:
    """Rectangles ``(r0, c0, r1, c1)`` of boxes on a slice whose rows / columns are the array ``axes``."""
    boxes = np.asarray(boxes, dtype=float).reshape(-1, 6)
    row, column = axes
    return boxes[:, [row, column, row + 3, column + 3]]


def intensity_window(volume: np.ndarray, modality: str | None) -> tuple[float, float]:
    """Display window: ``WINDOW_PERCENTILES`` of the volume for the modality (others: the ``None`` entry).

    Example:
        >>> intensity_window(np.arange(1001, dtype=float), "CT")
        (5.0, 995.0)
    """
    low, high = WINDOW_PERCENTILES.get(modality, WINDOW_PERCENTILES[None])
    flat = np.asarray(volume).reshape(-1)
    step = max(1, int(math.ceil(flat.size / WINDOW_MAX_VOXELS)))
    values = flat[::step].astype(np.float64)  # subsample first: a CT volume in float64 would cost gigabytes
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(values, [low, high]))
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def view_limits(rect: np.ndarray, shape: tuple[int, int], spacing: tuple[float, float]) -> tuple[float, ...]:
    """``(r0, r1, c0, c1)`` of a square view (in mm) around ``rect``, moved and cut to stay inside the slice, whose
    pixels ``0 .. size - 1`` cover ``[-0.5, size - 0.5]``.

    Example:
        >>> view_limits(np.array([10, 10, 12, 12.]), (400, 400), (1.0, 1.0))  # 100 mm around the centre 11
        (-0.5, 99.5, -0.5, 99.5)
    """
    extent_mm = max((rect[2] - rect[0]) * spacing[0], (rect[3] - rect[1]) * spacing[1], 0.0)
    side_mm = max(VIEW_MIN_MM, VIEW_CONTEXT * extent_mm)
    limits = []
    for axis in range(2):
        size, half = float(shape[axis]), side_mm / spacing[axis] / 2.0
        if 2 * half >= size:
            limits += [-PIXEL_HALF, size - PIXEL_HALF]
            continue
        centre = (rect[axis] + rect[axis + 2]) / 2.0 + PIXEL_HALF  # in pixel-edge units, the slice spans [0, size]
        low = min(max(centre - half, 0.0), size - 2 * half)
        limits += [low - PIXEL_HALF, low + 2 * half - PIXEL_HALF]
    return tuple(limits)


def _read_volume(converted: Path, case: str) -> tuple[np.ndarray | None, tuple[float, float, float] | None, str]:
    """Channel 0 of a converted case as ``[z, y, x]`` (its own dtype) with its spacing (z, y, x); None and a note
    if the file is missing or unreadable (the figure then shows the boxes on a blank slice)."""
    path = converted / "imagesTr" / f"{case}_0000.nii.gz"
    try:
        image = read_image(path)
    except DatasetFormatError as error:
        LOGGER.warning("detection examples: %s", error)
        return None, None, f"image not readable: {path.name}"
    spacing = tuple(float(s) for s in reversed(image.GetSpacing()))
    return sitk.GetArrayFromImage(image), spacing, ""


def _label_geometry(converted: Path, case: str) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """Shape (z, y, x) and spacing of the case's label map, when its image cannot be read."""
    image = read_image(converted / "labelsTr" / f"{case}.nii.gz")
    return tuple(int(s) for s in reversed(image.GetSize())), tuple(float(s) for s in reversed(image.GetSpacing()))


def _dataset_meta(converted: Path) -> tuple[str | None, dict[int, str]]:
    """Modality of channel 0 and class names from ``dataset.json`` (read leniently: both are only labels here)."""
    try:
        data = json.loads((converted / "dataset.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None, {}
    modality = data.get("modality", {}) if isinstance(data, dict) else {}
    labels = data.get("labels", {}) if isinstance(data, dict) else {}
    names = {}
    for key, value in labels.items() if isinstance(labels, dict) else ():
        try:
            names[int(key)] = str(value)
        except ValueError:
            continue
    return (str(modality.get("0")) if isinstance(modality, dict) and "0" in modality else None), names


def class_tag(class_id: int) -> str:
    """The short class label written beside a box (the row title maps tags to class names).

    Example:
        >>> class_tag(1)
        'c1'
    """
    return f"c{class_id}"


def case_views(choice: CaseChoice, gt: CaseBoxes, pred: CaseBoxes, hits: np.ndarray, volume: np.ndarray | None,
               shape: Sequence[int], spacing: Sequence[float], window: tuple[float, float],
               class_names: Mapping[int, str], top_k: int = DEFAULT_TOP_K,
               min_score: float = DEFAULT_MIN_SCORE, image_note: str = "") -> list[SliceView]:
    """The axial and the coronal panel of a chosen case (see the module docstring for what is drawn)."""
    box, focus = focus_box(gt, pred, shape)
    many_classes = len(class_names) > 1
    score = choice.score
    if choice.rule == "AP":
        measure = f"AP@0.1 {score.ap:.2f}"
    else:
        measure = "no GT; top score " + (f"{score.max_score:.2f}" if score.num_pred else "none")
    views = []
    for plane, axis, axes in PLANES:
        index = slice_index(box, axis, int(shape[axis]))
        rows_cols = (int(shape[axes[0]]), int(shape[axes[1]]))
        plane_spacing = (float(spacing[axes[0]]), float(spacing[axes[1]]))
        limits = view_limits(in_plane(box[None], axes)[0], rows_cols, plane_spacing)
        gt_mask = boxes_on_slice(gt.boxes, axis, index)
        gt_rects = in_plane(gt.boxes[gt_mask], axes)
        gt_texts = tuple(class_tag(int(c)) if many_classes else "" for c in gt.labels[gt_mask])
        rects = in_plane(pred.boxes, axes)
        visible = (boxes_on_slice(pred.boxes, axis, index) & (pred.scores >= min_score)
                   & (rects[:, 0] < limits[1]) & (rects[:, 2] > limits[0])
                   & (rects[:, 1] < limits[3]) & (rects[:, 3] > limits[2]))
        candidates = np.flatnonzero(visible)
        chosen = candidates[np.argsort(-pred.scores[candidates], kind="mergesort")][:top_k]
        texts = tuple((f"{class_tag(int(pred.labels[i]))} " if many_classes else "") + f"{pred.scores[i]:.2f}"
                      for i in chosen)
        notes = [image_note] if image_note else []
        if not len(gt.boxes) and not len(pred.boxes):
            notes.append("no ground truth and no predictions")
        elif not len(chosen):
            notes.append(f"no prediction >= {min_score:g} here")
        image = None if volume is None else np.take(volume, index, axis=axis)
        title = (f"{choice.role}: {score.case} (fold {score.fold})\n{measure}\n"
                 f"{plane} {AXIS_NAMES[axis]}={index} through {focus}")
        views.append(SliceView(
            title=title, plane=plane, index=index, image=image, shape=rows_cols,
            aspect=plane_spacing[0] / plane_spacing[1], window=window, limits=limits, gt_boxes=gt_rects,
            gt_labels=gt_texts, pred_boxes=rects[chosen], pred_texts=texts,
            pred_hits=tuple(bool(hits[i]) for i in chosen), notes=tuple(notes)))
    return views


def dataset_examples(best: BestRun, predictions_root: str | os.PathLike, converted_root: str | os.PathLike,
                     top_k: int = DEFAULT_TOP_K, min_score: float = DEFAULT_MIN_SCORE) -> DatasetExamples:
    """Read the best run's predictions and the ground truth of ``best.dataset``, choose and slice its cases."""
    converted = Path(converted_root) / best.dataset
    run_root = Path(predictions_root) / best.detector / best.initialisation / best.dataset
    folder_of: dict[str, Path] = {}
    fold_of: dict[str, int] = {}
    for fold in best.folds:
        folder = run_root / f"fold{fold}"
        for case in _prediction_cases(folder):
            if case in folder_of:
                raise AnalysisInputError(f"{folder}: case {case!r} is also predicted in {folder_of[case]}; "
                                         "each case must be predicted by exactly one fold")
            folder_of[case], fold_of[case] = folder, fold
    modality, class_names = _dataset_meta(converted)
    metric_text = "undefined (no ground truth)" if not math.isfinite(best.value) else f"{best.value:.3f}"
    title = (f"{best.dataset}" + (f" ({modality})" if modality else "")
             + f": best run {best.detector} / {best.initialisation}, mean {best.metric} {metric_text} over "
             f"{len(best.folds)} fold(s); {len(folder_of)} validation case(s)")
    if len(class_names) > 1:
        title += "\nclasses: " + ", ".join(f"{class_tag(c)} {name}" for c, name in sorted(class_names.items()))
    if not folder_of:
        return DatasetExamples(best.dataset, title, note="no validation cases were predicted")
    ground_truth = {case: load_ground_truth(converted, case) for case in sorted(folder_of)}
    predictions = {case: load_prediction(folder_of[case], case) for case in sorted(folder_of)}
    scores, hits = score_cases(ground_truth, predictions, fold_of, read_class_ids(converted))
    views: list[SliceView] = []
    for choice in choose_cases(scores):
        case = choice.score.case
        volume, spacing, note = _read_volume(converted, case)
        if volume is None:
            shape, spacing = _label_geometry(converted, case)
            window = (0.0, 1.0)
        else:
            shape, window = volume.shape, intensity_window(volume, modality)
        views += case_views(choice, ground_truth[case], predictions[case], hits[case], volume, shape, spacing,
                            window, class_names, top_k, min_score, note)
    return DatasetExamples(best.dataset, title, views=tuple(views))


def detection_examples(runs: pd.DataFrame, predictions_root: str | os.PathLike, converted_root: str | os.PathLike,
                       metric: str = MAIN_METRIC, top_k: int = DEFAULT_TOP_K,
                       min_score: float = DEFAULT_MIN_SCORE) -> list[DatasetExamples]:
    """One ``DatasetExamples`` per dataset of the per-run table, in dataset-name order.

    Example:
        >>> rows = detection_examples(pd.read_csv("results/tables/runs.csv"), "results/predictions",
        ...                           "results/data/converted")  # doctest: +SKIP
    """
    return [dataset_examples(best, predictions_root, converted_root, top_k, min_score)
            for _, best in sorted(best_runs(runs, metric).items())]


# ---- drawing ---------------------------------------------------------------------------------------------------


def draw_view(ax: matplotlib.axes.Axes, view: SliceView) -> None:
    """Draw one panel: the slice (pixel ``i`` covering ``[i - 0.5, i + 0.5]``), the boxes as rectangles and notes."""
    rows, columns = view.shape
    extent = (-PIXEL_HALF, columns - PIXEL_HALF, rows - PIXEL_HALF, -PIXEL_HALF)
    if view.image is not None:
        ax.imshow(view.image, cmap="gray", vmin=view.window[0], vmax=view.window[1], extent=extent,
                  interpolation="nearest", aspect=view.aspect)
    else:
        ax.imshow(np.zeros((rows, columns)), cmap="gray", vmin=-1.0, vmax=1.0, extent=extent,
                  interpolation="nearest", aspect=view.aspect)  # mid grey: no image to show
    # Ground truth wide and below, predictions narrow on top: a perfect hit still shows both colours.
    for (r0, c0, r1, c1), text in zip(view.gt_boxes, view.gt_labels):
        patch = matplotlib.patches.Rectangle((c0, r0), c1 - c0, r1 - r0, fill=False, edgecolor=GT_COLOUR,
                                             linewidth=GT_LINEWIDTH, linestyle="-", gid=GT_GID, zorder=2)
        ax.add_patch(patch)
        if text:
            ax.text(c0, r1, text, color=GT_COLOUR, fontsize=6, va="top", ha="left", clip_on=True, zorder=4)
    near_top = view.limits[0] + 0.08 * (view.limits[1] - view.limits[0])
    for (r0, c0, r1, c1), text, hit in zip(view.pred_boxes, view.pred_texts, view.pred_hits):
        patch = matplotlib.patches.Rectangle((c0, r0), c1 - c0, r1 - r0, fill=False, edgecolor=PRED_COLOUR,
                                             linewidth=PRED_LINEWIDTH, linestyle=TP_LINESTYLE if hit else FP_LINESTYLE,
                                             gid=PRED_GID, zorder=3)
        ax.add_patch(patch)
        above = r0 > near_top  # the score goes above the box, or below it where the view's top edge would cut it
        ax.text(c0, r0 if above else r1, text, color=PRED_COLOUR, fontsize=6, va="bottom" if above else "top",
                ha="left", clip_on=True, zorder=4, bbox={"facecolor": "black", "alpha": 0.5, "pad": 0.5,
                                                         "linewidth": 0})
    ax.set_xlim(view.limits[2], view.limits[3])
    ax.set_ylim(view.limits[1], view.limits[0])  # row 0 at the top
    ax.set_title(view.title, fontsize=7)
    ax.set_xticks([])
    ax.set_yticks([])
    if view.notes:
        ax.text(0.02, 0.02, "\n".join(view.notes), transform=ax.transAxes, fontsize=6, color="white", va="bottom",
                ha="left", bbox={"facecolor": "black", "alpha": 0.6, "pad": 1.5, "linewidth": 0})


def examples_figure(rows: Sequence[DatasetExamples], top_k: int = DEFAULT_TOP_K,
                    min_score: float = DEFAULT_MIN_SCORE) -> matplotlib.figure.Figure:
    """The figure: one row per dataset (best case axial + coronal, worst case axial + coronal), a legend below."""
    num_columns = 2 * len(PLANES)
    height = max(1, len(rows)) * ROW_HEIGHT + LEGEND_HEIGHT
    fig = plt.figure(figsize=(num_columns * PANEL_WIDTH, height), layout="constrained")
    if not rows:
        fig.text(0.5, 0.5, "no runs in the per-run table", ha="center", va="center")
        return fig
    subfigures = fig.subfigures(len(rows), 1, squeeze=False)[:, 0]
    for subfigure, row in zip(subfigures, rows):
        subfigure.suptitle(row.title, fontsize=8)
        axes = subfigure.subplots(1, num_columns, squeeze=False)[0]
        for ax, view in zip(axes, row.views):
            draw_view(ax, view)
        for ax in axes[len(row.views):]:
            ax.set_axis_off()
            if ax is axes[len(row.views)]:
                note = row.note or ("only one validation case" if row.views else "no cases to show")
                ax.text(0.5, 0.5, note, transform=ax.transAxes, ha="center", va="center", fontsize=8)
    handles = [
        matplotlib.lines.Line2D([], [], color=GT_COLOUR, linewidth=GT_LINEWIDTH, linestyle="-"),
        matplotlib.lines.Line2D([], [], color=PRED_COLOUR, linewidth=PRED_LINEWIDTH, linestyle=TP_LINESTYLE),
        matplotlib.lines.Line2D([], [], color=PRED_COLOUR, linewidth=PRED_LINEWIDTH, linestyle=FP_LINESTYLE),
    ]
    labels = ["ground truth", f"prediction, true positive at IoU {CASE_AP_IOU:g}", "prediction, false positive"]
    fig.legend(handles, labels, loc="outside lower center", ncol=3, frameon=False, fontsize=8, title_fontsize=8,
               title=f"top {top_k} predictions with score >= {min_score:g} per slice, score written beside each")
    return fig


def save_deterministic(fig: matplotlib.figure.Figure, out_png: str | os.PathLike, out_pdf: str | os.PathLike,
                       dpi: int = PNG_DPI) -> None:
    """Save ``fig`` atomically as PNG and PDF without time stamps (same input, same bytes), then close it."""
    try:
        with atomic_path(out_png) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi, metadata={"Software": None})
        with atomic_path(out_pdf) as tmp:
            fig.savefig(tmp, format="pdf", metadata={"CreationDate": None, "ModDate": None, "Producer": None})
    finally:
        plt.close(fig)


def plot_detection_examples(rows: Sequence[DatasetExamples], out_png: str | os.PathLike,
                            out_pdf: str | os.PathLike, top_k: int = DEFAULT_TOP_K,
                            min_score: float = DEFAULT_MIN_SCORE) -> None:
    """Draw ``rows`` (``detection_examples``) into ``out_png`` and ``out_pdf``, atomically and deterministically.

    Example:
        >>> plot_detection_examples(detection_examples(runs, "results/predictions", "results/data/converted"),
        ...                         "results/figures/detection_examples.png",
        ...                         "results/figures/detection_examples.pdf")  # doctest: +SKIP
    """
    save_deterministic(examples_figure(rows, top_k, min_score), out_png, out_pdf)
