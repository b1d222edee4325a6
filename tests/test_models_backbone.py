"""Tests for models.backbone: presets, builders and nnssl's architecture plan."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from pretrain_det3d.models.backbone import (
    ARCH_CLASS_NAME,
    BACKBONE_PRESETS,
    architecture_plan,
    build_resenc_encoder,
    build_resenc_unet,
    get_preset,
)
from pretrain_det3d.utils.registry import UnknownNameError




def _conv_params(c_in: int, c_out: int, kernel: int, bias: bool) -> int:
    return c_in * c_out * kernel**3 + (c_out if bias else 0)


def _expected_encoder_params(in_channels: int, features: list[int], blocks: list[int]) -> int:
    """Hand count for dynamic_network_architectures' ResidualEncoder with BasicBlockD and affine norms.

    Stem: conv3 (bias) + norm. Block: conv3 + norm + conv3 + norm (convs with bias); a block that changes
    the width adds a 1x1 projection without bias + norm (striding alone is an avg-pool, no parameters).
    """
    total = _conv_params(in_channels, features[0], 3, True) + 2 * features[0]
    c_in = features[0]
    for c_out, n_blocks in zip(features, blocks):
        for _ in range(n_blocks):
            total += _conv_params(c_in, c_out, 3, True) + 2 * c_out
            total += _conv_params(c_out, c_out, 3, True) + 2 * c_out
            if c_in != c_out:
                total += _conv_params(c_in, c_out, 1, False) + 2 * c_out
            c_in = c_out
    return total


def test_presets_are_registered_with_the_agreed_shapes() -> None:
    assert set(BACKBONE_PRESETS.names()) >= {"resenc_l", "resenc_demo", "resenc_small"}
    demo, small = get_preset("resenc_demo"), get_preset("resenc_small")
    assert demo.features_per_stage == (8, 16, 32, 64) and demo.n_blocks_per_stage == (1, 1, 1, 1)
    assert small.features_per_stage == (16, 32, 64, 128) and small.n_blocks_per_stage == (1, 2, 2, 2)
    assert demo.cumulative_strides == [1, 2, 4, 8]
    with pytest.raises(UnknownNameError, match="resenc_l"):
        get_preset("resenc_xxl")


def test_resenc_l_encoder_matches_the_paper_without_a_forward_pass() -> None:
    encoder = build_resenc_encoder("resenc_l", in_channels=1)
    features = [32, 64, 128, 256, 320, 320]
    blocks = [1, 3, 4, 6, 6, 6]
    assert len(encoder.stages) == 6
    assert [len(stage.blocks) for stage in encoder.stages] == blocks
    assert [stage.output_channels for stage in encoder.stages] == features
    assert sum(p.numel() for p in encoder.parameters()) == _expected_encoder_params(1, features, blocks)
    conv = encoder.stem.convs[0].conv
    assert conv.kernel_size == (3, 3, 3) and conv.bias is not None
    norm = encoder.stem.convs[0].norm
    assert isinstance(norm, nn.InstanceNorm3d) and norm.affine and norm.eps == 1e-5
    assert isinstance(encoder.stem.convs[0].nonlin, nn.LeakyReLU) and encoder.stem.convs[0].nonlin.inplace
    assert [list(s) for s in encoder.strides] == [[1, 1, 1]] + [[2, 2, 2]] * 5


@pytest.mark.parametrize("preset", ["resenc_demo", "resenc_small"])
def test_small_presets_forward_shapes(preset: str) -> None:
    p = get_preset(preset)
    encoder = build_resenc_encoder(preset, in_channels=2)
    skips = encoder(torch.zeros(1, 2, 16, 16, 16))
    assert [tuple(s.shape[1:]) for s in skips] == [
        (f, 16 // s, 16 // s, 16 // s) for f, s in zip(p.features_per_stage, p.cumulative_strides)
    ]
    unet = build_resenc_unet(preset, in_channels=2, out_channels=3)
    assert unet(torch.zeros(1, 2, 16, 16, 16)).shape == (1, 3, 16, 16, 16)
    # The detector's encoder and the U-Net's encoder share their state-dict keys (transfer by name).
    assert set(encoder.state_dict()) == {k[len("encoder."):] for k in unet.state_dict() if k.startswith("encoder.")}


def test_architecture_plan_is_json_and_rebuilds_the_network() -> None:
    plan = json.loads(json.dumps(architecture_plan("resenc_l")))
    assert plan["arch_class_name"] == ARCH_CLASS_NAME
    kwargs = plan["arch_kwargs"]
    assert kwargs["features_per_stage"] == [32, 64, 128, 256, 320, 320]
    assert kwargs["n_blocks_per_stage"] == [1, 3, 4, 6, 6, 6]
    assert kwargs["norm_op_kwargs"] == {"eps": 1e-5, "affine": True}
    assert sorted(plan["arch_kwargs_requiring_import"]) == ["conv_op", "nonlin", "norm_op"]

    # Rebuild the way nnssl does: import the named classes, then call the named class (small preset).
    import importlib

    small = json.loads(json.dumps(architecture_plan("resenc_demo")))
    args = dict(small["arch_kwargs"])
    for key in small["arch_kwargs_requiring_import"]:
        module, _, name = args[key].rpartition(".")
        args[key] = getattr(importlib.import_module(module), name)
    module, _, name = small["arch_class_name"].rpartition(".")
    net = getattr(importlib.import_module(module), name)(input_channels=1, num_classes=1, **args)
    reference = build_resenc_unet("resenc_demo", 1, 1)
    assert {k: v.shape for k, v in net.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}
