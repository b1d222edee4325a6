"""Tests for models.native_planning: nnDetection's BoxC002 architecture plan, worked out by hand."""

from __future__ import annotations

import pytest

from pretrain_det3d.models.native_planning import (
    DEFAULT_MAX_PATCH_VOXELS,
    NativeArchitecture,
    initial_patch_size,
    plan_native_architecture,
    pool_and_conv_props,
    shrink_patch,
)


def test_anisotropic_ct_plan_with_one_shrink_step() -> None:
    # spacing [3, 0.75, 0.75] mm, median shape [60, 200, 180]:
    # 1. initial patch 512 * 3 / s = [512, 2048, 2048]; the coarse axis 0 is clipped to its median 60, the other
    #    axes to the smallest median among them, 180 -> [60, 180, 180].
    # 2. pooling: steps 0-1 pool y, x only (3 / 0.75 = 4, then 3 / 1.5 = 2: not within a factor 2) with kernels
    #    [1, 3, 3]; steps 2-4 pool every axis (sizes 60-45-45, 30-22.5-22.5, 15-11.25-11.25 are >= 8); step 5
    #    stops (7.5, 5.6, 5.6 < 8). Pools [3, 5, 5], divisor [8, 32, 32], padded patch [64, 192, 192].
    # 3. 64 * 192 * 192 = 2,359,296 > 128^3: patch / median = [16/15, 0.96, 16/15], a tie between z and x that
    #    argsort(...)[::-1] gives to x; its bottleneck 192 / 32 = 6 > 4, so x shrinks by 32 to 160.
    #    Replanning [64, 192, 160] (from the padded 64): z now reaches 8 after 3 pools, so step 5 pools z alone.
    #    Pools [4, 5, 5], divisor [16, 32, 32]; 64 * 192 * 160 = 1,966,080 fits.
    # 4. 7 levels: head levels min(max(1, 7 - 4), 2) .. 6.
    assert initial_patch_size([3.0, 0.75, 0.75], [60, 200, 180]) == [60, 180, 180]
    first = pool_and_conv_props([3.0, 0.75, 0.75], [60, 180, 180])
    assert first[0] == [3, 5, 5] and first[3] == [64, 192, 192] and first[4] == [8, 32, 32]
    assert shrink_patch(first[3], [60, 200, 180], first[1], first[4]) == [64, 192, 160]

    plan = plan_native_architecture([3.0, 0.75, 0.75], [60, 200, 180])
    assert plan.patch_size == [64, 192, 160]
    assert plan.strides == [[1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 1, 1]]
    assert plan.conv_kernels == [[1, 3, 3], [1, 3, 3]] + [[3, 3, 3]] * 5
    assert plan.num_pool_per_axis == [4, 5, 5] and plan.divisor == [16, 32, 32]
    assert plan.decoder_levels == [2, 3, 4, 5, 6]
    assert plan.channels == [32, 64, 128, 256, 320, 320, 320] and plan.fpn_channels == 128
    assert plan.cumulative_strides[2] == [1, 4, 4]


def test_isotropic_plan_shrinks_with_half_divisors_and_ties() -> None:
    # spacing 1 mm, median shape [40, 48, 36], a budget of 20,000 voxels:
    # initial [min(512, 40), min(512, 36), min(512, 36)] = [40, 36, 36] (y clipped to x's median 36);
    # 3 pools per axis, divisor 8, padded [40, 40, 40] = 64,000 voxels. Shrink steps (axis with the largest
    # patch / median; reduction = divisor, or half of it once the bottleneck is <= 4):
    #   x: 40 -> 32 (bottleneck 5)   -> [40, 40, 32] = 51,200
    #   z: 40 -> 32 (bottleneck 5)   -> [32, 40, 32] = 40,960
    #   x: 32 -> 28 (bottleneck 4: half of 8); x then pools twice: divisor [8, 8, 4] -> 35,840
    #   y: 40 -> 32 (bottleneck 5)   -> [32, 32, 28] = 28,672
    #   z: 32 -> 28 (bottleneck 4: half); z pools twice, y alone in step 2: divisor [4, 8, 4] -> 25,088
    #   x: 28 -> 24 (bottleneck 7, divisor 4) -> [28, 32, 24] = 21,504
    #   z (28/40 = 0.7 beats y's and x's 2/3): 28 -> 24 (bottleneck 7) -> [24, 32, 24] = 18,432, which fits.
    plan = plan_native_architecture([1.0, 1.0, 1.0], [40, 48, 36], max_patch_voxels=20_000)
    assert plan.patch_size == [24, 32, 24]
    assert plan.strides == [[2, 2, 2], [2, 2, 2], [1, 2, 1]]
    assert plan.conv_kernels == [[3, 3, 3]] * 4
    assert plan.divisor == [4, 8, 4]
    assert plan.decoder_levels == [1, 2, 3]
    # with the default budget nothing shrinks
    assert plan_native_architecture([1.0, 1.0, 1.0], [40, 48, 36]).patch_size == [40, 40, 40]
    assert DEFAULT_MAX_PATCH_VOXELS == 128**3


def test_conv_kernels_follow_the_largest_group_of_similar_spacings() -> None:
    # [1, 1.5, 4]: z and y are within a factor 2 of each other, x is not: kernels [3, 3, 1], and only z, y pool
    # (4 / 1 >= 2). After that pool the spacings are [2, 3, 4]: every axis is within a factor 2 of y's 3, so
    # the kernels become [3, 3, 3], while x (4 / 2 = 2, not below 2) still does not pool.
    pools, strides, kernels, _, _ = pool_and_conv_props([1.0, 1.5, 4.0], [32, 32, 32])
    assert strides[0] == [2, 2, 1] and kernels[0] == [3, 3, 1]
    assert strides[1] == [2, 2, 1] and kernels[1] == [3, 3, 3]


def test_architecture_checks_its_shape() -> None:
    with pytest.raises(ValueError, match="one stride per level"):
        NativeArchitecture([[3, 3, 3]] * 3, [[2, 2, 2]], [1, 2])
    with pytest.raises(ValueError, match="decoder_levels"):
        NativeArchitecture([[3, 3, 3]] * 3, [[2, 2, 2]] * 2, [2, 3])
    with pytest.raises(ValueError, match="median shape"):
        plan_native_architecture([1.0, 1.0], [32, 32])
