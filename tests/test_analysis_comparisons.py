"""Paired comparisons against scipy.stats.wilcoxon, statsmodels' multipletests and hand-worked numbers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.stats
from statsmodels.stats.multitest import multipletests

from pretrain_det3d.analysis.bootstrap import dataset_seed, paired_bootstrap
from pretrain_det3d.analysis.case_level import from_case_records
from pretrain_det3d.analysis.comparisons import (
    COMPARISON_COLUMNS,
    compare_with_baseline,
    direction_of,
    holm_adjust,
    rank_biserial,
    signed_rank_test,
)
from pretrain_det3d.analysis.tables import AnalysisInputError

DETECTORS = ("retina_unet", "deformable_detr")
DATASETS = ("x", "y")
INITIALISATIONS = ("scratch", "mae", "voco")


def _runs(seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for detector in DETECTORS:
        for dataset in DATASETS:
            for initialisation in INITIALISATIONS:
                for fold in range(5):
                    rows.append((detector, initialisation, dataset, fold, "AP", float(rng.uniform())))
    return pd.DataFrame(rows, columns=["detector", "initialisation", "dataset", "fold", "metric", "value"])


def _fold_values(runs: pd.DataFrame, detector: str, dataset: str, initialisation: str) -> np.ndarray:
    rows = runs[(runs["detector"] == detector) & (runs["dataset"] == dataset)
                & (runs["initialisation"] == initialisation)].sort_values("fold")
    return rows["value"].to_numpy()


@pytest.mark.parametrize("values, baseline", [
    ([0.5, 0.6, 0.7, 0.8, 0.9], [0.4, 0.4, 0.4, 0.4, 0.4]),      # all better, no ties
    ([0.1, 0.5, 0.2, 0.9, 0.3], [0.2, 0.3, 0.5, 0.1, 0.35]),    # mixed signs
    ([0.5, 0.5, 0.7, 0.2, 0.9], [0.4, 0.4, 0.5, 0.2, 0.1]),     # a zero and a tie in |d|
])
def test_signed_rank_test_equals_scipy(values, baseline):
    result = signed_rank_test(values, baseline)
    reference = scipy.stats.wilcoxon(values, baseline)
    assert result.p_value == pytest.approx(reference.pvalue)
    assert result.statistic == pytest.approx(reference.statistic)


def test_smallest_attainable_p_with_five_folds_is_0_0625():
    result = signed_rank_test([0.5, 0.6, 0.7, 0.8, 0.9], [0.1, 0.1, 0.1, 0.1, 0.1])
    assert result.p_value == pytest.approx(2 / 2 ** 5) == pytest.approx(0.0625)
    assert result.min_attainable_p == pytest.approx(0.0625)
    # one zero difference leaves four pairs: the bound doubles to 2 / 2**4
    with_zero = signed_rank_test([0.5, 0.6, 0.7, 0.8, 0.1], [0.1, 0.1, 0.1, 0.1, 0.1])
    assert with_zero.n_nonzero == 4
    assert with_zero.min_attainable_p == pytest.approx(0.125) == pytest.approx(with_zero.p_value)


def test_all_zero_differences_give_p_one():
    result = signed_rank_test([0.3] * 5, [0.3] * 5)
    assert (result.p_value, result.n_nonzero, result.min_attainable_p) == (1.0, 0, 1.0)


def test_rank_biserial_hand_worked_with_ties_and_zero():
    # |d| ranks 1..5, R+ = 1 + 3 + 4 + 5 = 13, R- = 2
    assert rank_biserial([0.1, -0.2, 0.3, 0.4, 0.5]) == pytest.approx(11 / 15)
    # zero dropped; |d| = 1, 1, 2, 3 -> ranks 1.5, 1.5, 3, 4; R+ = 8.5, R- = 1.5
    assert rank_biserial([1.0, -1.0, 2.0, 0.0, 3.0]) == pytest.approx(7 / 10)
    assert rank_biserial([-0.1, -0.3]) == -1.0
    assert rank_biserial([0.0, 0.0]) == 0.0


def test_rank_biserial_agrees_with_the_wilcoxon_statistic():
    differences = np.array([0.12, -0.05, 0.3, 0.07, -0.2, 0.4])
    smaller = scipy.stats.wilcoxon(differences).statistic  # two-sided: min(R+, R-)
    total = len(differences) * (len(differences) + 1) / 2
    assert abs(rank_biserial(differences)) == pytest.approx((total - 2 * smaller) / total)


def test_holm_hand_worked_and_against_statsmodels():
    # sorted 0.01, 0.03, 0.04 -> 3 * 0.01, max(0.03, 2 * 0.03), max(0.06, 1 * 0.04)
    adjusted, reject = holm_adjust([0.01, 0.04, 0.03], alpha=0.05)
    assert adjusted.tolist() == pytest.approx([0.03, 0.06, 0.06])
    assert reject.tolist() == [True, False, False]
    p_values = np.random.default_rng(0).uniform(0, 0.1, size=9)
    reference_reject, reference, _, _ = multipletests(p_values, alpha=0.05, method="holm")
    ours, ours_reject = holm_adjust(p_values)
    np.testing.assert_allclose(ours, reference)
    np.testing.assert_array_equal(ours_reject, reference_reject)


def test_direction_hand_worked():
    assert [direction_of(d) for d in (0.1, -0.1, 0.0)] == ["better", "worse", "equal"]
    assert direction_of(-0.1, higher_is_better=False) == "better"
    assert direction_of(0.001, equal_tolerance=0.01) == "equal"
    assert direction_of(float("nan")) == "undefined"


def test_table_matches_direct_calls_for_every_row():
    runs = _runs()
    table = compare_with_baseline(runs, metric="AP")
    assert list(table.columns) == list(COMPARISON_COLUMNS)
    assert len(table) == len(DETECTORS) * len(DATASETS) * 2
    assert set(table["initialisation"]) == {"mae", "voco"}
    assert (table["baseline"] == "scratch").all()
    for row in table.itertuples(index=False):
        values = _fold_values(runs, row.detector, row.dataset, row.initialisation)
        baseline = _fold_values(runs, row.detector, row.dataset, "scratch")
        assert row.mean_diff == pytest.approx(np.mean(values - baseline))
        assert row.std_diff == pytest.approx(np.std(values - baseline, ddof=1))
        assert row.p_wilcoxon == pytest.approx(scipy.stats.wilcoxon(values, baseline).pvalue)
        assert row.p_wilcoxon_min == pytest.approx(0.0625)
        assert row.direction == ("better" if row.mean_diff > 0 else "worse")
        assert row.effect_size_rank_biserial == pytest.approx(rank_biserial(values - baseline))
    # Holm across the whole family of 8 comparisons
    _, reference, _, _ = multipletests(table["p_wilcoxon"], method="holm")
    np.testing.assert_allclose(table["p_wilcoxon_holm"], reference)
    assert not table["reject_wilcoxon_holm"].any()  # 5 folds: no p below 0.0625
    assert table["p_bootstrap"].isna().all() and table["ci_low"].isna().all()
    assert (table["case_direction"] == "undefined").all()


def test_holm_family_by_detector_corrects_within_each_detector():
    table = compare_with_baseline(_runs(), metric="AP", family_by=["detector"])
    for detector in DETECTORS:
        part = table[table["detector"] == detector]
        _, reference, _, _ = multipletests(part["p_wilcoxon"], method="holm")
        np.testing.assert_allclose(part["p_wilcoxon_holm"], reference)


def test_hand_worked_directions_and_equal():
    runs = pd.DataFrame({
        "detector": "d", "dataset": "x", "metric": "AP", "fold": list(range(5)) * 3,
        "initialisation": ["scratch"] * 5 + ["mae"] * 5 + ["voco"] * 5,
        "value": [0.3, 0.4, 0.5, 0.6, 0.7, 0.2, 0.3, 0.4, 0.5, 0.5, 0.3, 0.4, 0.5, 0.6, 0.7],
    })
    table = compare_with_baseline(runs, metric="AP").set_index("initialisation")
    assert table.loc["mae", "direction"] == "worse"
    assert table.loc["mae", "mean_diff"] == pytest.approx(-0.12)
    assert table.loc["mae", "effect_size_rank_biserial"] == -1.0
    assert table.loc["voco", "direction"] == "equal"
    assert table.loc["voco", "p_wilcoxon"] == 1.0
    lower_better = compare_with_baseline(runs, metric="AP", higher_is_better=False).set_index("initialisation")
    assert lower_better.loc["mae", "direction"] == "better"


def _records(seed: int = 2) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for detector in DETECTORS:
        for dataset, n_cases in zip(DATASETS, (9, 6)):
            for initialisation in INITIALISATIONS:
                for index in range(n_cases):
                    num_gt = int(rng.integers(1, 4))
                    rows.append((detector, initialisation, dataset, index % 5, f"{dataset}{index}",
                                 int(rng.integers(0, num_gt + 1)), num_gt))
    return pd.DataFrame(rows, columns=["detector", "initialisation", "dataset", "fold", "case", "tp", "num_gt"])


def test_case_columns_equal_a_direct_paired_bootstrap():
    data = from_case_records(_records())
    table = compare_with_baseline(_runs(), metric="AP", case_data=data, n_resamples=150, confidence=0.9, seed=4)
    for row in table.itertuples(index=False):
        direct = paired_bootstrap(
            data.cases_of(row.dataset), data.statistic_for(row.detector, row.dataset, row.initialisation),
            data.statistic_for(row.detector, row.dataset, "scratch"), n_resamples=150, confidence=0.9,
            seed=dataset_seed(4, row.dataset))
        assert (row.case_diff, row.ci_low, row.ci_high, row.p_bootstrap) == pytest.approx(
            (direct.difference, direct.ci_low, direct.ci_high, direct.p_value))
        assert row.case_direction == direction_of(direct.difference)
        assert (row.n_cases, row.n_resamples, row.seed) == (len(data.cases_of(row.dataset)), 150, 4)
    reference_reject, reference, _, _ = multipletests(table["p_bootstrap"], alpha=0.05, method="holm")
    np.testing.assert_allclose(table["p_bootstrap_holm"], reference)
    np.testing.assert_array_equal(table["reject_bootstrap_holm"], reference_reject)


def test_missing_baseline_or_unmatched_folds_fail_clearly():
    runs = _runs()
    with pytest.raises(AnalysisInputError, match="baseline 'scratch' missing for deformable_detr/x"):
        compare_with_baseline(runs[~((runs["initialisation"] == "scratch") & (runs["dataset"] == "x")
                                     & (runs["detector"] == "deformable_detr"))], metric="AP")
    with pytest.raises(AnalysisInputError, match="needs the same folds"):
        compare_with_baseline(runs.drop(index=runs.index[(runs["initialisation"] == "mae")][0]), metric="AP")
    with pytest.raises(AnalysisInputError, match="no initialisation other than"):
        compare_with_baseline(runs[runs["initialisation"] == "scratch"], metric="AP")
    with pytest.raises(AnalysisInputError, match="family_by"):
        compare_with_baseline(runs, metric="AP", family_by=["fold"])
