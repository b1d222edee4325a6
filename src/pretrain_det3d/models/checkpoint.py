"""Pre-training checkpoints in nnssl's schema, and transfer of their encoder into any detector.

A checkpoint file holds ``{"network_weights": state_dict, "nnssl_adaptation_plan": plan}``. The plan tells a
downstream user where the encoder sits in the state dict (``key_to_encoder``, ``key_to_stem``), which
convolutions read the raw input (``keys_to_in_proj``; every conv of ``dynamic_network_architectures``
appears twice in a state dict, so both names are listed), how many input channels pre-training saw, the
pre-training patch size and how to rebuild the network (``architecture_plans``). Only plain containers,
strings, numbers and tensors are stored, so ``torch.load(..., weights_only=True)`` reads it, and checkpoints
released by nnssl users load through the same code.

Transfer copies only the stem and the encoder stages (neck, decoder and heads stay random) and refuses any
shape disagreement: a silent partial load is how a "pre-trained" run quietly trains from scratch.

Example:
    >>> from pretrain_det3d.models.backbone import build_resenc_unet
    >>> net = build_resenc_unet("resenc_demo", 1, 1)
    >>> save_pretraining_checkpoint("ckpt.pth", net, "resenc_demo", 1, [32, 32, 32], "mae")  # doctest: +SKIP
    >>> report = load_pretrained_encoder(detector, "ckpt.pth")  # doctest: +SKIP
"""

from __future__ import annotations

import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from pretrain_det3d.models.backbone import architecture_plan, get_preset
from pretrain_det3d.utils.atomic import save_torch

#: Where the encoder of a ``ResidualEncoderUNet`` sits in its state dict (and in every detector here).
KEY_TO_ENCODER = "encoder.stages"
KEY_TO_STEM = "encoder.stem"
#: The stem's first conv under both of its state-dict names (``.conv`` and ``.all_modules.0``).
KEYS_TO_IN_PROJ = ("encoder.stem.convs.0.conv", "encoder.stem.convs.0.all_modules.0")
#: Prefixes added by DistributedDataParallel and torch.compile; stripped on load.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")

_PLAN_REQUIRED_KEYS = ("key_to_encoder", "key_to_stem")


class CheckpointFormatError(ValueError):
    """A file is not a pre-training checkpoint in nnssl's schema, or it does not fit the model."""


@dataclass
class TransferReport:
    """What :func:`load_pretrained_encoder` did, in the target model's key names (skipped: checkpoint names)."""

    loaded_keys: list[str] = field(default_factory=list)
    skipped_keys: list[str] = field(default_factory=list)
    adapted_keys: list[str] = field(default_factory=list)


def _plain(value: Any, where: str) -> Any:
    # weights_only loading accepts only plain containers and scalars; tuples become lists like in JSON.
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v, where) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v, where) for k, v in value.items()}
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return _plain(value.tolist(), where)
    raise TypeError(f"{where}: value of type {type(value).__name__} cannot be stored in a weights-only checkpoint")


