"""Retina U-Net: a ResEnc encoder, a U-Net-like FPN decoder, RetinaNet heads and an auxiliary segmentation.

Architecture (after Jaeger et al. 2018 / nnDetection, with the paper's ResEnc encoder):

- ``self.encoder``: :func:`~pretrain_det3d.models.backbone.build_resenc_encoder` (stage outputs at strides
  1, 2, 4, ...), so pre-trained stems and stages load by
  :func:`~pretrain_det3d.models.checkpoint.load_pretrained_encoder`.
- Decoder (top-down FPN): each stage gets a 1x1 lateral conv; from the deepest level down, the coarser
  output is projected to this level's width (1x1, only where widths differ), upsampled (nearest) and added
  to the lateral, then smoothed by a 3x3 conv + norm + LeakyReLU. Levels that feed the heads are
  ``fpn_channels`` wide; the others are ``min(fpn_channels, encoder width)`` wide, which keeps the
  full-resolution level cheap.
- Heads, shared over ``head_strides`` levels: ``head_convs`` x (3x3 conv, GroupNorm, LeakyReLU) then a 3x3
  conv to ``A * num_classes`` logits (classification) or ``A * 6`` box deltas (regression), ``A`` anchors
  per location.
- Auxiliary segmentation: a 1x1 conv on the stride-1 decoder level to two channels (background,
  foreground), trained with MONAI's Dice + cross-entropy.

Training: anchors from MONAI's ``AnchorGeneratorWithAnchorShape`` with one planned shape set per level
(:mod:`pretrain_det3d.models.anchors`), ATSS matching (MONAI ``ATSSMatcher``; a box ATSS leaves without
any anchor gets its best-IoU anchor), box deltas from MONAI's
``BoxCoder``. Classification: sigmoid focal loss (torchvision) over the anchors chosen by MONAI's
``HardNegativeSampler`` (all positives up to a budget, plus the highest-scoring negatives drawn from a pool),
averaged over the chosen anchors (the sampler draws from torch's global generator: seed it). Regression: L1
on the deltas of matched anchors.

Inference: decode the deltas, then MONAI's ``BoxSelector`` (score threshold, top-k per level, class-wise
NMS, at most ``max_detections``).

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
from monai.apps.detection.utils.box_selector import BoxSelector
from monai.apps.detection.utils.hard_negative_sampler import HardNegativeSampler
from monai.losses import DiceCELoss
from torch import Tensor, nn
from torchvision.ops import sigmoid_focal_loss

from pretrain_det3d.models.anchors import DEFAULT_ANCHORS_PER_LEVEL, plan_anchor_shapes
from pretrain_det3d.models.backbone import build_resenc_encoder, get_preset
from pretrain_det3d.models.registry import DETECTORS
from pretrain_det3d.settings.detectors import RetinaUNetSettings

# Architecture defaults.
DEFAULT_FPN_CHANNELS = RetinaUNetSettings.default("fpn_channels")
DEFAULT_HEAD_STRIDES = (4, 8, 16)  # the paper's (nnDetection's) head levels; filtered to the preset's strides
DEFAULT_HEAD_CONVS = RetinaUNetSettings.default("head_convs")
DEFAULT_HEAD_GROUPS = 16  # GroupNorm groups in the heads (reduced to a divisor of the width)
PRIOR_PROBABILITY = 0.01  # initial foreground probability of every anchor (RetinaNet's bias init)
SEG_CLASSES = 2  # background, foreground

# Matching, sampling and loss defaults.
DEFAULT_ATSS_CANDIDATES = RetinaUNetSettings.default("atss_candidates")
# small lesions would otherwise lose every candidate
DEFAULT_ATSS_CENTER_IN_GT = RetinaUNetSettings.default("atss_center_in_gt")
DEFAULT_HNM_BATCH_SIZE_PER_IMAGE = RetinaUNetSettings.default("hnm_batch_size_per_image")
DEFAULT_HNM_POSITIVE_FRACTION = RetinaUNetSettings.default("hnm_positive_fraction")
DEFAULT_HNM_POOL_SIZE = RetinaUNetSettings.default("hnm_pool_size")
DEFAULT_HNM_MIN_NEG = RetinaUNetSettings.default("hnm_min_neg")
DEFAULT_FOCAL_ALPHA = RetinaUNetSettings.default("focal_alpha")
DEFAULT_FOCAL_GAMMA = RetinaUNetSettings.default("focal_gamma")
DEFAULT_BOX_WEIGHTS = RetinaUNetSettings.default("box_weights")
DEFAULT_CLS_WEIGHT = RetinaUNetSettings.default("cls_weight")
DEFAULT_REG_WEIGHT = RetinaUNetSettings.default("reg_weight")
DEFAULT_SEG_WEIGHT = RetinaUNetSettings.default("seg_weight")

# Inference defaults (per patch).
DEFAULT_SCORE_THRESHOLD = RetinaUNetSettings.default("score_threshold")
DEFAULT_TOPK_PER_LEVEL = RetinaUNetSettings.default("topk_per_level")
DEFAULT_NMS_IOU = RetinaUNetSettings.default("nms_iou")
DEFAULT_MAX_DETECTIONS = RetinaUNetSettings.default("max_detections")


def resolve_head_strides(preset: str, head_strides: Sequence[int] | None) -> list[int]:
    """Head strides to use: the given ones (each must be a stage stride) or the defaults the preset offers.

    Example:
        >>> resolve_head_strides("resenc_demo", None)
        [4, 8]
    """
    available = get_preset(preset).cumulative_strides
    if head_strides is None:
        chosen = [s for s in DEFAULT_HEAD_STRIDES if s in available]
        if not chosen:
            raise ValueError(f"preset {preset!r} offers none of the default head strides {DEFAULT_HEAD_STRIDES}")
        return chosen
    chosen = sorted(int(s) for s in head_strides)
    missing = [s for s in chosen if s not in available]
    if missing or not chosen:
        raise ValueError(f"head_strides {list(head_strides)}: preset {preset!r} has decoder strides {available}")
    return chosen


def _group_count(channels: int, groups: int) -> int:
    # The largest divisor of ``channels`` not above ``groups``.
    return max(g for g in range(1, min(groups, channels) + 1) if channels % g == 0)


def _conv_norm_act(in_ch: int, out_ch: int, kernel: int, norm: str, groups: int = DEFAULT_HEAD_GROUPS) -> nn.Sequential:
    norm_layer: nn.Module
    if norm == "group":
        norm_layer = nn.GroupNorm(_group_count(out_ch, groups), out_ch)
    else:
        norm_layer = nn.InstanceNorm3d(out_ch, affine=True)
    return nn.Sequential(
        nn.Conv3d(in_ch, out_ch, kernel, padding=kernel // 2),
        norm_layer,
        nn.LeakyReLU(inplace=True),
    )


class _Head(nn.Module):
    """Convs shared over levels, ending in ``out_per_anchor * num_anchors`` channels."""

    def __init__(self, channels: int, num_anchors: int, out_per_anchor: int, num_convs: int) -> None:
        super().__init__()
        self.tower = nn.Sequential(*[_conv_norm_act(channels, channels, 3, "group") for _ in range(num_convs)])
        self.out = nn.Conv3d(channels, num_anchors * out_per_anchor, 3, padding=1)
        self.out_per_anchor = out_per_anchor

    def forward(self, features: list[Tensor]) -> Tensor:
        """Return ``[B, sum_l(Z_l*Y_l*X_l*A), out_per_anchor]`` in MONAI's anchor order (location, anchor)."""
        flat = []
        for feature in features:
            out = self.out(self.tower(feature))  # [B, A*K, Z, Y, X]
            b, _, z, y, x = out.shape
            out = out.view(b, -1, self.out_per_anchor, z, y, x)  # [B, A, K, Z, Y, X]
            out = out.permute(0, 3, 4, 5, 1, 2).reshape(b, -1, self.out_per_anchor)  # [B, Z*Y*X*A, K]
            flat.append(out)
        return torch.cat(flat, dim=1)


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


