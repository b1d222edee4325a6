"""Anchor shapes per head level, planned as nnDetection's release plans them, from the training boxes' sizes
(``plan.json`` ``"box_sizes"``, ``[dz, dy, dx]`` in preprocessed voxels).

The rule follows nnDetection's box planner (``nndet/planning/architecture/boxes/c002.py`` ``BoxC002``, which
inherits ``_plan_anchors``' helpers ``find_anchors`` and ``filter_boxes`` from ``boxes/base.py`` ``BoxC001``),
its anchor generator (``nndet/core/boxes/anchors.py``: ``AnchorGenerator3D``, the width/height/depth generator
that older versions call ``AnchorGenerator3DS``, and ``compute_anchors_for_strides``) and
``scale_with_abs_strides`` (``nndet/planning/architecture/boxes/utils.py``):

1. Outliers are dropped: a box is kept only if each of its three sides lies strictly between the 0.5th and
   the 99.5th percentile of that side over all boxes (numpy's linear percentiles; strict, as the release).
2. Every level has ``k**3`` anchors per location (``anchors_per_level``; the release: ``k = 3``, 27): all
   products of ``k`` sizes along each axis. One set of ``3 x k`` integer *base sizes* (at least 1 voxel) is
   planned for the whole head; level ``l`` uses them times ``stride_l / stride_0`` (per axis), so the finest
   head level carries the base sizes themselves and each coarser one doubles them (ResEnc-L, strides 4-32:
   x1, x2, x4, x8; the release derives these factors from the pooling strides of the head levels).
3. The base sizes maximise the mean, over the kept boxes, of each box's best IoU with any anchor of any
   level, box and anchor both centred at the origin (so the IoU depends on the sides only:
   ``prod(min(b, a)) / (prod(b) + prod(a) - prod(min(b, a)))``).
4. The search is deterministic; the release instead runs nevergrad's stochastic ``TwoPointsDE`` (integer
   parameters >= 1, initialised at ``4, 8, 16``, 5000 evaluations, three runs). Here the candidates are the
   integers ``1 .. ceil(largest side)`` of each axis (a larger size never scores higher: its anchors already
   contain every box along that axis). A local search runs from three starts (the release's ``4, 8, 16``,
   per-axis quantiles of the sides, a geometric spread from the smallest to the largest side): it sets one
   size at a time to its best candidate, and tries joint changes of two sizes by up to two each, until
   neither improves. A best-first branch and bound over sorted sizes then proves that end point optimal
   among all candidates or replaces it by a better one; its bound gives each box its best anchor sides within
   the current size ranges (IoU along one axis peaks where the anchor side equals the box side, whatever the
   other sides). It stops at ``work_budget`` (nodes times unique box sizes plus a per-node overhead) and
   then keeps the best point found; :class:`AnchorPlan` says whether the optimum was proven. Ties keep the
   earlier, smaller sizes.
5. If the filter of step 1 leaves no box (too few boxes, or all equal on an axis), all boxes are used;
   without any training box, the base sizes are the release planner's initial ``4, 8, 16`` per axis
   (``BoxC002.get_anchor_init``; generally ``4 * 2**i``). The release plans nothing without boxes.

Shapes are ``[dz, dy, dx]`` along the array axes (z, y, x), ordered as the release's product
(axis 0 slowest); the detector hands them to MONAI's ``AnchorGeneratorWithAnchorShape``.

Example:
    >>> plan_anchor_shapes([[2, 2, 2], [4, 4, 4]], strides=[1, 2], anchors_per_level=1, outlier_percentiles=None)
    [[[2.0, 2.0, 2.0]], [[4.0, 4.0, 4.0]]]
"""

from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from pretrain_det3d.settings.detectors import RetinaUNetSettings

