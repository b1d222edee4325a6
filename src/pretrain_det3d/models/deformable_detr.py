"""Two-stage 3D Deformable DETR on a ResEnc encoder.

Architecture (after Zhu et al., ICLR 2021, "Deformable DETR", two-stage variant with iterative box
refinement, carried to 3D). The defaults are those of the authors' release inside nnDetection
(``nndet/conf/train/model_cfg/deformable_detr_sigm_for_ResEnc.yaml`` built by ``ResEnc_BoxDETR_v002.py``), taken
from :class:`~pretrain_det3d.settings.detectors.DeformableDETRSettings`; docs/settings.md names each source:

- ``self.encoder``: :func:`~pretrain_det3d.models.backbone.build_resenc_encoder`, so pre-trained stems and
  stages load with :func:`~pretrain_det3d.models.checkpoint.load_pretrained_encoder` (transformer and heads
  stay random).
- Channel mapper: the encoder stages at ``feature_strides`` (default: the deepest four) each get a 1x1 conv +
  GroupNorm (16 groups) to ``hidden_dim``, no activation; ``extra_levels`` further levels come from 3x3
  stride-2 convs + GroupNorm on the deepest stage (Deformable DETR's recipe when the backbone has too few
  stages; the release uses none on ResEnc-L). Four levels in all by default.
- Every token gets a 3D sine position embedding (:func:`sine_position_embedding_3d`, normalised coordinates,
  temperature 10000) plus a learnt level embedding.
- Transformer encoder: ``num_encoder_layers`` x (multi-scale deformable self-attention from each voxel
  centre, add & LayerNorm, FFN, add & LayerNorm); hidden 128, 8 heads, 4 points, FFN 1024, no dropout.
- Two stage: every encoder token proposes a box (its voxel centre, size ``proposal_base_size * 2**level``),
  refined by an encoder box head and scored by an encoder class head; the ``num_queries`` best proposals become
  the decoder's reference boxes, and a sine embedding of those boxes gives the query content and position.
- Transformer decoder: ``num_decoder_layers`` x (self-attention between queries, deformable cross-attention
  around the reference box, FFN), each followed by its own class head (linear, sigmoid, bias set for the prior
  ``cls_prior`` 0.05) and 3-layer MLP box head that refines the reference box (normalised centre-size
  ``(cz, cy, cx, dz, dy, dx)``).
- Queries: ``num_queries`` (= proposals kept and detections per patch) is planned from the training boxes by
  :func:`plan_num_queries` (the release's rule: at least 12, else 3 x the 95th percentile of the boxes
  expected in one patch).

Training: Hungarian matching (:mod:`pretrain_det3d.models.hungarian`, costs focal class 2 / L1 5 / GIoU 2,
the class cost with the loss's focal gamma and alpha) for every decoder layer and for the encoder proposals;
sigmoid focal classification (gamma 1, alpha 0.75) over all queries, summed over queries and averaged over
classes, L1 and GIoU on matched boxes, weights 1 / 5 / 2, each divided by the number of ground-truth boxes in
the batch. The segmentation passed to :meth:`DeformableDETR.compute_losses` is not used (no auxiliary
segmentation).

Inference: sigmoid scores of the last decoder layer, the ``max_detections`` best (query, class) pairs (default:
``num_queries``, as the release's top-k post-processing), boxes scaled to patch voxels (MONAI standard mode,
z-y-x, the convention of :mod:`pretrain_det3d.data.boxes`) and clipped to the patch. No NMS (the one-to-one matching teaches queries not to
duplicate).

Fine-tuning defaults (AdamW lr 3e-4, weight decay 1e-4, betas 0.9/0.999, eps 1e-4, AMSGrad, poly decay, 10000
linear warm-up iterations, fp16 mixed precision with loss scaling) are :attr:`DeformableDETR.training_defaults`;
the config's ``detectors.deformable_detr`` entry overrides them for the trainer.

Example:
    >>> import torch
    >>> net = DeformableDETR("resenc_demo", 1, 1, feature_strides=[2, 4, 8], extra_levels=1, hidden_dim=32,
    ...                      num_heads=4, num_encoder_layers=1, num_decoder_layers=2, ffn_dim=64, num_queries=10)
    >>> out = net.predict(torch.zeros(1, 1, 32, 32, 32))
    >>> sorted(out[0]), tuple(out[0]["boxes"].shape)
    (['boxes', 'labels', 'scores'], (10, 6))
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.data.box_utils import box_pair_giou
from torch import Tensor, nn
from torchvision.ops import sigmoid_focal_loss

from pretrain_det3d.models.backbone import build_resenc_encoder, get_preset
from pretrain_det3d.models.deformable_attention import MultiScaleDeformableAttention3D
from pretrain_det3d.models.hungarian import (
    DEFAULT_COST_BBOX,
    DEFAULT_COST_CLASS,
    DEFAULT_COST_GIOU,
    HungarianMatcher,
    centre_size_to_corners,
    corners_to_centre_size,
)
from pretrain_det3d.models.registry import DETECTORS
from pretrain_det3d.settings.detectors import DeformableDETRSettings, training_defaults

LOGGER = logging.getLogger(__name__)

# Architecture defaults (the release's, from the settings class).
DEFAULT_NUM_FEATURE_LEVELS = 4
DEFAULT_EXTRA_LEVELS = DeformableDETRSettings.default("extra_levels")
DEFAULT_HIDDEN_DIM = DeformableDETRSettings.default("hidden_dim")
DEFAULT_NUM_HEADS = DeformableDETRSettings.default("num_heads")
DEFAULT_NUM_POINTS = DeformableDETRSettings.default("num_points")
DEFAULT_NUM_ENCODER_LAYERS = DeformableDETRSettings.default("num_encoder_layers")
DEFAULT_NUM_DECODER_LAYERS = DeformableDETRSettings.default("num_decoder_layers")
DEFAULT_FFN_DIM = DeformableDETRSettings.default("ffn_dim")
DEFAULT_DROPOUT = DeformableDETRSettings.default("dropout")
DEFAULT_MIN_QUERIES = DeformableDETRSettings.default("min_queries")
#: the release plans num_queries as max(min_queries, QUERIES_PER_EXPECTED_BOX x 95th percentile of boxes per patch)
QUERIES_PER_EXPECTED_BOX = 3
EXPECTED_BOXES_PERCENTILE = 95
DEFAULT_GROUP_NORM_GROUPS = DeformableDETRSettings.default("group_norm_groups")
# normalised size of finest-level proposals; doubles per level
DEFAULT_PROPOSAL_BASE_SIZE = DeformableDETRSettings.default("proposal_base_size")
POSITION_TEMPERATURE = DeformableDETRSettings.default("position_temperature")
DEFAULT_CLS_PRIOR = DeformableDETRSettings.default("cls_prior")  # initial foreground probability of every query
INVERSE_SIGMOID_EPS = 1e-5

# Loss defaults.
DEFAULT_FOCAL_ALPHA = DeformableDETRSettings.default("focal_alpha")
DEFAULT_FOCAL_GAMMA = DeformableDETRSettings.default("focal_gamma")
DEFAULT_CLS_WEIGHT = DeformableDETRSettings.default("cls_weight")
DEFAULT_L1_WEIGHT = DeformableDETRSettings.default("l1_weight")
DEFAULT_GIOU_WEIGHT = DeformableDETRSettings.default("giou_weight")

# Inference defaults (per patch).
DEFAULT_MAX_DETECTIONS = DeformableDETRSettings.default("max_detections")
DEFAULT_SCORE_THRESHOLD = DeformableDETRSettings.default("score_threshold")

#: Fine-tuning recipe of the release's DETR (keys of ``training.trainer.TrainingSettings``).
TRAINING_DEFAULTS: dict[str, Any] = training_defaults("deformable_detr")


def inverse_sigmoid(x: Tensor, eps: float = INVERSE_SIGMOID_EPS) -> Tensor:
    """``logit(x)`` with ``x`` clamped to ``[eps, 1 - eps]`` (finite for boxes touching the border).

    Example:
        >>> inverse_sigmoid(torch.tensor([0.5]))
        tensor([0.])
    """
    x = x.clamp(min=eps, max=1 - eps)
    return torch.log(x / (1 - x))


def sine_embedding(coords: Tensor, feats_per_coord: Sequence[int], temperature: float = POSITION_TEMPERATURE) -> Tensor:
    """Sine/cosine features of normalised coordinates: ``[..., D]`` -> ``[..., sum(feats_per_coord)]``.

    Coordinate ``d`` (in ``[0, 1]``, scaled by 2 pi) gets ``feats_per_coord[d]`` features: sines at
    ``feats/2`` geometrically spaced frequencies, then cosines at the same frequencies.

    Example:
        >>> sine_embedding(torch.tensor([[0.0, 0.25]]), [2, 4]).shape
        torch.Size([1, 6])
    """
    if coords.shape[-1] != len(feats_per_coord):
        raise ValueError(f"coords have {coords.shape[-1]} entries, feats_per_coord {len(feats_per_coord)}")
    parts = []
    for index, feats in enumerate(feats_per_coord):
        if feats % 2:
            raise ValueError(f"feats_per_coord must be even, got {list(feats_per_coord)}")
        exponents = torch.arange(feats // 2, dtype=torch.float32, device=coords.device) * 2.0 / feats
        angles = coords[..., index : index + 1].float() * (2 * math.pi) / temperature**exponents  # [..., feats/2]
        parts.extend([angles.sin(), angles.cos()])
    return torch.cat(parts, dim=-1)


def axis_feature_split(channels: int) -> list[int]:
    """Even channel counts for the z, y and x parts of a 3D position embedding (z takes the remainder).

    Example:
        >>> axis_feature_split(128)
        [44, 42, 42]
    """
    if channels % 2 or channels < 6:
        raise ValueError(f"a 3D sine position embedding needs an even width >= 6, got {channels}")
    per_axis = (channels // 3) // 2 * 2
    return [channels - 2 * per_axis, per_axis, per_axis]


def voxel_centres(shape: Sequence[int], device: torch.device | None = None) -> Tensor:
    """Normalised ``(z, y, x)`` centres of every voxel of a ``(Z, Y, X)`` grid, z-major: ``[Z*Y*X, 3]``.

    Example:
        >>> voxel_centres((1, 1, 2))
        tensor([[0.5000, 0.5000, 0.2500],
                [0.5000, 0.5000, 0.7500]])
    """
    axes = [(torch.arange(n, dtype=torch.float32, device=device) + 0.5) / n for n in shape]
    grid = torch.meshgrid(*axes, indexing="ij")
    return torch.stack(grid, dim=-1).reshape(-1, 3)


def sine_position_embedding_3d(
    shape: Sequence[int], channels: int, temperature: float = POSITION_TEMPERATURE, device: torch.device | None = None
) -> Tensor:
    """3D sine position embedding of a ``(Z, Y, X)`` grid: ``[Z*Y*X, channels]`` (tokens z-major).

    Example:
        >>> sine_position_embedding_3d((2, 3, 4), 12).shape
        torch.Size([24, 12])
    """
    return sine_embedding(voxel_centres(shape, device), axis_feature_split(channels), temperature)


def _group_count(channels: int, groups: int) -> int:
    # The largest divisor of ``channels`` not above ``groups``.
    return max(g for g in range(1, min(groups, channels) + 1) if channels % g == 0)


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU in between (DETR's box head).

    Example:
        >>> MLP(8, 16, 6, 3)(torch.zeros(2, 8)).shape
        torch.Size([2, 6])
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if index < len(self.layers) - 1:
                x = F.relu(x)
        return x


class _FeedForward(nn.Module):
    """Linear -> ReLU -> dropout -> linear -> dropout, added to the input, then LayerNorm."""

    def __init__(self, dim: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.linear1, self.linear2 = nn.Linear(dim, ffn_dim), nn.Linear(ffn_dim, dim)
        self.dropout1, self.dropout2 = nn.Dropout(dropout), nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x + self.dropout2(self.linear2(self.dropout1(F.relu(self.linear1(x))))))


class DeformableEncoderLayer(nn.Module):
    """Deformable self-attention over all levels' tokens, then the feed-forward block (post-norm)."""

    def __init__(
        self, dim: int, ffn_dim: int, dropout: float, num_heads: int, num_levels: int, num_points: int
    ) -> None:
        super().__init__()
        self.attention = MultiScaleDeformableAttention3D(dim, num_heads, num_levels, num_points)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)
        self.ffn = _FeedForward(dim, ffn_dim, dropout)

    def forward(self, src: Tensor, pos: Tensor, reference_points: Tensor, spatial_shapes: Tensor) -> Tensor:
        attended = self.attention(src + pos, reference_points, src, spatial_shapes)
        return self.ffn(self.norm(src + self.dropout(attended)))


