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
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import SimpleITK as sitk

from pretrain_det3d.data.errors import CorruptFileError, DatasetFormatError
from pretrain_det3d.utils.atomic import atomic_path, write_json

DATASET_JSON = "dataset.json"
IMAGES_DIR = "imagesTr"
LABELS_DIR = "labelsTr"
#: held-out test cases (nnDetection's ``imagesTs``/``labelsTs``): same file layout as the training cases; only a
#: fold ensemble predicts them (``inference.postprocessing``), nothing trains, plans or sweeps on them
TEST_IMAGES_DIR = "imagesTs"
TEST_LABELS_DIR = "labelsTs"
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


def image_path(root: str | os.PathLike, case: str, channel: int, test: bool = False) -> Path:
    """Path of one channel of a case: ``imagesTr/{case}_{channel:04d}.nii.gz`` (``imagesTs`` for a test case)."""
    return Path(root) / (TEST_IMAGES_DIR if test else IMAGES_DIR) / f"{case}_{channel:04d}{NIFTI_SUFFIX}"


def label_path(root: str | os.PathLike, case: str, test: bool = False) -> Path:
    """Path of a case's instance map: ``labelsTr/{case}.nii.gz`` (``labelsTs`` for a test case)."""
    return Path(root) / (TEST_LABELS_DIR if test else LABELS_DIR) / f"{case}{NIFTI_SUFFIX}"


def instances_json_path(root: str | os.PathLike, case: str, test: bool = False) -> Path:
    """Path of a case's instance -> class file: ``labelsTr/{case}.json`` (``labelsTs`` for a test case)."""
    return Path(root) / (TEST_LABELS_DIR if test else LABELS_DIR) / f"{case}.json"


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


def list_case_ids(root: str | os.PathLike, test: bool = False) -> list[str]:
    """Sorted case ids that have at least one channel file in ``imagesTr`` (``imagesTs`` with ``test``)."""
    images = Path(root) / (TEST_IMAGES_DIR if test else IMAGES_DIR)
    if not images.is_dir():
        raise DatasetFormatError.for_file(images, "folder is missing")
    cases = {m["case"] for p in images.iterdir() if (m := CHANNEL_FILE_PATTERN.match(p.name))}
    return sorted(cases)


# ---- integrity of image and array files -------------------------------------------------------------------
# SimpleITK (ITK's NIfTI reader) fills the voxels missing from a truncated file with zeros and says nothing, so
# every image is checked before SimpleITK sees it: a gzip stream is decompressed to its end (zlib verifies the
# end-of-stream marker, the CRC-32 and the length), and the voxel bytes are counted against what the header's
# dimensions and pixel type need. The check streams in chunks, so it needs no memory beyond one chunk.
_CHUNK_BYTES = 1 << 22
_GZIP_MAGIC = b"\x1f\x8b"
#: bytes of the leading header kept from the decompressed stream (a NIfTI-2 header is 540 bytes)
_HEADER_BYTES = 1 << 16
#: MetaImage element type -> bytes per element (MetaIO's own table; MET_LONG is 4 bytes there)
_MET_ELEMENT_BYTES = {
    "MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
    "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8,
}


