"""The benchmark's clock: warm-up calls excluded, the median of repeats, device synchronisation, peak memory.

Example:
    >>> times = time_repeats(lambda: sum(range(1000)), warmup=1, repeats=3)
    >>> len(times)
    3
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from typing import Callable, Sequence

import torch

DEFAULT_WARMUP = 2  # calls before timing: lazy initialisation, cuDNN autotuning, compilation
DEFAULT_REPEATS = 5  # timed calls; the median is reported


def synchronize(device: torch.device | str) -> None:
    """Wait for queued GPU work, so a wall-clock interval covers it (no-op on CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_repeats(
    fn: Callable[[], object],
    warmup: int = DEFAULT_WARMUP,
    repeats: int = DEFAULT_REPEATS,
    device: torch.device | str = "cpu",
) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls."""
    if repeats <= 0 or warmup < 0:
        raise ValueError(f"need repeats > 0 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    for _ in range(warmup):
        fn()
    synchronize(device)
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        synchronize(device)
        seconds.append(time.perf_counter() - started)
    return seconds


def summarize(seconds: Sequence[float]) -> dict[str, float | list[float]]:
    """Median (the reported number), min, max and the raw repeats.

    Example:
        >>> summarize([3.0, 1.0, 2.0])["median_s"]
        2.0
    """
    return {"median_s": float(statistics.median(seconds)), "min_s": float(min(seconds)),
            "max_s": float(max(seconds)), "repeats_s": [float(s) for s in seconds]}


def reset_peak_memory(device: torch.device | str) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_device_memory_bytes(device: torch.device | str) -> int | None:
    """Peak memory torch allocated on a CUDA device since the last reset; ``None`` on CPU (no such counter)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return None


def peak_host_memory_bytes() -> int:
    """Peak resident memory of this process so far (the CPU stand-in for device memory; never resets)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB
