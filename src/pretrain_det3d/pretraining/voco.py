"""Volume contrast (VoCo, Wu et al., CVPR 2024): predict where a random crop lies by contrasting it with a grid.

Each training patch (``patch_size``, drawn by the shared patch stream) is the *region*. It is cut into a grid of
``base_grid`` non-overlapping *base crops* (default 2 per axis, so 8 base crops; the VoCo paper uses a 4 x 4
grid in the axial plane), and ``num_target_crops`` *target crops* of the same size are drawn at random
positions inside the region. The label of a target crop is its overlap volume with every base crop divided by
the crop volume; as the base crops tile the region, the labels of one target crop sum to 1.

Every crop goes through the ResEnc encoder; each stage's output is averaged over space, the stage averages are
concatenated and a small MLP projects them to an embedding. The loss has two terms:

- prediction (the paper's Eq. 3): ``-log(1 - |s_ij - y_ij|)`` averaged over targets ``i`` and base crops ``j``,
  where ``s_ij = relu(cos(target_i, base_j))`` (the ReLU as in the authors' code) and ``y_ij`` the overlap
  proportion. Base embeddings are detached here: they act as the class assignments of the regions;
- regularisation (Eq. 5): the mean ``|cos(base_j, base_k)|`` over pairs ``j < k`` of the same region, which
  pushes different base crops towards orthogonal embeddings (non-overlapping regions should differ).

``loss = prediction_weight * prediction + regularisation_weight * regularisation``. Only the encoder
(``.encoder.stem`` / ``.encoder.stages``) is meant to transfer; the projection head is discarded.

Example:
    >>> trainer = METHODS.get("voco")({"preset": "resenc_demo", "patch_size": [64, 64, 64], "base_grid": 2},
    ...                               records, in_channels=1, out_path="ckpt.pth", seed=0)  # doctest: +SKIP
    >>> trainer.run()  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pretrain_det3d.pretraining.trainer import METHODS, PretrainingTrainer
from pretrain_det3d.settings.pretraining import VoCoSettings

BASE_GRID = VoCoSettings.default("base_grid")  # base crops per axis (z, y, x)
NUM_TARGET_CROPS = VoCoSettings.default("num_target_crops")  # random target crops per region
# VoCo's own head is wider (2048); it is thrown away after pre-training
PROJECTION_HIDDEN = VoCoSettings.default("projection_hidden")
PROJECTION_DIM = VoCoSettings.default("projection_dim")
PREDICTION_WEIGHT = VoCoSettings.default("prediction_weight")
REGULARISATION_WEIGHT = VoCoSettings.default("regularisation_weight")
LOG_EPSILON = 1e-6  # keeps -log(1 - d) finite when a similarity is maximally wrong (d = 1)
RNG_SALT_TARGETS = 1  # salt of batch_generator for the target crop positions


def _triple(value: int | Sequence[int], key: str) -> tuple[int, int, int]:
    values = [int(value)] * 3 if isinstance(value, (int, float)) else [int(v) for v in value]
    if len(values) != 3 or min(values) < 1:
        raise ValueError(f"settings key {key!r} must be a positive integer or three of them, got {value!r}")
    return values[0], values[1], values[2]


def crop_size_for(patch_size: Sequence[int], base_grid: Sequence[int]) -> tuple[int, int, int]:
    """Edge of the base and target crops: the region (patch) divided by the grid; must divide exactly.

    Example:
        >>> crop_size_for((64, 64, 32), (2, 2, 1))
        (32, 32, 32)
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
    """Uniform integer starts ``[B, T, 3]`` of target crops lying wholly inside the region."""
    highest = torch.as_tensor([int(p) - int(c) for p, c in zip(patch_size, crop_size)])  # inclusive
    uniform = torch.rand(batch_size, num_targets, 3, generator=generator)
    return torch.minimum((uniform * (highest + 1)).long(), highest)


def cut_crops(images: torch.Tensor, starts: torch.Tensor, crop_size: Sequence[int]) -> torch.Tensor:
    """Crops ``[B * K, C, cz, cy, cx]`` of ``images [B, C, Z, Y, X]`` at ``starts [B, K, 3]`` (sample-major)."""
    cz, cy, cx = (int(c) for c in crop_size)
    crops = [
        images[b, :, z : z + cz, y : y + cy, x : x + cx]
        for b in range(starts.shape[0])
        for z, y, x in starts[b].tolist()
    ]
    return torch.stack(crops)


def prediction_loss(similarity: torch.Tensor, overlaps: torch.Tensor) -> torch.Tensor:
    """VoCo's Eq. 3: mean of ``-log(1 - |relu(similarity) - overlaps|)``; inputs ``[B, T, N]``.

    Example:
        >>> prediction_loss(torch.tensor([[[0.5, 0.5]]]), torch.tensor([[[0.5, 0.5]]])).abs().item() < 1e-5
        True
    """
    distance = (F.relu(similarity) - overlaps).abs()
    return -torch.log((1.0 - distance).clamp_min(0.0) + LOG_EPSILON).mean()


