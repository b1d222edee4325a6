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

MultiTalent checkpoints hold one stem per source dataset (:data:`MULTITALENT_STEMS_KEY`, the release's layout
``encoder.stem.<stem id>.``); the transfer loads the chosen one (``stem``) and names the stems present when the
chosen one is missing. A checkpoint with a single stem ignores the choice.

The ``pretrain_plan`` written here has the structure of nnssl's ``Plan`` (``Plan.from_dict``: the plan fields and
``configurations`` as configuration name -> ``ConfigurationPlan`` fields), so nnssl's
``AdaptationPlan.from_dict`` reads our checkpoints; files written before (a flat ``configurations`` with only
the patch size) are still read.

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
from typing import Any, Mapping, Sequence

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

#: The fields of nnssl's ``Plan`` (``nnssl/experiment_planning/experiment_planners/plan.py``): its ``from_dict``
#: passes the dict to the dataclass, so every one must be present and no other key may be.
NNSSL_PLAN_FIELDS = (
    "dataset_name", "plans_name", "original_median_spacing_after_transp", "image_reader_writer",
    "transpose_forward", "transpose_backward", "configurations", "experiment_planner_used",
)
#: The fields of nnssl's ``ConfigurationPlan`` (same file); the last two may be omitted (default ``None``).
NNSSL_CONFIGURATION_FIELDS = (
    "data_identifier", "preprocessor_name", "spacing_style", "normalization_schemes", "use_mask_for_norm",
    "resampling_fn_data", "resampling_fn_data_kwargs", "resampling_fn_mask", "resampling_fn_mask_kwargs",
    "spacing", "patch_size",
)
#: The configuration name our plans use. nnssl names a configuration after its spacing style (``median``,
#: ``onemmiso``, ``noresample``; ``default_experiment_planner.py``) and keeps only the one it trained with
#: (``AbstractTrainer``); the corpus is resampled to its median spacing unless
#: ``pretraining.corpus.preprocessing.target_spacing`` is set.
NNSSL_CONFIGURATION_NAME = "median"
#: What the corpus preprocessing does (``data.preprocessing``), in nnssl's terms, for fields a caller leaves out.
_DEFAULT_PLAN: dict[str, Any] = {
    "dataset_name": "pretrain_det3d_corpus",
    "plans_name": "pretrain_det3d",
    "original_median_spacing_after_transp": None,  # unknown to the checkpoint writer
    "image_reader_writer": "SimpleITKIO",  # data.io.read_image reads every image through SimpleITK
    "transpose_forward": [0, 1, 2],  # volumes are never transposed here
    "transpose_backward": [0, 1, 2],
    "experiment_planner_used": "pretrain_det3d.data.preprocessing",
}
_DEFAULT_CONFIGURATION: dict[str, Any] = {
    "preprocessor_name": "pretrain_det3d.data.preprocessing.preprocess_corpus",
    "spacing_style": "median",
    "normalization_schemes": ["CTNormalization"],  # corpus modality default 'CT'
    "use_mask_for_norm": [False],
    "resampling_fn_data": "resample_data_or_seg_to_shape",  # nnunetv2's, as data.preprocessing calls it
    "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": False},
    "resampling_fn_mask": "resample_data_or_seg_to_shape",
    "resampling_fn_mask_kwargs": {"is_seg": True, "order": 0, "order_z": 0, "force_separate_z": False},
    "spacing": None,
}

#: Where the MultiTalent ResEnc release keeps its per-dataset stems (``MIC-DKFZ/ResEncL-MissingPiece-MultiTalent``;
#: nnDetection ``docs/finetuning.md`` section 3.4 and ``nndet/utils/load_weights_utils.py``
#: ``resolve_stem_override``): stem ``<id>`` sits at ``encoder.stem.<id>.`` with a single stem's own module names
#: below it (``encoder.stem.351_0.convs.0.conv.weight``); the plan's ``key_to_stem`` names the default stem
#: (``encoder.stem.351_0``, the CT stem) and ``keys_to_in_proj`` its first conv. Writers of multi-stem
#: checkpoints use :func:`multitalent_stem_prefix` (or a ``nn.ModuleDict`` of stems at ``encoder.stem``).
MULTITALENT_STEMS_KEY = KEY_TO_STEM
#: Children of a single ``StackedConvBlocks`` stem in a state dict: a checkpoint whose ``encoder.stem`` holds only
#: these has one stem, any other child name is a stem id.
_SINGLE_STEM_CHILDREN = frozenset({"convs"})


class CheckpointFormatError(ValueError):
    """A file is not a pre-training checkpoint in nnssl's schema, or it does not fit the model."""


