"""Sliding-window detection over a whole (preprocessed) image, with mirror test-time augmentation and
nnDetection's consolidation of the tiles' boxes.

The image is cut into patch-sized tiles that overlap by ``overlap`` (tile starts as nnU-Net spaces them:
the fewest steps no longer than ``patch * (1 - overlap)``, spread evenly from the first to the last
possible start). An image smaller than the patch is padded with zeros at its far end (zero is the mean of a
normalised image). Every tile, and with ``mirror_axes`` each of its mirrored copies (all subsets of the axes:
8 for three axes, as nnDetection's test-time augmentation), goes through the detector's ``predict``. Boxes
found on a mirrored tile are mirrored back (:func:`flip_boxes`), weighted by their position in the tile,
shifted by the tile start and consolidated as :mod:`pretrain_det3d.inference.consolidation` describes: per
source (one model with one mirroring) clipping, minimum size and tile-weighted NMS; then weighted box
clustering across the sources (and across models, when several are given, e.g. the folds of a run).

Mirroring boxes: flipping an axis of length ``S`` maps voxel ``i`` to ``S - 1 - i``. A box built from an
object's voxels the way the training targets are built (``data.boxes.boxes_from_instance_map``) goes from
``[lo, hi]`` to ``[S + k - hi, S + k - lo]``, where ``k`` follows from that convention
(:func:`box_flip_offset`: 0 for ``[first, last + 1)``, -1 for nnDetection's ``[first - 1, last + 1]``), so
that a box predicted on a mirrored volume returns exactly to where the unmirrored box would be.

Example:
    >>> result = predict_case(detector, image, patch_size=(64, 64, 64), mirror_axes=(0, 1, 2))  # doctest: +SKIP
    >>> result["boxes"].shape  # doctest: +SKIP
    (17, 6)
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from pretrain_det3d.data.boxes import boxes_from_instance_map
from pretrain_det3d.inference.consolidation import (
    box_centres,
    consolidate_sources,
    tile_weights,
    top_candidates,
)
from pretrain_det3d.settings.study import InferenceSettings

# defaults from the one definition of the inference settings (their sources: docs/settings.md)
#: the mirrored axes when ``inference.mirror`` is on: all spatial axes (nnDetection's 8-fold mirroring)
MIRROR_AXES = (0, 1, 2)
DEFAULT_OVERLAP = InferenceSettings.default("overlap")
DEFAULT_MAX_DETECTIONS = InferenceSettings.default("max_detections")
DEFAULT_NMS_IOU = InferenceSettings.default("nms_iou")
DEFAULT_SCORE_THRESHOLD = InferenceSettings.default("score_threshold")
DEFAULT_MIN_BOX_SIZE = InferenceSettings.default("min_box_size")
DEFAULT_WEIGHTED_NMS = InferenceSettings.default("weighted_nms")
DEFAULT_CANDIDATES = InferenceSettings.default("candidates")
DEFAULT_WBC_IOU = InferenceSettings.default("wbc_iou")
DEFAULT_WBC_SCORE_THRESHOLD = InferenceSettings.default("wbc_score_threshold")


@functools.cache
def box_flip_offset() -> float:
    """``k`` of the mirroring ``c -> S + k - c`` of box coordinates (see the module docstring), read off the
    box that ``boxes_from_instance_map`` gives a single voxel: for voxel ``i`` with box ``[i + a, i + b]``,
    ``k = a + b - 1``.

    Example:
        >>> box_flip_offset() in (0.0, -1.0)
        True
    """
    one_voxel = np.zeros((5, 5, 5), dtype=np.int16)
    one_voxel[2, 2, 2] = 1
    _, boxes = boxes_from_instance_map(one_voxel)
    return float(boxes[0, 0] + boxes[0, 3] - 2 * 2 - 1)


def tile_starts(size: int, patch: int, overlap: float = DEFAULT_OVERLAP) -> list[int]:
    """Start indices of the tiles along one axis (``[0]`` when the axis fits in one patch).

    Example:
        >>> tile_starts(100, 48, 0.5)
        [0, 17, 35, 52]
    """
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if size <= patch:
        return [0]
    target_step = patch * (1.0 - overlap)
    n_steps = math.ceil((size - patch) / target_step) + 1
    step = (size - patch) / (n_steps - 1)
    return [int(round(step * i)) for i in range(n_steps)]


def tile_positions(
    shape: Sequence[int], patch_size: Sequence[int], overlap: float = DEFAULT_OVERLAP
) -> list[tuple[int, int, int]]:
    """All tile start corners ``(z, y, x)`` covering an image of ``shape``, in z-major order."""
    per_axis = [tile_starts(int(s), int(p), overlap) for s, p in zip(shape, patch_size)]
    return list(itertools.product(*per_axis))


def flip_boxes(
    boxes: torch.Tensor | np.ndarray, axes: Sequence[int], size: Sequence[int], offset: float | None = None
) -> torch.Tensor | np.ndarray:
    """Mirror standard-mode boxes along spatial ``axes`` of a patch of ``size``: ``c -> size + offset - c`` with
    min and max swapped (its own inverse). ``offset`` defaults to :func:`box_flip_offset` (the project's box
    convention).

    Example:
        >>> flip_boxes(torch.tensor([[1., 2, 3, 4, 5, 6]]), [0], [10, 10, 10], offset=0)
        tensor([[6., 2., 3., 9., 5., 6.]])
        >>> flip_boxes(np.array([[1., 2, 3, 4, 5, 6]]), [0], [10, 10, 10], offset=-1).tolist()
        [[5.0, 2.0, 3.0, 8.0, 5.0, 6.0]]
    """
    k = box_flip_offset() if offset is None else float(offset)
    flipped = boxes.clone() if isinstance(boxes, torch.Tensor) else np.array(boxes, dtype=np.float64, copy=True)
    for axis in axes:
        flipped[:, axis] = size[axis] + k - boxes[:, axis + 3]
        flipped[:, axis + 3] = size[axis] + k - boxes[:, axis]
    return flipped


def mirror_combinations(mirror_axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every subset of ``mirror_axes`` (the empty one first): nnU-Net's mirroring TTA."""
    axes = tuple(sorted(set(int(a) for a in mirror_axes)))
    if any(a not in (0, 1, 2) for a in axes):
        raise ValueError(f"mirror axes are spatial axes 0 (z), 1 (y), 2 (x); got {list(mirror_axes)}")
    return [combo for r in range(len(axes) + 1) for combo in itertools.combinations(axes, r)]


