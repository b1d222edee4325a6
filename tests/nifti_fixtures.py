"""Builders shared by the converter tests that write real NIfTI files (oblique or flipped geometry included)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from pretrain_det3d.data.boxes import instance_voxel_extents
from pretrain_det3d.data.io import read_case


def make_image(array_zyx: np.ndarray, spacing_xyz: Sequence[float], origin_xyz: Sequence[float],
               direction: Sequence[float]) -> sitk.Image:
    """A SimpleITK image of ``array_zyx`` with the given geometry (SimpleITK's x, y, z order)."""
    image = sitk.GetImageFromArray(array_zyx)
    image.SetSpacing(tuple(spacing_xyz))
    image.SetOrigin(tuple(origin_xyz))
    image.SetDirection(tuple(direction))
    return image


def write_image(path: Path, image: sitk.Image) -> None:
    """Write ``image`` compressed, creating the parent folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=True)


def boxes_and_classes(root: Path, case: str) -> tuple[list[tuple[int, ...]], list[int]]:
    """Voxel extents ``(first z, y, x, last z, y, x + 1)`` (``data.boxes.instance_voxel_extents``: which voxels
    the converter painted, independent of the box convention) and class indices of the instances of one
    converted case, in instance-id order."""
    converted = read_case(root, case)
    ids, boxes = instance_voxel_extents(converted.instance_map)
    return [tuple(int(v) for v in box) for box in boxes], [converted.instances[int(i)] for i in ids]
