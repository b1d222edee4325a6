"""Tests for models.deformable_detr: release defaults, shapes, losses, gradients, post-processing, checkpoint
transfer, save/load, and an overfit run scored with the study's own AP."""

from __future__ import annotations

import math

import pytest
import torch

from overfit import fit_and_score
from pretrain_det3d.models.backbone import build_resenc_unet
from pretrain_det3d.models.checkpoint import load_pretrained_encoder, save_pretraining_checkpoint
from pretrain_det3d.models.deformable_attention import MultiScaleDeformableAttention3D
from pretrain_det3d.models.deformable_detr import (
    TRAINING_DEFAULTS,
    DeformableDETR,
    axis_feature_split,
    resolve_feature_strides,
    sine_embedding,
    sine_position_embedding_3d,
    voxel_centres,
)
from pretrain_det3d.models.registry import build_detector, get_detector_class, load_detector, save_detector
from pretrain_det3d.training.schedule import build_optimizer
from pretrain_det3d.training.trainer import TrainingSettings

# A CPU-sized transformer on the demo backbone: four levels (strides 2, 4, 8 and one extra at 16).
TINY = {
    "preset": "resenc_demo", "extra_levels": 1, "hidden_dim": 32, "num_heads": 4, "num_encoder_layers": 1,
    "num_decoder_layers": 2, "ffn_dim": 64, "num_queries": 30, "dropout": 0.0,
}




def _tiny(seed: int = 0, num_classes: int = 2, **overrides) -> DeformableDETR:
    torch.manual_seed(seed)
    return build_detector("deformable_detr", {**TINY, **overrides}, 1, num_classes, {})


def _targets() -> list[dict[str, torch.Tensor]]:
    return [
        {"boxes": torch.tensor([[4.0, 6, 5, 12, 13, 11], [18, 16, 20, 26, 27, 27]]), "labels": torch.tensor([0, 1])},
        {"boxes": torch.tensor([[10.0, 3, 14, 20, 10, 22]]), "labels": torch.tensor([1])},
    ]


def test_registered_and_default_knobs_are_the_releases() -> None:
    assert get_detector_class("deformable_detr") is DeformableDETR
    torch.manual_seed(0)
    model = build_detector("deformable_detr", {"preset": "resenc_l"}, 1, 1, {})
    assert model.feature_strides == [4, 8, 16, 32] and model.num_levels == 4
    assert model.hidden_dim == 128 and model.num_queries == 12  # no boxes in the plan: the planner's floor
    assert len(model.encoder_layers) == 3 and len(model.decoder_layers) == 6
    attentions = [m for m in model.modules() if isinstance(m, MultiScaleDeformableAttention3D)]
    assert len(attentions) == 3 + 6
    assert {(a.num_heads, a.num_levels, a.num_points) for a in attentions} == {(8, 4, 4)}
    assert model.encoder_layers[0].ffn.linear1.out_features == 1024
    assert [type(m[1]).__name__ for m in model.input_proj] == ["GroupNorm"] * 4
    assert {m[1].num_groups for m in model.input_proj} == {16}
    assert [m[0].kernel_size for m in model.input_proj] == [(1, 1, 1)] * 4
    assert len(model.box_heads[0].layers) == 3  # 3-layer MLP box head
    matcher = model.matcher
    assert (matcher.cost_class, matcher.cost_bbox, matcher.cost_giou) == (2.0, 5.0, 2.0)
    assert (matcher.focal_gamma, matcher.focal_alpha) == (model.focal_gamma, model.focal_alpha) == (1.0, 0.75)
    assert model.loss_weights == {"cls": 1.0, "l1": 5.0, "giou": 2.0}
    assert model.max_detections == model.num_queries
    prior = torch.sigmoid(model.class_heads[0].bias).item()
    assert prior == pytest.approx(0.05)
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    assert len(model.class_heads) == len(model.box_heads) == 6 + 1  # every decoder layer + the proposals
    # The transformer's encoder is exactly the ResEnc-L encoder of the pre-training U-Net.
    unet_keys = {k for k in build_resenc_unet("resenc_l", 1, 1).state_dict() if k.startswith("encoder.")}
    assert {k for k in model.state_dict() if k.startswith("encoder.")} == unet_keys


def test_training_defaults_are_adamw_and_the_trainer_reads_them() -> None:
    assert TRAINING_DEFAULTS == {"optimizer": "adamw", "lr": 3e-4, "weight_decay": 1e-4, "adam_eps": 1e-4,
                                 "amsgrad": True, "warmup_iterations": 10000, "amp_dtype": "float16",
                                 "grad_clip": None}
    assert DeformableDETR.training_defaults is TRAINING_DEFAULTS
    settings = TrainingSettings.from_settings({"iterations": 20000}, **DeformableDETR.training_defaults)
    optimizer = build_optimizer(torch.nn.Linear(2, 2).parameters(), vars(settings))
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["lr"] == 3e-4 and optimizer.defaults["weight_decay"] == 1e-4
    assert optimizer.defaults["eps"] == 1e-4 and optimizer.defaults["amsgrad"] is True
    assert optimizer.defaults["betas"] == (0.9, 0.999)
    generic = build_optimizer(torch.nn.Linear(2, 2).parameters(), {"optimizer": "adamw", "lr": 1.0, "weight_decay": 0})
    assert generic.defaults["eps"] == 1e-8 and generic.defaults["amsgrad"] is False  # torch's defaults elsewhere
    assert settings.warmup_iterations == 10000


def test_feature_strides_and_settings_errors() -> None:
    assert resolve_feature_strides("resenc_small", None) == [1, 2, 4, 8]
    assert resolve_feature_strides("resenc_demo", [8, 4]) == [4, 8]
    with pytest.raises(ValueError, match="feature_strides"):
        resolve_feature_strides("resenc_demo", [16])
    with pytest.raises(KeyError, match="preset"):
        DeformableDETR.build_kwargs_from_settings({}, 1, 1, {})
    kwargs = DeformableDETR.build_kwargs_from_settings({**TINY, "lr": 1.0, "iterations": 5}, 2, 3, {})
    assert "lr" not in kwargs and "iterations" not in kwargs
    assert kwargs["feature_strides"] == [2, 4, 8] and kwargs["in_channels"] == 2 and kwargs["num_classes"] == 3


def test_sine_position_embedding_by_hand() -> None:
    assert axis_feature_split(128) == [44, 42, 42] and sum(axis_feature_split(32)) == 32
    emb = sine_position_embedding_3d((2, 3, 4), 12)  # 4 features per axis: 2 frequencies
    assert emb.shape == (24, 12)
    # Token (z=1, y=2, x=0) is row 1*12 + 2*4 + 0 = 20; its normalised centre is (0.75, 5/6, 0.125).
    expected = []
    for coord in (0.75, 5 / 6, 0.125):
        angles = [coord * 2 * math.pi / 10000 ** (2 * i / 4) for i in range(2)]
        expected += [math.sin(a) for a in angles] + [math.cos(a) for a in angles]
    torch.testing.assert_close(emb[20], torch.tensor(expected))
    assert torch.unique(emb, dim=0).shape[0] == 24  # every voxel distinct
    torch.testing.assert_close(voxel_centres((1, 1, 2))[:, 2], torch.tensor([0.25, 0.75]))
    with pytest.raises(ValueError, match="even"):
        sine_embedding(torch.zeros(1, 2), [3, 2])


def test_forward_shapes_and_size_check() -> None:
    model = _tiny()
    out = model(torch.randn(2, 1, 32, 32, 32))
    tokens = 16**3 + 8**3 + 4**3 + 2**3
    assert len(out["logits"]) == len(out["boxes"]) == 2
    assert out["logits"][-1].shape == (2, 30, 2) and out["boxes"][-1].shape == (2, 30, 6)
    assert out["enc_logits"].shape == (2, tokens, 2) and out["enc_boxes"].shape == (2, tokens, 6)
    assert torch.all((out["boxes"][-1] > 0) & (out["boxes"][-1] < 1))
    with pytest.raises(ValueError, match="divisible"):
        model(torch.zeros(1, 1, 20, 32, 32))


