"""Reading and writing the converted format; SimpleITK written files are the reference."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from pretrain_det3d.data.errors import DatasetFormatError
from pretrain_det3d.data.io import (
    image_path,
    instances_json_path,
    label_path,
    list_case_ids,
    read_case,
    read_dataset_json,
    read_image,
    read_instances_json,
    write_case,
    write_dataset_json,
)

SPACING_XYZ = (0.7, 0.8, 2.5)
ORIGIN_XYZ = (-12.5, 30.0, -400.25)
# A rotation about z by 90 degrees, so direction is not the identity.
DIRECTION = (0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)


def _sitk_image(array: np.ndarray) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(SPACING_XYZ)
    image.SetOrigin(ORIGIN_XYZ)
    image.SetDirection(DIRECTION)
    return image


def _write_dataset_json(root: Path, num_channels: int = 2) -> None:
    write_dataset_json(
        root, name="toy", modalities=["CT", "MRI"][:num_channels], class_names=["a", "b"], licence="CC0",
        source="test", num_cases=1,
    )


@pytest.fixture()
def sitk_case(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """A two-channel case written directly with SimpleITK (independent of write_case)."""
    rng = np.random.default_rng(0)
    channels = rng.integers(-1000, 1000, size=(2, 5, 6, 7)).astype(np.int16)
    seg = np.zeros((5, 6, 7), dtype=np.uint8)
    seg[1:3, 2:4, 3:6] = 1
    seg[4, 0, 0] = 2
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    for channel in range(2):
        sitk.WriteImage(_sitk_image(channels[channel]), str(tmp_path / "imagesTr" / f"c1_{channel:04d}.nii.gz"))
    sitk.WriteImage(_sitk_image(seg), str(tmp_path / "labelsTr" / "c1.nii.gz"))
    (tmp_path / "labelsTr" / "c1.json").write_text(json.dumps({"instances": {"1": 0, "2": 1}}))
    _write_dataset_json(tmp_path)
    return tmp_path, channels, seg


def test_read_case_matches_simpleitk_arrays_and_reorders_spacing(sitk_case) -> None:
    root, channels, seg = sitk_case
    case = read_case(root, "c1")
    assert case.image.dtype == np.float32 and case.image.shape == (2, 5, 6, 7)
    np.testing.assert_array_equal(case.image, channels.astype(np.float32))
    np.testing.assert_array_equal(case.instance_map, seg)
    assert case.instances == {1: 0, 2: 1}
    assert case.spacing == pytest.approx(SPACING_XYZ[::-1])  # array axes z, y, x
    assert case.origin == pytest.approx(ORIGIN_XYZ)  # as SimpleITK gives it
    assert case.direction == pytest.approx(DIRECTION)


def test_write_case_round_trips_through_simpleitk(tmp_path: Path) -> None:
    image = np.arange(2 * 3 * 4 * 5, dtype=np.int16).reshape(2, 3, 4, 5)
    seg = np.zeros((3, 4, 5), dtype=np.int16)
    seg[0, 0, 0] = 1
    _write_dataset_json(tmp_path)
    write_case(tmp_path, "c1", image, seg, {1: 1}, spacing=(3.0, 2.0, 1.0), origin=(1.0, 2.0, 3.0))
    written = sitk.ReadImage(str(image_path(tmp_path, "c1", 1)))
    assert written.GetSpacing() == pytest.approx((1.0, 2.0, 3.0))  # SimpleITK order x, y, z
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), image[1])
    assert json.loads(instances_json_path(tmp_path, "c1").read_text()) == {"instances": {"1": 1}}
    case = read_case(tmp_path, "c1")
    assert case.spacing == pytest.approx((3.0, 2.0, 1.0))
    assert case.origin == pytest.approx((1.0, 2.0, 3.0))
    assert list_case_ids(tmp_path) == ["c1"]
    assert not list(tmp_path.rglob("*.tmp*")), "atomic writes must not leave temporary files"


def test_garbage_nifti_raises_naming_the_file(sitk_case) -> None:
    root, _, _ = sitk_case
    path = image_path(root, "c1", 1)
    path.write_bytes(b"this is not a nifti file")
    with pytest.raises(DatasetFormatError) as info:
        read_case(root, "c1")
    assert str(info.value).startswith(f"{path}: cannot be read")


def test_truncated_nifti_raises_naming_the_file(sitk_case) -> None:
    root, _, _ = sitk_case
    path = label_path(root, "c1")
    data = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(data[: len(data) // 2]))  # valid gzip, half the voxels missing
    with pytest.raises(DatasetFormatError) as info:
        read_image(path)
    assert str(info.value).startswith(f"{path}: cannot be read")


def test_missing_file_raises_naming_the_file(sitk_case) -> None:
    root, _, _ = sitk_case
    path = instances_json_path(root, "c1")
    path.unlink()
    with pytest.raises(DatasetFormatError, match="file is missing") as info:
        read_case(root, "c1")
    assert str(info.value).startswith(str(path))


def test_4d_image_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "four_d.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 3, 4, 5), np.int16)), str(path))
    with pytest.raises(DatasetFormatError, match="expected a 3D single-component image") as info:
        read_image(path)
    assert str(info.value).startswith(str(path))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.pop("labels"), "missing keys \\['labels'\\]"),
        (lambda d: d.update(modality={"1": "CT"}), '"modality" keys must be the indices 0..0'),
        (lambda d: d.update(labels={}), '"labels" must be a non-empty object'),
        (lambda d: d.update(labels={"0": 3}), '"labels" values must be non-empty strings'),
        (lambda d: d.update(num_cases="3"), '"num_cases" must be a non-negative integer'),
    ],
)
def test_bad_dataset_json_names_the_file_and_problem(tmp_path: Path, change, message: str) -> None:
    _write_dataset_json(tmp_path, num_channels=1)
    path = tmp_path / "dataset.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetFormatError, match=message) as info:
        read_dataset_json(tmp_path)
    assert str(info.value).startswith(str(path))


def test_dataset_json_that_is_not_json(tmp_path: Path) -> None:
    (tmp_path / "dataset.json").write_text("{name: ")
    with pytest.raises(DatasetFormatError, match="is not valid JSON"):
        read_dataset_json(tmp_path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"instances": {"0": 1}}, "instance id '0' is not a positive integer"),
        ({"instances": {"x": 1}}, "instance id 'x' is not a positive integer"),
        ({"instances": {"1": "lesion"}}, "class of instance 1 must be an integer"),
        ({"classes": {}}, 'must hold {"instances"'),
    ],
)
def test_bad_instances_json(tmp_path: Path, content: dict, message: str) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps(content))
    with pytest.raises(DatasetFormatError) as info:
        read_instances_json(path)
    assert str(info.value) == f"{path}: {message}" or str(info.value).startswith(f"{path}: {message}")


def test_instances_json_keys_are_sorted_integers(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"instances": {"10": 1, "2": 0, "1": 1}}))
    assert list(read_instances_json(path).items()) == [(1, 1), (2, 0), (10, 1)]
