"""Retina U-Net: a ResEnc encoder, nnDetection's UFPN decoder, anchor heads and an auxiliary segmentation.

The defaults are those of the authors' release inside MIC-DKFZ/nnDetection, model configuration
``nndet/conf/train/model_cfg/retinaunet_l1_focal_atss_ms_ema_for_ResEnc.yaml`` with the module
``RetinaUNetFocalV002_ResEnc`` (``nndet/ptmodule/retinaunet/ResEncModels.py``); docs/settings.md lists each value
with its file. The code is our own.

Architecture:

- ``self.encoder``: :func:`~pretrain_det3d.models.backbone.build_resenc_encoder` (stage outputs at strides
  1, 2, 4, ...), so pre-trained stems and stages load by
  :func:`~pretrain_det3d.models.checkpoint.load_pretrained_encoder`.
- Decoder, :class:`UFPN` (``nndet/nn/neck/fpn.py``): every level from full resolution up to the coarsest head
  level gets a 1x1 lateral conv; from the coarsest level down, the merged map of the level below in resolution
  is upsampled by a transposed conv (kernel = stride, no bias) and added to the lateral, and each merged map
  passes one 3x3 output conv. Lateral, output and upsampling convs have no norm and no activation. Head levels
  are ``fpn_channels`` wide; each level finer than the first head level halves the width, at least
  ``fpn_min_channels`` (ResEnc-L, fpn 128, head levels from stride 4: 32-64-128-128-128-128).
- Head levels (``head_strides`` default): the planner rule of nnDetection (``BoxC002`` in
  ``nndet/planning/architecture/boxes/``, ``num_decoder_level`` 4 and ``min_decoder_level`` 2): the levels
  ``min(max(1, n - 4), 2) ... n - 1`` of an ``n``-stage encoder. ResEnc-L (6 stages): strides 4, 8, 16, 32;
  a 4-stage preset such as ``resenc_demo``: strides 2, 4, 8.
- Heads (``BoxHeadAll`` with ``FocalClassifier`` / ``L1Regressor``, ``nndet/nn/heads/``), shared over the head
  levels, one classifier and one regressor: an input 3x3 conv then ``head_convs`` more 3x3 convs, each with
  GroupNorm (``head_channels_per_group`` channels per group, affine) and LeakyReLU and without conv bias, then a
  3x3 conv to ``A * num_classes`` logits or ``A * 6`` deltas. All head convs start from N(0, 0.01) with zero
  bias; the classifier's last bias starts at the prior ``cls_prior``. The regressor multiplies each level's
  deltas by a learned scale (one ``nn.Parameter`` per level, starting at 1).
- Auxiliary segmentation (``DiCESegmenterFgBg``, ``nndet/nn/heads/segmenter.py``): a 1x1 conv on the
  full-resolution decoder level to two channels (background, foreground).

Training (``BoxHeadAll.compute_loss``, ``nndet/nn/heads/comb/anchor_all.py``): anchors from MONAI's
``AnchorGeneratorWithAnchorShape`` with one planned shape set per level (:mod:`pretrain_det3d.models.anchors`),
ATSS matching (MONAI ``ATSSMatcher``; a box ATSS leaves without any anchor gets its best-IoU anchor), box deltas
from MONAI's ``BoxCoder``. Every anchor takes part in the classification loss (no sampling):

- ``cls = cls_weight * sum_anchors(mean_classes(sigmoid focal loss)) / norm`` (the release's ``mean_last_sum``
  reduction: the mean over the class axis, summed over anchors; for one class it is the plain sum),
- ``reg = reg_weight * sum(smooth_l1(scaled deltas, target deltas)) / norm`` over the matched anchors (the
  release's ``L1Regressor`` keeps its smooth-L1 change point ``beta`` 1; ``reg_smooth_l1_beta`` 0 gives L1),
- ``norm = max(1, EMA of the batch's positive-anchor count)`` with bias correction (:class:`PositiveCountEMA`),
- ``seg = seg_ce_weight * CE + seg_dice_weight * (1 - batch Dice of the foreground)`` (Dice over the whole
  batch, smooth 0 / 1e-5, MONAI's ``DiceLoss``),
- ``loss = cls + reg + seg``.

Inference: decode the deltas, then MONAI's ``BoxSelector`` steps (score threshold, top-k per level, class-wise
NMS, at most ``max_detections``) with its NMS done by ``models.nms`` (the same boxes, several times faster).

Example:
    >>> import torch
    >>> net = RetinaUNet("resenc_demo", 1, 1, anchor_shapes=[[[4, 4, 4]] * 3, [[8, 8, 8]] * 3],
    ...                  head_strides=[4, 8], fpn_channels=16)
    >>> out = net.predict(torch.zeros(1, 1, 32, 32, 32))
    >>> sorted(out[0])
    ['boxes', 'labels', 'scores']
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from monai.apps.detection.utils.anchor_utils import AnchorGeneratorWithAnchorShape
from monai.apps.detection.utils.ATSS_matcher import ATSSMatcher
from monai.apps.detection.utils.box_coder import BoxCoder
from monai.losses import DiceLoss
from torch import Tensor, nn
from torchvision.ops import sigmoid_focal_loss

from pretrain_det3d.models.anchors import DEFAULT_ANCHORS_PER_LEVEL, plan_anchor_shapes
from pretrain_det3d.models.backbone import build_resenc_encoder, get_preset
from pretrain_det3d.models.nms import FastNMSBoxSelector
from pretrain_det3d.models.registry import DETECTORS
from pretrain_det3d.settings.detectors import RetinaUNetSettings

_D = RetinaUNetSettings.default

# Architecture defaults.
DEFAULT_FPN_CHANNELS = _D("fpn_channels")
DEFAULT_FPN_MIN_CHANNELS = _D("fpn_min_channels")
#: UFPN: each level finer than the first head level has this factor fewer channels (nnDetection's default 2)
FPN_CHANNEL_REDUCTION = 2
#: nnDetection's planner (BoxC002): at most this many head levels, the finest no deeper than MIN_DECODER_LEVEL
NUM_DECODER_LEVELS = 4
MIN_DECODER_LEVEL = 2
DEFAULT_HEAD_CONVS = _D("head_convs")
DEFAULT_HEAD_CHANNELS_PER_GROUP = _D("head_channels_per_group")
SEG_CLASSES = 2  # background, foreground
LEAKY_SLOPE = 0.01
HEAD_INIT_STD = 0.01  # nnDetection's dense heads: N(0, 0.01) weights, zero bias

# Matching and loss defaults.
DEFAULT_ATSS_CANDIDATES = _D("atss_candidates")
DEFAULT_ATSS_CENTER_IN_GT = _D("atss_center_in_gt")
DEFAULT_FOCAL_ALPHA = _D("focal_alpha")
DEFAULT_FOCAL_GAMMA = _D("focal_gamma")
DEFAULT_CLS_PRIOR = _D("cls_prior")
DEFAULT_BOX_WEIGHTS = _D("box_weights")
DEFAULT_CLS_WEIGHT = _D("cls_weight")
DEFAULT_REG_WEIGHT = _D("reg_weight")
DEFAULT_REG_SMOOTH_L1_BETA = _D("reg_smooth_l1_beta")
DEFAULT_REG_LEARN_SCALE = _D("reg_learn_scale")
DEFAULT_LOSS_NORM_BETA = _D("loss_norm_beta")
DEFAULT_LOSS_NORM_BIAS_STEPS = _D("loss_norm_bias_correction_steps")
DEFAULT_SEG_CE_WEIGHT = _D("seg_ce_weight")
DEFAULT_SEG_DICE_WEIGHT = _D("seg_dice_weight")
#: the release's Dice smoothing: 0 in the numerator (segmenter_kwargs), 1e-5 in the denominator (its default)
DICE_SMOOTH_NUMERATOR = 0.0
DICE_SMOOTH_DENOMINATOR = 1e-5

# Inference defaults (per patch).
DEFAULT_SCORE_THRESHOLD = _D("score_threshold")
DEFAULT_TOPK_PER_LEVEL = _D("topk_per_level")
DEFAULT_NMS_IOU = _D("nms_iou")
DEFAULT_MAX_DETECTIONS = _D("max_detections")


def release_head_levels(n_stages: int) -> list[int]:
    """Encoder stages (0 = full resolution) that nnDetection's planner makes head levels for ``n_stages``.

    Example:
        >>> release_head_levels(6), release_head_levels(4), release_head_levels(3)
        ([2, 3, 4, 5], [1, 2, 3], [1, 2])
    """
    if n_stages < 2:
        raise ValueError(f"need at least two encoder stages for head levels, got {n_stages}")
    first = min(max(1, n_stages - NUM_DECODER_LEVELS), MIN_DECODER_LEVEL)
    return list(range(first, n_stages))


def resolve_head_strides(preset: str, head_strides: Sequence[int] | None) -> list[int]:
    """Head strides to use: the given ones (each must be a stage stride) or the release's rule for the preset.

    Example:
        >>> resolve_head_strides("resenc_demo", None), resolve_head_strides("resenc_l", None)
        ([2, 4, 8], [4, 8, 16, 32])
    """
    available = get_preset(preset).cumulative_strides
    if head_strides is None:
        return [available[level] for level in release_head_levels(len(available))]
    chosen = sorted(int(s) for s in head_strides)
    missing = [s for s in chosen if s not in available]
    if missing or not chosen or len(set(chosen)) != len(chosen):
        raise ValueError(f"head_strides {list(head_strides)}: preset {preset!r} has decoder strides {available}")
    return chosen


def fpn_level_channels(
    n_levels: int, first_head_level: int, fpn_channels: int, min_channels: int = DEFAULT_FPN_MIN_CHANNELS
) -> list[int]:
    """UFPN widths of levels ``0 .. n_levels - 1``: ``fpn_channels`` from the first head level on, halved per level
    below it, never under ``min_channels``.

    Example:
        >>> fpn_level_channels(6, 2, 128), fpn_level_channels(4, 2, 32)
        ([32, 64, 128, 128, 128, 128], [8, 16, 32, 32])
    """
    return [
        fpn_channels
        if level >= first_head_level
        else max(int(fpn_channels / FPN_CHANNEL_REDUCTION ** (first_head_level - level)), min_channels)
        for level in range(n_levels)
    ]


def _group_count(channels: int, channels_per_group: int) -> int:
    # channels // channels_per_group groups; where that does not divide the width (CPU-sized heads), the largest
    # divisor below it; at least one group.
    target = max(1, channels // channels_per_group)
    return max(g for g in range(1, target + 1) if channels % g == 0)


def _he_init(module: nn.Module) -> None:
    # nnDetection's neck / segmenter initialiser (InitHeV2, mode fan_out): He normal weights, zero bias.
    for layer in module.modules():
        if isinstance(layer, (nn.Conv3d, nn.ConvTranspose3d)):
            nn.init.kaiming_normal_(layer.weight, a=LEAKY_SLOPE, mode="fan_out", nonlinearity="leaky_relu")
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


class UFPN(nn.Module):
    """nnDetection's U-shaped FPN over encoder levels ``0 .. last_level`` (see the module docstring).

    Args:
        in_channels: encoder widths of levels ``0 .. last_level`` (or more; deeper levels are ignored).
        strides: per-level stride of each encoder stage relative to the one above it (level 0's is unused).
        channels: output width of each level ``0 .. last_level`` (:func:`fpn_level_channels`).
    """

    def __init__(self, in_channels: Sequence[int], strides: Sequence[int], channels: Sequence[int]) -> None:
        super().__init__()
        self.channels = list(channels)
        n = len(self.channels)
        self.lateral = nn.ModuleList([nn.Conv3d(in_channels[lvl], self.channels[lvl], 1) for lvl in range(n)])
        self.out = nn.ModuleList([nn.Conv3d(c, c, 3, padding=1) for c in self.channels])
        # up[l - 1] brings level l's merged map to level l - 1 (resolution and width).
        self.up = nn.ModuleList(
            [
                nn.ConvTranspose3d(self.channels[lvl], self.channels[lvl - 1], strides[lvl], stride=strides[lvl],
                                   bias=False)
                for lvl in range(1, n)
            ]
        )
        _he_init(self)

    def forward(self, skips: Sequence[Tensor]) -> list[Tensor]:
        """Decoder maps of levels ``0 .. last_level`` (finest first)."""
        n = len(self.channels)
        outputs: list[Tensor] = [torch.empty(0)] * n
        upsampled: Tensor | None = None
        for level in reversed(range(n)):
            merged = self.lateral[level](skips[level])
            if upsampled is not None:
                merged = merged + upsampled
            if level > 0:
                upsampled = self.up[level - 1](merged)
            outputs[level] = self.out[level](merged)
        return outputs


class _Head(nn.Module):
    """A tower shared over levels (input conv + ``num_convs`` convs, GroupNorm, LeakyReLU), then the output conv.

    With ``num_levels`` given, each level's output is multiplied by its own learned scale (starting at 1).
    """

    def __init__(
        self,
        channels: int,
        num_anchors: int,
        out_per_anchor: int,
        num_convs: int,
        channels_per_group: int = DEFAULT_HEAD_CHANNELS_PER_GROUP,
        prior: float | None = None,
        num_levels: int | None = None,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(num_convs + 1):
            layers += [
                nn.Conv3d(channels, channels, 3, padding=1, bias=False),
                nn.GroupNorm(_group_count(channels, channels_per_group), channels, affine=True),
                nn.LeakyReLU(LEAKY_SLOPE, inplace=True),
            ]
        self.tower = nn.Sequential(*layers)
        self.out = nn.Conv3d(channels, num_anchors * out_per_anchor, 3, padding=1)
        self.out_per_anchor = out_per_anchor
        self.scales = nn.Parameter(torch.ones(num_levels)) if num_levels else None
        for layer in self.modules():
            if isinstance(layer, nn.Conv3d):
                nn.init.normal_(layer.weight, mean=0.0, std=HEAD_INIT_STD)
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)
        if prior is not None:
            nn.init.constant_(self.out.bias, -math.log((1 - prior) / prior))

    def forward(self, features: list[Tensor]) -> Tensor:
        """Return ``[B, sum_l(Z_l*Y_l*X_l*A), out_per_anchor]`` in MONAI's anchor order (location, anchor)."""
        flat = []
        for level, feature in enumerate(features):
            out = self.out(self.tower(feature))  # [B, A*K, Z, Y, X]
            b, _, z, y, x = out.shape
            out = out.view(b, -1, self.out_per_anchor, z, y, x)  # [B, A, K, Z, Y, X]
            out = out.permute(0, 3, 4, 5, 1, 2).reshape(b, -1, self.out_per_anchor)  # [B, Z*Y*X*A, K]
            if self.scales is not None:
                out = out * self.scales[level]
            flat.append(out)
        return torch.cat(flat, dim=1)


class PositiveCountEMA(nn.Module):
    """Exponential moving average of the positive-anchor count that normalises the box losses.

    ``update(n)``: ``ema <- beta * ema + (1 - beta) * n`` (starting from 0), then returns the current value,
    ``ema / (1 - beta^t)`` during the first ``bias_correction_steps`` updates ``t`` (bias correction) and ``ema``
    afterwards. nnDetection's ``EMABiasStepsModule`` (head_kwargs.ema_loss_kwargs: beta 0.7, 5000 steps); its
    source is not in the readable snapshots, so the step rule above is ours; for beta 0.7 the two readings
    (correct for 5000 steps, or cap t at 5000) agree to 0.7^5000, i.e. exactly in floating point.
    The state lives in buffers (float64), so it is saved and restored with the model's state dict.

    Example:
        >>> ema = PositiveCountEMA(beta=0.5, bias_correction_steps=10)
        >>> ema.update(4.0), ema.update(2.0)  # 2 / 0.5; (0.5 * 2 + 1) / 0.75
        (4.0, 2.6666666666666665)
    """

    def __init__(self, beta: float, bias_correction_steps: int) -> None:
        super().__init__()
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"EMA beta must be in [0, 1), got {beta}")
        self.beta = float(beta)
        self.bias_correction_steps = int(bias_correction_steps)
        self.register_buffer("average", torch.zeros((), dtype=torch.float64))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))

    def value(self) -> float:
        """The current (bias-corrected) average; 0 before the first update."""
        steps = int(self.steps)
        average = float(self.average)
        if 0 < steps <= self.bias_correction_steps:
            return average / (1.0 - self.beta**steps)
        return average

    @torch.no_grad()
    def update(self, count: float) -> float:
        """Add one batch's positive count and return :meth:`value`."""
        self.average.mul_(self.beta).add_((1.0 - self.beta) * float(count))
        self.steps.add_(1)
        return self.value()

    def extra_repr(self) -> str:
        return f"beta={self.beta}, bias_correction_steps={self.bias_correction_steps}"


