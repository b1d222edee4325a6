"""The whole study configuration: top-level keys and the sections that are not a detector, method or dataset.

:func:`validate_study_config` is what the workflow runs at the dry run (``workflow/rules/common.smk``): every
section is checked by its settings class, unknown keys and wrong types fail naming the key (with a "did you
mean"), and the validated values (command-line strings coerced to numbers) are written back into the config.

Example:
    >>> cfg = {"seed": "0", "backbone": "resenc_demo",
    ...        "study": {"datasets": ["d"], "detectors": ["retina_unet"], "initialisations": ["scratch"],
    ...                  "folds": ["0"], "num_folds": "2"},
    ...        "datasets": {"d": {"source": "synthetic", "synthetic": {"num_cases": 4, "shape": [16, 16, 16],
    ...                     "spacing": [1, 1, 1]}}},
    ...        "detectors": {"retina_unet": {"patch_size": [16, 16, 16], "iterations": "500"}},
    ...        "pretraining": {"methods": {}}}
    >>> validate_study_config(cfg)
    >>> cfg["seed"], cfg["study"]["folds"], cfg["detectors"]["retina_unet"]["iterations"]
    (0, [0], 500)
"""

from __future__ import annotations

from typing import Any, Literal, Mapping

from pydantic import Field, field_validator, model_validator

from pretrain_det3d.settings.base import ConfigError, Settings, suggestion
from pretrain_det3d.settings.converters import converter_settings_class
from pretrain_det3d.settings.data import CorpusEntry, DatasetEntry
from pretrain_det3d.settings.detectors import detector_settings_class
from pretrain_det3d.settings.pretraining import method_settings_class

#: rules whose threads, memory and runtime the ``resources`` section may set (``default``: every rule)
RESOURCE_RULES: tuple[str, ...] = (
    "default", "synthesize_dataset", "download_source", "convert_dataset", "check_dataset", "preprocess_dataset",
    "synthesize_corpus", "index_corpus", "plan_corpus", "preprocess_corpus", "gather_corpus", "pretrain",
    "fetch_published_checkpoint", "finetune", "predict",
    "evaluate", "export_luna16", "luna16_cpm", "aggregate", "figure", "table", "sweep", "consolidate", "preprocess_test_cases",
    "predict_test", "evaluate_test", "label_subset",
)


class StudySettings(Settings):
    """The grid: which datasets, detectors, initialisations and folds run."""

    datasets: list[str] = Field(min_length=1, description="Datasets (names under 'datasets').")
    detectors: list[str] = Field(min_length=1, description="Detector entries (names under 'detectors').")
    initialisations: list[str] = Field(min_length=1, description="'scratch', methods under "
                                       "'pretraining.methods' or checkpoints under 'pretraining.published'.")
    folds: list[int] = Field(min_length=1, description="Folds to run (0-based).")
    num_folds: int = Field(ge=2, description="Folds of the cross-validation split.")
    label_fractions: list[float] = Field([1.0], min_length=1, description="Shares of each fold's training cases "
                                         "to fine-tune on (nested, stratified subsets, data/label_fractions.py); "
                                         "must hold 1.0; more than one value adds the label-efficiency curves.")
    label_fraction_schedule: Literal["same", "scaled"] = Field(
        "same", description="Schedule of a run below fraction 1: 'same' iterations and warm-up as the full fold, "
        "or both 'scaled' by the subset's share of the fold's training cases.")

    @field_validator("label_fractions")
    @classmethod
    def _check_label_fractions(cls, fractions: list[float]) -> list[float]:
        from pretrain_det3d.data.label_fractions import format_fraction

        for index, fraction in enumerate(fractions):
            try:
                format_fraction(fraction)
            except ValueError as error:
                raise ValueError(f"value {index}: {error}") from None
        if len(set(fractions)) != len(fractions):
            raise ValueError(f"repeated values in {fractions}")
        if 1.0 not in fractions:
            raise ValueError("must hold 1.0 (the full folds, the reference of the curves)")
        return fractions


