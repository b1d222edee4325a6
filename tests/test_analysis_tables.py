"""Input checks of the analysis tables: missing columns, metrics, duplicate runs and undefined values fail clearly."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pretrain_det3d.analysis.tables import AnalysisInputError, metric_values, require_columns


def _runs(values: list[float], metric: str = "AP") -> pd.DataFrame:
    return pd.DataFrame({"detector": "retina_unet", "initialisation": "scratch", "dataset": "demo",
                         "fold": list(range(len(values))), "metric": metric, "value": values})


def test_metric_values_keeps_the_metric_rows_as_floats():
    runs = pd.concat([_runs([0.1, 0.2]), _runs([0.9, 0.8], metric="FROC")])
    rows = metric_values(runs, "AP")
    assert rows["value"].tolist() == [0.1, 0.2]
    assert rows["value"].dtype == np.float64
    assert list(rows.columns) == ["detector", "initialisation", "dataset", "fold", "value"]


def test_missing_column_is_named():
    with pytest.raises(AnalysisInputError, match=r"per-run table: missing column\(s\) \['value'\]"):
        metric_values(_runs([0.1]).drop(columns="value"), "AP")
    with pytest.raises(AnalysisInputError, match="my table"):
        require_columns(pd.DataFrame({"a": [1]}), ["b"], "my table")


def test_unknown_metric_lists_the_known_ones():
    with pytest.raises(AnalysisInputError, match=r"'mAP' not found \(metrics: \['AP'\]\)"):
        metric_values(_runs([0.1]), "mAP")


def test_duplicate_run_is_an_error():
    with pytest.raises(AnalysisInputError, match="more than one"):
        metric_values(pd.concat([_runs([0.1]), _runs([0.2])]), "AP")


@pytest.mark.parametrize("bad", [float("nan"), -1.0])
def test_missing_or_undefined_value_is_an_error(bad):
    with pytest.raises(AnalysisInputError, match="missing or undefined"):
        metric_values(_runs([0.1, bad]), "AP")


def test_undefined_marker_matches_the_evaluation():
    from pretrain_det3d.analysis.tables import UNDEFINED_METRIC_VALUE
    from pretrain_det3d.evaluation.metrics import UNDEFINED

    assert UNDEFINED_METRIC_VALUE == UNDEFINED
