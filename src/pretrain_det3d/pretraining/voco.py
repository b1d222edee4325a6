"""Volume contrast (VoCo, Wu et al., CVPR 2024) as nnssl's ``VoCoTrainer`` releases it.

Each training patch (``patch_size``, drawn by the shared patch stream) is the *region*. It is cut into a grid of
``base_grid`` non-overlapping *base crops* (default ``[1, 4, 4]``: a 4 x 4 grid in the (y, x) plane, as nnssl's
VoCoTrainer with its 256 x 256 x 64 region; ``[2, 2, 2]`` gives a 3-D grid), and ``num_target_crops`` *target
crops* of the same size are drawn at random positions inside the region. The label of a target crop is its
overlap volume with every base crop divided by the crop volume; as the base crops tile the region, the labels of
one target crop sum to 1. With ``crop_augmentation`` every crop is then augmented on its own (nnssl's
``VocoTransform``, ``aug="train"``; the labels stay those of the un-augmented positions). Cutting and augmenting
happen in the data stream (:class:`VoCoBatchStream`), so they run in the loader's worker processes.

Every crop goes through the ResEnc encoder; each stage's output is averaged over space, the stage averages are
concatenated and nnssl's projector (3 linear layers 2048 wide, each hidden layer normalised per sample, ReLU) maps
them to an embedding. The loss has two terms, as nnssl's ``VoCoLoss`` (which follows the VoCo authors' code, not
the paper's equations):

- prediction, with ``s_ij = relu(cos(target_i, base_j))`` (base embeddings detached) and ``y_ij`` the overlap
  proportion, over all pairs of the batch: ``sum_{y>0} y * -log(1 - |y - s| + 1e-6) / sum y`` (positives,
  weighted by their overlap) ``+ mean_{y=0} s^2`` (pairs that do not overlap are pushed to similarity 0);
- regularisation: the mean ``relu(cos(base_j, base_k))`` over pairs ``j < k`` of the same region (no gradient
  stop), pushing different base crops towards non-positive similarity.

``loss = prediction_weight * prediction + regularisation_weight * regularisation``. Only the encoder
(``.encoder.stem`` / ``.encoder.stages``) transfers; the projector is discarded. docs/pretraining/voco.md lists
the hyperparameters with their sources and every deliberate difference from the reference.

Example:
    >>> trainer = METHODS.get("voco")({"preset": "resenc_demo", "patch_size": [32, 64, 64], "base_grid": [1, 2, 2]},
    ...                               records, in_channels=1, out_path="ckpt.pth", seed=0)  # doctest: +SKIP
    >>> trainer.run()  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pretrain_det3d.pretraining.trainer import METHODS, PretrainingTrainer
from pretrain_det3d.settings.pretraining import VoCoSettings
from pretrain_det3d.settings.pretraining import (
    training_defaults as method_training_defaults,
)
from pretrain_det3d.training.dataloader import PatchBatchStream

BASE_GRID = VoCoSettings.default("base_grid")  # base crops per axis (z, y, x)
NUM_TARGET_CROPS = VoCoSettings.default("num_target_crops")  # random target crops per region
PROJECTION_HIDDEN = VoCoSettings.default("projection_hidden")
PROJECTION_DIM = VoCoSettings.default("projection_dim")
PREDICTION_WEIGHT = VoCoSettings.default("prediction_weight")
REGULARISATION_WEIGHT = VoCoSettings.default("regularisation_weight")
CROP_AUGMENTATION = VoCoSettings.default("crop_augmentation")
# nnssl's voco_loss.py adds 1e-6 inside the log: keeps -log(1 - d) finite when a similarity is maximally wrong
LOG_EPSILON = 1e-6
# nnssl's projector normalises each hidden layer with InstanceNorm1d(affine=False) on a [K, width] input, which
# torch treats as one unbatched sample: every embedding normalised over its own features (eps: torch's default)
PROJECTION_NORM_EPS = 1e-5
RNG_SALT_TARGETS = 1  # salt of the batch seed for the target crop positions
RNG_SALT_AUGMENT = 2  # salt of the per-crop augmentation seeds

# --- per-crop augmentation: nnssl's ssl_data/dataloading/voco_transform.py (VocoTransform, aug="train"), in its
# order, through the same batchgenerators classes; every probability is per crop
P_NOISE = 0.1  # GaussianNoiseTransform, noise "variance" (used as std by batchgenerators) in (0, 0.1)
NOISE_VARIANCE = (0.0, 0.1)
P_BLUR = 0.2  # GaussianBlurTransform, sigma in (0.5, 1), each channel with p 0.5 and its own sigma
BLUR_SIGMA = (0.5, 1.0)
P_BLUR_PER_CHANNEL = 0.5
P_BRIGHTNESS = 0.15  # BrightnessMultiplicativeTransform, factor in (0.75, 1.25)
BRIGHTNESS_RANGE = (0.75, 1.25)
P_CONTRAST = 0.15  # ContrastAugmentationTransform with its defaults (0.75, 1.25), range preserved
P_LOW_RESOLUTION = 0.1  # SimulateLowResolutionTransform: zoom (0.5, 1), nearest down, cubic up, p 0.5 / channel
LOW_RESOLUTION_ZOOM = (0.5, 1.0)
P_LOW_RESOLUTION_PER_CHANNEL = 0.5
P_GAMMA_INVERTED = 0.1  # GammaTransform of the inverted crop, gamma in (0.7, 1.5), statistics retained
P_GAMMA = 0.3  # GammaTransform, gamma in (0.7, 1.5), statistics retained
GAMMA_RANGE = (0.7, 1.5)
MIRROR_AXES = (0, 1, 2)  # each axis flipped with probability 0.5 (three MirrorTransforms in nnssl)
P_ROT90 = 0.3  # Rot90Transform's default probability; 90, 180 or 270 degrees
# nnssl rotates about its axes (0, 1), the two 256-voxel axes of its 256x256x64 region split 4 x 4: the plane of
# the base grid. In this project's [z, y, x] order that plane is (y, x)
ROT90_AXES = (1, 2)


def _triple(value: int | Sequence[int], key: str) -> tuple[int, int, int]:
    values = [int(value)] * 3 if isinstance(value, (int, float)) else [int(v) for v in value]
    if len(values) != 3 or min(values) < 1:
        raise ValueError(f"settings key {key!r} must be a positive integer or three of them, got {value!r}")
    return values[0], values[1], values[2]


def crop_size_for(patch_size: Sequence[int], base_grid: Sequence[int]) -> tuple[int, int, int]:
    """Edge of the base and target crops: the region (patch) divided by the grid; must divide exactly.

    Example:
        >>> crop_size_for((64, 256, 256), (1, 4, 4))
        (64, 64, 64)
    """
    if any(int(p) % int(g) for p, g in zip(patch_size, base_grid)):
        raise ValueError(
            f"settings key 'base_grid' {list(base_grid)} must divide every edge of 'patch_size' {list(patch_size)}"
        )
    crop = tuple(int(p) // int(g) for p, g in zip(patch_size, base_grid))
    return crop  # type: ignore[return-value]


def base_crop_starts(base_grid: Sequence[int], crop_size: Sequence[int]) -> torch.Tensor:
    """First voxel of every base crop, ``[N, 3]`` with ``N = prod(base_grid)``, in C order over (z, y, x).

    Example:
        >>> base_crop_starts((1, 1, 2), (4, 4, 4)).tolist()
        [[0, 0, 0], [0, 0, 4]]
    """
    axes = [torch.arange(g) * c for g, c in zip(base_grid, crop_size)]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)  # [gz, gy, gx, 3]
    return grid.reshape(-1, 3)


def overlap_proportions(
    target_starts: torch.Tensor, base_starts: torch.Tensor, crop_size: Sequence[int]
) -> torch.Tensor:
    """Overlap volume of each target crop with each base crop, over the crop volume: ``[..., T, N]``.

    ``target_starts`` is ``[..., T, 3]``, ``base_starts`` ``[N, 3]``; all crops have edge ``crop_size``. For
    axis-aligned boxes of equal size the overlap is the product of the per-axis overlaps
    ``max(0, size - |start_t - start_b|)``.

    Example (a target shifted by half a crop along z covers half of two base crops):
        >>> starts = base_crop_starts((2, 1, 1), (4, 4, 4))
        >>> overlap_proportions(torch.tensor([[2, 0, 0]]), starts, (4, 4, 4)).tolist()
        [[0.5, 0.5]]
    """
    size = torch.as_tensor(crop_size, dtype=torch.float64)
    offset = (target_starts[..., :, None, :].double() - base_starts[None, :, :].double()).abs()  # [..., T, N, 3]
    per_axis = (size - offset).clamp_min(0.0)
    return (per_axis.prod(dim=-1) / size.prod()).float()  # [..., T, N]


def draw_target_starts(
    batch_size: int,
    num_targets: int,
    patch_size: Sequence[int],
    crop_size: Sequence[int],
    generator: torch.Generator,
) -> torch.Tensor:
    """Uniform integer starts ``[B, T, 3]`` of target crops lying wholly inside the region.

    Example:
        >>> draw_target_starts(1, 2, (8, 8, 8), (8, 4, 8), torch.Generator().manual_seed(0))[..., 0].tolist()
        [[0, 0]]
    """
    highest = torch.as_tensor([int(p) - int(c) for p, c in zip(patch_size, crop_size)])  # inclusive
    uniform = torch.rand(batch_size, num_targets, 3, generator=generator)
    return torch.minimum((uniform * (highest + 1)).long(), highest)


def cut_crops(images: torch.Tensor, starts: torch.Tensor, crop_size: Sequence[int]) -> torch.Tensor:
    """Crops ``[B * K, C, cz, cy, cx]`` of ``images [B, C, Z, Y, X]`` at ``starts [B, K, 3]`` (sample-major).

    Example:
        >>> cut_crops(torch.zeros(2, 1, 8, 8, 8), torch.zeros(2, 3, 3, dtype=torch.long), (4, 4, 4)).shape
        torch.Size([6, 1, 4, 4, 4])
    """
    cz, cy, cx = (int(c) for c in crop_size)
    crops = [
        images[b, :, z : z + cz, y : y + cy, x : x + cx]
        for b in range(starts.shape[0])
        for z, y, x in starts[b].tolist()
    ]
    return torch.stack(crops)


def prediction_loss_terms(similarity: torch.Tensor, overlaps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two parts of nnssl's prediction loss, over every (target, base) pair of ``[B, T, N]`` inputs.

    ``s = relu(similarity)``. Positive pairs (``y > 0``): ``sum y * -log(1 - |y - s| + 1e-6) / sum y``; pairs
    without overlap (``y = 0``): the mean of ``s^2`` (0 when there are none).

    Example:
        >>> pos, neg = prediction_loss_terms(torch.tensor([[[0.5, 0.3]]]), torch.tensor([[[1.0, 0.0]]]))
        >>> round(pos.item(), 4), round(neg.item(), 4)  # -log(0.5), 0.3^2
        (0.6931, 0.09)
    """
    assigned = F.relu(similarity)
    positive = overlaps > 0
    distance = (overlaps - assigned).abs()
    # nnssl weights by the overlap itself: a zero label contributes nothing here, so no mask is needed
    pos = (overlaps * -torch.log(1.0 - distance + LOG_EPSILON)).sum() / overlaps.sum().clamp_min(LOG_EPSILON)
    negative = (~positive).to(assigned.dtype)
    neg = (assigned.square() * negative).sum() / negative.sum().clamp_min(1.0)
    return pos, neg


