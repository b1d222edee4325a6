"""Your own detection data, as nnDetection keeps it: a raw task folder, imported with config alone.

Source layout (nnDetection's README, "Adding New Data sets")::

    Task100_MyLesions/
        dataset.json  (or dataset.yaml)    labels {"0": "lesion", ...}, modalities {"0": "CT", ...}, task, name
        raw_splitted/
            imagesTr/{case}_0000.nii.gz    one file per modality (channel)
            labelsTr/{case}.nii.gz         instance map: 0 background, 1..N instances
            labelsTr/{case}.json           {"instances": {"1": 0, "2": 1}}: instance -> class (from 0)
            imagesTs/, labelsTs/           optional: a held-out test set (converted as test cases)

The converted format is nnDetection's raw format, so the import mostly checks and copies: every case must have
every modality and both label files, the images and the instance map one voxel grid, and every instance of the
map a class in its JSON. Instance ids are renumbered 1..N in increasing order where the map skips a number;
instances listed in the JSON but absent from the map are left out and counted in the converted dataset.json
(``instances_without_voxels``). Test cases are converted only where ``labelsTs`` holds their labels.

Example (config only)::

    datasets:
      my_lesions: {source: my_lesions, converter: nndetection_task, modality: CT, convert: {licence: CC-BY-4.0}}
    sources:
      my_lesions: {title: My lesions, homepage: "https://example.org", licence: CC-BY-4.0, access: open,
                   path: /data/Task100_MyLesions, expected: ["dataset.*", "**/imagesTr/*_0000.nii.gz"]}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from pretrain_det3d.data.converters.base import CONVERTERS, ConvertedCase, ConversionError, DatasetConverter, case_from_sitk
from pretrain_det3d.data.converters.label_maps import check_same_grid, integer_labels, read_nifti, relabel

#: the task's description, in the order nnDetection looks for it
DATASET_FILES = ("dataset.json", "dataset.yaml", "dataset.yml")
#: where nnDetection keeps the raw cases below the task folder
RAW_FOLDER = "raw_splitted"
NIFTI_SUFFIX = ".nii.gz"


def read_description(path: Path) -> dict[str, Any]:
    """A dataset description (JSON, or YAML by its suffix) as a mapping; unreadable files raise ConversionError."""
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(path.read_text())
        else:
            data = json.loads(path.read_text())
    except Exception as error:  # json and yaml raise their own kinds; one message either way
        raise ConversionError.for_file(path, f"cannot be read ({type(error).__name__}: {error})") from None
    if not isinstance(data, dict):
        raise ConversionError.for_file(path, "must hold a mapping")
    return data


def indexed_names(data: Mapping[str, Any], key: str, path: Path) -> tuple[str, ...]:
    """``{"0": "CT", "1": "T2"}`` -> ``("CT", "T2")``; keys must be 0..K-1 (nnDetection: classes and modalities
    start at 0).

    Example:
        >>> indexed_names({"labels": {"1": "b", "0": "a"}}, "labels", Path("dataset.json"))
        ('a', 'b')
    """
    value = data.get(key)
    if not isinstance(value, Mapping) or not value:
        raise ConversionError.for_file(path, f"{key!r} must map indices 0..K-1 to names")
    try:
        indexed = {int(k): str(v) for k, v in value.items()}
    except (TypeError, ValueError):
        raise ConversionError.for_file(path, f"{key!r} keys must be integers from 0, got {list(value)}") from None
    if sorted(indexed) != list(range(len(indexed))):
        raise ConversionError.for_file(path, f"{key!r} keys must be 0..{len(indexed) - 1}, got {sorted(indexed)}")
    return tuple(indexed[i] for i in range(len(indexed)))


def channel_files(folder: Path, suffix: str, num_channels: int) -> dict[str, list[Path]]:
    """Case id -> its channel files ``{case}_{XXXX}{suffix}`` in channel order; a case lacking a channel, or with
    one beyond ``num_channels``, raises ConversionError naming the file.

    Example:
        >>> channel_files(Path("Task100/raw_splitted/imagesTr"), ".nii.gz", 1)  # doctest: +SKIP
        {'case_000': [PosixPath('.../case_000_0000.nii.gz')], ...}
    """
    found: dict[str, dict[int, Path]] = {}
    for path in sorted(folder.iterdir()):
        name = path.name
        if not name.endswith(suffix) or name.startswith("."):
            continue
        stem = name[: -len(suffix)]
        case, _, channel = stem.rpartition("_")
        if not case or len(channel) != 4 or not channel.isdigit():
            raise ConversionError.for_file(path, f"not named {{case}}_{{XXXX}}{suffix} (XXXX: the 4-digit channel)")
        if int(channel) >= num_channels:
            raise ConversionError.for_file(path, f"channel {int(channel)}, but the dataset declares {num_channels}")
        found.setdefault(case, {})[int(channel)] = path
    for case, channels in found.items():
        missing = [c for c in range(num_channels) if c not in channels]
        if missing:
            raise ConversionError.for_file(folder, f"case {case!r} lacks channel(s) {missing}")
    return {case: [channels[c] for c in range(num_channels)] for case, channels in sorted(found.items())}


def folder_cases(root: Path, suffix: str, num_channels: int, test_cases: bool
                 ) -> tuple[dict[str, tuple[list[Path], bool]], list[str]]:
    """The cases of an ``imagesTr``/``labelsTr`` (+ ``imagesTs``/``labelsTs``) layout below ``root``: case id ->
    (channel files, whether it is a held-out test case), and the test ids. With ``test_cases`` the test images
    that have a label in ``labelsTs`` are included; a test id that is also a training id, missing test folders or
    no labelled test case raise ConversionError naming the folder.

    Example:
        >>> cases, test_ids = folder_cases(Path("Task100/raw_splitted"), ".nii.gz", 1, False)  # doctest: +SKIP
    """
    if not (root / "imagesTr").is_dir():
        raise ConversionError.for_file(root / "imagesTr", "folder is missing")
    cases = {case: (files, False) for case, files in channel_files(root / "imagesTr", suffix, num_channels).items()}
    test_ids: list[str] = []
    if test_cases:  # the study then scores them as its test set
        if not (root / "imagesTs").is_dir() or not (root / "labelsTs").is_dir():
            raise ConversionError.for_file(root, "convert.test_cases is true but imagesTs/ and labelsTs/ are not "
                                                 "both there")
        for case, files in channel_files(root / "imagesTs", suffix, num_channels).items():
            if (root / "labelsTs" / f"{case}{suffix}").is_file():
                if case in cases:
                    raise ConversionError.for_file(root / "imagesTs", f"case {case!r} is also a training case")
                cases[case] = (files, True)
                test_ids.append(case)
        if not test_ids:
            raise ConversionError.for_file(root / "labelsTs", "convert.test_cases is true but no test case has a "
                                                              "label here")
    return cases, test_ids


class FolderCasesMixin:
    """Case listing, reading and ``convert`` shared by the import converters: ``_scan`` fills ``_cases`` and
    ``_test_ids`` (:func:`folder_cases`) and sets ``output_name``."""

    _cases: dict[str, tuple[list[Path], bool]]
    _test_ids: list[str]

    def _scan(self, source_dir: Path) -> None:
        raise NotImplementedError

    def list_cases(self, source_dir: Path) -> list[str]:
        self._scan(source_dir)
        return sorted(case for case, (_, test) in self._cases.items() if not test)

    def list_test_cases(self, source_dir: Path) -> list[str]:
        self._scan(source_dir)
        return sorted(self._test_ids)

    def convert(self, source_dir, out_dir, show_progress: bool = True) -> Path:
        if not Path(source_dir).is_dir():  # the base class names the missing folder
            return super().convert(source_dir, out_dir, show_progress)
        self._scan(Path(source_dir))
        self.dataset_name = self.output_name  # the converted dataset.json names the user's dataset
        return super().convert(source_dir, out_dir, show_progress)

    @staticmethod
    def read_on_one_grid(files: list[Path], label_path: Path, what: str, case_id: str):
        """The channel images and the label image of a case, checked to share one voxel grid."""
        if not label_path.is_file():
            raise ConversionError.for_file(label_path, f"missing: the {what} of case {case_id!r}")
        images = [read_nifti(path) for path in files]
        label = read_nifti(label_path)
        for path, image in zip(files[1:], images[1:]):
            check_same_grid(images[0], files[0], image, path)
        check_same_grid(images[0], files[0], label, label_path)
        return images, label


@CONVERTERS.register("nndetection_task")
class NNDetectionTaskConverter(FolderCasesMixin, DatasetConverter):
    """Settings: ``raw_folder``, ``test_cases``, ``name``, ``licence`` (``settings.converters.NNDetectionTaskConvertSettings``)."""

    dataset_name = "nndetection_task"

    def _scan(self, source_dir: Path) -> None:
        if hasattr(self, "_cases"):
            return
        description = next((source_dir / name for name in DATASET_FILES if (source_dir / name).is_file()), None)
        if description is None:
            raise ConversionError.for_file(source_dir, f"no {' / '.join(DATASET_FILES)}: not an nnDetection task folder")
        data = read_description(description)
        self.class_names = indexed_names(data, "labels", description)
        # nnDetection writes "modalities"; "modality" (nnU-Net v1 / MSD and our own converted format) is accepted
        self.modalities = indexed_names(data, "modalities" if "modalities" in data else "modality", description)
        raw = self.settings.get("raw_folder")
        if raw is None:
            raw = RAW_FOLDER if (source_dir / RAW_FOLDER / "imagesTr").is_dir() else "."
        self._raw = (source_dir / raw).resolve()
        if not (self._raw / "imagesTr").is_dir():
            raise ConversionError.for_file(self._raw / "imagesTr", "folder is missing (set convert.raw_folder)")
        self.output_name = self.settings.get("name") or str(data.get("task") or data.get("name") or source_dir.name)
        self.licence = self.settings.get("licence", "not stated")
        self.source = str(source_dir)
        self._cases, self._test_ids = folder_cases(self._raw, NIFTI_SUFFIX, len(self.modalities),
                                                   bool(self.settings.get("test_cases", False)))
        self._without_voxels: dict[str, list[int]] = {}

    def load_case(self, source_dir: Path, case_id: str) -> ConvertedCase:
        self._scan(source_dir)
        files, test = self._cases[case_id]
        labels = self._raw / ("labelsTs" if test else "labelsTr")
        label_path, json_path = labels / f"{case_id}{NIFTI_SUFFIX}", labels / f"{case_id}.json"
        images, label = self.read_on_one_grid(files, label_path, "instance map", case_id)
        classes = self._instance_classes(json_path)
        instance_map = integer_labels(label, label_path)
        present = [int(i) for i in np.unique(instance_map) if i != 0]
        if present and present[0] < 0:
            raise ConversionError.for_file(label_path, f"negative value {present[0]} in an instance map")
        unclassed = [i for i in present if i not in classes]
        if unclassed:
            raise ConversionError.for_file(json_path, f"instances {unclassed} of {label_path.name} have no class")
        absent = sorted(set(classes) - set(present))
        if absent:
            self._without_voxels[case_id] = absent
        bad = {i: c for i, c in classes.items() if not 0 <= c < len(self.class_names)}
        if bad:
            raise ConversionError.for_file(json_path, f"classes {bad} (instance: class) outside the "
                                                      f"{len(self.class_names)} labels of the dataset description")
        renumbered = relabel(instance_map, present)
        return case_from_sitk(case_id, images, renumbered, {new: classes[old] for new, old in enumerate(present, 1)})

    @staticmethod
    def _instance_classes(path: Path) -> dict[int, int]:
        if not path.is_file():
            raise ConversionError.for_file(path, "missing: the instance classes of the case")
        data = read_description(path)
        instances = data.get("instances")
        if not isinstance(instances, Mapping):
            raise ConversionError.for_file(path, 'must hold {"instances": {"1": class, ...}}')
        try:
            return {int(k): int(v) for k, v in instances.items()}
        except (TypeError, ValueError):
            raise ConversionError.for_file(path, f"instances must map integer ids to class indices, got {instances}") \
                from None

    def dataset_extra(self) -> dict[str, Any]:
        return {"conversion": f"imported from the nnDetection task folder {self.source}",
                "instances_without_voxels": self._without_voxels}
