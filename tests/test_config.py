"""Config validation: names the study refers to must exist, and each error names the config key."""

from __future__ import annotations

import copy

import pytest
import yaml

from pretrain_det3d import catalog
from pretrain_det3d.config import (
    ConfigError,
    detector_initialisations,
    finetuning_settings,
    pretraining_settings,
    validate_config,
)

from conftest import REPO, SMOKE_CONFIG


@pytest.fixture
def smoke() -> dict:
    return yaml.safe_load(SMOKE_CONFIG.read_text())


@pytest.mark.parametrize("path", ["config/config.yaml", "config/paper.yaml", "tests/configs/smoke.yaml"])
def test_shipped_configs_are_valid(path):
    validate_config(yaml.safe_load((REPO / path).read_text()))


@pytest.mark.parametrize(
    "mutate, key, name",
    [
        (lambda c: c["study"]["datasets"].append("nope"), "study.datasets[1]", "nope"),
        (lambda c: c["study"]["detectors"].__setitem__(0, "yolo3d"), "study.detectors[0]", "yolo3d"),
        (lambda c: c["study"]["initialisations"].append("simclr"), "study.initialisations[6]", "simclr"),
        (lambda c: c["pretraining"]["methods"]["mae"].__setitem__("method", "byol"), "pretraining.methods.mae", "byol"),
        (lambda c: c["detectors"]["retina_unet"].__setitem__("detector", "yolo"), "detectors.retina_unet", "yolo"),
        (lambda c: c.__setitem__("backbone", "resnet50"), "backbone", "resnet50"),
        (lambda c: c["datasets"]["smoke_lesions"].__setitem__("source", "ftp"), "datasets.smoke_lesions.source", "ftp"),
        (lambda c: c["study"]["folds"].append(7), "study.folds[1]", "7"),
        (lambda c: c["detectors"]["retina_unet"].__setitem__("initialisations", ["scratch", "simclr"]),
         "detectors.retina_unet.initialisations[1]", "simclr"),
    ],
)
def test_unknown_names_name_the_key(smoke, mutate, key, name):
    config = copy.deepcopy(smoke)
    mutate(config)
    with pytest.raises(ConfigError) as info:
        validate_config(config)
    message = str(info.value)
    assert f"'{key}'" in message and name in message


def test_settings_merge_backbone_and_drop_class_name(smoke):
    settings = finetuning_settings(smoke, "retina_unet")
    assert settings["preset"] == smoke["backbone"]
    assert "detector" not in settings and settings["iterations"] == smoke["detectors"]["retina_unet"]["iterations"]
    pre = pretraining_settings(smoke, "mae")
    assert pre["preset"] == smoke["backbone"] and "method" not in pre


def test_detector_initialisations_default_to_the_study_and_stay_out_of_training_settings(smoke):
    config = copy.deepcopy(smoke)
    assert detector_initialisations(config, "retina_unet") == config["study"]["initialisations"]
    config["detectors"]["retina_unet"]["initialisations"] = ["scratch"]
    assert detector_initialisations(config, "retina_unet") == ["scratch"]
    assert "initialisations" not in finetuning_settings(config, "retina_unet")


def test_catalog_agrees_with_registries():
    """Every catalog name is registered by its module, and every registered name is in the catalog."""
    from pretrain_det3d.models.backbone import BACKBONE_PRESETS
    from pretrain_det3d.models.registry import DETECTORS
    from pretrain_det3d.pretraining import METHODS

    for name in catalog.DETECTOR_MODULES:
        catalog.import_detector(name)
    for name in catalog.PRETRAINING_MODULES:
        catalog.import_pretraining_method(name)
    assert set(DETECTORS.names()) == set(catalog.DETECTOR_MODULES)
    assert set(METHODS.names()) == set(catalog.PRETRAINING_MODULES)
    assert set(BACKBONE_PRESETS.names()) == set(catalog.BACKBONE_PRESETS)


def test_catalog_converters_are_registered():
    from pretrain_det3d.data.converters import CONVERTERS, get_converter

    for name in catalog.CONVERTER_MODULES:
        get_converter(name)  # imports the module, which registers the class
    assert set(CONVERTERS.names()) == set(catalog.CONVERTER_MODULES)


def test_unknown_converter_names_the_key():
    config = yaml.safe_load((REPO / "config/paper.yaml").read_text())
    config["datasets"]["luna16"]["converter"] = "luna17"
    with pytest.raises(ConfigError, match=r"'datasets.luna16.converter'.*luna17"):
        validate_config(config)
    config["datasets"]["luna16"]["converter"] = "luna16"
    config["datasets"]["luna16"]["source"] = "nowhere"
    with pytest.raises(ConfigError, match=r"'datasets.luna16.source'.*nowhere"):
        validate_config(config)


def test_catalog_report_outputs_are_registered():
    from pretrain_det3d.analysis.outputs import FIGURES, TABLES

    assert set(FIGURES.names()) == set(catalog.REPORT_FIGURES) | set(catalog.LABEL_FRACTION_FIGURES)
    assert set(TABLES.names()) == set(catalog.REPORT_TABLES) | set(catalog.LABEL_FRACTION_TABLES)
    for name, formats in {**catalog.REPORT_TABLES, **catalog.LABEL_FRACTION_TABLES}.items():
        assert TABLES.get(name).formats == formats
