"""All pairwise comparisons of the initialisations of each detector, across the datasets of the study.

``compare_with_baseline`` asks "does pre-training beat scratch on this dataset?"; the significance map asks
"which initialisations differ from which, over the whole study?". For each detector and each pair
``(a, b)`` of its initialisations (``a`` before ``b`` in the given order), ``compare_pairwise`` returns:

- over runs: the fold values of ``a`` and ``b`` are paired by (dataset, fold); ``mean_diff`` is the mean of
  ``value(a) - value(b)`` over all pairs, ``direction`` its sign ("better" means ``a`` is better), the
  Wilcoxon signed-rank test over the pairs (``comparisons.signed_rank_test``, two-sided; with 8 datasets x 5 folds
  there are 40 pairs, so unlike a single dataset's 5 folds it can reach small p-values; ``p_wilcoxon_min`` gives
  the smallest attainable p) and the matched-pairs rank-biserial effect size;
- over cases (when case-level data is given): ``case_diff`` = the mean over datasets of
  ``statistic(a) - statistic(b)`` on all pooled cases of the dataset (every dataset weighs the same, like the mean
  rank). Its bootstrap distribution takes, for resample ``b``, the mean over datasets of the paired difference on
  resample ``b`` of every dataset (each dataset resampled independently, seed ``dataset_seed(seed, dataset)``, so
  the resamples are those of ``compare_with_baseline`` and ``rank_stability``); ``ci_low`` / ``ci_high`` its
  percentile interval and ``p_bootstrap`` the two-sided bootstrap p-value (``bootstrap.bootstrap_p_value``);
- Holm's correction of each test over the ``K (K - 1) / 2`` pairs of a detector (the family of one significance
  map), decisions at ``alpha``.
"""

from __future__ import annotations

from itertools import combinations
from typing import Sequence

import numpy as np
import pandas as pd

from pretrain_det3d.analysis.bootstrap import (
    DEFAULT_CONFIDENCE,
    DEFAULT_N_RESAMPLES,
    DEFAULT_SEED,
    bootstrap_p_value,
    dataset_seed,
    evaluate_resamples,
    percentile_interval,
    resample_indices,
)
from pretrain_det3d.analysis.case_level import CaseLevelData
from pretrain_det3d.analysis.comparisons import (
    DEFAULT_ALPHA,
    DEFAULT_EQUAL_TOLERANCE,
    direction_of,
    holm_adjust,
    rank_biserial,
    signed_rank_test,
)
from pretrain_det3d.analysis.tables import MAIN_METRIC, AnalysisInputError, metric_values

#: Columns of ``compare_pairwise``'s table, in order.
PAIRWISE_COLUMNS = (
    "detector", "metric", "initialisation_a", "initialisation_b", "n_datasets", "n_pairs", "mean_a", "mean_b",
    "mean_diff", "direction", "effect_size_rank_biserial", "wilcoxon_statistic", "n_nonzero", "p_wilcoxon",
    "p_wilcoxon_min", "p_wilcoxon_holm", "reject_wilcoxon_holm", "case_diff", "ci_low", "ci_high", "case_direction",
    "p_bootstrap", "p_bootstrap_holm", "reject_bootstrap_holm", "n_resamples", "confidence", "seed", "alpha",
)


def _paired_table(values: pd.DataFrame, detector: str) -> pd.DataFrame:
    """Metric values of one detector as a (dataset, fold) x initialisation table; every cell must be present."""
    part = values[values["detector"] == detector]
    table = part.pivot_table(index=["dataset", "fold"], columns="initialisation", values="value", aggfunc="first")
    if table.isna().any().any():
        missing = table.isna().stack()
        dataset, fold, initialisation = missing[missing].index[0]
        raise AnalysisInputError(
            f"per-run table: {detector}/{initialisation}/{dataset} fold {fold} is missing; the pairwise comparison "
            "needs every initialisation on every (dataset, fold) of the detector")
    return table


