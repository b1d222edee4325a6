"""The base class every dataset converter derives from, and the registry that names them.

A converter turns one dataset's own on-disk format (DICOM series, MetaImage files, CSV/XML/XLSX annotations)
into the converted format of ``docs/contracts.md`` (nnDetection's raw layout). A subclass says which cases the
source holds (:meth:`DatasetConverter.list_cases`) and how to load one (:meth:`DatasetConverter.load_case`);
the base class writes them all into a hidden folder that replaces ``out_dir`` only when every case was written,
so a half-finished conversion never counts as done. A dataset with a published test set also lists its held-out
test cases (:meth:`DatasetConverter.list_test_cases`; written to ``imagesTs``/``labelsTs``). A case that
:meth:`DatasetConverter.load_case` rejects with :class:`CaseSkipped` is left out and listed, with its reason, in
``conversion_report.json`` and in ``dataset.json``'s ``skipped_cases``.

Images keep the source's geometry (no resampling, no reorientation): the instance map shares the image's grid,
so boxes are in voxels of the converted image, array axes (z, y, x).

Example:
    >>> @CONVERTERS.register("my_dataset")  # doctest: +SKIP
    ... class MyConverter(DatasetConverter):
    ...     dataset_name, modalities, class_names = "my_dataset", ("CT",), ("lesion",)
    ...     licence, source = "CC-BY-4.0", "https://example.org"
    ...     def list_cases(self, source_dir): ...
    ...     def load_case(self, source_dir, case_id): ...
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from pretrain_det3d.data.io import ConvertedCase, write_case, write_dataset_json
from pretrain_det3d.settings.base import ConfigError
from pretrain_det3d.settings.converters import CONVERTER_SETTINGS
from pretrain_det3d.utils.atomic import atomic_directory, write_json
from pretrain_det3d.utils.registry import Registry


class ConversionError(ValueError):
    """A source file is missing or does not follow the dataset's format; the message starts with its path."""

    @classmethod
    def for_file(cls, path: str | os.PathLike, problem: str) -> "ConversionError":
        return cls(f"{os.fspath(path)}: {problem}")


class CaseSkipped(Exception):
    """Raised by :meth:`DatasetConverter.load_case` for a case that is left out of the conversion (the message
    is the reason, starting with the offending file); the conversion goes on with the other cases."""


#: file beside ``dataset.json`` that lists the cases a conversion left out, with reasons
CONVERSION_REPORT = "conversion_report.json"


def case_from_sitk(case_id: str, images: Sequence[sitk.Image], instance_map: np.ndarray,
                   instances: Mapping[int, int]) -> ConvertedCase:
    """Build a :class:`ConvertedCase` from SimpleITK images that share one grid (the first one's geometry)."""
    reference = images[0]
    arrays = [sitk.GetArrayFromImage(image) for image in images]  # each [Z, Y, X]
    for index, array in enumerate(arrays):
        if array.shape != instance_map.shape:
            raise ValueError(f"case {case_id}: channel {index} has shape {array.shape}, the labels {instance_map.shape}")
    return ConvertedCase(
        case_id=case_id,
        image=np.stack(arrays),  # [C, Z, Y, X]
        instance_map=instance_map,
        instances=dict(instances),
        spacing=tuple(float(s) for s in reversed(reference.GetSpacing())),  # x,y,z -> z,y,x
        origin=tuple(float(o) for o in reference.GetOrigin()),
        direction=tuple(float(d) for d in reference.GetDirection()),
    )


class DatasetConverter(ABC):
    """Converts one dataset; subclasses set the class attributes and implement two methods.

    ``settings`` are the dataset's ``convert:`` options from the config (each converter documents its own
    keys and defaults).
    """

    dataset_name: str = ""
    modalities: tuple[str, ...] = ("CT",)
    class_names: tuple[str, ...] = ("lesion",)
    licence: str = ""
    source: str = ""

    def __init__(self, settings: Mapping[str, Any] | None = None) -> None:
        settings_class = CONVERTER_SETTINGS.get(self.dataset_name)
        if settings_class is not None:  # the one definition of the options: unknown keys and wrong types fail
            try:
                settings = settings_class.parse(settings, where=f"convert ({self.dataset_name})") \
                    .model_dump(exclude_unset=True)
            except ConfigError as error:
                raise ConversionError(str(error)) from None
        self.settings = dict(settings or {})

    @abstractmethod
    def list_cases(self, source_dir: Path) -> list[str]:
        """Ids of the cases to convert, sorted."""

    @abstractmethod
    def load_case(self, source_dir: Path, case_id: str) -> ConvertedCase:
        """Read one case and build its instance map from the dataset's annotations (training and test cases
        alike); raise :class:`CaseSkipped` to leave it out with a reason."""

    def list_test_cases(self, source_dir: Path) -> list[str]:
        """Ids of the held-out test cases (``imagesTs``), sorted; none unless the dataset publishes a test set
        with labels. They must not share an id with a training case."""
        return []

    def dataset_extra(self) -> dict[str, Any]:
        """Extra keys for ``dataset.json`` (e.g. the conversion rules that were applied)."""
        return {}

    def write_extra_files(self, source_dir: Path, root: Path) -> None:
        """Write further files into the dataset folder ``root`` while it is being written, after its cases (e.g.
        LUNA16's reference tables for its own score); nothing by default."""

    def convert(self, source_dir: str | os.PathLike, out_dir: str | os.PathLike, show_progress: bool = True) -> Path:
        """Write the whole converted dataset to ``out_dir`` atomically and return it."""
        source_dir = Path(source_dir)
        if not source_dir.is_dir():
            raise ConversionError.for_file(source_dir, "source folder does not exist")
        case_ids = self.list_cases(source_dir)
        test_ids = self.list_test_cases(source_dir)
        if not case_ids:
            raise ConversionError.for_file(source_dir, f"no {self.dataset_name} cases found")
        shared = sorted(set(case_ids) & set(test_ids))
        if shared:
            raise ConversionError.for_file(source_dir, f"case ids both in training and test cases: {shared[:5]}")
        skipped: dict[str, str] = {}
        written = 0
        with atomic_directory(out_dir) as tmp:
            todo = [(case_id, False) for case_id in case_ids] + [(case_id, True) for case_id in test_ids]
            for case_id, test in tqdm(todo, desc=f"convert {self.dataset_name}", unit="case",
                                      disable=not show_progress):
                try:
                    case = self.load_case(source_dir, case_id)
                except CaseSkipped as reason:
                    skipped[case_id] = str(reason)
                    continue
                write_case(tmp, case.case_id, case.image, case.instance_map, case.instances,
                           case.spacing, case.origin, case.direction, test=test)
                written += not test
            if not written:
                raise ConversionError.for_file(source_dir, f"every {self.dataset_name} training case was skipped: "
                                                           f"{skipped}")
            self.write_extra_files(source_dir, Path(tmp))
            extra = self.dataset_extra()
            if skipped:
                extra["skipped_cases"] = skipped
                write_json(Path(tmp) / CONVERSION_REPORT, {"dataset": self.dataset_name, "skipped_cases": skipped})
            write_dataset_json(tmp, self.dataset_name, self.modalities, self.class_names, self.licence,
                               self.source, written, **extra)
        return Path(out_dir)


#: converter name (the dataset's config ``converter:`` value) -> DatasetConverter subclass
CONVERTERS: Registry[type[DatasetConverter]] = Registry("dataset converter")
