"""Training-step throughput: iterations per second of the real ``train_step``, FLOPs, FLOP rate, peak memory.

The step is ``IterationTrainer.train_step`` itself (zero_grad, forward under the configured autocast, loss,
backward with loss scaling, gradient clipping, optimiser step), run on one fixed batch already on the device,
so the number is the model's consumption rate, independent of the data loader. FLOPs are counted once by
``torch.utils.flop_counter.FlopCounterMode`` over forward + loss + backward (full precision; the count does
not depend on the dtype). Operations it does not know (e.g. ``grid_sample``) are not counted.

Example:
    >>> result = measure_training(trainer, batch, warmup=1, repeats=3)  # doctest: +SKIP
    >>> result["iterations_per_second"]  # doctest: +SKIP
    3.1
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from pretrain_det3d.benchmark.timing import (
    DEFAULT_REPEATS,
    DEFAULT_WARMUP,
    peak_device_memory_bytes,
    peak_host_memory_bytes,
    reset_peak_memory,
    summarize,
    time_repeats,
)
from pretrain_det3d.training.trainer import IterationTrainer, move_to_device


def count_step_flops(trainer: IterationTrainer, batch: dict[str, Any]) -> int:
    """FLOPs of one forward + loss + backward of ``trainer`` on ``batch`` (no optimiser step is taken)."""
    trainer.model.train()
    trainer.optimizer.zero_grad(set_to_none=True)
    counter = FlopCounterMode(display=False)
    with counter:
        losses = trainer.compute_losses(batch)
        losses["loss"].backward()
    trainer.optimizer.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def measure_training(
    trainer: IterationTrainer,
    batch: dict[str, Any],
    warmup: int = DEFAULT_WARMUP,
    repeats: int = DEFAULT_REPEATS,
    count_flops: bool = True,
) -> dict[str, Any]:
    """Time ``trainer.train_step`` on ``batch`` (moved to the trainer's device); returns the training record.

    Keys: ``iterations_per_second`` (1 / median step time), ``step`` (timing summary), ``flops_per_iteration``,
    ``achieved_flops_per_second``, ``peak_device_memory_bytes`` (``None`` on CPU), ``peak_host_memory_bytes``,
    ``amp_dtype``, ``device``.
    """
    device = trainer.device
    batch = move_to_device(batch, device)
    flops = count_step_flops(trainer, batch) if count_flops else None
    reset_peak_memory(device)
    seconds = time_repeats(lambda: trainer.train_step(batch), warmup=warmup, repeats=repeats, device=device)
    timing = summarize(seconds)
    rate = 1.0 / timing["median_s"]
    return {
        "iterations_per_second": rate,
        "step": timing,
        "flops_per_iteration": flops,
        "achieved_flops_per_second": None if flops is None else flops * rate,
        "peak_device_memory_bytes": peak_device_memory_bytes(device),
        "peak_host_memory_bytes": peak_host_memory_bytes(),
        "amp_dtype": None if trainer.amp_dtype is None else str(trainer.amp_dtype).replace("torch.", ""),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }
