"""Preprocessing as nnDetection plans it, through nnunetv2's own functions: crop, resample, normalise, store.

nnDetection's planner and preprocessor (``nndet/planning/experiment/v001.py``, ``nndet/preprocessing/``) keep
nnU-Net's rules; this module calls nnunetv2's implementations of them and adds what nnU-Net has no part for
(instance maps, boxes, foreground locations, resumable per-case output). Per case (:func:`preprocess_arrays`):

1. crop to the non-zero region (nnunetv2 ``crop_to_nonzero``: the bounding box of the hole-filled mask of
   voxels that are non-zero in any channel; outside the mask the label map holds -1 until normalisation);
2. resample image and instance map onto the target spacing (nnunetv2 ``resample_data_or_seg_to_shape``; image
   3rd-order spline, map order 0; ``force_separate_z`` False as nnDetection passes it, so no "separate z" unless
   the setting asks for nnU-Net's automatic rule with ``null``);
3. normalise each channel with the nnunetv2 scheme its modality names (``get_normalization_scheme``: ``CT`` ->
   ``CTNormalization``, clip to the 0.5 / 99.5 percentiles of the dataset's foreground intensities and z-score
   with their mean and std; anything else -> ``ZScoreNormalization`` per case, inside the non-zero mask when
   cropping reduced the median case below 3/4 of its size, zero outside). nnDetection normalises after
   resampling (nnU-Net before); this follows nnDetection.

Plan (:func:`plan_dataset`, from a per-case fingerprint as nnU-Net's ``DatasetFingerprintExtractor`` takes it):
target spacing by nnDetection's rule (:func:`nndetection_target_spacing`: the median, except for an anisotropic
dataset, whose coarse axis gets the 10th percentile), foreground intensities sampled per case by nnunetv2's
``collect_foreground_intensities``. A CT dataset without any instance falls back to "body" voxels (above
``BODY_THRESHOLD_HU``), then to all voxels; ``plan.json``'s ``foreground_source`` records which was used.

Tiny instances can vanish when downsampling; they are dropped from ``instances`` and the remaining ids are
renumbered 1..M in their original order (``original_instance_ids`` and ``dropped_instance_ids`` in the case's
JSON). Boxes are computed from the stored map, so they always agree with it. The resampling grid is
edge-aligned (skimage's ``resize``), so :func:`map_boxes_to_original` is exact for boxes made from masks.

Cases run in worker processes within a memory budget (:mod:`pretrain_det3d.data.workers`) and are written one
by one into ``.{out}.partial`` beside the output; a killed job reruns only the cases missing there (the folder
is discarded when the dataset or a setting that changes the result changed). When every case is done the folder
gets ``splits.json`` and ``plan.json`` (last) and replaces ``out_root``::

    plan.json, splits.json, cases/{case}.npy (float32 [C,Z,Y,X]), cases/{case}_seg.npy (int16 [Z,Y,X]),
    cases/{case}.json

Example:
    >>> run_preprocessing("results/data/converted/synthetic", "results/data/preprocessed/synthetic",
    ...                   num_folds=5, seed=0, settings={"num_workers": 2})  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import sys
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
from tqdm import tqdm

from pretrain_det3d.data.boxes import boxes_from_instance_map, instance_voxel_extents
from pretrain_det3d.data.dataset_format import DatasetFormatError, check_converted_dataset
from pretrain_det3d.data.io import load_npy, read_case
from pretrain_det3d.data.splits import NNUNET_SPLIT_SEED, load_splits
from pretrain_det3d.data.workers import map_cases, memory_budget_bytes
from pretrain_det3d.utils.atomic import atomic_path, write_json
from pretrain_det3d.settings.data import CorpusPreprocessingSettings, PreprocessingSettings


# ---- named defaults (settings keys in brackets) ----------------------------------------------------------
# defaults from the one definition of the settings (pretrain_det3d.settings.data)
DEFAULT_NUM_WORKERS = PreprocessingSettings.default("num_workers")
DEFAULT_FOREGROUND_INTENSITY_SAMPLES = PreprocessingSettings.default("foreground_intensity_samples")
DEFAULT_FOREGROUND_LOCATIONS = PreprocessingSettings.default("foreground_locations")
DEFAULT_FORCE_SEPARATE_Z = PreprocessingSettings.default("force_separate_z")
DEFAULT_ANISOTROPY_THRESHOLD = PreprocessingSettings.default("anisotropy_threshold")
DEFAULT_CORPUS_MODALITY = CorpusPreprocessingSettings.default("modality")
DEFAULT_CORPUS_SEED = CorpusPreprocessingSettings.default("seed")
CT_CLIP_PERCENTILES = (0.5, 99.5)
BODY_THRESHOLD_HU = -500.0  # voxels above this are "body" when a CT dataset has no instances, and in corpora
IMAGE_SPLINE_ORDER = 3  # nnDetection's order_data
SEG_ORDER = 0  # nnDetection's order_seg (nnU-Net's default 1 would one-hot every instance id)
ORDER_Z = 0  # nnU-Net's order along the coarse axis when it resamples it separately
#: nnU-Net/nnDetection use the non-zero mask for a z-score when cropping left the median case below this size
MASK_FOR_NORM_MAX_RELATIVE_SIZE = 3 / 4
NONZERO_LABEL = -1  # what nnunetv2's crop_to_nonzero writes outside the non-zero mask
#: bumped when a change here changes the stored cases: a partial run of an older version is discarded
PREPROCESSING_VERSION = 2

PLAN_FILE = "plan.json"
SPLITS_FILE = "splits.json"
CASES_DIR = "cases"
FINGERPRINT_DIR = "fingerprint"
STATE_FILE = "state.json"


# ---- small pure helpers ----------------------------------------------------------------------------------
def is_ct(modality: str) -> bool:
    """CT channels get the CT scheme; every other modality (MRI, ...) a per-case z-score."""
    return normalisation_scheme(modality) == "CT"


def normalisation_scheme(modality: str) -> str:
    """The scheme nnunetv2 picks for a channel named ``modality`` (``get_normalization_scheme``), by its name here.

    Example:
        >>> normalisation_scheme("CT"), normalisation_scheme("MRI"), normalisation_scheme("noNorm")
        ('CT', 'zscore', 'noNorm')
    """
    from nnunetv2.preprocessing.normalization.map_channel_name_to_normalization import get_normalization_scheme

    cls = get_normalization_scheme(str(modality).strip())
    names = {cls_.__name__: name for name, cls_ in _normalisation_classes().items()}
    return names[cls.__name__]


@functools.lru_cache(maxsize=None)
def _normalisation_classes() -> dict[str, type]:
    """Scheme names in ``plan.json`` -> nnunetv2's normalisation classes."""
    from nnunetv2.preprocessing.normalization.default_normalization_schemes import (
        CTNormalization,
        NoNormalization,
        RescaleTo01Normalization,
        RGBTo01Normalization,
        ZScoreNormalization,
    )

    return {"CT": CTNormalization, "zscore": ZScoreNormalization, "noNorm": NoNormalization,
            "rescale_to_0_1": RescaleTo01Normalization, "rgb_to_0_1": RGBTo01Normalization}


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


