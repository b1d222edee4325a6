"""Data-loader throughput: augmented batches per second with N worker processes, against the model's rate.

The stream and loader are the training's own (``PatchBatchStream`` + ``build_loader``, augmentation included),
so the number is what the trainer gets. The first ``warmup`` batches (worker start-up, first file opens) are
not timed; the rate is measured over the next ``num_batches``.

Example:
    >>> measure_loading(records, patch_size=(32, 32, 32), batch_size=2, num_workers=2, seed=0)  # doctest: +SKIP
    {'batches_per_second': 9.5, ...}
"""

from __future__ import annotations

import time
from typing import Any, Sequence

from pretrain_det3d.training.augmentation import AugmentationParams
from pretrain_det3d.training.dataloader import (
    FOREGROUND_FRACTION,
    CaseRecord,
    PatchBatchStream,
    build_loader,
)

DEFAULT_LOADER_BATCHES = 20  # timed batches
DEFAULT_LOADER_WARMUP = 2  # untimed batches


def measure_loading(
    records: Sequence[CaseRecord],
    patch_size: Sequence[int],
    batch_size: int,
    num_workers: int,
    seed: int,
    augmentation: AugmentationParams | None = AugmentationParams(),
    num_batches: int = DEFAULT_LOADER_BATCHES,
    warmup: int = DEFAULT_LOADER_WARMUP,
    memory_map: bool = True,
    foreground_fraction: float = FOREGROUND_FRACTION,
) -> dict[str, Any]:
    """Batches per second delivered by the training loader; keys ``batches_per_second``, ``seconds``,
    ``num_batches``, ``num_workers``."""
    if num_batches <= 0:
        raise ValueError(f"num_batches must be positive, got {num_batches}")
    stream = PatchBatchStream(records, patch_size, batch_size, seed, foreground_fraction=foreground_fraction,
                              augmentation=augmentation, num_batches=warmup + num_batches, memory_map=memory_map)
    loader = iter(build_loader(stream, num_workers, seed))
    for _ in range(warmup):
        next(loader)
    started = time.perf_counter()
    for _ in range(num_batches):
        next(loader)
    seconds = time.perf_counter() - started
    del loader  # ends the worker processes
    return {"batches_per_second": num_batches / seconds, "seconds": seconds, "num_batches": num_batches,
            "num_workers": int(num_workers), "augmentation": augmentation is not None}