def predict_case(
    detector: nn.Module | Sequence[nn.Module],
    image: np.ndarray,
    patch_size: Sequence[int],
    overlap: float = DEFAULT_OVERLAP,
    mirror_axes: Sequence[int] = (),
    batch_size: int = 1,
    device: str | torch.device = "cpu",
    max_detections: int = DEFAULT_MAX_DETECTIONS,
    nms_iou: float = DEFAULT_NMS_IOU,
    score_threshold: float = DEFAULT_SCORE_THRESHOLD,
    min_box_size: float = DEFAULT_MIN_BOX_SIZE,
    weighted_nms: bool = DEFAULT_WEIGHTED_NMS,
    candidates: int = DEFAULT_CANDIDATES,
    wbc_iou: float = DEFAULT_WBC_IOU,
    wbc_score_threshold: float = DEFAULT_WBC_SCORE_THRESHOLD,
) -> dict[str, np.ndarray]:
    """Detect on a whole image ``[C, Z, Y, X]``; returns numpy ``boxes [N, 6]``, ``scores [N]``, ``labels [N]``
    in the image's voxel coordinates (MONAI standard mode, z-y-x), best score first, at most ``max_detections``.

    ``detector`` may be several models (e.g. the folds of one run): each model with each mirroring is one
    source of the weighted box clustering. The consolidation parameters are those of ``InferenceSettings``
    (module :mod:`pretrain_det3d.inference.consolidation`). The detectors are moved to ``device`` and put in
    eval mode. Equal to :func:`~pretrain_det3d.inference.consolidation.consolidate_sources` applied to
    :func:`predict_sources` (what the post-processing sweep re-consolidates).
    """
    sources = predict_sources(
        detector, image, patch_size, overlap=overlap, mirror_axes=mirror_axes, batch_size=batch_size,
        device=device, candidates=candidates,
    )
    return consolidate_sources(
        sources, list(image.shape[1:]), candidates=candidates, score_threshold=score_threshold,
        min_box_size=min_box_size, nms_iou=nms_iou, weighted_nms=weighted_nms, wbc_iou=wbc_iou,
        wbc_score_threshold=wbc_score_threshold, max_detections=max_detections,
    )