def nndetection_target_spacing(
    spacings: Iterable[Sequence[float]], shapes: Iterable[Sequence[int]],
    anisotropy_threshold: float = DEFAULT_ANISOTROPY_THRESHOLD,
) -> tuple[float, float, float]:
    """nnDetection's target spacing (``_target_spacing_base``, nnU-Net v1's "v21" rule) from the cases' spacings
    and their shapes after cropping.

    The median spacing, unless the dataset is anisotropic: the median's coarsest axis is more than
    ``anisotropy_threshold`` times the finest other axis *and* the median shape has fewer than
    1 / ``anisotropy_threshold`` as many voxels on it as on the smallest other axis. Then that axis takes the
    10th percentile of its spacings, but never less than the finest other axis (+1e-5). nnunetv2's planner
    compares with the coarsest other axis instead (``max``); the two agree unless the other axes differ.

    Example:
        >>> nndetection_target_spacing([(5, .7, .7), (5, .7, .7), (2.5, .7, .7)], [(40, 512, 512)] * 3)
        (3.0, 0.7, 0.7)
        >>> nndetection_target_spacing([(5, .7, .7)] * 3, [(200, 512, 512)] * 3)  # enough slices: the median
        (5.0, 0.7, 0.7)
    """
    spacings = np.asarray(list(spacings), dtype=np.float64)
    shapes = np.asarray(list(shapes), dtype=np.float64)
    if spacings.ndim != 2 or spacings.shape[1] != 3 or len(spacings) == 0 or shapes.shape != spacings.shape:
        raise ValueError(f"expected (z, y, x) spacings and shapes per case, got {spacings.shape} and {shapes.shape}")
    target = np.percentile(spacings, 50, axis=0)
    median_shape = np.percentile(shapes, 50, axis=0)
    coarse = int(np.argmax(target))
    others = [axis for axis in range(3) if axis != coarse]
    finest_other = min(target[others])
    anisotropic_spacing = target[coarse] > anisotropy_threshold * finest_other
    few_voxels = median_shape[coarse] * anisotropy_threshold < min(median_shape[others])
    if anisotropic_spacing and few_voxels:
        low = float(np.percentile(spacings[:, coarse], 10))
        if low < finest_other:
            low = max(finest_other, low) + 1e-5
        target[coarse] = low
    return tuple(float(v) for v in target)


def resampled_shape(
    shape: Sequence[int], spacing: Sequence[float], target_spacing: Sequence[float]
) -> tuple[int, int, int]:
    """Shape that keeps the physical extent at ``target_spacing``: nnunetv2's ``compute_new_shape`` (rounded),
    at least one voxel per axis.

    Example:
        >>> resampled_shape((10, 64, 64), (2.0, 1.0, 1.0), (1.0, 2.0, 2.0))
        (20, 32, 32)
    """
    from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape

    new_shape = compute_new_shape([int(n) for n in shape], [float(s) for s in spacing],
                                  [float(s) for s in target_spacing])
    return tuple(max(int(n), 1) for n in new_shape)


