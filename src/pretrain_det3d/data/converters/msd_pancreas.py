"""Medical Segmentation Decathlon Task07 Pancreas: tumour instances from the semantic labels.

Source layout (``Task07_Pancreas.tar`` unpacked; the source root may be ``Task07_Pancreas/``, its parent, or the
parent of a folder the tar was unpacked into, ``*/Task07_Pancreas/``)::

    Task07_Pancreas/dataset.json          MSD metadata: modality, labels, "training": [{"image", "label"}], "test"
    Task07_Pancreas/imagesTr/pancreas_001.nii.gz   portal-venous CT (HU)
    Task07_Pancreas/labelsTr/pancreas_001.nii.gz   0 background, 1 pancreas, 2 cancer (tumour)
    Task07_Pancreas/imagesTs/...                    test images, no labels (not converted)

The case list comes from ``dataset.json``'s ``training`` entries, not from a directory listing: the published
tar also holds macOS resource forks (``imagesTr/._pancreas_001.nii.gz``) that are not images. Case ids are the
file names without ``.nii.gz`` (``pancreas_001``). ``dataset.json`` must name label 2 (``cancer`` in the
release); the converter checks that so a different task is not converted by mistake.

Instances: connected components of label 2 with 26-connectivity, then the size filter of
:mod:`~pretrain_det3d.data.converters.label_maps` (``min_extent_mm``, default 3 mm, in nnDetection's convention:
padded box sides ``(n + 1) x spacing`` longer than 3 mm along the two in-plane axes), as nnDetection's
preparation of this task (``min_size`` 3 mm). The pancreas (label 1) is
background. One class: ``tumour``.

Example:
    >>> MSDPancreasConverter().convert("raw/msd_pancreas", "converted/msd_pancreas")  # doctest: +SKIP
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
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
from pretrain_det3d.settings.converters import MSDPancreasConvertSettings

TASK_FOLDER = "Task07_Pancreas"
MSD_DATASET_JSON = "dataset.json"
PANCREAS_LABEL, TUMOUR_LABEL = 1, 2
DEFAULT_MIN_EXTENT_MM = MSDPancreasConvertSettings.default("min_extent_mm")
NIFTI_SUFFIX = ".nii.gz"


@CONVERTERS.register("msd_pancreas")
class MSDPancreasConverter(DatasetConverter):
    """Settings: ``min_extent_mm`` (default 3.0) and ``connectivity`` (6 | 18 | 26, default 26)."""

    dataset_name = "msd_pancreas"
    modalities = ("CT",)
    class_names = ("tumour",)
    licence = "CC-BY-SA-4.0 (Medical Segmentation Decathlon)"
    source = "http://medicaldecathlon.com"

    def __init__(self, settings: dict[str, Any] | None = None) -> None:
        super().__init__(settings)
        self.min_extent_mm = float(self.settings.get("min_extent_mm", DEFAULT_MIN_EXTENT_MM))
        self.connectivity = int(self.settings.get("connectivity", DEFAULT_CONNECTIVITY))
        structure_for(self.connectivity)  # validates
        self._dropped: dict[str, list] = {}
        self._label_names: dict[str, str] = {}

    def _task_dir(self, source_dir: Path) -> Path:
        """The folder holding the MSD ``dataset.json`` (first of: root, ``Task07_Pancreas/``, ``*/Task07_Pancreas/``)."""
        candidates = [source_dir, source_dir / TASK_FOLDER, *sorted(source_dir.glob(f"*/{TASK_FOLDER}"))]
        for folder in candidates:
            if (folder / MSD_DATASET_JSON).is_file():
                return folder
        raise ConversionError.for_file(source_dir / TASK_FOLDER / MSD_DATASET_JSON,
                                       f"MSD dataset.json not found (looked in the source root, {TASK_FOLDER}/ and "
                                       f"*/{TASK_FOLDER}/)")

    def _pairs(self, source_dir: Path) -> dict[str, tuple[Path, Path]]:
        """Case id -> (image, label) paths from the MSD ``dataset.json``'s ``training`` list."""
        if getattr(self, "_pair_cache", (None, None))[0] == source_dir:
            return self._pair_cache[1]
        task_dir = self._task_dir(source_dir)
        meta_path = task_dir / MSD_DATASET_JSON
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ConversionError.for_file(meta_path, f"is not valid JSON ({error})") from None
        if not isinstance(meta, dict) or not isinstance(meta.get("training"), list) or not isinstance(meta.get("labels"), dict):
            raise ConversionError.for_file(meta_path, 'expected an MSD dataset.json with "labels" and "training"')
        if str(TUMOUR_LABEL) not in meta["labels"]:
            raise ConversionError.for_file(meta_path, f'"labels" has no label {TUMOUR_LABEL} (the tumour of Task07), '
                                                      f'got {meta["labels"]}')
        modality = meta.get("modality", {}).get("0", "CT")
        if str(modality).upper() != "CT":
            raise ConversionError.for_file(meta_path, f'modality "0" is {modality!r}; Task07 Pancreas is CT')
        self._label_names = {str(k): str(v) for k, v in meta["labels"].items()}
        pairs: dict[str, tuple[Path, Path]] = {}
        for index, entry in enumerate(meta["training"]):
            if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
                raise ConversionError.for_file(meta_path, f'"training"[{index}] must hold "image" and "label"')
            image_path = task_dir / PurePosixPath(entry["image"])
            label_path = task_dir / PurePosixPath(entry["label"])
            if not image_path.name.endswith(NIFTI_SUFFIX):
                raise ConversionError.for_file(meta_path, f'"training"[{index}].image is not a .nii.gz file: {entry["image"]}')
            case_id = image_path.name[: -len(NIFTI_SUFFIX)]
            if case_id in pairs:
                raise ConversionError.for_file(meta_path, f"case {case_id} is listed twice in \"training\"")
            for path in (image_path, label_path):
                if not path.is_file():
                    raise ConversionError.for_file(path, f"listed in {meta_path} but missing")
            pairs[case_id] = (image_path, label_path)
        self._pair_cache = (source_dir, pairs)
        return pairs

    def list_cases(self, source_dir: Path) -> list[str]:
        return sorted(self._pairs(source_dir))

    def load_case(self, source_dir: Path, case_id: str) -> ConvertedCase:
        image_path, label_path = self._pairs(source_dir)[case_id]
        image = read_nifti(image_path)
        label = read_nifti(label_path)
        check_same_grid(image, image_path, label, label_path)
        semantic = integer_labels(label, label_path)
        unknown = sorted(set(int(v) for v in np.unique(semantic)) - {0, PANCREAS_LABEL, TUMOUR_LABEL})
        if unknown:
            raise ConversionError.for_file(label_path, f"unknown label values {unknown}; Task07 uses 0, 1, 2")
        spacing_zyx = tuple(float(s) for s in reversed(image.GetSpacing()))
        instance_map, instances, dropped = connected_instances(
            semantic, {TUMOUR_LABEL: 0}, spacing_zyx, self.min_extent_mm, self.connectivity)
        if dropped:
            self._dropped[case_id] = dropped
        return case_from_sitk(case_id, [image], instance_map, instances)

    def dataset_extra(self) -> dict[str, Any]:
        return {"conversion": {
            "converter": "msd_pancreas",
            "source_labels": self._label_names,
            "labels_to_classes": {str(TUMOUR_LABEL): "tumour"},
            "connectivity": self.connectivity,
            "min_extent_mm": self.min_extent_mm,
            "rule": "cases from dataset.json 'training'; instances = connected components of label 2; a component "
                    "is kept when its padded box sides (n+1) x spacing exceed min_extent_mm off the slice axis "
                    "(nnDetection's seg2det convention); image geometry kept",
            "dropped_components": self._dropped,
        }}
