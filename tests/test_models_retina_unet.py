"""Tests for models.retina_unet and models.registry (build, losses, overfit, predict, save/load)."""

from __future__ import annotations

import pytest
import torch
from monai.data.box_utils import box_iou

from pretrain_det3d.models.registry import (
    DETECTORS,
    build_detector,
    get_detector_class,
    load_detector,
    save_detector,
)
from pretrain_det3d.models.retina_unet import RetinaUNet, _Head
from pretrain_det3d.utils.registry import UnknownNameError




TINY = {"preset": "resenc_demo", "fpn_channels": 8, "head_convs": 1}
PLAN = {"box_sizes": [[8, 8, 8], [6, 6, 10], [10, 8, 8]]}


def _tiny(seed: int = 0, **overrides) -> RetinaUNet:
    torch.manual_seed(seed)
    return build_detector("retina_unet", {**TINY, **overrides}, 1, 2, PLAN)


def test_forward_shapes_and_anchor_count_at_32() -> None:
    model = _tiny()
    images = torch.randn(2, 1, 32, 32, 32)
    out = model(images)
    assert model.head_strides == [4, 8]
    locations = (32 // 4) ** 3 + (32 // 8) ** 3
    n_anchors = locations * 3
    assert out["cls"].shape == (2, n_anchors, 2)
    assert out["reg"].shape == (2, n_anchors, 6)
    assert out["seg"].shape == (2, 2, 32, 32, 32)
    anchors, per_level = model.anchors(images, out["head_features"])
    assert anchors.shape == (n_anchors, 6) and per_level == [512, 64]
    # First anchor of level 0 sits at the centre of the first stride-4 cell (MONAI: stride // 2).
    centre = (anchors[0, :3] + anchors[0, 3:]) / 2
    torch.testing.assert_close(centre, torch.full((3,), 2.0))
    with pytest.raises(ValueError, match="divisible"):
        model(torch.zeros(1, 1, 20, 32, 32))


def test_head_flattening_follows_monai_anchor_order() -> None:
    # Zero weights + bias = channel index: the flat row (location, anchor) must hold anchor*K + class.
    head = _Head(channels=4, num_anchors=3, out_per_anchor=2, num_convs=0)
    with torch.no_grad():
        head.out.weight.zero_()
        head.out.bias.copy_(torch.arange(6, dtype=torch.float32))
    flat = head([torch.zeros(1, 4, 2, 3, 4)])
    assert flat.shape == (1, 2 * 3 * 4 * 3, 2)
    expected = torch.arange(6, dtype=torch.float32).view(3, 2).repeat(2 * 3 * 4, 1)
    assert torch.equal(flat[0], expected)


def test_losses_are_finite_and_reach_every_part() -> None:
    model = _tiny()
    images = torch.randn(2, 1, 32, 32, 32)
    seg = torch.zeros(2, 1, 32, 32, 32, dtype=torch.long)
    seg[0, :, 8:16, 8:16, 8:16] = 1
    targets = [
        {"boxes": torch.tensor([[8.0, 8.0, 8.0, 16.0, 16.0, 16.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.zeros(0, 6), "labels": torch.zeros(0, dtype=torch.long)},  # an empty patch
    ]
    losses = model.compute_losses(images, targets, seg)
    assert set(losses) >= {"loss", "cls", "reg", "seg"}
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["reg"] > 0
    losses["loss"].backward()
    with pytest.raises(ValueError, match="label"):
        model.compute_losses(images, [targets[0], {"boxes": torch.zeros(1, 6) + 4, "labels": torch.tensor([2])}], seg)
    for name in ("encoder.stem.convs.0.conv.weight", "cls_head.out.weight", "reg_head.out.weight", "seg_head.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_overfits_one_bright_cube() -> None:
    torch.manual_seed(0)
    model = build_detector("retina_unet", TINY, 1, 1, {"box_sizes": [[8, 8, 8]]})
    noise = torch.Generator().manual_seed(0)
    images = torch.randn(1, 1, 24, 24, 24, generator=noise) * 0.3
    images[:, :, 6:14, 5:13, 9:17] += 2.0
    box = torch.tensor([[6.0, 5.0, 9.0, 14.0, 13.0, 17.0]])
    seg = torch.zeros(1, 1, 24, 24, 24, dtype=torch.long)
    seg[:, :, 6:14, 5:13, 9:17] = 1
    targets = [{"boxes": box, "labels": torch.tensor([0])}]
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(40):
        losses = model.compute_losses(images, targets, seg)
        optimiser.zero_grad()
        losses["loss"].backward()
        optimiser.step()
    prediction = model.predict(images)[0]
    assert len(prediction["boxes"]) > 0
    best = prediction["scores"].argmax()
    assert float(box_iou(prediction["boxes"][best : best + 1], box)) > 0.5
    assert int(prediction["labels"][best]) == 0


def test_predict_keeps_at_most_max_detections_sorted_by_score() -> None:
    model = _tiny(max_detections=5, score_threshold=0.0, nms_iou=0.9)
    predictions = model.predict(torch.randn(2, 1, 32, 32, 32))
    assert len(predictions) == 2
    for prediction in predictions:
        assert len(prediction["boxes"]) == len(prediction["scores"]) == len(prediction["labels"]) == 5
        assert prediction["boxes"].shape[1] == 6
        assert torch.all(prediction["scores"][:-1] >= prediction["scores"][1:])
        assert prediction["boxes"].min() >= 0 and prediction["boxes"].max() <= 32


def test_registry_builds_saves_and_loads_weights_only(tmp_path) -> None:
    assert "retina_unet" in DETECTORS and get_detector_class("retina_unet") is RetinaUNet
    with pytest.raises(UnknownNameError, match="retina_unet"):
        get_detector_class("yolo3d")
    model = _tiny()
    assert model.build_kwargs["anchor_shapes"] and model.build_kwargs["head_strides"] == [4, 8]
    path = tmp_path / "model_final.pth"
    save_detector(path, model, "retina_unet", model.build_kwargs, {"fold": 0})
    record = torch.load(path, weights_only=True)
    assert record["detector"] == "retina_unet" and record["fold"] == 0
    loaded, record = load_detector(path)
    images = torch.randn(1, 1, 32, 32, 32)
    model.eval(), loaded.eval()
    torch.testing.assert_close(loaded(images)["cls"], model(images)["cls"])
    with pytest.raises(KeyError, match="preset"):
        build_detector("retina_unet", {}, 1, 1, PLAN)


def test_box_between_anchor_centres_still_gets_an_anchor_also_under_autocast() -> None:
    # An 8^3 box at [8, 16)^3 with 8^3 anchors every 4 voxels: ATSS's threshold (mean + std of tied
    # candidates) exceeds every candidate IoU, so MONAI's matcher alone matches nothing.
    torch.manual_seed(0)
    model = build_detector("retina_unet", TINY, 1, 1, {"box_sizes": [[8, 8, 8]]})
    images = torch.randn(1, 1, 32, 32, 32)
    box = torch.tensor([[8.0, 8.0, 8.0, 16.0, 16.0, 16.0]])
    anchors, locations = model.anchors(images, model(images)["head_features"])
    _, raw = model.matcher.compute_matches(box, anchors, locations, model.num_anchors_per_location)
    assert int((raw >= 0).sum()) == 0
    seg = torch.zeros(1, 1, 32, 32, 32, dtype=torch.long)
    targets = [{"boxes": box, "labels": torch.tensor([0])}]
    assert model.compute_losses(images, targets, seg)["reg"] > 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model.compute_losses(images, targets, seg)
    assert losses["reg"] > 0 and torch.isfinite(losses["loss"])


def test_registry_generic_rule_for_detectors_without_a_settings_hook(tmp_path) -> None:
    from pretrain_det3d.models.registry import detector_build_kwargs

    @DETECTORS.register("_test_plain_detector")
    class PlainDetector(torch.nn.Module):
        def __init__(self, in_channels: int, num_classes: int, width: int = 4) -> None:
            super().__init__()
            self.encoder = torch.nn.Conv3d(in_channels, width, 1)
            self.num_classes = num_classes

    try:
        kwargs = detector_build_kwargs("_test_plain_detector", {"width": 6, "lr": 0.1}, 2, 3, {})
        assert kwargs == {"width": 6, "in_channels": 2, "num_classes": 3}
        model = build_detector("_test_plain_detector", {"width": 6}, 2, 3, {})
        save_detector(tmp_path / "plain.pth", model, "_test_plain_detector")
        loaded, _ = load_detector(tmp_path / "plain.pth")
        assert torch.equal(loaded.encoder.weight, model.encoder.weight)
    finally:
        DETECTORS._entries.pop("_test_plain_detector", None)  # keep the shared registry clean
