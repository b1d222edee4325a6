"""Models Genesis pre-training: each corruption's invariants, the rates, the batch stream, and training."""

from __future__ import annotations

import csv
from math import comb
from pathlib import Path

import numpy as np
import pytest
import torch

from corpus_fixtures import write_phantom_corpus
from pretrain_det3d.models.backbone import build_resenc_unet
from pretrain_det3d.pretraining import METHODS
from pretrain_det3d.pretraining.genesis_transforms import (
    GenesisParams,
    apply_intensity_curve,
    bezier_points,
    flip,
    from_unit_range,
    genesis_pair,
    in_paint,
    local_pixel_shuffle,
    out_paint,
    random_flip_axes,
    random_intensity_curve,
    to_unit_range,
)
from pretrain_det3d.pretraining.models_genesis import INPUT_KEY, corrupt_batch
from pretrain_det3d.training.dataloader import load_case_records

PATCH = (32, 32, 32)
NO_CORRUPTION = dict(flip_rate=0.0, local_shuffle_rate=0.0, nonlinear_rate=0.0, paint_rate=0.0)


def _inside(boxes, shape) -> np.ndarray:
    """Boolean map of the voxels covered by any box."""
    covered = np.zeros(shape, dtype=bool)
    for start, stop in boxes:
        covered[tuple(slice(a, b) for a, b in zip(start, stop))] = True
    return covered


def _binomial_ok(count: int, n: int, p: float, sigmas: float = 4.0) -> bool:
    return abs(count - n * p) <= sigmas * np.sqrt(n * p * (1 - p)) + 1


# ------------------------------------------------------------------------------------------------ Bezier curve
def test_bezier_points_against_de_casteljau():
    rng = np.random.default_rng(0)
    control = np.concatenate([[[0.0, 0.0]], rng.random((2, 2)), [[1.0, 1.0]]])
    t = np.array([0.0, 0.2, 0.5, 0.9, 1.0])

    def de_casteljau(points: np.ndarray, s: float) -> np.ndarray:  # repeated linear interpolation
        while len(points) > 1:
            points = (1 - s) * points[:-1] + s * points[1:]
        return points[0]

    expected = np.stack([de_casteljau(control, s) for s in t])
    np.testing.assert_allclose(bezier_points(control, t), expected, atol=1e-12)
    # hand-worked: control points evenly on the diagonal give the straight line x = y = t
    line = np.array([[0.0, 0.0], [1 / 3, 1 / 3], [2 / 3, 2 / 3], [1.0, 1.0]])
    np.testing.assert_allclose(bezier_points(line, t), np.stack([t, t], axis=1), atol=1e-12)
    assert comb(3, 1) == 3  # the Bernstein weights at t = 1/2 are (1, 3, 3, 1) / 8
    np.testing.assert_allclose(bezier_points(control, np.array([0.5]))[0],
                               (control[0] + 3 * control[1] + 3 * control[2] + control[3]) / 8)


def test_intensity_curve_is_monotone_maps_unit_interval_and_fixes_endpoints():
    ramp = np.linspace(0.0, 1.0, 501)
    inverted_count = 0
    for seed in range(60):
        xs, ys, inverted = random_intensity_curve(np.random.default_rng(seed), num_samples=2000)
        inverted_count += inverted
        assert np.all(np.diff(xs) >= 0) and xs[0] == 0.0 and xs[-1] == 1.0
        assert ys.min() >= 0.0 and ys.max() <= 1.0
        mapped = apply_intensity_curve(ramp, xs, ys)
        assert mapped.min() >= 0.0 and mapped.max() <= 1.0
        if inverted:  # decreasing, 0 -> 1 and 1 -> 0
            assert np.all(np.diff(mapped) <= 1e-12) and mapped[0] == 1.0 and mapped[-1] == 0.0
        else:  # increasing, endpoints fixed
            assert np.all(np.diff(mapped) >= -1e-12) and mapped[0] == 0.0 and mapped[-1] == 1.0
        assert np.abs(mapped - (1 - ramp if inverted else ramp)).max() > 1e-3  # a real change, not the identity
    assert _binomial_ok(inverted_count, 60, 0.5)
    _, _, never = random_intensity_curve(np.random.default_rng(0), invert_rate=0.0, num_samples=10)
    assert never is False


