"""Case-level AP@0.1: the statistic the bootstrap recomputes on each resampled list of cases.

AP is not a mean over cases, so a bootstrap of AP has to pool the detections of the resampled cases and compute
AP again. Matching is per case, so it is done once: every case of a run group is matched at the IoU of the
statistic (``evaluation.matching.match_case``) when the data are loaded, and a resample only pools the stored
matches of its cases (``evaluation.metrics.pool_detections``) and reads COCO's interpolated AP
(``evaluation.metrics.interpolated_average_precision``), per class, then the mean over the classes with ground
truth, exactly as ``evaluation.evaluate_cases`` computes ``AP_IoU_0.10_MaxDet_100``.

A case drawn twice is two scans: its matches enter the pool twice and neither copy can match the other's ground
truth (matching never crosses cases), which is what evaluating a renamed copy of the case would give. Pooling
keeps the order of the resampled list, as ``evaluate_cases`` does, so tied scores resolve the same way.

Where the cases come from (``case_ap_data``):

- predictions ``{predictions_root}/{detector}/{initialisation}/{dataset}/fold{fold}/{case}.json`` for every run
  of the per-run table; a group's cases are pooled over its folds (each case is predicted once, by the fold
  that held it out) and all groups of a dataset must cover the same cases, or the comparisons are not paired;
- ground truth ``{converted_root}/{dataset}/labelsTr/{case}.nii.gz`` + ``.json`` and the classes of
  ``{converted_root}/{dataset}/dataset.json``, read once per dataset and shared by its groups.

A resample without any ground truth has no AP; the statistic returns NaN there (the evaluation's ``-1`` would
pull bootstrap intervals down as if it were a measured AP of -1).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from tqdm import tqdm

from pretrain_det3d.analysis.bootstrap import CaseStatistic
from pretrain_det3d.analysis.case_level import CaseLevelData
from pretrain_det3d.analysis.tables import AnalysisInputError, require_columns
from pretrain_det3d.evaluation.matching import DEFAULT_MAX_DETECTIONS, ClassMatches, match_case
from pretrain_det3d.evaluation.metrics import interpolated_average_precision, pool_detections
from pretrain_det3d.evaluation.run import (
    CaseBoxes,
    load_ground_truth,
    load_prediction,
    read_class_ids,
)

#: IoU of the study's main metric, ``AP_IoU_0.10_MaxDet_100``.
CASE_AP_IOU = 0.1
#: Matches of one case: class index -> matching result at the single IoU ``CASE_AP_IOU``.
CaseMatches = Mapping[int, ClassMatches]


def match_cases(ground_truth: Mapping[str, CaseBoxes], predictions: Mapping[str, CaseBoxes],
                class_ids: Sequence[int], iou: float = CASE_AP_IOU,
                max_detections: int = DEFAULT_MAX_DETECTIONS) -> dict[str, CaseMatches]:
    """Match every case of ``predictions`` against its ground truth at one IoU; case -> class -> matches.

    A predicted label outside ``class_ids`` is an error, as in ``evaluate_cases``.

    Example:
        >>> gt = CaseBoxes(np.array([[0, 0, 0, 4, 4, 4.]]), np.array([0]))
        >>> pred = CaseBoxes(gt.boxes, gt.labels, np.array([0.9]))
        >>> matches = match_cases({"a": gt}, {"a": pred}, [0])
        >>> matches["a"][0].pred_matched.tolist()
        [[True]]
    """
    known = {int(c) for c in class_ids}
    matches: dict[str, CaseMatches] = {}
    for case, pred in predictions.items():
        if case not in ground_truth:
            raise AnalysisInputError(f"case-level AP: case {case!r} has predictions but no ground truth")
        unknown = sorted(set(pred.labels.tolist()) - known)
        if unknown:
            raise AnalysisInputError(
                f"case-level AP: case {case!r}: predicted labels {unknown} are not dataset classes {sorted(known)}")
        gt = ground_truth[case]
        matches[case] = match_case(pred.boxes, pred.scores, pred.labels, gt.boxes, gt.labels, [iou], max_detections)
    return matches


def ap_of_cases(case_matches: Mapping[str, CaseMatches], case_ids: Sequence[str],
                class_ids: Sequence[int]) -> float:
    """AP at the matched IoU over the listed cases (repeats count as separate scans); NaN without ground truth.

    Example:
        >>> gt = CaseBoxes(np.array([[0, 0, 0, 4, 4, 4.]]), np.array([0]))
        >>> hit = CaseBoxes(gt.boxes, gt.labels, np.array([0.9]))
        >>> miss = CaseBoxes(np.array([[8, 8, 8, 9, 9, 9.]]), np.array([0]), np.array([0.95]))
        >>> matches = match_cases({"a": gt, "b": gt}, {"a": hit, "b": miss}, [0])
        >>> # "b" adds a higher-scoring miss and an object: precision 1/2 up to recall 1/2, so AP = 0.5 * 51 / 101
        >>> ap_of_cases(matches, ["a"], [0]), round(ap_of_cases(matches, ["a", "b"], [0]), 4)
        (1.0, 0.2525)
    """
    try:
        pooled = [case_matches[case] for case in case_ids]
    except KeyError as error:
        raise AnalysisInputError(f"case-level AP: unknown case {error.args[0]!r}") from None
    per_class = []
    for class_id in class_ids:
        _, hits, num_gt = pool_detections(pooled, [class_id], 0)
        if num_gt > 0:  # a class without ground truth in these cases has no AP and stays out of the mean
            per_class.append(interpolated_average_precision(hits, num_gt))
    return float(np.mean(per_class)) if per_class else float("nan")


@dataclass(frozen=True)
class PackedClass:
    """The matches of one class over all cases of a run group, as flat arrays for fast pooling.

    ``scores`` / ``hits`` ``[R]``: every case's evaluated detections one case after the other (each in matching
    order); ``starts`` / ``lengths`` / ``num_gt`` ``[n_cases]``: where a case's block starts, its size, and its
    number of ground-truth objects of the class.
    """

    scores: np.ndarray
    hits: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray
    num_gt: np.ndarray

    def average_precision(self, positions: np.ndarray) -> float | None:
        """AP over the cases at ``positions`` (repeats allowed, in that order); None without ground truth."""
        num_gt = int(self.num_gt[positions].sum())
        if num_gt == 0:
            return None
        lengths = self.lengths[positions]
        block_offsets = np.cumsum(lengths) - lengths  # where each drawn block lands in the pool
        # index of every pooled detection: its block's start plus its place inside the block
        index = np.repeat(self.starts[positions] - block_offsets, lengths) + np.arange(int(lengths.sum()))
        order = np.argsort(-self.scores[index], kind="mergesort")  # stable: ties keep the list order
        return interpolated_average_precision(self.hits[index][order], num_gt)


def pack_matches(case_matches: Mapping[str, CaseMatches], case_ids: Sequence[str],
                 class_ids: Sequence[int]) -> dict[int, PackedClass]:
    """Pack the matches of ``case_ids`` per class (see ``PackedClass``).

    Example:
        >>> gt = CaseBoxes(np.array([[0, 0, 0, 4, 4, 4.]]), np.array([0]))
        >>> packed = pack_matches(match_cases({"a": gt}, {"a": CaseBoxes(gt.boxes, gt.labels, np.array([.9]))},
        ...                                   [0]), ["a"], [0])
        >>> packed[0].average_precision(np.array([0, 0]))
        1.0
    """
    packed = {}
    for class_id in class_ids:
        scores, hits, lengths, num_gt = [], [], [], []
        for case in case_ids:
            result = case_matches[case].get(int(class_id))
            if result is None:  # class neither predicted nor present in this case: an empty block
                lengths.append(0)
                num_gt.append(0)
                continue
            scores.append(result.scores)
            hits.append(result.pred_matched[0])
            lengths.append(result.num_pred)
            num_gt.append(result.num_gt)
        lengths_array = np.asarray(lengths, dtype=np.int64)
        packed[int(class_id)] = PackedClass(
            scores=np.concatenate(scores) if scores else np.zeros(0),
            hits=np.concatenate(hits) if hits else np.zeros(0, dtype=bool),
            starts=np.cumsum(lengths_array) - lengths_array, lengths=lengths_array,
            num_gt=np.asarray(num_gt, dtype=np.int64))
    return packed


def ap_statistic(case_matches: Mapping[str, CaseMatches], class_ids: Sequence[int]) -> CaseStatistic:
    """AP over a list of case ids for one run group, as the callable ``analysis.bootstrap`` expects.

    Gives the same number as ``ap_of_cases`` (the tests check it), from arrays packed once (``pack_matches``), so
    a resample costs a few vectorised numpy calls instead of a Python loop over its cases.

    Example:
        >>> gt = CaseBoxes(np.array([[0, 0, 0, 4, 4, 4.]]), np.array([0]))
        >>> hit = CaseBoxes(gt.boxes, gt.labels, np.array([0.9]))
        >>> miss = CaseBoxes(np.array([[8, 8, 8, 9, 9, 9.]]), np.array([0]), np.array([0.95]))
        >>> statistic = ap_statistic(match_cases({"a": gt, "b": gt}, {"a": hit, "b": miss}, [0]), [0])
        >>> round(statistic(["a", "b"]), 4)
        0.2525
    """
    case_order = list(case_matches)
    position_of = {case: position for position, case in enumerate(case_order)}
    packed = pack_matches(case_matches, case_order, [int(c) for c in class_ids])

    def statistic(case_ids: Sequence[str]) -> float:
        try:
            positions = np.fromiter((position_of[case] for case in case_ids), dtype=np.int64, count=len(case_ids))
        except KeyError as error:
            raise AnalysisInputError(f"case-level AP: unknown case {error.args[0]!r}") from None
        values = [value for value in (part.average_precision(positions) for part in packed.values())
                  if value is not None]  # classes without ground truth in these cases stay out of the mean
        return float(np.mean(values)) if values else float("nan")

    return statistic


def _prediction_cases(folder: Path) -> list[str]:
    """Case ids of a prediction folder (``{case}.json``; hidden temporary files of atomic writes are skipped)."""
    if not folder.is_dir():
        raise AnalysisInputError(f"{folder}: prediction folder not found")
    return sorted(path.name[: -len(".json")] for path in folder.glob("*.json") if not path.name.startswith("."))


def case_ap_data(runs: pd.DataFrame, predictions_root: str | os.PathLike, converted_root: str | os.PathLike,
                 iou: float = CASE_AP_IOU, max_detections: int = DEFAULT_MAX_DETECTIONS) -> CaseLevelData:
    """``CaseLevelData`` whose statistic is AP at ``iou`` recomputed over any list of case ids.

    ``runs`` names the runs (columns detector, initialisation, dataset, fold; e.g. the per-run table
    ``runs.csv``; other columns and repeated rows are ignored). See the module docstring for the folders read.

    Example:
        >>> runs = pd.read_csv("results/tables/runs.csv")  # doctest: +SKIP
        >>> data = case_ap_data(runs, "results/predictions", "results/data/converted")  # doctest: +SKIP
        >>> data.statistic_for("retina_unet", "demo", "mae")(data.cases_of("demo"))  # doctest: +SKIP
        0.42
    """
    require_columns(runs, ("detector", "initialisation", "dataset", "fold"), "per-run table")
    predictions_root, converted_root = Path(predictions_root), Path(converted_root)
    keys = runs[["detector", "initialisation", "dataset", "fold"]].drop_duplicates()
    folders: dict[tuple[str, str, str], dict[str, Path]] = {}  # group -> case -> prediction folder
    for detector, initialisation, dataset, fold in keys.itertuples(index=False):
        group = (str(detector), str(dataset), str(initialisation))
        folder = predictions_root / str(detector) / str(initialisation) / str(dataset) / f"fold{int(fold)}"
        cases = folders.setdefault(group, {})
        for case in _prediction_cases(folder):
            if case in cases:
                raise AnalysisInputError(f"{folder}: case {case!r} is also predicted in {cases[case]}; "
                                         "each case must be predicted by exactly one fold")
            cases[case] = folder
    if not folders:
        raise AnalysisInputError("per-run table: no runs, so no case-level data")

    case_ids: dict[str, list[str]] = {}
    first_group: dict[str, Path] = {}
    for (detector, dataset, initialisation), cases in sorted(folders.items()):
        listed = sorted(cases)
        here = predictions_root / detector / initialisation / dataset
        reference = case_ids.setdefault(dataset, listed)
        first_group.setdefault(dataset, here)
        if listed != reference:
            difference = sorted(set(listed) ^ set(reference))
            raise AnalysisInputError(
                f"{here}: predicts other cases than {first_group[dataset]}, so the comparisons would not be paired "
                f"(differing: {difference[:5]}{' ...' if len(difference) > 5 else ''})")
        if not listed:
            raise AnalysisInputError(f"{predictions_root / detector / initialisation / dataset}: no predicted cases")

    statistics: dict[tuple[str, str, str], CaseStatistic] = {}
    for dataset, cases in tqdm(sorted(case_ids.items()), desc="case-level AP: datasets", unit="dataset"):
        dataset_root = converted_root / dataset
        class_ids = read_class_ids(dataset_root)
        ground_truth = {case: load_ground_truth(dataset_root, case) for case in cases}
        for group, folder_of in sorted(folders.items()):
            if group[1] != dataset:
                continue
            predictions = {case: load_prediction(folder_of[case], case) for case in cases}
            matches = match_cases(ground_truth, predictions, class_ids, iou, max_detections)
            statistics[group] = ap_statistic(matches, class_ids)

    def statistic_for(detector: str, dataset: str, initialisation: str) -> CaseStatistic:
        key = (detector, dataset, initialisation)
        if key not in statistics:
            raise AnalysisInputError(f"case-level AP: no predictions for {detector}/{initialisation}/{dataset}")
        return statistics[key]

    return CaseLevelData(case_ids=case_ids, statistic_for=statistic_for)
