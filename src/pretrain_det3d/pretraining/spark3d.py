"""SparK for 3D: sparse masked autoencoding of a ResEnc U-Net, emulated with dense convolutions
(the paper's "spark3d" pre-training; Tian et al., ICLR 2023, as ported to 3D by nnssl).

A convolutional encoder that sees a masked patch still spreads visible content into the hidden blocks (every
3^3 convolution reaches one voxel further), so from stage to stage the hidden region fills with features
and the mask pattern dissolves. SparK avoids this with sparse convolutions that compute only at visible
positions. Dense emulation here:

* the input block mask (``mask_block`` cubes, ``mask_ratio`` of them hidden, as for ``mae``) is brought to
  the resolution of each encoder stage (:func:`stage_masks`);
* hidden input voxels are set to 0, and after the stem and after every encoder stage the hidden positions
  of that stage's features are set to 0 again (re-masking), so nothing flows into hidden blocks;
* before decoding, every hidden position of every skip is filled with a learnable per-stage mask token
  (``nn.Parameter`` of shape ``[1, C, 1, 1, 1]``), like SparK's densification;
* the loss is the MSE over hidden voxels only.

Deviation from true sparse convolution: inside a stage the convolutions and instance norms still see the
zeros of hidden positions (SparK's sparse norm would skip them); re-masking bounds the leakage to within
one stage. Where a stage is coarser than the blocks (cumulative stride > ``mask_block``), a position counts
as hidden only when every voxel it covers is hidden (a min-pool), so no visible content is thrown away;
where it is finer or equal, the stage mask is the block mask subsampled, aligned with the block grid.

The network keeps the encoder at ``.encoder`` (``encoder.stem``, ``encoder.stages``) and the decoder at
``.decoder``, so its weights are a ``ResidualEncoderUNet``'s plus ``mask_tokens.*``; the final checkpoint
holds the U-Net's weights only (the tokens are part of the pre-training head), as nnssl's does.

Example:
    >>> trainer = METHODS.get("spark3d")({"preset": "resenc_demo", "patch_size": [32, 32, 32], "iterations": 10},
    ...                                  records, in_channels=1, out_path="ckpt.pth", seed=0)  # doctest: +SKIP
    >>> trainer.run()  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pretrain_det3d.pretraining.masking import MASK_BLOCK, MASK_RATIO, block_grid, block_mask, masked_mse
from pretrain_det3d.pretraining.trainer import METHODS, PretrainingTrainer
from pretrain_det3d.settings.pretraining import Spark3DSettings

# SparK's initialisation of the mask tokens (truncated normal at +-2 std)
MASK_TOKEN_STD = Spark3DSettings.default("mask_token_std")


def cumulative_strides(strides: Sequence[Sequence[int] | int]) -> list[tuple[int, int, int]]:
    """Per-axis stride of each stage's output relative to the input.

    Example:
        >>> cumulative_strides([1, [2, 2, 1], 2])
        [(1, 1, 1), (2, 2, 1), (4, 4, 2)]
    """
    out, total = [], (1, 1, 1)
    for stride in strides:
        per_axis = (int(stride),) * 3 if isinstance(stride, int) else tuple(int(s) for s in stride)
        total = tuple(t * s for t, s in zip(total, per_axis))  # type: ignore[assignment]
        out.append(total)
    return out


def downsample_mask(mask: torch.Tensor, stride: Sequence[int]) -> torch.Tensor:
    """The hidden-voxel mask ``[B, 1, Z, Y, X]`` at a resolution ``stride`` times coarser.

    A coarse position is hidden only if all the voxels it covers are hidden (min-pool); on a block-aligned
    mask with blocks at least ``stride`` wide this is the mask subsampled (nearest).

    Example:
        >>> m = torch.tensor([True, True, True, False]).reshape(1, 1, 4, 1, 1)
        >>> downsample_mask(m, (2, 1, 1)).ravel().tolist()
        [True, False]
    """
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be boolean, got {mask.dtype}")
    stride = tuple(int(s) for s in stride)
    if any(size % s for size, s in zip(mask.shape[2:], stride)):
        raise ValueError(f"mask of spatial shape {tuple(mask.shape[2:])} cannot be pooled by stride {stride}")
    if stride == (1, 1, 1):
        return mask
    visible = F.max_pool3d((~mask).float(), kernel_size=stride, stride=stride)  # 1 where any voxel is visible
    return visible == 0


def stage_masks(mask: torch.Tensor, strides: Sequence[Sequence[int] | int]) -> list[torch.Tensor]:
    """:func:`downsample_mask` for every encoder stage (``strides``: the per-stage strides).

    Example:
        >>> m = block_mask(1, (8, 8, 8), 4, 0.75, torch.Generator().manual_seed(0))
        >>> [tuple(s.shape[2:]) for s in stage_masks(m, [1, 2, 2])]
        [(8, 8, 8), (4, 4, 4), (2, 2, 2)]
    """
    return [downsample_mask(mask, stride) for stride in cumulative_strides(strides)]


class SparkNetwork(nn.Module):
    """A ResEnc U-Net run the SparK way: masked encoding with re-masking, mask-token densification, decoding.

    Built from a ``ResidualEncoderUNet`` (its ``encoder`` and ``decoder`` are adopted, so the state-dict keys
    stay the U-Net's); ``forward(images, mask)`` takes the hidden-voxel mask ``[B, 1, Z, Y, X]``.

    Example:
        >>> from pretrain_det3d.models.backbone import build_resenc_unet
        >>> net = SparkNetwork(build_resenc_unet("resenc_demo", 1, 1))
        >>> mask = block_mask(1, (16, 16, 16), 8, 0.75, torch.Generator().manual_seed(0))
        >>> net(torch.randn(1, 1, 16, 16, 16), mask).shape
        torch.Size([1, 1, 16, 16, 16])
    """

    def __init__(self, unet: nn.Module, mask_token_std: float = MASK_TOKEN_STD) -> None:
        super().__init__()
        if not hasattr(unet, "encoder") or not hasattr(unet, "decoder"):
            raise TypeError(f"SparkNetwork needs a U-Net with .encoder and .decoder, got {type(unet).__name__}")
        self.encoder = unet.encoder
        self.decoder = unet.decoder
        self.strides = [list(s) if not isinstance(s, int) else [s] * 3 for s in self.encoder.strides]
        tokens = []
        for channels in self.encoder.output_channels:
            token = nn.Parameter(torch.zeros(1, int(channels), 1, 1, 1))
            nn.init.trunc_normal_(token, mean=0.0, std=mask_token_std, a=-2 * mask_token_std, b=2 * mask_token_std)
            tokens.append(token)
        self.mask_tokens = nn.ParameterList(tokens)  # one per stage, shallowest first

    def encode(self, images: torch.Tensor, mask: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Stage outputs with hidden positions at exactly 0, and the stage masks (shallowest first)."""
        masks = stage_masks(mask, self.strides)
        x = images.masked_fill(mask, 0.0)  # [B, C, Z, Y, X]; the mask broadcasts over channels
        if self.encoder.stem is not None:
            x = self.encoder.stem(x).masked_fill(mask, 0.0)  # the stem keeps the input resolution
        skips = []
        for stage, stage_mask in zip(self.encoder.stages, masks):
            x = stage(x).masked_fill(stage_mask, 0.0)  # re-mask: no content may spread into hidden blocks
            skips.append(x)
        return skips, masks

    def densify(self, skips: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Each skip with its hidden positions replaced by its stage's mask token."""
        return [
            torch.where(stage_mask, token.to(skip.dtype), skip)  # [B,1,...] x [1,C,1,1,1] x [B,C,...]
            for skip, stage_mask, token in zip(skips, masks, self.mask_tokens)
        ]

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        skips, masks = self.encode(images, mask)
        return self.decoder(self.densify(skips, masks))

    def unet_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights without the mask tokens: exactly a ``ResidualEncoderUNet``'s state dict."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("mask_tokens.")}


@METHODS.register("spark3d")
class Spark3DTrainer(PretrainingTrainer):
    """Settings read besides the training loop's: ``preset``, ``mask_ratio`` (0.75), ``mask_block`` (16),
    ``mask_token_std`` (0.02)."""

    method = "spark3d"

    def __init__(self, settings: dict[str, Any], *args: Any, **kwargs: Any) -> None:
        self.mask_ratio = float(settings.get("mask_ratio", MASK_RATIO))
        self.mask_block = int(settings.get("mask_block", MASK_BLOCK))
        self.mask_token_std = float(settings.get("mask_token_std", MASK_TOKEN_STD))
        super().__init__(settings, *args, **kwargs)
        block_grid(self.settings.patch_size, self.mask_block)  # fail now, naming the key, not mid-training
        deepest = cumulative_strides(self.model.strides)[-1]
        if any(p % s for p, s in zip(self.settings.patch_size, deepest)):
            raise ValueError(
                f"settings key 'patch_size' {list(self.settings.patch_size)} must be divisible by the encoder's "
                f"total stride {list(deepest)} (preset {self.preset!r})"
            )

    def build_network(self) -> torch.nn.Module:
        from pretrain_det3d.models.backbone import build_resenc_unet

        unet = build_resenc_unet(self.preset, self.in_channels, out_channels=self.in_channels)
        return SparkNetwork(unet, self.mask_token_std)

    def make_mask(self, batch_size: int) -> torch.Tensor:
        """This iteration's mask ``[B, 1, Z, Y, X]`` (True = hidden); reproduced exactly on resume."""
        return block_mask(batch_size, self.settings.patch_size, self.mask_block, self.mask_ratio,
                          generator=self.batch_generator())

    def compute_losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        images = batch["images"]  # [B, C, Z, Y, X]
        mask = self.make_mask(images.shape[0]).to(images.device)
        reconstruction = self.model(images, mask)
        return {"loss": masked_mse(reconstruction, images, mask)}

    def save_final(self) -> None:
        # The checkpoint holds a plain ResidualEncoderUNet (what its architecture plan rebuilds); loading
        # strictly proves that the adopted encoder/decoder keys are exactly the U-Net's.
        from pretrain_det3d.models.backbone import build_resenc_unet
        from pretrain_det3d.models.checkpoint import save_pretraining_checkpoint

        unet = build_resenc_unet(self.preset, self.in_channels, out_channels=self.in_channels)
        unet.load_state_dict({k: v.detach().cpu() for k, v in self.model.unet_state_dict().items()}, strict=True)
        save_pretraining_checkpoint(self.out_path, unet, self.preset, self.in_channels,
                                    list(self.settings.patch_size), self.method)