class InferenceSettings(Settings):
    """Sliding-window prediction and nnDetection's box consolidation; ``patch_size`` comes from the detector."""

    overlap: float = Field(0.5, ge=0, le=0.95, description="Overlap of neighbouring tiles (fraction).")
    mirror: bool = Field(True, description="Mirror test-time augmentation: every tile also mirrored along each "
                         "subset of the spatial axes (8 forwards per tile), the boxes mapped back and fused.")
    max_detections: int = Field(100, gt=0, description="Detections kept per case (best scores).")
    score_threshold: float = Field(0.0, ge=0, le=1, description="Per source (model x mirroring), boxes with a "
                                   "score not above this are dropped before NMS; 0: no threshold.")
    min_box_size: float = Field(0.01, ge=0, description="Boxes with a side shorter than this (voxels, after "
                                "clipping to the image) are removed.")
    nms_iou: float = Field(0.1, gt=0, le=1, description="IoU of the class-wise NMS over the tiles of one "
                           "source (model x mirroring).")
    weighted_nms: bool = Field(True, description="That NMS ranks boxes by score x tile weight (centre of a tile "
                               "1, falling to 0.5 at its corners); off: by score.")
    candidates: int = Field(1000, gt=0, description="Boxes kept per source before and after its NMS, and in "
                            "all before the clustering.")
    wbc_iou: float = Field(0.5, gt=0, le=1, description="IoU of the weighted box clustering that fuses the "
                           "sources (mirrorings, models).")
    wbc_score_threshold: float = Field(0.0, ge=0, le=1, description="Fused boxes with a score not above this are "
                                       "dropped.")
    batch_size: int = Field(1, gt=0, description="Tiles per forward pass.")
    device: str = Field("cpu", description="'cpu', 'cuda[:i]' or 'auto'.")
    patch_size: tuple[int, int, int] | None = Field(None, description="Tile size; default: the detector's "
                                                    "training patch size.")


#: nnDetection's sweep grid (``BoxEnsemblerSelective.sweep_parameters``): IoU thresholds linspace(0, 0.5, 6) with
#: the 0 replaced by 1e-5, per-model NMS plain then weighted, model score thresholds 0..0.6, minimum sizes
#: 0.01 and 2..7
SWEEP_IOU_VALUES = (1e-5, 0.1, 0.2, 0.3, 0.4, 0.5)


class PostprocessingSettings(Settings):
    """Choice of the consolidation parameters per run and fold by nnDetection's sweep (``inference.postprocessing``):
    one parameter after the other (nms_iou, weighted_nms, wbc_iou, score_threshold, min_box_size), each set to
    the value scoring best on ``target_metric``, on other folds' validation predictions of the same run."""

    sweep: bool = Field(True, description="Sweep the parameters per run and fold; off: the inference settings as "
                        "configured.")
    target_metric: str = Field("mAP_IoU_0.10_0.50_0.05_MaxDet_100", description="Metric the sweep maximises "
                               "(a key of the metrics JSON).")
    nms_iou: list[float] = Field(list(SWEEP_IOU_VALUES), min_length=1, description="Values tried for "
                                 "inference.nms_iou.")
    weighted_nms: list[bool] = Field([False, True], min_length=1, description="Values tried for "
                                     "inference.weighted_nms.")
    wbc_iou: list[float] = Field(list(SWEEP_IOU_VALUES), min_length=1, description="Values tried for "
                                 "inference.wbc_iou.")
    score_threshold: list[float] = Field([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6], min_length=1,
                                         description="Values tried for inference.score_threshold.")
    min_box_size: list[float] = Field([0.01, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0], min_length=1,
                                      description="Values tried for inference.min_box_size (voxels).")

    @model_validator(mode="after")
    def _check_values(self) -> "PostprocessingSettings":
        ranges = {"nms_iou": (0.0, 1.0, False), "wbc_iou": (0.0, 1.0, False), "score_threshold": (0.0, 1.0, True),
                  "min_box_size": (0.0, float("inf"), True)}
        for key, (low, high, closed) in ranges.items():
            bad = [v for v in getattr(self, key) if not ((v >= low) if closed else (v > low)) or v > high]
            if bad:
                raise ValueError(f"{key}: values {bad} outside {'[' if closed else '('}{low}, {high}]")
        return self


