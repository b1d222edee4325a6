"""Apply a trained detector to new scans: ``python -m pretrain_det3d detect`` (fold ensembling included).

A fine-tuning run ``results/finetune/{detector}/{init}/{dataset}`` holds one ``fold{k}/model_final.pth`` per
cross-validation fold. :func:`run_detection` loads the folds asked for (all by default), reads every scan of
the input, preprocesses it with the run's plan exactly as the training cases were preprocessed (crop to the
non-zero region, resample onto the plan's target spacing, normalise with the plan's per-channel schemes: the
same function, ``data.preprocessing.preprocess_arrays``), predicts with all folds together (``inference.sliding_window.predict_case``: each model
with each mirroring is one source of nnDetection's weighted box clustering), maps the boxes back onto the input
scan's voxel grid (``data.preprocessing.map_boxes_to_original``) and into world coordinates
(``inference.predict.world_centres``, whose box convention is the project's one).

Inputs: a file or a folder (searched recursively). NIfTI (``.nii``, ``.nii.gz``), MetaImage (``.mha``, ``.mhd``)
and NRRD (``.nrrd``, ``.nhdr``) files are one scan each; DICOM files (``.dcm``, ``.ima`` or no suffix) are
grouped into series by SimpleITK/GDCM, one scan per series (a folder holding several series gives several scans).
A run trained on several channels takes ``{scan}_{channel:04d}.{ext}`` files, one per channel (nnDetection's
naming); a single-channel run also strips a ``_0000`` suffix from the scan name.

The plan: the run's ``model_final.pth`` files record the needed part of the dataset's ``plan.json`` (key
``preprocessing_plan``, written by ``training.finetune``). For older runs the plan is read from the recorded
``preprocessed_root``, then from ``--plan``'s file, then from ``{data_dir}/preprocessed/{dataset}/plan.json``.

Inference settings: ``InferenceSettings``' defaults (nnDetection's consolidation), updated by the ``inference:``
section of ``--config`` (the study config that trained the run, optional), then by ``--settings`` (JSON), then
by ``--device``. The tile size defaults to the run's training patch size.

Outputs in ``--output`` (each written atomically):

- ``{scan}.json``: the scan's source files and geometry, and per detection its class (index and name from the
  dataset's ``dataset.json`` labels, kept in the plan), score, box in the input scan's voxels
  (``box_voxel_zyx``: ``(z0, y0, x0, z1, y1, x1)`` over the array axes as SimpleITK gives them, the project's box
  convention), world coordinates in mm (SimpleITK's physical space, ordered x, y, z) of the box centre and of its
  two opposite corners ``(z0, y0, x0)`` and ``(z1, y1, x1)``; also the flat ``boxes``, ``scores``, ``labels``,
  ``world_centres`` lists of the project's prediction files;
- ``detections.csv``: one row per detection of all scans;
- with ``--png-score s``: ``{scan}_det{i:03d}.png`` for every detection scoring at least ``s``, the axial,
  coronal and sagittal slices of the input scan through the box centre with the box outlined.

A scan that cannot be read (corrupt, truncated, not 3D, ...) is reported on one line naming the file and the
reason and skipped; :func:`run_detection` returns those failures, and the command exits with status 1 if any.

Example:
    >>> failures = run_detection("results/finetune/retina_unet/mae/synth_lesions", "scans/", "detections/",
    ...                          png_score=0.5)  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from pretrain_det3d.data.preprocessing import PLAN_FILE, map_boxes_to_original, preprocess_arrays
from pretrain_det3d.inference.predict import world_centres
from pretrain_det3d.settings.study import InferenceSettings
from pretrain_det3d.utils.atomic import atomic_path, write_json

LOGGER = logging.getLogger(__name__)

MODEL_FILE = "model_final.pth"
FOLD_DIR = re.compile(r"^fold(?P<fold>\d+)$")
#: file name endings read as one image each (lower case)
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr")
#: file name endings taken for DICOM slices; files without any suffix are offered to GDCM too
DICOM_SUFFIXES = (".dcm", ".ima")
CHANNEL_NAME = re.compile(r"^(?P<scan>.+)_(?P<channel>\d{4})$")
CSV_FILE = "detections.csv"
CSV_COLUMNS = (
    "scan", "detection", "class_index", "class_name", "score",
    "z0", "y0", "x0", "z1", "y1", "x1",
    "centre_x_mm", "centre_y_mm", "centre_z_mm",
    "corner_min_x_mm", "corner_min_y_mm", "corner_min_z_mm",
    "corner_max_x_mm", "corner_max_y_mm", "corner_max_z_mm",
    "png",
)
#: plan entries detection cannot do without
REQUIRED_PLAN_KEYS = ("target_spacing", "normalisation")


class DetectInputError(ValueError):
    """An input cannot be turned into a scan; the message starts with the file or folder."""


# ---- the run -----------------------------------------------------------------------------------------------
@dataclass
class DetectionRun:
    """The folds of one fine-tuning run, loaded for prediction.

    Attributes:
        run_dir: ``results/finetune/{detector}/{init}/{dataset}``.
        folds: the fold numbers whose models are in ``detectors`` (same order).
        detectors: the loaded models.
        detector: the registered detector name.
        plan: the part of the dataset's ``plan.json`` used here (``target_spacing``, ``normalisation``, ...).
        class_names: class names in class-index order.
        settings: the inference settings (``InferenceSettings`` fields, ``patch_size`` resolved).
    """

    run_dir: Path
    folds: list[int]
    detectors: list[Any]
    detector: str
    plan: dict[str, Any]
    class_names: list[str]
    settings: dict[str, Any]


def fold_models(run_dir: str | os.PathLike, folds: Sequence[int] | None = None) -> dict[int, Path]:
    """``{fold: fold{k}/model_final.pth}`` of a run folder: the folds asked for, or all that have a model.

    Example:
        >>> fold_models("results/finetune/retina_unet/mae/synth_lesions")  # doctest: +SKIP
        {0: PosixPath('.../fold0/model_final.pth'), 1: PosixPath('.../fold1/model_final.pth')}
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: run folder not found (expected results/finetune/<detector>/<init>/<dataset>)")
    found = {
        int(match["fold"]): entry / MODEL_FILE
        for entry in run_dir.iterdir()
        if (match := FOLD_DIR.match(entry.name)) and (entry / MODEL_FILE).is_file()
    }
    if folds is None:
        if not found:
            raise FileNotFoundError(f"{run_dir}: no fold*/{MODEL_FILE} (has the run finished fine-tuning?)")
        return dict(sorted(found.items()))
    missing = [int(f) for f in folds if int(f) not in found]
    if missing:
        raise FileNotFoundError(
            f"{run_dir}: no {MODEL_FILE} for fold(s) {missing} (folds with a model: {sorted(found) or 'none'})"
        )
    return {int(f): found[int(f)] for f in dict.fromkeys(folds)}


def _read_plan(path: Path) -> dict[str, Any]:
    try:
        plan = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: cannot read the preprocessing plan ({error})") from None
    if not isinstance(plan, dict):
        raise ValueError(f"{path}: the preprocessing plan must be a JSON object")
    return plan


def resolve_plan(
    record: Mapping[str, Any],
    model_path: Path,
    plan_path: str | os.PathLike | None = None,
    data_dir: str | os.PathLike = "results/data",
) -> tuple[dict[str, Any], str]:
    """The preprocessing plan of a run and where it came from (see the module docstring for the order)."""
    if plan_path is not None:
        return _read_plan(Path(plan_path)), str(plan_path)
    stored = record.get("preprocessing_plan")
    if isinstance(stored, Mapping) and all(key in stored for key in REQUIRED_PLAN_KEYS):
        return dict(stored), f"{model_path} (preprocessing_plan)"
    candidates = []
    if record.get("preprocessed_root"):
        candidates.append(Path(str(record["preprocessed_root"])) / PLAN_FILE)
    dataset = model_path.parent.parent.name  # results/finetune/{detector}/{init}/{dataset}/fold{k}
    candidates.append(Path(data_dir) / "preprocessed" / dataset / PLAN_FILE)
    for candidate in candidates:
        if candidate.is_file():
            return _read_plan(candidate), str(candidate)
    raise FileNotFoundError(
        f"{model_path}: records no preprocessing plan, and none was found at {', '.join(map(str, candidates))}; "
        "pass the dataset's plan.json with --plan"
    )


