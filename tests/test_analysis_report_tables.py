"""Main results table and test tables: hand-worked means, mean ranks and bold cells; Markdown, CSV and LaTeX."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from pretrain_det3d.analysis.comparisons import compare_with_baseline
from pretrain_det3d.analysis.pairwise import compare_pairwise
from pretrain_det3d.analysis.report_tables import (
    baseline_tests_markdown,
    latex_escape,
    main_results_table,
    main_table_latex,
    main_table_markdown,
    pairwise_tests_markdown,
    write_main_table,
    write_test_table,
)
from pretrain_det3d.analysis.tables import AnalysisInputError

# fold values (2 folds) per detector, initialisation and dataset
VALUES = {
    ("retina_unet", "scratch", "lung"): (0.40, 0.60),   # mean 0.50
    ("retina_unet", "mae", "lung"): (0.70, 0.50),       # mean 0.60  best lung
    ("retina_unet", "voco", "lung"): (0.50, 0.50),      # mean 0.50
    ("retina_unet", "scratch", "kidney"): (0.20, 0.20),  # mean 0.20
    ("retina_unet", "mae", "kidney"): (0.30, 0.10),     # mean 0.20
    ("retina_unet", "voco", "kidney"): (0.40, 0.20),    # mean 0.30  best kidney
    ("detr", "scratch", "lung"): (0.90, 0.90),          # mean 0.90  best lung overall
    ("detr", "mae", "lung"): (0.10, 0.30),              # mean 0.20
    ("detr", "voco", "lung"): (0.30, 0.10),             # mean 0.20
    ("detr", "scratch", "kidney"): (0.10, 0.10),        # mean 0.10
    ("detr", "mae", "kidney"): (0.15, 0.25),            # mean 0.20  best kidney (tied)
    ("detr", "voco", "kidney"): (0.25, 0.15),           # mean 0.20  best kidney (tied)
}
# ranks per dataset (ties averaged), then their mean over the two datasets
MEAN_RANK = {
    ("retina_unet", "scratch"): (2.5 + 2.5) / 2,  # lung: mae 1, scratch/voco 2.5; kidney: voco 1, scratch/mae 2.5
    ("retina_unet", "mae"): (1 + 2.5) / 2,
    ("retina_unet", "voco"): (2.5 + 1) / 2,
    ("detr", "scratch"): (1 + 3) / 2,             # lung: scratch 1, mae/voco 2.5; kidney: mae/voco 1.5, scratch 3
    ("detr", "mae"): (2.5 + 1.5) / 2,
    ("detr", "voco"): (2.5 + 1.5) / 2,
}


def make_runs() -> pd.DataFrame:
    rows = [dict(detector=d, initialisation=i, dataset=s, fold=f, metric="AP", value=v)
            for (d, i, s), values in VALUES.items() for f, v in enumerate(values)]
    return pd.DataFrame(rows)


def test_means_mean_ranks_and_bold_cells_within_each_detector() -> None:
    table = main_results_table(make_runs(), "AP")
    assert list(table.values.columns) == ["kidney", "lung", "mean_rank"]
    assert table.values.index.tolist() == [("detr", "scratch"), ("detr", "mae"), ("detr", "voco"),
                                           ("retina_unet", "scratch"), ("retina_unet", "mae"),
                                           ("retina_unet", "voco")]
    for (detector, init, dataset), values in VALUES.items():
        assert table.values.loc[(detector, init), dataset] == pytest.approx(sum(values) / 2)
    for key, expected in MEAN_RANK.items():
        assert table.values.loc[key, "mean_rank"] == pytest.approx(expected)
    bold = {(d, i, c) for (d, i), row in table.best.iterrows() for c, flag in row.items() if flag}
    assert bold == {
        ("retina_unet", "mae", "lung"), ("retina_unet", "voco", "kidney"),
        ("retina_unet", "mae", "mean_rank"), ("retina_unet", "voco", "mean_rank"),  # both 1.75
        ("detr", "scratch", "lung"), ("detr", "mae", "kidney"), ("detr", "voco", "kidney"),  # tie: both bold
        ("detr", "mae", "mean_rank"), ("detr", "voco", "mean_rank"), ("detr", "scratch", "mean_rank"),  # all 2.0
    }


def test_bold_over_whole_columns() -> None:
    table = main_results_table(make_runs(), "AP", best_within=None)
    bold = {(d, i, c) for (d, i), row in table.best.iterrows() for c, flag in row.items() if flag}
    assert bold == {("detr", "scratch", "lung"), ("retina_unet", "voco", "kidney"),
                    ("retina_unet", "mae", "mean_rank"), ("retina_unet", "voco", "mean_rank")}
    with pytest.raises(AnalysisInputError, match="best_within"):
        main_results_table(make_runs(), "AP", best_within="dataset")


def test_markdown_latex_and_csv(tmp_path: Path) -> None:
    table = main_results_table(make_runs(), "AP")
    markdown = main_table_markdown(table).splitlines()
    assert markdown[0] == "| Detector | Initialisation | kidney | lung | Mean rank |"
    assert "| retina_unet | mae | 0.200 | **0.600** | **1.75** |" in markdown
    assert "| retina_unet | scratch | 0.200 | 0.500 | 2.50 |" in markdown
    latex = main_table_latex(table)
    lines = latex.splitlines()
    assert lines.count(r"\toprule") == 1 and lines.count(r"\bottomrule") == 1
    assert lines.count(r"\midrule") == 2  # below the header and between the two detector blocks
    assert r"retina\_unet & scratch & 0.200 & 0.500 & 2.50 \\" in lines
    assert r" & mae & 0.200 & \textbf{0.600} & \textbf{1.75} \\" in lines
    assert latex.index(r"\toprule") < latex.index(r"\midrule") < latex.index(r"\bottomrule")
    assert latex_escape("a_b&c%") == r"a\_b\&c\%"

    paths = {key: tmp_path / "out" / f"main.{key}" for key in ("csv", "md", "tex")}
    write_main_table(table, paths["csv"], paths["md"], paths["tex"])
    assert paths["tex"].read_text() == latex + "\n" and paths["md"].read_text() == "\n".join(markdown) + "\n"
    csv = pd.read_csv(paths["csv"])
    assert csv.columns.tolist() == ["detector", "initialisation", "kidney", "lung", "mean_rank"]
    assert csv.set_index(["detector", "initialisation"]).loc[("detr", "mae"), "mean_rank"] == pytest.approx(2.0)
    assert sorted(p.name for p in paths["csv"].parent.iterdir()) == ["main.csv", "main.md", "main.tex"]


def test_test_tables(tmp_path: Path) -> None:
    runs = make_runs()
    comparisons = compare_with_baseline(runs, "AP")
    markdown = baseline_tests_markdown(comparisons).splitlines()
    assert len(markdown) == 2 + len(comparisons) == 2 + 8  # 2 detectors x 2 datasets x 2 initialisations
    assert markdown[2].startswith("| detr | kidney | mae vs scratch | +0.100 ± 0.071 | ")
    assert "| n/a | n/a | better |" in markdown[2]  # no case-level data: bootstrap columns n/a
    write_test_table(comparisons, "\n".join(markdown), tmp_path / "t.csv", tmp_path / "t.md")
    assert len(pd.read_csv(tmp_path / "t.csv")) == 8
    pairwise = pairwise_tests_markdown(compare_pairwise(runs, "AP", order=["scratch", "mae", "voco"])).splitlines()
    assert len(pairwise) == 2 + 6
    assert pairwise[2].startswith("| detr | scratch | mae | 4 | +0.300 | ")
    with pytest.raises(AnalysisInputError, match="baseline comparison table: missing column"):
        baseline_tests_markdown(pd.DataFrame({"detector": ["d"]}))