class _Damaged(Exception):
    """Raised inside the integrity check: ``path`` (the header or its data file) and what is wrong with it."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(path, problem)
        self.path, self.problem = path, problem


@dataclass(frozen=True)
class _Payload:
    """What the bytes of a file must hold: ``nbytes`` of voxels from ``offset`` on."""

    offset: int
    nbytes: int
    described: str  # how the header states it, for the error message


def _decompressed_length(path: Path, start: int = 0) -> tuple[bytes, int]:
    """Decompress the gzip/zlib stream of ``path`` from byte ``start`` to its end; return ``(head, length)``.

    ``head`` is the first ``_HEADER_BYTES`` decompressed bytes. A stream without its end-of-stream marker (a
    truncated file) or with damaged data raises :class:`_Damaged`. Further gzip members are read too
    (``cat a.gz b.gz`` is a valid gzip file); bytes after the last member are ignored, as zlib's readers do.
    """
    head, length, size = b"", 0, path.stat().st_size
    decompressor = zlib.decompressobj(47)  # 32 + 15: zlib or gzip wrapper, detected from the first bytes
    with path.open("rb") as handle:
        handle.seek(start)
        try:
            while True:
                if decompressor.eof:
                    rest = decompressor.unused_data
                    if len(rest) < len(_GZIP_MAGIC):
                        rest += handle.read(_CHUNK_BYTES)
                    if not rest.startswith(_GZIP_MAGIC):
                        return head, length
                    decompressor, chunk = zlib.decompressobj(47), rest
                else:
                    chunk = handle.read(_CHUNK_BYTES)
                    if not chunk:
                        break
                data = decompressor.decompress(chunk)
                length += len(data)
                if len(head) < _HEADER_BYTES:
                    head += data[: _HEADER_BYTES - len(head)]
        except zlib.error as error:
            raise _Damaged(
                path, f"corrupt compressed data ({error}); the file is damaged, "
                "copy or convert it again"
            ) from None
    if not decompressor.eof:
        raise _Damaged(
            path, f"truncated: the compressed stream ends without its end marker ({size} bytes on disk, "
            f"{length} bytes decompressed); the file was cut short, copy or convert it again"
        )
    return head, length


def _nifti_payload(head: bytes) -> _Payload | None:
    """Voxel offset and byte count from a NIfTI-1 or NIfTI-2 header; ``None`` if ``head`` is no such header.

    Example:
        >>> import struct
        >>> header = bytearray(348); header[:4] = struct.pack("<i", 348); header[344:348] = b"n+1\\0"
        >>> header[40:56] = struct.pack("<8h", 3, 4, 5, 6, 1, 1, 1, 1); header[72:74] = struct.pack("<h", 16)
        >>> header[108:112] = struct.pack("<f", 352.0)
        >>> _nifti_payload(bytes(header))
        _Payload(offset=352, nbytes=240, described='4 x 5 x 6 voxels of 16 bits')
    """
    for endian in "<>":
        if len(head) >= 348 and struct.unpack(endian + "i", head[:4])[0] == 348:
            if head[344:347] != b"n+1":
                return None  # a header/image pair (.hdr/.img): the voxels are in another file
            dims = struct.unpack(endian + "8h", head[40:56])
            bitpix = struct.unpack(endian + "h", head[72:74])[0]
            vox_offset, minimum = int(struct.unpack(endian + "f", head[108:112])[0]), 352
            break
        if len(head) >= 540 and struct.unpack(endian + "i", head[:4])[0] == 540:
            if head[4:7] != b"n+2":
                return None
            bitpix = struct.unpack(endian + "h", head[14:16])[0]
            dims = struct.unpack(endian + "8q", head[16:80])
            vox_offset, minimum = struct.unpack(endian + "q", head[168:176])[0], 544
            break
    else:
        return None
    ndim = dims[0]
    extents = dims[1 : ndim + 1]
    if not 1 <= ndim <= 7 or min(extents) < 1 or bitpix < 1:
        return None  # nonsense that SimpleITK refuses with its own message
    count = int(np.prod(extents, dtype=np.int64))
    return _Payload(
        offset=max(vox_offset, minimum),
        nbytes=(count * bitpix + 7) // 8,
        described=f"{' x '.join(str(e) for e in extents)} voxels of {bitpix} bits",
    )


def _metaimage_header(path: Path) -> tuple[dict[str, str], int]:
    """``key -> value`` of a MetaImage header and the byte where its data starts (after ``ElementDataFile``)."""
    with path.open("rb") as handle:
        text = handle.read(_HEADER_BYTES)
    fields, position = {}, 0
    for line in text.splitlines(keepends=True):
        position += len(line)
        key, sep, value = line.decode("latin-1").partition("=")
        if not sep:
            break
        fields[key.strip()] = value.strip()
        if key.strip() == "ElementDataFile":  # always the last header entry
            break
    return fields, position


def _metaimage_payload(fields: Mapping[str, str]) -> _Payload | None:
    """Voxel byte count from a MetaImage header; ``None`` where the header is not one this check understands."""
    try:
        ndims = int(fields["NDims"])
        extents = [int(v) for v in fields["DimSize"].split()][:ndims]
        element = _MET_ELEMENT_BYTES[fields["ElementType"]]
        channels = int(fields.get("ElementNumberOfChannels", "1"))
    except (KeyError, ValueError):
        return None
    if len(extents) != ndims or min(extents, default=0) < 1:
        return None
    count = int(np.prod(extents, dtype=np.int64)) * channels
    return _Payload(0, count * element, f"{' x '.join(map(str, extents))} x {channels} elements of "
                                        f"{fields['ElementType']}")


def _require(path: Path, payload: _Payload | None, available: int, where: str) -> None:
    if payload is not None and available - payload.offset < payload.nbytes:
        raise _Damaged(
            path,
            f"truncated: its header promises {payload.described} ({payload.nbytes} bytes"
            f"{f' after byte {payload.offset}' if payload.offset else ''}), {where} holds only "
            f"{max(available - payload.offset, 0)}; the file was cut short, "
            "copy or convert it again",
        )


def _check_metaimage(path: Path) -> None:
    fields, data_start = _metaimage_header(path)
    payload = _metaimage_payload(fields)
    data_file = fields.get("ElementDataFile", "")
    if data_file == "LOCAL":
        data_path = path
    elif data_file and data_file != "LIST" and "%" not in data_file.split()[0]:
        data_path = path.parent / data_file
        data_start = max(int(fields.get("HeaderSize", "0") or 0), 0)  # -1: data is the tail of the file
        if not data_path.is_file():
            raise _Damaged(path, f"its data file {data_path} is missing")
    else:
        return  # slice lists and file patterns: SimpleITK reads (and checks) each file
    if fields.get("CompressedData", "False").lower() == "true":
        _, length = _decompressed_length(data_path, start=data_start)
        _require(data_path, payload, length, "the decompressed data")
    else:
        _require(data_path, payload, data_path.stat().st_size - data_start, "the file")


def check_image_file(path: str | os.PathLike) -> None:
    """Raise :class:`CorruptFileError` if an image file is truncated or its compressed data is damaged.

    NIfTI (``.nii``, ``.nii.gz``, also ``.nii.gz`` files that are not compressed) and MetaImage (``.mha``,
    ``.mhd`` + raw or zraw) are checked: compressed streams are decompressed to their end, and the voxel bytes
    are counted against the header's dimensions and pixel type. Other formats are left to SimpleITK, whose NRRD
    and DICOM readers were seen to refuse short data themselves.

    Example:
        >>> check_image_file("converted/demo/imagesTr/case_000_0000.nii.gz")  # doctest: +SKIP
    """
    path = Path(path)
    try:
        _check_image_bytes(path)
    except _Damaged as damage:
        raise CorruptFileError.for_file(
            damage.path, f"cannot be read as {_format_name(path)}: {damage.problem}"
            + ("" if damage.path == path else f" (data file of {path})")
        ) from None


def _check_image_bytes(path: Path) -> None:
    name = path.name.lower()
    if name.endswith((".mha", ".mhd")):
        _check_metaimage(path)
        return
    if not name.endswith((".nii", ".nii.gz", ".gz")):
        return
    with path.open("rb") as handle:
        compressed = handle.read(2) == _GZIP_MAGIC  # ITK reads by content, so judge by the magic, not the name
    if compressed:
        head, length = _decompressed_length(path)
        _require(path, _nifti_payload(head), length, "the decompressed file")
    elif name.endswith((".nii", ".nii.gz")):  # an uncompressed file named .nii.gz is read as such by ITK too
        with path.open("rb") as handle:
            head = handle.read(_HEADER_BYTES)
        _require(path, _nifti_payload(head), path.stat().st_size, "the file")


def _format_name(path: Path) -> str:
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        return "a NIfTI image"
    if name.endswith((".mha", ".mhd")):
        return "a MetaImage"
    return "an image"


def read_image(path: str | os.PathLike) -> sitk.Image:
    """Read a 3D single-component image after :func:`check_image_file`; every problem raises
    :class:`DatasetFormatError` naming the file (:class:`CorruptFileError` for truncated or damaged bytes).

    This is the one image reader of the project: converters, the format check, preprocessing and evaluation
    all read through it, so none of them can see the zero-filled image SimpleITK makes of a cut-short file.

    Example:
        >>> read_image("converted/demo/labelsTr/case_000.nii.gz").GetSize()  # doctest: +SKIP
        (64, 64, 32)
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetFormatError.for_file(path, "file is missing")
    shadow = path.with_name(path.name[: -len(".gz")])
    if path.name.lower().endswith(".nii.gz") and shadow.is_file():
        # ITK's NIfTI library looks for "x.nii" before "x.nii.gz" and silently reads that other file (seen here)
        raise DatasetFormatError.for_file(
            path, f"{shadow.name} lies beside it and SimpleITK would read that file instead; remove or rename one"
        )
    check_image_file(path)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        # SimpleITK's message is long (C++ file and line); its last non-empty line says what went wrong.
        detail = [line.strip() for line in str(error).splitlines() if line.strip()]
        raise DatasetFormatError.for_file(
            path, f"cannot be read as {_format_name(path)} ({detail[-1] if detail else 'unknown reason'})"
        ) from error
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise DatasetFormatError.for_file(
            path,
            f"expected a 3D single-component image, got dimension {image.GetDimension()} with "
            f"{image.GetNumberOfComponentsPerPixel()} components",
        )
    return image


