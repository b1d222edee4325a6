"""Reading and writing the converted dataset format (nnDetection's raw layout) with SimpleITK.

Layout of a converted dataset folder ``root``::

    dataset.json                       name, modality per channel, class names, licence, source, num_cases
    imagesTr/{case}_{channel:04d}.nii.gz
    labelsTr/{case}.nii.gz             instance map: 0 background, 1..N instances
    labelsTr/{case}.json               {"instances": {"1": class_index, ...}}

Arrays follow SimpleITK's numpy view, axes (z, y, x); ``spacing`` is reordered to those axes while ``origin``
and ``direction`` stay as SimpleITK gives them (x, y, z), so they can be handed back to SimpleITK unchanged.

Example:
    >>> case = read_case("results/data/converted/synthetic", "synthetic_0000")  # doctest: +SKIP
    >>> case.image.shape, case.instances  # doctest: +SKIP
    ((1, 64, 64, 64), {1: 0, 2: 0})
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import SimpleITK as sitk

from pretrain_det3d.data.errors import DatasetFormatError
from pretrain_det3d.utils.atomic import atomic_path, write_json

DATASET_JSON = "dataset.json"
IMAGES_DIR = "imagesTr"
LABELS_DIR = "labelsTr"
NIFTI_SUFFIX = ".nii.gz"
REQUIRED_DATASET_KEYS = ("name", "modality", "labels", "licence", "source", "num_cases")
# Channel files are "{case}_{channel:04d}.nii.gz"; the case id is everything before the last "_dddd".
CHANNEL_FILE_PATTERN = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})\.nii\.gz$")


@dataclass
class ConvertedCase:
    """One case of a converted dataset, in memory: what :func:`read_case` returns and what a dataset converter
    (:mod:`pretrain_det3d.data.converters`) builds for :func:`write_case`.

    Attributes:
        case_id: the case's id (file stem without channel suffix).
        image: ``[C, Z, Y, X]``, one entry per channel of ``dataset.json``'s ``modality``; float32 from
            :func:`read_case`, while a converter's dtype is kept on disk.
        instance_map: integer ``[Z, Y, X]``, 0 background, 1..N instances.
        instances: instance id -> class index (from ``labelsTr/{case}.json``).
        spacing: voxel size in mm along the array axes (z, y, x).
        origin: SimpleITK origin (x, y, z) in mm.
        direction: SimpleITK direction cosines, 9 numbers, row-major (x, y, z).
        paths: the files it was read from (empty for a case built in memory).
    """

    case_id: str
    image: np.ndarray
    instance_map: np.ndarray
    instances: dict[int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]
    paths: dict[str, str] = field(default_factory=dict)


def image_path(root: str | os.PathLike, case: str, channel: int) -> Path:
    """Path of one channel of a case: ``imagesTr/{case}_{channel:04d}.nii.gz``."""
    return Path(root) / IMAGES_DIR / f"{case}_{channel:04d}{NIFTI_SUFFIX}"


def label_path(root: str | os.PathLike, case: str) -> Path:
    """Path of a case's instance map: ``labelsTr/{case}.nii.gz``."""
    return Path(root) / LABELS_DIR / f"{case}{NIFTI_SUFFIX}"


def instances_json_path(root: str | os.PathLike, case: str) -> Path:
    """Path of a case's instance -> class file: ``labelsTr/{case}.json``."""
    return Path(root) / LABELS_DIR / f"{case}.json"


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise DatasetFormatError.for_file(path, "file is missing")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DatasetFormatError.for_file(path, f"is not valid JSON ({error})") from error


def _check_index_mapping(path: Path, key: str, mapping: Any) -> list[str]:
    """``{"0": str, "1": str, ...}`` with keys exactly 0..K-1; returns the values in index order."""
    if not isinstance(mapping, dict) or not mapping:
        raise DatasetFormatError.for_file(path, f'"{key}" must be a non-empty object {{"0": name, ...}}')
    expected = [str(index) for index in range(len(mapping))]
    if sorted(mapping, key=lambda k: (len(k), k)) != expected:
        raise DatasetFormatError.for_file(
            path, f'"{key}" keys must be the indices 0..{len(mapping) - 1}, got {sorted(mapping)}'
        )
    values = [mapping[k] for k in expected]
    if not all(isinstance(value, str) and value for value in values):
        raise DatasetFormatError.for_file(path, f'"{key}" values must be non-empty strings, got {values}')
    return values


