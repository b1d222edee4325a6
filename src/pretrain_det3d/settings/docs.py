"""The config's JSON schema and key reference, generated from the settings classes.

``python -m pretrain_det3d config-docs`` writes ``workflow/schemas/config.schema.yaml`` (for editors and other
tools; the workflow itself validates with the classes) and ``config/README.md`` (every key with its type,
default and meaning, Snakemake workflow-catalog style). ``--check`` fails when either file is out of date,
which a test runs, so the committed files always match the classes.

Example:
    >>> "detectors.<name>" in config_reference()
    True
"""

from __future__ import annotations

import json
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from pretrain_det3d.settings.converters import CONVERTER_SETTINGS
from pretrain_det3d.settings.data import (
    CorpusEntry,
    CorpusPreprocessingSettings,
    DatasetEntry,
    PreprocessingSettings,
    SyntheticCorpusSettings,
    SyntheticLesionsSettings,
    SyntheticOrgansSettings,
)
from pretrain_det3d.settings.detectors import DETECTOR_SETTINGS, DetectorSettings
from pretrain_det3d.settings.pretraining import METHOD_SETTINGS, LabelledDatasetEntry, PretrainingSettings
from pretrain_det3d.settings.study import (
    RESOURCE_RULES,
    InferenceSettings,
    PublishedCheckpointEntry,
    ResourceSettings,
    StatisticsSettings,
    StudyConfig,
    StudySettings,
)
from pretrain_det3d.settings.training import AugmentationSettings, TrainingSettings

SCHEMA_PATH = Path("workflow/schemas/config.schema.yaml")
REFERENCE_PATH = Path("config/README.md")
GENERATED_NOTE = "Generated from the settings classes (src/pretrain_det3d/settings/) by " \
                 "`python -m pretrain_det3d config-docs`; do not edit by hand."


def config_schema() -> dict[str, Any]:
    """JSON schema of a whole study config; detector and method entries are any of their registered classes."""
    schema = StudyConfig.model_json_schema(ref_template="#/$defs/{model}")
    defs = schema.setdefault("$defs", {})

    def entry_schema(classes: list[type[BaseModel]]) -> dict[str, Any]:
        refs = []
        for cls in classes:
            sub = cls.model_json_schema(ref_template="#/$defs/{model}")
            defs.update(sub.pop("$defs", {}))
            defs[cls.__name__] = sub
            refs.append({"$ref": f"#/$defs/{cls.__name__}"})
        return {"anyOf": refs}

    schema["properties"]["detectors"]["additionalProperties"] = entry_schema(list(DETECTOR_SETTINGS.values()))
    pretraining = defs["PretrainingSection"]["properties"]
    pretraining["methods"]["additionalProperties"] = entry_schema(list(METHOD_SETTINGS.values()))
    schema["properties"]["resources"]["propertyNames"] = {"enum": list(RESOURCE_RULES)}
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$comment"] = GENERATED_NOTE
    return schema


