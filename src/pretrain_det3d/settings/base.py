"""The base class of every settings section, and errors that name the config key.

Every section of a study configuration is one typed class derived from :class:`Settings` (pydantic). The class
is the single definition of the section's keys, types, defaults and meanings: the workflow validates the
config against it at the dry run, the package validates its inputs against it, and the JSON schema
(``workflow/schemas/config.schema.yaml``) and the key reference (``config/README.md``) are generated from it
(``python -m pretrain_det3d config-docs``).

Unknown keys are errors (with a "did you mean" suggestion), and values given as strings on Snakemake's command
line (``--config detectors='{retina_unet: {iterations: 5}}'`` delivers ``"5"``) are coerced to the declared type.

Example:
    >>> class Demo(Settings):
    ...     iterations: int = 10
    >>> Demo.parse({"iterations": "5"}, where="detectors.x").iterations
    5
    >>> Demo.parse({"iteration": 5}, where="detectors.x")
    Traceback (most recent call last):
    ...
    pretrain_det3d.settings.base.ConfigError: config key 'detectors.x.iteration': unknown key; did you mean 'iterations'? Allowed keys: iterations
"""

from __future__ import annotations

import difflib
from typing import Any, Mapping

from pydantic import BaseModel, ConfigDict, ValidationError

#: common words users reach for, and the key this project uses for them (the "did you mean" of last resort)
SYNONYMS: dict[str, str] = {
    "learning_rate": "lr",
    "base_lr": "lr",
    "epochs": "iterations",
    "max_iterations": "iterations",
    "num_iterations": "iterations",
    "wd": "weight_decay",
    "warmup": "warmup_iterations",
    "batchsize": "batch_size",
    "patch": "patch_size",
    "folds_to_run": "folds",
}


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the config key."""


def suggestion(key: str, allowed: list[str]) -> str:
    """`` did you mean 'x'?`` for the closest allowed key, or an empty string.

    Example:
        >>> suggestion("mask_ration", ["mask_ratio", "mask_block"])
        " did you mean 'mask_ratio'?"
    """
    synonym = SYNONYMS.get(str(key).lower())
    if synonym in allowed:
        return f" did you mean {synonym!r}?"
    close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
    return f" did you mean {close[0]!r}?" if close else ""


def _path(where: str, loc: tuple) -> str:
    """``where`` extended by ``loc``: names joined with dots, list positions as ``[i]``."""
    text = where
    for item in loc:
        text += f"[{item}]" if isinstance(item, int) else f".{item}" if text else str(item)
    return text


def _walk(model: type[BaseModel], loc: tuple) -> tuple[tuple, type[BaseModel] | None]:
    """``loc`` without pydantic's union tags, and the settings class owning its last key (or None)."""
    current: Any = model
    clean: list[Any] = []
    expect_name = False  # the previous field was a mapping: this item is a user-chosen name
    models: list[type[BaseModel]] = []
    for position, item in enumerate(loc):
        last = position == len(loc) - 1
        if isinstance(item, int) or expect_name:
            clean.append(item)
            expect_name = False
            continue
        if isinstance(item, str) and item in _PLAIN_MEMBERS and position > 0:
            continue
        by_name = [m for m in models if m.__name__ == item]
        if by_name:  # an untagged union of settings classes: the item names the member pydantic tried
            current, models = by_name[0], []
            continue
        if models and current is None:  # a tagged union: this item is the tag that picks the class
            tagged = [m for m in models if item in getattr(m.model_fields.get("kind"), "annotation", ()).__args__] \
                if all("kind" in m.model_fields for m in models) else []
            if tagged:
                current, models = tagged[0], []
                continue
        clean.append(item)
        if last:
            break
        field = getattr(current, "model_fields", {}).get(item)
        if field is None:
            return tuple(clean) + tuple(loc[position + 1:]), None
        annotation = field.annotation
        expect_name = any(getattr(a, "__origin__", None) is dict
                          for a in [annotation, *getattr(annotation, "__args__", ())])
        models = [a for a in _candidates(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
        current = models[0] if len(models) == 1 else None
    return tuple(clean), current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _candidates(annotation: Any) -> list[Any]:
    args = getattr(annotation, "__args__", None)
    if not args:
        return [annotation]
    found = []
    for arg in args:
        found.extend(_candidates(arg))
    return found


#: how pydantic names the plain members of a union (``bool | Settings``) in an error location
_PLAIN_MEMBERS = {"bool", "int", "float", "str", "none", "is-instance[bool]"}


def _relevant(problems: list[dict]) -> list[dict]:
    """Drop a union's plain-member errors ("not a boolean") where another member got further (a key error)."""
    kept = []
    for problem in problems:
        loc = tuple(problem["loc"])
        plain = [i for i, item in enumerate(loc) if isinstance(item, str) and item in _PLAIN_MEMBERS]
        if plain and any(tuple(other["loc"][:plain[0]]) == loc[:plain[0]] and len(other["loc"]) > plain[0] + 1
                         for other in problems if other is not problem):
            continue
        kept.append(problem)
    return kept


def format_validation_error(error: ValidationError, model: type[BaseModel], where: str) -> str:
    """One line per problem, each naming the full config key."""
    lines = []
    for problem in _relevant(error.errors()):
        loc, owner = _walk(model, tuple(problem["loc"]))
        key = _path(where, loc)
        if problem["type"] == "extra_forbidden":
            allowed = sorted(owner.model_fields) if owner is not None else []
            hint = suggestion(str(loc[-1]), allowed)
            listed = f" Allowed keys: {', '.join(allowed)}" if allowed else ""
            lines.append(f"config key {key!r}: unknown key;{hint}{listed}")
        elif problem["type"] == "missing":
            lines.append(f"config key {key!r}: required but missing")
        else:
            value = problem.get("input")
            got = "" if isinstance(value, (dict, list)) else f" (got {value!r})"
            lines.append(f"config key {key!r}: {problem['msg']}{got}")
    return "\n".join(dict.fromkeys(lines))


class Settings(BaseModel):
    """Base of every settings section: unknown keys are errors, values are coerced to the declared types."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    @classmethod
    def parse(cls, data: Mapping[str, Any] | None, where: str = "") -> "Settings":
        """Validate ``data``; every problem becomes one :class:`ConfigError` naming the config key ``where.*``."""
        if data is not None and not isinstance(data, Mapping):
            raise ConfigError(f"config key {where!r}: must be a mapping of settings, got {data!r}")
        try:
            return cls.model_validate(dict(data or {}))
        except ValidationError as error:
            raise ConfigError(format_validation_error(error, cls, where)) from None

    @classmethod
    def default(cls, key: str) -> Any:
        """The declared default of ``key`` (the value the package uses where the config is silent)."""
        return cls.model_fields[key].get_default(call_default_factory=True)

    @classmethod
    def keys(cls) -> list[str]:
        return list(cls.model_fields)

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-like values (tuples as lists), e.g. for checkpoints."""
        return self.model_dump(mode="json")
