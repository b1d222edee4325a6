"""The settings classes: unknown keys and wrong types fail at the dry run naming the key, command-line values are
coerced, defaults are defined once, and the generated schema and key reference match the classes."""

from __future__ import annotations

import copy
import inspect
import subprocess
import sys

import jsonschema
import pytest
import yaml

from conftest import REPO, SMOKE_CONFIG
from pretrain_det3d.settings.base import ConfigError, suggestion
from pretrain_det3d.settings.detectors import DETECTOR_SETTINGS, DeformableDETRSettings, RetinaUNetSettings
from pretrain_det3d.settings.pretraining import METHOD_SETTINGS
from pretrain_det3d.settings.study import StudyConfig, validate_study_config
from pretrain_det3d.settings.training import TrainingSettings

DEMO = REPO / "config" / "config.yaml"


def demo() -> dict:
    return yaml.safe_load(DEMO.read_text())


# ---- the misspellings a user tried (issue "No silent wrong results", case 3): each fails at the dry run
MISSPELLED = [
    ("detectors={retina_unet: {learning_rate: 0.1}}", "detectors.retina_unet.learning_rate", "lr"),
    ("detectors={deformable_detr: {iteration: 50}}", "detectors.deformable_detr.iteration", "iterations"),
    ("pretraining={methods: {mae: {mask_ration: 0.5}}}", "pretraining.methods.mae.mask_ration", "mask_ratio"),
    ("datasets={synth_lesions: {preprocesing: {}}}", "datasets.synth_lesions.preprocesing", "preprocessing"),
    ("statistic={seed: 1}", "statistic", "statistics"),
    ("inference={overlapp: 0.3}", "inference.overlapp", "overlap"),
    ("resources={finetun: {threads: 2}}", "resources.finetun", "finetune"),
]


@pytest.mark.parametrize("override, key, meant", MISSPELLED, ids=[m[1] for m in MISSPELLED])
def test_misspelled_key_fails_the_dry_run_naming_it(tmp_path, snakemake_runner, override, key, meant):
    result = snakemake_runner(tmp_path, "-n", "--config", override, configfile=DEMO, check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-2000:]
    assert f"config key '{key}'" in output and f"did you mean '{meant}'" in output, output[-3000:]
    assert "Job stats" not in output  # nothing was planned


def test_wrong_type_fails_the_dry_run_naming_the_key(tmp_path, snakemake_runner):
    result = snakemake_runner(tmp_path, "-n", "--config", "detectors={retina_unet: {iterations: many}}",
                              configfile=DEMO, check=False)
    assert result.returncode != 0
    assert "config key 'detectors.retina_unet.iterations': Input should be a valid integer" in result.stdout + result.stderr


def test_command_line_values_are_coerced_by_the_schema(tmp_path, snakemake_runner):
    # before: "200" arrived as a string and the job failed at run time
    result = snakemake_runner(tmp_path, "-n", "--config",
                              "detectors={retina_unet: {iterations: 200, lr: 0.02, augmentation: false}}",
                              configfile=DEMO)
    assert "Job stats" in result.stdout
    config = demo()
    config["detectors"]["retina_unet"].update(iterations="200", lr="0.02", augmentation="false")
    config["study"]["folds"] = ["0"]
    validate_study_config(config)
    entry = config["detectors"]["retina_unet"]
    assert (entry["iterations"], entry["lr"], entry["augmentation"]) == (200, 0.02, False)
    assert config["study"]["folds"] == [0]


def test_validation_keeps_only_what_the_user_set():
    """Defaults stay implicit, so the rules' params (Snakemake's rerun trigger) change only with the config."""
    config = demo()
    config["pretraining"]["methods"]["voco"].update(base_grid=2, patch_size=[48, 48, 48])
    before = copy.deepcopy(config)
    validate_study_config(config)
    # values are normalised to their declared type (one number -> [z, y, x]); nothing is added or dropped
    before["pretraining"]["methods"]["voco"]["base_grid"] = [2, 2, 2]
    assert config == before