def test_losses_are_finite_and_gradients_reach_every_part() -> None:
    model = _tiny()
    losses = model.compute_losses(torch.randn(2, 1, 32, 32, 32), _targets(), torch.zeros(2, 1, 32, 32, 32).long())
    assert {"loss", "cls", "l1", "giou", "enc"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()
    attentions = [m for m in model.modules() if isinstance(m, MultiScaleDeformableAttention3D)]
    assert len(attentions) == 1 + 2
    for attention in attentions:  # encoder and decoder deformable attention
        assert attention.sampling_offsets.weight.grad.abs().sum() > 0
        assert attention.attention_weights.weight.grad.abs().sum() > 0
    for name in ("encoder.stem", "input_proj.0", "extra_proj.0", "decoder_layers.1", "box_heads.1",
                 "class_heads.0", "class_heads.2", "box_heads.2", "pos_trans"):
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(name)]
        assert grads and any(g is not None and g.abs().sum() > 0 for g in grads), name
    # Positions enter only through the (zero-initialised) offset and weight projections, so the level
    # embedding learns from the second step on; with non-zero projections its gradient is non-zero.
    assert model.level_embed.grad.abs().sum() == 0
    with torch.no_grad():
        model.encoder_layers[0].attention.sampling_offsets.weight.normal_(std=0.1)
    model.zero_grad()
    model.compute_losses(torch.randn(2, 1, 32, 32, 32), _targets(), None)["loss"].backward()
    assert model.level_embed.grad.abs().sum() > 0


def test_batch_without_objects_trains_classification_only() -> None:
    model = _tiny()
    empty = [{"boxes": torch.zeros(0, 6), "labels": torch.zeros(0, dtype=torch.long)}]
    losses = model.compute_losses(torch.randn(1, 1, 32, 32, 32), empty, None)
    assert losses["l1"] == 0 and losses["giou"] == 0 and losses["cls"] > 0
    losses["loss"].backward()


def test_set_losses_match_a_hand_computation() -> None:
    model = _tiny(num_classes=1)
    logits = torch.tensor([[[2.0], [-1.0], [0.5]]])
    boxes = torch.tensor(
        [[[0.5, 0.5, 0.5, 0.2, 0.2, 0.2], [0.2, 0.2, 0.2, 0.1, 0.1, 0.1], [0.8, 0.8, 0.8, 0.1, 0.1, 0.1]]]
    )
    target = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.6, 0.2, 0.2, 0.2]])}]
    terms = model._set_losses(logits, boxes, target, num_boxes=1.0)
    # Query 0 is the obvious match. Focal loss: positive for query 0, negative for the others.
    alpha, gamma = 0.75, 1.0
    p = torch.sigmoid(logits.view(-1)).tolist()
    focal = alpha * (1 - p[0]) ** gamma * -math.log(p[0])
    focal += sum((1 - alpha) * q**gamma * -math.log(1 - q) for q in p[1:])
    # L1: only x differs by 0.1. GIoU: x-overlap 0.1 of 0.2, hull 0.3 in x: IoU = 0.004/0.012, hull = 0.012.
    iou = (0.2 * 0.2 * 0.1) / (2 * 0.008 - 0.2 * 0.2 * 0.1)
    giou = iou - (0.2 * 0.2 * 0.3 - (2 * 0.008 - 0.004)) / (0.2 * 0.2 * 0.3)
    assert terms["cls"].item() == pytest.approx(focal, rel=1e-5)
    assert terms["l1"].item() == pytest.approx(0.1, abs=1e-6)
    assert terms["giou"].item() == pytest.approx(1 - giou, abs=1e-5)