class StatisticsSettings(Settings):
    """Knobs of the report's statistics (``analysis.outputs``)."""

    n_resamples: int = Field(1000, gt=0, description="Case-bootstrap resamples.")
    seed: int = Field(0, description="Seed of the bootstrap.")
    alpha: float = Field(0.05, gt=0, lt=1, description="Significance level (Holm-corrected).")
    confidence: float = Field(0.95, gt=0, lt=1, description="Confidence level of the intervals.")
    test: Literal["auto", "wilcoxon", "bootstrap"] = Field("auto", description="Test against scratch: "
                                                           "Wilcoxon over folds, paired case bootstrap, or auto.")
    metric: str = Field("AP_IoU_0.10_MaxDet_100", description="Metric of the comparisons.")


class ResourceSettings(Settings):
    """Threads, memory and runtime of one rule's jobs."""

    threads: int | None = Field(None, gt=0, description="Threads (CPUs) per job.")
    mem_mb: int | None = Field(None, gt=0, description="Memory per job in MB.")
    runtime: int | None = Field(None, gt=0, description="Time limit per job in minutes.")


class PublishedCheckpointEntry(Settings):
    """A published nnssl checkpoint used as an initialisation (exactly one of url and path)."""

    url: str | None = Field(None, description="Download address.")
    path: str | None = Field(None, description="A local copy instead of a download.")
    sha256: str | None = Field(None, description="Expected sha256 of the file (checked when given).")
    description: str | None = Field(None, description="What the checkpoint is.")
    licence: str | None = Field(None, description="Its licence.")
    stem: str = Field("351_0", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$", description="Stem to load from a "
                      "checkpoint with one stem per source dataset (MultiTalent: encoder.stem.<id>): its id, or its "
                      "whole prefix; default the release's CT stem (nnDetection docs/finetuning.md 3.4). A checkpoint "
                      "with one stem ignores it.")
    stem_per_dataset: dict[str, str] = Field(default_factory=dict, description="Dataset name -> stem id for "
                                             "fine-tuning on that dataset instead of 'stem' (e.g. an MRI dataset "
                                             "-> an MRI stem).")

    @field_validator("stem_per_dataset")
    @classmethod
    def _check_stem_ids(cls, stems: dict[str, str]) -> dict[str, str]:
        import re

        bad = {name: stem for name, stem in stems.items() if not re.fullmatch(r"[A-Za-z0-9_.-]+", stem)}
        if bad:
            raise ValueError(f"stem ids are letters, digits, '_', '.' and '-': {bad}")
        return stems


class PretrainingSection(Settings):
    """Pre-training: the corpus, the methods to run and published checkpoints."""

    corpus: CorpusEntry | None = Field(None, description="The unlabelled corpus of the self-supervised methods "
                                       "(needed when one of them is an initialisation of the study).")
    methods: dict[str, dict[str, Any]] = Field(default_factory=dict, description="Initialisation name -> method "
                                               "settings (see the method sections below).")
    published: dict[str, PublishedCheckpointEntry] | None = Field(None, description="Initialisation name -> a "
                                                                  "published checkpoint.")


