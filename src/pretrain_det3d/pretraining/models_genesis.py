"""Models Genesis: restore the original patch from a corrupted copy (the paper's "models_genesis" pre-training).

The corruptions (flips, local pixel shuffling, a non-linear intensity curve, in-/out-painting, with the
original rates) live in :mod:`pretrain_det3d.pretraining.genesis_transforms`. The ResEnc U-Net maps the
corrupted patch to the original one; the loss is the MSE over all voxels (the network's output is linear,
as the target is the z-scored patch, not [0, 1]; nnssl's ``ModelGenesisTrainer`` does the same).

``intensity`` chooses the scale the corruptions act on: ``zscore`` (default, nnssl's: the z-scored patch as
it is), ``patch_minmax`` (each patch mapped to [0, 1] and back), ``hu_window`` (the original's [-1000, 1000] HU
window; the trainer recovers HU from the corpus plan's CT mean and std, :func:`corpus_ct_zscore`, and refuses
a corpus normalised per volume). See docs/pretraining/models_genesis.md.

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

import dataclasses
import json
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import IterableDataset, get_worker_info

from pretrain_det3d.pretraining.genesis_transforms import GenesisParams, genesis_pair
from pretrain_det3d.pretraining.trainer import METHODS, PretrainingTrainer
from pretrain_det3d.settings.pretraining import training_defaults as method_training_defaults
from pretrain_det3d.training.dataloader import CaseRecord, PatchBatchStream

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


def corpus_ct_zscore(records: Sequence[CaseRecord]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` per channel of the CT z-score of the corpus ``records`` come from (its ``plan.json``).

    The corpus's CT scheme clips to two percentiles and computes ``z = (HU - mean) / std`` with corpus-wide
    numbers, so ``HU = z * std + mean`` inside the clip bounds. A channel normalised per volume (MRI, ...)
    has no such inverse: that is an error naming the channel.

    Example:
        >>> corpus_ct_zscore(records)  # doctest: +SKIP
        ((41.7,), (385.2,))
    """
    from pretrain_det3d.data.preprocessing import PLAN_FILE  # the heavy preprocessing module only here

    roots = sorted({Path(record.image_path).parent.parent for record in records})
    if len(roots) != 1:
        raise ValueError(f"intensity 'hu_window' needs the cases of one corpus, got cases from {len(roots)} folders")
    plan_path = roots[0] / PLAN_FILE
    if not plan_path.is_file():
        raise FileNotFoundError(f"{plan_path}: intensity 'hu_window' needs the corpus plan (its CT mean and std "
                                "give HU back); preprocess the corpus, or use intensity 'zscore'")
    normalisation = json.loads(plan_path.read_text()).get("normalisation") or []
    means, stds = [], []
    for channel, entry in enumerate(normalisation):
        if entry.get("scheme") != "CT":
            raise ValueError(f"{plan_path}: channel {channel} is normalised with scheme {entry.get('scheme')!r}, "
                             "not 'CT': HU cannot be recovered, so intensity 'hu_window' does not apply; use "
                             "'zscore' or 'patch_minmax'")
        means.append(float(entry["mean"]))
        stds.append(max(float(entry["std"]), 1e-8))  # nnunetv2's CTNormalization divides by max(std, 1e-8)
    if not means:
        raise ValueError(f"{plan_path}: no 'normalisation' entries")
    return tuple(means), tuple(stds)


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
    """Settings read besides the training loop's: ``preset`` and the keys of ``ModelsGenesisSettings``
    (``flip_rate`` 0.4, ``local_shuffle_rate`` 0.5, ``local_shuffle_blocks`` 10000, ``nonlinear_rate`` 0.9,
    ``paint_rate`` 0.9, ``inpaint_rate`` 0.2, ..., ``intensity`` 'zscore')."""

    method = "models_genesis"
    training_defaults = method_training_defaults("models_genesis")  # no augmentation besides the flips (nnssl)

    def __init__(self, settings: dict[str, Any], records: Sequence[CaseRecord], *args: Any, **kwargs: Any) -> None:
        genesis = GenesisParams.from_settings(dict(settings))
        if genesis.intensity == "hu_window":
            mean, std = corpus_ct_zscore(records)
            genesis = dataclasses.replace(genesis, hu_mean=mean, hu_std=std)
            genesis.validate()
        self.genesis = genesis
        super().__init__(settings, records, *args, **kwargs)

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
