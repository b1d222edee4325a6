"""The learning curve of one fine-tuning run: its training losses per iteration, and its validation AP.

Inputs are what the run already writes: the trainer's per-iteration log (``log.csv`` beside ``model_final.pth``:
``iteration``, ``lr``, ``loss`` and one column per loss term, ``seconds``) and the run's evaluation
(``results/metrics/{arch}/{init}/{dataset}/fold{fold}.json``). Validation AP is known at the end of training
only (the trainer keeps one rolling checkpoint, so intermediate validation would mean extra inference jobs); the
figure marks it beside the curve rather than inventing intermediate points.

Left panel: the total loss per iteration (faint) and its moving average; right panel: the moving average of each
loss term (log scale when all are positive), with the learning rate on a second axis.

Example:
    >>> plot_learning_curve("results/finetune/retina_unet/scratch/demo/fold0/log.csv",
    ...                     "results/metrics/retina_unet/scratch/demo/fold0.json",
    ...                     "results/figures/learning_curves/retina_unet/scratch/demo/fold0.png")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from pretrain_det3d.analysis.tables import MAIN_METRIC, AnalysisInputError  # noqa: E402
from pretrain_det3d.utils.atomic import atomic_path  # noqa: E402

#: Columns of the trainer's log that are not loss terms.
NON_LOSS_COLUMNS = ("iteration", "lr", "seconds")
#: The moving average spans this share of the run (at least one iteration).
SMOOTHING_FRACTION = 0.05
PNG_DPI = 120


def moving_average(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing mean over the last ``window`` values (fewer at the start), so the curve starts at iteration 0.

    Example:
        >>> moving_average([1.0, 2.0, 3.0, 4.0], 2).tolist()
        [1.0, 1.5, 2.5, 3.5]
    """
    array = np.asarray(values, dtype=np.float64)
    if window < 1:
        raise ValueError(f"window must be at least 1, got {window}")
    sums = np.cumsum(np.r_[0.0, array])
    ends = np.arange(1, len(array) + 1)
    starts = np.maximum(ends - window, 0)
    return (sums[ends] - sums[starts]) / (ends - starts)


def read_training_log(log_csv: str | os.PathLike) -> pd.DataFrame:
    """The trainer's log as a table; a missing file or one without ``iteration`` and ``loss`` columns is an
    error naming the file."""
    path = Path(log_csv)
    if not path.is_file():
        raise AnalysisInputError(f"{path}: training log not found (written by the finetune rule)")
    try:
        table = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise AnalysisInputError(f"{path}: not a readable CSV ({error})") from None
    missing = [column for column in ("iteration", "loss") if column not in table.columns]
    if missing or table.empty:
        raise AnalysisInputError(f"{path}: a training log needs rows with columns iteration and loss "
                                 f"(missing: {missing or 'rows'})")
    return table.sort_values("iteration").reset_index(drop=True)


def final_validation_ap(metrics_json: str | os.PathLike | None, metric: str = MAIN_METRIC) -> float | None:
    """``metric`` of the run's evaluation, or None without a file (nnDetection's -1, no ground truth, is None)."""
    if metrics_json is None:
        return None
    path = Path(metrics_json)
    try:
        value = float(json.loads(path.read_text())[metric])
    except FileNotFoundError:
        raise AnalysisInputError(f"{path}: metrics file not found") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise AnalysisInputError(f"{path}: has no numeric {metric!r}") from None
    return None if value < 0 else value


def plot_learning_curve(log_csv: str | os.PathLike, metrics_json: str | os.PathLike | None,
                        out_png: str | os.PathLike, title: str | None = None) -> None:
    """Draw the run's learning curve (see the module docstring) into ``out_png``, atomically."""
    table = read_training_log(log_csv)
    ap = final_validation_ap(metrics_json)
    iterations = table["iteration"].to_numpy()
    window = max(1, int(round(SMOOTHING_FRACTION * len(table))))
    terms = [c for c in table.columns if c not in NON_LOSS_COLUMNS and c != "loss"
             and pd.api.types.is_numeric_dtype(table[c])]

    figure, (left, right) = plt.subplots(1, 2, figsize=(9.0, 3.4))
    left.plot(iterations, table["loss"], color="0.75", linewidth=0.6, label="per iteration")
    left.plot(iterations, moving_average(table["loss"], window), color="C0", linewidth=1.6,
              label=f"moving average ({window} it.)")
    left.set_xlabel("iteration")
    left.set_ylabel("training loss")
    left.legend(fontsize=7, loc="upper right")
    if ap is not None:
        left.annotate(f"validation AP@0.1 at the end: {ap:.3f}", xy=(0.02, 0.04), xycoords="axes fraction",
                      fontsize=8)
    for index, term in enumerate(terms):
        right.plot(iterations, moving_average(table[term].fillna(0.0), window), linewidth=1.2,
                   color=f"C{(index + 1) % 10}", label=term)
    if terms and (table[terms] > 0).all().all():
        right.set_yscale("log")
    right.set_xlabel("iteration")
    right.set_ylabel("loss terms (moving average)")
    if terms:
        right.legend(fontsize=7, loc="upper right", ncol=2)
    if "lr" in table.columns:
        lr_axis = right.twinx()
        lr_axis.plot(iterations, table["lr"], color="0.4", linestyle=":", linewidth=1.0)
        lr_axis.set_ylabel("learning rate (dotted)", fontsize=8)
        lr_axis.tick_params(labelsize=7)
    figure.suptitle(title or str(Path(log_csv).parent), fontsize=9)
    figure.tight_layout()
    try:
        with atomic_path(Path(out_png)) as tmp:
            figure.savefig(tmp, format="png", dpi=PNG_DPI)
    finally:
        plt.close(figure)
