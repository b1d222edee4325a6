"""Preprocessing: plan (target spacing, normalisation), resample, normalise and store cases for training.

Plan:
- target spacing = the per-axis median of the cases' spacings (``settings["target_spacing"]`` overrides);
- CT channels (nnU-Net's CT scheme): intensities are clipped to the 0.5 / 99.5 percentiles of the dataset's
  foreground intensities, then z-scored with the foreground mean and standard deviation (of the unclipped
  samples). Foreground = voxels inside instances, sampled per case (up to ``foreground_intensity_samples`` per
  case, seeded). A dataset without any instance falls back to "body" voxels (above ``BODY_THRESHOLD_HU``), and a
  dataset without those to all voxels; ``plan.json``'s ``foreground_source`` records which was used.
- other modalities (MRI, ...): per-case, per-channel z-score over all voxels.

Per case: normalise, then resample (image: 3rd-order spline; instance map: nearest neighbour) onto the target
spacing. Both use the same edge-aligned grid: preprocessed voxel ``j`` covers converted voxels
``[j * r, (j + 1) * r)`` with ``r = original_shape / shape`` per axis, which fixes :func:`map_boxes_to_original`
(exact for boxes made from masks, :mod:`pretrain_det3d.data.boxes`). Tiny instances can vanish when
downsampling; they are dropped from ``instances`` and the remaining ids are renumbered 1..M in their original
order (``original_instance_ids`` and ``dropped_instance_ids`` in the case's JSON record this). Boxes are computed
from the stored map, so they always agree with it.

Outputs (``out_root``, written through one atomic directory, ``plan.json`` last so that it marks completion)::

    plan.json, splits.json, cases/{case}.npy (float32 [C,Z,Y,X]), cases/{case}_seg.npy (int16 [Z,Y,X]),
    cases/{case}.json

Example:
    >>> run_preprocessing("results/data/converted/synthetic", "results/data/preprocessed/synthetic",
    ...                   num_folds=5, seed=0, settings={"num_workers": 2})  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import json
import os
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from tqdm import tqdm

from pretrain_det3d.data.boxes import boxes_from_instance_map, instance_voxel_extents
from pretrain_det3d.data.dataset_format import DatasetFormatError, check_converted_dataset
from pretrain_det3d.data.io import geometry_of, load_npy, read_case, read_image
from pretrain_det3d.data.splits import make_splits
from pretrain_det3d.utils.atomic import atomic_directory, atomic_path, write_json
from pretrain_det3d.settings.data import CorpusPreprocessingSettings, PreprocessingSettings


# ---- named defaults (settings keys in brackets) ----------------------------------------------------------
# defaults from the one definition of the settings (pretrain_det3d.settings.data)
DEFAULT_NUM_WORKERS = PreprocessingSettings.default("num_workers")
DEFAULT_FOREGROUND_INTENSITY_SAMPLES = PreprocessingSettings.default("foreground_intensity_samples")
DEFAULT_FOREGROUND_LOCATIONS = PreprocessingSettings.default("foreground_locations")
DEFAULT_CORPUS_MODALITY = CorpusPreprocessingSettings.default("modality")
DEFAULT_CORPUS_SEED = CorpusPreprocessingSettings.default("seed")
CT_CLIP_PERCENTILES = (0.5, 99.5)
BODY_THRESHOLD_HU = -500.0  # voxels above this are "body" when a CT dataset has no instances, and in corpora
IMAGE_SPLINE_ORDER = 3
STD_FLOOR = 1e-8  # a constant image must not divide by zero

PLAN_FILE = "plan.json"
SPLITS_FILE = "splits.json"
CASES_DIR = "cases"


# ---- small pure helpers ----------------------------------------------------------------------------------
def is_ct(modality: str) -> bool:
    """CT channels get the CT scheme; every other modality (MRI, ...) a per-case z-score."""
    return modality.strip().upper() == "CT"


def case_rng(seed: int, case: str) -> np.random.Generator:
    """A generator tied to ``(seed, case id)``: independent of case order and of the number of workers."""
    return np.random.default_rng([int(seed), zlib.crc32(case.encode("utf-8"))])


def median_spacing(spacings: Iterable[Sequence[float]]) -> tuple[float, float, float]:
    """Per-axis median of spacings given in (z, y, x).

    Example:
        >>> median_spacing([(3.0, 1.0, 1.0), (1.0, 0.5, 0.5), (2.0, 0.8, 0.7)])
        (2.0, 0.8, 0.7)
    """
    values = np.asarray(list(spacings), dtype=np.float64)
    if values.ndim != 2 or values.shape[1] != 3 or len(values) == 0:
        raise ValueError(f"expected a list of (z, y, x) spacings, got shape {values.shape}")
    return tuple(float(v) for v in np.median(values, axis=0))


def resampled_shape(
    shape: Sequence[int], spacing: Sequence[float], target_spacing: Sequence[float]
) -> tuple[int, int, int]:
    """Shape that keeps the physical extent at ``target_spacing`` (rounded, at least one voxel per axis).

    Example:
        >>> resampled_shape((10, 64, 64), (2.0, 1.0, 1.0), (1.0, 2.0, 2.0))
        (20, 32, 32)
    """
    extent = np.asarray(shape, dtype=np.float64) * np.asarray(spacing, dtype=np.float64)
    return tuple(max(int(n), 1) for n in np.rint(extent / np.asarray(target_spacing, dtype=np.float64)))


def resample_image(image: np.ndarray, new_shape: Sequence[int]) -> np.ndarray:
    """Resample ``[C, Z, Y, X]`` to ``[C, *new_shape]`` with a 3rd-order spline on the edge-aligned grid.

    Output voxel ``j`` samples input position ``(j + 0.5) * r - 0.5`` (``r`` = old / new size), i.e. voxel
    centres of the new grid within the unchanged physical extent.

    Example:
        >>> resample_image(np.ones((1, 4, 4, 4), np.float32), (2, 8, 8)).shape
        (1, 2, 8, 8)
    """
    new_shape = tuple(int(n) for n in new_shape)
    if tuple(image.shape[1:]) == new_shape:
        return image.astype(np.float32, copy=False)  # a spline through the samples returns them unchanged
    ratio = np.asarray(image.shape[1:], dtype=np.float64) / np.asarray(new_shape, dtype=np.float64)
    offset = 0.5 * ratio - 0.5
    channels = [
        ndimage.affine_transform(
            channel.astype(np.float32, copy=False),
            ratio,  # diagonal matrix: input = ratio * output + offset
            offset=offset,
            output_shape=new_shape,
            order=IMAGE_SPLINE_ORDER,
            mode="nearest",
        )
        for channel in image
    ]
    return np.stack(channels).astype(np.float32, copy=False)  # [C, *new_shape]


def resample_instance_map(instance_map: np.ndarray, new_shape: Sequence[int]) -> np.ndarray:
    """Nearest-neighbour resampling on the same grid as :func:`resample_image` (ids are never blended).

    Each new voxel takes the old voxel that contains its centre, ``floor((j + 0.5) * r)``.

    Example:
        >>> m = np.zeros((4, 4, 4), np.int16); m[1, 1, 1] = 1  # new voxel 0 holds old voxels 0..1, centre at 1
        >>> int(resample_instance_map(m, (2, 2, 2))[0, 0, 0])
        1
    """
    indices = [
        np.minimum(np.floor((np.arange(new) + 0.5) * (old / new)).astype(np.int64), old - 1)
        for old, new in zip(instance_map.shape, new_shape)
    ]
    return instance_map[np.ix_(*indices)]


def renumber_instances(
    instance_map: np.ndarray, instances: Mapping[int, int]
) -> tuple[np.ndarray, dict[int, int], dict[int, int]]:
    """Drop ids absent from ``instance_map`` and renumber the rest 1..M in ascending order of the old ids.

    Returns ``(int16 map, {new_id: class}, {new_id: old_id})``.

    Example:
        >>> m = np.array([[[0, 3, 1]]]); new_map, classes, old = renumber_instances(m, {1: 0, 2: 1, 3: 1})
        >>> new_map.tolist(), classes, old
        ([[[0, 2, 1]]], {1: 0, 2: 1}, {1: 1, 2: 3})
    """
    present = [int(i) for i in np.unique(instance_map) if i > 0]
    lookup = np.zeros(int(max(present, default=0)) + 1, dtype=np.int16)
    old_ids = {}
    for new_id, old_id in enumerate(present, start=1):
        lookup[old_id] = new_id
        old_ids[new_id] = old_id
    new_map = lookup[instance_map] if present else np.zeros(instance_map.shape, dtype=np.int16)
    return new_map.astype(np.int16, copy=False), {n: int(instances[o]) for n, o in old_ids.items()}, old_ids


def ct_normalisation(samples: np.ndarray) -> dict[str, Any]:
    """The CT scheme's parameters from pooled intensity samples: clip bounds (0.5 / 99.5 %), mean, std.

    Example:
        >>> ct_normalisation(np.arange(1001, dtype=float))["lower"]
        5.0
    """
    samples = np.asarray(samples, dtype=np.float64)
    if samples.size == 0:
        raise ValueError("no intensity samples to plan the CT normalisation from")
    lower, upper = np.percentile(samples, CT_CLIP_PERCENTILES)
    return {
        "scheme": "CT",
        "lower": float(lower),
        "upper": float(upper),
        "mean": float(samples.mean()),
        "std": float(samples.std()),
    }


def normalise(image: np.ndarray, normalisation: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """Normalise ``[C, Z, Y, X]`` channel by channel with the plan's schemes (``CT`` or ``zscore``).

    Example:
        >>> normalise(np.array([[[[0.0, 10.0]]]]), [{"scheme": "CT", "lower": 2, "upper": 8, "mean": 5, "std": 3}])
        array([[[[-1.,  1.]]]], dtype=float32)
    """
    if len(normalisation) != image.shape[0]:
        raise ValueError(f"{len(normalisation)} normalisation entries for {image.shape[0]} channels")
    out = np.empty(image.shape, dtype=np.float32)
    for channel, scheme in enumerate(normalisation):
        values = image[channel].astype(np.float64)
        if scheme["scheme"] == "CT":
            values = np.clip(values, scheme["lower"], scheme["upper"])
            mean, std = scheme["mean"], scheme["std"]
        elif scheme["scheme"] == "zscore":
            mean, std = values.mean(), values.std()
        else:
            raise ValueError(f"unknown normalisation scheme {scheme['scheme']!r}")
        out[channel] = (values - mean) / max(std, STD_FLOOR)
    return out


def sample_foreground_locations(
    instance_map: np.ndarray, max_locations: int, rng: np.random.Generator
) -> list[list[int]]:
    """Up to ``max_locations`` voxel indices ``[z, y, x]`` inside instances, shared evenly between instances.

    Sharing per instance (rather than uniformly over foreground voxels) keeps small lesions as likely to be
    oversampled as large ones.

    Example:
        >>> m = np.zeros((4, 4, 4), np.int16); m[0, 0, :2] = 1
        >>> sorted(sample_foreground_locations(m, 10, np.random.default_rng(0)))
        [[0, 0, 0], [0, 0, 1]]
    """
    ids, extents = instance_voxel_extents(instance_map)
    if len(ids) == 0 or max_locations <= 0:
        return []
    per_instance = max(max_locations // len(ids), 1)
    locations = []
    for instance_id, extent in zip(ids, extents):
        start = extent[:3]
        inside = np.argwhere(instance_map[tuple(slice(a, b) for a, b in zip(extent[:3], extent[3:]))] == instance_id)
        chosen = rng.choice(len(inside), size=min(per_instance, len(inside)), replace=False)
        locations.extend((inside[np.sort(chosen)] + start).tolist())
    return locations[:max_locations]


def map_boxes_to_original(
    boxes: np.ndarray | Sequence[Sequence[float]], case_meta: Mapping[str, Any], clip: bool = True
) -> np.ndarray:
    """Map boxes from preprocessed voxels to converted-image voxels (both ``(z0, y0, x0, z1, y1, x1)``).

    With ``r = original_shape / shape`` per axis, preprocessed voxels ``first..last`` cover converted voxels
    ``first * r .. (last + 1) * r - 1`` (the edge-aligned resampling grid), so a box ``[first - 1, last + 1]``
    (the convention of :mod:`pretrain_det3d.data.boxes`) goes to ``[(min + 1) * r - 1, max * r]``: exactly the
    box of the converted mask when ``r`` makes whole voxels, and the centre mapped as the voxel centres are
    (``c -> (c + 0.5) * r - 0.5``). nnDetection's ``restore_detection`` only scales (``min * r``), which puts
    the low side ``r - 1`` voxels off. ``clip`` (on by default: the mapped boxes are predictions) then clips to
    ``[0, original_shape]`` per axis, nnDetection's clipping of predicted boxes to the image.

    Example:
        >>> map_boxes_to_original([[1, 2, 2, 3, 4, 4]], {"shape": [8, 8, 8], "original_shape": [16, 8, 4]})
        array([[3. , 2. , 0.5, 6. , 4. , 2. ]])
        >>> map_boxes_to_original([[-1, 2, 2, 3, 4, 4]], {"shape": [8, 8, 8], "original_shape": [16, 8, 4]},
        ...                       clip=False)
        array([[-1. ,  2. ,  0.5,  6. ,  4. ,  2. ]])
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 6)
    original_shape = np.asarray(case_meta["original_shape"], dtype=np.float64)
    ratio = original_shape / np.asarray(case_meta["shape"], dtype=np.float64)
    mapped = np.concatenate([(boxes[:, :3] + 1.0) * ratio - 1.0, boxes[:, 3:] * ratio], axis=1)  # [N, 6]
    if clip:
        upper = np.concatenate([original_shape, original_shape])
        mapped = np.clip(mapped, 0.0, upper[None, :])
    return mapped


