"""Preprocessing: crop, resampling and normalisation array to array against nnunetv2's own functions, the target
spacing against nnDetection's rule (hand-worked) and nnunetv2's planner, boxes back onto the original grid,
resumable per-case output (a killed job reruns only the missing cases)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero as nnunet_crop_to_nonzero
from nnunetv2.preprocessing.normalization.default_normalization_schemes import CTNormalization, ZScoreNormalization
from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape, resample_data_or_seg_to_shape
from scipy import ndimage
from skimage.transform import resize

from pretrain_det3d.data import preprocessing
from pretrain_det3d.data.boxes import boxes_from_instance_map
from pretrain_det3d.data.io import write_case, write_dataset_json, write_nifti
from pretrain_det3d.data.preprocessing import (
    fingerprint_memory_bytes,
    map_boxes_to_original,
    median_spacing,
    nndetection_target_spacing,
    preprocess_corpus,
    preprocess_memory_bytes,
    read_preprocessed_case,
    resample_image,
    resample_instance_map,
    resampled_shape,
    run_preprocessing,
    work_folder,
)
from pretrain_det3d.data.splits import SplitsFileError, make_splits
from pretrain_det3d.data.synthetic import write_synthetic_dataset
from pretrain_det3d.inference.predict import world_centres

RNG = np.random.default_rng(1234)


def _dataset(root: Path, cases: dict[str, dict], modalities=("CT",), class_names=("lesion", "other")) -> Path:
    """Write a converted dataset; each case: image [C,Z,Y,X], seg [Z,Y,X], instances, spacing (z, y, x)."""
    for case, spec in cases.items():
        write_case(root, case, spec["image"], spec["seg"], spec.get("instances", {}), spacing=spec["spacing"],
                   origin=spec.get("origin", (1.0, 2.0, 3.0)), direction=spec.get("direction"))
    write_dataset_json(root, name=root.name, modalities=list(modalities), class_names=list(class_names),
                       licence="CC0", source="test", num_cases=len(cases))
    return root


def _case(shape=(6, 8, 8), spacing=(1.0, 1.0, 1.0), channels=1, low=-1000, high=1000, instances=None, seg=None):
    image = RNG.integers(low, high, size=(channels, *shape)).astype(np.int16)
    image[image == 0] = 1  # no zero voxel: nothing to crop unless a test makes a margin
    seg = np.zeros(shape, np.int16) if seg is None else seg
    return {"image": image, "seg": seg, "instances": instances or {}, "spacing": spacing}


def _plan(root: Path) -> dict:
    return json.loads((root / "plan.json").read_text())


def _nnunet_pipeline(image: np.ndarray, seg: np.ndarray, spacing, target, schemes, force_separate_z=False):
    """The reference: nnunetv2's functions in nnDetection's order (crop, resample, normalise), nothing of ours."""
    data, label, bbox = nnunet_crop_to_nonzero(image.astype(np.float32), seg[None].astype(np.int32))
    new_shape = compute_new_shape(data.shape[1:], spacing, target)
    data = resample_data_or_seg_to_shape(data, new_shape, spacing, target, is_seg=False, order=3, order_z=0,
                                         force_separate_z=force_separate_z)
    label = resample_data_or_seg_to_shape(label, new_shape, spacing, target, is_seg=True, order=0, order_z=0,
                                          force_separate_z=force_separate_z)
    out = np.empty(data.shape, np.float32)
    for channel, scheme in enumerate(schemes):
        out[channel] = scheme.run(np.array(data[channel], np.float32), label[0])
        if scheme.use_mask_for_norm:
            out[channel][label[0] < 0] = 0
    return out, label[0], bbox


def _ct(plan_entry: dict) -> CTNormalization:
    return CTNormalization(False, {"mean": plan_entry["mean"], "std": plan_entry["std"],
                                   "percentile_00_5": plan_entry["lower"], "percentile_99_5": plan_entry["upper"]})


# ---- plan: target spacing ------------------------------------------------------------------------------------
def test_median_spacing_hand_checked() -> None:
    assert median_spacing([(3, 1, 1), (1, 0.5, 0.8), (2, 0.9, 0.6)]) == pytest.approx((2, 0.9, 0.8))
    # an even count takes the mean of the middle two
    assert median_spacing([(1, 1, 1), (2, 2, 2), (3, 3, 3), (10, 1, 1)]) == pytest.approx((2.5, 1.5, 1.5))


def test_nndetection_target_spacing_hand_worked() -> None:
    spacings = [(5.0, 0.7, 0.7), (5.0, 0.8, 0.8), (6.0, 0.7, 0.7), (2.5, 0.6, 0.6), (3.0, 0.7, 0.7)]
    # median (5, 0.7, 0.7): z is > 3 x 0.7 coarser; with few slices (median 40 < 512 / 3) z takes the 10th
    # percentile of its spacings: sorted 2.5, 3, 5, 5, 6 -> 2.5 + 0.4 * (3 - 2.5) = 2.7
    few = [(40, 512, 512)] * 5
    assert nndetection_target_spacing(spacings, few) == pytest.approx((2.7, 0.7, 0.7))
    # many slices (200 * 3 > 512): the median stays
    assert nndetection_target_spacing(spacings, [(200, 512, 512)] * 5) == pytest.approx((5.0, 0.7, 0.7))
    # not anisotropic enough (2 mm < 3 x 0.7): the median
    assert nndetection_target_spacing([(2.0, 0.7, 0.7)] * 3, [(40, 512, 512)] * 3) == pytest.approx((2, 0.7, 0.7))
    # the 10th percentile below the finest other axis is raised to it + 1e-5
    # (sorted z 0.5, 0.5, 5, 5, 5: the 10th percentile is 0.5)
    low = [(5.0, 1.0, 1.0)] * 3 + [(0.5, 1.0, 1.0)] * 2
    assert nndetection_target_spacing(low, [(30, 400, 400)] * 5) == pytest.approx((1.00001, 1.0, 1.0), abs=1e-9)
    # nnDetection compares with the finest other axis (min): 4 mm > 3 x 1.2 only against y
    mixed = [(4.0, 1.2, 1.5)] * 3
    assert nndetection_target_spacing(mixed, [(40, 400, 400)] * 3) == pytest.approx((4.0, 1.2, 1.5))
    assert nndetection_target_spacing(mixed, [(40, 400, 400)] * 3, anisotropy_threshold=3.2) == pytest.approx(
        (4.0, 1.2, 1.5))


def _nnunet_planner_target(spacings, shapes) -> np.ndarray:
    planner = object.__new__(ExperimentPlanner)  # its __init__ reads a dataset from nnU-Net's folders
    planner.overwrite_target_spacing = None
    planner.anisotropy_threshold = 3
    planner.dataset_fingerprint = {"spacings": spacings, "shapes_after_crop": shapes}
    return planner.determine_fullres_target_spacing()


def test_target_spacing_equals_nnunetv2_planner_when_in_plane_axes_agree() -> None:
    rng = np.random.default_rng(5)
    for _ in range(40):
        n = int(rng.integers(3, 12))
        inplane = rng.uniform(0.5, 1.0, n)
        spacings = np.stack([rng.choice([1.0, 2.5, 5.0, 7.0], n), inplane, inplane], axis=1).tolist()
        shapes = np.stack([rng.integers(20, 300, n), rng.integers(200, 512, n), rng.integers(200, 512, n)], 1)
        ours = nndetection_target_spacing(spacings, shapes.tolist())
        np.testing.assert_allclose(ours, _nnunet_planner_target(spacings, shapes.tolist()))
    # where the other axes differ nnunetv2 (max of the others) and nnDetection (min) part: 3.5 > 3 x 1.0 but
    # not > 3 x 1.2, so nnDetection treats the dataset as anisotropic and nnunetv2 does not
    spacings, shapes = [(3.5, 1.0, 1.2), (3.5, 1.0, 1.2), (1.5, 1.0, 1.2)], [(40, 400, 400)] * 3
    assert nndetection_target_spacing(spacings, shapes)[0] == pytest.approx(1.5 + 0.2 * 2.0)
    assert _nnunet_planner_target(spacings, shapes)[0] == pytest.approx(3.5)


def test_plan_target_spacing_follows_the_rule_and_shapes_follow(tmp_path: Path) -> None:
    spacings = {"a": (3.0, 1.0, 1.0), "b": (1.0, 0.5, 0.8), "c": (2.0, 0.9, 0.6)}
    converted = _dataset(tmp_path / "spacing", {k: _case(spacing=s) for k, s in spacings.items()})
    out = tmp_path / "pre"
    run_preprocessing(converted, out, num_folds=3, seed=0, settings={})
    plan = _plan(out)
    assert plan["target_spacing"] == pytest.approx([2.0, 0.9, 0.8])  # not anisotropic: the median
    # case a: 6 * 3 / 2 = 9, 8 * 1 / 0.9 = 8.9 -> 9, 8 * 1 / 0.8 = 10
    _, _, meta = read_preprocessed_case(out, "a")
    assert meta["shape"] == [9, 9, 10] and meta["original_shape"] == [6, 8, 8] and meta["cropped_shape"] == [6, 8, 8]
    assert meta["spacing"] == pytest.approx([2.0, 0.9, 0.8])
    assert meta["original_spacing"] == pytest.approx(spacings["a"])
    shapes = [read_preprocessed_case(out, c)[2]["shape"] for c in "abc"]
    assert shapes == [[9, 9, 10], [3, 4, 8], [6, 8, 6]]
    assert plan["median_shape"] == [6, 8, 8]
    assert plan["force_separate_z"] is False and plan["anisotropy_threshold"] == 3.0

    run_preprocessing(converted, tmp_path / "override", 3, 0, {"target_spacing": [2.0, 2.0, 2.0]})
    assert _plan(tmp_path / "override")["target_spacing"] == [2.0, 2.0, 2.0]
    assert read_preprocessed_case(tmp_path / "override", "a")[2]["shape"] == [9, 4, 4]


def test_resampled_shape_is_nnunetv2s() -> None:
    assert resampled_shape((10, 64, 64), (2.0, 1.0, 1.0), (1.0, 2.0, 2.0)) == (20, 32, 32)
    assert resampled_shape((3, 3, 3), (1.0, 1.0, 1.0), (10.0, 10.0, 10.0)) == (1, 1, 1)  # never zero
    for shape, spacing, target in [((41, 512, 387), (5.0, 0.7, 0.71), (2.5, 0.8, 0.8)), ((7, 9, 11), (1, 1, 1),
                                                                                       (1.3, 0.7, 2.2))]:
        assert resampled_shape(shape, spacing, target) == tuple(compute_new_shape(shape, spacing, target))


# ---- resampling --------------------------------------------------------------------------------------------
ANISO_SPACING = (5.0, 0.7, 0.7)  # z, y, x


def _anisotropic_case() -> dict:
    shape = (8, 30, 27)
    seg = np.zeros(shape, np.int16)
    seg[2:5, 5:12, 6:15] = 1
    seg[5:7, 18:26, 10:20] = 2
    image = RNG.normal(0, 300, size=(1, *shape)).astype(np.float32)
    image[0][seg > 0] += 500
    return {"image": image, "seg": seg, "instances": {1: 0, 2: 0}, "spacing": ANISO_SPACING}


@pytest.mark.parametrize("force_separate_z", [False, None, True])
def test_anisotropic_case_is_resampled_exactly_as_nnunetv2(tmp_path: Path, force_separate_z) -> None:
    case = _anisotropic_case()
    target = [2.5, 1.0, 0.9]
    converted = _dataset(tmp_path / "aniso", {"a": case, "b": _case(shape=(8, 30, 27), spacing=ANISO_SPACING)})
    run_preprocessing(converted, tmp_path / "pre", 2, 0, {"target_spacing": target,
                                                          "force_separate_z": force_separate_z})
    stored, seg, meta = read_preprocessed_case(tmp_path / "pre", "a", mmap=False)
    plan = _plan(tmp_path / "pre")
    expected, label, _ = _nnunet_pipeline(case["image"], case["seg"], ANISO_SPACING, target,
                                          [_ct(plan["normalisation"][0])], force_separate_z)
    np.testing.assert_array_equal(stored, expected)
    np.testing.assert_array_equal(seg, np.maximum(label, 0))
    # the resampling functions alone, against nnunetv2's on the raw array
    new_shape = tuple(compute_new_shape(case["seg"].shape, ANISO_SPACING, target))
    reference = resample_data_or_seg_to_shape(case["image"], new_shape, ANISO_SPACING, target, is_seg=False,
                                              order=3, order_z=0, force_separate_z=force_separate_z)
    np.testing.assert_array_equal(resample_image(case["image"], new_shape, ANISO_SPACING, target, force_separate_z),
                                  reference)
    reference_seg = resample_data_or_seg_to_shape(case["seg"][None], new_shape, ANISO_SPACING, target, is_seg=True,
                                                  order=0, order_z=0, force_separate_z=force_separate_z)[0]
    np.testing.assert_array_equal(
        resample_instance_map(case["seg"], new_shape, ANISO_SPACING, target, force_separate_z), reference_seg)
    if force_separate_z is not False:
        # "separate z": order 0 along z, so z 5 mm -> 2.5 mm repeats every slice twice (edge-aligned grid)
        raw = resample_image(case["image"], new_shape, ANISO_SPACING, target, force_separate_z)
        np.testing.assert_array_equal(raw[:, 0::2], raw[:, 1::2])
    else:  # nnDetection's default: the cubic spline along z too, new slices differ from their neighbours
        assert not np.allclose(stored[:, 0::2], stored[:, 1::2])
    assert meta["boxes"] == boxes_from_instance_map(np.asarray(seg))[1].tolist()


def test_resample_image_is_skimages_resize_without_separate_z() -> None:
    # nnunetv2 resamples each channel with skimage's resize (edge mode, no anti-aliasing); the project's grid
    # convention (edge-aligned, voxel centres at (j + 0.5) * r - 0.5) is skimage's
    image = RNG.normal(size=(2, 7, 9, 11)).astype(np.float32)
    new_shape = (10, 5, 13)
    expected = np.stack([resize(c.astype(np.float64), new_shape, order=3, mode="edge", anti_aliasing=False)
                         for c in image]).astype(np.float32)
    np.testing.assert_array_equal(resample_image(image, new_shape), expected)
    # and scipy's zoom on that grid agrees away from the borders
    factors = np.asarray(new_shape) / np.asarray(image.shape[1:])
    zoomed = np.stack([ndimage.zoom(c, factors, order=3, mode="nearest", grid_mode=True) for c in image])
    np.testing.assert_allclose(resample_image(image, new_shape)[:, 2:-2, 1:-1, 2:-2], zoomed[:, 2:-2, 1:-1, 2:-2],
                               rtol=1e-4, atol=1e-4)


def test_resample_instance_map_takes_the_nearest_voxel_on_the_edge_aligned_grid() -> None:
    seg = np.arange(6, dtype=np.int16).reshape(6, 1, 1)
    # 6 -> 4: new centres at 0.75, 2.25, 3.75, 5.25 (old voxel units, edges at integers) -> voxels 0, 2, 3, 5
    assert resample_instance_map(seg, (4, 1, 1)).ravel().tolist() == [0, 2, 3, 5]
    # 3 -> 6: every old voxel twice
    assert resample_instance_map(seg[:3], (6, 1, 1)).ravel().tolist() == [0, 0, 1, 1, 2, 2]
    # 6 -> 3: centres 1, 3, 5 (exactly on voxels, no ties)
    assert resample_instance_map(seg, (3, 1, 1)).ravel().tolist() == [1, 3, 5]


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


# ---- cropping ------------------------------------------------------------------------------------------------
def _padded_ct(shape=(14, 40, 36), body=((3, 11), (6, 33), (4, 30))) -> dict:
    """A CT case inside a zero-valued margin (what a scanner's reconstruction pads outside its field of view),
    with air (-1000 HU) inside the body's box and a lesion."""
    image = np.zeros((1, *shape), np.int16)
    values = RNG.integers(-1000, 300, size=tuple(b - a for a, b in body))
    values[values == 0] = 1
    image[0][tuple(slice(a, b) for a, b in body)] = values
    seg = np.zeros(shape, np.int16)
    seg[6:9, 15:22, 10:16] = 1
    image[0][seg > 0] = RNG.integers(40, 120, size=int((seg > 0).sum()))
    return {"image": image, "seg": seg, "instances": {1: 0}, "spacing": (2.0, 0.8, 0.8)}


def test_ct_with_a_margin_is_cropped_as_nnunetv2_crops_it(tmp_path: Path) -> None:
    case, other = _padded_ct(), _padded_ct()
    converted = _dataset(tmp_path / "margin", {"a": case, "b": other})
    target = [2.0, 1.2, 1.2]
    run_preprocessing(converted, tmp_path / "pre", 2, 0, {"target_spacing": target})
    stored, seg, meta = read_preprocessed_case(tmp_path / "pre", "a", mmap=False)
    _, _, bbox = nnunet_crop_to_nonzero(case["image"].astype(np.float32), case["seg"][None].astype(np.int32))
    assert meta["crop_bbox"] == [[3, 11], [6, 33], [4, 30]] == [list(b) for b in bbox]
    assert meta["cropped_shape"] == [8, 27, 26] and meta["original_shape"] == [14, 40, 36]
    plan = _plan(tmp_path / "pre")
    expected, label, _ = _nnunet_pipeline(case["image"], case["seg"], case["spacing"], target,
                                          [_ct(plan["normalisation"][0])])
    np.testing.assert_array_equal(stored, expected)
    np.testing.assert_array_equal(seg, np.maximum(label, 0))
    assert plan["median_relative_size_after_crop"] == pytest.approx(8 * 27 * 26 / (14 * 40 * 36))
    # the CT statistics are nnunetv2's fingerprint: its foreground samples of both cropped cases, pooled
    pooled = []
    for spec in (case, other):
        data, label_map, _ = nnunet_crop_to_nonzero(spec["image"].astype(np.float32), spec["seg"][None].astype(int))
        pooled.append(DatasetFingerprintExtractor.collect_foreground_intensities(label_map, data, num_samples=10_000)[0][0])
    pooled = np.concatenate(pooled).astype(np.float64)
    scheme = plan["normalisation"][0]
    lower, upper = np.percentile(pooled, [0.5, 99.5])
    assert [scheme[k] for k in ("lower", "upper", "mean", "std")] == pytest.approx(
        [lower, upper, pooled.mean(), pooled.std()])
    assert 40 <= scheme["lower"] <= scheme["upper"] <= 119  # inside the lesion's intensities, by construction


def test_air_is_not_zero_so_nnunet_crops_nothing(tmp_path: Path) -> None:
    case = _padded_ct()
    case["image"][case["image"] == 0] = -1000  # the same scan with its margin as air instead of padding
    converted = _dataset(tmp_path / "air", {"a": case, "b": _case(shape=(14, 40, 36))})
    run_preprocessing(converted, tmp_path / "pre", 2, 0, {"target_spacing": [2.0, 0.8, 0.8]})
    meta = read_preprocessed_case(tmp_path / "pre", "a")[2]
    _, _, bbox = nnunet_crop_to_nonzero(case["image"].astype(np.float32))
    assert meta["crop_bbox"] == [[0, 14], [0, 40], [0, 36]] == [list(b) for b in bbox]


# ---- normalisation ---------------------------------------------------------------------------------------------
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


def test_mri_channels_get_nnunets_per_case_zscore(tmp_path: Path) -> None:
    seg = np.zeros((6, 8, 8), np.int16)
    seg[2:4, 2:4, 2:4] = 1
    cases = {name: _case(channels=2, seg=seg, instances={1: 0}) for name in "ab"}
    converted = _dataset(tmp_path / "multi", cases, modalities=("CT", "MRI"))
    run_preprocessing(converted, tmp_path / "pre", 2, 0, {})
    plan = _plan(tmp_path / "pre")
    assert plan["modalities"] == ["CT", "MRI"]
    assert plan["normalisation"][1] == {"scheme": "zscore", "use_mask_for_norm": False}  # nothing was cropped
    for name, spec in cases.items():
        stored, _, _ = read_preprocessed_case(tmp_path / "pre", name)
        mri = spec["image"][1].astype(np.float64)
        np.testing.assert_allclose(stored[1], (mri - mri.mean()) / mri.std(), rtol=1e-5, atol=1e-5)


def test_mri_with_a_large_zero_margin_normalises_inside_the_mask(tmp_path: Path) -> None:
    # cropping keeps under 3/4 of each case: nnU-Net's (and nnDetection's) rule turns the mask on for the z-score
    cases = {}
    for name in "ab":
        image = np.zeros((1, 10, 20, 20), np.float32)
        yy, xx = np.mgrid[:20, :20]
        disc = (yy - 9.5) ** 2 + (xx - 9.5) ** 2 <= 8**2  # zero corners stay inside the crop box
        image[0, 1:9][:, disc] = RNG.uniform(50, 500, size=(8, int(disc.sum())))
        seg = np.zeros((10, 20, 20), np.int16)
        seg[3:5, 8:12, 8:12] = 1
        cases[name] = {"image": image, "seg": seg, "instances": {1: 0}, "spacing": (1.0, 1.0, 1.0)}
    run_preprocessing(_dataset(tmp_path / "mri", cases, modalities=("MRI",)), tmp_path / "pre", 2, 0, {})
    plan = _plan(tmp_path / "pre")
    assert plan["median_relative_size_after_crop"] == pytest.approx(8 * 16 * 16 / (10 * 20 * 20))
    assert plan["normalisation"] == [{"scheme": "zscore", "use_mask_for_norm": True}]
    stored, _, meta = read_preprocessed_case(tmp_path / "pre", "a", mmap=False)
    expected, label, _ = _nnunet_pipeline(cases["a"]["image"], cases["a"]["seg"], (1, 1, 1), plan["target_spacing"],
                                          [ZScoreNormalization(True, {})])
    np.testing.assert_array_equal(stored, expected)
    inside = label >= 0
    assert np.all(stored[0][~inside] == 0) and (~inside).sum() > 0
    values = cases["a"]["image"][0][1:9, 2:18, 2:18][inside].astype(np.float64)  # by hand: z-score in the disc
    np.testing.assert_allclose(stored[0][inside], (values - values.mean()) / values.std(), rtol=1e-5, atol=1e-5)


# ---- instances and boxes -----------------------------------------------------------------------------------------
def _vanishing_case() -> dict:
    """8^3 at 1 mm; id 2 is one voxel at an even index, which a 2 mm grid (centres sampled at odd indices)
    misses."""
    seg = np.zeros((8, 8, 8), np.int16)
    seg[0:4, 0:4, 0:4] = 1
    seg[6, 6, 6] = 2
    seg[4:8, 0:2, 4:8] = 3
    image = RNG.integers(-100, 100, size=(1, 8, 8, 8)).astype(np.int16)
    image[image == 0] = 1
    return {"image": image, "seg": seg, "instances": {1: 0, 2: 1, 3: 1}, "spacing": (1.0, 1.0, 1.0)}


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


def test_map_boxes_to_original_hand_worked_ratios_and_crop() -> None:
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
    # the same crop-relative grid inside an image cropped at (2, 1, 4): the box moves by the crop's start,
    # and clipping is to the whole image
    cropped = {**meta, "original_shape": [10, 9, 15], "cropped_shape": [6, 5, 7],
               "crop_bbox": [[2, 8], [1, 6], [4, 11]]}
    np.testing.assert_allclose(map_boxes_to_original(boxes, cropped), [[2.5, 1.0, 3.0, 6.5, 5.0, 4 + 7 / 3]])


def test_boxes_land_on_their_objects_for_an_anisotropic_cropped_oblique_case(tmp_path: Path) -> None:
    """Round trip in world coordinates (the LUNA16 export's style): objects placed at known world centres in a
    5 mm x 0.7 mm x 0.7 mm scan with an oblique direction, a non-trivial origin and a zero margin to crop."""
    shape, spacing = (12, 45, 40), (5.0, 0.7, 0.7)
    body = ((2, 10), (6, 36), (3, 33))  # cropped to 8 x 30 x 30 voxels
    angle = np.deg2rad(30)
    direction = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, -1]])
    origin = (-120.5, 33.25, 410.0)
    image = np.zeros((1, *shape), np.int16)
    image[0][tuple(slice(a, b) for a, b in body)] = -800
    seg = np.zeros(shape, np.int16)
    seg[4:6, 12:21, 9:18] = 1  # whole 3 x 3 in-plane blocks of the crop grid (y 6 + 3k, x 3 + 3k)
    blob = np.zeros(shape, bool)
    zz, yy, xx = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    blob = ((zz - 7) * 5.0) ** 2 + ((yy - 27.3) * 0.7) ** 2 + ((xx - 22.6) * 0.7) ** 2 <= 4.0**2
    seg[blob] = 2
    image[0][seg > 0] = 60
    converted = _dataset(tmp_path / "oblique", {
        "a": {"image": image, "seg": seg, "instances": {1: 0, 2: 0}, "spacing": spacing, "origin": origin,
              "direction": direction.ravel().tolist()},
        "b": _case(shape=shape, spacing=spacing),
    })
    # z upsampled x2 (separate z: order 0), y and x downsampled x3 (odd: sample points on voxel centres)
    run_preprocessing(converted, tmp_path / "pre", 2, 0, {"target_spacing": [2.5, 2.1, 2.1],
                                                         "force_separate_z": None})
    _, stored_seg, meta = read_preprocessed_case(tmp_path / "pre", "a")
    assert meta["crop_bbox"] == [list(b) for b in body] and meta["shape"] == [16, 10, 10]
    mapped = map_boxes_to_original(meta["boxes"], meta)
    original_ids, original_boxes = boxes_from_instance_map(seg)
    # the block instance maps back exactly onto its original box
    np.testing.assert_array_equal(mapped[0], original_boxes[0])
    # the sphere: its mapped box holds its centre, and the world centres agree to within a preprocessed voxel
    centres_world = world_centres(mapped, meta)
    truth_world = world_centres(original_boxes, meta)
    voxel_world = np.abs(direction) @ np.array([2.1, 2.1, 2.5])  # bound of one preprocessed voxel along x, y, z
    assert np.all(np.abs(centres_world - truth_world) <= voxel_world[None, :] + 1e-6)
    sphere_centre = np.array([22.6, 27.3, 7.0])  # x, y, z index
    sphere_world = np.asarray(origin) + direction @ (sphere_centre * np.array([0.7, 0.7, 5.0]))
    assert np.all(np.abs(centres_world[1] - sphere_world) <= voxel_world + 1e-6)
    low, high = mapped[1, :3], mapped[1, 3:]
    assert np.all(low < sphere_centre[::-1]) and np.all(sphere_centre[::-1] < high)
    # world coordinates as SimpleITK gives them for the converted image: the block's centre, voxel (4.5, 16, 13)
    reference = sitk.ReadImage(str(converted / "labelsTr" / "a.nii.gz"))
    np.testing.assert_allclose(centres_world[0], reference.TransformContinuousIndexToPhysicalPoint((13.0, 16.0, 4.5)),
                               atol=1e-4)


