"""Tests for models.retina_unet and models.registry (build, losses, overfit, predict, save/load)."""

from __future__ import annotations

import math

import pytest
import torch

from overfit import fit_and_score, two_overfit_cases
from pretrain_det3d.models.registry import (
    DETECTORS,
    build_detector,
    get_detector_class,
    load_detector,
    save_detector,
)
from pretrain_det3d.models.retina_unet import (
    PositiveCountEMA,
    RetinaUNet,
    UFPN,
    _Head,
    fpn_level_channels,
    release_head_levels,
    resolve_head_strides,
)
from pretrain_det3d.utils.registry import UnknownNameError

# CPU-sized width and the demo's explicit head levels; every loss setting stays the default recipe.
TINY = {"preset": "resenc_demo", "fpn_channels": 8, "head_strides": [4, 8]}
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
    n_anchors = locations * 27  # the release's 3 x 3 x 3 anchor sizes per location
    assert model.num_anchors_per_location == 27
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
    names = ("encoder.stem.convs.0.conv.weight", "decoder.up.0.weight", "cls_head.out.weight", "reg_head.out.weight",
             "reg_head.scales", "seg_head.weight")
    for name in names:
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


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
    # three identical 8^3 anchors per location on level 4, 16^3 on level 8: the ties this case needs
    settings = {**TINY, "anchor_shapes": [[[8.0] * 3] * 3, [[16.0] * 3] * 3]}
    model = build_detector("retina_unet", settings, 1, 1, {"box_sizes": [[8, 8, 8]]})
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


# ------------------------------------------------------------------ the release's recipe, hand-checked


def _focal(logit: float, target: float, alpha: float = 0.75, gamma: float = 1.0) -> float:
    """Sigmoid focal loss of one logit, written out (Lin et al.; nnDetection's focal_loss_with_logits)."""
    p = 1.0 / (1.0 + math.exp(-logit))
    ce = -(target * math.log(p) + (1 - target) * math.log(1 - p))
    p_t = p * target + (1 - p) * (1 - target)
    alpha_t = alpha * target + (1 - alpha) * (1 - target)
    return alpha_t * (1 - p_t) ** gamma * ce


def _smooth_l1(d: float, beta: float = 1.0) -> float:
    return 0.5 * d * d / beta if abs(d) < beta else abs(d) - 0.5 * beta


def test_default_head_levels_follow_the_planner_rule() -> None:
    assert release_head_levels(6) == [2, 3, 4, 5] and release_head_levels(4) == [1, 2, 3]
    assert release_head_levels(5) == [1, 2, 3, 4] and release_head_levels(8) == [2, 3, 4, 5, 6, 7]
    assert resolve_head_strides("resenc_l", None) == [4, 8, 16, 32]
    assert resolve_head_strides("resenc_demo", None) == [2, 4, 8]
    with pytest.raises(ValueError, match="decoder strides"):
        resolve_head_strides("resenc_demo", [4, 16])
    model = build_detector("retina_unet", {"preset": "resenc_demo", "fpn_channels": 8}, 1, 1, PLAN)
    assert model.head_strides == [2, 4, 8] and model.head_levels == [1, 2, 3]


def test_ufpn_widths_transposed_upsampling_and_no_norm() -> None:
    assert fpn_level_channels(6, 2, 128) == [32, 64, 128, 128, 128, 128]
    assert fpn_level_channels(4, 3, 32) == [8, 8, 16, 32]  # 32/8 = 4 is raised to the minimum 8
    model = _tiny()
    assert model.decoder_widths == [8, 8, 8, 8]  # head levels 2, 3 at 8; levels 0, 1 at max(8 / 2^k, 8)
    decoder = model.decoder
    assert not [m for m in decoder.modules() if isinstance(m, (torch.nn.GroupNorm, torch.nn.InstanceNorm3d,
                                                              torch.nn.LeakyReLU))]
    for up in decoder.up:
        assert isinstance(up, torch.nn.ConvTranspose3d) and up.bias is None
        assert up.kernel_size == (2, 2, 2) and up.stride == (2, 2, 2)
    assert all(len(list(m.children())) == 0 and m.kernel_size == (1, 1, 1) for m in decoder.lateral)
    assert all(m.kernel_size == (3, 3, 3) for m in decoder.out)


