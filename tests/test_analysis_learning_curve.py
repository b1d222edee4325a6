"""A run's learning-curve figure: the moving average against hand-worked values, its inputs' errors, the PNG."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from pretrain_det3d.analysis.learning_curve import (
    final_validation_ap, moving_average, plot_learning_curve, read_training_log,
)
from pretrain_det3d.analysis.tables import AnalysisInputError
from pretrain_det3d.cli import main


def test_moving_average_is_a_trailing_mean_that_starts_at_the_first_value():
    assert moving_average([2.0, 4.0, 6.0, 8.0, 10.0], 3).tolist() == [2.0, 3.0, 4.0, 6.0, 8.0]
    assert moving_average([5.0], 10).tolist() == [5.0]
    values = np.random.default_rng(0).normal(size=50)
    reference = pd.Series(values).rolling(7, min_periods=1).mean().to_numpy()
    assert np.allclose(moving_average(values, 7), reference)
    with pytest.raises(ValueError, match="window"):
        moving_average(values, 0)


def _log(path, rows=40):
    iterations = np.arange(rows)
    table = pd.DataFrame({"iteration": iterations, "lr": np.linspace(1e-3, 1e-2, rows),
                          "loss": 2.0 / (1 + iterations), "cls": 1.0 / (1 + iterations),
                          "reg": 1.0 / (1 + iterations), "seconds": 0.1})
    table.to_csv(path, index=False)
    return table


def test_learning_curve_png_is_written_from_a_log_and_metrics(tmp_path):
    _log(tmp_path / "log.csv")
    (tmp_path / "fold0.json").write_text(json.dumps({"AP_IoU_0.10_MaxDet_100": 0.42}))
    out = tmp_path / "figures" / "run.png"
    assert main(["learning-curve", "--log", str(tmp_path / "log.csv"), "--metrics", str(tmp_path / "fold0.json"),
                 "--out-png", str(out), "--title", "retina_unet / scratch / demo / fold 0"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["run.png"]  # no temporary file left behind
    # without metrics it still draws
    plot_learning_curve(tmp_path / "log.csv", None, tmp_path / "bare.png")
    assert (tmp_path / "bare.png").stat().st_size > 0


def test_bad_inputs_name_the_file(tmp_path):
    with pytest.raises(AnalysisInputError, match="missing.csv: training log not found"):
        read_training_log(tmp_path / "missing.csv")
    (tmp_path / "nolosses.csv").write_text("iteration,lr\n0,0.1\n")
    with pytest.raises(AnalysisInputError, match="nolosses.csv: .*missing: \\['loss'\\]"):
        read_training_log(tmp_path / "nolosses.csv")
    (tmp_path / "metrics.json").write_text(json.dumps({"other": 1}))
    with pytest.raises(AnalysisInputError, match="metrics.json: has no numeric"):
        final_validation_ap(tmp_path / "metrics.json")
    (tmp_path / "none.json").write_text(json.dumps({"AP_IoU_0.10_MaxDet_100": -1}))
    assert final_validation_ap(tmp_path / "none.json") is None  # nnDetection's "no ground truth"
    out = tmp_path / "out.png"
    with pytest.raises(AnalysisInputError):
        plot_learning_curve(tmp_path / "nolosses.csv", None, out)
    assert not out.exists()
