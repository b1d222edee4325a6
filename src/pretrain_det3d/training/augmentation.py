"""Data augmentation of training patches (nnDetection-like defaults), built on batchgeneratorsv2.

A patch is first read from the case with a margin (``extraction_size``), so that rotating and scaling samples
image content rather than padding; the spatial transform then resamples it down to ``patch_size`` around the
centre. The instance map goes through the same grid with *nearest* interpolation, which keeps it an instance
map: every output voxel carries an id that was present in the input (tests pin this), so boxes can be
recomputed from it after augmentation.

batchgeneratorsv2 draws its random numbers from the global numpy and torch generators. ``PatchAugmenter`` runs
it inside ``seeded_global_rngs(seed)``, which sets both from the sample's own seed and restores them afterwards,
so every augmented patch is a pure function of its seed (independent of worker count and of training state).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
from batchgeneratorsv2.transforms.intensity.contrast import BGContrast, ContrastTransform
from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.random import RandomTransform

from pretrain_det3d.settings.training import AugmentationSettings

# the instance map must stay an instance map: nearest neighbour never invents an id
INSTANCE_MAP_INTERPOLATION = "nearest"


#: every probability and range of the augmentation; the settings class is its one definition
AugmentationParams = AugmentationSettings


def extraction_size(patch_size: Sequence[int], params: AugmentationParams | None) -> tuple[int, ...]:
    """Size of the region read from a case so that the augmented patch rarely samples outside it.

    Per axis: the largest extent of the patch, scaled by the largest scaling factor, rotated by the largest
    angle about any single axis. The margin is added symmetrically (an even number of voxels) so that the
    region and the final patch share their centre voxel exactly.

    Example:
        >>> extraction_size((32, 32, 32), None)
        (32, 32, 32)
        >>> extraction_size((32, 32, 32), AugmentationParams(p_rotation=0.0, p_scaling=1.0, scaling_range=(1.0, 1.5)))
        (48, 48, 48)
    """
    patch = [int(s) for s in patch_size]
    if params is None or not params.spatial_enabled or not params.use_extraction_margin:
        return tuple(patch)
    scale = max(params.scaling_range) if params.p_scaling > 0 else 1.0
    angle = math.radians(max(abs(a) for a in params.rotation_degrees)) if params.p_rotation > 0 else 0.0
    half = np.asarray(patch, dtype=np.float64) / 2 * max(scale, 1.0)
    extent = half.copy()
    cos, sin = abs(math.cos(angle)), abs(math.sin(angle))
    for axis in range(3):  # rotation about `axis` mixes the other two axes
        a, b = [i for i in range(3) if i != axis]
        extent[a] = max(extent[a], cos * half[a] + sin * half[b])
        extent[b] = max(extent[b], sin * half[a] + cos * half[b])
    margins = [max(0, math.ceil(e - p / 2)) for e, p in zip(extent, patch)]
    return tuple(p + 2 * m for p, m in zip(patch, margins))


@contextlib.contextmanager
def seeded_global_rngs(seed: int) -> Iterator[None]:
    """Seed numpy's and torch's global generators for the block, then restore their previous states.

    Example:
        >>> with seeded_global_rngs(3):
        ...     a = np.random.rand()
        >>> with seeded_global_rngs(3):
        ...     b = np.random.rand()
        >>> a == b
        True
    """
    numpy_state = np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            np.random.set_state(numpy_state)


def _build_transforms(patch_size: Sequence[int], params: AugmentationParams) -> BasicTransform:
    rotation = tuple(math.radians(a) for a in params.rotation_degrees)
    transforms: list[BasicTransform] = [
        SpatialTransform(
            patch_size=tuple(int(s) for s in patch_size),
            patch_center_dist_from_border=0,
            random_crop=False,  # the patch was centred by the sampler; keep that centre
            p_elastic_deform=0,
            p_rotation=params.p_rotation,
            rotation=rotation,
            p_scaling=params.p_scaling,
            scaling=tuple(params.scaling_range),
            p_synchronize_scaling_across_axes=1,  # isotropic scaling, as nnDetection
            mode_seg=INSTANCE_MAP_INTERPOLATION,
            border_mode_seg="zeros",
            mode_image="bilinear",
            padding_mode_image="zeros",
        )
    ]
    if params.mirror_axes:
        transforms.append(MirrorTransform(allowed_axes=tuple(params.mirror_axes)))
    if params.p_noise > 0:
        transforms.append(
            RandomTransform(GaussianNoiseTransform(noise_variance=tuple(params.noise_variance)), params.p_noise)
        )
    if params.p_brightness > 0:
        transforms.append(
            RandomTransform(
                MultiplicativeBrightnessTransform(tuple(params.brightness_range), synchronize_channels=False),
                params.p_brightness,
            )
        )
    if params.p_contrast > 0:
        transforms.append(
            RandomTransform(
                ContrastTransform(
                    BGContrast(tuple(params.contrast_range)).sample_contrast,
                    preserve_range=True,
                    synchronize_channels=False,
                ),
                params.p_contrast,
            )
        )
    if params.p_gamma_inverted > 0:
        transforms.append(
            RandomTransform(
                GammaTransform(tuple(params.gamma_range), p_invert_image=1, synchronize_channels=False,
                               p_per_channel=1, p_retain_stats=1),
                params.p_gamma_inverted,
            )
        )
    if params.p_gamma > 0:
        transforms.append(
            RandomTransform(
                GammaTransform(tuple(params.gamma_range), p_invert_image=0, synchronize_channels=False,
                               p_per_channel=1, p_retain_stats=1),
                params.p_gamma,
            )
        )
    return ComposeTransforms(transforms)


@dataclass
class PatchAugmenter:
    """Augment one extracted region and cut the final patch from its centre.

    ``params=None`` switches augmentation off: the region is only centre-cropped to ``patch_size``.

    Example:
        >>> aug = PatchAugmenter((8, 8, 8), None)
        >>> image, instances = aug(torch.zeros(1, 8, 8, 8), torch.zeros(8, 8, 8, dtype=torch.int16), seed=0)
        >>> tuple(image.shape), tuple(instances.shape)
        ((1, 8, 8, 8), (8, 8, 8))
    """

    patch_size: tuple[int, ...]
    params: AugmentationParams | None
    _transforms: BasicTransform | None = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        self.patch_size = tuple(int(s) for s in self.patch_size)
        if self.params is not None:
            self._transforms = _build_transforms(self.patch_size, self.params)

    @property
    def input_size(self) -> tuple[int, ...]:
        """Size of the region the caller must extract."""
        return extraction_size(self.patch_size, self.params)

    def __call__(
        self, image: torch.Tensor, instance_map: torch.Tensor | None, seed: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``image [C, *input_size]`` float, ``instance_map [*input_size]`` int -> the same at ``patch_size``."""
        if tuple(image.shape[1:]) != self.input_size:
            raise ValueError(f"expected a region of size {self.input_size}, got {tuple(image.shape[1:])}")
        if self._transforms is None:
            return _centre_crop(image, self.patch_size), (
                None if instance_map is None else _centre_crop(instance_map[None], self.patch_size)[0]
            )
        data: dict[str, torch.Tensor] = {"image": image.float().clone()}
        if instance_map is not None:
            data["segmentation"] = instance_map[None]  # [1, Z, Y, X]: batchgeneratorsv2 wants a channel axis
        with seeded_global_rngs(seed):
            out = self._transforms(**data)
        return out["image"].contiguous(), (None if instance_map is None else out["segmentation"][0].contiguous())


def _centre_crop(tensor: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    starts = [(s - p) // 2 for s, p in zip(tensor.shape[1:], size)]
    return tensor[(slice(None),) + tuple(slice(b, b + p) for b, p in zip(starts, size))]
