"""Tests for inference.consolidation: tile weights, minimum size, (weighted) NMS and weighted box clustering,
against values worked out by hand in the comments and against MONAI's NMS."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data.box_utils import batched_nms

from pretrain_det3d.inference.consolidation import (
    class_wise_nms,
    consolidate_source,
    fuse_sources,
    large_enough,
    tile_weights,
    weighted_box_clustering,
)

# A and B overlap along z by 9 of their 10 (11 - 1) voxels: intersection 9 * 10 * 10 = 900, union 1000 + 1000 - 900
# = 1100, IoU 9/11 = 0.8182. C lies far away (IoU 0 with both).
A = [0.0, 0.0, 0.0, 10.0, 10.0, 10.0]
B = [1.0, 0.0, 0.0, 11.0, 10.0, 10.0]
C = [20.0, 20.0, 20.0, 30.0, 30.0, 30.0]


def test_wbc_hand_worked_clusters() -> None:
    boxes = np.array([A, B, C])
    scores = np.array([0.9, 0.6, 0.5])
    fused_boxes, fused_scores, labels = weighted_box_clustering(
        boxes, scores, np.zeros(3, dtype=int), np.ones(3), n_expected=2, iou_threshold=0.5
    )
    # Cluster 1, opened by A (best score); B joins (IoU 9/11 > 0.5). Match weights m = IoU x weight = [1, 9/11];
    # m x s = [0.9, 0.6 * 9/11 = 5.4/11]. Two found, two expected: nothing missing.
    #   score = (0.9 + 5.4/11) / (1 + 9/11) = (15.3/11) / (20/11) = 15.3/20 = 0.765
    #   z_min = (0 * 0.9 + 1 * 5.4/11) / (15.3/11) = 5.4/15.3 = 0.352941...
    #   z_max = (10 * 0.9 + 11 * 5.4/11) / (15.3/11) = (99/11 + 59.4/11) / (15.3/11) = 158.4/15.3 = 10.352941...
    #   y and x: A and B agree (0 and 10).
    # Cluster 2: C alone, two expected, one found: n_missing 1, so the denominator is 1 + 1 * mean(m) = 2:
    #   score = 0.5 / 2 = 0.25, box = C.
    np.testing.assert_allclose(fused_scores, [0.765, 0.25], atol=1e-6)
    np.testing.assert_allclose(fused_boxes[0], [5.4 / 15.3, 0, 0, 158.4 / 15.3, 10, 10], atol=1e-6)
    np.testing.assert_allclose(fused_boxes[1], C, atol=1e-9)
    assert labels.tolist() == [0, 0]


def test_wbc_hand_worked_with_weights() -> None:
    boxes = np.array([A, B])
    # weights [0.5, 1]: m = [0.5 * 1, 1 * 9/11] = [5.5/11, 9/11]; m x s = [0.45 = 4.95/11, 5.4/11]
    #   score = (4.95 + 5.4) / (5.5 + 9) = 10.35 / 14.5 = 0.713793...
    #   z_min = (0 * 4.95 + 1 * 5.4) / 10.35 = 0.521739...; z_max = (10 * 4.95 + 11 * 5.4) / 10.35 = 108.9 / 10.35
    fused_boxes, fused_scores, _ = weighted_box_clustering(
        boxes, np.array([0.9, 0.6]), np.zeros(2, dtype=int), np.array([0.5, 1.0]), n_expected=1, iou_threshold=0.5
    )
    np.testing.assert_allclose(fused_scores, [10.35 / 14.5], atol=1e-6)
    np.testing.assert_allclose(fused_boxes[0], [5.4 / 10.35, 0, 0, 108.9 / 10.35, 10, 10], atol=1e-6)


def test_wbc_missing_predictions_damp_the_score() -> None:
    # one box where eight sources were expected: 0.8 / (1 + 7 * 1) = 0.1
    _, scores, _ = weighted_box_clustering(np.array([A]), np.array([0.8]), np.zeros(1, int), np.ones(1), 8, 0.5)
    np.testing.assert_allclose(scores, [0.1], atol=1e-12)
    # and the score threshold is strict: 0.1 is not above 0.1
    _, kept, _ = weighted_box_clustering(np.array([A]), np.array([0.8]), np.zeros(1, int), np.ones(1), 8, 0.5, 0.1)
    assert len(kept) == 0


def test_wbc_joins_only_above_the_iou_threshold_and_within_a_class() -> None:
    # [0,0,0,2,1,1] (volume 2) contains [0,0,0,1,1,1] (volume 1): IoU exactly 1/2
    boxes = np.array([[0.0, 0, 0, 2, 1, 1], [0.0, 0, 0, 1, 1, 1]])
    scores = np.array([0.9, 0.6])
    same = np.zeros(2, dtype=int)
    assert len(weighted_box_clustering(boxes, scores, same, np.ones(2), 1, 0.5)[1]) == 2  # 0.5 is not above 0.5
    assert len(weighted_box_clustering(boxes, scores, same, np.ones(2), 1, 0.49)[1]) == 1
    _, fused_scores, labels = weighted_box_clustering(boxes, scores, np.array([3, 1]), np.ones(2), 1, 0.1)
    assert sorted(labels.tolist()) == [1, 3]  # other classes never join
    np.testing.assert_allclose(np.sort(fused_scores), [0.6, 0.9])


def test_tile_weights_hand_worked() -> None:
    # tile 16^3, centre (8, 8, 8), centre-to-corner distance |(8, 8, 8)| = 13.856
    centres = np.array([
        [8.0, 8.0, 8.0],  # the centre: 1
        [0.0, 0.0, 0.0],  # a corner: ratio 1 -> 1 - (1 - 0.5) = 0.5
        [16.0, 0.0, 16.0],  # another corner: 0.5
        [2.0, 2.0, 2.0],  # 3/4 of the way to the corner: 1 - (0.75 - 0.5) = 0.75
        [8.0, 8.0, 14.0],  # 6 / 13.856 = 0.433 < 0.5, on the plateau: 1
        [8.0, 8.0, 0.0],  # 8 / 13.856 = 0.57735: 1 - 0.07735 = 0.92265
    ])
    np.testing.assert_allclose(tile_weights(centres, [16, 16, 16]), [1, 0.5, 0.5, 0.75, 1, 1 - (8 / 192**0.5 - 0.5)])
    # a tile centre given explicitly (the fixed point of a mirroring convention)
    np.testing.assert_allclose(tile_weights(np.array([[7.5, 7.5, 7.5]]), [16, 16, 16], [7.5, 7.5, 7.5]), [1.0])


def test_large_enough_checks_every_side() -> None:
    boxes = np.array([[0, 0, 0, 1, 1, 1], [0, 0, 0, 0.009, 5, 5], [0, 0, 0, 5, 5, 0.01], [2, 2, 2, 2, 3, 3]], float)
    assert large_enough(boxes, 0.01).tolist() == [True, False, True, False]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_class_wise_nms_matches_monai_ranked_by_score_times_weight(seed: int) -> None:
    rng = np.random.default_rng(seed)
    lower = rng.uniform(0, 20, size=(60, 3))
    boxes = np.concatenate([lower, lower + rng.uniform(2, 8, size=(60, 3))], axis=1)
    scores, weights = rng.uniform(size=60), rng.uniform(0.5, 1.0, size=60)
    labels = rng.integers(0, 3, size=60)
    for threshold in (0.1, 0.3, 0.6):
        ours = class_wise_nms(boxes, scores, labels, threshold, weights)
        reference = batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores * weights),
                                torch.from_numpy(labels), threshold)
        assert ours.tolist() == reference.tolist()
        plain = class_wise_nms(boxes, scores, labels, threshold)
        reference = batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(labels), threshold)
        assert plain.tolist() == reference.tolist()


def test_consolidate_source_threshold_clip_min_size_nms_and_candidates() -> None:
    boxes = np.array([
        [2.0, 2, 2, 6, 6, 6],  # 0.9: kept
        [2.0, 2, 2, 6, 6, 5],  # 0.8: IoU 0.75 with the first -> suppressed at NMS 0.1
        [10.0, 10, 10, 14, 14, 25],  # 0.7: clipped to x max 20, kept
        [18.0, 2, 2, 21, 6, 6],  # 0.6: clipped to z in [18, 20], kept
        [25.0, 2, 2, 28, 6, 6],  # 0.5: entirely outside: clipped to zero extent -> removed as too small
        [2.0, 12, 2, 6, 12.005, 6],  # 0.4: a side of 0.005 < 0.01 -> removed
        [2.0, 12, 12, 6, 16, 16],  # 0.0: not above the score threshold 0
    ])
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.0])
    labels = np.zeros(7, dtype=int)
    kw = {"score_threshold": 0.0, "min_size": 0.01, "nms_iou": 0.1}
    out_boxes, out_scores, _ = consolidate_source(boxes, scores, labels, np.ones(7), (20, 20, 20), candidates=1000, **kw)
    np.testing.assert_allclose(out_scores, [0.9, 0.7, 0.6])
    np.testing.assert_allclose(out_boxes, [[2, 2, 2, 6, 6, 6], [10, 10, 10, 14, 14, 20], [18, 2, 2, 20, 6, 6]])
    # only the 2 best candidates are considered at all
    _, top_scores, _ = consolidate_source(boxes, scores, labels, np.ones(7), (20, 20, 20), candidates=2, **kw)
    np.testing.assert_allclose(top_scores, [0.9])
    # a tile weight of 0.5 on the best box lets the second (0.8 x 1 > 0.9 x 0.5) win the weighted NMS
    weights = np.array([0.5, 1, 1, 1, 1, 1, 1])
    out_boxes, out_scores, _ = consolidate_source(boxes, scores, labels, weights, (20, 20, 20), candidates=1000, **kw)
    np.testing.assert_allclose(out_scores, [0.8, 0.7, 0.6])  # scores stay the boxes' own
    np.testing.assert_allclose(out_boxes[0], [2, 2, 2, 6, 6, 5])


def test_fuse_sources_expects_one_box_per_source() -> None:
    # the same box from 4 sources: the fused box is that box and the score their mean
    sources = [(np.array([A]), np.array([s]), np.array([0])) for s in (0.2, 0.4, 0.6, 0.8)]
    boxes, scores, _ = fuse_sources(sources, candidates=1000, wbc_iou=0.5, wbc_score_threshold=0.0)
    np.testing.assert_allclose(boxes, [A], atol=1e-12)
    np.testing.assert_allclose(scores, [0.5], atol=1e-12)
    # found by one source of 4: 0.8 / (1 + 3) = 0.2
    sources = [(np.array([A]), np.array([0.8]), np.array([0]))] + [(np.zeros((0, 6)), np.zeros(0), np.zeros(0))] * 3
    _, scores, _ = fuse_sources(sources, candidates=1000, wbc_iou=0.5, wbc_score_threshold=0.0)
    np.testing.assert_allclose(scores, [0.2], atol=1e-12)
