"""Tests for models.checkpoint: nnssl-schema save, encoder transfer into a detector, input adaptation."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import pytest
import torch

from pretrain_det3d.models.backbone import build_resenc_unet
from pretrain_det3d.models.checkpoint import (
    KEYS_TO_IN_PROJ,
    CheckpointFormatError,
    adaptation_plan,
    load_pretrained_encoder,
    pretrain_patch_size,
    read_pretraining_checkpoint,
    save_pretraining_checkpoint,
)
from pretrain_det3d.models.registry import build_detector, load_detector, save_detector

PLAN = {"box_sizes": [[4, 4, 4], [6, 6, 6]]}
DETECTOR_SETTINGS = {"preset": "resenc_demo", "fpn_channels": 8, "head_convs": 1}


def _pretrained_unet(seed: int = 0, in_channels: int = 1) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = build_resenc_unet("resenc_demo", in_channels, 1)
    with torch.no_grad():  # make every tensor distinct from a fresh init, norms included
        for param in net.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    return net


def test_checkpoint_is_weights_only_loadable_in_nnssl_schema(tmp_path) -> None:
    net = _pretrained_unet()
    path = tmp_path / "checkpoint_final.pth"
    save_pretraining_checkpoint(path, net, "resenc_demo", 1, (32, 32, 32), "mae")
    record = torch.load(path, weights_only=True)
    assert set(record) == {"network_weights", "nnssl_adaptation_plan"}
    plan = record["nnssl_adaptation_plan"]
    assert plan["key_to_encoder"] == "encoder.stages" and plan["key_to_stem"] == "encoder.stem"
    assert plan["keys_to_in_proj"] == list(KEYS_TO_IN_PROJ)
    assert plan["pretrain_num_input_channels"] == 1
    assert plan["recommended_downstream_patchsize"] == [32, 32, 32]
    assert plan["architecture_plans"]["arch_kwargs"]["features_per_stage"] == [8, 16, 32, 64]
    # both in-projection names exist in the weights (dynamic_network_architectures stores convs twice)
    for key in KEYS_TO_IN_PROJ:
        assert f"{key}.weight" in record["network_weights"]
    assert not list(tmp_path.glob(".*tmp*"))  # atomic write leaves no temp file


def test_pretrain_save_then_detector_load_copies_encoder_only(tmp_path) -> None:
    net = _pretrained_unet()
    path = tmp_path / "ckpt.pth"
    save_pretraining_checkpoint(path, net, "resenc_demo", 1, [32, 32, 32], "mae")

    torch.manual_seed(1)
    detector = build_detector("retina_unet", DETECTOR_SETTINGS, 1, 1, PLAN)
    before = {k: v.clone() for k, v in detector.state_dict().items()}
    report = load_pretrained_encoder(detector, path)

    after = detector.state_dict()
    source = net.state_dict()
    encoder_keys = [k for k in after if k.startswith(("encoder.stem.", "encoder.stages."))]
    assert sorted(report.loaded_keys) == sorted(encoder_keys)
    for key in encoder_keys:
        assert torch.equal(after[key], source[key]), key
        if key.endswith("weight"):
            assert not torch.equal(after[key], before[key]), key
    for key in after:
        if key not in encoder_keys:
            assert torch.equal(after[key], before[key]), f"{key} (not encoder) changed"
    assert report.adapted_keys == []
    assert report.skipped_keys and all(k.startswith("decoder.") for k in report.skipped_keys)


def test_input_projection_is_adapted_for_more_channels(tmp_path) -> None:
    net = _pretrained_unet()
    path = tmp_path / "ckpt.pth"
    save_pretraining_checkpoint(path, net, "resenc_demo", 1, [32, 32, 32], "mae")
    detector = build_detector("retina_unet", DETECTOR_SETTINGS, 3, 1, PLAN)
    report = load_pretrained_encoder(detector, path)
    assert sorted(report.adapted_keys) == sorted(f"{k}.weight" for k in KEYS_TO_IN_PROJ)

    # On a channel-replicated input the adapted conv answers exactly like the pre-trained one.
    x = torch.randn(2, 1, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    original = net.encoder.stem.convs[0].conv
    adapted = detector.encoder.stem.convs[0].conv
    torch.testing.assert_close(adapted(x.repeat(1, 3, 1, 1, 1)), original(x), rtol=1e-5, atol=1e-5)
    # both state-dict names carry the same adapted tensor
    state = detector.state_dict()
    assert torch.equal(state[f"{KEYS_TO_IN_PROJ[0]}.weight"], state[f"{KEYS_TO_IN_PROJ[1]}.weight"])


def test_mismatching_encoder_is_refused_with_file_and_key(tmp_path) -> None:
    torch.manual_seed(0)
    small = build_resenc_unet("resenc_small", 1, 1)
    path = tmp_path / "small.pth"
    save_pretraining_checkpoint(path, small, "resenc_small", 1, [32, 32, 32], "mae")
    detector = build_detector("retina_unet", DETECTOR_SETTINGS, 1, 1, PLAN)
    with pytest.raises(CheckpointFormatError) as error:
        load_pretrained_encoder(detector, path)
    message = str(error.value)
    assert str(path) in message and "encoder." in message


def test_channel_count_that_cannot_be_adapted_is_refused(tmp_path) -> None:
    net = _pretrained_unet(in_channels=2)
    path = tmp_path / "two.pth"
    save_pretraining_checkpoint(path, net, "resenc_demo", 2, [32, 32, 32], "mae")
    detector = build_detector("retina_unet", DETECTOR_SETTINGS, 3, 1, PLAN)
    with pytest.raises(CheckpointFormatError, match="encoder.stem.convs.0"):
        load_pretrained_encoder(detector, path)


def test_file_without_the_schema_is_refused(tmp_path) -> None:
    path = tmp_path / "plain.pth"
    torch.save({"state_dict": {"a": torch.zeros(1)}}, path)
    detector = build_detector("retina_unet", DETECTOR_SETTINGS, 1, 1, PLAN)
    with pytest.raises(CheckpointFormatError, match="network_weights") as error:
        load_pretrained_encoder(detector, path)
    assert str(path) in str(error.value)


def test_wrapper_prefixes_are_stripped(tmp_path) -> None:
    # Checkpoints saved from DDP / torch.compile carry "module." / "_orig_mod." prefixes.
    net = _pretrained_unet()
    path = tmp_path / "ddp.pth"
    weights = {f"module._orig_mod.{k}": v for k, v in net.state_dict().items()}
    save_pretraining_checkpoint(tmp_path / "ref.pth", net, "resenc_demo", 1, [32, 32, 32], "mae")
    plan = torch.load(tmp_path / "ref.pth", weights_only=True)["nnssl_adaptation_plan"]
    torch.save({"network_weights": weights, "nnssl_adaptation_plan": plan}, path)
    detector = build_detector("retina_unet", DETECTOR_SETTINGS, 1, 1, PLAN)
    load_pretrained_encoder(detector, path)
    assert torch.equal(detector.encoder.stem.convs[0].conv.weight, net.encoder.stem.convs[0].conv.weight)


class _Payload:
    """An arbitrary class: a weights-only load must refuse to unpickle it."""


def test_unsafe_pickle_is_named_without_torchs_unsafe_advice(tmp_path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"network_weights": {}, "nnssl_adaptation_plan": {}, "payload": _Payload()}, path)
    with pytest.raises(CheckpointFormatError) as error:
        read_pretraining_checkpoint(path)
    message = str(error.value)
    assert message.startswith(f"{path}: not a safe nnssl checkpoint: it holds Python objects (")
    assert "_Payload) that a weights-only load refuses" in message
    assert "expected a torch.save'd dict {'network_weights'" in message
    assert "weights_only=False" not in message and "weights_only` set to `False" not in message
    assert "add_safe_globals" not in message


def test_truncated_checkpoint_is_named_as_truncated(tmp_path) -> None:
    path = tmp_path / "cut.pth"
    save_pretraining_checkpoint(path, _pretrained_unet(), "resenc_demo", 1, [32, 32, 32], "mae")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointFormatError) as error:
        read_pretraining_checkpoint(path)
    message = str(error.value)
    assert message.startswith(f"{path}: not a safe nnssl checkpoint: it is truncated or damaged (")
    assert "weights_only=False" not in message


def test_corrupt_detector_file_names_the_file_and_the_rerun(tmp_path) -> None:
    model = build_detector("retina_unet", {"preset": "resenc_demo", "fpn_channels": 8}, 1, 1, PLAN)
    path = tmp_path / "fold0" / "model_final.pth"
    save_detector(path, model, "retina_unet")
    assert isinstance(load_detector(path)[0], torch.nn.Module)
    path.write_bytes(path.read_bytes()[:4096])
    with pytest.raises(ValueError) as error:
        load_detector(path)
    message = str(error.value)
    assert message.startswith(f"{path}: not a readable model checkpoint: it is truncated or damaged (")
    assert f"rerun the finetune job that writes it (snakemake {path})" in message
    assert "weights_only" not in message and "internal miniz error" not in message


# ---------------------------------------------------------------- nnssl's AdaptationPlan.from_dict
# An independent re-statement of what nnssl's readers require (nnssl/adaptation_planning/adaptation_plan.py
# AdaptationPlan.from_dict; nnssl/experiment_planning/experiment_planners/plan.py Plan.from_dict,
# ConfigurationPlan): from_dict passes dicts to dataclasses, so a missing or an extra field is a TypeError.
@dataclasses.dataclass
class _NnsslConfigurationPlan:
    data_identifier: Any
    preprocessor_name: Any
    spacing_style: Any
    normalization_schemes: Any
    use_mask_for_norm: Any
    resampling_fn_data: Any
    resampling_fn_data_kwargs: Any
    resampling_fn_mask: Any
    resampling_fn_mask_kwargs: Any
    spacing: Any = None
    patch_size: Any = None


@dataclasses.dataclass
class _NnsslPlan:
    dataset_name: Any
    plans_name: Any
    original_median_spacing_after_transp: Any
    image_reader_writer: Any
    transpose_forward: Any
    transpose_backward: Any
    configurations: Any
    experiment_planner_used: Any


@dataclasses.dataclass
class _NnsslDynamicArchitecturePlans:
    n_stages: Any
    features_per_stage: Any
    conv_op: Any
    kernel_sizes: Any
    strides: Any
    n_blocks_per_stage: Any
    n_conv_per_stage_decoder: Any
    conv_bias: Any
    norm_op: Any
    norm_op_kwargs: Any
    dropout_op: Any
    dropout_op_kwargs: Any
    nonlin: Any
    nonlin_kwargs: Any


def _nnssl_from_dict(data: dict) -> dict:
    """What nnssl's AdaptationPlan.from_dict reads, in its order; raises where it would."""
    data = copy.deepcopy(data)  # nnssl's Plan.from_dict overwrites the dict's configurations
    arch = data["architecture_plans"]
    arch_kwargs = _NnsslDynamicArchitecturePlans(**arch["arch_kwargs"]) if arch["arch_kwargs"] else None
    plan = data["pretrain_plan"]
    plan["configurations"] = {name: _NnsslConfigurationPlan(**c) for name, c in plan["configurations"].items()}
    pretrain_plan = _NnsslPlan(**plan)
    return {"arch_class_name": arch["arch_class_name"], "arch_kwargs": arch_kwargs, "pretrain_plan": pretrain_plan,
            "pretrain_num_input_channels": data["pretrain_num_input_channels"],
            "recommended_downstream_patchsize": data["recommended_downstream_patchsize"],
            "key_to_encoder": data["key_to_encoder"], "key_to_stem": data["key_to_stem"],
            "keys_to_in_proj": tuple(data["keys_to_in_proj"]), "key_to_lpe": data.get("key_to_lpe")}