# ---- stored outputs --------------------------------------------------------------------------------------------
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
                         "median_shape", "box_sizes", "force_separate_z", "crop_to_nonzero", "splits"}
    assert plan["num_classes"] == 2 and plan["class_names"] == ["hyperdense_lesion", "hypodense_lesion"]
    assert json.loads((out / "splits.json").read_text()) == make_splits(case_ids, 2)  # nnU-Net's seed
    assert plan["splits"] == {"source": "generate_crossval_split", "seed": 12345}
    assert sorted(p.name for p in out.iterdir()) == ["cases", "plan.json", "splits.json"]
    assert not work_folder(out).exists()
    all_sizes = []
    for case in case_ids:
        image, seg, meta = read_preprocessed_case(out, case)
        assert isinstance(image, np.memmap) and image.dtype == np.float32 and image.shape == (1, 32, 21, 21)
        assert seg.dtype == np.int16 and seg.shape == (32, 21, 21) and seg.min() >= 0
        assert set(meta) >= {"instances", "boxes", "labels", "original_shape", "original_spacing", "spacing",
                             "shape", "origin", "direction", "foreground_locations", "crop_bbox", "cropped_shape"}
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


def test_plan_is_written_last_and_progress_is_shown_per_case(tmp_path: Path, monkeypatch, capsys) -> None:
    converted = _dataset(tmp_path / "order", {"a": _vanishing_case(), "b": _case(shape=(8, 8, 8))})
    written = []
    original = preprocessing.write_json

    def recording_write_json(path, data):
        written.append(Path(path).name)
        original(path, data)

    monkeypatch.setattr(preprocessing, "write_json", recording_write_json)
    run_preprocessing(converted, tmp_path / "pre", 2, 0, {})
    assert written[-1] == "plan.json" and "splits.json" in written and "a.json" in written
    err = capsys.readouterr().err
    assert "preprocess order" in err  # tqdm's bar names the dataset
    assert "preprocess order: a [8, 8, 8] -> crop [8, 8, 8] -> [8, 8, 8] (3 boxes" in err
    assert "preprocess order: b [8, 8, 8]" in err


