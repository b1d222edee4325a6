"""Boxes of instance maps, in nnDetection's voxel convention and MONAI's standard mode, and their IoU in numpy.

Box layout: MONAI's standard mode ``(min0, min1, min2, max0, max1, max2)`` over the numpy array axes (z, y, x
as SimpleITK returns them), in voxels of the array the mask came from.

Convention (nnDetection's, ``nndet/io/transforms/instances.py``: ``instances_to_boxes_np``, and the same rule
in ``instances_to_boxes``, the planner's ``iseg_to_boxes`` and the evaluation labels of
``nndet/planning/experiment/utils.py``): box coordinates are continuous voxel indices, voxel ``i``'s centre
sitting at ``i``. An instance whose voxels run from index ``first`` to ``last`` along an axis gets
``[first - 1, last + 1]`` there. So

- a single voxel at ``i`` gives ``[i - 1, i + 1]`` (extent 2), and ``n`` voxels give extent ``n + 1``
  (:func:`box_voxel_counts` inverts this: ``max - min - 1``);
- the box centre ``(min + max) / 2`` is the centre of the outermost voxel centres (:func:`box_centre_indices`):
  the symmetric padding leaves it unchanged, and it is directly a SimpleITK continuous index (reversed to x, y, z);
- the box is one voxel wider per axis than the voxels' own extent ``[first - 0.5, last + 0.5]``.

:func:`instance_voxel_extents` gives the plain ``[first, last + 1)`` slices for code that indexes arrays
(cropping, sampling), which must not use the boxes as slices (``first - 1`` is ``-1`` at the border).

Clipping, as nnDetection does it:

- boxes made from masks are never clipped: an object touching index 0 gets ``min = -1`` and one touching the
  last index ``S - 1`` gets ``max = S``. This holds for the evaluation ground truth (made from the whole
  converted label map, as nnDetection's ``*_boxes_gt.npz``) and for the training targets, which are made from
  the cropped, augmented patch's instance map (nnDetection's ``Instances2Boxes`` on the batch): an object cut by
  the patch border gets the box of its part inside the patch, reaching ``-1`` or the patch size, and an object
  cropped away entirely gets none;
- predicted boxes are clipped to ``[0, S]`` per axis (nnDetection's ``clip_boxes_to_image``: the retina
  post-processing and the ensembler), in :mod:`pretrain_det3d.inference.consolidation` and, after mapping to
  the converted image, by :func:`pretrain_det3d.data.preprocessing.map_boxes_to_original`.

IoU (:func:`pairwise_box_iou`): volumes are plain products of ``max - min`` (no ``+ 1`` term), as
nnDetection's ``box_iou`` / ``box_iou_np`` and MONAI's ``box_iou``.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

#: The box of an instance reaches this many voxel-index units below its first voxel and above its last one.
BOX_MARGIN = 1


def instance_voxel_extents(instance_map: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(instance_ids, extents)``: per instance id > 0 present in ``instance_map``, the integer slice
    bounds ``(first0, first1, first2, last0 + 1, last1 + 1, last2 + 1)`` of its voxels (for indexing arrays;
    not a box, see the module docstring).

    Example:
        >>> m = np.zeros((4, 4, 4), dtype=np.int16); m[1:3, 0, 2] = 1
        >>> instance_voxel_extents(m)
        (array([1]), array([[1, 0, 2, 3, 1, 3]]))
    """
    if instance_map.ndim != 3:
        raise ValueError(f"expected a 3D instance map, got shape {instance_map.shape}")
    labels = np.asarray(instance_map)
    if labels.size == 0 or labels.max() <= 0:
        return np.zeros((0,), dtype=np.int64), np.zeros((0, 6), dtype=np.int64)
    slices = ndimage.find_objects(labels.astype(np.int64, copy=False))
    ids, extents = [], []
    for index, sl in enumerate(slices, start=1):
        if sl is None:
            continue
        ids.append(index)
        extents.append([s.start for s in sl] + [s.stop for s in sl])
    return np.asarray(ids, dtype=np.int64), np.asarray(extents, dtype=np.int64).reshape(-1, 6)


def extents_to_boxes(extents: np.ndarray) -> np.ndarray:
    """Boxes (float64 ``[N, 6]``) of voxel extents ``[first, last + 1)``: ``[first - 1, last + 1]`` per axis.

    Example:
        >>> extents_to_boxes(np.array([[2, 0, 5, 3, 2, 9]])).tolist()  # one voxel along z at 2, y 0..1, x 5..8
        [[1.0, -1.0, 4.0, 3.0, 2.0, 9.0]]
    """
    extents = np.asarray(extents, dtype=np.float64).reshape(-1, 6)
    # the stop of a slice is already last + 1 = last + BOX_MARGIN
    return np.concatenate([extents[:, :3] - BOX_MARGIN, extents[:, 3:] + (BOX_MARGIN - 1)], axis=1)


def boxes_from_instance_map(instance_map: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(instance_ids, boxes)`` for every instance id > 0 present in ``instance_map``: nnDetection's
    ``[first - 1, last + 1]`` per axis (module docstring), not clipped, float64 ``[N, 6]``.

    Example:
        >>> m = np.zeros((4, 4, 4), dtype=np.int16); m[1, 2, 3] = 1  # a single voxel at (1, 2, 3)
        >>> boxes_from_instance_map(m)
        (array([1]), array([[0., 1., 2., 2., 3., 4.]]))
        >>> m[1:3, 0, 2] = 2  # two voxels along z, touching the border y = 0
        >>> boxes_from_instance_map(m)[1][1].tolist()
        [0.0, -1.0, 1.0, 3.0, 1.0, 3.0]
    """
    ids, extents = instance_voxel_extents(instance_map)
    return ids, extents_to_boxes(extents)


def box_voxel_counts(boxes: np.ndarray) -> np.ndarray:
    """Voxels per axis ``[N, 3]`` spanned by boxes made from masks: ``max - min - 1`` (the inverse of the
    padding; times the spacing, the object's extent in mm).

    Example:
        >>> box_voxel_counts(np.array([[0, 1, 2, 2, 3, 4.], [0, -1, 1, 3, 1, 3.]])).tolist()
        [[1.0, 1.0, 1.0], [2.0, 1.0, 1.0]]
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 6)
    return boxes[:, 3:] - boxes[:, :3] - 2 * BOX_MARGIN + 1


def box_centre_indices(boxes: np.ndarray) -> np.ndarray:
    """Continuous voxel indices ``[N, 3]`` (z, y, x; voxel ``i``'s centre at ``i``) of the box centres.

    Example:
        >>> box_centre_indices(np.array([[0, 1, 2, 2, 3, 4.]])).tolist()  # the single voxel at (1, 2, 3)
        [[1.0, 2.0, 3.0]]
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 6)
    return (boxes[:, :3] + boxes[:, 3:]) / 2.0


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
