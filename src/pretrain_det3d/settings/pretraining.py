"""Settings of the pre-training methods: the training loop with pre-training defaults plus each method's keys.

A config entry ``pretraining.methods.<name>`` is validated with the class registered here for its ``method:``
(or the entry's name). The method modules read their defaults from these classes.

Example:
    >>> s = MAESettings.parse({"mask_ratio": "0.6"}, where="pretraining.methods.mae")
    >>> s.mask_ratio, s.mask_block, s.momentum
    (0.6, 16, 0.99)
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pretrain_det3d.settings.training import (
    AugmentationSettings,
    TrainingSettings,
    Triple,
    changed_loop_defaults,
    registered,
)


class PretrainingSettings(TrainingSettings):
    """Keys every pre-training method has; the training-loop defaults are those of pre-training."""

    method: str | None = Field(None, description="Registered pre-training method of this entry; default: the "
                               "entry's name.")
    preset: str | None = Field(None, description="Backbone preset; default: the config's top-level 'backbone'.")
    momentum: float = Field(0.99, ge=0, lt=1, description="SGD momentum (Nesterov).")
    warmup_iterations: int = Field(0, ge=0, description="Linear warm-up steps (must be below iterations).")
    augmentation: bool | AugmentationSettings = Field(False, description="Augmentation of the pre-training "
                                                      "patches (true / false / augmentation settings).")
    foreground_fraction: float = Field(0.0, ge=0, le=1, description="Share of patches centred on foreground.")


class MAESettings(PretrainingSettings):
    """Masked autoencoder (``pretraining.mae``): blocky mask, MSE on masked voxels."""

    mask_ratio: float = Field(0.75, gt=0, lt=1, description="Share of masked blocks.")
    mask_block: int = Field(16, gt=0, description="Edge of a mask block in voxels (the paper: 16).")


class Spark3DSettings(MAESettings):
    """Sparse masked autoencoder (``pretraining.spark3d``; nnssl's SparkMAETrainer, docs/pretraining/spark3d.md)."""

    mask_token_std: float = Field(0.02, gt=0, description="Std of the mask tokens' truncated-normal "
                                  "initialisation, cut at +-1 std (nnssl architectures/spark_model.py).")


class ModelsGenesisSettings(PretrainingSettings):
    """Models Genesis restoration (``pretraining.models_genesis``)."""


class VoCoSettings(PretrainingSettings):
    """Volume contrast (``pretraining.voco``); ``patch_size`` is the region split into base crops."""

    base_grid: Triple = Field((2, 2, 2), description="Base crops per axis [z, y, x] (one number: all axes).")
    num_target_crops: int = Field(4, gt=0, description="Random target crops per region.")
    projection_hidden: int = Field(512, gt=0, description="Hidden width of the projector (thrown away after).")
    projection_dim: int = Field(256, gt=0, description="Output width of the projector.")
    prediction_weight: float = Field(1.0, ge=0, description="Weight of the overlap-prediction loss.")
    regularisation_weight: float = Field(1.0, ge=0, description="Weight of the base-crop regulariser.")


class LabelledDatasetEntry(BaseModel):
    """One labelled dataset of a supervised pre-training method."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dataset: str = Field(description="A dataset defined under 'datasets'.")
    classes: list[str] | None = Field(None, description="Classes learnt; default: every class of the dataset.")


class MultiTalentSettings(PretrainingSettings):
    """Supervised multi-dataset segmentation (``pretraining.multitalent``), as the MultiTalent v2 code behind the
    authors' checkpoint (MIC-DKFZ/MultiTalent ``MultiTalent_trainer.py``, ``MultiTalent_multistem.py``): one head
    per dataset, deep supervision, per-dataset Dice + CE, cases drawn with weight 1/sqrt(dataset size)."""

    # MultiTalent_trainer: initial_lr 1e-3 (SGD Nesterov 0.99, weight decay 3e-5, clip 12 are nnU-Net's, inherited);
    # 1000 epochs x 250 iterations
    lr: float = Field(1e-3, ge=0, description="Peak learning rate (MultiTalent_trainer.initial_lr).")
    iterations: int = Field(250_000, gt=0, description="Optimiser steps (the release: 1000 epochs x 250).")
    augmentation: bool | AugmentationSettings = Field(True, description="Augmentation of the pre-training patches.")
    foreground_fraction: float = Field(0.33, ge=0, le=1, description="Probability that a sample is centred on a "
                                       "voxel of one of its head's classes (nnU-Net's 33 %, drawn per sample as "
                                       "the release's probabilistic oversampling).")
    datasets: list[LabelledDatasetEntry] = Field(min_length=1, description="Labelled datasets to learn from.")
    loss: Literal["ce", "bce"] = Field("ce", description="'ce': softmax cross-entropy + Dice per head with a "
                                       "background channel (v2, the checkpoint's code); 'bce': sigmoid BCE + Dice per "
                                       "class (the first MultiTalent paper).")
    ce_weight: float = Field(1.0, ge=0, description="Weight of the cross-entropy term.")
    dice_weight: float = Field(1.0, ge=0, description="Weight of the soft Dice term.")
    deep_supervision: bool = Field(True, description="Loss on every decoder resolution, weights 1/2^i normalised, "
                                   "the lowest resolution 0 (nnU-Net).")
    case_weight_exponent: float = Field(0.5, ge=0, le=1, description="A case of a dataset with n cases is drawn "
                                        "with weight n^-exponent, so the dataset with weight n^(1 - exponent): 0.5 "
                                        "the release's 1/sqrt(n); 0 uniform over cases; 1 uniform over datasets.")
    max_classes_per_head: int = Field(20, gt=0, description="A dataset with more classes gets one head (and stem) "
                                      "per group of this many, ids '<dataset>_<group>' (the release's max_classes).")
    stems: Literal["per_dataset", "shared"] = Field("per_dataset", description="'per_dataset': one input stem per "
                                                    "head, stored as encoder.stem.<head id> (the released checkpoint's "
                                                    "layout); 'shared': one stem, encoder.stem.")
    default_stem: str | None = Field(None, description="Head id whose stem the checkpoint's key_to_stem names "
                                     "(the release: the CT stem 351_0); default: the first dataset's first head.")


#: registered method name -> its settings class (``catalog.PRETRAINING_MODULES`` names the same methods)
METHOD_SETTINGS: dict[str, type[PretrainingSettings]] = {
    "mae": MAESettings,
    "spark3d": Spark3DSettings,
    "models_genesis": ModelsGenesisSettings,
    "voco": VoCoSettings,
    "multitalent": MultiTalentSettings,
}


def method_settings_class(name: str, where: str = "pretraining.methods") -> type[PretrainingSettings]:
    """The settings class of registered method ``name``; unknown names are a :class:`ConfigError`."""
    return registered(METHOD_SETTINGS, name, where, "pre-training method")


def training_defaults(name: str) -> dict[str, Any]:
    """Training-loop defaults of method ``name`` that differ from ``TrainingSettings``'s."""
    return changed_loop_defaults(METHOD_SETTINGS[name])
