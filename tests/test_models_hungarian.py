"""Tests for models.hungarian: the cost matrix against hand formulas, the assignment against brute force."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from pretrain_det3d.models.hungarian import (
    HungarianMatcher,
    centre_size_to_corners,
    corners_to_centre_size,
    matching_cost,
)


def _random_boxes(g: torch.Generator, count: int) -> torch.Tensor:
    centres = torch.rand(count, 3, generator=g) * 0.6 + 0.2
    sizes = torch.rand(count, 3, generator=g) * 0.3 + 0.05
    return torch.cat([centres, sizes], dim=1)


def _giou_by_hand(a: list[float], b: list[float]) -> float:
    """GIoU of two centre-size boxes, written out axis by axis."""
    lo_a = [a[i] - a[i + 3] / 2 for i in range(3)]
    hi_a = [a[i] + a[i + 3] / 2 for i in range(3)]
    lo_b = [b[i] - b[i + 3] / 2 for i in range(3)]
    hi_b = [b[i] + b[i + 3] / 2 for i in range(3)]
    inter = math.prod(max(0.0, min(hi_a[i], hi_b[i]) - max(lo_a[i], lo_b[i])) for i in range(3))
    union = math.prod(a[3:]) + math.prod(b[3:]) - inter
    hull = math.prod(max(hi_a[i], hi_b[i]) - min(lo_a[i], lo_b[i]) for i in range(3))
    return inter / union - (hull - union) / hull


def test_box_mode_conversions_by_hand() -> None:
    centre_size = torch.tensor([[0.5, 0.4, 0.3, 0.2, 0.4, 0.6]])
    corners = torch.tensor([[0.4, 0.2, 0.0, 0.6, 0.6, 0.6]])
    torch.testing.assert_close(centre_size_to_corners(centre_size), corners)
    torch.testing.assert_close(corners_to_centre_size(corners), centre_size)
    assert centre_size_to_corners(torch.zeros(0, 6)).shape == (0, 6)


def test_cost_matrix_matches_hand_formulas() -> None:
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 3, generator=g, dtype=torch.float64)
    boxes = _random_boxes(g, 4).double()
    labels = torch.tensor([2, 0])
    targets = _random_boxes(g, 2).double()
    alpha, gamma, eps = 0.75, 1.0, 1e-6  # the release's focal terms (the loss's) and its log epsilon
    cost = matching_cost(logits, boxes, labels, targets, cost_class=2.0, cost_bbox=5.0, cost_giou=2.0)
    assert cost.shape == (4, 2)
    for q, t in itertools.product(range(4), range(2)):
        p = 1 / (1 + math.exp(-logits[q, labels[t]].item()))
        focal = alpha * (1 - p) ** gamma * -math.log(p + eps) - (1 - alpha) * p**gamma * -math.log(1 - p + eps)
        l1 = sum(abs(a - b) for a, b in zip(boxes[q].tolist(), targets[t].tolist()))
        giou = _giou_by_hand(boxes[q].tolist(), targets[t].tolist())
        expected = 2.0 * focal + 5.0 * l1 - 2.0 * giou
        assert cost[q, t].item() == pytest.approx(expected, abs=1e-5)


def _brute_force_best(cost: np.ndarray) -> float:
    """Lowest total cost over every one-to-one assignment of min(Q, T) pairs."""
    queries, targets = cost.shape
    if targets <= queries:
        perms = itertools.permutations(range(queries), targets)
        return min(sum(cost[q, t] for t, q in enumerate(perm)) for perm in perms)
    return min(sum(cost[q, t] for q, t in enumerate(perm)) for perm in itertools.permutations(range(targets), queries))


@pytest.mark.parametrize("seed", range(12))
def test_matcher_agrees_with_brute_force(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    queries = int(torch.randint(1, 6, (1,), generator=g))
    targets = int(torch.randint(1, 5, (1,), generator=g))  # sometimes more targets than queries
    classes = 2
    logits = torch.randn(1, queries, classes, generator=g)
    boxes = _random_boxes(g, queries)[None]
    target = {"labels": torch.randint(0, classes, (targets,), generator=g), "boxes": _random_boxes(g, targets)}
    matcher = HungarianMatcher()
    (query_idx, target_idx), = matcher(logits, boxes, [target])
    assert len(query_idx) == len(target_idx) == min(queries, targets)
    assert len(set(query_idx.tolist())) == len(query_idx) and len(set(target_idx.tolist())) == len(target_idx)

    cost = matching_cost(logits[0], boxes[0], target["labels"], target["boxes"]).numpy().astype(np.float64)
    chosen = float(sum(cost[q, t] for q, t in zip(query_idx.tolist(), target_idx.tolist())))
    assert chosen == pytest.approx(_brute_force_best(cost), abs=1e-6)


def test_matcher_prefers_the_right_query_per_term() -> None:
    # Two targets, three queries: query 2 sits on target 0, query 0 on target 1, query 1 is far from both.
    targets = torch.tensor([[0.3, 0.3, 0.3, 0.1, 0.1, 0.1], [0.7, 0.7, 0.7, 0.2, 0.2, 0.2]])
    boxes = torch.stack([targets[1], torch.tensor([0.1, 0.9, 0.1, 0.05, 0.05, 0.05]), targets[0]])[None]
    logits = torch.zeros(1, 3, 1)
    (query_idx, target_idx), = HungarianMatcher()(logits, boxes, [{"labels": torch.tensor([0, 0]), "boxes": targets}])
    assert dict(zip(target_idx.tolist(), query_idx.tolist())) == {0: 2, 1: 0}
    # Classification alone decides when the boxes are identical: the confident query wins.
    same = targets[:1].expand(3, 6)[None]
    logits = torch.tensor([[[-3.0], [3.0], [0.0]]])
    (query_idx, _), = HungarianMatcher()(logits, same, [{"labels": torch.tensor([0]), "boxes": targets[:1]}])
    assert query_idx.tolist() == [1]


def test_empty_targets_and_batch_check() -> None:
    matcher = HungarianMatcher()
    logits, boxes = torch.zeros(2, 3, 1), torch.full((2, 3, 6), 0.5)
    empty = {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 6)}
    one = {"labels": torch.tensor([0]), "boxes": torch.full((1, 6), 0.5)}
    matches = matcher(logits, boxes, [empty, one])
    assert [len(q) for q, _ in matches] == [0, 1]
    with pytest.raises(ValueError, match="targets"):
        matcher(logits, boxes, [one])