# ---- resumable output ------------------------------------------------------------------------------------------
def _resumable_dataset(root: Path, num_cases: int = 6) -> Path:
    return _dataset(root, {f"c{i}": _case(shape=(10, 12, 12), spacing=(2.0, 1.0, 1.0)) for i in range(num_cases)})


def _count_case_reads(monkeypatch) -> list[str]:
    """Record the cases read from the converted dataset (in this process: num_workers 1)."""
    reads: list[str] = []
    original = preprocessing.read_case

    def counting(root, case, *args, **kwargs):
        reads.append(case)
        return original(root, case, *args, **kwargs)

    monkeypatch.setattr(preprocessing, "read_case", counting)
    return reads


def test_a_failure_leaves_no_output_and_a_rerun_does_only_the_rest(tmp_path: Path, monkeypatch) -> None:
    converted = _resumable_dataset(tmp_path / "fail")
    original = preprocessing._preprocess_case

    def broken(case, **kwargs):
        if case == "c3":
            raise RuntimeError(f"cannot preprocess {case}")
        return original(case, **kwargs)

    monkeypatch.setattr(preprocessing, "_preprocess_case", broken)
    with pytest.raises(RuntimeError, match="cannot preprocess c3"):
        run_preprocessing(converted, tmp_path / "pre", 2, 0, {})
    assert not (tmp_path / "pre").exists()
    partial = work_folder(tmp_path / "pre")
    assert sorted(p.name for p in (partial / "cases").glob("*.json")) == ["c0.json", "c1.json", "c2.json"]

    monkeypatch.setattr(preprocessing, "_preprocess_case", original)
    reads = _count_case_reads(monkeypatch)
    run_preprocessing(converted, tmp_path / "pre", 2, 0, {})
    assert reads == ["c3", "c4", "c5"]  # fingerprints and the first three cases were kept
    run_preprocessing(converted, tmp_path / "fresh", 2, 0, {})
    for path in sorted((tmp_path / "fresh").rglob("*")):
        if path.is_file():
            twin = tmp_path / "pre" / path.relative_to(tmp_path / "fresh")
            assert path.read_bytes() == twin.read_bytes(), path.name
    assert not partial.exists()


