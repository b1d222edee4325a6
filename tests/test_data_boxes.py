"""boxes_from_instance_map against a brute-force scan of voxel indices."""

from __future__ import annotations

import numpy as np
import pytest

from pretrain_det3d.data.boxes import boxes_from_instance_map


def brute_force_boxes(instance_map: np.ndarray) -> dict[int, list[float]]:
    boxes = {}
    for instance_id in np.unique(instance_map):
        if instance_id == 0:
            continue
        coords = np.argwhere(instance_map == instance_id)
        boxes[int(instance_id)] = list(coords.min(0).astype(float)) + list(coords.max(0).astype(float) + 1)
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


def test_single_voxel_is_one_voxel_wide():
    instance_map = np.zeros((3, 3, 3), dtype=np.int16)
    instance_map[2, 0, 1] = 3
    ids, boxes = boxes_from_instance_map(instance_map)
    assert ids.tolist() == [3] and boxes.tolist() == [[2, 0, 1, 3, 1, 2]]


def test_empty_map_gives_no_boxes():
    ids, boxes = boxes_from_instance_map(np.zeros((4, 4, 4), dtype=np.int16))
    assert ids.shape == (0,) and boxes.shape == (0, 6)


def test_rejects_2d_input():
    with pytest.raises(ValueError, match="3D"):
        boxes_from_instance_map(np.zeros((4, 4)))
