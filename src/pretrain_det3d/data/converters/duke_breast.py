"""Duke-Breast-Cancer-MRI (breast tumours, DCE-MRI): DICOM series plus one tumour box per patient.

Source layout (TCIA: NBIA Data Retriever download plus the collection's tables)::

    Duke-Breast-Cancer-MRI/Breast_MRI_001/{study}/{series}/1-001.dcm ...   DICOM (any folder layout)
    Annotation_Boxes.xlsx (or .csv)        Patient ID, Start Row, End Row, Start Column, End Column,
                                           Start Slice, End Slice
    Breast-Cancer-MRI-filepath_filename-mapping.xlsx (or .csv)
                                           original_path_and_filename, ..., sop_instance_UID

Conventions this converter applies (documented in ``docs/datasets.md``):

- The boxes' slice numbers are those of the collection's original file names
  (``DICOM_Images/Breast_MRI_001/post_1/Breast_MRI_001_post_1_089.dcm`` is slice 89), which the mapping table
  links to each file's ``SOPInstanceUID``. The converter finds every slice's number through its uid, so the box
  lands on the right slices whatever order the files are stacked in (GDCM stacks them by position).
- Rows are the DICOM pixel rows (array axis y), columns the pixel columns (array axis x).
- All six numbers are 1-based and inclusive (setting ``index_base``, default 1): rows ``Start..End`` become the
  half-open voxel range ``[Start - 1, End)``.
- The image is the sequence(s) named by ``sequences`` (default ``["post_1"]``, the first post-contrast series,
  where the tumour enhances); several sequences become channels and must share one grid.
- The whole box is the instance (the collection gives no masks): one instance of class ``tumour`` per patient.

Example:
    >>> DukeBreastConverter({"sequences": ["pre", "post_1"]}).convert("raw/duke", "converted/duke")  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pandas as pd

from pretrain_det3d.data.converters.base import CONVERTERS, ConvertedCase, ConversionError, DatasetConverter, case_from_sitk
from pretrain_det3d.data.converters.dicom import TAG_SOP_INSTANCE_UID, find_dicom_series, read_dicom_series, read_header
from pretrain_det3d.settings.converters import DukeBreastConvertSettings

BOXES_STEM = "Annotation_Boxes"
MAPPING_STEM = "Breast-Cancer-MRI-filepath_filename-mapping"
BOX_COLUMNS = ("Patient ID", "Start Row", "End Row", "Start Column", "End Column", "Start Slice", "End Slice")
MAPPING_COLUMNS = ("original_path_and_filename", "sop_instance_UID")
DEFAULT_SEQUENCES = DukeBreastConvertSettings.default("sequences")
DEFAULT_INDEX_BASE = DukeBreastConvertSettings.default("index_base")


def read_table(source_dir: Path, stem: str, columns: tuple[str, ...]) -> pd.DataFrame:
    """Read ``{stem}.xlsx`` (as TCIA ships it) or ``{stem}.csv`` and check its columns."""
    for suffix in (".xlsx", ".csv"):
        path = source_dir / f"{stem}{suffix}"
        if path.is_file():
            table = pd.read_excel(path) if suffix == ".xlsx" else pd.read_csv(path)
            table.columns = [str(c).strip() for c in table.columns]
            missing = [c for c in columns if c not in table.columns]
            if missing:
                raise ConversionError.for_file(path, f"missing columns {missing}; found {list(table.columns)}")
            return table
    raise ConversionError.for_file(source_dir / f"{stem}.xlsx", "missing (neither .xlsx nor .csv is there)")


def parse_original_path(value: str) -> tuple[str, str, int]:
    """``DICOM_Images/Breast_MRI_001/post_1/Breast_MRI_001_post_1_089.dcm`` -> (patient, sequence, slice 89)."""
    parts = PurePosixPath(str(value).replace("\\", "/")).parts
    if len(parts) < 4:
        raise ValueError(f"unexpected original_path_and_filename {value!r}")
    return parts[1], parts[2], int(PurePosixPath(parts[-1]).stem.rsplit("_", 1)[1])


@CONVERTERS.register("duke_breast")
class DukeBreastConverter(DatasetConverter):
    """Settings: ``sequences`` (default ``["post_1"]``), ``index_base`` (default 1)."""

    dataset_name = "duke_breast"
    class_names = ("tumour",)
    licence = "CC-BY-NC-4.0 (TCIA Duke-Breast-Cancer-MRI)"
    source = "https://doi.org/10.7937/TCIA.e3sv-re93"

    @property
    def sequences(self) -> tuple[str, ...]:
        return tuple(self.settings.get("sequences", DEFAULT_SEQUENCES))

    @property
    def modalities(self) -> tuple[str, ...]:  # type: ignore[override]  # one MRI channel per sequence
        return ("MRI",) * len(self.sequences)

    def _index(self, source_dir: Path) -> dict[str, Any]:
        if getattr(self, "_state", None) is None:
            boxes = read_table(source_dir, BOXES_STEM, BOX_COLUMNS)
            mapping = read_table(source_dir, MAPPING_STEM, MAPPING_COLUMNS)
            slice_of: dict[str, tuple[str, str, int]] = {}
            for original, uid in zip(mapping["original_path_and_filename"], mapping["sop_instance_UID"]):
                try:
                    slice_of[str(uid).strip()] = parse_original_path(original)
                except (ValueError, IndexError):
                    raise ConversionError.for_file(source_dir / MAPPING_STEM, f"cannot read slice number of {original!r}") from None
            # Which series is which (patient, sequence): look one file of each series up in the mapping.
            series_of: dict[tuple[str, str], Any] = {}
            for series in find_dicom_series(source_dir).values():
                uid = read_header(series.files[0], (TAG_SOP_INSTANCE_UID,)).get(TAG_SOP_INSTANCE_UID, "")
                if uid in slice_of:
                    patient, sequence, _ = slice_of[uid]
                    series_of[(patient, sequence)] = series
            self._state = {"boxes": boxes, "slice_of": slice_of, "series_of": series_of}
        return self._state

    def list_cases(self, source_dir: Path) -> list[str]:
        state = self._index(source_dir)
        patients = {str(p).strip() for p in state["boxes"]["Patient ID"]}
        return sorted(p for p in patients if all((p, s) in state["series_of"] for s in self.sequences))

    def load_case(self, source_dir: Path, case_id: str) -> ConvertedCase:
        state = self._index(source_dir)
        images, slice_numbers = [], None
        for sequence in self.sequences:
            series = state["series_of"][(case_id, sequence)]
            image, tags = read_dicom_series(series, (TAG_SOP_INSTANCE_UID,))
            numbers = []
            for k, slice_tags in enumerate(tags):
                uid = slice_tags.get(TAG_SOP_INSTANCE_UID, "")
                if uid not in state["slice_of"]:
                    raise ConversionError.for_file(series.files[k], f"SOPInstanceUID {uid} is not in {MAPPING_STEM}")
                numbers.append(state["slice_of"][uid][2])
            if images and (image.GetSize() != images[0].GetSize() or not np.allclose(image.GetOrigin(), images[0].GetOrigin())):
                raise ConversionError.for_file(series.folder, f"sequence {sequence} of {case_id} is not on the grid of {self.sequences[0]}")
            images.append(image)
            slice_numbers = slice_numbers if slice_numbers is not None else np.asarray(numbers)
        shape = images[0].GetSize()[::-1]  # (z, y, x)
        base = int(self.settings.get("index_base", DEFAULT_INDEX_BASE))
        rows = state["boxes"][state["boxes"]["Patient ID"].astype(str).str.strip() == case_id]
        instance_map = np.zeros(shape, dtype=np.int16)
        for instance_id, (_, row) in enumerate(rows.iterrows(), start=1):
            start_slice, end_slice = int(row["Start Slice"]), int(row["End Slice"])
            in_box = np.nonzero((slice_numbers >= start_slice) & (slice_numbers <= end_slice))[0]
            y0, y1 = int(row["Start Row"]) - base, int(row["End Row"]) - base + 1
            x0, x1 = int(row["Start Column"]) - base, int(row["End Column"]) - base + 1
            if in_box.size == 0 or not (0 <= y0 < y1 <= shape[1] and 0 <= x0 < x1 <= shape[2]):
                raise ConversionError.for_file(
                    source_dir / f"{BOXES_STEM}.xlsx",
                    f"box of {case_id} (rows {row['Start Row']}-{row['End Row']}, columns {row['Start Column']}-"
                    f"{row['End Column']}, slices {start_slice}-{end_slice}) lies outside its {shape} scan")
            z0, z1 = int(in_box.min()), int(in_box.max()) + 1  # slice numbers map to a contiguous array range
            instance_map[z0:z1, y0:y1, x0:x1] = instance_id
        return case_from_sitk(case_id, images, instance_map, {i: 0 for i in range(1, len(rows) + 1)})

    def dataset_extra(self) -> dict:
        return {"conversion": {"sequences": list(self.sequences),
                               "boxes": "Annotation_Boxes rows/columns/slices, 1-based inclusive; slice numbers from "
                                        "the original file names via SOPInstanceUID; the box is the instance"}}