def test_ufpn_forward_is_lateral_plus_upsampled_merge() -> None:
    # Brute force on a 2-level UFPN: out_l = conv3(lateral_l(x_l) + up(lateral_{l+1}(x_{l+1}))).
    torch.manual_seed(0)
    ufpn = UFPN([3, 5], [1, 2], [4, 6])
    x0, x1 = torch.randn(1, 3, 4, 4, 4), torch.randn(1, 5, 2, 2, 2)
    out = ufpn([x0, x1])
    top = ufpn.lateral[1](x1)
    torch.testing.assert_close(out[1], ufpn.out[1](top))
    torch.testing.assert_close(out[0], ufpn.out[0](ufpn.lateral[0](x0) + ufpn.up[0](top)))
    assert out[0].shape == (1, 4, 4, 4, 4) and out[1].shape == (1, 6, 2, 2, 2)


def test_heads_groupnorm_depth_init_and_learned_scale_per_level() -> None:
    head = _Head(channels=32, num_anchors=2, out_per_anchor=6, num_convs=1, channels_per_group=16, num_levels=2)
    convs = [m for m in head.tower if isinstance(m, torch.nn.Conv3d)]
    norms = [m for m in head.tower if isinstance(m, torch.nn.GroupNorm)]
    assert len(convs) == 2 and all(c.bias is None for c in convs)  # input conv + num_convs 1
    assert len(norms) == 2 and all(n.num_groups == 2 and n.affine for n in norms)  # 16 channels per group
    assert float(head.out.weight.detach().std()) == pytest.approx(0.01, rel=0.2) and torch.all(head.out.bias == 0)
    torch.testing.assert_close(head.scales.detach(), torch.ones(2))
    cls = _Head(channels=32, num_anchors=2, out_per_anchor=1, num_convs=1, prior=0.01)
    torch.testing.assert_close(cls.out.bias.detach(), torch.full((2,), -math.log(99.0)))
    # zero output weights: the deltas are the bias, times the level's scale
    with torch.no_grad():
        head.out.weight.zero_()
        head.out.bias.fill_(0.5)
        head.scales.copy_(torch.tensor([2.0, -3.0]))
    flat = head([torch.randn(1, 32, 2, 2, 2), torch.randn(1, 32, 1, 1, 1)])
    assert flat.shape == (1, 8 * 2 + 1 * 2, 6)
    torch.testing.assert_close(flat[0, :16], torch.full((16, 6), 1.0))
    torch.testing.assert_close(flat[0, 16:], torch.full((2, 6), -1.5))


def test_positive_count_ema_hand_values_and_state_dict() -> None:
    ema = PositiveCountEMA(beta=0.7, bias_correction_steps=5000)
    assert ema.update(4) == pytest.approx(0.3 * 4 / (1 - 0.7))  # = 4
    assert ema.update(2) == pytest.approx((0.7 * 1.2 + 0.3 * 2) / (1 - 0.7**2))
    restored = PositiveCountEMA(beta=0.7, bias_correction_steps=5000)
    restored.load_state_dict(ema.state_dict())
    assert restored.value() == ema.value() and restored.update(0) == ema.update(0)
    assert set(ema.state_dict()) == {"average", "steps"}
    short = PositiveCountEMA(beta=0.7, bias_correction_steps=1)
    short.update(4)
    assert short.update(2) == pytest.approx(0.7 * 1.2 + 0.3 * 2)  # no correction after the first step