KILLABLE = """
import sys, time
from pretrain_det3d.data import preprocessing
slow = preprocessing._preprocess_case
def slowly(case, **kwargs):
    out = slow(case, **kwargs)
    time.sleep(0.4)
    return out
preprocessing._preprocess_case = slowly
preprocessing.run_preprocessing(sys.argv[1], sys.argv[2], 2, 0, {})
"""


def test_killing_preprocessing_half_way_then_rerunning_processes_only_the_missing_cases(
        tmp_path: Path, monkeypatch) -> None:
    converted = _resumable_dataset(tmp_path / "kill", num_cases=8)
    out = tmp_path / "pre"
    script = tmp_path / "killable.py"
    script.write_text(KILLABLE)
    process = subprocess.Popen([sys.executable, str(script), str(converted), str(out)], start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cases = work_folder(out) / "cases"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(cases.glob("*.json"))) < 3 and process.poll() is None:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # as SLURM ends a job past its time limit
    process.wait()
    done = sorted(p.stem for p in cases.glob("*.json"))
    assert 3 <= len(done) < 8 and not out.exists()

    reads = _count_case_reads(monkeypatch)
    run_preprocessing(converted, out, 2, 0, {})
    missing = [f"c{i}" for i in range(8) if f"c{i}" not in done]
    assert reads == missing
    assert sorted(p.stem for p in (out / "cases").glob("*.json")) == [f"c{i}" for i in range(8)]
    run_preprocessing(converted, tmp_path / "fresh", 2, 0, {})
    for name in ("plan.json", "splits.json", *[f"cases/c{i}{s}" for i in range(8) for s in (".npy", "_seg.npy")]):
        assert (out / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes(), name


def test_a_changed_setting_or_dataset_discards_the_partial_work(tmp_path: Path, monkeypatch) -> None:
    converted = _resumable_dataset(tmp_path / "changed", num_cases=3)
    original = preprocessing._preprocess_case

    def broken(case, **kwargs):
        if case == "c2":
            raise RuntimeError("stop")
        return original(case, **kwargs)

    monkeypatch.setattr(preprocessing, "_preprocess_case", broken)
    with pytest.raises(RuntimeError):
        run_preprocessing(converted, tmp_path / "pre", 2, 0, {})
    monkeypatch.setattr(preprocessing, "_preprocess_case", original)
    reads = _count_case_reads(monkeypatch)
    run_preprocessing(converted, tmp_path / "pre", 2, 0, {"target_spacing": [2.0, 2.0, 2.0]})
    assert reads == ["c0", "c1", "c2"] * 2  # fingerprint and preprocessing of every case again
    assert read_preprocessed_case(tmp_path / "pre", "c0")[2]["shape"] == [10, 6, 6]


# ---- settings and splits -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("num_folds", "settings", "message"),
    [
        (3, {}, r"num_folds \(3\) is larger than the number of cases \(2\)"),
        (2, {"target_spacing": [1.0, 1.0]}, "preprocessing settings key 'target_spacing'"),
        (2, {"num_workers": 0}, "preprocessing settings key 'num_workers'"),
        (2, {"force_separate_z": "yes"}, "preprocessing settings key 'force_separate_z'"),
        (2, {"memory_gb": 0}, "preprocessing settings key 'memory_gb'"),
    ],
)
def test_bad_requests_fail_before_writing(tmp_path: Path, num_folds: int, settings: dict, message: str) -> None:
    converted = _dataset(tmp_path / "bad", {"a": _case(), "b": _case()})
    with pytest.raises(ValueError, match=message):
        run_preprocessing(converted, tmp_path / "pre", num_folds, 0, settings)
    assert not (tmp_path / "pre").exists() and not work_folder(tmp_path / "pre").exists()


