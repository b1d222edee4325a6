"""Pre-training stage: self-supervised methods sharing one trainer, registered by name in ``METHODS``.

Example:
    >>> from pretrain_det3d.pretraining import METHODS
    >>> "mae" in METHODS
    True
"""

from __future__ import annotations

from pretrain_det3d.pretraining import mae  # noqa: F401  (registers "mae")
from pretrain_det3d.pretraining.run import run_pretraining
from pretrain_det3d.pretraining.trainer import METHODS, PretrainingTrainer

__all__ = ["METHODS", "PretrainingTrainer", "run_pretraining"]
