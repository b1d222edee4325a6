"""Bounding boxes of instance maps, in MONAI's standard mode, and their pairwise IoU in numpy.

Boxes are ``(min0, min1, min2, max0, max1, max2)`` over the numpy array axes (z, y, x as SimpleITK returns
them), in voxels, with the max exclusive: a single voxel at index ``i`` spans ``[i, i + 1)``.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def boxes_from_instance_map(instance_map: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(instance_ids, boxes)`` for every instance id > 0 present in ``instance_map``.

    Example:
        >>> m = np.zeros((4, 4, 4), dtype=np.int16); m[1:3, 0, 2] = 1
        >>> boxes_from_instance_map(m)
        (array([1]), array([[1., 0., 2., 3., 1., 3.]]))
    """
    if instance_map.ndim != 3:
        raise ValueError(f"expected a 3D instance map, got shape {instance_map.shape}")
    labels = np.asarray(instance_map)
    if labels.size == 0 or labels.max() <= 0:
        return np.zeros((0,), dtype=np.int64), np.zeros((0, 6), dtype=np.float64)
    slices = ndimage.find_objects(labels.astype(np.int64, copy=False))
    ids, boxes = [], []
    for index, sl in enumerate(slices, start=1):
        if sl is None:
            continue
        ids.append(index)
        boxes.append([s.start for s in sl] + [s.stop for s in sl])
    return np.asarray(ids, dtype=np.int64), np.asarray(boxes, dtype=np.float64).reshape(-1, 6)


#: The IoU is computed in float32 with this epsilon added to the union, as MONAI's ``box_iou`` does.
IOU_COMPUTE_DTYPE = np.float32
IOU_EPSILON = np.finfo(IOU_COMPUTE_DTYPE).eps


def pairwise_box_iou(boxes1: np.ndarray, boxes2: np.ndarray) -> np.ndarray:
    """IoU of every box of ``boxes1`` ``[N, 6]`` with every box of ``boxes2`` ``[M, 6]``; float64 ``[N, M]``.

    The same numbers as MONAI's ``monai.data.box_utils.box_iou`` (float32 arithmetic, float32 epsilon on the
    union; tests/test_data_boxes.py compares the two), but in numpy: the evaluation and report jobs need
    nothing else from torch or MONAI, and importing those costs 5-10 s in every such job (the demo study runs
    about 25 of them).

    Example:
        >>> pairwise_box_iou(np.array([[0, 0, 0, 2, 2, 2.]]), np.array([[0, 0, 0, 2, 2, 1.], [4, 4, 4, 5, 5, 5.]]))
        array([[0.5, 0. ]])
    """
    a = np.asarray(boxes1, dtype=IOU_COMPUTE_DTYPE).reshape(-1, 6)
    b = np.asarray(boxes2, dtype=IOU_COMPUTE_DTYPE).reshape(-1, 6)
    area_a = np.prod(a[:, 3:] - a[:, :3], axis=1)  # [N]
    area_b = np.prod(b[:, 3:] - b[:, :3], axis=1)  # [M]
    low = np.maximum(a[:, None, :3], b[None, :, :3])  # [N, M, 3]
    high = np.minimum(a[:, None, 3:], b[None, :, 3:])  # [N, M, 3]
    intersection = np.prod(np.clip(high - low, 0, None), axis=2)  # [N, M]
    union = area_a[:, None] + area_b[None, :] - intersection
    iou = intersection / (union + IOU_EPSILON)
    if not np.isfinite(iou).all():
        raise ValueError("box IoU is not finite: are some boxes NaN or infinite?")
    return iou.astype(np.float64)
