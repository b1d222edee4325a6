"""Rankings on a hand-worked example with ties, and rank stability against a hand count and a brute-force loop."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pandas as pd
import pytest
import scipy.stats

from pretrain_det3d.analysis.bootstrap import dataset_seed, resample_indices
from pretrain_det3d.analysis.case_level import from_case_records
from pretrain_det3d.analysis.ranking import (
    MEAN_RANK_COLUMNS,
    RANK_COLUMNS,
    STABILITY_COLUMNS,
    mean_rank_stability,
    mean_ranks,
    rank_stability,
    rank_values,
    rank_within_datasets,
)
from pretrain_det3d.analysis.tables import AnalysisInputError

# fold values per dataset and initialisation (2 folds); fold means written next to them
HAND_WORKED = {
    "x": {"scratch": [0.2, 0.4],   # 0.3 (0.30000000000000004 in floating point)
          "mae": [0.5, 0.5],       # 0.5
          "voco": [0.1, 0.5],      # 0.3
          "genesis": [0.0, 0.2]},  # 0.1
    "y": {"scratch": [0.6, 0.6],   # 0.6
          "mae": [0.6, 0.8],       # 0.7
          "voco": [0.7, 0.5],      # 0.6
          "genesis": [0.9, 0.9]},  # 0.9
}
# x: mae 1, scratch and voco share 2 and 3 -> 2.5 each, genesis 4
# y: genesis 1, mae 2, scratch and voco share 3 and 4 -> 3.5 each
EXPECTED_RANKS = {("x", "mae"): 1.0, ("x", "scratch"): 2.5, ("x", "voco"): 2.5, ("x", "genesis"): 4.0,
                  ("y", "genesis"): 1.0, ("y", "mae"): 2.0, ("y", "scratch"): 3.5, ("y", "voco"): 3.5}
# mean ranks: mae 1.5, genesis 2.5, scratch 3, voco 3 -> overall 1, 2, 3.5, 3.5
EXPECTED_MEAN = {"mae": (1.5, 1.0), "genesis": (2.5, 2.0), "scratch": (3.0, 3.5), "voco": (3.0, 3.5)}


def _hand_runs() -> pd.DataFrame:
    rows = [("d", init, dataset, fold, "AP", value)
            for dataset, inits in HAND_WORKED.items() for init, values in inits.items()
            for fold, value in enumerate(values)]
    return pd.DataFrame(rows, columns=["detector", "initialisation", "dataset", "fold", "metric", "value"])


def test_rank_values_average_ties_and_direction():
    assert rank_values([0.3, 0.5, 0.3, 0.1]).tolist() == [2.5, 1.0, 2.5, 4.0]
    assert rank_values([0.3, 0.5, 0.3, 0.1], higher_is_better=False).tolist() == [2.5, 4.0, 2.5, 1.0]
    np.testing.assert_array_equal(rank_values([[0.1, 0.2], [0.2, 0.2]]), [[2.0, 1.0], [1.5, 1.5]])


def test_rank_within_datasets_hand_worked_with_ties():
    table = rank_within_datasets(_hand_runs(), metric="AP")
    assert list(table.columns) == list(RANK_COLUMNS)
    ranks = {(row.dataset, row.initialisation): row.rank for row in table.itertuples(index=False)}
    assert ranks == EXPECTED_RANKS
    # ranks of a dataset always sum to K (K + 1) / 2
    assert table.groupby("dataset")["rank"].sum().tolist() == [10.0, 10.0]


def test_floating_point_noise_breaks_the_tie_only_without_rounding():
    table = rank_within_datasets(_hand_runs(), metric="AP", tie_decimals=None)
    x = table[table["dataset"] == "x"].set_index("initialisation")["rank"]
    assert (x["scratch"], x["voco"]) == (2.0, 3.0)


def test_mean_ranks_hand_worked_with_tie():
    table = mean_ranks(rank_within_datasets(_hand_runs(), metric="AP"))
    assert list(table.columns) == list(MEAN_RANK_COLUMNS)
    result = {row.initialisation: (row.mean_rank, row.overall_rank) for row in table.itertuples(index=False)}
    assert result == EXPECTED_MEAN
    assert (table["n_datasets"] == 2).all()
    assert table["initialisation"].tolist()[:2] == ["mae", "genesis"]


def test_mean_ranks_needs_every_dataset():
    ranks = rank_within_datasets(_hand_runs(), metric="AP")
    incomplete = ranks[~((ranks["dataset"] == "y") & (ranks["initialisation"] == "voco"))]
    with pytest.raises(AnalysisInputError, match=r"\['voco'\] are not ranked on every dataset"):
        mean_ranks(incomplete)


def test_rank_stability_hand_counted_with_ties():
    # c0 is found only by mae, c1 only by scratch: a resample of {c0, c0} ranks mae first, {c1, c1} scratch
    # first, and a mixed one ties them (sensitivity 0.5 each, rank 1.5)
    records = pd.DataFrame({"detector": "d", "dataset": "x", "fold": 0, "case": ["c0", "c1", "c0", "c1"],
                            "initialisation": ["mae", "mae", "scratch", "scratch"],
                            "tp": [1, 0, 0, 1], "num_gt": 1})
    n_resamples, seed = 40, 9
    draws = resample_indices(2, n_resamples, dataset_seed(seed, "x")).tolist()
    only_c0 = sum(row == [0, 0] for row in draws)
    only_c1 = sum(row == [1, 1] for row in draws)
    mixed = n_resamples - only_c0 - only_c1
    assert min(only_c0, only_c1, mixed) > 0  # the seed exercises all three outcomes
    table = rank_stability(records, from_case_records(records), n_resamples=n_resamples, seed=seed)
    assert list(table.columns) == list(STABILITY_COLUMNS)
    counts = {(row.initialisation, row.rank): row.count for row in table.itertuples(index=False)}
    assert counts == {("mae", 1.0): only_c0, ("mae", 1.5): mixed, ("mae", 2.0): only_c1,
                      ("scratch", 1.0): only_c1, ("scratch", 1.5): mixed, ("scratch", 2.0): only_c0}
    assert table.groupby("initialisation")["frequency"].sum().tolist() == pytest.approx([1.0, 1.0])


def _random_records(seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for dataset, n_cases in (("x", 7), ("y", 5)):
        for initialisation in ("scratch", "mae", "voco"):
            for index in range(n_cases):
                num_gt = int(rng.integers(1, 4))
                rows.append(("d", initialisation, dataset, 0, f"{dataset}{index}",
                             int(rng.integers(0, num_gt + 1)), num_gt))
    return pd.DataFrame(rows, columns=["detector", "initialisation", "dataset", "fold", "case", "tp", "num_gt"])


def _brute_force_ranks(records: pd.DataFrame, dataset: str, inits: list[str], n_resamples: int,
                       seed: int) -> np.ndarray:
    """Per resample: pooled sensitivity by plain loops, ranked with scipy (1 = highest)."""
    cases = sorted(records.loc[records["dataset"] == dataset, "case"].unique())
    lookup = {(row.initialisation, row.case): (row.tp, row.num_gt)
              for row in records[records["dataset"] == dataset].itertuples(index=False)}
    ranks = []
    for row in resample_indices(len(cases), n_resamples, dataset_seed(seed, dataset)):
        sensitivities = []
        for init in inits:
            tp = sum(lookup[(init, cases[i])][0] for i in row)
            gt = sum(lookup[(init, cases[i])][1] for i in row)
            sensitivities.append(round(tp / gt, 12))
        ranks.append(scipy.stats.rankdata([-s for s in sensitivities], method="average"))
    return np.array(ranks)


def test_rank_stability_equals_a_brute_force_loop():
    records = _random_records()
    table = rank_stability(records, from_case_records(records), n_resamples=60, seed=1)
    inits = ["mae", "scratch", "voco"]
    for dataset in ("x", "y"):
        ranks = _brute_force_ranks(records, dataset, inits, 60, 1)
        for column, init in enumerate(inits):
            expected = Counter(ranks[:, column].tolist())
            part = table[(table["dataset"] == dataset) & (table["initialisation"] == init)]
            observed = {row.rank: row.count for row in part.itertuples(index=False) if row.count > 0}
            assert observed == dict(expected)
            assert part["frequency"].sum() == pytest.approx(1.0)


def test_mean_rank_stability_equals_a_brute_force_loop():
    records = _random_records(3)
    table = mean_rank_stability(records, from_case_records(records), n_resamples=60, seed=2)
    inits = ["mae", "scratch", "voco"]
    per_dataset = [_brute_force_ranks(records, dataset, inits, 60, 2) for dataset in ("x", "y")]
    places = np.array([scipy.stats.rankdata(np.round((a + b) / 2, 12), method="average")
                       for a, b in zip(*per_dataset)])
    for column, init in enumerate(inits):
        part = table[table["initialisation"] == init]
        observed = {row.rank: row.count for row in part.itertuples(index=False) if row.count > 0}
        assert observed == dict(Counter(places[:, column].tolist()))
    assert "dataset" not in table.columns


def test_mean_rank_stability_needs_the_same_initialisations_everywhere():
    records = _random_records()
    records = records[~((records["dataset"] == "y") & (records["initialisation"] == "voco"))]
    with pytest.raises(AnalysisInputError, match="same set on every dataset"):
        mean_rank_stability(records, from_case_records(records), n_resamples=10)
