"""Rankings of the initialisations: per dataset, mean rank across datasets, and stability under case resampling.

Rules:

- rank 1 is the best: the highest value when ``higher_is_better`` (AP, FROC), the lowest otherwise;
- ties share the average of the ranks they span (two initialisations tied for first both get 1.5, the next one
  3), so the ranks of a dataset always sum to ``K (K + 1) / 2`` and mean ranks across datasets stay comparable
  (the convention of the Friedman test and of Demsar 2006). Values are rounded to ``tie_decimals`` decimals
  before ranking, so that means that differ only by floating-point noise count as ties;
- per dataset, an initialisation is scored by the mean of the metric over folds (``rank_within_datasets``);
- the mean rank of an initialisation is the mean of its per-dataset ranks (``mean_ranks``), for each detector;
- stability (``rank_stability``): the cases of each dataset are resampled with replacement (``analysis.bootstrap``,
  seed ``dataset_seed(seed, dataset)``, the same resamples for every initialisation), the case-level statistic of
  each initialisation is recomputed on each resample and ranked; the table counts how often each initialisation
  takes each rank. ``mean_rank_stability`` does the same for the order of the mean ranks across datasets, where
  resample ``b`` of every dataset (each drawn independently) forms the ``b``-th bootstrap study.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
from scipy.stats import rankdata

from pretrain_det3d.analysis.bootstrap import (
    DEFAULT_N_RESAMPLES,
    DEFAULT_SEED,
    dataset_seed,
    evaluate_resamples,
    resample_indices,
)
from pretrain_det3d.analysis.case_level import CaseLevelData
from pretrain_det3d.analysis.tables import MAIN_METRIC, AnalysisInputError, metric_values

#: Values are rounded to this many decimals before ranking, so floating-point noise does not break a tie.
DEFAULT_TIE_DECIMALS = 12
#: Columns of ``rank_within_datasets``'s table.
RANK_COLUMNS = ("detector", "dataset", "initialisation", "mean", "rank")
#: Columns of ``mean_ranks``'s table.
MEAN_RANK_COLUMNS = ("detector", "initialisation", "mean_rank", "n_datasets", "overall_rank")
#: Columns of ``rank_stability``'s table (``mean_rank_stability`` has no ``dataset``).
STABILITY_COLUMNS = ("detector", "dataset", "initialisation", "rank", "count", "frequency", "n_resamples", "seed")


def rank_values(values: Sequence[float] | np.ndarray, higher_is_better: bool = True,
                tie_decimals: int | None = DEFAULT_TIE_DECIMALS) -> np.ndarray:
    """Ranks along the last axis, 1 = best, ties averaged (``scipy.stats.rankdata``).

    Example:
        >>> rank_values([0.3, 0.5, 0.3, 0.1]).tolist()
        [2.5, 1.0, 2.5, 4.0]
    """
    array = np.asarray(values, dtype=float)
    if tie_decimals is not None:
        array = np.round(array, tie_decimals)
    return rankdata(-array if higher_is_better else array, method="average", axis=-1)


def rank_within_datasets(runs: pd.DataFrame, metric: str = MAIN_METRIC, higher_is_better: bool = True,
                         tie_decimals: int | None = DEFAULT_TIE_DECIMALS) -> pd.DataFrame:
    """Rank of each initialisation per detector and dataset by the fold mean of ``metric``.

    Example:
        >>> runs = pd.DataFrame({"detector": "d", "dataset": "x", "fold": 0, "metric": "AP",
        ...                      "initialisation": ["scratch", "mae", "voco"], "value": [0.2, 0.4, 0.2]})
        >>> rank_within_datasets(runs, "AP")[["initialisation", "rank"]].values.tolist()
        [['mae', 1.0], ['scratch', 2.5], ['voco', 2.5]]
    """
    values = metric_values(runs, metric)
    means = values.groupby(["detector", "dataset", "initialisation"], sort=True)["value"].mean().reset_index()
    means = means.rename(columns={"value": "mean"})
    means["rank"] = np.nan
    for _, group in means.groupby(["detector", "dataset"], sort=False):
        means.loc[group.index, "rank"] = rank_values(group["mean"].to_numpy(), higher_is_better, tie_decimals)
    return means.sort_values(["detector", "dataset", "rank", "initialisation"], ignore_index=True).loc[
        :, list(RANK_COLUMNS)]


def mean_ranks(ranks: pd.DataFrame, tie_decimals: int | None = DEFAULT_TIE_DECIMALS) -> pd.DataFrame:
    """Mean per-dataset rank of each initialisation per detector, and the rank of that mean (1 = best).

    Every initialisation of a detector must be ranked on every dataset of that detector; otherwise the means
    would average over different datasets.

    Example:
        >>> ranks = pd.DataFrame({"detector": "d", "dataset": ["x", "x", "y", "y"],
        ...                       "initialisation": ["mae", "scratch"] * 2, "rank": [1.0, 2.0, 1.5, 1.5]})
        >>> mean_ranks(ranks)[["initialisation", "mean_rank"]].values.tolist()
        [['mae', 1.25], ['scratch', 1.75]]
    """
    rows = []
    for detector, group in ranks.groupby("detector", sort=True):
        datasets = sorted(group["dataset"].unique())
        counts = group.groupby("initialisation")["dataset"].nunique()
        incomplete = sorted(counts.index[counts < len(datasets)])
        if incomplete:
            raise AnalysisInputError(
                f"rankings of {detector}: initialisation(s) {incomplete} are not ranked on every dataset "
                f"{datasets}; the mean rank needs them all"
            )
        means = group.groupby("initialisation", sort=True)["rank"].mean()
        overall = rank_values(means.to_numpy(), higher_is_better=False, tie_decimals=tie_decimals)
        for (initialisation, mean_rank), rank in zip(means.items(), overall):
            rows.append({"detector": detector, "initialisation": initialisation, "mean_rank": float(mean_rank),
                         "n_datasets": len(datasets), "overall_rank": float(rank)})
    table = pd.DataFrame(rows, columns=list(MEAN_RANK_COLUMNS))
    return table.sort_values(["detector", "overall_rank", "initialisation"], ignore_index=True)


def _group_members(groups: pd.DataFrame | Sequence[tuple[str, str, str]]) -> dict[tuple[str, str], list[str]]:
    """(detector, dataset) -> sorted initialisations, from a table or a list of (detector, dataset, init)."""
    if isinstance(groups, pd.DataFrame):
        triples = [tuple(map(str, row)) for row in
                   groups[["detector", "dataset", "initialisation"]].drop_duplicates().itertuples(index=False)]
    else:
        triples = [tuple(map(str, group)) for group in groups]
    members: dict[tuple[str, str], list[str]] = {}
    for detector, dataset, initialisation in triples:
        members.setdefault((detector, dataset), []).append(initialisation)
    return {key: sorted(set(value)) for key, value in sorted(members.items())}


def _bootstrap_ranks(detector: str, dataset: str, initialisations: Sequence[str], case_data: CaseLevelData,
                     n_resamples: int, seed: int, higher_is_better: bool, tie_decimals: int | None) -> np.ndarray:
    """Rank of each initialisation on each resample of the dataset's cases, float ``[n_resamples, K]``."""
    case_ids = case_data.cases_of(dataset)
    indices = resample_indices(len(case_ids), n_resamples, dataset_seed(seed, dataset))
    statistics = [case_data.statistic_for(detector, dataset, name) for name in initialisations]
    values = evaluate_resamples(case_ids, statistics, indices, description=f"rank bootstrap {detector}/{dataset}")
    return rank_values(values, higher_is_better, tie_decimals)


