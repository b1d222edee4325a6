"""Tests for models.native_retina_unet: planned build, the release's checkpoint layout, transfer, overfit."""

from __future__ import annotations

import pytest
import torch

from overfit import fit_and_score, two_overfit_cases
from pretrain_det3d.models.checkpoint import CheckpointFormatError
from pretrain_det3d.models.native_planning import NativeArchitecture
from pretrain_det3d.models.native_retina_unet import (
    HEAD_DEFAULTS,
    NativeRetinaUNet,
    architecture_from_checkpoint,
)
from pretrain_det3d.models.registry import build_detector, load_detector, save_detector, transfer_pretrained
from pretrain_det3d.models.retina_unet import RetinaUNet

# CPU-sized widths; every loss and head setting stays the default recipe
SMALL = {"start_channels": 4, "max_channels": 16, "fpn_channels": 8, "patch_size": [32, 32, 32]}
PLAN = {"target_spacing": [1.0, 1.0, 1.0], "median_shape": [32, 32, 32], "box_sizes": [[8, 8, 8], [6, 6, 10]]}


def test_planned_build_forward_and_heads_shared_with_retina_unet() -> None:
    torch.manual_seed(0)
    model = build_detector("retina_unet_native", SMALL, 1, 2, PLAN)
    arch = model.architecture
    # 32^3 at 1 mm: 3 poolings, 4 levels, heads on levels 1-3 (strides 2, 4, 8), widths 4-8-16-16
    assert arch.strides == [[2, 2, 2]] * 3 and arch.decoder_levels == [1, 2, 3] and arch.channels == [4, 8, 16, 16]
    assert model.head_strides == [[2, 2, 2], [4, 4, 4], [8, 8, 8]]
    assert model.decoder_widths == [8, 8, 8, 8]  # fpn 8 halved below level 1, but at least fpn_min_channels 8
    # level 0: two conv-norm-act blocks, no conv bias; level 1 starts with a strided conv of the level's kernel
    level1 = model.encoder.levels[1].component
    assert level1[0].conv.stride == (2, 2, 2) and level1[0].conv.kernel_size == (3, 3, 3) and len(level1) == 2
    assert model.encoder.levels[0].component[0].conv.bias is None
    assert isinstance(model.encoder.levels[0].component[0].norm, torch.nn.InstanceNorm3d)
    # the heads, losses and inference are RetinaUNet's (one subclass, one head builder)
    assert isinstance(model, RetinaUNet) and type(model).compute_losses is RetinaUNet.compute_losses
    assert set(HEAD_DEFAULTS) >= {"focal_alpha", "cls_weight", "max_detections", "loss_norm_beta"}
    out = model(torch.zeros(2, 1, 32, 32, 32))
    assert out["cls"].shape == (2, (16**3 + 8**3 + 4**3) * 27, 2) and out["seg"].shape == (2, 2, 32, 32, 32)
    with pytest.raises(ValueError, match="divisible"):
        model(torch.zeros(1, 1, 32, 32, 28))


def test_anisotropic_plan_builds_planned_kernels_and_strides(tmp_path) -> None:
    plan = {"target_spacing": [3.0, 1.0, 1.0], "median_shape": [16, 32, 32], "box_sizes": [[2, 6, 6]]}
    torch.manual_seed(0)
    model = build_detector("retina_unet_native", {**SMALL, "patch_size": [16, 32, 32]}, 1, 1, plan)
    arch = model.architecture
    # step 0 pools y, x only (3 / 1 >= 2) with kernels [1, 3, 3]; then every axis is 2-3 mm apart
    assert arch.strides[0] == [1, 2, 2] and arch.conv_kernels[0] == [1, 3, 3]
    assert model.encoder.levels[1].component[0].conv.stride == (1, 2, 2)
    assert model.encoder.levels[0].component[0].conv.kernel_size == (1, 3, 3)
    assert model.decoder.out[0].kernel_size == (1, 3, 3)
    assert model.decoder.up[0].kernel_size == (1, 2, 2)
    assert len(model.predict(torch.zeros(1, 1, 16, 32, 32))) == 1
    # the model file rebuilds the same network without the plan
    save_detector(tmp_path / "m.pth", model, "retina_unet_native")
    loaded, _ = load_detector(tmp_path / "m.pth")
    assert loaded.architecture == model.architecture
    with pytest.raises(ValueError, match="patch_size"):
        build_detector("retina_unet_native", {**SMALL, "patch_size": [16, 32, 28]}, 1, 1, plan)
    with pytest.raises(ValueError, match="head_strides"):
        build_detector("retina_unet_native", {**SMALL, "head_strides": [4, 8]}, 1, 1, plan)


# ---------------------------------------------------------------------- the release's checkpoint layout

WIDTHS = [4, 8, 16, 16]  # start 4, max 16
FPN = [8, 16, 16, 16]  # UFPN widths: fpn 16 from the first head level (1), halved below it (at least 8)
STEMS = ("stem.351_0", "stem.004")