def prediction_loss(similarity: torch.Tensor, overlaps: torch.Tensor) -> torch.Tensor:
    """nnssl's prediction loss (positives + non-overlapping pairs, :func:`prediction_loss_terms`); ``[B, T, N]``.

    Example:
        >>> prediction_loss(torch.tensor([[[0.5, 0.5]]]), torch.tensor([[[0.5, 0.5]]])).abs().item() < 1e-5
        True
    """
    pos, neg = prediction_loss_terms(similarity, overlaps)
    return pos + neg


def regularisation_loss(base_embeddings: torch.Tensor) -> torch.Tensor:
    """nnssl's regulariser: mean ``relu(cos)`` between different base crops of a region; input ``[B, N, D]``.

    Anti-parallel or orthogonal base embeddings cost nothing; only positive similarity is penalised.

    Example:
        >>> round(regularisation_loss(torch.tensor([[[1.0, 0.0], [0.6, 0.8], [-1.0, 0.0]]])).item(), 6)  # (.6+0+0)/3
        0.2
    """
    num_base = base_embeddings.shape[1]
    if num_base < 2:
        raise ValueError("VoCo needs at least two base crops (settings key 'base_grid')")
    unit = F.normalize(base_embeddings.float(), dim=-1)
    cosine = F.relu(unit @ unit.transpose(1, 2))  # [B, N, N]
    upper = torch.triu(torch.ones(num_base, num_base, dtype=torch.bool, device=cosine.device), diagonal=1)
    return cosine[:, upper].mean()  # every region has the same number of pairs: the mean of the region means


