"""The README's demo table, regenerated from a finished run instead of typed by hand.

``make demo`` writes ``results/tables/main_results.csv`` (``analysis.aggregate``: one row per detector x
initialisation x dataset with ``{metric}_mean`` / ``{metric}_std``). This module renders it as the README's table,
one row per initialisation and, per detector, AP@0.1 / mAP@0.1:0.5 / FROC@0.1, and rewrites the README between
the markers ``<!-- demo-table:start -->`` and ``<!-- demo-table:end -->``, leaving every other byte unchanged.

The block states the date of the run it shows: the newest modification time (UTC) of the run's metric files
(``results/metrics/**/*.json``), or of the CSV itself where no metric file is found, and the command that wrote it.

Example:
    python -m pretrain_det3d demo-table                       # results/tables/main_results.csv -> README.md
    python -m pretrain_det3d demo-table --print               # show the block, change nothing
"""

from __future__ import annotations

import datetime as _dt
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd

from pretrain_det3d.analysis.aggregate import SUMMARY_METRICS
from pretrain_det3d.catalog import SCRATCH
from pretrain_det3d.utils.atomic import atomic_path

START_MARKER = "<!-- demo-table:start -->"
END_MARKER = "<!-- demo-table:end -->"
#: the command the README names as the producer of the block
COMMAND = "make demo-table"
#: readable detector names for the table header; unknown detectors show their config name
DETECTOR_LABELS: dict[str, str] = {"retina_unet": "Retina U-Net", "deformable_detr": "Deformable DETR",
                                   "retina_unet_native": "Retina U-Net (nnDetection native)"}
DECIMALS = 3
REQUIRED_COLUMNS = ("detector", "initialisation", "dataset", "num_folds",
                    *(f"{metric}_mean" for metric in SUMMARY_METRICS))


class DemoTableError(ValueError):
    """The results or the README cannot give a demo table; the message names the file and the problem."""


@dataclass(frozen=True)
class RunDate:
    """When the shown run finished and how that was determined (``source`` is said in the README)."""

    date: _dt.date
    source: str