def _type_name(annotation: Any) -> str:
    """A readable type: ``list[int] or null``, ``'sgd' / 'adamw'``, ``SyntheticLesionsSettings``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin in (typing.Union, types.UnionType):
        return " or ".join(dict.fromkeys(_type_name(a) for a in args))
    if origin is typing.Literal:
        return " / ".join(f"`{json.dumps(a)}`" for a in args)
    if origin is not None:
        inner = ", ".join("..." if a is Ellipsis else _type_name(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    if annotation is type(None):
        return "null"
    if annotation is Any:
        return "any"
    return getattr(annotation, "__name__", str(annotation))


def _default(field: Any) -> str:
    if field.default is PydanticUndefined:
        if field.default_factory is not None:
            value = field.default_factory()
            return "see below" if isinstance(value, BaseModel) else f"`{json.dumps(value)}`"
        return "required"
    value = field.default
    return f"`{json.dumps(list(value) if isinstance(value, tuple) else value)}`"


def _table(cls: type[BaseModel], keys: list[str] | None = None) -> str:
    rows = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for name, field in cls.model_fields.items():
        if keys is not None and name not in keys:
            continue
        meaning = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{name}` | {_type_name(field.annotation)} | {_default(field)} | {meaning} |")
    return "\n".join(rows)


def _own_keys(cls: type[BaseModel], base: type[BaseModel]) -> list[str]:
    """Keys ``cls`` adds to ``base`` or whose default it changes."""
    return [k for k, f in cls.model_fields.items()
            if k not in base.model_fields or f.default != base.model_fields[k].default]


def config_reference() -> str:
    """``config/README.md``: every key of a study config with its type, default and meaning."""
    parts = [
        "# Configuration keys",
        "",
        f"{GENERATED_NOTE} A study configuration is a YAML file (`config/config.yaml` is the demo, "
        "`config/paper.yaml` the paper's study); `snakemake --configfile my.yaml` runs one, and "
        "`--config key=value` overrides single keys. Unknown keys and wrong types fail at the dry run, naming "
        "the key; values given on the command line are converted to the types below. Where the paper or the "
        "authors' release fixes a value, it is the default (sources: `docs/settings.md` where present).",
        "",
        "## Top level",
        _table(StudyConfig),
        "",
        "## `study`",
        _table(StudySettings),
        "",
        "## `datasets.<name>`",
        _table(DatasetEntry),
        "",
        "### `datasets.<name>.synthetic` (kind `lesions`, the default)",
        _table(SyntheticLesionsSettings),
        "",
        "### `datasets.<name>.synthetic` (kind `organs`)",
        _table(SyntheticOrgansSettings),
        "",
        "### `datasets.<name>.preprocessing`",
        _table(PreprocessingSettings),
        "",
        "### `datasets.<name>.convert`",
        "Options of the dataset's `converter` (datasets with a fetched source; details in docs/datasets.md).",
        "",
    ]
    for name, cls in CONVERTER_SETTINGS.items():
        parts += [f"#### converter `{name}`", (cls.__doc__ or "").strip(), "", _table(cls), ""]
    parts += [
        "## `pretraining.corpus`",
        _table(CorpusEntry),
        "",
        "### `pretraining.corpus.synthetic`",
        _table(SyntheticCorpusSettings),
        "",
        "### `pretraining.corpus.preprocessing`",
        _table(CorpusPreprocessingSettings),
        "",
        "## `pretraining.published.<name>`",
        _table(PublishedCheckpointEntry),
        "",
        "## `pretraining.methods.<name>`",
        "Each entry names its method with `method:` (default: the entry's name). Every method takes the "
        "training-loop keys (see `detectors.<name>` below) with these pre-training defaults and keys:",
        "",
        _table(PretrainingSettings, _own_keys(PretrainingSettings, TrainingSettings)),
    ]
    for name, cls in METHOD_SETTINGS.items():
        own = _own_keys(cls, PretrainingSettings)
        parts += ["", f"### method `{name}`", (cls.__doc__ or "").strip(), ""]
        parts.append(_table(cls, own) if own else "No keys of its own.")
    parts += ["", "#### `datasets[i]` of a supervised method", _table(LabelledDatasetEntry), "",
              "## `detectors.<name>`",
              "Each entry names its detector with `detector:` (default: the entry's name). Keys of every detector "
              "(the training loop and bookkeeping):", "", _table(DetectorSettings)]
    for name, cls in DETECTOR_SETTINGS.items():
        parts += ["", f"### detector `{name}`", (cls.__doc__ or "").strip(), "",
                  _table(cls, _own_keys(cls, DetectorSettings))]
    parts += [
        "", "### `augmentation` (a mapping instead of true/false)", _table(AugmentationSettings),
        "", "## `inference`", _table(InferenceSettings),
        "", "## `statistics`", _table(StatisticsSettings),
        "", "## `resources.<rule>`",
        f"Rules: {', '.join(f'`{r}`' for r in RESOURCE_RULES)} (`default` applies to every rule).", "",
        _table(ResourceSettings),
        "",
    ]
    lines: list[str] = []
    for line in "\n".join(parts).split("\n"):  # a blank line after every heading (markdown lint)
        lines.append(line)
        if line.startswith("#"):
            lines.append("")
    return "\n".join(lines).replace("\n\n\n", "\n\n")


def render(root: Path) -> dict[Path, str]:
    """The generated files' contents, by path under ``root``."""
    schema = yaml.safe_dump(config_schema(), sort_keys=False, width=110, allow_unicode=True)
    return {root / SCHEMA_PATH: f"# {GENERATED_NOTE}\n{schema}", root / REFERENCE_PATH: config_reference()}


def write_or_check(root: str | Path, check: bool = False) -> list[Path]:
    """Write the generated files, or with ``check`` return those whose content differs (nothing written)."""
    from pretrain_det3d.utils.atomic import atomic_path

    stale = []
    for path, text in render(Path(root)).items():
        if path.is_file() and path.read_text() == text:
            continue
        stale.append(path)
        if not check:
            with atomic_path(path) as tmp:
                tmp.write_text(text)
    return stale