class StudyConfig(Settings):
    """A study configuration (``config/config.yaml`` is the demo, ``config/paper.yaml`` the paper)."""

    seed: int = Field(description="Seed of every random choice (synthesis, splits, sampling, initialisation).")
    data_dir: str = Field("results/data", description="Where downloaded, converted, preprocessed and corpus data "
                          "live (put it on cluster storage for the paper).")
    backbone: str = Field(description="ResEnc preset shared by pre-training and every detector ('resenc_l' is "
                          "the paper's).")
    study: StudySettings = Field(description="The grid of the study.")
    datasets: dict[str, DatasetEntry] = Field(description="Dataset name -> how to obtain and preprocess it.")
    sources: dict[str, dict[str, Any]] | None = Field(None, description="Source name -> where a dataset's raw "
                                                      "files come from (data.sources.SourceEntry).")
    pretraining: PretrainingSection = Field(description="Pre-training corpus, methods and published checkpoints.")
    detectors: dict[str, dict[str, Any]] = Field(description="Detector entry name -> fine-tuning settings "
                                                 "(see the detector sections below).")
    inference: InferenceSettings = Field(default_factory=InferenceSettings, description="Prediction settings.")
    postprocessing: PostprocessingSettings = Field(default_factory=PostprocessingSettings,
                                                   description="Sweep of the consolidation parameters.")
    statistics: StatisticsSettings = Field(default_factory=StatisticsSettings, description="Report statistics.")
    resources: dict[str, ResourceSettings] = Field(default_factory=dict, description="Rule name (or 'default') -> "
                                                   "threads, mem_mb, runtime.")

    @model_validator(mode="after")
    def _check_stem_datasets(self) -> "StudyConfig":
        # a misspelt dataset would silently fine-tune from the default (CT) stem
        for name, entry in (self.pretraining.published or {}).items():
            unknown = sorted(set(entry.stem_per_dataset) - set(self.datasets))
            if unknown:
                raise ValueError(f"pretraining.published.{name}.stem_per_dataset: {unknown} are not datasets "
                                 f"(datasets: {sorted(self.datasets)})")
        return self


def _validated_entries(entries: Mapping[str, Any], where: str, name_key: str, lookup) -> dict[str, dict[str, Any]]:
    checked = {}
    for name, entry in entries.items():
        if not isinstance(entry, Mapping):
            raise ConfigError(f"config key '{where}.{name}': must be a mapping of settings, got {entry!r}")
        registered = str(entry.get(name_key) or name)
        cls = lookup(registered, f"{where}.{name}.{name_key}" if name_key in entry else f"{where}.{name}")
        checked[name] = cls.parse(entry, where=f"{where}.{name}").model_dump(mode="json", exclude_unset=True)
    return checked


def _check_corpus(top: StudyConfig) -> None:
    used = set(top.study.initialisations)
    for entry in top.detectors.values():
        used.update((entry or {}).get("initialisations") or [])
    # a method with labelled 'datasets' (multitalent) is supervised and reads no corpus
    unlabelled = sorted(name for name, entry in top.pretraining.methods.items()
                        if name in used and not (entry or {}).get("datasets"))
    if unlabelled and top.pretraining.corpus is None:
        raise ConfigError(f"config key 'pretraining.corpus': missing; the self-supervised initialisations "
                          f"{unlabelled} pre-train on it (docs/datasets.md, section \"Pre-training corpora\")")


def validate_study_config(config: dict[str, Any]) -> None:
    """Check ``config`` against the settings classes and write the validated values back, in place.

    Only keys the user set are written back (defaults stay implicit, so the rules' parameters, and with them
    Snakemake's rerun triggers, change only when the user changes something); their values are coerced to the
    declared types. Every problem raises :class:`ConfigError` naming the config key.
    """
    top = StudyConfig.parse(config, where="")
    _check_corpus(top)
    for rule in config.get("resources") or {}:
        if rule not in RESOURCE_RULES:
            raise ConfigError(f"config key 'resources.{rule}': unknown rule;{suggestion(rule, list(RESOURCE_RULES))} "
                              f"Allowed: {', '.join(RESOURCE_RULES)}")
    validated = top.model_dump(mode="json", exclude_unset=True)
    validated["detectors"] = _validated_entries(config["detectors"], "detectors", "detector",
                                                detector_settings_class)
    validated["pretraining"]["methods"] = _validated_entries(
        config["pretraining"].get("methods") or {}, "pretraining.methods", "method", method_settings_class)
    for name, entry in (config.get("datasets") or {}).items():
        if entry.get("converter") is not None:
            where = f"datasets.{name}.convert"
            cls = converter_settings_class(entry["converter"], f"datasets.{name}.converter")
            validated["datasets"][name]["convert"] = cls.parse(entry.get("convert"), where=where).model_dump(
                mode="json", exclude_unset=True)
    if config.get("sources"):
        from pretrain_det3d.data.sources import SourceConfigError, SourceEntry

        for name, entry in config["sources"].items():
            try:
                SourceEntry.from_dict(name, entry)
            except SourceConfigError as error:
                raise ConfigError(str(error)) from None
    config.clear()
    config.update(validated)
