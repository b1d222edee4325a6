"""CTA-A (intracranial aneurysms in CT angiography; Zenodo record 6801398): NIfTI volumes with aneurysm masks.

The record is the "Large IA Segmentation dataset" of GLIA-Net (Bo et al., Patterns 2021, doi:10.1016/j.patter.
2020.100197): a restricted record (access is granted on request on Zenodo) for non-commercial research. Layout,
as its users report it and as nnDetection's preparation of it (``Task059_AneurysmCTA``) reads it::

    imagesTr/Tr0001.nii.gz ...           1,186 training CTAs
    labelsTr/Tr0001.nii.gz ...           aneurysm masks, same file names
    imagesTs_internal/, labelsTs_internal/    152 internal test cases
    imagesTs_external/, labelsTs_external/    138 external test cases (ExtA..., ExtB... from two other hospitals)
    internal_instances.csv               per case: instance_id (the case name), subset, institution_id, age,
                                         gender, is_ruptured, num_IAs (aneurysm count)
    external_instances.csv               the same for the external cases (optional here)

The source root may be that folder or a folder holding it one level down (an unpacked archive). Setting
``subsets`` picks the folders: ``train`` becomes the training cases (``imagesTr``), ``internal_test`` and
``external_test`` become held-out test cases (``imagesTs``/``labelsTs`` of the converted dataset), never
cross-validated on. Case ids are the file names without ``.nii.gz``; they must not repeat across subsets.

Instances (setting ``instances``): ``components`` (default) makes each connected component of the voxels
``> 0`` one aneurysm, with 6-connectivity as nnDetection's preparation (``connectivity``); ``values`` makes
each distinct positive label value one aneurysm. Every instance has class ``aneurysm``. Where the CSV's
``num_IAs`` differs from the number of instances, the case is listed under ``count_mismatch`` in
``dataset.json`` (nnDetection re-splits or trims such masks to the CSV count; this converter keeps the
components as they are).

A case whose mask does not share its image's grid (the record holds one whose mask has a different shape), or
whose mask is missing, is skipped and listed with the reason in ``conversion_report.json`` (and
``dataset.json``'s ``skipped_cases``); ``strict: true`` stops the conversion there instead. The geometry of
the NIfTI volume is kept.

Example:
    >>> CTAAConverter({"subsets": ["train"]}).convert("raw/cta_a", "converted/cta_a")  # doctest: +SKIP
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from pretrain_det3d.data.converters.base import (
    CONVERTERS, CaseSkipped, ConvertedCase, ConversionError, DatasetConverter, case_from_sitk,
)
from pretrain_det3d.data.converters.label_maps import check_same_grid, instance_dtype, integer_labels, read_nifti, structure_for
from pretrain_det3d.settings.converters import CTAAConvertSettings

DEFAULTS = {key: CTAAConvertSettings.default(key) for key in CTAAConvertSettings.keys()}
INSTANCE_RULES = ("components", "values")
NIFTI_SUFFIX = ".nii.gz"
#: subset -> (image folder, label folder, case table) of the record
SUBSET_FOLDERS: dict[str, tuple[str, str, str]] = {
    "train": ("imagesTr", "labelsTr", "internal_instances.csv"),
    "internal_test": ("imagesTs_internal", "labelsTs_internal", "internal_instances.csv"),
    "external_test": ("imagesTs_external", "labelsTs_external", "external_instances.csv"),
}
CASE_COLUMN, COUNT_COLUMN = "instance_id", "num_IAs"


def mask_to_instances(mask: np.ndarray, rule: str, connectivity: int = 6) -> np.ndarray:
    """Instance map ``[Z, Y, X]`` (1..N) from an aneurysm mask, by connected components or by label values.

    Example:
        >>> m = np.zeros((1, 2, 5), np.uint8); m[0, 0, [0, 1, 3]] = 1; m[0, 1, 4] = 1
        >>> mask_to_instances(m, "components")[0].tolist()  # (0, 3) and (1, 4) touch at a corner only
        [[1, 1, 0, 2, 0], [0, 0, 0, 0, 3]]
    """
    if rule == "components":
        labels, count = ndimage.label(mask > 0, structure=structure_for(connectivity))
        return labels.astype(instance_dtype(count))
    if rule == "values":
        values = np.unique(mask[mask > 0])
        instance_map = np.zeros(mask.shape, dtype=instance_dtype(len(values)))
        for instance_id, value in enumerate(values, start=1):
            instance_map[mask == value] = instance_id
        return instance_map
    raise ValueError(f"convert.instances must be one of {INSTANCE_RULES}, got {rule!r}")


def read_case_table(path: Path) -> dict[str, dict[str, str]]:
    """Rows of ``internal_instances.csv`` / ``external_instances.csv`` keyed by case name (empty if absent).

    Example:
        >>> read_case_table(Path("raw/cta_a/internal_instances.csv"))["Tr0001"]["num_IAs"]  # doctest: +SKIP
        '1'
    """
    if not path.is_file():
        return {}
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or CASE_COLUMN not in reader.fieldnames:
            raise ConversionError.for_file(path, f"no {CASE_COLUMN!r} column (columns: {reader.fieldnames})")
        return {row[CASE_COLUMN].strip(): row for row in reader}


@CONVERTERS.register("cta_a")
class CTAAConverter(DatasetConverter):
    """Settings: ``subsets``, ``instances``, ``connectivity``, ``strict`` (see the module docstring)."""

    dataset_name = "cta_a"
    modalities = ("CT",)
    class_names = ("aneurysm",)
    licence = "non-commercial research use; restricted Zenodo record 6801398 (access on request)"
    source = "https://doi.org/10.5281/zenodo.6801398"

    def __init__(self, settings: dict[str, Any] | None = None) -> None:
        super().__init__(settings)
        self.option = {key: self.settings.get(key, default) for key, default in DEFAULTS.items()}
        self.subsets = tuple(dict.fromkeys(self.option["subsets"]))
        structure_for(int(self.option["connectivity"]))  # validates
        self._root: Path | None = None
        self._where: dict[str, str] = {}  # case -> subset
        self._tables: dict[str, dict[str, dict[str, str]]] = {}
        self._mismatch: dict[str, dict[str, int]] = {}

    def _record_root(self, source_dir: Path) -> Path:
        """The folder holding the record's folders: the source root or one level below it."""
        if self._root is None:
            first = SUBSET_FOLDERS[self.subsets[0]][0]
            candidates = [source_dir, *sorted(p for p in source_dir.iterdir() if p.is_dir())]
            found = [c for c in candidates if (c / first).is_dir()]
            if not found:
                raise ConversionError.for_file(
                    source_dir / first, "folder is missing; CTA-A (Zenodo 6801398) holds imagesTr/, labelsTr/, "
                    "imagesTs_internal/, labelsTs_internal/, imagesTs_external/, labelsTs_external/")
            self._root = found[0]
        return self._root

    def _subset_cases(self, source_dir: Path, subset: str) -> list[str]:
        root = self._record_root(source_dir)
        images = root / SUBSET_FOLDERS[subset][0]
        if not images.is_dir():
            raise ConversionError.for_file(images, f"folder of subset {subset!r} is missing (see convert.subsets)")
        cases = sorted(p.name[: -len(NIFTI_SUFFIX)] for p in images.iterdir()
                       if p.name.endswith(NIFTI_SUFFIX) and not p.name.startswith("."))
        for case in cases:
            if case in self._where and self._where[case] != subset:
                raise ConversionError.for_file(images / f"{case}{NIFTI_SUFFIX}",
                                               f"case name also used in subset {self._where[case]!r}")
            self._where[case] = subset
        return cases

    def list_cases(self, source_dir: Path) -> list[str]:
        return self._subset_cases(source_dir, "train") if "train" in self.subsets else []

    def list_test_cases(self, source_dir: Path) -> list[str]:
        return sorted(case for subset in self.subsets if subset != "train"
                      for case in self._subset_cases(source_dir, subset))

    def _skip_or_fail(self, error: ConversionError) -> CaseSkipped:
        if self.option["strict"]:
            raise error
        return CaseSkipped(str(error))

    def _expected_count(self, root: Path, subset: str, case_id: str) -> int | None:
        table_name = SUBSET_FOLDERS[subset][2]
        if table_name not in self._tables:
            self._tables[table_name] = read_case_table(root / table_name)
        row = self._tables[table_name].get(case_id)
        if row is None or not str(row.get(COUNT_COLUMN, "")).strip().isdigit():
            return None
        return int(row[COUNT_COLUMN])

    def load_case(self, source_dir: Path, case_id: str) -> ConvertedCase:
        root = self._record_root(source_dir)
        subset = self._where[case_id]
        images_dir, labels_dir, _ = SUBSET_FOLDERS[subset]
        image_file = root / images_dir / f"{case_id}{NIFTI_SUFFIX}"
        label_file = root / labels_dir / f"{case_id}{NIFTI_SUFFIX}"
        if not label_file.is_file():
            raise self._skip_or_fail(ConversionError.for_file(label_file, f"mask of case {case_id!r} is missing"))
        image, mask = read_nifti(image_file), read_nifti(label_file)  # checked reads: truncation is an error
        try:
            check_same_grid(image, image_file, mask, label_file)
        except ConversionError as error:
            raise self._skip_or_fail(error) from None
        values = integer_labels(mask, label_file)
        instance_map = mask_to_instances(values, str(self.option["instances"]), int(self.option["connectivity"]))
        count = int(instance_map.max())
        expected = self._expected_count(root, subset, case_id)
        if expected is not None and expected != count:
            self._mismatch[case_id] = {"num_IAs": expected, "instances": count}
        return case_from_sitk(case_id, [image], instance_map, {i: 0 for i in range(1, count + 1)})

    def dataset_extra(self) -> dict[str, Any]:
        return {"conversion": {
            "converter": "cta_a",
            "subsets": list(self.subsets),
            "instances": self.option["instances"],
            "connectivity": int(self.option["connectivity"]),
            "test_subsets": {case: subset for case, subset in sorted(self._where.items()) if subset != "train"},
            "count_mismatch": self._mismatch,
        }}