def test_written_plan_is_read_by_nnssls_from_dict(tmp_path) -> None:
    path = tmp_path / "checkpoint_final.pth"
    # the pre-training trainer's plan: a flat configuration and the run fingerprint (no Plan field)
    given = {"plans_name": "pretrain_det3d", "configurations": {"patch_size": [16, 16, 16]},
             "run_fingerprint": {"seed": 3}}
    save_pretraining_checkpoint(path, _pretrained_unet(), "resenc_demo", 1, [32, 32, 32], "mae", pretrain_plan=given)
    plan = torch.load(path, weights_only=True)["nnssl_adaptation_plan"]
    read = _nnssl_from_dict(plan)
    configurations = read["pretrain_plan"].configurations
    assert list(configurations) == ["median"]  # the configuration-name level nnssl indexes by
    assert configurations["median"].patch_size == [16, 16, 16]
    assert configurations["median"].spacing_style == "median"
    assert read["pretrain_plan"].plans_name == "pretrain_det3d"
    assert read["keys_to_in_proj"] == tuple(KEYS_TO_IN_PROJ) and read["key_to_stem"] == "encoder.stem"
    assert read["arch_kwargs"].features_per_stage == [8, 16, 32, 64]
    assert plan["run_fingerprint"] == {"seed": 3}  # kept beside the plan (nnssl ignores unknown top-level keys)
    assert pretrain_patch_size(plan) == [16, 16, 16]