def _ensure_every_box_matched(quality: Tensor, matches: Tensor) -> Tensor:
    """Give each box that ATSS left without anchors its best-IoU anchor (a "low-quality" match).

    ATSS's threshold (mean + std of the candidates' IoUs) can exceed every candidate's IoU when a box sits
    between anchor centres and the candidates tie; such a box would then never be learnt.
    ``quality`` is the ``[N_boxes, N_anchors]`` IoU matrix, ``matches`` the ``[N_anchors]`` box index or < 0.

    Example:
        >>> _ensure_every_box_matched(torch.tensor([[0.2, 0.3, 0.1]]), torch.tensor([-1, -1, -1])).tolist()
        [-1, 0, -1]
    """
    matched_boxes = set(matches[matches >= 0].tolist())
    matches = matches.clone()
    for box_index in range(quality.shape[0]):
        if box_index not in matched_boxes:
            matches[quality[box_index].argmax()] = box_index
    return matches


def _check_anchor_levels(anchor_shapes: Sequence[Sequence[Sequence[float]]], head_strides: Sequence[Any]) -> None:
    """One anchor set per head level, the same number of shapes on each (the heads are shared)."""
    if len(anchor_shapes) != len(head_strides):
        raise ValueError(
            f"anchor_shapes has {len(anchor_shapes)} levels but head_strides {list(head_strides)} has "
            f"{len(head_strides)}"
        )
    if len({len(level) for level in anchor_shapes}) != 1:
        raise ValueError("anchor_shapes must give the same number of shapes on every level (shared heads)")


