"""VoCo pre-training: overlap labels of target crops, crop cutting, the two loss terms, and a loss that falls."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from corpus_fixtures import write_blob_corpus
from pretrain_det3d.pretraining import METHODS, run_pretraining
from pretrain_det3d.pretraining.voco import (
    base_crop_starts,
    crop_size_for,
    cut_crops,
    draw_target_starts,
    overlap_proportions,
    prediction_loss,
    regularisation_loss,
)
from pretrain_det3d.training.dataloader import load_case_records

CROP = (16, 16, 16)
GRID = (2, 2, 2)


def test_base_crops_tile_the_region_in_c_order():
    starts = base_crop_starts(GRID, CROP)
    assert starts.tolist() == [[z, y, x] for z in (0, 16) for y in (0, 16) for x in (0, 16)]


@pytest.mark.parametrize(
    "target, expected",
    [
        # shifted by half a crop along z: half of base (0,0,0) and half of base (1,0,0)
        ((8, 0, 0), {0: 0.5, 4: 0.5}),
        # exactly on base (0,0,1)
        ((0, 0, 16), {1: 1.0}),
        # the centre of the region: an eighth of every base crop
        ((8, 8, 8), {i: 0.125 for i in range(8)}),
        # a quarter crop along z, half along y: (12/16 or 4/16) * (8/16) of the four bases with gx = 0
        ((4, 8, 0), {0: 0.375, 2: 0.375, 4: 0.125, 6: 0.125}),
    ],
)
def test_overlap_proportions_hand_worked(target, expected):
    labels = overlap_proportions(torch.tensor([target]), base_crop_starts(GRID, CROP), CROP)[0]
    wanted = torch.zeros(8)
    for index, value in expected.items():
        wanted[index] = value
    assert torch.allclose(labels, wanted)


def test_overlap_proportions_match_voxel_counting_and_sum_to_one():
    generator = torch.Generator().manual_seed(3)
    region, crop, grid = (24, 16, 32), (12, 8, 8), (2, 2, 4)
    assert crop_size_for(region, grid) == crop
    bases = base_crop_starts(grid, crop)
    targets = draw_target_starts(2, 5, region, crop, generator)  # [2, 5, 3]
    labels = overlap_proportions(targets, bases, crop)
    assert labels.shape == (2, 5, 16)

    def box_mask(start):  # brute force: the crop's voxels in the region
        mask = np.zeros(region, dtype=bool)
        mask[tuple(slice(int(s), int(s) + c) for s, c in zip(start, crop))] = True
        return mask

    for sample in range(2):
        for t, target in enumerate(targets[sample]):
            counted = [(box_mask(target) & box_mask(base)).sum() / np.prod(crop) for base in bases]
            assert labels[sample, t].numpy() == pytest.approx(np.asarray(counted), abs=1e-6)
    assert torch.allclose(labels.sum(-1), torch.ones(2, 5))


def test_target_starts_stay_inside_and_reach_both_ends():
    starts = draw_target_starts(50, 8, (32, 32, 32), CROP, torch.Generator().manual_seed(0))
    assert starts.min() == 0 and starts.max() == 16  # 32 - 16, inclusive
    again = draw_target_starts(50, 8, (32, 32, 32), CROP, torch.Generator().manual_seed(0))
    assert torch.equal(starts, again)


def test_crops_are_cut_where_the_starts_say():
    images = torch.arange(2 * 32 * 32 * 32, dtype=torch.float32).reshape(2, 1, 32, 32, 32)
    starts = torch.tensor([[[0, 8, 16]], [[16, 0, 3]]])
    crops = cut_crops(images, starts, CROP)
    assert crops.shape == (2, 1, 16, 16, 16)
    assert torch.equal(crops[0], images[0, :, 0:16, 8:24, 16:32])
    assert torch.equal(crops[1], images[1, :, 16:32, 0:16, 3:19])


def test_prediction_and_regularisation_terms():
    overlaps = torch.tensor([[[0.75, 0.25, 0.0]]])
    # perfect similarities give (almost) zero loss; a maximally wrong one is large but finite
    assert prediction_loss(overlaps.clone(), overlaps).item() == pytest.approx(0.0, abs=1e-5)
    wrong = prediction_loss(torch.tensor([[[0.75, 0.25, 1.0]]]), overlaps)
    assert torch.isfinite(wrong) and wrong.item() > 4.0
    # hand-worked: |0.5 - 0.75| = 0.25 on one entry -> -log(0.75) / 3; negative cosine counts as 0 (ReLU)
    value = prediction_loss(torch.tensor([[[0.5, 0.25, -0.4]]]), overlaps).item()
    assert value == pytest.approx(-np.log(0.75) / 3, abs=1e-5)
    assert regularisation_loss(torch.eye(4)[None]).item() == pytest.approx(0.0, abs=1e-6)
    assert regularisation_loss(torch.ones(1, 4, 3)).item() == pytest.approx(1.0, abs=1e-6)
    # anti-parallel base crops are as bad as parallel ones: |cos| = 1
    assert regularisation_loss(torch.tensor([[[1.0, 0.0], [-1.0, 0.0]]])).item() == pytest.approx(1.0)


class _CropRecorder(torch.nn.Module):
    """Embeds each crop by its mean (plus a learnable scale) and keeps the crops it saw."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.seen: torch.Tensor | None = None

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        self.seen = crops.detach().clone()
        return torch.stack([crops.mean(dim=(1, 2, 3, 4)), crops.std(dim=(1, 2, 3, 4))], dim=1) * self.scale


