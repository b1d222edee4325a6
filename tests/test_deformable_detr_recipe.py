"""The Deformable DETR as nnDetection's release trains it (residual_encoder_def_detr_v002): the structure built
from config/paper.yaml on ResEnc-L, the planned number of queries, the focal terms of loss and matcher, the
AdamW recipe, and fp16 mixed precision with loss scaling (its scaler logic run on CPU)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from pretrain_det3d.models.deformable_attention import MultiScaleDeformableAttention3D
from pretrain_det3d.models.deformable_detr import DeformableDETR, boxes_near_each_box, plan_num_queries
from pretrain_det3d.models.hungarian import focal_class_cost, matching_cost
from pretrain_det3d.models.registry import build_detector
from pretrain_det3d.settings.detectors import DeformableDETRSettings
from pretrain_det3d.training.schedule import build_optimizer
from pretrain_det3d.training.trainer import (
    IterationTrainer,
    TrainingSettings,
    build_grad_scaler,
    resolve_amp_dtype,
    uses_loss_scaling,
)

ROOT = Path(__file__).resolve().parents[1]


def _paper_detr_settings() -> dict:
    config = yaml.safe_load((ROOT / "config" / "paper.yaml").read_text())
    assert config["backbone"] == "resenc_l"
    return {"preset": "resenc_l", **config["detectors"]["deformable_detr"]}


# Two training images of a 128^3 patch: one with a cluster of 7 box centres within 64 voxels of each other (and
# one far box), one with 2 boxes. Per-image estimates 7 and 2 -> 95th percentile 2 + 0.95 * 5 = 6.75 -> 6
# -> max(12, 3 * 6) = 18 queries.
_CLUSTER = [[10 + 8 * i, 20, 20, 16 + 8 * i, 26, 26] for i in range(7)] + [[200, 200, 200, 204, 204, 204]]
_PLAN = {"box_sizes": [[6, 6, 6]] * 10,
         "case_boxes": {"a": _CLUSTER, "b": [[0, 0, 0, 4, 4, 4], [30, 30, 30, 40, 40, 40]], "empty": []}}


@pytest.fixture(scope="module")
def paper_model() -> DeformableDETR:
    torch.manual_seed(0)
    return build_detector("deformable_detr", _paper_detr_settings(), 1, 1, _PLAN)


def test_paper_config_builds_the_release_structure(paper_model: DeformableDETR) -> None:
    model = paper_model
    # four levels: the deepest four ResEnc-L stages, no extra levels; 1x1 conv + GroupNorm(16) channel mapper
    assert model.feature_strides == [4, 8, 16, 32] and model.num_levels == 4 and len(model.extra_proj) == 0
    assert [m[0].kernel_size for m in model.input_proj] == [(1, 1, 1)] * 4
    norms = [m for m in model.input_proj.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 4 and {(n.num_groups, n.num_channels) for n in norms} == {(16, 128)}
    assert not any(isinstance(m, (nn.ReLU, nn.LeakyReLU)) for m in model.input_proj.modules())  # add_act False
    # transformer: hidden 128, 3 encoder / 6 decoder layers, 8 heads, 4 points, FFN 1024
    assert model.hidden_dim == 128
    assert len(model.encoder_layers) == 3 and len(model.decoder_layers) == 6
    attentions = [m for m in model.modules() if isinstance(m, MultiScaleDeformableAttention3D)]
    assert {(a.num_heads, a.num_levels, a.num_points) for a in attentions} == {(8, 4, 4)} and len(attentions) == 9
    assert {layer.ffn.linear1.out_features for layer in [*model.encoder_layers, *model.decoder_layers]} == {1024}
    # no dropout anywhere: every Dropout has p == 0, and so has the decoder's self-attention
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert dropouts and all(m.p == 0.0 for m in dropouts)
    assert all(m.dropout == 0.0 for m in model.modules() if isinstance(m, nn.MultiheadAttention))
    # queries and detections per patch planned from the plan's boxes (hand-worked above)
    assert model.num_queries == 18 and model.max_detections == 18
    # heads: every decoder layer + the two-stage proposals; classifier prior 0.05; 3-layer box MLP
    assert len(model.class_heads) == len(model.box_heads) == 7
    for head in model.class_heads:
        assert torch.sigmoid(head.bias).tolist() == pytest.approx([0.05])
    assert {len(head.layers) for head in model.box_heads} == {3}
    # losses and matcher: focal gamma 1 / alpha 0.75 in both, weights 1 / 5 / 2, costs 2 / 5 / 2
    assert (model.focal_gamma, model.focal_alpha) == (1.0, 0.75)
    assert (model.matcher.focal_gamma, model.matcher.focal_alpha) == (1.0, 0.75)
    assert model.loss_weights == {"cls": 1.0, "l1": 5.0, "giou": 2.0}
    assert (model.matcher.cost_class, model.matcher.cost_bbox, model.matcher.cost_giou) == (2.0, 5.0, 2.0)
    assert model.proposal_base_size == 0.05 and model.position_temperature == 10000.0


def test_paper_config_trains_with_the_release_optimiser_and_fp16() -> None:
    settings = TrainingSettings.from_settings(_paper_detr_settings(), **DeformableDETR.training_defaults)
    optimizer = build_optimizer(nn.Linear(2, 2).parameters(), settings.model_dump())
    assert isinstance(optimizer, torch.optim.AdamW)
    defaults = optimizer.defaults
    assert (defaults["lr"], defaults["weight_decay"], defaults["eps"], defaults["amsgrad"]) == (3e-4, 1e-4, 1e-4, True)
    assert defaults["betas"] == (0.9, 0.999)
    assert settings.warmup_iterations == 10000 and settings.warmup_start_lr == 1e-6
    assert settings.mixed_precision and settings.amp_dtype == "float16"
    assert DeformableDETRSettings.default("amp_dtype") == "float16"
    assert TrainingSettings.default("adam_eps") == 1e-8 and TrainingSettings.default("amsgrad") is False


# ------------------------------------------------------------------ planning the number of queries


def _near_by_loops(boxes: list[list[float]], patch: list[int]) -> list[int]:
    counts = []
    for a in boxes:
        count = 0
        for b in boxes:
            inside = True
            for axis in range(3):
                ca, cb = (a[axis] + a[axis + 3]) / 2, (b[axis] + b[axis + 3]) / 2
                inside = inside and abs(ca - cb) <= patch[axis] / 2
            count += inside
        counts.append(count)
    return counts


@pytest.mark.parametrize("seed", range(4))
def test_boxes_near_each_box_agrees_with_loops(seed: int) -> None:
    rng = np.random.default_rng(seed)
    lower = rng.uniform(0, 100, size=(9, 3))
    boxes = np.concatenate([lower, lower + rng.uniform(1, 10, size=(9, 3))], axis=1)
    patch = [int(v) for v in rng.integers(16, 80, size=3)]
    assert boxes_near_each_box(boxes, patch).tolist() == _near_by_loops(boxes.tolist(), patch)


def test_planned_queries_by_hand() -> None:
    patch = [128, 128, 128]
    assert boxes_near_each_box(np.array(_CLUSTER), patch).tolist() == [7] * 7 + [1]
    assert plan_num_queries(_PLAN["case_boxes"].values(), patch) == 18
    # percentile by hand: estimates [7, 2, 5] -> sorted [2, 5, 7], rank 0.95 * 2 = 1.9 -> 5 + 0.9 * 2 = 6.8 -> 6
    five = [[0, 0, 0, 2, 2, 2]] * 5
    assert plan_num_queries([_CLUSTER, _PLAN["case_boxes"]["b"], five], patch) == 18
    # a smaller patch splits the cluster: centres 8 apart, half patch 8 -> each box sees at most its 2 neighbours
    assert boxes_near_each_box(np.array(_CLUSTER), [16, 16, 16]).max() == 3
    # estimates [3, 1]: 95th percentile 1 + 0.95 * 2 = 2.9 -> 2 -> 3 * 2 = 6 < 12
    assert plan_num_queries(_PLAN["case_boxes"].values(), [16, 16, 16]) == 12
    assert plan_num_queries([], patch) == 12 and plan_num_queries([[]], patch, min_queries=5) == 5


def test_build_kwargs_plan_queries_from_the_training_patch() -> None:
    kwargs = DeformableDETR.build_kwargs_from_settings({"preset": "resenc_l", "patch_size": 128}, 1, 1, _PLAN)
    assert kwargs["num_queries"] == 18
    small = DeformableDETR.build_kwargs_from_settings({"preset": "resenc_l", "patch_size": [16, 16, 16]}, 1, 1, _PLAN)
    assert small["num_queries"] == 12
    explicit = DeformableDETR.build_kwargs_from_settings({"preset": "resenc_l", "num_queries": 40}, 1, 1, _PLAN)
    assert explicit["num_queries"] == 40
    floor = DeformableDETR.build_kwargs_from_settings({"preset": "resenc_l", "min_queries": 30}, 1, 1, _PLAN)
    assert floor["num_queries"] == 30
    old_plan = {"box_sizes": [[4, 4, 4]], "case_ids": ["a"]}  # a plan.json from before per-case boxes
    with pytest.raises(ValueError, match="case_boxes"):
        DeformableDETR.build_kwargs_from_settings({"preset": "resenc_l"}, 1, 1, old_plan)
    hand_made = DeformableDETR.build_kwargs_from_settings({"preset": "resenc_l"}, 1, 1, {"box_sizes": [[4, 4, 4]]})
    assert hand_made["num_queries"] == 12


# ------------------------------------------------------------------ focal terms of the matcher and the loss


def test_matcher_class_cost_uses_the_loss_focal_terms_by_hand() -> None:
    # logit 0 -> p = 1/2; logit ln 3 -> p = 3/4. Gamma 1, alpha 0.75, log epsilon 1e-6.
    logits = torch.tensor([[0.0], [math.log(3.0)]], dtype=torch.float64)
    cost = focal_class_cost(logits, torch.tensor([0]), alpha=0.75, gamma=1.0)
    half = 0.75 * 0.5 * -math.log(0.5 + 1e-6) - 0.25 * 0.5 * -math.log(0.5 + 1e-6)
    three_quarters = 0.75 * 0.25 * -math.log(0.75 + 1e-6) - 0.25 * 0.75 * -math.log(0.25 + 1e-6)
    assert cost[:, 0].tolist() == pytest.approx([half, three_quarters], abs=1e-6)
    assert half == pytest.approx(0.25 * math.log(2), rel=1e-5)  # (0.375 - 0.125) ln 2
    # the matcher (built by the model) weighs it by cost_class 2 next to L1 5 and GIoU 2; identical boxes:
    # L1 0, GIoU 1
    box = torch.tensor([[0.5, 0.5, 0.5, 0.2, 0.2, 0.2]], dtype=torch.float64)
    total = matching_cost(logits, box.expand(2, -1), torch.tensor([0]), box, 2.0, 5.0, 2.0, 0.75, 1.0)
    assert total[:, 0].tolist() == pytest.approx([2 * half - 2, 2 * three_quarters - 2], abs=1e-4)  # float32 GIoU
    model = DeformableDETR("resenc_demo", 1, 1, feature_strides=[2, 4, 8], extra_levels=1, hidden_dim=32,
                           num_heads=4, num_encoder_layers=1, num_decoder_layers=1, ffn_dim=64, num_queries=4)
    assert (model.matcher.focal_alpha, model.matcher.focal_gamma) == (0.75, 1.0)


def test_classification_loss_sums_queries_and_averages_classes() -> None:
    torch.manual_seed(0)
    model = DeformableDETR("resenc_demo", 1, 2, feature_strides=[2, 4, 8], extra_levels=1, hidden_dim=32,
                           num_heads=4, num_encoder_layers=1, num_decoder_layers=1, ffn_dim=64, num_queries=4)
    logits = torch.tensor([[[0.0, math.log(3.0)], [math.log(1 / 3), 0.0]]])  # [1, Q=2, K=2]
    boxes = torch.tensor([[[0.5, 0.5, 0.5, 0.2, 0.2, 0.2], [0.2, 0.2, 0.2, 0.1, 0.1, 0.1]]])
    target = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.2, 0.2, 0.2]])}]
    terms = model._set_losses(logits, boxes, target, num_boxes=1.0)

    def negative(p: float) -> float:  # focal loss of calling p background (gamma 1, alpha 0.75)
        return 0.25 * p * -math.log(1 - p)

    # query 0 matches (class 1 positive, p = 3/4); every other (query, class) pair is background
    positive = 0.75 * (1 - 0.75) * -math.log(0.75)
    per_query = [(negative(0.5) + positive) / 2, (negative(0.25) + negative(0.5)) / 2]
    assert terms["cls"].item() == pytest.approx(sum(per_query), rel=1e-5)


# ------------------------------------------------------------------ fp16 mixed precision with loss scaling


def test_loss_scaling_exactly_for_fp16_on_cuda() -> None:
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert uses_loss_scaling(cuda, torch.float16)
    assert not uses_loss_scaling(cuda, torch.bfloat16) and not uses_loss_scaling(cuda, None)
    assert not uses_loss_scaling(cpu, torch.float16)
    assert not build_grad_scaler(cpu, None).is_enabled()
    # float16 asks for fp16 on CUDA; on CPU it is full precision (no scaler)
    assert resolve_amp_dtype(cpu, True, "float16") is None
    assert resolve_amp_dtype(cpu, False, "float16") is None


class _Linear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 1)


class _RegressionTrainer(IterationTrainer):
    """The shared loop around a linear regression: ``batch = {"x": [B, 4], "y": [B, 1]}``."""

    with_labels = False

    def compute_losses(self, batch):
        prediction = self.model.layer(batch["x"]).float()
        return {"loss": ((prediction - batch["y"]) ** 2).mean()}


def _fp16_trainer(tmp_path: Path, name: str, scale: float | None, grad_clip: float | None = 0.05) -> IterationTrainer:
    """A CPU trainer on the fp16 path: fp16 autocast and (``scale`` given) an enabled GradScaler, as CUDA
    would run it; ``scale=None`` keeps the scaler off (the unscaled reference)."""
    torch.manual_seed(0)
    settings = TrainingSettings.from_settings({"iterations": 10, "warmup_iterations": 0, "optimizer": "sgd",
                                               "lr": 0.1, "grad_clip": grad_clip, "device": "cpu",
                                               "progress_bar": False, "channels_last": False})
    trainer = _RegressionTrainer(_Linear(), settings, [], tmp_path / name, seed=0)
    trainer.amp_dtype = torch.float16
    if scale is not None:
        trainer.scaler = torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=1000)
    return trainer


def _batch(big: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"x": torch.randn(8, 4, generator=g) * big, "y": torch.randn(8, 1, generator=g)}


def test_fp16_steps_with_loss_scaling_equal_unscaled_steps_including_clipping(tmp_path) -> None:
    scaled, plain = _fp16_trainer(tmp_path, "scaled", 2.0**12), _fp16_trainer(tmp_path, "plain", None)
    assert scaled.scaler.is_enabled() and not plain.scaler.is_enabled()
    for _ in range(3):
        scaled.train_step(_batch())
        plain.train_step(_batch())
    # the clip (0.05, below the true gradient norm) acted on the unscaled gradients: updates agree exactly
    for a, b in zip(scaled.model.parameters(), plain.model.parameters()):
        torch.testing.assert_close(a, b)
    assert scaled.scaler.get_scale() == 2.0**12  # no overflow, no growth within growth_interval


def test_fp16_overflow_skips_the_step_and_halves_the_scale(tmp_path) -> None:
    trainer = _fp16_trainer(tmp_path, "overflow", 2.0**120, grad_clip=None)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    losses = trainer.train_step(_batch(big=1e3))  # loss finite, scaled gradients overflow float32 -> inf
    assert math.isfinite(losses["loss"])
    for p, q in zip(trainer.model.parameters(), before):
        assert torch.equal(p, q)  # step skipped
    assert trainer.scaler.get_scale() == 2.0**119
    trainer.scaler.update(2.0**8)
    trainer.train_step(_batch())
    assert any(not torch.equal(p, q) for p, q in zip(trainer.model.parameters(), before))  # now it steps


def test_scaler_state_travels_with_the_checkpoint(tmp_path) -> None:
    trainer = _fp16_trainer(tmp_path, "saved", 2.0**120, grad_clip=None)
    trainer.train_step(_batch(big=1e3))  # halves the scale to 2**119
    state = trainer.checkpoint_state()
    assert state["scaler"]["scale"] == 2.0**119
    restored = _fp16_trainer(tmp_path, "restored", 2.0**4, grad_clip=None)
    restored.load_checkpoint_state(state)
    assert restored.scaler.get_scale() == 2.0**119
    assert restored.scaler.state_dict() == trainer.scaler.state_dict()


def test_paper_detr_settings_are_valid_for_the_settings_class() -> None:
    settings = DeformableDETRSettings.parse(_paper_detr_settings(), where="detectors.deformable_detr")
    assert settings.dropout == 0.0 and settings.group_norm_groups == 16 and settings.num_queries is None
    assert (settings.cost_class, settings.cost_bbox, settings.cost_giou) == (2.0, 5.0, 2.0)
    assert tuple(settings.adam_betas) == (0.9, 0.999) and settings.adam_eps == 1e-4 and settings.amsgrad
