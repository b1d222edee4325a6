"""Bounding boxes of instance maps, in MONAI's standard mode.

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
