"""Entry point of the ``pretrain`` rule: one method on one preprocessed corpus."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from pretrain_det3d.pretraining.trainer import METHODS
from pretrain_det3d.training.trainer import seed_everything


def run_pretraining(
    corpus_root: str | os.PathLike | None,
    method: str,
    settings: Mapping[str, Any],
    out_path: str | os.PathLike,
    seed: int,
    log_path: str | os.PathLike | None = None,
) -> Path:
    """Pre-train ``method`` on the volumes of ``{corpus_root}/cases/*.npy`` and write ``out_path``.

    A method may read other data instead (its ``load_corpus``): ``multitalent`` trains on the labelled,
    preprocessed datasets listed in ``settings["datasets"]`` and ignores ``corpus_root`` (may be ``None``).

    ``out_path`` receives an nnssl-format checkpoint (pre-training patch size included, and the run's fingerprint
    under ``nnssl_adaptation_plan["run_fingerprint"]``, beside nnssl's ``pretrain_plan``); the run keeps
    ``checkpoint_latest.pth`` beside it while training and resumes from it when rerun, unless the settings, the method, the corpus's case
    list, the seed or the versions changed since it was written: then the rerun raises ``StaleCheckpointError``
    listing the changes (``PRETRAIN_DET3D_STALE_CHECKPOINT=move`` moves the old checkpoint aside and starts over).
    ``log_path`` defaults to ``log.csv`` beside ``out_path``. Settings: ``preset``, ``iterations``, ``batch_size``, ``patch_size``,
    ``optimizer`` / ``lr`` / ``momentum`` / ``weight_decay`` (default nnssl's SGD, Nesterov 0.99, 1e-2, 3e-5),
    ``warmup_iterations``, ``checkpoint_every``, ``num_workers``, ``augmentation``, ``device``, ``threads``,
    and the method's own keys (``mae``: ``mask_ratio``, ``mask_block``; see each method's module).

    Example:
        >>> run_pretraining("results/data/preprocessed_corpus/synthetic", "mae",
        ...                 {"preset": "resenc_demo", "iterations": 100, "patch_size": [32, 32, 32]},
        ...                 "results/pretrain/mae/checkpoint_final.pth", seed=0)  # doctest: +SKIP
    """
    trainer_class = METHODS.get(method)
    # the method decides what it trains on: the unlabelled corpus, or (multitalent) datasets in its settings
    records, in_channels = trainer_class.load_corpus(corpus_root, settings)
    seed_everything(seed)  # the network's random initialisation depends on it
    trainer = trainer_class(dict(settings), records, in_channels=in_channels, out_path=out_path,
                            seed=seed, log_path=log_path)
    trainer.run()
    return Path(out_path)