def test_focal_loss_over_all_anchors_normalised_by_the_ema_over_two_steps() -> None:
    model = _tiny()
    model.train()
    logits = torch.tensor([[[0.5, -1.0], [2.0, 0.0], [-0.3, 0.7]]])  # [B=1, 3 anchors, 2 classes]
    targets = torch.tensor([[[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]]])
    positive = torch.tensor([[True, False, True]])
    deltas = torch.zeros(1, 3, 6)
    reg_targets = torch.zeros(2, 6)
    # mean over the class axis, summed over every anchor (the release's "mean_last_sum")
    summed = sum(sum(_focal(float(x), float(t)) for x, t in zip(row, trow)) / 2
                 for row, trow in zip(logits[0], targets[0]))
    step1 = model.box_losses(logits, deltas, targets, positive, reg_targets)
    norm1 = 0.3 * 2 / (1 - 0.7)  # 2 positives
    assert float(step1["norm"]) == pytest.approx(norm1)
    assert float(step1["cls"]) == pytest.approx(0.3 * summed / norm1, rel=1e-5)
    one = torch.tensor([[True, False, False]])
    step2 = model.box_losses(logits, deltas, targets, one, reg_targets[:1])
    norm2 = (0.7 * 0.3 * 2 + 0.3 * 1) / (1 - 0.7**2)  # bias-corrected EMA after counts 2, 1
    assert float(step2["norm"]) == pytest.approx(norm2)
    assert float(step2["cls"]) == pytest.approx(0.3 * summed / norm2, rel=1e-5)
    # eval mode reads the average without adding to it
    model.eval()
    assert float(model.box_losses(logits, deltas, targets, one, reg_targets[:1])["norm"]) == pytest.approx(norm2)
    assert int(model.positive_ema.steps) == 2
    # a batch without positives: the EMA drops below 1 and the normaliser is clamped at 1
    model.train()
    none = torch.zeros(1, 3, dtype=torch.bool)
    step3 = model.box_losses(logits, deltas, targets, none, reg_targets[:0])
    assert (0.7 * (0.7 * 0.6 + 0.3)) / (1 - 0.7**3) < 1 and float(step3["norm"]) == 1.0
    assert float(step3["reg"]) == 0.0


def test_box_loss_is_summed_smooth_l1_of_scaled_deltas_over_the_ema() -> None:
    model = _tiny()
    model.train()
    deltas = torch.tensor([[[0.2, -0.5, 3.0, 0.0, 1.0, -2.0], [9.0] * 6]], requires_grad=True)
    target = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 0.5]])
    positive = torch.tensor([[True, False]])
    logits = torch.zeros(1, 2, 2)
    losses = model.box_losses(logits, deltas, torch.zeros(1, 2, 2), positive, target)
    expected = sum(_smooth_l1(d - t) for d, t in zip(deltas[0, 0].tolist(), target[0].tolist()))  # beta 1
    assert losses["reg"].item() == pytest.approx(expected / 1.0, rel=1e-6)  # one positive: EMA 1
    l1 = _tiny(reg_smooth_l1_beta=0.0)
    l1.train()
    losses = l1.box_losses(logits, deltas, torch.zeros(1, 2, 2), positive, target)
    assert losses["reg"].item() == pytest.approx(sum(abs(d - t) for d, t in zip(deltas[0, 0].tolist(),
                                                                                   target[0].tolist())), rel=1e-6)