#: What to do about a damaged array written by this workflow (the ``cases`` folder is a rule's output).
NPY_REGENERATE_HINT = (
    "delete the folder {folder} and rerun snakemake: it is the output of rule preprocess_dataset "
    "(preprocess_corpus for a pre-training corpus), which writes it again"
)


def load_npy(path: str | os.PathLike, mmap_mode: str | None = None, regenerate: str = NPY_REGENERATE_HINT) -> np.ndarray:
    """``np.load`` of a ``.npy`` array (memory-mapped with ``mmap_mode``) that names the file when it is damaged.

    Before loading, the file's size is compared with what its header's shape and dtype need, so a truncated file
    raises :class:`CorruptFileError` saying so, and how to get it back (``regenerate``, where ``{folder}`` is the
    file's folder), instead of numpy's "mmap length is greater than file size". A missing file raises
    ``FileNotFoundError`` naming it.

    Example:
        >>> image = load_npy("preprocessed/demo/cases/case_000.npy", mmap_mode="r")  # doctest: +SKIP
    """
    path = Path(path)
    hint = regenerate.format(folder=path.parent)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: array file not found; {hint}")
    try:
        with path.open("rb") as handle:
            version = np.lib.format.read_magic(handle)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(handle)
            elif version in ((2, 0), (3, 0)):  # 3.0 differs from 2.0 only in allowing utf-8 field names
                shape, _, dtype = np.lib.format.read_array_header_2_0(handle)
            else:
                raise ValueError(f"unknown .npy format version {version}")
            data_start = handle.tell()
    except (ValueError, OSError, EOFError, SyntaxError) as error:
        raise CorruptFileError.for_file(path, f"not a readable .npy array, its header is damaged ({error}); {hint}") from None
    if not dtype.hasobject:
        needed = data_start + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        size = path.stat().st_size
        if size < needed:
            raise CorruptFileError.for_file(
                path,
                f"truncated .npy array: its header promises shape {tuple(shape)} of {dtype} ({needed} bytes), the "
                f"file holds {size}; it was cut short (a killed job or a full disk); {hint}",
            )
    try:
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise CorruptFileError.for_file(path, f"not a readable .npy array ({error}); {hint}") from None


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


