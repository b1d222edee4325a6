"""Block-wise random masks for masked image modelling (the "blocky" mask of the paper's MAE).

The patch is cut into a grid of cubes of ``block_size`` voxels (aligned to the patch origin); exactly
``round(ratio * number_of_blocks)`` cubes per sample are masked, so the masked fraction is ``ratio`` up to the
granularity of one block.
"""

from __future__ import annotations

from typing import Sequence

import torch

from pretrain_det3d.settings.pretraining import MAESettings

MASK_RATIO = MAESettings.default("mask_ratio")
MASK_BLOCK = MAESettings.default("mask_block")  # voxels per block edge, as in the paper


def block_grid(patch_size: Sequence[int], block_size: int) -> tuple[int, int, int]:
    """Blocks per axis; the patch must be a whole number of blocks along every axis.

    Example:
        >>> block_grid((32, 48, 16), 16)
        (2, 3, 1)
    """
    if block_size <= 0:
        raise ValueError(f"settings key 'mask_block' must be positive, got {block_size}")
    if any(int(p) % block_size for p in patch_size):
        raise ValueError(
            f"settings key 'mask_block' ({block_size}) must divide every edge of 'patch_size' {list(patch_size)}"
        )
    grid = tuple(int(p) // block_size for p in patch_size)
    return grid  # type: ignore[return-value]


def num_masked_blocks(num_blocks: int, ratio: float) -> int:
    """``round(ratio * num_blocks)``, at least one block kept and, for a positive ratio, one masked.

    Example:
        >>> num_masked_blocks(8, 0.75), num_masked_blocks(27, 0.75)
        (6, 20)
    """
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"settings key 'mask_ratio' must lie in (0, 1), got {ratio}")
    return min(max(int(round(ratio * num_blocks)), 1), num_blocks - 1) if num_blocks > 1 else 1


def block_mask(
    batch_size: int,
    patch_size: Sequence[int],
    block_size: int = MASK_BLOCK,
    ratio: float = MASK_RATIO,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Boolean mask ``[B, 1, Z, Y, X]``, ``True`` where the input is hidden (and the loss is computed).

    Example:
        >>> m = block_mask(2, (32, 32, 32), 16, 0.75, torch.Generator().manual_seed(0))
        >>> m.shape, m[0].float().mean().item()
        (torch.Size([2, 1, 32, 32, 32]), 0.75)
    """
    grid = block_grid(patch_size, block_size)
    num_blocks = grid[0] * grid[1] * grid[2]
    masked = num_masked_blocks(num_blocks, ratio)
    flags = torch.zeros(batch_size, num_blocks, dtype=torch.bool)
    for sample in range(batch_size):
        chosen = torch.randperm(num_blocks, generator=generator)[:masked]
        flags[sample, chosen] = True
    mask = flags.reshape(batch_size, 1, *grid)  # [B, 1, gz, gy, gx], one flag per block
    for axis in range(2, 5):  # every block flag becomes a cube of block_size^3 voxels
        mask = mask.repeat_interleave(block_size, dim=axis)
    return mask  # [B, 1, Z, Y, X]


def masked_mse(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the masked voxels only (all channels); ``mask`` is ``[B, 1, Z, Y, X]`` bool.

    Example:
        >>> p, t = torch.zeros(1, 1, 2, 1, 1), torch.tensor([1.0, 5.0]).reshape(1, 1, 2, 1, 1)
        >>> masked_mse(p, t, torch.tensor([True, False]).reshape(1, 1, 2, 1, 1)).item()
        1.0
    """
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be boolean, got {mask.dtype}")
    weight = mask.to(prediction.dtype).expand_as(prediction)
    squared = (prediction.float() - target.float()) ** 2
    return (squared * weight).sum() / weight.sum().clamp_min(1.0)
