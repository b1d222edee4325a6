"""Augmentation: mirroring moves boxes as expected, identity transforms are identities, ids survive, the blur is
scipy's Gaussian with a drawn sigma, the border is background, the image is resampled linearly."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from scipy.optimize import minimize_scalar

from pretrain_det3d.data.boxes import boxes_from_instance_map
from pretrain_det3d.training.augmentation import (
    AugmentationParams,
    PatchAugmenter,
    _below_or_above_one,
    extraction_size,
    seeded_global_rngs,
)

NO_INTENSITY = dict(p_noise=0.0, p_blur=0.0, p_brightness=0.0, p_contrast=0.0, p_gamma=0.0, p_gamma_inverted=0.0)
NOTHING = dict(p_rotation=0.0, p_scaling=0.0, mirror_axes=(), **NO_INTENSITY)
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
    # hand rule: along a flipped axis of length S, voxel i goes to S - 1 - i, so a box [first - 1, last + 1]
    # (data.boxes) becomes [S - 1 - (last + 1), S - 1 - (first - 1)] = [S - 1 - hi, S - 1 - lo]
    out = boxes.copy()
    for axis in axes:
        out[:, axis] = shape[axis] - 1 - boxes[:, axis + 3]
        out[:, axis + 3] = shape[axis] - 1 - boxes[:, axis]
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


def _fitted_sigma(before: np.ndarray, after: np.ndarray) -> tuple[float, float]:
    """The sigma of scipy's gaussian_filter (its defaults) that best turns ``before`` into ``after``, and the error."""
    def error(sigma: float) -> float:
        return float(np.abs(gaussian_filter(before, sigma) - after).max())

    grid = np.arange(0.3, 1.3, 0.002)
    coarse = grid[np.argmin([error(s) for s in grid])]
    best = minimize_scalar(error, bounds=(coarse - 0.002, coarse + 0.002), method="bounded",
                           options={"xatol": 1e-9})
    return float(best.x), float(best.fun)


def test_blur_is_scipys_gaussian_with_a_drawn_sigma_per_channel():
    params = AugmentationParams(**{**NOTHING, "p_blur": 1.0, "p_blur_per_channel": 1.0})
    augmenter = PatchAugmenter(SHAPE, params)
    rng = np.random.default_rng(0)
    sigmas = []
    for seed in range(4):
        image = torch.from_numpy(rng.normal(size=(2, *SHAPE)).astype(np.float32))
        out, instances = augmenter(image.clone(), _instance_map(), seed=seed)
        assert torch.equal(instances, _instance_map())
        for channel in range(2):
            sigma, err = _fitted_sigma(image[channel].numpy(), out[channel].numpy())
            # one sigma on every axis, reflecting borders, 4-sigma kernel: exactly scipy's filter
            assert err < 1e-5, f"seed {seed} channel {channel}: no scipy Gaussian matches (error {err})"
            assert 0.5 - 1e-4 <= sigma <= 1.0 + 1e-4
            sigmas.append(sigma)
    assert len({round(s, 3) for s in sigmas}) == len(sigmas), "each channel draws its own sigma"


def test_blur_probabilities_per_sample_and_per_channel():
    # p 0.2 per sample, then 0.5 per channel: a channel is blurred with p 0.1, both channels with p 0.05
    params = AugmentationParams(**{**NOTHING, "p_blur": 0.2, "p_blur_per_channel": 0.5})
    augmenter = PatchAugmenter((6, 6, 6), params)
    image = torch.from_numpy(np.random.default_rng(1).normal(size=(2, 6, 6, 6)).astype(np.float32))
    n = 1500
    changed = np.array([[not torch.equal(out[c], image[c]) for c in range(2)]
                        for out in (augmenter(image.clone(), None, seed=seed)[0] for seed in range(n))])
    for observed, p, count in ((changed.mean(), 0.1, 2 * n), (changed.all(axis=1).mean(), 0.05, n)):
        assert abs(observed - p) < 4 * np.sqrt(p * (1 - p) / count), (observed, p)


