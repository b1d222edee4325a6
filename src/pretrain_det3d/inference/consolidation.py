"""Consolidation of tile predictions into one set of boxes per case, the way nnDetection's ``BoxEnsemblerSelective``
works (read in MIC-DKFZ/nnDetection ``nndet/inference/ensembler/detection.py`` and ``nndet/inference/detection/``;
this is an independent implementation).

Terms: a *source* is one pass over the whole case: one model with one mirroring of the input (8 per model with
mirror test-time augmentation, times the number of models when folds are ensembled). Every source covers the case
with tiles, and every tile gives boxes in the image's voxel coordinates (MONAI standard mode, z-y-x).

1. **Tile weights** (:func:`tile_weights`). A box whose centre lies near its tile's centre sees its whole context;
   one near the tile's border does not. Each box gets the weight
   ``w = 1 - max(0, d / d_max - 0.5)``, with ``d`` the distance of the box centre from the tile centre and
   ``d_max`` the distance from the tile centre to a corner: 1 on the inner half of that distance, falling
   linearly to 0.5 at the tile's corner.
2. **Per source** (:func:`consolidate_source`): the ``candidates`` best boxes by score; those with score above
   ``score_threshold``; clipped to the image; boxes with a side shorter than ``min_size`` removed; class-wise NMS
   at ``nms_iou`` that ranks the boxes by score times tile weight (:func:`class_wise_nms`, so of two tiles
   seeing the same object the more central view survives), keeping the scores themselves; at most
   ``candidates`` boxes.
3. **Across sources** (:func:`fuse_sources`): the ``candidates`` best boxes of all sources together are fused by
   weighted box clustering (:func:`weighted_box_clustering`) at ``wbc_iou``, every box expecting one partner
   from each source; clusters scoring above ``wbc_score_threshold`` are kept, best first.

Weighted box clustering (WBC), per class: the best remaining box opens a cluster, and every remaining box whose
IoU with it exceeds the threshold joins it (the opener itself, IoU 1, included). With ``iou_i`` the member's IoU
with the opener, ``w_i`` its weight (1 after the per-source step, as in nnDetection) and ``s_i`` its score,
the match weight is ``m_i = iou_i * w_i``, and

- score ``= sum(m_i * s_i) / (sum(m_i) + n_missing * mean(m_i))``, where ``n_missing = max(0, n_expected -
  n_found)``: a cluster seen by fewer sources than expected is damped as if the missing sources had voted 0
  with the cluster's mean match weight;
- box ``= sum(m_i * s_i * box_i) / sum(m_i * s_i)``, the coordinates averaged with weights match x score.

The members leave the pool and the next best remaining box opens the next cluster.

Example:
    >>> boxes = np.array([[0, 0, 0, 10, 10, 10], [1, 0, 0, 11, 10, 10.]])
    >>> fused = weighted_box_clustering(boxes, np.array([0.9, 0.6]), np.zeros(2, int), np.ones(2), 2, 0.5)
    >>> np.round(fused[1], 3).tolist()  # (0.9 + 0.6 * 9/11) / (1 + 9/11)
    [0.765]
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from pretrain_det3d.data.boxes import pairwise_box_iou

#: share of the centre-to-corner distance over which a box keeps the full weight 1 (nnDetection's
#: ``plateau_length`` in ``BoxEnsemblerSelective._get_box_in_tile_weight``); the weight then falls linearly
#: to ``1 - (1 - TILE_WEIGHT_PLATEAU) = 0.5`` at the corner
TILE_WEIGHT_PLATEAU = 0.5
#: WBC's damping of clusters that fewer sources found than expected (nnDetection's ``missing_weight``, 1)
WBC_MISSING_WEIGHT = 1.0


def box_centres(boxes: np.ndarray) -> np.ndarray:
    """Centres ``[N, 3]`` of standard-mode boxes ``[N, 6]``."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 6)
    return (boxes[:, :3] + boxes[:, 3:]) / 2.0


def tile_weights(
    centres: np.ndarray, tile_size: Sequence[float], tile_centre: Sequence[float] | None = None
) -> np.ndarray:
    """Weights ``[N]`` of boxes whose centres ``[N, 3]`` are given in tile coordinates (see the module docstring).

    ``tile_centre`` defaults to ``tile_size / 2``; the distance to a corner is ``|tile_size / 2|``.

    Example:
        >>> tile_weights(np.array([[8., 8, 8], [0, 0, 0], [2, 2, 2]]), [16, 16, 16]).round(6).tolist()
        [1.0, 0.5, 0.75]
    """
    size = np.asarray(tile_size, dtype=np.float64)
    centre = size / 2.0 if tile_centre is None else np.asarray(tile_centre, dtype=np.float64)
    centres = np.asarray(centres, dtype=np.float64).reshape(-1, 3)
    ratio = np.linalg.norm(centres - centre[None], axis=1) / np.linalg.norm(size / 2.0)
    return np.clip(1.0 - np.clip(ratio - TILE_WEIGHT_PLATEAU, 0.0, None), 0.0, None)


