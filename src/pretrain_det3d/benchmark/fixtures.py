"""Synthetic preprocessed cases for the benchmark, written straight in the preprocessed format.

The benchmark needs arrays of a chosen size quickly, not realistic images: each case is Gaussian noise with a
few bright spheres, stored exactly as ``data.preprocessing`` stores cases (``cases/{case}.npy`` float32
``[C,Z,Y,X]``, ``cases/{case}_seg.npy`` int16 instance map, ``cases/{case}.json``) plus a ``plan.json`` with the
keys detectors read (``num_classes``, ``modalities``, ``box_sizes``). A real preprocessed dataset can be
benchmarked instead (``BenchmarkSettings.preprocessed``).

Example:
    >>> cases = write_benchmark_cases("/tmp/bench", num_cases=2, shape=(32, 32, 32), seed=0)  # doctest: +SKIP
    >>> cases  # doctest: +SKIP
    ['bench_000', 'bench_001']
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from pretrain_det3d.data.boxes import boxes_from_instance_map
from pretrain_det3d.utils.atomic import write_json

DEFAULT_LESIONS_PER_CASE = 3
LESION_RADIUS_RANGE = (2, 6)  # voxels
LESION_INTENSITY = 2.0  # above the unit-variance background, like a normalised bright lesion
FOREGROUND_LOCATION_SAMPLES = 200


def _case_id(index: int) -> str:
    return f"bench_{index:03d}"


def write_benchmark_cases(
    root: str | os.PathLike,
    num_cases: int,
    shape: Sequence[int],
    seed: int,
    lesions_per_case: int = DEFAULT_LESIONS_PER_CASE,
) -> list[str]:
    """Write ``num_cases`` noise volumes with spherical lesions (class 0) under ``root``; return the case ids."""
    if num_cases <= 0 or len(shape) != 3 or any(int(s) <= 0 for s in shape):
        raise ValueError(f"need num_cases > 0 and a 3D shape, got {num_cases} and {list(shape)}")
    root = Path(root)
    cases_dir = root / "cases"
    cases_dir.mkdir(parents=True, exist_ok=True)
    shape = tuple(int(s) for s in shape)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1)  # [Z, Y, X, 3]
    all_sizes: list[list[float]] = []
    ids = []
    for index in range(num_cases):
        rng = np.random.default_rng([seed, index])
        image = rng.standard_normal(shape, dtype=np.float32)
        instance_map = np.zeros(shape, dtype=np.int16)
        for lesion in range(1, lesions_per_case + 1):
            radius = int(rng.integers(LESION_RADIUS_RANGE[0], LESION_RADIUS_RANGE[1] + 1))
            radius = max(1, min(radius, min(shape) // 4))  # small test volumes keep whole lesions
            centre = [int(rng.integers(radius, max(s - radius, radius + 1))) for s in shape]
            inside = np.sum((grid - np.asarray(centre)) ** 2, axis=-1) <= radius**2
            inside &= instance_map == 0  # overlapping spheres keep the earlier id
            instance_map[inside] = lesion
            image[inside] += LESION_INTENSITY
        present, boxes = boxes_from_instance_map(instance_map)
        # ids must be consecutive 1..M, as preprocessing stores them
        remap = np.zeros(int(instance_map.max()) + 1, dtype=np.int16)
        remap[np.asarray(present, dtype=np.int64)] = np.arange(1, len(present) + 1, dtype=np.int16)
        instance_map = remap[instance_map]
        locations = np.argwhere(instance_map > 0)
        if len(locations) > FOREGROUND_LOCATION_SAMPLES:
            locations = locations[rng.choice(len(locations), FOREGROUND_LOCATION_SAMPLES, replace=False)]
        case = _case_id(index)
        np.save(cases_dir / f"{case}.npy", image[None])  # [1, Z, Y, X]
        np.save(cases_dir / f"{case}_seg.npy", instance_map)
        sizes = (boxes[:, 3:] - boxes[:, :3]).tolist()
        all_sizes.extend(sizes)
        write_json(cases_dir / f"{case}.json", {
            "instances": {str(i): 0 for i in range(1, len(present) + 1)},
            "boxes": boxes.tolist(), "labels": [0] * len(present),
            "shape": list(shape), "original_shape": list(shape), "spacing": [1.0, 1.0, 1.0],
            "original_spacing": [1.0, 1.0, 1.0], "origin": [0.0, 0.0, 0.0],
            "direction": [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0],
            "foreground_locations": locations.tolist(),
        })
        ids.append(case)
    write_json(root / "plan.json", {
        "target_spacing": [1.0, 1.0, 1.0], "modalities": ["CT"], "normalisation": [{"scheme": "zscore"}],
        "num_classes": 1, "class_names": ["lesion"], "median_shape": list(shape), "box_sizes": all_sizes,
    })
    return ids


def read_plan(root: str | os.PathLike) -> dict:
    """``plan.json`` of a preprocessed dataset (the benchmark's or a real one)."""
    path = Path(root) / "plan.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (not a preprocessed dataset)")
    return json.loads(path.read_text())
