"""Registry of report outputs and the `figure` / `table` CLI verbs on a tiny study written to disk."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from analysis_study import write_study  # noqa: E402

from pretrain_det3d import catalog  # noqa: E402
from pretrain_det3d.analysis.outputs import (  # noqa: E402
    FIGURES,
    TABLES,
    StatisticsSettings,
    StudyInputs,
    make_figure,
    make_table,
)
from pretrain_det3d.analysis.tables import AnalysisInputError  # noqa: E402
from pretrain_det3d.cli import main  # noqa: E402
from pretrain_det3d.utils.registry import UnknownNameError  # noqa: E402

FAST = {"n_resamples": 30, "seed": 3}


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_study(tmp_path_factory.mktemp("study"), detectors=("retina_unet",),
                       initialisations=("scratch", "mae", "voco"), datasets=("lung", "kidney"), folds=5,
                       cases_per_fold=1)


def inputs_of(study: dict[str, Path]) -> StudyInputs:
    return StudyInputs(runs_csv=study["runs_csv"], metrics_root=study["metrics"],
                       predictions_root=study["predictions"], converted_root=study["converted"])


def snapshot(root: Path) -> dict[Path, int]:
    return {path: path.stat().st_mtime_ns for path in root.rglob("*") if path.is_file()}


def test_registries_list_every_output() -> None:
    assert FIGURES.names() == ["ap_by_init", "change_vs_scratch", "detection_examples", "froc", "label_efficiency",
                              "rank_distribution", "significance_map"]
    assert TABLES.names() == ["baseline_tests", "labels_saved", "main_results_ranked", "pairwise_tests"]
    assert TABLES.get("main_results_ranked").formats == ("csv", "md", "tex")
    assert FIGURES.get("rank_distribution").case_level == "required"


def test_every_figure_and_table_is_made_without_touching_its_inputs(study: dict[str, Path], tmp_path: Path) -> None:
    before = snapshot(study["runs_csv"].parents[1])
    # the study-level outputs (the label-efficiency ones read a label-fraction run table: test_analysis_label_efficiency)
    for name in catalog.REPORT_FIGURES:
        make_figure(name, inputs_of(study), tmp_path / f"{name}.png", tmp_path / f"{name}.pdf", FAST)
        assert (tmp_path / f"{name}.png").stat().st_size > 5000 and (tmp_path / f"{name}.pdf").is_file()
    for name in catalog.REPORT_TABLES:
        paths = {fmt: tmp_path / f"{name}.{fmt}" for fmt in TABLES.get(name).formats}
        make_table(name, inputs_of(study), paths, FAST)
        assert all(path.stat().st_size > 100 for path in paths.values())
    assert snapshot(study["runs_csv"].parents[1]) == before  # outputs only read the evaluation's products
    baseline = pd.read_csv(tmp_path / "baseline_tests.csv")
    assert len(baseline) == 2 * 2 and baseline["p_bootstrap"].notna().all()  # auto: bootstrap with predictions
    assert (baseline["n_resamples"] == 30).all() and (baseline["seed"] == 3).all()
    assert r"\toprule" in (tmp_path / "main_results_ranked.tex").read_text()


def test_auto_test_falls_back_to_wilcoxon_without_predictions(study: dict[str, Path], tmp_path: Path) -> None:
    paths = {"csv": tmp_path / "t.csv", "md": tmp_path / "t.md"}
    make_table("baseline_tests", StudyInputs(runs_csv=study["runs_csv"]), paths, FAST)
    table = pd.read_csv(paths["csv"])
    assert table["p_bootstrap"].isna().all() and table["p_wilcoxon"].notna().all()
    with pytest.raises(AnalysisInputError, match="test 'bootstrap' needs predictions_root"):
        make_table("baseline_tests", StudyInputs(runs_csv=study["runs_csv"]), paths, {"test": "bootstrap"})


def test_clear_errors(study: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(UnknownNameError, match="unknown figure 'nope'; registered: ap_by_init"):
        make_figure("nope", inputs_of(study), tmp_path / "a.png", tmp_path / "a.pdf")
    with pytest.raises(AnalysisInputError, match=r"figure 'froc' needs input\(s\) \['metrics_root'\]"):
        make_figure("froc", StudyInputs(runs_csv=study["runs_csv"]), tmp_path / "a.png", tmp_path / "a.pdf")
    with pytest.raises(AnalysisInputError, match=r"'rank_distribution' needs input\(s\) \['predictions_root', "):
        make_figure("rank_distribution", StudyInputs(runs_csv=study["runs_csv"]), tmp_path / "a.png",
                    tmp_path / "a.pdf")
    with pytest.raises(AnalysisInputError, match=r"missing output path\(s\) \['tex'\]"):
        make_table("main_results_ranked", inputs_of(study), {"csv": tmp_path / "t.csv", "md": tmp_path / "t.md"})
    with pytest.raises(AnalysisInputError, match=r"'statistics.resamples': unknown key; did you mean 'n_resamples'"):
        StatisticsSettings.from_mapping({"resamples": 10})
    with pytest.raises(AnalysisInputError, match=r"'statistics.alpha': Input should be less than 1"):
        StatisticsSettings.from_mapping({"alpha": 5})
    with pytest.raises(AnalysisInputError, match=r"absent\.csv: per-run table not found"):
        make_table("main_results_ranked", StudyInputs(runs_csv=tmp_path / "absent.csv"),
                   {f: tmp_path / f"t.{f}" for f in ("csv", "md", "tex")})
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_cli_verbs(study: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    png, pdf = tmp_path / "froc.png", tmp_path / "froc.pdf"
    assert main(["figure", "--name", "froc", "--runs-csv", str(study["runs_csv"]), "--metrics-root",
                 str(study["metrics"]), "--out-png", str(png), "--out-pdf", str(pdf)]) == 0
    assert png.is_file() and pdf.is_file()
    out = {fmt: tmp_path / f"pairs.{fmt}" for fmt in ("csv", "md")}
    assert main(["table", "--name", "pairwise_tests", "--runs-csv", str(study["runs_csv"]),
                 "--predictions-root", str(study["predictions"]), "--converted-root", str(study["converted"]),
                 "--out-csv", str(out["csv"]), "--out-md", str(out["md"]),
                 "--settings", '{"n_resamples": 20, "alpha": 0.1}']) == 0
    pairs = pd.read_csv(out["csv"])
    assert len(pairs) == 3 and (pairs["alpha"] == 0.1).all() and (pairs["n_resamples"] == 20).all()
    assert main(["table", "--name", "main_results_ranked", "--runs-csv", str(study["runs_csv"]),
                 "--out-csv", str(tmp_path / "m.csv")]) == 1
    assert "missing output path(s) ['md', 'tex']" in capsys.readouterr().err
