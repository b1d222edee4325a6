"""The report's tables: the main results table (Markdown, CSV, LaTeX) and the tables of the statistical tests.

Main results table (``main_results_table``): one row per detector x initialisation (detectors in blocks,
initialisations in the figures' order), one column per dataset with the mean of the metric over folds, and the
mean rank of the initialisation across datasets (``ranking.rank_within_datasets`` + ``ranking.mean_ranks``, ranks
within the detector). The best value of each column is bold: the highest mean, the lowest mean rank, with ties
all bold; "best" is decided within each detector's block (``best_within="detector"``, the comparison the study
makes) or over the whole column (``best_within=None``). Values are compared after rounding to
``ranking.DEFAULT_TIE_DECIMALS`` decimals, so floating-point noise does not break a tie.

Test tables: ``baseline_tests_markdown`` formats ``comparisons.compare_with_baseline``'s table and
``pairwise_tests_markdown`` ``pairwise.compare_pairwise``'s; their CSVs are those tables as they are.

LaTeX: a small writer of its own for the ``booktabs`` rules (``\\toprule``, ``\\midrule`` between detector blocks,
``\\bottomrule``) and ``\\textbf`` marks, with LaTeX's special characters escaped (``retina_unet`` ->
``retina\\_unet``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import pandas as pd

from pretrain_det3d.analysis.figures import initialisation_order
from pretrain_det3d.analysis.ranking import DEFAULT_TIE_DECIMALS, mean_ranks, rank_within_datasets
from pretrain_det3d.analysis.tables import MAIN_METRIC, AnalysisInputError, metric_values, require_columns
from pretrain_det3d.utils.atomic import atomic_path

#: Name of the mean-rank column.
MEAN_RANK_COLUMN = "mean_rank"
#: Decimals of the metric and of the mean rank in Markdown and LaTeX.
VALUE_DECIMALS = 3
RANK_DECIMALS = 2
#: Decimals of p-values in the test tables.
P_DECIMALS = 4
#: LaTeX's special characters and their escapes.
LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                 "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


@dataclass(frozen=True)
class MainTable:
    """Values ``[rows, datasets + mean_rank]`` indexed by (detector, initialisation) and the bold marks."""

    values: pd.DataFrame
    best: pd.DataFrame
    metric: str


def main_results_table(runs: pd.DataFrame, metric: str = MAIN_METRIC,
                       best_within: str | None = "detector") -> MainTable:
    """Mean of ``metric`` over folds per detector x initialisation and dataset, the mean rank, and the best cells.

    Example:
        >>> runs = pd.DataFrame({"detector": "d", "dataset": ["x", "x", "y", "y"], "fold": 0, "metric": "AP",
        ...                      "initialisation": ["scratch", "mae"] * 2, "value": [0.2, 0.4, 0.6, 0.5]})
        >>> table = main_results_table(runs, "AP")
        >>> table.values.round(2).values.tolist(), table.best.values.tolist()
        ([[0.2, 0.6, 1.5], [0.4, 0.5, 1.5]], [[False, True, True], [True, False, True]])
    """
    if best_within not in ("detector", None):
        raise AnalysisInputError(f"main results table: best_within must be 'detector' or None, got {best_within!r}")
    values = metric_values(runs, metric).astype({"detector": str, "dataset": str, "initialisation": str})
    means = values.groupby(["detector", "initialisation", "dataset"])["value"].mean().unstack("dataset")
    datasets = sorted(means.columns)
    ranks = mean_ranks(rank_within_datasets(runs, metric))
    ranks = ranks.astype({"detector": str, "initialisation": str}).set_index(["detector", "initialisation"])
    means[MEAN_RANK_COLUMN] = ranks["mean_rank"]
    order = [(detector, name) for detector in sorted(means.index.get_level_values(0).unique())
             for name in initialisation_order(means.loc[detector].index.tolist())]
    table = means.reindex(index=pd.MultiIndex.from_tuples(order, names=["detector", "initialisation"]),
                          columns=datasets + [MEAN_RANK_COLUMN])

    rounded = table.round(DEFAULT_TIE_DECIMALS)
    best = pd.DataFrame(False, index=table.index, columns=table.columns)
    blocks = [rounded.loc[[d]] for d in rounded.index.get_level_values(0).unique()] if best_within else [rounded]
    for block in blocks:
        for column in table.columns:
            cells = block[column]
            target = cells.min() if column == MEAN_RANK_COLUMN else cells.max()
            best.loc[cells.index, column] = (cells == target).to_numpy() & cells.notna().to_numpy()
    return MainTable(values=table, best=best, metric=metric)


def _cell_text(value: float, column: str) -> str:
    if not math.isfinite(value):
        return "n/a"
    return f"{value:.{RANK_DECIMALS if column == MEAN_RANK_COLUMN else VALUE_DECIMALS}f}"


def _header(column: str) -> str:
    return "Mean rank" if column == MEAN_RANK_COLUMN else column


def main_table_markdown(table: MainTable) -> str:
    """Markdown of ``main_results_table``; best cells in ``**bold**``.

    Example:
        >>> values = pd.DataFrame({"x": [0.5, 0.25], "mean_rank": [1.0, 2.0]},
        ...                       index=pd.MultiIndex.from_tuples([("d", "mae"), ("d", "scratch")]))
        >>> print(main_table_markdown(MainTable(values, values == values.max().where(values.columns == "x", 1.0),
        ...                                     "AP")))
        | Detector | Initialisation | x | Mean rank |
        |---|---|---:|---:|
        | d | mae | **0.500** | **1.00** |
        | d | scratch | 0.250 | 2.00 |
    """
    columns = list(table.values.columns)
    lines = ["| Detector | Initialisation | " + " | ".join(_header(c) for c in columns) + " |",
             "|---|---|" + "---:|" * len(columns)]
    for (detector, initialisation), row in table.values.iterrows():
        cells = []
        for column in columns:
            text = _cell_text(float(row[column]), column)
            cells.append(f"**{text}**" if table.best.loc[(detector, initialisation), column] else text)
        lines.append(f"| {detector} | {initialisation} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def latex_escape(text: str) -> str:
    """Escape LaTeX's special characters.

    Example:
        >>> latex_escape("retina_unet 50% & more")
        'retina\\\\_unet 50\\\\% \\\\& more'
    """
    return "".join(LATEX_ESCAPES.get(character, character) for character in str(text))


def main_table_latex(table: MainTable, caption: str | None = None, label: str = "tab:main_results") -> str:
    """``booktabs`` LaTeX table of ``main_results_table``; best cells in ``\\textbf``, a ``\\midrule`` per block.

    Example:
        >>> values = pd.DataFrame({"x": [0.5]}, index=pd.MultiIndex.from_tuples([("d", "mae")]))
        >>> print(main_table_latex(MainTable(values, values > 0, "AP"), label="t").splitlines()[5])
        \\toprule
    """
    columns = list(table.values.columns)
    caption = caption or (f"{latex_escape(table.metric)}: mean over folds per dataset and mean rank across datasets "
                          "(best per detector in bold).")
    lines = [r"\begin{table}[t]", r"\centering", rf"\caption{{{caption}}}", rf"\label{{{label}}}",
             r"\begin{tabular}{ll" + "r" * len(columns) + "}", r"\toprule",
             "Detector & Initialisation & " + " & ".join(latex_escape(_header(c)) for c in columns) + r" \\",
              r"\midrule"]
    previous = None
    for (detector, initialisation), row in table.values.iterrows():
        if previous is not None and detector != previous:
            lines.append(r"\midrule")
        cells = []
        for column in columns:
            text = _cell_text(float(row[column]), column)
            cells.append(rf"\textbf{{{text}}}" if table.best.loc[(detector, initialisation), column] else text)
        shown_detector = latex_escape(detector) if detector != previous else ""
        lines.append(f"{shown_detector} & {latex_escape(initialisation)} & " + " & ".join(cells) + r" \\")
        previous = detector
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines)


def main_table_csv(table: MainTable) -> pd.DataFrame:
    """The main table as a flat frame (detector, initialisation, datasets..., mean_rank) at full precision.

    Example:
        >>> values = pd.DataFrame({"x": [0.5]}, index=pd.MultiIndex.from_tuples([("d", "mae")],
        ...                                                               names=["detector", "initialisation"]))
        >>> main_table_csv(MainTable(values, values > 0, "AP")).columns.tolist()
        ['detector', 'initialisation', 'x']
    """
    return table.values.reset_index()


def write_main_table(table: MainTable, out_csv: str | os.PathLike | None = None,
                     out_md: str | os.PathLike | None = None, out_tex: str | os.PathLike | None = None) -> None:
    """Write the main table as CSV, Markdown and LaTeX (each optional), atomically.

    Example:
        >>> write_main_table(main_results_table(runs), "t.csv", "t.md", "t.tex")  # doctest: +SKIP
    """
    if out_csv is not None:
        with atomic_path(out_csv) as tmp:
            main_table_csv(table).to_csv(tmp, index=False)
    if out_md is not None:
        with atomic_path(out_md) as tmp:
            tmp.write_text(main_table_markdown(table) + "\n")
    if out_tex is not None:
        with atomic_path(out_tex) as tmp:
            tmp.write_text(main_table_latex(table) + "\n")


def _p_text(value: float) -> str:
    if not math.isfinite(value):
        return "n/a"
    return f"{value:.{P_DECIMALS}f}" if value >= 10 ** -P_DECIMALS else f"<{10 ** -P_DECIMALS:g}"


def _interval_text(estimate: float, low: float, high: float) -> str:
    if not math.isfinite(estimate):
        return "n/a"
    return f"{estimate:+.{VALUE_DECIMALS}f} [{low:+.{VALUE_DECIMALS}f}, {high:+.{VALUE_DECIMALS}f}]"


def baseline_tests_markdown(comparisons: pd.DataFrame) -> str:
    """Markdown of ``compare_with_baseline``'s table: effect, Wilcoxon (with its smallest attainable p), bootstrap.

    Example:
        >>> print(baseline_tests_markdown(compare_with_baseline(runs)))  # doctest: +SKIP
    """
    require_columns(comparisons, ("detector", "dataset", "initialisation", "baseline", "mean_diff", "std_diff",
                                  "p_wilcoxon", "p_wilcoxon_min", "p_wilcoxon_holm", "case_diff", "ci_low",
                                  "ci_high", "p_bootstrap_holm", "direction"), "baseline comparison table")
    lines = ["| Detector | Dataset | Initialisation | Δ vs baseline (folds, mean ± std) | Wilcoxon p | "
             "min. attainable p | Wilcoxon p (Holm) | Δ cases [CI] | bootstrap p (Holm) | direction |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for row in comparisons.itertuples(index=False):
        std = f"{row.std_diff:.{VALUE_DECIMALS}f}" if math.isfinite(row.std_diff) else "n/a"
        lines.append(
            f"| {row.detector} | {row.dataset} | {row.initialisation} vs {row.baseline} | "
            f"{row.mean_diff:+.{VALUE_DECIMALS}f} ± {std} | {_p_text(row.p_wilcoxon)} | "
            f"{_p_text(row.p_wilcoxon_min)} | {_p_text(row.p_wilcoxon_holm)} | "
            f"{_interval_text(row.case_diff, row.ci_low, row.ci_high)} | {_p_text(row.p_bootstrap_holm)} | "
            f"{row.direction} |")
    return "\n".join(lines)


def pairwise_tests_markdown(pairwise: pd.DataFrame) -> str:
    """Markdown of ``compare_pairwise``'s table (difference = a - b over all datasets).

    Example:
        >>> print(pairwise_tests_markdown(compare_pairwise(runs)))  # doctest: +SKIP
    """
    require_columns(pairwise, ("detector", "initialisation_a", "initialisation_b", "n_pairs", "mean_diff",
                               "p_wilcoxon", "p_wilcoxon_holm", "case_diff", "ci_low", "ci_high",
                               "p_bootstrap_holm"), "pairwise comparison table")
    lines = ["| Detector | a | b | pairs (dataset x fold) | Δ a - b (folds) | Wilcoxon p | Wilcoxon p (Holm) | "
             "Δ a - b cases [CI] | bootstrap p (Holm) |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in pairwise.itertuples(index=False):
        lines.append(
            f"| {row.detector} | {row.initialisation_a} | {row.initialisation_b} | {int(row.n_pairs)} | "
            f"{row.mean_diff:+.{VALUE_DECIMALS}f} | {_p_text(row.p_wilcoxon)} | {_p_text(row.p_wilcoxon_holm)} | "
            f"{_interval_text(row.case_diff, row.ci_low, row.ci_high)} | {_p_text(row.p_bootstrap_holm)} |")
    return "\n".join(lines)


def write_test_table(table: pd.DataFrame, markdown: str, out_csv: str | os.PathLike | None = None,
                     out_md: str | os.PathLike | None = None) -> None:
    """Write a test table as CSV (as it is) and its Markdown text, atomically.

    Example:
        >>> write_test_table(t, baseline_tests_markdown(t), "tests.csv", "tests.md")  # doctest: +SKIP
    """
    if out_csv is not None:
        with atomic_path(out_csv) as tmp:
            table.to_csv(tmp, index=False)
    if out_md is not None:
        with atomic_path(out_md) as tmp:
            tmp.write_text(markdown + "\n")


__all__ = ["MainTable", "main_results_table", "main_table_markdown", "main_table_latex", "main_table_csv",
           "write_main_table", "baseline_tests_markdown", "pairwise_tests_markdown", "write_test_table",
           "latex_escape"]