def _resample(
    array: np.ndarray, new_shape: Sequence[int], spacing: Sequence[float] | None,
    target_spacing: Sequence[float] | None, is_seg: bool, force_separate_z: bool | None,
    anisotropy_threshold: float,
) -> np.ndarray:
    from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape

    if spacing is None or target_spacing is None:
        if force_separate_z is not False:
            raise ValueError("separate-z resampling needs the current and the target spacing")
        spacing = target_spacing = (1.0, 1.0, 1.0)  # not used without separate z
    return resample_data_or_seg_to_shape(
        array, [int(n) for n in new_shape], [float(s) for s in spacing], [float(s) for s in target_spacing],
        is_seg=is_seg, order=SEG_ORDER if is_seg else IMAGE_SPLINE_ORDER, order_z=ORDER_Z,
        force_separate_z=force_separate_z, separate_z_anisotropy_threshold=float(anisotropy_threshold),
    )


def resample_image(
    image: np.ndarray, new_shape: Sequence[int], spacing: Sequence[float] | None = None,
    target_spacing: Sequence[float] | None = None, force_separate_z: bool | None = DEFAULT_FORCE_SEPARATE_Z,
    anisotropy_threshold: float = DEFAULT_ANISOTROPY_THRESHOLD,
) -> np.ndarray:
    """Resample ``[C, Z, Y, X]`` to ``[C, *new_shape]`` with nnunetv2's ``resample_data_or_seg_to_shape``
    (3rd-order spline on skimage's edge-aligned grid; with separate z, order 0 along the coarse axis).

    ``force_separate_z``: False (nnDetection) never resamples an axis separately, True always does, None applies
    nnU-Net's rule (an axis more than ``anisotropy_threshold`` times coarser than the finest, in the current or
    the target spacing); True and None need ``spacing`` and ``target_spacing``.

    Example:
        >>> resample_image(np.ones((1, 4, 4, 4), np.float32), (2, 8, 8)).shape
        (1, 2, 8, 8)
    """
    image = np.asarray(image, dtype=np.float32)
    out = _resample(image, new_shape, spacing, target_spacing, False, force_separate_z, anisotropy_threshold)
    return np.asarray(out, dtype=np.float32)


def resample_instance_map(
    instance_map: np.ndarray, new_shape: Sequence[int], spacing: Sequence[float] | None = None,
    target_spacing: Sequence[float] | None = None, force_separate_z: bool | None = DEFAULT_FORCE_SEPARATE_Z,
    anisotropy_threshold: float = DEFAULT_ANISOTROPY_THRESHOLD,
) -> np.ndarray:
    """Resample an instance map ``[Z, Y, X]`` with order 0 on the grid of :func:`resample_image` (nnunetv2, as a
    segmentation: ids are never blended); same ``force_separate_z`` rule.

    Example:
        >>> m = np.zeros((4, 4, 4), np.int16); m[1, 1, 1] = 1
        >>> int(resample_instance_map(m, (8, 8, 8)).sum())  # each voxel becomes 2 x 2 x 2
        8
    """
    out = _resample(np.asarray(instance_map)[None], new_shape, spacing, target_spacing, True, force_separate_z,
                    anisotropy_threshold)
    return np.asarray(out[0], dtype=np.asarray(instance_map).dtype)


def crop_to_nonzero(image: np.ndarray, instance_map: np.ndarray | None = None
                    ) -> tuple[np.ndarray, np.ndarray, list[list[int]]]:
    """nnunetv2's ``crop_to_nonzero``: ``(cropped [C, ...], label map [Z, Y, X] with -1 outside the non-zero mask,
    bounding box [[z0, z1], [y0, y1], [x0, x1]])``; without an instance map the label map is 0 / -1.

    Example:
        >>> image = np.zeros((1, 4, 5, 6), np.float32); image[0, 1:3, 2:4, 1:6] = 1
        >>> crop_to_nonzero(image)[2]
        [[1, 3], [2, 4], [1, 6]]
    """
    from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero as nnunet_crop

    seg = None if instance_map is None else np.array(instance_map, dtype=np.int32)[None]  # copied: modified
    cropped, seg, bbox = nnunet_crop(image, seg, nonzero_label=NONZERO_LABEL)
    return cropped, np.asarray(seg[0]), [[int(low), int(high)] for low, high in bbox]


def renumber_instances(
    instance_map: np.ndarray, instances: Mapping[int, int]
) -> tuple[np.ndarray, dict[int, int], dict[int, int]]:
    """Drop ids absent from ``instance_map`` and renumber the rest 1..M in ascending order of the old ids.

    Returns ``(int16 map, {new_id: class}, {new_id: old_id})``; values <= 0 become background.

    Example:
        >>> m = np.array([[[0, 3, 1]]]); new_map, classes, old = renumber_instances(m, {1: 0, 2: 1, 3: 1})
        >>> new_map.tolist(), classes, old
        ([[[0, 2, 1]]], {1: 0, 2: 1}, {1: 1, 2: 3})
    """
    instance_map = np.maximum(instance_map, 0)
    present = [int(i) for i in np.unique(instance_map) if i > 0]
    lookup = np.zeros(int(max(present, default=0)) + 1, dtype=np.int16)
    old_ids = {}
    for new_id, old_id in enumerate(present, start=1):
        lookup[old_id] = new_id
        old_ids[new_id] = old_id
    new_map = lookup[instance_map] if present else np.zeros(instance_map.shape, dtype=np.int16)
    return new_map.astype(np.int16, copy=False), {n: int(instances[o]) for n, o in old_ids.items()}, old_ids


