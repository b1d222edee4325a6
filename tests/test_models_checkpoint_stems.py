"""Stem choice when loading a checkpoint with one stem per source dataset (the MultiTalent ResEnc release).

The fake release is written here with ``torch.save`` in the layout nnDetection's loader expects
(``docs/finetuning.md`` section 3.4, ``load_weights_utils.resolve_stem_override``): stem ``<id>`` at
``encoder.stem.<id>.convs...``, the encoder at ``encoder.stages``, the plan's ``key_to_stem`` the CT stem.
"""

from __future__ import annotations

import pytest
import torch

from pretrain_det3d.models.backbone import build_resenc_unet
from pretrain_det3d.models.checkpoint import (
    CheckpointFormatError,
    load_pretrained_encoder,
    save_pretraining_checkpoint,
)
from pretrain_det3d.models.registry import build_detector, transfer_pretrained

PLAN = {"box_sizes": [[4, 4, 4], [6, 6, 6]]}
DETECTOR_SETTINGS = {"preset": "resenc_demo", "fpn_channels": 8, "head_convs": 1}
STEM_IDS = ("351_0", "004", "010")  # the CT stem first, as in the release's plan


def _random_unet(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = build_resenc_unet("resenc_demo", 1, 1)
    with torch.no_grad():  # every tensor distinct from a fresh init, norms included
        for param in net.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    return net


def _stem_tensors(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The single stem's tensors by their names below ``encoder.stem.`` (``convs.0.conv.weight``, ...)."""
    return {key[len("encoder.stem."):]: value.clone() for key, value in net.state_dict().items()
            if key.startswith("encoder.stem.")}


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A MultiTalent-style file: three stems with distinct weights, shared stages, a decoder, the release's plan."""
    body = _random_unet(0)
    stems = {stem_id: _stem_tensors(_random_unet(10 + i)) for i, stem_id in enumerate(STEM_IDS)}
    weights = {key: value.clone() for key, value in body.state_dict().items()
               if not key.startswith(("encoder.stem.", "decoder.encoder.stem."))}
    for stem_id, tensors in stems.items():
        for name, tensor in tensors.items():
            weights[f"encoder.stem.{stem_id}.{name}"] = tensor
    plan = {
        "key_to_encoder": "encoder.stages",
        "key_to_stem": "encoder.stem.351_0",
        "keys_to_in_proj": ["encoder.stem.351_0.convs.0.conv", "encoder.stem.351_0.convs.0.all_modules.0"],
        "pretrain_num_input_channels": 1,
        "recommended_downstream_patchsize": [32, 32, 32],
    }
    path = tmp_path_factory.mktemp("release") / "checkpoint_final.pth"
    torch.save({"network_weights": weights, "nnssl_adaptation_plan": plan}, path)
    stages = {key[len("encoder.stages."):]: value for key, value in weights.items()
              if key.startswith("encoder.stages.")}
    return path, stems, stages


def _detector(in_channels: int = 1) -> torch.nn.Module:
    torch.manual_seed(1)
    return build_detector("retina_unet", DETECTOR_SETTINGS, in_channels, 1, PLAN)


@pytest.mark.parametrize("choice, expected", [
    (None, "351_0"),  # the plan's key_to_stem
    ("351_0", "351_0"),
    ("004", "004"),
    ("010", "010"),
    ("encoder.stem.004", "004"),  # a whole prefix, as nnDetection's stem_override takes it
])
def test_each_stem_choice_loads_that_stems_tensors(release, choice, expected) -> None:
    path, stems, stages = release
    detector = _detector()
    report = load_pretrained_encoder(detector, path, stem=choice)
    state = detector.state_dict()
    assert report.stem == f"encoder.stem.{expected}"
    for name, tensor in stems[expected].items():
        assert torch.equal(state[f"encoder.stem.{name}"], tensor), name
    others = [stem_id for stem_id in STEM_IDS if stem_id != expected]
    for stem_id in others:  # the fixture's stems differ, so equality above pins the chosen one
        assert not torch.equal(state["encoder.stem.convs.0.conv.weight"], stems[stem_id]["convs.0.conv.weight"])
    for name, tensor in stages.items():
        assert torch.equal(state[f"encoder.stages.{name}"], tensor), name
    assert all(key.startswith(tuple(f"encoder.stem.{s}." for s in others)) or key.startswith("decoder.")
               for key in report.skipped_keys)
    assert len([k for k in report.skipped_keys if k.startswith("encoder.stem.")]) == 2 * len(stems[expected])


def test_missing_stem_lists_the_stems_present(release) -> None:
    path, _, _ = release
    key = "pretraining.published.multitalent.stem_per_dataset.duke_breast"
    with pytest.raises(CheckpointFormatError) as caught:
        load_pretrained_encoder(_detector(), path, stem="999", stem_key=key)
    message = str(caught.value)
    assert message.startswith(f"{path}: ")
    assert "'999'" in message and key in message
    assert "004, 010, 351_0" in message  # every stem present, sorted
    assert "backbone preset" not in message  # not reported as an architecture mismatch


def test_plan_naming_the_stem_container_asks_for_a_choice(release, tmp_path) -> None:
    path, _, _ = release
    record = torch.load(path, weights_only=True)
    record["nnssl_adaptation_plan"]["key_to_stem"] = "encoder.stem"
    ambiguous = tmp_path / "ambiguous.pth"
    torch.save(record, ambiguous)
    with pytest.raises(CheckpointFormatError, match=r"3 stems \(004, 010, 351_0\).*config key stem"):
        load_pretrained_encoder(_detector(), ambiguous)


def test_single_stem_checkpoint_ignores_the_choice(tmp_path) -> None:
    net = _random_unet(3)
    path = tmp_path / "mae.pth"
    save_pretraining_checkpoint(path, net, "resenc_demo", 1, [32, 32, 32], "mae")
    detector = _detector()
    report = load_pretrained_encoder(detector, path, stem="004", stem_key="pretraining.published.mae.stem")
    assert report.stem == "encoder.stem"
    for name, tensor in _stem_tensors(net).items():
        assert torch.equal(detector.state_dict()[f"encoder.stem.{name}"], tensor), name


def test_chosen_stems_input_projection_is_adapted(release) -> None:
    # the in-projection names of a non-default stem are derived ({stem}.convs.0.conv / .all_modules.0)
    path, stems, _ = release
    detector = _detector(in_channels=3)
    report = load_pretrained_encoder(detector, path, stem="010")
    assert sorted(report.adapted_keys) == ["encoder.stem.convs.0.all_modules.0.weight",
                                           "encoder.stem.convs.0.conv.weight"]
    source = stems["010"]["convs.0.conv.weight"]
    expected = torch.cat([source, source, source], dim=1) / 3  # worked by hand: 3 copies, each a third
    torch.testing.assert_close(detector.encoder.stem.convs[0].conv.weight, expected)


def test_transfer_pretrained_passes_the_choice(release) -> None:
    path, stems, _ = release
    detector = _detector()
    report = transfer_pretrained(detector, path, stem="004", stem_key="pretraining.published.mt.stem")
    assert report.stem == "encoder.stem.004"
    assert torch.equal(detector.encoder.stem.convs[0].conv.weight, stems["004"]["convs.0.conv.weight"])


def test_multi_stem_writer_uses_the_release_layout(release, tmp_path) -> None:
    # a network whose encoder.stem is a ModuleDict of stems writes the layout the loader reads
    net = _random_unet(4)
    second = _random_unet(5).encoder.stem
    net.encoder.stem = torch.nn.ModuleDict({"351_0": net.encoder.stem, "004": second})
    path = tmp_path / "multitalent.pth"
    save_pretraining_checkpoint(path, net, "resenc_demo", 1, [32, 32, 32], "multitalent", stem="351_0")
    plan = torch.load(path, weights_only=True)["nnssl_adaptation_plan"]
    assert plan["key_to_stem"] == "encoder.stem.351_0"
    assert plan["keys_to_in_proj"] == ["encoder.stem.351_0.convs.0.conv", "encoder.stem.351_0.convs.0.all_modules.0"]
    detector = _detector()
    load_pretrained_encoder(detector, path, stem="004")
    assert torch.equal(detector.encoder.stem.convs[0].conv.weight, second.convs[0].conv.weight)
    with pytest.raises(ValueError, match="'777'"):
        save_pretraining_checkpoint(tmp_path / "bad.pth", net, "resenc_demo", 1, [32, 32, 32], "multitalent",
                                    stem="777")