@DETECTORS.register("retina_unet")
class RetinaUNet(nn.Module):
    """Retina U-Net detector on a ResEnc encoder (see the module docstring).

    Args:
        preset: backbone preset name (``resenc_l``, ``resenc_demo``, ``resenc_small``).
        in_channels: image channels.
        num_classes: object classes (without background).
        anchor_shapes: per head level, the ``[dz, dy, dx]`` anchor shapes in voxels (same count per level).
        head_strides: decoder strides that feed the heads (default: :func:`release_head_levels`).
        Remaining keywords are the knobs named by the module-level defaults (``RetinaUNetSettings``).
    """

    def __init__(
        self,
        preset: str,
        in_channels: int,
        num_classes: int,
        anchor_shapes: Sequence[Sequence[Sequence[float]]],
        head_strides: Sequence[int] | None = None,
        fpn_channels: int = DEFAULT_FPN_CHANNELS,
        fpn_min_channels: int = DEFAULT_FPN_MIN_CHANNELS,
        head_convs: int = DEFAULT_HEAD_CONVS,
        head_channels_per_group: int = DEFAULT_HEAD_CHANNELS_PER_GROUP,
        atss_candidates: int = DEFAULT_ATSS_CANDIDATES,
        atss_center_in_gt: bool = DEFAULT_ATSS_CENTER_IN_GT,
        focal_alpha: float = DEFAULT_FOCAL_ALPHA,
        focal_gamma: float = DEFAULT_FOCAL_GAMMA,
        cls_prior: float = DEFAULT_CLS_PRIOR,
        box_weights: Sequence[float] = DEFAULT_BOX_WEIGHTS,
        cls_weight: float = DEFAULT_CLS_WEIGHT,
        reg_weight: float = DEFAULT_REG_WEIGHT,
        reg_smooth_l1_beta: float = DEFAULT_REG_SMOOTH_L1_BETA,
        reg_learn_scale: bool = DEFAULT_REG_LEARN_SCALE,
        loss_norm_beta: float = DEFAULT_LOSS_NORM_BETA,
        loss_norm_bias_correction_steps: int = DEFAULT_LOSS_NORM_BIAS_STEPS,
        seg_ce_weight: float = DEFAULT_SEG_CE_WEIGHT,
        seg_dice_weight: float = DEFAULT_SEG_DICE_WEIGHT,
        score_threshold: float = DEFAULT_SCORE_THRESHOLD,
        topk_per_level: int = DEFAULT_TOPK_PER_LEVEL,
        nms_iou: float = DEFAULT_NMS_IOU,
        max_detections: int = DEFAULT_MAX_DETECTIONS,
    ) -> None:
        super().__init__()
        self.num_classes = int(num_classes)
        self.head_strides = resolve_head_strides(preset, head_strides)
        _check_anchor_levels(anchor_shapes, self.head_strides)

        backbone = get_preset(preset)
        self.stage_strides = backbone.cumulative_strides
        if self.stage_strides[0] != 1:
            raise ValueError(f"preset {preset!r}: the segmentation head needs a stride-1 stage")
        self.head_levels = [self.stage_strides.index(s) for s in self.head_strides]
        self.encoder = build_resenc_encoder(preset, in_channels)

        n_levels = self.head_levels[-1] + 1  # UFPN builds every level up to the coarsest head level
        self.decoder_widths = fpn_level_channels(n_levels, self.head_levels[0], fpn_channels, fpn_min_channels)
        self.decoder = UFPN(backbone.features_per_stage[:n_levels], backbone.strides[:n_levels], self.decoder_widths)

        self._build_heads_and_losses(
            anchor_shapes, fpn_channels, self.decoder_widths[0], head_convs=head_convs,
            head_channels_per_group=head_channels_per_group, atss_candidates=atss_candidates,
            atss_center_in_gt=atss_center_in_gt, focal_alpha=focal_alpha, focal_gamma=focal_gamma, cls_prior=cls_prior,
            box_weights=box_weights, cls_weight=cls_weight, reg_weight=reg_weight,
            reg_smooth_l1_beta=reg_smooth_l1_beta, reg_learn_scale=reg_learn_scale, loss_norm_beta=loss_norm_beta,
            loss_norm_bias_correction_steps=loss_norm_bias_correction_steps, seg_ce_weight=seg_ce_weight,
            seg_dice_weight=seg_dice_weight, score_threshold=score_threshold, topk_per_level=topk_per_level,
            nms_iou=nms_iou, max_detections=max_detections,
        )

    def _build_heads_and_losses(
        self,
        anchor_shapes: Sequence[Sequence[Sequence[float]]],
        fpn_channels: int,
        seg_channels: int,
        *,
        head_convs: int,
        head_channels_per_group: int,
        atss_candidates: int,
        atss_center_in_gt: bool,
        focal_alpha: float,
        focal_gamma: float,
        cls_prior: float,
        box_weights: Sequence[float],
        cls_weight: float,
        reg_weight: float,
        reg_smooth_l1_beta: float,
        reg_learn_scale: bool,
        loss_norm_beta: float,
        loss_norm_bias_correction_steps: int,
        seg_ce_weight: float,
        seg_dice_weight: float,
        score_threshold: float,
        topk_per_level: int,
        nms_iou: float,
        max_detections: int,
    ) -> None:
        """Heads (on ``fpn_channels``-wide head levels, one per entry of ``anchor_shapes``), the segmentation
        head (on the ``seg_channels``-wide full-resolution level), anchors, matcher and losses: the part of the
        Retina U-Net that does not depend on the encoder (shared with the native Retina U-Net)."""
        self.num_anchors_per_location = len(anchor_shapes[0])
        num_head_levels = len(anchor_shapes)
        self.cls_head = _Head(fpn_channels, self.num_anchors_per_location, self.num_classes, head_convs,
                              head_channels_per_group, prior=cls_prior)
        self.reg_head = _Head(fpn_channels, self.num_anchors_per_location, 6, head_convs, head_channels_per_group,
                              num_levels=num_head_levels if reg_learn_scale else None)
        self.seg_head = nn.Conv3d(seg_channels, SEG_CLASSES, 1)
        _he_init(self.seg_head)

        self.anchor_generator = AnchorGeneratorWithAnchorShape(
            feature_map_scales=[1] * len(anchor_shapes), base_anchor_shapes=anchor_shapes[0]
        )
        # One planned shape set per level (MONAI's constructor would scale a single set instead).
        self.anchor_generator.cell_anchors = [
            AnchorGeneratorWithAnchorShape.generate_anchors_using_shape(torch.tensor(level, dtype=torch.float32))
            for level in anchor_shapes
        ]
        self.matcher = ATSSMatcher(num_candidates=atss_candidates, center_in_gt=atss_center_in_gt)
        self.box_coder = BoxCoder(weights=tuple(box_weights))
        self.positive_ema = PositiveCountEMA(loss_norm_beta, loss_norm_bias_correction_steps)
        self.dice_loss = DiceLoss(
            include_background=False, to_onehot_y=True, softmax=True, batch=True,
            smooth_nr=DICE_SMOOTH_NUMERATOR, smooth_dr=DICE_SMOOTH_DENOMINATOR,
        )
        self.box_selector = FastNMSBoxSelector(  # MONAI's BoxSelector with the same boxes from a faster NMS
            apply_sigmoid=True,
            score_thresh=score_threshold,
            topk_candidates_per_level=topk_per_level,
            nms_thresh=nms_iou,
            detections_per_img=max_detections,
        )
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.reg_smooth_l1_beta = float(reg_smooth_l1_beta)
        self.loss_weights = {"cls": cls_weight, "reg": reg_weight, "seg_ce": seg_ce_weight, "seg_dice": seg_dice_weight}

    @classmethod
    def build_kwargs_from_settings(
        cls, settings: dict[str, Any], in_channels: int, num_classes: int, plan: dict[str, Any]
    ) -> dict[str, Any]:
        """JSON-able constructor arguments from the detector settings and the preprocessing plan.

        ``settings["preset"]`` names the backbone; every other constructor keyword found in ``settings`` is
        taken, other keys (training settings) are ignored. Anchors are planned from ``plan["box_sizes"]``
        unless ``settings["anchor_shapes"]`` gives them; ``settings["anchors_per_level"]`` sets their count.

        Example:
            >>> kwargs = RetinaUNet.build_kwargs_from_settings({"preset": "resenc_demo"}, 1, 1, {"box_sizes": []})
            >>> kwargs["head_strides"]
            [2, 4, 8]
        """
        if "preset" not in settings:
            raise KeyError("detector settings need a 'preset' (backbone preset name)")
        accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "in_channels", "num_classes"}
        kwargs = {key: value for key, value in settings.items() if key in accepted}
        kwargs["head_strides"] = resolve_head_strides(settings["preset"], settings.get("head_strides"))
        if kwargs.get("anchor_shapes") is None:
            kwargs["anchor_shapes"] = plan_anchor_shapes(
                plan.get("box_sizes", []),
                kwargs["head_strides"],
                anchors_per_level=int(settings.get("anchors_per_level", DEFAULT_ANCHORS_PER_LEVEL)),
            )
        if "box_weights" in kwargs:
            kwargs["box_weights"] = list(kwargs["box_weights"])
        return {"in_channels": int(in_channels), "num_classes": int(num_classes), **kwargs}

    # ------------------------------------------------------------------ forward

    def decode(self, images: Tensor) -> list[Tensor]:
        """The UFPN maps of levels ``0 .. coarsest head level`` (finest first)."""
        self._check_size(images)
        return self.decoder(self.encoder(images))

    def forward(self, images: Tensor) -> dict[str, Any]:
        """Return ``{"cls": [B, N_anchors, K], "reg": [B, N_anchors, 6], "seg": [B, 2, Z, Y, X],
        "head_features": [...]}`` (logits; scaled deltas; anchors over all head levels, MONAI's order)."""
        decoded = self.decode(images)
        head_features = [decoded[level] for level in self.head_levels]
        return {
            "cls": self.cls_head(head_features),
            "reg": self.reg_head(head_features),
            "seg": self.seg_head(decoded[0]),
            "head_features": head_features,
        }

    def _check_size(self, images: Tensor) -> None:
        if images.ndim != 5:
            raise ValueError(f"expected images [B, C, Z, Y, X], got shape {tuple(images.shape)}")
        divisor = self.stage_strides[-1]
        if any(size % divisor for size in images.shape[2:]):
            raise ValueError(
                f"patch size {tuple(images.shape[2:])} must be divisible by the total encoder stride {divisor}"
            )

    def anchors(self, images: Tensor, head_features: list[Tensor]) -> tuple[Tensor, list[int]]:
        """All anchors of one image ``[N_anchors, 6]`` and the anchor *locations* per level (for ATSS)."""
        # MONAI's generator reads only shapes, dtype and device of the maps; float32 stand-ins keep anchor
        # coordinates (and hence ATSS IoUs) exact under mixed precision.
        shapes = [torch.empty((1, 1, *f.shape[2:]), device=f.device) for f in head_features]
        anchors = self.anchor_generator(images[:1], shapes)[0]
        locations = [int(f.shape[2] * f.shape[3] * f.shape[4]) for f in head_features]
        return anchors, locations

    # ------------------------------------------------------------------ training

    def box_losses(
        self, cls_logits: Tensor, box_deltas: Tensor, cls_targets: Tensor, positive: Tensor, reg_targets: Tensor
    ) -> dict[str, Tensor]:
        """Classification and box losses of a batch, normalised by the positive-count EMA.

        ``cls_logits`` / ``cls_targets`` ``[B, N, K]`` (one-hot, all anchors), ``box_deltas`` ``[B, N, 6]``,
        ``positive`` ``[B, N]`` bool, ``reg_targets`` ``[P, 6]`` for the positives in ``positive``'s order. In
        training mode the EMA takes this batch's count first; in eval mode it is only read.
        """
        count = float(positive.sum())
        norm = self.positive_ema.update(count) if self.training else self.positive_ema.value()
        norm = max(1.0, norm)
        focal = sigmoid_focal_loss(cls_logits, cls_targets, alpha=self.focal_alpha, gamma=self.focal_gamma,
                                   reduction="none")
        cls_loss = self.loss_weights["cls"] * focal.mean(dim=-1).sum() / norm
        if count > 0:
            pred = box_deltas[positive]
            target = reg_targets.to(pred.dtype)
            if self.reg_smooth_l1_beta < 1e-5:
                per_value = F.l1_loss(pred, target, reduction="none")
            else:
                per_value = F.smooth_l1_loss(pred, target, reduction="none", beta=self.reg_smooth_l1_beta)
            reg_loss = self.loss_weights["reg"] * per_value.sum() / norm
        else:
            reg_loss = box_deltas.sum() * 0.0  # keeps the graph when a batch has no matched anchor
        return {"cls": cls_loss, "reg": reg_loss, "norm": torch.tensor(norm)}

    def seg_losses(self, seg_logits: Tensor, seg: Tensor) -> dict[str, Tensor]:
        """Weighted cross-entropy and batch Dice (foreground) of the auxiliary segmentation.

        ``seg`` ``[B, 1, Z, Y, X]``: any value > 0 is foreground (an instance map works too).
        """
        target = (seg > 0).long()
        ce = F.cross_entropy(seg_logits, target[:, 0])
        dice = self.dice_loss(seg_logits, target)
        return {"seg_ce": self.loss_weights["seg_ce"] * ce, "seg_dice": self.loss_weights["seg_dice"] * dice}

    def compute_losses(
        self, images: Tensor, targets: list[dict[str, Tensor]], seg: Tensor
    ) -> dict[str, Tensor]:
        """Focal classification over all anchors, smooth-L1 box regression and CE + Dice segmentation losses.

        Example:
            >>> losses = net.compute_losses(images, [{"boxes": b, "labels": l}], seg)  # doctest: +SKIP
            >>> losses["loss"].backward()  # doctest: +SKIP
        """
        if len(targets) != images.shape[0]:
            raise ValueError(f"got {len(targets)} targets for a batch of {images.shape[0]} images")
        out = self(images)
        anchors, locations = self.anchors(images, out["head_features"])
        cls_logits, box_deltas = out["cls"].float(), out["reg"].float()  # losses in float32 under autocast

        cls_targets = torch.zeros_like(cls_logits)  # [B, N_anchors, K]
        positive = torch.zeros(cls_logits.shape[:2], dtype=torch.bool, device=cls_logits.device)
        reg_targets = []
        for index, target in enumerate(targets):
            boxes = target["boxes"].to(anchors)
            labels = target["labels"].to(device=anchors.device, dtype=torch.long)
            bad_labels = labels.numel() > 0 and (labels.min() < 0 or labels.max() >= self.num_classes)
            if labels.numel() != boxes.shape[0] or bad_labels:
                raise ValueError(
                    f"target {index}: need one label in [0, {self.num_classes}) per box, got {labels.tolist()} "
                    f"for {boxes.shape[0]} boxes"
                )
            if boxes.numel() == 0:
                continue
            # Autocast would run ATSS's distance/IoU maths in half precision and lose every match.
            with torch.autocast(device_type=anchors.device.type, enabled=False):
                quality, matches = self.matcher.compute_matches(
                    boxes, anchors, locations, self.num_anchors_per_location
                )
                matches = _ensure_every_box_matched(quality, matches)
                matched = matches >= 0
                reg_targets.append(self.box_coder.encode_single(boxes[matches[matched]], anchors[matched]))
            positive[index] = matched
            cls_targets[index, matched, labels[matches[matched]]] = 1.0
        reg_target = torch.cat(reg_targets) if reg_targets else box_deltas.new_zeros((0, 6))

        losses = self.box_losses(cls_logits, box_deltas, cls_targets, positive, reg_target)
        losses.update(self.seg_losses(out["seg"].float(), seg))
        total = losses["cls"] + losses["reg"] + losses["seg_ce"] + losses["seg_dice"]
        return {
            "loss": total,
            "cls": losses["cls"].detach(),
            "reg": losses["reg"].detach(),
            "seg": (losses["seg_ce"] + losses["seg_dice"]).detach(),
        }

    # ------------------------------------------------------------------ inference

    @torch.no_grad()
    def predict(self, images: Tensor) -> list[dict[str, Tensor]]:
        """Detections per image in patch voxel coordinates (MONAI standard mode, z-y-x)."""
        out = self(images)
        anchors, locations = self.anchors(images, out["head_features"])
        per_level = [n * self.num_anchors_per_location for n in locations]
        anchors_by_level = anchors.split(per_level)
        spatial_size = list(images.shape[2:])
        results = []
        for index in range(images.shape[0]):
            deltas_by_level = out["reg"][index].float().split(per_level)
            logits_by_level = out["cls"][index].float().split(per_level)
            boxes_by_level = [
                self.box_coder.decode_single(deltas, level_anchors)
                for deltas, level_anchors in zip(deltas_by_level, anchors_by_level)
            ]
            boxes, scores, labels = self.box_selector.select_boxes_per_image(
                boxes_by_level, list(logits_by_level), spatial_size
            )
            results.append({"boxes": boxes, "scores": scores, "labels": labels})
        return results