@contextlib.contextmanager
def seeded_numpy_and_random(seed: int) -> Iterator[None]:
    """Seed numpy's and python's global generators (batchgenerators draws from both) for the block, then
    restore their previous states, so that augmenting a crop is a pure function of its seed.

    Example:
        >>> with seeded_numpy_and_random(5):
        ...     a = (np.random.rand(), random.random())
        >>> with seeded_numpy_and_random(5):
        ...     b = (np.random.rand(), random.random())
        >>> a == b
        True
    """
    numpy_state, python_state = np.random.get_state(), random.getstate()
    np.random.seed(seed % 2**32)
    random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)


def build_crop_augmentation() -> Any:
    """nnssl's per-crop chain (``VocoTransform``, ``aug="train"``) from the batchgenerators classes it uses.

    It works on numpy batches ``{"data": [K, C, z, y, x]}`` and draws each transform per crop.

    Example:
        >>> chain = build_crop_augmentation()
        >>> with seeded_numpy_and_random(0):
        ...     chain(data=np.zeros((2, 1, 4, 4, 4), dtype=np.float32))["data"].shape
        (2, 1, 4, 4, 4)
    """
    from batchgenerators.transforms.abstract_transforms import Compose
    from batchgenerators.transforms.color_transforms import (
        BrightnessMultiplicativeTransform,
        ContrastAugmentationTransform,
        GammaTransform,
    )
    from batchgenerators.transforms.noise_transforms import (
        GaussianBlurTransform,
        GaussianNoiseTransform,
    )
    from batchgenerators.transforms.resample_transforms import (
        SimulateLowResolutionTransform,
    )
    from batchgenerators.transforms.spatial_transforms import (
        MirrorTransform,
        Rot90Transform,
    )

    # batchgenerators numbers the spatial axes from 0 (channel axis excluded), as MIRROR_AXES and ROT90_AXES do
    return Compose([
        GaussianNoiseTransform(noise_variance=NOISE_VARIANCE, p_per_sample=P_NOISE),
        GaussianBlurTransform(BLUR_SIGMA, different_sigma_per_channel=True, p_per_sample=P_BLUR,
                              p_per_channel=P_BLUR_PER_CHANNEL),
        BrightnessMultiplicativeTransform(multiplier_range=BRIGHTNESS_RANGE, p_per_sample=P_BRIGHTNESS),
        ContrastAugmentationTransform(p_per_sample=P_CONTRAST),
        SimulateLowResolutionTransform(zoom_range=LOW_RESOLUTION_ZOOM, per_channel=True,
                                       p_per_channel=P_LOW_RESOLUTION_PER_CHANNEL, order_downsample=0,
                                       order_upsample=3, p_per_sample=P_LOW_RESOLUTION, ignore_axes=None),
        GammaTransform(GAMMA_RANGE, invert_image=True, per_channel=True, retain_stats=True,
                       p_per_sample=P_GAMMA_INVERTED),
        GammaTransform(GAMMA_RANGE, invert_image=False, per_channel=True, retain_stats=True, p_per_sample=P_GAMMA),
        *[MirrorTransform(axes=(axis,)) for axis in MIRROR_AXES],
        Rot90Transform(axes=ROT90_AXES, p_per_sample=P_ROT90),
    ])