def _class_names(plan: Mapping[str, Any], num_classes: int) -> list[str]:
    """The plan's class names (from dataset.json), ``class_{i}`` for any index it does not name."""
    names = [str(n) for n in plan.get("class_names") or []]
    return names + [f"class_{index}" for index in range(len(names), num_classes)]


def inference_options(
    records: Sequence[Mapping[str, Any]],
    config_settings: Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Inference settings: defaults < the study config's ``inference`` section < ``overrides``; the patch size
    defaults to the folds' training patch size (which must then agree)."""
    merged = {**dict(config_settings or {}), **dict(overrides or {})}
    if merged.get("patch_size") is None:
        patches = {tuple(r.get("settings", {}).get("patch_size") or ()) for r in records}
        patches.discard(())
        if len(patches) != 1:
            raise ValueError(
                "cannot tell the tile size from the run: its folds record the training patch sizes "
                f"{sorted(patches) or 'none'}; give one with --settings '{{\"patch_size\": [z, y, x]}}'"
            )
        merged["patch_size"] = list(patches.pop())
    return InferenceSettings.parse(merged, where="inference").model_dump()


def load_run(
    run_dir: str | os.PathLike,
    folds: Sequence[int] | None = None,
    settings: Mapping[str, Any] | None = None,
    config: str | os.PathLike | None = None,
    plan_path: str | os.PathLike | None = None,
) -> DetectionRun:
    """Load the folds of a run, its plan and the inference settings (see the module docstring)."""
    from pretrain_det3d.models.registry import load_detector

    run_dir = Path(run_dir)
    paths = fold_models(run_dir, folds)
    detectors, records = [], []
    for path in paths.values():
        model, record = load_detector(path)
        detectors.append(model)
        records.append(record)
    names = {record["detector"] for record in records}
    if len(names) != 1:
        raise ValueError(f"{run_dir}: the folds hold different detectors {sorted(names)}")
    config_settings: dict[str, Any] = {}
    data_dir = "results/data"
    if config is not None:
        import yaml

        from pretrain_det3d.config import inference_settings

        study = yaml.safe_load(Path(config).read_text()) or {}
        data_dir = study.get("data_dir", data_dir)
        arch = run_dir.parent.parent.name  # results/finetune/{arch}/{init}/{dataset}
        if arch in study.get("detectors", {}):
            config_settings = inference_settings(study, arch)
        else:
            config_settings = dict(study.get("inference") or {})
    first_path = next(iter(paths.values()))
    plan, plan_source = resolve_plan(records[0], first_path, plan_path, data_dir)
    for key in REQUIRED_PLAN_KEYS:
        if key not in plan:
            raise ValueError(f"{plan_source}: the preprocessing plan lacks {key!r}")
    for path, record in zip(list(paths.values())[1:], records[1:]):
        other = record.get("preprocessing_plan")
        if isinstance(other, Mapping) and any(other.get(k) != plan.get(k) for k in REQUIRED_PLAN_KEYS):
            raise ValueError(f"{path}: its preprocessing plan differs from that of {first_path}; the folds of one "
                             "run must share one plan")
    num_classes = int(records[0]["build_kwargs"].get("num_classes", plan.get("num_classes", 1)))
    in_channels = records[0]["build_kwargs"].get("in_channels")
    if in_channels is not None and len(plan["normalisation"]) != int(in_channels):
        raise ValueError(f"{plan_source}: plans {len(plan['normalisation'])} channels, the detector takes {in_channels}")
    options = inference_options(records, config_settings, settings)
    LOGGER.info("run %s: folds %s of %s, plan from %s", run_dir, list(paths), names.pop() if names else "?", plan_source)
    return DetectionRun(
        run_dir=run_dir,
        folds=list(paths),
        detectors=detectors,
        detector=records[0]["detector"],
        plan=plan,
        class_names=_class_names(plan, num_classes),
        settings=options,
    )


# ---- the scans ---------------------------------------------------------------------------------------------
@dataclass
class Scan:
    """One scan to detect on: a name for its outputs, and the files it is read from.

    ``channels`` holds one file per channel (image formats) or, for DICOM, the series' slice files in GDCM's
    order; ``error`` is set when the input is already known to be unusable.
    """

    name: str
    kind: str  # "image" or "dicom"
    channels: list[Path] = field(default_factory=list)
    series_uid: str | None = None
    origin: Path | None = None  # the file or folder named in messages
    error: str | None = None


def _image_stem(path: Path) -> str | None:
    lower = path.name.lower()
    for suffix in IMAGE_SUFFIXES:
        if lower.endswith(suffix):
            return path.name[: -len(suffix)]
    return None


def _is_dicom_candidate(path: Path) -> bool:
    lower = path.name.lower()
    return lower.endswith(DICOM_SUFFIXES) or ("." not in path.name and not path.name.startswith("."))


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "scan"


def _dicom_scans(folder: Path, candidates: Sequence[Path], root: Path) -> list[Scan]:
    """One scan per series that GDCM finds in ``folder``; ``.dcm`` files in no series are one failed scan."""
    scans, covered = [], set()
    series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    relative = folder.relative_to(root) if folder != root else Path(folder.name)
    for uid in series_ids:
        files = [Path(f) for f in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)]
        covered.update(f.resolve() for f in files)
        name = _safe_name("_".join(relative.parts)) + (f"_{_safe_name(uid)}" if len(series_ids) > 1 else "")
        scans.append(Scan(name=name, kind="dicom", channels=files, series_uid=uid, origin=folder))
    stray = [p for p in candidates if p.name.lower().endswith(DICOM_SUFFIXES) and p.resolve() not in covered]
    if stray:
        scans.append(Scan(
            name=_safe_name("_".join(relative.parts)), kind="dicom", origin=stray[0],
            error=f"{len(stray)} DICOM file(s) in {folder} belong to no readable series (e.g. {stray[0].name}): "
                  "not DICOM, or damaged",
        ))
    return scans