class DeformableDecoderLayer(nn.Module):
    """Query self-attention, deformable cross-attention into the encoder memory, feed-forward (post-norm)."""

    def __init__(
        self, dim: int, ffn_dim: int, dropout: float, num_heads: int, num_levels: int, num_points: int
    ) -> None:
        super().__init__()
        self.self_attention = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.dropout1, self.norm1 = nn.Dropout(dropout), nn.LayerNorm(dim)
        self.cross_attention = MultiScaleDeformableAttention3D(dim, num_heads, num_levels, num_points)
        self.dropout2, self.norm2 = nn.Dropout(dropout), nn.LayerNorm(dim)
        self.ffn = _FeedForward(dim, ffn_dim, dropout)

    def forward(
        self, tgt: Tensor, query_pos: Tensor, reference_boxes: Tensor, memory: Tensor, spatial_shapes: Tensor
    ) -> Tensor:
        q = k = tgt + query_pos
        attended, _ = self.self_attention(q, k, tgt, need_weights=False)
        tgt = self.norm1(tgt + self.dropout1(attended))
        attended = self.cross_attention(tgt + query_pos, reference_boxes, memory, spatial_shapes)
        tgt = self.norm2(tgt + self.dropout2(attended))
        return self.ffn(tgt)


def boxes_near_each_box(boxes: np.ndarray, patch_size: Sequence[int]) -> np.ndarray:
    """For each box, how many boxes (itself included) have their centre within half a patch on every axis.

    The release's proxy for the boxes one training patch can hold (a patch centred on that box's centre).

    Example:
        >>> boxes_near_each_box(np.array([[0, 0, 0, 2, 2, 2], [8, 0, 0, 10, 2, 2], [40, 0, 0, 42, 2, 2]]), [32] * 3)
        array([2, 2, 1])
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 6)
    centres = (boxes[:, :3] + boxes[:, 3:]) / 2
    half = np.asarray(patch_size, dtype=np.float64) / 2
    within = (np.abs(centres[:, None, :] - centres[None, :, :]) <= half).all(axis=-1)  # [N, N]
    return within.sum(axis=1)


def plan_num_queries(
    case_boxes: Iterable[Any], patch_size: Sequence[int], min_queries: int = DEFAULT_MIN_QUERIES
) -> int:
    """Queries (= two-stage proposals and detections per patch) planned from the training boxes, the release's rule.

    Per training image with boxes, the estimate is the largest :func:`boxes_near_each_box` count; the number is
    ``max(min_queries, 3 * int(95th percentile of the estimates))`` (numpy's linear percentile). Images
    without boxes do not count; with no boxes at all it is ``min_queries``. Boxes are corner boxes in the voxels
    of the training patches.

    Example:
        >>> plan_num_queries([[[0, 0, 0, 2, 2, 2]] * 5, [[0, 0, 0, 2, 2, 2]] * 6], [32, 32, 32])
        15
        >>> plan_num_queries([], [32, 32, 32])
        12
    """
    estimates = [int(boxes_near_each_box(boxes, patch_size).max()) for boxes in case_boxes if len(boxes)]
    if not estimates:
        return int(min_queries)
    expected = int(np.percentile(estimates, EXPECTED_BOXES_PERCENTILE))
    return max(int(min_queries), QUERIES_PER_EXPECTED_BOX * expected)


def _cube(patch_size: int | Sequence[int]) -> list[int]:
    return [int(patch_size)] * 3 if isinstance(patch_size, (int, float)) else [int(v) for v in patch_size]


def resolve_feature_strides(
    preset: str, feature_strides: Sequence[int] | None, extra_levels: int = DEFAULT_EXTRA_LEVELS
) -> list[int]:
    """Encoder strides that feed the channel mapper: the given ones, or the deepest stages so that, with
    ``extra_levels``, there are four levels.

    Example:
        >>> resolve_feature_strides("resenc_l", None)
        [4, 8, 16, 32]
        >>> resolve_feature_strides("resenc_demo", None, extra_levels=1)
        [2, 4, 8]
    """
    available = get_preset(preset).cumulative_strides
    if feature_strides is None:
        count = DEFAULT_NUM_FEATURE_LEVELS - int(extra_levels)
        if not 1 <= count <= len(available):
            raise ValueError(f"extra_levels {extra_levels}: preset {preset!r} has {len(available)} stages")
        return available[-count:]
    chosen = sorted(int(s) for s in feature_strides)
    missing = [s for s in chosen if s not in available]
    if missing or not chosen or len(set(chosen)) != len(chosen):
        raise ValueError(f"feature_strides {list(feature_strides)}: preset {preset!r} has stage strides {available}")
    return chosen


@DETECTORS.register("deformable_detr")
class DeformableDETR(nn.Module):
    """Two-stage 3D Deformable DETR on a ResEnc encoder (see the module docstring).

    Args:
        preset: backbone preset name (``resenc_l``, ``resenc_demo``, ``resenc_small``).
        in_channels: image channels.
        num_classes: object classes (without background).
        feature_strides: encoder strides mapped onto transformer levels (default: the deepest stages).
        extra_levels: coarser levels added by stride-2 convs after the deepest stage.
        Remaining keywords are the knobs named by the module-level defaults.
    """

    #: Fine-tuning defaults the trainer should use for this detector (see ``TRAINING_DEFAULTS``).
    training_defaults: dict[str, Any] = TRAINING_DEFAULTS

    def __init__(
        self,
        preset: str,
        in_channels: int,
        num_classes: int,
        feature_strides: Sequence[int] | None = None,
        extra_levels: int = DEFAULT_EXTRA_LEVELS,
        hidden_dim: int = DEFAULT_HIDDEN_DIM,
        num_heads: int = DEFAULT_NUM_HEADS,
        num_points: int = DEFAULT_NUM_POINTS,
        num_encoder_layers: int = DEFAULT_NUM_ENCODER_LAYERS,
        num_decoder_layers: int = DEFAULT_NUM_DECODER_LAYERS,
        ffn_dim: int = DEFAULT_FFN_DIM,
        dropout: float = DEFAULT_DROPOUT,
        num_queries: int | None = None,
        group_norm_groups: int = DEFAULT_GROUP_NORM_GROUPS,
        proposal_base_size: float = DEFAULT_PROPOSAL_BASE_SIZE,
        position_temperature: float = POSITION_TEMPERATURE,
        cost_class: float = DEFAULT_COST_CLASS,
        cost_bbox: float = DEFAULT_COST_BBOX,
        cost_giou: float = DEFAULT_COST_GIOU,
        focal_alpha: float = DEFAULT_FOCAL_ALPHA,
        focal_gamma: float = DEFAULT_FOCAL_GAMMA,
        cls_prior: float = DEFAULT_CLS_PRIOR,
        cls_weight: float = DEFAULT_CLS_WEIGHT,
        l1_weight: float = DEFAULT_L1_WEIGHT,
        giou_weight: float = DEFAULT_GIOU_WEIGHT,
        max_detections: int | None = DEFAULT_MAX_DETECTIONS,
        score_threshold: float = DEFAULT_SCORE_THRESHOLD,
    ) -> None:
        super().__init__()
        num_queries = DEFAULT_MIN_QUERIES if num_queries is None else int(num_queries)
        max_detections = num_queries if max_detections is None else int(max_detections)
        if num_decoder_layers < 1 or num_encoder_layers < 0 or num_queries < 1:
            raise ValueError("need num_decoder_layers >= 1, num_encoder_layers >= 0 and num_queries >= 1")
        self.num_classes = int(num_classes)
        self.feature_strides = resolve_feature_strides(preset, feature_strides, extra_levels)
        backbone = get_preset(preset)
        self.stage_strides = backbone.cumulative_strides
        self.feature_stages = [self.stage_strides.index(s) for s in self.feature_strides]
        self.num_levels = len(self.feature_stages) + int(extra_levels)
        self.hidden_dim, self.num_queries = hidden_dim, num_queries
        self.proposal_base_size = proposal_base_size
        self.position_temperature = float(position_temperature)
        self.max_detections, self.score_threshold = max_detections, score_threshold
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.loss_weights = {"cls": cls_weight, "l1": l1_weight, "giou": giou_weight}
        groups = _group_count(hidden_dim, group_norm_groups)

        self.encoder = build_resenc_encoder(preset, in_channels)
        widths = backbone.features_per_stage
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv3d(widths[stage], hidden_dim, 1), nn.GroupNorm(groups, hidden_dim))
            for stage in self.feature_stages
        )
        extra_in = [widths[self.feature_stages[-1]]] + [hidden_dim] * (int(extra_levels) - 1)
        self.extra_proj = nn.ModuleList(
            nn.Sequential(nn.Conv3d(width, hidden_dim, 3, stride=2, padding=1), nn.GroupNorm(groups, hidden_dim))
            for width in extra_in[: int(extra_levels)]
        )
        self.level_embed = nn.Parameter(torch.empty(self.num_levels, hidden_dim))

        layer_args = (hidden_dim, ffn_dim, dropout, num_heads, self.num_levels, num_points)
        self.encoder_layers = nn.ModuleList(DeformableEncoderLayer(*layer_args) for _ in range(num_encoder_layers))
        self.decoder_layers = nn.ModuleList(DeformableDecoderLayer(*layer_args) for _ in range(num_decoder_layers))

        # Two-stage: proposals from the encoder memory, and the query embedding of the chosen boxes.
        self.enc_output = nn.Linear(hidden_dim, hidden_dim)
        self.enc_output_norm = nn.LayerNorm(hidden_dim)
        self.box_feats_per_coord = hidden_dim // 2 // 2 * 2  # even; six coordinates
        self.pos_trans = nn.Linear(6 * self.box_feats_per_coord, 2 * hidden_dim)
        self.pos_trans_norm = nn.LayerNorm(2 * hidden_dim)

        # Heads: one per decoder layer (iterative refinement) plus one for the encoder proposals (last).
        class_head = nn.Linear(hidden_dim, self.num_classes)
        box_head = MLP(hidden_dim, hidden_dim, 6, 3)
        nn.init.constant_(class_head.bias, -math.log((1 - cls_prior) / cls_prior))
        nn.init.zeros_(box_head.layers[-1].weight)  # start each refinement at its reference box
        nn.init.zeros_(box_head.layers[-1].bias)
        self.class_heads = nn.ModuleList(copy.deepcopy(class_head) for _ in range(num_decoder_layers + 1))
        self.box_heads = nn.ModuleList(copy.deepcopy(box_head) for _ in range(num_decoder_layers + 1))
        nn.init.normal_(self.level_embed)

        self.matcher = HungarianMatcher(cost_class, cost_bbox, cost_giou, focal_alpha, focal_gamma)

    @classmethod
    def build_kwargs_from_settings(
        cls, settings: dict[str, Any], in_channels: int, num_classes: int, plan: dict[str, Any]
    ) -> dict[str, Any]:
        """JSON-able constructor arguments: ``settings["preset"]`` plus any constructor keyword in ``settings``.

        Training keys (``iterations``, ``lr``, ...) are ignored here, except ``patch_size``: unless
        ``settings["num_queries"]`` gives it, the number of queries is planned by :func:`plan_num_queries` from
        ``plan["case_boxes"]`` (``{case: [[z0, y0, x0, z1, y1, x1], ...]}`` in preprocessed voxels) and the training
        patch size, with ``settings["min_queries"]`` as the floor. A preprocessing plan (it lists ``case_ids``)
        without ``case_boxes`` (written before per-case boxes were recorded) is an error; any other plan without
        them (a hand-made one) gives the floor.

        Example:
            >>> plan = {"case_boxes": {"a": [[0, 0, 0, 4, 4, 4]] * 6}}
            >>> kwargs = DeformableDETR.build_kwargs_from_settings({"preset": "resenc_l", "lr": 3e-4}, 1, 1, plan)
            >>> kwargs["feature_strides"], kwargs["num_queries"]
            ([4, 8, 16, 32], 18)
        """
        if "preset" not in settings:
            raise KeyError("detector settings need a 'preset' (backbone preset name)")
        accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "in_channels", "num_classes"}
        kwargs = {key: value for key, value in settings.items() if key in accepted}
        kwargs["extra_levels"] = int(settings.get("extra_levels", DEFAULT_EXTRA_LEVELS))
        kwargs["feature_strides"] = resolve_feature_strides(
            settings["preset"], settings.get("feature_strides"), kwargs["extra_levels"]
        )
        if kwargs.get("num_queries") is None:
            kwargs["num_queries"] = cls.planned_num_queries(settings, plan)
        return {"in_channels": int(in_channels), "num_classes": int(num_classes), **kwargs}

    @staticmethod
    def planned_num_queries(settings: Mapping[str, Any], plan: Mapping[str, Any]) -> int:
        """:func:`plan_num_queries` for the training patch size of ``settings`` and the boxes of ``plan``."""
        patch = _cube(settings.get("patch_size", DeformableDETRSettings.default("patch_size")))
        min_queries = int(settings.get("min_queries", DEFAULT_MIN_QUERIES))
        if "case_boxes" not in plan:
            if "case_ids" in plan:  # a preprocessing plan.json written before per-case boxes were recorded
                raise ValueError(
                    "deformable_detr plans num_queries from the plan's per-case boxes ('case_boxes'), which this "
                    "plan.json lacks (written by an older version): rerun preprocessing, or set num_queries"
                )
            LOGGER.info("deformable_detr: the plan has no per-case boxes; num_queries = min_queries = %d", min_queries)
            return min_queries
        return plan_num_queries(plan["case_boxes"].values(), patch, min_queries)

    # ------------------------------------------------------------------ forward

    def _check_size(self, images: Tensor) -> None:
        if images.ndim != 5:
            raise ValueError(f"expected images [B, C, Z, Y, X], got shape {tuple(images.shape)}")
        divisor = self.stage_strides[-1]
        if any(size % divisor for size in images.shape[2:]):
            raise ValueError(
                f"patch size {tuple(images.shape[2:])} must be divisible by the total encoder stride {divisor}"
            )

    def feature_levels(self, images: Tensor) -> list[Tensor]:
        """The mapped feature maps ``[B, hidden, Z_l, Y_l, X_l]``, finest first."""
        skips = self.encoder(images)
        levels = [proj(skips[stage]) for proj, stage in zip(self.input_proj, self.feature_stages)]
        coarse = skips[self.feature_stages[-1]]
        for proj in self.extra_proj:
            coarse = proj(coarse)
            levels.append(coarse)
        return levels

    def forward(self, images: Tensor) -> dict[str, Any]:
        """Return ``{"logits": [per decoder layer: B, Q, K], "boxes": [per layer: B, Q, 6], "enc_logits":
        [B, N, K], "enc_boxes": [B, N, 6]}``; boxes normalised centre-size (z, y, x order), logits raw."""
        self._check_size(images)
        levels = self.feature_levels(images)
        batch = images.shape[0]
        device = images.device

        tokens, positions, centres, proposal_sizes, shapes = [], [], [], [], []
        for level, feature in enumerate(levels):
            shape = tuple(feature.shape[2:])
            shapes.append(shape)
            tokens.append(feature.flatten(2).transpose(1, 2))  # [B, C, Z, Y, X] -> [B, N_l, C]
            pos = sine_position_embedding_3d(shape, self.hidden_dim, self.position_temperature, device)
            pos = pos + self.level_embed[level]
            positions.append(pos)
            level_centres = voxel_centres(shape, device)  # [N_l, 3]
            centres.append(level_centres)
            proposal_sizes.append(torch.full_like(level_centres, min(self.proposal_base_size * 2**level, 0.99)))
        src = torch.cat(tokens, dim=1)  # [B, N, C]
        pos = torch.cat(positions, dim=0).to(src.dtype)[None]  # [1, N, C]
        spatial_shapes = torch.tensor(shapes, dtype=torch.long, device=device)  # [L, 3]
        all_centres = torch.cat(centres, dim=0)  # [N, 3]

        # Encoder: every token attends around its own centre on every level (no padding: valid ratios are 1).
        reference_points = all_centres[None, :, None, :].expand(batch, -1, self.num_levels, -1)  # [B, N, L, 3]
        memory = src
        for layer in self.encoder_layers:
            memory = layer(memory, pos, reference_points, spatial_shapes)

        # Two-stage proposals: one box per token, refined by the encoder heads.
        proposals = torch.cat([all_centres, torch.cat(proposal_sizes, dim=0)], dim=1)  # [N, 6]
        enc_memory = self.enc_output_norm(self.enc_output(memory))
        enc_logits = self.class_heads[-1](enc_memory)  # [B, N, K]
        enc_unact = self.box_heads[-1](enc_memory).float() + inverse_sigmoid(proposals)[None]  # [B, N, 6]
        num_queries = min(self.num_queries, enc_unact.shape[1])
        top = enc_logits.max(dim=-1).values.topk(num_queries, dim=1).indices  # [B, Q]
        reference = enc_unact.gather(1, top[..., None].expand(-1, -1, 6)).detach().sigmoid()  # [B, Q, 6]

        box_embedding = sine_embedding(reference, [self.box_feats_per_coord] * 6, self.position_temperature)
        embedded = self.pos_trans_norm(self.pos_trans(box_embedding))
        query_pos, tgt = embedded.to(src.dtype).split(self.hidden_dim, dim=-1)  # [B, Q, C] each

        all_logits, all_boxes = [], []
        for index, layer in enumerate(self.decoder_layers):
            reference_input = reference[:, :, None, :].expand(-1, -1, self.num_levels, -1)  # [B, Q, L, 6]
            tgt = layer(tgt, query_pos, reference_input, memory, spatial_shapes)
            boxes = (self.box_heads[index](tgt).float() + inverse_sigmoid(reference)).sigmoid()
            all_logits.append(self.class_heads[index](tgt))
            all_boxes.append(boxes)
            reference = boxes.detach()  # each layer refines the previous layer's boxes without backprop through it
        return {"logits": all_logits, "boxes": all_boxes, "enc_logits": enc_logits, "enc_boxes": enc_unact.sigmoid()}

    # ------------------------------------------------------------------ training

    @staticmethod
    def normalise_targets(
        targets: Sequence[dict[str, Tensor]], patch_size: Sequence[int], device: torch.device
    ) -> list[dict[str, Tensor]]:
        """Voxel corner boxes -> normalised centre-size boxes (what the matcher and the L1 loss compare)."""
        scale = torch.tensor(list(patch_size) * 2, dtype=torch.float32, device=device)
        normalised = []
        for target in targets:
            boxes = target["boxes"].to(device=device, dtype=torch.float32).reshape(-1, 6)
            labels = target["labels"].to(device=device, dtype=torch.long).reshape(-1)
            normalised.append({"labels": labels, "boxes": corners_to_centre_size(boxes / scale)})
        return normalised

    def _set_losses(
        self, logits: Tensor, boxes: Tensor, targets: list[dict[str, Tensor]], num_boxes: float
    ) -> dict[str, Tensor]:
        """Focal, L1 and GIoU losses of one prediction set (one decoder layer or the encoder proposals)."""
        logits, boxes = logits.float(), boxes.float()
        matches = self.matcher(logits, boxes, targets)
        one_hot = torch.zeros_like(logits)
        matched_pred, matched_target = [], []
        for index, (query_idx, target_idx) in enumerate(matches):
            query_idx, target_idx = query_idx.to(logits.device), target_idx.to(logits.device)
            one_hot[index, query_idx, targets[index]["labels"][target_idx]] = 1.0
            matched_pred.append(boxes[index, query_idx])
            matched_target.append(targets[index]["boxes"][target_idx])
        # summed over queries, averaged over classes (the release's "mean_last_sum" reduction)
        focal = sigmoid_focal_loss(logits, one_hot, alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="none")
        cls = focal.mean(dim=-1).sum()
        pred, target = torch.cat(matched_pred), torch.cat(matched_target)
        if pred.shape[0]:
            l1 = F.l1_loss(pred, target, reduction="sum")
            giou = (1 - box_pair_giou(centre_size_to_corners(pred), centre_size_to_corners(target))).sum()
        else:
            l1 = giou = boxes.sum() * 0.0  # keeps the graph for a batch without objects
        return {"cls": cls / num_boxes, "l1": l1 / num_boxes, "giou": giou / num_boxes}

    def compute_losses(
        self, images: Tensor, targets: list[dict[str, Tensor]], seg: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Matched focal + L1 + GIoU losses summed over every decoder layer and the encoder proposals.

        ``targets[b]["boxes"]`` are patch-voxel corner boxes (MONAI standard mode, z-y-x); ``seg`` is unused.
        The returned ``cls``/``l1``/``giou`` are those of the last decoder layer, ``enc`` the proposals' total.

        Example:
            >>> losses = net.compute_losses(images, [{"boxes": b, "labels": l}], seg)  # doctest: +SKIP
            >>> losses["loss"].backward()  # doctest: +SKIP
        """
        if len(targets) != images.shape[0]:
            raise ValueError(f"got {len(targets)} targets for a batch of {images.shape[0]} images")
        out = self(images)
        normalised = self.normalise_targets(targets, images.shape[2:], images.device)
        num_boxes = max(float(sum(t["labels"].numel() for t in normalised)), 1.0)

        def weighted(terms: dict[str, Tensor]) -> Tensor:
            return sum(self.loss_weights[key] * terms[key] for key in ("cls", "l1", "giou"))

        total = images.new_zeros((), dtype=torch.float32)
        last: dict[str, Tensor] = {}
        for logits, boxes in zip(out["logits"], out["boxes"]):
            last = self._set_losses(logits, boxes, normalised, num_boxes)
            total = total + weighted(last)
        enc = weighted(self._set_losses(out["enc_logits"], out["enc_boxes"], normalised, num_boxes))
        total = total + enc
        return {"loss": total, **{key: value.detach() for key, value in last.items()}, "enc": enc.detach()}

    # ------------------------------------------------------------------ inference

    @torch.no_grad()
    def predict(self, images: Tensor) -> list[dict[str, Tensor]]:
        """Top-scoring (query, class) pairs per image, boxes in patch voxel coordinates (standard mode, z-y-x)."""
        out = self(images)
        probs = out["logits"][-1].float().sigmoid()  # [B, Q, K]
        patch = torch.tensor(list(images.shape[2:]), dtype=torch.float32, device=images.device)
        results = []
        for image_probs, image_boxes in zip(probs, out["boxes"][-1]):
            flat = image_probs.reshape(-1)  # [Q*K], query-major
            count = min(self.max_detections, flat.numel())
            scores, index = flat.topk(count)
            keep = scores > self.score_threshold
            scores, index = scores[keep], index[keep]
            query, labels = index // self.num_classes, index % self.num_classes
            corners = centre_size_to_corners(image_boxes[query].float()) * torch.cat([patch, patch])
            lower = torch.minimum(corners[:, :3].clamp(min=0), patch)
            upper = torch.minimum(corners[:, 3:].clamp(min=0), patch)
            results.append({"boxes": torch.cat([lower, upper], dim=1), "scores": scores, "labels": labels})
        return results
