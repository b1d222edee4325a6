"""check_converted_dataset: a valid dataset passes; each bad input gives one error naming the file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import SimpleITK as sitk

from pretrain_det3d.data.dataset_format import DatasetFormatError, check_converted_dataset
from pretrain_det3d.data.io import image_path, instances_json_path, label_path

SHAPE = (4, 5, 6)
SPACING_XYZ = (0.8, 0.9, 3.0)
ORIGIN_XYZ = (-10.0, 5.0, 100.0)


def _write(path: Path, array: np.ndarray, **geometry) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(geometry.get("spacing", SPACING_XYZ))
    image.SetOrigin(geometry.get("origin", ORIGIN_XYZ))
    if "direction" in geometry:
        image.SetDirection(geometry["direction"])
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))


def _seg_with_ids(ids: list[int]) -> np.ndarray:
    seg = np.zeros(SHAPE, dtype=np.int16)
    for index, instance_id in enumerate(ids):
        seg[index, 0, 0:2] = instance_id
    return seg


@pytest.fixture()
def dataset(tmp_path: Path) -> Path:
    """Two cases, two channels, written by SimpleITK; case b has no instances."""
    root = tmp_path / "toy"
    (root / "dataset.json").parent.mkdir(parents=True)
    (root / "dataset.json").write_text(
        json.dumps(
            {"name": "toy", "modality": {"0": "CT", "1": "CT"}, "labels": {"0": "nodule", "1": "mass"},
             "licence": "CC0", "source": "test", "num_cases": 2}
        )
    )
    rng = np.random.default_rng(0)
    for case, ids, classes in (("a", [1, 2], {"1": 0, "2": 1}), ("b", [], {})):
        for channel in range(2):
            _write(image_path(root, case, channel), rng.normal(size=SHAPE).astype(np.float32))
        _write(label_path(root, case), _seg_with_ids(ids))
        instances_json_path(root, case).write_text(json.dumps({"instances": classes}))
    return root


def test_valid_dataset_summary(dataset: Path) -> None:
    summary = check_converted_dataset(dataset)
    assert summary.name == "toy"
    assert summary.case_ids == ["a", "b"]
    assert summary.class_names == ["nodule", "mass"] and summary.num_classes == 2
    assert summary.modalities == ["CT", "CT"]
    assert summary.num_instances == {"a": 2, "b": 0}
    assert summary.spacings["a"] == pytest.approx(SPACING_XYZ[::-1])
    assert summary.shapes["b"] == SHAPE


def _set_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


# Each entry: (mutation of the valid dataset, file the message must start with, text it must contain).
BAD_INPUTS: dict[str, tuple[Callable[[Path], None], Callable[[Path], Path], list[str]]] = {
    "no dataset.json": (
        lambda r: (r / "dataset.json").unlink(), lambda r: r / "dataset.json", ["file is missing"]),
    "dataset.json without modality": (
        lambda r: _set_json(r / "dataset.json", modality=None), lambda r: r / "dataset.json", ['"modality"']),
    "num_cases disagrees": (
        lambda r: _set_json(r / "dataset.json", num_cases=3), lambda r: r / "dataset.json",
        ['"num_cases" is 3', "holds 2 cases"]),
    "missing channel": (
        lambda r: image_path(r, "a", 1).unlink(), lambda r: image_path(r, "a", 1), ["file is missing"]),
    "missing label map": (
        lambda r: label_path(r, "b").unlink(), lambda r: label_path(r, "b"), ["file is missing"]),
    "missing label json": (
        lambda r: instances_json_path(r, "a").unlink(), lambda r: instances_json_path(r, "a"), ["file is missing"]),
    "corrupt image": (
        lambda r: image_path(r, "b", 0).write_bytes(b"\x1f\x8b garbage"), lambda r: image_path(r, "b", 0),
        ["cannot be read as a NIfTI image"]),
    "label size differs": (
        lambda r: _write(label_path(r, "a"), np.zeros((4, 5, 7), np.int16)), lambda r: label_path(r, "a"),
        ["size (4, 5, 7) differs from size (4, 5, 6)", "a_0000.nii.gz"]),
    "label spacing differs": (
        lambda r: _write(label_path(r, "a"), _seg_with_ids([1, 2]), spacing=(0.8, 0.9, 2.0)),
        lambda r: label_path(r, "a"), ["spacing (2, 0.9, 0.8) differs from spacing (3, 0.9, 0.8)", "a_0000.nii.gz"]),
    "channel origin differs": (
        lambda r: _write(image_path(r, "b", 1), np.zeros(SHAPE, np.float32), origin=(-10.0, 5.0, 101.0)),
        lambda r: image_path(r, "b", 1), ["origin", "b_0000.nii.gz"]),
    "label direction differs": (
        lambda r: _write(label_path(r, "b"), _seg_with_ids([]), direction=(0, 1, 0, 1, 0, 0, 0, 0, 1)),
        lambda r: label_path(r, "b"), ["direction", "b_0000.nii.gz"]),
    "ids not consecutive": (
        lambda r: (_write(label_path(r, "a"), _seg_with_ids([1, 3])),
                   instances_json_path(r, "a").write_text(json.dumps({"instances": {"1": 0, "3": 0}}))),
        lambda r: label_path(r, "a"), ["instance ids [1, 3] are not consecutive 1..2"]),
    "json ids differ from map": (
        lambda r: instances_json_path(r, "a").write_text(json.dumps({"instances": {"1": 0}})),
        lambda r: instances_json_path(r, "a"), ["instance ids [1] do not match the ids [1, 2]", "a.nii.gz"]),
    "json names an instance absent from the map": (
        lambda r: instances_json_path(r, "b").write_text(json.dumps({"instances": {"1": 0}})),
        lambda r: instances_json_path(r, "b"), ["instance ids [1] do not match the ids []"]),
    "class index out of range": (
        lambda r: instances_json_path(r, "a").write_text(json.dumps({"instances": {"1": 0, "2": 2}})),
        lambda r: instances_json_path(r, "a"), ["class indices {2: 2}", "0..1"]),
    "negative label": (
        lambda r: _write(label_path(r, "b"), -_seg_with_ids([1])), lambda r: label_path(r, "b"),
        ["negative values"]),
    "fractional label": (
        lambda r: _write(label_path(r, "b"), _seg_with_ids([1]).astype(np.float32) * 0.5),
        lambda r: label_path(r, "b"), ["non-integer values"]),
    "undeclared channel": (
        lambda r: shutil.copy(image_path(r, "a", 1), image_path(r, "a", 2)), lambda r: image_path(r, "a", 2),
        ["channel 2 is not declared"]),
    "label without images": (
        lambda r: shutil.copy(label_path(r, "b"), label_path(r, "c")), lambda r: label_path(r, "c"),
        ["label file has no images"]),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_input_gives_one_clear_error_naming_the_file(dataset: Path, name: str) -> None:
    mutate, offending, fragments = BAD_INPUTS[name]
    mutate(dataset)
    with pytest.raises(DatasetFormatError) as info:
        check_converted_dataset(dataset)
    message = str(info.value)
    assert message.startswith(f"{offending(dataset)}: "), message
    for fragment in fragments:
        assert fragment in message, message


def test_tiny_geometry_differences_are_tolerated(dataset: Path) -> None:
    # float32 headers round origins and spacings; a micrometre must not fail the check
    _write(label_path(dataset, "b"), _seg_with_ids([]), origin=(-10.0, 5.0, 100.0 + 1e-5))
    assert check_converted_dataset(dataset).case_ids == ["a", "b"]


def test_missing_dataset_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetFormatError, match="dataset folder is missing"):
        check_converted_dataset(tmp_path / "nope")