def _case_differences(case_data: CaseLevelData, detector: str, datasets: Sequence[str], names: Sequence[str],
                      n_resamples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-dataset statistics on all cases ``[D, K]`` and on every resample ``[D, B, K]``."""
    observed, resampled = [], []
    for dataset in datasets:
        case_ids = case_data.cases_of(dataset)
        indices = resample_indices(len(case_ids), n_resamples, dataset_seed(seed, dataset))
        statistics = [case_data.statistic_for(detector, dataset, name) for name in names]
        resampled.append(evaluate_resamples(case_ids, statistics, indices,
                                            description=f"pairwise bootstrap {detector}/{dataset}"))
        observed.append([float(statistic(case_ids)) for statistic in statistics])
    return np.asarray(observed), np.stack(resampled)


def compare_pairwise(
    runs: pd.DataFrame,
    metric: str = MAIN_METRIC,
    case_data: CaseLevelData | None = None,
    order: Sequence[str] | None = None,
    n_resamples: int = DEFAULT_N_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = DEFAULT_SEED,
    alpha: float = DEFAULT_ALPHA,
    higher_is_better: bool = True,
    equal_tolerance: float = DEFAULT_EQUAL_TOLERANCE,
) -> pd.DataFrame:
    """Every pair of initialisations per detector over all its datasets; columns ``PAIRWISE_COLUMNS``.

    ``order`` fixes which initialisation of a pair is ``a`` (the earlier one); names it does not list follow
    alphabetically. Without ``case_data`` the case-level columns are NaN. A detector run from one initialisation
    only has no pairs and no rows; when no detector has two, the error says so.

    Example:
        >>> runs = pd.DataFrame({"detector": "d", "dataset": "x", "fold": list(range(6)) * 2, "metric": "AP",
        ...                      "initialisation": ["scratch"] * 6 + ["mae"] * 6,
        ...                      "value": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6] + [0.2, 0.3, 0.4, 0.5, 0.6, 0.8]})
        >>> row = compare_pairwise(runs, "AP", order=["scratch", "mae"]).iloc[0]
        >>> row["initialisation_a"], row["direction"], float(row["p_wilcoxon"])
        ('scratch', 'worse', 0.03125)
    """
    values = metric_values(runs, metric)
    values = values.astype({"detector": str, "dataset": str, "initialisation": str})
    rows: list[dict] = []
    skipped: list[str] = []
    for detector in sorted(values["detector"].unique()):
        table = _paired_table(values, detector)
        present = [str(name) for name in table.columns]
        listed = [name for name in (order or []) if name in present]
        names = listed + sorted(set(present) - set(listed))
        if len(names) < 2:  # a detector run from one initialisation only (e.g. the demo's DETR) has no pairs
            skipped.append(f"{detector} ({names[0] if names else 'none'})")
            continue
        datasets = sorted(table.index.get_level_values("dataset").unique())
        if case_data is not None:
            observed, resampled = _case_differences(case_data, detector, datasets, names, n_resamples, seed)
        first_row = len(rows)
        for (i, a), (j, b) in combinations(enumerate(names), 2):
            differences = (table[a] - table[b]).to_numpy()
            test = signed_rank_test(table[a].to_numpy(), table[b].to_numpy())
            mean_diff = float(differences.mean())
            row = {
                "detector": detector, "metric": metric, "initialisation_a": a, "initialisation_b": b,
                "n_datasets": len(datasets), "n_pairs": len(differences), "mean_a": float(table[a].mean()),
                "mean_b": float(table[b].mean()), "mean_diff": mean_diff,
                "direction": direction_of(mean_diff, higher_is_better, equal_tolerance),
                "effect_size_rank_biserial": rank_biserial(differences), "wilcoxon_statistic": test.statistic,
                "n_nonzero": test.n_nonzero, "p_wilcoxon": test.p_value, "p_wilcoxon_min": test.min_attainable_p,
                "case_direction": "undefined", "alpha": alpha,
            }
            if case_data is not None:
                distribution = (resampled[:, :, i] - resampled[:, :, j]).mean(axis=0)  # [D, B] -> [B]
                case_diff = float(np.mean(observed[:, i] - observed[:, j]))
                low, high = percentile_interval(distribution, confidence)
                row.update({"case_diff": case_diff, "ci_low": low, "ci_high": high,
                            "case_direction": direction_of(case_diff, higher_is_better, equal_tolerance),
                            "p_bootstrap": bootstrap_p_value(distribution), "n_resamples": n_resamples,
                            "confidence": confidence, "seed": seed})
            rows.append(row)
        family = rows[first_row:]
        for test_name in ("wilcoxon", "bootstrap"):
            adjusted, reject = holm_adjust([row.get(f"p_{test_name}", np.nan) for row in family], alpha)
            for row, p_value, decision in zip(family, adjusted, reject):
                row[f"p_{test_name}_holm"], row[f"reject_{test_name}_holm"] = float(p_value), bool(decision)
    if not rows:
        raise AnalysisInputError(f"per-run table: every detector has a single initialisation ({', '.join(skipped)}); "
                                 "nothing to compare pairwise")
    return pd.DataFrame(rows).reindex(columns=list(PAIRWISE_COLUMNS))
