"""Rank distribution under case resampling (a "blob plot"): how often each initialisation takes each rank.

One panel per detector (rows) and dataset (columns), plus a last column for the order of the mean ranks across
datasets when ``mean_rank_stability``'s table is given. In a panel, x is the initialisation, y the rank (1, the
best, at the top) and the area of a disc the frequency of that rank over the bootstrap resamples
(``ranking.rank_stability``); discs carry the initialisation's colour and marker edge, and a black cross marks the
median rank. A tall column of discs means an unstable rank.
"""

from __future__ import annotations

import os

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from pretrain_det3d.analysis.figures import initialisation_order, initialisation_style, save_figure
from pretrain_det3d.analysis.tables import AnalysisInputError, require_columns

#: Disc area in points^2 of a rank taken in every resample.
FULL_DISC_AREA = 380.0
#: Frequencies shown in the size legend.
LEGEND_FREQUENCIES = (0.1, 0.5, 1.0)
#: Inches per initialisation along x and per rank along y of a panel, plus margins.
WIDTH_PER_INIT, HEIGHT_PER_RANK = 0.45, 0.32
PANEL_MARGIN = (1.0, 1.1)
LEGEND_WIDTH = 1.8
#: Title of the extra column for ``mean_rank_stability``.
MEAN_RANK_TITLE = "mean rank"


def _median_rank(panel: pd.DataFrame) -> float:
    """Median rank of an initialisation from its (rank, frequency) rows."""
    ordered = panel.sort_values("rank")
    cumulative = ordered["frequency"].cumsum().to_numpy()
    return float(ordered["rank"].to_numpy()[int(np.searchsorted(cumulative, 0.5 - 1e-12))])


def rank_figure_size(num_detectors: int, num_columns: int, num_initialisations: int) -> tuple[float, float]:
    """Figure size in inches of ``plot_rank_distribution``.

    Example:
        >>> rank_figure_size(2, 3, 4)
        (10.2, 4.76)
    """
    width = num_columns * (PANEL_MARGIN[0] + WIDTH_PER_INIT * num_initialisations) + LEGEND_WIDTH
    height = num_detectors * (PANEL_MARGIN[1] + HEIGHT_PER_RANK * num_initialisations)
    return (round(width, 6), round(height, 6))


def plot_rank_distribution(stability: pd.DataFrame, out_png: str | os.PathLike, out_pdf: str | os.PathLike,
                           mean_stability: pd.DataFrame | None = None) -> None:
    """Blob plot of ``rank_stability`` (and optionally ``mean_rank_stability``); PNG + PDF, atomically.

    Example:
        >>> plot_rank_distribution(rank_stability(groups, data), "ranks.png", "ranks.pdf")  # doctest: +SKIP
    """
    require_columns(stability, ("detector", "dataset", "initialisation", "rank", "frequency"), "rank stability table")
    if stability.empty:
        raise AnalysisInputError("rank stability table: no rows to plot")
    table = stability.astype({"detector": str, "dataset": str, "initialisation": str})
    if mean_stability is not None:
        require_columns(mean_stability, ("detector", "initialisation", "rank", "frequency"),
                        "mean rank stability table")
        table = pd.concat([table, mean_stability.assign(dataset=MEAN_RANK_TITLE).astype(
            {"detector": str, "initialisation": str})], ignore_index=True)
    detectors = sorted(table["detector"].unique())
    columns = sorted(set(table["dataset"]) - {MEAN_RANK_TITLE}) + (
        [MEAN_RANK_TITLE] if mean_stability is not None else [])
    inits = initialisation_order(table["initialisation"].unique().tolist())
    max_rank = int(np.ceil(table["rank"].max()))

    sns.set_theme(style="whitegrid", context="paper")
    fig, axes = plt.subplots(len(detectors), len(columns), squeeze=False, sharey=True,
                             figsize=rank_figure_size(len(detectors), len(columns), len(inits)))
    for row, detector in enumerate(detectors):
        for column, dataset in enumerate(columns):
            ax = axes[row][column]
            panel = table[(table["detector"] == detector) & (table["dataset"] == dataset)]
            for x, name in enumerate(inits):
                own = panel[panel["initialisation"] == name]
                if own.empty:
                    continue
                style = initialisation_style(name)
                shown = own[own["frequency"] > 0]
                ax.scatter(np.full(len(shown), x), shown["rank"], s=FULL_DISC_AREA * shown["frequency"],
                           color=style.colour, marker=style.marker, edgecolors="black", linewidths=0.6, alpha=0.85)
                ax.scatter([x], [_median_rank(own)], marker="x", color="black", s=30, linewidths=1.2, zorder=3)
            ax.set_xticks(range(len(inits)))
            ax.set_xticklabels(inits, rotation=45, ha="right", fontsize=7)
            ax.set_xlim(-0.6, len(inits) - 0.4)
            ax.set_yticks(range(1, max_rank + 1))
            ax.set_ylim(max_rank + 0.6, 0.4)  # rank 1 at the top
            ax.set_title(f"{detector} / {dataset}", fontsize=9)
            if column == 0:
                ax.set_ylabel("rank (1 = best)")
    # scatter's s is an area in points^2, a legend marker's size a width in points
    handles = [plt.Line2D([], [], marker="o", linestyle="none", markersize=float(np.sqrt(FULL_DISC_AREA * f)),
                          markerfacecolor="lightgrey", markeredgecolor="black") for f in LEGEND_FREQUENCIES]
    handles.append(plt.Line2D([], [], marker="x", color="black", linestyle="none"))
    fig.legend(handles, [f"{f:.0%} of resamples" for f in LEGEND_FREQUENCIES] + ["median rank"],
               loc="center right", frameon=False, labelspacing=1.4, borderpad=1.0)
    fig.tight_layout(rect=(0.0, 0.0, 1.0 - LEGEND_WIDTH / fig.get_figwidth(), 1.0))
    save_figure(fig, out_png, out_pdf)
