"""Boxes of instance maps: nnDetection's convention on hand-made masks, and a brute-force scan of voxel indices."""

from __future__ import annotations

import numpy as np
import pytest

from pretrain_det3d.data.boxes import (
    box_centre_indices,
    box_voxel_counts,
    boxes_from_instance_map,
    instance_voxel_extents,
    pairwise_box_iou,
)


def brute_force_boxes(instance_map: np.ndarray) -> dict[int, list[float]]:
    """nnDetection's rule written out: per axis the smallest voxel index minus one, the largest plus one."""
    boxes = {}
    for instance_id in np.unique(instance_map):
        if instance_id == 0:
            continue
        coords = np.argwhere(instance_map == instance_id)
        boxes[int(instance_id)] = list(coords.min(0).astype(float) - 1) + list(coords.max(0).astype(float) + 1)
    return boxes


@pytest.mark.parametrize("seed", range(5))
def test_matches_brute_force_on_random_maps(seed):
    rng = np.random.default_rng(seed)
    instance_map = np.zeros((12, 10, 14), dtype=np.int16)
    for instance_id in range(1, 5):
        lo = rng.integers(0, [10, 8, 12])
        hi = lo + rng.integers(1, 4, size=3)
        instance_map[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = instance_id
        # a scattered extra voxel makes the box larger than the block
        instance_map[tuple(rng.integers(0, [12, 10, 14]))] = instance_id
    ids, boxes = boxes_from_instance_map(instance_map)
    expected = brute_force_boxes(instance_map)
    assert list(ids) == sorted(expected)
    for instance_id, box in zip(ids, boxes):
        assert list(box) == expected[int(instance_id)]
    # the voxel extents are the plain slices of the same voxels: they hold all of the instance, and its voxels
    # reach both ends of the slice on every axis
    extent_ids, extents = instance_voxel_extents(instance_map)
    assert extent_ids.tolist() == ids.tolist() and extents.dtype == np.int64
    for instance_id, extent in zip(extent_ids, extents):
        inside = instance_map[tuple(slice(a, b) for a, b in zip(extent[:3], extent[3:]))] == instance_id
        assert inside.sum() == (instance_map == instance_id).sum()
        for axis in range(3):
            profile = inside.any(axis=tuple(a for a in range(3) if a != axis))
            assert profile[0] and profile[-1]


def test_single_voxel_gives_extent_two_around_it():
    """nnDetection's instances_to_boxes_np: a voxel at i gives [i - 1, i + 1] on every axis."""
    instance_map = np.zeros((5, 5, 5), dtype=np.int16)
    instance_map[2, 1, 3] = 3
    ids, boxes = boxes_from_instance_map(instance_map)
    assert ids.tolist() == [3] and boxes.tolist() == [[1, 0, 2, 3, 2, 4]]
    assert box_voxel_counts(boxes).tolist() == [[1, 1, 1]]
    assert box_centre_indices(boxes).tolist() == [[2, 1, 3]]  # the voxel itself


def test_block_of_2x3x4_voxels():
    instance_map = np.zeros((8, 9, 10), dtype=np.int16)
    instance_map[3:5, 2:5, 4:8] = 1  # z 3..4, y 2..4, x 4..7
    _, boxes = boxes_from_instance_map(instance_map)
    # by hand: z [3 - 1, 4 + 1], y [2 - 1, 4 + 1], x [4 - 1, 7 + 1]
    assert boxes.tolist() == [[2, 1, 3, 5, 5, 8]]
    assert (boxes[:, 3:] - boxes[:, :3]).tolist() == [[3, 4, 5]]  # n voxels -> extent n + 1
    assert box_voxel_counts(boxes).tolist() == [[2, 3, 4]]
    assert box_centre_indices(boxes).tolist() == [[3.5, 3.0, 5.5]]  # centre of the voxel centres
    _, extents = instance_voxel_extents(instance_map)
    assert extents.tolist() == [[3, 2, 4, 5, 5, 8]]


def test_mask_touching_the_volume_border_is_not_clipped():
    """nnDetection clips neither its training targets nor its evaluation labels: a box may start at -1 and end
    at the axis length."""
    instance_map = np.zeros((4, 6, 5), dtype=np.int16)
    instance_map[0:2, 5, 0] = 1  # touches z = 0, y = 5 (the last index) and x = 0
    instance_map[1:4, 0:6, 2:5] = 2  # z up to the last index, all of y, x up to the last index
    ids, boxes = boxes_from_instance_map(instance_map)
    assert ids.tolist() == [1, 2]
    assert boxes.tolist() == [[-1, 4, -1, 2, 6, 1], [0, -1, 1, 4, 6, 5]]
    _, extents = instance_voxel_extents(instance_map)
    assert extents.tolist() == [[0, 5, 0, 2, 6, 1], [1, 0, 2, 4, 6, 5]]


def test_empty_map_gives_no_boxes():
    ids, boxes = boxes_from_instance_map(np.zeros((4, 4, 4), dtype=np.int16))
    assert ids.shape == (0,) and boxes.shape == (0, 6)
    ids, extents = instance_voxel_extents(np.zeros((4, 4, 4), dtype=np.int16))
    assert ids.shape == (0,) and extents.shape == (0, 6)


def test_rejects_2d_input():
    with pytest.raises(ValueError, match="3D"):
        boxes_from_instance_map(np.zeros((4, 4)))


def test_iou_of_mask_boxes_has_no_plus_one_term():
    """IoU volumes are products of max - min (nnDetection's box_iou): single voxels at x = 1 and x = 2 give
    boxes [0, 2] and [1, 3] along x (2 x 2 on the other axes), overlapping 1 x 2 x 2: IoU = 4 / (8 + 8 - 4)."""
    instance_map = np.zeros((4, 4, 4), dtype=np.int16)
    instance_map[1, 1, 1] = 1
    instance_map[1, 1, 2] = 2
    _, boxes = boxes_from_instance_map(instance_map)
    assert pairwise_box_iou(boxes[:1], boxes[1:])[0, 0] == pytest.approx(4 / 12, rel=1e-6)


# ---------------------------------------------------------------------------------------------- pairwise IoU
def random_boxes(rng: np.random.Generator, count: int, integer: bool) -> np.ndarray:
    low = rng.uniform(0, 20, size=(count, 3))
    size = rng.uniform(0.5, 12, size=(count, 3))
    boxes = np.concatenate([low, low + size], axis=1)
    return np.round(boxes) + np.array([0, 0, 0, 1, 1, 1]) * integer if integer else boxes


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("integer", [False, True])
def test_pairwise_iou_gives_monais_box_iou(seed, integer):
    from monai.data.box_utils import box_iou

    rng = np.random.default_rng(seed)
    a, b = random_boxes(rng, 30, integer), random_boxes(rng, 17, integer)
    b[:5] = a[:5]  # identical pairs (IoU 1)
    depth = a[6, 3] - a[6, 0]
    b[5] = a[6] + np.array([depth, 0, 0, depth, 0, 0])  # touches a[6] along z: IoU 0
    ours = pairwise_box_iou(a, b)
    reference = np.asarray(box_iou(a.astype(np.float64), b.astype(np.float64)), dtype=np.float64)
    assert ours.shape == (30, 17) and ours.dtype == np.float64
    np.testing.assert_allclose(ours, reference, rtol=1e-6, atol=1e-7)
    assert (ours > 0).sum() > 10  # the random boxes overlap often enough to test something
    np.testing.assert_allclose(np.diag(ours[:5, :5]), 1.0, rtol=1e-6)
    assert ours[6, 5] == 0.0


def test_pairwise_iou_hand_worked_and_empty():
    unit = np.array([[0, 0, 0, 2, 2, 2.]])
    shifted = np.array([[1, 0, 0, 3, 2, 2.]])  # overlap 1x2x2 = 4 of union 8 + 8 - 4 = 12
    assert pairwise_box_iou(unit, shifted)[0, 0] == pytest.approx(4 / 12, rel=1e-6)
    assert pairwise_box_iou(np.zeros((0, 6)), unit).shape == (0, 1)
    assert pairwise_box_iou(unit, np.zeros((0, 6))).shape == (1, 0)
    with pytest.raises(ValueError, match="not finite"):
        pairwise_box_iou(np.array([[0, 0, 0, np.nan, 1, 1]]), unit)
