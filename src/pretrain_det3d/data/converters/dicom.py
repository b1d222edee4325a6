"""Reading DICOM series with SimpleITK (GDCM), keeping each slice's tags in array order.

GDCM sorts a series' files by their position along the slice normal (``ImagePositionPatient`` projected on the
normal of ``ImageOrientationPatient``), and SimpleITK stacks them in that order, so slice ``k`` of the array is
file ``k`` of :attr:`DicomSeries.files`. Annotations that name slices by ``SOPInstanceUID`` or by instance number
are mapped through :attr:`DicomSeries.slice_tags`.

Example:
    >>> series = find_dicom_series("raw/lidc")  # doctest: +SKIP
    >>> image, tags = read_dicom_series(series["1.3.6.1.4.1.14519..."])  # doctest: +SKIP
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import SimpleITK as sitk

from pretrain_det3d.data.converters.base import ConversionError

TAG_SOP_INSTANCE_UID = "0008|0018"
TAG_MODALITY = "0008|0060"
TAG_PATIENT_ID = "0010|0020"
TAG_SERIES_INSTANCE_UID = "0020|000e"
TAG_INSTANCE_NUMBER = "0020|0013"
TAG_IMAGE_POSITION = "0020|0032"
TAG_IMAGE_ORIENTATION = "0020|0037"
TAG_PIXEL_SPACING = "0028|0030"
DEFAULT_SLICE_TAGS = (TAG_SOP_INSTANCE_UID, TAG_INSTANCE_NUMBER, TAG_IMAGE_POSITION)


@dataclass
class DicomSeries:
    """One series: its uid, folder and files in array (GDCM) order."""

    series_uid: str
    folder: Path
    files: tuple[Path, ...]


def find_dicom_series(root: str | os.PathLike) -> dict[str, DicomSeries]:
    """Every DICOM series below ``root`` (any folder layout), keyed by ``SeriesInstanceUID``."""
    found: dict[str, DicomSeries] = {}
    for folder, _, names in sorted(os.walk(root)):
        if not any(name.lower().endswith(".dcm") for name in names):
            continue
        for series_uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder):
            files = tuple(Path(f) for f in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, series_uid))
            if series_uid in found:
                raise ConversionError.for_file(folder, f"series {series_uid} also found in {found[series_uid].folder}")
            found[series_uid] = DicomSeries(series_uid, Path(folder), files)
    return found


def read_header(path: str | os.PathLike, tags: Sequence[str]) -> dict[str, str]:
    """Selected tags of one DICOM file, without reading its pixels (missing tags are left out)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.LoadPrivateTagsOn()
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise ConversionError.for_file(path, f"unreadable DICOM file ({error})") from None
    return {tag: reader.GetMetaData(tag).strip() for tag in tags if reader.HasMetaDataKey(tag)}


def _unreadable_slice(series: DicomSeries) -> ConversionError | None:
    """The error naming the first file of ``series`` that SimpleITK cannot read on its own, if any."""
    for index, path in enumerate(series.files):
        try:
            sitk.ReadImage(str(path))
        except RuntimeError as error:
            detail = [line.strip() for line in str(error).splitlines() if line.strip()]
            return ConversionError.for_file(
                path, f"slice {index} of series {series.series_uid} cannot be read: the file is truncated or corrupt "
                f"({detail[-1] if detail else 'unknown reason'}); copy it again from the source")
    return None


def read_dicom_series(series: DicomSeries, tags: Sequence[str] = DEFAULT_SLICE_TAGS) -> tuple[sitk.Image, list[dict[str, str]]]:
    """Read a series as one 3D image, with the requested tags of every slice in array order."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in series.files])
    reader.MetaDataDictionaryArrayUpdateOn()
    reader.LoadPrivateTagsOn()
    try:
        image = reader.Execute()
    except RuntimeError as error:
        # GDCM refuses a truncated slice (measured) but its message names no file: find the slice that fails
        raise _unreadable_slice(series) or ConversionError.for_file(
            series.folder, f"series {series.series_uid} is unreadable ({error})") from None
    slice_tags = [
        {tag: reader.GetMetaData(k, tag).strip() for tag in tags if reader.HasMetaDataKey(k, tag)}
        for k in range(len(series.files))
    ]
    if image.GetDimension() != 3 or image.GetSize()[2] != len(series.files):
        raise ConversionError.for_file(series.folder, f"series {series.series_uid} is not a stack of 2D slices")
    return image, slice_tags
