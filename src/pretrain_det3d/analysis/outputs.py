"""One entry point per report output: ``make_figure(name, ...)`` and ``make_table(name, ...)`` over named registries.

Each figure and table is registered under a name (``FIGURES``, ``TABLES``) with the inputs it needs, so the
workflow has one rule per output and the CLI one verb per kind (``figure``, ``table``). Inputs are the finished
products of the evaluation stage, never of training, so regenerating an output re-runs no training job:

- ``runs_csv``: the per-run table ``results/tables/runs.csv`` (``aggregate.run_aggregation``);
- ``metrics_root``: ``results/metrics`` holding ``{arch}/{init}/{dataset}/fold{fold}.json`` for the runs of
  ``runs_csv`` (the FROC curves);
- ``predictions_root`` + ``converted_root``: ``results/predictions`` (``{arch}/{init}/{dataset}/fold{fold}/``) and
  ``{data}/converted`` (``{dataset}/labelsTr``, ``dataset.json``), for the case-level AP bootstrap
  (``case_ap.case_ap_data``).

Outputs needing the bootstrap say so in ``case_level``: "required" (rank distribution) or "optional" (tests,
change heat map, significance map: with ``test="auto"`` they use the bootstrap when the prediction and converted
roots are given and the Wilcoxon test over folds otherwise).

Statistics settings (``StatisticsSettings``, the CLI's ``--settings`` JSON): ``n_resamples`` (1000), ``seed`` (0),
``alpha`` (0.05), ``confidence`` (0.95), ``test`` ("auto", "wilcoxon", "bootstrap"), ``metric``
(``AP_IoU_0.10_MaxDet_100``; the bootstrap statistic is always case-level AP@0.1).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import pandas as pd

from pretrain_det3d.analysis.case_level import CaseLevelData
from pretrain_det3d.analysis.tables import RUN_KEYS, AnalysisInputError
from pretrain_det3d.settings.base import ConfigError
from pretrain_det3d.settings.study import StatisticsSettings as StatisticsSettingsBase
from pretrain_det3d.utils.registry import Registry

#: Choices of ``OutputSpec.case_level``.
CASE_LEVEL_CHOICES = ("none", "optional", "required")


class StatisticsSettings(StatisticsSettingsBase):
    """Knobs of the statistics behind the figures and tables (see the module docstring)."""

    @classmethod
    def from_mapping(cls, settings: Mapping[str, Any] | None) -> "StatisticsSettings":
        """Settings from a JSON object; an unknown key or an out-of-range value is one clear error.

        Example:
            >>> StatisticsSettings.from_mapping({"n_resamples": 200}).n_resamples
            200
        """
        try:
            return cls.parse(settings, where="statistics")
        except ConfigError as error:
            raise AnalysisInputError(f"settings: {error}") from None


@dataclass(frozen=True)
class StudyInputs:
    """Where the evaluation's products are (see the module docstring); unneeded ones may stay None."""

    runs_csv: Path | None = None
    metrics_root: Path | None = None
    predictions_root: Path | None = None
    converted_root: Path | None = None

    def has_case_level(self) -> bool:
        """Whether the case-level bootstrap can run (predictions and converted roots given)."""
        return self.predictions_root is not None and self.converted_root is not None