def read_dataset_json(root: str | os.PathLike) -> dict[str, Any]:
    """Read and validate ``{root}/dataset.json`` (keys, modality and label mappings).

    Example:
        >>> read_dataset_json("results/data/converted/synthetic")["modality"]  # doctest: +SKIP
        {'0': 'CT'}
    """
    path = Path(root) / DATASET_JSON
    data = _read_json(path)
    if not isinstance(data, dict):
        raise DatasetFormatError.for_file(path, "must hold a JSON object")
    missing = [key for key in REQUIRED_DATASET_KEYS if key not in data]
    if missing:
        raise DatasetFormatError.for_file(path, f"missing keys {missing} (required: {list(REQUIRED_DATASET_KEYS)})")
    _check_index_mapping(path, "modality", data["modality"])
    _check_index_mapping(path, "labels", data["labels"])
    num_cases = data["num_cases"]
    if isinstance(num_cases, bool) or not isinstance(num_cases, int) or num_cases < 0:
        raise DatasetFormatError.for_file(path, f'"num_cases" must be a non-negative integer, got {num_cases!r}')
    return data


def modalities_of(dataset: Mapping[str, Any]) -> list[str]:
    """Channel modalities in channel order, from a validated ``dataset.json``."""
    return [dataset["modality"][str(index)] for index in range(len(dataset["modality"]))]


def class_names_of(dataset: Mapping[str, Any]) -> list[str]:
    """Class names in class-index order, from a validated ``dataset.json``."""
    return [dataset["labels"][str(index)] for index in range(len(dataset["labels"]))]


def list_case_ids(root: str | os.PathLike) -> list[str]:
    """Sorted case ids that have at least one channel file in ``imagesTr``."""
    images = Path(root) / IMAGES_DIR
    if not images.is_dir():
        raise DatasetFormatError.for_file(images, "folder is missing")
    cases = {m["case"] for p in images.iterdir() if (m := CHANNEL_FILE_PATTERN.match(p.name))}
    return sorted(cases)


def read_image(path: str | os.PathLike) -> sitk.Image:
    """Read a 3D single-component image; a missing or unreadable file raises ``DatasetFormatError``."""
    path = Path(path)
    if not path.is_file():
        raise DatasetFormatError.for_file(path, "file is missing")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        # SimpleITK's message is long (C++ file and line); its last non-empty line says what went wrong.
        detail = [line.strip() for line in str(error).splitlines() if line.strip()]
        raise DatasetFormatError.for_file(
            path, f"cannot be read as a NIfTI image ({detail[-1] if detail else 'unknown reason'})"
        ) from error
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise DatasetFormatError.for_file(
            path,
            f"expected a 3D single-component image, got dimension {image.GetDimension()} with "
            f"{image.GetNumberOfComponentsPerPixel()} components",
        )
    return image


def read_instances_json(path: str | os.PathLike) -> dict[int, int]:
    """Read ``labelsTr/{case}.json`` into ``{instance_id: class_index}``.

    Example:
        >>> read_instances_json("labelsTr/case_0000.json")  # doctest: +SKIP
        {1: 0, 2: 1}
    """
    path = Path(path)
    data = _read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("instances"), dict):
        raise DatasetFormatError.for_file(path, 'must hold {"instances": {"1": class_index, ...}}')
    instances: dict[int, int] = {}
    for key, value in data["instances"].items():
        if not str(key).isdigit() or int(key) < 1:
            raise DatasetFormatError.for_file(path, f"instance id {key!r} is not a positive integer")
        if isinstance(value, bool) or not isinstance(value, int):
            raise DatasetFormatError.for_file(path, f"class of instance {key} must be an integer, got {value!r}")
        instances[int(key)] = value
    return dict(sorted(instances.items()))


def geometry_of(image: sitk.Image) -> dict[str, tuple]:
    """Size and spacing in array order (z, y, x); origin and direction as SimpleITK gives them."""
    return {
        "size": tuple(int(s) for s in image.GetSize()[::-1]),
        "spacing": tuple(float(s) for s in image.GetSpacing()[::-1]),
        "origin": tuple(float(o) for o in image.GetOrigin()),
        "direction": tuple(float(d) for d in image.GetDirection()),
    }


def instance_array(image: sitk.Image, path: str | os.PathLike) -> np.ndarray:
    """The instance map of a label image as int32; non-integer or negative values raise ``DatasetFormatError``."""
    array = sitk.GetArrayFromImage(image)
    if not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
            raise DatasetFormatError.for_file(path, f"instance map holds non-integer values (dtype {array.dtype})")
    if array.size and array.min() < 0:
        raise DatasetFormatError.for_file(path, f"instance map holds negative values (min {array.min()})")
    return array.astype(np.int32)


