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
IoUs are MONAI's ``box_iou`` numbers (standard mode ``(z0, y0, x0, z1, y1, x1)``, volumes ``prod(max - min)``
without a ``+ 1`` term as nnDetection's ``box_iou_np``, float32 arithmetic), computed by :func:`pretrain_det3d.data.boxes.pairwise_box_iou` in numpy so that evaluation jobs
do not pay for importing torch and MONAI.

Two implementations give the same numbers: ``greedy_match`` / ``match_class`` follow the rule literally, one
class of one case and one threshold at a time; :func:`match_cases` (behind ``match_case`` and
``evaluate_cases``) matches all cases, classes and thresholds together (IoUs of same-class pairs only, via
:func:`paired_box_iou`, bit-identical to ``pairwise_box_iou``; one greedy step per prediction rank for all
groups and thresholds). tests/test_evaluation_batch.py holds them to each other and to a plain reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from pretrain_det3d.data.boxes import IOU_COMPUTE_DTYPE, IOU_EPSILON, pairwise_box_iou

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

    The same numbers as ``match_class`` per class (it runs :func:`match_cases` on this one case).

    Example:
        >>> gt = np.array([[0, 0, 0, 4, 4, 4.]])
        >>> out = match_case(gt, np.array([0.5]), np.array([1]), gt, np.array([0]), [0.1])
        >>> sorted(out), out[0].num_gt, out[1].num_pred  # class 1 predicted but absent: a false positive
        ([0, 1], 1, 1)
    """
    batch = match_cases([pred_boxes], [pred_scores], [pred_labels], [gt_boxes], [gt_labels], iou_thresholds,
                        max_detections)
    return batch.case_matches()[0]


# ---------------------------------------------------------------------------------------------- many cases at once
#: Upper bound on the elements of one padded [groups, thresholds, predictions, ground truth] block of the
#: batched greedy matching; groups of similar size share a block, so one large case does not pad all others.
MATCH_BLOCK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class BatchMatches:
    """Matching result of many cases as flat arrays (``match_cases``); what ``evaluate_cases`` reads metrics from.

    A group is one (case, class) pair present in the predictions or the ground truth of that case. Detections
    (the evaluated predictions, at most ``max_detections`` per group) are ordered by case, class, then score
    (highest first, ties in input order): the order in which ``metrics.pool_detections`` concatenates
    ``ClassMatches``. Ground-truth boxes are ordered by case, class, then input order.

    Attributes:
        num_cases: number of cases (scans), including cases without any box.
        group_case, group_class: int ``[K]`` the groups, sorted by case then class.
        det_case, det_class: int ``[R]``; det_score: float ``[R]``.
        det_index: int ``[R]`` index of each detection among its case's predictions of its class (input order).
        det_matched: bool ``[T, R]`` true positive at IoU threshold ``t``.
        gt_case, gt_class: int ``[Q]``; gt_matched: bool ``[T, Q]`` found at threshold ``t``.
    """

    num_cases: int
    group_case: np.ndarray
    group_class: np.ndarray
    det_case: np.ndarray
    det_class: np.ndarray
    det_score: np.ndarray
    det_index: np.ndarray
    det_matched: np.ndarray
    gt_case: np.ndarray
    gt_class: np.ndarray
    gt_matched: np.ndarray

    def case_matches(self) -> list[dict[int, ClassMatches]]:
        """The same result as one ``match_case`` dictionary per case (classes in ascending order)."""
        out: list[dict[int, ClassMatches]] = [{} for _ in range(self.num_cases)]
        det_bounds = _group_bounds(self.group_case, self.group_class, self.det_case, self.det_class)
        gt_bounds = _group_bounds(self.group_case, self.group_class, self.gt_case, self.gt_class)
        for k, (case, class_id) in enumerate(zip(self.group_case.tolist(), self.group_class.tolist())):
            d0, d1 = det_bounds[:, k]
            g0, g1 = gt_bounds[:, k]
            out[case][int(class_id)] = ClassMatches(
                scores=self.det_score[d0:d1].copy(), pred_matched=self.det_matched[:, d0:d1].copy(),
                gt_matched=self.gt_matched[:, g0:g1].copy(), pred_order=self.det_index[d0:d1].copy())
        return out

    @classmethod
    def from_case_matches(
        cls, case_matches: Sequence[Mapping[int, ClassMatches]], num_thresholds: int
    ) -> "BatchMatches":
        """Flatten ``match_case`` dictionaries (classes in their dictionary order, as ``pool_detections`` reads them)."""
        group_case, group_class, parts = [], [], []
        for case, matches in enumerate(case_matches):
            for class_id, result in matches.items():
                group_case.append(case)
                group_class.append(int(class_id))
                parts.append(result)

        def cat(values: list[np.ndarray], dtype: type, rows: int | None = None) -> np.ndarray:
            if values:
                return np.concatenate(values, axis=-1).astype(dtype, copy=False)
            return np.zeros((0,) if rows is None else (rows, 0), dtype=dtype)

        det_counts = np.asarray([r.num_pred for r in parts], dtype=np.int64)
        gt_counts = np.asarray([r.num_gt for r in parts], dtype=np.int64)
        return cls(
            num_cases=len(case_matches),
            group_case=np.asarray(group_case, dtype=np.int64), group_class=np.asarray(group_class, dtype=np.int64),
            det_case=np.repeat(np.asarray(group_case, dtype=np.int64), det_counts),
            det_class=np.repeat(np.asarray(group_class, dtype=np.int64), det_counts),
            det_score=cat([r.scores for r in parts], np.float64),
            det_index=cat([r.pred_order for r in parts], np.int64),
            det_matched=cat([r.pred_matched for r in parts], bool, num_thresholds),
            gt_case=np.repeat(np.asarray(group_case, dtype=np.int64), gt_counts),
            gt_class=np.repeat(np.asarray(group_class, dtype=np.int64), gt_counts),
            gt_matched=cat([r.gt_matched for r in parts], bool, num_thresholds),
        )


def _group_bounds(group_case: np.ndarray, group_class: np.ndarray, case: np.ndarray, label: np.ndarray) -> np.ndarray:
    """``[2, K]`` start and end of each group's rows in arrays sorted by (case, class)."""
    if len(group_case) == 0:
        return np.zeros((2, 0), dtype=np.int64)
    keys = _pair_keys(np.r_[group_case, case], np.r_[group_class, label])
    group_keys, row_keys = keys[: len(group_case)], keys[len(group_case):]
    return np.stack([np.searchsorted(row_keys, group_keys, "left"), np.searchsorted(row_keys, group_keys, "right")])


