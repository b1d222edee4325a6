"""KiTS21 (kidney tumours in contrast CT): tumour instances from the aggregated segmentation.

Source layout (the ``neheller/kits21`` git repository after ``kits21/starter_code/get_imaging.py`` fetched the
CT volumes; the segmentations are in the repository itself)::

    kits21/data/case_00000/imaging.nii.gz                CT (HU)
    kits21/data/case_00000/aggregated_MAJ_seg.nii.gz     0 background, 1 kidney, 2 tumour, 3 cyst
    kits21/data/case_00000/aggregated_AND_seg.nii.gz, aggregated_OR_seg.nii.gz, segmentations/, raw/
    kits21/data/kits.json

The source root may be the repository root, its inner ``kits21/`` package folder, the ``data/`` folder, or a
folder holding an unpacked repository archive (``*/kits21/data``, e.g. ``kits21/kits21-master/kits21/data``).
The workflow's own download stores the CT volumes under the publisher's names ``master_00000.nii.gz`` ...
(``get_imaging.py``'s ``https://kits19.sfo2.digitaloceanspaces.com/master_{id:05d}.nii.gz``) in the source root
instead of ``case_*/imaging.nii.gz``; both places are looked at, the case folder first.

Instances: connected components of the tumour label (2) of ``aggregated_MAJ_seg.nii.gz`` (voxel-wise majority
vote of the three annotations, the file KiTS21's own evaluation uses as reference), 26-connectivity, then the
size filter of :mod:`~pretrain_det3d.data.converters.label_maps` (``min_extent_mm``, default 3 mm in-plane).
The official aggregation writes tumour last (kidney, then cyst, then tumour), so a tumour is never cut by
another label. Cysts (label 3) are not lesions of the paper's task and stay background unless
``include_cysts: true`` adds them as a second class ``cyst``. (nnDetection's own KiTS21 preparation instead
majority-votes each annotated tumour instance from ``segmentations/``; this converter follows the issue's
definition, instances = connected components of the aggregated map; the two differ only where two tumours
touch.)

Example:
    >>> KiTS21Converter().convert("raw/kits21", "converted/kits21")  # doctest: +SKIP
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from pretrain_det3d.data.converters.base import CONVERTERS, ConvertedCase, ConversionError, DatasetConverter, case_from_sitk
from pretrain_det3d.data.converters.label_maps import (
    DEFAULT_CONNECTIVITY,
    check_same_grid,
    connected_instances,
    integer_labels,
    read_nifti,
    structure_for,
)
from pretrain_det3d.settings.converters import KiTS21ConvertSettings

CASE_NAME = re.compile(r"^case_\d{5}$")
IMAGE_FILE = "imaging.nii.gz"
#: the publisher's name of a case's CT volume on its download server (get_imaging.py)
DOWNLOADED_IMAGE_NAME = "master_{number}.nii.gz"
DEFAULT_SEGMENTATION_FILE = KiTS21ConvertSettings.default("segmentation")
SEGMENTATION_FILES = ("aggregated_MAJ_seg.nii.gz", "aggregated_AND_seg.nii.gz", "aggregated_OR_seg.nii.gz")
#: KiTS21 label values (kits21/configuration/labels.py)
KIDNEY_LABEL, TUMOUR_LABEL, CYST_LABEL = 1, 2, 3
DEFAULT_MIN_EXTENT_MM = KiTS21ConvertSettings.default("min_extent_mm")
#: candidate data folders relative to the source root, first match wins
DATA_DIR_CANDIDATES = (".", "data", "kits21/data", "*/kits21/data", "*/*/kits21/data")


@CONVERTERS.register("kits21")
class KiTS21Converter(DatasetConverter):
    """Settings: ``segmentation`` (one of :data:`SEGMENTATION_FILES`, default MAJ), ``include_cysts`` (bool,
    default false), ``min_extent_mm`` (default 3.0), ``connectivity`` (6 | 18 | 26, default 26)."""

    dataset_name = "kits21"
    modalities = ("CT",)
    class_names = ("tumour",)
    licence = "CC-BY-NC-SA-4.0 (KiTS21 imaging and segmentations)"
    source = "https://github.com/neheller/kits21"

    def __init__(self, settings: dict[str, Any] | None = None) -> None:
        super().__init__(settings)
        self.segmentation_file = self.settings.get("segmentation", DEFAULT_SEGMENTATION_FILE)
        if self.segmentation_file not in SEGMENTATION_FILES:
            raise ConversionError(f"kits21 converter: setting 'segmentation' must be one of {SEGMENTATION_FILES}, "
                                  f"got {self.segmentation_file!r}")
        self.include_cysts = bool(self.settings.get("include_cysts", False))
        self.min_extent_mm = float(self.settings.get("min_extent_mm", DEFAULT_MIN_EXTENT_MM))
        self.connectivity = int(self.settings.get("connectivity", DEFAULT_CONNECTIVITY))
        structure_for(self.connectivity)  # validates
        self.classes_of_labels = {TUMOUR_LABEL: 0, **({CYST_LABEL: 1} if self.include_cysts else {})}
        self.class_names = ("tumour", "cyst") if self.include_cysts else ("tumour",)
        self._dropped: dict[str, list] = {}

    def _data_dir(self, source_dir: Path) -> Path:
        if getattr(self, "_data_dir_of", (None, None))[0] == source_dir:
            return self._data_dir_of[1]
        for candidate in DATA_DIR_CANDIDATES:
            for folder in sorted(source_dir.glob(candidate)) if "*" in candidate else [source_dir / candidate]:
                if folder.is_dir() and any(p.is_dir() and CASE_NAME.match(p.name) for p in folder.iterdir()):
                    self._data_dir_of = (source_dir, folder.resolve())
                    return folder.resolve()
        raise ConversionError.for_file(
            source_dir, f"no KiTS21 case folders (case_00000, ...) in any of {list(DATA_DIR_CANDIDATES)}")

    def list_cases(self, source_dir: Path) -> list[str]:
        data_dir = self._data_dir(source_dir)
        cases = sorted(p.name for p in data_dir.iterdir() if p.is_dir() and CASE_NAME.match(p.name))
        # only cases that carry the chosen segmentation are training cases
        return [case for case in cases if (data_dir / case / self.segmentation_file).is_file()]

    def load_case(self, source_dir: Path, case_id: str) -> ConvertedCase:
        case_dir = self._data_dir(source_dir) / case_id
        image_path, seg_path = case_dir / IMAGE_FILE, case_dir / self.segmentation_file
        downloaded = source_dir / DOWNLOADED_IMAGE_NAME.format(number=case_id.split("_")[1])
        if not image_path.is_file() and downloaded.is_file():
            image_path = downloaded
        if not image_path.is_file():
            raise ConversionError.for_file(image_path, f"CT volume is missing (nor is it at {downloaded}); KiTS21 keeps "
                                                       "the imaging outside git: run kits21/starter_code/get_imaging.py")
        image = read_nifti(image_path)
        seg = read_nifti(seg_path)
        check_same_grid(image, image_path, seg, seg_path)
        semantic = integer_labels(seg, seg_path)
        unknown = sorted(set(int(v) for v in np.unique(semantic)) - {0, KIDNEY_LABEL, TUMOUR_LABEL, CYST_LABEL})
        if unknown:
            raise ConversionError.for_file(seg_path, f"unknown label values {unknown}; KiTS21 uses 0-3")
        spacing_zyx = tuple(float(s) for s in reversed(image.GetSpacing()))
        instance_map, instances, dropped = connected_instances(
            semantic, self.classes_of_labels, spacing_zyx, self.min_extent_mm, self.connectivity)
        if dropped:
            self._dropped[case_id] = dropped
        return case_from_sitk(case_id, [image], instance_map, instances)

    def dataset_extra(self) -> dict[str, Any]:
        return {"conversion": {
            "converter": "kits21",
            "segmentation": self.segmentation_file,
            "labels_to_classes": {str(k): self.class_names[v] for k, v in self.classes_of_labels.items()},
            "connectivity": self.connectivity,
            "min_extent_mm": self.min_extent_mm,
            "rule": "instances = connected components of each listed label; components spanning less than "
                    "min_extent_mm along the two finest-spacing axes are dropped; image geometry kept",
            "dropped_components": self._dropped,
        }}