def _group_channels(files: Sequence[Path], num_channels: int, root: Path) -> list[Scan]:
    """Image files -> scans: one file per scan for one channel, ``{scan}_{dddd}`` files grouped for several."""
    scans: list[Scan] = []
    if num_channels == 1:
        for path in files:
            stem = _image_stem(path) or path.name
            match = CHANNEL_NAME.match(stem)
            name = match["scan"] if match and int(match["channel"]) == 0 else stem
            scans.append(Scan(name=_safe_name(name), kind="image", channels=[path], origin=path))
        return scans
    groups: dict[tuple[Path, str], dict[int, Path]] = {}
    for path in files:
        stem = _image_stem(path) or path.name
        match = CHANNEL_NAME.match(stem)
        if match is None:
            scans.append(Scan(name=_safe_name(stem), kind="image", origin=path,
                              error=f"{path}: the run takes {num_channels} channels, so scans are named "
                                    "{scan}_0000, {scan}_0001, ...; this file has no channel number"))
            continue
        groups.setdefault((path.parent, match["scan"]), {})[int(match["channel"])] = path
    for (_, name), channels in sorted(groups.items()):
        missing = [c for c in range(num_channels) if c not in channels]
        first = channels[min(channels)]
        if missing:
            scans.append(Scan(name=_safe_name(name), kind="image", origin=first,
                              error=f"{first.parent / name}: channel(s) {missing} missing (the run takes "
                                    f"{num_channels} channels, files {name}_0000 ... {name}_{num_channels - 1:04d})"))
        else:
            scans.append(Scan(name=_safe_name(name), kind="image", origin=first,
                              channels=[channels[c] for c in range(num_channels)]))
    return scans


def find_scans(input_path: str | os.PathLike, num_channels: int = 1) -> list[Scan]:
    """The scans of a file or folder (see the module docstring); names are made unique with a counter.

    Example:
        >>> [scan.name for scan in find_scans("scans/")]  # doctest: +SKIP
        ['patient_a', 'series_1_2_840']
    """
    root = Path(input_path)
    if not root.exists():
        raise FileNotFoundError(f"{root}: input not found")
    scans: list[Scan] = []
    if root.is_file():
        if _image_stem(root) is not None:
            scans = _group_channels([root], num_channels, root.parent)
        elif _is_dicom_candidate(root):
            series = [s for s in _dicom_scans(root.parent, [root], root.parent)
                      if s.error or root.resolve() in {f.resolve() for f in s.channels}]
            scans = series or [Scan(name=_safe_name(root.name), kind="dicom", origin=root,
                                    error=f"{root}: not readable as a DICOM slice")]
        else:
            raise DetectInputError(
                f"{root}: not a supported image (NIfTI .nii/.nii.gz, MetaImage .mha/.mhd, NRRD .nrrd/.nhdr, "
                "DICOM .dcm or a folder of DICOM files)"
            )
    else:
        for folder, directories, names in os.walk(root):
            directories[:] = sorted(d for d in directories if not d.startswith("."))
            folder_path = Path(folder)
            paths = [folder_path / name for name in sorted(names) if not name.startswith(".")]
            images = [p for p in paths if _image_stem(p) is not None]
            scans.extend(_group_channels(images, num_channels, root))
            dicom = [p for p in paths if _image_stem(p) is None and _is_dicom_candidate(p)]
            if dicom:
                scans.extend(_dicom_scans(folder_path, dicom, root))
    seen: dict[str, int] = {}
    for scan in scans:
        count = seen.get(scan.name, 0)
        seen[scan.name] = count + 1
        if count:
            scan.name = f"{scan.name}_{count + 1}"
    return scans


