"""Aggregation of metric files: hand-computed mean / std (ddof=1), tidy runs table, Markdown, clear errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from pretrain_det3d.analysis.aggregate import MetricFileError, run_aggregation

AP, MAP, FROC = "AP_IoU_0.10_MaxDet_100", "mAP_IoU_0.10_0.50_0.05_MaxDet_100", "FROC_score_IoU_0.10"


def write_metrics(path: Path, ap: float, map_: float, froc: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {MAP: map_, AP: ap, "0_" + AP: ap, FROC: froc, "FROC_curve_IoU_0.10": [0.1] * 7, "num_cases": 4,
              "classes": [0]}
    path.write_text(json.dumps(record))
    return path


@pytest.fixture()
def metric_files(tmp_path: Path) -> list[tuple]:
    m = tmp_path / "metrics"
    return [
        ("retina_unet", "scratch", "demo", 0, write_metrics(m / "s0.json", 0.2, 0.1, 0.3)),
        ("retina_unet", "scratch", "demo", 1, write_metrics(m / "s1.json", 0.4, 0.3, 0.5)),
        ("retina_unet", "scratch", "demo", 2, write_metrics(m / "s2.json", 0.9, 0.2, 0.4)),
        ("retina_unet", "mae", "demo", 0, write_metrics(m / "m0.json", 0.7, 0.6, 0.8)),
    ]


def test_mean_and_sample_std_over_folds(metric_files, tmp_path: Path) -> None:
    out_csv, out_md = tmp_path / "tables" / "main_results.csv", tmp_path / "tables" / "main_results.md"
    returned = run_aggregation(metric_files, out_csv, out_md)
    table = pd.read_csv(out_csv)
    assert list(table.columns[:4]) == ["detector", "initialisation", "dataset", "num_folds"]
    assert len(table) == len(returned) == 2
    scratch = table[table["initialisation"] == "scratch"].iloc[0]
    assert scratch["num_folds"] == 3
    # AP 0.2, 0.4, 0.9: mean 0.5; deviations -.3 -.1 .4 -> squares .09 .01 .16 = .26; /(3-1) -> std sqrt(.13)
    assert scratch[AP + "_mean"] == pytest.approx(0.5)
    assert scratch[AP + "_std"] == pytest.approx(math.sqrt(0.13))
    assert scratch[MAP + "_mean"] == pytest.approx(0.2) and scratch[MAP + "_std"] == pytest.approx(0.1)
    assert scratch[FROC + "_mean"] == pytest.approx(0.4) and scratch[FROC + "_std"] == pytest.approx(0.1)
    mae = table[table["initialisation"] == "mae"].iloc[0]
    assert mae["num_folds"] == 1 and mae[AP + "_mean"] == pytest.approx(0.7)
    assert math.isnan(mae[AP + "_std"])  # one fold: sample std undefined -> NaN (documented)

    markdown = out_md.read_text()
    assert "| retina_unet | scratch | demo | 3 | 0.500 ± 0.361 | 0.200 ± 0.100 | 0.400 ± 0.100 |" in markdown
    assert "| retina_unet | mae | demo | 1 | 0.700 ± n/a |" in markdown


def test_tidy_runs_table_next_to_main_table(metric_files, tmp_path: Path) -> None:
    out_csv = tmp_path / "tables" / "main_results.csv"
    run_aggregation(metric_files, out_csv, tmp_path / "tables" / "main_results.md")
    runs = pd.read_csv(out_csv.with_name("runs.csv"))
    assert list(runs.columns) == ["detector", "initialisation", "dataset", "fold", "metric", "value"]
    # scalar metrics only: AP, 0_AP, mAP, FROC, num_cases (lists are left out) -> 5 rows per run
    assert len(runs) == 4 * 5 and "FROC_curve_IoU_0.10" not in set(runs["metric"])
    row = runs[(runs["initialisation"] == "scratch") & (runs["fold"] == 2) & (runs["metric"] == AP)]
    assert row["value"].tolist() == [0.9]
    explicit = tmp_path / "elsewhere" / "my_runs.csv"
    run_aggregation(metric_files, out_csv, tmp_path / "tables" / "main_results.md", runs_csv=explicit)
    assert pd.read_csv(explicit).equals(runs)


def test_undefined_metric_makes_the_summary_cell_nan(metric_files, tmp_path: Path) -> None:
    write_metrics(Path(metric_files[1][4]), -1.0, 0.3, 0.5)
    table = run_aggregation(metric_files, tmp_path / "t.csv", tmp_path / "t.md")
    scratch = table[table["initialisation"] == "scratch"].iloc[0]
    assert math.isnan(scratch[AP + "_mean"]) and scratch[MAP + "_mean"] == pytest.approx(0.2)
    assert "| n/a |" in (tmp_path / "t.md").read_text()


def test_missing_and_bad_metric_files_are_named(metric_files, tmp_path: Path) -> None:
    missing = ("retina_unet", "voco", "demo", 0, tmp_path / "nope.json")
    with pytest.raises(MetricFileError, match=r"nope\.json: metric file not found"):
        run_aggregation(metric_files + [missing], tmp_path / "t.csv", tmp_path / "t.md")
    assert not (tmp_path / "t.csv").exists()
    broken = tmp_path / "broken.json"
    broken.write_text("{oops")
    with pytest.raises(MetricFileError, match=r"broken\.json: not valid JSON"):
        run_aggregation([("d", "i", "x", 0, broken)], tmp_path / "t.csv", tmp_path / "t.md")
    lacking = tmp_path / "lacking.json"
    lacking.write_text(json.dumps({AP: 0.5}))
    with pytest.raises(MetricFileError, match=r"lacking\.json: missing metric\(s\)"):
        run_aggregation([("d", "i", "x", 0, lacking)], tmp_path / "t.csv", tmp_path / "t.md")
    with pytest.raises(MetricFileError, match="listed twice"):
        run_aggregation(metric_files + [metric_files[0]], tmp_path / "t.csv", tmp_path / "t.md")
