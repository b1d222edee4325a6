"""Label-efficiency curves: AP@0.1 against the number of labelled training cases, and the labels pre-training saves.

Inputs (``workflow/rules/label_fractions.smk``): the runs of one or more (detector, dataset) pairs at every label
fraction of the study (``data.label_fractions``), as a tidy table with the columns of the per-run table plus
``fraction`` and ``num_train_cases`` (:func:`fraction_runs_table`), and their consolidated validation predictions
``{predictions_root}/{detector}/{initialisation}/{dataset}/{segment}fold{fold}/`` (``segment``: ``""`` at fraction 1,
``fraction0.25/`` below).

The statistic is the one of the report's case bootstrap (``analysis.case_ap``): AP@0.1 over the validation cases
of all of the study's folds pooled (every case is predicted once, by the fold that held it out; the validation
cases are the whole fold at every fraction, so every point of a curve is measured on the same cases).

- **curve**: per initialisation and fraction, that AP and its percentile interval over ``n_resamples`` case
  resamples; the resamples of a dataset are shared by every initialisation and fraction (seed
  ``bootstrap.dataset_seed``), so the curves, and the comparison below, are paired;
- **x axis**: the number of labelled training cases of a fraction, the mean over the study's folds of the subset
  sizes (``num_train_cases``);
- **labels saved** (:func:`matching_cases`): the *target* is scratch's AP at fraction 1; an initialisation matches
  it at the first point where its curve reaches the target, interpolated linearly in log(cases) between the last
  point below and the first point at or above (the figure's log axis draws the curve as those straight lines).
  Already at or above the target at the smallest fraction: "at most" that many cases (nothing below is measured);
  below it at every fraction: "not reached". The fraction of labels needed is those cases over the cases at
  fraction 1; the saved cases are the difference. Its interval: the same computation on every resample (target
  and curve from the same resampled cases), its percentiles taken as order statistics (``inverted_cdf``), since a
  resample that does not reach the target has no number; an upper end on such a resample reads "not reached".
  Resamples without any ground truth (AP undefined) are left out.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from pretrain_det3d.analysis.bootstrap import CaseStatistic, dataset_seed, evaluate_resamples, percentile_interval, \
    resample_indices
from pretrain_det3d.analysis.tables import BASELINE_INITIALISATION, MAIN_METRIC, RUN_KEYS, AnalysisInputError, \
    require_columns
from pretrain_det3d.utils.atomic import atomic_path

#: Columns of the label-fraction run table (tidy, one row per run and scalar metric).
FRACTION_RUN_COLUMNS: tuple[str, ...] = (*RUN_KEYS, "fraction", "num_train_cases", "metric", "value")
#: ``matching_cases`` outcomes.
INTERPOLATED, AT_MOST, NOT_REACHED = "interpolated", "at most", "not reached"
#: Columns of the curve table and of the labels-saved table.
CURVE_COLUMNS: tuple[str, ...] = ("detector", "dataset", "initialisation", "fraction", "num_cases", "ap", "ci_low",
                                  "ci_high")
SAVED_COLUMNS: tuple[str, ...] = ("detector", "dataset", "initialisation", "target_ap", "cases_full", "match",
                                  "cases_needed", "fraction_needed", "fraction_ci_low", "fraction_ci_high",
                                  "cases_saved")
#: Decimals in the Markdown table.
DECIMALS = 3


# ---- the run table ---------------------------------------------------------------------------------------------


def _json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise AnalysisInputError(f"{path}: {what} not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise AnalysisInputError(f"{path}: {what} is not valid JSON ({error})") from None


def train_case_count(path: str | os.PathLike, fold: int) -> int:
    """Training cases of a run: the ``train`` list of a subset file (``{"fold": k, "train": [...]}``) or of fold
    ``fold`` of a splits file (a list of folds).

    Example:
        >>> train_case_count("results/data/preprocessed/demo/splits.json", 0)  # doctest: +SKIP
        12
    """
    path = Path(path)
    record = _json(path, "training cases file")
    try:
        if isinstance(record, list):
            return len(record[int(fold)]["train"])
        if int(record["fold"]) != int(fold):
            raise AnalysisInputError(f"{path}: written for fold {record['fold']}, not fold {fold}")
        return len(record["train"])
    except (IndexError, KeyError, TypeError, ValueError) as error:
        raise AnalysisInputError(f"{path}: no 'train' list of fold {fold} ({error})") from None


def fraction_runs_table(entries: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """The label-fraction run table from ``entries``: each with ``detector, initialisation, dataset, fold,
    fraction``, ``metrics`` (the run's metric JSON) and ``train_cases`` (its subset file, or the splits file at
    fraction 1). Columns ``FRACTION_RUN_COLUMNS``; one row per scalar metric.

    Example:
        >>> fraction_runs_table([{"detector": "retina_unet", "initialisation": "scratch", "dataset": "demo",
        ...     "fold": 0, "fraction": 1.0, "metrics": "results/metrics/retina_unet/scratch/demo/fold0.json",
        ...     "train_cases": "results/data/preprocessed/demo/splits.json"}])  # doctest: +SKIP
    """
    from pretrain_det3d.analysis.aggregate import MetricFileError, read_metric_file

    rows = []
    for entry in entries:
        missing = [k for k in (*RUN_KEYS, "fraction", "metrics", "train_cases") if k not in entry]
        if missing:
            raise AnalysisInputError(f"label-fraction run entry {dict(entry)}: missing {missing}")
        try:
            metrics = read_metric_file(entry["metrics"])
        except MetricFileError as error:
            raise AnalysisInputError(str(error)) from None
        cases = train_case_count(entry["train_cases"], int(entry["fold"]))
        for metric, value in sorted(metrics.items()):
            rows.append({"detector": str(entry["detector"]), "initialisation": str(entry["initialisation"]),
                         "dataset": str(entry["dataset"]), "fold": int(entry["fold"]),
                         "fraction": float(entry["fraction"]), "num_train_cases": cases, "metric": metric,
                         "value": value})
    if not rows:
        raise AnalysisInputError("label-fraction run table: no runs")
    return pd.DataFrame(rows, columns=list(FRACTION_RUN_COLUMNS))


def write_fraction_runs(entries: Sequence[Mapping[str, Any]], out_csv: str | os.PathLike) -> None:
    """:func:`fraction_runs_table` written as CSV, atomically."""
    table = fraction_runs_table(entries)
    with atomic_path(out_csv) as tmp:
        table.to_csv(tmp, index=False)


# ---- matching scratch at 100 % ---------------------------------------------------------------------------------


def matching_cases(num_cases: Sequence[float], values: Sequence[float], target: float) -> tuple[float, str]:
    """Where a curve first reaches ``target``: ``(cases, outcome)`` (see the module docstring).

    ``num_cases`` must increase; the interpolation is linear in log(cases) between the last point below the
    target and the first at or above it. ``(num_cases[0], "at most")`` when the first point already reaches it,
    ``(inf, "not reached")`` when no point does.

    Example:
        >>> # AP 0.30 with 10 cases, 0.50 with 40: the target 0.40 lies half-way in log(cases), at 20 cases
        >>> cases, outcome = matching_cases([10, 40, 100], [0.30, 0.50, 0.60], 0.40)
        >>> round(cases, 6), outcome
        (20.0, 'interpolated')
        >>> matching_cases([10, 40], [0.5, 0.6], 0.4), matching_cases([10, 40], [0.1, 0.2], 0.4)
        ((10.0, 'at most'), (inf, 'not reached'))
    """
    x = np.asarray(num_cases, dtype=np.float64)
    y = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape or x.size == 0:
        raise ValueError("num_cases and values must be 1-D of the same, non-zero length")
    if np.any(x <= 0) or np.any(np.diff(x) < 0):
        raise ValueError(f"num_cases must be positive and non-decreasing, got {x.tolist()}")
    reached = np.flatnonzero(y >= target)
    if reached.size == 0:
        return math.inf, NOT_REACHED
    k = int(reached[0])
    if k == 0:
        return float(x[0]), AT_MOST
    below, above = y[k - 1], y[k]
    if x[k] == x[k - 1]:
        return float(x[k]), INTERPOLATED
    t = (target - below) / (above - below)
    return float(math.exp(math.log(x[k - 1]) + t * (math.log(x[k]) - math.log(x[k - 1])))), INTERPOLATED


# ---- curves with bootstrap bands -------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelEfficiency:
    """The curves of one (detector, dataset): ``estimate[i, f]`` is initialisation ``i``'s AP at fraction ``f`` on
    all cases, ``draws[b, i, f]`` the same on resample ``b``; ``num_cases[f]`` the mean training cases per fold."""

    detector: str
    dataset: str
    initialisations: tuple[str, ...]
    fractions: np.ndarray
    num_cases: np.ndarray
    estimate: np.ndarray
    draws: np.ndarray
    confidence: float

    def curves(self) -> pd.DataFrame:
        """One row per initialisation and fraction (``CURVE_COLUMNS``)."""
        rows = []
        for i, name in enumerate(self.initialisations):
            for f, fraction in enumerate(self.fractions):
                low, high = percentile_interval(self.draws[:, i, f], self.confidence)
                rows.append((self.detector, self.dataset, name, float(fraction), float(self.num_cases[f]),
                             float(self.estimate[i, f]), low, high))
        return pd.DataFrame(rows, columns=list(CURVE_COLUMNS))

    def labels_saved(self, baseline: str = BASELINE_INITIALISATION) -> pd.DataFrame:
        """One row per initialisation (``SAVED_COLUMNS``): where it matches ``baseline`` at fraction 1."""
        if baseline not in self.initialisations:
            raise AnalysisInputError(f"{self.detector}/{self.dataset}: no {baseline!r} runs to compare with")
        if not math.isclose(float(self.fractions[-1]), 1.0):
            raise AnalysisInputError(f"{self.detector}/{self.dataset}: no runs at fraction 1 (fractions "
                                     f"{self.fractions.tolist()})")
        b = self.initialisations.index(baseline)
        full = float(self.num_cases[-1])
        target = float(self.estimate[b, -1])
        alpha = (1.0 - self.confidence) / 2.0
        rows = []
        for i, name in enumerate(self.initialisations):
            cases, match = matching_cases(self.num_cases, self.estimate[i], target)
            drawn = []
            for draw in self.draws:
                if np.isnan(draw[b, -1]) or np.isnan(draw[i]).any():
                    continue  # a resample without ground truth: AP undefined
                drawn.append(matching_cases(self.num_cases, draw[i], draw[b, -1])[0] / full)
            if drawn:
                low, high = (float(q) for q in np.quantile(drawn, [alpha, 1.0 - alpha], method="inverted_cdf"))
            else:
                low, high = math.nan, math.nan
            saved = full - cases if match != NOT_REACHED else math.nan
            rows.append((self.detector, self.dataset, name, target, full, match, cases, cases / full, low, high,
                         saved))
        return pd.DataFrame(rows, columns=list(SAVED_COLUMNS))


def _prediction_folder(root: Path, detector: str, initialisation: str, dataset: str, fraction: float,
                       fold: int) -> Path:
    from pretrain_det3d.data.label_fractions import fraction_segment

    return root / detector / initialisation / dataset / f"{fraction_segment(fraction)}fold{int(fold)}"


def case_statistics(runs: pd.DataFrame, predictions_root: str | os.PathLike, converted_root: str | os.PathLike,
                    ) -> tuple[dict[str, list[str]], dict[tuple[str, str, str, float], CaseStatistic]]:
    """Cases per dataset and the case-level AP statistic per (detector, dataset, initialisation, fraction), from the
    predictions of the runs in ``runs`` (pooled over folds; every group must cover its dataset's same cases).

    Example:
        >>> cases, stats = case_statistics(runs, "results/predictions", "results/data/converted")  # doctest: +SKIP
    """
    from pretrain_det3d.analysis.case_ap import _prediction_cases, ap_statistic, match_cases
    from pretrain_det3d.evaluation.run import load_ground_truth, load_prediction, read_class_ids

    require_columns(runs, (*RUN_KEYS, "fraction"), "label-fraction run table")
    predictions_root, converted_root = Path(predictions_root), Path(converted_root)
    groups: dict[tuple[str, str, str, float], dict[str, Path]] = {}
    keys = runs[[*RUN_KEYS, "fraction"]].drop_duplicates()
    for detector, initialisation, dataset, fold, fraction in keys.itertuples(index=False):
        folder = _prediction_folder(predictions_root, str(detector), str(initialisation), str(dataset),
                                    float(fraction), int(fold))
        cases = groups.setdefault((str(detector), str(dataset), str(initialisation), float(fraction)), {})
        for case in _prediction_cases(folder):
            if case in cases:
                raise AnalysisInputError(f"{folder}: case {case!r} is also predicted in {cases[case]}")
            cases[case] = folder
    case_ids: dict[str, list[str]] = {}
    for (detector, dataset, initialisation, fraction), cases in sorted(groups.items()):
        reference = case_ids.setdefault(dataset, sorted(cases))
        if sorted(cases) != reference or not cases:
            difference = sorted(set(cases) ^ set(reference))[:5]
            raise AnalysisInputError(f"{predictions_root / detector / initialisation / dataset} at fraction "
                                     f"{fraction:g}: predicts other cases than the dataset's other runs "
                                     f"(differing: {difference}), so the curves would not be paired")
    statistics = {}
    for dataset, cases in case_ids.items():
        class_ids = read_class_ids(converted_root / dataset)
        truth = {case: load_ground_truth(converted_root / dataset, case) for case in cases}
        for key, folder_of in groups.items():
            if key[1] == dataset:
                predictions = {case: load_prediction(folder_of[case], case) for case in cases}
                statistics[key] = ap_statistic(match_cases(truth, predictions, class_ids), class_ids)
    return case_ids, statistics


def label_efficiency(runs: pd.DataFrame, case_ids: Mapping[str, Sequence[str]],
                     statistics: Mapping[tuple[str, str, str, float], CaseStatistic], n_resamples: int,
                     confidence: float, seed: int) -> list[LabelEfficiency]:
    """The curves of every (detector, dataset) of ``runs`` (columns ``FRACTION_RUN_COLUMNS`` less the metric
    ones), with ``statistics[(detector, dataset, initialisation, fraction)]`` over ``case_ids[dataset]``.

    Every initialisation of a pair must have run at every fraction of the pair (the curves are paired).

    Example:
        >>> effs = label_efficiency(runs, *case_statistics(runs, preds, converted), 1000, 0.95, 0)  # doctest: +SKIP
    """
    from pretrain_det3d.analysis.figures import initialisation_order

    require_columns(runs, (*RUN_KEYS, "fraction", "num_train_cases"), "label-fraction run table")
    runs = runs.drop_duplicates([*RUN_KEYS, "fraction"])
    result = []
    for (detector, dataset), pair in runs.groupby(["detector", "dataset"], sort=True):
        detector, dataset = str(detector), str(dataset)
        fractions = np.array(sorted(pair["fraction"].astype(float).unique()))
        inits = tuple(initialisation_order(pair["initialisation"].astype(str).unique().tolist()))
        for name in inits:
            have = set(pair.loc[pair["initialisation"] == name, "fraction"].astype(float))
            if have != set(fractions):
                raise AnalysisInputError(f"{detector}/{name}/{dataset}: runs at fractions {sorted(have)}, the pair "
                                         f"has {fractions.tolist()}")
        sizes = pair.drop_duplicates(["fold", "fraction"]).groupby("fraction")["num_train_cases"].mean()
        num_cases = sizes.reindex(fractions).to_numpy(dtype=np.float64)
        cases = list(case_ids[dataset])
        columns = [statistics[(detector, dataset, name, float(f))] for name in inits for f in fractions]
        estimate = np.array([stat(cases) for stat in columns]).reshape(len(inits), len(fractions))
        indices = resample_indices(len(cases), n_resamples, dataset_seed(seed, dataset))
        draws = evaluate_resamples(cases, columns, indices, description=f"label efficiency {detector}/{dataset}")
        result.append(LabelEfficiency(detector, dataset, inits, fractions, num_cases, estimate,
                                      draws.reshape(n_resamples, len(inits), len(fractions)), confidence))
    if not result:
        raise AnalysisInputError("label-fraction run table: no runs")
    return result


# ---- outputs ---------------------------------------------------------------------------------------------------


def labels_saved_markdown(table: pd.DataFrame) -> str:
    """The labels-saved table as Markdown: cases and fraction of labels needed to match scratch at 100 %.

    Example:
        >>> t = pd.DataFrame([("d", "x", "mae", 0.5, 20.0, "interpolated", 10.0, 0.5, 0.3, float("inf"), 10.0)],
        ...                  columns=SAVED_COLUMNS)
        >>> labels_saved_markdown(t).splitlines()[-1]
        '| d | x | mae | 0.500 | 10.0 of 20 (50.0 %) | 30.0 % - not reached | 10.0 |'
    """
    require_columns(table, SAVED_COLUMNS, "labels-saved table")
    lines = ["| detector | dataset | initialisation | scratch AP@0.1 at 100 % | labelled cases to match it | "
             "interval (fraction of labels) | cases saved |",
             "|---|---|---|---|---|---|---|"]

    def share(value: float) -> str:
        return "not reached" if not math.isfinite(value) or value > 1.0 else f"{100 * value:.1f} %"

    for row in table.itertuples(index=False):
        if row.match == NOT_REACHED:
            needed, saved = "not reached", "-"
        else:
            prefix = "at most " if row.match == AT_MOST else ""
            needed = f"{prefix}{row.cases_needed:.1f} of {row.cases_full:g} ({100 * row.fraction_needed:.1f} %)"
            saved = f"{prefix.replace('at most', 'at least')}{row.cases_saved:.1f}"
        if math.isnan(row.fraction_ci_low):
            interval = "n/a"
        elif not math.isfinite(row.fraction_ci_low):
            interval = "not reached"
        else:
            interval = f"{share(row.fraction_ci_low)} - {share(row.fraction_ci_high)}"
        lines.append(f"| {row.detector} | {row.dataset} | {row.initialisation} | {row.target_ap:.{DECIMALS}f} | "
                     f"{needed} | {interval} | {saved} |")
    return "\n".join(lines)


def write_labels_saved(effs: Sequence[LabelEfficiency], out_csv: str | os.PathLike | None,
                       out_md: str | os.PathLike | None) -> pd.DataFrame:
    """The labels-saved table of every pair, as CSV and Markdown (atomically); returns it."""
    table = pd.concat([eff.labels_saved() for eff in effs], ignore_index=True)
    if out_csv is not None:
        with atomic_path(out_csv) as tmp:
            table.to_csv(tmp, index=False)
    if out_md is not None:
        with atomic_path(out_md) as tmp:
            tmp.write_text(labels_saved_markdown(table) + "\n")
    return table


def plot_label_efficiency(effs: Sequence[LabelEfficiency], out_png: str | os.PathLike,
                          out_pdf: str | os.PathLike) -> None:
    """One panel per (detector, dataset): AP@0.1 against labelled training cases (log axis), a line per
    initialisation with its bootstrap band, scratch at 100 % as a dashed line; PNG + PDF, atomically.

    Example:
        >>> plot_label_efficiency(effs, "label_efficiency.png", "label_efficiency.pdf")  # doctest: +SKIP
    """
    import matplotlib.pyplot as plt
    import seaborn as sns

    from pretrain_det3d.analysis.figures import LEGEND_WIDTH, initialisation_style, save_figure

    if not effs:
        raise AnalysisInputError("label efficiency: nothing to plot")
    sns.set_theme(style="whitegrid", context="paper")
    columns = min(3, len(effs))
    rows = math.ceil(len(effs) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns + LEGEND_WIDTH, 3.6 * rows), squeeze=False)
    names: list[str] = []
    for index, eff in enumerate(effs):
        ax = axes[index // columns][index % columns]
        curves = eff.curves()
        for name in eff.initialisations:
            style = initialisation_style(name)
            line = curves[curves["initialisation"] == name]
            ax.fill_between(line["num_cases"], line["ci_low"], line["ci_high"], color=style.colour, alpha=0.15,
                            linewidth=0)
            ax.plot(line["num_cases"], line["ap"], color=style.colour, marker=style.marker, markeredgecolor="black",
                    markeredgewidth=0.6, markersize=5, linewidth=1.4, label=name)
            if name not in names:
                names.append(name)
        if BASELINE_INITIALISATION in eff.initialisations:
            target = eff.estimate[eff.initialisations.index(BASELINE_INITIALISATION), -1]
            ax.axhline(target, color=initialisation_style(BASELINE_INITIALISATION).colour, linestyle="--",
                       linewidth=0.9)
        ax.set_xscale("log")
        ticks = np.unique(eff.num_cases)
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{t:.3g}" for t in ticks], fontsize=7)
        ax.minorticks_off()
        ax.set_ylim(-0.03, 1.03)
        ax.set_title(f"{eff.detector} / {eff.dataset}", fontsize=9)
        ax.set_xlabel("labelled training cases per fold")
        ax.set_ylabel(f"{MAIN_METRIC.split('_MaxDet')[0].replace('_IoU_', '@')} (folds pooled)")
    for index in range(len(effs), rows * columns):
        axes[index // columns][index % columns].set_visible(False)
    handles = [plt.Line2D([], [], color=initialisation_style(n).colour, marker=initialisation_style(n).marker,
                          markeredgecolor="black", markeredgewidth=0.6, linewidth=1.4) for n in names]
    labels = list(names)
    if BASELINE_INITIALISATION in names:
        handles.append(plt.Line2D([], [], color=initialisation_style(BASELINE_INITIALISATION).colour, linestyle="--"))
        labels.append(f"{BASELINE_INITIALISATION} at 100 %")
    fig.legend(handles, labels, title="initialisation", loc="center right", frameon=False)
    fig.tight_layout(rect=(0.0, 0.0, 1.0 - LEGEND_WIDTH / fig.get_figwidth(), 1.0))
    save_figure(fig, out_png, out_pdf)
