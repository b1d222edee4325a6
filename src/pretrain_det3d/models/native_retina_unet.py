"""nnDetection's native Retina U-Net: the planned plain conv encoder and UFPN, with the Retina U-Net heads.

The paper's third detector configuration is nnDetection's own Retina U-Net, for which the authors released a
supervised MultiTalent checkpoint (``MIC-DKFZ/RetinaUNet-MissingPiece-MultiTalent``: "the encoder and FPN
decoder of a Retina U-Net, without the detection heads"; nnDetection ``docs/finetuning.md``). Release recipe:
``nndet/conf/train/retinaunet_focal_v002_for_ConvBackboneMultiTalent.yaml`` with model configuration
``model_cfg/retinaunet_l1_focal_atss_ms_ema_for_ConvBackboneMultiTalent.yaml`` and module ``DetSegModel``
(``RetinaUNetFocalV002``, ``nndet/ptmodule/retinaunet/run_v002.py``). The code is our own.

Architecture (:class:`~pretrain_det3d.models.native_planning.NativeArchitecture`):

- ``self.encoder`` (:class:`NativeEncoder`, nnDetection's ``ConvBackbone``): one level per planned conv kernel;
  level ``l`` has ``convs_per_level`` conv-InstanceNorm-LeakyReLU blocks (conv without bias, InstanceNorm eps
  1e-5 affine, LeakyReLU 0.01), the first of a level ``l > 0`` strided by the planned stride with the level's
  own kernel (``pooling_mode: conv_kernel``); widths ``min(start * 2**l, max)``; He (fan-out) initialisation.
  State-dict names follow nnDetection's (``levels.<l>.component.<j>.conv/norm``).
- ``self.decoder``: the UFPN of :mod:`pretrain_det3d.models.retina_unet` over levels ``0 .. last head level``,
  with the planned kernel of each level for its output conv (``FPN.build_out`` uses ``conv_kernels[level]``) and
  transposed-conv upsampling by the planned strides.
- Heads, anchors, matching, losses and inference: exactly those of
  :class:`~pretrain_det3d.models.retina_unet.RetinaUNet` (this class derives from it); the head levels are the
  plan's ``decoder_levels``, anchors are planned per level with per-axis strides.

Architecture source:

- **scratch**: planned from ``plan.json`` (``target_spacing``, ``median_shape``) by
  :func:`~pretrain_det3d.models.native_planning.plan_native_architecture`.
- **a checkpoint**: the checkpoint fixes the network. With ``--load_adapt_plan`` the release overwrites the
  model configuration's ``backbone_kwargs`` from ``nnssl_adaptation_plan.architecture_plans.arch_kwargs`` and
  relays ``start_channels`` / ``max_channels`` / ``conv_kernels`` / ``strides`` / ``fpn_channels`` into the
  plan's architecture (see the comment in the model configuration); here
  :func:`architecture_from_checkpoint` does the same (missing keys: the released checkpoint's architecture,
  ``models.published.NATIVE_MULTITALENT_ARCH_KWARGS``). Either way the training patch is the configured
  ``patch_size`` (the release's configuration fixes 128^3 by ``backbone_kwargs.input_shape``); it must be
  divisible by the network's total stride per axis, which the build checks.

Transfer (:meth:`NativeRetinaUNet.load_pretrained`; the release's ``DetSegModel_TL`` and
``DetSegModel_TL_MultiTalentStem`` in ``nndet/ptmodule/retinaunet/DetSegModel_TL.py``): the chosen stem
(``stem`` setting, else the checkpoint's ``key_to_stem``) becomes level 0's first block, the checkpoint's
``backbone.levels.0`` blocks shift one place up, the other ``backbone.*`` keys load as they are, and with
``transfer_decoder`` the ``decoder.*`` (UFPN) keys load into the decoder; other stems, segmentation layers and
anything else are skipped; heads stay random. Every encoder (and decoder) tensor of the model must be found,
with the same shape, or the load fails naming the key.

Example:
    >>> import torch
    >>> from pretrain_det3d.models.native_planning import plan_native_architecture
    >>> arch = plan_native_architecture([1.0, 1.0, 1.0], [32, 32, 32], start_channels=4, max_channels=16,
    ...                                 fpn_channels=8).to_dict()
    >>> net = NativeRetinaUNet(1, 1, [[[4, 4, 4]]] * 3, arch)
    >>> sorted(net.predict(torch.zeros(1, 1, 32, 32, 32))[0])
    ['boxes', 'labels', 'scores']
"""