def read_case(root: str | os.PathLike, case: str, test: bool = False) -> ConvertedCase:
    """Read all channels, the instance map and the instance classes of one converted case (a held-out test
    case from ``imagesTs``/``labelsTs`` with ``test``).

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
        path = image_path(root, case, channel, test)
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
    seg_path = label_path(root, case, test)
    instance_map = instance_array(read_image(seg_path), seg_path)
    if instance_map.shape != channels[0].shape:
        raise DatasetFormatError.for_file(
            seg_path, f"shape {instance_map.shape} differs from image shape {channels[0].shape}"
        )
    json_path = instances_json_path(root, case, test)
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
    test: bool = False,
) -> None:
    """Write one case in the converted format; ``image`` is ``[C, Z, Y, X]`` (its dtype is kept on disk); a
    held-out test case (``test``) goes to ``imagesTs``/``labelsTs``.

    Example:
        >>> write_case(root, "a_0000", np.zeros((1, 8, 8, 8), np.int16), np.zeros((8, 8, 8), np.int16),
        ...            {}, spacing=(2.0, 1.0, 1.0))  # doctest: +SKIP
    """
    if image.ndim != 4 or image.shape[1:] != instance_map.shape:
        raise ValueError(f"image must be [C,Z,Y,X] matching the instance map {instance_map.shape}, got {image.shape}")
    for channel in range(image.shape[0]):
        write_nifti(image_path(root, case, channel, test), image[channel], spacing, origin, direction)
    write_nifti(label_path(root, case, test), instance_map, spacing, origin, direction)
    write_json(
        instances_json_path(root, case, test),
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
