"""Residual-encoder (ResEnc) backbones from ``dynamic_network_architectures``, as named presets.

The paper's backbone is nnU-Net's / nnssl's ResEnc-L: six stages with 32-64-128-256-320-320 features,
1-3-4-6-6-6 residual blocks, 3^3 kernels, strides 1-2-2-2-2-2, InstanceNorm (eps 1e-5, affine), LeakyReLU
(inplace) and convolutions with bias. The two small presets keep every design choice but shrink width and
depth so that the synthetic demo study runs on a laptop CPU.

Pre-training builds the whole U-Net (:func:`build_resenc_unet`); detectors build only the encoder
(:func:`build_resenc_encoder`) and keep it at ``.encoder`` so that checkpoint transfer works the same way.

Example:
    >>> net = build_resenc_unet("resenc_demo", in_channels=1, out_channels=1)
    >>> len(net.encoder.stages)
    4
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet
from dynamic_network_architectures.building_blocks.residual_encoders import ResidualEncoder
from torch import nn

from pretrain_det3d.utils.registry import Registry

#: Name of the network class as nnssl's adaptation plans write it (so their loaders can rebuild it).
ARCH_CLASS_NAME = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"

# Layer choices shared by every preset (they are those of nnssl's ResEnc-L).
CONV_OP = nn.Conv3d
NORM_OP = nn.InstanceNorm3d
NORM_OP_KWARGS: dict[str, Any] = {"eps": 1e-5, "affine": True}
NONLIN = nn.LeakyReLU
NONLIN_KWARGS: dict[str, Any] = {"inplace": True}
CONV_BIAS = True


@dataclass(frozen=True)
class BackbonePreset:
    """Width, depth and resolution schedule of a ResEnc encoder (+ its U-Net decoder for pre-training).

    All sequences run over the stages, shallowest first. ``strides`` are per-stage (not cumulative) and
    isotropic; ``kernel_sizes`` are isotropic cube edges.
    """

    features_per_stage: tuple[int, ...]
    n_blocks_per_stage: tuple[int, ...]
    strides: tuple[int, ...]
    kernel_sizes: tuple[int, ...]
    n_conv_per_stage_decoder: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        n = len(self.features_per_stage)
        for name in ("n_blocks_per_stage", "strides", "kernel_sizes"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"BackbonePreset.{name} needs {n} entries (one per stage)")
        if not self.n_conv_per_stage_decoder:
            object.__setattr__(self, "n_conv_per_stage_decoder", (1,) * (n - 1))
        if len(self.n_conv_per_stage_decoder) != n - 1:
            raise ValueError(f"BackbonePreset.n_conv_per_stage_decoder needs {n - 1} entries")

    @property
    def n_stages(self) -> int:
        return len(self.features_per_stage)

    @property
    def cumulative_strides(self) -> list[int]:
        """Stride of each stage's output relative to the input, e.g. ``[1, 2, 4, 8]``."""
        out, total = [], 1
        for stride in self.strides:
            total *= stride
            out.append(total)
        return out


BACKBONE_PRESETS: Registry[BackbonePreset] = Registry("backbone preset")

# Registry stores objects; register instances by calling the decorator directly.
BACKBONE_PRESETS.register("resenc_l")(
    BackbonePreset(
        features_per_stage=(32, 64, 128, 256, 320, 320),
        n_blocks_per_stage=(1, 3, 4, 6, 6, 6),
        strides=(1, 2, 2, 2, 2, 2),
        kernel_sizes=(3, 3, 3, 3, 3, 3),
        n_conv_per_stage_decoder=(1, 1, 1, 1, 1),
    )
)
BACKBONE_PRESETS.register("resenc_demo")(
    BackbonePreset(
        features_per_stage=(8, 16, 32, 64),
        n_blocks_per_stage=(1, 1, 1, 1),
        strides=(1, 2, 2, 2),
        kernel_sizes=(3, 3, 3, 3),
    )
)
BACKBONE_PRESETS.register("resenc_small")(
    BackbonePreset(
        features_per_stage=(16, 32, 64, 128),
        n_blocks_per_stage=(1, 2, 2, 2),
        strides=(1, 2, 2, 2),
        kernel_sizes=(3, 3, 3, 3),
    )
)