def _count_ranks(bootstrap_ranks: np.ndarray, initialisations: Sequence[str]) -> list[dict]:
    """How often each initialisation takes each rank; ranks 1..K always listed, shared (x.5) ranks where seen."""
    n_resamples, count = bootstrap_ranks.shape
    possible = sorted(set(float(rank) for rank in range(1, count + 1)) | set(np.unique(bootstrap_ranks).tolist()))
    rows = []
    for column, initialisation in enumerate(initialisations):
        for rank in possible:
            hits = int(np.sum(bootstrap_ranks[:, column] == rank))
            rows.append({"initialisation": initialisation, "rank": rank, "count": hits,
                         "frequency": hits / n_resamples})
    return rows


def rank_stability(groups: pd.DataFrame | Sequence[tuple[str, str, str]], case_data: CaseLevelData,
                   n_resamples: int = DEFAULT_N_RESAMPLES, seed: int = DEFAULT_SEED, higher_is_better: bool = True,
                   tie_decimals: int | None = DEFAULT_TIE_DECIMALS) -> pd.DataFrame:
    """How often each initialisation takes each rank per detector and dataset under case resampling.

    ``groups``: a table with columns detector, dataset, initialisation (e.g. ``rank_within_datasets``'s output)
    or a list of such tuples. Columns ``STABILITY_COLUMNS``; the frequencies of one initialisation sum to 1.

    Example:
        >>> from pretrain_det3d.analysis.case_level import from_case_records
        >>> records = pd.DataFrame({"detector": "d", "dataset": "x", "fold": 0, "case": ["c0", "c1"] * 2,
        ...                         "initialisation": ["scratch"] * 2 + ["mae"] * 2,
        ...                         "tp": [0, 0, 1, 1], "num_gt": [1, 1, 1, 1]})
        >>> table = rank_stability([("d", "x", "scratch"), ("d", "x", "mae")], from_case_records(records), 20)
        >>> table.loc[table["count"] > 0, ["initialisation", "rank", "frequency"]].values.tolist()
        [['mae', 1.0, 1.0], ['scratch', 2.0, 1.0]]
    """
    rows = []
    for (detector, dataset), initialisations in _group_members(groups).items():
        ranks = _bootstrap_ranks(detector, dataset, initialisations, case_data, n_resamples, seed,
                                 higher_is_better, tie_decimals)
        for row in _count_ranks(ranks, initialisations):
            rows.append({"detector": detector, "dataset": dataset, **row, "n_resamples": n_resamples, "seed": seed})
    return pd.DataFrame(rows, columns=list(STABILITY_COLUMNS))


