"""Sliding-window detection over a whole (preprocessed) image, with optional mirror test-time augmentation.

The image is cut into patch-sized tiles that overlap by ``overlap`` (tile starts as nnU-Net spaces them:
the fewest steps no longer than ``patch * (1 - overlap)``, spread evenly from the first to the last
possible start). An image smaller than the patch is padded with zeros at its far end (zero is the mean of a
normalised image). Every tile (and, with ``mirror_axes``, each of its flipped copies) goes through the
detector's ``predict``; boxes are flipped back, shifted by the tile start, clipped to the image, and the
union is consolidated with class-wise NMS (MONAI ``batched_nms``), keeping the ``max_detections`` best.

Example:
    >>> result = predict_case(detector, image, patch_size=(64, 64, 64), mirror_axes=(0, 1, 2))  # doctest: +SKIP
    >>> result["boxes"].shape  # doctest: +SKIP
    (17, 6)
"""

from __future__ import annotations

import itertools
import math
from typing import Sequence

import numpy as np
import torch
from monai.data.box_utils import batched_nms, clip_boxes_to_image
from torch import nn

from pretrain_det3d.settings.study import InferenceSettings

# defaults from the one definition of the inference settings; the score threshold is 0 because the detector
# already drops low scores per tile and AP/FROC need the rest
DEFAULT_OVERLAP = InferenceSettings.default("overlap")
DEFAULT_MAX_DETECTIONS = InferenceSettings.default("max_detections")
DEFAULT_NMS_IOU = InferenceSettings.default("nms_iou")
DEFAULT_SCORE_THRESHOLD = InferenceSettings.default("score_threshold")


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


def flip_boxes(boxes: torch.Tensor, axes: Sequence[int], size: Sequence[int]) -> torch.Tensor:
    """Mirror standard-mode boxes along spatial ``axes`` of a patch of ``size`` (its own inverse).

    Example:
        >>> flip_boxes(torch.tensor([[1., 2, 3, 4, 5, 6]]), [0], [10, 10, 10])
        tensor([[6., 2., 3., 9., 5., 6.]])
    """
    flipped = boxes.clone()
    for axis in axes:
        flipped[:, axis] = size[axis] - boxes[:, axis + 3]
        flipped[:, axis + 3] = size[axis] - boxes[:, axis]
    return flipped


def mirror_combinations(mirror_axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every subset of ``mirror_axes`` (the empty one first): nnU-Net's mirroring TTA."""
    axes = tuple(sorted(set(int(a) for a in mirror_axes)))
    if any(a not in (0, 1, 2) for a in axes):
        raise ValueError(f"mirror axes are spatial axes 0 (z), 1 (y), 2 (x); got {list(mirror_axes)}")
    return [combo for r in range(len(axes) + 1) for combo in itertools.combinations(axes, r)]


def predict_case(
    detector: nn.Module,
    image: np.ndarray,
    patch_size: Sequence[int],
    overlap: float = DEFAULT_OVERLAP,
    mirror_axes: Sequence[int] = (),
    batch_size: int = 1,
    device: str | torch.device = "cpu",
    max_detections: int = DEFAULT_MAX_DETECTIONS,
    nms_iou: float = DEFAULT_NMS_IOU,
    score_threshold: float = DEFAULT_SCORE_THRESHOLD,
) -> dict[str, np.ndarray]:
    """Detect on a whole image ``[C, Z, Y, X]``; returns numpy ``boxes [N, 6]``, ``scores [N]``, ``labels [N]``
    in the image's voxel coordinates (MONAI standard mode, z-y-x), best score first.

    The detector is moved to ``device`` and put in eval mode.
    """
    if image.ndim != 4:
        raise ValueError(f"expected an image [C, Z, Y, X], got shape {image.shape}")
    if len(patch_size) != 3:
        raise ValueError(f"patch_size must have 3 entries, got {list(patch_size)}")
    patch = [int(p) for p in patch_size]
    shape = list(image.shape[1:])
    padded_shape = [max(s, p) for s, p in zip(shape, patch)]
    # Copy out of a memory map once; pad the far end where the image is smaller than the patch.
    volume = np.zeros([image.shape[0], *padded_shape], dtype=np.float32)
    volume[:, : shape[0], : shape[1], : shape[2]] = image
    volume_t = torch.from_numpy(volume)

    detector.to(device).eval()
    flips = mirror_combinations(mirror_axes)
    positions = tile_positions(padded_shape, patch, overlap)
    # Every (tile, flip) pair is one forward; they are batched together.
    jobs = [(start, flip) for start in positions for flip in flips]
    all_boxes, all_scores, all_labels = [], [], []
    for first in range(0, len(jobs), max(1, batch_size)):
        batch_jobs = jobs[first : first + max(1, batch_size)]
        tiles = []
        for (z, y, x), flip in batch_jobs:
            tile = volume_t[:, z : z + patch[0], y : y + patch[1], x : x + patch[2]]  # [C, pz, py, px]
            tiles.append(torch.flip(tile, dims=[a + 1 for a in flip]) if flip else tile)
        with torch.no_grad():
            outputs = detector.predict(torch.stack(tiles).to(device))
        for ((z, y, x), flip), output in zip(batch_jobs, outputs):
            boxes = output["boxes"].detach().float().cpu()
            if flip:
                boxes = flip_boxes(boxes, flip, patch)
            boxes = boxes + torch.tensor([z, y, x, z, y, x], dtype=boxes.dtype)
            all_boxes.append(boxes)
            all_scores.append(output["scores"].detach().float().cpu())
            all_labels.append(output["labels"].detach().long().cpu())

    boxes = torch.cat(all_boxes) if all_boxes else torch.zeros(0, 6)
    scores = torch.cat(all_scores) if all_scores else torch.zeros(0)
    labels = torch.cat(all_labels) if all_labels else torch.zeros(0, dtype=torch.long)
    keep = scores >= score_threshold
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    boxes, kept = clip_boxes_to_image(boxes, shape, remove_empty=True)  # drop what lies in the padding
    scores, labels = scores[kept], labels[kept]
    if len(scores):
        order = batched_nms(boxes, scores, labels, nms_iou, max_proposals=max_detections)
        boxes, scores, labels = boxes[order], scores[order], labels[order]
    return {
        "boxes": boxes.numpy().astype(np.float64).reshape(-1, 6),
        "scores": scores.numpy().astype(np.float64),
        "labels": labels.numpy().astype(np.int64),
    }