@pytest.mark.parametrize("path", ["config/config.yaml", "config/paper.yaml", "tests/configs/smoke.yaml"])
def test_shipped_configs_validate(path):
    validate_study_config(yaml.safe_load((REPO / path).read_text()))


def test_misspelled_key_under_a_nested_section_lists_the_allowed_keys():
    config = demo()
    config["detectors"]["retina_unet"]["augmentation"] = {"p_rotaton": 0.1}
    with pytest.raises(ConfigError) as info:
        validate_study_config(config)
    message = str(info.value)
    assert message.startswith("config key 'detectors.retina_unet.augmentation.p_rotaton': unknown key; "
                              "did you mean 'p_rotation'? Allowed keys: ")
    assert "p_scaling" in message


def test_synthetic_kind_picks_the_class_whose_keys_are_listed():
    config = demo()
    config["datasets"]["synth_organs_a"]["synthetic"]["organ"] = ["liver"]
    with pytest.raises(ConfigError, match=r"'datasets\.synth_organs_a\.synthetic\.organ': unknown key; did you "
                                          r"mean 'organs'\? Allowed keys: kind, num_cases, organs, shape, spacing$"):
        validate_study_config(config)


def test_warmup_longer_than_the_run_is_refused():
    config = demo()
    config["detectors"]["retina_unet"]["iterations"] = 10
    with pytest.raises(ConfigError, match=r"'detectors\.retina_unet'.*warmup_iterations must lie in \[0, "
                                          r"iterations=10\), got 25"):
        validate_study_config(config)


def test_a_corpus_is_needed_only_by_self_supervised_initialisations():
    config = demo()
    del config["pretraining"]["corpus"]
    with pytest.raises(ConfigError, match=r"^config key 'pretraining\.corpus': missing; the self-supervised "
                                          r"initialisations \['mae', 'models_genesis', 'spark3d', 'voco'\]"):
        validate_study_config(copy.deepcopy(config))
    # scratch, a published checkpoint and the supervised multitalent read no corpus
    config["study"]["initialisations"] = ["scratch", "multitalent"]
    validate_study_config(config)


@pytest.mark.parametrize("key, allowed, expected", [
    ("mask_ration", ["mask_ratio", "mask_block"], " did you mean 'mask_ratio'?"),
    ("learning_rate", ["lr", "momentum"], " did you mean 'lr'?"),
    ("zzz", ["lr", "momentum"], ""),
])
def test_suggestion(key, allowed, expected):
    assert suggestion(key, allowed) == expected


# ---- defined once: the models take their defaults from the settings classes
@pytest.mark.parametrize("name", sorted(DETECTOR_SETTINGS))
def test_detector_constructor_defaults_are_the_settings_defaults(name):
    from pretrain_det3d.catalog import import_detector
    from pretrain_det3d.models.registry import get_detector_class

    import_detector(name)
    cls = get_detector_class(name)
    settings = DETECTOR_SETTINGS[name]
    parameters = inspect.signature(cls.__init__).parameters
    keywords = {k for k, p in parameters.items() if p.kind is not inspect.Parameter.VAR_KEYWORD} - \
        {"self", "in_channels", "num_classes", "preset"}
    assert keywords <= set(settings.model_keywords()), keywords - set(settings.model_keywords())
    for key in keywords:
        default = parameters[key].default
        if default is inspect.Parameter.empty:
            continue
        declared = settings.default(key)
        assert (tuple(default) if isinstance(default, (list, tuple)) else default) == \
            (tuple(declared) if isinstance(declared, (list, tuple)) else declared), key