#: Anchors per location of every level (``k**3``: all products of ``k`` sizes per axis).
DEFAULT_ANCHORS_PER_LEVEL = RetinaUNetSettings.default("anchors_per_level")
#: Outlier filter of the release (``BoxC001.filter_boxes``): keep sides strictly inside these percentiles.
DEFAULT_OUTLIER_PERCENTILES = (0.5, 99.5)
#: First base size of the release planner's initialisation (``BoxC002.get_anchor_init``: 4, 8, 16).
INITIAL_BASE_SIZE = 4
#: Smallest base size (the release bounds its integer parameters below by 1).
MIN_BASE_SIZE = 1
#: Candidate values scored at once in one line search (bounds memory: chunk x unique boxes x anchors).
_CHUNK = 64
#: A change must raise the mean best IoU by more than this to count (guards against float noise cycles).
_IMPROVEMENT = 1e-12
#: Local search: joint changes of two base sizes try every step up to this far on each.
_PAIR_WINDOW = 2
#: Exhaustive stage: branch-and-bound nodes times (unique box sizes + _NODE_OVERHEAD), about 1-3 s of numpy.
DEFAULT_WORK_BUDGET = 5e5
#: A node's fixed cost (Python and numpy calls) in units of one box's bound computation.
_NODE_OVERHEAD = 50


@dataclass(frozen=True)
class AnchorPlan:
    """The planned anchors: ``base_sizes[axis]`` (``k`` integers each), ``level_scales[level][axis]``,
    ``shapes[level]`` (``k**3`` shapes ``[dz, dy, dx]``), the objective reached, whether it is proven the best
    of all candidate base sizes, and how many boxes it was taken over."""

    base_sizes: list[list[int]]
    level_scales: list[list[float]]
    shapes: list[list[list[float]]]
    mean_best_iou: float | None
    optimal: bool
    num_boxes: int


def sizes_per_axis(anchors_per_level: int) -> int:
    """``k`` for ``anchors_per_level == k**3``; a clear error for any other count.

    Example:
        >>> sizes_per_axis(27), sizes_per_axis(1)
        (3, 1)
    """
    if isinstance(anchors_per_level, bool) or not isinstance(anchors_per_level, (int, np.integer)):
        raise ValueError(f"anchors_per_level must be an integer cube (1, 8, 27, ...), got {anchors_per_level!r}")
    k = round(int(anchors_per_level) ** (1.0 / 3.0)) if anchors_per_level > 0 else 0
    if k < 1 or k**3 != anchors_per_level:
        raise ValueError(
            f"anchors_per_level must be a cube k**3 (k sizes per axis, all their products; the release: 27), "
            f"got {anchors_per_level}"
        )
    return k


def level_scales(strides: Sequence[int | Sequence[int]]) -> np.ndarray:
    """Per-level, per-axis factors ``stride_l / stride_0`` (``[L, 3]``); strides may be ints or triples.

    Example:
        >>> level_scales([4, 8, 16, 32])[:, 0].tolist()
        [1.0, 2.0, 4.0, 8.0]
    """
    if len(strides) == 0:
        raise ValueError("strides must name at least one head level, got []")
    try:
        per_axis = np.asarray([[s] * 3 if np.ndim(s) == 0 else list(s) for s in strides], dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"strides must be numbers or [z, y, x] triples, got {list(strides)}") from error
    if per_axis.ndim != 2 or per_axis.shape[1] != 3 or not np.all(np.isfinite(per_axis)) or np.any(per_axis <= 0):
        raise ValueError(f"strides must be positive numbers or [z, y, x] triples, got {list(strides)}")
    if np.any(np.diff(per_axis, axis=0) < 0):
        raise ValueError(f"strides must be sorted from fine to coarse, got {list(strides)}")
    return per_axis / per_axis[0]


def _as_sizes(box_sizes: Sequence[Sequence[float]]) -> np.ndarray:
    sizes = np.asarray(box_sizes, dtype=np.float64) if len(box_sizes) else np.zeros((0, 3))
    if sizes.ndim != 2 or sizes.shape[1] != 3:
        raise ValueError(f"box_sizes must be a list of [dz, dy, dx] triples, got an array of shape {sizes.shape}")
    if not np.all(np.isfinite(sizes)) or np.any(sizes <= 0):
        bad = np.flatnonzero(~np.all(np.isfinite(sizes) & (sizes > 0), axis=1))
        raise ValueError(f"box_sizes must be positive finite [dz, dy, dx] triples; box {int(bad[0])} is "
                         f"{sizes[bad[0]].tolist()}")
    return sizes


