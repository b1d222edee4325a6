"""Tests for inference.detect (`python -m pretrain_det3d detect`): new scans in, boxes in voxel and world
coordinates out, with the folds of a run ensembled.

The coordinate chain is tested with a stub detector that boxes the voxels of a band of intensities (its box comes
from ``boxes_from_instance_map``, so it follows the project's box convention and mirrors exactly), on scans with
an oblique direction matrix, a non-trivial origin and anisotropic spacing; the expected world points are computed
by hand from the geometry (DICOM: ImagePositionPatient + index x spacing x cosines), not through SimpleITK's
transform. One test trains a real tiny Retina U-Net on two folds and runs the command on its output.
"""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from torch import nn

from dicom_fixtures import write_dicom_series
from nifti_fixtures import make_image, write_image
from pretrain_det3d.cli import main
from pretrain_det3d.data.boxes import boxes_from_instance_map
from pretrain_det3d.data.preprocessing import read_preprocessed_case, run_preprocessing
from pretrain_det3d.inference.detect import (
    find_scans,
    load_run,
    preprocess_scan,
    read_scan,
    run_detection,
    scan_geometry,
)
from pretrain_det3d.models.registry import DETECTORS, save_detector

STUB = "detect_test_band"
PLAN = {
    "dataset": "stub",
    "target_spacing": [2.0, 1.5, 1.5],
    "modalities": ["CT"],
    # CT scheme: clip to [-1000, 2000] HU, then (v - 0) / 100: background 0 HU -> 0, 500 HU -> 5, 1000 HU -> 10
    "normalisation": [{"scheme": "CT", "lower": -1000.0, "upper": 2000.0, "mean": 0.0, "std": 100.0}],
    "num_classes": 2,
    "class_names": ["nodule", "mass"],
}
SCORE = 0.9


