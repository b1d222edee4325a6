"""All-pairs comparisons: Wilcoxon over (dataset, fold) pairs against scipy, Holm by hand, bootstrap by brute force."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import wilcoxon

from pretrain_det3d.analysis.bootstrap import dataset_seed
from pretrain_det3d.analysis.case_level import from_case_records
from pretrain_det3d.analysis.pairwise import PAIRWISE_COLUMNS, compare_pairwise
from pretrain_det3d.analysis.tables import AnalysisInputError

INITS = ["scratch", "mae", "voco"]
DATASETS = ["x", "y"]


def make_runs(seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    shift = {"scratch": 0.0, "mae": 0.15, "voco": 0.05}
    rows = [dict(detector="d", dataset=s, fold=f, initialisation=i, metric="AP",
                 value=float(0.3 + shift[i] + rng.normal(0, 0.05)))
            for s in DATASETS for f in range(5) for i in INITS]
    return pd.DataFrame(rows)


def make_records(seed: int = 1) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    hit_rate = {"scratch": 0.3, "mae": 0.7, "voco": 0.5}
    rows = []
    for dataset, n_cases in zip(DATASETS, (12, 9)):
        for case in range(n_cases):
            num_gt = int(rng.integers(1, 4))
            for init in INITS:
                rows.append(dict(detector="d", dataset=dataset, fold=case % 5, case=f"{dataset}{case}",
                                 initialisation=init, num_gt=num_gt, tp=int(rng.binomial(num_gt, hit_rate[init]))))
    return pd.DataFrame(rows)


def holm_by_hand(p_values: list[float]) -> list[float]:
    order = np.argsort(p_values)
    m, adjusted, running = len(p_values), np.empty(len(p_values)), 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted.tolist()


def test_wilcoxon_over_dataset_fold_pairs_and_holm() -> None:
    runs = make_runs()
    table = compare_pairwise(runs, "AP", order=INITS)
    assert list(table.columns) == list(PAIRWISE_COLUMNS)
    assert table[["initialisation_a", "initialisation_b"]].values.tolist() == [
        ["scratch", "mae"], ["scratch", "voco"], ["mae", "voco"]]
    p_values = []
    for row in table.itertuples(index=False):
        a = runs[runs.initialisation == row.initialisation_a].sort_values(["dataset", "fold"])["value"].to_numpy()
        b = runs[runs.initialisation == row.initialisation_b].sort_values(["dataset", "fold"])["value"].to_numpy()
        assert row.n_pairs == 10 and row.n_datasets == 2
        assert row.mean_diff == pytest.approx(float(np.mean(a - b)))
        assert row.p_wilcoxon == pytest.approx(float(wilcoxon(a, b).pvalue))
        assert row.p_wilcoxon_min == pytest.approx(2 / 2 ** 10)
        p_values.append(row.p_wilcoxon)
    np.testing.assert_allclose(table["p_wilcoxon_holm"], holm_by_hand(p_values))
    assert table["reject_wilcoxon_holm"].tolist() == [p < 0.05 for p in holm_by_hand(p_values)]
    assert table.loc[0, "direction"] == "worse"  # scratch - mae < 0: scratch is worse
    assert table["case_diff"].isna().all() and (table["case_direction"] == "undefined").all()


def test_bootstrap_is_the_mean_over_datasets_of_paired_resamples() -> None:
    records = make_records()
    data = from_case_records(records)
    runs = make_runs()
    n_resamples, seed = 300, 5
    table = compare_pairwise(runs, "AP", case_data=data, order=INITS, n_resamples=n_resamples, seed=seed)

    counts = {}  # (dataset, init) -> (tp [n], num_gt [n]) in the order of data.cases_of(dataset)
    for (dataset, init), rows in records.groupby(["dataset", "initialisation"]):
        rows = rows.set_index("case").loc[data.cases_of(dataset)]
        counts[(dataset, init)] = (rows["tp"].to_numpy(), rows["num_gt"].to_numpy())

    def sensitivity(dataset: str, init: str, positions: np.ndarray) -> float:
        tp, num_gt = counts[(dataset, init)]
        return tp[positions].sum() / num_gt[positions].sum()

    for row in table.itertuples(index=False):
        distribution = np.zeros(n_resamples)
        observed = 0.0
        for dataset in DATASETS:
            cases = data.cases_of(dataset)
            draws = np.random.default_rng(dataset_seed(seed, dataset)).integers(0, len(cases),
                                                                               size=(n_resamples, len(cases)))
            for b in range(n_resamples):
                distribution[b] += (sensitivity(dataset, row.initialisation_a, draws[b])
                                    - sensitivity(dataset, row.initialisation_b, draws[b])) / len(DATASETS)
            everything = np.arange(len(cases))
            observed += (sensitivity(dataset, row.initialisation_a, everything)
                         - sensitivity(dataset, row.initialisation_b, everything)) / len(DATASETS)
        assert row.case_diff == pytest.approx(observed)
        assert (row.ci_low, row.ci_high) == pytest.approx(tuple(np.quantile(distribution, [0.025, 0.975])))
        expected_p = min(1.0, 2 * min((1 + np.sum(distribution <= 0)) / (n_resamples + 1),
                                      (1 + np.sum(distribution >= 0)) / (n_resamples + 1)))
        assert row.p_bootstrap == pytest.approx(expected_p)
    np.testing.assert_allclose(table["p_bootstrap_holm"], holm_by_hand(table["p_bootstrap"].tolist()))
    assert table.loc[0, "p_bootstrap"] < 0.05  # scratch (30 %) vs mae (70 %): the test can detect a difference


def test_missing_run_and_single_initialisation_are_errors() -> None:
    runs = make_runs()
    with pytest.raises(AnalysisInputError, match=r"d/voco/y fold 4 is missing"):
        compare_pairwise(runs.drop(runs.index[-1]), "AP")
    with pytest.raises(AnalysisInputError, match=r"single initialisation \(d \(mae\)\)"):
        compare_pairwise(runs[runs.initialisation == "mae"], "AP")


def test_a_detector_with_one_initialisation_has_no_pairs_and_the_others_keep_theirs():
    folds = list(range(3))
    runs = pd.DataFrame({
        "detector": ["retina_unet"] * 6 + ["deformable_detr"] * 3, "dataset": "x", "metric": "AP",
        "fold": folds * 3, "initialisation": ["scratch"] * 3 + ["mae"] * 3 + ["scratch"] * 3,
        "value": [0.1, 0.2, 0.3, 0.2, 0.3, 0.5, 0.4, 0.4, 0.4]})
    table = compare_pairwise(runs, "AP", order=["scratch", "mae"])
    assert table[["detector", "initialisation_a", "initialisation_b"]].values.tolist() == [
        ["retina_unet", "scratch", "mae"]]
    assert table.iloc[0]["mean_diff"] == pytest.approx(-0.4 / 3)
    with pytest.raises(AnalysisInputError, match="single initialisation \\(deformable_detr \\(scratch\\)\\)"):
        compare_pairwise(runs[runs["detector"] == "deformable_detr"], "AP")
