"""The README's demo table is rendered from main_results.csv and written between its markers only."""

from __future__ import annotations

import datetime as dt
import os

import pytest

from pretrain_det3d.analysis import demo_table
from pretrain_det3d.analysis.demo_table import DemoTableError, END_MARKER, START_MARKER
from pretrain_det3d.cli import main as cli_main

AP, MAP, FROC = "AP_IoU_0.10_MaxDet_100", "mAP_IoU_0.10_0.50_0.05_MaxDet_100", "FROC_score_IoU_0.10"

# aggregate's layout: alphabetical rows, empty std with one fold; deformable_detr x voco is missing on purpose
CSV = f"""detector,initialisation,dataset,num_folds,{AP}_mean,{AP}_std,{MAP}_mean,{MAP}_std,{FROC}_mean,{FROC}_std
deformable_detr,mae,synth,1,0.0514,,0.02,,0.03175,
deformable_detr,scratch,synth,1,0.065,,0.0224,,0.0952,
retina_unet,mae,synth,1,0.1364,,0.0449,,0.0159,
retina_unet,scratch,synth,1,0.0621,,,,0.0,
retina_unet,voco,synth,1,0.0194,,0.0021,,0.0159,
"""

EXPECTED = """\
| initialisation | Retina U-Net AP@0.1 | mAP@0.1:0.5 | FROC@0.1 | Deformable DETR AP@0.1 | mAP@0.1:0.5 | FROC@0.1 |
| --- | ---: | ---: | ---: | ---: | ---: | ---: |
| scratch | 0.062 | n/a | 0.000 | 0.065 | 0.022 | 0.095 |
| mae | 0.136 | 0.045 | 0.016 | 0.051 | 0.020 | 0.032 |
| voco | 0.019 | 0.002 | 0.016 | n/a | n/a | n/a |"""

README = f"""# Project

Text before, with a table that must stay:

| a | b |
| --- | --- |
| 1 | 2 |

What the demo reported:

{START_MARKER}
| old | table |
| --- | --- |
| 9 | 9 |
{END_MARKER}

Text after.
"""


@pytest.fixture
def results(tmp_path):
    csv = tmp_path / "results/tables/main_results.csv"
    csv.parent.mkdir(parents=True)
    csv.write_text(CSV)
    return csv


def test_rendered_table_equals_hand_written(results):
    table = demo_table.read_main_results(results)
    text = demo_table.render_table(table, ["scratch", "mae", "voco"], ["retina_unet", "deformable_detr"])
    assert text == EXPECTED


def test_without_a_config_scratch_leads_then_the_csv_order(results):
    text = demo_table.render_table(demo_table.read_main_results(results))
    assert [line.split(" | ")[0] for line in text.splitlines()[2:]] == ["| scratch", "| mae", "| voco"]
    assert text.splitlines()[0].startswith("| initialisation | Deformable DETR AP@0.1 | mAP@0.1:0.5 | FROC@0.1 | Retina")


def test_several_folds_show_mean_and_std(tmp_path):
    csv = tmp_path / "main.csv"
    csv.write_text(f"detector,initialisation,dataset,num_folds,{AP}_mean,{AP}_std,{MAP}_mean,{MAP}_std,{FROC}_mean,"
                   f"{FROC}_std\nretina_unet,scratch,d,3,0.5,0.1,0.25,0.05,0.125,\n")
    text = demo_table.render_table(demo_table.read_main_results(csv))
    assert text.splitlines()[2] == "| scratch | 0.500 ± 0.100 | 0.250 ± 0.050 | 0.125 |"


