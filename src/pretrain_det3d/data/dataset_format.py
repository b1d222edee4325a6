"""Check that a converted dataset folder is complete and self-consistent before anything trains on it.

Each problem raises one :class:`DatasetFormatError` whose message starts with the offending file's path and
says what is wrong; geometry mismatches name both files and the differing field.

Example:
    >>> summary = check_converted_dataset("results/data/converted/synthetic")  # doctest: +SKIP
    >>> summary.case_ids[:2], summary.class_names, summary.modalities  # doctest: +SKIP
    (['synthetic_0000', 'synthetic_0001'], ['lesion'], ['CT'])
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pretrain_det3d.data.errors import DatasetFormatError
from pretrain_det3d.data.io import (
    CHANNEL_FILE_PATTERN,
    DATASET_JSON,
    IMAGES_DIR,
    LABELS_DIR,
    NIFTI_SUFFIX,
    TEST_IMAGES_DIR,
    TEST_LABELS_DIR,
    class_names_of,
    geometry_of,
    image_path,
    instance_array,
    instances_json_path,
    label_path,
    list_case_ids,
    modalities_of,
    read_dataset_json,
    read_image,
    read_instances_json,
)

__all__ = ["DatasetFormatError", "DatasetSummary", "check_converted_dataset"]

# Geometry tolerances: converters round-trip through float32 headers, so demand agreement to ~1 micrometre
# relative, not bit equality.
SPACING_RTOL = 1e-5
ORIGIN_ATOL_MM = 1e-3
DIRECTION_ATOL = 1e-5


@dataclass
class DatasetSummary:
    """What a valid converted dataset holds.

    Attributes:
        name: ``dataset.json``'s name.
        case_ids: sorted case ids.
        class_names: class names by class index.
        modalities: modality per channel, in channel order.
        num_instances: case id -> number of instances.
        spacings: case id -> voxel spacing (z, y, x) in mm.
        shapes: case id -> array shape (z, y, x).
        test_case_ids: sorted ids of the held-out test cases (``imagesTs``/``labelsTs``; none in most datasets).
    """

    name: str
    case_ids: list[str]
    class_names: list[str]
    modalities: list[str]
    num_instances: dict[str, int]
    spacings: dict[str, tuple[float, float, float]]
    shapes: dict[str, tuple[int, int, int]]
    test_case_ids: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _compare_geometry(reference: dict, reference_path: Path, other: dict, other_path: Path) -> None:
    """Raise naming both files and the field when ``other`` does not share ``reference``'s geometry."""
    checks = {
        "size": lambda a, b: a == b,
        "spacing": lambda a, b: np.allclose(a, b, rtol=SPACING_RTOL, atol=0.0),
        "origin": lambda a, b: np.allclose(a, b, rtol=0.0, atol=ORIGIN_ATOL_MM),
        "direction": lambda a, b: np.allclose(a, b, rtol=0.0, atol=DIRECTION_ATOL),
    }
    for field_name, agree in checks.items():
        if not agree(reference[field_name], other[field_name]):
            raise DatasetFormatError.for_file(
                other_path,
                f"{field_name} {_readable(other[field_name])} differs from {field_name} "
                f"{_readable(reference[field_name])} of {reference_path}",
            )


def _readable(values: tuple) -> str:
    """Geometry numbers without float32 noise: ``(2, 0.9, 0.8)`` rather than ``0.8999999761581421``."""
    return "(" + ", ".join(f"{float(v):.6g}" for v in values) + ")"


def _check_unexpected_files(root: Path, case_ids: list[str], num_channels: int) -> None:
    """Channel files beyond the declared channels and labels without images are errors, not silently ignored."""
    for path in sorted((root / IMAGES_DIR).iterdir()):
        match = CHANNEL_FILE_PATTERN.match(path.name)
        if match and int(match["channel"]) >= num_channels:
            raise DatasetFormatError.for_file(
                path, f"channel {int(match['channel'])} is not declared in {root / DATASET_JSON} "
                f"({num_channels} channel(s))"
            )
    labels_dir = root / LABELS_DIR
    if not labels_dir.is_dir():
        raise DatasetFormatError.for_file(labels_dir, "folder is missing")
    known = set(case_ids)
    for path in sorted(labels_dir.iterdir()):
        for suffix in (NIFTI_SUFFIX, ".json"):
            if path.name.endswith(suffix) and path.name[: -len(suffix)] not in known:
                raise DatasetFormatError.for_file(path, f"label file has no images in {root / IMAGES_DIR}")