def get_preset(preset: str | BackbonePreset) -> BackbonePreset:
    """Look a preset up by name (instances pass through)."""
    return preset if isinstance(preset, BackbonePreset) else BACKBONE_PRESETS.get(preset)


def _shared_kwargs(preset: BackbonePreset) -> dict[str, Any]:
    # Keyword arguments common to ResidualEncoder and ResidualEncoderUNet.
    return {
        "n_stages": preset.n_stages,
        "features_per_stage": list(preset.features_per_stage),
        "conv_op": CONV_OP,
        "kernel_sizes": [[k, k, k] for k in preset.kernel_sizes],
        "strides": [[s, s, s] for s in preset.strides],
        "n_blocks_per_stage": list(preset.n_blocks_per_stage),
        "conv_bias": CONV_BIAS,
        "norm_op": NORM_OP,
        "norm_op_kwargs": dict(NORM_OP_KWARGS),
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": NONLIN,
        "nonlin_kwargs": dict(NONLIN_KWARGS),
    }


def build_resenc_unet(preset: str | BackbonePreset, in_channels: int, out_channels: int) -> ResidualEncoderUNet:
    """Build the full ResEnc U-Net (encoder at ``.encoder``), without deep supervision.

    Example:
        >>> net = build_resenc_unet("resenc_small", 1, 1)
        >>> [len(stage.blocks) for stage in net.encoder.stages]
        [1, 2, 2, 2]
    """
    p = get_preset(preset)
    return ResidualEncoderUNet(
        input_channels=in_channels,
        num_classes=out_channels,
        n_conv_per_stage_decoder=list(p.n_conv_per_stage_decoder),
        deep_supervision=False,
        **_shared_kwargs(p),
    )


def build_resenc_encoder(preset: str | BackbonePreset, in_channels: int) -> ResidualEncoder:
    """Build only the encoder; its forward returns the list of stage outputs (shallowest first).

    The module tree (``stem``, ``stages``) matches ``ResidualEncoderUNet.encoder``, so pre-trained weights
    transfer key by key.

    Example:
        >>> import torch
        >>> enc = build_resenc_encoder("resenc_demo", 1)
        >>> [tuple(f.shape[1:]) for f in enc(torch.zeros(1, 1, 16, 16, 16))][-1]
        (64, 2, 2, 2)
    """
    return ResidualEncoder(input_channels=in_channels, return_skips=True, **_shared_kwargs(get_preset(preset)))


def _import_string(cls: type) -> str:
    return f"{cls.__module__}.{cls.__name__}"


def architecture_plan(preset: str | BackbonePreset) -> dict[str, Any]:
    """nnssl's ``architecture_plans`` entry for a preset (JSON-able; layer classes as import strings).

    nnssl keeps the input and output channel counts outside ``arch_kwargs`` (they are passed when the
    network is rebuilt; the adaptation plan records ``pretrain_num_input_channels``), so they are not
    arguments here.

    Example:
        >>> architecture_plan("resenc_demo")["arch_kwargs"]["features_per_stage"]
        [8, 16, 32, 64]
    """
    p = get_preset(preset)
    kwargs = _shared_kwargs(p)
    kwargs["n_conv_per_stage_decoder"] = list(p.n_conv_per_stage_decoder)
    requiring_import = [key for key in ("conv_op", "norm_op", "dropout_op", "nonlin") if kwargs[key] is not None]
    for key in requiring_import:
        kwargs[key] = _import_string(kwargs[key])
    return {
        "arch_class_name": ARCH_CLASS_NAME,
        "arch_kwargs": kwargs,
        "arch_kwargs_requiring_import": requiring_import,
    }
