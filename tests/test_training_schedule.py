"""Learning-rate schedule and optimiser factory against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from pretrain_det3d.training.schedule import PolyWarmupSchedule, build_optimizer


def test_warmup_is_linear_from_near_zero_to_base():
    schedule = PolyWarmupSchedule(base_lr=0.01, max_iterations=100, warmup_iterations=4)
    # lr(it) = b * (it + 1) / W for it < W
    assert [schedule(i) for i in range(4)] == pytest.approx([0.0025, 0.005, 0.0075, 0.01])


def test_poly_decay_after_warmup_matches_hand_computed_values():
    schedule = PolyWarmupSchedule(base_lr=0.01, max_iterations=100, warmup_iterations=4)
    # lr(it) = b * (1 - (it - W) / (T - W)) ** 0.9
    assert schedule(4) == pytest.approx(0.01)
    assert schedule(52) == pytest.approx(0.01 * 0.5**0.9)  # half-way through the 96 decay iterations
    assert schedule(76) == pytest.approx(0.01 * 0.25**0.9)
    assert schedule(99) == pytest.approx(0.01 * (1 / 96) ** 0.9)
    assert schedule(100) == 0.0


def test_without_warmup_it_is_nnunet_poly():
    schedule = PolyWarmupSchedule(base_lr=1.0, max_iterations=10)
    for it in range(10):
        assert schedule(it) == pytest.approx((1 - it / 10) ** 0.9)


def test_apply_sets_every_param_group():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    opt = torch.optim.SGD([{"params": net[0].parameters()}, {"params": net[1].parameters()}], lr=1.0)
    lr = PolyWarmupSchedule(base_lr=0.02, max_iterations=10, warmup_iterations=2).apply(opt, 0)
    assert lr == pytest.approx(0.01)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.01, 0.01])


def test_bad_warmup_is_rejected():
    with pytest.raises(ValueError, match="warmup_iterations"):
        PolyWarmupSchedule(base_lr=0.1, max_iterations=10, warmup_iterations=10)


def test_sgd_is_nesterov_with_momentum_and_weight_decay():
    net = torch.nn.Linear(3, 1)
    opt = build_optimizer(net.parameters(), {"optimizer": "sgd", "lr": 0.01, "weight_decay": 3e-5})
    assert isinstance(opt, torch.optim.SGD)
    assert opt.defaults["nesterov"] is True
    assert opt.defaults["momentum"] == 0.9
    assert opt.defaults["weight_decay"] == 3e-5
    assert opt.defaults["lr"] == 0.01


def test_adamw_gets_lr_and_weight_decay():
    net = torch.nn.Linear(3, 1)
    opt = build_optimizer(net.parameters(), {"optimizer": "adamw", "lr": 3e-4, "weight_decay": 1e-4})
    assert isinstance(opt, torch.optim.AdamW)
    assert (opt.defaults["lr"], opt.defaults["weight_decay"]) == (3e-4, 1e-4)


def test_sgd_step_matches_hand_computed_nesterov_update():
    # one step from zero momentum: v = g + wd * w ; nesterov update w -= lr * (g' + m * v) with g' = v
    weight = torch.nn.Parameter(torch.tensor([1.0]))
    opt = build_optimizer([weight], {"optimizer": "sgd", "lr": 0.1, "weight_decay": 0.5, "momentum": 0.9})
    (2.0 * weight).sum().backward()  # gradient 2
    opt.step()
    grad = 2.0 + 0.5 * 1.0
    assert weight.item() == pytest.approx(1.0 - 0.1 * (grad + 0.9 * grad))


def test_unknown_optimizer_names_the_key():
    with pytest.raises(ValueError, match="'optimizer'"):
        build_optimizer(torch.nn.Linear(1, 1).parameters(), {"optimizer": "rmsprop", "lr": 1, "weight_decay": 0})


def test_warmup_starts_from_the_start_rate_like_nndetection():
    # nnDetection's LinearWarmupPolyLR: step k (1-based) of W warm-up steps has s + (b - s) * k / W; then poly over
    # the remaining T - W steps. Hand-worked: b = 0.01, s = 1e-6, W = 4, T = 12.
    schedule = PolyWarmupSchedule(base_lr=0.01, max_iterations=12, warmup_iterations=4, start_lr=1e-6)
    expected_warmup = [1e-6 + (0.01 - 1e-6) * k / 4 for k in (1, 2, 3, 4)]
    assert [schedule(i) for i in range(4)] == pytest.approx(expected_warmup, rel=1e-12)
    assert schedule(4) == pytest.approx(0.01)
    assert schedule(6) == pytest.approx(0.01 * (1 - 2 / 8) ** 0.9, rel=1e-12)
