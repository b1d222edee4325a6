"""Writing miniature DICOM series with the real tags, for the converter tests (not a test module itself)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk


def write_dicom_series(
    folder: Path,
    array_zyx: np.ndarray,
    spacing_xyz: Sequence[float],
    origin_xyz: Sequence[float],
    row_cosines: Sequence[float],
    column_cosines: Sequence[float],
    series_uid: str,
    sop_uids: Sequence[str],
    instance_numbers: Sequence[int],
    file_names: Sequence[str],
    modality: str = "CT",
    patient_id: str = "PATIENT",
    study_uid: str = "1.2.826.0.1.3680043.8.498.1",
) -> None:
    """One file per slice; slice ``k`` lies at ``origin + k * spacing_z * normal`` (normal = row x column).

    The tags are the ones real series carry: ImagePositionPatient, ImageOrientationPatient, PixelSpacing (row
    spacing first, i.e. y then x), SliceThickness, InstanceNumber, SOPInstanceUID, SeriesInstanceUID, ...
    """
    folder.mkdir(parents=True, exist_ok=True)
    normal = np.cross(row_cosines, column_cosines)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()  # keep our SOP/series uids instead of generated ones
    for k in range(array_zyx.shape[0]):
        position = np.asarray(origin_xyz, dtype=float) + k * spacing_xyz[2] * normal
        slice_image = sitk.GetImageFromArray(array_zyx[k])
        slice_image.SetSpacing((float(spacing_xyz[0]), float(spacing_xyz[1])))
        tags = {
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2" if modality == "CT" else "1.2.840.10008.5.1.4.1.1.4",
            "0008|0018": sop_uids[k],
            "0008|0060": modality,
            "0010|0020": patient_id,
            "0020|000d": study_uid,
            "0020|000e": series_uid,
            "0020|0013": str(instance_numbers[k]),
            "0020|0032": "\\".join(f"{v:.6f}" for v in position),
            "0020|0037": "\\".join(f"{v:.6f}" for v in (*row_cosines, *column_cosines)),
            "0028|0030": f"{spacing_xyz[1]:.6f}\\{spacing_xyz[0]:.6f}",
            "0018|0050": f"{spacing_xyz[2]:.6f}",
        }
        for key, value in tags.items():
            slice_image.SetMetaData(key, value)
        writer.SetFileName(str(folder / file_names[k]))
        writer.Execute(slice_image)
