"""Pre-training stage: self-supervised methods sharing one trainer, registered by name in ``METHODS``.

Example:
    >>> from pretrain_det3d.pretraining import METHODS
    >>> "mae" in METHODS
    True
"""

from __future__ import annotations

import importlib

from pretrain_det3d import catalog
from pretrain_det3d.pretraining.run import run_pretraining
from pretrain_det3d.pretraining.trainer import METHODS, PretrainingTrainer

# every method the catalog lists registers itself in METHODS when its module is imported
for _module in catalog.PRETRAINING_MODULES.values():
    importlib.import_module(_module)

__all__ = ["METHODS", "PretrainingTrainer", "run_pretraining"]