class BandDetector(nn.Module):
    """Boxes the voxels with ``low < value < high`` in channel 0 of each tile, score 0.9, class ``label``."""

    def __init__(self, in_channels: int = 1, num_classes: int = 2, low: float = 2.5, high: float = 7.5,
                 label: int = 0) -> None:
        super().__init__()
        self.low, self.high, self.label = low, high, label
        self.unused = nn.Parameter(torch.zeros(1))  # a state dict to save and load

    def predict(self, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        outputs = []
        for image in images:
            values = image[0].numpy()
            mask = ((values > self.low) & (values < self.high)).astype(np.int16)
            _, boxes = boxes_from_instance_map(mask)
            n = len(boxes)
            outputs.append({"boxes": torch.from_numpy(boxes).float(), "scores": torch.full((n,), SCORE),
                            "labels": torch.full((n,), self.label, dtype=torch.long)})
        return outputs


@pytest.fixture(autouse=True, scope="module")
def registered_stub():
    """The stub detector is registered only while this module's tests run (the catalog test compares registries)."""
    DETECTORS.register(STUB)(BandDetector)
    yield
    DETECTORS._entries.pop(STUB, None)


def _save_run(run_dir: Path, bands: list[tuple[float, float, int]], plan=PLAN, patch=(48, 48, 48),
              extra=None, num_classes: int = 2) -> None:
    """One fold per band, under ``run_dir/fold{k}/model_final.pth``, with the training settings' patch size."""
    for fold, (low, high, label) in enumerate(bands):
        kwargs = {"in_channels": 1, "num_classes": num_classes, "low": low, "high": high, "label": label}
        record_extra = {"fold": fold, "settings": {"patch_size": list(patch)}, **(extra or {})}
        if plan is not None:
            record_extra["preprocessing_plan"] = plan
        save_detector(run_dir / f"fold{fold}" / "model_final.pth", BandDetector(**kwargs), STUB, kwargs, record_extra)


def _rotation() -> np.ndarray:
    """An oblique rotation (about z by 30 degrees, then about x by 20 degrees): every axis is mixed."""
    a, b = np.deg2rad(30.0), np.deg2rad(20.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx


SPACING_XYZ = (0.75, 1.5, 2.0)  # x, y, z mm
ORIGIN_XYZ = (-40.5, 12.25, 101.0)
OBJECT_A = (slice(6, 12), slice(10, 20), slice(8, 30))  # z, y, x voxels; value 500 HU
OBJECT_B = (slice(2, 5), slice(3, 8), slice(36, 44))  # value 1000 HU


def _volume() -> np.ndarray:
    array = np.zeros((16, 24, 48), dtype=np.int16)  # z, y, x
    array[OBJECT_A] = 500
    array[OBJECT_B] = 1000
    return array


def _world(index_zyx, rotation: np.ndarray, spacing_xyz=SPACING_XYZ, origin_xyz=ORIGIN_XYZ) -> np.ndarray:
    """Hand-computed physical point of a continuous voxel index: origin + R @ (spacing * index), in x, y, z."""
    index_xyz = np.asarray(index_zyx, dtype=np.float64)[::-1]
    return np.asarray(origin_xyz) + rotation @ (np.asarray(spacing_xyz) * index_xyz)


def _centre_index(obj) -> list[float]:
    return [(s.start + s.stop - 1) / 2.0 for s in obj]


def _index_of(point_xyz, rotation: np.ndarray, spacing_xyz=SPACING_XYZ, origin_xyz=ORIGIN_XYZ) -> np.ndarray:
    """Inverse of :func:`_world`: continuous index (z, y, x) of a physical point."""
    return ((rotation.T @ (np.asarray(point_xyz) - np.asarray(origin_xyz))) / np.asarray(spacing_xyz))[::-1]


def _check_detection(det: dict, obj, rotation: np.ndarray, **geometry) -> None:
    """World centre = the object's centre (hand-computed), and the world corners enclose the object's voxels
    with at most one voxel of margin beyond its faces (half a voxel under either box convention)."""
    # (DICOM stores positions and cosines with 6 decimals)
    np.testing.assert_allclose(det["centre_world_xyz"], _world(_centre_index(obj), rotation, **geometry), atol=1e-4)
    low = _index_of(det["corner_min_world_xyz"], rotation, **geometry)
    high = _index_of(det["corner_max_world_xyz"], rotation, **geometry)
    first = np.array([s.start for s in obj], dtype=float)
    last = np.array([s.stop - 1 for s in obj], dtype=float)
    assert np.all(low <= first - 0.5 + 1e-4) and np.all(low >= first - 1 - 1e-4), (low, first)
    assert np.all(high >= last + 0.5 - 1e-4) and np.all(high <= last + 1 + 1e-4), (high, last)


# ---------------------------------------------------------------------------------------------- coordinates
def test_nifti_world_coordinates_land_on_the_objects(tmp_path) -> None:
    rotation = _rotation()
    # no resampling (target = scan spacing), so the preprocessed box is the object's own box: exact centres
    plan = {**PLAN, "target_spacing": [SPACING_XYZ[2], SPACING_XYZ[1], SPACING_XYZ[0]]}
    _save_run(tmp_path / "run", [(2.5, 7.5, 0), (7.5, 1e9, 1)], plan=plan, patch=(16, 24, 48))
    write_image(tmp_path / "scans" / "patient_0000.nii.gz",
                make_image(_volume(), SPACING_XYZ, ORIGIN_XYZ, rotation.ravel().tolist()))
    failures = run_detection(tmp_path / "run", tmp_path / "scans", tmp_path / "out", png_score=0.3)
    assert failures == []

    record = json.loads((tmp_path / "out" / "patient.json").read_text())  # "_0000" is a channel suffix
    assert record["folds"] == [0, 1] and record["detector"] == STUB
    by_class = {det["class_name"]: det for det in record["detections"]}
    assert sorted(by_class) == ["mass", "nodule"]  # class names from the plan (the dataset.json labels)
    _check_detection(by_class["nodule"], OBJECT_A, rotation)
    _check_detection(by_class["mass"], OBJECT_B, rotation)
    # the voxel box covers exactly the object's voxels in the scan's own grid
    box = np.array(by_class["nodule"]["box_voxel_zyx"])
    _, expected = boxes_from_instance_map((_volume() == 500).astype(np.int16))
    np.testing.assert_allclose(box, expected[0], atol=1e-6)
    # each object is seen by one fold out of two: WBC damps it as if the other fold voted 0 (hand-worked:
    # 8 mirrorings x score 0.9 with match weight 1, 16 sources expected -> 8 * 0.9 / (8 + 8 * 1) = 0.45)
    assert by_class["nodule"]["score"] == pytest.approx(0.45) and by_class["mass"]["score"] == pytest.approx(0.45)
    assert record["boxes"] == [d["box_voxel_zyx"] for d in record["detections"]]
    assert record["world_centres"] == [d["centre_world_xyz"] for d in record["detections"]]

    with (tmp_path / "out" / "detections.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 and {r["scan"] for r in rows} == {"patient"}
    row = next(r for r in rows if r["class_name"] == "nodule")
    np.testing.assert_allclose([float(row[f"centre_{a}_mm"]) for a in "xyz"], by_class["nodule"]["centre_world_xyz"])
    for det in record["detections"]:  # both above --png-score 0.3
        png = plt_read(tmp_path / "out" / det["png"])
        assert png.shape[0] > 100 and png.shape[1] > 300
        red = (png[..., 0] > 0.8) & (png[..., 1] < 0.3) & (png[..., 2] < 0.3)
        assert red.sum() > 50  # the box outline is drawn


def plt_read(path: Path) -> np.ndarray:
    import matplotlib.image

    return matplotlib.image.imread(str(path))


def test_fold_selection_and_ensembling(tmp_path) -> None:
    plan = {**PLAN, "target_spacing": [SPACING_XYZ[2], SPACING_XYZ[1], SPACING_XYZ[0]]}
    _save_run(tmp_path / "run", [(2.5, 7.5, 0), (7.5, 1e9, 1)], plan=plan, patch=(16, 24, 48))
    write_image(tmp_path / "scan.nii.gz", make_image(_volume(), SPACING_XYZ, ORIGIN_XYZ, np.eye(3).ravel().tolist()))
    run_detection(tmp_path / "run", tmp_path / "scan.nii.gz", tmp_path / "one", folds=[0],
                  settings={"mirror": False})
    record = json.loads((tmp_path / "one" / "scan.json").read_text())
    assert record["folds"] == [0]
    assert [d["class_name"] for d in record["detections"]] == ["nodule"]
    assert record["scores"] == [pytest.approx(SCORE)]  # one source, found: the score itself
    with pytest.raises(FileNotFoundError, match=r"fold\(s\) \[3\]"):
        run_detection(tmp_path / "run", tmp_path / "scan.nii.gz", tmp_path / "x", folds=[3])


def test_resampled_scan_still_lands_inside_the_object(tmp_path) -> None:
    """With resampling (plan spacing 2 x 1.5 x 1.5 mm against 2 x 1.5 x 0.75 mm), the centre moves by less than a
    preprocessed voxel and stays inside the object."""
    rotation = _rotation()
    _save_run(tmp_path / "run", [(2.5, 7.5, 0)])
    write_image(tmp_path / "a.nii.gz", make_image(_volume(), SPACING_XYZ, ORIGIN_XYZ, rotation.ravel().tolist()))
    assert run_detection(tmp_path / "run", tmp_path / "a.nii.gz", tmp_path / "out", settings={"mirror": False}) == []
    (det,) = json.loads((tmp_path / "out" / "a.json").read_text())["detections"]
    centre = np.asarray(det["centre_world_xyz"])
    assert np.linalg.norm(centre - _world(_centre_index(OBJECT_A), rotation)) < 1.5
    index = np.rint(_index_of(centre, rotation)).astype(int)
    assert _volume()[tuple(index)] == 500


def test_dicom_series_world_coordinates(tmp_path) -> None:
    rotation = _rotation()
    row, column = rotation[:, 0], rotation[:, 1]  # DICOM's row / column cosines; the normal is their cross product
    spacing = (0.75, 1.5, 2.0)
    origin = (10.0, -20.0, 35.5)
    array = _volume()
    n = array.shape[0]
    plan = {**PLAN, "target_spacing": [spacing[2], spacing[1], spacing[0]]}
    _save_run(tmp_path / "run", [(2.5, 7.5, 0), (7.5, 1e9, 1)], plan=plan, patch=(16, 24, 48))
    # two series in one folder (two scans), files named out of order; a second folder with a third series
    write_dicom_series(tmp_path / "in" / "study", array, spacing, origin, row, column, "1.2.3.4.1",
                       [f"1.2.3.4.1.{k}" for k in range(n)], list(range(1, n + 1)),
                       [f"s1_{(k * 7) % n:03d}.dcm" for k in range(n)])
    write_dicom_series(tmp_path / "in" / "study", array[::-1].copy(), spacing, origin, row, column, "1.2.3.4.2",
                       [f"1.2.3.4.2.{k}" for k in range(n)], list(range(1, n + 1)), [f"s2_{k:03d}.dcm" for k in range(n)])
    scans = find_scans(tmp_path / "in")
    assert sorted(s.series_uid for s in scans) == ["1.2.3.4.1", "1.2.3.4.2"] and len({s.name for s in scans}) == 2
    (single,) = find_scans(tmp_path / "in" / "study" / "s2_003.dcm")  # one slice names its series
    assert single.series_uid == "1.2.3.4.2" and len(single.channels) == n
    assert run_detection(tmp_path / "run", tmp_path / "in", tmp_path / "out", settings={"mirror": False}) == []

    geometry = {"spacing_xyz": spacing, "origin_xyz": origin}
    flipped_a = (slice(n - OBJECT_A[0].stop, n - OBJECT_A[0].start), OBJECT_A[1], OBJECT_A[2])
    for scan in scans:
        record = json.loads((tmp_path / "out" / f"{scan.name}.json").read_text())
        assert record["series_uid"] == scan.series_uid
        nodule = next(d for d in record["detections"] if d["class_name"] == "nodule")
        _check_detection(nodule, OBJECT_A if scan.series_uid.endswith(".1") else flipped_a, rotation, **geometry)


# ---------------------------------------------------------------------------------------------- failures
def test_corrupt_inputs_are_reported_and_skipped(tmp_path, capsys) -> None:
    _save_run(tmp_path / "run", [(2.5, 7.5, 0)])
    scans = tmp_path / "scans"
    write_image(scans / "good.nii.gz", make_image(_volume(), SPACING_XYZ, ORIGIN_XYZ, np.eye(3).ravel().tolist()))
    data = (scans / "good.nii.gz").read_bytes()
    (scans / "cut.nii.gz").write_bytes(data[: len(data) // 2])  # truncated
    (scans / "noise.nii.gz").write_bytes(gzip.compress(b"not an image at all" * 10))
    (scans / "dicom").mkdir()
    (scans / "dicom" / "broken.dcm").write_bytes(b"\x00" * 300)

    with pytest.raises(SystemExit) as exited:
        main(["detect", "--run", str(tmp_path / "run"), "--input", str(scans), "--output", str(tmp_path / "out"),
              "--settings", '{"mirror": false}', "--device", "cpu"])
    assert exited.value.code == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("detect: skipped")]
    assert len(lines) == 3, lines
    for name in ("cut.nii.gz", "noise.nii.gz", "broken.dcm"):
        assert sum(name in line for line in lines) == 1, (name, lines)
    assert any("truncated" in line for line in lines if "cut.nii.gz" in line)
    # the good scan is done; nothing is written for the bad ones, and no temporary is left behind
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["detections.csv", "good.json"]
    assert len(json.loads((tmp_path / "out" / "good.json").read_text())["detections"]) == 1


def test_missing_plan_and_unknown_settings_are_named(tmp_path) -> None:
    _save_run(tmp_path / "run" / "stub", [(2.5, 7.5, 0)], plan=None)
    with pytest.raises(FileNotFoundError, match="--plan"):
        load_run(tmp_path / "run" / "stub")
    (tmp_path / "plan.json").write_text(json.dumps(PLAN))
    assert load_run(tmp_path / "run" / "stub", plan_path=tmp_path / "plan.json").plan["target_spacing"] == [2, 1.5, 1.5]
    with pytest.raises(ValueError, match="'inference.mirorr': unknown key"):
        load_run(tmp_path / "run" / "stub", settings={"mirorr": False}, plan_path=tmp_path / "plan.json")
    with pytest.raises(FileNotFoundError, match="no fold"):
        load_run(tmp_path)


# ---------------------------------------------------------------------------------------------- preprocessing
def test_scans_are_preprocessed_exactly_as_the_training_cases(tmp_path) -> None:
    from pretrain_det3d.data.synthetic import write_synthetic_dataset

    converted, preprocessed = tmp_path / "converted", tmp_path / "preprocessed"
    write_synthetic_dataset(converted, "syn", {"num_cases": 2, "shape": [12, 20, 18], "spacing": [2.5, 1.0, 0.8],
                                               "lesions_per_case": [1, 2], "spacing_jitter": 0.2}, seed=3)
    run_preprocessing(converted, preprocessed, num_folds=2, seed=0, settings={"target_spacing": [2.0, 1.3, 1.1]})
    plan = json.loads((preprocessed / "plan.json").read_text())
    # a run that records only where its preprocessed data lie (older model files) finds the plan there
    _save_run(tmp_path / "run", [(2.5, 7.5, 0)], plan=None, extra={"preprocessed_root": str(preprocessed)},
              num_classes=1)
    run = load_run(tmp_path / "run")
    assert run.plan["normalisation"] == plan["normalisation"] and run.class_names == plan["class_names"]
    for case in plan["case_ids"]:
        (scan,) = find_scans(converted / "imagesTr" / f"{case}_0000.nii.gz")
        assert scan.name == case
        array, reference = read_scan(scan)
        geometry = scan_geometry(reference)
        image, crop = preprocess_scan(array, geometry["original_spacing"], run.plan)
        stored, _, meta = read_preprocessed_case(preprocessed, case, mmap=False)
        np.testing.assert_array_equal(image, stored)
        assert crop == {key: meta[key] for key in ("crop_bbox", "cropped_shape")}
        assert geometry["original_shape"] == meta["original_shape"]
        assert geometry["origin"] == meta["origin"] and geometry["direction"] == meta["direction"]


def test_multichannel_runs_group_channel_files(tmp_path) -> None:
    image = make_image(_volume(), SPACING_XYZ, ORIGIN_XYZ, np.eye(3).ravel().tolist())
    for name in ("a_0000", "a_0001", "b_0000"):
        write_image(tmp_path / f"{name}.nii.gz", image)
    scans = {s.name: s for s in find_scans(tmp_path, num_channels=2)}
    assert [p.name for p in scans["a"].channels] == ["a_0000.nii.gz", "a_0001.nii.gz"] and scans["a"].error is None
    assert "channel(s) [1] missing" in scans["b"].error
    assert read_scan(scans["a"])[0].shape == (2, 16, 24, 48)


@pytest.mark.parametrize("suffix", [".mha", ".mhd", ".nrrd", ".nii"])
def test_other_formats_read_with_their_geometry(tmp_path, suffix) -> None:
    rotation = _rotation()
    image = make_image(_volume(), SPACING_XYZ, ORIGIN_XYZ, rotation.ravel().tolist())
    sitk.WriteImage(image, str(tmp_path / f"scan{suffix}"))
    (scan,) = find_scans(tmp_path)
    assert scan.name == "scan"
    array, reference = read_scan(scan)
    np.testing.assert_array_equal(array[0], _volume())
    geometry = scan_geometry(reference)
    assert geometry["original_spacing"] == [SPACING_XYZ[2], SPACING_XYZ[1], SPACING_XYZ[0]]
    np.testing.assert_allclose(geometry["origin"], ORIGIN_XYZ, atol=1e-5)
    np.testing.assert_allclose(np.reshape(geometry["direction"], (3, 3)), rotation, atol=1e-5)


def test_study_config_and_overrides_set_the_inference_settings(tmp_path) -> None:
    run_dir = tmp_path / "results" / "finetune" / "retina_unet" / "scratch" / "stub"
    _save_run(run_dir, [(2.5, 7.5, 0)], patch=(16, 24, 40))
    config = tmp_path / "config.yaml"
    config.write_text("inference: {mirror: false, overlap: 0.25, batch_size: 3}\n"
                      "detectors: {retina_unet: {patch_size: [8, 8, 8]}}\n")
    run = load_run(run_dir)
    assert run.settings["patch_size"] == (16, 24, 40) and run.settings["mirror"] is True  # release default
    run = load_run(run_dir, config=config, settings={"overlap": 0.4})
    assert run.settings["mirror"] is False and run.settings["batch_size"] == 3 and run.settings["overlap"] == 0.4
    assert run.settings["patch_size"] == (8, 8, 8)  # the study's detector entry, as its predict rule uses


# ---------------------------------------------------------------------------------------------- end to end
def test_tiny_trained_run_end_to_end(tmp_path) -> None:
    """Two folds of a real Retina U-Net trained for two iterations, then the command on a NIfTI of the dataset."""
    from pretrain_det3d.data.synthetic import write_synthetic_dataset
    from pretrain_det3d.models.registry import load_detector
    from pretrain_det3d.training.finetune import run_finetuning

    converted, preprocessed = tmp_path / "converted", tmp_path / "preprocessed"
    write_synthetic_dataset(converted, "syn", {"num_cases": 2, "shape": [16, 24, 24], "spacing": [2.0, 1.0, 1.0],
                                               "lesions_per_case": [1, 2]}, seed=0)
    run_preprocessing(converted, preprocessed, num_folds=2, seed=0, settings={})
    run_dir = tmp_path / "results" / "finetune" / "retina_unet" / "scratch" / "syn"
    settings = {"preset": "resenc_demo", "fpn_channels": 8, "iterations": 2, "warmup_iterations": 1,
                "patch_size": [16, 16, 16], "batch_size": 1, "device": "cpu", "head_strides": [4, 8]}
    for fold in (0, 1):
        run_finetuning(preprocessed, fold, "retina_unet", settings, None, run_dir / f"fold{fold}", seed=0)
    _, record = load_detector(run_dir / "fold0" / "model_final.pth")
    plan = json.loads((preprocessed / "plan.json").read_text())
    assert record["preprocessing_plan"]["normalisation"] == plan["normalisation"]  # finetune records the plan
    assert record["preprocessed_root"] == str(preprocessed)

    scan = converted / "imagesTr" / "syn_0000_0000.nii.gz"
    code = main(["detect", "--run", str(run_dir), "--input", str(scan), "--output", str(tmp_path / "out"),
                 "--png-score", "0", "--settings", '{"mirror": false, "max_detections": 3}'])
    assert code == 0
    result = json.loads((tmp_path / "out" / "syn_0000.json").read_text())
    assert result["folds"] == [0, 1] and result["detector"] == "retina_unet"
    assert 0 < len(result["detections"]) <= 3
    size = sitk.ReadImage(str(scan)).GetSize()[::-1]
    boxes = np.array(result["boxes"])
    assert boxes.min() >= 0 and np.all(boxes[:, 3:] <= np.array(size) + 1e-6)
    assert all(d["class_name"] == plan["class_names"][d["class_index"]] for d in result["detections"])
    assert all((tmp_path / "out" / d["png"]).is_file() for d in result["detections"])