@dataclass
class OutputContext:
    """What an output function gets: the inputs, the settings and lazily loaded tables (loaded once)."""

    inputs: StudyInputs
    settings: StatisticsSettings
    _cache: dict[str, Any] = field(default_factory=dict)

    def runs(self) -> pd.DataFrame:
        """The per-run table (``runs_csv``); a clear error naming the file if absent or unreadable."""
        if "runs" not in self._cache:
            path = self.inputs.runs_csv
            if path is None:
                raise AnalysisInputError("this output needs the per-run table (runs_csv / --runs-csv)")
            if not Path(path).is_file():
                raise AnalysisInputError(f"{path}: per-run table not found")
            try:
                self._cache["runs"] = pd.read_csv(path)
            except (ValueError, pd.errors.ParserError) as error:
                raise AnalysisInputError(f"{path}: cannot be read as CSV ({error})") from error
        return self._cache["runs"]

    def case_data(self) -> CaseLevelData | None:
        """Case-level AP data when the roots are given, else None."""
        if not self.inputs.has_case_level():
            return None
        if "case_data" not in self._cache:
            from pretrain_det3d.analysis.case_ap import case_ap_data  # imports the evaluation (torch, MONAI)

            self._cache["case_data"] = case_ap_data(self.runs(), self.inputs.predictions_root,
                                                    self.inputs.converted_root)
        return self._cache["case_data"]

    def test(self) -> str:
        """The test behind marks and shades: the setting, with "auto" resolved by the available inputs."""
        if self.settings.test == "auto":
            return "bootstrap" if self.inputs.has_case_level() else "wilcoxon"
        if self.settings.test == "bootstrap" and not self.inputs.has_case_level():
            raise AnalysisInputError("settings: test 'bootstrap' needs predictions_root and converted_root")
        return self.settings.test

    def metric_files(self) -> list[tuple[str, str, str, int, Path]]:
        """``(arch, init, dataset, fold, path)`` of every run of the per-run table under ``metrics_root``."""
        if self.inputs.metrics_root is None:
            raise AnalysisInputError("this output needs the metrics folder (metrics_root / --metrics-root)")
        keys = self.runs()[list(RUN_KEYS)].drop_duplicates().itertuples(index=False)
        root = Path(self.inputs.metrics_root)
        return [(str(d), str(i), str(s), int(f), root / str(d) / str(i) / str(s) / f"fold{int(f)}.json")
                for d, i, s, f in keys]


FigureFunction = Callable[[OutputContext, Path, Path], None]
TableFunction = Callable[[OutputContext, Mapping[str, Path]], None]


@dataclass(frozen=True)
class OutputSpec:
    """A registered output: its function, the inputs it needs, its case-level use and (tables) its formats."""

    function: Callable[..., None]
    requires: tuple[str, ...]
    case_level: str = "none"
    formats: tuple[str, ...] = ()
    description: str = ""


#: Figures by name; each writes a PNG and a PDF.
FIGURES: Registry[OutputSpec] = Registry("figure")
#: Tables by name; each writes the files of its ``formats`` (keys of ``out_paths``: csv, md, tex).
TABLES: Registry[OutputSpec] = Registry("table")