def mean_rank_stability(groups: pd.DataFrame | Sequence[tuple[str, str, str]], case_data: CaseLevelData,
                        n_resamples: int = DEFAULT_N_RESAMPLES, seed: int = DEFAULT_SEED,
                        higher_is_better: bool = True,
                        tie_decimals: int | None = DEFAULT_TIE_DECIMALS) -> pd.DataFrame:
    """How often each initialisation takes each place in the order of mean ranks across datasets, per detector.

    Each bootstrap study ranks the initialisations on resample ``b`` of every dataset, averages the ranks over
    datasets and ranks those means (1 = lowest mean rank). Every initialisation must be present on every dataset.

    Example:
        >>> from pretrain_det3d.analysis.case_level import from_case_records
        >>> records = pd.DataFrame({"detector": "d", "dataset": ["x"] * 4 + ["y"] * 4, "fold": 0,
        ...                         "case": ["c0", "c1"] * 4,
        ...                         "initialisation": ["scratch", "scratch", "mae", "mae"] * 2,
        ...                         "tp": [0, 0, 1, 1] * 2, "num_gt": 1})
        >>> table = mean_rank_stability(records, from_case_records(records), 20)
        >>> table.loc[table["count"] > 0, ["initialisation", "rank", "frequency"]].values.tolist()
        [['mae', 1.0, 1.0], ['scratch', 2.0, 1.0]]
    """
    by_detector: dict[str, dict[str, list[str]]] = {}
    for (detector, dataset), initialisations in _group_members(groups).items():
        by_detector.setdefault(detector, {})[dataset] = initialisations
    rows = []
    for detector, datasets in by_detector.items():
        reference = next(iter(datasets.values()))
        for dataset, initialisations in datasets.items():
            if initialisations != reference:
                raise AnalysisInputError(
                    f"rank stability of {detector}: dataset {dataset!r} has initialisations {initialisations}, "
                    f"another has {reference}; the mean rank needs the same set on every dataset"
                )
        per_dataset = [_bootstrap_ranks(detector, dataset, reference, case_data, n_resamples, seed,
                                        higher_is_better, tie_decimals) for dataset in sorted(datasets)]
        mean_of_ranks = np.mean(np.stack(per_dataset), axis=0)  # [n_datasets, B, K] -> [B, K]
        places = rank_values(mean_of_ranks, higher_is_better=False, tie_decimals=tie_decimals)
        for row in _count_ranks(places, reference):
            rows.append({"detector": detector, **row, "n_resamples": n_resamples, "seed": seed})
    return pd.DataFrame(rows, columns=[column for column in STABILITY_COLUMNS if column != "dataset"])
