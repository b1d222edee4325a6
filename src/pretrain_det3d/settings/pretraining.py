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
    # nnssl's BaseMAETrainer.get_training_transforms (Spark3D's trainer inherits it): one spatial transform
    # (rotation about every axis in +-30 deg, p_rot_per_sample 0.2; isotropic scaling in (0.7, 1.4),
    # p_scale_per_sample 0.2; no elastic deformation), then mirroring of axes (0, 1, 2); no intensity transform
    augmentation: bool | AugmentationSettings = Field(
        {"p_rotation": 0.2, "rotation_degrees": [-30.0, 30.0], "p_scaling": 0.2, "scaling_range": [0.7, 1.4],
         "mirror_axes": [0, 1, 2], "p_noise": 0.0, "p_blur": 0.0, "p_brightness": 0.0, "p_contrast": 0.0,
         "p_gamma": 0.0, "p_gamma_inverted": 0.0},
        description="Augmentation of the pre-training patches; default nnssl's BaseMAETrainer (rotation and "
        "scaling with p 0.2 each, mirroring, no intensity transform; source: nnssl "
        "training/nnsslTrainer/masked_image_modeling/BaseMAETrainer.py). true: the detectors' full default; "
        "false: none.")


class Spark3DSettings(MAESettings):
    """Sparse masked autoencoder (``pretraining.spark3d``; nnssl's SparkMAETrainer, docs/pretraining/spark3d.md)."""

    mask_token_std: float = Field(0.02, gt=0, description="Std of the mask tokens' truncated-normal "
                                  "initialisation, cut at +-1 std (nnssl architectures/spark_model.py).")


class ModelsGenesisSettings(PretrainingSettings):
    """Models Genesis restoration (``pretraining.models_genesis``); the rates are the original's
    (MrGiovanni/ModelsGenesis pytorch/config.py, pytorch/utils.py; nnssl's model_genesis_transform.py copies
    them), ``intensity`` the scale the corruptions act on; details in docs/pretraining/models_genesis.md."""

    flip_rate: float = Field(0.4, ge=0, le=1, description="Probability of each further flip (input and target).")
    max_flips: int = Field(3, ge=0, description="At most this many flips per sample.")
    local_shuffle_rate: float = Field(0.5, ge=0, le=1, description="Probability of local pixel shuffling.")
    local_shuffle_blocks: int = Field(10_000, ge=0, description="Boxes shuffled per local pixel shuffling.")
    local_shuffle_max_fraction: float = Field(0.1, gt=0, le=1, description="Largest shuffled box edge as a "
                                              "fraction of the patch edge.")
    nonlinear_rate: float = Field(0.9, ge=0, le=1, description="Probability of the Bezier intensity curve.")
    invert_rate: float = Field(0.5, ge=0, le=1, description="Share of the curves that are decreasing (inverting).")
    bezier_samples: int = Field(1_000, ge=2, description="Points of the curve's interpolation table (the "
                                "original: 100000; 1000 interpolate a cubic to < 1e-5).")
    paint_rate: float = Field(0.9, ge=0, le=1, description="Probability of in- or out-painting.")
    inpaint_rate: float = Field(0.2, ge=0, le=1, description="Share of the paintings that are in-paintings.")
    paint_max_boxes: int = Field(5, ge=1, description="At most this many painted (in) or kept (out) boxes.")
    paint_continue_rate: float = Field(0.95, ge=0, le=1, description="Probability of drawing each box "
                                       "after the first (in-painting: also the first one, as the original).")
    intensity: str = Field(
        "zscore", pattern="^(zscore|patch_minmax|hu_window)$",
        description="Scale the corruptions act on: 'zscore' (nnssl: the z-scored patch as it is), "
        "'patch_minmax' (each patch channel mapped to [0, 1] by its min and max, and back), 'hu_window' (the "
        "original: HU clipped to hu_window and scaled to [0, 1]; CT corpora only, HU recovered from the "
        "corpus plan's CT mean and std).")
    hu_window: tuple[float, float] = Field((-1000.0, 1000.0), description="intensity 'hu_window': the HU "
                                           "range mapped to [0, 1] (the original's hu_min, hu_max).")


class VoCoSettings(PretrainingSettings):
    """Volume contrast (``pretraining.voco``) as nnssl's VoCoTrainer; sources, differences: docs/pretraining/voco.md."""

    patch_size: Triple = Field((64, 256, 256), description="The region [z, y, x] cut into base crops (nnssl's "
                               "VoCoTrainer: 256x256x64, in-plane 256).")
    batch_size: int = Field(2, gt=0, description="Regions per step (nnssl's AbstractTrainer total_batch_size).")
    grad_clip: float | None = Field(None, gt=0, description="Gradient-norm clipping; null: off (nnssl's "
                                    "VoCoTrainer does not clip).")
    base_grid: Triple = Field((1, 4, 4), description="Base crops per axis [z, y, x] (one number: all axes); "
                              "nnssl's VoCoTrainer: 4x4 in-plane, 1 along z; [2, 2, 2]: a 3-D grid.")
    num_target_crops: int = Field(4, gt=0, description="Random target crops per region (nnssl: 4).")
    projection_hidden: int = Field(2048, gt=0, description="Width of the projector's two hidden layers (nnssl: "
                                   "2048; thrown away after pre-training).")
    projection_dim: int = Field(2048, gt=0, description="Output width of the projector (nnssl: 2048).")
    prediction_weight: float = Field(1.0, ge=0, description="Weight of the overlap-prediction loss (nnssl: 1).")
    regularisation_weight: float = Field(1.0, ge=0, description="Weight of the base-crop regulariser (nnssl: 1).")
    crop_augmentation: bool = Field(True, description="Augment every base and target crop on its own (nnssl's "
                                    "VocoTransform aug='train': noise, blur, brightness, contrast, low resolution, "
                                    "gamma, mirroring, in-plane rot90).")


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
