"""RibFrac (MICCAI 2020 rib-fracture challenge): NIfTI CT, instance label maps, and info CSVs of label codes.

Source layout (the challenge's Zenodo archives, unpacked anywhere below the source root)::

    ribfrac-train-images-1/Part1/RibFrac1-image.nii.gz ...     CT, int16 HU
    ribfrac-train-labels-1/Part1/RibFrac1-label.nii.gz ...     instance map: 0 background, 1..n fractures
    ribfrac-train-info-1.csv, ribfrac-train-info-2.csv, ribfrac-val-info.csv
                                                               public_id,label_id,label_code

Files are found by name anywhere below the root (``RibFrac{N}-image.nii(.gz)``, ``RibFrac{N}-label.nii(.gz)``,
``ribfrac-*info*.csv``), so the zips' inner folders (``Part1/``, ``Part2/``, none) do not matter. Files whose
name starts with ``.`` (macOS ``._*`` resource forks inside some zips) are ignored.

Each label map value ``label_id`` > 0 is one fracture; its row in the info CSV gives ``label_code``:
``0`` background (only with ``label_id`` 0), ``1`` displaced, ``2`` non-displaced, ``3`` buckle, ``4``
segmental, ``-1`` "ignore": a fracture whose type the annotators left undefined (the challenge's own evaluation
counts it as a fracture to detect in the detection track and skips it in the classification track).

Classes (setting ``classes``):

- ``"fracture"`` (default): one class, every fracture, as nnDetection's RibFrac preparation (``Task020FG``)
  and the detection track do. ``label_code -1`` instances are fractures too (``uncertain: fracture``, the
  default); ``uncertain: drop`` erases them to background instead.
- ``"types"``: four classes ``displaced, nondisplaced, buckle, segmental`` (class index = code - 1).
  ``-1`` instances have no type, so they are excluded: their voxels become background (``uncertain: drop``
  is the only choice here).

The surviving instances are renumbered 1..N in increasing ``label_id`` order; ``labelsTr/{case}.json`` keeps
only the instance classes (the mapping to the original ``label_id`` goes to ``dataset.json``'s conversion
record). Only cases with a label map are converted (the test images have none). A label id missing from the
CSV, a code other than -1..4, or a label map whose grid differs from its image raises
:class:`~pretrain_det3d.data.converters.base.ConversionError` naming the file. CSV rows whose ``label_id`` has
no voxels are skipped and counted.

Example:
    >>> RibFracConverter({"classes": "fracture"}).convert("raw/ribfrac", "converted/ribfrac")  # doctest: +SKIP
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pretrain_det3d.data.converters.base import CONVERTERS, ConvertedCase, ConversionError, DatasetConverter, case_from_sitk
from pretrain_det3d.data.converters.label_maps import check_same_grid, integer_labels, read_nifti, relabel
from pretrain_det3d.settings.converters import RibFracConvertSettings

IMAGE_NAME = re.compile(r"^(?P<case>RibFrac\d+)-image\.nii(\.gz)?$")
LABEL_NAME = re.compile(r"^(?P<case>RibFrac\d+)-label\.nii(\.gz)?$")
INFO_CSV_GLOB = "ribfrac-*info*.csv"
INFO_COLUMNS = ("public_id", "label_id", "label_code")
BACKGROUND_CODE = 0
UNCERTAIN_CODE = -1
#: RibFrac label codes of the four fracture types, in class-index order for ``classes: types``
TYPE_CODES = {1: "displaced", 2: "nondisplaced", 3: "buckle", 4: "segmental"}
SINGLE_CLASS_NAME = "fracture"
CLASS_MODES = ("fracture", "types")
UNCERTAIN_POLICIES = ("fracture", "drop")
DEFAULT_CLASS_MODE = RibFracConvertSettings.default("classes")


def _visible_files(root: Path, pattern: str) -> list[Path]:
    """Files under ``root`` matching ``pattern`` (recursively), skipping hidden ones such as ``._*``."""
    return sorted(p for p in root.rglob(pattern) if p.is_file() and not p.name.startswith("."))


def read_info_csvs(paths: list[Path]) -> dict[str, dict[int, int]]:
    """Read RibFrac info CSVs into ``{public_id: {label_id: label_code}}``; bad content raises ConversionError.

    Example:
        >>> read_info_csvs([Path("ribfrac-train-info-1.csv")])["RibFrac1"]  # doctest: +SKIP
        {0: 0, 1: 3, 2: -1}
    """
    codes: dict[str, dict[int, int]] = {}
    seen_in: dict[tuple[str, int], Path] = {}
    for path in paths:
        table = pd.read_csv(path, skipinitialspace=True)
        table.columns = [str(c).strip() for c in table.columns]
        missing = [c for c in INFO_COLUMNS if c not in table.columns]
        if missing:
            raise ConversionError.for_file(path, f"missing columns {missing}; expected {list(INFO_COLUMNS)}")
        for row_number, row in enumerate(table.itertuples(index=False), start=2):  # line 1 is the header
            try:
                public_id = str(row.public_id).strip()
                label_id, label_code = int(row.label_id), int(row.label_code)
            except (TypeError, ValueError):
                raise ConversionError.for_file(path, f"line {row_number}: label_id and label_code must be integers, "
                                                     f"got {row.label_id!r}, {row.label_code!r}") from None
            if label_code not in (BACKGROUND_CODE, UNCERTAIN_CODE, *TYPE_CODES):
                raise ConversionError.for_file(path, f"line {row_number}: unknown label_code {label_code} "
                                                     f"(known: -1, 0, 1, 2, 3, 4)")
            if (label_id == 0) != (label_code == BACKGROUND_CODE):
                raise ConversionError.for_file(path, f"line {row_number}: label_id {label_id} with label_code "
                                                     f"{label_code} (code 0 is reserved for label_id 0)")
            key = (public_id, label_id)
            previous = codes.setdefault(public_id, {}).get(label_id)
            if previous is not None and previous != label_code:
                raise ConversionError.for_file(path, f"line {row_number}: {public_id} label_id {label_id} has code "
                                                     f"{label_code} here but {previous} in {seen_in[key]}")
            codes[public_id][label_id] = label_code
            seen_in[key] = path
    return codes


@CONVERTERS.register("ribfrac")
class RibFracConverter(DatasetConverter):
    """Settings: ``classes`` (``fracture`` | ``types``, default ``fracture``) and ``uncertain`` (what becomes of
    ``label_code -1``: ``fracture`` | ``drop``; default ``fracture`` for one class, ``drop`` for types)."""

    dataset_name = "ribfrac"
    modalities = ("CT",)
    class_names = (SINGLE_CLASS_NAME,)
    licence = "CC-BY-NC-4.0 (RibFrac Challenge data, Zenodo records 3893508 / 3893498 / 3893496)"
    source = "https://ribfrac.grand-challenge.org"

    def __init__(self, settings: dict[str, Any] | None = None) -> None:
        super().__init__(settings)
        self.class_mode = self.settings.get("classes", DEFAULT_CLASS_MODE)
        if self.class_mode not in CLASS_MODES:
            raise ConversionError(f"ribfrac converter: setting 'classes' must be one of {CLASS_MODES}, "
                                  f"got {self.class_mode!r}")
        default_uncertain = "fracture" if self.class_mode == "fracture" else "drop"
        self.uncertain = self.settings.get("uncertain", default_uncertain)
        if self.uncertain not in UNCERTAIN_POLICIES:
            raise ConversionError(f"ribfrac converter: setting 'uncertain' must be one of {UNCERTAIN_POLICIES}, "
                                  f"got {self.uncertain!r}")
        if self.class_mode == "types" and self.uncertain != "drop":
            raise ConversionError("ribfrac converter: with 'classes: types' an instance of label_code -1 has no "
                                  "type, so 'uncertain' must be 'drop'")
        self.class_names = (SINGLE_CLASS_NAME,) if self.class_mode == "fracture" else tuple(TYPE_CODES.values())
        self._record: dict[str, Any] = {"dropped_uncertain": {}, "csv_rows_without_voxels": {},
                                        "label_ids": {}, "images_without_labels": []}

    # ---- finding the files ---------------------------------------------------------------------------------
    def _index(self, source_dir: Path) -> None:
        if getattr(self, "_indexed_root", None) == source_dir:
            return
        images: dict[str, Path] = {}
        labels: dict[str, Path] = {}
        for table, pattern, glob in ((images, IMAGE_NAME, "RibFrac*-image.nii*"), (labels, LABEL_NAME, "RibFrac*-label.nii*")):
            for path in _visible_files(source_dir, glob):
                match = pattern.match(path.name)
                if not match:
                    continue
                case = match["case"]
                if case in table:
                    raise ConversionError.for_file(path, f"{case} is also at {table[case]}")
                table[case] = path
        for case, path in labels.items():
            if case not in images:
                raise ConversionError.for_file(path, f"label map has no image {case}-image.nii.gz under {source_dir}")
        csvs = _visible_files(source_dir, INFO_CSV_GLOB)
        if labels and not csvs:
            raise ConversionError.for_file(source_dir, f"no RibFrac info CSV ({INFO_CSV_GLOB}, e.g. "
                                                       "ribfrac-train-info-1.csv) found below this folder")
        self._images, self._labels, self._indexed_root = images, labels, source_dir
        self._codes = read_info_csvs(csvs)
        self._record["images_without_labels"] = sorted(set(images) - set(labels), key=_case_number)
        self._record["info_csvs"] = [p.name for p in csvs]

    def list_cases(self, source_dir: Path) -> list[str]:
        self._index(source_dir)
        return sorted(self._labels, key=_case_number)

    # ---- one case -----------------------------------------------------------------------------------------
    def class_of_code(self, label_code: int) -> int | None:
        """Class index for a fracture's label code, or None when the instance is excluded.

        Example:
            >>> RibFracConverter({"classes": "types"}).class_of_code(3), RibFracConverter().class_of_code(-1)
            (2, 0)
        """
        if label_code == UNCERTAIN_CODE:
            return 0 if self.uncertain == "fracture" else None
        return 0 if self.class_mode == "fracture" else label_code - 1

    def load_case(self, source_dir: Path, case_id: str) -> ConvertedCase:
        self._index(source_dir)
        image_path, label_path = self._images[case_id], self._labels[case_id]
        image = read_nifti(image_path)
        label = read_nifti(label_path)
        check_same_grid(image, image_path, label, label_path)
        label_ids = integer_labels(label, label_path)
        present = [int(v) for v in np.unique(label_ids) if v != 0]
        if any(v < 0 for v in present):
            raise ConversionError.for_file(label_path, f"negative label ids {[v for v in present if v < 0]}")
        codes = self._codes.get(case_id, {})
        missing = [v for v in present if v not in codes]
        if missing:
            raise ConversionError.for_file(label_path, f"label ids {missing} have no row for public_id {case_id} "
                                                       f"in the info CSVs {self._record['info_csvs']}")
        kept, classes, dropped = [], [], []
        for label_id in present:
            class_index = self.class_of_code(codes[label_id])
            if class_index is None:
                dropped.append(label_id)
            else:
                kept.append(label_id)
                classes.append(class_index)
        instance_map = relabel(label_ids, kept)
        instances = {new_id: cls for new_id, cls in enumerate(classes, start=1)}
        if dropped:
            self._record["dropped_uncertain"][case_id] = dropped
        empty_rows = sorted(i for i in codes if i != 0 and i not in present)
        if empty_rows:
            self._record["csv_rows_without_voxels"][case_id] = empty_rows
        self._record["label_ids"][case_id] = kept
        return case_from_sitk(case_id, [image], instance_map, instances)

    def dataset_extra(self) -> dict[str, Any]:
        return {"conversion": {
            "converter": "ribfrac",
            "classes": self.class_mode,
            "uncertain": self.uncertain,
            "rule": "instances = label ids of RibFrac{N}-label.nii.gz; class from label_code of the info CSVs "
                    "(1 displaced, 2 nondisplaced, 3 buckle, 4 segmental, -1 undefined type); kept instances "
                    "renumbered 1..N in label_id order (label_ids lists the original id of each); image geometry kept",
            **self._record,
        }}


def _case_number(case_id: str) -> int:
    """``RibFrac12`` -> 12, so cases sort numerically rather than as text."""
    return int(re.sub(r"\D", "", case_id) or 0)
