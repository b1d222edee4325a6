"""The trainer every pre-training method shares: ``IterationTrainer`` on unlabelled corpus patches.

A method subclasses ``PretrainingTrainer``, registers itself in ``METHODS`` and provides ``build_network``
(the whole network it trains; its encoder must sit at ``.encoder``) and ``compute_losses`` (and
``load_corpus`` when it trains on other data than the unlabelled corpus, as ``multitalent`` does). Optimiser,
schedule, logging, checkpoints and resume come from ``training.trainer``. The finished network is written in
nnssl's checkpoint schema, so fine-tuning transfers its stem and encoder like any published checkpoint.

Resume checks the run fingerprint (``training.trainer.run_fingerprint``): here its model part is the method,
the backbone preset, the input channels and every settings key that is neither a training-loop key nor in
``NON_RESULT_SETTINGS`` (``mask_ratio``, ``datasets``, ...), and its case list is the corpus (or, for
``multitalent``, the ``{dataset}__{case}`` ids). A rerun after any of these changed refuses the old
``checkpoint_latest.pth`` (or moves it aside with ``PRETRAIN_DET3D_STALE_CHECKPOINT=move``).

Example:
    >>> trainer = METHODS.get("mae")({"preset": "resenc_demo", "iterations": 10}, records, in_channels=1,
    ...                              out_path="results/pretrain/mae/checkpoint_final.pth", seed=0)  # doctest: +SKIP
    >>> trainer.fingerprint["model"]["method"]  # doctest: +SKIP
    'mae'
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np
import torch

from pretrain_det3d.settings.pretraining import PretrainingSettings
from pretrain_det3d.settings.training import changed_loop_defaults
from pretrain_det3d.training.dataloader import CaseRecord, list_corpus_cases, load_case_records
from pretrain_det3d.training.trainer import (
    NON_RESULT_SETTINGS,
    IterationTrainer,
    TrainingSettings,
    compact_fingerprint,
)
from pretrain_det3d.utils.registry import Registry

METHODS: Registry[type["PretrainingTrainer"]] = Registry("pre-training method")

# nnssl's defaults for its MAE (nnU-Net style): SGD, Nesterov momentum 0.99, lr 1e-2, weight decay 3e-5,
# poly decay; no foreground oversampling (no labels) and no augmentation by default
#: training-loop defaults of pre-training (those of ``settings.pretraining.PretrainingSettings`` that differ from
#: fine-tuning's); each method's class may differ again (``training_defaults`` of the method)
PRETRAINING_DEFAULTS: dict[str, Any] = changed_loop_defaults(PretrainingSettings)
DEFAULT_PRESET = "resenc_l"


class PretrainingTrainer(IterationTrainer):
    """Base of the pre-training methods; writes ``save_pretraining_checkpoint(out_path, ...)`` at the end."""

    with_labels = False
    method: ClassVar[str] = ""
    # training-loop defaults of the method (override per method); the user's settings win over them
    training_defaults: ClassVar[Mapping[str, Any]] = PRETRAINING_DEFAULTS

    def __init__(
        self,
        settings: Mapping[str, Any],
        records: Sequence[CaseRecord],
        in_channels: int,
        out_path: str | os.PathLike,
        seed: int,
        log_path: str | os.PathLike | None = None,
    ) -> None:
        self.method_settings = dict(settings)
        self.preset = str(settings.get("preset", DEFAULT_PRESET))
        self.in_channels = int(in_channels)
        self.out_path = Path(out_path)
        training = TrainingSettings.from_settings(settings, **self.training_defaults)
        network = self.build_network()
        super().__init__(network, training, records, self.out_path.parent, seed, log_path)

    @classmethod
    def load_corpus(
        cls, corpus_root: str | os.PathLike | None, settings: Mapping[str, Any]
    ) -> tuple[list[CaseRecord], int]:
        """The records the method trains on and their number of input channels.

        Default: the unlabelled volumes ``{corpus_root}/cases/*.npy``. A method that trains on other data
        (``multitalent``: labelled datasets named in its settings) overrides this.
        """
        if corpus_root is None:
            raise ValueError(f"pre-training method {cls.method!r} needs a preprocessed corpus (corpus_root)")
        cases = list_corpus_cases(corpus_root)
        records = load_case_records(corpus_root, cases, with_labels=False)
        from pretrain_det3d.data.io import load_npy  # names a truncated array (local: keeps this edit to one place)

        first = load_npy(records[0].image_path, mmap_mode="r")
        if first.ndim != 4:
            raise ValueError(f"{records[0].image_path}: expected a [C, Z, Y, X] array, got shape {first.shape}")
        return records, int(first.shape[0])

    def build_network(self) -> torch.nn.Module:
        """The network to train (built after seeding, so its initialisation is reproducible)."""
        raise NotImplementedError

    def fingerprint_model(self) -> dict[str, Any]:
        """Method, preset, input channels and the method's own settings (the keys the training loop does not
        read), for the run fingerprint."""
        training_keys = set(TrainingSettings.model_fields)
        own = {k: v for k, v in sorted(self.method_settings.items())
               if k not in training_keys and k not in NON_RESULT_SETTINGS}
        return {"method": self.method, "preset": self.preset, "in_channels": self.in_channels, "settings": own}

    def pretrain_plan(self, patch_size: Sequence[int]) -> dict[str, Any]:
        """The ``pretrain_plan`` entry of the final checkpoint: the default minimal plan plus the fingerprint of
        the run that trained the weights (its corpus list as count + sha256: corpora can hold 10^4 cases)."""
        return {"plans_name": "pretrain_det3d", "configurations": {"patch_size": [int(p) for p in patch_size]},
                "run_fingerprint": compact_fingerprint(self.fingerprint)}

    def batch_generator(self, salt: int = 0) -> torch.Generator:
        """A CPU generator that depends only on (seed, iteration, salt): random choices made inside a step
        (masks, ...) are then reproduced exactly on resume."""
        state = np.random.SeedSequence([self.seed, self.iteration, salt]).generate_state(2)
        return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))

    def save_final(self) -> None:
        from pretrain_det3d.models.checkpoint import save_pretraining_checkpoint

        save_pretraining_checkpoint(
            self.out_path,
            self.model,
            self.preset,
            self.in_channels,
            list(self.settings.patch_size),
            self.method,
            pretrain_plan=self.pretrain_plan(self.settings.patch_size),
        )