def augment_crops(crops: torch.Tensor, seeds: Sequence[int], chain: Any | None = None) -> torch.Tensor:
    """Each crop of ``crops [K, C, z, y, x]`` through the per-crop chain with its own seed ``seeds[k]``.

    A crop's result depends only on the crop and its seed (not on the other crops of the batch).

    Example:
        >>> augment_crops(torch.zeros(3, 1, 4, 4, 4), [0, 1, 2]).shape
        torch.Size([3, 1, 4, 4, 4])
    """
    if len(seeds) != crops.shape[0]:
        raise ValueError(f"need one seed per crop, got {len(seeds)} seeds for {crops.shape[0]} crops")
    chain = build_crop_augmentation() if chain is None else chain
    out = []
    for crop, seed in zip(crops, seeds):
        data = crop[None].numpy().astype(np.float32, copy=True)  # [1, C, z, y, x]: a batch of one
        with seeded_numpy_and_random(int(seed)):
            data = chain(data=data)["data"]
        out.append(torch.from_numpy(np.ascontiguousarray(data[0], dtype=np.float32)))
    return torch.stack(out)


def _check_rot90_plane(crop_size: Sequence[int]) -> None:
    a, b = (int(crop_size[axis]) for axis in ROT90_AXES)
    if a != b:
        raise ValueError(f"settings key 'crop_augmentation' rotates crops by 90 degrees in the (y, x) plane, so the "
                         f"crop (patch_size / base_grid = {list(crop_size)}) must have equal y and x edges; "
                         f"change 'patch_size' or 'base_grid', or set crop_augmentation: false")


