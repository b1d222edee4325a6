"""MAE pre-training: block masks, the masked loss, masking of the input, and a loss that falls."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from corpus_fixtures import write_blob_corpus
from pretrain_det3d.pretraining import METHODS, run_pretraining
from pretrain_det3d.pretraining.masking import block_mask, masked_mse, num_masked_blocks
from pretrain_det3d.training.dataloader import load_case_records
from pretrain_det3d.utils.registry import UnknownNameError


def _write_corpus_small(root: Path, num_cases: int = 4) -> None:
    write_blob_corpus(root, num_cases, shape=(24, 24, 24))


def test_block_mask_hand_worked_case():
    # patch 8 x 8 x 4 with blocks of 4: a 2 x 2 x 1 grid, 75 % of 4 blocks = 3 masked blocks
    mask = block_mask(5, (8, 8, 4), block_size=4, ratio=0.75, generator=torch.Generator().manual_seed(0))
    assert mask.shape == (5, 1, 8, 8, 4) and mask.dtype == torch.bool
    for sample in mask[:, 0]:
        blocks = sample.reshape(2, 4, 2, 4, 1, 4)  # [gz, bz, gy, by, gx, bx]
        flags = blocks.amax(dim=(1, 3, 5))
        # every block is uniformly masked or uniformly visible: the mask follows the block grid
        assert torch.equal(blocks.amin(dim=(1, 3, 5)), flags)
        assert int(flags.sum()) == 3
        assert sample.float().mean().item() == 0.75


def test_mask_ratio_is_exact_to_block_granularity():
    mask = block_mask(3, (12, 12, 12), block_size=4, ratio=0.5, generator=torch.Generator().manual_seed(1))
    # 27 blocks: round(13.5) = 14 masked blocks of 64 voxels each
    assert num_masked_blocks(27, 0.5) == 14
    assert mask.flatten(1).sum(1).tolist() == [14 * 64] * 3
    assert not torch.equal(mask[0], mask[1])  # each sample draws its own blocks


def test_same_generator_seed_same_mask():
    a = block_mask(2, (16, 16, 16), 8, 0.75, torch.Generator().manual_seed(4))
    b = block_mask(2, (16, 16, 16), 8, 0.75, torch.Generator().manual_seed(4))
    assert torch.equal(a, b)


def test_mask_block_must_divide_the_patch():
    with pytest.raises(ValueError, match="mask_block"):
        block_mask(1, (16, 16, 12), block_size=8)


def test_loss_counts_masked_voxels_only():
    generator = torch.Generator().manual_seed(0)
    target = torch.randn(2, 2, 8, 8, 8, generator=generator)
    prediction = torch.randn(2, 2, 8, 8, 8, generator=generator)
    mask = block_mask(2, (8, 8, 8), 4, 0.75, generator)
    loss = masked_mse(prediction, target, mask)
    # brute force: mean of squared errors over masked voxels of every channel
    full_mask = mask.expand_as(target)
    assert loss.item() == pytest.approx(((prediction - target)[full_mask] ** 2).mean().item(), rel=1e-6)
    changed = prediction.clone()
    changed[~full_mask] += 100.0  # only visible voxels change
    assert masked_mse(changed, target, mask).item() == pytest.approx(loss.item(), rel=1e-6)
    changed = prediction.clone()
    changed[full_mask] += 1.0
    assert masked_mse(changed, target, mask).item() != pytest.approx(loss.item(), rel=1e-3)


class _Recorder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.seen: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen = x.detach().clone()
        return x * self.scale


def test_masked_input_is_zero_and_loss_uses_the_mask(tmp_path):
    _write_corpus_small(tmp_path)
    records = load_case_records(tmp_path, ["vol_000"], with_labels=False)
    settings = {"preset": "resenc_demo", "patch_size": [16, 16, 16], "mask_block": 4, "iterations": 2,
                "batch_size": 2, "progress_bar": False}
    trainer = METHODS.get("mae")(settings, records, in_channels=1, out_path=tmp_path / "out.pth", seed=0)
    trainer.model = _Recorder()
    images = torch.randn(2, 1, 16, 16, 16) + 3.0
    losses = trainer.compute_losses({"images": images})
    mask = trainer.make_mask(2)  # same iteration -> same mask
    assert torch.equal(trainer.model.seen, torch.where(mask, torch.zeros(()), images))
    # the recorder returns its input: zeros where masked, so the loss is the mean square of hidden voxels
    assert losses["loss"].item() == pytest.approx((images[mask] ** 2).mean().item(), rel=1e-5)
    trainer.iteration = 1
    assert not torch.equal(trainer.make_mask(2), mask)  # a new mask every iteration


def test_mae_loss_falls_and_checkpoint_is_written(tmp_path):
    from pretrain_det3d.models.backbone import build_resenc_unet
    from pretrain_det3d.models.checkpoint import load_pretrained_encoder

    corpus = tmp_path / "corpus"
    _write_corpus_small(corpus)
    out = tmp_path / "pretrain" / "mae" / "checkpoint_final.pth"
    settings = {"preset": "resenc_demo", "patch_size": [16, 16, 16], "mask_block": 4, "iterations": 20,
                "batch_size": 2, "checkpoint_every": 10, "threads": 1, "progress_bar": False,
                "optimizer": "adamw", "lr": 3e-3, "weight_decay": 0.0, "warmup_iterations": 2}
    run_pretraining(corpus, "mae", settings, out, seed=0)
    with open(out.parent / "log.csv", newline="") as handle:
        losses = [float(row["loss"]) for row in csv.DictReader(handle)]
    assert len(losses) == 20
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    record = torch.load(out, weights_only=True)
    plan = record["nnssl_adaptation_plan"]
    assert plan["recommended_downstream_patchsize"] == [16, 16, 16] and plan["pretrain_method"] == "mae"
    report = load_pretrained_encoder(build_resenc_unet("resenc_demo", 1, 1), out)
    assert len(report.loaded_keys) > 10
    assert not (out.parent / "checkpoint_latest.pth").exists()


def test_paused_pretraining_resumes_exactly(tmp_path):
    _write_corpus_small(tmp_path / "corpus", num_cases=2)
    records = load_case_records(tmp_path / "corpus", ["vol_000", "vol_001"], with_labels=False)
    settings = {"preset": "resenc_demo", "patch_size": [16, 16, 16], "mask_block": 8, "iterations": 4,
                "batch_size": 1, "progress_bar": False, "augmentation": True}

    def trainer(out: Path, init_seed: int):
        torch.manual_seed(init_seed)
        return METHODS.get("mae")(settings, records, in_channels=1, out_path=out, seed=0)

    trainer(tmp_path / "a" / "final.pth", 0).run()
    paused = trainer(tmp_path / "b" / "final.pth", 0)
    paused.run(stop_at=2)
    trainer(tmp_path / "b" / "final.pth", 7).run()  # other initial weights, replaced on resume
    a = torch.load(tmp_path / "a" / "final.pth", weights_only=True)["network_weights"]
    b = torch.load(tmp_path / "b" / "final.pth", weights_only=True)["network_weights"]
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_unknown_method_lists_registered_ones(tmp_path):
    with pytest.raises(UnknownNameError, match="mae"):
        run_pretraining(tmp_path, "byol", {}, tmp_path / "x.pth", seed=0)
