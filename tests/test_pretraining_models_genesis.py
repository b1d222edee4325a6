"""Models Genesis pre-training: each corruption's invariants, the rates, the intensity variants, the batch stream,
and training with the configured optimiser."""

from __future__ import annotations

import csv
import json
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
    IntensityMap,
    apply_intensity_curve,
    bezier_points,
    flip,
    from_unit_range,
    genesis_pair,
    in_paint,
    intensity_map,
    local_pixel_shuffle,
    out_paint,
    random_flip_axes,
    random_intensity_curve,
    to_unit_range,
)
from pretrain_det3d.pretraining.models_genesis import INPUT_KEY, corrupt_batch
from pretrain_det3d.settings.pretraining import ModelsGenesisSettings
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
        assert len(boxes) <= 5
        covered = _inside(boxes, PATCH)[None]
        assert np.array_equal(out[~covered], image[~covered])
        assert np.all((out[covered] >= 0.0) & (out[covered] < 1.0))
        for start, stop in boxes:
            assert all(32 // 6 <= b - a <= 32 // 3 for a, b in zip(start, stop))
            assert all(a >= 3 and b <= 32 - 3 for a, b in zip(start, stop))  # the margin of the original


def test_painting_box_counts_follow_the_original():
    # the original draws every in-painting box with probability 0.95 (none with 0.05) and the first
    # out-painting box always, each further one with 0.95; at most 5 boxes either way
    small = np.zeros((1, 12, 12, 12))
    n = 400
    inner = [len(in_paint(small, np.random.default_rng(s))[1]) for s in range(n)]
    outer = [len(out_paint(small, np.random.default_rng(s))[1]) for s in range(n)]
    assert _binomial_ok(inner.count(0), n, 0.05) and max(inner) <= 5
    assert min(outer) == 1 and max(outer) <= 5
    assert _binomial_ok(inner.count(5), n, 0.95**5) and _binomial_ok(outer.count(5), n, 0.95**4)


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
@pytest.mark.parametrize("intensity", ["zscore", "patch_minmax"])
def test_pair_without_corruption_is_the_identity_and_target_is_the_flipped_original(intensity):
    image = np.random.default_rng(0).normal(size=(1, 16, 16, 16)).astype(np.float32)
    same = genesis_pair(image, np.random.default_rng(0), GenesisParams(**NO_CORRUPTION, intensity=intensity))
    np.testing.assert_allclose(same.corrupted, image, atol=1e-5)
    assert np.array_equal(same.target, image)
    flipped = genesis_pair(image, np.random.default_rng(0),
                           GenesisParams(**{**NO_CORRUPTION, "flip_rate": 1.0}, intensity=intensity))
    assert len(flipped.applied["flip_axes"]) == 3
    assert np.array_equal(flipped.target, flip(image, flipped.applied["flip_axes"]))
    np.testing.assert_allclose(flipped.corrupted, flipped.target, atol=1e-5)


def test_pair_with_the_curve_only_keeps_the_voxel_order():
    image = np.random.default_rng(0).normal(size=(1, 16, 16, 16)).astype(np.float32)
    params = GenesisParams(**{**NO_CORRUPTION, "nonlinear_rate": 1.0, "invert_rate": 0.0}, intensity="patch_minmax")
    out = genesis_pair(image, np.random.default_rng(4), params).corrupted
    order = np.argsort(image, axis=None)
    assert np.all(np.diff(out.ravel()[order]) >= -1e-5)  # an increasing map of the intensities
    assert out.min() >= image.min() - 1e-5 and out.max() <= image.max() + 1e-5  # back in the patch's range
    assert not np.allclose(out, image, atol=1e-3)


# ------------------------------------------------------------------------------------------------ intensity variants
# a hand-made z-scored patch: eight levels in turn along the voxels, so every box of a corruption holds all of them
LEVELS = np.array([-3.0, -1.0, 0.0, 0.25, 0.5, 1.0, 2.0, 5.0], dtype=np.float32)
# the corpus plan's CT z-score of the hu_window tests: z = (HU - 40) / 400, so the [-1000, 1000] HU window is
# z in [(-1000 - 40) / 400, (1000 - 40) / 400] = [-2.6, 2.4]
CT_MEAN, CT_STD = 40.0, 400.0
Z_LOW, Z_HIGH = -2.6, 2.4


def _hand_made_patch(edge: int = 24) -> np.ndarray:
    index = np.arange(edge**3).reshape(1, edge, edge, edge) % len(LEVELS)  # every level in every region
    return LEVELS[index]


def _params(intensity: str, **overrides) -> GenesisParams:
    hu = dict(hu_mean=(CT_MEAN,), hu_std=(CT_STD,)) if intensity == "hu_window" else {}
    return GenesisParams(**{**NO_CORRUPTION, **overrides}, intensity=intensity, **hu)


def test_the_default_intensity_is_nnssls_zscore():
    assert ModelsGenesisSettings.default("intensity") == "zscore" == GenesisParams().intensity
    assert tuple(ModelsGenesisSettings.default("hu_window")) == (-1000.0, 1000.0)  # the original's hu_min, hu_max
    with pytest.raises(ValueError, match="intensity"):
        GenesisParams.from_settings({"intensity": "minmax"})


def test_intensity_maps_on_hand_worked_values():
    x = np.array([-3.6, -2.6, -0.1, 2.4, 3.9, -1.35]).reshape(1, 1, 1, 6)  # HU -1400, -1000, 0, 1000, 1600, -500
    # zscore: the identity
    np.testing.assert_array_equal(intensity_map(x, _params("zscore")).to_unit(x), x)
    # patch_minmax: (x - min) / (max - min) with min -3.6, max 3.9
    np.testing.assert_allclose(intensity_map(x, _params("patch_minmax")).to_unit(x),
                               (x - (-3.6)) / 7.5, atol=1e-12)
    # hu_window: HU = 400 z + 40, then (HU + 1000) / 2000 clipped to [0, 1]
    hu = intensity_map(x, _params("hu_window"))
    np.testing.assert_allclose(hu.to_unit(x).ravel(), [0.0, 0.0, 0.5, 1.0, 1.0, 0.25], atol=1e-12)
    np.testing.assert_allclose(hu.from_unit(np.array([0.0, 0.25, 0.5, 1.0])).ravel(), [Z_LOW, -1.35, -0.1, Z_HIGH],
                               atol=1e-12)
    with pytest.raises(ValueError, match="hu_mean"):
        intensity_map(x, GenesisParams(intensity="hu_window"))  # HU cannot be recovered without the corpus numbers
    assert isinstance(hu, IntensityMap) and hu.clip


def test_curve_range_of_each_variant_on_a_hand_made_patch():
    image = _hand_made_patch()
    curve = dict(nonlinear_rate=1.0, invert_rate=0.0)  # an increasing curve with (0, 0) and (1, 1) fixed
    at = {level: image == level for level in LEVELS.tolist()}

    # zscore (nnssl): the curve maps [0, 1] onto [0, 1] and saturates outside: everything <= 0 becomes 0,
    # everything >= 1 becomes 1, whatever the patch's own range [-3, 5]
    out = genesis_pair(image, np.random.default_rng(1), _params("zscore", **curve))
    assert np.array_equal(out.target, image)
    for level in (-3.0, -1.0, 0.0):
        assert np.all(out.corrupted[at[level]] == 0.0)
    for level in (1.0, 2.0, 5.0):
        assert np.allclose(out.corrupted[at[level]], 1.0, atol=1e-6)
    assert out.corrupted.min() == 0.0 and out.corrupted.max() == pytest.approx(1.0, abs=1e-6)

    # patch_minmax: [-3, 5] -> [0, 1] -> curve -> [-3, 5]: the ends stay, nothing saturates, the order is kept
    out = genesis_pair(image, np.random.default_rng(1), _params("patch_minmax", **curve))
    assert out.corrupted[at[-3.0]] == pytest.approx(-3.0, abs=1e-5) and out.corrupted[at[5.0]] == pytest.approx(
        5.0, abs=1e-5)
    means = [float(out.corrupted[at[level]].mean()) for level in LEVELS.tolist()]
    assert all(np.diff(means) > 0)  # eight distinct, increasing values

    # hu_window: the window [-1000, 1000] HU is z in [-2.6, 2.4]; -3 (HU -1160) and 5 (HU 2040) are clipped to
    # its ends in the target too, the levels in between keep their order
    out = genesis_pair(image, np.random.default_rng(1), _params("hu_window", **curve))
    assert np.allclose(out.target[at[-3.0]], Z_LOW, atol=1e-5) and np.allclose(out.target[at[5.0]], Z_HIGH, atol=1e-5)
    inside = ~(at[-3.0] | at[5.0])
    assert np.array_equal(out.target[inside], image[inside])
    assert np.allclose(out.corrupted[at[-3.0]], Z_LOW, atol=1e-5)
    assert np.allclose(out.corrupted[at[5.0]], Z_HIGH, atol=1e-5)
    assert out.corrupted.min() >= Z_LOW - 1e-5 and out.corrupted.max() <= Z_HIGH + 1e-5


@pytest.mark.parametrize("intensity, low, high", [
    ("zscore", 0.0, 1.0),  # nnssl: noise in [0, 1) whatever the patch: between the corpus mean and mean + 1 std
    ("patch_minmax", -3.0, 5.0),  # the patch's own range
    ("hu_window", Z_LOW, Z_HIGH),  # the HU window, in z units
])
def test_painted_noise_range_of_each_variant(intensity, low, high):
    image = _hand_made_patch()
    paint = dict(paint_rate=1.0, inpaint_rate=1.0, paint_max_boxes=1, paint_continue_rate=1.0)
    out = genesis_pair(image, np.random.default_rng(2), _params(intensity, **paint))
    changed = np.abs(out.corrupted - out.target) > 1e-4  # (patch_minmax maps back with float32 round-off)
    assert changed.sum() >= 4**3  # one box, edges 4 to 8 of 24
    noise = out.corrupted[changed]
    assert noise.min() >= low - 1e-5 and noise.max() < high + 1e-5
    assert noise.max() - noise.min() > 0.8 * (high - low)  # uniform over the whole range
    assert abs(float(noise.mean()) - (low + high) / 2) < 0.1 * (high - low)
    if intensity != "hu_window":  # (hu_window's target is the windowed patch, tested above)
        assert np.array_equal(out.target, image)


def _write_plan(corpus: Path, scheme: str) -> None:
    entry = ({"scheme": "CT", "lower": -500.0, "upper": 1500.0, "mean": CT_MEAN, "std": CT_STD,
              "use_mask_for_norm": False} if scheme == "CT" else {"scheme": scheme, "use_mask_for_norm": False})
    (corpus / "plan.json").write_text(json.dumps({"normalisation": [entry], "modalities": ["x"]}))


def test_hu_window_reads_the_corpus_ct_zscore_and_refuses_other_corpora(tmp_path):
    corpus = tmp_path / "corpus"
    write_phantom_corpus(corpus)
    with pytest.raises(FileNotFoundError, match="plan"):
        _trainer(tmp_path, intensity="hu_window")
    _write_plan(corpus, "zscore")
    with pytest.raises(ValueError, match="'CT'"):
        _trainer(tmp_path, intensity="hu_window")
    _write_plan(corpus, "CT")
    trainer = _trainer(tmp_path, intensity="hu_window", patch_size=[16, 16, 16], local_shuffle_blocks=20)
    assert trainer.genesis.hu_mean == (CT_MEAN,) and trainer.genesis.hu_std == (CT_STD,)
    batch = trainer.make_stream(0).make_batch(0)
    for key in ("images", INPUT_KEY):  # input and target in the window
        assert batch[key].min() >= Z_LOW - 1e-5 and batch[key].max() <= Z_HIGH + 1e-5


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

    # the configured optimiser (SGD, Nesterov momentum 0.99, lr 1e-2, weight decay 3e-5, no warm-up) and the
    # default corruption on the default intensity scale; only the size of the run is the test's
    trainer = _trainer(tmp_path, iterations=40, patch_size=[24, 24, 24], checkpoint_every=20, threads=1)
    assert trainer.settings.optimizer == "sgd" and trainer.settings.momentum == 0.99
    assert trainer.genesis.intensity == "zscore"
    # the corruption differs a lot between samples (out-painting hides most of a patch, in-painting little),
    # so the falling loss is measured on fixed held-out batches rather than on the noisy training log
    held_out = [trainer.make_stream(0).make_batch(10_000 + i) for i in range(4)]

    def held_out_loss() -> float:
        with torch.no_grad():
            return float(np.mean([trainer.compute_losses(b)["loss"].item() for b in held_out]))

    # two restorations that need no learning: return the corrupted input, or return 0 (the corpus mean)
    identity = float(np.mean([((b[INPUT_KEY] - b["images"]) ** 2).mean().item() for b in held_out]))
    zero = float(np.mean([(b["images"] ** 2).mean().item() for b in held_out]))
    before = held_out_loss()
    trainer.run()
    after = held_out_loss()
    # out-painted noise cannot be restored, so the loss has a high floor; the trained network beats both
    # trivial restorations clearly (about 0.83 against 1.24 and 1.30 on this seed)
    assert after < before and after < 0.85 * min(identity, zero)
    out = tmp_path / "pretrain" / "checkpoint_final.pth"
    with open(out.parent / "log.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 40
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
