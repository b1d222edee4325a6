"""Case-level data from the per-case records: pooled statistics over resampled cases, and malformed records."""

from __future__ import annotations

import pandas as pd
import pytest

from pretrain_det3d.analysis.case_level import CaseLevelData, from_case_records, pooled_sensitivity
from pretrain_det3d.analysis.tables import AnalysisInputError


def _records() -> pd.DataFrame:
    # dataset "x": 3 cases over 2 folds, two initialisations; dataset "y": 1 case
    return pd.DataFrame({
        "detector": "retina_unet",
        "initialisation": ["scratch"] * 3 + ["mae"] * 3 + ["scratch", "mae"],
        "dataset": ["x"] * 6 + ["y", "y"],
        "fold": [0, 0, 1, 0, 0, 1, 0, 0],
        "case": ["c0", "c1", "c2", "c0", "c1", "c2", "d0", "d0"],
        "tp": [1, 0, 2, 1, 1, 3, 0, 1],
        "num_gt": [1, 2, 3, 1, 2, 3, 1, 1],
    })


def test_statistic_pools_resampled_cases_with_repeats():
    data = from_case_records(_records())
    assert data.cases_of("x") == ["c0", "c1", "c2"]
    statistic = data.statistic_for("retina_unet", "x", "scratch")
    # c2 twice and c1 once: tp 2 + 2 + 0 over num_gt 3 + 3 + 2
    assert statistic(["c2", "c1", "c2"]) == pytest.approx(4 / 8)
    assert statistic(["c0", "c1", "c2"]) == pytest.approx(3 / 6)
    assert data.statistic_for("retina_unet", "x", "mae")(["c1", "c1"]) == pytest.approx(2 / 4)


def test_custom_reducer_sees_the_resampled_rows():
    data = from_case_records(_records(), reducer=lambda rows: float(rows["tp"].mean()))
    assert data.statistic_for("retina_unet", "x", "mae")(["c2", "c2", "c0"]) == pytest.approx(7 / 3)


def test_pooled_sensitivity_without_ground_truth_is_zero():
    assert pooled_sensitivity(pd.DataFrame({"tp": [0], "num_gt": [0]})) == 0.0


def test_groups_of_a_dataset_must_cover_the_same_cases():
    records = _records().drop(index=5)  # mae loses c2
    with pytest.raises(AnalysisInputError, match=r"retina_unet/scratch/x covers other cases.*'c2'"):
        from_case_records(records)


def test_a_case_twice_in_one_group_is_an_error():
    records = pd.concat([_records(), _records().iloc[[0]]])
    with pytest.raises(AnalysisInputError, match="more than once"):
        from_case_records(records)


def test_unknown_group_or_dataset_fails_clearly():
    data = from_case_records(_records())
    with pytest.raises(AnalysisInputError, match="no cases for retina_unet/voco/x"):
        data.statistic_for("retina_unet", "x", "voco")
    with pytest.raises(AnalysisInputError, match="no cases for dataset 'z'"):
        data.cases_of("z")
    with pytest.raises(AnalysisInputError, match="missing column"):
        from_case_records(_records().drop(columns="fold"))


def test_evaluation_code_can_supply_its_own_statistic():
    data = CaseLevelData(case_ids={"x": ["a", "b"]}, statistic_for=lambda det, ds, init: len)
    assert data.statistic_for("d", "x", "scratch")(data.cases_of("x")) == 2