def ct_normalisation(samples: np.ndarray) -> dict[str, Any]:
    """The CT scheme's parameters from pooled intensity samples, as nnunetv2's fingerprint computes them:
    clip bounds (0.5 / 99.5 %), mean, std.

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
        "use_mask_for_norm": False,
    }


def normalise(
    image: np.ndarray, normalisation: Sequence[Mapping[str, Any]], label_map: np.ndarray | None = None
) -> np.ndarray:
    """Normalise ``[C, Z, Y, X]`` channel by channel with nnunetv2's class for each plan entry's ``scheme``.

    ``CT`` takes the entry's ``lower`` / ``upper`` / ``mean`` / ``std``; with ``use_mask_for_norm`` a scheme
    normalises inside ``label_map >= 0`` only (the non-zero mask of :func:`crop_to_nonzero`) and the voxels
    outside become 0, as nnDetection's ``normalize_other`` leaves them.

    Example:
        >>> normalise(np.array([[[[0.0, 10.0]]]]), [{"scheme": "CT", "lower": 2, "upper": 8, "mean": 5, "std": 3}])
        array([[[[-1.,  1.]]]], dtype=float32)
    """
    if len(normalisation) != image.shape[0]:
        raise ValueError(f"{len(normalisation)} normalisation entries for {image.shape[0]} channels")
    classes = _normalisation_classes()
    out = np.empty(image.shape, dtype=np.float32)
    for channel, scheme in enumerate(normalisation):
        name = scheme["scheme"]
        if name not in classes:
            raise ValueError(f"unknown normalisation scheme {name!r}; known: {', '.join(classes)}")
        use_mask = bool(scheme.get("use_mask_for_norm", False))
        if use_mask and label_map is None:
            raise ValueError(f"channel {channel}: use_mask_for_norm needs the non-zero mask (label map)")
        properties = {}
        if name == "CT":
            properties = {"mean": scheme["mean"], "std": scheme["std"], "percentile_00_5": scheme["lower"],
                          "percentile_99_5": scheme["upper"]}
        normaliser = classes[name](use_mask_for_norm=use_mask, intensityproperties=properties)
        values = np.array(image[channel], dtype=np.float32)  # a copy: nnunetv2 normalises in place
        out[channel] = normaliser.run(values, label_map)
        if use_mask:
            out[channel][label_map < 0] = 0
    return out


def preprocess_arrays(
    image: np.ndarray, instance_map: np.ndarray | None, spacing: Sequence[float], plan: Mapping[str, Any]
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Crop, resample and normalise one case with ``plan`` (the steps of the module docstring).

    Returns ``(image float32 [C, *shape], label map int32 [*shape] (instance ids; -1 outside the non-zero mask),
    geometry)`` with ``geometry = {"crop_bbox", "cropped_shape", "shape"}``, which :func:`map_boxes_to_original`
    reads. Training cases, held-out test cases and new scans all go through here. A plan without
    ``crop_to_nonzero`` (written before this module cropped) is applied without a crop.

    Example:
        >>> image, seg, geometry = preprocess_arrays(image, None, (5.0, 0.7, 0.7), plan)  # doctest: +SKIP
    """
    if image.shape[0] != len(plan["normalisation"]):
        raise ValueError(f"the image has {image.shape[0]} channel(s), the plan {len(plan['normalisation'])}")
    image = np.nan_to_num(np.asarray(image, dtype=np.float32), nan=0.0)  # nnDetection sets NaN to 0
    if plan.get("crop_to_nonzero", False):  # plans written before cropping was added lack the key: no crop
        image, label_map, bbox = crop_to_nonzero(image, instance_map)
    else:
        label_map = np.zeros(image.shape[1:], np.int32) if instance_map is None else np.asarray(instance_map)
        bbox = [[0, int(n)] for n in image.shape[1:]]
    cropped_shape = tuple(int(n) for n in image.shape[1:])
    target_spacing = plan["target_spacing"]
    new_shape = resampled_shape(cropped_shape, spacing, target_spacing)
    options = {"force_separate_z": plan.get("force_separate_z", DEFAULT_FORCE_SEPARATE_Z),
               "anisotropy_threshold": plan.get("anisotropy_threshold", DEFAULT_ANISOTROPY_THRESHOLD)}
    image = resample_image(image, new_shape, spacing, target_spacing, **options)
    label_map = resample_instance_map(label_map.astype(np.int32, copy=False), new_shape, spacing, target_spacing,
                                      **options)
    image = normalise(image, plan["normalisation"], label_map)
    geometry = {"crop_bbox": bbox, "cropped_shape": list(cropped_shape), "shape": list(new_shape)}
    return image, label_map, geometry


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

    With ``r = cropped_shape / shape`` per axis (the crop's size; the whole image without a crop), preprocessed
    voxels ``first..last`` cover cropped voxels ``first * r .. (last + 1) * r - 1`` (the edge-aligned resampling
    grid), so a box ``[first - 1, last + 1]`` (the convention of :mod:`pretrain_det3d.data.boxes`) goes to
    ``[(min + 1) * r - 1, max * r]``, then moves by the crop's start (``crop_bbox``): exactly the box of the
    converted mask when ``r`` makes whole voxels, and the centre mapped as the voxel centres are
    (``c -> (c + 0.5) * r - 0.5 + start``). nnDetection's ``restore_detection`` only scales (``min * r``), which
    puts the low side ``r - 1`` voxels off. ``clip`` (on by default: the mapped boxes are predictions) then
    clips to ``[0, original_shape]`` per axis, nnDetection's clipping of predicted boxes to the image.

    Example:
        >>> map_boxes_to_original([[1, 2, 2, 3, 4, 4]], {"shape": [8, 8, 8], "original_shape": [16, 8, 4]})
        array([[3. , 2. , 0.5, 6. , 4. , 2. ]])
        >>> map_boxes_to_original([[1, 2, 2, 3, 4, 4]], {"shape": [8, 8, 8], "original_shape": [20, 8, 6],
        ...                        "cropped_shape": [16, 8, 4], "crop_bbox": [[4, 20], [0, 8], [1, 5]]})
        array([[ 7. ,  2. ,  1.5, 10. ,  4. ,  3. ]])
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 6)
    original_shape = np.asarray(case_meta["original_shape"], dtype=np.float64)
    cropped_shape = np.asarray(case_meta.get("cropped_shape", original_shape), dtype=np.float64)
    start = np.asarray([low for low, _ in case_meta.get("crop_bbox", [[0, 0]] * 3)], dtype=np.float64)
    ratio = cropped_shape / np.asarray(case_meta["shape"], dtype=np.float64)
    mapped = np.concatenate([(boxes[:, :3] + 1.0) * ratio - 1.0 + start, boxes[:, 3:] * ratio + start], axis=1)
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