@dataclass
class TransferReport:
    """What :func:`load_pretrained_encoder` did, in the target model's key names (skipped: checkpoint names)."""

    loaded_keys: list[str] = field(default_factory=list)
    skipped_keys: list[str] = field(default_factory=list)
    adapted_keys: list[str] = field(default_factory=list)
    #: the checkpoint's stem prefix that was loaded (e.g. ``encoder.stem.351_0``), ``None`` if nothing was loaded
    stem: str | None = None


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


def multitalent_stem_prefix(stem_id: str) -> str:
    """The state-dict prefix of stem ``stem_id`` in the MultiTalent release's layout (:data:`MULTITALENT_STEMS_KEY`).

    Example:
        >>> multitalent_stem_prefix("351_0")
        'encoder.stem.351_0'
    """
    if not stem_id or "." in stem_id:
        raise ValueError(f"a stem id is one state-dict name component (e.g. '351_0'), got {stem_id!r}")
    return f"{MULTITALENT_STEMS_KEY}.{stem_id}"


def stem_keys_to_in_proj(stem_prefix: str) -> list[str]:
    """The two state-dict names of the first conv of the stem at ``stem_prefix`` (``.conv`` and ``.all_modules.0``,
    as :data:`KEYS_TO_IN_PROJ` for the single stem).

    Example:
        >>> stem_keys_to_in_proj("encoder.stem.004")
        ['encoder.stem.004.convs.0.conv', 'encoder.stem.004.convs.0.all_modules.0']
    """
    return [f"{stem_prefix}{key[len(KEY_TO_STEM):]}" for key in KEYS_TO_IN_PROJ]


def checkpoint_stems(weights: Mapping[str, Any]) -> list[str]:
    """The stem ids of a multi-stem checkpoint (children of :data:`MULTITALENT_STEMS_KEY`), ``[]`` for a single stem.

    Example:
        >>> checkpoint_stems({"encoder.stem.351_0.convs.0.conv.weight": 0, "encoder.stem.004.convs.0.conv.weight": 0})
        ['004', '351_0']
        >>> checkpoint_stems({"encoder.stem.convs.0.conv.weight": 0})
        []
    """
    head = MULTITALENT_STEMS_KEY + "."
    children = {key[len(head):].split(".", 1)[0] for key in weights if key.startswith(head)}
    return sorted(children - _SINGLE_STEM_CHILDREN)


def resolve_stem(
    weights: Mapping[str, Any],
    plan: Mapping[str, Any],
    stem: str | None,
    path: str | os.PathLike = "checkpoint",
    stem_key: str = "stem",
) -> tuple[str, list[str]]:
    """``(key_to_stem, keys_to_in_proj)`` of the stem to load from a checkpoint.

    A single-stem checkpoint gives its plan's keys whatever ``stem`` says. In a multi-stem checkpoint ``stem`` (a
    stem id such as ``351_0`` or a whole prefix such as ``encoder.stem.351_0``; ``None``: the plan's
    ``key_to_stem``) must name one of its stems, else :class:`CheckpointFormatError` names the file, the choice,
    the config key ``stem_key`` and the stems present.

    Example:
        >>> weights = {"encoder.stem.351_0.convs.0.conv.weight": 0, "encoder.stem.004.convs.0.conv.weight": 0}
        >>> resolve_stem(weights, {"key_to_stem": "encoder.stem.351_0"}, "004")[0]
        'encoder.stem.004'
    """
    ids = checkpoint_stems(weights)
    if not ids:
        return plan["key_to_stem"], list(plan.get("keys_to_in_proj") or KEYS_TO_IN_PROJ)
    prefixes = {multitalent_stem_prefix(stem_id): stem_id for stem_id in ids}
    if stem is None:
        chosen = plan["key_to_stem"]
        if chosen not in prefixes:
            raise CheckpointFormatError(
                f"{path}: the checkpoint holds {len(ids)} stems ({', '.join(ids)}) and its plan's key_to_stem "
                f"{chosen!r} is none of them; choose one with the config key {stem_key}"
            )
    else:
        chosen = stem if stem in prefixes else f"{MULTITALENT_STEMS_KEY}.{stem}"
        if chosen not in prefixes:
            raise CheckpointFormatError(
                f"{path}: no stem {stem!r} (config key {stem_key}); the checkpoint holds {len(ids)} stems under "
                f"{MULTITALENT_STEMS_KEY}.<id>: {', '.join(ids)}"
            )
    if chosen == plan.get("key_to_stem") and plan.get("keys_to_in_proj"):
        return chosen, list(plan["keys_to_in_proj"])
    return chosen, stem_keys_to_in_proj(chosen)


def _is_flat_configuration(configurations: Mapping[str, Any]) -> bool:
    # the layout written before: the fields of one configuration without its name ({"patch_size": [...]})
    return any(key in NNSSL_CONFIGURATION_FIELDS or not isinstance(value, Mapping)
               for key, value in configurations.items())


