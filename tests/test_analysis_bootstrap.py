"""Case-level bootstrap against a hand-computed seeded bootstrap and against scipy.stats.bootstrap."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats

from pretrain_det3d.analysis.bootstrap import (
    bootstrap_ci,
    bootstrap_p_value,
    dataset_seed,
    evaluate_resamples,
    paired_bootstrap,
    percentile_interval,
    resample_indices,
)

CASE_VALUES = {"c0": 1.0, "c1": 2.0, "c2": 4.0, "c3": 8.0}


def mean_over(table: dict[str, float]):
    """A statistic over case ids that counts repeats (what a resample needs)."""
    return lambda ids: sum(table[case] for case in ids) / len(ids)


def hand_quantile(values: list[float], q: float) -> float:
    """Linear interpolation between order statistics at position q * (n - 1), written out by hand."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    below = math.floor(position)
    above = min(below + 1, len(ordered) - 1)
    return ordered[below] + (position - below) * (ordered[above] - ordered[below])


def test_bootstrap_ci_equals_a_hand_computed_seeded_bootstrap():
    case_ids, seed, n_resamples = list(CASE_VALUES), 7, 6
    # the documented scheme: one generator per seed, n_resamples rows of len(case_ids) draws with replacement
    draws = np.random.default_rng(seed).integers(0, len(case_ids), size=(n_resamples, len(case_ids)))
    means = []
    for row in draws.tolist():
        total = 0.0
        for position in row:
            total += CASE_VALUES[case_ids[position]]
        means.append(total / len(row))
    result = bootstrap_ci(case_ids, mean_over(CASE_VALUES), n_resamples=n_resamples, confidence=0.8, seed=seed)
    assert result.estimate == pytest.approx(15.0 / 4)
    assert result.distribution.tolist() == pytest.approx(means)
    assert result.ci_low == pytest.approx(hand_quantile(means, 0.1))
    assert result.ci_high == pytest.approx(hand_quantile(means, 0.9))


def test_bootstrap_ci_matches_scipy_percentile_bootstrap():
    rng = np.random.default_rng(3)
    values = rng.uniform(size=12)
    table = {f"case_{i:02d}": float(v) for i, v in enumerate(values)}
    ours = bootstrap_ci(list(table), mean_over(table), n_resamples=400, confidence=0.95, seed=11)
    reference = scipy.stats.bootstrap((values,), np.mean, n_resamples=400, confidence_level=0.95,
                                      method="percentile", rng=np.random.default_rng(11))
    np.testing.assert_allclose(ours.distribution, reference.bootstrap_distribution)
    assert ours.ci_low == pytest.approx(reference.confidence_interval.low)
    assert ours.ci_high == pytest.approx(reference.confidence_interval.high)


def test_paired_bootstrap_matches_scipy_paired_bootstrap():
    rng = np.random.default_rng(5)
    a, b = rng.uniform(size=10), rng.uniform(size=10)
    ids = [f"c{i}" for i in range(10)]
    table_a, table_b = dict(zip(ids, a.tolist())), dict(zip(ids, b.tolist()))
    ours = paired_bootstrap(ids, mean_over(table_a), mean_over(table_b), n_resamples=300, confidence=0.9, seed=2)
    reference = scipy.stats.bootstrap(
        (a, b), lambda x, y, axis: np.mean(x, axis=axis) - np.mean(y, axis=axis), paired=True,
        n_resamples=300, confidence_level=0.9, method="percentile", rng=np.random.default_rng(2))
    np.testing.assert_allclose(ours.distribution, reference.bootstrap_distribution)
    assert ours.ci_low == pytest.approx(reference.confidence_interval.low)
    assert ours.ci_high == pytest.approx(reference.confidence_interval.high)
    assert ours.difference == pytest.approx(a.mean() - b.mean())
    below = np.sum(ours.distribution <= 0)
    above = np.sum(ours.distribution >= 0)
    assert ours.p_value == pytest.approx(min(1.0, 2 * min(below + 1, above + 1) / 301))


def test_bootstrap_p_value_hand_worked():
    # 1 of 4 at or below 0, 3 at or above: 2 * min(2/5, 4/5)
    assert bootstrap_p_value(np.array([-0.2, 0.1, 0.3, 0.5])) == pytest.approx(0.8)
    # all above 0: 2 * 1/6, the observed sample counted as one resample keeps p above 0
    assert bootstrap_p_value(np.array([0.1, 0.2, 0.3, 0.4, 0.5])) == pytest.approx(1 / 3)
    assert bootstrap_p_value(np.zeros(10)) == 1.0


def test_identical_statistics_give_zero_difference_and_p_one():
    result = paired_bootstrap(list(CASE_VALUES), mean_over(CASE_VALUES), mean_over(CASE_VALUES), n_resamples=50)
    assert (result.difference, result.ci_low, result.ci_high, result.p_value) == (0.0, 0.0, 0.0, 1.0)


def test_resamples_hand_repeated_ids_to_the_statistic():
    seen = []
    evaluate_resamples(["a", "b", "c"], [lambda ids: seen.append(list(ids)) or 0.0], np.array([[2, 2, 0]]))
    assert seen == [["c", "c", "a"]]


def test_dataset_seed_is_stable_and_separates_datasets():
    first = resample_indices(20, 5, dataset_seed(0, "luna16"))
    again = resample_indices(20, 5, dataset_seed(0, "luna16"))
    other = resample_indices(20, 5, dataset_seed(0, "kits21"))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert dataset_seed(4, "luna16")[0] == 4


def test_percentile_interval_hand_worked():
    # 11 values 0..10: the 5 % and 95 % quantiles sit at positions 0.5 and 9.5
    assert percentile_interval(np.arange(11.0), 0.9) == pytest.approx((0.5, 9.5))


@pytest.mark.parametrize("call, message", [
    (lambda: resample_indices(0, 5), "at least one case"),
    (lambda: resample_indices(3, 0), "n_resamples"),
    (lambda: percentile_interval(np.ones(3), 1.0), "confidence"),
    (lambda: evaluate_resamples(["a"], [len], np.zeros((2, 3), dtype=int)), "shape"),
])
def test_bad_arguments_fail_clearly(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_undefined_resamples_are_left_out():
    """A resample without ground truth has no AP (NaN); intervals and p-values use the defined ones only."""
    import numpy as np

    from pretrain_det3d.analysis.bootstrap import bootstrap_p_value, percentile_interval

    with_nan = np.array([np.nan, 0.1, 0.2, 0.3, -0.1, np.nan])
    assert bootstrap_p_value(with_nan) == bootstrap_p_value(np.array([0.1, 0.2, 0.3, -0.1])) == 0.8
    assert np.allclose(percentile_interval(np.r_[np.arange(101.0), np.nan], 0.9), (5.0, 95.0))
    assert all(np.isnan(percentile_interval(np.array([np.nan, np.nan]), 0.9)))
    assert np.isnan(bootstrap_p_value(np.array([np.nan])))
