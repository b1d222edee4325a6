"""Tests for models.anchors: the size-partitioned quantile rule, worked by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pretrain_det3d.models.anchors import plan_anchor_shapes


def test_boxes_are_split_by_size_and_take_per_axis_quantiles() -> None:
    # Six boxes; geometric-mean sizes 2, 3, 4 go to the fine level and 8, 10, 12 to the coarse one.
    boxes = [[12, 12, 12], [2, 2, 2], [8, 8, 8], [3, 3, 3], [10, 10, 10], [4, 4, 4]]
    shapes = plan_anchor_shapes(boxes, strides=[1, 2], anchors_per_level=1)
    assert shapes == [[[3.0, 3.0, 3.0]], [[10.0, 10.0, 10.0]]]  # medians of {2,3,4} and {8,10,12}


def test_three_anchors_are_the_sixths_quantiles_of_each_axis() -> None:
    # One level, four anisotropic boxes; axes are handled independently.
    boxes = [[2, 10, 20], [4, 20, 40], [6, 30, 60], [8, 40, 80]]
    shapes = plan_anchor_shapes(boxes, strides=[1], anchors_per_level=3)
    # numpy's linear quantile at q=1/6 over [2,4,6,8]: position 0.5 -> 3; q=1/2 -> 5; q=5/6 -> position 2.5 -> 7
    assert shapes == [[[3.0, 15.0, 30.0], [5.0, 25.0, 50.0], [7.0, 35.0, 70.0]]]


def test_sides_are_floored_at_the_level_stride() -> None:
    shapes = plan_anchor_shapes([[2, 2, 2], [3, 3, 30]], strides=[4, 8], anchors_per_level=1)
    assert shapes == [[[4.0, 4.0, 4.0]], [[8.0, 8.0, 30.0]]]


def test_levels_without_boxes_scale_the_last_planned_level() -> None:
    shapes = plan_anchor_shapes([[5, 6, 7]], strides=[2, 4, 8], anchors_per_level=1)
    assert shapes == [[[5.0, 6.0, 7.0]], [[10.0, 12.0, 14.0]], [[20.0, 24.0, 28.0]]]


def test_no_boxes_gives_cubes_in_stride_multiples_and_is_json() -> None:
    shapes = plan_anchor_shapes([], strides=[4, 8], anchors_per_level=3)
    assert json.loads(json.dumps(shapes)) == shapes
    np.testing.assert_allclose(np.asarray(shapes[0])[:, 0], [4.0, 8.0, 16.0])
    np.testing.assert_allclose(np.asarray(shapes[1])[:, 0], [8.0, 16.0, 32.0])


@pytest.mark.parametrize(
    "boxes, strides, message",
    [([[1, 2, 0]], [1], "positive"), ([[1, 2, 3]], [4, 2], "sorted"), ([[1, 2, 3]], [], "strides")],
)
def test_bad_input_is_refused(boxes, strides, message) -> None:
    with pytest.raises(ValueError, match=message):
        plan_anchor_shapes(boxes, strides)
