"""The chance level: what boxes placed at random score, so that a detector's number can be read against it.

For each validation case, ``boxes_per_case`` boxes (as many as the evaluation counts, 100) are placed uniformly
inside the image, each with the extent of a randomly drawn training box of the same fold (the one thing a
detector that learned nothing else could know), a random class and a uniform random score. They are evaluated
exactly as predictions are (``evaluation.run.evaluate_cases``), ``draws`` times with independent seeds; the metrics
are the mean over the draws, with their standard deviation beside them.

Example:
    >>> run_chance_level("results/data/converted/demo", ["a", "b"], ["c"],
    ...                  "results/metrics/chance/demo/fold0.json")  # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tqdm import tqdm

from pretrain_det3d.evaluation.run import CaseBoxes, evaluate_cases, load_ground_truth, read_class_ids
from pretrain_det3d.utils.atomic import write_json

#: boxes per case: the evaluation's maximum number of detections, the most a detector may place
DEFAULT_BOXES_PER_CASE = 100
DEFAULT_DRAWS = 20
REPORTED_METRICS = ("AP_IoU_0.10_MaxDet_100", "mAP_IoU_0.10_0.50_0.05_MaxDet_100", "FROC_score_IoU_0.10")


def random_boxes(shape: Sequence[int], box_sizes: np.ndarray, count: int, class_ids: Sequence[int],
                 rng: np.random.Generator) -> CaseBoxes:
    """``count`` boxes placed uniformly at random inside an image of ``shape`` (z, y, x), each with the size of a
    training box drawn at random (a cube of a quarter of the smallest side when there are none, clipped to the
    image), a random class and a uniform random score, best score first.

    Example:
        >>> boxes = random_boxes((32, 32, 32), np.array([[4.0, 4.0, 4.0]]), 5, [0, 1], np.random.default_rng(0))
        >>> boxes.boxes.shape, bool((boxes.boxes[:, 3:] <= 32).all())
        ((5, 6), True)
    """
    shape_array = np.asarray(shape, dtype=np.float64)
    if len(box_sizes):
        sizes = np.asarray(box_sizes, dtype=np.float64)[rng.integers(0, len(box_sizes), size=count)]
    else:
        sizes = np.full((count, 3), shape_array.min() / 4)
    sizes = np.minimum(sizes, shape_array)
    starts = rng.uniform(0.0, 1.0, size=(count, 3)) * (shape_array - sizes)
    labels = np.asarray(class_ids, dtype=np.int64)[rng.integers(0, len(class_ids), size=count)]
    scores = rng.uniform(0.0, 1.0, size=count)
    order = np.argsort(-scores, kind="stable")
    return CaseBoxes(np.concatenate([starts, starts + sizes], axis=1)[order], labels[order], scores[order])


def box_extents(cases: Sequence[CaseBoxes]) -> np.ndarray:
    """``[N, 3]`` extents of all boxes of ``cases``."""
    extents = [case.boxes[:, 3:] - case.boxes[:, :3] for case in cases if len(case.boxes)]
    return np.concatenate(extents) if extents else np.zeros((0, 3))


def chance_metrics(val_cases: Sequence[str], ground_truth: Sequence[CaseBoxes], shapes: Sequence[Sequence[int]],
                   box_sizes: np.ndarray, class_ids: Sequence[int], draws: int = DEFAULT_DRAWS,
                   boxes_per_case: int = DEFAULT_BOXES_PER_CASE, seed: int = 0) -> dict[str, Any]:
    """Mean and standard deviation over ``draws`` of the metrics of random boxes (see the module docstring)."""
    if draws < 1 or boxes_per_case < 1:
        raise ValueError(f"draws and boxes_per_case must be positive, got {draws} and {boxes_per_case}")
    values: dict[str, list[float]] = {metric: [] for metric in REPORTED_METRICS}
    for draw in range(draws):
        rng = np.random.default_rng([int(seed), draw])
        predictions = [random_boxes(shape, box_sizes, boxes_per_case, class_ids, rng) for shape in shapes]
        metrics, _ = evaluate_cases(list(val_cases), list(ground_truth), predictions, class_ids)
        for metric in REPORTED_METRICS:
            values[metric].append(float(metrics[metric]))
    out: dict[str, Any] = {metric: float(np.mean(v)) for metric, v in values.items()}
    out["std"] = {metric: float(np.std(v)) for metric, v in values.items()}
    out.update(draws=int(draws), boxes_per_case=int(boxes_per_case), seed=int(seed), num_cases=len(val_cases),
               num_gt=int(sum(len(gt.labels) for gt in ground_truth)), training_boxes=int(len(box_sizes)))
    return out


def run_chance_level(converted_root: str | os.PathLike, train_cases: Sequence[str], val_cases: Sequence[str],
                     out_json: str | os.PathLike, draws: int = DEFAULT_DRAWS,
                     boxes_per_case: int = DEFAULT_BOXES_PER_CASE, seed: int = 0) -> dict[str, Any]:
    """Chance level of one fold of a converted dataset; writes ``out_json`` atomically and returns it."""
    class_ids = read_class_ids(converted_root)
    training = [load_ground_truth(converted_root, case) for case in tqdm(train_cases, desc="chance: training boxes",
                                                                          unit="case")]
    ground_truth, shapes = [], []
    for case in tqdm(val_cases, desc="chance: validation cases", unit="case"):
        ground_truth.append(load_ground_truth(converted_root, case))
        shapes.append(_label_shape(converted_root, case))
    result = chance_metrics(val_cases, ground_truth, shapes, box_extents(training), class_ids, draws,
                            boxes_per_case, seed)
    write_json(out_json, result)
    return result


def _label_shape(converted_root: str | os.PathLike, case: str) -> tuple[int, int, int]:
    """Array shape (z, y, x) of a case's label image, from its header only."""
    import SimpleITK as sitk

    from pretrain_det3d.data.io import label_path

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(label_path(Path(converted_root), case, False)))
    reader.ReadImageInformation()
    return tuple(int(s) for s in reversed(reader.GetSize()))
