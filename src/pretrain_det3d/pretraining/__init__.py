"""Pre-training stage: self-supervised methods sharing one trainer, registered by name in ``METHODS``.

Example:
    >>> from pretrain_det3d.pretraining import METHODS
    >>> "mae" in METHODS
    True
"""

from __future__ import annotations

from pretrain_det3d.pretraining import mae  # noqa: F401  (registers "mae")
from pretrain_det3d.pretraining import models_genesis  # noqa: F401  (registers "models_genesis")
from pretrain_det3d.pretraining import spark3d  # noqa: F401  (registers "spark3d")
from pretrain_det3d.pretraining import voco  # noqa: F401  (registers "voco")
from pretrain_det3d.pretraining import multitalent  # noqa: F401  (registers "multitalent")
from pretrain_det3d.pretraining.run import run_pretraining
from pretrain_det3d.pretraining.trainer import METHODS, PretrainingTrainer

__all__ = ["METHODS", "PretrainingTrainer", "run_pretraining"]