def _resampling_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    force = settings.get("force_separate_z", DEFAULT_FORCE_SEPARATE_Z)
    if force not in (True, False, None):
        raise ValueError(f"preprocessing settings key 'force_separate_z' must be true, false or null, got {force!r}")
    threshold = settings.get("anisotropy_threshold", DEFAULT_ANISOTROPY_THRESHOLD)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or threshold <= 1:
        raise ValueError(f"preprocessing settings key 'anisotropy_threshold' must be a number > 1, got {threshold!r}")
    return {"force_separate_z": force, "anisotropy_threshold": float(threshold)}


def _memory_setting(settings: Mapping[str, Any]) -> float | None:
    value = settings.get("memory_gb")
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
        raise ValueError(f"preprocessing settings key 'memory_gb' must be a number > 0 (GiB), got {value!r}")
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


# ---- memory per case -------------------------------------------------------------------------------------
def fingerprint_memory_bytes(shape: Sequence[int], channels: int) -> int:
    """Peak memory of fingerprinting one case of ``shape`` (z, y, x) with ``channels`` channels (bytes).

    Reading holds the file's voxels in SimpleITK and as float32, the instance map as int32 (and its int64
    copy), and cropping a few boolean and integer masks of the full size; measured with tracemalloc plus the
    SimpleITK buffers it cannot see. Measured peaks (tracemalloc and resident-set growth, one CT channel) were
    0.4-0.6 of this estimate for 60 x 256^2 and 40 x 512^2 cases; ``tests/test_data_preprocessing.py`` checks
    the bound.

    Example:
        >>> fingerprint_memory_bytes((100, 512, 512), 1) / 2**30  # doctest: +ELLIPSIS
        1.0...
    """
    voxels = float(np.prod([int(n) for n in shape]))
    return int(voxels * (channels * (4 + 4) + 8 + 8 + 16) + 64 * 2**20)


def preprocess_memory_bytes(cropped_shape: Sequence[int], new_shape: Sequence[int], channels: int,
                            original_shape: Sequence[int] | None = None, separate_z: bool = False) -> int:
    """Peak memory of preprocessing one case (bytes): reading and cropping as :func:`fingerprint_memory_bytes`,
    then nnunetv2's resampling (float64 copies of the cropped channels and label map, a float64 output per
    channel, the float32 result; separate z adds its coordinate grids, 6 x float64 per new voxel). Measured
    peaks were 0.5-0.65 of the estimate (40 x 512^2 at 5 mm to 1.5 mm, with and without separate z).

    Example:
        >>> round(preprocess_memory_bytes((100, 512, 512), (250, 360, 360), 1) / 2**30, 1)
        2.7
    """
    cropped = float(np.prod([int(n) for n in cropped_shape]))
    new = float(np.prod([int(n) for n in new_shape]))
    per_new = channels * 4 + 8 + 8 + 8 + 4 + 2 + (48 + 8 if separate_z else 0)
    return int(fingerprint_memory_bytes(original_shape or cropped_shape, channels) + cropped * (channels * 8 + 16)
               + new * per_new)


# ---- labelled datasets: resumable work folder --------------------------------------------------------------
def work_folder(out_root: str | os.PathLike) -> Path:
    """Where a preprocessing run keeps its finished cases until all are done: ``.{name}.partial`` beside
    ``out_root`` (outside the folder Snakemake removes when a job fails)."""
    out_root = Path(out_root)
    return out_root.parent / f".{out_root.name}.partial"