def _release_state(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A state dict written the way nnDetection names a MultiTalent native Retina U-Net (ConvBackbone with a
    separate stem per source dataset, UFPN decoder ``decoder.*``, MultiTalent segmentation layers), for the
    architecture of :data:`ARCH_KWARGS`. Key names from nndet/ptmodule/retinaunet/DetSegModel_TL.py,
    nndet/nn/backbone/blueprints/{conv,level}.py, nndet/nn/layers/conv/base.py and nndet/nn/neck/fpn.py."""

    def rand(*shape):
        return torch.randn(*shape, generator=generator)

    state = {}
    for stem in STEMS:  # nn.Sequential(conv, norm): the conv has no bias (a norm follows)
        state[f"{stem}.0.weight"] = rand(WIDTHS[0], 1, 3, 3, 3)
        state[f"{stem}.1.weight"] = rand(WIDTHS[0])
        state[f"{stem}.1.bias"] = rand(WIDTHS[0])
    for level, width in enumerate(WIDTHS):
        blocks = 1 if level == 0 else 2  # level 0's first block is the stem
        for block in range(blocks):
            previous = WIDTHS[level - 1] if level and block == 0 else width
            prefix = f"backbone.levels.{level}.component.{block}"
            state[f"{prefix}.conv.weight"] = rand(width, previous, 3, 3, 3)
            state[f"{prefix}.norm.weight"] = rand(width)
            state[f"{prefix}.norm.bias"] = rand(width)
    for level in range(4):
        state[f"decoder.lateral.P{level}.0.conv.weight"] = rand(FPN[level], WIDTHS[level], 1, 1, 1)
        state[f"decoder.lateral.P{level}.0.conv.bias"] = rand(FPN[level])
        state[f"decoder.out.P{level}.0.conv.weight"] = rand(FPN[level], FPN[level], 3, 3, 3)
        state[f"decoder.out.P{level}.0.conv.bias"] = rand(FPN[level])
        if level:
            state[f"decoder.up.P{level}.conv.weight"] = rand(FPN[level], FPN[level - 1], 2, 2, 2)
    state["seg_layers.351_0.weight"] = rand(3, FPN[0], 1, 1, 1)  # MultiTalent's own heads: never loaded
    return state


ARCH_KWARGS = {"features_per_stage": WIDTHS, "kernel_sizes": [3, 3, 3, 3], "strides": [2, 2, 2],
               "fpn_channels": 16, "decoder_levels": [1, 2, 3]}


def _write_release(path, state, **plan_overrides) -> None:
    plan = {"key_to_stem": "stem.351_0", "key_to_encoder": "backbone", "keys_to_in_proj": [],
            "pretrain_num_input_channels": 1,
            "architecture_plans": {"arch_class_name": "ConvBackbone", "arch_kwargs": ARCH_KWARGS},
            **plan_overrides}
    torch.save({"network_weights": state, "nnssl_adaptation_plan": plan}, path)


def _native_from(path, in_channels: int = 1, **settings) -> NativeRetinaUNet:
    torch.manual_seed(3)
    # the planner would give other widths (start 32): the checkpoint fixes the network instead
    return build_detector("retina_unet_native", {"patch_size": [32, 32, 32], **settings}, in_channels, 2,
                          {"target_spacing": [2.0, 1.0, 1.0], "median_shape": [64, 64, 64], "box_sizes": []},
                          init_checkpoint=path)


def _expected_model_keys(state: dict[str, torch.Tensor], stem: str) -> dict[str, torch.Tensor]:
    """The release's state written out by hand in the model's names (the stem first, level 0 shifted by one)."""
    expected = {
        "encoder.levels.0.component.0.conv.weight": state[f"{stem}.0.weight"],
        "encoder.levels.0.component.0.norm.weight": state[f"{stem}.1.weight"],
        "encoder.levels.0.component.0.norm.bias": state[f"{stem}.1.bias"],
    }
    for part in ("conv.weight", "norm.weight", "norm.bias"):
        expected[f"encoder.levels.0.component.1.{part}"] = state[f"backbone.levels.0.component.0.{part}"]
        for level in (1, 2, 3):
            for block in (0, 1):
                expected[f"encoder.levels.{level}.component.{block}.{part}"] = \
                    state[f"backbone.levels.{level}.component.{block}.{part}"]
    for level in range(4):
        for part in ("weight", "bias"):
            expected[f"decoder.lateral.{level}.{part}"] = state[f"decoder.lateral.P{level}.0.conv.{part}"]
            expected[f"decoder.out.{level}.{part}"] = state[f"decoder.out.P{level}.0.conv.{part}"]
        if level:
            expected[f"decoder.up.{level - 1}.weight"] = state[f"decoder.up.P{level}.conv.weight"]
    return expected


def test_release_checkpoint_lands_bit_identically_in_encoder_and_decoder_heads_untouched(tmp_path) -> None:
    state = _release_state(torch.Generator().manual_seed(7))
    path = tmp_path / "checkpoint_final.pth"
    _write_release(path, state)
    model = _native_from(path)
    assert model.architecture.channels == WIDTHS and model.architecture.decoder_levels == [1, 2, 3]
    before = {k: v.clone() for k, v in model.state_dict().items()}

    report = transfer_pretrained(model, path)
    after = model.state_dict()
    expected = _expected_model_keys(state, "stem.351_0")
    encoder_decoder = {k for k in after if k.startswith(("encoder.", "decoder."))}
    assert set(expected) == encoder_decoder  # every encoder and decoder tensor comes from the checkpoint
    for key, tensor in expected.items():
        assert torch.equal(after[key], tensor), key
    for key in after:
        if key not in expected:  # heads, segmentation head, EMA buffers
            assert torch.equal(after[key], before[key]), key
    assert sorted(report.loaded_keys) == sorted(expected)
    assert {"stem.004.0.weight", "seg_layers.351_0.weight"} <= set(report.skipped_keys)
    # the detector is usable right away
    assert len(model.predict(torch.zeros(1, 1, 32, 32, 32))) == 1


def test_stem_override_decoder_off_and_more_input_channels(tmp_path) -> None:
    state = _release_state(torch.Generator().manual_seed(8))
    path = tmp_path / "checkpoint_final.pth"
    _write_release(path, state)

    model = _native_from(path, stem="stem.004", transfer_decoder=False)
    decoder_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("decoder.")}
    transfer_pretrained(model, path)
    after = model.state_dict()
    assert torch.equal(after["encoder.levels.0.component.0.conv.weight"], state["stem.004.0.weight"])
    assert torch.equal(after["encoder.levels.0.component.0.norm.bias"], state["stem.004.1.bias"])
    assert all(torch.equal(after[k], v) for k, v in decoder_before.items())

    # three input channels: the one-channel stem conv repeated and divided by 3 (as the release's loader)
    model = _native_from(path, in_channels=3)
    report = transfer_pretrained(model, path)
    adapted = model.state_dict()["encoder.levels.0.component.0.conv.weight"]
    assert torch.allclose(adapted, state["stem.351_0.0.weight"].repeat(1, 3, 1, 1, 1) / 3)
    assert report.adapted_keys == ["encoder.levels.0.component.0.conv.weight"]


def test_incomplete_or_mismatched_checkpoints_fail_naming_the_key(tmp_path) -> None:
    state = _release_state(torch.Generator().manual_seed(9))
    path = tmp_path / "checkpoint_final.pth"

    _write_release(path, {k: v for k, v in state.items() if k != "decoder.up.P2.conv.weight"})
    with pytest.raises(CheckpointFormatError, match="decoder.up.1.weight"):
        transfer_pretrained(_native_from(path), path)

    bad = dict(state)
    bad["backbone.levels.2.component.1.conv.weight"] = torch.zeros(16, 16, 1, 3, 3)
    _write_release(path, bad)
    with pytest.raises(CheckpointFormatError, match="backbone.levels.2.component.1.conv.weight"):
        transfer_pretrained(_native_from(path), path)

    _write_release(path, state, key_to_stem="stem.999")
    with pytest.raises(CheckpointFormatError, match="stem.999"):
        transfer_pretrained(_native_from(path), path)

    # a checkpoint's architecture must satisfy ConvBackbone's width rule
    with pytest.raises(CheckpointFormatError, match="features_per_stage"):
        architecture_from_checkpoint({"architecture_plans": {"arch_kwargs": {**ARCH_KWARGS,
                                                                               "features_per_stage": [4, 6, 16, 16]}}})
    # the patch must fit the checkpoint's total stride (32 for the released network)
    _write_release(path, state, architecture_plans={"arch_kwargs": {}})
    assert architecture_from_checkpoint({}).divisor == [32, 32, 32]
    with pytest.raises(ValueError, match="divisible"):
        _native_from(path, patch_size=[48, 48, 48])


def test_resenc_style_strides_with_a_leading_one_are_accepted() -> None:
    arch = architecture_from_checkpoint({"architecture_plans": {"arch_kwargs": {
        **ARCH_KWARGS, "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [1, 2, 2]]}}})
    assert arch.strides == [[2, 2, 2], [2, 2, 2], [1, 2, 2]] and arch.divisor == [4, 8, 8]
    assert isinstance(arch, NativeArchitecture)


# ---------------------------------------------------------------------- overfit

def test_overfits_two_cases_to_high_ap_with_the_default_recipe() -> None:
    images, targets, seg = two_overfit_cases()
    sizes = [(b[3:] - b[:3]).tolist() for t in targets for b in t["boxes"]]
    torch.manual_seed(0)
    # CPU-sized widths only (planned from a 32^3, 1 mm dataset); heads and losses are the default recipe
    model = build_detector("retina_unet_native", {**SMALL, "start_channels": 8, "max_channels": 32,
                                                  "fpn_channels": 16}, 1, 2, {**PLAN, "box_sizes": sizes})
    first, last, metrics = fit_and_score(model, images, targets, seg, clip=12.0)
    assert last < 0.1 * first
    assert metrics["AP_IoU_0.10_MaxDet_100"] >= 0.9, metrics
