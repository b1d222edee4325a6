"""Hungarian (one-to-one) matching of DETR queries to ground-truth boxes in 3D.

The cost of assigning query ``q`` to target ``t`` is

    cost_class * focal(q, label_t) + cost_bbox * L1(box_q, box_t) + cost_giou * (-GIoU(box_q, box_t))

with boxes as normalised centre-size ``(cz, cy, cx, dz, dy, dx)`` (MONAI mode ``cccwhd``) for L1 and as corners
(MONAI standard mode) for GIoU. The focal cost is the focal loss of calling the query positive for the target's
class minus the focal loss of calling it negative (Deformable DETR's choice): it ranks queries by how much
matching them would lower the classification loss; its gamma and alpha are those of the classification loss
(the release's defaults: gamma 1, alpha 0.75; costs class 2 / L1 5 / GIoU 2, from
:class:`~pretrain_det3d.settings.detectors.DeformableDETRSettings`). ``scipy.optimize.linear_sum_assignment``
solves the assignment; with more targets than queries only ``num_queries`` targets get a query.

Example:
    >>> import torch
    >>> matcher = HungarianMatcher()
    >>> logits = torch.tensor([[[-4.0], [4.0]]])  # 1 image, 2 queries, 1 class
    >>> boxes = torch.tensor([[[0.2, 0.2, 0.2, 0.1, 0.1, 0.1], [0.5, 0.5, 0.5, 0.2, 0.2, 0.2]]])
    >>> target = {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.2, 0.2, 0.2]])}
    >>> [(q.tolist(), t.tolist()) for q, t in matcher(logits, boxes, [target])]
    [([1], [0])]
"""

from __future__ import annotations

from typing import Sequence

import torch

from pretrain_det3d.settings.detectors import DeformableDETRSettings
from monai.data.box_utils import box_giou, convert_box_mode
from scipy.optimize import linear_sum_assignment
from torch import Tensor

DEFAULT_COST_CLASS = DeformableDETRSettings.default("cost_class")
DEFAULT_COST_BBOX = DeformableDETRSettings.default("cost_bbox")
DEFAULT_COST_GIOU = DeformableDETRSettings.default("cost_giou")
DEFAULT_FOCAL_ALPHA = DeformableDETRSettings.default("focal_alpha")
DEFAULT_FOCAL_GAMMA = DeformableDETRSettings.default("focal_gamma")
# Keeps log() finite for probabilities that round to 0 or 1 (the release's FocalClassCriterionSigmoid: 1e-6).
LOG_EPS = 1e-6

CENTER_SIZE_MODE = "cccwhd"  # MONAI's centre-size mode; axes in array order (z, y, x) here
CORNER_MODE = "xyzxyz"  # MONAI's standard mode: (min0, min1, min2, max0, max1, max2)


def centre_size_to_corners(boxes: Tensor) -> Tensor:
    """``(cz, cy, cx, dz, dy, dx)`` -> ``(z0, y0, x0, z1, y1, x1)`` (MONAI ``convert_box_mode``).

    Example:
        >>> centre_size_to_corners(torch.tensor([[0.5, 0.5, 0.5, 0.2, 0.4, 0.6]]))
        tensor([[0.4000, 0.3000, 0.2000, 0.6000, 0.7000, 0.8000]])
    """
    if boxes.numel() == 0:
        return boxes.reshape(0, 6)
    return convert_box_mode(boxes, src_mode=CENTER_SIZE_MODE, dst_mode=CORNER_MODE)


def corners_to_centre_size(boxes: Tensor) -> Tensor:
    """``(z0, y0, x0, z1, y1, x1)`` -> ``(cz, cy, cx, dz, dy, dx)`` (MONAI ``convert_box_mode``).

    Example:
        >>> corners_to_centre_size(torch.tensor([[0.4, 0.3, 0.2, 0.6, 0.7, 0.8]]))
        tensor([[0.5000, 0.5000, 0.5000, 0.2000, 0.4000, 0.6000]])
    """
    if boxes.numel() == 0:
        return boxes.reshape(0, 6)
    return convert_box_mode(boxes, src_mode=CORNER_MODE, dst_mode=CENTER_SIZE_MODE)