def test_predict_takes_top_pairs_and_scales_boxes_to_voxels(monkeypatch) -> None:
    model = _tiny(num_classes=2, max_detections=3)
    logits = torch.tensor([[[5.0, -5.0], [-5.0, 1.0], [0.0, -9.0], [-9.0, -9.0]]])  # [1, Q=4, K=2]
    boxes = torch.tensor([[[0.5, 0.5, 0.25, 0.5, 0.25, 0.5], [0.25, 0.5, 0.5, 0.25, 0.25, 0.25],
                           [0.5, 0.5, 0.5, 0.1, 0.1, 0.1], [0.5, 0.5, 0.5, 0.1, 0.1, 0.1]]])
    monkeypatch.setattr(model, "forward", lambda images: {"logits": [logits], "boxes": [boxes]})
    (result,) = model.predict(torch.zeros(1, 1, 32, 16, 64))
    torch.testing.assert_close(result["scores"], torch.sigmoid(torch.tensor([5.0, 1.0, 0.0])))
    assert result["labels"].tolist() == [0, 1, 0]
    # Query 0: centre (16, 8, 16) size (16, 4, 32) voxels -> x runs from 0 to 32 (clipped at 0).
    torch.testing.assert_close(result["boxes"][0], torch.tensor([8.0, 6.0, 0.0, 24.0, 10.0, 32.0]))
    torch.testing.assert_close(result["boxes"][1], torch.tensor([4.0, 6.0, 24.0, 12.0, 10.0, 40.0]))


def test_predict_caps_detections_and_applies_the_threshold() -> None:
    model = _tiny(num_queries=80, max_detections=100)  # 80 queries x 2 classes = 160 pairs
    (result,) = model.predict(torch.randn(1, 1, 32, 32, 32))
    assert result["boxes"].shape == (100, 6) and result["scores"].shape == (100,)
    assert torch.all(result["scores"][:-1] >= result["scores"][1:])
    assert torch.all(result["boxes"][:, 3:] <= 32) and torch.all(result["boxes"][:, :3] >= 0)
    strict = _tiny(score_threshold=0.5)  # fresh heads score about the 0.05 prior
    (nothing,) = strict.predict(torch.randn(1, 1, 32, 32, 32))
    assert nothing["boxes"].shape == (0, 6)


def test_save_load_round_trip(tmp_path) -> None:
    model = _tiny().eval()
    images = torch.randn(1, 1, 32, 32, 32)
    before = model.predict(images)[0]
    save_detector(tmp_path / "model_final.pth", model, "deformable_detr", extra={"fold": 0})
    loaded, record = load_detector(tmp_path / "model_final.pth")
    assert record["detector"] == "deformable_detr" and record["fold"] == 0
    after = loaded.eval().predict(images)[0]
    torch.testing.assert_close(after["boxes"], before["boxes"])
    torch.testing.assert_close(after["scores"], before["scores"])


def test_pretraining_checkpoint_transfers_encoder_only(tmp_path) -> None:
    torch.manual_seed(1)
    unet = build_resenc_unet("resenc_demo", 1, 1)
    with torch.no_grad():
        for param in unet.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    path = tmp_path / "checkpoint_final.pth"
    save_pretraining_checkpoint(path, unet, "resenc_demo", 1, (32, 32, 32), "mae")

    model = _tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = load_pretrained_encoder(model, path)
    after = model.state_dict()
    source = unet.state_dict()
    encoder_keys = [k for k in after if k.startswith(("encoder.stem.", "encoder.stages."))]
    assert encoder_keys and sorted(report.loaded_keys) == sorted(encoder_keys)
    for key in encoder_keys:
        assert torch.equal(after[key], source[key]), key
    changed = [k for k in encoder_keys if not torch.equal(before[k], after[k])]
    assert changed  # the transfer did something
    for key in after:
        if not key.startswith("encoder."):
            assert torch.equal(after[key], before[key]), f"{key} (transformer/heads) must stay untouched"
    assert any(k.startswith("decoder.") for k in report.skipped_keys)


def _overfit_cases(size: int = 32) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """Two noisy volumes with bright cuboid lesions (class 1 brighter than class 0)."""
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 1, size, size, size, generator=g) * 0.3
    targets = _targets()
    for index, target in enumerate(targets):
        for box, label in zip(target["boxes"].long(), target["labels"]):
            images[index, 0, box[0] : box[3], box[1] : box[4], box[2] : box[5]] += 1.0 + float(label)
    return images, targets


def test_overfits_two_cases_to_high_ap() -> None:
    images, targets = _overfit_cases()
    model = _tiny(seed=0)
    first, last, metrics = fit_and_score(model, images, targets, None, clip=1.0)
    assert last < 0.5 * first
    assert metrics["AP_IoU_0.10_MaxDet_100"] >= 0.9, metrics