def test_compute_losses_feeds_base_then_target_crops(tmp_path):
    write_blob_corpus(tmp_path, num_cases=1)
    records = load_case_records(tmp_path, ["vol_000"], with_labels=False)
    settings = {"preset": "resenc_demo", "patch_size": [32, 32, 32], "base_grid": 2, "num_target_crops": 3,
                "iterations": 2, "batch_size": 2, "progress_bar": False}
    trainer = METHODS.get("voco")(settings, records, in_channels=1, out_path=tmp_path / "o.pth", seed=0)
    trainer.model = _CropRecorder()
    images = torch.randn(2, 1, 32, 32, 32)
    losses = trainer.compute_losses({"images": images})
    assert set(losses) == {"loss", "prediction", "regularisation"}
    targets = trainer.target_starts(2)  # same iteration -> same positions
    seen = trainer.model.seen
    assert seen.shape == (2 * 8 + 2 * 3, 1, 16, 16, 16)
    assert torch.equal(seen[8 + 6], images[1, :, 16:32, 16:32, 0:16])  # sample 1, base (1, 1, 0) = 4 + 2
    z, y, x = targets[1, 2].tolist()
    assert torch.equal(seen[16 + 3 + 2], images[1, :, z : z + 16, y : y + 16, x : x + 16])
    trainer.iteration = 1
    assert not torch.equal(trainer.target_starts(2), targets)


def test_base_grid_must_divide_the_patch(tmp_path):
    write_blob_corpus(tmp_path, num_cases=1)
    records = load_case_records(tmp_path, ["vol_000"], with_labels=False)
    with pytest.raises(ValueError, match="base_grid"):
        METHODS.get("voco")({"preset": "resenc_demo", "patch_size": [32, 32, 24], "base_grid": [2, 2, 5]},
                            records, in_channels=1, out_path=tmp_path / "o.pth", seed=0)


def test_voco_loss_falls_and_encoder_transfers(tmp_path):
    from pretrain_det3d.models.backbone import build_resenc_encoder
    from pretrain_det3d.models.checkpoint import load_pretrained_encoder

    corpus = tmp_path / "corpus"
    write_blob_corpus(corpus)
    out = tmp_path / "pretrain" / "voco" / "checkpoint_final.pth"
    settings = {"preset": "resenc_demo", "patch_size": [32, 32, 32], "base_grid": 2, "num_target_crops": 4,
                "iterations": 20, "batch_size": 2, "threads": 1, "progress_bar": False, "optimizer": "adamw",
                "lr": 1e-3, "weight_decay": 0.0, "warmup_iterations": 2}
    run_pretraining(corpus, "voco", settings, out, seed=0)
    with open(out.parent / "log.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 20
    losses = [float(row["loss"]) for row in rows]
    # seeds 0-3 end at 0.22-0.30 of the start; a randomly initialised encoder starts with collapsed embeddings
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])
    assert float(rows[-1]["regularisation"]) < float(rows[0]["regularisation"])
    record = torch.load(out, weights_only=True)
    plan = record["nnssl_adaptation_plan"]
    assert plan["pretrain_method"] == "voco" and plan["recommended_downstream_patchsize"] == [16, 16, 16]

    class Detector(torch.nn.Module):  # any model with the encoder at .encoder
        def __init__(self) -> None:
            super().__init__()
            self.encoder = build_resenc_encoder("resenc_demo", 1)

    detector = Detector()
    report = load_pretrained_encoder(detector, out)
    assert len(report.loaded_keys) > 10 and any(key.startswith("projector.") for key in report.skipped_keys)
    key = report.loaded_keys[0]
    assert torch.equal(detector.state_dict()[key], record["network_weights"][key])


def test_paused_voco_resumes_exactly(tmp_path):
    write_blob_corpus(tmp_path / "corpus", num_cases=2)
    records = load_case_records(tmp_path / "corpus", ["vol_000", "vol_001"], with_labels=False)
    settings = {"preset": "resenc_demo", "patch_size": [32, 32, 32], "iterations": 4, "batch_size": 1,
                "num_target_crops": 2, "threads": 1, "progress_bar": False}

    def trainer(out: Path, init_seed: int):
        torch.manual_seed(init_seed)
        return METHODS.get("voco")(settings, records, in_channels=1, out_path=out, seed=0)

    trainer(tmp_path / "a" / "final.pth", 0).run()
    trainer(tmp_path / "b" / "final.pth", 0).run(stop_at=2)
    trainer(tmp_path / "b" / "final.pth", 7).run()  # other initial weights, replaced on resume
    a = torch.load(tmp_path / "a" / "final.pth", weights_only=True)["network_weights"]
    b = torch.load(tmp_path / "b" / "final.pth", weights_only=True)["network_weights"]
    assert all(torch.equal(a[key], b[key]) for key in a)
