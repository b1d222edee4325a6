"""Anchor shapes per FPN level, planned from the training boxes (``plan.json`` ``"box_sizes"``).

Rule (size-partitioned quantiles, in the spirit of nnDetection's data-driven anchor planning):

1. Each training box gets a size, the geometric mean of its three sides.
2. The boxes, sorted by size, are split into as many equal-count groups as there are head levels; the
   smallest boxes go to the finest level (smallest stride), the largest to the coarsest.
3. A level's ``anchors_per_level`` shapes are per-axis quantiles of its group's ``[dz, dy, dx]`` at
   ``(j + 0.5) / anchors_per_level`` (1/6, 1/2, 5/6 for three anchors): a small, a typical and a large shape.
4. Levels left without boxes (fewer boxes than levels) reuse the shapes of the last level that had boxes,
   scaled by the ratio of the strides.
5. No anchor side is smaller than ``min_side_in_strides`` times its level's stride, so anchors on coarse
   maps still cover the cell they sit in.
6. Without any training boxes, each level gets cubes of ``stride * m`` for ``m`` spaced geometrically over
   ``FALLBACK_STRIDE_MULTIPLES``.

Shapes are in preprocessed voxels along the array axes (z, y, x); the detector hands them to MONAI's
``AnchorGeneratorWithAnchorShape`` (one cell-anchor set per level).

Example:
    >>> plan_anchor_shapes([[4, 4, 4], [8, 8, 8]], strides=[1, 2], anchors_per_level=1)
    [[[4.0, 4.0, 4.0]], [[8.0, 8.0, 8.0]]]
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from pretrain_det3d.settings.detectors import RetinaUNetSettings

DEFAULT_ANCHORS_PER_LEVEL = RetinaUNetSettings.default("anchors_per_level")
DEFAULT_MIN_SIDE_IN_STRIDES = 1.0
#: Range of cube sides, in strides, used when a dataset has no training boxes at all.
FALLBACK_STRIDE_MULTIPLES = (1.0, 4.0)
#: Anchor sides are rounded to this many decimals (they are voxel sizes; more digits are noise).
ROUND_DECIMALS = 2


def plan_anchor_shapes(
    box_sizes: Sequence[Sequence[float]],
    strides: Sequence[int],
    anchors_per_level: int = DEFAULT_ANCHORS_PER_LEVEL,
    min_side_in_strides: float = DEFAULT_MIN_SIDE_IN_STRIDES,
) -> list[list[list[float]]]:
    """Return, for each level (in the order of ``strides``), ``anchors_per_level`` shapes ``[dz, dy, dx]``.

    The result is JSON-able (nested lists of floats). See the module docstring for the rule.

    Example:
        >>> plan_anchor_shapes([], strides=[4], anchors_per_level=2)
        [[[4.0, 4.0, 4.0], [16.0, 16.0, 16.0]]]
    """
    if anchors_per_level < 1:
        raise ValueError(f"anchors_per_level must be >= 1, got {anchors_per_level}")
    if not strides or any(s <= 0 for s in strides):
        raise ValueError(f"strides must be positive, got {list(strides)}")
    if list(strides) != sorted(strides):
        raise ValueError(f"strides must be sorted from fine to coarse, got {list(strides)}")
    sizes = np.asarray(box_sizes, dtype=np.float64).reshape(-1, 3) if len(box_sizes) else np.zeros((0, 3))
    if np.any(~np.isfinite(sizes)) or np.any(sizes <= 0):
        raise ValueError("box_sizes must be positive finite [dz, dy, dx] triples")

    if len(sizes) == 0:
        multiples = np.geomspace(*FALLBACK_STRIDE_MULTIPLES, num=anchors_per_level)
        shapes = [np.repeat((stride * multiples)[:, None], 3, axis=1) for stride in strides]
    else:
        order = np.argsort(np.exp(np.log(sizes).mean(axis=1)), kind="stable")
        groups = np.array_split(sizes[order], len(strides))
        quantiles = (np.arange(anchors_per_level) + 0.5) / anchors_per_level
        shapes = []
        for level, (stride, group) in enumerate(zip(strides, groups)):
            if len(group):
                shapes.append(np.quantile(group, quantiles, axis=0))  # [anchors_per_level, 3]
            else:
                # array_split leaves only trailing groups empty: scale the previous level by the stride ratio.
                shapes.append(shapes[level - 1] * (stride / strides[level - 1]))

    result = []
    for stride, level_shapes in zip(strides, shapes):
        floored = np.maximum(level_shapes, min_side_in_strides * stride)
        result.append([[round(float(v), ROUND_DECIMALS) for v in shape] for shape in floored])
    return result
