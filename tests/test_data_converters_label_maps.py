"""The shared size filter of the label-map converters, in nnDetection's convention (``convert_seg2det.py``).

nnDetection keeps an object when every side of its box ``[first - 1, last + 1]`` (so ``(n + 1) x spacing`` for
``n`` voxels spanned), except along the coarsest-spacing axis, is *longer than* ``min_size``. The cases below
are worked out by hand at the spacings where this differs from ``n x spacing >= min_size`` (0.8-0.95 mm), plus
a brute-force comparison that recomputes nnDetection's boxes from the voxel indices of every component.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from pretrain_det3d.data.converters.label_maps import connected_instances, large_enough, padded_sides_mm


@pytest.mark.parametrize(("spacing_zyx", "spanned", "kept"), [
    ((2.5, 0.8, 0.8), (1, 3, 3), True),     # 4 x 0.8 = 3.2 mm > 3; the old rule dropped it (3 x 0.8 = 2.4)
    ((2.5, 0.8, 0.8), (1, 2, 3), False),    # y: 3 x 0.8 = 2.4 mm
    ((2.5, 0.95, 0.95), (1, 3, 3), True),   # 3.8 mm (old rule: 2.85, dropped)
    ((2.5, 0.95, 0.95), (1, 2, 5), False),  # y: 2.85 mm
    ((2.5, 0.75, 0.75), (1, 3, 3), False),  # exactly 3.0 mm: not longer than 3 (strict, as nnDetection)
    ((2.5, 0.75, 0.75), (1, 4, 4), True),   # 3.75 mm
    ((1.0, 1.0, 1.0), (1, 3, 3), True),     # isotropic: the first axis (z) is the one left out
    ((1.0, 1.0, 1.0), (3, 1, 3), False),    # y: 2 mm
    ((0.8, 0.8, 3.0), (3, 3, 1), True),     # slice axis last (KiTS): x is left out
])
def test_large_enough_hand_worked(spacing_zyx: tuple[float, float, float], spanned: tuple[int, int, int],
                                  kept: bool) -> None:
    assert large_enough(spanned, spacing_zyx, 3.0) is kept


def test_zero_keeps_everything_and_sides_are_padded() -> None:
    assert large_enough((1, 1, 1), (5.0, 0.1, 0.1), 0.0)
    assert padded_sides_mm((1, 3, 2), (2.5, 0.8, 0.75)) == pytest.approx([5.0, 3.2, 2.25])


def test_connected_instances_keeps_three_voxel_lesions_at_0_8_mm() -> None:
    seg = np.zeros((4, 12, 12), np.uint8)
    seg[1, 1:4, 1:4] = 2   # 3 x 3 voxels in-plane: sides 3.2 mm -> kept
    seg[2, 6:8, 6:9] = 2   # 2 x 3: y side 2.4 mm -> dropped
    seg[3, 10, 10] = 2     # one voxel: 1.6 mm -> dropped
    instance_map, instances, dropped = connected_instances(seg, {2: 0}, (2.5, 0.8, 0.8), min_extent_mm=3.0)
    assert instances == {1: 0}
    assert np.array_equal(np.argwhere(instance_map == 1).min(0), [1, 1, 1])
    assert [d["box"] for d in dropped] == [[2, 6, 6, 3, 8, 9], [3, 10, 10, 4, 11, 11]]
    assert dropped[0]["sides_mm"] == [5.0, 2.4, 3.2]


def test_filter_matches_boxes_recomputed_from_voxel_indices() -> None:
    rng = np.random.default_rng(7)
    structure = np.ones((3, 3, 3), bool)
    for trial in range(30):
        spacing = tuple(float(v) for v in rng.choice([0.7, 0.8, 0.95, 1.0, 2.5], size=3))
        min_size = float(rng.choice([0.0, 2.0, 3.0]))
        seg = (ndimage.uniform_filter(rng.random((8, 10, 10)), 2) > 0.6).astype(np.uint8)
        components, count = ndimage.label(seg, structure=structure)
        coarsest = int(np.argmax(spacing))
        expected_kept = []
        for component in range(1, count + 1):
            indices = np.argwhere(components == component)
            box_low, box_high = indices.min(0) - 1, indices.max(0) + 1  # nnDetection's instances_to_boxes_np
            sides = (box_high - box_low) * np.asarray(spacing)
            if all(sides[axis] > min_size for axis in range(3) if axis != coarsest):
                expected_kept.append(component)
        instance_map, instances, dropped = connected_instances(seg, {1: 0}, spacing, min_extent_mm=min_size)
        assert len(instances) == len(expected_kept), (trial, spacing, min_size)
        assert len(dropped) == count - len(expected_kept)
        for new_id, component in enumerate(expected_kept, start=1):
            assert np.array_equal(instance_map == new_id, components == component), (trial, new_id)