def test_readme_rewrite_replaces_only_the_marked_block(results, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(README)
    config = tmp_path / "config.yaml"
    config.write_text("study:\n  detectors: [retina_unet, deformable_detr]\n  initialisations: [scratch, mae, voco]\n")
    block = demo_table.write_demo_table(results, readme, metrics_root=None, config=config,
                                        date=dt.date(2026, 3, 4))
    new = readme.read_text()
    before, rest = README.split(START_MARKER)
    _, after = rest.split(END_MARKER)
    assert new == f"{before}{START_MARKER}\n{block}\n{END_MARKER}{after}"
    assert "| 9 | 9 |" not in new and EXPECTED in new
    assert "Run of 2026-03-04 (UTC, given on the command line)" in block
    assert "`make demo-table`" in block and "main_results.csv" in block
    # a second run with the same inputs changes nothing
    assert demo_table.update_readme(readme, block) is False
    assert readme.read_text() == new


def test_run_date_is_the_newest_metric_file(results, tmp_path):
    metrics = tmp_path / "results/metrics/retina_unet/scratch/synth"
    metrics.mkdir(parents=True)
    for name, day in (("fold0.json", 5), ("fold1.json", 7)):
        (metrics / name).write_text("{}")
        stamp = dt.datetime(2025, 1, day, 12, tzinfo=dt.timezone.utc).timestamp()
        os.utime(metrics / name, (stamp, stamp))
    os.utime(results, (0, 0))  # the CSV's own time is not used while metric files exist
    date = demo_table.run_date(results, tmp_path / "results/metrics")
    assert date.date == dt.date(2025, 1, 7) and "2 metric files" in date.source
    fallback = demo_table.run_date(results, tmp_path / "nowhere")
    assert fallback.date == dt.date(1970, 1, 1) and "main_results.csv" in fallback.source


@pytest.mark.parametrize("text, problem", [
    ("# no markers\n", "found 0 start and 0 end markers"),
    (f"{START_MARKER}\nonly a start\n", "found 1 start and 0 end markers"),
    (f"{START_MARKER}\n{END_MARKER}\n{START_MARKER}\n{END_MARKER}\n", "found 2 start and 2 end markers"),
    (f"{END_MARKER}\nswapped\n{START_MARKER}\n", "comes before"),
])
def test_bad_markers_give_a_clear_error_and_leave_the_file(results, tmp_path, text, problem):
    readme = tmp_path / "README.md"
    readme.write_text(text)
    with pytest.raises(DemoTableError, match=problem) as error:
        demo_table.write_demo_table(results, readme, metrics_root=None, config=None)
    assert str(readme) in str(error.value)
    assert readme.read_text() == text


def test_missing_results_name_the_file(tmp_path):
    with pytest.raises(DemoTableError, match="main_results.csv: no such file"):
        demo_table.read_main_results(tmp_path / "main_results.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("detector,initialisation\nretina_unet,scratch\n")
    with pytest.raises(DemoTableError, match="bad.csv: missing columns"):
        demo_table.read_main_results(bad)


def test_cli_verb_rewrites_readme_with_config_order(results, tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(README)
    config = tmp_path / "config.yaml"
    config.write_text("study:\n  detectors: [retina_unet, deformable_detr]\n  initialisations: [scratch, mae, voco]\n")
    code = cli_main(["demo-table", "--main-results", str(results), "--readme", str(readme),
                     "--metrics-root", str(tmp_path / "none"), "--config", str(config), "--date", "2026-01-02"])
    assert code == 0
    assert EXPECTED in readme.read_text() and "Run of 2026-01-02" in readme.read_text()
    readme.write_text("no markers\n")
    assert cli_main(["demo-table", "--main-results", str(results), "--readme", str(readme),
                     "--config", str(config)]) == 1
    assert "needs exactly one" in capsys.readouterr().err


def test_chance_level_is_the_last_row_under_every_detector(results, tmp_path):
    import json

    root = tmp_path / "metrics"
    for fold, ap in ((0, 0.01), (1, 0.03)):
        path = root / "chance" / "synth" / f"fold{fold}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({AP: ap, MAP: 0.002, FROC: 0.0, "draws": 20}))
    chance = demo_table.read_chance_levels(root, ["synth", "other"])
    assert set(chance) == {"synth"}  # a dataset without chance files gets no row
    assert chance["synth"][AP][0] == pytest.approx(0.02) and chance["synth"][AP][1] == pytest.approx(0.0141421, 1e-4)
    text = demo_table.render_table(demo_table.read_main_results(results), ["scratch", "mae", "voco"],
                                   ["retina_unet", "deformable_detr"], chance=chance)
    assert text.splitlines()[-1] == ("| random boxes (chance level) | 0.020 ± 0.014 | 0.002 ± 0.000 | 0.000 ± 0.000 "
                                     "| 0.020 ± 0.014 | 0.002 ± 0.000 | 0.000 ± 0.000 |")
    assert text.splitlines()[:-1] == EXPECTED.splitlines()
    (root / "chance" / "synth" / "fold1.json").write_text("{}")
    with pytest.raises(DemoTableError, match="fold1.json: expected a chance-level record"):
        demo_table.read_chance_levels(root, ["synth"])
