"""Learning-rate schedule (linear warm-up, then poly decay) and the optimiser factory.

The schedule is a pure function of the iteration, so resuming needs nothing but the iteration number.

Exact formula, with base learning rate ``b``, warm-up length ``W`` and total iterations ``T`` (``it`` counts
from 0, and the rate returned is the one used for the update of iteration ``it``)::

    it <  W:  lr(it) = s + (b - s) * (it + 1) / W                (linear ramp from the start rate s up to b)
    it >= W:  lr(it) = b * (1 - (it - W) / (T - W)) ** 0.9       (poly decay from b towards 0)

With ``W = 0`` this is nnU-Net's poly schedule ``b * (1 - it / T) ** 0.9``; with ``s = 1e-6`` (the default of
``warmup_start_lr``) it is nnDetection's ``LinearWarmupPolyLR`` as its trainer configs set it
(``warm_lr: 1.e-6``, ``poly_gamma: 0.9``; the poly phase spans the iterations after the warm-up).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch

from pretrain_det3d.settings.training import TrainingSettings

POLY_EXPONENT = 0.9
SGD_MOMENTUM = 0.9
OPTIMIZERS = ("sgd", "adamw")
ADAMW_BETAS = TrainingSettings.default("adam_betas")  # torch's (0.9, 0.999); nnDetection's beta1/beta2 too


@dataclass(frozen=True)
class PolyWarmupSchedule:
    """Linear warm-up over ``warmup_iterations`` followed by poly decay until ``max_iterations``.

    Example:
        >>> schedule = PolyWarmupSchedule(base_lr=0.01, max_iterations=100, warmup_iterations=10)
        >>> round(schedule(0), 6), round(schedule(9), 6), round(schedule(10), 6)
        (0.001, 0.01, 0.01)
        >>> round(PolyWarmupSchedule(base_lr=0.01, max_iterations=100, warmup_iterations=10, start_lr=0.001)(0), 6)
        0.0019
    """

    base_lr: float
    max_iterations: int
    warmup_iterations: int = 0
    exponent: float = POLY_EXPONENT
    start_lr: float = 0.0

    def __post_init__(self) -> None:
        if self.max_iterations <= 0:
            raise ValueError(f"iterations must be positive, got {self.max_iterations}")
        if not 0 <= self.warmup_iterations < self.max_iterations:
            raise ValueError(
                f"warmup_iterations must lie in [0, iterations), got {self.warmup_iterations} "
                f"with iterations {self.max_iterations}"
            )

    def __call__(self, iteration: int) -> float:
        if iteration < self.warmup_iterations:
            return self.start_lr + (self.base_lr - self.start_lr) * (iteration + 1) / self.warmup_iterations
        decay_span = self.max_iterations - self.warmup_iterations
        progress = min(max(iteration - self.warmup_iterations, 0), decay_span) / decay_span
        return self.base_lr * (1.0 - progress) ** self.exponent

    def apply(self, optimizer: torch.optim.Optimizer, iteration: int) -> float:
        """Set the learning rate of every parameter group for ``iteration`` and return it."""
        lr = self(iteration)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr


def build_optimizer(parameters: Iterable[torch.nn.Parameter], settings: Mapping[str, Any]) -> torch.optim.Optimizer:
    """Build the optimiser named by ``settings["optimizer"]`` (``"sgd"``: Nesterov SGD, or ``"adamw"``).

    Keys read: ``optimizer``, ``lr``, ``weight_decay``, ``momentum`` (SGD only, default 0.9), ``adam_betas``,
    ``adam_eps`` and ``amsgrad`` (AdamW only; defaults: ``TrainingSettings``'s, which are torch's).

    Example:
        >>> net = torch.nn.Linear(2, 1)
        >>> opt = build_optimizer(net.parameters(), {"optimizer": "sgd", "lr": 0.01, "weight_decay": 3e-5})
        >>> type(opt).__name__, opt.defaults["nesterov"], opt.defaults["momentum"]
        ('SGD', True, 0.9)
    """
    name = str(settings.get("optimizer", "sgd")).lower()
    for key in ("lr", "weight_decay"):
        if key not in settings:
            raise KeyError(f"settings key {key!r} is required to build the {name} optimiser")
    lr = float(settings["lr"])
    weight_decay = float(settings["weight_decay"])
    if name == "sgd":
        return torch.optim.SGD(
            parameters,
            lr=lr,
            momentum=float(settings.get("momentum", SGD_MOMENTUM)),
            nesterov=True,
            weight_decay=weight_decay,
        )
    if name == "adamw":
        betas = tuple(float(b) for b in settings.get("adam_betas", TrainingSettings.default("adam_betas")))
        return torch.optim.AdamW(
            parameters,
            lr=lr,
            betas=betas,
            eps=float(settings.get("adam_eps", TrainingSettings.default("adam_eps"))),
            amsgrad=bool(settings.get("amsgrad", TrainingSettings.default("amsgrad"))),
            weight_decay=weight_decay,
        )
    raise ValueError(f"settings key 'optimizer' must be one of {OPTIMIZERS}, got {name!r}")
