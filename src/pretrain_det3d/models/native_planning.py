"""Architecture planning of nnDetection's native Retina U-Net: kernels, strides, head levels and patch size.

nnDetection plans its plain convolutional encoder per dataset (``BoxC002`` in
``nndet/planning/architecture/boxes/c002.py``, on top of ``BoxC001`` in ``boxes/base.py``, which calls nnU-Net
v1's ``get_pool_and_conv_props`` in ``nnunet/experiment_planning/common_utils.py``). The rules, as written here
(our code, the release's rules):

1. **Initial patch** (``BoxC002._get_initial_patch_size``): per axis ``round(512 * max(spacing) / spacing)``,
   i.e. 512 voxels along the coarsest axis and proportionally more along the finer ones; then clipped: the
   coarsest axis (the first one on ties) to its median shape, every other axis to the *smallest* median shape
   of the other axes.
2. **Pooling and kernels** (nnU-Net v1 ``get_pool_and_conv_props``, ``min_feature_map_size`` 4, no cap on the
   pooling count): step by step, the axes whose current spacing is within a factor 2 of the smallest current
   spacing are pooled by 2, as long as their current size is at least ``2 * 4``; the conv kernel of the
   level is 3 along the largest group of axes whose spacings are pairwise within a factor 2 (the first such
   group on ties) and 1 along the others; the bottleneck level gets 3 everywhere. The patch is then rounded
   up to a multiple of ``2 ** pools`` per axis.
3. **Fit** (``BoxC001._plan_architecture``): while the patch does not fit, the axis with the largest
   ``patch / median shape`` (the last one on ties, as ``argsort(...)[::-1]``) shrinks by its divisor ``2 **
   pools`` (by half of it once its bottleneck is at most 4 voxels, the result truncated to an integer) and
   step 2 runs again. nnDetection measures the fit on a GPU (a training step on an 11 GB RTX 2080 Ti budget);
   that is hardware-bound and not reproducible here, so the fit is a voxel budget: ``prod(patch) <=
   max_patch_voxels`` (default 128^3, the patch of the release's fixed configurations; docs/settings.md).
4. **Head levels** (``BoxC002``: ``num_decoder_level`` 4, ``min_decoder_level`` 2): levels
   ``min(max(1, n - 4), 2) .. n - 1`` of an ``n``-level encoder
   (:func:`pretrain_det3d.models.retina_unet.release_head_levels`).
5. **Widths** (``BoxC002.create_default_settings``, 3D): ``start_channels`` 32, doubled per level up to
   ``max_channels`` 320; ``fpn_channels`` = 4 x 32 = 128; batch size 4.

The planner works in the array order of the preprocessed data (z, y, x); nnDetection first transposes the
axes (``transpose_forward``). The rules are symmetric under permuting axes except for ties, which the
transposition can resolve differently.

Example:
    >>> plan = plan_native_architecture([1.0, 1.0, 1.0], [64, 64, 64])
    >>> plan.patch_size, plan.strides, plan.decoder_levels
    ([64, 64, 64], [[2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]], [1, 2, 3, 4])
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

#: BoxC002 (3D): the coarsest axis spans 512 voxels before clipping to the median shape
INITIAL_PATCH_VOXELS = 512
#: BoxC002 (3D) / BoxC001: smallest bottleneck edge, and nnU-Net's pooling rule's lower size bound
MIN_FEATURE_MAP_SIZE = 4
#: BoxC001: no cap on the number of poolings per axis
MAX_NUM_POOL = 999
#: BoxC002 (3D): start channels, channel cap (nnU-Net's MAX_NUM_FILTERS_3D) and FPN width (4 x start channels)
START_CHANNELS = 32
MAX_CHANNELS = 320
FPN_CHANNELS = 4 * START_CHANNELS
#: our fit rule (nnDetection measures GPU memory): the patch volume of the release's fixed 128^3 configurations
DEFAULT_MAX_PATCH_VOXELS = 128**3
#: safety stop of the shrinking loop (a plan needs far fewer steps)
MAX_SHRINK_STEPS = 10000


@dataclass
class NativeArchitecture:
    """A planned (or checkpoint-given) native Retina U-Net: everything the network is built from.

    ``conv_kernels`` has one ``[kz, ky, kx]`` per encoder level; ``strides`` one per level after the first
    (the pooling into that level); ``decoder_levels`` are the head levels; ``patch_size`` is the planned
    patch (``None`` when the architecture comes from a checkpoint).
    """

    conv_kernels: list[list[int]]
    strides: list[list[int]]
    decoder_levels: list[int]
    start_channels: int = START_CHANNELS
    max_channels: int = MAX_CHANNELS
    fpn_channels: int = FPN_CHANNELS
    patch_size: list[int] | None = None
    num_pool_per_axis: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.conv_kernels = [_triple(k, "conv_kernels") for k in self.conv_kernels]
        self.strides = [_triple(s, "strides") for s in self.strides]
        self.decoder_levels = [int(level) for level in self.decoder_levels]
        if len(self.strides) != len(self.conv_kernels) - 1:
            raise ValueError(f"need one stride per level after the first: {len(self.conv_kernels)} levels, "
                             f"{len(self.strides)} strides")
        levels = len(self.conv_kernels)
        if not self.decoder_levels or sorted(set(self.decoder_levels)) != self.decoder_levels or \
                self.decoder_levels[0] < 0 or self.decoder_levels[-1] >= levels:
            raise ValueError(f"decoder_levels {self.decoder_levels} must be increasing levels of 0..{levels - 1}")
        if not self.num_pool_per_axis:
            self.num_pool_per_axis = [int(round(np.log2(v))) for v in self.divisor]

    @property
    def num_levels(self) -> int:
        return len(self.conv_kernels)

    @property
    def channels(self) -> list[int]:
        """Encoder width of each level: ``min(start * 2**level, max)`` (nnDetection's ``ConvBackbone``)."""
        return [min(self.start_channels * 2**level, self.max_channels) for level in range(self.num_levels)]

    @property
    def cumulative_strides(self) -> list[list[int]]:
        """Stride of each level's output relative to the input, per axis."""
        out = [[1, 1, 1]]
        for stride in self.strides:
            out.append([a * b for a, b in zip(out[-1], stride)])
        return out

    @property
    def divisor(self) -> list[int]:
        """What every patch edge must be a multiple of (the total stride per axis)."""
        return self.cumulative_strides[-1]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (the detector's build arguments keep it)."""
        return asdict(self)


def _triple(value: Any, name: str) -> list[int]:
    values = [int(value)] * 3 if np.ndim(value) == 0 else [int(v) for v in value]
    if len(values) != 3 or min(values) < 1:
        raise ValueError(f"{name}: expected a positive integer or [z, y, x], got {value!r}")
    return values


def initial_patch_size(spacing: Sequence[float], median_shape: Sequence[float]) -> list[int]:
    """Step 1 of the module docstring (``BoxC002._get_initial_patch_size``).

    Example:
        >>> initial_patch_size([2.5, 0.8, 0.8], [120, 400, 380])
        [120, 380, 380]
    """
    spacing = np.asarray(spacing, dtype=np.float64)
    median = np.asarray(median_shape, dtype=np.float64)
    per_mm = 1.0 / spacing
    relative = per_mm / per_mm.mean()
    start = np.round(relative * (INITIAL_PATCH_VOXELS / relative.min())).astype(np.int32)
    coarse = int(np.argmax(spacing))
    finer_median = min(median[i] for i in range(len(median)) if i != coarse)
    clipped = [min(start[i], median[i] if i == coarse else finer_median) for i in range(len(median))]
    return [int(v) for v in np.round(clipped).astype(np.int32)]


def pool_and_conv_props(
    spacing: Sequence[float],
    patch_size: Sequence[int],
    min_feature_map_size: int = MIN_FEATURE_MAP_SIZE,
    max_num_pool: int = MAX_NUM_POOL,
) -> tuple[list[int], list[list[int]], list[list[int]], list[int], list[int]]:
    """Step 2 of the module docstring (nnU-Net v1's ``get_pool_and_conv_props``).

    Returns ``(pools per axis, pooling strides per step, conv kernels per level, padded patch, divisor)``.

    Example:
        >>> pools, strides, kernels, patch, divisor = pool_and_conv_props([3.0, 1.0, 1.0], [44, 96, 96])
        >>> strides[:2], kernels[:2], patch, divisor
        ([[1, 2, 2], [2, 2, 2]], [[1, 3, 3], [3, 3, 3]], [48, 96, 96], [8, 16, 16])
    """
    dims = len(spacing)
    current_spacing = [float(s) for s in spacing]
    current_size = [float(p) for p in patch_size]
    pools = [0] * dims
    strides: list[list[int]] = []
    kernels: list[list[int]] = []
    while True:
        smallest = min(current_spacing)
        poolable = [i for i in range(dims) if current_spacing[i] / smallest < 2]
        # conv kernels: 3 along the largest group of axes whose spacings are pairwise within a factor 2
        group: list[int] = []
        for axis in range(dims):
            partners = [i for i in range(dims)
                        if current_spacing[i] / current_spacing[axis] < 2 and current_spacing[axis] / current_spacing[i] < 2]
            if len(partners) > len(group):
                group = partners
        kernel = [3 if i in group else 1 for i in range(dims)]
        poolable = [i for i in poolable if current_size[i] >= 2 * min_feature_map_size and pools[i] < max_num_pool]
        if not poolable:
            break
        step = [2 if i in poolable else 1 for i in range(dims)]
        for i in poolable:
            pools[i] += 1
            current_spacing[i] *= 2
            current_size[i] /= 2
        strides.append(step)
        kernels.append(kernel)
    kernels.append([3] * dims)
    divisor = [2**p for p in pools]
    padded = [int(-(-int(p) // d) * d) for p, d in zip(patch_size, divisor)]  # round up to a multiple
    return pools, strides, kernels, padded, divisor


def shrink_patch(
    patch_size: Sequence[int],
    median_shape: Sequence[float],
    strides: Sequence[Sequence[int]],
    divisor: Sequence[int],
    min_feature_map_size: int = MIN_FEATURE_MAP_SIZE,
) -> list[int]:
    """Step 3's shrinking (``BoxC001._decrease_patch_size``): one axis loses its divisor (or half of it).

    Example:
        >>> shrink_patch([64, 128, 128], [100, 130, 130], [[2, 2, 2]] * 4, [16, 16, 16])
        [64, 128, 112]
    """
    patch = np.asarray(patch_size, dtype=np.float64)
    order = np.argsort(patch / np.asarray(median_shape, dtype=np.float64))[::-1]
    axis = int(order[0])
    pooled = np.prod(np.asarray(strides, dtype=np.int64).reshape(-1, len(patch_size)), axis=0)
    bottleneck = patch[axis] / pooled[axis]
    reduction = divisor[axis] if bottleneck > min_feature_map_size else divisor[axis] / 2
    out = [int(p) for p in patch_size]
    out[axis] = int(out[axis] - reduction)  # numpy's integer item assignment truncates
    return out


def release_decoder_levels(num_levels: int) -> list[int]:
    """Step 4 (the same rule as the ResEnc Retina U-Net's head levels)."""
    from pretrain_det3d.models.retina_unet import release_head_levels

    return release_head_levels(num_levels)


def plan_native_architecture(
    spacing: Sequence[float],
    median_shape: Sequence[float],
    max_patch_voxels: int = DEFAULT_MAX_PATCH_VOXELS,
    start_channels: int = START_CHANNELS,
    max_channels: int = MAX_CHANNELS,
    fpn_channels: int = FPN_CHANNELS,
    min_feature_map_size: int = MIN_FEATURE_MAP_SIZE,
) -> NativeArchitecture:
    """Plan patch size, kernels, strides and head levels for a dataset (steps 1-5 of the module docstring).

    ``spacing`` is the target spacing and ``median_shape`` the median shape after resampling, both [z, y, x]
    (``plan.json``'s ``target_spacing`` and ``median_shape``).

    Example:
        >>> plan_native_architecture([2.0, 1.0, 1.0], [40, 80, 80]).conv_kernels[:2]
        [[1, 3, 3], [3, 3, 3]]
    """
    if len(spacing) != 3 or len(median_shape) != 3:
        raise ValueError(f"need a [z, y, x] spacing and median shape, got {list(spacing)} and {list(median_shape)}")
    if min(spacing) <= 0 or min(median_shape) < 1:
        raise ValueError(f"spacing must be > 0 and the median shape >= 1, got {list(spacing)}, {list(median_shape)}")
    patch = initial_patch_size(spacing, median_shape)
    pools, strides, kernels, patch, divisor = pool_and_conv_props(spacing, patch, min_feature_map_size)
    for _ in range(MAX_SHRINK_STEPS):
        if int(np.prod(patch)) <= max_patch_voxels:
            break
        smaller = shrink_patch(patch, median_shape, strides, divisor, min_feature_map_size)
        pools, strides, kernels, patch, divisor = pool_and_conv_props(spacing, smaller, min_feature_map_size)
    else:
        raise ValueError(f"no patch of at most {max_patch_voxels} voxels found for spacing {list(spacing)} and "
                         f"median shape {list(median_shape)}")
    return NativeArchitecture(
        conv_kernels=kernels, strides=strides, decoder_levels=release_decoder_levels(len(kernels)),
        start_channels=start_channels, max_channels=max_channels, fpn_channels=fpn_channels,
        patch_size=[int(p) for p in patch], num_pool_per_axis=[int(p) for p in pools],
    )