def large_enough(boxes: np.ndarray, min_size: float) -> np.ndarray:
    """Mask ``[N]`` of the boxes whose every side is at least ``min_size`` (nnDetection's ``remove_small_boxes``).

    Example:
        >>> large_enough(np.array([[0, 0, 0, 1, 1, 1.], [0, 0, 0, 1, 0.005, 1]]), 0.01).tolist()
        [True, False]
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 6)
    return np.all(boxes[:, 3:] - boxes[:, :3] >= min_size, axis=1)


def _greedy_nms(iou: np.ndarray, order: np.ndarray, iou_threshold: float) -> list[int]:
    """Indices (into ``order``'s index space) kept by greedy NMS over ``order`` (best first)."""
    suppressed = np.zeros(len(iou), dtype=bool)
    keep = []
    for index in order:
        if suppressed[index]:
            continue
        keep.append(int(index))
        suppressed |= iou[index] > iou_threshold
    return keep


def class_wise_nms(
    boxes: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
    iou_threshold: float,
    weights: np.ndarray | None = None,
) -> np.ndarray:
    """Greedy NMS per class, ranked by ``scores * weights`` (plain scores without weights).

    A box is suppressed by a better-ranked kept box of its class with IoU above ``iou_threshold`` (the IoU is
    computed as MONAI's ``box_iou``). Returns the kept indices, best rank first (ties keep the input order).

    Example:
        >>> b = np.array([[0, 0, 0, 4, 4, 4], [0, 0, 0, 4, 4, 3], [8, 8, 8, 9, 9, 9.]])
        >>> class_wise_nms(b, np.array([0.5, 0.9, 0.1]), np.zeros(3, int), 0.1).tolist()
        [1, 2]
        >>> class_wise_nms(b, np.array([0.5, 0.9, 0.1]), np.zeros(3, int), 0.1, np.array([1, 0.5, 1])).tolist()
        [0, 2]
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 6)
    rank = np.asarray(scores, dtype=np.float64).reshape(-1)
    if weights is not None:
        rank = rank * np.asarray(weights, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    keep: list[int] = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        iou = pairwise_box_iou(boxes[members], boxes[members])
        order = np.argsort(-rank[members], kind="stable")
        keep.extend(members[_greedy_nms(iou, order, iou_threshold)].tolist())
    keep_array = np.asarray(keep, dtype=np.int64)
    return keep_array[np.argsort(-rank[keep_array], kind="stable")]


def weighted_box_clustering(
    boxes: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
    weights: np.ndarray,
    n_expected: float | np.ndarray,
    iou_threshold: float,
    score_threshold: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fuse boxes per class by weighted box clustering (see the module docstring for the formulas).

    ``n_expected`` is the number of predictions expected per object (the number of sources), a scalar or one
    value per box (a cluster uses its members' mean). Returns ``(boxes [M, 6], scores [M], labels [M])`` of
    the clusters scoring above ``score_threshold``, best score first.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 6)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    weights = np.asarray(weights, dtype=np.float64).reshape(-1)
    expected = np.broadcast_to(np.asarray(n_expected, dtype=np.float64), scores.shape)
    out_boxes, out_scores, out_labels = [], [], []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        b, s, w, e = boxes[members], scores[members], weights[members], expected[members]
        iou = pairwise_box_iou(b, b).astype(np.float64)
        pool = np.argsort(-s, kind="stable")  # indices into this class's members, best first
        while len(pool):
            overlap = iou[pool[0], pool]
            joins = overlap > iou_threshold
            joins[0] = True  # the opener always belongs to its cluster (even a degenerate box)
            cluster = pool[joins]
            match = overlap[joins] * w[cluster]
            match[0] = w[cluster[0]]  # the opener's IoU with itself is 1
            voted = match * s[cluster]
            n_missing = max(0.0, float(e[cluster].mean()) - len(cluster))
            denominator = match.sum() + n_missing * match.mean() * WBC_MISSING_WEIGHT
            score = voted.sum() / denominator if denominator > 0 else 0.0
            if voted.sum() > 0:
                box = (b[cluster] * voted[:, None]).sum(axis=0) / voted.sum()
            else:  # no score to weight with: keep the opener's box
                box = b[cluster[0]]
            if score > score_threshold:
                out_boxes.append(box)
                out_scores.append(score)
                out_labels.append(label)
            pool = pool[~joins]
    if not out_scores:
        return np.zeros((0, 6)), np.zeros(0), np.zeros(0, dtype=labels.dtype if len(labels) else np.int64)
    order = np.argsort(-np.asarray(out_scores), kind="stable")
    return np.asarray(out_boxes)[order], np.asarray(out_scores)[order], np.asarray(out_labels)[order]


def _top(count: int, scores: np.ndarray) -> np.ndarray:
    """Indices of the ``count`` best scores, best first (stable for ties)."""
    return np.argsort(-scores, kind="stable")[:count]


def consolidate_source(
    boxes: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
    weights: np.ndarray,
    image_shape: Sequence[int],
    *,
    candidates: int,
    score_threshold: float,
    min_size: float,
    nms_iou: float,
    weighted_nms: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One source's tile boxes (image coordinates, tile weights) -> its boxes over the whole case.

    Steps as nnDetection's per-model post-processing: best ``candidates`` by score, ``score > score_threshold``,
    clip to ``image_shape``, drop boxes with a side below ``min_size``, class-wise NMS at ``nms_iou`` ranked by
    score x weight (by score alone with ``weighted_nms`` off), at most ``candidates`` kept. Returns
    ``(boxes, scores, labels)`` ordered by rank; the scores are the boxes' own.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 6)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    weights = np.asarray(weights, dtype=np.float64).reshape(-1)
    index = _top(candidates, scores)
    index = index[scores[index] > score_threshold]
    clipped = boxes[index].copy()
    upper = np.asarray(image_shape, dtype=np.float64)
    clipped[:, :3] = np.clip(clipped[:, :3], 0.0, upper)
    clipped[:, 3:] = np.clip(clipped[:, 3:], 0.0, upper)
    big = large_enough(clipped, min_size)
    index, clipped = index[big], clipped[big]
    keep = class_wise_nms(clipped, scores[index], labels[index], nms_iou, weights[index] if weighted_nms else None)
    keep = keep[:candidates]
    return clipped[keep], scores[index][keep], labels[index][keep]


def fuse_sources(
    sources: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
    *,
    candidates: int,
    wbc_iou: float,
    wbc_score_threshold: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fuse the per-source results ``[(boxes, scores, labels), ...]`` by WBC (the ``candidates`` best boxes of all
    sources together, weight 1 each, ``len(sources)`` predictions expected per object); best score first."""
    if not sources:
        return np.zeros((0, 6)), np.zeros(0), np.zeros(0, dtype=np.int64)
    boxes = np.concatenate([np.asarray(s[0], dtype=np.float64).reshape(-1, 6) for s in sources])
    scores = np.concatenate([np.asarray(s[1], dtype=np.float64).reshape(-1) for s in sources])
    labels = np.concatenate([np.asarray(s[2]).reshape(-1) for s in sources]).astype(np.int64)
    index = _top(candidates, scores)
    return weighted_box_clustering(
        boxes[index], scores[index], labels[index], np.ones(len(index)), len(sources), wbc_iou, wbc_score_threshold
    )


#: the consolidation parameters of :func:`consolidate_sources`, i.e. the ``InferenceSettings`` fields it reads
CONSOLIDATION_KEYS = (
    "candidates", "score_threshold", "min_box_size", "nms_iou", "weighted_nms", "wbc_iou", "wbc_score_threshold",
    "max_detections",
)


def top_candidates(
    boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, weights: np.ndarray, candidates: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The ``candidates`` best-scoring boxes of one source, best first (stable for ties), as float64/int64 arrays.

    :func:`consolidate_source` starts with the same selection, so consolidating the result gives exactly what
    consolidating the full source gives, for every parameter but a larger ``candidates``: this is what a
    prediction keeps for re-consolidation (``inference.postprocessing``).
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 6)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    index = _top(candidates, scores)
    return (boxes[index], scores[index], np.asarray(labels).reshape(-1).astype(np.int64)[index],
            np.asarray(weights, dtype=np.float64).reshape(-1)[index])


def consolidate_sources(
    sources: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
    image_shape: Sequence[int],
    *,
    candidates: int,
    score_threshold: float,
    min_box_size: float,
    nms_iou: float,
    weighted_nms: bool,
    wbc_iou: float,
    wbc_score_threshold: float,
    max_detections: int,
) -> dict[str, np.ndarray]:
    """All sources of one case ``[(boxes, scores, labels, tile weights), ...]`` (image coordinates) -> the case's
    boxes: :func:`consolidate_source` per source, :func:`fuse_sources` across them, the best ``max_detections``.

    A pure function of its arguments: ``predict_case`` ends with it, and a re-consolidation of stored sources
    with other parameters (the post-processing sweep) calls it again. Returns ``boxes [N, 6]`` (float64),
    ``scores [N]`` (float64), ``labels [N]`` (int64), best score first.
    """
    per_source = [
        consolidate_source(
            boxes, scores, labels, weights, image_shape, candidates=int(candidates),
            score_threshold=float(score_threshold), min_size=float(min_box_size), nms_iou=float(nms_iou),
            weighted_nms=bool(weighted_nms),
        )
        for boxes, scores, labels, weights in sources
    ]
    boxes, scores, labels = fuse_sources(
        per_source, candidates=int(candidates), wbc_iou=float(wbc_iou), wbc_score_threshold=float(wbc_score_threshold)
    )
    count = int(max_detections)
    return {
        "boxes": boxes[:count].astype(np.float64).reshape(-1, 6),
        "scores": scores[:count].astype(np.float64),
        "labels": labels[:count].astype(np.int64),
    }