def test_default_plan_is_read_by_nnssls_from_dict(tmp_path) -> None:
    path = tmp_path / "checkpoint_final.pth"
    save_pretraining_checkpoint(path, _pretrained_unet(), "resenc_demo", 1, [24, 32, 32], "mae")
    plan = torch.load(path, weights_only=True)["nnssl_adaptation_plan"]
    configurations = _nnssl_from_dict(plan)["pretrain_plan"].configurations
    assert {name: c.patch_size for name, c in configurations.items()} == {"median": [24, 32, 32]}


def test_the_restatement_refuses_the_layout_written_before() -> None:
    # guards the re-statement itself: the old flat layout must fail it as it fails nnssl
    old = adaptation_plan("resenc_demo", 1, [32, 32, 32], "mae")
    old["pretrain_plan"] = {"plans_name": "pretrain_det3d", "configurations": {"patch_size": [32, 32, 32]}}
    with pytest.raises(TypeError):
        _nnssl_from_dict(old)


def test_configuration_with_a_field_nnssl_lacks_is_refused() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        adaptation_plan("resenc_demo", 1, [32, 32, 32], "mae",
                        {"configurations": {"onemmiso": {"patch_size": [32, 32, 32], "batch_size": 2}}})


def test_files_written_before_are_still_read_and_loaded(tmp_path) -> None:
    net = _pretrained_unet()
    old_plan = adaptation_plan("resenc_demo", 1, [32, 32, 32], "mae")
    old_plan["pretrain_plan"] = {"plans_name": "pretrain_det3d", "configurations": {"patch_size": [32, 32, 32]},
                                 "run_fingerprint": {"seed": 0}}
    without = {k: v for k, v in old_plan.items() if k != "pretrain_plan"}  # and one with no pretrain_plan at all
    for name, plan in (("flat.pth", old_plan), ("none.pth", without)):
        path = tmp_path / name
        torch.save({"network_weights": net.state_dict(), "nnssl_adaptation_plan": plan}, path)
        _, read = read_pretraining_checkpoint(path)
        assert pretrain_patch_size(read) == [32, 32, 32], name
        detector = build_detector("retina_unet", DETECTOR_SETTINGS, 1, 1, PLAN)
        load_pretrained_encoder(detector, path)
        assert torch.equal(detector.encoder.stem.convs[0].conv.weight, net.encoder.stem.convs[0].conv.weight)
