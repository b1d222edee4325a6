"""Your own data as an nnU-Net v2 dataset, imported for detection with config alone.

Source layout (nnU-Net v2's ``documentation/dataset_format.md``)::

    Dataset500_MyLesions/
        dataset.json              {"channel_names": {"0": "CT"}, "labels": {"background": 0, "tumour": 1, ...},
                                   "numTraining": N, "file_ending": ".nii.gz"}
        imagesTr/{case}_0000{file_ending}   one file per channel
        labelsTr/{case}{file_ending}        semantic label map (or, with instances: instance_map, an instance map)
        imagesTs/, labelsTs/                optional; test cases with a label in labelsTs become held-out test cases

Instances (``convert.instances``):

- ``components`` (default): the connected components (``connectivity``, default 26) of each label named in
  ``classes`` (default: every label except background, in dataset.json's order of values) are the instances; each
  chosen label is one class, named as in dataset.json. ``min_extent_mm`` applies nnDetection's size filter
  (:mod:`~pretrain_det3d.data.converters.label_maps`); 0 keeps all. This is nnDetection's ``convert_seg2det.py``
  applied to nnU-Net's format.
- ``instance_map``: each non-zero value of a label map is one instance already (ids are renumbered 1..N in
  increasing order), all of one class ``class_name``.

Region-based labels (a label given as a list of values) have no single value to take components of and are
refused, naming the label. ``numTraining`` must equal the training cases found. Images are read with SimpleITK
whatever ``file_ending`` says (``.nii.gz``, ``.nrrd``, ``.mha``); the converted dataset is NIfTI.

Example (config only)::

    datasets:
      my_tumours: {source: my_tumours, converter: nnunetv2_dataset, modality: CT,
                   convert: {classes: [tumour], min_extent_mm: 3.0}}
    sources:
      my_tumours: {title: My tumours, homepage: "https://example.org", licence: CC-BY-4.0, access: open,
                   path: /data/nnUNet_raw/Dataset500_MyTumours, expected: [dataset.json, "imagesTr/*"]}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from pretrain_det3d.data.converters.base import CONVERTERS, ConvertedCase, ConversionError, DatasetConverter, case_from_sitk
from pretrain_det3d.data.converters.label_maps import (
    connected_instances,
    integer_labels,
    relabel,
)
from pretrain_det3d.data.converters.nndetection_task import FolderCasesMixin, folder_cases, read_description

DATASET_JSON = "dataset.json"


def label_values(data: Mapping[str, Any], path: Path) -> dict[str, int | list[int]]:
    """dataset.json's ``labels`` (name -> value, or list of values for a region), checked."""
    labels = data.get("labels")
    if not isinstance(labels, Mapping) or not labels:
        raise ConversionError.for_file(path, "'labels' must map label names to values")
    for name, value in labels.items():
        values = value if isinstance(value, list) else [value]
        if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
            raise ConversionError.for_file(path, f"label {name!r}: value {value!r} is not an integer >= 0")
    return dict(labels)


