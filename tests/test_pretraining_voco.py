"""VoCo pre-training as nnssl releases it: crop geometry of both base grids, overlap labels, the released loss and
regulariser (hand-worked), the projector, per-crop augmentation, the crop stream, a falling loss and exact resume."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from corpus_fixtures import write_blob_corpus

from pretrain_det3d.pretraining import METHODS, run_pretraining
from pretrain_det3d.pretraining.voco import (
    VoCoBatchStream,
    VoCoProjector,
    augment_crops,
    base_crop_starts,
    build_crop_augmentation,
    crop_size_for,
    cut_crops,
    draw_target_starts,
    overlap_proportions,
    prediction_loss,
    prediction_loss_terms,
    regularisation_loss,
)
from pretrain_det3d.settings.pretraining import VoCoSettings
from pretrain_det3d.training.dataloader import PatchBatchStream, load_case_records

CROP = (16, 16, 16)
GRID = (2, 2, 2)


def _records(root: Path, num_cases: int = 1):
    write_blob_corpus(root, num_cases=num_cases)
    return load_case_records(root, [f"vol_{i:03d}" for i in range(num_cases)], with_labels=False)


# ------------------------------------------------------------------------------------------------ geometry


def test_defaults_are_nnssl_voco_trainer():
    s = VoCoSettings.parse({}, where="pretraining.methods.voco")
    # nnssl VoCoTrainer: region 256 x 256 x 64 (in-plane 256) cut 4 x 4 x 1, 4 target crops, batch 2, no clipping,
    # SGD lr 1e-2 Nesterov momentum 0.99, weight decay 3e-5, no warm-up; projector 2048 wide
    assert s.patch_size == (64, 256, 256) and s.base_grid == (1, 4, 4) and s.num_target_crops == 4
    assert s.batch_size == 2 and s.grad_clip is None
    assert (s.optimizer, s.lr, s.momentum, s.weight_decay, s.warmup_iterations) == ("sgd", 0.01, 0.99, 3e-5, 0)
    assert s.projection_hidden == s.projection_dim == 2048 and s.crop_augmentation is True
    assert s.augmentation is False  # nnssl augments the crops only, not the region
    assert crop_size_for(s.patch_size, s.base_grid) == (64, 64, 64)
    # the authors' checkpoint: region 192 x 192 x 64 with a 3 x 3 x 1 grid, also 64^3 crops
    assert crop_size_for((64, 192, 192), (1, 3, 3)) == (64, 64, 64)


def test_base_crops_tile_the_region_in_c_order():
    starts = base_crop_starts(GRID, CROP)
    assert starts.tolist() == [[z, y, x] for z in (0, 16) for y in (0, 16) for x in (0, 16)]
    # in-plane grid: one layer along z, 4 x 4 in (y, x), row-major
    starts = base_crop_starts((1, 4, 4), (64, 64, 64))
    assert starts.tolist() == [[0, y, x] for y in (0, 64, 128, 192) for x in (0, 64, 128, 192)]


IN_PLANE_GRID, IN_PLANE_CROP = (1, 4, 4), (4, 4, 4)  # region [4, 16, 16]; base index = 4 * row (y) + column (x)


@pytest.mark.parametrize(
    "grid, crop, target, expected",
    [
        # 3-D grid: shifted by half a crop along z: half of base (0,0,0) and half of base (1,0,0)
        (GRID, CROP, (8, 0, 0), {0: 0.5, 4: 0.5}),
        # exactly on base (0,0,1)
        (GRID, CROP, (0, 0, 16), {1: 1.0}),
        # the centre of the region: an eighth of every base crop
        (GRID, CROP, (8, 8, 8), {i: 0.125 for i in range(8)}),
        # a quarter crop along z, half along y: (12/16 or 4/16) * (8/16) of the four bases with gx = 0
        (GRID, CROP, (4, 8, 0), {0: 0.375, 2: 0.375, 4: 0.125, 6: 0.125}),
        # in-plane grid: y from 2: 2 voxels in row 0 and 2 in row 1; x from 6: 2 in column 1 and 2 in column 2
        # -> 4 x (1/2 * 1/2)
        (IN_PLANE_GRID, IN_PLANE_CROP, (0, 2, 6), {1: 0.25, 2: 0.25, 5: 0.25, 6: 0.25}),
        # exactly on row 1, column 3
        (IN_PLANE_GRID, IN_PLANE_CROP, (0, 4, 12), {7: 1.0}),
        # y from 1: 3/4 in row 0, 1/4 in row 1; x on column 0
        (IN_PLANE_GRID, IN_PLANE_CROP, (0, 1, 0), {0: 0.75, 4: 0.25}),
    ],
)
def test_overlap_proportions_hand_worked(grid, crop, target, expected):
    labels = overlap_proportions(torch.tensor([target]), base_crop_starts(grid, crop), crop)[0]
    wanted = torch.zeros(int(np.prod(grid)))
    for index, value in expected.items():
        wanted[index] = value
    assert torch.allclose(labels, wanted)


@pytest.mark.parametrize(
    "region, grid",
    [((8, 32, 32), (1, 4, 4)),  # in-plane, as nnssl's VoCoTrainer (scaled down)
     ((16, 16, 16), (2, 2, 2)),  # 3-D
     ((24, 16, 32), (2, 2, 4))],  # anisotropic crops
)
def test_crop_geometry_and_overlaps_by_voxel_counting(region, grid):
    crop = crop_size_for(region, grid)
    assert all(c * g == r for c, g, r in zip(crop, grid, region))
    bases = base_crop_starts(grid, crop)
    targets = draw_target_starts(2, 5, region, crop, torch.Generator().manual_seed(3))  # [2, 5, 3]
    labels = overlap_proportions(targets, bases, crop)
    assert labels.shape == (2, 5, int(np.prod(grid)))
    # brute force through the crops' content: every voxel of the region carries its own id; the overlap of two
    # crops is the number of ids they share over the crop volume
    ids = torch.arange(int(np.prod(region)), dtype=torch.float64).reshape(1, 1, *region).expand(2, 1, *region)
    base_crops = cut_crops(ids, bases.expand(2, -1, -1), crop).reshape(2, len(bases), -1).numpy()
    target_crops = cut_crops(ids, targets, crop).reshape(2, 5, -1).numpy()
    assert base_crops.shape[-1] == np.prod(crop) and target_crops.shape[-1] == np.prod(crop)
    # the base crops tile the region: every id exactly once
    assert np.array_equal(np.sort(base_crops[0].ravel()), np.arange(np.prod(region)))
    for sample in range(2):
        for t in range(5):
            counted = [np.intersect1d(target_crops[sample, t], base).size / np.prod(crop) for base in base_crops[sample]]
            assert labels[sample, t].numpy() == pytest.approx(np.asarray(counted), abs=1e-6)
    assert torch.allclose(labels.sum(-1), torch.ones(2, 5))


def test_target_starts_stay_inside_and_reach_both_ends():
    starts = draw_target_starts(50, 8, (32, 32, 32), CROP, torch.Generator().manual_seed(0))
    assert starts.min() == 0 and starts.max() == 16  # 32 - 16, inclusive
    again = draw_target_starts(50, 8, (32, 32, 32), CROP, torch.Generator().manual_seed(0))
    assert torch.equal(starts, again)
    # an axis the grid does not cut (in-plane grid: z) leaves no room: every target starts at z = 0
    flat = draw_target_starts(20, 4, (8, 32, 32), (8, 8, 8), torch.Generator().manual_seed(1))
    assert flat[..., 0].max() == 0 and flat[..., 1:].max() == 24


def test_crops_are_cut_where_the_starts_say():
    images = torch.arange(2 * 32 * 32 * 32, dtype=torch.float32).reshape(2, 1, 32, 32, 32)
    starts = torch.tensor([[[0, 8, 16]], [[16, 0, 3]]])
    crops = cut_crops(images, starts, CROP)
    assert crops.shape == (2, 1, 16, 16, 16)
    assert torch.equal(crops[0], images[0, :, 0:16, 8:24, 16:32])
    assert torch.equal(crops[1], images[1, :, 16:32, 0:16, 3:19])


# ------------------------------------------------------------------------------------------------ loss


# A 2 x 2 case: one region, two base crops b1, b2 and two target crops t1, t2 with 2-D embeddings.
#   b1 = (1, 0), b2 = (0.6, 0.8), t1 = (0.8, 0.6), t2 = (-1, 0)
#   cosines: t1.b1 = 0.8, t1.b2 = 0.48 + 0.48 = 0.96, t2.b1 = -1 -> relu 0, t2.b2 = -0.6 -> relu 0
#   overlaps: t1 lies on b2 (y = [0, 1]); t2 straddles both (y = [0.5, 0.5])
BASES = torch.tensor([[[1.0, 0.0], [0.6, 0.8]]])
TARGETS = torch.tensor([[[0.8, 0.6], [-1.0, 0.0]]])
OVERLAPS = torch.tensor([[[0.0, 1.0], [0.5, 0.5]]])
# positives (y > 0), weighted by y, over sum(y) = 0 + 1 + 0.5 + 0.5 = 2:
#   (t1, b2): y 1,   s 0.96, |y - s| 0.04 -> 1   * -log(0.96)
#   (t2, b1): y 0.5, s 0,    |y - s| 0.5  -> 0.5 * -log(0.5)
#   (t2, b2): y 0.5, s 0,    |y - s| 0.5  -> 0.5 * -log(0.5)
HAND_POSITIVE = (-math.log(0.96) - 0.5 * math.log(0.5) - 0.5 * math.log(0.5)) / 2.0  # 0.36698...
# pairs without overlap: only (t1, b1) with s = 0.8 -> mean of s^2 = 0.64
HAND_NEGATIVE = 0.64
# regulariser: one pair of base crops, relu(cos(b1, b2)) = 0.6
HAND_REGULARISER = 0.6


def _cosines(targets: torch.Tensor, bases: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(targets[:, :, None, :], bases[:, None, :, :], dim=-1)


def test_released_prediction_loss_hand_worked():
    similarity = _cosines(TARGETS, BASES)
    assert torch.allclose(similarity, torch.tensor([[[0.8, 0.96], [-1.0, -0.6]]]))
    pos, neg = prediction_loss_terms(similarity, OVERLAPS)
    assert pos.item() == pytest.approx(HAND_POSITIVE, abs=1e-5)  # the 1e-6 inside the log moves it by < 1e-5
    assert neg.item() == pytest.approx(HAND_NEGATIVE, abs=1e-6)
    assert prediction_loss(similarity, OVERLAPS).item() == pytest.approx(HAND_POSITIVE + HAND_NEGATIVE, abs=1e-5)
    # perfect similarities cost (almost) nothing; a maximally wrong positive is large but finite
    assert prediction_loss(OVERLAPS.clone(), OVERLAPS).item() == pytest.approx(0.0, abs=1e-5)
    # t1 says 0 where y = 1: |y - s| = 1, so 1 * -log(0 + 1e-6) over sum(y) = 2; t2 is exact (0); no negative costs
    wrong = prediction_loss(torch.tensor([[[0.0, 0.0], [0.5, 0.5]]]), OVERLAPS)
    assert torch.isfinite(wrong) and wrong.item() == pytest.approx(-math.log(1e-6) / 2, rel=1e-4)


def test_released_regulariser_hand_worked():
    assert regularisation_loss(BASES).item() == pytest.approx(HAND_REGULARISER, abs=1e-6)
    # relu(cos): anti-parallel and orthogonal base crops cost nothing, parallel ones 1
    assert regularisation_loss(torch.tensor([[[1.0, 0.0], [-1.0, 0.0]]])).item() == pytest.approx(0.0)
    assert regularisation_loss(torch.eye(4)[None]).item() == pytest.approx(0.0, abs=1e-6)
    assert regularisation_loss(torch.ones(1, 4, 3)).item() == pytest.approx(1.0, abs=1e-6)
    # three bases: pairs (1,2) 0.6, (1,3) relu(-1) = 0, (2,3) relu(-0.6) = 0 -> 0.6 / 3 = 0.2; a second region
    # whose three bases are parallel (three pairs of 1) -> the batch mean (0.2 + 1) / 2 = 0.6
    three = torch.tensor([[[1.0, 0.0], [0.6, 0.8], [-1.0, 0.0]]])
    assert regularisation_loss(three).item() == pytest.approx(0.2, abs=1e-6)
    assert regularisation_loss(torch.cat([three, torch.ones(1, 3, 2)])).item() == pytest.approx(0.6, abs=1e-6)


class _Table(torch.nn.Module):
    """A 'network' that ignores the crops and returns a learnable table of embeddings (one row per crop)."""

    def __init__(self, rows: torch.Tensor) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(rows.clone())
        self.seen: torch.Tensor | None = None

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        self.seen = crops
        return self.table * 1.0


def _trainer(tmp_path: Path, **settings):
    records = _records(tmp_path / "corpus")
    base = {"preset": "resenc_demo", "patch_size": [16, 16, 32], "base_grid": [1, 1, 2], "num_target_crops": 2,
            "iterations": 2, "batch_size": 1, "progress_bar": False, "threads": 1}
    return METHODS.get("voco")({**base, **settings}, records, in_channels=1, out_path=tmp_path / "o.pth", seed=0)


def test_compute_losses_hand_worked_and_gradient_paths(tmp_path):
    trainer = _trainer(tmp_path)
    # rows: all base crops (sample-major) first, then all target crops, as the stream stacks them
    trainer.model = _Table(torch.cat([BASES[0], TARGETS[0]]))
    batch = {"crops": torch.zeros(4, 1, 16, 16, 16), "overlaps": OVERLAPS.clone()}
    losses = trainer.compute_losses(batch)
    assert set(losses) == {"loss", "prediction", "regularisation"}
    assert losses["prediction"].item() == pytest.approx(HAND_POSITIVE + HAND_NEGATIVE, abs=1e-5)
    assert losses["regularisation"].item() == pytest.approx(HAND_REGULARISER, abs=1e-6)
    assert losses["loss"].item() == pytest.approx(HAND_POSITIVE + HAND_NEGATIVE + HAND_REGULARISER, abs=1e-5)
    # the prediction term moves only the targets (base embeddings are detached there) ...
    losses["prediction"].backward(retain_graph=True)
    grad = trainer.model.table.grad
    assert grad[:2].abs().max() == 0 and grad[2:].abs().max() > 0
    # ... the regulariser only the bases
    trainer.model.table.grad = None
    losses["regularisation"].backward()
    grad = trainer.model.table.grad
    assert grad[:2].abs().max() > 0 and grad[2:].abs().max() == 0


# ------------------------------------------------------------------------------------------------ projector


def test_projector_is_nnssls_three_layer_head_with_per_sample_norm():
    torch.manual_seed(0)
    head = VoCoProjector(120)  # defaults: 2048 wide, 2048 out
    linears = [m for m in head.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(120, 2048), (2048, 2048), (2048, 2048)]
    assert not any(p.requires_grad for n, p in head.named_parameters() if "norm" in n)  # no learnt scale
    pooled = torch.randn(5, 120)
    # independent reference: nnssl's layer order with torch's InstanceNorm1d(affine=False) applied to [K, width]
    # (torch treats a 2-D input as one unbatched [channels, length] sample: each row normalised over its features)
    norm = torch.nn.InstanceNorm1d(2048, affine=False, track_running_stats=False)
    first = linears[0](pooled)
    with pytest.warns(UserWarning):  # torch notes that 5 rows are not 2048 channels; that is nnssl's case too
        normed = norm(first)
    second = linears[1](torch.relu(normed))
    with pytest.warns(UserWarning):
        normed = norm(second)
    expected = linears[2](torch.relu(normed))
    assert torch.allclose(head(pooled), expected, atol=1e-5)
    # per sample: a crop's embedding does not depend on the rest of the batch (unlike BatchNorm)
    assert torch.allclose(head(pooled[:2]), head(pooled)[:2], atol=1e-6)


# ------------------------------------------------------------------------------------------------ augmentation


def test_crop_augmentation_is_nnssls_chain():
    chain = build_crop_augmentation()
    names = [type(t).__name__ for t in chain.transforms]
    # nnssl voco_transform.py, aug="train", in this order
    assert names == ["GaussianNoiseTransform", "GaussianBlurTransform", "BrightnessMultiplicativeTransform",
                     "ContrastAugmentationTransform", "SimulateLowResolutionTransform", "GammaTransform",
                     "GammaTransform", "MirrorTransform", "MirrorTransform", "MirrorTransform", "Rot90Transform"]
    assert [t.p_per_sample for t in chain.transforms] == [0.1, 0.2, 0.15, 0.15, 0.1, 0.1, 0.3, 1, 1, 1, 0.3]
    noise, blur, bright, contrast, lowres, gamma_inv, gamma = chain.transforms[:7]
    assert tuple(noise.noise_variance) == (0, 0.1)
    assert tuple(blur.blur_sigma) == (0.5, 1.0) and blur.p_per_channel == 0.5 and blur.different_sigma_per_channel
    assert tuple(bright.multiplier_range) == (0.75, 1.25)
    assert tuple(contrast.contrast_range) == (0.75, 1.25) and contrast.preserve_range
    assert tuple(lowres.zoom_range) == (0.5, 1) and lowres.per_channel and lowres.p_per_channel == 0.5
    assert (lowres.order_downsample, lowres.order_upsample) == (0, 3)
    assert gamma_inv.invert_image and not gamma.invert_image
    assert all(tuple(g.gamma_range) == (0.7, 1.5) and g.per_channel and g.retain_stats for g in (gamma_inv, gamma))
    assert [tuple(t.axes) for t in chain.transforms[7:10]] == [(0,), (1,), (2,)]
    # nnssl rotates in its in-plane (256 x 256) axes: here (y, x), spatial axes 1 and 2
    assert tuple(chain.transforms[10].axes) == (1, 2) and tuple(chain.transforms[10].num_rot) == (1, 2, 3)


def test_crop_augmentation_changes_crops_independently():
    crop = torch.from_numpy(np.random.default_rng(0).normal(size=(1, 8, 8, 8)).astype(np.float32))
    crops = crop.expand(32, -1, -1, -1, -1).clone()  # 32 copies of one crop
    seeds = list(range(100, 132))
    out = augment_crops(crops, seeds)
    assert out.shape == crops.shape and out.dtype == torch.float32
    assert torch.equal(crops, crop.expand(32, -1, -1, -1, -1))  # the input is left alone
    # every copy got its own draws: many different results, and most differ from the original
    distinct = {tuple(np.round(o.numpy().ravel(), 4)) for o in out}
    assert len(distinct) >= 16
    assert sum(not torch.allclose(o, crop) for o in out) >= 24
    # a crop's result is a function of the crop and its own seed only, not of its neighbours in the batch
    for k in (0, 7, 31):
        assert torch.equal(augment_crops(crops[k : k + 1], [seeds[k]]), out[k : k + 1])
    assert torch.equal(augment_crops(crops, seeds), out)
    # the global generators are left as they were
    state = np.random.get_state()[1].copy()
    augment_crops(crops[:2], [1, 2])
    assert np.array_equal(np.random.get_state()[1], state)


# ------------------------------------------------------------------------------------------------ stream


@pytest.mark.parametrize("region, grid", [((8, 32, 32), (1, 2, 2)), ((16, 16, 16), (2, 2, 2))])
def test_stream_yields_base_then_target_crops_with_their_overlaps(tmp_path, region, grid):
    records = _records(tmp_path, num_cases=2)
    plain = PatchBatchStream(records, region, 2, seed=4, foreground_fraction=0.0, with_labels=False)
    crop = crop_size_for(region, grid)
    stream = VoCoBatchStream.from_stream(plain, grid, num_targets=3, crop_augmentation=False)
    batch = stream.make_batch(5)
    regions = plain.make_batch(5)["images"]  # the same regions: a pure function of (seed, batch index)
    num_base = int(np.prod(grid))
    assert "images" not in batch and batch["crops"].shape == (2 * (num_base + 3), 1, *crop)
    starts = batch["target_starts"]
    assert starts.shape == (2, 3, 3)
    expected = torch.cat([cut_crops(regions, base_crop_starts(grid, crop).expand(2, -1, -1), crop),
                          cut_crops(regions, starts, crop)])
    assert torch.equal(batch["crops"], expected)
    assert torch.equal(batch["overlaps"], overlap_proportions(starts, base_crop_starts(grid, crop), crop))
    again = stream.make_batch(5)
    assert torch.equal(again["crops"], batch["crops"]) and torch.equal(again["target_starts"], starts)
    assert not torch.equal(stream.make_batch(6)["target_starts"], starts)
    # with augmentation: same positions and labels, crops changed one by one, reproducibly
    augmented = VoCoBatchStream.from_stream(plain, grid, num_targets=3, crop_augmentation=True)
    aug = augmented.make_batch(5)
    assert torch.equal(aug["target_starts"], starts) and torch.equal(aug["overlaps"], batch["overlaps"])
    changed = [not torch.equal(a, b) for a, b in zip(aug["crops"], batch["crops"])]
    assert sum(changed) >= len(changed) // 2
    assert torch.equal(augmented.make_batch(5)["crops"], aug["crops"])


def test_trainer_defaults_and_geometry_checks(tmp_path):
    records = _records(tmp_path / "corpus")
    trainer = METHODS.get("voco")({"preset": "resenc_demo"}, records, in_channels=1, out_path=tmp_path / "o.pth",
                                  seed=0)
    s = trainer.settings
    assert s.patch_size == (64, 256, 256) and s.batch_size == 2 and s.grad_clip is None
    assert trainer.crop_size == (64, 64, 64) and trainer.num_base == 16 and trainer.num_targets == 4
    group = trainer.optimizer.param_groups[0]
    assert isinstance(trainer.optimizer, torch.optim.SGD) and group["momentum"] == 0.99 and group["nesterov"]
    stream = trainer.make_stream(0)
    assert isinstance(stream, VoCoBatchStream) and stream.crop_augmentation and stream.base_grid == (1, 4, 4)
    with pytest.raises(ValueError, match="base_grid"):
        METHODS.get("voco")({"preset": "resenc_demo", "patch_size": [32, 32, 24], "base_grid": [2, 2, 5]},
                            records, in_channels=1, out_path=tmp_path / "o.pth", seed=0)
    # in-plane rot90 needs square (y, x) crops; without crop augmentation any crop shape is fine
    with pytest.raises(ValueError, match="crop_augmentation"):
        METHODS.get("voco")({"preset": "resenc_demo", "patch_size": [16, 32, 64], "base_grid": [1, 2, 2]},
                            records, in_channels=1, out_path=tmp_path / "o.pth", seed=0)
    METHODS.get("voco")({"preset": "resenc_demo", "patch_size": [16, 32, 64], "base_grid": [1, 2, 2],
                         "crop_augmentation": False}, records, in_channels=1, out_path=tmp_path / "o.pth", seed=0)


# ------------------------------------------------------------------------------------------------ training


def test_voco_regulariser_and_loss_fall_with_the_default_optimiser(tmp_path):
    from pretrain_det3d.models.backbone import build_resenc_encoder
    from pretrain_det3d.models.checkpoint import load_pretrained_encoder

    corpus = tmp_path / "corpus"
    write_blob_corpus(corpus)
    out = tmp_path / "pretrain" / "voco" / "checkpoint_final.pth"
    # a tiny case: regions [8, 32, 32] cut 1 x 2 x 2 (crops [8, 16, 16]), one region and two targets per step, 30
    # steps; optimiser (SGD, Nesterov momentum 0.99), lr, weight decay, projector and crop augmentation: defaults
    settings = {"preset": "resenc_demo", "patch_size": [8, 32, 32], "base_grid": [1, 2, 2], "num_target_crops": 2,
                "iterations": 30, "batch_size": 1, "threads": 1, "progress_bar": False}
    run_pretraining(corpus, "voco", settings, out, seed=0)
    with open(out.parent / "log.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 30
    regulariser = [float(row["regularisation"]) for row in rows]
    losses = [float(row["loss"]) for row in rows]
    # seeds 0-3: the regulariser's first five steps average 0.92-0.93 (a random encoder embeds all crops alike),
    # its last five 0.45-0.62 times that; the total's last five 0.52-0.57 times its first five (1.8-2.1)
    assert np.mean(regulariser[:5]) > 0.85
    assert np.mean(regulariser[-5:]) < 0.75 * np.mean(regulariser[:5])
    assert np.mean(losses[-5:]) < 0.75 * np.mean(losses[:5])
    record = torch.load(out, weights_only=True)
    plan = record["nnssl_adaptation_plan"]
    assert plan["pretrain_method"] == "voco" and plan["recommended_downstream_patchsize"] == [8, 16, 16]

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
    records = _records(tmp_path / "corpus", num_cases=2)
    settings = {"preset": "resenc_demo", "patch_size": [8, 32, 32], "base_grid": [1, 2, 2], "iterations": 4,
                "batch_size": 1, "num_target_crops": 2, "threads": 1, "progress_bar": False,
                "projection_hidden": 64, "projection_dim": 32}

    def trainer(out: Path, init_seed: int):
        torch.manual_seed(init_seed)
        return METHODS.get("voco")(settings, records, in_channels=1, out_path=out, seed=0)

    trainer(tmp_path / "a" / "final.pth", 0).run()
    trainer(tmp_path / "b" / "final.pth", 0).run(stop_at=2)
    trainer(tmp_path / "b" / "final.pth", 7).run()  # other initial weights, replaced on resume
    a = torch.load(tmp_path / "a" / "final.pth", weights_only=True)["network_weights"]
    b = torch.load(tmp_path / "b" / "final.pth", weights_only=True)["network_weights"]
    assert all(torch.equal(a[key], b[key]) for key in a)