# ------------------------------------------------------------------------------------------------ local shuffling
def test_one_shuffled_block_keeps_its_values_and_touches_nothing_else():
    image = np.random.default_rng(0).normal(size=(1, *PATCH))
    out, boxes = local_pixel_shuffle(image, np.random.default_rng(1), num_blocks=1, max_fraction=0.25)
    (start, stop), = boxes
    window = (slice(None),) + tuple(slice(a, b) for a, b in zip(start, stop))
    assert np.array_equal(np.sort(out[window], axis=None), np.sort(image[window], axis=None))
    outside = ~_inside(boxes, PATCH)[None]
    assert np.array_equal(out[outside], image[outside])
    assert all(1 <= b - a <= 8 for a, b in zip(start, stop))  # at most a quarter of 32


def test_many_shuffled_blocks_keep_the_multiset_of_their_union():
    base = np.random.default_rng(0).normal(size=PATCH)
    image = np.stack([base, 10 * base + 1])  # channel 1 is a function of channel 0
    out, boxes = local_pixel_shuffle(image, np.random.default_rng(2), num_blocks=300)
    assert len(boxes) == 300
    assert all(1 <= b - a <= 3 for box in boxes for a, b in zip(*box))  # a tenth of 32 -> at most 3
    covered = _inside(boxes, PATCH)
    assert np.array_equal(out[:, ~covered], image[:, ~covered])  # outside every block: untouched
    assert np.array_equal(np.sort(out[0][covered]), np.sort(image[0][covered]))
    assert not np.array_equal(out, image)
    np.testing.assert_allclose(out[1], 10 * out[0] + 1)  # a voxel's channels move together
    again, _ = local_pixel_shuffle(image, np.random.default_rng(2), num_blocks=300)
    assert np.array_equal(out, again)  # seeded


