"""Aggregate per-run metric files into the study's tables: a tidy per-run table and mean / std over folds.

Outputs:

- ``runs.csv`` (tidy, one row per run and scalar metric): ``detector, initialisation, dataset, fold, metric,
  value`` (``analysis.tables.RUN_COLUMNS``); values are copied from the metric JSON as they are, so the
  evaluation's "undefined" marker ``-1`` (no ground truth) stays visible there;
- ``main_results.csv``, one row per detector x initialisation x dataset: ``num_folds`` and, for each of
  ``SUMMARY_METRICS``, ``{metric}_mean`` and ``{metric}_std`` over folds. The std is the sample standard deviation
  (``ddof=1``); with a single fold it is NaN (written as an empty CSV cell, shown as ``n/a``). A fold whose value is
  undefined (``-1``) makes the mean and std of that row NaN, with a warning naming the file, rather than averaging
  over fewer folds without saying so;
- ``main_results.md``: the same as a readable Markdown table, ``mean ± std`` with 3 decimals.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from pretrain_det3d.analysis.tables import RUN_COLUMNS, RUN_KEYS
from pretrain_det3d.evaluation.metrics import UNDEFINED
from pretrain_det3d.utils.atomic import atomic_path

LOGGER = logging.getLogger(__name__)

#: Metrics summarised in the main table (nnDetection's key names) with their short Markdown headers.
SUMMARY_METRICS: dict[str, str] = {
    "AP_IoU_0.10_MaxDet_100": "AP@0.1",
    "mAP_IoU_0.10_0.50_0.05_MaxDet_100": "mAP@0.1:0.5",
    "FROC_score_IoU_0.10": "FROC@0.1",
}
#: Keys of a main-results row besides the metric columns.
GROUP_KEYS: tuple[str, ...] = ("detector", "initialisation", "dataset")
#: Decimals shown in the Markdown table.
MARKDOWN_DECIMALS = 3
#: Degrees of freedom removed in the standard deviation over folds (sample std).
STD_DDOF = 1

MetricFile = tuple[str, str, str, int, "str | os.PathLike"]


class MetricFileError(ValueError):
    """A metric file is missing or malformed; the message starts with its path."""


def read_metric_file(path: str | os.PathLike, required: Sequence[str] = tuple(SUMMARY_METRICS)) -> dict[str, float]:
    """Scalar metrics of one run's JSON (lists such as FROC curves are left out); checks ``required`` keys.

    Example:
        >>> read_metric_file("results/metrics/retina_unet/scratch/demo/fold0.json")  # doctest: +SKIP
        {'mAP_IoU_0.10_0.50_0.05_MaxDet_100': 0.41, ...}
    """
    path = Path(path)
    if not path.is_file():
        raise MetricFileError(f"{path}: metric file not found")
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise MetricFileError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(record, dict):
        raise MetricFileError(f"{path}: expected a JSON object of metrics, got {type(record).__name__}")
    missing = [key for key in required if key not in record]
    if missing:
        raise MetricFileError(f"{path}: missing metric(s) {missing}")
    scalars: dict[str, float] = {}
    for key, value in record.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        scalars[key] = float(value)
    bad = [key for key in required if key not in scalars or not math.isfinite(scalars[key])]
    if bad:
        raise MetricFileError(f"{path}: metric(s) {bad} are not finite numbers")
    return scalars


def build_runs_table(metric_files: Sequence[MetricFile]) -> pd.DataFrame:
    """The tidy per-run table (``RUN_COLUMNS``) of all scalar metrics of all metric files.

    Example:
        >>> build_runs_table([("retina_unet", "scratch", "demo", 0, "fold0.json")])  # doctest: +SKIP
    """
    seen: dict[tuple, Path] = {}
    rows: list[dict[str, Any]] = []
    for entry in metric_files:
        if len(entry) != 5:
            raise ValueError(f"metric file entry {entry!r}: expected (arch, init, dataset, fold, path)")
        detector, initialisation, dataset, fold, path = entry
        key = (str(detector), str(initialisation), str(dataset), int(fold))
        if key in seen:
            raise MetricFileError(f"{path}: run {key} is listed twice (also {seen[key]})")
        seen[key] = Path(path)
        for metric, value in read_metric_file(path).items():
            rows.append(dict(zip(RUN_KEYS, key), metric=metric, value=value))
    return pd.DataFrame(rows, columns=list(RUN_COLUMNS))


def summarise_runs(runs: pd.DataFrame, metrics: Sequence[str] = tuple(SUMMARY_METRICS)) -> pd.DataFrame:
    """Mean and sample std (``ddof=1``) over folds per detector x initialisation x dataset.

    Example:
        >>> runs = pd.DataFrame({"detector": ["d", "d"], "initialisation": ["scratch"] * 2, "dataset": ["x"] * 2,
        ...                      "fold": [0, 1], "metric": ["AP"] * 2, "value": [0.2, 0.4]})
        >>> row = summarise_runs(runs, ["AP"]).iloc[0]
        >>> int(row["num_folds"]), round(float(row["AP_mean"]), 6), round(float(row["AP_std"]), 6)
        (2, 0.3, 0.141421)
    """
    wide = runs[runs["metric"].isin(metrics)].pivot_table(
        index=list(RUN_KEYS), columns="metric", values="value", aggfunc="first"
    )
    wide = wide.reindex(columns=list(metrics))
    # The evaluation's -1 marks "no ground truth": keep it out of means (NaN poisons the row's mean on purpose).
    wide = wide.mask(np.isclose(wide, UNDEFINED))
    grouped = wide.groupby(level=list(GROUP_KEYS), sort=True)
    summary = pd.DataFrame({"num_folds": grouped.size()})
    for metric in metrics:
        summary[f"{metric}_mean"] = grouped[metric].apply(lambda v: v.mean(skipna=False))
        summary[f"{metric}_std"] = grouped[metric].apply(lambda v: v.std(ddof=STD_DDOF, skipna=False))
    return summary.reset_index()


def _mean_std_text(mean: float, std: float, decimals: int = MARKDOWN_DECIMALS) -> str:
    if not math.isfinite(mean):
        return "n/a"
    std_text = f"{std:.{decimals}f}" if math.isfinite(std) else "n/a"
    return f"{mean:.{decimals}f} ± {std_text}"


def summary_markdown(summary: pd.DataFrame, metrics: dict[str, str] = SUMMARY_METRICS) -> str:
    """Markdown table of ``summarise_runs`` output: ``mean ± std`` with 3 decimals.

    Example:
        >>> s = pd.DataFrame({"detector": ["d"], "initialisation": ["mae"], "dataset": ["x"], "num_folds": [2],
        ...                   "AP_mean": [0.5], "AP_std": [0.01]})
        >>> print(summary_markdown(s, {"AP": "AP@0.1"}))
        | Detector | Initialisation | Dataset | Folds | AP@0.1 |
        |---|---|---|---:|---:|
        | d | mae | x | 2 | 0.500 ± 0.010 |
    """
    header = ["Detector", "Initialisation", "Dataset", "Folds", *metrics.values()]
    lines = ["| " + " | ".join(header) + " |", "|---|---|---|---:|" + "---:|" * len(metrics)]
    for _, row in summary.iterrows():
        cells = [str(row["detector"]), str(row["initialisation"]), str(row["dataset"]), str(int(row["num_folds"]))]
        cells += [_mean_std_text(float(row[f"{m}_mean"]), float(row[f"{m}_std"])) for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_aggregation(
    metric_files: Sequence[MetricFile],
    out_csv: str | os.PathLike,
    out_md: str | os.PathLike,
    runs_csv: str | os.PathLike | None = None,
) -> pd.DataFrame:
    """Write the main results table (CSV + Markdown) and the tidy per-run table; return the main table.

    ``metric_files`` lists ``(arch, init, dataset, fold, path)``; ``runs_csv`` defaults to ``runs.csv`` beside
    ``out_csv``. All files are written atomically.

    Example:
        >>> files = [("retina_unet", "scratch", "demo", 0, "results/metrics/retina_unet/scratch/demo/fold0.json")]
        >>> run_aggregation(files, "results/tables/main_results.csv",
        ...                 "results/tables/main_results.md")  # doctest: +SKIP
    """
    if not metric_files:
        raise ValueError("run_aggregation needs at least one metric file")
    runs_csv = Path(out_csv).with_name("runs.csv") if runs_csv is None else Path(runs_csv)
    runs = build_runs_table(metric_files)
    paths = {tuple(str(v) for v in entry[:4]): entry[4] for entry in metric_files}
    for metric in SUMMARY_METRICS:
        undefined = runs[(runs["metric"] == metric) & np.isclose(runs["value"], UNDEFINED)]
        for _, row in undefined.iterrows():
            path = paths[tuple(str(row[k]) for k in RUN_KEYS)]
            LOGGER.warning("%s: %s is undefined (-1, no ground truth); its summary row shows n/a", path, metric)
    summary = summarise_runs(runs)
    with atomic_path(runs_csv) as tmp:
        runs.to_csv(tmp, index=False)
    with atomic_path(out_csv) as tmp:
        summary.to_csv(tmp, index=False)
    with atomic_path(out_md) as tmp:
        tmp.write_text(summary_markdown(summary) + "\n")
    return summary