def test_a_splits_file_is_used_verbatim_and_a_bad_one_refused_first(tmp_path: Path) -> None:
    converted = _dataset(tmp_path / "split", {name: _case() for name in "abcd"})
    official = [{"train": ["c", "d"], "val": ["a", "b"]}, {"train": ["a", "b"], "val": ["c", "d"]}]
    assert official != make_splits("abcd", 2)
    (tmp_path / "official.json").write_text(json.dumps(official))
    run_preprocessing(converted, tmp_path / "pre", 2, 0, {"splits_file": str(tmp_path / "official.json")})
    assert json.loads((tmp_path / "pre" / "splits.json").read_text()) == official
    assert _plan(tmp_path / "pre")["splits"] == {"source": str(tmp_path / "official.json"), "seed": None}

    (tmp_path / "bad.json").write_text(json.dumps([{"train": ["c"], "val": ["a", "b", "zz"]},
                                                   {"train": ["a"], "val": ["c"]}]))
    with pytest.raises(SplitsFileError, match=r"bad.json: ids not in the dataset: zz; cases in no validation fold: d"):
        run_preprocessing(converted, tmp_path / "pre_bad", 2, 0, {"splits_file": str(tmp_path / "bad.json")})
    assert not work_folder(tmp_path / "pre_bad").exists()