def nnssl_pretrain_plan(
    patch_size: Sequence[int], given: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(pretrain_plan, extras)``: ``given`` completed into the structure of nnssl's ``Plan``, and its other keys.

    Fields of nnssl's ``Plan`` in ``given`` win over what the corpus preprocessing does by default; a flat
    ``configurations`` (one configuration's fields, the layout written before) becomes configuration
    :data:`NNSSL_CONFIGURATION_NAME`; each configuration without a patch size gets ``patch_size``. Keys that are
    not plan fields (``run_fingerprint``) come back as ``extras``: nnssl's ``Plan`` takes no other keys, so the
    caller keeps them elsewhere (:func:`adaptation_plan`: beside the plan). A configuration with a key nnssl's
    ``ConfigurationPlan`` lacks raises ``ValueError``.

    Example:
        >>> plan, extras = nnssl_pretrain_plan([64, 64, 64], {"configurations": {"patch_size": [32, 32, 32]},
        ...                                                   "run_fingerprint": {"seed": 0}})
        >>> plan["configurations"]["median"]["patch_size"], extras
        ([32, 32, 32], {'run_fingerprint': {'seed': 0}})
    """
    given = dict(given or {})
    configurations = given.pop("configurations", None) or {}
    extras = {key: given.pop(key) for key in list(given) if key not in NNSSL_PLAN_FIELDS}
    plan = {**_DEFAULT_PLAN, **given}
    if not isinstance(configurations, Mapping):
        raise ValueError(f"pretrain_plan.configurations must be a mapping, got {type(configurations).__name__}")
    if not configurations or _is_flat_configuration(configurations):
        configurations = {NNSSL_CONFIGURATION_NAME: configurations}
    completed = {}
    for name, configuration in configurations.items():
        unknown = sorted(set(configuration) - set(NNSSL_CONFIGURATION_FIELDS))
        if unknown:
            raise ValueError(f"pretrain_plan.configurations.{name}: {unknown} are not fields of nnssl's "
                             f"ConfigurationPlan ({', '.join(NNSSL_CONFIGURATION_FIELDS)})")
        full = {"data_identifier": f"{plan['plans_name']}_{name}", **_DEFAULT_CONFIGURATION, **configuration}
        if full.get("patch_size") is None:
            full["patch_size"] = [int(p) for p in patch_size]
        completed[str(name)] = full
    plan["configurations"] = completed
    return plan, extras


def pretrain_patch_size(plan: Mapping[str, Any]) -> list[int] | None:
    """The pre-training patch size an adaptation plan records, in either ``pretrain_plan`` layout (nnssl's, or the
    flat one written before), else its ``recommended_downstream_patchsize``.

    Example:
        >>> pretrain_patch_size({"pretrain_plan": {"configurations": {"patch_size": [32, 32, 32]}}})
        [32, 32, 32]
    """
    configurations = (plan.get("pretrain_plan") or {}).get("configurations") or {}
    if isinstance(configurations, Mapping) and configurations:
        if _is_flat_configuration(configurations):
            configurations = {"": configurations}
        for configuration in configurations.values():
            if configuration.get("patch_size") is not None:
                return [int(p) for p in configuration["patch_size"]]
    size = plan.get("recommended_downstream_patchsize")
    return None if size is None else [int(p) for p in size]


def adaptation_plan(
    preset: str,
    in_channels: int,
    patch_size: Sequence[int],
    method: str,
    pretrain_plan: Mapping[str, Any] | None = None,
    stem: str | None = None,
) -> dict[str, Any]:
    """The ``nnssl_adaptation_plan`` entry for a ResEnc U-Net pre-trained with ``method``.

    ``pretrain_plan`` is the pre-training data plan; it is completed into nnssl's ``Plan`` structure
    (:func:`nnssl_pretrain_plan`), and its keys that are no ``Plan`` field (``run_fingerprint``) are stored beside
    it at the top level of the adaptation plan (nnssl's ``AdaptationPlan.from_dict`` ignores keys it does not
    know). ``stem``: the default stem id of a multi-stem (MultiTalent) network, whose stems sit at
    :func:`multitalent_stem_prefix`; ``None`` for a network with one stem at ``encoder.stem``.

    Example:
        >>> adaptation_plan("resenc_demo", 1, [32, 32, 32], "mae")["key_to_stem"]
        'encoder.stem'
        >>> adaptation_plan("resenc_demo", 1, [32, 32, 32], "multitalent", stem="351_0")["keys_to_in_proj"][0]
        'encoder.stem.351_0.convs.0.conv'
    """
    get_preset(preset)  # fail early on an unknown preset name
    nnssl_plan, extras = nnssl_pretrain_plan(patch_size, pretrain_plan)
    key_to_stem = KEY_TO_STEM if stem is None else multitalent_stem_prefix(stem)
    plan = {
        "architecture_plans": architecture_plan(preset),
        "pretrain_plan": nnssl_plan,
        "pretrain_num_input_channels": int(in_channels),
        "recommended_downstream_patchsize": [int(p) for p in patch_size],
        "key_to_encoder": KEY_TO_ENCODER,
        "key_to_stem": key_to_stem,
        "keys_to_in_proj": list(KEYS_TO_IN_PROJ) if stem is None else stem_keys_to_in_proj(key_to_stem),
        "key_to_lpe": None,  # no learnt positional embedding in a CNN
        # Not nnssl fields (its readers ignore unknown keys): which method produced the weights.
        "pretrain_method": method,
        "backbone_preset": preset,
    }
    clashes = sorted(set(extras) & set(plan))
    if clashes:
        raise ValueError(f"pretrain_plan keys {clashes} clash with adaptation-plan fields")
    plan.update(extras)
    return _plain(plan, "nnssl_adaptation_plan")


def save_pretraining_checkpoint(
    path: str | os.PathLike,
    network: nn.Module,
    preset: str,
    in_channels: int,
    patch_size: Sequence[int],
    method: str,
    pretrain_plan: Mapping[str, Any] | None = None,
    stem: str | None = None,
) -> None:
    """Write ``network``'s weights and the adaptation plan atomically in nnssl's schema.

    ``network`` is the pre-training network (a ``ResidualEncoderUNet`` or any module whose encoder sits at
    ``.encoder``); tensors are stored on the CPU. ``stem``: the default stem id of a network with one stem per
    source dataset in the MultiTalent release's layout (``encoder.stem`` a ``nn.ModuleDict`` of stems, i.e. keys
    ``encoder.stem.<id>.``; see :data:`MULTITALENT_STEMS_KEY`); it must be one of the network's stems.

    Example:
        >>> save_pretraining_checkpoint("results/pretrain/mae/checkpoint_final.pth", net, "resenc_l", 1,
        ...                             [160, 160, 160], "mae")  # doctest: +SKIP
    """
    state = {key: tensor.detach().cpu().clone() for key, tensor in network.state_dict().items()}
    if stem is not None and stem not in checkpoint_stems(state):
        raise ValueError(f"{path}: default stem {stem!r} is not among the network's stems "
                         f"{checkpoint_stems(state)} (keys {MULTITALENT_STEMS_KEY}.<id>.)")
    record = {
        "network_weights": state,
        "nnssl_adaptation_plan": adaptation_plan(preset, in_channels, patch_size, method, pretrain_plan, stem),
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


def load_pretrained_encoder(
    model: nn.Module, path: str | os.PathLike, stem: str | None = None, stem_key: str = "stem",
) -> TransferReport:
    """Copy the stem and encoder stages of a pre-training checkpoint into ``model.encoder``.

    Keys under the stem prefix map onto ``encoder.stem``, keys under the plan's ``key_to_encoder`` onto
    ``encoder.stages``; everything else (decoder, heads, the other stems of a multi-stem checkpoint) is skipped.
    The stem prefix is the plan's ``key_to_stem``, or in a checkpoint with one stem per source dataset the stem
    ``stem`` (:func:`resolve_stem`; ``stem_key`` is the config key that chose it, for the error listing the
    stems present). The input projection is adapted when the model reads more channels than pre-training did.
    Any missing key or shape disagreement raises :class:`CheckpointFormatError` naming the file and the key.

    Example:
        >>> report = load_pretrained_encoder(detector, "results/pretrain/mae/checkpoint_final.pth")  # doctest: +SKIP
        >>> report.adapted_keys  # doctest: +SKIP
        []
        >>> load_pretrained_encoder(detector, "multitalent.pth", stem="004").stem  # doctest: +SKIP
        'encoder.stem.004'
    """
    path = Path(path)
    if not hasattr(model, "encoder"):
        raise TypeError(f"{type(model).__name__} has no .encoder; cannot load {path}")
    weights, plan = read_pretraining_checkpoint(path)
    key_to_stem, keys_to_in_proj = resolve_stem(weights, plan, stem, path, stem_key)
    key_to_encoder = plan["key_to_encoder"]
    in_proj = {f"{k}.weight" for k in keys_to_in_proj}
    targets = {key_to_stem: "encoder.stem", key_to_encoder: "encoder.stages"}
    # Longest source prefix first, so that a stem nested inside the encoder prefix maps to the stem.
    ordered_sources = sorted(targets, key=len, reverse=True)

    model_state = model.state_dict()
    wanted = {k for k in model_state if k.startswith(("encoder.stem.", "encoder.stages."))}
    if not wanted:
        raise CheckpointFormatError(f"{path}: the model has no encoder.stem / encoder.stages parameters to load")

    report = TransferReport(stem=key_to_stem)
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