from __future__ import annotations

import inspect
import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

from torch import Tensor, nn

from pretrain_det3d.models.anchors import DEFAULT_ANCHORS_PER_LEVEL, plan_anchor_shapes
from pretrain_det3d.models.checkpoint import (
    CheckpointFormatError,
    TransferReport,
    _adapt_input_projection,
    read_pretraining_checkpoint,
)
from pretrain_det3d.models.native_planning import NativeArchitecture, plan_native_architecture
from pretrain_det3d.models.published import (
    NATIVE_MULTITALENT_ARCH_KWARGS,
    native_release_target_key,
)
from pretrain_det3d.models.registry import DETECTORS
from pretrain_det3d.models.retina_unet import (
    LEAKY_SLOPE,
    UFPN,
    RetinaUNet,
    _check_anchor_levels,
    _he_init,
    fpn_level_channels,
)
from pretrain_det3d.settings.detectors import NativeRetinaUNetSettings, training_defaults
from pretrain_det3d.settings.training import TrainingSettings, as_triple

LOGGER = logging.getLogger(__name__)

_D = NativeRetinaUNetSettings.default
DEFAULT_CONVS_PER_LEVEL = _D("convs_per_level")
DEFAULT_TRANSFER_DECODER = _D("transfer_decoder")
NORM_EPS = 1e-5  # ConvInstanceLReLU's InstanceNorm eps (nndet/nn/layers/conv/instance.py)

#: the head / loss keywords shared with RetinaUNet (and their defaults, written once in RetinaUNetSettings)
_HEAD_PARAMETERS = {
    name: parameter
    for name, parameter in inspect.signature(RetinaUNet._build_heads_and_losses).parameters.items()
    if parameter.kind is inspect.Parameter.KEYWORD_ONLY
}
HEAD_DEFAULTS: dict[str, Any] = {
    name: inspect.signature(RetinaUNet.__init__).parameters[name].default for name in _HEAD_PARAMETERS
}


