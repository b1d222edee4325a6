"""Tests for models.checkpoint: nnssl-schema save, encoder transfer into a detector, input adaptation."""

from __future__ import annotations

import pytest
import torch

from pretrain_det3d.models.backbone import build_resenc_unet
from pretrain_det3d.models.checkpoint import (
    KEYS_TO_IN_PROJ,
    CheckpointFormatError,
    load_pretrained_encoder,
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