def predict_case_with_settings(
    detector: nn.Module | Sequence[nn.Module],
    image: np.ndarray,
    options: Mapping[str, Any],
    device: str | torch.device | None = None,
) -> dict[str, np.ndarray]:
    """:func:`predict_case` with the keys of an ``InferenceSettings`` dump (``patch_size`` set; ``mirror`` true
    means every spatial axis); ``device`` overrides ``options["device"]``."""
    return predict_case(
        detector,
        image,
        patch_size=options["patch_size"],
        overlap=float(options["overlap"]),
        mirror_axes=MIRROR_AXES if options["mirror"] else (),
        batch_size=int(options["batch_size"]),
        device=options["device"] if device is None else device,
        max_detections=int(options["max_detections"]),
        nms_iou=float(options["nms_iou"]),
        score_threshold=float(options["score_threshold"]),
        min_box_size=float(options["min_box_size"]),
        weighted_nms=bool(options["weighted_nms"]),
        candidates=int(options["candidates"]),
        wbc_iou=float(options["wbc_iou"]),
        wbc_score_threshold=float(options["wbc_score_threshold"]),
    )


def predict_sources(
    detector: nn.Module | Sequence[nn.Module],
    image: np.ndarray,
    patch_size: Sequence[int],
    overlap: float = DEFAULT_OVERLAP,
    mirror_axes: Sequence[int] = (),
    batch_size: int = 1,
    device: str | torch.device = "cpu",
    candidates: int = DEFAULT_CANDIDATES,
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """The raw passes of a case, before any consolidation: per source (model x mirroring, models outer, the
    mirrorings of :func:`mirror_combinations` inner) the ``candidates`` best boxes of all its tiles as
    ``(boxes [n, 6] image coordinates, scores [n], labels [n], tile weights [n])``, best score first.

    Nothing is clipped or removed yet; keeping only the best ``candidates`` changes no consolidation with at
    most that many ``candidates`` (:func:`~pretrain_det3d.inference.consolidation.top_candidates`).
    """
    if image.ndim != 4:
        raise ValueError(f"expected an image [C, Z, Y, X], got shape {image.shape}")
    if len(patch_size) != 3:
        raise ValueError(f"patch_size must have 3 entries, got {list(patch_size)}")
    detectors = [detector] if isinstance(detector, nn.Module) else list(detector)
    if not detectors:
        raise ValueError("predict_case needs at least one detector")
    patch = [int(p) for p in patch_size]
    shape = list(image.shape[1:])
    padded_shape = [max(s, p) for s, p in zip(shape, patch)]
    # Copy out of a memory map once; pad the far end where the image is smaller than the patch.
    volume = np.zeros([image.shape[0], *padded_shape], dtype=np.float32)
    volume[:, : shape[0], : shape[1], : shape[2]] = image
    volume_t = torch.from_numpy(volume)

    flips = mirror_combinations(mirror_axes)
    positions = tile_positions(padded_shape, patch, overlap)
    # the tile centre is the fixed point of the mirroring, so a box and its mirrored twin weigh the same
    tile_centre = [(p + box_flip_offset()) / 2.0 for p in patch]
    # per source (model, flip): lists of boxes [n, 6] (image coordinates), scores, labels and tile weights
    collected: dict[tuple[int, tuple[int, ...]], list[list[np.ndarray]]] = {
        (m, flip): [[], [], [], []] for m in range(len(detectors)) for flip in flips
    }
    # Every (tile, flip) pair is one forward; they are batched together.
    jobs = [(start, flip) for start in positions for flip in flips]
    step = max(1, int(batch_size))
    for m, model in enumerate(detectors):
        model.to(device).eval()
        for first in range(0, len(jobs), step):
            batch_jobs = jobs[first : first + step]
            tiles = []
            for (z, y, x), flip in batch_jobs:
                tile = volume_t[:, z : z + patch[0], y : y + patch[1], x : x + patch[2]]  # [C, pz, py, px]
                tiles.append(torch.flip(tile, dims=[a + 1 for a in flip]) if flip else tile)
            with torch.no_grad():
                outputs = model.predict(torch.stack(tiles).to(device))
            for (start, flip), output in zip(batch_jobs, outputs):
                boxes = output["boxes"].detach().cpu().double().numpy().reshape(-1, 6)
                if flip:
                    boxes = flip_boxes(boxes, flip, patch)
                store = collected[(m, flip)]
                store[0].append(boxes + np.asarray(list(start) * 2, dtype=np.float64))
                store[1].append(output["scores"].detach().cpu().double().numpy().reshape(-1))
                store[2].append(output["labels"].detach().cpu().long().numpy().reshape(-1))
                store[3].append(tile_weights(box_centres(boxes), patch, tile_centre))

    return [
        top_candidates(
            np.concatenate(boxes) if boxes else np.zeros((0, 6)),
            np.concatenate(scores) if scores else np.zeros(0),
            np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64),
            np.concatenate(weights) if weights else np.zeros(0),
            candidates,
        )
        for boxes, scores, labels, weights in collected.values()
    ]
