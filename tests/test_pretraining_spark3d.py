"""SparK-3D pre-training: stage masks on the block grid, re-masking, mask tokens, the masked loss, training."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from corpus_fixtures import write_phantom_corpus
from pretrain_det3d.models.backbone import build_resenc_unet
from pretrain_det3d.pretraining import METHODS, run_pretraining
from pretrain_det3d.pretraining.masking import block_mask
from pretrain_det3d.pretraining.spark3d import SparkNetwork, cumulative_strides, downsample_mask, stage_masks
from pretrain_det3d.training.dataloader import load_case_records

PATCH = (32, 32, 32)
BLOCK = 8  # the demo preset's deepest stage has stride 8: every stage is aligned with the blocks
DEMO_STRIDES = [1, 2, 2, 2]


def _network(seed: int = 0) -> SparkNetwork:
    torch.manual_seed(seed)
    return SparkNetwork(build_resenc_unet("resenc_demo", 1, 1))


def _mask(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return block_mask(batch, PATCH, BLOCK, 0.75, torch.Generator().manual_seed(seed))


def test_stage_masks_follow_the_block_grid():
    mask = _mask(batch=3)
    flags = mask.reshape(3, 1, 4, BLOCK, 4, BLOCK, 4, BLOCK).amax(dim=(3, 5, 7))  # [B, 1, 4, 4, 4] block flags
    assert flags.flatten(1).sum(1).tolist() == [48] * 3  # 75 % of 64 blocks
    masks = stage_masks(mask, DEMO_STRIDES)
    assert cumulative_strides(DEMO_STRIDES) == [(1, 1, 1), (2, 2, 2), (4, 4, 4), (8, 8, 8)]
    for stage_mask, stride in zip(masks, (1, 2, 4, 8)):
        cells = BLOCK // stride  # stage voxels per block edge
        assert stage_mask.shape == (3, 1, 32 // stride, 32 // stride, 32 // stride)
        expected = flags
        for axis in (2, 3, 4):
            expected = expected.repeat_interleave(cells, dim=axis)
        assert torch.equal(stage_mask, expected)
        assert stage_mask[0].float().mean().item() == 0.75


def test_a_coarse_position_is_hidden_only_when_all_it_covers_is_hidden():
    # hand-worked: 2 x 2 x 2 blocks of 4 voxels seen by one position of stride 8
    blocks = torch.ones(2, 1, 2, 2, 2, dtype=torch.bool)
    blocks[0, 0, 1, 0, 1] = False  # sample 0: 7 of 8 blocks hidden; sample 1: all hidden
    mask = blocks.repeat_interleave(4, 2).repeat_interleave(4, 3).repeat_interleave(4, 4)
    assert downsample_mask(mask, (8, 8, 8)).ravel().tolist() == [False, True]
    # brute force on a random voxel mask
    random_mask = torch.rand(1, 1, 8, 8, 8, generator=torch.Generator().manual_seed(3)) < 0.9
    pooled = downsample_mask(random_mask, (2, 4, 2))
    for z, y, x in np.ndindex(*pooled.shape[2:]):
        cell = random_mask[0, 0, 2 * z : 2 * z + 2, 4 * y : 4 * y + 4, 2 * x : 2 * x + 2]
        assert bool(pooled[0, 0, z, y, x]) == bool(cell.all())
    with pytest.raises(ValueError, match="stride"):
        downsample_mask(random_mask, (3, 1, 1))


def test_hidden_features_are_exactly_zero_and_hidden_input_cannot_leak():
    net = _network()
    mask = _mask()
    images = torch.randn(2, 1, *PATCH, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        skips, masks = net.encode(images, mask)
        changed = images.clone()
        changed[mask] = 100.0  # any content in the hidden blocks
        skips_changed, _ = net.encode(changed, mask)
    for skip, stage_mask, again in zip(skips, masks, skips_changed):
        hidden = stage_mask.expand_as(skip)
        assert torch.count_nonzero(skip[hidden]) == 0
        assert torch.count_nonzero(skip[~hidden]) > 0.5 * int((~hidden).sum())  # visible features are live
        assert torch.equal(skip, again)  # the encoder output does not depend on hidden voxels at all


def test_without_remasking_hidden_positions_would_fill_up():
    # the control for the test above: a plain encoder on the zero-filled input spreads content into hidden
    # blocks, which is what the re-masking removes
    net = _network()
    mask = _mask()
    images = torch.randn(2, 1, *PATCH, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = net.encoder(images.masked_fill(mask, 0.0))
    deepest = stage_masks(mask, DEMO_STRIDES)[-1]
    assert torch.count_nonzero(plain[-1][deepest.expand_as(plain[-1])]) > 0


def test_densify_puts_the_stage_token_at_hidden_positions_only():
    net = _network()
    mask = _mask()
    with torch.no_grad():
        for token in net.mask_tokens:
            token.normal_()
        skips, masks = net.encode(torch.randn(2, 1, *PATCH), mask)
        dense = net.densify(skips, masks)
    for stage, (skip, stage_mask, filled) in enumerate(zip(skips, masks, dense)):
        token = net.mask_tokens[stage].reshape(-1)  # [C]
        assert net.mask_tokens[stage].shape == (1, skip.shape[1], 1, 1, 1)
        hidden = stage_mask[:, 0]  # [B, z, y, x]
        assert torch.equal(filled.permute(0, 2, 3, 4, 1)[hidden], token.expand(int(hidden.sum()), -1))
        assert torch.equal(filled.permute(0, 2, 3, 4, 1)[~hidden], skip.permute(0, 2, 3, 4, 1)[~hidden])


def test_every_mask_token_receives_gradients():
    net = _network()
    mask = block_mask(1, (16, 16, 16), BLOCK, 0.75, torch.Generator().manual_seed(0))  # 6 of 8 blocks hidden
    images = torch.randn(1, 1, 16, 16, 16)
    out = net(images, mask)
    ((out - images) ** 2)[mask.expand_as(out)].mean().backward()
    assert len(net.mask_tokens) == 4
    for token in net.mask_tokens:
        assert token.grad is not None and token.grad.abs().sum() > 0


def _trainer(tmp_path: Path, **overrides):
    write_phantom_corpus(tmp_path / "corpus", num_cases=1)
    records = load_case_records(tmp_path / "corpus", ["vol_000"], with_labels=False)
    settings = {"preset": "resenc_demo", "patch_size": list(PATCH), "mask_block": BLOCK, "iterations": 2,
                "batch_size": 2, "progress_bar": False, **overrides}
    torch.manual_seed(0)  # the network's initial weights, independent of the tests run before
    return METHODS.get("spark3d")(settings, records, in_channels=1, out_path=tmp_path / "out.pth", seed=0)


class _FixedOutput(torch.nn.Module):
    """Stands in for the network: returns a learnable tensor, records the mask it was given."""

    def __init__(self, shape) -> None:
        super().__init__()
        self.output = torch.nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(5)))
        self.mask: torch.Tensor | None = None

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self.mask = mask
        return self.output


def test_loss_counts_hidden_voxels_only(tmp_path):
    trainer = _trainer(tmp_path)
    images = torch.randn(2, 1, *PATCH)
    trainer.model = _FixedOutput(images.shape)
    loss = trainer.compute_losses({"images": images})["loss"]
    mask = trainer.make_mask(2)  # same iteration -> same mask
    assert torch.equal(trainer.model.mask, mask)
    expected = ((trainer.model.output - images)[mask] ** 2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    grad = trainer.model.output.grad
    assert torch.count_nonzero(grad[~mask]) == 0  # visible voxels do not enter the loss
    assert torch.count_nonzero(grad[mask]) == int(mask.sum())
    trainer.iteration = 1
    assert not torch.equal(trainer.make_mask(2), mask)  # a new mask every iteration


def test_bad_mask_block_or_patch_names_the_key(tmp_path):
    with pytest.raises(ValueError, match="mask_block"):
        _trainer(tmp_path / "a", mask_block=12)
    with pytest.raises(ValueError, match="patch_size"):
        _trainer(tmp_path / "b", patch_size=[36, 36, 36], mask_block=4)  # 36 is not a multiple of stride 8


def test_spark_loss_falls_and_checkpoint_is_a_plain_unet(tmp_path):
    from pretrain_det3d.models.checkpoint import load_pretrained_encoder

    corpus = tmp_path / "corpus"
    write_phantom_corpus(corpus)
    out = tmp_path / "pretrain" / "spark3d" / "checkpoint_final.pth"
    settings = {"preset": "resenc_demo", "patch_size": list(PATCH), "mask_block": BLOCK, "iterations": 24,
                "batch_size": 2, "checkpoint_every": 12, "threads": 1, "progress_bar": False,
                "optimizer": "adamw", "lr": 3e-3, "weight_decay": 0.0, "warmup_iterations": 2}
    run_pretraining(corpus, "spark3d", settings, out, seed=0)
    with open(out.parent / "log.csv", newline="") as handle:
        losses = [float(row["loss"]) for row in csv.DictReader(handle)]
    assert len(losses) == 24
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    record = torch.load(out, weights_only=True)
    assert record["nnssl_adaptation_plan"]["pretrain_method"] == "spark3d"
    weights = record["network_weights"]
    assert not any(key.startswith("mask_tokens") for key in weights)
    build_resenc_unet("resenc_demo", 1, 1).load_state_dict(weights, strict=True)  # exactly a U-Net's keys
    report = load_pretrained_encoder(build_resenc_unet("resenc_demo", 1, 1), out)
    assert len(report.loaded_keys) > 10


def test_paused_spark_resumes_exactly(tmp_path):
    write_phantom_corpus(tmp_path / "corpus", num_cases=1)
    records = load_case_records(tmp_path / "corpus", ["vol_000"], with_labels=False)
    settings = {"preset": "resenc_demo", "patch_size": [16, 16, 16], "mask_block": 8, "iterations": 4,
                "batch_size": 1, "progress_bar": False}

    def trainer(out: Path, init_seed: int):
        torch.manual_seed(init_seed)
        return METHODS.get("spark3d")(settings, records, in_channels=1, out_path=out, seed=0)

    trainer(tmp_path / "a" / "final.pth", 0).run()
    trainer(tmp_path / "b" / "final.pth", 0).run(stop_at=2)
    trainer(tmp_path / "b" / "final.pth", 7).run()  # other initial weights, replaced on resume
    a = torch.load(tmp_path / "a" / "final.pth", weights_only=True)["network_weights"]
    b = torch.load(tmp_path / "b" / "final.pth", weights_only=True)["network_weights"]
    assert all(torch.equal(a[key], b[key]) for key in a)
