"""Tests for models.anchors: nnDetection's anchor planning (27 anchors per location, base sizes maximising the
boxes' mean best IoU, scaled per level), checked against exhaustive searches written independently here."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from pretrain_det3d.models.anchors import (
    filter_box_sizes,
    mean_best_iou,
    plan_anchor_shapes,
    plan_anchors,
)
from pretrain_det3d.models.retina_unet import RetinaUNet
from pretrain_det3d.settings.base import ConfigError
from pretrain_det3d.settings.detectors import RetinaUNetSettings

# Hand-made: small round lesions, flat ones, elongated ones and two large ones (sides in voxels, [dz, dy, dx]).
HAND_BOXES = [[2, 2, 2], [2, 3, 3], [3, 3, 3], [1, 4, 4], [2, 5, 5], [6, 3, 3], [4, 4, 4], [5, 6, 6], [6, 6, 5]]


def _brute_force(boxes, scales, k: int, candidates) -> tuple[float, list[tuple[float, ...]]]:
    """Best mean best-IoU over every choice of k sizes per axis from ``candidates[axis]`` (and one optimum).

    Written without the module: anchors are all products of the chosen sizes on each level (sizes x the
    level's scale), IoU of origin-centred boxes is intersection / union of their volumes.
    """
    boxes = np.asarray(boxes, dtype=float)
    scales = np.asarray(scales, dtype=float)
    per_axis = [np.asarray(list(itertools.combinations_with_replacement(c, k)), dtype=float) for c in candidates]
    products = np.asarray(list(itertools.product(range(k), repeat=3)))  # [k**3, 3] index triples
    box_volume = boxes.prod(axis=1)
    best, argbest = -1.0, None
    for first in per_axis[0]:
        # every (axis-1 choice, axis-2 choice) pair at once: sides [C1, C2, levels, k**3, 3]
        c1, c2 = len(per_axis[1]), len(per_axis[2])
        sides = np.empty((c1, c2, len(scales), len(products), 3))
        sides[..., 0] = first[products[:, 0]][None, None, None, :] * scales[None, None, :, None]
        sides[..., 1] = per_axis[1][:, None, None, :][..., products[:, 1]] * scales[None, None, :, None]
        sides[..., 2] = per_axis[2][None, :, None, :][..., products[:, 2]] * scales[None, None, :, None]
        sides = sides.reshape(c1 * c2, -1, 3)
        inter = np.minimum(sides[:, :, None, :], boxes[None, None]).prod(axis=-1)  # [C, anchors, boxes]
        iou = inter / (sides.prod(axis=-1)[:, :, None] + box_volume[None, None] - inter)
        means = iou.max(axis=1).mean(axis=1)
        i = int(np.argmax(means))
        if means[i] > best:
            best, argbest = float(means[i]), [tuple(first), tuple(per_axis[1][i // c2]), tuple(per_axis[2][i % c2])]
    return best, argbest


def _iou_by_hand(box, anchor) -> float:
    inter = np.prod(np.minimum(box, anchor))
    return float(inter / (np.prod(box) + np.prod(anchor) - inter))


def test_hand_made_set_reaches_the_brute_force_optimum_with_27_anchors() -> None:
    # strides 4, 8: the coarse level doubles the base sizes; candidates 1..6 on every axis (largest side 6)
    plan = plan_anchors(HAND_BOXES, strides=[4, 8], anchors_per_level=27, outlier_percentiles=None)
    best, _ = _brute_force(HAND_BOXES, [1, 2], 3, [range(1, 7)] * 3)
    assert plan.optimal
    assert plan.mean_best_iou == pytest.approx(best, abs=1e-12)
    # the shapes it returns score that optimum (best IoU per box computed by hand)
    anchors = [shape for level in plan.shapes for shape in level]
    by_hand = np.mean([max(_iou_by_hand(box, a) for a in anchors) for box in HAND_BOXES])
    assert by_hand == pytest.approx(best, abs=1e-12)
    assert [len(level) for level in plan.shapes] == [27, 27]
    assert all(len(axis) == 3 and axis == sorted(axis) for axis in plan.base_sizes)


def test_sizes_above_the_largest_side_never_help() -> None:
    # brute force over a wider range (up to 9 > largest side 6) finds nothing better than the planner's 1..6
    boxes = [[2, 2, 3], [3, 5, 2], [6, 4, 4], [1, 2, 2], [5, 5, 6]]
    plan = plan_anchors(boxes, strides=[2, 4, 8], anchors_per_level=8, outlier_percentiles=None)
    best, _ = _brute_force(boxes, [1, 2, 4], 2, [range(1, 10)] * 3)
    assert plan.optimal and plan.mean_best_iou == pytest.approx(best, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_random_small_sets_match_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    boxes = rng.integers(1, 8, size=(int(rng.integers(3, 9)), 3)) * rng.uniform(0.7, 1.0, size=(1, 3))
    k = 1 + seed % 2
    strides = [[4, 8], [4, 8, 16]][seed % 2]
    plan = plan_anchors(boxes, strides=strides, anchors_per_level=k**3, outlier_percentiles=None)
    candidates = [range(1, int(np.ceil(m)) + 1) for m in boxes.max(axis=0)]
    best, _ = _brute_force(boxes, np.asarray(strides) / strides[0], k, candidates)
    assert plan.mean_best_iou == pytest.approx(best, abs=1e-12)


def test_branch_and_bound_repairs_a_local_optimum() -> None:
    # three dissimilar boxes, one anchor shape per level: the local search alone stops short of the optimum
    boxes = [[2, 6, 7], [6, 8, 4], [3, 7, 1]]
    local = plan_anchors(boxes, strides=[4, 8], anchors_per_level=1, outlier_percentiles=None, work_budget=0)
    full = plan_anchors(boxes, strides=[4, 8], anchors_per_level=1, outlier_percentiles=None)
    best, argbest = _brute_force(boxes, [1, 2], 1, [range(1, 7), range(1, 9), range(1, 8)])
    assert local.mean_best_iou < best - 1e-6 and not local.optimal  # this set exercises the exhaustive stage
    assert full.optimal and full.mean_best_iou == pytest.approx(best, abs=1e-12)
    assert full.base_sizes == [[int(v) for v in axis] for axis in argbest]  # a unique optimum here


def test_levels_scale_the_base_sizes_in_the_releases_product_order() -> None:
    plan = plan_anchors([[3, 5, 8], [6, 10, 16], [12, 20, 30]], strides=[4, 8, 16, 32], anchors_per_level=27)
    base = plan.base_sizes
    expected_first = [[float(a), float(b), float(c)] for a in base[0] for b in base[1] for c in base[2]]
    assert plan.shapes[0] == expected_first  # axis 0 varies slowest, as itertools.product(width, height, depth)
    for level, factor in enumerate([1, 2, 4, 8]):
        assert plan.shapes[level] == [[v * factor for v in shape] for shape in expected_first]
    assert plan.level_scales == [[f, f, f] for f in (1.0, 2.0, 4.0, 8.0)]


def test_per_axis_strides_scale_each_axis() -> None:
    plan = plan_anchors([[4, 4, 4]], strides=[[1, 2, 2], [2, 4, 4]], anchors_per_level=1)
    assert plan.level_scales == [[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]]
    plan = plan_anchors([[4, 4, 4]], strides=[[2, 2, 2], [2, 4, 4]], anchors_per_level=1)
    assert plan.shapes == [[[4.0, 4.0, 4.0]], [[4.0, 8.0, 8.0]]]


def test_outlier_filter_is_strict_and_per_axis() -> None:
    # numpy's linear percentiles of 1..5 at 0.5 / 99.5: 1.02 and 4.98, so the extremes go on every axis
    sizes = [[1, 10, 7], [2, 20, 6], [3, 30, 5], [4, 40, 4], [5, 50, 3]]
    assert filter_box_sizes(sizes).tolist() == [[2, 20, 6], [3, 30, 5], [4, 40, 4]]
    # equal sides on an axis: nothing is strictly inside, so nothing is kept
    assert filter_box_sizes([[3, 4, 5], [3, 6, 5], [3, 5, 5]]).tolist() == []


def test_the_filter_applies_before_planning_and_falls_back_to_all_boxes() -> None:
    # over 1, 8, 8, 8, 8, 8, 50 the percentiles are 1.21 and 48.74: the 1^3 and 50^3 boxes are dropped, and one
    # 8^3 anchor then fits every kept box exactly
    boxes = [[1, 1, 1], [50, 50, 50]] + [[8, 8, 8]] * 5
    plan = plan_anchors(boxes, strides=[4], anchors_per_level=1)
    assert plan.num_boxes == 5 and plan.base_sizes == [[8], [8], [8]] and plan.mean_best_iou == 1.0
    assert plan_anchors(boxes, strides=[4], anchors_per_level=1, outlier_percentiles=None).num_boxes == 7
    # equal sides on axis 0: the strict filter keeps nothing, so all boxes are planned for
    plan = plan_anchors([[3, 4, 5], [3, 6, 5], [3, 5, 5]], strides=[4], anchors_per_level=1)
    assert plan.num_boxes == 3 and plan.base_sizes == [[3], [5], [5]]


def test_no_boxes_gives_the_release_initial_sizes_scaled_per_level_and_is_json() -> None:
    shapes = plan_anchor_shapes([], strides=[4, 8, 16, 32])
    assert json.loads(json.dumps(shapes)) == shapes
    assert [len(level) for level in shapes] == [27] * 4
    for level, factor in enumerate([1, 2, 4, 8]):
        sides = sorted({v for shape in shapes[level] for v in shape})
        assert sides == [4.0 * factor, 8.0 * factor, 16.0 * factor]


def test_planning_is_deterministic_and_ignores_box_order() -> None:
    rng = np.random.default_rng(7)
    boxes = np.rint(np.exp(rng.normal(2.0, 0.5, size=(30, 1)) + rng.normal(0, 0.1, size=(30, 3)))) + 2
    first = plan_anchor_shapes(boxes.tolist(), strides=[4, 8, 16], anchors_per_level=8)
    assert plan_anchor_shapes(boxes.tolist(), strides=[4, 8, 16], anchors_per_level=8) == first
    assert plan_anchor_shapes(boxes[::-1].tolist(), strides=[4, 8, 16], anchors_per_level=8) == first


def test_mean_best_iou_by_hand() -> None:
    # box 2^3 meets anchor 2^3 exactly; box 4^3 best meets 2x2x4: 16 / (64 + 16 - 16)
    assert mean_best_iou([[2, 2, 2], [4, 4, 4]], [[[2, 2, 2]], [[2, 2, 4]]]) == pytest.approx((1 + 0.25) / 2)


@pytest.mark.parametrize(
    "boxes, strides, per_level, message",
    [
        ([[1, 2, 0]], [1], 27, "positive"),
        ([[1, 2, float("nan")]], [1], 27, "positive"),
        ([[1, 2]], [1], 27, "triples"),
        ([[1, 2, 3]], [4, 2], 27, "sorted"),
        ([[1, 2, 3]], [], 27, "strides"),
        ([[1, 2, 3]], [0, 2], 27, "positive"),
        ([[1, 2, 3]], [4], 9, "cube"),
        ([[1, 2, 3]], [4], 0, "cube"),
    ],
)
def test_bad_input_is_refused(boxes, strides, per_level, message) -> None:
    with pytest.raises(ValueError, match=message):
        plan_anchor_shapes(boxes, strides, anchors_per_level=per_level)


def test_settings_default_is_27_and_refuse_non_cubes() -> None:
    assert RetinaUNetSettings.default("anchors_per_level") == 27
    with pytest.raises(ConfigError, match="anchors_per_level"):
        RetinaUNetSettings.parse({"anchors_per_level": 9}, where="detectors.retina_unet")


def test_detector_plans_27_anchors_per_level_unless_shapes_are_given() -> None:
    plan = {"box_sizes": HAND_BOXES}
    kwargs = RetinaUNet.build_kwargs_from_settings({"preset": "resenc_demo", "head_strides": [4, 8]}, 1, 1, plan)
    assert kwargs["anchor_shapes"] == plan_anchor_shapes(HAND_BOXES, [4, 8])
    assert [len(level) for level in kwargs["anchor_shapes"]] == [27, 27]
    explicit = [[[3.0, 3.0, 3.0], [5.0, 5.0, 5.0]], [[6.0, 6.0, 6.0], [10.0, 10.0, 10.0]]]
    kwargs = RetinaUNet.build_kwargs_from_settings(
        {"preset": "resenc_demo", "head_strides": [4, 8], "anchor_shapes": explicit}, 1, 1, plan)
    assert kwargs["anchor_shapes"] == explicit