def test_border_is_image_zero_and_background():
    # the patch reads no margin and is zoomed out and rotated, so its corners lie outside the case: there the image
    # is 0 and the instance map background (nnDetection: seg border -1, mapped to 0 at the end of its chain)
    params = AugmentationParams(**{**NOTHING, "p_rotation": 1.0, "rotation_degrees": (-30.0, 30.0),
                                   "p_scaling": 1.0, "scaling_range": (1.4, 1.4), "use_extraction_margin": False})
    augmenter = PatchAugmenter((16, 16, 16), params)
    assert augmenter.input_size == (16, 16, 16)
    image, instances = torch.ones(1, 16, 16, 16), torch.full((16, 16, 16), 5, dtype=torch.int16)
    for seed in range(3):
        out, out_instances = augmenter(image.clone(), instances.clone(), seed=seed)
        assert set(torch.unique(out_instances).tolist()) == {0, 5}
        outside, inside = out[0] == 0, out[0] == 1
        assert outside.sum() > 100 and inside.sum() > 100
        assert (out_instances[outside] == 0).all() and (out_instances[inside] == 5).all()


def test_image_is_resampled_linearly_and_the_instance_map_by_nearest_neighbour():
    # scaling by 1.25 about the centre, inside the case: a linear ramp comes out as the exact linear ramp of the
    # scaled coordinates (order >= 1; nearest would give integers), and a step stays within its two values
    # (cubic interpolation overshoots a step)
    params = AugmentationParams(**{**NOTHING, "p_scaling": 1.0, "scaling_range": (1.25, 1.25)})
    augmenter = PatchAugmenter((8, 8, 8), params)
    region = augmenter.input_size
    assert region == (10, 10, 10)
    z = torch.arange(region[0], dtype=torch.float32)[:, None, None].expand(region)
    ramp, _ = augmenter(z[None].clone(), None, seed=0)
    expected = (torch.arange(8, dtype=torch.float32) - 3.5) * 1.25 + 4.5  # output voxel i samples c + 1.25 (i - c)
    torch.testing.assert_close(ramp[0], expected[:, None, None].expand(8, 8, 8), rtol=0, atol=1e-4)
    step = (z >= 4).float()  # the sample at 3.875 falls between the 0 at 3 and the 1 at 4
    out, out_instances = augmenter(step[None].clone(), step.to(torch.int16).clone(), seed=0)
    assert 0 <= out.min() and out.max() <= 1 and ((out > 0) & (out < 1)).any()
    assert set(torch.unique(out_instances).tolist()) == {0, 1}


def test_factors_fall_below_and_above_one_half_the_time_each():
    # batchgenerators' draw for scaling, contrast and gamma; uniform over (0.7, 1.5) would give 3/8 below 1
    sample = _below_or_above_one((0.7, 1.5))
    with seeded_global_rngs(0):
        draws = np.array([sample() for _ in range(4000)])
    assert draws.min() >= 0.7 and draws.max() <= 1.5
    assert abs((draws < 1).mean() - 0.5) < 4 * np.sqrt(0.25 / 4000)
    assert abs(draws[draws < 1].mean() - 0.85) < 0.01 and abs(draws[draws >= 1].mean() - 1.25) < 0.01


def test_release_defaults():
    # nnDetection's more_modular_ord1, value by value
    p = AugmentationParams()
    assert (p.p_rotation, p.rotation_degrees, p.p_scaling, p.scaling_range) == (0.2, (-30, 30), 0.2, (0.7, 1.4))
    assert (p.p_noise, p.noise_variance) == (0.1, (0.0, 0.1))
    assert (p.p_blur, p.p_blur_per_channel, p.blur_sigma) == (0.2, 0.5, (0.5, 1.0))
    assert (p.p_brightness, p.brightness_range, p.p_contrast, p.contrast_range) == (0.15, (0.75, 1.25), 0.15,
                                                                                    (0.75, 1.25))
    assert (p.p_gamma, p.p_gamma_inverted, p.gamma_range, p.mirror_axes) == (0.3, 0.1, (0.7, 1.5), (0, 1, 2))
