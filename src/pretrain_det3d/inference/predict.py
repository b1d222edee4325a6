"""Predict the cases of a preprocessed dataset with a trained detector; one JSON per case.

Each ``{out_dir}/{case}.json`` holds ``{"boxes", "scores", "labels", "world_centres"}``: boxes in the
converted image's voxels (MONAI standard mode over the array axes z, y, x, in the convention of
:mod:`pretrain_det3d.data.boxes`), and box centres in world coordinates (mm, SimpleITK's physical space,
ordered x, y, z like SimpleITK's points).

World centres: box coordinates are continuous voxel indices (voxel ``i``'s centre at ``i``), so the centre's
continuous SimpleITK index is ``(min + max) / 2`` per axis, reversed to (x, y, z). The point is
``origin + direction @ (spacing_xyz * index_xyz)`` with the case JSON's ``origin`` and ``direction`` (SimpleITK
order) and ``original_spacing`` (array order z, y, x, hence reversed).

Example:
    >>> run_prediction("results/finetune/retina_unet/scratch/synthetic/fold0/model_final.pth",
    ...                "results/data/preprocessed/synthetic", ["synthetic_0003"], "results/predictions/x",
    ...                {"patch_size": [48, 48, 48]})  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from tqdm import tqdm

from pretrain_det3d.data.boxes import box_centre_indices
from pretrain_det3d.data.io import load_npy
from pretrain_det3d.inference.postprocessing import prediction_record
from pretrain_det3d.inference.sliding_window import predict_case_with_settings
from pretrain_det3d.models.registry import load_detector
from pretrain_det3d.settings.study import InferenceSettings
from pretrain_det3d.utils.atomic import write_json

CASES_DIR = "cases"


def world_centres(boxes: np.ndarray, case_meta: Mapping[str, Any]) -> np.ndarray:
    """World coordinates (x, y, z, mm) of the centres of converted-voxel boxes (see the module docstring).

    Example:
        >>> meta = {"original_spacing": [2.0, 1.0, 1.0], "origin": [10.0, 0.0, 0.0],
        ...         "direction": [1, 0, 0, 0, 1, 0, 0, 0, 1]}
        >>> world_centres(np.array([[-1, -1, -1, 1, 1, 2]]), meta).tolist()  # voxels z 0, y 0, x 0..1
        [[10.5, 0.0, 0.0]]
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 6)
    for key in ("original_spacing", "origin", "direction"):
        if key not in case_meta:
            raise KeyError(f"case metadata lacks {key!r} (needed for world coordinates)")
    index_zyx = box_centre_indices(boxes)  # [N, 3] continuous voxel-centre index
    index_xyz = index_zyx[:, ::-1]
    spacing_xyz = np.asarray(case_meta["original_spacing"], dtype=np.float64)[::-1]
    direction = np.asarray(case_meta["direction"], dtype=np.float64).reshape(3, 3)
    origin = np.asarray(case_meta["origin"], dtype=np.float64)
    return origin[None, :] + (index_xyz * spacing_xyz[None, :]) @ direction.T  # [N, 3]


def read_preprocessed_case(cases_dir: Path, case: str) -> tuple[np.ndarray, dict[str, Any]]:
    """The image (memory-mapped) and metadata of a preprocessed case, ``{cases_dir}/{case}.npy`` + ``.json``."""
    image_path, meta_path = cases_dir / f"{case}.npy", cases_dir / f"{case}.json"
    for path in (image_path, meta_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: preprocessed case file not found")
    image = load_npy(image_path, mmap_mode="r")  # a truncated case is named, with how to regenerate it
    return image, json.loads(meta_path.read_text())


def _settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    options = InferenceSettings.parse(settings, where="inference")
    if options.patch_size is None:
        raise KeyError("prediction settings need 'patch_size' [z, y, x]")
    return options.model_dump()


def run_prediction(
    model_path: str | os.PathLike,
    preprocessed_root: str | os.PathLike,
    case_ids: Sequence[str],
    out_dir: str | os.PathLike,
    settings: Mapping[str, Any],
) -> None:
    """Predict ``case_ids`` of a preprocessed dataset and write ``{out_dir}/{case}.json`` atomically."""
    options = _settings(settings)
    detector, _ = load_detector(model_path)
    cases = Path(preprocessed_root) / CASES_DIR
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for case in tqdm(list(case_ids), desc="predict", unit="case"):
        image, meta = read_preprocessed_case(cases, case)
        result = predict_case_with_settings(detector, image, options)
        write_json(out_dir / f"{case}.json", prediction_record(result, meta))
