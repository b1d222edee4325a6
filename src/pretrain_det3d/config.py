"""Checks of a study configuration across sections, and settings resolution.

The settings classes (``pretrain_det3d.settings``, applied by :func:`validate_study_config`) fix keys, types and
defaults of each section; this module checks that the names the study refers to exist (datasets, initialisations,
detectors, backbone presets) and merges the per-stage settings that the rules hand to the package. It imports no torch, so a dry run stays fast.

Example:
    >>> cfg = {"backbone": "resenc_demo", "study": {"datasets": ["d"], "detectors": ["retina_unet"],
    ...        "initialisations": ["scratch"], "folds": [0], "num_folds": 2},
    ...        "datasets": {"d": {"source": "synthetic"}}, "detectors": {"retina_unet": {}},
    ...        "pretraining": {"methods": {}}}
    >>> validate_config(cfg)
"""

from __future__ import annotations

from typing import Any

from pretrain_det3d import catalog
from pretrain_det3d.settings.base import ConfigError
from pretrain_det3d.settings.study import validate_study_config

__all__ = ["ConfigError", "validate_study_config", "validate_config"]


def _known(names) -> str:
    return ", ".join(sorted(names)) or "none"


def detector_class_name(config: dict[str, Any], arch: str) -> str:
    """The registered detector behind config entry ``detectors.<arch>`` (``detector:`` or the key itself)."""
    return str(config["detectors"][arch].get("detector", arch))


def method_class_name(config: dict[str, Any], init: str) -> str:
    """The registered pre-training method behind ``pretraining.methods.<init>`` (``method:`` or the key)."""
    return str(config["pretraining"]["methods"][init].get("method", init))


def validate_config(config: dict[str, Any]) -> None:
    """Raise :class:`ConfigError` naming the first config key that refers to something unknown."""
    study = config["study"]
    datasets = config.get("datasets", {})
    for i, name in enumerate(study["datasets"]):
        if name not in datasets:
            raise ConfigError(
                f"config key 'study.datasets[{i}]': unknown dataset {name!r}; defined under 'datasets': {_known(datasets)}"
            )
    sources = config.get("sources", {}) or {}
    for name, entry in datasets.items():
        source = entry.get("source")
        if source == catalog.SYNTHETIC_SOURCE:
            continue
        if source not in sources:
            raise ConfigError(
                f"config key 'datasets.{name}.source': unknown source {source!r}; use 'synthetic' or an entry of "
                f"'sources': {_known(sources)}"
            )
        converter = entry.get("converter")
        if converter not in catalog.CONVERTER_MODULES:
            raise ConfigError(
                f"config key 'datasets.{name}.converter': unknown converter {converter!r}; "
                f"registered: {_known(catalog.CONVERTER_MODULES)}"
            )

    detectors = config.get("detectors", {})
    for i, arch in enumerate(study["detectors"]):
        if arch not in detectors:
            raise ConfigError(
                f"config key 'study.detectors[{i}]': unknown detector {arch!r}; defined under 'detectors': {_known(detectors)}"
            )
        cls = detector_class_name(config, arch)
        if cls not in catalog.DETECTOR_MODULES:
            raise ConfigError(
                f"config key 'detectors.{arch}': no registered detector {cls!r}; registered: {_known(catalog.DETECTOR_MODULES)}"
            )

    methods = config.get("pretraining", {}).get("methods", {}) or {}
    published = config.get("pretraining", {}).get("published", {}) or {}
    for name in sorted(set(methods) & set(published)):
        raise ConfigError(
            f"config key 'pretraining.published.{name}': the name is also a method under 'pretraining.methods'"
        )
    for name, entry in published.items():
        if bool(entry.get("url")) == bool(entry.get("path")):
            raise ConfigError(f"config key 'pretraining.published.{name}': give exactly one of 'url' and 'path'")
    for i, init in enumerate(study["initialisations"]):
        if init == catalog.SCRATCH or init in published:
            continue
        if init not in methods:
            raise ConfigError(
                f"config key 'study.initialisations[{i}]': unknown initialisation {init!r}; use 'scratch', a method "
                f"under 'pretraining.methods' ({_known(methods)}) or a checkpoint under 'pretraining.published' "
                f"({_known(published)})"
            )
    for arch in study["detectors"]:
        for j, init in enumerate(detectors[arch].get("initialisations") or []):
            if init != catalog.SCRATCH and init not in published and init not in methods:
                raise ConfigError(
                    f"config key 'detectors.{arch}.initialisations[{j}]': unknown initialisation {init!r}; use "
                    f"'scratch', a method under 'pretraining.methods' ({_known(methods)}) or a checkpoint under "
                    f"'pretraining.published' ({_known(published)})"
                )
    for init, entry in methods.items():
        for j, labelled in enumerate(entry.get("datasets") or []):
            name = labelled.get("dataset") if isinstance(labelled, dict) else None
            if name not in datasets:
                raise ConfigError(
                    f"config key 'pretraining.methods.{init}.datasets[{j}].dataset': unknown dataset {name!r}; "
                    f"defined under 'datasets': {_known(datasets)}"
                )
    for init in methods:
        cls = method_class_name(config, init)
        if cls not in catalog.PRETRAINING_MODULES:
            raise ConfigError(
                f"config key 'pretraining.methods.{init}': no registered pre-training method {cls!r}; "
                f"registered: {_known(catalog.PRETRAINING_MODULES)}"
            )

    backbone = config.get("backbone")
    if backbone not in catalog.BACKBONE_PRESETS:
        raise ConfigError(f"config key 'backbone': unknown preset {backbone!r}; known: {_known(catalog.BACKBONE_PRESETS)}")

    num_folds = int(study["num_folds"])
    for i, fold in enumerate(study["folds"]):
        if not 0 <= int(fold) < num_folds:
            raise ConfigError(f"config key 'study.folds[{i}]': fold {fold} is outside 0..{num_folds - 1} (study.num_folds)")