def read_scan(scan: Scan) -> tuple[np.ndarray, sitk.Image]:
    """``(image [C, Z, Y, X] float32, reference SimpleITK image of channel 0)``; unreadable input raises an error
    whose message starts with the offending file."""
    from pretrain_det3d.data.io import read_image

    if scan.error:
        raise DetectInputError(scan.error)
    if scan.kind == "dicom":
        from pretrain_det3d.data.converters.dicom import DicomSeries, read_dicom_series

        image, _ = read_dicom_series(DicomSeries(scan.series_uid or "", Path(scan.origin or "."), tuple(scan.channels)))
        if image.GetNumberOfComponentsPerPixel() != 1:
            raise DetectInputError(f"{scan.origin}: series {scan.series_uid} has several components per voxel")
        return sitk.GetArrayFromImage(image).astype(np.float32)[None], image
    arrays, reference = [], None
    for path in scan.channels:
        image = read_image(path)
        array = sitk.GetArrayFromImage(image).astype(np.float32)
        if reference is None:
            reference = image
        elif array.shape != arrays[0].shape or not np.allclose(image.GetSpacing(), reference.GetSpacing()):
            raise DetectInputError(f"{path}: geometry differs from channel 0 ({scan.channels[0].name})")
        arrays.append(array)
    return np.stack(arrays), reference


def scan_geometry(image: sitk.Image) -> dict[str, Any]:
    """The input scan's grid: ``original_shape`` / ``original_spacing`` (z, y, x), ``origin`` and ``direction``
    (SimpleITK's x, y, z order), the keys ``world_centres`` and ``map_boxes_to_original`` read."""
    return {
        "original_shape": [int(s) for s in image.GetSize()[::-1]],
        "original_spacing": [float(s) for s in image.GetSpacing()[::-1]],
        "origin": [float(o) for o in image.GetOrigin()],
        "direction": [float(d) for d in image.GetDirection()],
    }


def preprocess_scan(
    image: np.ndarray, spacing_zyx: Sequence[float], plan: Mapping[str, Any]
) -> tuple[np.ndarray, dict[str, Any]]:
    """Crop, resample and normalise ``[C, Z, Y, X]`` with the plan: the steps and functions with which
    ``data.preprocessing`` prepared the training cases (``preprocess_arrays``). Returns the image and its crop
    (``crop_bbox``, ``cropped_shape``), which ``map_boxes_to_original`` needs besides the scan's geometry."""
    if image.shape[0] != len(plan["normalisation"]):
        raise ValueError(f"the scan has {image.shape[0]} channel(s), the plan {len(plan['normalisation'])}")
    image, _, geometry = preprocess_arrays(image, None, spacing_zyx, plan)
    return image, {"crop_bbox": geometry["crop_bbox"], "cropped_shape": geometry["cropped_shape"]}


# ---- prediction and outputs --------------------------------------------------------------------------------
def predict_preprocessed(run: DetectionRun, image: np.ndarray) -> dict[str, np.ndarray]:
    """All folds of ``run`` on one preprocessed image (boxes in its voxels), fused by ``predict_case``."""
    from pretrain_det3d.inference.sliding_window import predict_case_with_settings
    from pretrain_det3d.training.trainer import resolve_device

    options = run.settings
    return predict_case_with_settings(run.detectors, image, options, device=resolve_device(str(options["device"])))