def filter_box_sizes(
    box_sizes: Sequence[Sequence[float]], percentiles: tuple[float, float] = DEFAULT_OUTLIER_PERCENTILES
) -> np.ndarray:
    """The boxes whose every side lies strictly between the ``percentiles`` of that side (rule step 1).

    Example:
        >>> filter_box_sizes([[1, 5, 5], [2, 5, 5], [3, 5, 6], [4, 5, 5], [5, 5, 5]], (10, 90)).tolist()
        []
        >>> filter_box_sizes([[1, 5, 4], [2, 6, 5], [3, 7, 6], [4, 8, 7], [5, 9, 8]], (10, 90)).tolist()
        [[2.0, 6.0, 5.0], [3.0, 7.0, 6.0], [4.0, 8.0, 7.0]]
    """
    sizes = _as_sizes(box_sizes)
    low, high = percentiles
    if not 0 <= low < high <= 100:
        raise ValueError(f"outlier percentiles must satisfy 0 <= low < high <= 100, got {percentiles}")
    if len(sizes) == 0:
        return sizes
    lower = np.percentile(sizes, low, axis=0)
    upper = np.percentile(sizes, high, axis=0)
    return sizes[np.all((sizes > lower) & (sizes < upper), axis=1)]


def candidate_base_sizes(box_sizes: Sequence[Sequence[float]]) -> list[list[int]]:
    """Per axis, the integer base sizes the search considers: ``1 .. ceil(largest side on that axis)``.

    Example:
        >>> [c[-1] for c in candidate_base_sizes([[2, 3.5, 1], [4, 1, 1]])]
        [4, 4, 1]
    """
    sizes = _as_sizes(box_sizes)
    if len(sizes) == 0:
        raise ValueError("candidate_base_sizes needs at least one box")
    return [list(range(MIN_BASE_SIZE, max(MIN_BASE_SIZE, math.ceil(m)) + 1)) for m in sizes.max(axis=0)]


def anchor_shapes_from_base(base_sizes: Sequence[Sequence[float]], scales: np.ndarray) -> np.ndarray:
    """``[L, k**3, 3]`` shapes: per level, all products of the per-axis base sizes times that level's scales."""
    grid = np.asarray(list(itertools.product(*base_sizes)), dtype=np.float64)  # [k**3, 3], axis 0 slowest
    return grid[None, :, :] * scales[:, None, :]