@CONVERTERS.register("nnunetv2_dataset")
class NNUNetV2DatasetConverter(FolderCasesMixin, DatasetConverter):
    """Settings: ``instances``, ``classes``, ``class_name``, ``connectivity``, ``min_extent_mm``, ``test_cases``,
    ``name``, ``licence`` (``settings.converters.NNUNetV2DatasetConvertSettings``)."""

    dataset_name = "nnunetv2_dataset"

    def _scan(self, source_dir: Path) -> None:
        if hasattr(self, "_cases"):
            return
        path = source_dir / DATASET_JSON
        if not path.is_file():
            raise ConversionError.for_file(path, "missing: not an nnU-Net v2 dataset folder")
        data = read_description(path)
        channels = data.get("channel_names", data.get("modality"))
        if not isinstance(channels, Mapping) or not channels:
            raise ConversionError.for_file(path, "'channel_names' must map channel indices to names")
        try:
            ordered = sorted((int(k), str(v)) for k, v in channels.items())
        except (TypeError, ValueError):
            raise ConversionError.for_file(path, f"'channel_names' keys must be integers, got {list(channels)}") from None
        if [k for k, _ in ordered] != list(range(len(ordered))):
            raise ConversionError.for_file(path, f"'channel_names' keys must be 0..{len(ordered) - 1}")
        self.modalities = tuple(name for _, name in ordered)
        self._suffix = str(data.get("file_ending", ".nii.gz"))
        labels = label_values(data, path)
        if self.settings.get("instances", "components") == "instance_map":
            self.class_names = (self.settings.get("class_name", "lesion"),)
            self._classes_of_values: dict[int, int] = {}
        else:
            by_value = sorted(labels, key=lambda n: min(labels[n]) if isinstance(labels[n], list) else labels[n])
            chosen = list(self.settings.get("classes") or [n for n in by_value if labels[n] != 0])
            unknown = [name for name in chosen if name not in labels]
            if unknown:
                raise ConversionError.for_file(path, f"convert.classes {unknown} are not labels here; labels: "
                                                     f"{sorted(labels)}")
            regions = [name for name in chosen if isinstance(labels[name], list)]
            if regions:
                raise ConversionError.for_file(path, f"labels {regions} are regions (lists of values): choose plain "
                                                     "labels with convert.classes")
            if not chosen:
                raise ConversionError.for_file(path, "no label but background to detect")
            if any(labels[name] == 0 for name in chosen):
                raise ConversionError.for_file(path, "convert.classes names the background label (value 0)")
            self.class_names = tuple(chosen)
            self._classes_of_values = {int(labels[name]): index for index, name in enumerate(chosen)}
        self.output_name = self.settings.get("name") or source_dir.name
        self.licence = self.settings.get("licence", "not stated")
        self.source = str(source_dir)
        self._cases, self._test_ids = folder_cases(source_dir, self._suffix, len(self.modalities),
                                                   bool(self.settings.get("test_cases", False)))
        expected = data.get("numTraining")
        training = len(self._cases) - len(self._test_ids)
        if expected is not None and expected != training:
            raise ConversionError.for_file(path, f"numTraining is {expected} but imagesTr holds {training} cases")
        self._dropped: dict[str, list[dict[str, Any]]] = {}

    def load_case(self, source_dir: Path, case_id: str) -> ConvertedCase:
        self._scan(source_dir)
        files, test = self._cases[case_id]
        label_path = source_dir / ("labelsTs" if test else "labelsTr") / f"{case_id}{self._suffix}"
        images, label = self.read_on_one_grid(files, label_path, "label map", case_id)
        values = integer_labels(label, label_path)
        if values.min(initial=0) < 0:
            raise ConversionError.for_file(label_path, f"negative label value {int(values.min())}")
        if not self._classes_of_values:  # instance maps as they are
            present = [int(i) for i in np.unique(values) if i != 0]
            return case_from_sitk(case_id, images, relabel(values, present), {i: 0 for i in range(1, len(present) + 1)})
        spacing_zyx = tuple(float(s) for s in reversed(images[0].GetSpacing()))
        instance_map, instances, dropped = connected_instances(
            values, self._classes_of_values, spacing_zyx, min_extent_mm=float(self.settings.get("min_extent_mm", 0.0)),
            connectivity=int(self.settings.get("connectivity", 26)))
        if dropped:
            self._dropped[case_id] = dropped
        return case_from_sitk(case_id, images, instance_map, instances)

    def dataset_extra(self) -> dict[str, Any]:
        mode = "instance maps as they are" if not self._classes_of_values else (
            f"connected components ({self.settings.get('connectivity', 26)}-connectivity) of labels "
            f"{dict(zip(self.class_names, self._classes_of_values))}, size filter "
            f"{self.settings.get('min_extent_mm', 0.0)} mm")
        return {"conversion": f"imported from the nnU-Net v2 dataset {self.source}: {mode}",
                "dropped_by_size_filter": self._dropped}
