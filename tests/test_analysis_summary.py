"""Fold means and standard deviations against numpy, and case bootstrap CIs against direct bootstrap calls."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pretrain_det3d.analysis.bootstrap import bootstrap_ci, dataset_seed
from pretrain_det3d.analysis.case_level import from_case_records
from pretrain_det3d.analysis.summary import CASE_SUMMARY_COLUMNS, FOLD_SUMMARY_COLUMNS, case_bootstrap_summary, \
    fold_summary


def _runs(seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for detector in ("retina_unet", "deformable_detr"):
        for dataset in ("x", "y"):
            for initialisation in ("scratch", "mae"):
                for fold in range(5):
                    for metric in ("AP", "FROC"):
                        rows.append((detector, initialisation, dataset, fold, metric, float(rng.uniform())))
    return pd.DataFrame(rows, columns=["detector", "initialisation", "dataset", "fold", "metric", "value"])


def test_fold_summary_hand_worked():
    runs = pd.DataFrame({"detector": "d", "initialisation": "scratch", "dataset": "x", "fold": [0, 1, 2],
                         "metric": "AP", "value": [0.1, 0.2, 0.6]})
    row = fold_summary(runs).iloc[0]
    # mean 0.3; squared deviations 0.04 + 0.01 + 0.09 = 0.14 over n - 1 = 2
    assert row["mean"] == pytest.approx(0.3)
    assert row["std"] == pytest.approx(np.sqrt(0.07))
    assert row["n_folds"] == 3


def test_fold_summary_matches_numpy_per_group():
    runs = _runs()
    table = fold_summary(runs)
    assert list(table.columns) == list(FOLD_SUMMARY_COLUMNS)
    assert len(table) == 2 * 2 * 2 * 2
    for row in table.itertuples(index=False):
        values = runs.loc[(runs["detector"] == row.detector) & (runs["dataset"] == row.dataset)
                          & (runs["initialisation"] == row.initialisation) & (runs["metric"] == row.metric),
                          "value"].to_numpy()
        assert row.mean == pytest.approx(np.mean(values))
        assert row.std == pytest.approx(np.std(values, ddof=1))
        assert row.n_folds == 5


def test_fold_summary_single_fold_has_undefined_std_and_metric_selection():
    runs = _runs()
    table = fold_summary(runs[runs["fold"] == 0], metrics=["FROC"])
    assert set(table["metric"]) == {"FROC"}
    assert table["std"].isna().all()
    assert (table["n_folds"] == 1).all()


def _records(seed: int = 1) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for dataset, n_cases in (("x", 8), ("y", 5)):
        for initialisation in ("scratch", "mae"):
            for index in range(n_cases):
                num_gt = int(rng.integers(1, 4))
                rows.append(("retina_unet", initialisation, dataset, index % 2, f"{dataset}{index}",
                             int(rng.integers(0, num_gt + 1)), num_gt))
    return pd.DataFrame(rows, columns=["detector", "initialisation", "dataset", "fold", "case", "tp", "num_gt"])


def test_case_bootstrap_summary_equals_direct_bootstrap_with_the_dataset_seed():
    records = _records()
    data = from_case_records(records)
    table = case_bootstrap_summary(records, data, n_resamples=200, confidence=0.9, seed=3)
    assert list(table.columns) == list(CASE_SUMMARY_COLUMNS)
    assert len(table) == 4
    for row in table.itertuples(index=False):
        statistic = data.statistic_for(row.detector, row.dataset, row.initialisation)
        direct = bootstrap_ci(data.cases_of(row.dataset), statistic, n_resamples=200, confidence=0.9,
                              seed=dataset_seed(3, row.dataset))
        assert (row.estimate, row.ci_low, row.ci_high) == pytest.approx((direct.estimate, direct.ci_low,
                                                                         direct.ci_high))
        rows = records[(records["dataset"] == row.dataset) & (records["initialisation"] == row.initialisation)]
        assert row.estimate == pytest.approx(rows["tp"].sum() / rows["num_gt"].sum())
        assert row.ci_low <= row.ci_high
        assert (row.n_cases, row.n_resamples, row.confidence, row.seed) == (len(rows), 200, 0.9, 3)


def test_case_bootstrap_summary_accepts_a_list_of_groups():
    data = from_case_records(_records())
    from_list = case_bootstrap_summary([("retina_unet", "y", "mae")], data, n_resamples=50, seed=0)
    from_table = case_bootstrap_summary(_records(), data, n_resamples=50, seed=0)
    expected = from_table[(from_table["dataset"] == "y") & (from_table["initialisation"] == "mae")]
    pd.testing.assert_frame_equal(from_list, expected.reset_index(drop=True))
