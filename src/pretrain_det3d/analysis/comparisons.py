"""Paired comparisons of every initialisation against a baseline (``scratch``) per detector and dataset.

For each (detector, dataset, initialisation != baseline) the table ``compare_with_baseline`` returns holds:

- over folds (the fold values of the initialisation and the baseline are paired by fold):
  ``mean_diff`` = mean over folds of ``value(init) - value(baseline)`` (the effect size in metric units),
  ``std_diff`` (``ddof=1``), ``direction`` ("better" / "worse" / "equal", by the sign of ``mean_diff``;
  "equal" when ``|mean_diff| <= equal_tolerance``; "better" means higher unless ``higher_is_better=False``);
- the Wilcoxon signed-rank test over folds, ``scipy.stats.wilcoxon(init, baseline, zero_method="wilcox",
  alternative="two-sided", method="auto")``: zero differences are dropped; with at most 50 non-zero pairs and no
  ties scipy computes the exact null distribution, with ties or zeros (and at most 13 pairs) an exact
  permutation over all sign flips. **With m non-zero pairs the smallest attainable two-sided p is 2 / 2**m:
  with 5 folds that is 0.0625, so no comparison over 5 folds can reach p < 0.05**, corrected or not. The table
  states this bound per row in ``p_wilcoxon_min``. When every difference is zero the test is undefined and
  ``p_wilcoxon`` is 1 (no evidence of a difference);
- ``effect_size_rank_biserial``: the matched-pairs rank-biserial correlation (Kerby 2014),
  ``(R+ - R-) / (R+ + R-)`` with ``R+`` / ``R-`` the sums of the ranks of ``|d|`` over the positive / negative
  non-zero fold differences (average ranks for ties). +1: every fold favours the initialisation (in the
  direction ``init - baseline``, whatever ``higher_is_better`` says), -1: every fold favours the baseline, 0 when
  all differences are zero;
- over cases (when case-level data is given; ``analysis.bootstrap``): ``case_diff`` = the statistic of the
  initialisation minus that of the baseline on all pooled cases, ``ci_low`` / ``ci_high`` its percentile
  bootstrap interval, ``case_direction``, and ``p_bootstrap`` the paired bootstrap p-value; every initialisation
  and the baseline of a dataset are evaluated on the same resamples (seed ``dataset_seed(seed, dataset)``);
- Holm's step-down correction (``statsmodels.stats.multitest.multipletests(method="holm")``) of ``p_wilcoxon``
  and of ``p_bootstrap`` separately, across the family of all rows of the table (or within groups of the
  columns named in ``family_by``), giving ``p_wilcoxon_holm`` / ``p_bootstrap_holm`` and the decisions at
  ``alpha`` in ``reject_wilcoxon_holm`` / ``reject_bootstrap_holm``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
from scipy.stats import rankdata, wilcoxon
from statsmodels.stats.multitest import multipletests

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
from pretrain_det3d.analysis.tables import (
    BASELINE_INITIALISATION,
    MAIN_METRIC,
    AnalysisInputError,
    metric_values,
)
from pretrain_det3d.settings.study import StatisticsSettings

#: Family-wise error rate at which the Holm decisions are taken.
DEFAULT_ALPHA = StatisticsSettings.default("alpha")
#: Differences with absolute value at most this are reported as "equal".
DEFAULT_EQUAL_TOLERANCE = 0.0
#: Columns of ``compare_with_baseline``'s table, in order.
COMPARISON_COLUMNS = (
    "detector", "dataset", "metric", "initialisation", "baseline", "n_folds", "mean", "baseline_mean",
    "mean_diff", "std_diff", "direction", "effect_size_rank_biserial", "wilcoxon_statistic", "n_nonzero",
    "p_wilcoxon", "p_wilcoxon_min", "p_wilcoxon_holm", "reject_wilcoxon_holm",
    "case_diff", "ci_low", "ci_high", "case_direction", "p_bootstrap", "p_bootstrap_holm", "reject_bootstrap_holm",
    "n_cases", "n_resamples", "confidence", "seed", "alpha",
)


@dataclass(frozen=True)
class SignedRankResult:
    """Wilcoxon signed-rank test of paired values (see the module docstring for the variant)."""

    statistic: float
    p_value: float
    n_nonzero: int
    min_attainable_p: float


def direction_of(difference: float, higher_is_better: bool = True,
                 equal_tolerance: float = DEFAULT_EQUAL_TOLERANCE) -> str:
    """"better", "worse" or "equal" for a difference ``init - baseline`` (NaN gives "undefined").

    Example:
        >>> direction_of(0.02), direction_of(0.02, higher_is_better=False), direction_of(0.0)
        ('better', 'worse', 'equal')
    """
    if not np.isfinite(difference):
        return "undefined"
    if abs(difference) <= equal_tolerance:
        return "equal"
    return "better" if (difference > 0) == higher_is_better else "worse"


def signed_rank_test(values: Sequence[float], baseline_values: Sequence[float]) -> SignedRankResult:
    """Two-sided Wilcoxon signed-rank test of paired ``values`` against ``baseline_values`` (scipy).

    Example:
        >>> result = signed_rank_test([0.5, 0.6, 0.7, 0.8, 0.9], [0.4, 0.4, 0.4, 0.4, 0.4])
        >>> result.p_value, result.min_attainable_p
        (0.0625, 0.0625)
    """
    values, baseline_values = np.asarray(values, float), np.asarray(baseline_values, float)
    if values.shape != baseline_values.shape or values.ndim != 1 or values.size == 0:
        raise ValueError(f"paired values must be two equal-length 1-D arrays, got {values.shape} and "
                         f"{baseline_values.shape}")
    n_nonzero = int(np.count_nonzero(values - baseline_values))
    if n_nonzero == 0:
        # scipy would divide by zero on the way to the same answer; no difference, no evidence
        return SignedRankResult(statistic=0.0, p_value=1.0, n_nonzero=0, min_attainable_p=1.0)
    result = wilcoxon(values, baseline_values, zero_method="wilcox", alternative="two-sided", method="auto")
    return SignedRankResult(statistic=float(result.statistic), p_value=float(result.pvalue), n_nonzero=n_nonzero,
                            min_attainable_p=min(1.0, 2.0 / 2.0 ** n_nonzero))


def rank_biserial(differences: Sequence[float]) -> float:
    """Matched-pairs rank-biserial correlation of paired differences, in [-1, 1] (0 if all are zero).

    Example:
        >>> rank_biserial([0.1, -0.2, 0.3, 0.4, 0.5])  # ranks 1..5; R+ = 13, R- = 2
        0.7333333333333333
    """
    differences = np.asarray(differences, dtype=float)
    nonzero = differences[differences != 0]
    if nonzero.size == 0:
        return 0.0
    ranks = rankdata(np.abs(nonzero), method="average")
    positive, negative = float(ranks[nonzero > 0].sum()), float(ranks[nonzero < 0].sum())
    return (positive - negative) / (positive + negative)


def holm_adjust(p_values: Sequence[float], alpha: float = DEFAULT_ALPHA) -> tuple[np.ndarray, np.ndarray]:
    """Holm-adjusted p-values and rejections at ``alpha`` (statsmodels); NaN entries stay NaN and are not counted.

    Example:
        >>> adjusted, reject = holm_adjust([0.01, 0.04, float("nan")])
        >>> adjusted.round(3).tolist(), reject.tolist()
        ([0.02, 0.04, nan], [True, True, False])
    """
    p_values = np.asarray(p_values, dtype=float)
    adjusted = np.full(p_values.shape, np.nan)
    reject = np.zeros(p_values.shape, dtype=bool)
    present = ~np.isnan(p_values)
    if present.any():
        decisions, corrected, _, _ = multipletests(p_values[present], alpha=alpha, method="holm")
        adjusted[present], reject[present] = corrected, decisions
    return adjusted, reject


def _fold_rows(values: pd.DataFrame, baseline: str, higher_is_better: bool,
               equal_tolerance: float) -> list[dict]:
    """Fold-level columns of every (detector, dataset, initialisation) against the baseline."""
    rows = []
    for (detector, dataset), group in values.groupby(["detector", "dataset"], sort=True):
        by_init = {init: part.set_index("fold")["value"] for init, part in group.groupby("initialisation")}
        if baseline not in by_init:
            raise AnalysisInputError(
                f"per-run table: baseline {baseline!r} missing for {detector}/{dataset} "
                f"(initialisations: {sorted(by_init)})"
            )
        reference = by_init[baseline]
        for initialisation in sorted(name for name in by_init if name != baseline):
            current = by_init[initialisation]
            if set(current.index) != set(reference.index):
                raise AnalysisInputError(
                    f"per-run table: {detector}/{initialisation}/{dataset} has folds {sorted(current.index)} but "
                    f"{baseline} has {sorted(reference.index)}; the fold comparison needs the same folds"
                )
            folds = sorted(reference.index)
            paired, paired_baseline = current.loc[folds].to_numpy(), reference.loc[folds].to_numpy()
            differences = paired - paired_baseline
            test = signed_rank_test(paired, paired_baseline)
            mean_diff = float(differences.mean())
            rows.append({
                "detector": detector, "dataset": dataset, "initialisation": initialisation, "baseline": baseline,
                "n_folds": len(folds), "mean": float(paired.mean()), "baseline_mean": float(paired_baseline.mean()),
                "mean_diff": mean_diff,
                "std_diff": float(differences.std(ddof=1)) if len(folds) > 1 else float("nan"),
                "direction": direction_of(mean_diff, higher_is_better, equal_tolerance),
                "effect_size_rank_biserial": rank_biserial(differences),
                "wilcoxon_statistic": test.statistic, "n_nonzero": test.n_nonzero,
                "p_wilcoxon": test.p_value, "p_wilcoxon_min": test.min_attainable_p,
            })
    return rows


def _case_columns(rows: list[dict], case_data: CaseLevelData, n_resamples: int, confidence: float, seed: int,
                  higher_is_better: bool, equal_tolerance: float) -> None:
    """Add the paired case bootstrap of each row, evaluating each (detector, dataset) on one set of resamples."""
    pairs = sorted({(row["detector"], row["dataset"]) for row in rows})
    for detector, dataset in pairs:
        members = [row for row in rows if row["detector"] == detector and row["dataset"] == dataset]
        case_ids = case_data.cases_of(dataset)
        indices = resample_indices(len(case_ids), n_resamples, dataset_seed(seed, dataset))
        names = [members[0]["baseline"]] + [row["initialisation"] for row in members]
        statistics = [case_data.statistic_for(detector, dataset, name) for name in names]
        distributions = evaluate_resamples(case_ids, statistics, indices,
                                           description=f"paired bootstrap {detector}/{dataset}")
        observed = [float(statistic(case_ids)) for statistic in statistics]
        for column, row in enumerate(members, start=1):
            differences = distributions[:, column] - distributions[:, 0]
            low, high = percentile_interval(differences, confidence)
            case_diff = observed[column] - observed[0]
            row.update({
                "case_diff": case_diff, "ci_low": low, "ci_high": high,
                "case_direction": direction_of(case_diff, higher_is_better, equal_tolerance),
                "p_bootstrap": bootstrap_p_value(differences), "n_cases": len(case_ids),
                "n_resamples": n_resamples, "confidence": confidence, "seed": seed,
            })


def compare_with_baseline(
    runs: pd.DataFrame,
    metric: str = MAIN_METRIC,
    baseline: str = BASELINE_INITIALISATION,
    case_data: CaseLevelData | None = None,
    n_resamples: int = DEFAULT_N_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = DEFAULT_SEED,
    alpha: float = DEFAULT_ALPHA,
    family_by: Sequence[str] = (),
    higher_is_better: bool = True,
    equal_tolerance: float = DEFAULT_EQUAL_TOLERANCE,
) -> pd.DataFrame:
    """Every initialisation against ``baseline`` per detector and dataset; columns ``COMPARISON_COLUMNS``.

    See the module docstring for each column. Without ``case_data`` the case-level columns are NaN.

    Example:
        >>> runs = pd.DataFrame({"detector": "d", "dataset": "x", "fold": list(range(5)) * 2, "metric": "AP",
        ...                      "initialisation": ["scratch"] * 5 + ["mae"] * 5,
        ...                      "value": [0.1, 0.2, 0.3, 0.4, 0.5, 0.2, 0.3, 0.4, 0.5, 0.7]})
        >>> row = compare_with_baseline(runs, metric="AP").iloc[0]
        >>> row["direction"], float(row["p_wilcoxon"]), float(row["p_wilcoxon_min"]), round(float(row["mean_diff"]), 3)
        ('better', 0.0625, 0.0625, 0.12)
    """
    values = metric_values(runs, metric)
    unknown = [column for column in family_by if column not in ("detector", "dataset", "initialisation")]
    if unknown:
        raise AnalysisInputError(f"family_by: unknown column(s) {unknown}; use detector, dataset, initialisation")
    rows = _fold_rows(values, baseline, higher_is_better, equal_tolerance)
    if not rows:
        raise AnalysisInputError(f"per-run table: no initialisation other than {baseline!r} to compare")
    if case_data is not None:
        _case_columns(rows, case_data, n_resamples, confidence, seed, higher_is_better, equal_tolerance)
    table = pd.DataFrame(rows).reindex(columns=list(COMPARISON_COLUMNS))
    table["metric"], table["alpha"] = metric, alpha
    if case_data is None:
        table["case_direction"] = "undefined"
    families = ([group.index for _, group in table.groupby(list(family_by), sort=False)] if family_by
                else [table.index])
    table["reject_wilcoxon_holm"] = False
    table["reject_bootstrap_holm"] = False
    for members in families:
        for test in ("wilcoxon", "bootstrap"):
            adjusted, reject = holm_adjust(table.loc[members, f"p_{test}"].to_numpy(float), alpha)
            table.loc[members, f"p_{test}_holm"] = adjusted
            table.loc[members, f"reject_{test}_holm"] = reject
    return table.sort_values(["detector", "dataset", "initialisation"], ignore_index=True)
