"""Models Genesis: restore the original patch from a corrupted copy (the paper's "models_genesis" pre-training).

The corruptions (flips, local pixel shuffling, a non-linear intensity curve, in-/out-painting, with the
original rates) live in :mod:`pretrain_det3d.pretraining.genesis_transforms`. The ResEnc U-Net maps the
corrupted patch to the original one; the loss is the MSE over all voxels (the network's output is linear,
as the target is the z-scored patch, not [0, 1]).

The corruption is numpy work per sample (ten thousand shuffled boxes), so it runs in the data pipeline, in
the loader's worker processes when ``num_workers > 0``, not in the training step: :class:`GenesisBatchStream`
wraps the trainer's patch stream and adds ``batch["genesis_inputs"]`` (and replaces ``batch["images"]`` by
the flipped targets). Sample ``i`` of batch ``b`` is corrupted with a generator seeded by
``(seed, b, i, GENESIS_SALT)``, so batches stay a pure function of ``(seed, batch index)`` and a resumed run
repeats them exactly.

Example:
    >>> trainer = METHODS.get("models_genesis")({"preset": "resenc_demo", "patch_size": [32, 32, 32],
    ...                                          "iterations": 10}, records, in_channels=1,
    ...                                         out_path="ckpt.pth", seed=0)  # doctest: +SKIP
    >>> trainer.run()  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import IterableDataset, get_worker_info

from pretrain_det3d.pretraining.genesis_transforms import GenesisParams, genesis_pair
from pretrain_det3d.pretraining.trainer import METHODS, PretrainingTrainer
from pretrain_det3d.training.dataloader import PatchBatchStream

GENESIS_SALT = 2  # keeps the corruption's generator apart from the patch sampler's and the augmenter's
INPUT_KEY = "genesis_inputs"


def corrupt_batch(batch: dict[str, Any], seed: int, batch_index: int, params: GenesisParams) -> dict[str, Any]:
    """Add ``genesis_inputs`` (corrupted) to a collated batch and make ``images`` the (flipped) targets.

    Example:
        >>> batch = {"images": torch.randn(2, 1, 16, 16, 16)}
        >>> out = corrupt_batch(batch, seed=0, batch_index=0, params=GenesisParams(local_shuffle_blocks=10))
        >>> out["genesis_inputs"].shape
        torch.Size([2, 1, 16, 16, 16])
    """
    images = batch["images"].numpy()  # [B, C, Z, Y, X]
    inputs, targets = [], []
    for sample_index, image in enumerate(images):
        rng = np.random.default_rng([int(seed), int(batch_index), sample_index, GENESIS_SALT])
        pair = genesis_pair(image, rng, params)
        inputs.append(pair.corrupted)
        targets.append(pair.target)
    return {**batch, "images": torch.from_numpy(np.stack(targets)), INPUT_KEY: torch.from_numpy(np.stack(inputs))}


class GenesisBatchStream(IterableDataset):
    """The batches of a ``PatchBatchStream`` with the Models Genesis corruption added (see the module doc).

    Workers split batch indices as the wrapped stream documents (worker ``w`` of ``W``: ``w, w + W, ...``),
    so the stream is the same for any worker count.
    """

    def __init__(self, patches: PatchBatchStream, params: GenesisParams) -> None:
        super().__init__()
        self.patches = patches
        self.params = params

    def make_batch(self, batch_index: int) -> dict[str, Any]:
        return corrupt_batch(self.patches.make_batch(batch_index), self.patches.seed, batch_index, self.params)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        start, count = self.patches.start_batch, self.patches.num_batches
        stop = None if count is None else start + count
        index = start + worker
        while stop is None or index < stop:
            yield self.make_batch(index)
            index += workers


@METHODS.register("models_genesis")
class ModelsGenesisTrainer(PretrainingTrainer):
    """Settings read besides the training loop's: ``preset`` and the fields of ``GenesisParams``
    (``flip_rate`` 0.4, ``local_shuffle_rate`` 0.5, ``local_shuffle_blocks`` 10000, ``nonlinear_rate`` 0.9,
    ``paint_rate`` 0.9, ``inpaint_rate`` 0.2, ...)."""

    method = "models_genesis"

    def __init__(self, settings: dict[str, Any], *args: Any, **kwargs: Any) -> None:
        self.genesis = GenesisParams.from_settings(dict(settings))
        super().__init__(settings, *args, **kwargs)

    def build_network(self) -> torch.nn.Module:
        from pretrain_det3d.models.backbone import build_resenc_unet

        return build_resenc_unet(self.preset, self.in_channels, out_channels=self.in_channels)

    def make_stream(self, start_batch: int) -> GenesisBatchStream:  # type: ignore[override]
        return GenesisBatchStream(super().make_stream(start_batch), self.genesis)

    def compute_losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        if INPUT_KEY not in batch:
            raise KeyError(f"models_genesis batches need {INPUT_KEY!r} (made by GenesisBatchStream / corrupt_batch)")
        restored = self.model(batch[INPUT_KEY])  # [B, C, Z, Y, X]
        return {"loss": F.mse_loss(restored.float(), batch["images"].float())}
