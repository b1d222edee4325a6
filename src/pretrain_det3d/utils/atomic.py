"""Atomic file writes: a finished output either exists whole or not at all.

A writer works in a hidden temporary beside its target, ``.{target name}.{pid}@{host}.{random}.tmp{suffix}``,
and renames it onto the target only when the block succeeds. A job killed mid-write (SIGKILL, a SLURM time
limit, a node failure) cannot clean up, so the next write into the same folder (the rerun of the job) removes
such leftovers first (once per process and folder):

- a temporary of this host whose writer process is gone (its pid is not alive) is removed at once;
- a temporary of another host (or from before pids were recorded in the name) is removed once it has not been
  modified for :data:`STALE_FOREIGN_SECONDS`: its writer's pid cannot be checked from here.

Snakemake runs at most one job per output, so any other temporary of the target is normally stale; the pid and
age checks only protect a writer started by hand beside the workflow, which must not lose its file. Finished
files and folders get the modes the umask gives (``0o666`` / ``0o777`` minus the umask), like any ``open`` or
``mkdir``, so converted and preprocessed data on a shared data folder stay readable for the group.

Example:
    >>> with atomic_directory("results/data/converted/demo") as tmp:  # doctest: +SKIP
    ...     (tmp / "dataset.json").write_text("{}")
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

LOGGER = logging.getLogger(__name__)

#: A temporary of another host (whose writer's pid cannot be checked) counts as stale after this long unmodified.
STALE_FOREIGN_SECONDS = 3600.0
# mkstemp/mkdtemp's random part: letters, digits and underscores, never a dot.
_RANDOM = r"[a-z0-9_]+"


def _host() -> str:
    """This machine's short name, reduced to characters that are safe in a file name and hold no dot."""
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname().split(".")[0]) or "host"


def _temporary_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}@{_host()}."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but another user's process
        return True
    return True


# ".{target}.{pid}@{host}.{random}.tmp{suffix}", and the older ".{target}.{random}.tmp{suffix}" (8 random chars)
_TEMPORARY = re.compile(rf"^\.(?P<target>.+)\.(?P<pid>\d+)@(?P<host>[A-Za-z0-9-]+)\.{_RANDOM}\.tmp")
_OLD_TEMPORARY = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp")
#: (pid, folder) pairs already cleaned: a process scans each folder it writes into once, not once per file
_CLEANED: set[tuple[int, str]] = set()


def _is_stale(entry: Path, host: str, now: float) -> bool:
    match = _TEMPORARY.match(entry.name)
    if match is not None and match["host"] == host:
        pid = int(match["pid"])
        return pid != os.getpid() and not _pid_alive(pid)  # a writer still at work keeps its temporary
    if match is None and _OLD_TEMPORARY.match(entry.name) is None:
        return False  # not a temporary of this module
    return now - entry.lstat().st_mtime >= STALE_FOREIGN_SECONDS  # maybe a live writer on another node


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporaries that killed writers left in ``folder``; return what was removed.

    Only names this module makes match (``.{target}.{pid}@{host}.{random}.tmp...``, and the older
    ``.{target}.{random}.tmp...``); see the module docstring for which of them count as stale.

    Example:
        >>> remove_stale_temporaries("results/finetune/x")  # doctest: +SKIP
        [PosixPath('results/finetune/x/.model_final.pth.4242@node7.k2j3h4g5.tmp.pth')]
    """
    folder = Path(folder)
    removed: list[Path] = []
    host, now = _host(), time.time()
    try:
        entries = [entry for entry in folder.iterdir() if entry.name.startswith(".") and ".tmp" in entry.name]
    except OSError:
        return removed
    for entry in entries:
        try:
            if not _is_stale(entry, host, now):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except FileNotFoundError:
            continue  # removed meanwhile by someone else
        except OSError as error:  # cleaning up is a courtesy: never fail a write over it
            LOGGER.warning("could not remove the stale temporary %s (%s)", entry, error)
            continue
        LOGGER.info("removed %s, left by a killed writer", entry)
        removed.append(entry)
    return removed


def _clean_once(folder: Path) -> None:
    """:func:`remove_stale_temporaries` on the first write of this process into ``folder``.

    Once per folder, not per file: preprocessing writes thousands of files into one folder, and listing it for
    each would make writing quadratic. A temporary left by a killed job predates this process, so the first
    scan finds it.
    """
    key = (os.getpid(), os.path.realpath(folder))
    if key not in _CLEANED:
        remove_stale_temporaries(folder)
        _CLEANED.add(key)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    ``suffix`` defaults to the target's suffix, so writers that infer the format from the name
    (SimpleITK, numpy, matplotlib) still work. Temporaries that killed writers left beside it are removed first.

    Example:
        >>> with atomic_path("out.json") as tmp:  # doctest: +SKIP
        ...     tmp.write_text("{}")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _clean_once(path.parent)
    suffix = "".join(path.suffixes) if suffix is None else suffix
    fd, tmp_name = tempfile.mkstemp(prefix=_temporary_prefix(path), suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if tmp.exists():  # mkstemp makes 0600 files; a finished output gets the usual umask-based mode
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; it replaces ``path`` only if the block succeeds.

    The finished directory gets mode ``0o777 & ~umask`` (``mkdtemp`` makes 0700 whatever the umask, and the mode
    survives the rename), and leftovers of killed writers beside it are removed first.

    Example:
        >>> with atomic_directory("converted/demo") as tmp:  # doctest: +SKIP
        ...     (tmp / "dataset.json").write_text("{}")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _clean_once(path.parent)
    tmp = Path(tempfile.mkdtemp(prefix=_temporary_prefix(path), suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    """The process's umask, read without changing it where Linux reports it (setting it, even briefly, would
    race with other threads creating files)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented JSON atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (usually a full disk or quota); the message names the file."""


# What torch's C++ writer says when a write fails (PyTorchStreamWriter: "... file write failed").
_TORCH_WRITE_FAILURE = ("file write failed", "unexpected pos")
_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def save_torch(path: str | os.PathLike, obj: Any) -> None:
    """``torch.save`` atomically (a killed job never leaves a truncated checkpoint).

    A failed write (torch's "enforce fail at inline_container.cc ... file write failed", or ``ENOSPC``) raises
    :class:`CheckpointWriteError` naming the file, the free space left and that no partial file was left.

    Example:
        >>> save_torch("results/finetune/x/model_final.pth", {"state_dict": {}})  # doctest: +SKIP
    """
    import torch

    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            torch.save(obj, tmp)
    except (RuntimeError, OSError) as error:
        written_short = isinstance(error, RuntimeError) and any(s in str(error) for s in _TORCH_WRITE_FAILURE)
        if not (written_short or getattr(error, "errno", None) in _DISK_FULL_ERRNOS):
            raise
        try:
            free = f"{shutil.disk_usage(path.parent).free} bytes free"
        except OSError:
            free = "free space unknown"
        # torch's own text (chained below) names neither the file nor the likely cause
        raise CheckpointWriteError(
            f"{path}: writing the checkpoint failed, the disk or quota is probably full ({free} on the filesystem "
            f"of {path.parent}); no partial file was left (its temporary was removed); free space and rerun the job"
        ) from error
