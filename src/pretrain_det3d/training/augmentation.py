"""Data augmentation of training patches as nnDetection's ``more_modular_ord1`` (the authors' release), built on
batchgeneratorsv2.

The chain follows nnDetection's ``AugModular`` pipeline, in its order: rotation and isotropic scaling (one
resampling, image order 1 = trilinear, instance map nearest), Gaussian noise, Gaussian blur, multiplicative
brightness, contrast, inverted gamma, gamma, mirroring. Scaling, contrast and gamma factors are drawn as
batchgenerators draws them: half the time below 1, half the time above (``BGContrast``). The blur is scipy's
``gaussian_filter`` (reflecting borders, truncated at 4 sigma), each channel blurred with probability
``p_blur_per_channel`` and its own sigma, the same on every axis, as the batchgenerators transform the release runs.
Outside the case the image is 0 and the instance map background: nnDetection pads its segmentation with -1 and
maps -1 to 0 at the end of the chain; with nearest interpolation that is the same as padding with 0, done here.

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
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from scipy.ndimage import gaussian_filter
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform, ImageOnlyTransform
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
# nnDetection's order_data 1: (tri)linear resampling of the image
IMAGE_INTERPOLATION = "bilinear"  # torch's grid_sample calls trilinear "bilinear" for 5-D input
# value written outside the case after rotation/scaling (nnDetection: border_cval_data 0; the segmentation's
# border_cval_seg -1 becomes 0 through RemoveLabelTransform(-1, 0) at the end of its chain)
IMAGE_BORDER_VALUE = 0.0
INSTANCE_MAP_BORDER_VALUE = 0
# batchgenerators' GaussianBlurTransform calls scipy's gaussian_filter with its defaults
BLUR_MODE = "reflect"
BLUR_TRUNCATE = 4.0


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


class GaussianBlur(ImageOnlyTransform):
    """Blur each channel with probability ``p_per_channel``, with its own sigma drawn uniformly from
    ``sigma_range`` and used on every axis (scipy's ``gaussian_filter``, reflecting borders, 4-sigma kernel).

    The random draws use numpy's global generator, like the rest of the chain (``seeded_global_rngs``).

    Example:
        >>> blur = GaussianBlur((1.0, 1.0), p_per_channel=1.0)
        >>> image = torch.zeros(1, 5, 5, 5); image[0, 2, 2, 2] = 1
        >>> out = blur(image=image)["image"]
        >>> round(float(out.sum()), 4), round(float(out[0, 2, 2, 2]), 4)
        (1.0, 0.0635)
    """

    def __init__(self, sigma_range: Sequence[float], p_per_channel: float) -> None:
        super().__init__()
        low, high = (float(v) for v in sigma_range)
        if not 0 < low <= high:
            raise ValueError(f"settings key 'augmentation.blur_sigma' must be 0 < low <= high, got {sigma_range}")
        self.sigma_range = (low, high)
        self.p_per_channel = float(p_per_channel)

    def get_parameters(self, **data_dict: Any) -> dict:
        sigmas: list[float | None] = []
        for _ in range(data_dict["image"].shape[0]):
            blurred = np.random.uniform() < self.p_per_channel
            sigmas.append(float(np.random.uniform(*self.sigma_range)) if blurred else None)
        return {"sigmas": sigmas}

    def _apply_to_image(self, img: torch.Tensor, **params: Any) -> torch.Tensor:
        for channel, sigma in enumerate(params["sigmas"]):
            if sigma is not None:
                blurred = gaussian_filter(img[channel].numpy(), sigma, mode=BLUR_MODE, truncate=BLUR_TRUNCATE)
                img[channel] = torch.from_numpy(blurred)
        return img

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sigma_range={self.sigma_range}, p_per_channel={self.p_per_channel})"


def _below_or_above_one(value_range: Sequence[float]) -> Any:
    """A sampler of factors as batchgenerators draws them: with probability 1/2 uniform in [low, 1) (when
    low < 1), else uniform in [max(low, 1), high]."""
    return BGContrast(tuple(float(v) for v in value_range)).sample_contrast


def _build_transforms(patch_size: Sequence[int], params: AugmentationParams) -> BasicTransform:
    """The chain of nnDetection's ``AugModular`` pipeline with the probabilities and ranges of ``params``."""
    rotation = tuple(math.radians(a) for a in params.rotation_degrees)
    transforms: list[BasicTransform] = [
        SpatialTransform(
            patch_size=tuple(int(s) for s in patch_size),
            patch_center_dist_from_border=0,
            random_crop=False,  # the patch was centred by the sampler; keep that centre
            p_elastic_deform=0,  # more_modular_ord1: do_elastic False
            p_rotation=params.p_rotation,
            rotation=rotation,  # all three axes, each its own angle
            p_scaling=params.p_scaling,
            scaling=_below_or_above_one(params.scaling_range),
            p_synchronize_scaling_across_axes=1,  # isotropic scaling, as nnDetection
            mode_seg=INSTANCE_MAP_INTERPOLATION,
            border_mode_seg="constant",
            padding_value_seg=INSTANCE_MAP_BORDER_VALUE,
            mode_image=IMAGE_INTERPOLATION,
            padding_mode_image="constant",
            padding_value_image=IMAGE_BORDER_VALUE,
        )
    ]
    if params.p_noise > 0:  # batchgenerators' default: one noise level for all channels
        transforms.append(RandomTransform(
            GaussianNoiseTransform(noise_variance=tuple(params.noise_variance), synchronize_channels=True),
            params.p_noise,
        ))
    if params.p_blur > 0:
        transforms.append(RandomTransform(GaussianBlur(params.blur_sigma, params.p_blur_per_channel), params.p_blur))
    if params.p_brightness > 0:
        transforms.append(RandomTransform(
            MultiplicativeBrightnessTransform(tuple(params.brightness_range), synchronize_channels=False),
            params.p_brightness,
        ))
    if params.p_contrast > 0:
        transforms.append(RandomTransform(
            ContrastTransform(_below_or_above_one(params.contrast_range), preserve_range=True,
                              synchronize_channels=False),
            params.p_contrast,
        ))
    if params.p_gamma_inverted > 0:
        transforms.append(RandomTransform(
            GammaTransform(_below_or_above_one(params.gamma_range), p_invert_image=1, synchronize_channels=False,
                           p_per_channel=1, p_retain_stats=1),
            params.p_gamma_inverted,
        ))
    if params.p_gamma > 0:
        transforms.append(RandomTransform(
            GammaTransform(_below_or_above_one(params.gamma_range), p_invert_image=0, synchronize_channels=False,
                           p_per_channel=1, p_retain_stats=1),
            params.p_gamma,
        ))
    if params.mirror_axes:  # last in nnDetection's chain
        transforms.append(MirrorTransform(allowed_axes=tuple(params.mirror_axes)))
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
