"""Truncated or damaged image, label and array files are errors that name the file, wherever they are read.

SimpleITK reads a cut-short NIfTI file without a word and fills the missing voxels with zeros; these tests cut
real files written by SimpleITK and numpy, and compare the messages with byte counts worked out by hand.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from dicom_fixtures import write_dicom_series
from nifti_fixtures import make_image

from pretrain_det3d.data.boxes import boxes_from_instance_map
from pretrain_det3d.data.converters.base import ConversionError
from pretrain_det3d.data.converters.dicom import find_dicom_series, read_dicom_series
from pretrain_det3d.data.dataset_format import check_converted_dataset
from pretrain_det3d.data.errors import CorruptFileError, DatasetFormatError
from pretrain_det3d.data.io import (
    check_image_file,
    image_path,
    label_path,
    load_npy,
    read_case,
    read_image,
    write_case,
    write_dataset_json,
)
from pretrain_det3d.data.preprocessing import run_preprocessing
from pretrain_det3d.evaluation.run import EvaluationInputError, load_ground_truth
from pretrain_det3d.training.dataloader import CaseRecord, PatchBatchStream

SHAPE = (16, 20, 24)  # z, y, x
NIFTI1_HEADER_BYTES = 352  # 348-byte header + 4 bytes of extension flags, then the voxels


def _cut(path: Path, fraction: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


@pytest.fixture()
def converted(tmp_path: Path) -> Path:
    """Three cases of noisy int16 CT (noise does not compress away, so a cut really loses voxels), two boxes each."""
    root = tmp_path / "converted"
    rng = np.random.default_rng(0)
    for index in range(3):
        image = rng.integers(-1000, 1000, size=(1, *SHAPE)).astype(np.int16)
        instances = np.zeros(SHAPE, np.int16)
        instances[2:6, 3:8, 4:9] = 1
        instances[9:14, 12:18, 15:22] = 2  # the second box sits in the second half of the file
        write_case(root, f"case_{index}", image, instances, {1: 0, 2: 0}, spacing=(2.0, 1.0, 1.0))
    write_dataset_json(root, "demo", ["CT"], ["lesion"], "CC0-1.0", "test", 3)
    return root


# ---- images ------------------------------------------------------------------------------------------------
def test_half_an_image_is_an_error_from_the_reader_the_check_and_preprocessing(converted: Path, tmp_path: Path):
    path = image_path(converted, "case_1", 0)
    _cut(path, 0.5)
    # the hazard itself: plain SimpleITK reads the cut file without an error and zero-fills the missing half
    zero_filled = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    assert zero_filled.shape == SHAPE and (zero_filled == 0).mean() > 0.4

    with pytest.raises(CorruptFileError) as info:
        read_image(path)
    assert str(info.value).startswith(f"{path}: cannot be read as a NIfTI image: truncated")
    assert "cut short" in str(info.value)

    with pytest.raises(CorruptFileError) as info:
        check_converted_dataset(converted)
    assert str(info.value).startswith(f"{path}: ") and "truncated" in str(info.value)

    out = tmp_path / "preprocessed"
    with pytest.raises(DatasetFormatError) as info:
        run_preprocessing(converted, out, num_folds=2, seed=0, settings={})
    assert str(info.value).startswith(f"{path}: ") and "truncated" in str(info.value)
    assert not (out / "cases").exists()


def test_label_cut_to_90_percent_is_an_error_not_a_smaller_box(converted: Path):
    path = label_path(converted, "case_2")
    intact_boxes = boxes_from_instance_map(read_case(converted, "case_2").instance_map)[1]
    _cut(path, 0.9)
    # plain SimpleITK: no error, and the second box loses the voxels of the missing tail
    shrunk = boxes_from_instance_map(sitk.GetArrayFromImage(sitk.ReadImage(str(path))))[1]
    assert not np.array_equal(shrunk, intact_boxes)

    for read in (lambda: read_case(converted, "case_2"), lambda: check_converted_dataset(converted)):
        with pytest.raises(CorruptFileError) as info:
            read()
        assert str(info.value).startswith(f"{path}: cannot be read as a NIfTI image: truncated")
    with pytest.raises(EvaluationInputError) as info:
        load_ground_truth(converted, "case_2")
    assert str(info.value).startswith(f"{path}: ") and "truncated" in str(info.value)


def test_valid_gzip_with_half_the_voxels_is_counted_against_the_header(tmp_path: Path):
    path = tmp_path / "short.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones(SHAPE, np.int16)), str(path), useCompression=True)
    raw = gzip.decompress(path.read_bytes())
    assert len(raw) == NIFTI1_HEADER_BYTES + 16 * 20 * 24 * 2  # 15360 bytes of voxels
    path.write_bytes(gzip.compress(raw[: NIFTI1_HEADER_BYTES + 7680]))  # a complete stream, half the voxels
    with pytest.raises(CorruptFileError) as info:
        read_image(path)
    assert str(info.value) == (
        f"{path}: cannot be read as a NIfTI image: truncated: its header promises 24 x 20 x 16 voxels of 16 bits "
        "(15360 bytes after byte 352), the decompressed file holds only 7680; the file was cut short, copy or "
        "convert it again"
    )


def test_damaged_compressed_data_is_an_error(tmp_path: Path):
    path = tmp_path / "flipped.nii.gz"
    noise = np.random.default_rng(1).integers(0, 1000, SHAPE).astype(np.int16)
    sitk.WriteImage(sitk.GetImageFromArray(noise), str(path), useCompression=True)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match="corrupt compressed data") as info:
        read_image(path)
    assert str(info.value).startswith(f"{path}: ")


def test_shortened_uncompressed_nifti_is_an_error(tmp_path: Path):
    path = tmp_path / "plain.nii"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones(SHAPE, np.uint8)), str(path), useCompression=False)
    assert path.stat().st_size == NIFTI1_HEADER_BYTES + 7680
    path.write_bytes(path.read_bytes()[:-1])  # one voxel short
    with pytest.raises(CorruptFileError) as info:
        read_image(path)
    assert str(info.value).startswith(
        f"{path}: cannot be read as a NIfTI image: truncated: its header promises 24 x 20 x 16 voxels of 8 bits "
        "(7680 bytes after byte 352), the file holds only 7679;"
    )


@pytest.mark.parametrize("compressed", [False, True])
def test_metaimage_with_a_short_data_file_names_that_file(tmp_path: Path, compressed: bool):
    header = tmp_path / "scan.mhd"
    noise = np.random.default_rng(2).integers(0, 1000, SHAPE).astype(np.int16)
    sitk.WriteImage(sitk.GetImageFromArray(noise), str(header), useCompression=compressed)
    data = tmp_path / ("scan.zraw" if compressed else "scan.raw")
    _cut(data, 0.5)
    with pytest.raises(CorruptFileError) as info:
        read_image(header)
    message = str(info.value)
    assert message.startswith(f"{data}: cannot be read as a MetaImage: truncated") and f"(data file of {header})" in message
    if not compressed:
        assert "24 x 20 x 16 x 1 elements of MET_SHORT (15360 bytes), the file holds only 7680" in message


@pytest.mark.parametrize("name,compressed", [("a.nii.gz", True), ("b.nii", False), ("c.mha", True), ("d.mha", False),
                                             ("e.mhd", False), ("f.mhd", True)])
def test_intact_files_read_bit_identical_to_plain_simpleitk(tmp_path: Path, name: str, compressed: bool):
    array = np.random.default_rng(3).normal(0, 100, SHAPE).astype(np.float32)
    image = make_image(array, (0.7, 0.8, 2.5), (-10.0, 20.0, 30.5), (0, 1, 0, 1, 0, 0, 0, 0, -1))
    path = tmp_path / name
    sitk.WriteImage(image, str(path), useCompression=compressed)
    check_image_file(path)  # no error
    ours, plain = read_image(path), sitk.ReadImage(str(path))
    assert np.array_equal(sitk.GetArrayFromImage(ours), sitk.GetArrayFromImage(plain))
    assert np.array_equal(sitk.GetArrayFromImage(ours), array)
    assert ours.GetPixelID() == plain.GetPixelID()
    assert (ours.GetSpacing(), ours.GetOrigin(), ours.GetDirection()) == (
        plain.GetSpacing(), plain.GetOrigin(), plain.GetDirection())


def test_multi_member_gzip_reads_and_its_truncated_tail_is_found(tmp_path: Path):
    path = tmp_path / "members.nii.gz"
    array = np.arange(np.prod(SHAPE), dtype=np.int16).reshape(SHAPE)
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path), useCompression=True)
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]))  # `cat a.gz b.gz` is valid gzip
    assert np.array_equal(sitk.GetArrayFromImage(read_image(path)), array)
    path.write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:])[:-20])
    with pytest.raises(CorruptFileError, match="compressed stream ends without its end marker"):
        read_image(path)


def test_nifti_shadowed_by_an_uncompressed_twin_is_refused(tmp_path: Path):
    # ITK's NIfTI library looks for x.nii before x.nii.gz: it would silently read the other file
    sitk.WriteImage(sitk.GetImageFromArray(np.ones(SHAPE, np.int16)), str(tmp_path / "x.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(np.full(SHAPE, 2, np.int16)), str(tmp_path / "x.nii"))
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "x.nii.gz"))).max() == 2  # the hazard
    with pytest.raises(DatasetFormatError, match="x.nii lies beside it") as info:
        read_image(tmp_path / "x.nii.gz")
    assert str(info.value).startswith(str(tmp_path / "x.nii.gz"))


def test_truncated_dicom_slice_is_named(tmp_path: Path):
    folder = tmp_path / "series"
    array = np.random.default_rng(4).integers(0, 1000, (5, 12, 10)).astype(np.int16)
    names = [f"slice{k}.dcm" for k in range(5)]
    write_dicom_series(folder, array, (0.7, 0.7, 2.0), (0.0, 0.0, 0.0), (1, 0, 0), (0, 1, 0), "1.2.3.4.5",
                       [f"1.2.3.4.5.{k}" for k in range(5)], list(range(1, 6)), names)
    series = find_dicom_series(tmp_path)["1.2.3.4.5"]
    image, _ = read_dicom_series(series)
    assert np.array_equal(sitk.GetArrayFromImage(image), array)
    broken = series.files[2]
    _cut(broken, 0.8)
    with pytest.raises(ConversionError) as info:
        read_dicom_series(series)
    assert str(info.value).startswith(f"{broken}: slice 2 of series 1.2.3.4.5 cannot be read: the file is truncated")


# ---- arrays ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("memory_map", [True, False])
def test_truncated_npy_is_named_by_the_training_loader(tmp_path: Path, memory_map: bool):
    cases = tmp_path / "preprocessed" / "cases"
    cases.mkdir(parents=True)
    path = cases / "case_0.npy"
    np.save(path, np.ones((1, 8, 8, 8), np.float32))
    assert path.stat().st_size == 128 + 2048  # a 128-byte header, then 512 float32 voxels
    _cut(path, 1000 / 2176)
    record = CaseRecord("case_0", path, None, {}, np.zeros((0, 3), np.int64))
    stream = PatchBatchStream([record], (8, 8, 8), 1, seed=0, with_labels=False, memory_map=memory_map)
    with pytest.raises(CorruptFileError) as info:
        stream.open_array(path)
    message = str(info.value)
    assert message.startswith(
        f"{path}: truncated .npy array: its header promises shape (1, 8, 8, 8) of float32 (2176 bytes), the file "
        "holds 1000;"
    )
    assert f"delete the folder {cases} and rerun snakemake" in message and "preprocess_dataset" in message
    assert "mmap length" not in message


def test_npy_with_a_damaged_header_and_an_intact_one(tmp_path: Path):
    path = tmp_path / "a.npy"
    array = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    np.save(path, array)
    assert np.array_equal(load_npy(path), array)
    assert np.array_equal(load_npy(path, mmap_mode="r"), array)
    path.write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(CorruptFileError, match="header is damaged") as info:
        load_npy(path, regenerate="fetch it again")
    assert str(info.value).startswith(f"{path}: ") and str(info.value).endswith("fetch it again")
    with pytest.raises(FileNotFoundError, match="b.npy: array file not found"):
        load_npy(tmp_path / "b.npy")
