"""Helpers for converters whose annotations are label maps (RibFrac, KiTS21, MSD Pancreas).

Three jobs, shared by those converters:

- :func:`read_nifti` / :func:`check_same_grid`: read an image and its label map and insist they share one voxel
  grid (size, spacing, origin, direction), so that the instance map can inherit the image's geometry;
- :func:`integer_labels`: the label map as integers, refusing fractional values;
- :func:`connected_instances`: semantic labels -> instances by connected components, with a size filter.

Connectivity: the default is 26 (the full 3 x 3 x 3 structuring element: voxels touching by a face, an edge or
a corner belong to one object), so a lesion whose annotation touches itself only diagonally stays one object.
``6`` (faces only) and ``18`` (faces and edges) are available.

Size filter (``min_extent_mm``), in nnDetection's convention (``convert_seg2det.py``'s ``min_size``): a
component is kept when, along every array axis except the one with the coarsest spacing (the slice axis of an
anisotropic CT; on ties the first such axis, z), the side of its padded box is *longer than* ``min_extent_mm``
millimetres. nnDetection's boxes span ``[first - 1, last + 1]`` of the voxel indices, so a component covering
``n`` voxels along an axis has a side of ``(n + 1) x spacing``, and the test is ``(n + 1) x spacing >
min_extent_mm``: at 0.8 mm spacing a 3-voxel lesion (3.2 mm) is kept and a 2-voxel one (2.4 mm) dropped. The
slice axis is left out because a small lesion legitimately covers a single thick slice. ``0`` keeps every
component. :func:`large_enough` is the test on its own, for converters that build instances otherwise.

Example:
    >>> seg = np.zeros((3, 6, 6), np.uint8); seg[1, 1:4, 1:4] = 2; seg[1, 5, 5] = 2
    >>> instance_map, instances, dropped = connected_instances(seg, {2: 0}, (2.0, 1.0, 1.0), min_extent_mm=2.0)
    >>> instances, len(dropped)  # the 3 x 3 block has sides of 4 mm; the single voxel's are 2 mm, not > 2 mm
    ({1: 0}, 1)
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from pretrain_det3d.data.converters.base import ConversionError
from pretrain_det3d.data.errors import DatasetFormatError
from pretrain_det3d.data.io import read_image

#: tolerances for "same grid", as the converted-format check uses (float32 NIfTI headers round-trip)
SPACING_RTOL = 1e-5
ORIGIN_ATOL_MM = 1e-3
DIRECTION_ATOL = 1e-5
#: connectivity name -> ``generate_binary_structure`` rank argument
CONNECTIVITY_RANK = {6: 1, 18: 2, 26: 3}
DEFAULT_CONNECTIVITY = 26


def read_nifti(path: str | os.PathLike) -> sitk.Image:
    """Read a 3D single-channel image; a missing, unreadable or non-3D file raises :class:`ConversionError`.

    Example:
        >>> read_nifti("kits21/data/case_00000/imaging.nii.gz").GetDimension()  # doctest: +SKIP
        3
    """
    try:  # data.io's reader checks the bytes first: SimpleITK zero-fills a truncated file without a word
        return read_image(path)
    except DatasetFormatError as error:
        raise ConversionError(str(error)) from None


def check_same_grid(image: sitk.Image, image_path: str | os.PathLike, label: sitk.Image,
                    label_path: str | os.PathLike) -> None:
    """Raise :class:`ConversionError` naming ``label_path`` and the field where the two grids differ.

    Example:
        >>> a = sitk.Image(4, 4, 4, sitk.sitkInt16); b = sitk.Image(4, 4, 4, sitk.sitkUInt8)
        >>> check_same_grid(a, "a.nii.gz", b, "b.nii.gz")  # same grid: no error
    """
    checks = {
        "size": (image.GetSize(), label.GetSize(), lambda a, b: tuple(a) == tuple(b)),
        "spacing": (image.GetSpacing(), label.GetSpacing(),
                    lambda a, b: np.allclose(a, b, rtol=SPACING_RTOL, atol=0.0)),
        "origin": (image.GetOrigin(), label.GetOrigin(), lambda a, b: np.allclose(a, b, rtol=0.0, atol=ORIGIN_ATOL_MM)),
        "direction": (image.GetDirection(), label.GetDirection(),
                      lambda a, b: np.allclose(a, b, rtol=0.0, atol=DIRECTION_ATOL)),
    }
    def shown(values: Sequence[float], as_int: bool) -> tuple:
        return tuple(int(v) if as_int else round(float(v), 6) for v in values)

    for field_name, (ours, theirs, agree) in checks.items():
        if not agree(ours, theirs):
            as_int = field_name == "size"
            raise ConversionError.for_file(
                label_path, f"{field_name} {shown(theirs, as_int)} differs from {field_name} "
                f"{shown(ours, as_int)} of {os.fspath(image_path)}")


def integer_labels(label: sitk.Image, path: str | os.PathLike) -> np.ndarray:
    """The label map as an int64 ``[Z, Y, X]`` array; fractional or non-finite values raise ConversionError.

    Example:
        >>> integer_labels(sitk.Image(2, 2, 2, sitk.sitkFloat32), "x.nii.gz").dtype
        dtype('int64')
    """
    array = sitk.GetArrayFromImage(label)  # [Z, Y, X]
    if not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
            raise ConversionError.for_file(path, f"label map holds non-integer values (dtype {array.dtype})")
    return array.astype(np.int64)


def instance_dtype(num_instances: int) -> type:
    """Smallest signed dtype the converted instance map needs (int16 unless there are >32767 instances)."""
    return np.int16 if num_instances < np.iinfo(np.int16).max else np.int32


def relabel(instance_map: np.ndarray, kept_ids: Sequence[int]) -> np.ndarray:
    """Renumber ``kept_ids`` to 1..N in the given order; every other value becomes 0 (background).

    Example:
        >>> relabel(np.array([[0, 3, 5, 7]]), [5, 3]).tolist()
        [[0, 2, 1, 0]]
    """
    lookup = np.zeros(int(max(int(instance_map.max(initial=0)), max(kept_ids, default=0))) + 1, dtype=np.int64)
    for new_id, old_id in enumerate(kept_ids, start=1):
        lookup[int(old_id)] = new_id
    return lookup[instance_map].astype(instance_dtype(len(kept_ids)))


def structure_for(connectivity: int) -> np.ndarray:
    """The 3 x 3 x 3 structuring element of 6-, 18- or 26-connectivity."""
    if connectivity not in CONNECTIVITY_RANK:
        raise ValueError(f"connectivity must be one of {sorted(CONNECTIVITY_RANK)}, got {connectivity!r}")
    return ndimage.generate_binary_structure(3, CONNECTIVITY_RANK[connectivity])


def _kept_axes(spacing_zyx: Sequence[float]) -> list[int]:
    """Array axes whose extent the size filter checks: all but the (first) coarsest-spacing axis."""
    coarsest = int(np.argmax(np.asarray(spacing_zyx, dtype=float)))
    return [axis for axis in range(3) if axis != coarsest]


def padded_sides_mm(voxels_spanned: Sequence[int], spacing_zyx: Sequence[float]) -> list[float]:
    """Sides in mm of nnDetection's box around an object spanning ``voxels_spanned`` voxels per array axis:
    ``(n + 1) x spacing`` (the box runs from ``first - 1`` to ``last + 1``).

    Example:
        >>> padded_sides_mm((1, 3, 3), (2.5, 0.8, 0.8))
        [5.0, 3.2, 3.2]
    """
    return [(int(n) + 1) * float(sp) for n, sp in zip(voxels_spanned, spacing_zyx)]


def large_enough(voxels_spanned: Sequence[int], spacing_zyx: Sequence[float], min_extent_mm: float) -> bool:
    """The size filter of the module docstring: every padded side except the coarsest axis's is longer than
    ``min_extent_mm`` (``0`` keeps everything).

    Example:
        >>> large_enough((1, 3, 3), (2.5, 0.8, 0.8), 3.0), large_enough((1, 2, 3), (2.5, 0.8, 0.8), 3.0)
        (True, False)
    """
    sides = padded_sides_mm(voxels_spanned, spacing_zyx)
    return all(sides[axis] > min_extent_mm for axis in _kept_axes(spacing_zyx))


def connected_instances(
    semantic: np.ndarray,
    classes_of_labels: Mapping[int, int],
    spacing_zyx: Sequence[float],
    min_extent_mm: float = 0.0,
    connectivity: int = DEFAULT_CONNECTIVITY,
) -> tuple[np.ndarray, dict[int, int], list[dict[str, Any]]]:
    """Turn semantic labels into an instance map by connected components.

    Args:
        semantic: integer label map ``[Z, Y, X]``.
        classes_of_labels: semantic label value -> class index of the converted dataset (other labels are
            background).
        spacing_zyx: voxel size along the array axes, mm.
        min_extent_mm: size filter (module docstring); 0 keeps all components.
        connectivity: 6, 18 or 26.

    Returns:
        ``(instance_map, instances, dropped)``: the map (ids 1..N, numbered by label value, then in scipy's
        raster order of each component's first voxel), instance id -> class index, and one record per
        dropped component (``label``, ``box`` = voxel extent, max exclusive, ``sides_mm`` = its padded box's
        sides, the numbers the filter compared).
    """
    structure = structure_for(connectivity)
    instance_map = np.zeros(semantic.shape, dtype=np.int32)
    instances: dict[int, int] = {}
    dropped: list[dict[str, Any]] = []
    for label_value in sorted(classes_of_labels):
        components, count = ndimage.label(semantic == label_value, structure=structure)
        for component_id, box in enumerate(ndimage.find_objects(components), start=1):
            if box is None:
                continue
            spanned = [s.stop - s.start for s in box]
            if not large_enough(spanned, spacing_zyx, min_extent_mm):
                dropped.append({"label": int(label_value),
                                "box": [s.start for s in box] + [s.stop for s in box],
                                "sides_mm": [round(e, 4) for e in padded_sides_mm(spanned, spacing_zyx)]})
                continue
            instance_id = len(instances) + 1
            instance_map[box][components[box] == component_id] = instance_id
            instances[instance_id] = int(classes_of_labels[label_value])
    return instance_map.astype(instance_dtype(len(instances))), instances, dropped
