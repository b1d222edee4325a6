"""Settings of the detectors: the training loop plus each detector's own constructor keywords.

A config entry ``detectors.<name>`` is validated with the class registered here for its ``detector:`` (or, when
that key is absent, for the entry's name). The model modules take their constructor defaults from these
classes, so a default is written once. Values follow the project's current recipe; the release's differences
are tracked in docs/settings.md and the detector issue.

Example:
    >>> s = RetinaUNetSettings.parse({"iterations": "500", "fpn_channels": 32}, where="detectors.retina_unet")
    >>> s.iterations, s.fpn_channels, s.optimizer
    (500, 32, 'sgd')
    >>> DeformableDETRSettings.default("optimizer"), DeformableDETRSettings.default("warmup_iterations")
    ('adamw', 10000)
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from pretrain_det3d.settings.training import TrainingSettings, changed_loop_defaults, registered

Vector6 = tuple[float, float, float, float, float, float]


class DetectorSettings(TrainingSettings):
    """Keys every detector entry has besides the training loop."""

    detector: str | None = Field(None, description="Registered detector class of this entry; default: the "
                                 "entry's name (so two entries can run one detector with different settings).")
    preset: str | None = Field(None, description="Backbone preset; default: the config's top-level 'backbone'.")
    stage_to_local: bool = Field(False, description="Copy the job's training cases to local disk ($TMPDIR) first.")
    stage_dir: str | None = Field(None, description="Where stage_to_local copies to; default $TMPDIR.")
    # both ResEnc detectors of the release train with gpu1_mixed16 and no gradient clipping (docs/settings.md)
    amp_dtype: Literal["auto", "bfloat16", "float16"] = Field(
        "float16", description="Mixed-precision dtype on CUDA: 'float16' (with loss scaling, the release's "
        "16-mixed), 'auto' (bf16 where the GPU has it) or 'bfloat16'.")
    grad_clip: float | None = Field(None, gt=0, description="Gradient-norm clipping; null: off (the release "
                                    "clips nothing).")
    initialisations: list[str] | None = Field(
        None, description="Initialisations this detector runs with (scratch, methods, published checkpoints); "
        "default: study.initialisations. The native Retina U-Net takes only scratch and its own checkpoint.")

    @classmethod
    def model_keywords(cls) -> list[str]:
        """The keys that are constructor keywords of the detector (not training-loop or bookkeeping keys)."""
        return [k for k in cls.model_fields if k not in DetectorSettings.model_fields]


class RetinaUNetSettings(DetectorSettings):
    """Retina U-Net on a ResEnc encoder (``models.retina_unet.RetinaUNet``)."""

    head_strides: list[int] | None = Field(None, description="Strides of the head levels; default: nnDetection's "
                                           "planner rule, levels min(max(1, n - 4), 2) .. n - 1 of an n-stage encoder "
                                           "(ResEnc-L: 4, 8, 16, 32; a 4-stage preset: 2, 4, 8).")
    anchor_shapes: list[list[list[float]]] | None = Field(
        None, description="Explicit anchor shapes per level [[z, y, x], ...] (the same count on every level); "
        "default: planned from the training boxes as nnDetection's planner does (models/anchors.py).")
    anchors_per_level: Literal[1, 8, 27, 64, 125] = Field(
        27, description="Planned anchors per location of every head level, k**3: all products of k sizes per "
        "axis (the release: 27, 3 per axis), the sizes chosen to maximise the boxes' mean best IoU.")
    fpn_channels: int = Field(128, gt=0, description="UFPN width of the head levels (nnDetection plans 4 x 32 "
                              "start channels); finer levels halve it per level.")
    fpn_min_channels: int = Field(8, gt=0, description="UFPN: smallest width of the levels below the heads.")
    head_convs: int = Field(1, ge=0, description="Head convs after each tower's input conv (nnDetection's "
                            "num_convs: 1 gives two conv-GroupNorm-LeakyReLU layers per tower).")
    head_channels_per_group: int = Field(16, gt=0, description="GroupNorm channels per group in the heads.")
    atss_candidates: int = Field(4, gt=0, description="ATSS candidate anchors per level and box.")
    atss_center_in_gt: bool = Field(False, description="ATSS: require anchor centres inside the box.")
    focal_alpha: float = Field(0.75, ge=0, le=1, description="Focal loss alpha (weight of the positives).")
    focal_gamma: float = Field(1.0, ge=0, description="Focal loss gamma.")
    cls_prior: float = Field(0.01, gt=0, lt=1, description="Initial foreground probability of every anchor.")
    box_weights: Vector6 = Field((1.0, 1.0, 1.0, 1.0, 1.0, 1.0), description="Box coder weights.")
    cls_weight: float = Field(0.3, ge=0, description="Weight of the focal loss (summed over all anchors, mean "
                              "over classes, divided by the positive-count EMA).")
    reg_weight: float = Field(1.0, ge=0, description="Weight of the box loss (summed, divided by the EMA).")
    reg_smooth_l1_beta: float = Field(1.0, ge=0, description="Smooth-L1 change point of the box loss (nnDetection's "
                                      "L1Regressor default); 0 gives plain L1.")
    reg_learn_scale: bool = Field(True, description="Learn one scale per head level for the box deltas.")
    loss_norm_beta: float = Field(0.7, ge=0, lt=1, description="EMA beta of the positive-anchor count that "
                                  "normalises the box losses (0: this batch's count).")
    loss_norm_bias_correction_steps: int = Field(5000, ge=0, description="Updates during which the EMA is "
                                                 "bias-corrected.")
    seg_ce_weight: float = Field(0.5, ge=0, description="Weight of the segmentation cross-entropy.")
    seg_dice_weight: float = Field(0.5, ge=0, description="Weight of the segmentation batch Dice loss.")
    score_threshold: float = Field(0.0, ge=0, le=1, description="Per-tile score threshold at inference (kept: "
                                   "above it).")
    topk_per_level: int = Field(10000, gt=0, description="Candidates kept per level before NMS.")
    nms_iou: float = Field(0.6, gt=0, le=1, description="Per-tile NMS IoU.")
    max_detections: int = Field(100, gt=0, description="Detections kept per tile.")


class DeformableDETRSettings(DetectorSettings):
    """Two-stage 3D Deformable DETR on a ResEnc encoder (``models.deformable_detr.DeformableDETR``).

    Defaults are nnDetection's release (``residual_encoder_def_detr_v002``: model config
    ``deformable_detr_sigm_for_ResEnc``, trainer ``adamw_100ep_high_lr_wd[_warm]``, ``gpu1_mixed16``);
    docs/settings.md names the source of each.
    """

    # the DETR's own optimiser recipe (adamw_100ep_high_lr_wd; the 10000-step warm-up is its _warm variant)
    optimizer: Literal["sgd", "adamw"] = Field("adamw", description="SGD with Nesterov momentum, or AdamW.")
    lr: float = Field(3e-4, ge=0, description="Peak learning rate.")
    weight_decay: float = Field(1e-4, ge=0, description="Weight decay.")
    adam_eps: float = Field(1e-4, gt=0, description="AdamW: eps added to the denominator.")
    amsgrad: bool = Field(True, description="AdamW: the AMSGrad variant.")
    warmup_iterations: int = Field(10000, ge=0, description="Linear warm-up steps (must be below iterations).")
    feature_strides: list[int] | None = Field(None, description="Encoder strides feeding the channel mapper; "
                                              "default: the deepest stages, four levels with extra_levels.")
    extra_levels: int = Field(0, ge=0, description="Extra stride-2 levels made from the deepest feature map.")
    hidden_dim: int = Field(128, gt=0, description="Transformer width.")
    num_heads: int = Field(8, gt=0, description="Attention heads.")
    num_points: int = Field(4, gt=0, description="Sampling points per head and level.")
    num_encoder_layers: int = Field(3, ge=0, description="Deformable encoder layers.")
    num_decoder_layers: int = Field(6, gt=0, description="Decoder layers.")
    ffn_dim: int = Field(1024, gt=0, description="Feed-forward width.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout in the transformer (attention, projections, FFN).")
    num_queries: int | None = Field(None, gt=0, description="Object queries (two-stage: top proposals); default: "
                                    "planned from the training boxes, max(min_queries, 3 x the 95th percentile "
                                    "over training images of the most box centres within half a patch of one box).")
    min_queries: int = Field(12, gt=0, description="Lower bound of the planned num_queries (the release's "
                             "min_detections_per_img).")
    group_norm_groups: int = Field(16, gt=0, description="GroupNorm groups of the channel mapper.")
    proposal_base_size: float = Field(0.05, gt=0, description="Normalised size of finest-level proposals "
                                      "(doubles per level).")
    position_temperature: float = Field(10000.0, gt=0, description="Temperature of the sine position "
                                        "embeddings (feature maps and two-stage proposals).")
    cost_class: float = Field(2.0, ge=0, description="Hungarian matching: weight of the focal class cost.")
    cost_bbox: float = Field(5.0, ge=0, description="Hungarian matching: L1 box cost.")
    cost_giou: float = Field(2.0, ge=0, description="Hungarian matching: GIoU cost.")
    focal_alpha: float = Field(0.75, ge=0, le=1, description="Focal loss alpha (weight of the positives); the "
                               "matcher's class cost uses the same.")
    focal_gamma: float = Field(1.0, ge=0, description="Focal loss gamma; the matcher's class cost uses the same.")
    cls_prior: float = Field(0.05, gt=0, lt=1, description="Initial foreground probability of every query.")
    cls_weight: float = Field(1.0, ge=0, description="Weight of the focal loss (summed over queries, mean over "
                              "classes, divided by the boxes in the batch).")
    l1_weight: float = Field(5.0, ge=0, description="Weight of the L1 box loss.")
    giou_weight: float = Field(2.0, ge=0, description="Weight of the GIoU loss.")
    max_detections: int | None = Field(None, gt=0, description="Detections kept per tile (top query-class "
                                       "pairs); default: num_queries, as the release's TopKBoxPost.")
    score_threshold: float = Field(0.0, ge=0, le=1, description="Per-tile score threshold at inference.")


class NativeRetinaUNetSettings(RetinaUNetSettings):
    """nnDetection's native Retina U-Net (``models.native_retina_unet.NativeRetinaUNet``): the planned plain conv
    encoder and UFPN of ``retinaunet_focal_v002_for_ConvBackboneMultiTalent``, the heads and losses of
    ``retina_unet``.

    Without a checkpoint the encoder is planned from the dataset (``models.native_planning``); with the released
    checkpoint its architecture comes from the checkpoint (as the release's ``--load_adapt_plan``) and the
    width keys below are not used. ``head_strides`` does not apply (the plan fixes the head levels).
    """

    # the release's sgd99_restart trainer: SGD Nesterov with momentum 0.99 (its restart at 0.9 on NaN is not
    # implemented; docs/settings.md)
    momentum: float = Field(0.99, ge=0, lt=1, description="SGD momentum (Nesterov).")
    architecture: dict[str, Any] | None = Field(
        None, description="Explicit network (conv_kernels, strides, decoder_levels, start_channels, max_channels, "
        "fpn_channels; models.native_planning.NativeArchitecture); default: planned from the dataset, or fixed by "
        "the checkpoint.")
    start_channels: int = Field(32, gt=0, description="Width of the first encoder level; doubled per level up to "
                                "max_channels (nnDetection's BoxC002 / ConvBackbone). Planned networks only.")
    max_channels: int = Field(320, gt=0, description="Widest encoder level. Planned networks only.")
    convs_per_level: int = Field(2, ge=1, description="Conv-InstanceNorm-LeakyReLU blocks per encoder level, the "
                                 "first strided (ConvBackbone's num_conv). Planned networks only.")
    max_patch_voxels: int = Field(128**3, gt=0, description="Planner fit rule: the planned patch shrinks until "
                                  "it has at most this many voxels (nnDetection measures GPU memory instead).")
    stem: str | None = Field(None, description="Checkpoint stem to load (a MultiTalent checkpoint holds one per "
                             "source dataset, e.g. 'stem.004'); default: the checkpoint's key_to_stem (the "
                             "release's stem_override).")
    transfer_decoder: bool = Field(True, description="Also load the checkpoint's FPN decoder (the release's "
                                   "DetSegModel_TL); false: encoder and stem only, decoder random (the release "
                                   "config's default module DetSegModel_TL_MultiTalentStem).")


#: registered detector name -> its settings class (``catalog.DETECTOR_MODULES`` names the same detectors)
DETECTOR_SETTINGS: dict[str, type[DetectorSettings]] = {
    "retina_unet": RetinaUNetSettings,
    "deformable_detr": DeformableDETRSettings,
    "retina_unet_native": NativeRetinaUNetSettings,
}


def detector_settings_class(name: str, where: str = "detectors") -> type[DetectorSettings]:
    """The settings class of registered detector ``name``; unknown names are a :class:`ConfigError`."""
    return registered(DETECTOR_SETTINGS, name, where, "detector")


def training_defaults(name: str) -> dict[str, Any]:
    """Training-loop defaults of detector ``name`` that differ from ``TrainingSettings``'s."""
    return changed_loop_defaults(DETECTOR_SETTINGS[name])