class VoCoBatchStream(PatchBatchStream):
    """The shared patch stream whose batches are VoCo's crops instead of whole regions.

    A batch holds ``crops [B * (N + T), C, cz, cy, cx]`` (all base crops, sample-major, then all target crops),
    ``overlaps [B, T, N]`` (of the un-augmented positions) and ``target_starts [B, T, 3]``; the regions
    themselves are dropped. Target positions and augmentation seeds depend only on (seed, batch index), so a
    batch is reproduced exactly on resume and in any worker.

    Example:
        >>> stream = VoCoBatchStream.from_stream(PatchBatchStream(records, (32, 64, 64), 2, seed=0, with_labels=False),
        ...                                      base_grid=(1, 2, 2), num_targets=4)  # doctest: +SKIP
        >>> stream.make_batch(0)["crops"].shape  # doctest: +SKIP
        torch.Size([16, 1, 32, 32, 32])
    """

    base_grid: tuple[int, int, int]
    crop_size: tuple[int, int, int]
    num_targets: int
    crop_augmentation: bool

    @classmethod
    def from_stream(
        cls,
        stream: PatchBatchStream,
        base_grid: Sequence[int],
        num_targets: int,
        crop_augmentation: bool = CROP_AUGMENTATION,
    ) -> VoCoBatchStream:
        """The VoCo stream drawing the same regions as ``stream`` (its settings taken over unchanged)."""
        new = cls.__new__(cls)
        new.__dict__.update(stream.__dict__)
        new.base_grid = _triple(base_grid, "base_grid")
        new.crop_size = crop_size_for(stream.patch_size, new.base_grid)
        new.num_targets = int(num_targets)
        new.crop_augmentation = bool(crop_augmentation)
        if new.crop_augmentation:
            _check_rot90_plane(new.crop_size)
        return new

    def batch_seed(self, batch_index: int, salt: int) -> int:
        """A 64-bit seed that depends only on (stream seed, batch index, salt)."""
        state = np.random.SeedSequence([self.seed, batch_index, salt]).generate_state(2)
        return int(state[0]) << 32 | int(state[1])

    def make_batch(self, batch_index: int) -> dict[str, Any]:
        batch = super().make_batch(batch_index)
        regions = batch.pop("images")  # [B, C, Z, Y, X]
        batch_size = regions.shape[0]
        base_starts = base_crop_starts(self.base_grid, self.crop_size)  # [N, 3]
        generator = torch.Generator().manual_seed(self.batch_seed(batch_index, RNG_SALT_TARGETS))
        target_starts = draw_target_starts(batch_size, self.num_targets, self.patch_size, self.crop_size, generator)
        crops = torch.cat([
            cut_crops(regions, base_starts.expand(batch_size, -1, -1), self.crop_size),  # [B * N, C, c, c, c]
            cut_crops(regions, target_starts, self.crop_size),  # [B * T, C, c, c, c]
        ])
        if self.crop_augmentation:
            seeds = np.random.SeedSequence(self.batch_seed(batch_index, RNG_SALT_AUGMENT)).generate_state(
                crops.shape[0])
            crops = augment_crops(crops, [int(s) for s in seeds])
        batch["crops"] = crops.contiguous()
        batch["overlaps"] = overlap_proportions(target_starts, base_starts, self.crop_size)  # [B, T, N]
        batch["target_starts"] = target_starts
        return batch


