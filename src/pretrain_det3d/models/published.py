"""Published pre-training checkpoints (for example the paper authors' releases) as initialisations.

A config entry ``pretraining.published.<name>`` gives ``url`` or ``path`` and ``sha256``. The workflow fetches
it to ``results/pretrain/<name>/checkpoint_final.pth``, the same place a pre-training job writes to, so the
name works as ``{init}`` everywhere a pre-trained method does. The file counts as fetched only after its hash
matched and it loaded (``torch.load(weights_only=True)``) as an nnssl checkpoint.

A MultiTalent checkpoint holds one stem per source dataset; the entry's ``stem`` (default: the release's CT stem
:data:`MULTITALENT_CT_STEM`) and ``stem_per_dataset`` (dataset name -> stem id, e.g. an MRI dataset) choose the
one fine-tuning loads (:func:`published_init_stem`); a checkpoint with one stem ignores both.

Example:
    >>> entry = {"url": "https://huggingface.co/MIC-DKFZ/ResEncL-MissingPiece-MAE/resolve/main/checkpoint_final.pth",
    ...          "sha256": None}
    >>> fetch_published_checkpoint(entry, "results/pretrain/mae_published/checkpoint_final.pth")  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Mapping

from pretrain_det3d.utils.atomic import atomic_path, write_json

LOGGER = logging.getLogger(__name__)

#: keys of a published-checkpoint entry that choose the stem to load, not the file (they do not reach the fetch)
STEM_ENTRY_KEYS = ("stem", "stem_per_dataset")
#: keys a published-checkpoint entry may hold
ENTRY_KEYS = ("url", "path", "sha256", "description", "licence", *STEM_ENTRY_KEYS)

#: The CT stem of the authors' MultiTalent releases, what their plans' ``key_to_stem`` default to (nnDetection
#: ``docs/finetuning.md`` section 3.4: "the CT stem (``351_0``) is what the provided checkpoints' plans default
#: to"); the default of ``pretraining.published.<name>.stem`` (``settings.study.PublishedCheckpointEntry``).
MULTITALENT_CT_STEM = "351_0"


#: The authors' native Retina U-Net checkpoint (nnDetection docs/finetuning.md: "the encoder and FPN decoder of a
#: Retina U-Net, without the detection heads"), for detector ``retina_unet_native``.
NATIVE_MULTITALENT_URL = (
    "https://huggingface.co/MIC-DKFZ/RetinaUNet-MissingPiece-MultiTalent/resolve/main/checkpoint_final.pth"
)
#: its default stem (the CT stem, docs/finetuning.md section 3.4); ``stem.<id>`` prefixes, one per source dataset
NATIVE_MULTITALENT_DEFAULT_STEM = f"stem.{MULTITALENT_CT_STEM}"
#: the network it fixes, as ``architecture_plans.arch_kwargs`` keys (nndet/conf/train/model_cfg/
#: retinaunet_l1_focal_atss_ms_ema_for_ConvBackboneMultiTalent.yaml ``backbone_kwargs``; used for keys a
#: checkpoint's plan lacks)
NATIVE_MULTITALENT_ARCH_KWARGS: dict[str, Any] = {
    "features_per_stage": [32, 64, 128, 256, 320, 320],
    "kernel_sizes": [3, 3, 3, 3, 3, 3],
    "strides": [2, 2, 2, 2, 2],
    "fpn_channels": 128,
    "decoder_levels": [2, 3, 4, 5],
}

_UFPN_LATERAL = re.compile(r"decoder\.lateral\.P(\d+)\.0\.conv\.(weight|bias)")
_UFPN_OUT = re.compile(r"decoder\.out\.P(\d+)\.0\.conv\.(weight|bias)")
_UFPN_UP = re.compile(r"decoder\.up\.P(\d+)\.conv\.weight")
_LEVEL0 = re.compile(r"backbone\.levels\.0\.component\.(\d+)\.(.+)")
_STEM_PARTS = {"0": "conv", "1": "norm"}  # the stem is nn.Sequential(conv, norm): numeric names


def native_release_target_key(key: str, stem: str) -> str | None:
    """Where a tensor of the released native checkpoint goes in ``NativeRetinaUNet``, or ``None`` (not loaded).

    The release's layout (nnDetection ``nndet/ptmodule/retinaunet/DetSegModel_TL.py``): ``<stem>.0`` /
    ``<stem>.1`` are the chosen stem's conv and norm, which become level 0's first block; the checkpoint's
    ``backbone.levels.0.component.<j>`` is level 0's block ``j + 1``; other ``backbone.*`` keys keep their
    names (under ``encoder.``); the UFPN keeps nnDetection's names under ``decoder.`` (``lateral.P<l>.0.conv``,
    ``out.P<l>.0.conv``, ``up.P<l>.conv``), which map to ``decoder.lateral.<l>``, ``decoder.out.<l>`` and
    ``decoder.up.<l - 1>``. Other stems, segmentation layers and anything else give ``None``.

    Example:
        >>> native_release_target_key("stem.351_0.1.bias", "stem.351_0")
        'encoder.levels.0.component.0.norm.bias'
        >>> native_release_target_key("backbone.levels.0.component.0.conv.weight", "stem.351_0")
        'encoder.levels.0.component.1.conv.weight'
        >>> native_release_target_key("decoder.up.P3.conv.weight", "stem.351_0")
        'decoder.up.2.weight'
        >>> native_release_target_key("stem.004.0.weight", "stem.351_0") is None
        True
    """
    if key.startswith(stem + "."):
        index, _, rest = key[len(stem) + 1:].partition(".")
        part = _STEM_PARTS.get(index)
        return f"encoder.levels.0.component.0.{part}.{rest}" if part and rest else None
    if (match := _LEVEL0.fullmatch(key)):
        return f"encoder.levels.0.component.{int(match[1]) + 1}.{match[2]}"
    if key.startswith("backbone."):
        return "encoder." + key[len("backbone."):]
    if (match := _UFPN_LATERAL.fullmatch(key)):
        return f"decoder.lateral.{match[1]}.{match[2]}"
    if (match := _UFPN_OUT.fullmatch(key)):
        return f"decoder.out.{match[1]}.{match[2]}"
    if (match := _UFPN_UP.fullmatch(key)) and int(match[1]) > 0:
        return f"decoder.up.{int(match[1]) - 1}.weight"
    return None


class PublishedCheckpointError(ValueError):
    """A published-checkpoint entry or file is unusable; the message names the entry key or the file."""


def published_init_stem(entry: Mapping[str, Any], dataset: str,
                        where: str = "pretraining.published") -> tuple[str, str]:
    """``(stem id, config key)``: the stem fine-tuning on ``dataset`` loads from the entry's checkpoint.

    ``stem_per_dataset[dataset]`` where the entry has one for ``dataset``, else ``stem``, else the release's CT
    stem; the config key names where the choice came from (for the error listing the stems present).

    Example:
        >>> published_init_stem({"stem_per_dataset": {"duke_breast": "004"}}, "duke_breast", "pretraining.published.mt")
        ('004', 'pretraining.published.mt.stem_per_dataset.duke_breast')
        >>> published_init_stem({}, "luna16", "pretraining.published.mt")
        ('351_0', 'pretraining.published.mt.stem')
    """
    per_dataset = entry.get("stem_per_dataset") or {}
    if dataset in per_dataset:
        return str(per_dataset[dataset]), f"{where}.stem_per_dataset.{dataset}"
    return str(entry.get("stem") or MULTITALENT_CT_STEM), f"{where}.stem"


def fetch_entry(entry: Mapping[str, Any]) -> dict[str, Any]:
    """The keys of an entry that describe the file (without the stem choice: choosing another stem must not fetch
    the checkpoint again).

    Example:
        >>> fetch_entry({"url": "https://host/c.pth", "sha256": None, "stem": "004"})
        {'url': 'https://host/c.pth', 'sha256': None}
    """
    return {key: value for key, value in entry.items() if key not in STEM_ENTRY_KEYS}


def _check_entry(entry: Mapping[str, Any], where: str) -> None:
    unknown = sorted(set(entry) - set(ENTRY_KEYS))
    if unknown:
        raise PublishedCheckpointError(f"{where}: unknown keys {unknown}; allowed: {list(ENTRY_KEYS)}")
    if bool(entry.get("url")) == bool(entry.get("path")):
        raise PublishedCheckpointError(f"{where}: give exactly one of 'url' and 'path'")


def fetch_published_checkpoint(entry: Mapping[str, Any], out_path: str | os.PathLike,
                               where: str = "pretraining.published") -> Path:
    """Download (or copy) a published checkpoint to ``out_path``, verify its hash and its nnssl schema.

    With ``sha256: null`` the file is used unverified: the computed hash is logged and written beside the
    checkpoint (``checkpoint_final.sha256.json``) so it can be pinned in the config afterwards.
    """
    from pretrain_det3d.data.download import download_file, file_digest, record_path
    from pretrain_det3d.models.checkpoint import read_pretraining_checkpoint

    _check_entry(entry, where)
    out_path = Path(out_path)
    expected = entry.get("sha256")
    with atomic_path(out_path) as tmp:
        tmp.unlink()
        if entry.get("url"):
            # download_file resumes a partial file named after its destination, so download beside the output
            staging = out_path.with_name(out_path.name + ".download")
            download_file(entry["url"], staging, sha256=expected)
            shutil.move(staging, tmp)
            record_path(staging).unlink(missing_ok=True)  # the hash is recorded beside the output below
        else:
            copy = Path(entry["path"])
            if not copy.is_file():
                raise PublishedCheckpointError(f"{where}.path: {copy} does not exist")
            shutil.copyfile(copy, tmp)
        digest = file_digest(tmp)  # once: a checkpoint can be GBs (download_file has checked a download already)
        if entry.get("path") and expected and digest != str(expected).lower():
            raise PublishedCheckpointError(f"{entry['path']}: sha256 {digest} differs from {where}.sha256 {expected}")
        source = str(entry.get("url") or entry.get("path"))
        try:
            weights, plan = read_pretraining_checkpoint(tmp)
        except Exception as error:
            # the reader names the hidden temporary, which is gone by now: name the source and the config key
            problem = str(error).removeprefix(f"{tmp}: ")
            raise PublishedCheckpointError(f"{source} ({where}): {problem}") from error
        if not expected:
            LOGGER.warning("%s: no sha256 in the config; this file's sha256 is %s (pin it to verify later fetches)",
                           where, digest)
        LOGGER.info("published checkpoint with %d tensors, pre-trained with %s", len(weights),
                    plan.get("pretrain_method", "an unnamed method"))
    write_json(out_path.with_name(out_path.stem + ".sha256.json"),
               {"sha256": digest, "verified": bool(expected), "source": source})
    return out_path
