"""LUNA16's own score: the CPM (competition performance metric) and FROC curve of a candidates CSV.

The LUNA16 challenge (Setio et al., Medical Image Analysis 42, 2017; its evaluation script
``noduleCADEvaluationLUNA16.py``) scores a CSV of candidates ``seriesuid,coordX,coordY,coordZ,probability``
(world millimetres) against ``annotations.csv`` (the reference nodules, >= 3 mm and accepted by 3 of 4 readers)
and ``annotations_excluded.csv`` (the other findings of the LIDC readers). This module follows the script's
definition; the code is our own:

- scans are the given series (a scan without candidates still counts); per scan at most
  :data:`MAX_CANDIDATES_PER_SCAN` candidates are kept: when there are more, those whose probability is strictly
  above the 101st highest, in file order, up to 100 (so ties at the cut keep fewer, as in the script);
- a candidate hits a finding when its distance to the finding's centre is strictly less than the finding's
  radius (``diameter_mm / 2``; a finding without a diameter, written as a negative number, counts as
  :data:`DEFAULT_DIAMETER_MM`);
- a reference nodule hit by one or more candidates is one true positive whose score is the highest probability
  among them (further hits on the same nodule are ignored, neither true nor false positives); a nodule hit by
  none is missed but counts in the number of nodules; a candidate may count for two nodules it lies in;
- a candidate that hits no reference nodule but an excluded finding is ignored; every other candidate is a false
  positive;
- the FROC curve walks the probability threshold down over the distinct probabilities (ties enter together):
  (false positives / scans, detected nodules / nodules), starting at (0, 0);
- the CPM is the mean sensitivity at 1/8, 1/4, 1/2, 1, 2, 4 and 8 false positives per scan, read off the curve
  by linear interpolation (beyond the last point the final sensitivity holds), as :func:`froc.froc_curve` reads
  nnDetection's FROC.

Where the script's arithmetic breaks down we report a number instead: no detected nodule gives sensitivity 0
(the script's ``roc_curve`` yields NaN); scans without any reference nodule give a CPM of ``-1`` (undefined).
The script's bootstrap confidence band is not computed (``analysis`` bootstraps scores over cases).

Example:
    >>> result = luna16_cpm(candidates, annotations, excluded, seriesuids)  # doctest: +SKIP
    >>> result.cpm, result.sensitivities  # doctest: +SKIP
    (0.71, {0.125: 0.52, ...})
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from pretrain_det3d.evaluation.froc import FP_PER_SCAN, froc_curve, fp_key
from pretrain_det3d.evaluation.metrics import UNDEFINED
from pretrain_det3d.utils.atomic import atomic_path, write_json

#: at most this many candidates per scan are scored (the script's ``maxNumberOfCADMarks``)
MAX_CANDIDATES_PER_SCAN = 100
#: diameter of a finding stated as negative (``annotations_excluded.csv`` writes -1 for findings without one)
DEFAULT_DIAMETER_MM = 10.0
CANDIDATE_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "probability")
FINDING_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm")
FROC_COLUMNS = ("fps_per_scan", "sensitivity", "threshold")


class LUNA16InputError(ValueError):
    """A candidates or annotations CSV is malformed; the message starts with the file and names the row."""


@dataclass(frozen=True)
class Point:
    """A world position (x, y, z mm) with a value: a candidate's probability or a finding's diameter."""

    seriesuid: str
    xyz: tuple[float, float, float]
    value: float


@dataclass
class CPMResult:
    """LUNA16's score of one candidates set.

    Attributes:
        cpm: mean of ``sensitivities`` (-1 when the scans hold no reference nodule).
        sensitivities: FP rate per scan -> sensitivity there.
        fps / sens / thresholds: the FROC curve's points (from (0, 0) at threshold +inf).
        num_scans, num_nodules: scans scored and reference nodules in them.
        num_candidates: candidates scored (after the per-scan cap).
        detected_nodules, false_positives: at the lowest threshold.
        ignored_on_excluded: candidates ignored because they hit an excluded finding only.
        ignored_double_hits: further hits on a nodule already hit (the script's "double detections").
        dropped_by_cap: candidates beyond :data:`MAX_CANDIDATES_PER_SCAN` of their scan.
    """

    cpm: float
    sensitivities: dict[float, float]
    fps: list[float] = field(default_factory=list)
    sens: list[float] = field(default_factory=list)
    thresholds: list[float] = field(default_factory=list)
    num_scans: int = 0
    num_nodules: int = 0
    num_candidates: int = 0
    detected_nodules: int = 0
    false_positives: int = 0
    ignored_on_excluded: int = 0
    ignored_double_hits: int = 0
    dropped_by_cap: int = 0


def _float(value: str, path: str, row: int, column: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise LUNA16InputError(f"{path}: row {row}: {column} {value!r} is not a number") from None
    if math.isnan(number) or math.isinf(number):
        raise LUNA16InputError(f"{path}: row {row}: {column} is {value}")
    return number


def read_points(path: str | os.PathLike, value_column: str) -> list[Point]:
    """Rows of a LUNA16 CSV (candidates with ``probability``, findings with ``diameter_mm``), in file order.

    Example:
        >>> read_points("annotations_excluded.csv", "diameter_mm")[0]  # doctest: +SKIP
        Point(seriesuid='1.3.6...', xyz=(-128.7, -175.3, -298.4), value=-1.0)
    """
    name = os.fspath(path)
    if not Path(path).is_file():
        raise LUNA16InputError(f"{name}: file is missing")
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        columns = ("seriesuid", "coordX", "coordY", "coordZ", value_column)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise LUNA16InputError(f"{name}: missing columns {missing}; expected {list(columns)}")
        points = []
        for row_number, row in enumerate(reader, start=2):
            xyz = tuple(_float(row[c], name, row_number, c) for c in ("coordX", "coordY", "coordZ"))
            points.append(Point(row["seriesuid"], xyz, _float(row[value_column], name, row_number, value_column)))
    return points


def _by_scan(points: Iterable[Point]) -> dict[str, list[Point]]:
    grouped: dict[str, list[Point]] = {}
    for point in points:
        grouped.setdefault(point.seriesuid, []).append(point)
    return grouped


def cap_candidates(candidates: Sequence[Point], limit: int = MAX_CANDIDATES_PER_SCAN) -> list[Point]:
    """The candidates of one scan that LUNA16 scores: all if at most ``limit``, else those with a probability
    strictly above the ``limit + 1``-th highest, in file order, at most ``limit``.

    Example:
        >>> pts = [Point("s", (0, 0, 0), p) for p in (0.1, 0.9, 0.5, 0.5)]
        >>> [p.value for p in cap_candidates(pts, 2)]  # the 3rd highest is 0.5: only 0.9 is above it
        [0.9]
    """
    if len(candidates) <= limit:
        return list(candidates)
    cut = sorted((c.value for c in candidates), reverse=True)[limit]
    return [c for c in candidates if c.value > cut][:limit]


def _hits(candidates: Sequence[Point], findings: Sequence[Point]) -> np.ndarray:
    """Boolean ``[candidates, findings]``: squared distance strictly below the squared radius."""
    if not candidates or not findings:
        return np.zeros((len(candidates), len(findings)), dtype=bool)
    centres = np.array([c.xyz for c in candidates], dtype=np.float64)
    nodules = np.array([f.xyz for f in findings], dtype=np.float64)
    diameters = np.array([f.value if f.value >= 0 else DEFAULT_DIAMETER_MM for f in findings], dtype=np.float64)
    distance_sq = ((centres[:, None, :] - nodules[None, :, :]) ** 2).sum(axis=-1)
    return distance_sq < (diameters / 2.0)[None, :] ** 2


def luna16_cpm(
    candidates: Sequence[Point],
    annotations: Sequence[Point],
    excluded: Sequence[Point],
    seriesuids: Sequence[str],
    fp_per_scan: Sequence[float] = FP_PER_SCAN,
    max_candidates_per_scan: int = MAX_CANDIDATES_PER_SCAN,
) -> CPMResult:
    """Score candidates of the scans ``seriesuids`` by LUNA16's definition (see the module docstring).

    Candidates and findings of other series are ignored.

    Example:
        >>> nodule = [Point("s", (0.0, 0.0, 0.0), 10.0)]
        >>> r = luna16_cpm([Point("s", (1.0, 0.0, 0.0), 0.9)], nodule, [], ["s"])
        >>> r.cpm, r.detected_nodules, r.false_positives
        (1.0, 1, 0)
    """
    if not seriesuids:
        raise ValueError("LUNA16's score needs at least one scan")
    if len(set(seriesuids)) != len(seriesuids):
        raise ValueError("the scans to score repeat a seriesuid")
    candidates_of, nodules_of, excluded_of = _by_scan(candidates), _by_scan(annotations), _by_scan(excluded)
    positives: list[float] = []  # the score of each detected nodule
    negatives: list[float] = []  # the score of each false positive
    result = CPMResult(cpm=UNDEFINED, sensitivities={}, num_scans=len(seriesuids))
    for uid in seriesuids:
        scan_candidates = candidates_of.get(uid, [])
        kept = cap_candidates(scan_candidates, max_candidates_per_scan)
        result.dropped_by_cap += len(scan_candidates) - len(kept)
        result.num_candidates += len(kept)
        nodules = nodules_of.get(uid, [])
        result.num_nodules += len(nodules)
        on_nodule = _hits(kept, nodules)
        on_excluded = _hits(kept, excluded_of.get(uid, []))
        probabilities = np.array([c.value for c in kept], dtype=np.float64)
        for column in on_nodule.T:
            if column.any():
                positives.append(float(probabilities[column].max()))
                result.ignored_double_hits += int(column.sum()) - 1
        used = on_nodule.any(axis=1)
        ignored = ~used & on_excluded.any(axis=1)
        result.ignored_on_excluded += int(ignored.sum())
        negatives.extend(float(p) for p in probabilities[~used & ~ignored])
    result.detected_nodules, result.false_positives = len(positives), len(negatives)

    scores = np.array(positives + negatives, dtype=np.float64)
    is_hit = np.r_[np.ones(len(positives), dtype=bool), np.zeros(len(negatives), dtype=bool)]
    order = np.argsort(-scores, kind="stable")
    scores, is_hit = scores[order], is_hit[order]
    last_of_run = np.r_[scores[1:] != scores[:-1], True] if len(scores) else np.zeros(0, dtype=bool)
    result.thresholds = [math.inf] + scores[last_of_run].tolist()
    result.fps = [0.0] + (np.cumsum(~is_hit)[last_of_run] / result.num_scans).tolist()
    result.sens = [0.0] + (np.cumsum(is_hit)[last_of_run] / max(result.num_nodules, 1)).tolist()
    if result.num_nodules:
        curve = froc_curve(scores, is_hit, result.num_nodules, result.num_scans, fp_per_scan)
        result.sensitivities = {float(rate): float(value) for rate, value in zip(fp_per_scan, curve)}
        result.cpm = float(np.mean(curve))
    else:
        result.sensitivities = {float(rate): UNDEFINED for rate in fp_per_scan}
    return result


def evaluate_luna16_csv(
    candidates_csv: str | os.PathLike | Sequence[str | os.PathLike],
    annotations_csv: str | os.PathLike,
    excluded_csv: str | os.PathLike | None,
    seriesuids: Sequence[str],
    out_json: str | os.PathLike,
    out_froc_csv: str | os.PathLike,
    max_candidates_per_scan: int = MAX_CANDIDATES_PER_SCAN,
) -> CPMResult:
    """Score one or more candidates CSVs (e.g. the exports of all folds) and write the score and the curve.

    ``out_json`` holds ``LUNA16_CPM``, ``LUNA16_sens_FPI_{rate}`` and the counts; ``out_froc_csv`` the FROC
    curve (``fps_per_scan,sensitivity,threshold``). Both are written atomically. Without ``excluded_csv`` hits
    on excluded findings count as false positives, and the JSON says so.

    Example:
        >>> evaluate_luna16_csv("results/luna16/retina_unet/mae/luna16/fold0.csv",
        ...                     "results/data/converted/luna16/labelsTr/annotations.csv",
        ...                     "results/data/converted/luna16/labelsTr/annotations_excluded.csv",
        ...                     uids, "fold0_cpm.json", "fold0_froc.csv")  # doctest: +SKIP
    """
    paths = [candidates_csv] if isinstance(candidates_csv, (str, os.PathLike)) else list(candidates_csv)
    candidates = [point for path in paths for point in read_points(path, "probability")]
    known = set(seriesuids)
    strangers = sorted({c.seriesuid for c in candidates} - known)
    if strangers:
        raise LUNA16InputError(f"{os.fspath(paths[0])}: candidates of {len(strangers)} series that are not among the "
                               f"{len(known)} scans to score, e.g. {strangers[0]}")
    annotations = read_points(annotations_csv, "diameter_mm")
    excluded = read_points(excluded_csv, "diameter_mm") if excluded_csv is not None else []
    result = luna16_cpm(candidates, annotations, excluded, seriesuids,
                        max_candidates_per_scan=max_candidates_per_scan)
    record = {
        "LUNA16_CPM": result.cpm,
        **{f"LUNA16_sens_FPI_{fp_key(rate)}": value for rate, value in result.sensitivities.items()},
        "LUNA16_fpi_thresholds": list(result.sensitivities),
        **{key: value for key, value in asdict(result).items()
           if key not in ("cpm", "sensitivities", "fps", "sens", "thresholds")},
        "candidates": [os.fspath(p) for p in paths],
        "annotations": os.fspath(annotations_csv),
        "annotations_excluded": os.fspath(excluded_csv) if excluded_csv is not None else None,
        "max_candidates_per_scan": max_candidates_per_scan,
        "definition": "LUNA16 (noduleCADEvaluationLUNA16.py): hit = centre distance < radius; one hit per nodule "
                      "(highest probability); hits on excluded findings ignored; mean sensitivity at 1/8..8 FP "
                      "per scan by linear interpolation" + ("" if excluded_csv is not None else
                                                            "; NO excluded findings given: hits on them count as FP"),
    }
    write_json(out_json, record)
    with atomic_path(out_froc_csv) as tmp:
        with open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(FROC_COLUMNS)
            writer.writerows((f"{f:.9g}", f"{s:.9g}", f"{t:.9g}")
                             for f, s, t in zip(result.fps, result.sens, result.thresholds))
    return result
