"""Published pre-training checkpoints (for example the paper authors' releases) as initialisations.

A config entry ``pretraining.published.<name>`` gives ``url`` or ``path`` and ``sha256``. The workflow fetches
it to ``results/pretrain/<name>/checkpoint_final.pth``, the same place a pre-training job writes to, so the
name works as ``{init}`` everywhere a pre-trained method does. The file counts as fetched only after its hash
matched and it loaded (``torch.load(weights_only=True)``) as an nnssl checkpoint.

Example:
    >>> entry = {"url": "https://huggingface.co/MIC-DKFZ/ResEncL-MissingPiece-MAE/resolve/main/checkpoint_final.pth",
    ...          "sha256": None}
    >>> fetch_published_checkpoint(entry, "results/pretrain/mae_published/checkpoint_final.pth")  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

from pretrain_det3d.utils.atomic import atomic_path, write_json

LOGGER = logging.getLogger(__name__)

#: keys a published-checkpoint entry may hold
ENTRY_KEYS = ("url", "path", "sha256", "description", "licence")


class PublishedCheckpointError(ValueError):
    """A published-checkpoint entry or file is unusable; the message names the entry key or the file."""


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