def test_detr_training_defaults_come_from_its_settings_class():
    from pretrain_det3d.models.deformable_detr import DeformableDETR

    assert DeformableDETR.training_defaults == {"optimizer": "adamw", "lr": 3e-4, "weight_decay": 1e-4,
                                                "adam_eps": 1e-4, "amsgrad": True, "warmup_iterations": 10000,
                                                "amp_dtype": "float16", "grad_clip": None}
    assert DeformableDETRSettings.default("optimizer") == "adamw"
    assert RetinaUNetSettings.default("optimizer") == TrainingSettings.default("optimizer") == "sgd"


def test_every_registered_name_has_a_settings_class():
    from pretrain_det3d import catalog

    assert set(DETECTOR_SETTINGS) == set(catalog.DETECTOR_MODULES)
    assert set(METHOD_SETTINGS) == set(catalog.PRETRAINING_MODULES)


def test_runtime_check_refuses_what_the_dry_run_refuses():
    from pretrain_det3d.cli import check_detector_settings, check_method_settings

    with pytest.raises(ConfigError, match=r"'detectors \(retina_unet\)\.learning_rate': unknown key"):
        check_detector_settings("retina_unet", {"preset": "resenc_demo", "patch_size": [32] * 3, "learning_rate": 1})
    check_method_settings("multitalent", {"preset": "resenc_demo", "threads": 1,
                                          "datasets": [{"name": "a", "root": "/x/a", "classes": ["liver"]}]})
    with pytest.raises(ConfigError, match=r"'pretraining.methods \(voco\)\.num_target_crop': unknown key"):
        check_method_settings("voco", {"num_target_crop": 2})


# ---- generated files
def test_generated_schema_and_key_reference_are_up_to_date():
    result = subprocess.run([sys.executable, "-m", "pretrain_det3d", "config-docs", "--check", "--root", str(REPO)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_generated_json_schema_agrees_with_the_classes():
    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    for path in ("config/config.yaml", "config/paper.yaml", SMOKE_CONFIG):
        jsonschema.validate(yaml.safe_load((REPO / path).read_text()), schema)
    bad = demo()
    bad["pretraining"]["methods"]["mae"]["mask_ration"] = 0.5
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_key_reference_documents_every_key_with_its_default():
    reference = (REPO / "config" / "README.md").read_text()
    for cls in [StudyConfig, *DETECTOR_SETTINGS.values(), *METHOD_SETTINGS.values()]:
        for key in cls.model_fields:
            assert f"| `{key}` |" in reference, (cls.__name__, key)
    assert "| `fpn_channels` | int | `128` |" in reference
    assert "| `mask_ratio` | float | `0.75` |" in reference


# ---- converters: the convert: section is checked at the dry run and by the converter, with one class
def test_converter_option_misspelled_in_the_paper_config_fails_validation():
    config = yaml.safe_load((REPO / "config" / "paper.yaml").read_text())
    config["datasets"]["lidc"]["convert"]["voxel_agreemnt"] = 0.5
    with pytest.raises(ConfigError, match=r"'datasets\.lidc\.convert\.voxel_agreemnt': unknown key; did you mean "
                                          r"'voxel_agreement'"):
        validate_study_config(config)


def test_converter_options_are_coerced_and_defaults_come_from_the_settings_classes():
    from pretrain_det3d.data.converters import get_converter
    from pretrain_det3d.data.converters.label_maps import DEFAULT_CONNECTIVITY
    from pretrain_det3d.data.converters.lidc import DEFAULT_VOXEL_AGREEMENT
    from pretrain_det3d.settings.converters import CONVERTER_SETTINGS, KiTS21ConvertSettings, LIDCConvertSettings

    assert get_converter("kits21", {"connectivity": "18", "min_extent_mm": "2"}).connectivity == 18
    assert DEFAULT_VOXEL_AGREEMENT == LIDCConvertSettings.default("voxel_agreement") == 0.5
    assert DEFAULT_CONNECTIVITY == KiTS21ConvertSettings.default("connectivity")  # label_maps keeps its own
    from pretrain_det3d import catalog

    assert set(CONVERTER_SETTINGS) == set(catalog.CONVERTER_MODULES)