def world_points(points_zyx: np.ndarray, geometry: Mapping[str, Any]) -> np.ndarray:
    """World coordinates (x, y, z, mm) of points given in box coordinates ``(z, y, x)`` of the scan's voxels.

    A point is the centre of the degenerate box ``[p, p]``, so :func:`world_centres` (and with it the project's
    box convention) decides where box coordinates lie in the voxel grid.
    """
    points = np.asarray(points_zyx, dtype=np.float64).reshape(-1, 3)
    return world_centres(np.concatenate([points, points], axis=1), geometry)


def box_coordinates_to_index(points_zyx: np.ndarray) -> np.ndarray:
    """Continuous voxel indices (z, y, x; voxel centres at integers) of box coordinates, by the same convention."""
    identity = {"original_spacing": [1.0, 1.0, 1.0], "origin": [0.0, 0.0, 0.0], "direction": np.eye(3).ravel().tolist()}
    return world_points(points_zyx, identity)[:, ::-1]


def scan_detections(
    result: Mapping[str, np.ndarray], preprocessed_shape: Sequence[int], geometry: Mapping[str, Any],
    class_names: Sequence[str],
) -> dict[str, Any]:
    """Boxes of the preprocessed image -> the scan's voxel and world coordinates, with class names."""
    meta = {**geometry, "shape": [int(s) for s in preprocessed_shape]}
    boxes = map_boxes_to_original(result["boxes"], meta)  # [N, 6] in the scan's voxels
    centres = world_centres(boxes, meta)
    corner_min, corner_max = world_points(boxes[:, :3], meta), world_points(boxes[:, 3:], meta)
    labels = [int(v) for v in result["labels"]]
    detections = []
    for index, label in enumerate(labels):
        detections.append({
            "class_index": label,
            "class_name": class_names[label] if 0 <= label < len(class_names) else f"class_{label}",
            "score": float(result["scores"][index]),
            "box_voxel_zyx": boxes[index].tolist(),
            "centre_world_xyz": centres[index].tolist(),
            "corner_min_world_xyz": corner_min[index].tolist(),
            "corner_max_world_xyz": corner_max[index].tolist(),
        })
    return {
        "detections": detections,
        "boxes": boxes.tolist(),
        "scores": [float(s) for s in result["scores"]],
        "labels": labels,
        "world_centres": centres.tolist(),
    }


def _display_window(array: np.ndarray) -> tuple[float, float]:
    low, high = np.percentile(array, (1.0, 99.0)) if array.size else (0.0, 1.0)
    return float(low), float(high) if high > low else float(low) + 1.0


