"""Dense masked autoencoder on a ResEnc U-Net (the paper's "mae" pre-training).

The input patch is hidden in cubes of ``mask_block`` voxels (75 % of them by default; hidden voxels set to 0),
the U-Net predicts the full image (``out_channels = in_channels``), and the loss is the MSE over the hidden
voxels only.

Augmentation is on by default, as nnssl's ``BaseMAETrainer`` trains (``MAESettings.augmentation``: rotation and
isotropic scaling with probability 0.2 each, mirroring, no intensity transform). It is applied to the patch in
the data pipeline, before masking; the target is that augmented patch itself, so input and target always share
the same spatial transform. See docs/pretraining/mae.md.

Example:
    >>> trainer = METHODS.get("mae")({"preset": "resenc_demo", "patch_size": [32, 32, 32], "iterations": 10},
    ...                              records, in_channels=1, out_path="ckpt.pth", seed=0)  # doctest: +SKIP
    >>> trainer.run()  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import torch

from pretrain_det3d.pretraining.masking import MASK_BLOCK, MASK_RATIO, block_grid, block_mask, masked_mse
from pretrain_det3d.pretraining.trainer import METHODS, PretrainingTrainer
from pretrain_det3d.settings.pretraining import training_defaults as method_training_defaults


@METHODS.register("mae")
class MAETrainer(PretrainingTrainer):
    """Settings read besides the training loop's: ``preset``, ``mask_ratio`` (0.75), ``mask_block`` (16)."""

    method = "mae"
    # MAESettings' loop defaults (nnssl's augmentation among them) under the user's settings
    training_defaults = method_training_defaults("mae")

    def __init__(self, settings: dict[str, Any], *args: Any, **kwargs: Any) -> None:
        self.mask_ratio = float(settings.get("mask_ratio", MASK_RATIO))
        self.mask_block = int(settings.get("mask_block", MASK_BLOCK))
        super().__init__(settings, *args, **kwargs)
        block_grid(self.settings.patch_size, self.mask_block)  # fail now, naming the key, not mid-training

    def build_network(self) -> torch.nn.Module:
        from pretrain_det3d.models.backbone import build_resenc_unet

        return build_resenc_unet(self.preset, self.in_channels, out_channels=self.in_channels)

    def make_mask(self, batch_size: int) -> torch.Tensor:
        """This iteration's mask ``[B, 1, Z, Y, X]`` (True = hidden)."""
        return block_mask(batch_size, self.settings.patch_size, self.mask_block, self.mask_ratio,
                          generator=self.batch_generator())

    def compute_losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        images = batch["images"]  # [B, C, Z, Y, X]
        mask = self.make_mask(images.shape[0]).to(images.device)
        reconstruction = self.model(images.masked_fill(mask, 0.0))
        return {"loss": masked_mse(reconstruction, images, mask)}