def regularisation_loss(base_embeddings: torch.Tensor) -> torch.Tensor:
    """VoCo's Eq. 5: mean ``|cos|`` between different base crops of a region; input ``[B, N, D]``.

    Example:
        >>> regularisation_loss(torch.eye(3)[None]).item()
        0.0
    """
    num_base = base_embeddings.shape[1]
    if num_base < 2:
        raise ValueError("VoCo needs at least two base crops (settings key 'base_grid')")
    unit = F.normalize(base_embeddings.float(), dim=-1)
    cosine = unit @ unit.transpose(1, 2)  # [B, N, N]
    upper = torch.triu(torch.ones(num_base, num_base, dtype=torch.bool, device=cosine.device), diagonal=1)
    return cosine[:, upper].abs().mean()


class VoCoNetwork(nn.Module):
    """ResEnc encoder (at ``.encoder``) + global average pooling of every stage + MLP projection head.

    Example:
        >>> net = VoCoNetwork("resenc_demo", 1)
        >>> net(torch.zeros(3, 1, 16, 16, 16)).shape
        torch.Size([3, 256])
    """

    def __init__(
        self, preset: str, in_channels: int, hidden: int = PROJECTION_HIDDEN, dim: int = PROJECTION_DIM
    ) -> None:
        super().__init__()
        from pretrain_det3d.models.backbone import build_resenc_encoder, get_preset

        self.encoder = build_resenc_encoder(preset, in_channels)
        pooled_width = sum(get_preset(preset).features_per_stage)  # every stage's average, concatenated
        # LayerNorm rather than BatchNorm: a batch of a few crops gives poor batch statistics
        self.projector = nn.Sequential(
            nn.Linear(pooled_width, hidden),
            nn.LayerNorm(hidden, elementwise_affine=False),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, dim),
        )

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        stages = self.encoder(crops)  # list of [K, C_s, z_s, y_s, x_s]
        pooled = torch.cat([stage.mean(dim=(2, 3, 4)) for stage in stages], dim=1)  # [K, sum C_s]
        return self.projector(pooled)  # [K, dim]


@METHODS.register("voco")
class VoCoTrainer(PretrainingTrainer):
    """Settings besides the training loop's: ``preset``, ``base_grid`` (2 per axis), ``num_target_crops`` (4),
    ``projection_hidden`` (512), ``projection_dim`` (256), ``prediction_weight`` (1), ``regularisation_weight``
    (1). ``patch_size`` is the region; crops have edge ``patch_size / base_grid``."""

    method = "voco"

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
        super().__init__(settings, *args, **kwargs)
        self.crop_size = crop_size_for(self.settings.patch_size, self.base_grid)  # fails now, naming the key

    def build_network(self) -> nn.Module:
        return VoCoNetwork(self.preset, self.in_channels, self.projection_hidden, self.projection_dim)

    def target_starts(self, batch_size: int) -> torch.Tensor:
        """This iteration's target crop starts ``[B, T, 3]`` (reproduced exactly on resume)."""
        return draw_target_starts(batch_size, self.num_targets, self.settings.patch_size, self.crop_size,
                                  self.batch_generator(RNG_SALT_TARGETS))

    def compute_losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        images = batch["images"]  # [B, C, Z, Y, X], the regions
        batch_size = images.shape[0]
        base_starts = base_crop_starts(self.base_grid, self.crop_size)  # [N, 3]
        target_starts = self.target_starts(batch_size)  # [B, T, 3]
        overlaps = overlap_proportions(target_starts, base_starts, self.crop_size).to(images.device)  # [B, T, N]
        num_base = base_starts.shape[0]
        crops = torch.cat([
            cut_crops(images, base_starts.expand(batch_size, -1, -1), self.crop_size),  # [B * N, C, c, c, c]
            cut_crops(images, target_starts, self.crop_size),  # [B * T, C, c, c, c]
        ])
        embeddings = self.model(crops).float()  # one pass: [B * (N + T), D]
        base = embeddings[: batch_size * num_base].reshape(batch_size, num_base, -1)  # [B, N, D]
        target = embeddings[batch_size * num_base :].reshape(batch_size, self.num_targets, -1)  # [B, T, D]
        similarity = F.cosine_similarity(target[:, :, None, :], base.detach()[:, None, :, :], dim=-1)  # [B, T, N]
        prediction = prediction_loss(similarity, overlaps)
        regularisation = regularisation_loss(base)
        total = self.prediction_weight * prediction + self.regularisation_weight * regularisation
        return {"loss": total, "prediction": prediction, "regularisation": regularisation}

    def save_final(self) -> None:
        from pretrain_det3d.models.checkpoint import save_pretraining_checkpoint

        # the encoder saw crops, not whole regions: record the crop size as the pre-training patch size
        save_pretraining_checkpoint(self.out_path, self.model, self.preset, self.in_channels, list(self.crop_size),
                                    self.method)