def read_main_results(path: str | os.PathLike) -> pd.DataFrame:
    """Read ``main_results.csv`` and check its columns; a clear error names the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise DemoTableError(f"{path}: no such file; run the demo first (`make demo`)")
    table = pd.read_csv(path)
    missing = [column for column in REQUIRED_COLUMNS if column not in table.columns]
    if missing:
        raise DemoTableError(f"{path}: missing columns {missing} (expected analysis.aggregate's main_results.csv)")
    if table.empty:
        raise DemoTableError(f"{path}: the table has no rows")
    return table


def _ordered(values: Iterable[str], preferred: Sequence[str] = ()) -> list[str]:
    """Unique values, those in ``preferred`` first in its order, the rest in their first-seen order."""
    seen = list(dict.fromkeys(str(v) for v in values))
    return [v for v in preferred if v in seen] + [v for v in seen if v not in preferred]


def _cell(mean: float, std: float) -> str:
    if not math.isfinite(mean):
        return "n/a"
    if math.isfinite(std):
        return f"{mean:.{DECIMALS}f} ± {std:.{DECIMALS}f}"
    return f"{mean:.{DECIMALS}f}"


#: row label of the chance level (``evaluation.chance``) under the initialisations
CHANCE_ROW = "random boxes (chance level)"


def read_chance_levels(metrics_root: str | os.PathLike | None, datasets: Sequence[str],
                       metrics: Sequence[str] = tuple(SUMMARY_METRICS)) -> dict[str, dict[str, tuple[float, float]]]:
    """Per dataset, the chance level of each metric as (mean over folds, sample std over folds; NaN for one fold),
    from ``{metrics_root}/chance/{dataset}/fold*.json``; datasets without such files are left out.

    Example:
        >>> read_chance_levels("results/metrics", ["synth_lesions"])  # doctest: +SKIP
        {'synth_lesions': {'AP_IoU_0.10_MaxDet_100': (0.012, nan), ...}}
    """
    import json

    out: dict[str, dict[str, tuple[float, float]]] = {}
    if metrics_root is None:
        return out
    for dataset in datasets:
        files = sorted((Path(metrics_root) / "chance" / dataset).glob("fold*.json"))
        if not files:
            continue
        values = {metric: [] for metric in metrics}
        for path in files:
            try:
                record = json.loads(path.read_text())
                for metric in metrics:
                    values[metric].append(float(record[metric]))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                raise DemoTableError(f"{path}: expected a chance-level record with {list(metrics)}") from None
        out[dataset] = {metric: (float(pd.Series(v).mean()), float(pd.Series(v).std()) if len(v) > 1 else math.nan)
                        for metric, v in values.items()}
    return out


def render_table(table: pd.DataFrame, initialisations: Sequence[str] = (), detectors: Sequence[str] = (),
                 metrics: dict[str, str] = SUMMARY_METRICS,
                 chance: dict[str, dict[str, tuple[float, float]]] | None = None) -> str:
    """Markdown: one row per initialisation, per detector one column per metric (the mean over folds).

    Rows and detectors follow ``initialisations`` / ``detectors`` where given, then the CSV's order (without
    ``initialisations``, ``scratch`` comes first). A cell is
    ``mean`` for one fold, ``mean ± std`` for several, ``n/a`` where undefined or absent. Several datasets give
    one table each, headed by the dataset's name. ``chance`` (``read_chance_levels``) adds a last row per dataset
    with the chance level, the same under every detector.

    Example:
        >>> t = pd.DataFrame({"detector": ["retina_unet"], "initialisation": ["scratch"], "dataset": ["d"],
        ...                   "num_folds": [1], "AP_mean": [0.25], "AP_std": [float("nan")]})
        >>> print(render_table(t, metrics={"AP": "AP@0.1"}))
        | initialisation | Retina U-Net AP@0.1 |
        | --- | ---: |
        | scratch | 0.250 |
    """
    datasets = _ordered(table["dataset"])
    detector_names = _ordered(table["detector"], detectors)
    init_names = _ordered(table["initialisation"], list(initialisations) or [SCRATCH])
    header = ["initialisation"]
    for detector in detector_names:
        labels = list(metrics.values())
        header += [f"{DETECTOR_LABELS.get(detector, detector)} {labels[0]}", *labels[1:]]
    blocks = []
    for dataset in datasets:
        rows = table[table["dataset"].astype(str) == dataset]
        lines = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
        for init in init_names:
            cells = [init]
            for detector in detector_names:
                match = rows[(rows["detector"].astype(str) == detector) & (rows["initialisation"].astype(str) == init)]
                for metric in metrics:
                    if match.empty:
                        cells.append("n/a")
                        continue
                    row = match.iloc[0]
                    std = float(row[f"{metric}_std"]) if f"{metric}_std" in row.index else float("nan")
                    cells.append(_cell(float(row[f"{metric}_mean"]), std))
            lines.append("| " + " | ".join(cells) + " |")
        if chance and dataset in chance:
            cells = [CHANCE_ROW]
            for _ in detector_names:
                cells += [_cell(*chance[dataset].get(metric, (math.nan, math.nan))) for metric in metrics]
            lines.append("| " + " | ".join(cells) + " |")
        text = "\n".join(lines)
        blocks.append(f"`{dataset}`:\n\n{text}" if len(datasets) > 1 else text)
    return "\n\n".join(blocks)


def run_date(main_results: str | os.PathLike, metrics_root: str | os.PathLike | None = None) -> RunDate:
    """Date (UTC) of the newest metric JSON under ``metrics_root``, else of ``main_results`` itself."""
    main_results = Path(main_results)
    metric_files = sorted(Path(metrics_root).rglob("*.json")) if metrics_root and Path(metrics_root).is_dir() else []
    if metric_files:
        newest = max(path.stat().st_mtime for path in metric_files)
        source = f"newest modification time of the {len(metric_files)} metric files in `{Path(metrics_root).as_posix()}`"
    else:
        newest = main_results.stat().st_mtime
        source = f"modification time of `{main_results.as_posix()}`"
    return RunDate(_dt.datetime.fromtimestamp(newest, tz=_dt.timezone.utc).date(), source)


def render_block(table: pd.DataFrame, date: RunDate, csv_name: str, initialisations: Sequence[str] = (),
                 detectors: Sequence[str] = (), chance: dict[str, dict[str, tuple[float, float]]] | None = None) -> str:
    """The README block between the markers: provenance line, then the table."""
    folds = sorted({int(n) for n in table["num_folds"].dropna()})
    fold_text = ("mean over " + "/".join(str(n) for n in folds) + " fold" + ("" if folds == [1] else "s")
                 + " per cell") if folds else "folds unknown"
    provenance = (f"Run of {date.date.isoformat()} (UTC, {date.source}); {fold_text}. "
                  f"Written by `{COMMAND}` (`python -m pretrain_det3d demo-table`) from `{csv_name}`.")
    if chance:
        provenance += (" The last row is the chance level: 100 boxes per case placed at random with training-box "
                       "sizes (`evaluation.chance`, mean of its draws).")
    return provenance + "\n\n" + render_table(table, initialisations, detectors, chance=chance)


def replace_block(text: str, block: str, name: str = "README.md") -> str:
    """``text`` with everything between the two markers replaced by ``block`` (markers kept, rest unchanged)."""
    starts, ends = text.count(START_MARKER), text.count(END_MARKER)
    if starts != 1 or ends != 1:
        raise DemoTableError(
            f"{name}: needs exactly one `{START_MARKER}` and one `{END_MARKER}` line around the demo table "
            f"(found {starts} start and {ends} end markers)"
        )
    start = text.index(START_MARKER) + len(START_MARKER)
    end = text.index(END_MARKER)
    if end < start:
        raise DemoTableError(f"{name}: `{END_MARKER}` comes before `{START_MARKER}`")
    return text[:start] + "\n" + block.strip("\n") + "\n" + text[end:]


def update_readme(readme: str | os.PathLike, block: str) -> bool:
    """Rewrite ``readme``'s marked block (atomically); returns whether the file changed."""
    readme = Path(readme)
    if not readme.is_file():
        raise DemoTableError(f"{readme}: no such file")
    old = readme.read_text(encoding="utf-8")
    new = replace_block(old, block, str(readme))
    if new == old:
        return False
    with atomic_path(readme) as tmp:
        tmp.write_text(new, encoding="utf-8")
    return True