def _dataset_files_key(converted_root: Path) -> list[list[Any]]:
    """Name, size and modification time of every file of the converted dataset: a reconverted dataset differs."""
    rows = []
    for path in sorted(p for p in converted_root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        stat = path.stat()
        rows.append([str(path.relative_to(converted_root)), stat.st_size, stat.st_mtime_ns])
    return rows


def _prepare_work_folder(work: Path, key: Mapping[str, Any]) -> int:
    """Keep ``work`` if it was started with the same ``key``, else start it afresh; returns the cases kept."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    state = work / STATE_FILE
    if work.is_dir():
        try:
            same = json.loads(state.read_text()).get("key") == digest
        except (OSError, ValueError):
            same = False
        if same:
            return len(list((work / CASES_DIR).glob("*.json")))
        shutil.rmtree(work)
    (work / CASES_DIR).mkdir(parents=True)
    (work / FINGERPRINT_DIR).mkdir()
    write_json(state, {"key": digest, "version": PREPROCESSING_VERSION})
    return 0


def _publish(work: Path, out_root: Path) -> None:
    """Replace ``out_root`` by the finished work folder (one rename; the old output is removed first)."""
    (work / STATE_FILE).unlink()
    if out_root.exists():
        shutil.rmtree(out_root)
    os.replace(work, out_root)


# ---- labelled datasets: fingerprint and plan ---------------------------------------------------------------
def _fingerprint_case(case: str, converted_root: str, work: str, max_samples: int, seed: int) -> dict[str, Any]:
    """Crop one case and sample its intensities (nnunetv2's ``collect_foreground_intensities`` for the foreground;
    body and all voxels for the fallbacks). Kept in ``fingerprint/{case}.json`` / ``.npz`` for a rerun."""
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor

    folder = Path(work) / FINGERPRINT_DIR
    record_path = folder / f"{case}.json"
    if record_path.is_file():
        return json.loads(record_path.read_text())
    data = read_case(converted_root, case)
    image = np.nan_to_num(data.image, nan=0.0, copy=False)  # as preprocess_arrays (nnunetv2 refuses NaN here)
    image, label_map, bbox = crop_to_nonzero(image, data.instance_map)
    foreground, _ = DatasetFingerprintExtractor.collect_foreground_intensities(
        label_map[None], image, num_samples=max_samples)
    rng = case_rng(seed, case)
    samples = {}
    for channel in range(image.shape[0]):
        values = image[channel]
        samples[f"foreground_{channel}"] = np.asarray(foreground[channel], dtype=np.float32)
        samples[f"body_{channel}"] = _sample(values[values > BODY_THRESHOLD_HU], max_samples, rng).astype(np.float32)
        samples[f"all_{channel}"] = _sample(values.ravel(), max_samples, rng).astype(np.float32)
    with atomic_path(folder / f"{case}.npz") as tmp:
        np.savez(tmp, **samples)
    shape = [int(n) for n in data.instance_map.shape]
    cropped = [int(n) for n in image.shape[1:]]
    record = {"case": case, "spacing": [float(s) for s in data.spacing], "shape": shape, "shape_after_crop": cropped,
              "crop_bbox": bbox, "relative_size_after_crop": float(np.prod(cropped) / np.prod(shape)),
              "channels": int(image.shape[0])}
    write_json(record_path, record)  # last: marks the case's fingerprint done
    return record


def _pooled_samples(work: Path, case_ids: Sequence[str], source: str, channel: int) -> np.ndarray:
    arrays = []
    for case in case_ids:
        with np.load(work / FINGERPRINT_DIR / f"{case}.npz") as samples:
            arrays.append(samples[f"{source}_{channel}"])
    return np.concatenate(arrays)


def plan_dataset(
    fingerprints: Sequence[Mapping[str, Any]], modalities: Sequence[str], pooled: Callable[[str, int], np.ndarray],
    settings: Mapping[str, Any],
) -> dict[str, Any]:
    """The plan's preprocessing part from the cases' fingerprints (nnDetection's rules, nnunetv2's schemes).

    ``pooled(source, channel)`` returns the pooled intensity samples of ``source`` ("foreground", "body",
    "all") for one channel. Returns ``target_spacing``, ``normalisation`` (per channel), ``foreground_source``,
    ``force_separate_z``, ``anisotropy_threshold``, ``crop_to_nonzero`` and ``original_median_spacing``.

    Example:
        >>> plan = plan_dataset(fingerprints, ["CT"], pooled, {})  # doctest: +SKIP
    """
    spacings = [f["spacing"] for f in fingerprints]
    resampling = _resampling_settings(settings)
    target_spacing = _target_spacing_setting(settings) or nndetection_target_spacing(
        spacings, [f["shape_after_crop"] for f in fingerprints], resampling["anisotropy_threshold"])
    relative_size = float(np.median([f["relative_size_after_crop"] for f in fingerprints]))
    normalisation: list[dict[str, Any]] = []
    sources = set()
    for channel, modality in enumerate(modalities):
        scheme = normalisation_scheme(modality)
        if scheme != "CT":
            # nnU-Net's rule (nnDetection's for non-CT): the non-zero mask when cropping shrank the median case
            use_mask = scheme == "zscore" and relative_size < MASK_FOR_NORM_MAX_RELATIVE_SIZE
            normalisation.append({"scheme": scheme, "use_mask_for_norm": bool(use_mask)})
            continue
        for source in ("foreground", "body", "all"):
            samples = pooled(source, channel)
            if samples.size:
                break
        sources.add(source)
        normalisation.append(ct_normalisation(samples))
    return {
        "target_spacing": [float(s) for s in target_spacing],
        "original_median_spacing": list(median_spacing(spacings)),
        "normalisation": normalisation,
        "foreground_source": ",".join(sorted(sources)) if sources else "none",
        "median_relative_size_after_crop": relative_size,
        "crop_to_nonzero": True,
        **resampling,
    }


# ---- labelled datasets: cases --------------------------------------------------------------------------------
def _preprocess_case(
    case: str,
    converted_root: str,
    cases_dir: str,
    plan: Mapping[str, Any],
    max_locations: int,
    seed: int,
) -> dict[str, Any]:
    """Crop, resample, normalise and store one case; returns its metadata (also written to ``{case}.json``,
    last, so that a rerun keeps a case whose JSON exists)."""
    cases = Path(cases_dir)
    meta_path = cases / f"{case}.json"
    if meta_path.is_file():
        return json.loads(meta_path.read_text())
    data = read_case(converted_root, case)
    original_shape = tuple(int(s) for s in data.instance_map.shape)
    image, label_map, geometry = preprocess_arrays(data.image, data.instance_map, data.spacing, plan)
    seg, instances, old_ids = renumber_instances(label_map, data.instances)
    ids, boxes = boxes_from_instance_map(seg)
    meta = {
        "case_id": case,
        "instances": {str(k): v for k, v in instances.items()},
        "boxes": boxes.tolist(),
        "labels": [instances[int(i)] for i in ids],
        "original_shape": list(original_shape),
        "original_spacing": list(data.spacing),
        "spacing": [float(s) for s in plan["target_spacing"]],
        "shape": geometry["shape"],
        "crop_bbox": geometry["crop_bbox"],
        "cropped_shape": geometry["cropped_shape"],
        "origin": list(data.origin),
        "direction": list(data.direction),
        "original_instance_ids": {str(k): v for k, v in old_ids.items()},
        "dropped_instance_ids": sorted(set(data.instances) - set(old_ids.values())),
        "foreground_locations": sample_foreground_locations(seg, max_locations, case_rng(seed, case)),
    }
    with atomic_path(cases / f"{case}.npy") as tmp:
        np.save(tmp, image)
    with atomic_path(cases / f"{case}_seg.npy") as tmp:
        np.save(tmp, seg)
    write_json(meta_path, meta)
    return meta


def _import_nnunet() -> None:
    """Import nnunetv2's modules (and torch with them) once in the parent: forked workers inherit them instead
    of importing them per process (seconds each)."""
    import nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor  # noqa: F401
    import nnunetv2.preprocessing.resampling.default_resampling  # noqa: F401


def _will_separate_z(spacing: Sequence[float], plan: Mapping[str, Any]) -> bool:
    from nnunetv2.preprocessing.resampling.default_resampling import determine_do_sep_z_and_axis

    return bool(determine_do_sep_z_and_axis(plan["force_separate_z"], spacing, plan["target_spacing"],
                                            plan["anisotropy_threshold"])[0])


def run_preprocessing(
    converted_root: str | os.PathLike,
    out_root: str | os.PathLike,
    num_folds: int,
    seed: int,
    settings: Mapping[str, Any],
) -> None:
    """Check, plan and preprocess a converted dataset into ``out_root`` (see the module docstring).

    ``seed`` seeds the sampling of intensities (fallbacks) and foreground locations; the folds use
    ``settings["split_seed"]`` (nnU-Net's 12345) or ``settings["splits_file"]``. Settings:
    :class:`pretrain_det3d.settings.data.PreprocessingSettings`.

    Example:
        >>> run_preprocessing("converted/synthetic", "preprocessed/synthetic", 5, 0, {})  # doctest: +SKIP
    """
    converted_root, out_root = Path(converted_root), Path(out_root)
    num_workers = _positive_int_setting(settings, "num_workers", DEFAULT_NUM_WORKERS)
    max_samples = _positive_int_setting(settings, "foreground_intensity_samples", DEFAULT_FOREGROUND_INTENSITY_SAMPLES)
    max_locations = _positive_int_setting(settings, "foreground_locations", DEFAULT_FOREGROUND_LOCATIONS, minimum=0)
    split_seed = settings.get("split_seed", NNUNET_SPLIT_SEED)
    if isinstance(split_seed, bool) or not isinstance(split_seed, int):
        raise ValueError(f"preprocessing settings key 'split_seed' must be an integer, got {split_seed!r}")
    budget = memory_budget_bytes(_memory_setting(settings))
    _target_spacing_setting(settings), _resampling_settings(settings)  # bad values fail before any work
    _import_nnunet()
    summary = check_converted_dataset(converted_root)
    if not summary.case_ids:
        raise DatasetFormatError.for_file(converted_root, "dataset holds no cases")
    # fails early: too few cases, or a splits file that does not fit the dataset
    splits = load_splits(summary.case_ids, num_folds, settings.get("splits_file"), split_seed)

    work = work_folder(out_root)
    key = {"version": PREPROCESSING_VERSION, "files": _dataset_files_key(converted_root), "seed": int(seed),
           "settings": {k: settings.get(k) for k in ("target_spacing", "foreground_intensity_samples",
                                                      "foreground_locations", "force_separate_z",
                                                      "anisotropy_threshold")}}
    kept = _prepare_work_folder(work, key)
    if kept:
        tqdm.write(f"preprocess {summary.name}: resuming, {kept} of {len(summary.case_ids)} cases already done "
                   f"in {work}", file=sys.stderr)
    channels = len(summary.modalities)
    fingerprints = map_cases(
        functools.partial(_fingerprint_case, converted_root=str(converted_root), work=str(work),
                          max_samples=max_samples, seed=seed),
        summary.case_ids, [fingerprint_memory_bytes(summary.shapes[c], channels) for c in summary.case_ids],
        num_workers, budget, desc=f"plan {summary.name}",
    )
    plan_core = plan_dataset(fingerprints, summary.modalities,
                             lambda source, channel: _pooled_samples(work, summary.case_ids, source, channel),
                             settings)
    estimates = []
    for fingerprint in fingerprints:
        new_shape = resampled_shape(fingerprint["shape_after_crop"], fingerprint["spacing"],
                                    plan_core["target_spacing"])
        estimates.append(preprocess_memory_bytes(fingerprint["shape_after_crop"], new_shape, channels,
                                                 fingerprint["shape"],
                                                 _will_separate_z(fingerprint["spacing"], plan_core)))

    def progress_line(case: str, meta: Mapping[str, Any], seconds: float) -> str:
        return (f"preprocess {summary.name}: {case} {meta['original_shape']} -> crop {meta['cropped_shape']} -> "
                f"{meta['shape']} ({len(meta['boxes'])} boxes, {seconds:.1f} s)")

    metas = map_cases(
        functools.partial(_preprocess_case, converted_root=str(converted_root), cases_dir=str(work / CASES_DIR),
                          plan=plan_core, max_locations=max_locations, seed=seed),
        summary.case_ids, estimates, num_workers, budget, desc=f"preprocess {summary.name}", on_done=progress_line,
    )
    write_json(work / SPLITS_FILE, splits)
    # extents of the boxes as data.boxes makes them (n voxels -> n + 1), as nnDetection's planner measures them
    box_sizes = [[box[3] - box[0], box[4] - box[1], box[5] - box[2]] for meta in metas for box in meta["boxes"]]
    plan = {
        "dataset": summary.name,
        **plan_core,
        "modalities": list(summary.modalities),
        "num_classes": summary.num_classes,
        "class_names": list(summary.class_names),
        "median_shape": [int(v) for v in np.rint(np.median([meta["shape"] for meta in metas], axis=0))],
        "box_sizes": box_sizes,
        # per-case corner boxes in preprocessed voxels: the DETR plans its queries per patch from them
        "case_boxes": {meta["case_id"]: meta["boxes"] for meta in metas},
        "case_ids": list(summary.case_ids),
        "num_folds": int(num_folds),
        "seed": int(seed),
        "splits": {"source": str(settings["splits_file"]) if settings.get("splits_file") else "generate_crossval_split",
                   "seed": None if settings.get("splits_file") else int(split_seed)},
    }
    write_json(work / PLAN_FILE, plan)  # last: its presence marks a finished preprocessing
    shutil.rmtree(work / FINGERPRINT_DIR)
    _publish(work, out_root)


# ---- unlabelled pre-training corpora ---------------------------------------------------------------------
def preprocess_corpus(corpus_root: str | os.PathLike, out_root: str | os.PathLike, settings: Mapping[str, Any]) -> None:
    """Preprocess the unlabelled volumes found below ``corpus_root`` (NIfTI, MHA/MHD, NRRD, DICOM series) into
    ``out_root`` in one process: :func:`pretrain_det3d.data.corpus.prepare_corpus` with one shard.

    ``settings`` are ``pretraining.corpus.preprocessing``. The folder counts as a synthetic corpus, so
    normalisation 'auto' keeps this function's scheme from before real sources: CT (``modality``, default CT)
    clips to the 0.5 / 99.5 percentiles of voxels above -500 HU ("body", pooled over the corpus, up to
    ``foreground_intensity_samples`` per volume, seeded by ``seed``) and z-scores with their mean and std; any
    other modality z-scores each volume. Target spacing: ``target_spacing`` or the median. Writes
    ``cases/{case}.npy`` (float32 ``[1, Z, Y, X]``), ``failures.json`` and ``plan.json`` last; an unreadable
    volume fails the call (``max_failure_fraction`` 0 here; the workflow's rules have the setting).

    Example:
        >>> preprocess_corpus("results/data/corpus/synthetic", "results/data/preprocessed_corpus/synthetic",
        ...                   {"target_spacing": [2, 2, 2]})  # doctest: +SKIP
    """
    from pretrain_det3d.data.corpus import prepare_corpus

    corpus_root = Path(corpus_root)
    if not corpus_root.is_dir():
        raise DatasetFormatError.for_file(corpus_root, "corpus folder is missing")
    prepare_corpus({"source": "synthetic", "folders": [str(corpus_root)]}, out_root, settings,
                   max_failure_fraction=0.0, name=corpus_root.name)
