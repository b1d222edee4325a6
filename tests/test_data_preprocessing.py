"""Preprocessing: plan values hand-checked, normalisation against numpy, resampling against scipy and geometry."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from pretrain_det3d.data import preprocessing
from pretrain_det3d.data.boxes import boxes_from_instance_map
from pretrain_det3d.data.io import write_case, write_dataset_json, write_nifti
from pretrain_det3d.data.preprocessing import (
    map_boxes_to_original,
    median_spacing,
    preprocess_corpus,
    read_preprocessed_case,
    resample_image,
    resample_instance_map,
    resampled_shape,
    run_preprocessing,
)
from pretrain_det3d.data.splits import make_splits
from pretrain_det3d.data.synthetic import write_synthetic_dataset

RNG = np.random.default_rng(1234)


def _dataset(root: Path, cases: dict[str, dict], modalities=("CT",), class_names=("lesion", "other")) -> Path:
    """Write a converted dataset; each case: image [C,Z,Y,X], seg [Z,Y,X], instances, spacing (z, y, x)."""
    for case, spec in cases.items():
        write_case(root, case, spec["image"], spec["seg"], spec.get("instances", {}), spacing=spec["spacing"],
                   origin=spec.get("origin", (1.0, 2.0, 3.0)))
    write_dataset_json(root, name=root.name, modalities=list(modalities), class_names=list(class_names),
                       licence="CC0", source="test", num_cases=len(cases))
    return root


def _case(shape=(6, 8, 8), spacing=(1.0, 1.0, 1.0), channels=1, low=-1000, high=1000, instances=None, seg=None):
    image = RNG.integers(low, high, size=(channels, *shape)).astype(np.int16)
    seg = np.zeros(shape, np.int16) if seg is None else seg
    return {"image": image, "seg": seg, "instances": instances or {}, "spacing": spacing}


def _plan(root: Path) -> dict:
    return json.loads((root / "plan.json").read_text())


# ---- plan ------------------------------------------------------------------------------------------------
def test_median_spacing_hand_checked() -> None:
    assert median_spacing([(3, 1, 1), (1, 0.5, 0.8), (2, 0.9, 0.6)]) == pytest.approx((2, 0.9, 0.8))
    # an even count takes the mean of the middle two
    assert median_spacing([(1, 1, 1), (2, 2, 2), (3, 3, 3), (10, 1, 1)]) == pytest.approx((2.5, 1.5, 1.5))


def test_plan_target_spacing_is_the_median_and_shapes_follow(tmp_path: Path) -> None:
    spacings = {"a": (3.0, 1.0, 1.0), "b": (1.0, 0.5, 0.8), "c": (2.0, 0.9, 0.6)}
    converted = _dataset(tmp_path / "spacing", {k: _case(spacing=s) for k, s in spacings.items()})
    out = tmp_path / "pre"
    run_preprocessing(converted, out, num_folds=3, seed=0, settings={})
    plan = _plan(out)
    assert plan["target_spacing"] == pytest.approx([2.0, 0.9, 0.8])
    # case a: 6 * 3 / 2 = 9, 8 * 1 / 0.9 = 8.9 -> 9, 8 * 1 / 0.8 = 10
    _, _, meta = read_preprocessed_case(out, "a")
    assert meta["shape"] == [9, 9, 10] and meta["original_shape"] == [6, 8, 8]
    assert meta["spacing"] == pytest.approx([2.0, 0.9, 0.8])
    assert meta["original_spacing"] == pytest.approx(spacings["a"])
    # b: 3, 4.44 -> 4, 8; c: 6, 8, 6
    shapes = [read_preprocessed_case(out, c)[2]["shape"] for c in "abc"]
    assert shapes == [[9, 9, 10], [3, 4, 8], [6, 8, 6]]
    assert plan["median_shape"] == [6, 8, 8]

    run_preprocessing(converted, tmp_path / "override", 3, 0, {"target_spacing": [2.0, 2.0, 2.0]})
    assert _plan(tmp_path / "override")["target_spacing"] == [2.0, 2.0, 2.0]
    assert read_preprocessed_case(tmp_path / "override", "a")[2]["shape"] == [9, 4, 4]


def test_resampled_shape_hand_checked() -> None:
    assert resampled_shape((10, 64, 64), (2.0, 1.0, 1.0), (1.0, 2.0, 2.0)) == (20, 32, 32)
    assert resampled_shape((3, 3, 3), (1.0, 1.0, 1.0), (10.0, 10.0, 10.0)) == (1, 1, 1)  # never zero


# ---- normalisation ---------------------------------------------------------------------------------------
def test_ct_normalisation_hand_worked(tmp_path: Path) -> None:
    # Foreground values 1..200 in one instance, the rest -1000..2000 (ignored by the statistics).
    shape = (5, 8, 10)
    image = RNG.integers(-1000, 2000, size=(1, *shape)).astype(np.int16)
    seg = np.zeros(shape, np.int16)
    flat_index = RNG.choice(seg.size, 200, replace=False)
    seg.ravel()[flat_index] = 1
    image[0].ravel()[flat_index] = np.arange(1, 201)
    converted = _dataset(tmp_path / "ct", {"a": {"image": image, "seg": seg, "instances": {1: 0}, "spacing": (1, 1, 1)},
                                            "b": _case(shape=shape, spacing=(1, 1, 1))})
    run_preprocessing(converted, tmp_path / "pre", 2, 0, {})
    scheme = _plan(tmp_path / "pre")["normalisation"][0]
    # numpy's linear percentile of 1..200: 1 + 0.005 * 199 and 1 + 0.995 * 199
    assert scheme["scheme"] == "CT"
    assert scheme["lower"] == pytest.approx(1.995) and scheme["upper"] == pytest.approx(199.005)
    assert scheme["mean"] == pytest.approx(100.5)
    assert scheme["std"] == pytest.approx(np.sqrt((200**2 - 1) / 12))  # population std of 1..200
    assert _plan(tmp_path / "pre")["foreground_source"] == "foreground"
    stored, _, _ = read_preprocessed_case(tmp_path / "pre", "a")
    expected = (np.clip(image.astype(np.float64), 1.995, 199.005) - 100.5) / np.sqrt((200**2 - 1) / 12)
    np.testing.assert_allclose(stored, expected, rtol=1e-5, atol=1e-5)
    assert stored.dtype == np.float32 and stored.shape == (1, *shape)


def test_ct_statistics_pool_foreground_over_cases_like_numpy(tmp_path: Path) -> None:
    cases = {}
    for name in "abc":
        seg = np.zeros((6, 8, 8), np.int16)
        seg[1:4, 2:5, 2:6] = 1
        cases[name] = _case(seg=seg, instances={1: 0})
    converted = _dataset(tmp_path / "pool", cases)
    run_preprocessing(converted, tmp_path / "pre", 3, 0, {})
    foreground = np.concatenate([c["image"][0][c["seg"] > 0] for c in cases.values()]).astype(np.float64)
    scheme = _plan(tmp_path / "pre")["normalisation"][0]
    lower, upper = np.percentile(foreground, [0.5, 99.5])
    assert [scheme[k] for k in ("lower", "upper", "mean", "std")] == pytest.approx(
        [lower, upper, foreground.mean(), foreground.std()]
    )


def test_ct_without_instances_falls_back_to_body_then_all(tmp_path: Path) -> None:
    cases = {name: _case(low=-1000, high=400) for name in "ab"}
    run_preprocessing(_dataset(tmp_path / "body", cases), tmp_path / "pre", 2, 0, {})
    plan = _plan(tmp_path / "pre")
    body = np.concatenate([c["image"][0][c["image"][0] > -500] for c in cases.values()]).astype(np.float64)
    assert plan["foreground_source"] == "body"
    assert plan["normalisation"][0]["mean"] == pytest.approx(body.mean())
    assert plan["normalisation"][0]["upper"] == pytest.approx(np.percentile(body, 99.5))

    air = {name: _case(low=-1000, high=-600) for name in "ab"}
    run_preprocessing(_dataset(tmp_path / "air", air), tmp_path / "pre_air", 2, 0, {})
    plan = _plan(tmp_path / "pre_air")
    everything = np.concatenate([c["image"][0].ravel() for c in air.values()]).astype(np.float64)
    assert plan["foreground_source"] == "all"
    assert plan["normalisation"][0]["std"] == pytest.approx(everything.std())


def test_mri_channels_get_a_per_case_zscore(tmp_path: Path) -> None:
    seg = np.zeros((6, 8, 8), np.int16)
    seg[2:4, 2:4, 2:4] = 1
    cases = {name: _case(channels=2, seg=seg, instances={1: 0}) for name in "ab"}
    converted = _dataset(tmp_path / "multi", cases, modalities=("CT", "MRI"))
    run_preprocessing(converted, tmp_path / "pre", 2, 0, {})
    plan = _plan(tmp_path / "pre")
    assert plan["modalities"] == ["CT", "MRI"]
    assert plan["normalisation"][1] == {"scheme": "zscore"}
    for name, spec in cases.items():
        stored, _, _ = read_preprocessed_case(tmp_path / "pre", name)
        mri = spec["image"][1].astype(np.float64)
        np.testing.assert_allclose(stored[1], (mri - mri.mean()) / mri.std(), rtol=1e-5, atol=1e-5)


# ---- resampling ------------------------------------------------------------------------------------------
def test_resample_image_matches_scipy_zoom_in_grid_mode() -> None:
    image = RNG.normal(size=(2, 7, 9, 11)).astype(np.float32)
    new_shape = (10, 5, 13)
    factors = np.asarray(new_shape) / np.asarray(image.shape[1:])
    expected = np.stack([ndimage.zoom(c, factors, order=3, mode="nearest", grid_mode=True) for c in image])
    assert expected.shape[1:] == new_shape
    np.testing.assert_allclose(resample_image(image, new_shape), expected, rtol=1e-4, atol=1e-4)


def test_resampling_preserves_lesion_centres_within_a_voxel(tmp_path: Path) -> None:
    shape, spacing, target = (24, 40, 36), (1.0, 0.7, 0.8), (1.6, 1.1, 0.5)
    centres_mm = [(6.0, 8.0, 9.0), (15.5, 20.1, 20.3), (17.0, 9.3, 22.0)]
    radii_mm = [3.0, 4.5, 2.5]
    grid = np.stack(np.meshgrid(*[(np.arange(n) + 0.5) * s for n, s in zip(shape, spacing)], indexing="ij"))
    seg = np.zeros(shape, np.int16)
    image = np.full((1, *shape), 40, np.int16)
    for index, (centre, radius) in enumerate(zip(centres_mm, radii_mm), start=1):
        inside = np.sum((grid - np.reshape(centre, (3, 1, 1, 1))) ** 2, axis=0) <= radius**2
        seg[inside] = index
        image[0][inside] = 300
    converted = _dataset(tmp_path / "spheres", {
        "a": {"image": image, "seg": seg, "instances": {1: 0, 2: 1, 3: 0}, "spacing": spacing},
        "b": _case(shape=shape, spacing=spacing),
    }, modalities=("MRI",))  # a z-score keeps the image's contrast (CT clipping to this flat foreground would not)
    run_preprocessing(converted, tmp_path / "pre", 2, 0, {"target_spacing": list(target)})
    stored, stored_seg, meta = read_preprocessed_case(tmp_path / "pre", "a")
    assert meta["instances"] == {"1": 0, "2": 1, "3": 0} and meta["dropped_instance_ids"] == []
    voxel_mm = np.asarray(meta["original_shape"]) * spacing / np.asarray(meta["shape"])  # physical extent kept
    for index, centre in enumerate(centres_mm, start=1):
        original_mm = (np.asarray(ndimage.center_of_mass(seg == index)) + 0.5) * spacing
        resampled_mm = (np.asarray(ndimage.center_of_mass(stored_seg == index)) + 0.5) * voxel_mm
        assert np.all(np.abs(resampled_mm - original_mm) <= voxel_mm), (index, original_mm, resampled_mm)
        assert np.all(np.abs(resampled_mm - centre) <= voxel_mm)
        # the image moved with the map: its bright blob has the same centre
        bright = ndimage.label(stored[0] > stored[0].mean())[0]
        blob = bright == bright[tuple(np.rint(ndimage.center_of_mass(stored_seg == index)).astype(int))]
        blob_mm = (np.asarray(ndimage.center_of_mass(blob)) + 0.5) * voxel_mm
        assert np.all(np.abs(blob_mm - original_mm) <= voxel_mm)
    ids, boxes = boxes_from_instance_map(np.asarray(stored_seg))
    assert meta["boxes"] == boxes.tolist() and ids.tolist() == [1, 2, 3]


def _vanishing_case() -> dict:
    """8^3 at 1 mm; id 2 is one voxel at an even index, which a 2 mm grid (centres at odd indices) misses."""
    seg = np.zeros((8, 8, 8), np.int16)
    seg[0:4, 0:4, 0:4] = 1
    seg[6, 6, 6] = 2
    seg[4:8, 0:2, 4:8] = 3
    return {"image": RNG.integers(-100, 100, size=(1, 8, 8, 8)).astype(np.int16), "seg": seg,
            "instances": {1: 0, 2: 1, 3: 1}, "spacing": (1.0, 1.0, 1.0)}


def test_vanished_instances_are_dropped_and_the_rest_renumbered(tmp_path: Path) -> None:
    converted = _dataset(tmp_path / "tiny", {"a": _vanishing_case(), "b": _case(shape=(8, 8, 8))})
    run_preprocessing(converted, tmp_path / "pre", 2, 0, {"target_spacing": [2.0, 2.0, 2.0]})
    _, seg, meta = read_preprocessed_case(tmp_path / "pre", "a")
    assert seg.dtype == np.int16 and seg.shape == (4, 4, 4)
    assert sorted(np.unique(seg).tolist()) == [0, 1, 2]
    assert meta["instances"] == {"1": 0, "2": 1}
    assert meta["original_instance_ids"] == {"1": 1, "2": 3} and meta["dropped_instance_ids"] == [2]
    # hand-worked: id 1 keeps voxels 0..1 on every axis, id 3 voxels z 2..3, y 0, x 2..3; boxes are
    # [first - 1, last + 1] (data.boxes), so n voxels give a size of n + 1 in the plan
    assert meta["boxes"] == [[-1, -1, -1, 2, 2, 2], [1, -1, 1, 4, 1, 4]]
    assert meta["labels"] == [0, 1]
    assert _plan(tmp_path / "pre")["box_sizes"] == [[3, 3, 3], [3, 2, 3]]


def test_map_boxes_to_original_round_trip(tmp_path: Path) -> None:
    case = _vanishing_case()
    converted = _dataset(tmp_path / "tiny", {"a": case, "b": _case(shape=(8, 8, 8))})
    run_preprocessing(converted, tmp_path / "pre", 2, 0, {"target_spacing": [2.0, 2.0, 2.0]})
    _, _, meta = read_preprocessed_case(tmp_path / "pre", "a")
    mapped = map_boxes_to_original(meta["boxes"], meta, clip=False)
    original_ids, original_boxes = boxes_from_instance_map(case["seg"])
    kept = [meta["original_instance_ids"][str(i)] for i in range(1, 3)]
    # the boxes of the downsampled map go exactly to the boxes of the original map (ratio 2: whole voxels)
    np.testing.assert_array_equal(mapped, original_boxes[np.isin(original_ids, kept)])
    np.testing.assert_array_equal(mapped, [[-1, -1, -1, 4, 4, 4], [3, -1, 3, 8, 2, 8]])
    # as predictions they are clipped to the converted image, [0, shape] per axis (nnDetection's rule)
    np.testing.assert_array_equal(map_boxes_to_original(meta["boxes"], meta), [[0, 0, 0, 4, 4, 4], [3, 0, 3, 8, 2, 8]])


def test_map_boxes_to_original_hand_worked_ratios() -> None:
    meta = {"shape": [4, 10, 3], "original_shape": [6, 5, 7]}  # ratios 1.5, 0.5, 7/3
    # z: preprocessed voxels 1..2 cover converted [1.5, 4.5), i.e. the box [first - 1, last + 1] of
    #    converted voxels 1.5..3.5 = [0.5, 4.5]; y: voxels 2..7 cover [1, 4), converted voxels 1..3, box [0, 4];
    # x: voxel 0 covers [0, 7/3), converted voxels 0..4/3, box [-1, 7/3]
    boxes = np.array([[0.0, 1.0, -1.0, 3.0, 8.0, 1.0]])
    np.testing.assert_allclose(map_boxes_to_original(boxes, meta, clip=False), [[0.5, 0.0, -1.0, 4.5, 4.0, 7 / 3]])
    np.testing.assert_allclose(map_boxes_to_original(boxes, meta), [[0.5, 0.0, 0.0, 4.5, 4.0, 7 / 3]])
    # centres move as voxel centres do: c -> (c + 0.5) * r - 0.5
    centres = (boxes[:, :3] + boxes[:, 3:]) / 2
    mapped = map_boxes_to_original(boxes, meta, clip=False)
    np.testing.assert_allclose((mapped[:, :3] + mapped[:, 3:]) / 2, (centres + 0.5) * [1.5, 0.5, 7 / 3] - 0.5)
    # clipping keeps boxes inside [0, original_shape]
    wide = map_boxes_to_original(np.array([[-5.0, -5.0, -5.0, 50.0, 50.0, 50.0]]), meta)
    np.testing.assert_allclose(wide, [[0.0, 0.0, 0.0, 6.0, 5.0, 7.0]])
    assert map_boxes_to_original(np.zeros((0, 6)), meta).shape == (0, 6)


def test_resample_instance_map_takes_the_voxel_holding_each_new_centre() -> None:
    seg = np.arange(6, dtype=np.int16).reshape(6, 1, 1)
    # 6 -> 4: new centres at 0.75, 2.25, 3.75, 5.25 (old voxel units, edges at integers)
    assert resample_instance_map(seg, (4, 1, 1)).ravel().tolist() == [0, 2, 3, 5]
    # 3 -> 6: every old voxel twice
    assert resample_instance_map(seg[:3], (6, 1, 1)).ravel().tolist() == [0, 0, 1, 1, 2, 2]


# ---- stored outputs --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def synthetic_preprocessed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pp")
    converted = root / "converted" / "demo"
    write_synthetic_dataset(converted, "demo", {"num_cases": 5, "shape": [32, 32, 32], "spacing": [2.0, 1.0, 1.0],
                                                "num_classes": 2, "lesions_per_case": [1, 3]}, seed=4)
    out = root / "preprocessed" / "demo"
    run_preprocessing(converted, out, num_folds=2, seed=9,
                      settings={"target_spacing": [2.0, 1.5, 1.5], "foreground_locations": 12})
    return converted, out


def test_outputs_follow_the_contract(synthetic_preprocessed) -> None:
    converted, out = synthetic_preprocessed
    plan = _plan(out)
    case_ids = [f"demo_{i:04d}" for i in range(5)]
    assert set(plan) >= {"target_spacing", "modalities", "normalisation", "num_classes", "class_names",
                         "median_shape", "box_sizes"}
    assert plan["num_classes"] == 2 and plan["class_names"] == ["hyperdense_lesion", "hypodense_lesion"]
    assert json.loads((out / "splits.json").read_text()) == make_splits(case_ids, 2, 9)
    all_sizes = []
    for case in case_ids:
        image, seg, meta = read_preprocessed_case(out, case)
        assert isinstance(image, np.memmap) and image.dtype == np.float32 and image.shape == (1, 32, 21, 21)
        assert seg.dtype == np.int16 and seg.shape == (32, 21, 21)
        assert set(meta) >= {"instances", "boxes", "labels", "original_shape", "original_spacing", "spacing",
                             "shape", "origin", "direction", "foreground_locations"}
        ids, boxes = boxes_from_instance_map(np.asarray(seg))
        assert meta["boxes"] == boxes.tolist()
        assert meta["labels"] == [meta["instances"][str(i)] for i in ids]
        original = sitk.ReadImage(str(converted / "imagesTr" / f"{case}_0000.nii.gz"))
        assert meta["origin"] == pytest.approx(original.GetOrigin())
        locations = np.asarray(meta["foreground_locations"], dtype=np.int64).reshape(-1, 3)
        assert len(locations) <= 12 and (len(locations) > 0) == (len(ids) > 0)
        assert np.all(seg[tuple(locations.T)] > 0)
        assert set(seg[tuple(locations.T)].tolist()) == set(ids.tolist())  # every instance is represented
        all_sizes += (boxes[:, 3:] - boxes[:, :3]).tolist()
    assert plan["box_sizes"] == all_sizes and len(all_sizes) >= 5


def test_same_seed_same_outputs_with_more_workers(synthetic_preprocessed, tmp_path: Path) -> None:
    converted, out = synthetic_preprocessed
    again = tmp_path / "again"
    run_preprocessing(converted, again, num_folds=2, seed=9,
                      settings={"target_spacing": [2.0, 1.5, 1.5], "foreground_locations": 12, "num_workers": 2})
    for path in sorted((out).rglob("*")):
        if path.is_file():
            twin = again / path.relative_to(out)
            if path.suffix == ".npy":
                np.testing.assert_array_equal(np.load(path), np.load(twin))
            else:
                assert path.read_text() == twin.read_text(), path.name


def test_plan_is_written_last_and_progress_is_shown(tmp_path: Path, monkeypatch, capsys) -> None:
    converted = _dataset(tmp_path / "order", {"a": _vanishing_case(), "b": _case(shape=(8, 8, 8))})
    written = []
    original = preprocessing.write_json

    def recording_write_json(path, data):
        written.append(Path(path).name)
        original(path, data)

    monkeypatch.setattr(preprocessing, "write_json", recording_write_json)
    run_preprocessing(converted, tmp_path / "pre", 2, 0, {})
    assert written[-1] == "plan.json" and "splits.json" in written and "a.json" in written
    assert "preprocess order" in capsys.readouterr().err  # tqdm's bar names the dataset


def test_a_failure_leaves_no_output(tmp_path: Path, monkeypatch) -> None:
    converted = _dataset(tmp_path / "fail", {"a": _vanishing_case(), "b": _case(shape=(8, 8, 8))})

    def broken(case, **kwargs):
        raise RuntimeError(f"cannot preprocess {case}")

    monkeypatch.setattr(preprocessing, "_preprocess_case", broken)
    with pytest.raises(RuntimeError, match="cannot preprocess a"):
        run_preprocessing(converted, tmp_path / "pre", 2, 0, {})
    assert not (tmp_path / "pre").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".pre")]


@pytest.mark.parametrize(
    ("num_folds", "settings", "message"),
    [
        (3, {}, r"num_folds \(3\) is larger than the number of cases \(2\)"),
        (2, {"target_spacing": [1.0, 1.0]}, "preprocessing settings key 'target_spacing'"),
        (2, {"num_workers": 0}, "preprocessing settings key 'num_workers'"),
    ],
)
def test_bad_requests_fail_before_writing(tmp_path: Path, num_folds: int, settings: dict, message: str) -> None:
    converted = _dataset(tmp_path / "bad", {"a": _case(), "b": _case()})
    with pytest.raises(ValueError, match=message):
        run_preprocessing(converted, tmp_path / "pre", num_folds, 0, settings)
    assert not (tmp_path / "pre").exists()


# ---- corpus ----------------------------------------------------------------------------------------------
def _corpus(root: Path) -> dict[str, tuple[np.ndarray, tuple]]:
    volumes = {
        "v1": (RNG.integers(-1000, 800, size=(6, 8, 8)).astype(np.int16), (2.0, 1.0, 1.0)),
        "v2": (RNG.integers(-1000, 800, size=(5, 9, 7)).astype(np.int16), (3.0, 0.8, 1.0)),
        "v3": (RNG.integers(-1000, 800, size=(7, 8, 6)).astype(np.int16), (1.0, 1.2, 0.5)),
    }
    for name, (array, spacing) in volumes.items():
        write_nifti(root / f"{name}.nii.gz", array, spacing)
    return volumes


def test_preprocess_corpus_ct(tmp_path: Path) -> None:
    volumes = _corpus(tmp_path / "corpus")
    out = tmp_path / "pre"
    preprocess_corpus(tmp_path / "corpus", out, {})
    plan = _plan(out)
    assert plan["target_spacing"] == pytest.approx([2.0, 1.0, 1.0])  # median of the three
    body = np.concatenate([a[a > -500] for a, _ in volumes.values()]).astype(np.float64)
    scheme = plan["normalisation"][0]
    lower, upper = np.percentile(body, [0.5, 99.5])
    assert [scheme[k] for k in ("lower", "upper", "mean", "std")] == pytest.approx(
        [lower, upper, body.mean(), body.std()]
    )
    assert plan["case_ids"] == ["v1", "v2", "v3"]
    v1 = np.load(out / "cases" / "v1.npy", mmap_mode="r")  # already at the target spacing
    expected = (np.clip(volumes["v1"][0].astype(np.float64), lower, upper) - body.mean()) / body.std()
    np.testing.assert_allclose(v1[0], expected, rtol=1e-5, atol=1e-5)
    v2 = np.load(out / "cases" / "v2.npy")
    assert v2.shape == (1, *resampled_shape((5, 9, 7), (3.0, 0.8, 1.0), (2.0, 1.0, 1.0))) == (1, 8, 7, 7)
    assert plan["shapes"]["v2"] == [8, 7, 7]


def test_preprocess_corpus_mri_and_errors(tmp_path: Path) -> None:
    volumes = _corpus(tmp_path / "corpus")
    preprocess_corpus(tmp_path / "corpus", tmp_path / "pre", {"modality": "MRI", "target_spacing": [2, 1, 1]})
    assert _plan(tmp_path / "pre")["normalisation"] == [{"scheme": "zscore"}]
    v3 = np.load(tmp_path / "pre" / "cases" / "v3.npy")
    array, spacing = volumes["v3"]
    zscored = (array - array.mean()) / array.std()  # per volume, then resampled (scipy's zoom as reference)
    new_shape = resampled_shape(array.shape, spacing, (2, 1, 1))
    expected = ndimage.zoom(zscored, np.asarray(new_shape) / array.shape, order=3, mode="nearest", grid_mode=True)
    np.testing.assert_allclose(v3[0], expected, rtol=1e-4, atol=1e-4)

    (tmp_path / "empty").mkdir()
    with pytest.raises(preprocessing.DatasetFormatError, match="holds no .nii.gz volumes"):
        preprocess_corpus(tmp_path / "empty", tmp_path / "pre_empty", {})