def _iou_centred(boxes: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """IoU ``[..., N, A]`` of origin-centred boxes ``[N, 3]`` and anchors ``[..., A, 3]`` (sides only)."""
    inter = np.prod(np.minimum(boxes[:, None, :], anchors[..., None, :, :]), axis=-1)
    return inter / (np.prod(boxes, axis=1)[:, None] + np.prod(anchors, axis=-1)[..., None, :] - inter)


def mean_best_iou(
    box_sizes: Sequence[Sequence[float]], shapes: Sequence[Sequence[Sequence[float]]],
    weights: Sequence[float] | None = None,
) -> float:
    """The objective: mean over boxes of the best IoU with any anchor shape of any level (both centred).

    Example:
        >>> mean_best_iou([[2, 2, 2], [4, 4, 4]], [[[2, 2, 2]], [[2, 2, 4]]])  # best IoUs 1 and 16 / 64
        0.625
    """
    sizes = _as_sizes(box_sizes)
    anchors = np.asarray(shapes, dtype=np.float64).reshape(-1, 3)
    best = _iou_centred(sizes, anchors).max(axis=1)
    w = np.full(len(sizes), 1.0 / len(sizes)) if weights is None else np.asarray(weights, dtype=np.float64)
    return float(np.sum(w * best))


class _Objective:
    """Mean best IoU over the unique box sizes (weighted by their counts) for base sizes ``[3, k]``."""

    def __init__(self, sizes: np.ndarray, scales: np.ndarray, k: int) -> None:
        unique, counts = np.unique(sizes, axis=0, return_counts=True)
        self.boxes, self.weights = unique, counts / counts.sum()
        self.scales, self.k = scales, k
        self.volumes = np.prod(unique, axis=1)

    def values(self, bases: np.ndarray) -> np.ndarray:
        """The objective of each of ``T`` base-size sets ``[T, 3, k]``."""
        shapes = np.stack([anchor_shapes_from_base(b, self.scales).reshape(-1, 3) for b in bases])  # [T, A, 3]
        return _iou_centred(self.boxes, shapes).max(axis=-1) @ self.weights

    def line_search(self, base: np.ndarray, axis: int, index: int, candidates: np.ndarray) -> np.ndarray:
        """The objective for every candidate value of ``base[axis, index]``, the other sizes held fixed."""
        k, scales = self.k, self.scales
        others = [a for a in range(3) if a != axis]
        kept = [i for i in range(k) if i != index]  # anchors without the varied size: their best IoU is fixed
        if kept:
            fixed_base = [base[a] if a != axis else base[a][kept] for a in range(3)]
            fixed = anchor_shapes_from_base(fixed_base, scales).reshape(-1, 3)
            best_fixed = _iou_centred(self.boxes, fixed).max(axis=1)
        else:
            best_fixed = np.zeros(len(self.boxes))
        # anchors with it: per level, every pair of sizes on the other two axes
        pairs = np.asarray(list(itertools.product(base[others[0]], base[others[1]])), dtype=np.float64)  # [P, 2]
        other_sides = pairs[None, :, :] * scales[:, None, others]  # [L, P, 2]
        other_inter = np.prod(np.minimum(self.boxes[:, None, None, others], other_sides[None]), axis=-1)  # [U, L, P]
        other_volume = np.prod(other_sides, axis=-1)  # [L, P]
        result = np.empty(len(candidates))
        for start in range(0, len(candidates), _CHUNK):
            side = candidates[start:start + _CHUNK, None] * scales[None, :, axis]  # [C, L]
            inter = other_inter[None] * np.minimum(self.boxes[None, :, axis, None], side[:, None, :])[..., None]
            union = self.volumes[None, :, None, None] + (other_volume[None] * side[..., None])[:, None] - inter
            best = np.maximum((inter / union).max(axis=(2, 3)), best_fixed[None])  # [C, U]
            result[start:start + _CHUNK] = best @ self.weights
        return result

    def upper_bound(self, low: np.ndarray, high: np.ndarray) -> float:
        """The largest objective of any base sizes within ``low .. high`` (``[3, k]`` each), or above it.

        Along one axis a box's IoU with an anchor rises while the anchor side is below the box side and falls
        after, whatever the other sides; so each box's best anchor side within an interval is the box side
        clipped to it, on every axis at once. Letting each box pick its own sides bounds the objective above;
        for single values it is the objective itself.
        """
        box = self.boxes[:, None, :, None]  # [U, 1, 3, 1]
        side = np.clip(box, low[None, None] * self.scales[None, :, :, None], high[None, None] * self.scales[None, :, :, None])
        inter1 = np.minimum(side, box)  # [U, L, 3, k]
        inter = inter1[:, :, 0, :, None, None] * inter1[:, :, 1, None, :, None] * inter1[:, :, 2, None, None, :]
        volume = side[:, :, 0, :, None, None] * side[:, :, 1, None, :, None] * side[:, :, 2, None, None, :]
        iou = inter / (self.volumes[:, None, None, None, None] + volume - inter)
        return float(iou.reshape(len(self.boxes), -1).max(axis=1) @ self.weights)


def _local_search(objective: _Objective, base: np.ndarray, candidates: list[np.ndarray]) -> tuple[np.ndarray, float]:
    """Single-size line searches until none improves, then joint changes of two sizes by up to
    ``_PAIR_WINDOW`` each; repeated until neither improves the objective."""
    base = base.copy()
    current = float(objective.values(base[None])[0])
    k = objective.k
    params = [(axis, index) for axis in range(3) for index in range(k)]
    steps = [(dp, dq) for dp in range(-_PAIR_WINDOW, _PAIR_WINDOW + 1)
             for dq in range(-_PAIR_WINDOW, _PAIR_WINDOW + 1) if dp or dq]
    while True:
        improved = True
        while improved:
            improved = False
            for axis, index in params:
                scores = objective.line_search(base, axis, index, candidates[axis])
                best = int(np.argmax(scores))  # first maximum: the smallest best value
                if scores[best] > current + _IMPROVEMENT:
                    base[axis, index], current, improved = candidates[axis][best], float(scores[best]), True
        moved = False
        for (pa, pi), (qa, qi) in itertools.combinations(params, 2):
            trials = []
            for dp, dq in steps:
                vp, vq = base[pa, pi] + dp, base[qa, qi] + dq
                if candidates[pa][0] <= vp <= candidates[pa][-1] and candidates[qa][0] <= vq <= candidates[qa][-1]:
                    trial = base.copy()
                    trial[pa, pi], trial[qa, qi] = vp, vq
                    trials.append(trial)
            if not trials:
                continue
            scores = objective.values(np.stack(trials))
            best = int(np.argmax(scores))
            if scores[best] > current + _IMPROVEMENT:
                base, current, moved = trials[best], float(scores[best]), True
        if not moved:
            return base, current


def _tighten(low: np.ndarray, high: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bounds of sizes kept sorted along each axis (``v_0 <= v_1 <= ...``, which loses no solution)."""
    return np.maximum.accumulate(low, axis=1), np.minimum.accumulate(high[:, ::-1], axis=1)[:, ::-1]


def _branch_and_bound(
    objective: _Objective, upper: np.ndarray, incumbent: np.ndarray, incumbent_value: float, node_budget: int
) -> tuple[np.ndarray, float, bool]:
    """Best-first branch and bound over sorted integer base sizes in ``1 .. upper[axis]``, starting from the
    incumbent; returns the best sizes, their objective and whether all of the space was settled in budget."""
    best, best_value = np.sort(incumbent, axis=1), incumbent_value
    low, high = _tighten(np.full((3, objective.k), float(MIN_BASE_SIZE)), np.repeat(upper[:, None], objective.k, 1))
    heap = [(-objective.upper_bound(low, high), 0, low, high)]
    pushed = 1
    for _ in range(node_budget):
        if not heap or -heap[0][0] <= best_value + _IMPROVEMENT:
            return best, best_value, True
        bound, _, low, high = heapq.heappop(heap)
        width = high - low
        if width.max() == 0:  # a single point: its bound is its objective
            best, best_value = low, -bound
            continue
        axis, index = np.unravel_index(int(np.argmax(width)), width.shape)  # split the widest range in two
        middle = np.floor((low[axis, index] + high[axis, index]) / 2)
        for part_low, part_high in ((low[axis, index], middle), (middle + 1, high[axis, index])):
            child_low, child_high = low.copy(), high.copy()
            child_low[axis, index], child_high[axis, index] = part_low, part_high
            child_low, child_high = _tighten(child_low, child_high)
            if np.any(child_low > child_high):
                continue
            child_bound = objective.upper_bound(child_low, child_high)
            if child_bound > best_value + _IMPROVEMENT:
                heapq.heappush(heap, (-child_bound, pushed, child_low, child_high))
                pushed += 1
    settled = not heap or -heap[0][0] <= best_value + _IMPROVEMENT
    return best, best_value, settled


def _starts(sizes: np.ndarray, k: int, upper: np.ndarray) -> list[np.ndarray]:
    """Local-search starts: the release's initial sizes, per-axis quantiles, a geometric min-to-max spread."""
    release = np.tile(INITIAL_BASE_SIZE * 2.0 ** np.arange(k), (3, 1))
    quantiles = np.quantile(sizes, (np.arange(k) + 0.5) / k, axis=0).T
    spread = np.stack([np.geomspace(lo, hi, k) for lo, hi in zip(sizes.min(axis=0), sizes.max(axis=0))])
    return [np.clip(np.rint(s), MIN_BASE_SIZE, upper[:, None]) for s in (release, quantiles, spread)]


def plan_anchors(
    box_sizes: Sequence[Sequence[float]],
    strides: Sequence[int | Sequence[int]],
    anchors_per_level: int = DEFAULT_ANCHORS_PER_LEVEL,
    outlier_percentiles: tuple[float, float] | None = DEFAULT_OUTLIER_PERCENTILES,
    work_budget: float = DEFAULT_WORK_BUDGET,
) -> AnchorPlan:
    """Plan the anchors by the module's rule; an :class:`AnchorPlan` with the base sizes, shapes and objective.

    ``outlier_percentiles=None`` skips the outlier filter (step 1). ``work_budget`` bounds the exhaustive
    stage (branch-and-bound nodes times unique box sizes plus an overhead); 0 keeps only the local search.

    Example:
        >>> plan = plan_anchors([], strides=[4, 8], anchors_per_level=8)
        >>> plan.base_sizes, plan.shapes[1][-1], plan.mean_best_iou
        ([[4, 8], [4, 8], [4, 8]], [16.0, 16.0, 16.0], None)
    """
    k = sizes_per_axis(anchors_per_level)
    scales = level_scales(strides)
    sizes = _as_sizes(box_sizes)
    if len(sizes) == 0:
        base, value, optimal = np.tile(INITIAL_BASE_SIZE * 2.0 ** np.arange(k), (3, 1)), None, False
    else:
        if outlier_percentiles is not None:
            kept = filter_box_sizes(sizes, outlier_percentiles)
            sizes = kept if len(kept) else sizes
        candidates = [np.asarray(c, dtype=np.float64) for c in candidate_base_sizes(sizes)]
        upper = np.asarray([c[-1] for c in candidates])
        objective = _Objective(sizes, scales, k)
        base, value = None, -1.0
        for start in _starts(sizes, k, upper):
            end, end_value = _local_search(objective, start, candidates)
            if end_value > value + _IMPROVEMENT:
                base, value = end, end_value
        node_budget = int(work_budget // (len(objective.boxes) + _NODE_OVERHEAD))
        base, value, optimal = _branch_and_bound(objective, upper, base, value, node_budget)
        base = np.sort(base, axis=1)
    shapes = anchor_shapes_from_base(base, scales)
    return AnchorPlan(
        base_sizes=[[int(v) for v in axis] for axis in base],
        level_scales=scales.tolist(),
        shapes=[[[float(v) for v in shape] for shape in level] for level in shapes],
        mean_best_iou=value,
        optimal=optimal,
        num_boxes=len(sizes),
    )


def plan_anchor_shapes(
    box_sizes: Sequence[Sequence[float]],
    strides: Sequence[int | Sequence[int]],
    anchors_per_level: int = DEFAULT_ANCHORS_PER_LEVEL,
    outlier_percentiles: tuple[float, float] | None = DEFAULT_OUTLIER_PERCENTILES,
    work_budget: float = DEFAULT_WORK_BUDGET,
) -> list[list[list[float]]]:
    """For each level (in the order of ``strides``), ``anchors_per_level`` shapes ``[dz, dy, dx]`` (JSON-able).

    See the module docstring for the rule and :func:`plan_anchors` for the plan with its objective.

    Example:
        >>> shapes = plan_anchor_shapes([], strides=[4, 8, 16, 32])
        >>> [len(level) for level in shapes], shapes[0][0], shapes[3][-1]
        ([27, 27, 27, 27], [4.0, 4.0, 4.0], [128.0, 128.0, 128.0])
    """
    return plan_anchors(box_sizes, strides, anchors_per_level, outlier_percentiles, work_budget).shapes
