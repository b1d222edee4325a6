"""A tiny hand-made study for the analysis tests: converted labels, predictions, metric JSONs and runs.csv.

Each (detector, initialisation) has a "skill" in [0, 1]: the chance that an object is found and how far the scores
of hits sit above those of false positives, so the initialisations differ in a known direction.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from pretrain_det3d.analysis.aggregate import run_aggregation
from pretrain_det3d.evaluation import run_evaluation

SHAPE = (12, 16, 16)
SKILL = {"scratch": 0.35, "mae": 0.6, "voco": 0.5, "my_ckpt": 0.8}


def write_study(root: Path, detectors: Sequence[str] = ("retina_unet", "deformable_detr"),
                initialisations: Sequence[str] = ("scratch", "mae", "voco"),
                datasets: Sequence[str] = ("lung", "kidney"), folds: int = 5, cases_per_fold: int = 2,
                seed: int = 0) -> dict[str, Path]:
    """Write the study under ``root``; returns the paths of its parts (converted, predictions, metrics, runs_csv)."""
    rng = np.random.default_rng(seed)
    converted, predictions, metrics = root / "converted", root / "predictions", root / "metrics"
    metric_files = []
    for dataset in datasets:
        dataset_root = converted / dataset
        (dataset_root / "labelsTr").mkdir(parents=True)
        (dataset_root / "dataset.json").write_text(json.dumps({"name": dataset, "labels": {"0": "lesion"}}))
        cases = [f"{dataset}_{i:03d}" for i in range(folds * cases_per_fold)]
        truth = {}
        for case in cases:
            labels = np.zeros(SHAPE, dtype=np.int16)
            boxes = []
            for instance in range(1, int(rng.integers(1, 3)) + 1):
                z = (instance - 1) * 6
                y, x = (int(v) for v in rng.integers(0, 12, size=2))
                labels[z:z + 3, y:y + 3, x:x + 4] = instance
                boxes.append([z, y, x, z + 3, y + 3, x + 4])
            truth[case] = boxes
            sitk.WriteImage(sitk.GetImageFromArray(labels), str(dataset_root / "labelsTr" / f"{case}.nii.gz"))
            (dataset_root / "labelsTr" / f"{case}.json").write_text(
                json.dumps({"instances": {str(i): 0 for i in range(1, len(boxes) + 1)}}))
        for detector in detectors:
            for init in initialisations:
                skill = SKILL[init] - (0.1 if detector == "deformable_detr" else 0.0)
                for fold in range(folds):
                    folder = predictions / detector / init / dataset / f"fold{fold}"
                    folder.mkdir(parents=True)
                    fold_cases = cases[fold * cases_per_fold:(fold + 1) * cases_per_fold]
                    for case in fold_cases:
                        boxes, scores = [], []
                        for box in truth[case]:
                            if rng.random() < 0.3 + 0.7 * skill:
                                boxes.append(box)
                                scores.append(float(np.clip(rng.normal(0.4 + 0.5 * skill, 0.15), 0.01, 0.99)))
                        for _ in range(int(rng.integers(1, 4))):
                            start = rng.integers(0, 9, size=3)
                            boxes.append(np.r_[start, start + 3].astype(float).tolist())
                            scores.append(float(np.clip(rng.normal(0.5, 0.2), 0.01, 0.99)))
                        (folder / f"{case}.json").write_text(json.dumps(
                            {"boxes": boxes, "scores": scores, "labels": [0] * len(boxes)}))
                    out_json = metrics / detector / init / dataset / f"fold{fold}.json"
                    run_evaluation(folder, dataset_root, fold_cases, out_json,
                                   out_json.with_name(f"fold{fold}_cases.csv"))
                    metric_files.append((detector, init, dataset, fold, out_json))
    tables = root / "tables"
    run_aggregation(metric_files, tables / "main_results.csv", tables / "main_results.md", tables / "runs.csv")
    return {"converted": converted, "predictions": predictions, "metrics": metrics, "runs_csv": tables / "runs.csv"}
