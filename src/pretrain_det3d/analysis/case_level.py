"""What the case-level bootstrap needs from the evaluation: the cases of each dataset and a statistic per run group.

With k-fold cross-validation every case of a dataset is predicted once, by the model of the fold that held it
out, so the cases of a (detector, initialisation, dataset) group are pooled over folds and the statistic is
computed on the pooled cases (as nnDetection's consolidated validation does). Resampling cases therefore
resamples across folds.

``CaseLevelData`` couples
- ``case_ids[dataset]``: the cases of a dataset, the same list for every detector and initialisation (the
  comparisons are paired over them), and
- ``statistic_for(detector, dataset, initialisation) -> CaseStatistic``: a callable over a list of case ids.

The evaluation code builds one whose statistic recomputes AP from the detections of the listed cases;
``from_case_records`` builds one from the per-case table for statistics that the per-case counts determine
(e.g. the pooled sensitivity ``sum(tp) / sum(num_gt)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import pandas as pd

from pretrain_det3d.analysis.bootstrap import CaseStatistic
from pretrain_det3d.analysis.tables import CASE_KEYS, AnalysisInputError, require_columns

#: Builds the statistic of one (detector, dataset, initialisation) group.
StatisticFactory = Callable[[str, str, str], CaseStatistic]
#: Reduces the per-case rows of a resample (one row per drawn case, repeats included) to a number.
RecordsReducer = Callable[[pd.DataFrame], float]


@dataclass(frozen=True)
class CaseLevelData:
    """Cases per dataset and a statistic per (detector, dataset, initialisation); see the module docstring."""

    case_ids: Mapping[str, Sequence[str]]
    statistic_for: StatisticFactory

    def cases_of(self, dataset: str) -> list[str]:
        """The case ids of ``dataset``; a clear error if the dataset has none."""
        if dataset not in self.case_ids or len(self.case_ids[dataset]) == 0:
            raise AnalysisInputError(
                f"case-level data: no cases for dataset {dataset!r} (datasets: {sorted(self.case_ids)})"
            )
        return list(self.case_ids[dataset])


def pooled_sensitivity(rows: pd.DataFrame) -> float:
    """Fraction of ground-truth objects detected over the given cases, ``sum(tp) / sum(num_gt)`` (0 if none).

    Example:
        >>> pooled_sensitivity(pd.DataFrame({"tp": [1, 2], "num_gt": [2, 2]}))
        0.75
    """
    total = float(rows["num_gt"].sum())
    return float(rows["tp"].sum()) / total if total > 0 else 0.0


def from_case_records(records: pd.DataFrame, reducer: RecordsReducer = pooled_sensitivity) -> CaseLevelData:
    """Case-level data from the per-case records; the statistic applies ``reducer`` to the resampled rows.

    Each group must hold every case of its dataset exactly once (pooled over folds), and all groups of a dataset
    the same cases, or the comparisons would not be paired.

    Example:
        >>> records = pd.DataFrame({"detector": "d", "initialisation": ["scratch", "scratch"], "dataset": "x",
        ...                         "fold": [0, 1], "case": ["c0", "c1"], "tp": [1, 0], "num_gt": [1, 1]})
        >>> data = from_case_records(records)
        >>> data.statistic_for("d", "x", "scratch")(["c0", "c0", "c1"])
        0.6666666666666666
    """
    require_columns(records, CASE_KEYS, "per-case records")
    duplicated = records.duplicated(["detector", "initialisation", "dataset", "case"], keep=False)
    if duplicated.any():
        first = records.loc[duplicated, list(CASE_KEYS)].iloc[0].to_dict()
        raise AnalysisInputError(f"per-case records: case appears more than once in its group, first {first}")
    case_ids: dict[str, list[str]] = {}
    groups: dict[tuple[str, str, str], pd.DataFrame] = {}
    for (detector, initialisation, dataset), rows in records.groupby(
            ["detector", "initialisation", "dataset"], sort=True):
        cases = sorted(map(str, rows["case"]))
        reference = case_ids.setdefault(str(dataset), cases)
        if cases != reference:
            difference = sorted(set(cases) ^ set(reference))
            raise AnalysisInputError(
                f"per-case records: {detector}/{initialisation}/{dataset} covers other cases than the first group "
                f"of dataset {dataset!r} (differing: {difference[:5]}{' ...' if len(difference) > 5 else ''})"
            )
        groups[(str(detector), str(dataset), str(initialisation))] = rows.set_index(
            rows["case"].astype(str), drop=False)

    def statistic_for(detector: str, dataset: str, initialisation: str) -> CaseStatistic:
        key = (detector, dataset, initialisation)
        if key not in groups:
            raise AnalysisInputError(f"per-case records: no cases for {detector}/{initialisation}/{dataset}")
        indexed = groups[key]
        # .loc with a list keeps repeats, so a case drawn twice counts twice
        return lambda ids: float(reducer(indexed.loc[list(ids)]))

    return CaseLevelData(case_ids=case_ids, statistic_for=statistic_for)