def study_order(config_path: str | os.PathLike | None) -> tuple[list[str], list[str]]:
    """Initialisations and detectors in the order of a study config's ``study:`` (empty where not given)."""
    if config_path is None or not Path(config_path).is_file():
        return [], []
    import yaml

    study = (yaml.safe_load(Path(config_path).read_text()) or {}).get("study", {}) or {}
    return [str(v) for v in study.get("initialisations", [])], [str(v) for v in study.get("detectors", [])]


def write_demo_table(main_results: str | os.PathLike = "results/tables/main_results.csv",
                     readme: str | os.PathLike = "README.md",
                     metrics_root: str | os.PathLike | None = "results/metrics",
                     config: str | os.PathLike | None = "config/config.yaml",
                     date: _dt.date | None = None, dry_run: bool = False) -> str:
    """Render the block from ``main_results`` and write it into ``readme`` (unless ``dry_run``); return it.

    ``date`` overrides the run date (then stated as given on the command line).
    """
    table = read_main_results(main_results)
    when = RunDate(date, "given on the command line") if date is not None else run_date(main_results, metrics_root)
    initialisations, detectors = study_order(config)
    chance = read_chance_levels(metrics_root, _ordered(table["dataset"]))
    block = render_block(table, when, Path(main_results).as_posix(), initialisations, detectors, chance)
    if not dry_run:
        update_readme(readme, block)
    return block
