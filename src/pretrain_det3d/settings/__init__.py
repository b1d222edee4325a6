"""Typed settings of every configurable component, defined once (see ``settings.base``).

Modules: ``base`` (the base class, errors, "did you mean"), ``training`` (the training loop), ``detectors``,
``pretraining`` (methods), ``data`` (datasets, corpus, synthetic phantoms, preprocessing), ``study`` (the whole
configuration, inference, statistics, resources) and ``docs`` (the generated JSON schema and key reference).
None of them imports torch, so validating a config at the dry run stays fast.
"""

from pretrain_det3d.settings.base import ConfigError, Settings
from pretrain_det3d.settings.study import StudyConfig, validate_study_config

__all__ = ["ConfigError", "Settings", "StudyConfig", "validate_study_config"]