def test_learned_scale_multiplies_each_levels_deltas_in_the_model() -> None:
    model = _tiny()
    images = torch.randn(1, 1, 32, 32, 32)
    base = model(images)["reg"].detach()
    with torch.no_grad():
        model.reg_head.scales.copy_(torch.tensor([2.0, 0.5]))
    scaled = model(images)["reg"].detach()
    n0 = (32 // 4) ** 3 * model.num_anchors_per_location
    torch.testing.assert_close(scaled[:, :n0], 2.0 * base[:, :n0])
    torch.testing.assert_close(scaled[:, n0:], 0.5 * base[:, n0:])
    assert _tiny(reg_learn_scale=False).reg_head.scales is None


def test_segmentation_loss_is_half_ce_half_batch_dice() -> None:
    model = _tiny()
    # two images of two voxels each; channel 0 background, channel 1 foreground logits
    seg_logits = torch.tensor([[[0.0, 0.3], [2.2, -2.0]], [[0.5, 0.0], [-2.2, -1.5]]]).reshape(2, 2, 1, 1, 2)
    seg = torch.tensor([[1, 0], [0, 0]]).reshape(2, 1, 1, 1, 2)  # foreground only in image 0, voxel 0
    losses = model.seg_losses(seg_logits, seg)
    ce_terms, fg, target = [], [], []
    for b in range(2):
        for x in range(2):
            bg_logit, fg_logit = float(seg_logits[b, 0, 0, 0, x]), float(seg_logits[b, 1, 0, 0, x])
            p_fg = math.exp(fg_logit) / (math.exp(fg_logit) + math.exp(bg_logit))
            t = int(seg[b, 0, 0, 0, x])
            ce_terms.append(-math.log(p_fg if t else 1 - p_fg))
            fg.append(p_fg)
            target.append(t)
    ce = sum(ce_terms) / 4
    intersection = sum(p * t for p, t in zip(fg, target))
    dice = (2 * intersection + 0.0) / (sum(fg) + sum(target) + 1e-5)  # over the whole batch, smooth 0 / 1e-5
    assert float(losses["seg_ce"]) == pytest.approx(0.5 * ce, rel=1e-6)
    assert float(losses["seg_dice"]) == pytest.approx(0.5 * (1 - dice), rel=1e-5)
    per_image = sum(1 - 2 * (fg[i] * target[i] + fg[i + 1] * target[i + 1])
                    / (fg[i] + fg[i + 1] + target[i] + target[i + 1] + 1e-5) for i in (0, 2)) / 2
    assert abs(per_image - (1 - dice)) > 0.05  # the case tells batch Dice from the per-image mean


def test_classification_covers_every_anchor_without_sampling() -> None:
    # No boxes: no positives, EMA 0, normaliser 1: cls is 0.3 x the focal loss summed over all anchors.
    model = _tiny()
    model.train()
    images = torch.randn(2, 1, 32, 32, 32)
    empty = {"boxes": torch.zeros(0, 6), "labels": torch.zeros(0, dtype=torch.long)}
    seg = torch.zeros(2, 1, 32, 32, 32, dtype=torch.long)
    losses = model.compute_losses(images, [empty, empty], seg)
    logits = model(images)["cls"].detach().double()
    p = torch.sigmoid(logits)
    expected = 0.3 * (0.25 * p * -torch.log1p(-p)).mean(dim=-1).sum()  # target 0: alpha_t 0.25, (1 - p_t) = p
    assert float(losses["cls"]) == pytest.approx(float(expected), rel=1e-4)
    assert logits.shape[1] == ((32 // 4) ** 3 + (32 // 8) ** 3) * model.num_anchors_per_location
    assert float(losses["reg"]) == 0.0 and int(model.positive_ema.steps) == 1


def test_ema_state_is_saved_loaded_and_deterministic(tmp_path) -> None:
    images = torch.randn(1, 1, 32, 32, 32)
    seg = torch.zeros(1, 1, 32, 32, 32, dtype=torch.long)
    seg[0, 0, 8:16, 8:16, 8:16] = 1
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 8.0, 16.0, 16.0, 16.0]]), "labels": torch.tensor([0])}]
    runs = []
    for _ in range(2):
        model = _tiny(seed=3)
        model.train()
        values = [float(model.compute_losses(images, targets, seg)["cls"]) for _ in range(2)]
        runs.append((values, float(model.positive_ema.average), int(model.positive_ema.steps)))
    assert runs[0] == runs[1] and runs[0][2] == 2 and runs[0][1] > 0
    save_detector(tmp_path / "m.pth", model, "retina_unet")
    loaded, _ = load_detector(tmp_path / "m.pth")
    assert int(loaded.positive_ema.steps) == 2
    assert float(loaded.positive_ema.average) == float(model.positive_ema.average)
    assert loaded.positive_ema.value() == model.positive_ema.value()


def test_overfits_two_cases_to_high_ap_with_the_default_recipe() -> None:
    images, targets, seg = two_overfit_cases()
    sizes = [(b[3:] - b[:3]).tolist() for t in targets for b in t["boxes"]]
    torch.manual_seed(0)
    # CPU-sized width and head levels only; the loss recipe is the default one
    model = build_detector("retina_unet", {**TINY, "fpn_channels": 16}, 1, 2, {"box_sizes": sizes})
    first, last, metrics = fit_and_score(model, images, targets, seg, clip=12.0)
    assert last < 0.1 * first
    assert metrics["AP_IoU_0.10_MaxDet_100"] >= 0.9, metrics