# ------------------------------------------------------------------------------------------------ painting
def test_in_painting_changes_only_the_painted_boxes():
    image = np.full((1, *PATCH), 2.0)  # outside [0, 1]: any noise voxel differs from it
    for seed in range(5):
        out, boxes = in_paint(image, np.random.default_rng(seed))
        assert 1 <= len(boxes) <= 5
        covered = _inside(boxes, PATCH)[None]
        assert np.array_equal(out[~covered], image[~covered])
        assert np.all((out[covered] >= 0.0) & (out[covered] < 1.0))
        for start, stop in boxes:
            assert all(32 // 6 <= b - a <= 32 // 3 for a, b in zip(start, stop))
            assert all(a >= 3 and b <= 32 - 3 for a, b in zip(start, stop))  # the margin of the original


def test_out_painting_keeps_only_the_kept_boxes():
    image = np.full((1, *PATCH), 2.0)
    for seed in range(5):
        out, boxes = out_paint(image, np.random.default_rng(seed))
        assert 1 <= len(boxes) <= 5
        kept = _inside(boxes, PATCH)[None]
        assert np.array_equal(out[kept], image[kept])
        assert np.all((out[~kept] >= 0.0) & (out[~kept] < 1.0))  # everything else is noise
        for start, stop in boxes:
            assert all(32 - 4 * 32 // 7 <= b - a <= 32 - 3 * 32 // 7 for a, b in zip(start, stop))


# ------------------------------------------------------------------------------------------------ flips, range
def test_flip_is_an_involution_and_mirrors_the_named_axis():
    image = np.random.default_rng(0).normal(size=(2, 4, 5, 6))
    for seed in range(10):
        axes = random_flip_axes(np.random.default_rng(seed), rate=0.7)
        assert np.array_equal(flip(flip(image, axes), axes), image)
    assert np.array_equal(flip(image, [1]), image[:, :, ::-1])
    assert np.array_equal(flip(image, [2, 2]), image)
    assert random_flip_axes(np.random.default_rng(0), rate=1.0) != [] and len(random_flip_axes(
        np.random.default_rng(0), rate=1.0)) == 3
    none = sum(random_flip_axes(np.random.default_rng(s)) == [] for s in range(300))
    assert _binomial_ok(none, 300, 0.6)  # no flip with probability 1 - 0.4
    with pytest.raises(ValueError, match="axis"):
        flip(image, [3])


def test_unit_range_round_trip_per_channel():
    image = np.stack([np.linspace(-3, 5, 27).reshape(3, 3, 3), np.full((3, 3, 3), 7.0)])
    unit, low, scale = to_unit_range(image)
    assert unit[0].min() == 0.0 and unit[0].max() == 1.0 and np.all(unit[1] == 0.0)  # constant: scale 1
    np.testing.assert_allclose(from_unit_range(unit, low, scale), image)


# ------------------------------------------------------------------------------------------------ the pair
def test_pair_without_corruption_is_the_identity_and_target_is_the_flipped_original():
    image = np.random.default_rng(0).normal(size=(1, 16, 16, 16)).astype(np.float32)
    same = genesis_pair(image, np.random.default_rng(0), GenesisParams(**NO_CORRUPTION))
    np.testing.assert_allclose(same.corrupted, image, atol=1e-5)
    assert np.array_equal(same.target, image)
    flipped = genesis_pair(image, np.random.default_rng(0), GenesisParams(**{**NO_CORRUPTION, "flip_rate": 1.0}))
    assert len(flipped.applied["flip_axes"]) == 3
    assert np.array_equal(flipped.target, flip(image, flipped.applied["flip_axes"]))
    np.testing.assert_allclose(flipped.corrupted, flipped.target, atol=1e-5)


def test_pair_with_the_curve_only_keeps_the_voxel_order():
    image = np.random.default_rng(0).normal(size=(1, 16, 16, 16)).astype(np.float32)
    params = GenesisParams(**{**NO_CORRUPTION, "nonlinear_rate": 1.0, "invert_rate": 0.0})
    out = genesis_pair(image, np.random.default_rng(4), params).corrupted
    order = np.argsort(image, axis=None)
    assert np.all(np.diff(out.ravel()[order]) >= -1e-5)  # an increasing map of the intensities
    assert out.min() >= image.min() - 1e-5 and out.max() <= image.max() + 1e-5  # back in the patch's range
    assert not np.allclose(out, image, atol=1e-3)


def test_corruptions_are_drawn_at_the_models_genesis_rates():
    image = np.random.default_rng(0).normal(size=(1, 16, 16, 16)).astype(np.float32)
    params = GenesisParams(local_shuffle_blocks=2, bezier_samples=200)
    n = 400
    applied = [genesis_pair(image, np.random.default_rng(s), params).applied for s in range(n)]
    assert _binomial_ok(sum(a["local_shuffle"] for a in applied), n, 0.5)
    assert _binomial_ok(sum(a["nonlinear"] for a in applied), n, 0.9)
    painted = [a["painting"] for a in applied if a["painting"] is not None]
    assert _binomial_ok(len(painted), n, 0.9)
    assert _binomial_ok(painted.count("in"), len(painted), 0.2)
    assert _binomial_ok(sum(not a["flip_axes"] for a in applied), n, 0.6)


def test_bad_genesis_setting_names_the_key():
    with pytest.raises(ValueError, match="inpaint_rate"):
        GenesisParams.from_settings({"inpaint_rate": 1.5})


# ------------------------------------------------------------------------------------------------ batches, loss
def test_corrupt_batch_is_seeded_and_targets_are_the_flipped_images():
    images = torch.randn(3, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    params = GenesisParams(local_shuffle_blocks=20)
    a = corrupt_batch({"images": images}, seed=0, batch_index=5, params=params)
    b = corrupt_batch({"images": images}, seed=0, batch_index=5, params=params)
    c = corrupt_batch({"images": images}, seed=0, batch_index=6, params=params)
    assert torch.equal(a[INPUT_KEY], b[INPUT_KEY]) and not torch.equal(a[INPUT_KEY], c[INPUT_KEY])
    for i in range(3):
        rng = np.random.default_rng([0, 5, i, 2])
        pair = genesis_pair(images[i].numpy(), rng, params)
        assert np.array_equal(a["images"][i].numpy(), pair.target)


def _trainer(tmp_path: Path, **overrides):
    corpus = tmp_path / "corpus"
    if not corpus.exists():
        write_phantom_corpus(corpus)
    records = load_case_records(corpus, ["vol_000", "vol_001", "vol_002"], with_labels=False)
    settings = {"preset": "resenc_demo", "patch_size": list(PATCH), "iterations": 2, "batch_size": 2,
                "progress_bar": False, "local_shuffle_blocks": 300, **overrides}
    torch.manual_seed(0)  # the network's initial weights, independent of the tests run before
    return METHODS.get("models_genesis")(settings, records, in_channels=1,
                                         out_path=tmp_path / "pretrain" / "checkpoint_final.pth", seed=0)


class _Identity(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def test_loss_is_the_mse_to_the_original_over_all_voxels(tmp_path):
    trainer = _trainer(tmp_path)
    batch = trainer.make_stream(0).make_batch(0)
    assert batch[INPUT_KEY].shape == batch["images"].shape == (2, 1, *PATCH)
    trainer.model = _Identity()  # restores nothing: the loss is the corruption's mean square
    loss = trainer.compute_losses(batch)["loss"]
    expected = ((batch[INPUT_KEY].double() - batch["images"].double()) ** 2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(KeyError, match=INPUT_KEY):
        trainer.compute_losses({"images": batch["images"]})


def test_genesis_loss_falls_and_checkpoint_loads(tmp_path):
    from pretrain_det3d.models.checkpoint import load_pretrained_encoder

    trainer = _trainer(tmp_path, iterations=24, checkpoint_every=12, threads=1, optimizer="adamw", lr=5e-3,
                       weight_decay=0.0, warmup_iterations=2)
    # the corruption differs a lot between samples (out-painting hides most of a patch, in-painting little),
    # so the falling loss is measured on fixed held-out batches rather than on the noisy training log
    held_out = [trainer.make_stream(0).make_batch(10_000 + i) for i in range(3)]

    def held_out_loss() -> float:
        with torch.no_grad():
            return float(np.mean([trainer.compute_losses(b)["loss"].item() for b in held_out]))

    before = held_out_loss()
    trainer.run()
    after = held_out_loss()
    assert after < 0.8 * before  # about 0.62 on this seed
    out = tmp_path / "pretrain" / "checkpoint_final.pth"
    with open(out.parent / "log.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 24
    record = torch.load(out, weights_only=True)
    assert record["nnssl_adaptation_plan"]["pretrain_method"] == "models_genesis"
    report = load_pretrained_encoder(build_resenc_unet("resenc_demo", 1, 1), out)
    assert len(report.loaded_keys) > 10


def test_stream_is_the_same_for_any_worker_count(tmp_path):
    from pretrain_det3d.training.dataloader import build_loader

    trainer = _trainer(tmp_path, iterations=4, patch_size=[16, 16, 16], local_shuffle_blocks=20)
    single = list(build_loader(trainer.make_stream(0), num_workers=0, seed=0))
    parallel = list(build_loader(trainer.make_stream(0), num_workers=2, seed=0))
    assert len(single) == len(parallel) == 4
    for a, b in zip(single, parallel):
        assert torch.equal(a[INPUT_KEY], b[INPUT_KEY]) and torch.equal(a["images"], b["images"])
    resumed = list(build_loader(trainer.make_stream(2), num_workers=0, seed=0))
    assert len(resumed) == 2 and torch.equal(resumed[0][INPUT_KEY], single[2][INPUT_KEY])


def test_paused_genesis_resumes_exactly(tmp_path):
    settings = dict(iterations=4, batch_size=1, patch_size=[16, 16, 16], local_shuffle_blocks=20)
    _trainer(tmp_path / "a", **settings).run()
    _trainer(tmp_path / "b", **settings).run(stop_at=2)
    _trainer(tmp_path / "b", **settings).run()
    a = torch.load(tmp_path / "a" / "pretrain" / "checkpoint_final.pth", weights_only=True)["network_weights"]
    b = torch.load(tmp_path / "b" / "pretrain" / "checkpoint_final.pth", weights_only=True)["network_weights"]
    assert all(torch.equal(a[key], b[key]) for key in a)