def _pair_keys(cases: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Integer keys of (case, label) pairs in lexicographic order (equal pairs, equal keys)."""
    if len(cases) == 0:
        return np.zeros(0, dtype=np.int64)
    low, high = int(labels.min()), int(labels.max())
    span = high - low + 1
    if (int(cases.max()) + 1) * span < 2**62:
        return cases * span + (labels - low)
    order = np.lexsort((labels, cases))  # labels too far apart for one int64: rank the pairs instead
    new = np.r_[True, (np.diff(cases[order]) != 0) | (np.diff(labels[order]) != 0)]
    keys = np.empty(len(cases), dtype=np.int64)
    keys[order] = np.cumsum(new) - 1
    return keys


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + c)`` for each start and count."""
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.cumsum(counts) - counts
    return np.repeat(np.asarray(starts, dtype=np.int64) - offsets, counts) + np.arange(total, dtype=np.int64)


def _positions_in_groups(group_of_row: np.ndarray) -> np.ndarray:
    """Position of each row within its run of equal (sorted) group ids."""
    if len(group_of_row) == 0:
        return np.zeros(0, dtype=np.int64)
    new = np.r_[True, group_of_row[1:] != group_of_row[:-1]]
    starts = np.flatnonzero(new)
    return np.arange(len(group_of_row)) - starts[np.cumsum(new) - 1]


def paired_box_iou(boxes1: np.ndarray, boxes2: np.ndarray) -> np.ndarray:
    """IoU of ``boxes1[i]`` with ``boxes2[i]`` for every row ``i`` (both ``[P, 6]``); float64 ``[P]``.

    The very same float32 arithmetic, in the same order, as ``data.boxes.pairwise_box_iou``, so each value is
    bit-identical to the corresponding entry of its matrix (tests/test_evaluation_batch.py checks this); only the
    pairs that are needed are computed.

    Example:
        >>> paired_box_iou(np.array([[0, 0, 0, 2, 2, 2.]]), np.array([[0, 0, 0, 2, 2, 1.]]))
        array([0.5])
    """
    a = np.asarray(boxes1, dtype=IOU_COMPUTE_DTYPE).reshape(-1, 6)
    b = np.asarray(boxes2, dtype=IOU_COMPUTE_DTYPE).reshape(-1, 6)
    area_a = np.prod(a[:, 3:] - a[:, :3], axis=1)
    area_b = np.prod(b[:, 3:] - b[:, :3], axis=1)
    low = np.maximum(a[:, :3], b[:, :3])
    high = np.minimum(a[:, 3:], b[:, 3:])
    intersection = np.prod(np.clip(high - low, 0, None), axis=1)
    union = area_a + area_b - intersection
    iou = intersection / (union + IOU_EPSILON)
    if not np.isfinite(iou).all():
        raise ValueError("box IoU is not finite: are some boxes NaN or infinite?")
    return iou.astype(np.float64)


def greedy_match_padded(ious: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """``greedy_match`` for many IoU matrices and thresholds at once.

    ``ious`` float ``[K, D, G]`` (rows in descending score order; padding ``-inf``), ``thresholds`` ``[T]``
    (already capped). Returns int ``[K, T, D]``: the matched column per prediction, ``-1`` where unmatched.
    The loop runs over the ``D`` prediction ranks only; each step decides all groups and thresholds together.

    Example:
        >>> greedy_match_padded(np.array([[[0.6, 0.8], [0.9, 0.05]]]), np.array([0.5, 0.85])).tolist()
        [[[1, 0], [-1, 0]]]
    """
    num_groups, num_pred, num_gt = ious.shape
    thresholds = np.asarray(thresholds, dtype=np.float64)[None, :, None]
    assignment = np.full((num_groups, len(thresholds[0]), num_pred), -1, dtype=np.int64)
    taken = np.zeros((num_groups, len(thresholds[0]), num_gt), dtype=bool)
    for rank in range(num_pred):
        row = ious[:, rank, None, :]  # [K, 1, G]
        candidates = (row >= thresholds) & ~taken  # [K, T, G]
        found = candidates.any(axis=2)
        if not found.any():
            continue
        masked = np.where(candidates, row, -np.inf)
        # ties go to the highest column, as in greedy_match
        best = num_gt - 1 - np.argmax(masked[:, :, ::-1], axis=2)
        group, threshold = np.nonzero(found)
        columns = best[group, threshold]
        taken[group, threshold, columns] = True
        assignment[group, threshold, rank] = columns
    return assignment


def _plan_blocks(groups: np.ndarray, rows: np.ndarray, columns: np.ndarray, num_thresholds: int) -> list[list[int]]:
    """Split ``groups`` into blocks, smallest ground truth first, each padded to its largest ``rows`` x
    ``columns`` within ``MATCH_BLOCK_ELEMENTS`` (a single larger group makes a block of its own)."""
    blocks: list[list[int]] = []
    block: list[int] = []
    max_rows = max_columns = 0
    for group in groups[np.argsort(columns[groups], kind="stable")].tolist():
        new_rows, new_columns = max(max_rows, int(rows[group])), max(max_columns, int(columns[group]))
        if block and (len(block) + 1) * new_rows * new_columns * num_thresholds > MATCH_BLOCK_ELEMENTS:
            blocks.append(block)
            block, new_rows, new_columns = [], int(rows[group]), int(columns[group])
        block.append(group)
        max_rows, max_columns = new_rows, new_columns
    if block:
        blocks.append(block)
    return blocks


def match_cases(
    pred_boxes: Sequence[np.ndarray],
    pred_scores: Sequence[np.ndarray],
    pred_labels: Sequence[np.ndarray],
    gt_boxes: Sequence[np.ndarray],
    gt_labels: Sequence[np.ndarray],
    iou_thresholds: Sequence[float],
    max_detections: int = DEFAULT_MAX_DETECTIONS,
) -> BatchMatches:
    """Match many cases (one entry per case in each list) at every IoU threshold; ``match_case``'s numbers.

    All cases and classes are sorted together once; IoUs are computed once per (prediction, ground truth) pair of
    the same case and class, for all thresholds; predictions whose best IoU is below every threshold cannot
    match and are left out of the greedy loop, which then runs once per prediction rank for all groups and
    thresholds together.

    Example:
        >>> gt = np.array([[0, 0, 0, 4, 4, 4.]])
        >>> m = match_cases([gt, gt[:0]], [[0.9], []], [[0], []], [gt, gt], [[0], [0]], [0.1, 0.5])
        >>> m.det_matched.tolist(), m.gt_matched.tolist()  # case 1 has no prediction: its object is missed
        ([[True], [True]], [[True, False], [True, False]])
    """
    num_cases = len(pred_boxes)
    if not (len(pred_scores) == len(pred_labels) == len(gt_boxes) == len(gt_labels) == num_cases):
        raise ValueError("pred_boxes, pred_scores, pred_labels, gt_boxes and gt_labels need one entry per case")
    pb_list, ps_list, pl_list, gb_list, gl_list = [], [], [], [], []
    for case in range(num_cases):
        pb = _as_boxes(pred_boxes[case], "pred_boxes")
        gb = _as_boxes(gt_boxes[case], "gt_boxes")
        ps = np.asarray(pred_scores[case], dtype=np.float64).reshape(-1)
        pl = np.asarray(pred_labels[case]).reshape(-1).astype(np.int64)
        gl = np.asarray(gt_labels[case]).reshape(-1).astype(np.int64)
        if not (len(pb) == len(ps) == len(pl)):
            raise ValueError(
                f"predictions disagree in length: {len(pb)} boxes, {len(ps)} scores, {len(pl)} labels"
            )
        if len(gb) != len(gl):
            raise ValueError(f"{len(gb)} ground-truth boxes but {len(gl)} labels")
        pb_list.append(pb), ps_list.append(ps), pl_list.append(pl), gb_list.append(gb), gl_list.append(gl)

    def cat(parts: list[np.ndarray], empty: np.ndarray) -> np.ndarray:
        return np.concatenate(parts) if parts else empty

    all_pb, all_gb = cat(pb_list, np.zeros((0, 6))), cat(gb_list, np.zeros((0, 6)))
    all_ps = cat(ps_list, np.zeros(0))
    all_pl, all_gl = cat(pl_list, np.zeros(0, dtype=np.int64)), cat(gl_list, np.zeros(0, dtype=np.int64))
    cases = np.arange(num_cases, dtype=np.int64)
    all_pc = np.repeat(cases, [len(x) for x in pl_list]) if num_cases else np.zeros(0, dtype=np.int64)
    all_gc = np.repeat(cases, [len(x) for x in gl_list]) if num_cases else np.zeros(0, dtype=np.int64)
    keys = _pair_keys(np.r_[all_pc, all_gc], np.r_[all_pl, all_gl])
    pred_keys, gt_keys = keys[: len(all_pc)], keys[len(all_pc):]
    _, first = np.unique(keys, return_index=True)
    group_case, group_class = np.r_[all_pc, all_gc][first], np.r_[all_pl, all_gl][first]

    # predictions: by case, class, descending score; a stable sort keeps equal scores in input order (as the
    # per-class mergesort of match_class does); then the first max_detections of each group
    order = np.lexsort((-all_ps, all_pl, all_pc))
    rank = _positions_in_groups(pred_keys[order])
    selected = order[rank < max_detections]
    within_class = np.empty(len(order), dtype=np.int64)  # index among the case's predictions of its class
    by_group = np.lexsort((all_pl, all_pc))
    within_class[by_group] = _positions_in_groups(pred_keys[by_group])
    det_keys, det_boxes = pred_keys[selected], all_pb[selected]
    gt_order = np.lexsort((all_gl, all_gc))
    gt_keys_sorted, gt_boxes_sorted = gt_keys[gt_order], all_gb[gt_order]

    thresholds = np.minimum(np.asarray(iou_thresholds, dtype=np.float64).reshape(-1), MAX_EFFECTIVE_IOU_THRESHOLD)
    num_thresholds = len(thresholds)
    det_matched = np.zeros((num_thresholds, len(selected)), dtype=bool)
    gt_matched = np.zeros((num_thresholds, len(gt_order)), dtype=bool)

    # groups with predictions and ground truth: every (prediction, ground truth) pair, prediction-major
    det_groups, det_start, det_count = np.unique(det_keys, return_index=True, return_counts=True)
    gt_groups, gt_start, gt_count = np.unique(gt_keys_sorted, return_index=True, return_counts=True)
    _, di, gi = np.intersect1d(det_groups, gt_groups, assume_unique=True, return_indices=True)
    if num_thresholds and len(di):
        d_start, d_count, g_start, g_count = det_start[di], det_count[di], gt_start[gi], gt_count[gi]
        det_rows = _ranges(d_start, d_count)  # detections that have ground truth of their class
        row_group = np.repeat(np.arange(len(di)), d_count)
        row_gt = g_count[row_group]
        pair_det = np.repeat(det_rows, row_gt)
        pair_gt = _ranges(g_start[row_group], row_gt)
        ious = paired_box_iou(det_boxes[pair_det], gt_boxes_sorted[pair_gt])
        row_pair_start = np.cumsum(row_gt) - row_gt
        # a prediction whose best IoU is below every threshold matches nothing and takes nothing
        active = np.maximum.reduceat(ious, row_pair_start) >= thresholds.min()
        act_rows, act_group, act_pair_start = det_rows[active], row_group[active], row_pair_start[active]
        act_pos = _positions_in_groups(act_group)
        act_gt = row_gt[active]
        group_active = np.bincount(act_group, minlength=len(di))
        blocks = _plan_blocks(np.unique(act_group), group_active, g_count, num_thresholds)
        slot_of_group = np.full(len(di), -1, dtype=np.int64)
        for block in blocks:
            block_groups = np.asarray(block, dtype=np.int64)
            slot_of_group[:] = -1
            slot_of_group[block_groups] = np.arange(len(block_groups))
            members = np.flatnonzero(slot_of_group[act_group] >= 0)
            slots, positions, widths = slot_of_group[act_group[members]], act_pos[members], act_gt[members]
            padded = np.full((len(block_groups), int(group_active[block_groups].max()),
                              int(g_count[block_groups].max())), -np.inf)
            padded[np.repeat(slots, widths), np.repeat(positions, widths), _ranges(np.zeros_like(widths), widths)] = \
                ious[_ranges(act_pair_start[members], widths)]
            assignment = greedy_match_padded(padded, thresholds)[slots, :, positions]  # [members, T]
            hit = assignment >= 0
            det_matched[:, act_rows[members]] = hit.T
            member, threshold = np.nonzero(hit)
            gt_matched[threshold, g_start[act_group[members[member]]] + assignment[member, threshold]] = True

    return BatchMatches(
        num_cases=num_cases, group_case=group_case, group_class=group_class,
        det_case=all_pc[selected], det_class=all_pl[selected], det_score=all_ps[selected],
        det_index=within_class[selected], det_matched=det_matched,
        gt_case=all_gc[gt_order], gt_class=all_gl[gt_order], gt_matched=gt_matched,
    )