def focal_class_cost(
    logits: Tensor, labels: Tensor, alpha: float = DEFAULT_FOCAL_ALPHA, gamma: float = DEFAULT_FOCAL_GAMMA
) -> Tensor:
    """``[Q, K]`` logits, ``[T]`` labels -> ``[Q, T]`` focal cost of each query taking each target's class.

    Example:
        >>> cost = focal_class_cost(torch.tensor([[3.0], [-3.0]]), torch.tensor([0]))
        >>> bool(cost[0, 0] < cost[1, 0])  # the confident query is cheaper
        True
    """
    prob = logits.float().sigmoid()
    positive = alpha * (1 - prob) ** gamma * -(prob + LOG_EPS).log()
    negative = (1 - alpha) * prob**gamma * -(1 - prob + LOG_EPS).log()
    return (positive - negative)[:, labels]


def matching_cost(
    logits: Tensor,
    boxes: Tensor,
    target_labels: Tensor,
    target_boxes: Tensor,
    cost_class: float = DEFAULT_COST_CLASS,
    cost_bbox: float = DEFAULT_COST_BBOX,
    cost_giou: float = DEFAULT_COST_GIOU,
    focal_alpha: float = DEFAULT_FOCAL_ALPHA,
    focal_gamma: float = DEFAULT_FOCAL_GAMMA,
) -> Tensor:
    """The ``[Q, T]`` cost matrix of one image (boxes normalised centre-size, see the module docstring)."""
    boxes, target_boxes = boxes.float(), target_boxes.float()
    class_term = focal_class_cost(logits, target_labels, focal_alpha, focal_gamma)
    l1_term = torch.cdist(boxes, target_boxes, p=1)
    giou_term = -box_giou(centre_size_to_corners(boxes), centre_size_to_corners(target_boxes))
    return cost_class * class_term + cost_bbox * l1_term + cost_giou * giou_term


class HungarianMatcher:
    """One-to-one assignment of queries to targets minimising :func:`matching_cost` (no gradients).

    ``__call__(logits [B, Q, K], boxes [B, Q, 6], targets)`` returns one ``(query_indices, target_indices)``
    pair of long tensors per image (sorted by query index); ``targets[b]`` has ``"labels"`` ``[T]`` and
    ``"boxes"`` ``[T, 6]`` in normalised centre-size form.
    """

    def __init__(
        self,
        cost_class: float = DEFAULT_COST_CLASS,
        cost_bbox: float = DEFAULT_COST_BBOX,
        cost_giou: float = DEFAULT_COST_GIOU,
        focal_alpha: float = DEFAULT_FOCAL_ALPHA,
        focal_gamma: float = DEFAULT_FOCAL_GAMMA,
    ) -> None:
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma

    @torch.no_grad()
    def __call__(
        self, logits: Tensor, boxes: Tensor, targets: Sequence[dict[str, Tensor]]
    ) -> list[tuple[Tensor, Tensor]]:
        if len(targets) != logits.shape[0]:
            raise ValueError(f"got {len(targets)} targets for a batch of {logits.shape[0]}")
        matches = []
        for image_logits, image_boxes, target in zip(logits, boxes, targets):
            labels, target_boxes = target["labels"], target["boxes"]
            if labels.numel() == 0:
                empty = torch.zeros(0, dtype=torch.long)
                matches.append((empty, empty.clone()))
                continue
            cost = matching_cost(
                image_logits, image_boxes, labels, target_boxes,
                self.cost_class, self.cost_bbox, self.cost_giou, self.focal_alpha, self.focal_gamma,
            )
            rows, cols = linear_sum_assignment(cost.cpu().numpy())
            matches.append((torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)))
        return matches
