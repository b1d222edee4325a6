"""Per (detector, dataset, initialisation): mean and standard deviation over folds, and bootstrap CIs over cases.

- ``fold_summary``: mean and sample standard deviation (``ddof=1``, NaN for a single fold) of each metric over
  the folds of a group; ``n_folds`` says how many folds entered.
- ``case_bootstrap_summary``: the statistic on all (pooled) cases and its percentile bootstrap interval
  (``analysis.bootstrap``: ``n_resamples``, ``confidence``, seed ``dataset_seed(seed, dataset)``, all written
  into the table so that a number can be traced to its settings).
"""

from __future__ import annotations

from typing import Sequence

import pandas as pd

from pretrain_det3d.analysis.bootstrap import (
    DEFAULT_CONFIDENCE,
    DEFAULT_N_RESAMPLES,
    DEFAULT_SEED,
    dataset_seed,
    evaluate_resamples,
    percentile_interval,
    resample_indices,
)
from pretrain_det3d.analysis.case_level import CaseLevelData
from pretrain_det3d.analysis.tables import metric_values

#: Columns of ``fold_summary``'s table.
FOLD_SUMMARY_COLUMNS = ("detector", "dataset", "initialisation", "metric", "mean", "std", "n_folds")
#: Columns of ``case_bootstrap_summary``'s table.
CASE_SUMMARY_COLUMNS = ("detector", "dataset", "initialisation", "estimate", "ci_low", "ci_high", "n_cases",
                        "n_resamples", "confidence", "seed")


def fold_summary(runs: pd.DataFrame, metrics: Sequence[str] | None = None) -> pd.DataFrame:
    """Mean and sample standard deviation over folds per detector, dataset, initialisation and metric.

    ``metrics`` defaults to every metric of the table.

    Example:
        >>> runs = pd.DataFrame({"detector": "d", "initialisation": "scratch", "dataset": "x", "fold": [0, 1],
        ...                      "metric": "AP", "value": [0.2, 0.4]})
        >>> row = fold_summary(runs).iloc[0]
        >>> round(float(row["mean"]), 6), round(float(row["std"]), 6), int(row["n_folds"])
        (0.3, 0.141421, 2)
    """
    wanted = list(metrics) if metrics is not None else sorted(map(str, runs["metric"].unique()))
    parts = []
    for metric in wanted:
        values = metric_values(runs, metric)
        grouped = values.groupby(["detector", "dataset", "initialisation"], sort=True)["value"]
        table = grouped.agg(mean="mean", std=lambda v: v.std(ddof=1), n_folds="count").reset_index()
        table.insert(3, "metric", metric)
        parts.append(table)
    result = pd.concat(parts, ignore_index=True)
    result["n_folds"] = result["n_folds"].astype(int)
    return result.loc[:, list(FOLD_SUMMARY_COLUMNS)]


def case_bootstrap_summary(groups: pd.DataFrame | Sequence[tuple[str, str, str]], case_data: CaseLevelData,
                           n_resamples: int = DEFAULT_N_RESAMPLES, confidence: float = DEFAULT_CONFIDENCE,
                           seed: int = DEFAULT_SEED) -> pd.DataFrame:
    """Statistic on all cases and its percentile bootstrap CI for each (detector, dataset, initialisation).

    ``groups`` is a table with those three columns (e.g. ``fold_summary``'s output; repeats are dropped) or a
    list of ``(detector, dataset, initialisation)`` tuples. All groups of a dataset share its resamples.

    Example:
        >>> from pretrain_det3d.analysis.case_level import from_case_records
        >>> records = pd.DataFrame({"detector": "d", "initialisation": "scratch", "dataset": "x", "fold": 0,
        ...                         "case": ["c0", "c1"], "tp": [1, 0], "num_gt": [1, 1]})
        >>> table = case_bootstrap_summary([("d", "x", "scratch")], from_case_records(records), n_resamples=50)
        >>> float(table.loc[0, "estimate"]), int(table.loc[0, "n_cases"])
        (0.5, 2)
    """
    if isinstance(groups, pd.DataFrame):
        keys = groups[["detector", "dataset", "initialisation"]].drop_duplicates()
        group_list = [tuple(map(str, row)) for row in keys.itertuples(index=False)]
    else:
        group_list = [tuple(map(str, group)) for group in groups]
    rows = []
    for dataset in sorted({group[1] for group in group_list}):
        members = [group for group in group_list if group[1] == dataset]
        case_ids = case_data.cases_of(dataset)
        seed_of_dataset = dataset_seed(seed, dataset)
        indices = resample_indices(len(case_ids), n_resamples, seed_of_dataset)
        statistics = [case_data.statistic_for(detector, dataset, init) for detector, _, init in members]
        distributions = evaluate_resamples(case_ids, statistics, indices, description=f"bootstrap {dataset}")
        for column, ((detector, _, initialisation), statistic) in enumerate(zip(members, statistics)):
            low, high = percentile_interval(distributions[:, column], confidence)
            rows.append({
                "detector": detector, "dataset": dataset, "initialisation": initialisation,
                "estimate": float(statistic(case_ids)), "ci_low": low, "ci_high": high, "n_cases": len(case_ids),
                "n_resamples": n_resamples, "confidence": confidence, "seed": seed,
            })
    table = pd.DataFrame(rows, columns=list(CASE_SUMMARY_COLUMNS))
    return table.sort_values(["detector", "dataset", "initialisation"], ignore_index=True)

