"""Augmentation: mirroring moves boxes as expected, identity transforms are identities, ids survive."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from pretrain_det3d.data.boxes import boxes_from_instance_map
from pretrain_det3d.training.augmentation import (
    AugmentationParams,
    PatchAugmenter,
    extraction_size,
    seeded_global_rngs,
)

NO_INTENSITY = dict(p_noise=0.0, p_brightness=0.0, p_contrast=0.0, p_gamma=0.0, p_gamma_inverted=0.0)
SHAPE = (12, 14, 16)


def _instance_map() -> torch.Tensor:
    m = torch.zeros(SHAPE, dtype=torch.int16)
    m[1:4, 2:7, 3:5] = 1
    m[6:11, 9:13, 8:15] = 2
    m[2:3, 10:11, 1:2] = 3
    return m


def _image() -> torch.Tensor:
    # distinct values everywhere, so the flips applied can be read off the output
    return torch.arange(int(np.prod(SHAPE)), dtype=torch.float32).reshape(1, *SHAPE)


def _mirror_boxes(boxes: np.ndarray, axes: tuple[int, ...], shape: tuple[int, ...]) -> np.ndarray:
    # hand rule: along a flipped axis of length S, [lo, hi) becomes [S - hi, S - lo)
    out = boxes.copy()
    for axis in axes:
        out[:, axis] = shape[axis] - boxes[:, axis + 3]
        out[:, axis + 3] = shape[axis] - boxes[:, axis]
    return out


def test_mirroring_flips_boxes_like_the_hand_rule():
    params = AugmentationParams(p_rotation=0.0, p_scaling=0.0, mirror_axes=(0, 1, 2), **NO_INTENSITY)
    augmenter = PatchAugmenter(SHAPE, params)
    image, instances = _image(), _instance_map()
    ids, boxes = boxes_from_instance_map(instances.numpy())
    seen_axes = set()
    for seed in range(16):
        out_image, out_instances = augmenter(image.clone(), instances.clone(), seed=seed)
        flipped = [
            axes for r in range(4) for axes in itertools.combinations(range(3), r)
            if torch.equal(out_image, torch.flip(image, [a + 1 for a in axes]) if axes else image)
        ]
        assert len(flipped) == 1, "output must be the input mirrored along some set of axes"
        axes = flipped[0]
        seen_axes.update(axes)
        out_ids, out_boxes = boxes_from_instance_map(out_instances.numpy())
        np.testing.assert_array_equal(out_ids, ids)
        np.testing.assert_array_equal(out_boxes, _mirror_boxes(boxes, axes, SHAPE))
    assert seen_axes == {0, 1, 2}


def test_zero_rotation_and_unit_scaling_are_identities():
    params = AugmentationParams(
        p_rotation=1.0, rotation_degrees=(0.0, 0.0), p_scaling=1.0, scaling_range=(1.0, 1.0),
        mirror_axes=(), **NO_INTENSITY,
    )
    augmenter = PatchAugmenter(SHAPE, params)
    assert augmenter.input_size == SHAPE  # nothing to make room for
    image, instances = _image(), _instance_map()
    out_image, out_instances = augmenter(image.clone(), instances.clone(), seed=3)
    torch.testing.assert_close(out_image, image, rtol=0, atol=1e-3)
    assert torch.equal(out_instances, instances)


def test_augmentation_off_passes_the_patch_through():
    augmenter = PatchAugmenter((4, 6, 8), None)
    assert augmenter.input_size == (4, 6, 8)
    image = torch.arange(4 * 6 * 8, dtype=torch.float32).reshape(1, 4, 6, 8)
    instances = (image[0] > 100).to(torch.int16)
    out, out_instances = augmenter(image.clone(), instances.clone(), seed=0)
    assert torch.equal(out, image) and torch.equal(out_instances, instances)
    with pytest.raises(ValueError, match="region of size"):
        augmenter(torch.zeros(1, 8, 10, 12), None, seed=0)


def test_rotation_and_scaling_keep_an_instance_map():
    params = AugmentationParams(p_rotation=1.0, p_scaling=1.0, **NO_INTENSITY)
    patch = (16, 16, 16)
    augmenter = PatchAugmenter(patch, params)
    region = augmenter.input_size
    instances = torch.zeros(region, dtype=torch.int16)
    centre = [r // 2 for r in region]
    instances[centre[0] - 4:centre[0] + 4, centre[1] - 4:centre[1] + 4, centre[2] - 4:centre[2] + 4] = 7
    instances[:5, :5, :5] = 3
    instances[-6:, -3:, :] = 12
    image = torch.randn(1, *region)
    for seed in range(6):
        _, out = augmenter(image.clone(), instances.clone(), seed=seed)
        present = set(torch.unique(out).tolist())
        assert present <= {0, 3, 7, 12}, f"new ids {present - {0, 3, 7, 12}} appeared"
        assert 7 in present  # the central object survives any rotation about the centre
        assert out.dtype == torch.int16 and tuple(out.shape) == patch


def test_same_seed_same_patch_and_global_rngs_untouched():
    params = AugmentationParams(p_rotation=1.0, p_scaling=1.0, p_noise=1.0, p_gamma=1.0)
    augmenter = PatchAugmenter((8, 8, 8), params)
    image = torch.randn(1, *augmenter.input_size)
    instances = torch.zeros(augmenter.input_size, dtype=torch.int16)
    torch.manual_seed(0)
    np.random.seed(0)
    a = augmenter(image.clone(), instances.clone(), seed=11)
    b = augmenter(image.clone(), instances.clone(), seed=11)
    c = augmenter(image.clone(), instances.clone(), seed=12)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])
    # the global generators continue as if augmentation had not run
    after = (torch.rand(1).item(), np.random.rand())
    torch.manual_seed(0)
    np.random.seed(0)
    assert after == (torch.rand(1).item(), np.random.rand())


def test_intensity_transforms_leave_instances_alone():
    params = AugmentationParams(p_rotation=0.0, p_scaling=0.0, mirror_axes=(), p_noise=1.0, p_brightness=1.0,
                                p_contrast=1.0, p_gamma=1.0)
    augmenter = PatchAugmenter(SHAPE, params)
    image, instances = _image() / 1000, _instance_map()
    out_image, out_instances = augmenter(image.clone(), instances.clone(), seed=0)
    assert torch.equal(out_instances, instances)
    assert not torch.allclose(out_image, image)


def test_extraction_size_hand_worked():
    # 30 degrees about one axis: half extent 16 -> 16 (cos 30 + sin 30) = 21.86 -> margin ceil(5.86) = 6
    params = AugmentationParams(p_rotation=1.0, rotation_degrees=(-30.0, 30.0), p_scaling=0.0)
    assert extraction_size((32, 32, 32), params) == (44, 44, 44)
    assert extraction_size((32, 32, 32), AugmentationParams(p_rotation=0.0, p_scaling=0.0)) == (32, 32, 32)


def test_seeded_global_rngs_restores_state_after_errors():
    np.random.seed(5)
    expected = np.random.get_state()[1].copy()
    with pytest.raises(RuntimeError):
        with seeded_global_rngs(1):
            raise RuntimeError("boom")
    np.testing.assert_array_equal(np.random.get_state()[1], expected)


def test_unknown_augmentation_setting_is_named():
    with pytest.raises(ValueError, match=r"'augmentation.p_rotate': unknown key; did you mean 'p_rotation'"):
        AugmentationParams.from_settings({"p_rotate": 0.5})