def test_memory_estimates_bound_a_cases_traced_peak(tmp_path: Path) -> None:
    import tracemalloc

    case = _anisotropic_case()
    case["image"] = np.repeat(case["image"], 2, axis=0)
    converted = _dataset(tmp_path / "memory", {"a": case}, modalities=("CT", "MRI"))
    work = tmp_path / "work"
    (work / "fingerprint").mkdir(parents=True)
    tracemalloc.start()
    try:
        fingerprint = preprocessing._fingerprint_case("a", str(converted), str(work), 10_000, 0)
        fingerprint_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        plan = {"target_spacing": [1.0, 0.7, 0.7], "force_separate_z": None, "anisotropy_threshold": 3.0,
                "normalisation": [{"scheme": "CT", "lower": -1, "upper": 1, "mean": 0, "std": 1},
                                  {"scheme": "zscore"}]}
        meta = preprocessing._preprocess_case("a", str(converted), str(work), plan, 10, 0)
        preprocess_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert fingerprint_peak <= fingerprint_memory_bytes(fingerprint["shape"], 2)
    # separate z here (5 mm / 0.7 mm), the most memory-hungry path
    estimate = preprocess_memory_bytes(meta["cropped_shape"], meta["shape"], 2, meta["original_shape"], True)
    assert preprocess_peak <= estimate



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
    zscored = (array - array.mean()) / array.std()  # per volume, then resampled (skimage's resize as reference)
    new_shape = resampled_shape(array.shape, spacing, (2, 1, 1))
    expected = resize(zscored, new_shape, order=3, mode="edge", anti_aliasing=False)
    np.testing.assert_allclose(v3[0], expected, rtol=1e-4, atol=1e-4)

    (tmp_path / "empty").mkdir()
    with pytest.raises(preprocessing.DatasetFormatError, match="no volumes found"):
        preprocess_corpus(tmp_path / "empty", tmp_path / "pre_empty", {})
