"""Significance map: every pair of initialisations of a detector, as a lower-triangular matrix.

Cell (row ``r``, column ``c``) compares initialisation ``r`` with ``c`` (``pairwise.compare_pairwise``, over all
datasets): its shade is the Holm-adjusted p-value class of the chosen test (white: not significant at ``alpha``;
darker for p < alpha, alpha / 5, alpha / 50: a sequential grey-blue scale, so it survives greyscale printing) and
its text the mean difference ``r - c`` of the metric with its stars. One panel per detector.
"""

from __future__ import annotations

import os

import matplotlib.colors
import matplotlib.patches
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from pretrain_det3d.analysis.figures import (
    initialisation_order,
    initialisation_style,
    save_figure,
    significance_stars,
)
from pretrain_det3d.analysis.tables import AnalysisInputError, require_columns

#: Shades of the p-value classes: not significant, < alpha, < alpha / 5, < alpha / 50 (light to dark).
CLASS_COLOURS = ("#ffffff", "#c6dbef", "#6baed6", "#08306b")
#: Inches per matrix cell and margins per panel.
CELL_SIZE = 0.75
PANEL_MARGIN = (1.6, 1.4)
LEGEND_WIDTH = 2.0
#: Tests whose Holm-adjusted p-values can shade the cells.
TESTS = ("wilcoxon", "bootstrap")
#: Column of the difference shown per test (fold pairs vs case bootstrap).
DIFFERENCE_COLUMN = {"wilcoxon": "mean_diff", "bootstrap": "case_diff"}


def p_value_class(p_value: float, alpha: float) -> int:
    """0 (not significant or NaN), 1 (< alpha), 2 (< alpha / 5), 3 (< alpha / 50).

    Example:
        >>> [p_value_class(p, 0.05) for p in (0.5, 0.04, 0.005, 0.0001, float("nan"))]
        [0, 1, 2, 3, 0]
    """
    return len(significance_stars(p_value, alpha))


def significance_figure_size(num_detectors: int, num_initialisations: int) -> tuple[float, float]:
    """Figure size in inches of ``plot_significance_map`` (the matrix drops the first row and last column).

    Example:
        >>> significance_figure_size(2, 4)
        (9.7, 3.65)
    """
    cells = max(num_initialisations - 1, 1) * CELL_SIZE
    return (round(num_detectors * (cells + PANEL_MARGIN[0]) + LEGEND_WIDTH, 6), round(cells + PANEL_MARGIN[1], 6))


def plot_significance_map(pairwise: pd.DataFrame, out_png: str | os.PathLike, out_pdf: str | os.PathLike,
                          test: str = "wilcoxon") -> None:
    """Lower-triangular significance matrix per detector from ``compare_pairwise``'s table; PNG + PDF, atomically.

    Example:
        >>> plot_significance_map(compare_pairwise(runs), "sig.png", "sig.pdf")  # doctest: +SKIP
    """
    if test not in TESTS:
        raise AnalysisInputError(f"significance map: test must be one of {TESTS}, got {test!r}")
    p_column, difference_column = f"p_{test}_holm", DIFFERENCE_COLUMN[test]
    require_columns(pairwise, ("detector", "initialisation_a", "initialisation_b", difference_column, p_column,
                               "alpha"), "pairwise comparison table")
    if pairwise.empty:
        raise AnalysisInputError("pairwise comparison table: no rows to plot")
    if pairwise[p_column].isna().all():
        raise AnalysisInputError(f"pairwise comparison table: no {test} p-values (was case-level data given?)")
    table = pairwise.astype({"detector": str, "initialisation_a": str, "initialisation_b": str})
    detectors = sorted(table["detector"].unique())
    inits = initialisation_order(sorted(set(table["initialisation_a"]) | set(table["initialisation_b"])))
    alpha = float(table["alpha"].iloc[0])
    colour_map = matplotlib.colors.ListedColormap(CLASS_COLOURS)

    sns.set_theme(style="white", context="paper")
    fig, axes = plt.subplots(1, len(detectors), squeeze=False,
                             figsize=significance_figure_size(len(detectors), len(inits)))
    for column, (ax, detector) in enumerate(zip(axes[0], detectors)):
        size = len(inits)
        classes = np.full((size, size), np.nan)
        labels = np.full((size, size), "", dtype=object)
        for row in table[table["detector"] == detector].itertuples(index=False):
            i, j = inits.index(row.initialisation_a), inits.index(row.initialisation_b)
            difference, p_value = float(getattr(row, difference_column)), float(getattr(row, p_column))
            # lower triangle: the later initialisation is the row, so the text is row - column
            low, high, signed = (j, i, -difference) if i < j else (i, j, difference)
            classes[low, high] = p_value_class(p_value, alpha)
            labels[low, high] = f"{signed:+.3f}\n{significance_stars(p_value, alpha)}"
        shown = classes[1:, :-1]  # row 0 and the last column hold no pair below the diagonal
        sns.heatmap(pd.DataFrame(shown, index=inits[1:], columns=inits[:-1]), ax=ax, cmap=colour_map, vmin=-0.5,
                    vmax=3.5, cbar=False, annot=labels[1:, :-1], fmt="", annot_kws={"fontsize": 7},
                    linewidths=0.0, mask=np.isnan(shown), square=True)
        # outline only the cells below the diagonal (heatmap's own lines would also frame the masked ones)
        for row_index, column_index in zip(*np.nonzero(~np.isnan(shown))):
            ax.add_patch(matplotlib.patches.Rectangle((column_index, row_index), 1, 1, fill=False,
                                                      edgecolor="grey", linewidth=0.8))
        sns.despine(ax=ax, left=True, bottom=True)
        ax.set_title(detector)
        ax.set_xlabel("compared with")
        ax.set_ylabel("initialisation (difference = row - column)" if column == 0 else "")
        ax.tick_params(axis="y", rotation=0)
        ax.tick_params(axis="x", rotation=45)
        for tick, name in zip(ax.get_yticklabels(), inits[1:]):
            tick.set_color(initialisation_style(name).colour)
        for tick, name in zip(ax.get_xticklabels(), inits[:-1]):
            tick.set_color(initialisation_style(name).colour)
    handles = [matplotlib.patches.Patch(facecolor=colour, edgecolor="grey") for colour in CLASS_COLOURS]
    names = [f"n.s. (p >= {alpha:g})", f"p < {alpha:g}", f"p < {alpha / 5:g}", f"p < {alpha / 50:g}"]
    fig.legend(handles, names, title=f"Holm-adjusted\n{test} p", loc="center right", frameon=False)
    fig.tight_layout(rect=(0.0, 0.0, 1.0 - LEGEND_WIDTH / fig.get_figwidth(), 1.0))
    save_figure(fig, out_png, out_pdf)