def read_preprocessed_case(
    preprocessed_root: str | os.PathLike, case: str, mmap: bool = True
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Load ``(image [C,Z,Y,X], instance map [Z,Y,X], meta)`` of a preprocessed case (arrays memory-mapped).

    Example:
        >>> image, seg, meta = read_preprocessed_case("preprocessed/synthetic", "synthetic_0000")  # doctest: +SKIP
    """
    cases = Path(preprocessed_root) / CASES_DIR
    mode = "r" if mmap else None
    image = load_npy(cases / f"{case}.npy", mmap_mode=mode)  # a truncated file is named, with how to regenerate it
    seg = load_npy(cases / f"{case}_seg.npy", mmap_mode=mode)
    meta = json.loads((cases / f"{case}.json").read_text())
    return image, seg, meta


# ---- settings --------------------------------------------------------------------------------------------
def _target_spacing_setting(settings: Mapping[str, Any]) -> tuple[float, float, float] | None:
    value = settings.get("target_spacing")
    if value is None:
        return None
    spacing = tuple(float(v) for v in value)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"preprocessing settings key 'target_spacing' must be [z, y, x] mm > 0, got {value}")
    return spacing


def _positive_int_setting(settings: Mapping[str, Any], key: str, default: int, minimum: int = 1) -> int:
    value = settings.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"preprocessing settings key {key!r} must be an integer >= {minimum}, got {value!r}")
    return value


def _map_with_progress(function: Callable, items: Sequence, num_workers: int, desc: str) -> list:
    """``[function(item) for item in items]`` in order, in worker processes when ``num_workers > 1``."""
    if num_workers <= 1 or len(items) <= 1:
        return [function(item) for item in tqdm(items, desc=desc, unit="case")]
    with ProcessPoolExecutor(max_workers=num_workers) as pool:
        return list(tqdm(pool.map(function, items), total=len(items), desc=desc, unit="case"))


def _sample(values: np.ndarray, max_samples: int, rng: np.random.Generator) -> np.ndarray:
    if values.size <= max_samples:
        return values
    return values[np.sort(rng.choice(values.size, size=max_samples, replace=False))]


# ---- labelled datasets -----------------------------------------------------------------------------------
def _intensity_samples(
    case: str, converted_root: str, modalities: Sequence[str], max_samples: int, seed: int
) -> dict[str, list[np.ndarray]]:
    """Per channel: sampled CT intensities inside instances and inside the body (fallback), for one case."""
    data = read_case(converted_root, case)
    rng = case_rng(seed, case)
    foreground = data.instance_map > 0
    samples: dict[str, list[np.ndarray]] = {"foreground": [], "body": []}
    for channel, modality in enumerate(modalities):
        values = data.image[channel]
        if not is_ct(modality):
            samples["foreground"].append(np.zeros(0, np.float32))
            samples["body"].append(np.zeros(0, np.float32))
            continue
        samples["foreground"].append(_sample(values[foreground], max_samples, rng))
        samples["body"].append(_sample(values[values > BODY_THRESHOLD_HU], max_samples, rng))
    return samples


def _plan_normalisation(
    per_case: Sequence[dict[str, list[np.ndarray]]], modalities: Sequence[str], converted_root: str,
    case_ids: Sequence[str], max_samples: int, seed: int,
) -> tuple[list[dict[str, Any]], str]:
    normalisation: list[dict[str, Any]] = []
    sources = set()
    for channel, modality in enumerate(modalities):
        if not is_ct(modality):
            normalisation.append({"scheme": "zscore"})
            continue
        for source in ("foreground", "body"):
            pooled = np.concatenate([case[source][channel] for case in per_case])
            if pooled.size:
                break
        else:
            # Neither instances nor body voxels anywhere: use all voxels (sampled per case).
            source = "all"
            pooled = np.concatenate(
                [
                    _sample(read_case(converted_root, case).image[channel].ravel(), max_samples, case_rng(seed, case))
                    for case in case_ids
                ]
            )
        sources.add(source)
        normalisation.append(ct_normalisation(pooled))
    return normalisation, ",".join(sorted(sources)) if sources else "none"


def _preprocess_case(
    case: str,
    converted_root: str,
    cases_dir: str,
    normalisation: Sequence[Mapping[str, Any]],
    target_spacing: Sequence[float],
    max_locations: int,
    seed: int,
) -> dict[str, Any]:
    """Normalise, resample and store one case; returns its metadata (also written to ``{case}.json``)."""
    data = read_case(converted_root, case)
    original_shape = tuple(int(s) for s in data.instance_map.shape)
    new_shape = resampled_shape(original_shape, data.spacing, target_spacing)
    image = resample_image(normalise(data.image, normalisation), new_shape)  # [C, *new_shape]
    seg, instances, old_ids = renumber_instances(resample_instance_map(data.instance_map, new_shape), data.instances)
    ids, boxes = boxes_from_instance_map(seg)
    meta = {
        "case_id": case,
        "instances": {str(k): v for k, v in instances.items()},
        "boxes": boxes.tolist(),
        "labels": [instances[int(i)] for i in ids],
        "original_shape": list(original_shape),
        "original_spacing": list(data.spacing),
        "spacing": [float(s) for s in target_spacing],
        "shape": list(new_shape),
        "origin": list(data.origin),
        "direction": list(data.direction),
        "original_instance_ids": {str(k): v for k, v in old_ids.items()},
        "dropped_instance_ids": sorted(set(data.instances) - set(old_ids.values())),
        "foreground_locations": sample_foreground_locations(seg, max_locations, case_rng(seed, case)),
    }
    cases = Path(cases_dir)
    with atomic_path(cases / f"{case}.npy") as tmp:
        np.save(tmp, image)
    with atomic_path(cases / f"{case}_seg.npy") as tmp:
        np.save(tmp, seg)
    write_json(cases / f"{case}.json", meta)
    return meta


def run_preprocessing(
    converted_root: str | os.PathLike,
    out_root: str | os.PathLike,
    num_folds: int,
    seed: int,
    settings: Mapping[str, Any],
) -> None:
    """Check, plan and preprocess a converted dataset into ``out_root`` (see the module docstring).

    Settings: ``target_spacing`` [z, y, x] mm (default: median spacing), ``num_workers`` (default 1),
    ``foreground_intensity_samples`` (per case, default 10000), ``foreground_locations`` (per case, default 1000).

    Example:
        >>> run_preprocessing("converted/synthetic", "preprocessed/synthetic", 5, 0, {})  # doctest: +SKIP
    """
    converted_root = str(converted_root)
    num_workers = _positive_int_setting(settings, "num_workers", DEFAULT_NUM_WORKERS)
    max_samples = _positive_int_setting(settings, "foreground_intensity_samples", DEFAULT_FOREGROUND_INTENSITY_SAMPLES)
    max_locations = _positive_int_setting(settings, "foreground_locations", DEFAULT_FOREGROUND_LOCATIONS, minimum=0)
    summary = check_converted_dataset(converted_root)
    if not summary.case_ids:
        raise DatasetFormatError.for_file(converted_root, "dataset holds no cases")
    splits = make_splits(summary.case_ids, num_folds, seed)  # fails early when there are too few cases
    original_median = median_spacing(summary.spacings[case] for case in summary.case_ids)
    target_spacing = _target_spacing_setting(settings) or original_median

    per_case_samples = _map_with_progress(
        functools.partial(
            _intensity_samples, converted_root=converted_root, modalities=summary.modalities,
            max_samples=max_samples, seed=seed,
        ),
        summary.case_ids, num_workers, desc=f"plan {summary.name}",
    )
    normalisation, foreground_source = _plan_normalisation(
        per_case_samples, summary.modalities, converted_root, summary.case_ids, max_samples, seed
    )

    with atomic_directory(out_root) as tmp:
        metas = _map_with_progress(
            functools.partial(
                _preprocess_case, converted_root=converted_root, cases_dir=str(tmp / CASES_DIR),
                normalisation=normalisation, target_spacing=target_spacing, max_locations=max_locations, seed=seed,
            ),
            summary.case_ids, num_workers, desc=f"preprocess {summary.name}",
        )
        write_json(tmp / SPLITS_FILE, splits)
        # extents of the boxes as data.boxes makes them (n voxels -> n + 1), as nnDetection's planner measures them
        box_sizes = [
            [box[3] - box[0], box[4] - box[1], box[5] - box[2]] for meta in metas for box in meta["boxes"]
        ]
        plan = {
            "dataset": summary.name,
            "target_spacing": [float(s) for s in target_spacing],
            "original_median_spacing": list(original_median),
            "modalities": list(summary.modalities),
            "normalisation": normalisation,
            "foreground_source": foreground_source,
            "num_classes": summary.num_classes,
            "class_names": list(summary.class_names),
            "median_shape": [int(v) for v in np.rint(np.median([meta["shape"] for meta in metas], axis=0))],
            "box_sizes": box_sizes,
            # per-case corner boxes in preprocessed voxels: the DETR plans its queries per patch from them
            "case_boxes": {meta["case_id"]: meta["boxes"] for meta in metas},
            "case_ids": list(summary.case_ids),
            "num_folds": int(num_folds),
            "seed": int(seed),
        }
        write_json(tmp / PLAN_FILE, plan)  # last: its presence marks a finished preprocessing


# ---- unlabelled pre-training corpora ---------------------------------------------------------------------
def _corpus_case_ids(corpus_root: Path) -> list[str]:
    if not corpus_root.is_dir():
        raise DatasetFormatError.for_file(corpus_root, "corpus folder is missing")
    cases = sorted(p.name[: -len(".nii.gz")] for p in corpus_root.glob("*.nii.gz") if not p.name.startswith("."))
    if not cases:
        raise DatasetFormatError.for_file(corpus_root, "corpus folder holds no .nii.gz volumes")
    return cases


def _corpus_geometry_and_samples(
    case: str, corpus_root: str, ct: bool, max_samples: int, seed: int
) -> tuple[dict[str, tuple], np.ndarray]:
    image = read_image(Path(corpus_root) / f"{case}.nii.gz")
    values = sitk.GetArrayFromImage(image)
    samples = _sample(values[values > BODY_THRESHOLD_HU], max_samples, case_rng(seed, case)) if ct else values[:0]
    return geometry_of(image), samples.astype(np.float32)


def _preprocess_corpus_case(
    case: str, corpus_root: str, cases_dir: str, normalisation: Sequence[Mapping[str, Any]],
    target_spacing: Sequence[float],
) -> list[int]:
    image = read_image(Path(corpus_root) / f"{case}.nii.gz")
    array = sitk.GetArrayFromImage(image).astype(np.float32)[None]  # [1, Z, Y, X]
    new_shape = resampled_shape(array.shape[1:], geometry_of(image)["spacing"], target_spacing)
    out = resample_image(normalise(array, normalisation), new_shape)
    with atomic_path(Path(cases_dir) / f"{case}.npy") as tmp:
        np.save(tmp, out)
    return list(new_shape)


def preprocess_corpus(corpus_root: str | os.PathLike, out_root: str | os.PathLike, settings: Mapping[str, Any]) -> None:
    """Preprocess unlabelled pre-training volumes ``{corpus_root}/{case}.nii.gz`` into ``out_root``.

    Target spacing from ``settings["target_spacing"]`` or the median spacing. CT (``settings["modality"]``,
    default CT): clip to the 0.5 / 99.5 percentiles of voxels above -500 HU ("body", pooled over the corpus,
    up to ``foreground_intensity_samples`` per volume, seeded by ``settings["seed"]``), then z-score with their
    mean and std; any other modality: per-volume z-score. Writes ``cases/{case}.npy`` (float32 ``[1, Z, Y, X]``)
    and ``plan.json`` last.

    Example:
        >>> preprocess_corpus("results/data/corpus/synthetic", "results/data/preprocessed_corpus/synthetic",
        ...                   {"target_spacing": [2, 2, 2]})  # doctest: +SKIP
    """
    corpus_root = Path(corpus_root)
    case_ids = _corpus_case_ids(corpus_root)
    num_workers = _positive_int_setting(settings, "num_workers", DEFAULT_NUM_WORKERS)
    max_samples = _positive_int_setting(settings, "foreground_intensity_samples", DEFAULT_FOREGROUND_INTENSITY_SAMPLES)
    seed = int(settings.get("seed", DEFAULT_CORPUS_SEED))
    modality = str(settings.get("modality", DEFAULT_CORPUS_MODALITY))
    ct = is_ct(modality)
    scanned = _map_with_progress(
        functools.partial(
            _corpus_geometry_and_samples, corpus_root=str(corpus_root), ct=ct, max_samples=max_samples, seed=seed
        ),
        case_ids, num_workers, desc=f"plan corpus {corpus_root.name}",
    )
    original_median = median_spacing(geometry["spacing"] for geometry, _ in scanned)
    target_spacing = _target_spacing_setting(settings) or original_median
    if ct:
        pooled = np.concatenate([samples for _, samples in scanned])
        if pooled.size == 0:
            raise DatasetFormatError.for_file(corpus_root, f"no voxel above {BODY_THRESHOLD_HU} HU in any CT volume")
        normalisation = [ct_normalisation(pooled)]
    else:
        normalisation = [{"scheme": "zscore"}]
    with atomic_directory(out_root) as tmp:
        shapes = _map_with_progress(
            functools.partial(
                _preprocess_corpus_case, corpus_root=str(corpus_root), cases_dir=str(tmp / CASES_DIR),
                normalisation=normalisation, target_spacing=target_spacing,
            ),
            case_ids, num_workers, desc=f"preprocess corpus {corpus_root.name}",
        )
        plan = {
            "corpus": corpus_root.name,
            "target_spacing": [float(s) for s in target_spacing],
            "original_median_spacing": list(original_median),
            "modalities": [modality],
            "normalisation": normalisation,
            "case_ids": case_ids,
            "shapes": {case: shape for case, shape in zip(case_ids, shapes)},
            "median_shape": [int(v) for v in np.rint(np.median(shapes, axis=0))],
            "num_cases": len(case_ids),
        }
        write_json(tmp / PLAN_FILE, plan)  # last: its presence marks a finished preprocessing