class VoCoProjector(nn.Module):
    """nnssl's VoCo projection head: ``Linear -> norm -> ReLU -> Linear -> norm -> ReLU -> Linear``.

    The norm standardises every embedding over its own features without learnt scale (what nnssl's
    ``InstanceNorm1d(affine=False)`` does to a ``[K, width]`` input), so a crop's embedding does not depend on the
    other crops of the batch.

    Example:
        >>> VoCoProjector(120, 2048, 2048)(torch.zeros(5, 120)).shape
        torch.Size([5, 2048])
    """

    def __init__(self, in_features: int, hidden: int = PROJECTION_HIDDEN, dim: int = PROJECTION_DIM) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_features, hidden),
            nn.LayerNorm(hidden, eps=PROJECTION_NORM_EPS, elementwise_affine=False),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden),
            nn.LayerNorm(hidden, eps=PROJECTION_NORM_EPS, elementwise_affine=False),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, dim),
        )

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.layers(pooled)


class VoCoNetwork(nn.Module):
    """ResEnc encoder (at ``.encoder``) + global average pooling of every stage + nnssl's projector.

    Example:
        >>> net = VoCoNetwork("resenc_demo", 1, hidden=64, dim=32)
        >>> net(torch.zeros(3, 1, 16, 16, 16)).shape
        torch.Size([3, 32])
    """

    def __init__(
        self, preset: str, in_channels: int, hidden: int = PROJECTION_HIDDEN, dim: int = PROJECTION_DIM
    ) -> None:
        super().__init__()
        from pretrain_det3d.models.backbone import build_resenc_encoder, get_preset

        self.encoder = build_resenc_encoder(preset, in_channels)
        pooled_width = sum(get_preset(preset).features_per_stage)  # every stage's average, concatenated
        self.projector = VoCoProjector(pooled_width, hidden, dim)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        stages = self.encoder(crops)  # list of [K, C_s, z_s, y_s, x_s]
        pooled = torch.cat([stage.mean(dim=(2, 3, 4)) for stage in stages], dim=1)  # [K, sum C_s]
        return self.projector(pooled)  # [K, dim]


