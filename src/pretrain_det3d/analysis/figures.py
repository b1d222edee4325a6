"""Figures of the study: AP@0.1 per dataset and initialisation, one panel per detector.

Every figure takes its colours, hatches and markers from ``initialisation_style`` so that an initialisation
looks the same everywhere, and stays distinguishable in greyscale (hatch + marker, colours of spread lightness).
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only; no display on cluster nodes

import matplotlib.legend_handler  # noqa: E402
import matplotlib.lines  # noqa: E402
import matplotlib.patches  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from pretrain_det3d.analysis.tables import BASELINE_INITIALISATION, MAIN_METRIC, metric_values  # noqa: E402
from pretrain_det3d.utils.atomic import atomic_path  # noqa: E402

#: Resolution of the PNG (the PDF is vector).
PNG_DPI = 150
#: Width in inches of one detector panel per dataset on its x axis, and the panel height.
PANEL_WIDTH_PER_DATASET = 1.6
PANEL_MIN_WIDTH = 3.5
PANEL_HEIGHT = 3.6
#: Extra width for the legend at the right.
LEGEND_WIDTH = 1.8


@dataclass(frozen=True)
class InitialisationStyle:
    """How one initialisation is drawn: fill colour, bar hatch and per-fold marker."""

    colour: str
    hatch: str
    marker: str


#: Fixed styles of the paper's initialisations (Okabe-Ito colours, ordered from dark to light so that greyscale
#: prints keep them apart; hatches and markers carry the distinction where grey levels get close).
KNOWN_STYLES: dict[str, InitialisationStyle] = {
    "scratch": InitialisationStyle("#404040", "", "o"),
    "mae": InitialisationStyle("#0072B2", "//", "s"),
    "spark3d": InitialisationStyle("#D55E00", "\\\\", "^"),
    "models_genesis": InitialisationStyle("#009E73", "xx", "D"),
    "voco": InitialisationStyle("#CC79A7", "..", "v"),
    "multitalent": InitialisationStyle("#E69F00", "--", "P"),
}
_FALLBACK_COLOURS = ("#56B4E9", "#F0E442", "#999999", "#882255", "#117733", "#332288")
_FALLBACK_HATCHES = ("+", "o", "||", "x.", "O", "/.")
_FALLBACK_MARKERS = ("X", "<", ">", "p", "h", "*")


def initialisation_style(name: str) -> InitialisationStyle:
    """Style of an initialisation; names outside ``KNOWN_STYLES`` (e.g. a published checkpoint) get a stable
    style chosen from the name's CRC32, so they look the same in every figure and every run.

    Example:
        >>> initialisation_style("scratch").colour
        '#404040'
        >>> initialisation_style("my_ckpt") == initialisation_style("my_ckpt")
        True
    """
    if name in KNOWN_STYLES:
        return KNOWN_STYLES[name]
    index = zlib.crc32(name.encode("utf-8"))
    return InitialisationStyle(
        _FALLBACK_COLOURS[index % len(_FALLBACK_COLOURS)],
        _FALLBACK_HATCHES[index % len(_FALLBACK_HATCHES)],
        _FALLBACK_MARKERS[index % len(_FALLBACK_MARKERS)],
    )


def initialisation_palette(names: Sequence[str]) -> dict[str, str]:
    """Colour per initialisation for seaborn's ``palette=`` (the one palette used by every figure).

    Example:
        >>> initialisation_palette(["scratch", "mae"])
        {'scratch': '#404040', 'mae': '#0072B2'}
    """
    return {name: initialisation_style(name).colour for name in names}


def initialisation_order(names: Sequence[str]) -> list[str]:
    """Baseline first, then the paper's initialisations in their fixed order, then others alphabetically.

    Example:
        >>> initialisation_order(["voco", "zz_ckpt", "scratch", "mae"])
        ['scratch', 'mae', 'voco', 'zz_ckpt']
    """
    unique = set(names)
    known = [name for name in KNOWN_STYLES if name in unique]
    if BASELINE_INITIALISATION in known:
        known.remove(BASELINE_INITIALISATION)
        known.insert(0, BASELINE_INITIALISATION)
    return known + sorted(unique - set(known))


def figure_size(num_detectors: int, num_datasets: int) -> tuple[float, float]:
    """Figure size in inches for ``plot_ap_by_init`` (the PNG is this times ``PNG_DPI`` pixels).

    Example:
        >>> figure_size(2, 3)
        (11.4, 3.6)
    """
    panel_width = max(PANEL_MIN_WIDTH, PANEL_WIDTH_PER_DATASET * num_datasets)
    return (round(num_detectors * panel_width + LEGEND_WIDTH, 6), PANEL_HEIGHT)


def plot_ap_by_init(runs_csv: str | os.PathLike, out_png: str | os.PathLike, out_pdf: str | os.PathLike) -> None:
    """Bar chart of AP@0.1 (mean over folds) per dataset and initialisation with per-fold points, one panel per
    detector, saved atomically as PNG (``PNG_DPI``) and PDF.

    Example:
        >>> plot_ap_by_init("results/tables/runs.csv", "results/figures/ap_by_init.png",
        ...                 "results/figures/ap_by_init.pdf")  # doctest: +SKIP
    """
    runs_csv = Path(runs_csv)
    if not runs_csv.is_file():
        raise FileNotFoundError(f"{runs_csv}: per-run table not found")
    try:
        table = pd.read_csv(runs_csv)
        values = metric_values(table, MAIN_METRIC)
    except (ValueError, pd.errors.ParserError) as error:
        raise ValueError(f"{runs_csv}: {error}") from error

    detectors = sorted(values["detector"].astype(str).unique())
    datasets = sorted(values["dataset"].astype(str).unique())
    inits = initialisation_order(values["initialisation"].astype(str).unique().tolist())
    palette = initialisation_palette(inits)
    values = values.astype({"detector": str, "dataset": str, "initialisation": str})

    sns.set_theme(style="whitegrid", context="paper")
    fig, axes = plt.subplots(1, len(detectors), figsize=figure_size(len(detectors), len(datasets)),
                             sharey=True, squeeze=False)
    for ax, detector in zip(axes[0], detectors):
        panel = values[values["detector"] == detector]
        sns.barplot(data=panel, x="dataset", y="value", hue="initialisation", order=datasets, hue_order=inits,
                    palette=palette, errorbar=None, estimator="mean", edgecolor="black", linewidth=0.8,
                    alpha=0.5, legend=False, ax=ax)
        # Bars come in one container per hue level, in hue_order. Bars are half-transparent so that the
        # full-colour fold points stay visible on top of them.
        for container, name in zip(ax.containers, inits):
            for bar in container:
                bar.set_hatch(initialisation_style(name).hatch)
        for name in inits:
            # One call per initialisation so each gets its marker; hue_order keeps the dodge positions aligned.
            sns.stripplot(data=panel[panel["initialisation"] == name], x="dataset", y="value", hue="initialisation",
                          order=datasets, hue_order=inits, palette=palette, dodge=True, jitter=False,
                          marker=initialisation_style(name).marker, size=6, edgecolor="black", linewidth=0.8,
                          legend=False, ax=ax)
        ax.set_title(detector)
        ax.set_xlabel("dataset")
        ax.set_ylabel("AP@0.1 (bar: mean over folds; points: folds)")
        ax.set_ylim(0.0, 1.0)
    # Legend entries show both the hatched bar and the fold marker of each initialisation.
    handles = [
        (
            matplotlib.patches.Patch(facecolor=palette[name], edgecolor="black",
                                     hatch=initialisation_style(name).hatch),
            matplotlib.lines.Line2D([], [], linestyle="none", marker=initialisation_style(name).marker,
                                    markerfacecolor=palette[name], markeredgecolor="black", markersize=6),
        )
        for name in inits
    ]
    fig.legend(handles=handles, labels=inits, title="initialisation", loc="center right", frameon=False,
               handler_map={tuple: matplotlib.legend_handler.HandlerTuple(ndivide=None, pad=0.4)})
    legend_fraction = LEGEND_WIDTH / fig.get_figwidth()
    fig.tight_layout(rect=(0.0, 0.0, 1.0 - legend_fraction, 1.0))
    try:
        with atomic_path(out_png) as tmp:
            fig.savefig(tmp, format="png", dpi=PNG_DPI)
        with atomic_path(out_pdf) as tmp:
            fig.savefig(tmp, format="pdf")
    finally:
        plt.close(fig)


def save_figure(fig: matplotlib.figure.Figure, out_png: str | os.PathLike, out_pdf: str | os.PathLike,
                dpi: int = PNG_DPI) -> None:
    """Save ``fig`` atomically as PNG (``dpi``) and PDF, then close it (also when saving fails).

    Example:
        >>> fig, _ = plt.subplots()
        >>> save_figure(fig, "results/figures/x.png", "results/figures/x.pdf")  # doctest: +SKIP
    """
    try:
        with atomic_path(out_png) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi)
        with atomic_path(out_pdf) as tmp:
            fig.savefig(tmp, format="pdf")
    finally:
        plt.close(fig)


def significance_stars(p_value: float, alpha: float) -> str:
    """``***`` / ``**`` / ``*`` for p below ``alpha / 50`` / ``alpha / 5`` / ``alpha`` (0.001 / 0.01 / 0.05 at the
    usual alpha), else an empty string (also for NaN).

    Example:
        >>> [significance_stars(p, 0.05) for p in (0.0005, 0.005, 0.03, 0.2, float("nan"))]
        ['***', '**', '*', '', '']
    """
    if not p_value == p_value:  # NaN: no test was run
        return ""
    for stars, level in (("***", alpha / 50), ("**", alpha / 5), ("*", alpha)):
        if p_value < level:
            return stars
    return ""
