"""Detector registry, construction from settings, and detector files (``model_final.pth``).

A registered detector class may offer ``build_kwargs_from_settings(settings, in_channels, num_classes, plan)``
(a classmethod returning JSON-able constructor arguments, e.g. to plan anchors from ``plan``); without it,
the constructor gets ``in_channels``, ``num_classes`` and those ``settings`` entries that name its keywords.
Besides, detectors offer the contract's ``compute_losses``, ``predict`` and ``.encoder``. A detector file is
``{"detector": name, "build_kwargs": {...}, "state_dict": ..., **extra}`` and loads with
``torch.load(..., weights_only=True)``.

Example:
    >>> model = build_detector("retina_unet", {"preset": "resenc_demo", "fpn_channels": 16}, 1, 1,
    ...                        {"box_sizes": [[4, 4, 4]]})
    >>> save_detector("model_final.pth", model, "retina_unet", model.build_kwargs, {})  # doctest: +SKIP
    >>> model, record = load_detector("model_final.pth")  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pretrain_det3d import catalog
from pretrain_det3d.models.checkpoint import torch_load_problem
from pretrain_det3d.utils.atomic import save_torch
from pretrain_det3d.utils.registry import Registry

DETECTORS: Registry[type] = Registry("detector")

_RESERVED_KEYS = ("detector", "build_kwargs", "state_dict")


def _register_all() -> None:
    # the catalog lists the module of every detector; they are imported on first use to avoid an import cycle
    for module in catalog.DETECTOR_MODULES.values():
        importlib.import_module(module)


def get_detector_class(name: str) -> type:
    """The class registered under ``name`` (raises ``UnknownNameError`` listing the known names)."""
    _register_all()
    return DETECTORS.get(name)


def detector_build_kwargs(
    name: str, settings: dict[str, Any], in_channels: int, num_classes: int, plan: dict[str, Any],
    init_checkpoint: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """JSON-able constructor arguments of detector ``name`` (what :func:`save_detector` records).

    ``init_checkpoint`` reaches ``build_kwargs_from_settings`` when that hook takes it (a detector whose
    network the checkpoint fixes, e.g. ``retina_unet_native``); other detectors do not see it.
    """
    cls = get_detector_class(name)
    if hasattr(cls, "build_kwargs_from_settings"):
        hook = cls.build_kwargs_from_settings
        extra = {"init_checkpoint": init_checkpoint} if "init_checkpoint" in inspect.signature(hook).parameters else {}
        kwargs = hook(settings, in_channels, num_classes, plan, **extra)
    else:
        # Generic rule: the constructor keywords found in ``settings`` plus the channel and class counts.
        accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "in_channels", "num_classes"}
        kwargs = {key: value for key, value in settings.items() if key in accepted}
        kwargs.update(in_channels=int(in_channels), num_classes=int(num_classes))
    try:
        json.dumps(kwargs)
    except TypeError as error:
        raise TypeError(f"detector {name!r}: build arguments must be JSON-able ({error})") from error
    return kwargs


def build_detector(
    name: str, settings: dict[str, Any], in_channels: int, num_classes: int, plan: dict[str, Any],
    init_checkpoint: str | os.PathLike | None = None,
) -> nn.Module:
    """Build detector ``name``; its constructor arguments are kept at ``model.build_kwargs``.

    ``plan`` is the preprocessed dataset's ``plan.json`` (anchor planning reads ``"box_sizes"``);
    ``init_checkpoint`` is the checkpoint the model will be initialised from, for detectors whose network it fixes.
    """
    kwargs = detector_build_kwargs(name, settings, in_channels, num_classes, plan, init_checkpoint)
    model = get_detector_class(name)(**kwargs)
    model.build_kwargs = kwargs
    return model


def transfer_pretrained(model: nn.Module, path: str | os.PathLike, stem: str | None = None, stem_key: str = "stem"):
    """Initialise ``model`` from a pre-training checkpoint: the model's own ``load_pretrained(path)`` where it has
    one (a detector with its own checkpoint layout; ``stem`` reaches it when it takes one), otherwise the stem and
    encoder transfer of :func:`~pretrain_det3d.models.checkpoint.load_pretrained_encoder` with the stem choice of a
    multi-stem checkpoint (``stem``, chosen by config key ``stem_key``). Returns the ``TransferReport``."""
    from pretrain_det3d.models.checkpoint import load_pretrained_encoder

    loader = getattr(model, "load_pretrained", None)
    if callable(loader):
        takes_stem = stem is not None and "stem" in inspect.signature(loader).parameters
        return loader(path, stem=stem) if takes_stem else loader(path)
    return load_pretrained_encoder(model, path, stem=stem, stem_key=stem_key)


def save_detector(
    path: str | os.PathLike,
    model: nn.Module,
    name: str,
    build_kwargs: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write a detector file atomically; ``build_kwargs`` defaults to ``model.build_kwargs``.

    ``extra`` entries (e.g. ``{"plan": ..., "settings": ...}``) must be weights-only loadable
    (plain containers, numbers, strings, tensors).
    """
    if build_kwargs is None:
        build_kwargs = getattr(model, "build_kwargs", None)
        if build_kwargs is None:
            raise ValueError(f"save_detector({path}): no build_kwargs given and the model has none")
    clash = [key for key in (extra or {}) if key in _RESERVED_KEYS]
    if clash:
        raise ValueError(f"save_detector({path}): extra keys {clash} are reserved")
    record = {
        "detector": name,
        "build_kwargs": json.loads(json.dumps(build_kwargs)),  # plain containers only
        "state_dict": {key: value.detach().cpu() for key, value in model.state_dict().items()},
        **(extra or {}),
    }
    save_torch(path, record)


def load_detector(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild and load a detector file; returns ``(model, record)`` with the record's tensors on CPU."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: detector file not found")
    try:
        record = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises RuntimeError, EOFError, UnpicklingError, ... for damaged files
        raise ValueError(
            f"{path}: not a readable model checkpoint: {torch_load_problem(error)}. Delete it and rerun the "
            f"finetune job that writes it (snakemake {path})"
        ) from error
    if not isinstance(record, dict) or any(key not in record for key in _RESERVED_KEYS):
        raise ValueError(f"{path}: not a detector file (needs keys {', '.join(_RESERVED_KEYS)})")
    model = get_detector_class(record["detector"])(**record["build_kwargs"])
    try:
        model.load_state_dict(record["state_dict"])
    except RuntimeError as error:
        raise ValueError(f"{path}: weights do not fit detector {record['detector']!r}: {error}") from error
    model.build_kwargs = record["build_kwargs"]
    return model, record