def adaptation_plan(
    preset: str,
    in_channels: int,
    patch_size: Sequence[int],
    method: str,
    pretrain_plan: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``nnssl_adaptation_plan`` entry for a ResEnc U-Net pre-trained with ``method``.

    ``pretrain_plan`` is the pre-training data plan (nnssl keeps its ``Plan`` there); without one a
    minimal record with the patch size is written.

    Example:
        >>> adaptation_plan("resenc_demo", 1, [32, 32, 32], "mae")["key_to_stem"]
        'encoder.stem'
    """
    get_preset(preset)  # fail early on an unknown preset name
    if pretrain_plan is None:
        pretrain_plan = {"plans_name": "pretrain_det3d", "configurations": {"patch_size": list(patch_size)}}
    plan = {
        "architecture_plans": architecture_plan(preset),
        "pretrain_plan": pretrain_plan,
        "pretrain_num_input_channels": int(in_channels),
        "recommended_downstream_patchsize": [int(p) for p in patch_size],
        "key_to_encoder": KEY_TO_ENCODER,
        "key_to_stem": KEY_TO_STEM,
        "keys_to_in_proj": list(KEYS_TO_IN_PROJ),
        "key_to_lpe": None,  # no learnt positional embedding in a CNN
        # Not an nnssl field (its readers ignore unknown keys): which method produced the weights.
        "pretrain_method": method,
        "backbone_preset": preset,
    }
    return _plain(plan, "nnssl_adaptation_plan")


def save_pretraining_checkpoint(
    path: str | os.PathLike,
    network: nn.Module,
    preset: str,
    in_channels: int,
    patch_size: Sequence[int],
    method: str,
    pretrain_plan: dict[str, Any] | None = None,
) -> None:
    """Write ``network``'s weights and the adaptation plan atomically in nnssl's schema.

    ``network`` is the pre-training network (a ``ResidualEncoderUNet`` or any module whose encoder sits at
    ``.encoder``); tensors are stored on the CPU.

    Example:
        >>> save_pretraining_checkpoint("results/pretrain/mae/checkpoint_final.pth", net, "resenc_l", 1,
        ...                             [160, 160, 160], "mae")  # doctest: +SKIP
    """
    state = {key: tensor.detach().cpu().clone() for key, tensor in network.state_dict().items()}
    record = {
        "network_weights": state,
        "nnssl_adaptation_plan": adaptation_plan(preset, in_channels, patch_size, method, pretrain_plan),
    }
    save_torch(path, record)


def _strip_wrapper_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
    return key


#: What a checkpoint file must hold, for messages.
EXPECTED_CHECKPOINT = (
    "a torch.save'd dict {'network_weights': state dict of tensors, 'nnssl_adaptation_plan': {...}} holding only "
    "tensors, numbers, strings and plain containers"
)


def torch_load_problem(error: BaseException) -> str:
    """Why ``torch.load(..., weights_only=True)`` refused a file, in a few words and without torch's advice to
    retry with ``weights_only=False`` (this project never unpickles arbitrary objects).

    Example:
        >>> torch_load_problem(EOFError())
        'it is empty or cut short'
        >>> torch_load_problem(RuntimeError("PytorchStreamReader failed reading zip archive: failed finding "
        ...                                 "central directory. This is an internal miniz error."))
        'it is truncated or damaged (PytorchStreamReader failed reading zip archive: failed finding central directory)'
    """
    if isinstance(error, pickle.UnpicklingError):
        found = re.search(r"GLOBAL (\S+)", str(error))
        named = f" ({found[1]})" if found else ""
        return f"it holds Python objects{named} that a weights-only load refuses"
    text = str(error).strip()
    if isinstance(error, EOFError) or not text:
        return "it is empty or cut short"
    return f"it is truncated or damaged ({text.split('. ')[0].splitlines()[0].rstrip('.')})"


def read_pretraining_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Return ``(network_weights, adaptation_plan)``; raise :class:`CheckpointFormatError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: pre-training checkpoint not found")
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling errors come in many types
        # torch's own text advises weights_only=False, i.e. running code from the file: never repeat that
        raise CheckpointFormatError(
            f"{path}: not a safe nnssl checkpoint: {torch_load_problem(error)}. Checkpoints are only read with a "
            f"weights-only load (no pickled code); expected {EXPECTED_CHECKPOINT}"
        ) from error
    if not isinstance(record, dict):
        raise CheckpointFormatError(f"{path}: expected a dict in nnssl's schema, got {type(record).__name__}")
    for key in ("network_weights", "nnssl_adaptation_plan"):
        if key not in record:
            raise CheckpointFormatError(f"{path}: not an nnssl pre-training checkpoint (no {key!r} entry)")
    plan = record["nnssl_adaptation_plan"]
    if not isinstance(plan, dict) or any(k not in plan for k in _PLAN_REQUIRED_KEYS):
        raise CheckpointFormatError(
            f"{path}: 'nnssl_adaptation_plan' must name {', '.join(_PLAN_REQUIRED_KEYS)}"
        )
    weights = {_strip_wrapper_prefixes(k): v for k, v in record["network_weights"].items()}
    return weights, plan


def _adapt_input_projection(weight: torch.Tensor, target_in: int, path: Path, key: str) -> torch.Tensor:
    """Repeat a conv kernel over input channels and divide by the repeat factor.

    On an input whose channels are copies of one pre-training channel the adapted conv gives the same
    output as the original one.
    """
    source_in = weight.shape[1]
    if target_in % source_in != 0:
        raise CheckpointFormatError(
            f"{path}: {key} was pre-trained on {source_in} input channels; cannot adapt it to {target_in} "
            f"(needs a multiple of {source_in})"
        )
    factor = target_in // source_in
    repeats = (1, factor) + (1,) * (weight.ndim - 2)
    return weight.repeat(*repeats) / factor


def load_pretrained_encoder(model: nn.Module, path: str | os.PathLike) -> TransferReport:
    """Copy the stem and encoder stages of a pre-training checkpoint into ``model.encoder``.

    Keys under the plan's ``key_to_stem`` map onto ``encoder.stem``, keys under ``key_to_encoder`` onto
    ``encoder.stages``; everything else (decoder, heads) is skipped. The input projection is adapted when
    the model reads more channels than pre-training did. Any missing key or shape disagreement raises
    :class:`CheckpointFormatError` naming the file and the key.

    Example:
        >>> report = load_pretrained_encoder(detector, "results/pretrain/mae/checkpoint_final.pth")  # doctest: +SKIP
        >>> report.adapted_keys  # doctest: +SKIP
        []
    """
    path = Path(path)
    if not hasattr(model, "encoder"):
        raise TypeError(f"{type(model).__name__} has no .encoder; cannot load {path}")
    weights, plan = read_pretraining_checkpoint(path)
    key_to_stem, key_to_encoder = plan["key_to_stem"], plan["key_to_encoder"]
    in_proj = {f"{k}.weight" for k in (plan.get("keys_to_in_proj") or KEYS_TO_IN_PROJ)}
    targets = {key_to_stem: "encoder.stem", key_to_encoder: "encoder.stages"}
    # Longest source prefix first, so that a stem nested inside the encoder prefix maps to the stem.
    ordered_sources = sorted(targets, key=len, reverse=True)

    model_state = model.state_dict()
    wanted = {k for k in model_state if k.startswith(("encoder.stem.", "encoder.stages."))}
    if not wanted:
        raise CheckpointFormatError(f"{path}: the model has no encoder.stem / encoder.stages parameters to load")

    report = TransferReport()
    new_state: dict[str, torch.Tensor] = {}
    for source_key, tensor in weights.items():
        source_prefix = next((p for p in ordered_sources if source_key.startswith(p + ".")), None)
        if source_prefix is None:
            report.skipped_keys.append(source_key)
            continue
        target_key = targets[source_prefix] + source_key[len(source_prefix) :]
        if target_key not in model_state:
            raise CheckpointFormatError(
                f"{path}: {source_key} (-> {target_key}) has no counterpart in {type(model).__name__}; "
                "the pre-trained encoder does not match the model's backbone preset"
            )
        target = model_state[target_key]
        if source_key in in_proj and tensor.ndim == target.ndim and tensor.shape[1] != target.shape[1]:
            if tensor.shape[:1] + tensor.shape[2:] == target.shape[:1] + target.shape[2:]:
                tensor = _adapt_input_projection(tensor, target.shape[1], path, source_key)
                report.adapted_keys.append(target_key)
        if tensor.shape != target.shape:
            raise CheckpointFormatError(
                f"{path}: shape mismatch at {source_key}: checkpoint {tuple(tensor.shape)} vs model "
                f"{target_key} {tuple(target.shape)}"
            )
        new_state[target_key] = tensor.to(dtype=target.dtype)
        report.loaded_keys.append(target_key)

    missing = sorted(wanted - set(new_state))
    if missing:
        raise CheckpointFormatError(
            f"{path}: the checkpoint lacks {len(missing)} encoder tensors of the model, e.g. {missing[0]}"
        )
    model.load_state_dict(new_state, strict=False)
    return report
