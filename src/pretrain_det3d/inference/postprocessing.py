"""Post-processing chosen as nnDetection chooses it, on data the reported numbers do not come from; fold
ensembles for held-out test cases.

Raw passes. Prediction (:func:`run_raw_prediction`) keeps, per case, what consolidation starts from: for every
source (model x mirroring) the ``candidates`` best boxes of all its tiles with their tile weights, before
clipping, minimum size, NMS and WBC (``inference.sliding_window.predict_sources``), in a compressed
``{case}.npz`` together with the preprocessed image shape and the geometry that maps boxes back to the converted
image. Consolidation (:func:`consolidate_raw`) is then a pure function of that file and the parameters
(``inference.consolidation.consolidate_sources``, the very function that ends ``predict_case``), so a run can be
re-consolidated with other parameters without predicting again.

The sweep (:func:`sweep_parameters`) follows nnDetection's ``BoxSweeper.run_postprocessing_sweep`` with the
grid of ``BoxEnsemblerSelective.sweep_parameters`` (read in MIC-DKFZ/nnDetection, ``nndet/inference/sweeper.py``
and ``nndet/inference/ensembler/detection.py``; this is an independent implementation): starting from the
configured inference settings, one parameter after the other, in the order ``nms_iou`` (per-source NMS IoU,
nnDetection's ``model_iou``), ``weighted_nms`` (``model_nms_fn``), ``wbc_iou`` (``ensemble_iou``),
``score_threshold`` (``model_score_thresh``), ``min_box_size`` (``remove_small_boxes``), each value is tried with
the others fixed, the whole case set is consolidated and evaluated, and the parameter keeps the first value with
the highest ``target_metric`` (nnDetection's ``np.argmax``; default ``mAP_IoU_0.10_0.50_0.05_MaxDet_100``, the
metric nnDetection's consolidation sweeps on). Grid and metric are ``PostprocessingSettings``.

Which cases (:func:`run_sweep`, the workflow's ``sweep`` rule; docs/postprocessing.md): the metrics of fold ``k``
come from predictions consolidated with parameters swept on the validation predictions of the *other* folds of
the same run (detector x initialisation x dataset), never on fold ``k``'s own cases. With no other fold in the
study the configured parameters (nnDetection's defaults unless overridden) are used, and the record says so.
Held-out test cases are predicted by the models of all folds together (every model x mirroring one source of
the WBC) and consolidated with parameters swept on all folds' validation predictions.

Example:
    >>> raw = load_raw_case("results/raw_predictions/retina_unet/scratch/synth_lesions/fold0/case.npz")  # doctest: +SKIP
    >>> consolidate_raw(raw, {**consolidation_parameters({}), "nms_iou": 0.3})["boxes"].shape  # doctest: +SKIP
    (12, 6)
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from tqdm import tqdm

from pretrain_det3d.data.boxes import pairwise_box_iou
from pretrain_det3d.inference.consolidation import (
    CONSOLIDATION_KEYS,
    _greedy_nms,
    consolidate_sources,
    fuse_sources,
    large_enough,
)
from pretrain_det3d.settings.study import InferenceSettings, PostprocessingSettings
from pretrain_det3d.utils.atomic import atomic_directory, atomic_path, write_json

#: the swept parameters, in nnDetection's order (``BoxEnsemblerSelective.sweep_parameters``)
SWEEP_ORDER = ("nms_iou", "weighted_nms", "wbc_iou", "score_threshold", "min_box_size")
#: what a prediction keeps of the preprocessed case's record to map boxes back (``map_boxes_to_original``,
#: ``world_centres``)
META_KEYS = ("case_id", "shape", "original_shape", "original_spacing", "spacing", "origin", "direction", "crop_bbox",
             "cropped_shape")
RAW_SUFFIX = ".npz"
RAW_FORMAT_VERSION = 1
#: folder of a preprocessed dataset that holds its preprocessed held-out test cases
TEST_CASES_DIR = "test_cases"

Source = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


class RawPredictionError(ValueError):
    """A raw prediction file is missing, damaged or does not fit the request; the message starts with its path."""


@dataclass
class RawCase:
    """The raw passes of one case: per source ``(boxes [n, 6], scores [n], labels [n], tile weights [n])`` in
    preprocessed voxels, the preprocessed ``image_shape``, the case ``meta`` (``META_KEYS``) and how many
    ``candidates`` per source were kept."""

    case: str
    sources: list[Source]
    image_shape: tuple[int, int, int]
    meta: dict[str, Any]
    candidates: int


# ---- raw passes on disk ----------------------------------------------------------------------------------
def save_raw_case(path: str | os.PathLike, raw: RawCase) -> None:
    """Write ``raw`` as one compressed npz (float64 boxes, scores and weights: a reload is bit-exact), atomically."""
    sizes = np.asarray([len(source[1]) for source in raw.sources], dtype=np.int64)

    def joined(index: int, dtype: type, width: int | None = None) -> np.ndarray:
        shape = (-1, width) if width else (-1,)
        parts = [np.asarray(source[index], dtype=dtype).reshape(shape) for source in raw.sources]
        return np.concatenate(parts) if parts else np.zeros((0, width) if width else (0,), dtype=dtype)

    arrays = {
        "format_version": np.asarray(RAW_FORMAT_VERSION, dtype=np.int64),
        "boxes": joined(0, np.float64, 6),
        "scores": joined(1, np.float64),
        "labels": joined(2, np.int64),
        "weights": joined(3, np.float64),
        "source_sizes": sizes,
        "image_shape": np.asarray(raw.image_shape, dtype=np.int64),
        "candidates": np.asarray(int(raw.candidates), dtype=np.int64),
        "meta": np.asarray(json.dumps({"case": raw.case, **raw.meta}, sort_keys=True)),
    }
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, **arrays)


def load_raw_case(path: str | os.PathLike) -> RawCase:
    """Read a file of :func:`save_raw_case`; a missing or damaged file raises :class:`RawPredictionError`."""
    path = Path(path)
    if not path.is_file():
        raise RawPredictionError(f"{path}: raw prediction file not found")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
        meta = json.loads(str(arrays["meta"]))
        sizes = arrays["source_sizes"].astype(np.int64)
        bounds = np.concatenate([[0], np.cumsum(sizes)])
        boxes = arrays["boxes"].reshape(-1, 6)
        if bounds[-1] != len(boxes) or not (len(boxes) == len(arrays["scores"]) == len(arrays["labels"])
                                            == len(arrays["weights"])):
            raise ValueError("array lengths do not agree with the source sizes")
    except RawPredictionError:
        raise
    except Exception as error:  # zipfile, zlib, KeyError, JSON: all mean a damaged or foreign file
        raise RawPredictionError(f"{path}: not a readable raw prediction file ({error!r}); delete it and rerun the "
                                 "predict job that writes it") from error
    sources = [
        (boxes[a:b], arrays["scores"][a:b], arrays["labels"][a:b], arrays["weights"][a:b])
        for a, b in zip(bounds[:-1], bounds[1:])
    ]
    case = str(meta.pop("case"))
    return RawCase(case=case, sources=sources, image_shape=tuple(int(s) for s in arrays["image_shape"]),
                   meta=meta, candidates=int(arrays["candidates"]))


def raw_case_ids(directory: str | os.PathLike) -> list[str]:
    """Sorted case ids of the raw prediction files in ``directory``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise RawPredictionError(f"{directory}: raw prediction folder not found")
    return sorted(p.name[: -len(RAW_SUFFIX)] for p in directory.iterdir()
                  if p.name.endswith(RAW_SUFFIX) and not p.name.startswith("."))


