"""KiTS21 (kidney tumours in contrast CT): tumour and cyst instances from the per-instance annotation files.

Source layout (the ``neheller/kits21`` git repository after ``kits21/starter_code/get_imaging.py`` fetched the
CT volumes; the segmentations are in the repository itself)::

    kits21/data/case_00000/imaging.nii.gz                CT (HU)
    kits21/data/case_00000/segmentations/tumor_instance-1_annotation-1.nii.gz   one file per instance and
    kits21/data/case_00000/segmentations/cyst_instance-2_annotation-3.nii.gz    annotator: binary mask
    kits21/data/case_00000/segmentations/kidney_instance-1_annotation-1.nii.gz  (kidneys: not lesions, ignored)
    kits21/data/case_00000/aggregated_MAJ_seg.nii.gz     0 background, 1 kidney, 2 tumour, 3 cyst (+ AND, OR)
    kits21/data/kits.json

The source root may be the repository root, its inner ``kits21/`` package folder, the ``data/`` folder, or a
folder holding an unpacked repository archive (``*/kits21/data``, e.g. ``kits21/kits21-master/kits21/data``).
The workflow's own download stores the CT volumes under the publisher's names ``master_00000.nii.gz`` ...
(``get_imaging.py``'s ``https://kits19.sfo2.digitaloceanspaces.com/master_{id:05d}.nii.gz``) in the source root
instead of ``case_*/imaging.nii.gz``; both places are looked at, the case folder first.

Instances (setting ``instances``):

- ``annotations`` (default), as nnDetection's KiTS21 preparation (``Task035_KiTS21``): every annotated tumour
  ``k`` is one instance made of the voxels that at least ``min_annotators`` (2) of its annotators marked in
  their ``tumor_instance-k_annotation-a`` files (KiTS21 has 3 annotators per instance); then every cyst the same
  way. Tumours are class ``tumour`` (0), cysts class ``cyst`` (1); ``include_cysts: false`` leaves cysts out
  (background). Where two voted instances overlap, the later one (cysts after tumours, higher ``k`` after lower)
  takes the voxels, as in nnDetection; an instance left with no voxel (none reached the vote, or all were taken
  by a later one) is dropped and listed in ``dataset.json``. No size filter by default (nnDetection has none
  for KiTS21); instances are numbered in that order, 1..N, with no gaps.
- ``aggregated``: connected components (``connectivity``, default 26) of the tumour label 2 (and cyst label 3
  with ``include_cysts``) of one aggregated map (``segmentation``, default ``aggregated_MAJ_seg.nii.gz``). Two
  touching tumours become one instance here, and one tumour whose voted voxels fall apart becomes several.

Both apply the size filter of :mod:`~pretrain_det3d.data.converters.label_maps` (nnDetection's convention,
``min_extent_mm``, default 0 = none). Every annotation file must share the image's voxel grid.

Example:
    >>> KiTS21Converter().convert("raw/kits21", "converted/kits21")  # doctest: +SKIP
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from pretrain_det3d.data.converters.base import CONVERTERS, ConvertedCase, ConversionError, DatasetConverter, case_from_sitk
from pretrain_det3d.data.converters.label_maps import (
    check_same_grid,
    connected_instances,
    instance_dtype,
    integer_labels,
    large_enough,
    padded_sides_mm,
    read_nifti,
    structure_for,
)
from pretrain_det3d.settings.converters import KiTS21ConvertSettings

CASE_NAME = re.compile(r"^case_\d{5}$")
IMAGE_FILE = "imaging.nii.gz"
SEGMENTATIONS_DIR = "segmentations"
#: one annotator's mask of one instance: ``{kind}_instance-{k}_annotation-{a}.nii.gz``
ANNOTATION_FILE = re.compile(r"^(?P<kind>[a-z]+)_instance-(?P<instance>\d+)_annotation-(?P<annotator>\d+)\.nii\.gz$")
#: the publisher's name of a case's CT volume on its download server (get_imaging.py)
DOWNLOADED_IMAGE_NAME = "master_{number}.nii.gz"
SEGMENTATION_FILES = ("aggregated_MAJ_seg.nii.gz", "aggregated_AND_seg.nii.gz", "aggregated_OR_seg.nii.gz")
#: KiTS21 label values (kits21/configuration/labels.py)
KIDNEY_LABEL, TUMOUR_LABEL, CYST_LABEL = 1, 2, 3
#: annotation-file kind -> (aggregated label value, class name); the order is nnDetection's painting order
LESION_KINDS = {"tumor": (TUMOUR_LABEL, "tumour"), "cyst": (CYST_LABEL, "cyst")}
KNOWN_KINDS = ("kidney", "tumor", "cyst")
DEFAULTS = {key: KiTS21ConvertSettings.default(key) for key in KiTS21ConvertSettings.keys()}
#: candidate data folders relative to the source root, first match wins
DATA_DIR_CANDIDATES = (".", "data", "kits21/data", "*/kits21/data", "*/*/kits21/data")


def annotation_files(segmentations_dir: Path) -> dict[str, dict[int, dict[int, Path]]]:
    """The per-instance annotation files of one case: kind -> instance number -> annotator number -> path.

    Example:
        >>> annotation_files(Path("kits21/data/case_00000/segmentations"))["tumor"][1]  # doctest: +SKIP
        {1: PosixPath('.../tumor_instance-1_annotation-1.nii.gz'), 2: ..., 3: ...}
    """
    found: dict[str, dict[int, dict[int, Path]]] = defaultdict(lambda: defaultdict(dict))
    for path in sorted(segmentations_dir.iterdir()):
        match = ANNOTATION_FILE.match(path.name)
        if match is None:
            continue
        if match["kind"] not in KNOWN_KINDS:
            raise ConversionError.for_file(path, f"unknown structure {match['kind']!r}; KiTS21 annotates {KNOWN_KINDS}")
        found[match["kind"]][int(match["instance"])][int(match["annotator"])] = path
    return found


def binary_mask(path: Path, image: Any, image_path: Path) -> np.ndarray:
    """One annotator's mask of one instance as a bool array, after checking grid and values."""
    label = read_nifti(path)
    check_same_grid(image, image_path, label, path)
    values = integer_labels(label, path)
    unexpected = sorted(set(np.unique(values).tolist()) - {0, 1})
    if unexpected:
        raise ConversionError.for_file(path, f"annotation mask holds values {unexpected}; expected 0 and 1")
    return values.astype(bool)


