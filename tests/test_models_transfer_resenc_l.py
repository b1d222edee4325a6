"""The paper's transfer at full size: a ResEnc-L pre-training network (nnssl's settings) saved in nnssl's schema
lands bit-identically in the stem and encoder of both detectors, while neck, transformer and heads keep their
initial values; broken checkpoints are refused before any training starts."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet

from pretrain_det3d.models.backbone import build_resenc_unet
from pretrain_det3d.models.checkpoint import CheckpointFormatError, load_pretrained_encoder, save_pretraining_checkpoint
from pretrain_det3d.models.registry import build_detector

ENCODER_PREFIXES = ("encoder.stem.", "encoder.stages.")
# ResEnc-L's anchors are planned from box sizes; a handful of plausible nodule sizes (voxels) is enough here
PLAN = {"box_sizes": [[4, 5, 5], [8, 9, 9], [16, 15, 17], [30, 28, 31]], "num_classes": 1, "modalities": ["CT"]}


@pytest.fixture(scope="module")
def resenc_l_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    network = build_resenc_unet("resenc_l", in_channels=1, out_channels=1)
    # nnssl's ResEnc-L: ResidualEncoderUNet, 6 stages, 32-64-128-256-320-320, blocks 1-3-4-6-6-6, conv bias,
    # InstanceNorm
    assert isinstance(network, ResidualEncoderUNet)
    encoder = network.encoder
    assert [len(stage.blocks) for stage in encoder.stages] == [1, 3, 4, 6, 6, 6]
    assert [stage.output_channels for stage in encoder.stages] == [32, 64, 128, 256, 320, 320]
    assert encoder.stem.convs[0].conv.bias is not None
    assert isinstance(encoder.stem.convs[0].norm, torch.nn.InstanceNorm3d)
    with torch.no_grad():  # stand-in for pre-training: every tensor differs from any fresh initialisation
        for parameter in network.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.01)
    path = tmp_path_factory.mktemp("resenc_l") / "checkpoint_final.pth"
    save_pretraining_checkpoint(path, network, "resenc_l", 1, [160, 160, 160], "mae")
    weights = {k: v.clone() for k, v in network.state_dict().items()}
    del network
    return path, weights


@pytest.mark.parametrize("detector", ["retina_unet", "deformable_detr"])
def test_encoder_lands_bit_identically_and_the_rest_is_untouched(resenc_l_checkpoint, detector):
    path, pretrained = resenc_l_checkpoint
    torch.manual_seed(1)
    model = build_detector(detector, {"preset": "resenc_l"}, 1, 1, PLAN)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = load_pretrained_encoder(model, path)
    after = model.state_dict()

    encoder_keys = [k for k in after if k.startswith(ENCODER_PREFIXES)]
    assert encoder_keys and len(report.loaded_keys) > 0
    for key in encoder_keys:
        assert torch.equal(after[key], pretrained[key]), key
        if after[key].is_floating_point() and after[key].numel() > 1:
            assert not torch.equal(before[key], after[key]), f"{key} was not replaced"
    for key in after:
        if not key.startswith(ENCODER_PREFIXES):
            assert torch.equal(after[key], before[key]), f"{key} changed although it is not stem/encoder"
    # nothing of the pre-training decoder leaks into a detector
    assert not any(k.startswith("decoder.") for k in report.loaded_keys)


class Payload:
    """An arbitrary class: torch.load(weights_only=True) must refuse to unpickle it."""


def test_pickle_that_weights_only_refuses_is_a_clear_error(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"network_weights": {}, "nnssl_adaptation_plan": {}, "payload": Payload()}, path, pickle_module=pickle)
    model = build_detector("retina_unet", {"preset": "resenc_demo", "fpn_channels": 8}, 1, 1, PLAN)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointFormatError, match=r"evil\.pth.*weights-only"):
        load_pretrained_encoder(model, path)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_no_training_starts_on_a_broken_checkpoint(tmp_path):
    """run_finetuning checks the initialisation before it writes anything of a run."""
    import numpy as np

    from pretrain_det3d.training.finetune import run_finetuning

    root = tmp_path / "pre"
    (root / "cases").mkdir(parents=True)
    (root / "plan.json").write_text(json.dumps({**PLAN, "class_names": ["lesion"]}))
    (root / "splits.json").write_text(json.dumps([{"train": ["c"], "val": ["c"]}, {"train": ["c"], "val": ["c"]}]))
    np.save(root / "cases" / "c.npy", np.zeros((1, 32, 32, 32), np.float32))
    np.save(root / "cases" / "c_seg.npy", np.zeros((32, 32, 32), np.int16))
    (root / "cases" / "c.json").write_text(json.dumps({"instances": {}, "boxes": [], "labels": [],
                                                       "foreground_locations": [], "shape": [32, 32, 32]}))
    broken = tmp_path / "broken.pth"
    torch.save({"state_dict": {}}, broken)
    out = tmp_path / "run"
    with pytest.raises(CheckpointFormatError, match="broken.pth"):
        run_finetuning(root, 0, "retina_unet", {"preset": "resenc_demo", "iterations": 2, "warmup_iterations": 0, "patch_size": [32, 32, 32]},
                       broken, out, seed=0)
    assert not out.exists() or not any(out.iterdir())