def load_raw_dir(directory: str | os.PathLike) -> list[RawCase]:
    """Every raw case of a prediction folder, sorted by case id."""
    return [load_raw_case(Path(directory) / f"{case}{RAW_SUFFIX}") for case in raw_case_ids(directory)]


# ---- consolidation -------------------------------------------------------------------------------------
def consolidation_parameters(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The consolidation parameters (``CONSOLIDATION_KEYS``) of inference ``settings`` (defaults filled in)."""
    options = InferenceSettings.parse(settings, where="inference").model_dump()
    return {key: options[key] for key in CONSOLIDATION_KEYS}


def _check_candidates(raw: RawCase, params: Mapping[str, Any]) -> None:
    if int(params["candidates"]) > raw.candidates:
        raise RawPredictionError(
            f"case {raw.case}: consolidating {params['candidates']} candidates per source needs a prediction that "
            f"kept as many; this one kept {raw.candidates} (predict again with inference.candidates raised)")


def consolidate_raw(raw: RawCase, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Boxes, scores and labels of one case (preprocessed voxels, best first) from its raw passes with the
    consolidation ``params`` (all of ``CONSOLIDATION_KEYS``); equal to ``predict_case`` with these parameters."""
    _check_candidates(raw, params)
    return consolidate_sources(raw.sources, raw.image_shape, **{key: params[key] for key in CONSOLIDATION_KEYS})


def prediction_record(result: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> dict[str, Any]:
    """The prediction JSON of a case (boxes in converted-image voxels, world centres) from a consolidation in
    preprocessed voxels, as ``inference.predict.run_prediction`` writes it."""
    from pretrain_det3d.data.preprocessing import map_boxes_to_original
    from pretrain_det3d.inference.predict import world_centres

    boxes = map_boxes_to_original(result["boxes"], meta)
    return {
        "boxes": boxes.tolist(),
        "scores": np.asarray(result["scores"], dtype=np.float64).tolist(),
        "labels": np.asarray(result["labels"], dtype=np.int64).tolist(),
        "world_centres": world_centres(boxes, meta).tolist(),
    }


# ---- prediction ------------------------------------------------------------------------------------------
def run_raw_prediction(
    model_paths: Sequence[str | os.PathLike],
    cases_dir: str | os.PathLike,
    case_ids: Sequence[str],
    out_dir: str | os.PathLike,
    settings: Mapping[str, Any],
) -> None:
    """Predict ``case_ids`` (``{cases_dir}/{case}.npy`` + ``.json``, preprocessed) with the models together and
    write ``{out_dir}/{case}.npz`` (:func:`save_raw_case`); the folder is replaced atomically when all are done."""
    from pretrain_det3d.inference.predict import read_preprocessed_case
    from pretrain_det3d.inference.sliding_window import MIRROR_AXES
    from pretrain_det3d.training.trainer import resolve_device
    from pretrain_det3d.inference.sliding_window import predict_sources
    from pretrain_det3d.models.registry import load_detector

    options = InferenceSettings.parse(settings, where="inference").model_dump()
    if options["patch_size"] is None:
        raise KeyError("prediction settings need 'patch_size' [z, y, x]")
    if not model_paths:
        raise ValueError("raw prediction needs at least one model")
    detectors = [load_detector(path)[0] for path in model_paths]
    cases = Path(cases_dir)
    with atomic_directory(out_dir) as tmp:
        for case in tqdm(list(case_ids), desc=f"predict ({len(detectors)} model(s))", unit="case"):
            image, meta = read_preprocessed_case(cases, case)
            sources = predict_sources(
                detectors, image, options["patch_size"], overlap=float(options["overlap"]),
                mirror_axes=MIRROR_AXES if options["mirror"] else (), batch_size=int(options["batch_size"]),
                device=resolve_device(str(options["device"])), candidates=int(options["candidates"]),
            )
            save_raw_case(tmp / f"{case}{RAW_SUFFIX}", RawCase(
                case=case, sources=sources, image_shape=tuple(int(s) for s in image.shape[1:]),
                meta={key: meta[key] for key in META_KEYS if key in meta}, candidates=int(options["candidates"])))


def run_consolidation(
    raw_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    settings: Mapping[str, Any],
    postprocessing_json: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Consolidate every raw case of ``raw_dir`` with the inference ``settings``, overridden by the
    ``parameters`` of a sweep record (:func:`run_sweep`), into ``{out_dir}/{case}.json``; returns the parameters.
    The folder is replaced atomically when all cases are written."""
    params = consolidation_parameters(settings)
    if postprocessing_json is not None:
        record = json.loads(Path(postprocessing_json).read_text())
        params.update({key: value for key, value in record["parameters"].items() if key in CONSOLIDATION_KEYS})
    case_ids = raw_case_ids(raw_dir)
    with atomic_directory(out_dir) as tmp:
        for case in tqdm(case_ids, desc="consolidate", unit="case"):
            raw = load_raw_case(Path(raw_dir) / f"{case}{RAW_SUFFIX}")
            write_json(tmp / f"{case}.json", prediction_record(consolidate_raw(raw, params), raw.meta))
    return params


# ---- the sweep -----------------------------------------------------------------------------------------
def _source_key(params: Mapping[str, Any]) -> tuple:
    return tuple((key, params[key]) for key in ("candidates", "score_threshold", "min_box_size", "nms_iou",
                                                 "weighted_nms"))


class _SourceStep:
    """``consolidation.consolidate_source`` for one source and many parameter sets: the candidate cut, the
    clipping and the IoU matrices of the clipped candidates (per class) do not depend on the swept parameters,
    so they are computed once; each call then only selects, ranks and suppresses. Gives exactly
    ``consolidate_source``'s result (tests/test_inference_postprocessing.py compares them)."""

    def __init__(self, source: Source, image_shape: Sequence[int], candidates: int) -> None:
        boxes, scores, labels, weights = source
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        index = np.argsort(-scores, kind="stable")[:candidates]  # consolidate_source's first cut
        clipped = np.asarray(boxes, dtype=np.float64).reshape(-1, 6)[index].copy()
        upper = np.asarray(image_shape, dtype=np.float64)
        clipped[:, :3] = np.clip(clipped[:, :3], 0.0, upper)
        clipped[:, 3:] = np.clip(clipped[:, 3:], 0.0, upper)
        self.candidates = int(candidates)
        self.boxes, self.scores = clipped, scores[index]
        self.labels = np.asarray(labels).reshape(-1)[index]
        self.weights = np.asarray(weights, dtype=np.float64).reshape(-1)[index]
        self.members = {label: np.flatnonzero(self.labels == label) for label in np.unique(self.labels)}
        self.iou = {label: pairwise_box_iou(clipped[m], clipped[m]) for label, m in self.members.items()}

    def __call__(self, score_threshold: float, min_size: float, nms_iou: float, weighted_nms: bool
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        alive = np.flatnonzero((self.scores > score_threshold) & large_enough(self.boxes, min_size))
        labels = self.labels[alive]
        rank = self.scores[alive] * self.weights[alive] if weighted_nms else self.scores[alive]
        keep: list[int] = []
        for label in np.unique(labels):
            members = np.flatnonzero(labels == label)
            within = np.searchsorted(self.members[label], alive[members])  # rows of this class's IoU matrix
            iou = self.iou[label][np.ix_(within, within)]
            order = np.argsort(-rank[members], kind="stable")
            keep.extend(members[_greedy_nms(iou, order, nms_iou)].tolist())
        kept = np.asarray(keep, dtype=np.int64)
        kept = kept[np.argsort(-rank[kept], kind="stable")][: self.candidates]
        chosen = alive[kept]
        return self.boxes[chosen], self.scores[chosen], self.labels[chosen]


class _Consolidator:
    """Consolidates a case set for one parameter set after another: the per-source step with what does not
    depend on the swept parameters computed once (:class:`_SourceStep`), and reused as a whole while only the
    fusion's parameters change (the sweep of ``wbc_iou``); the fusion is ``consolidation.fuse_sources``."""

    def __init__(self, cases: Sequence[RawCase]) -> None:
        self.cases = list(cases)
        self._key: tuple | None = None
        self._per_source: list[list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = []
        self._steps: dict[int, list[list[_SourceStep]]] = {}

    def _source_steps(self, candidates: int) -> list[list[_SourceStep]]:
        if candidates not in self._steps:
            self._steps = {candidates: [[_SourceStep(source, raw.image_shape, candidates) for source in raw.sources]
                                        for raw in self.cases]}
        return self._steps[candidates]

    def __call__(self, params: Mapping[str, Any]) -> list[dict[str, np.ndarray]]:
        key = _source_key(params)
        if key != self._key:
            for raw in self.cases:
                _check_candidates(raw, params)
            steps = self._source_steps(int(params["candidates"]))
            self._per_source = [
                [step(float(params["score_threshold"]), float(params["min_box_size"]), float(params["nms_iou"]),
                      bool(params["weighted_nms"])) for step in case_steps]
                for case_steps in steps
            ]
            self._key = key
        results = []
        count = int(params["max_detections"])
        for per_source in self._per_source:
            boxes, scores, labels = fuse_sources(per_source, candidates=int(params["candidates"]),
                                                 wbc_iou=float(params["wbc_iou"]),
                                                 wbc_score_threshold=float(params["wbc_score_threshold"]))
            results.append({"boxes": boxes[:count].astype(np.float64).reshape(-1, 6),
                            "scores": scores[:count].astype(np.float64), "labels": labels[:count].astype(np.int64)})
        return results


def _finite_or_none(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def sweep_parameters(
    cases: Sequence[RawCase],
    ground_truth: Sequence[Any],
    class_ids: Sequence[int],
    start: Mapping[str, Any],
    grid: Mapping[str, Sequence[Any]],
    target_metric: str,
    report_metrics: Sequence[str] = ("AP_IoU_0.10_MaxDet_100", "mAP_IoU_0.10_0.50_0.05_MaxDet_100",
                                     "FROC_score_IoU_0.10"),
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """nnDetection's sequential sweep (module docstring) over ``cases`` with their ``ground_truth``
    (``evaluation.run.CaseBoxes`` in converted-image voxels).

    ``start``: all consolidation parameters (``CONSOLIDATION_KEYS``); ``grid``: values per swept parameter (an
    absent or empty entry keeps the start value). Returns the chosen parameters and the sweep table, one row per
    value tried (the parameter, its value, the parameters it was tried with, ``target_metric`` and
    ``report_metrics``, and whether it was chosen). A value scoring NaN never wins; when no value of a parameter
    scores a finite number, the parameter keeps its value.
    """
    from pretrain_det3d.data.preprocessing import map_boxes_to_original
    from pretrain_det3d.evaluation.run import CaseBoxes, evaluate_cases

    state = dict(start)
    consolidate = _Consolidator(cases)
    case_ids = [raw.case for raw in cases]
    table: list[dict[str, Any]] = []
    for name in SWEEP_ORDER:
        values = list(grid.get(name) or [])
        if not values:
            continue
        scores, rows = [], []
        for value in values:
            trial = {**state, name: value}
            results = consolidate(trial)
            predictions = [CaseBoxes(map_boxes_to_original(result["boxes"], raw.meta), result["labels"],
                                     result["scores"]) for raw, result in zip(cases, results)]
            metrics, _ = evaluate_cases(case_ids, ground_truth, predictions, class_ids)
            if target_metric not in metrics:
                raise KeyError(f"postprocessing.target_metric {target_metric!r} is not a metric; known: "
                               f"{', '.join(sorted(k for k, v in metrics.items() if isinstance(v, float)))}")
            score = float(metrics[target_metric])
            scores.append(score)
            rows.append({"parameter": name, "value": value,
                         "parameters": {key: trial[key] for key in SWEEP_ORDER},
                         target_metric: _finite_or_none(score),
                         **{m: _finite_or_none(float(metrics[m])) for m in report_metrics if m in metrics},
                         "chosen": False})
        finite = [i for i, s in enumerate(scores) if math.isfinite(s)]
        if finite:
            best = max(finite, key=lambda i: (scores[i], -i))  # the first of equal best scores
            state[name] = values[best]
            rows[best]["chosen"] = True
        table.extend(rows)
    return state, table


def run_sweep(
    raw_dirs: Sequence[str | os.PathLike],
    converted_root: str | os.PathLike,
    out_json: str | os.PathLike,
    settings: Mapping[str, Any],
    postprocessing: Mapping[str, Any],
    folds: Sequence[int] = (),
    evaluated: str = "",
) -> dict[str, Any]:
    """Choose the consolidation parameters on the raw predictions of ``raw_dirs`` (other folds' validation
    cases) and write the record ``out_json``: ``parameters`` (all consolidation parameters), ``source``
    (``"sweep"`` or ``"configured"``), ``reason``, ``sweep_folds``, ``num_cases``, ``target_metric``, the target
    score at the start and at the end, and the sweep ``table``. ``evaluated`` names what the parameters are for
    (e.g. ``"fold 1"``), for the record.

    Without folders to sweep on, or with ``postprocessing.sweep`` off, the configured inference settings are
    the parameters (``source: "configured"``).
    """
    from pretrain_det3d.evaluation.run import load_ground_truth, read_class_ids

    options = PostprocessingSettings.parse(postprocessing, where="postprocessing").model_dump()
    start = consolidation_parameters(settings)
    record: dict[str, Any] = {"for": evaluated, "target_metric": options["target_metric"],
                              "sweep_folds": [int(f) for f in folds], "start": start}
    if not options["sweep"] or not raw_dirs:
        reason = ("postprocessing.sweep is off" if not options["sweep"] else
                  "no other fold of this run in the study to sweep on")
        record.update(parameters=start, source="configured", num_cases=0, table=[],
                      reason=f"{reason}: the inference settings as configured (nnDetection's defaults unless the "
                             "config overrides them)")
        write_json(out_json, record)
        return record
    cases = [raw for directory in raw_dirs for raw in load_raw_dir(directory)]
    if not cases:
        raise RawPredictionError(f"{', '.join(map(str, raw_dirs))}: no raw prediction files to sweep on")
    seen: dict[str, int] = {}
    for raw in cases:
        seen[raw.case] = seen.get(raw.case, 0) + 1
    repeated = sorted(case for case, count in seen.items() if count > 1)
    if repeated:
        raise RawPredictionError(f"cases {repeated[:5]} appear in more than one of {', '.join(map(str, raw_dirs))}")
    class_ids = read_class_ids(converted_root)
    ground_truth = [load_ground_truth(converted_root, raw.case) for raw in tqdm(cases, desc="sweep: ground truth")]
    grid = {name: options[name] for name in SWEEP_ORDER}
    chosen, table = sweep_parameters(cases, ground_truth, class_ids, start, grid, options["target_metric"])
    first = next((row[options["target_metric"]] for row in table
                  if row["parameters"] == {k: start[k] for k in SWEEP_ORDER}), None)
    last = next((row[options["target_metric"]] for row in reversed(table) if row["chosen"]), None)
    record.update(parameters=chosen, source="sweep", num_cases=len(cases), target_start=first, target_final=last,
                  grid=grid, table=table,
                  reason=f"swept on the validation predictions of fold(s) {', '.join(map(str, folds)) or '?'} "
                         f"({len(cases)} cases), none of them a case these parameters are evaluated on")
    write_json(out_json, record)
    return record


def postprocessing_summary(record: Mapping[str, Any]) -> dict[str, Any]:
    """What a metrics JSON records of the post-processing its predictions used (a sweep record without its table)."""
    keys = ("source", "reason", "parameters", "sweep_folds", "num_cases", "target_metric", "target_start",
            "target_final")
    return {key: record[key] for key in keys if key in record}


# ---- held-out test cases -------------------------------------------------------------------------------
def preprocess_test_cases(
    converted_root: str | os.PathLike, plan_json: str | os.PathLike, out_dir: str | os.PathLike
) -> list[str]:
    """Preprocess the held-out test cases (``imagesTs``) with a dataset's plan, as its training cases were
    (``data.preprocessing.preprocess_arrays``: crop, resample, normalise): ``{out_dir}/{case}.npy`` and
    ``{case}.json`` (the geometry of ``META_KEYS``). Nothing of the plan comes from the test cases. Returns the
    case ids; the folder is replaced atomically."""
    from pretrain_det3d.data.io import list_case_ids, read_case
    from pretrain_det3d.data.preprocessing import preprocess_arrays

    plan = json.loads(Path(plan_json).read_text())
    case_ids = list_case_ids(converted_root, test=True)
    with atomic_directory(out_dir) as tmp:
        for case in tqdm(case_ids, desc="preprocess test cases", unit="case"):
            data = read_case(converted_root, case, test=True)
            original_shape = tuple(int(s) for s in data.image.shape[1:])
            image, _, geometry = preprocess_arrays(data.image, None, data.spacing, plan)
            with atomic_path(tmp / f"{case}.npy") as path:
                np.save(path, image)
            write_json(tmp / f"{case}.json", {
                "case_id": case, "shape": geometry["shape"], "original_shape": list(original_shape),
                "original_spacing": list(data.spacing), "spacing": [float(s) for s in plan["target_spacing"]],
                "origin": list(data.origin), "direction": list(data.direction),
                "crop_bbox": geometry["crop_bbox"], "cropped_shape": geometry["cropped_shape"],
            })
    return case_ids


def preprocessed_case_ids(cases_dir: str | os.PathLike) -> list[str]:
    """Sorted ids of the preprocessed test cases in ``cases_dir``."""
    return sorted(p.name[: -len(".json")] for p in Path(cases_dir).glob("*.json") if not p.name.startswith("."))