@DETECTORS.register("retina_unet")
class RetinaUNet(nn.Module):
    """Retina U-Net detector on a ResEnc encoder (see the module docstring).

    Args:
        preset: backbone preset name (``resenc_l``, ``resenc_demo``, ``resenc_small``).
        in_channels: image channels.
        num_classes: object classes (without background).
        anchor_shapes: per head level, the ``[dz, dy, dx]`` anchor shapes in voxels (same count per level).
        head_strides: decoder strides that feed the heads (default: 4, 8, 16 where the preset has them).
        Remaining keywords are the knobs named by the module-level defaults.
    """

    def __init__(
        self,
        preset: str,
        in_channels: int,
        num_classes: int,
        anchor_shapes: Sequence[Sequence[Sequence[float]]],
        head_strides: Sequence[int] | None = None,
        fpn_channels: int = DEFAULT_FPN_CHANNELS,
        head_convs: int = DEFAULT_HEAD_CONVS,
        atss_candidates: int = DEFAULT_ATSS_CANDIDATES,
        atss_center_in_gt: bool = DEFAULT_ATSS_CENTER_IN_GT,
        hnm_batch_size_per_image: int = DEFAULT_HNM_BATCH_SIZE_PER_IMAGE,
        hnm_positive_fraction: float = DEFAULT_HNM_POSITIVE_FRACTION,
        hnm_pool_size: float = DEFAULT_HNM_POOL_SIZE,
        hnm_min_neg: int = DEFAULT_HNM_MIN_NEG,
        focal_alpha: float = DEFAULT_FOCAL_ALPHA,
        focal_gamma: float = DEFAULT_FOCAL_GAMMA,
        box_weights: Sequence[float] = DEFAULT_BOX_WEIGHTS,
        cls_weight: float = DEFAULT_CLS_WEIGHT,
        reg_weight: float = DEFAULT_REG_WEIGHT,
        seg_weight: float = DEFAULT_SEG_WEIGHT,
        score_threshold: float = DEFAULT_SCORE_THRESHOLD,
        topk_per_level: int = DEFAULT_TOPK_PER_LEVEL,
        nms_iou: float = DEFAULT_NMS_IOU,
        max_detections: int = DEFAULT_MAX_DETECTIONS,
    ) -> None:
        super().__init__()
        self.num_classes = int(num_classes)
        self.head_strides = resolve_head_strides(preset, head_strides)
        if len(anchor_shapes) != len(self.head_strides):
            raise ValueError(
                f"anchor_shapes has {len(anchor_shapes)} levels but head_strides {self.head_strides} has "
                f"{len(self.head_strides)}"
            )
        anchors_per_level = {len(level) for level in anchor_shapes}
        if len(anchors_per_level) != 1:
            raise ValueError("anchor_shapes must give the same number of shapes on every level (shared heads)")
        self.num_anchors_per_location = anchors_per_level.pop()

        backbone = get_preset(preset)
        self.stage_strides = backbone.cumulative_strides
        if self.stage_strides[0] != 1:
            raise ValueError(f"preset {preset!r}: the segmentation head needs a stride-1 stage")
        self.head_levels = [self.stage_strides.index(s) for s in self.head_strides]
        self.encoder = build_resenc_encoder(preset, in_channels)

        # Decoder widths: heads need a common width; other levels stay no wider than the encoder.
        widths = [
            fpn_channels if level in self.head_levels else min(fpn_channels, feats)
            for level, feats in enumerate(backbone.features_per_stage)
        ]
        self.decoder_widths = widths
        self.laterals = nn.ModuleList(
            [nn.Conv3d(feats, width, 1) for feats, width in zip(backbone.features_per_stage, widths)]
        )
        # top_down[l] projects level l+1's output to level l's width before upsampling.
        self.top_down = nn.ModuleList(
            [
                nn.Conv3d(widths[level + 1], widths[level], 1) if widths[level + 1] != widths[level] else nn.Identity()
                for level in range(len(widths) - 1)
            ]
        )
        self.smooth = nn.ModuleList([_conv_norm_act(width, width, 3, "instance") for width in widths])

        self.cls_head = _Head(fpn_channels, self.num_anchors_per_location, self.num_classes, head_convs)
        self.reg_head = _Head(fpn_channels, self.num_anchors_per_location, 6, head_convs)
        self.seg_head = nn.Conv3d(widths[0], SEG_CLASSES, 1)
        nn.init.constant_(self.cls_head.out.bias, -math.log((1 - PRIOR_PROBABILITY) / PRIOR_PROBABILITY))

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
        self.sampler = HardNegativeSampler(
            batch_size_per_image=hnm_batch_size_per_image,
            positive_fraction=hnm_positive_fraction,
            min_neg=hnm_min_neg,
            pool_size=hnm_pool_size,
        )
        self.seg_loss = DiceCELoss(to_onehot_y=True, softmax=True)
        self.box_selector = BoxSelector(
            apply_sigmoid=True,
            score_thresh=score_threshold,
            topk_candidates_per_level=topk_per_level,
            nms_thresh=nms_iou,
            detections_per_img=max_detections,
        )
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.loss_weights = {"cls": cls_weight, "reg": reg_weight, "seg": seg_weight}

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
            [4, 8]
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

    def forward(self, images: Tensor) -> dict[str, Any]:
        """Return ``{"cls": [B, N_anchors, K], "reg": [B, N_anchors, 6], "seg": [B, 2, Z, Y, X],
        "head_features": [...]}`` (logits; anchors over all head levels, MONAI's order)."""
        self._check_size(images)
        skips = self.encoder(images)
        decoded: list[Tensor] = [torch.empty(0)] * len(skips)
        coarser: Tensor | None = None
        for level in reversed(range(len(skips))):
            merged = self.laterals[level](skips[level])
            if coarser is not None:
                projected = self.top_down[level](coarser)
                merged = merged + F.interpolate(projected, size=merged.shape[2:], mode="nearest")
            coarser = self.smooth[level](merged)
            decoded[level] = coarser
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

    def compute_losses(
        self, images: Tensor, targets: list[dict[str, Tensor]], seg: Tensor
    ) -> dict[str, Tensor]:
        """Focal classification (hard-negative sampled), L1 regression and Dice+CE segmentation losses.

        Example:
            >>> losses = net.compute_losses(images, [{"boxes": b, "labels": l}], seg)  # doctest: +SKIP
            >>> losses["loss"].backward()  # doctest: +SKIP
        """
        if len(targets) != images.shape[0]:
            raise ValueError(f"got {len(targets)} targets for a batch of {images.shape[0]} images")
        out = self(images)
        anchors, locations = self.anchors(images, out["head_features"])
        cls_logits, box_deltas = out["cls"].float(), out["reg"].float()  # losses in float32 under autocast

        cls_targets, matched_per_image, fg_labels = [], [], []
        reg_preds, reg_targets = [], []
        for index, target in enumerate(targets):
            boxes = target["boxes"].to(anchors)
            labels = target["labels"].to(device=anchors.device, dtype=torch.long)
            bad_labels = labels.numel() > 0 and (labels.min() < 0 or labels.max() >= self.num_classes)
            if labels.numel() != boxes.shape[0] or bad_labels:
                raise ValueError(
                    f"target {index}: need one label in [0, {self.num_classes}) per box, got {labels.tolist()} "
                    f"for {boxes.shape[0]} boxes"
                )
            one_hot = torch.zeros_like(cls_logits[index])  # [N_anchors, K]
            if boxes.numel() == 0:
                matches = torch.full((anchors.shape[0],), -1, dtype=torch.long, device=anchors.device)
            else:
                # Autocast would run ATSS's distance/IoU maths in half precision and lose every match.
                with torch.autocast(device_type=anchors.device.type, enabled=False):
                    quality, matches = self.matcher.compute_matches(
                        boxes, anchors, locations, self.num_anchors_per_location
                    )
                matches = _ensure_every_box_matched(quality, matches)
            positive = matches >= 0
            if positive.any():
                one_hot[positive, labels[matches[positive]]] = 1.0
                with torch.autocast(device_type=anchors.device.type, enabled=False):
                    reg_targets.append(self.box_coder.encode_single(boxes[matches[positive]], anchors[positive]))
                reg_preds.append(box_deltas[index][positive])
            cls_targets.append(one_hot)
            # The sampler wants label >= 1 for positives, 0 for negatives.
            fg_labels.append(positive.long())
            matched_per_image.append(matches)

        with torch.no_grad():
            fg_probs = torch.sigmoid(cls_logits.detach()).max(dim=2).values.reshape(-1)
        pos_masks, neg_masks = self.sampler(fg_labels, fg_probs)
        sampled = torch.cat([(p | n).bool() for p, n in zip(pos_masks, neg_masks)])  # [B * N_anchors]
        cls_loss = sigmoid_focal_loss(
            cls_logits.reshape(-1, self.num_classes)[sampled],
            torch.cat(cls_targets)[sampled],
            alpha=self.focal_alpha,
            gamma=self.focal_gamma,
            reduction="sum",
        ) / max(int(sampled.sum()), 1)

        if reg_preds:
            reg_loss = F.l1_loss(torch.cat(reg_preds), torch.cat(reg_targets).to(box_deltas.dtype))
        else:
            reg_loss = box_deltas.sum() * 0.0  # keeps the graph when a batch has no matched anchor

        # (seg > 0) also accepts an instance map: the auxiliary task is foreground vs background.
        seg_loss = self.seg_loss(out["seg"].float(), (seg > 0).long())
        total = (
            self.loss_weights["cls"] * cls_loss
            + self.loss_weights["reg"] * reg_loss
            + self.loss_weights["seg"] * seg_loss
        )
        return {"loss": total, "cls": cls_loss.detach(), "reg": reg_loss.detach(), "seg": seg_loss.detach()}

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