def _padding(kernel: Sequence[int]) -> tuple[int, ...]:
    return tuple(int(k) // 2 for k in kernel)


class ConvNormAct(nn.Sequential):
    """conv (no bias) -> InstanceNorm3d (affine) -> LeakyReLU, as nnDetection's ``ConvInstanceLReLU``."""

    def __init__(self, in_channels: int, out_channels: int, kernel: Sequence[int], stride: Sequence[int]) -> None:
        super().__init__(OrderedDict(
            conv=nn.Conv3d(in_channels, out_channels, tuple(kernel), tuple(stride), _padding(kernel), bias=False),
            norm=nn.InstanceNorm3d(out_channels, eps=NORM_EPS, affine=True),
            act=nn.LeakyReLU(LEAKY_SLOPE, inplace=True),
        ))


class _Level(nn.Module):
    """One encoder level (nnDetection's ``WrapperBackboneLevel``: the blocks sit at ``.component``)."""

    def __init__(self, blocks: Sequence[nn.Module]) -> None:
        super().__init__()
        self.component = nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        return self.component(x)


class NativeEncoder(nn.Module):
    """nnDetection's plain ``ConvBackbone`` for an architecture; ``forward`` returns every level's output.

    Example:
        >>> import torch
        >>> arch = NativeArchitecture([[3, 3, 3]] * 3, [[2, 2, 2]] * 2, [1, 2], start_channels=4, max_channels=8)
        >>> [tuple(f.shape[1:]) for f in NativeEncoder(1, arch)(torch.zeros(1, 1, 8, 8, 8))]
        [(4, 8, 8, 8), (8, 4, 4, 4), (8, 2, 2, 2)]
    """

    def __init__(self, in_channels: int, architecture: NativeArchitecture,
                 convs_per_level: int = DEFAULT_CONVS_PER_LEVEL) -> None:
        super().__init__()
        if convs_per_level < 1:
            raise ValueError(f"convs_per_level must be >= 1, got {convs_per_level}")
        self.in_channels = int(in_channels)
        widths = architecture.channels
        strides = [[1, 1, 1]] + architecture.strides
        levels = []
        for level, (kernel, stride, width) in enumerate(zip(architecture.conv_kernels, strides, widths)):
            previous = self.in_channels if level == 0 else widths[level - 1]
            blocks = [ConvNormAct(previous, width, kernel, stride)]
            blocks += [ConvNormAct(width, width, kernel, [1, 1, 1]) for _ in range(convs_per_level - 1)]
            levels.append(_Level(blocks))
        self.levels = nn.ModuleList(levels)
        _he_init(self)

    def forward(self, x: Tensor) -> list[Tensor]:
        outputs = []
        for level in self.levels:
            x = level(x)
            outputs.append(x)
        return outputs


class NativeUFPN(UFPN):
    """The Retina U-Net's UFPN with the planned kernel of each level for its output conv."""

    def __init__(self, in_channels: Sequence[int], strides: Sequence[Sequence[int]], channels: Sequence[int],
                 kernels: Sequence[Sequence[int]]) -> None:
        super().__init__(in_channels, [tuple(s) for s in strides], channels)
        self.out = nn.ModuleList(
            [nn.Conv3d(c, c, tuple(k), padding=_padding(k)) for c, k in zip(self.channels, kernels)]
        )
        _he_init(self.out)


def architecture_from_checkpoint(plan: dict[str, Any], where: str = "checkpoint") -> NativeArchitecture:
    """The network a native checkpoint fixes, from its ``nnssl_adaptation_plan`` (the release's
    ``--load_adapt_plan``); keys the plan lacks take the released checkpoint's values.

    Example:
        >>> architecture_from_checkpoint({}).channels
        [32, 64, 128, 256, 320, 320]
    """
    given = ((plan.get("architecture_plans") or {}).get("arch_kwargs") or {})
    kwargs = {**NATIVE_MULTITALENT_ARCH_KWARGS, **{k: v for k, v in given.items() if k in NATIVE_MULTITALENT_ARCH_KWARGS}}
    missing = sorted(set(NATIVE_MULTITALENT_ARCH_KWARGS) - set(given))
    if missing:
        LOGGER.warning("%s: architecture_plans.arch_kwargs lacks %s; using the released checkpoint's values",
                       where, missing)
    features = [int(f) for f in kwargs["features_per_stage"]]
    kernels = list(kwargs["kernel_sizes"])
    strides = list(kwargs["strides"])
    if len(kernels) != len(features):
        raise CheckpointFormatError(f"{where}: {len(features)} features_per_stage but {len(kernels)} kernel_sizes")
    if len(strides) == len(features):  # a first stride of 1 for the full-resolution level (ResEnc style)
        first = strides[0]
        if any(int(s) != 1 for s in ([first] * 3 if isinstance(first, (int, float)) else first)):
            raise CheckpointFormatError(f"{where}: the first level must not be strided, got strides {strides}")
        strides = strides[1:]
    start, widest = features[0], max(features)
    if features != [min(start * 2**level, widest) for level in range(len(features))]:
        raise CheckpointFormatError(f"{where}: features_per_stage {features} do not follow nnDetection's "
                                    "ConvBackbone rule min(start * 2**level, max)")
    decoder_levels = kwargs.get("decoder_levels")
    try:
        return NativeArchitecture(conv_kernels=kernels, strides=strides,
                                  decoder_levels=list(decoder_levels), start_channels=start, max_channels=widest,
                                  fpn_channels=int(kwargs["fpn_channels"]))
    except ValueError as error:
        raise CheckpointFormatError(f"{where}: {error}") from None


def _checkpoint_plan(path: str | os.PathLike) -> dict[str, Any]:
    return read_pretraining_checkpoint(path)[1]


def check_patch_size(patch_size: Sequence[int], architecture: NativeArchitecture, where: str) -> None:
    """Every patch edge must be a multiple of the network's total stride along its axis."""
    bad = [int(p) % d for p, d in zip(patch_size, architecture.divisor)]
    if any(bad):
        raise ValueError(f"{where}: patch_size {list(patch_size)} is not divisible by the native Retina U-Net's "
                         f"total stride {architecture.divisor} (per axis)")


@DETECTORS.register("retina_unet_native")
class NativeRetinaUNet(RetinaUNet):
    """nnDetection's native Retina U-Net (see the module docstring).

    Args:
        in_channels: image channels.
        num_classes: object classes (without background).
        anchor_shapes: per head level, the ``[dz, dy, dx]`` anchor shapes (the same count per level).
        architecture: a :class:`NativeArchitecture` as a dict (``.to_dict()``).
        convs_per_level: conv blocks per encoder level.
        fpn_min_channels: smallest UFPN width below the head levels.
        stem: checkpoint stem prefix to load (default: the checkpoint's ``key_to_stem``).
        transfer_decoder: whether :meth:`load_pretrained` also loads the UFPN.
        Remaining keywords: the heads and losses of :class:`RetinaUNet` (``HEAD_DEFAULTS``).
    """

    training_defaults: dict[str, Any] = training_defaults("retina_unet_native")

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        anchor_shapes: Sequence[Sequence[Sequence[float]]],
        architecture: dict[str, Any],
        convs_per_level: int = DEFAULT_CONVS_PER_LEVEL,
        fpn_min_channels: int = NativeRetinaUNetSettings.default("fpn_min_channels"),
        stem: str | None = None,
        transfer_decoder: bool = DEFAULT_TRANSFER_DECODER,
        **head_settings: Any,
    ) -> None:
        unknown = sorted(set(head_settings) - set(HEAD_DEFAULTS))
        if unknown:
            raise TypeError(f"NativeRetinaUNet: unknown keywords {unknown}")
        nn.Module.__init__(self)
        self.num_classes = int(num_classes)
        self.architecture = NativeArchitecture(**architecture)
        arch = self.architecture
        self.head_levels = list(arch.decoder_levels)
        self.head_strides = [arch.cumulative_strides[level] for level in self.head_levels]
        _check_anchor_levels(anchor_shapes, self.head_strides)
        self.stem = stem
        self.transfer_decoder = bool(transfer_decoder)
        self.encoder = NativeEncoder(in_channels, arch, convs_per_level)
        n_levels = self.head_levels[-1] + 1
        self.decoder_widths = fpn_level_channels(n_levels, self.head_levels[0], arch.fpn_channels, fpn_min_channels)
        self.decoder = NativeUFPN(arch.channels[:n_levels], [[1, 1, 1]] + arch.strides[: n_levels - 1],
                                  self.decoder_widths, arch.conv_kernels[:n_levels])
        self._build_heads_and_losses(anchor_shapes, arch.fpn_channels, self.decoder_widths[0],
                                     **{**HEAD_DEFAULTS, **head_settings})

    @classmethod
    def build_kwargs_from_settings(
        cls,
        settings: dict[str, Any],
        in_channels: int,
        num_classes: int,
        plan: dict[str, Any],
        init_checkpoint: str | os.PathLike | None = None,
    ) -> dict[str, Any]:
        """JSON-able constructor arguments: the architecture planned from ``plan`` (``target_spacing``,
        ``median_shape``) or fixed by ``init_checkpoint``, anchors planned from ``plan["box_sizes"]`` at the
        head levels' per-axis strides, and the head keywords found in ``settings``.

        Example:
            >>> kwargs = NativeRetinaUNet.build_kwargs_from_settings(
            ...     {"patch_size": [32, 32, 32]}, 1, 1,
            ...     {"target_spacing": [1, 1, 1], "median_shape": [32, 32, 32], "box_sizes": []})
            >>> kwargs["architecture"]["decoder_levels"], kwargs["architecture"]["patch_size"]
            ([1, 2, 3], [32, 32, 32])
        """
        s = NativeRetinaUNetSettings
        if settings.get("head_strides") is not None:
            raise ValueError("detector setting 'head_strides' does not apply to the native Retina U-Net: its head "
                             "levels come from its plan (or its checkpoint)")
        if init_checkpoint is not None:
            architecture = architecture_from_checkpoint(_checkpoint_plan(init_checkpoint), str(init_checkpoint))
        elif settings.get("architecture") is not None:
            architecture = NativeArchitecture(**settings["architecture"])
        else:
            missing = [key for key in ("target_spacing", "median_shape") if key not in plan]
            if missing:
                raise KeyError(f"plan.json lacks {missing}, which the native Retina U-Net's planner needs")
            architecture = plan_native_architecture(
                plan["target_spacing"], plan["median_shape"],
                max_patch_voxels=int(settings.get("max_patch_voxels", s.default("max_patch_voxels"))),
                start_channels=int(settings.get("start_channels", s.default("start_channels"))),
                max_channels=int(settings.get("max_channels", s.default("max_channels"))),
                fpn_channels=int(settings.get("fpn_channels", s.default("fpn_channels"))),
            )
        patch = as_triple(settings.get("patch_size") or TrainingSettings.default("patch_size"))
        check_patch_size(patch, architecture, "detector setting 'patch_size'")
        head_strides = [architecture.cumulative_strides[level] for level in architecture.decoder_levels]
        anchor_shapes = settings.get("anchor_shapes")
        if anchor_shapes is None:
            anchor_shapes = plan_anchor_shapes(
                plan.get("box_sizes", []), head_strides,
                anchors_per_level=int(settings.get("anchors_per_level", DEFAULT_ANCHORS_PER_LEVEL)))
        head = {key: settings[key] for key in HEAD_DEFAULTS if key in settings}
        if "box_weights" in head:
            head["box_weights"] = [float(w) for w in head["box_weights"]]
        own = {key: settings[key] for key in ("convs_per_level", "fpn_min_channels", "stem", "transfer_decoder")
               if key in settings}
        return {"in_channels": int(in_channels), "num_classes": int(num_classes), "anchor_shapes": anchor_shapes,
                "architecture": architecture.to_dict(), **own, **head}

    def _check_size(self, images: Tensor) -> None:
        if images.ndim != 5:
            raise ValueError(f"expected images [B, C, Z, Y, X], got shape {tuple(images.shape)}")
        check_patch_size(images.shape[2:], self.architecture, "input")

    # ------------------------------------------------------------------ transfer

    def load_pretrained(self, path: str | os.PathLike) -> TransferReport:
        """Load a checkpoint in the release's layout (see the module docstring); heads stay as they are.

        Example:
            >>> report = model.load_pretrained("results/pretrain/multitalent_retinaunet/checkpoint_final.pth")  # doctest: +SKIP
            >>> len(report.loaded_keys) > 0  # doctest: +SKIP
            True
        """
        path = Path(path)
        weights, plan = read_pretraining_checkpoint(path)
        stem = self.stem or plan.get("key_to_stem")
        if not stem:
            raise CheckpointFormatError(f"{path}: no stem chosen (the plan has no key_to_stem and no 'stem' is set)")
        if not any(key.startswith(stem + ".") for key in weights):
            stems = sorted({key.rsplit(".", 2)[0] for key in weights if key.startswith("stem.")})
            raise CheckpointFormatError(f"{path}: no weights under stem {stem!r}; the checkpoint has {stems}")
        pretrain_channels = int(plan.get("pretrain_num_input_channels") or 1)
        model_state = self.state_dict()
        wanted = {key for key in model_state
                  if key.startswith("encoder.") or (self.transfer_decoder and key.startswith("decoder."))}
        report = TransferReport()
        new_state: dict[str, Tensor] = {}
        for key, tensor in weights.items():
            target_key = native_release_target_key(key, stem)
            if target_key is None or target_key not in wanted:
                report.skipped_keys.append(key)
                continue
            target = model_state[target_key]
            if key == f"{stem}.0.weight" and tensor.ndim == target.ndim and tensor.shape[1] != target.shape[1] \
                    and tensor.shape[1] == pretrain_channels:
                tensor = _adapt_input_projection(tensor, target.shape[1], path, key)
                report.adapted_keys.append(target_key)
            if tensor.shape != target.shape:
                raise CheckpointFormatError(f"{path}: shape mismatch at {key}: checkpoint {tuple(tensor.shape)} vs "
                                            f"model {target_key} {tuple(target.shape)}")
            new_state[target_key] = tensor.to(dtype=target.dtype)
            report.loaded_keys.append(target_key)
        missing = sorted(wanted - set(new_state))
        if missing:
            raise CheckpointFormatError(f"{path}: the checkpoint lacks {len(missing)} tensors of the model, e.g. "
                                        f"{missing[0]} (its network does not match this model's architecture)")
        self.load_state_dict(new_state, strict=False)
        return report
