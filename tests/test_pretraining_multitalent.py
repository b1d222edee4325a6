"""MultiTalent pre-training: channels per (dataset, class), label masking, the masked loss, synthetic organ
datasets, and a loss that falls."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pretrain_det3d.pretraining import METHODS, run_pretraining
from pretrain_det3d.pretraining.multitalent import (
    DICE_SMOOTH,
    LabelledDataset,
    channel_lookup,
    channel_mask,
    channel_names,
    label_targets,
    masked_bce_dice,
    parse_datasets,
    write_synthetic_organ_dataset,
)

ORGAN_SETS = {"organs_a": ["liver", "lung"], "organs_b": ["lung", "spine"]}


def _fake_plan(root: Path, class_names: list[str], channels: int = 1) -> Path:
    root.mkdir(parents=True)
    (root / "plan.json").write_text(json.dumps({"class_names": class_names, "modalities": ["CT"] * channels,
                                                "case_ids": ["c0"]}))
    return root


def test_channels_per_dataset_and_class(tmp_path):
    a = _fake_plan(tmp_path / "a", ["liver", "lung", "kidney"])
    b = _fake_plan(tmp_path / "b", ["lung", "spine"])
    datasets = parse_datasets({"datasets": [
        {"name": "a", "root": str(a), "classes": ["lung", "liver"]},  # kidney is annotated but not learnt
        {"name": "b", "root": str(b)},  # default: every class of the plan
    ]})
    assert [d.channels for d in datasets] == [(0, 1), (2, 3)]
    # class index -> channel; "lung" of both datasets gets its own channel
    assert datasets[0].class_channels == (1, 0, -1) and datasets[1].class_channels == (2, 3)
    assert channel_names(datasets) == ["a/lung", "a/liver", "b/lung", "b/spine"]


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"name": "a", "root": "ROOT", "classes": ["heart"]}, r"datasets\[0\]\.classes"),
        ({"name": "a", "root": "MISSING"}, r"datasets\[0\]\.root"),
        ({"root": "ROOT"}, r"datasets\[0\]"),
    ],
)
def test_bad_dataset_entries_name_the_key(tmp_path, entry, message):
    root = _fake_plan(tmp_path / "a", ["liver"])
    entry = {k: (str(root) if v == "ROOT" else str(tmp_path / "nope") if v == "MISSING" else v)
             for k, v in entry.items()}
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        parse_datasets({"datasets": [entry]})
    with pytest.raises(ValueError, match="datasets"):
        parse_datasets({})


def _two_datasets() -> list[LabelledDataset]:
    # a annotates (liver, lung) -> channels 0, 1; b annotates (lung, spine) -> channels 2, 3
    return [LabelledDataset("a", Path("a"), ("liver", "lung"), (0, 1), (0, 1), (), 1),
            LabelledDataset("b", Path("b"), ("lung", "spine"), (2, 3), (2, 3), (), 1)]


def test_label_targets_and_mask_hand_worked():
    datasets = _two_datasets()
    # a case of b: instance 1 and 2 are the two lungs (class 0 of b), instance 3 the spine (class 1)
    lookup = channel_lookup({1: 0, 2: 0, 3: 1}, datasets[1].class_channels)
    assert lookup.tolist() == [-1, 2, 2, 3]
    instance_map = torch.tensor([0, 1, 2, 3, 0, 3]).reshape(1, 2, 3)
    targets = label_targets(instance_map, lookup, num_channels=4)
    assert targets.shape == (4, 1, 2, 3)
    assert targets.flatten(1).tolist() == [
        [0, 0, 0, 0, 0, 0],  # a/liver: b says nothing about it (and the mask below removes it)
        [0, 0, 0, 0, 0, 0],  # a/lung
        [0, 1, 1, 0, 0, 0],  # b/lung
        [0, 0, 0, 1, 0, 1],  # b/spine
    ]
    assert channel_mask([1, 0, 1], datasets).tolist() == [
        [False, False, True, True], [True, True, False, False], [False, False, True, True]]


def test_masked_loss_matches_brute_force_and_ignores_other_datasets():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 2, 3, 4, generator=generator, requires_grad=True)
    targets = (torch.rand(3, 4, 2, 3, 4, generator=generator) > 0.6).float()
    mask = channel_mask([1, 0, 1], _two_datasets())
    bce, dice = masked_bce_dice(logits, targets, mask)

    # brute force: BCE over the voxels of the supervised (sample, channel) pairs only
    pairs = [(b, k) for b in range(3) for k in range(4) if mask[b, k]]
    selected_logits = torch.stack([logits[b, k] for b, k in pairs])
    selected_targets = torch.stack([targets[b, k] for b, k in pairs])
    assert bce.item() == pytest.approx(F.binary_cross_entropy_with_logits(selected_logits, selected_targets).item(),
                                       rel=1e-6)
    # batch Dice per channel over the samples that annotate it, averaged over the four channels
    dices = []
    for k in range(4):
        samples = [b for b in range(3) if mask[b, k]]
        p, t = torch.sigmoid(logits[samples, k]), targets[samples, k]
        dices.append((2 * (p * t).sum() + DICE_SMOOTH) / (p.sum() + t.sum() + DICE_SMOOTH))
    assert dice.item() == pytest.approx(1 - torch.stack(dices).mean().item(), rel=1e-6)

    (bce + dice).backward()
    unsupervised = ~mask[:, :, None, None, None].expand_as(logits)
    assert torch.count_nonzero(logits.grad[unsupervised]) == 0  # other datasets' channels: zero gradient
    assert torch.count_nonzero(logits.grad[~unsupervised]) > 0
    changed = logits.detach().clone()
    changed[unsupervised] = 50.0  # whatever the network says there costs nothing
    again = masked_bce_dice(changed, targets, mask)
    assert again[0].item() == pytest.approx(bce.item()) and again[1].item() == pytest.approx(dice.item())


@pytest.fixture(scope="module")
def organ_datasets(tmp_path_factory) -> list[dict]:
    """Two preprocessed synthetic organ datasets annotating different (overlapping) organ sets."""
    from pretrain_det3d.data.preprocessing import run_preprocessing

    base = tmp_path_factory.mktemp("multitalent")
    entries = []
    for name, organs in ORGAN_SETS.items():
        settings = {"organs": organs, "num_cases": 3, "shape": [40, 40, 40], "spacing": [1.5, 1.5, 1.5],
                    "lesions_per_case": [0, 1]}
        write_synthetic_organ_dataset(base / "converted" / name, name, settings, seed=0)
        run_preprocessing(base / "converted" / name, base / "preprocessed" / name, 2, 0, {})
        entries.append({"name": name, "root": str(base / "preprocessed" / name), "classes": organs,
                        "converted": base / "converted" / name})
    return entries


def test_synthetic_organ_labels_follow_the_anatomy(organ_datasets):
    from pretrain_det3d.data.dataset_format import check_converted_dataset
    from pretrain_det3d.data.io import read_case

    lung_ids = set()
    for entry in organ_datasets:
        summary = check_converted_dataset(entry["converted"])
        assert list(summary.class_names) == ORGAN_SETS[entry["name"]]
        case = read_case(entry["converted"], summary.case_ids[0])
        for instance_id, class_index in case.instances.items():
            hu = np.median(case.image[0][case.instance_map == instance_id])
            organ = ORGAN_SETS[entry["name"]][class_index]
            # the phantom's compartments: lungs about -800 HU, liver about 60 HU, spine 350-500 HU
            assert {"lung": hu < -600, "liver": 0 < hu < 150, "spine": hu > 250}[organ], (organ, hu)
            if organ == "lung":
                lung_ids.add((entry["name"], instance_id))
    assert len(lung_ids) == 4  # two lungs, two instances of class "lung", in each dataset
    a, b = (read_case(e["converted"], f"{e['name']}_0000").image for e in organ_datasets)
    assert not np.array_equal(a, b)  # each dataset draws its own phantoms


def test_multitalent_loss_falls_and_encoder_transfers(organ_datasets, tmp_path):
    from pretrain_det3d.models.backbone import build_resenc_unet
    from pretrain_det3d.models.checkpoint import load_pretrained_encoder

    datasets = [{k: v for k, v in e.items() if k != "converted"} for e in organ_datasets]
    out = tmp_path / "pretrain" / "multitalent" / "checkpoint_final.pth"
    settings = {"preset": "resenc_demo", "patch_size": [24, 24, 24], "iterations": 30, "batch_size": 2,
                "threads": 1, "progress_bar": False, "optimizer": "adamw", "lr": 1e-2, "weight_decay": 0.0,
                "warmup_iterations": 2, "augmentation": False, "datasets": datasets}
    run_pretraining(None, "multitalent", settings, out, seed=0)  # no unlabelled corpus needed
    with open(out.parent / "log.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 30
    losses = [float(row["loss"]) for row in rows]
    bce = [float(row["bce"]) for row in rows]
    assert np.mean(losses[-5:]) < 0.93 * np.mean(losses[:5])
    assert np.mean(bce[-5:]) < 0.85 * np.mean(bce[:5])
    record = torch.load(out, weights_only=True)
    assert record["nnssl_adaptation_plan"]["pretrain_method"] == "multitalent"
    weights = record["network_weights"]
    head = [key for key in weights if key.startswith("decoder.seg_layers") and key.endswith("weight")]
    assert weights[head[-1]].shape[0] == 4  # a/liver, a/lung, b/lung, b/spine
    report = load_pretrained_encoder(build_resenc_unet("resenc_demo", 1, 1), out)
    assert len(report.loaded_keys) > 10


def test_records_carry_their_dataset(organ_datasets, tmp_path):
    datasets = [{k: v for k, v in e.items() if k != "converted"} for e in organ_datasets]
    settings = {"preset": "resenc_demo", "patch_size": [24, 24, 24], "iterations": 1, "batch_size": 4,
                "progress_bar": False, "augmentation": False, "datasets": datasets}
    trainer_class = METHODS.get("multitalent")
    records, in_channels = trainer_class.load_corpus(None, settings)
    assert in_channels == 1 and len(records) == 6
    assert sorted({r.case_id.split("/")[0] for r in records}) == ["organs_a", "organs_b"]
    trainer = trainer_class(settings, records, in_channels=1, out_path=tmp_path / "o.pth", seed=0)
    batch = trainer.make_stream(0).make_batch(0)
    targets, mask = trainer.batch_targets(batch)
    for sample, case in enumerate(batch["case_ids"]):
        own = [0, 1] if case.startswith("organs_a/") else [2, 3]
        assert torch.nonzero(mask[sample]).flatten().tolist() == own
        # every labelled voxel of the patch is a target on exactly one of its dataset's channels
        labelled = batch["instance_maps"][sample] > 0
        assert torch.equal(targets[sample, own].sum(0) > 0, labelled)
        assert targets[sample].sum(0).max() <= 1