def synthetic_datasets(config: dict[str, Any]) -> list[str]:
    """Names of the configured datasets that are generated rather than downloaded and converted."""
    return [name for name, entry in config.get("datasets", {}).items() if entry.get("source") == catalog.SYNTHETIC_SOURCE]


def converted_datasets(config: dict[str, Any]) -> list[str]:
    """Names of the configured datasets obtained from a source entry and converted."""
    return [name for name, entry in config.get("datasets", {}).items() if entry.get("source") != catalog.SYNTHETIC_SOURCE]


def pretraining_datasets(config: dict[str, Any], init: str) -> list[str]:
    """Labelled datasets a supervised pre-training method (``datasets:`` in its entry) learns from."""
    return [d["dataset"] for d in config["pretraining"]["methods"][init].get("datasets") or []]


def pretraining_settings(config: dict[str, Any], init: str) -> dict[str, Any]:
    """Settings handed to ``pretraining.run_pretraining`` for initialisation ``init``.

    Labelled pre-training datasets are named by their ``datasets:`` key in the config; the package receives
    each as ``{name, root, classes}`` with ``root`` the preprocessed folder.
    """
    entry = dict(config["pretraining"]["methods"][init])
    entry.pop("method", None)
    if entry.get("datasets"):
        data_dir = config.get("data_dir", "results/data")
        entry["datasets"] = [
            {"name": d["dataset"], "root": f"{data_dir}/preprocessed/{d['dataset']}",
             **({"classes": d["classes"]} if d.get("classes") else {})}
            for d in entry["datasets"]
        ]
    return {"preset": config["backbone"], **entry}


def detector_initialisations(config: dict[str, Any], arch: str) -> list[str]:
    """The initialisations detector entry ``arch`` runs with: its own ``initialisations`` list, else the study's.

    Example:
        >>> detector_initialisations({"study": {"initialisations": ["scratch", "mae"]},
        ...                           "detectors": {"a": {}, "b": {"initialisations": ["scratch"]}}}, "b")
        ['scratch']
    """
    own = config["detectors"][arch].get("initialisations")
    return list(own) if own else list(config["study"]["initialisations"])


def finetuning_settings(config: dict[str, Any], arch: str) -> dict[str, Any]:
    """Settings handed to ``training.finetune.run_finetuning`` for detector entry ``arch``."""
    entry = dict(config["detectors"][arch])
    entry.pop("detector", None)
    entry.pop("initialisations", None)  # which runs exist, not how one trains
    return {"preset": config["backbone"], **entry}


def inference_settings(config: dict[str, Any], arch: str) -> dict[str, Any]:
    """Settings handed to ``inference.predict.run_prediction``: global inference knobs plus the patch size."""
    settings = dict(config.get("inference", {}))
    settings.setdefault("patch_size", config["detectors"][arch]["patch_size"])
    return settings


def postprocessing_settings(config: dict[str, Any]) -> dict[str, Any]:
    """Settings of the post-processing sweep (``inference.postprocessing``): the keys the config sets."""
    return dict(config.get("postprocessing", {}) or {})


def datasets_with_test_cases(config: dict[str, Any]) -> list[str]:
    """The study's datasets that hold held-out test cases (``imagesTs``/``labelsTs``): synthetic ones with
    ``num_test_cases`` > 0, and converted ones whose converter writes test cases with their ``convert:`` settings
    (CTA-A's test subsets)."""
    from pretrain_det3d.settings.converters import converter_writes_test_cases

    return [
        name for name in config["study"]["datasets"]
        if int((config["datasets"][name].get("synthetic") or {}).get("num_test_cases", 0) or 0) > 0
        or converter_writes_test_cases(str(config["datasets"][name].get("converter") or ""),
                                       config["datasets"][name].get("convert"))
    ]
