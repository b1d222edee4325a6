"""FROC curves at IoU 0.1: sensitivity against false positives per scan, averaged over folds.

One panel per detector (rows) and dataset (columns), one line per initialisation in its fixed colour and marker
(``figures.initialisation_style``), so the lines stay apart in greyscale. The curve of a run is nnDetection's
``FROC_curve_IoU_0.10`` read at ``FROC_fpi_thresholds`` (1/8 ... 8 FP per scan, log-2 axis); the line is the mean
over folds at each rate.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from pretrain_det3d.analysis.aggregate import MetricFile, MetricFileError
from pretrain_det3d.analysis.figures import initialisation_order, initialisation_style, save_figure
from pretrain_det3d.analysis.tables import AnalysisInputError, require_columns

#: Keys of the metric JSON that hold the curve and its FP-per-scan rates.
FROC_CURVE_KEY = "FROC_curve_IoU_0.10"
FROC_RATES_KEY = "FROC_fpi_thresholds"
#: Columns of ``read_froc_curves``'s table.
FROC_COLUMNS = ("detector", "initialisation", "dataset", "fold", "fp_per_scan", "sensitivity")
#: Inches per panel.
PANEL_SIZE = (2.8, 2.4)
LEGEND_WIDTH = 1.8


def read_froc_curves(metric_files: Sequence[MetricFile], curve_key: str = FROC_CURVE_KEY) -> pd.DataFrame:
    """Tidy FROC points of every run, ``FROC_COLUMNS``, from ``(arch, init, dataset, fold, path)`` entries.

    A curve of ``-1`` values (no ground truth in the fold) is an error naming the file.

    Example:
        >>> read_froc_curves([("retina_unet", "scratch", "demo", 0, "fold0.json")])  # doctest: +SKIP
    """
    rows = []
    for detector, initialisation, dataset, fold, path in metric_files:
        path = Path(path)
        if not path.is_file():
            raise MetricFileError(f"{path}: metric file not found")
        try:
            record = json.loads(path.read_text())
            curve = np.asarray(record[curve_key], dtype=float)
            rates = np.asarray(record[FROC_RATES_KEY], dtype=float)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise MetricFileError(f"{path}: expected lists {curve_key!r} and {FROC_RATES_KEY!r} ({error!r})") from error
        if curve.ndim != 1 or curve.shape != rates.shape or curve.size == 0:
            raise MetricFileError(f"{path}: {curve_key!r} has {curve.size} values but {FROC_RATES_KEY!r} "
                                  f"{rates.size}")
        if np.any(curve < 0) or not np.all(np.isfinite(curve)):
            raise MetricFileError(f"{path}: {curve_key!r} is undefined (-1: no ground truth) or not finite")
        for rate, sensitivity in zip(rates, curve):
            rows.append({"detector": str(detector), "initialisation": str(initialisation), "dataset": str(dataset),
                         "fold": int(fold), "fp_per_scan": float(rate), "sensitivity": float(sensitivity)})
    if not rows:
        raise AnalysisInputError("FROC curves: no metric files given")
    return pd.DataFrame(rows, columns=list(FROC_COLUMNS))


def froc_figure_size(num_detectors: int, num_datasets: int) -> tuple[float, float]:
    """Figure size in inches of ``plot_froc_curves``.

    Example:
        >>> froc_figure_size(2, 3)
        (10.2, 4.8)
    """
    return (round(num_datasets * PANEL_SIZE[0] + LEGEND_WIDTH, 6), round(num_detectors * PANEL_SIZE[1], 6))


def plot_froc_curves(curves: pd.DataFrame, out_png: str | os.PathLike, out_pdf: str | os.PathLike) -> None:
    """Mean FROC curve over folds per detector, dataset and initialisation; PNG + PDF, atomically.

    Example:
        >>> plot_froc_curves(read_froc_curves(files), "froc.png", "froc.pdf")  # doctest: +SKIP
    """
    require_columns(curves, FROC_COLUMNS, "FROC table")
    if curves.empty:
        raise AnalysisInputError("FROC table: no points to plot")
    curves = curves.astype({"detector": str, "dataset": str, "initialisation": str})
    mean = curves.groupby(["detector", "dataset", "initialisation", "fp_per_scan"], sort=True)["sensitivity"].mean()
    mean = mean.reset_index()
    detectors = sorted(mean["detector"].unique())
    datasets = sorted(mean["dataset"].unique())
    inits = initialisation_order(mean["initialisation"].unique().tolist())
    rates = sorted(mean["fp_per_scan"].unique())

    sns.set_theme(style="whitegrid", context="paper")
    fig, axes = plt.subplots(len(detectors), len(datasets), figsize=froc_figure_size(len(detectors), len(datasets)),
                             sharex=True, sharey=True, squeeze=False)
    for row, detector in enumerate(detectors):
        for column, dataset in enumerate(datasets):
            ax = axes[row][column]
            panel = mean[(mean["detector"] == detector) & (mean["dataset"] == dataset)]
            for name in inits:
                line = panel[panel["initialisation"] == name]
                if line.empty:
                    continue
                style = initialisation_style(name)
                ax.plot(line["fp_per_scan"], line["sensitivity"], color=style.colour, marker=style.marker,
                        markeredgecolor="black", markeredgewidth=0.6, markersize=5, linewidth=1.4, label=name)
            ax.set_xscale("log", base=2)
            ax.set_xticks(rates)
            ax.set_xticklabels([f"1/{round(1 / r)}" if r < 1 else f"{r:g}" for r in rates], fontsize=7)
            ax.set_ylim(-0.03, 1.03)  # markers at 0 and 1 stay whole
            ax.set_title(f"{detector} / {dataset}", fontsize=9)
            if row == len(detectors) - 1:
                ax.set_xlabel("false positives per scan")
            if column == 0:
                ax.set_ylabel("sensitivity (mean over folds)")
    handles = [plt.Line2D([], [], color=initialisation_style(n).colour, marker=initialisation_style(n).marker,
                          markeredgecolor="black", markeredgewidth=0.6, linewidth=1.4) for n in inits]
    fig.legend(handles, inits, title="initialisation", loc="center right", frameon=False)
    fig.tight_layout(rect=(0.0, 0.0, 1.0 - LEGEND_WIDTH / fig.get_figwidth(), 1.0))
    save_figure(fig, out_png, out_pdf)