@CONVERTERS.register("kits21")
class KiTS21Converter(DatasetConverter):
    """Settings: ``instances`` (annotations | aggregated), ``min_annotators`` (2), ``include_cysts`` (true),
    ``segmentation`` (aggregated map, default MAJ), ``min_extent_mm`` (0), ``connectivity`` (26); module doc."""

    dataset_name = "kits21"
    modalities = ("CT",)
    class_names = ("tumour", "cyst")
    licence = "CC-BY-NC-SA-4.0 (KiTS21 imaging and segmentations)"
    source = "https://github.com/neheller/kits21"

    def __init__(self, settings: dict[str, Any] | None = None) -> None:
        super().__init__(settings)
        option = {key: self.settings.get(key, default) for key, default in DEFAULTS.items()}
        self.instance_rule = str(option["instances"])
        self.min_annotators = int(option["min_annotators"])
        self.segmentation_file = str(option["segmentation"])
        self.include_cysts = bool(option["include_cysts"])
        self.min_extent_mm = float(option["min_extent_mm"])
        self.connectivity = int(option["connectivity"])
        structure_for(self.connectivity)  # validates
        self.kinds = ("tumor", "cyst") if self.include_cysts else ("tumor",)
        self.class_names = tuple(LESION_KINDS[kind][1] for kind in self.kinds)
        self.classes_of_labels = {LESION_KINDS[kind][0]: index for index, kind in enumerate(self.kinds)}
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

    def _labels_of(self, case_dir: Path) -> Path:
        """What a case must carry to be converted: its segmentations folder or its aggregated map."""
        return case_dir / (SEGMENTATIONS_DIR if self.instance_rule == "annotations" else self.segmentation_file)

    def list_cases(self, source_dir: Path) -> list[str]:
        data_dir = self._data_dir(source_dir)
        cases = sorted(p.name for p in data_dir.iterdir() if p.is_dir() and CASE_NAME.match(p.name))
        # only cases that carry the labels the chosen rule reads are training cases
        return [case for case in cases if self._labels_of(data_dir / case).exists()]

    def _image_path(self, source_dir: Path, case_id: str) -> Path:
        image_path = self._data_dir(source_dir) / case_id / IMAGE_FILE
        downloaded = source_dir / DOWNLOADED_IMAGE_NAME.format(number=case_id.split("_")[1])
        if not image_path.is_file() and downloaded.is_file():
            return downloaded
        if not image_path.is_file():
            raise ConversionError.for_file(image_path, f"CT volume is missing (nor is it at {downloaded}); KiTS21 keeps "
                                                       "the imaging outside git: run kits21/starter_code/get_imaging.py")
        return image_path

    def load_case(self, source_dir: Path, case_id: str) -> ConvertedCase:
        image_path = self._image_path(source_dir, case_id)
        image = read_nifti(image_path)
        spacing_zyx = tuple(float(s) for s in reversed(image.GetSpacing()))
        case_dir = self._data_dir(source_dir) / case_id
        if self.instance_rule == "annotations":
            instance_map, instances, dropped = self._voted_instances(case_dir, image, image_path, spacing_zyx)
        else:
            seg_path = case_dir / self.segmentation_file
            seg = read_nifti(seg_path)
            check_same_grid(image, image_path, seg, seg_path)
            semantic = integer_labels(seg, seg_path)
            unknown = sorted(set(int(v) for v in np.unique(semantic)) - {0, KIDNEY_LABEL, TUMOUR_LABEL, CYST_LABEL})
            if unknown:
                raise ConversionError.for_file(seg_path, f"unknown label values {unknown}; KiTS21 uses 0-3")
            instance_map, instances, dropped = connected_instances(
                semantic, self.classes_of_labels, spacing_zyx, self.min_extent_mm, self.connectivity)
        if dropped:
            self._dropped[case_id] = dropped
        return case_from_sitk(case_id, [image], instance_map, instances)

    def _voted_instances(self, case_dir: Path, image: Any, image_path: Path, spacing_zyx: tuple[float, ...]
                         ) -> tuple[np.ndarray, dict[int, int], list[dict[str, Any]]]:
        """Vote every tumour (then cyst) instance from its annotators' files and paint them in that order."""
        files = annotation_files(case_dir / SEGMENTATIONS_DIR)
        shape = tuple(reversed(image.GetSize()))
        painted = np.zeros(shape, dtype=np.int32)  # provisional ids: position in `order`, 1-based
        order: list[tuple[str, int]] = []
        dropped: list[dict[str, Any]] = []
        for kind in self.kinds:
            for number, annotators in sorted(files.get(kind, {}).items()):
                votes = np.zeros(shape, dtype=np.uint8)
                for path in annotators.values():
                    votes += binary_mask(path, image, image_path)
                voted = votes >= self.min_annotators
                record = {"structure": kind, "instance": number, "annotators": sorted(annotators)}
                if not voted.any():
                    dropped.append({**record, "reason": f"no voxel marked by >= {self.min_annotators} annotators"})
                    continue
                box = ndimage.find_objects(voted.astype(np.uint8))[0]
                spanned = [s.stop - s.start for s in box]
                if not large_enough(spanned, spacing_zyx, self.min_extent_mm):
                    dropped.append({**record, "reason": "size filter", "box": [s.start for s in box] + [s.stop for s in box],
                                    "sides_mm": [round(v, 4) for v in padded_sides_mm(spanned, spacing_zyx)]})
                    continue
                order.append((kind, number))
                painted[voted] = len(order)  # a later instance takes overlapping voxels (nnDetection's order)
        present = set(np.unique(painted).tolist()) - {0}
        kept = [index for index in range(1, len(order) + 1) if index in present]
        for index in range(1, len(order) + 1):
            if index not in present:
                kind, number = order[index - 1]
                dropped.append({"structure": kind, "instance": number, "reason": "all voxels taken by later instances"})
        lookup = np.zeros(len(order) + 1, dtype=np.int64)
        lookup[kept] = np.arange(1, len(kept) + 1)
        instance_map = lookup[painted].astype(instance_dtype(len(kept)))
        instances = {new: self.kinds.index(order[old - 1][0]) for new, old in enumerate(kept, start=1)}
        return instance_map, instances, dropped

    def dataset_extra(self) -> dict[str, Any]:
        rule = {
            "annotations": f"one instance per annotated tumour/cyst: voxels marked by >= {self.min_annotators} of its "
                           "annotators (segmentations/*_instance-k_annotation-a); later instances take overlapping "
                           "voxels; nnDetection's KiTS21 preparation",
            "aggregated": f"connected components ({self.connectivity}-connectivity) of the listed labels of "
                          f"{self.segmentation_file}",
        }[self.instance_rule]
        return {"conversion": {
            "converter": "kits21",
            "instances": self.instance_rule,
            **({"min_annotators": self.min_annotators} if self.instance_rule == "annotations" else
               {"segmentation": self.segmentation_file, "connectivity": self.connectivity,
                "labels_to_classes": {str(k): self.class_names[v] for k, v in self.classes_of_labels.items()}}),
            "classes": list(self.class_names),
            "min_extent_mm": self.min_extent_mm,
            "rule": rule + "; size filter: padded box sides (n+1) x spacing > min_extent_mm off the slice axis "
                           "(nnDetection); image geometry kept",
            "dropped": self._dropped,
        }}