def register_output(registry: Registry[OutputSpec], name: str, requires: tuple[str, ...],
                    case_level: str = "none", formats: tuple[str, ...] = (),
                    description: str = "") -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Decorator registering an output function under ``name`` in ``registry``.

    Example:
        >>> DEMO = Registry("figure")
        >>> @register_output(DEMO, "demo", requires=("runs_csv",))
        ... def demo(context, out_png, out_pdf): ...
        >>> DEMO.get("demo").requires
        ('runs_csv',)
    """
    if case_level not in CASE_LEVEL_CHOICES:
        raise ValueError(f"case_level must be one of {CASE_LEVEL_CHOICES}, got {case_level!r}")

    def decorator(function: Callable[..., None]) -> Callable[..., None]:
        registry.register(name)(OutputSpec(function, requires, case_level, formats, description))
        return function

    return decorator


def _check_inputs(kind: str, name: str, spec: OutputSpec, inputs: StudyInputs) -> None:
    needed = list(spec.requires)
    if spec.case_level == "required":
        needed += ["predictions_root", "converted_root"]
    missing = [key for key in needed if getattr(inputs, key) is None]
    if missing:
        raise AnalysisInputError(f"{kind} {name!r} needs input(s) {missing} (it uses {needed})")


# ---- figures -------------------------------------------------------------------------------------------------


@register_output(FIGURES, "ap_by_init", requires=("runs_csv",), description="AP@0.1 bars per dataset, per detector")
def _figure_ap_by_init(context: OutputContext, out_png: Path, out_pdf: Path) -> None:
    from pretrain_det3d.analysis.figures import plot_ap_by_init

    plot_ap_by_init(context.inputs.runs_csv, out_png, out_pdf)


@register_output(FIGURES, "change_vs_scratch", requires=("runs_csv",), case_level="optional",
                 description="heat map of the change against scratch with significance marks")
def _figure_change(context: OutputContext, out_png: Path, out_pdf: Path) -> None:
    from pretrain_det3d.analysis.figures_change import plot_change_heatmap

    plot_change_heatmap(_baseline_comparisons(context), out_png, out_pdf, test=context.test())


@register_output(FIGURES, "detection_examples", requires=("runs_csv", "predictions_root", "converted_root"),
                 description="best and worst validation case of each dataset's best run: slices with boxes")
def _figure_detection_examples(context: OutputContext, out_png: Path, out_pdf: Path) -> None:
    from pretrain_det3d.analysis.figures_cases import detection_examples, plot_detection_examples

    plot_detection_examples(detection_examples(context.runs(), context.inputs.predictions_root,
                                               context.inputs.converted_root, metric=context.settings.metric),
                            out_png, out_pdf)


@register_output(FIGURES, "froc", requires=("runs_csv", "metrics_root"),
                 description="FROC curves per dataset, mean over folds")
def _figure_froc(context: OutputContext, out_png: Path, out_pdf: Path) -> None:
    from pretrain_det3d.analysis.figures_froc import plot_froc_curves, read_froc_curves

    plot_froc_curves(read_froc_curves(context.metric_files()), out_png, out_pdf)


@register_output(FIGURES, "rank_distribution", requires=("runs_csv",), case_level="required",
                 description="bootstrap rank distribution (blob plot)")
def _figure_ranks(context: OutputContext, out_png: Path, out_pdf: Path) -> None:
    from pretrain_det3d.analysis.figures_ranks import plot_rank_distribution
    from pretrain_det3d.analysis.ranking import mean_rank_stability, rank_stability, rank_within_datasets

    groups = rank_within_datasets(context.runs(), context.settings.metric)
    data, s = context.case_data(), context.settings
    plot_rank_distribution(rank_stability(groups, data, s.n_resamples, s.seed), out_png, out_pdf,
                           mean_stability=mean_rank_stability(groups, data, s.n_resamples, s.seed))


@register_output(FIGURES, "significance_map", requires=("runs_csv",), case_level="optional",
                 description="pairwise significance matrix per detector")
def _figure_significance(context: OutputContext, out_png: Path, out_pdf: Path) -> None:
    from pretrain_det3d.analysis.figures_significance import plot_significance_map

    plot_significance_map(_pairwise_comparisons(context), out_png, out_pdf, test=context.test())


def _label_efficiency(context: OutputContext) -> list:
    """The label-efficiency curves of the label-fraction run table in ``runs_csv`` (loaded once per context)."""
    if "label_efficiency" not in context._cache:
        from pretrain_det3d.analysis.label_efficiency import case_statistics, label_efficiency

        s = context.settings
        case_ids, statistics = case_statistics(context.runs(), context.inputs.predictions_root,
                                               context.inputs.converted_root)
        context._cache["label_efficiency"] = label_efficiency(context.runs(), case_ids, statistics, s.n_resamples,
                                                              s.confidence, s.seed)
    return context._cache["label_efficiency"]


@register_output(FIGURES, "label_efficiency", requires=("runs_csv", "predictions_root", "converted_root"),
                 description="AP@0.1 against labelled training cases per detector x dataset, bootstrap bands "
                             "(runs_csv: the label-fraction run table)")
def _figure_label_efficiency(context: OutputContext, out_png: Path, out_pdf: Path) -> None:
    from pretrain_det3d.analysis.label_efficiency import plot_label_efficiency

    plot_label_efficiency(_label_efficiency(context), out_png, out_pdf)


# ---- tables --------------------------------------------------------------------------------------------------


def _baseline_comparisons(context: OutputContext) -> pd.DataFrame:
    from pretrain_det3d.analysis.comparisons import compare_with_baseline

    s = context.settings
    case_data = context.case_data() if context.test() == "bootstrap" else None
    return compare_with_baseline(context.runs(), s.metric, case_data=case_data, n_resamples=s.n_resamples,
                                 confidence=s.confidence, seed=s.seed, alpha=s.alpha)


def _pairwise_comparisons(context: OutputContext) -> pd.DataFrame:
    from pretrain_det3d.analysis.figures import initialisation_order
    from pretrain_det3d.analysis.pairwise import compare_pairwise

    s = context.settings
    case_data = context.case_data() if context.test() == "bootstrap" else None
    order = initialisation_order(context.runs()["initialisation"].astype(str).unique().tolist())
    return compare_pairwise(context.runs(), s.metric, case_data=case_data, order=order, n_resamples=s.n_resamples,
                            confidence=s.confidence, seed=s.seed, alpha=s.alpha)


@register_output(TABLES, "main_results_ranked", requires=("runs_csv",), formats=("csv", "md", "tex"),
                 description="mean AP@0.1 per dataset and mean rank, best in bold")
def _table_main(context: OutputContext, out_paths: Mapping[str, Path]) -> None:
    from pretrain_det3d.analysis.report_tables import main_results_table, write_main_table

    table = main_results_table(context.runs(), context.settings.metric)
    write_main_table(table, out_paths.get("csv"), out_paths.get("md"), out_paths.get("tex"))


@register_output(TABLES, "baseline_tests", requires=("runs_csv",), case_level="optional", formats=("csv", "md"),
                 description="each initialisation against scratch: Wilcoxon over folds, case bootstrap, Holm")
def _table_baseline(context: OutputContext, out_paths: Mapping[str, Path]) -> None:
    from pretrain_det3d.analysis.report_tables import baseline_tests_markdown, write_test_table

    table = _baseline_comparisons(context)
    write_test_table(table, baseline_tests_markdown(table), out_paths.get("csv"), out_paths.get("md"))


@register_output(TABLES, "pairwise_tests", requires=("runs_csv",), case_level="optional", formats=("csv", "md"),
                 description="every pair of initialisations over all datasets, Holm per detector")
def _table_pairwise(context: OutputContext, out_paths: Mapping[str, Path]) -> None:
    from pretrain_det3d.analysis.report_tables import pairwise_tests_markdown, write_test_table

    table = _pairwise_comparisons(context)
    write_test_table(table, pairwise_tests_markdown(table), out_paths.get("csv"), out_paths.get("md"))


@register_output(TABLES, "labels_saved", requires=("runs_csv", "predictions_root", "converted_root"),
                 formats=("csv", "md"), description="labelled cases each initialisation needs to match scratch at "
                 "100 %, with its interval (runs_csv: the label-fraction run table)")
def _table_labels_saved(context: OutputContext, out_paths: Mapping[str, Path]) -> None:
    from pretrain_det3d.analysis.label_efficiency import write_labels_saved

    write_labels_saved(_label_efficiency(context), out_paths.get("csv"), out_paths.get("md"))


# ---- entry points --------------------------------------------------------------------------------------------


def make_figure(name: str, inputs: StudyInputs, out_png: str | os.PathLike, out_pdf: str | os.PathLike,
                settings: Mapping[str, Any] | None = None) -> None:
    """Draw the registered figure ``name`` from ``inputs`` into ``out_png`` and ``out_pdf`` (atomically).

    Example:
        >>> make_figure("froc", StudyInputs(runs_csv=Path("results/tables/runs.csv"),
        ...                                 metrics_root=Path("results/metrics")),
        ...             "results/figures/froc.png", "results/figures/froc.pdf")  # doctest: +SKIP
    """
    spec = FIGURES.get(name)
    _check_inputs("figure", name, spec, inputs)
    spec.function(OutputContext(inputs, StatisticsSettings.from_mapping(settings)), Path(out_png), Path(out_pdf))


def make_table(name: str, inputs: StudyInputs, out_paths: Mapping[str, str | os.PathLike],
               settings: Mapping[str, Any] | None = None) -> None:
    """Write the registered table ``name``; ``out_paths`` maps formats (csv, md, tex) to files, all required.

    Example:
        >>> make_table("main_results_ranked", StudyInputs(runs_csv=Path("results/tables/runs.csv")),
        ...            {"csv": "t.csv", "md": "t.md", "tex": "t.tex"})  # doctest: +SKIP
    """
    spec = TABLES.get(name)
    _check_inputs("table", name, spec, inputs)
    paths = {key: Path(value) for key, value in out_paths.items() if value is not None}
    missing, unknown = sorted(set(spec.formats) - set(paths)), sorted(set(paths) - set(spec.formats))
    if missing or unknown:
        raise AnalysisInputError(f"table {name!r} writes formats {list(spec.formats)}; "
                                 f"missing output path(s) {missing}, unknown {unknown}")
    spec.function(OutputContext(inputs, StatisticsSettings.from_mapping(settings)), paths)