def write_box_png(
    path: str | os.PathLike, image_zyx: np.ndarray, spacing_zyx: Sequence[float], box: Sequence[float], title: str
) -> None:
    """The axial, coronal and sagittal slices through the box centre, box outlined, as one PNG (atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    box = np.asarray(box, dtype=np.float64)
    low, high = box_coordinates_to_index(box[None, :3])[0], box_coordinates_to_index(box[None, 3:])[0]
    shape = np.asarray(image_zyx.shape)
    centre = np.clip(np.rint((low + high) / 2.0).astype(int), 0, shape - 1)
    sz, sy, sx = (float(s) for s in spacing_zyx)
    vmin, vmax = _display_window(image_zyx)
    views = [  # (title, slice, row axis, column axis, aspect = row spacing / column spacing)
        (f"axial z={centre[0]}", image_zyx[centre[0]], 1, 2, sy / sx),
        (f"coronal y={centre[1]}", image_zyx[:, centre[1], :], 0, 2, sz / sx),
        (f"sagittal x={centre[2]}", image_zyx[:, :, centre[2]], 0, 1, sz / sy),
    ]
    figure, axes = plt.subplots(1, 3, figsize=(12, 4.4))
    try:
        for ax, (name, plane, row, column, aspect) in zip(axes, views):
            ax.imshow(plane, cmap="gray", vmin=vmin, vmax=vmax, aspect=aspect, origin="upper", interpolation="nearest")
            ax.add_patch(Rectangle((low[column], low[row]), high[column] - low[column], high[row] - low[row],
                                   fill=False, edgecolor="red", linewidth=1.2))
            ax.set_title(name, fontsize=9)
            ax.set_axis_off()
        figure.suptitle(title, fontsize=10)
        figure.tight_layout()
        with atomic_path(path) as tmp:
            figure.savefig(tmp, dpi=100, format="png")
    finally:
        plt.close(figure)


def _csv_rows(scan: str, detections: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for index, det in enumerate(detections):
        row = {"scan": scan, "detection": index, "class_index": det["class_index"], "class_name": det["class_name"],
               "score": det["score"], "png": det.get("png") or ""}
        row.update(zip(("z0", "y0", "x0", "z1", "y1", "x1"), det["box_voxel_zyx"]))
        for key, prefix in (("centre_world_xyz", "centre"), ("corner_min_world_xyz", "corner_min"),
                            ("corner_max_world_xyz", "corner_max")):
            row.update({f"{prefix}_{axis}_mm": value for axis, value in zip("xyz", det[key])})
        rows.append(row)
    return rows


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text


def detect_scans(
    run: DetectionRun,
    input_path: str | os.PathLike,
    output: str | os.PathLike,
    png_score: float | None = None,
    report=None,
) -> list[tuple[str, str]]:
    """Detect on every scan of ``input_path`` and write the outputs; returns ``[(input, reason)]`` of the scans
    that were skipped. ``report`` (default: print to stderr) receives one line per skipped scan."""
    # tqdm.write keeps the message on its own line, above the progress bar
    report = report or (lambda line: tqdm.write(line, file=sys.stderr))
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    scans = find_scans(input_path, len(run.plan["normalisation"]))
    if not scans:
        raise DetectInputError(f"{input_path}: no scans found (NIfTI, MetaImage, NRRD or DICOM)")
    failures: list[tuple[str, str]] = []
    rows: list[dict[str, Any]] = []
    progress = tqdm(scans, desc="detect", unit="scan")
    for scan in progress:
        progress.set_postfix_str(scan.name)
        try:
            array, reference = read_scan(scan)
            geometry = scan_geometry(reference)
            image, crop = preprocess_scan(array, geometry["original_spacing"], run.plan)
            geometry.update(crop)
        except (ValueError, OSError, RuntimeError) as error:  # DatasetFormatError, ConversionError are ValueErrors
            reason = _one_line(error)
            where = str(scan.origin or scan.name)
            failures.append((where, reason))
            report(f"detect: skipped {scan.name}: {reason}" if reason.startswith(where) else
                   f"detect: skipped {scan.name}: {where}: {reason}")
            continue
        result = predict_preprocessed(run, image)
        record = scan_detections(result, image.shape[1:], geometry, run.class_names)
        for index, det in enumerate(record["detections"]):
            det["png"] = None
            if png_score is not None and det["score"] >= png_score:
                name = f"{scan.name}_det{index:03d}.png"
                centre = ", ".join(f"{v:.1f}" for v in det["centre_world_xyz"])
                write_box_png(output / name, array[0], geometry["original_spacing"], det["box_voxel_zyx"],
                              f"{scan.name}: {det['class_name']} score {det['score']:.2f}, centre ({centre}) mm")
                det["png"] = name
        write_json(output / f"{scan.name}.json", {
            "scan": scan.name,
            "inputs": [str(p) for p in scan.channels],
            "series_uid": scan.series_uid,
            "run": str(run.run_dir),
            "detector": run.detector,
            "folds": run.folds,
            "geometry": geometry,
            "preprocessed_shape": [int(s) for s in image.shape[1:]],
            "coordinates": "box_voxel_zyx: (z0, y0, x0, z1, y1, x1) over the input scan's array axes (SimpleITK's "
                           "numpy order) in the project's box convention; *_world_xyz: SimpleITK physical points "
                           "(x, y, z) in mm",
            **record,
        })
        rows.extend(_csv_rows(scan.name, record["detections"]))
    with atomic_path(output / CSV_FILE) as tmp:
        with tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
    return failures


def run_detection(
    run_dir: str | os.PathLike,
    input_path: str | os.PathLike,
    output: str | os.PathLike,
    folds: Sequence[int] | None = None,
    png_score: float | None = None,
    settings: Mapping[str, Any] | None = None,
    config: str | os.PathLike | None = None,
    plan_path: str | os.PathLike | None = None,
    report=None,
) -> list[tuple[str, str]]:
    """Load the run and detect on every scan of ``input_path`` (see the module docstring); returns the failures."""
    run = load_run(run_dir, folds, settings, config, plan_path)
    return detect_scans(run, input_path, output, png_score, report)