def read_case(root: str | os.PathLike, case: str) -> ConvertedCase:
    """Read all channels, the instance map and the instance classes of one converted case.

    Cross-file consistency (geometry, ids, classes) is the job of
    :func:`pretrain_det3d.data.dataset_format.check_converted_dataset`; this only refuses what it cannot stack.

    Example:
        >>> case = read_case("converted/synthetic", "synthetic_0000")  # doctest: +SKIP
        >>> case.image.dtype, case.spacing  # doctest: +SKIP
        (dtype('float32'), (2.0, 1.0, 1.0))
    """
    root = Path(root)
    num_channels = len(read_dataset_json(root)["modality"])
    channels, paths = [], {}
    for channel in range(num_channels):
        path = image_path(root, case, channel)
        image = read_image(path)
        array = sitk.GetArrayFromImage(image).astype(np.float32)
        if channels and array.shape != channels[0].shape:
            raise DatasetFormatError.for_file(
                path, f"shape {array.shape} differs from channel 0 shape {channels[0].shape}"
            )
        if channel == 0:
            reference = image
        channels.append(array)
        paths[f"image_{channel:04d}"] = str(path)
    seg_path = label_path(root, case)
    instance_map = instance_array(read_image(seg_path), seg_path)
    if instance_map.shape != channels[0].shape:
        raise DatasetFormatError.for_file(
            seg_path, f"shape {instance_map.shape} differs from image shape {channels[0].shape}"
        )
    json_path = instances_json_path(root, case)
    instances = read_instances_json(json_path)
    paths.update(label=str(seg_path), instances=str(json_path))
    geometry = geometry_of(reference)
    return ConvertedCase(
        case_id=case,
        image=np.stack(channels),  # [C, Z, Y, X]
        instance_map=instance_map,
        instances=instances,
        spacing=geometry["spacing"],
        origin=geometry["origin"],
        direction=geometry["direction"],
        paths=paths,
    )


def _to_sitk(
    array: np.ndarray,
    spacing_zyx: Sequence[float],
    origin: Sequence[float],
    direction: Sequence[float] | None,
) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing([float(s) for s in spacing_zyx][::-1])
    image.SetOrigin([float(o) for o in origin])
    if direction is not None:
        image.SetDirection([float(d) for d in direction])
    return image


def write_nifti(
    path: str | os.PathLike,
    array: np.ndarray,
    spacing: Sequence[float],
    origin: Sequence[float] = (0.0, 0.0, 0.0),
    direction: Sequence[float] | None = None,
) -> None:
    """Write a ``[Z, Y, X]`` array as a compressed NIfTI file atomically (spacing in z, y, x order)."""
    with atomic_path(path) as tmp:
        sitk.WriteImage(_to_sitk(array, spacing, origin, direction), str(tmp), useCompression=True)


def write_case(
    root: str | os.PathLike,
    case: str,
    image: np.ndarray,
    instance_map: np.ndarray,
    instances: Mapping[int, int],
    spacing: Sequence[float],
    origin: Sequence[float] = (0.0, 0.0, 0.0),
    direction: Sequence[float] | None = None,
) -> None:
    """Write one case in the converted format; ``image`` is ``[C, Z, Y, X]`` (its dtype is kept on disk).

    Example:
        >>> write_case(root, "a_0000", np.zeros((1, 8, 8, 8), np.int16), np.zeros((8, 8, 8), np.int16),
        ...            {}, spacing=(2.0, 1.0, 1.0))  # doctest: +SKIP
    """
    if image.ndim != 4 or image.shape[1:] != instance_map.shape:
        raise ValueError(f"image must be [C,Z,Y,X] matching the instance map {instance_map.shape}, got {image.shape}")
    for channel in range(image.shape[0]):
        write_nifti(image_path(root, case, channel), image[channel], spacing, origin, direction)
    write_nifti(label_path(root, case), instance_map, spacing, origin, direction)
    write_json(
        instances_json_path(root, case),
        {"instances": {str(int(k)): int(v) for k, v in sorted(instances.items())}},
    )


def write_dataset_json(
    root: str | os.PathLike,
    name: str,
    modalities: Sequence[str],
    class_names: Sequence[str],
    licence: str,
    source: str,
    num_cases: int,
    **extra: Any,
) -> None:
    """Write ``{root}/dataset.json`` in the layout :func:`read_dataset_json` validates."""
    write_json(
        Path(root) / DATASET_JSON,
        {
            "name": name,
            "modality": {str(i): m for i, m in enumerate(modalities)},
            "labels": {str(i): c for i, c in enumerate(class_names)},
            "licence": licence,
            "source": source,
            "num_cases": int(num_cases),
            **extra,
        },
    )
