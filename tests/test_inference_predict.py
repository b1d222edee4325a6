"""Tests for inference.predict: files in, one JSON per case out, converted voxels and world centres."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from pretrain_det3d.data.preprocessing import map_boxes_to_original
from pretrain_det3d.inference.predict import run_prediction, world_centres
from pretrain_det3d.inference.sliding_window import predict_case
from pretrain_det3d.models.registry import build_detector, load_detector, save_detector




SETTINGS = {"patch_size": [16, 16, 16], "overlap": 0.5, "mirror": True, "max_detections": 4}  # else the defaults


def _direction() -> list[float]:
    angle = 0.3  # a rotation about z, so that axis order and direction both matter
    return [np.cos(angle), -np.sin(angle), 0.0, np.sin(angle), np.cos(angle), 0.0, 0.0, 0.0, 1.0]


def _write_case(root, case: str) -> dict:
    cases = root / "cases"
    cases.mkdir(parents=True, exist_ok=True)
    image = np.random.default_rng(1).normal(size=(1, 16, 16, 16)).astype(np.float32)
    np.save(cases / f"{case}.npy", image)
    meta = {
        "shape": [16, 16, 16],
        "original_shape": [12, 32, 16],
        "spacing": [1.0, 1.0, 1.0],
        "original_spacing": [2.0, 0.5, 1.0],
        "origin": [-5.0, 3.0, 7.0],
        "direction": _direction(),
        "boxes": [],
        "labels": [],
        "instances": {},
    }
    (cases / f"{case}.json").write_text(json.dumps(meta))
    return meta


def test_world_centres_match_simpleitk() -> None:
    meta = {"original_spacing": [2.0, 0.5, 1.0], "origin": [-5.0, 3.0, 7.0], "direction": _direction()}
    boxes = np.array([[0.0, 0.0, 0.0, 1.0, 1.0, 1.0], [2.0, 4.0, 6.0, 5.0, 9.0, 7.0]])
    image = sitk.Image([16, 32, 12], sitk.sitkUInt8)  # SimpleITK size is (x, y, z)
    image.SetSpacing(meta["original_spacing"][::-1])
    image.SetOrigin(meta["origin"])
    image.SetDirection(meta["direction"])
    expected = [
        image.TransformContinuousIndexToPhysicalPoint([float(v) for v in ((b[:3] + b[3:]) / 2)[::-1]])
        for b in boxes
    ]
    np.testing.assert_allclose(world_centres(boxes, meta), np.array(expected), atol=1e-9)


def test_run_prediction_writes_converted_voxel_boxes(tmp_path) -> None:
    torch.manual_seed(0)
    model = build_detector(
        "retina_unet", {"preset": "resenc_demo", "fpn_channels": 8, "head_convs": 1, "score_threshold": 0.0}, 1, 1,
        {"box_sizes": [[4, 4, 4]]},
    )
    model_path = tmp_path / "model_final.pth"
    save_detector(model_path, model, "retina_unet", model.build_kwargs, {})
    root = tmp_path / "preprocessed"
    meta = _write_case(root, "case_0")
    out_dir = tmp_path / "predictions"
    run_prediction(model_path, root, ["case_0"], out_dir, SETTINGS)

    written = json.loads((out_dir / "case_0.json").read_text())
    assert set(written) == {"boxes", "scores", "labels", "world_centres"}
    assert 0 < len(written["boxes"]) <= SETTINGS["max_detections"]
    assert len(written["scores"]) == len(written["labels"]) == len(written["world_centres"]) == len(written["boxes"])

    # Same numbers as predicting directly and mapping with the preprocessing's own inverse.
    loaded, _ = load_detector(model_path)
    image = np.load(root / "cases" / "case_0.npy")
    direct = predict_case(loaded, image, [16, 16, 16], 0.5, (0, 1, 2), max_detections=4)
    expected = map_boxes_to_original(direct["boxes"], meta)
    np.testing.assert_allclose(np.array(written["boxes"]), expected, rtol=1e-6, atol=1e-6)
    boxes = np.array(written["boxes"])
    assert boxes.min() >= 0 and np.all(boxes[:, 3:] <= np.array(meta["original_shape"]) + 1e-6)
    np.testing.assert_allclose(np.array(written["world_centres"]), world_centres(boxes, meta))


def test_bad_settings_and_missing_cases_are_named(tmp_path) -> None:
    with pytest.raises(KeyError, match="patch_size"):
        run_prediction(tmp_path / "m.pth", tmp_path, ["a"], tmp_path / "out", {"overlap": 0.5})
    with pytest.raises(ValueError, match=r"'inference.mirorr': unknown key; did you mean 'mirror'"):
        run_prediction(tmp_path / "m.pth", tmp_path, ["a"], tmp_path / "out", {"patch_size": [8, 8, 8], "mirorr": 1})
    torch.manual_seed(0)
    model = build_detector("retina_unet", {"preset": "resenc_demo", "fpn_channels": 8}, 1, 1, {"box_sizes": []})
    save_detector(tmp_path / "m.pth", model, "retina_unet")
    with pytest.raises(FileNotFoundError, match="missing_case.npy"):
        run_prediction(tmp_path / "m.pth", tmp_path, ["missing_case"], tmp_path / "out", {"patch_size": [8, 8, 8]})


@pytest.mark.parametrize("key, value", [("score_threshold", 1.0), ("min_box_size", 1e6), ("wbc_score_threshold", 1.0)])
def test_consolidation_settings_reach_predict_case(tmp_path, key, value) -> None:
    torch.manual_seed(0)
    model = build_detector(
        "retina_unet", {"preset": "resenc_demo", "fpn_channels": 8, "head_convs": 1, "score_threshold": 0.0}, 1, 1,
        {"box_sizes": [[4, 4, 4]]},
    )
    save_detector(tmp_path / "m.pth", model, "retina_unet", model.build_kwargs, {})
    _write_case(tmp_path / "pre", "case_0")
    run_prediction(tmp_path / "m.pth", tmp_path / "pre", ["case_0"], tmp_path / "a", {**SETTINGS, "mirror": False})
    assert len(json.loads((tmp_path / "a" / "case_0.json").read_text())["boxes"]) > 0
    # each of these values removes every box, so the key must have reached the consolidation
    run_prediction(tmp_path / "m.pth", tmp_path / "pre", ["case_0"], tmp_path / "b",
                   {**SETTINGS, "mirror": False, key: value})
    assert json.loads((tmp_path / "b" / "case_0.json").read_text())["boxes"] == []
