"""Heat map of the change against scratch: initialisation x dataset, one panel per detector, with significance marks.

Cells show ``mean_diff`` of ``compare_with_baseline`` (mean over folds of AP(init) - AP(scratch)) as a signed
number, so the figure reads in greyscale where the diverging colours do not; stars give the Holm-adjusted p of
the chosen test (``*`` < alpha, ``**`` < alpha / 5, ``***`` < alpha / 50). Each row starts with the marker and
colour of its initialisation (``figures.initialisation_style``).
"""

from __future__ import annotations

import os

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from pretrain_det3d.analysis.figures import (
    PNG_DPI,
    initialisation_order,
    initialisation_style,
    save_figure,
    significance_stars,
)
from pretrain_det3d.analysis.tables import AnalysisInputError, require_columns

#: Inches per dataset column and per initialisation row of one panel, plus margins for labels.
CELL_WIDTH, CELL_HEIGHT = 0.95, 0.5
PANEL_MARGIN_WIDTH, MARGIN_HEIGHT = 1.9, 1.3
COLOURBAR_WIDTH = 1.1
#: Where the row markers sit (fraction of the panel width left of it) and the tick-label pad making room for them.
MARKER_OFFSET = 0.035
MARKER_PAD = 14
#: Diverging colour map centred on 0 (blue: better than scratch; red: worse).
CHANGE_COLOURMAP = "RdBu"
#: Tests whose Holm-adjusted p-values can give the marks.
TESTS = ("wilcoxon", "bootstrap")


def change_figure_size(num_detectors: int, num_datasets: int, num_initialisations: int) -> tuple[float, float]:
    """Figure size in inches of ``plot_change_heatmap``.

    Example:
        >>> change_figure_size(2, 3, 5)
        (10.6, 3.8)
    """
    width = num_detectors * (PANEL_MARGIN_WIDTH + CELL_WIDTH * num_datasets) + COLOURBAR_WIDTH
    return (round(width, 6), round(MARGIN_HEIGHT + CELL_HEIGHT * num_initialisations, 6))


def plot_change_heatmap(comparisons: pd.DataFrame, out_png: str | os.PathLike, out_pdf: str | os.PathLike,
                        test: str = "wilcoxon") -> None:
    """Draw the change-against-baseline heat map from ``compare_with_baseline``'s table; PNG + PDF, atomically.

    ``test`` picks the marks: ``"wilcoxon"`` (over folds) or ``"bootstrap"`` (over cases; needs the case columns).

    Example:
        >>> table = compare_with_baseline(runs, case_data=data)  # doctest: +SKIP
        >>> plot_change_heatmap(table, "change.png", "change.pdf", test="bootstrap")  # doctest: +SKIP
    """
    if test not in TESTS:
        raise AnalysisInputError(f"change heat map: test must be one of {TESTS}, got {test!r}")
    p_column = f"p_{test}_holm"
    require_columns(comparisons, ("detector", "dataset", "initialisation", "baseline", "mean_diff", p_column,
                                  "alpha"), "baseline comparison table")
    if comparisons.empty:
        raise AnalysisInputError("baseline comparison table: no rows to plot")
    if test == "bootstrap" and comparisons[p_column].isna().all():
        raise AnalysisInputError("baseline comparison table: no bootstrap p-values (was case-level data given?)")
    table = comparisons.astype({"detector": str, "dataset": str, "initialisation": str})
    detectors = sorted(table["detector"].unique())
    datasets = sorted(table["dataset"].unique())
    inits = initialisation_order(table["initialisation"].unique().tolist())
    alpha = float(table["alpha"].iloc[0])
    baseline = str(table["baseline"].iloc[0])
    limit = float(np.nanmax(np.abs(table["mean_diff"].to_numpy(float)))) or 1.0

    sns.set_theme(style="white", context="paper")
    fig, axes = plt.subplots(1, len(detectors), figsize=change_figure_size(len(detectors), len(datasets), len(inits)),
                             squeeze=False, sharey=True)
    for column, (ax, detector) in enumerate(zip(axes[0], detectors)):
        panel = table[table["detector"] == detector]
        values = panel.pivot_table(index="initialisation", columns="dataset", values="mean_diff", aggfunc="first")
        values = values.reindex(index=inits, columns=datasets)
        p_values = panel.pivot_table(index="initialisation", columns="dataset", values=p_column, aggfunc="first",
                                     dropna=False).reindex(index=inits, columns=datasets)
        labels = np.full(values.shape, "", dtype=object)
        for i in range(values.shape[0]):
            for j in range(values.shape[1]):
                if np.isfinite(values.iat[i, j]):
                    labels[i, j] = f"{values.iat[i, j]:+.3f}{significance_stars(float(p_values.iat[i, j]), alpha)}"
        sns.heatmap(values, ax=ax, cmap=CHANGE_COLOURMAP, center=0.0, vmin=-limit, vmax=limit, annot=labels, fmt="",
                    annot_kws={"fontsize": 8}, linewidths=0.5, linecolor="white", cbar=False)
        ax.set_title(detector)
        ax.set_xlabel("dataset")
        ax.set_ylabel("initialisation" if column == 0 else "")
        ax.tick_params(axis="y", rotation=0, pad=MARKER_PAD)
        for row, name in enumerate(inits if column == 0 else []):  # each row's marker beside its label
            style = initialisation_style(name)
            ax.scatter([-MARKER_OFFSET], [row + 0.5], marker=style.marker, s=30, color=style.colour,
                       edgecolors="black", linewidths=0.6, clip_on=False, transform=ax.get_yaxis_transform(),
                       zorder=3)
    fig.text(0.005, 0.01, f"* / ** / ***: Holm-adjusted {test} p < {alpha:g} / {alpha / 5:g} / {alpha / 50:g}",
             fontsize=7)
    fig.tight_layout(rect=(0.0, 0.04, 1.0 - COLOURBAR_WIDTH / fig.get_figwidth(), 1.0))
    # the colour bar gets its own axes after the layout is fixed (tight_layout cannot place a free axes)
    top = axes[0][0].get_position()
    colourbar_axis = fig.add_axes((1.0 - 0.9 * COLOURBAR_WIDTH / fig.get_figwidth(), top.y0,
                                   0.15 / fig.get_figwidth(), top.height))
    fig.colorbar(axes[0][0].collections[0], cax=colourbar_axis, label=f"mean AP@0.1 change vs {baseline}")
    save_figure(fig, out_png, out_pdf, dpi=PNG_DPI)