def _check_case(root: Path, case: str, num_channels: int, num_classes: int, test: bool = False) -> tuple[int, dict]:
    """Check one case (a held-out test case with ``test``); returns its number of instances and its geometry."""
    reference_path = image_path(root, case, 0, test)
    reference = None
    for channel in range(num_channels):
        path = image_path(root, case, channel, test)
        # read_image loads the pixels too (not just the header), so truncated or corrupt data fails here.
        image = read_image(path)
        geometry = geometry_of(image)
        if reference is None:
            reference = geometry
        else:
            _compare_geometry(reference, reference_path, geometry, path)
    seg_path = label_path(root, case, test)
    seg_image = read_image(seg_path)
    _compare_geometry(reference, reference_path, geometry_of(seg_image), seg_path)
    instance_map = instance_array(seg_image, seg_path)
    ids = [int(i) for i in np.unique(instance_map) if i > 0]
    if ids != list(range(1, len(ids) + 1)):
        raise DatasetFormatError.for_file(seg_path, f"instance ids {ids} are not consecutive 1..{len(ids)}")
    json_path = instances_json_path(root, case, test)
    instances = read_instances_json(json_path)
    if sorted(instances) != ids:
        raise DatasetFormatError.for_file(
            json_path, f"instance ids {sorted(instances)} do not match the ids {ids} in {seg_path}"
        )
    bad_classes = {i: c for i, c in instances.items() if not 0 <= c < num_classes}
    if bad_classes:
        raise DatasetFormatError.for_file(
            json_path,
            f"class indices {bad_classes} (instance: class) are outside the {num_classes} classes 0..{num_classes - 1} "
            f"of {root / DATASET_JSON}",
        )
    return len(ids), reference


def check_converted_dataset(root: str | os.PathLike) -> DatasetSummary:
    """Validate a converted dataset folder and summarise it.

    Checks: ``dataset.json`` keys and its modality/labels mappings; ``num_cases`` equals the cases found; every
    case has all channels, ``labelsTr/{case}.nii.gz`` and ``labelsTr/{case}.json``; every image readable and 3D;
    channels and label share size, spacing, origin and direction; instance ids are consecutive 1..N and equal the
    JSON keys; class indices lie within ``dataset.json``'s labels. Held-out test cases (``imagesTs`` with
    ``labelsTs``, nnDetection's layout), where present, pass the same checks and must not share an id with a
    training case.

    Example:
        >>> check_converted_dataset("results/data/converted/synthetic").num_classes  # doctest: +SKIP
        1
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetFormatError.for_file(root, "dataset folder is missing")
    dataset = read_dataset_json(root)
    modalities = modalities_of(dataset)
    class_names = class_names_of(dataset)
    case_ids = list_case_ids(root)
    if len(case_ids) != dataset["num_cases"]:
        raise DatasetFormatError.for_file(
            root / DATASET_JSON,
            f'"num_cases" is {dataset["num_cases"]} but {root / IMAGES_DIR} holds {len(case_ids)} cases',
        )
    _check_unexpected_files(root, case_ids, len(modalities))
    num_instances, spacings, shapes = {}, {}, {}
    for case in tqdm(case_ids, desc=f"check {dataset['name']}", unit="case"):
        num_instances[case], geometry = _check_case(root, case, len(modalities), len(class_names))
        spacings[case] = geometry["spacing"]
        shapes[case] = geometry["size"]
    test_case_ids = []
    if (root / TEST_IMAGES_DIR).is_dir():
        test_case_ids = list_case_ids(root, test=True)
        shared = sorted(set(test_case_ids) & set(case_ids))
        if shared:
            raise DatasetFormatError.for_file(root / TEST_IMAGES_DIR, f"test cases {shared} are also training cases")
        if not (root / TEST_LABELS_DIR).is_dir():
            raise DatasetFormatError.for_file(root / TEST_LABELS_DIR, "folder is missing (test cases need labels)")
        for case in tqdm(test_case_ids, desc=f"check {dataset['name']} test cases", unit="case"):
            _check_case(root, case, len(modalities), len(class_names), test=True)
    return DatasetSummary(
        name=dataset["name"],
        case_ids=case_ids,
        class_names=class_names,
        modalities=modalities,
        num_instances=num_instances,
        spacings=spacings,
        shapes=shapes,
        test_case_ids=test_case_ids,
    )
