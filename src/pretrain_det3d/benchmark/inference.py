"""Sliding-window inference time per case (``inference.sliding_window.predict_case``).

Example:
    >>> measure_inference(model, image, patch_size=(32, 32, 32), repeats=2)["seconds_per_case"]  # doctest: +SKIP
    0.8
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from pretrain_det3d.benchmark.timing import summarize, time_repeats
from pretrain_det3d.inference.sliding_window import DEFAULT_OVERLAP, predict_case, tile_positions

DEFAULT_INFERENCE_REPEATS = 2  # a whole case is many forwards already


def measure_inference(
    model: torch.nn.Module,
    image: np.ndarray,
    patch_size: Sequence[int],
    overlap: float = DEFAULT_OVERLAP,
    mirror_axes: Sequence[int] = (),
    batch_size: int = 1,
    device: str | torch.device = "cpu",
    warmup: int = 1,
    repeats: int = DEFAULT_INFERENCE_REPEATS,
) -> dict[str, Any]:
    """Median seconds of ``predict_case`` on ``image [C, Z, Y, X]``; also the tile count and case shape."""
    tiles = len(tile_positions([max(s, p) for s, p in zip(image.shape[1:], patch_size)], patch_size, overlap))
    seconds = time_repeats(
        lambda: predict_case(model, image, patch_size, overlap=overlap, mirror_axes=mirror_axes,
                             batch_size=batch_size, device=device),
        warmup=warmup, repeats=repeats, device=device,
    )
    timing = summarize(seconds)
    return {"seconds_per_case": timing["median_s"], "timing": timing, "tiles": tiles,
            "case_shape": list(image.shape[1:]), "overlap": overlap, "mirror_axes": list(mirror_axes)}
