"""Box IoU in torch without MONAI's per-call validity checks: the overlap metric of the detectors' NMS.

MONAI's greedy ``non_max_suppression`` calls its overlap metric once per kept box, and MONAI's ``box_iou``
checks every box for negative sizes, NaN and infinity on each call; with the release's score threshold of 0 and
a thousand candidates per level those checks took about 70 % of a Retina U-Net prediction on the CPU (profiled:
2.1 s of 2.7 s per demo case). :func:`box_iou_unchecked` does the same arithmetic in the same order (float32,
MONAI's epsilon on the union, no ``+ 1`` term), so the IoUs are bit-identical and NMS keeps the same boxes
(tests/test_models_box_overlap.py compares both with MONAI's), and it skips the checks: its callers pass boxes
that MONAI's ``clip_boxes_to_image(remove_empty=True)`` has just clipped and filtered.

Example:
    >>> import torch
    >>> box_iou_unchecked(torch.tensor([[0., 0, 0, 2, 2, 2]]), torch.tensor([[0., 0, 0, 2, 2, 1]]))
    tensor([[0.5000]])
"""

from __future__ import annotations

import torch
from torch import Tensor

#: MONAI's box_utils computes IoUs in this dtype and adds its machine epsilon to the union.
COMPUTE_DTYPE = torch.float32


def box_iou_unchecked(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU ``[N, M]`` of standard-mode boxes ``boxes1 [N, 6]`` and ``boxes2 [M, 6]`` (or ``[., 4]`` in 2-D), in the
    dtype of ``boxes1`` when it is floating point (float32 otherwise), as MONAI's ``box_iou`` returns it."""
    dims = boxes1.shape[-1] // 2
    a = boxes1.to(COMPUTE_DTYPE)
    b = boxes2.to(COMPUTE_DTYPE)
    area_a = a[:, dims] - a[:, 0]
    area_b = b[:, dims] - b[:, 0]
    for axis in range(1, dims):  # left to right, as MONAI multiplies
        area_a = area_a * (a[:, dims + axis] - a[:, axis])
        area_b = area_b * (b[:, dims + axis] - b[:, axis])
    low = torch.max(boxes1[:, None, :dims], boxes2[:, :dims]).to(COMPUTE_DTYPE)  # [N, M, dims]
    high = torch.min(boxes1[:, None, dims:], boxes2[:, dims:]).to(COMPUTE_DTYPE)  # [N, M, dims]
    intersection = torch.prod((high - low).clamp(min=0), dim=-1)  # [N, M]
    union = area_a[:, None] + area_b - intersection
    iou = intersection / (union + torch.finfo(COMPUTE_DTYPE).eps)
    return iou.to(boxes1.dtype if boxes1.dtype.is_floating_point else COMPUTE_DTYPE)