@METHODS.register("voco")
class VoCoTrainer(PretrainingTrainer):
    """Settings besides the training loop's (whose VoCo defaults are nnssl's: region ``patch_size`` [64, 256, 256],
    batch 2, no gradient clipping): ``preset``, ``base_grid`` ([1, 4, 4]), ``num_target_crops`` (4),
    ``projection_hidden`` / ``projection_dim`` (2048), ``prediction_weight`` / ``regularisation_weight`` (1),
    ``crop_augmentation`` (true). Crops have edge ``patch_size / base_grid``."""

    method = "voco"
    training_defaults = method_training_defaults("voco")

    def __init__(self, settings: dict[str, Any], *args: Any, **kwargs: Any) -> None:
        self.base_grid = _triple(settings.get("base_grid", BASE_GRID), "base_grid")
        self.num_targets = int(settings.get("num_target_crops", NUM_TARGET_CROPS))
        if self.num_targets < 1:
            raise ValueError(f"settings key 'num_target_crops' must be >= 1, got {self.num_targets}")
        if self.base_grid[0] * self.base_grid[1] * self.base_grid[2] < 2:
            raise ValueError(f"settings key 'base_grid' must give at least two base crops, got {list(self.base_grid)}")
        self.projection_hidden = int(settings.get("projection_hidden", PROJECTION_HIDDEN))
        self.projection_dim = int(settings.get("projection_dim", PROJECTION_DIM))
        self.prediction_weight = float(settings.get("prediction_weight", PREDICTION_WEIGHT))
        self.regularisation_weight = float(settings.get("regularisation_weight", REGULARISATION_WEIGHT))
        self.crop_augmentation = bool(settings.get("crop_augmentation", CROP_AUGMENTATION))
        super().__init__(settings, *args, **kwargs)
        self.crop_size = crop_size_for(self.settings.patch_size, self.base_grid)  # fails now, naming the key
        if self.crop_augmentation:
            _check_rot90_plane(self.crop_size)

    @property
    def num_base(self) -> int:
        return self.base_grid[0] * self.base_grid[1] * self.base_grid[2]

    def build_network(self) -> nn.Module:
        return VoCoNetwork(self.preset, self.in_channels, self.projection_hidden, self.projection_dim)

    def make_stream(self, start_batch: int) -> VoCoBatchStream:
        return VoCoBatchStream.from_stream(super().make_stream(start_batch), self.base_grid, self.num_targets,
                                           self.crop_augmentation)

    def compute_losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        crops, overlaps = batch["crops"], batch["overlaps"]  # [B * (N + T), C, c, c, c], [B, T, N]
        batch_size, num_targets, num_base = overlaps.shape
        embeddings = self.model(crops).float()  # one pass: [B * (N + T), D]
        base = embeddings[: batch_size * num_base].reshape(batch_size, num_base, -1)  # [B, N, D]
        target = embeddings[batch_size * num_base :].reshape(batch_size, num_targets, -1)  # [B, T, D]
        # base embeddings act as the fixed "class centres" of the prediction term (nnssl detaches them)
        similarity = F.cosine_similarity(target[:, :, None, :], base.detach()[:, None, :, :], dim=-1)  # [B, T, N]
        prediction = prediction_loss(similarity, overlaps.float())
        regularisation = regularisation_loss(base)
        total = self.prediction_weight * prediction + self.regularisation_weight * regularisation
        return {"loss": total, "prediction": prediction, "regularisation": regularisation}

    def save_final(self) -> None:
        from pretrain_det3d.models.checkpoint import save_pretraining_checkpoint

        # the encoder saw crops, not whole regions: record the crop size as the pre-training patch size
        save_pretraining_checkpoint(self.out_path, self.model, self.preset, self.in_channels, list(self.crop_size),
                                    self.method, pretrain_plan=self.pretrain_plan(self.crop_size))
