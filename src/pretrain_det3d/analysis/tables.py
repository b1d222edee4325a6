"""The tidy input tables of the statistics, their column names, and one clear error when a table is malformed.

Two tables feed the analysis:

- the per-run table, one row per run and metric: ``detector, initialisation, dataset, fold, metric, value``;
- the per-case records, one row per run and case: ``detector, initialisation, dataset, fold, case`` plus the
  per-case columns of ``evaluation.run`` (``num_gt, num_pred, tp, fp, fn, ...``).

Statistics must not average over a missing run or a metric without ground truth, so a missing value (NaN) or the
evaluation's "undefined" marker (``-1``, see ``evaluation.metrics.UNDEFINED``) is an error here, not a silent gap.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd


#: Columns that identify one run of the study.
RUN_KEYS: tuple[str, ...] = ("detector", "initialisation", "dataset", "fold")
#: Columns of the per-run table.
RUN_COLUMNS: tuple[str, ...] = (*RUN_KEYS, "metric", "value")
#: Columns that identify one case of one run in the per-case records.
CASE_KEYS: tuple[str, ...] = (*RUN_KEYS, "case")
#: The study's main metric (nnDetection's key): AP at IoU 0.1, at most 100 detections per case.
MAIN_METRIC = "AP_IoU_0.10_MaxDet_100"
#: The evaluation's marker of an undefined metric (no ground truth), ``evaluation.metrics.UNDEFINED``; repeated
#: here because importing the evaluation package pulls in torch and MONAI, which the statistics do not need.
UNDEFINED_METRIC_VALUE = -1.0
#: The initialisation every other one is compared against.
BASELINE_INITIALISATION = "scratch"


class AnalysisInputError(ValueError):
    """A table handed to the analysis lacks columns, repeats a key or holds missing values."""


def require_columns(table: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    """Raise ``AnalysisInputError`` naming ``what`` and the missing columns if ``table`` lacks any of ``columns``.

    Example:
        >>> require_columns(pd.DataFrame({"a": [1]}), ["a"], "toy table")
        >>> require_columns(pd.DataFrame({"a": [1]}), ["a", "b"], "toy table")
        Traceback (most recent call last):
        ...
        pretrain_det3d.analysis.tables.AnalysisInputError: toy table: missing column(s) ['b'] (has ['a'])
    """
    missing = [column for column in columns if column not in table.columns]
    if missing:
        raise AnalysisInputError(f"{what}: missing column(s) {missing} (has {list(table.columns)})")


def metric_values(runs: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Rows of ``metric`` from the per-run table as ``detector, initialisation, dataset, fold, value``.

    Checks the columns, that the metric is present, that each run appears once and that no value is missing or
    undefined (``-1``). ``fold`` keeps its type; ``value`` becomes float.

    Example:
        >>> runs = pd.DataFrame({"detector": ["d"], "initialisation": ["scratch"], "dataset": ["x"], "fold": [0],
        ...                      "metric": ["AP"], "value": [0.5]})
        >>> metric_values(runs, "AP")["value"].tolist()
        [0.5]
    """
    require_columns(runs, RUN_COLUMNS, "per-run table")
    rows = runs.loc[runs["metric"] == metric, list(RUN_KEYS) + ["value"]].copy()
    if rows.empty:
        known = sorted(map(str, runs["metric"].unique()))
        raise AnalysisInputError(f"per-run table: metric {metric!r} not found (metrics: {known})")
    duplicated = rows.duplicated(list(RUN_KEYS), keep=False)
    if duplicated.any():
        first = rows.loc[duplicated, list(RUN_KEYS)].iloc[0].to_dict()
        raise AnalysisInputError(f"per-run table: run {first} has more than one {metric!r} value")
    rows["value"] = pd.to_numeric(rows["value"], errors="coerce").astype(float)
    invalid = rows["value"].isna() | np.isclose(rows["value"], UNDEFINED_METRIC_VALUE)
    if invalid.any():
        first = rows.loc[invalid, list(RUN_KEYS)].iloc[0].to_dict()
        raise AnalysisInputError(
            f"per-run table: {int(invalid.sum())} {metric!r} value(s) missing or undefined "
            f"(-1: no ground truth), first at run {first}"
        )
    return rows.reset_index(drop=True)
