"""Atomic writes leave either the finished file or nothing; modes follow the umask; killed writers' leftovers go."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pretrain_det3d.utils import atomic
from pretrain_det3d.utils.atomic import (
    STALE_FOREIGN_SECONDS,
    CheckpointWriteError,
    atomic_directory,
    atomic_path,
    save_torch,
    write_json,
)


def test_success_renames_into_place(tmp_path):
    target = tmp_path / "sub" / "out.json"
    write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in target.parent.iterdir()] == ["out.json"]


def test_failure_leaves_nothing(tmp_path):
    target = tmp_path / "out.nii.gz"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            assert tmp.name.endswith(".nii.gz")
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_failure_keeps_previous_version(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("new")
            raise RuntimeError
    assert target.read_text() == "old"


def test_directory_is_replaced_whole(tmp_path):
    target = tmp_path / "dataset"
    with atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("1")
    assert (target / "a.txt").read_text() == "1"
    with pytest.raises(ValueError):
        with atomic_directory(target) as tmp:
            (tmp / "b.txt").write_text("2")
            raise ValueError
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset"]


def test_finished_file_has_umask_mode(tmp_path):
    target = tmp_path / "out.txt"
    with atomic_path(target) as tmp:
        tmp.write_text("x")
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask


# ---- modes, stale temporaries of killed writers, disk-full checkpoints ------------------------------------
# A writer that gets as far as its temporary, says so, and waits to be killed (SIGKILL: no cleanup runs).
KILLED_WRITER = r"""
import sys, time
from pathlib import Path
from pretrain_det3d.utils.atomic import atomic_directory, atomic_path
kind, target = sys.argv[1], Path(sys.argv[2])
if kind == "dir":
    with atomic_directory(target) as tmp:
        (tmp / "part.bin").write_bytes(b"x" * 100000)
        print("ready", flush=True)
        time.sleep(600)
else:
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"half a checkpoint")
        print("ready", flush=True)
        time.sleep(600)
"""


def _start_writer(kind: str, target: Path) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, kind, str(target)], stdout=subprocess.PIPE,
                               text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert process.stdout.readline().strip() == "ready"
    return process


def _kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_finished_directory_has_umask_mode(tmp_path, umask):
    old = os.umask(umask)
    try:
        with atomic_directory(tmp_path / "converted") as tmp:
            (tmp / "a.txt").write_text("1")
            (tmp / "sub").mkdir()
        with atomic_path(tmp_path / "out.txt") as tmp:
            tmp.write_text("x")
    finally:
        os.umask(old)
    # mkdtemp would leave 0o700; the folder must look like any mkdir under this umask (0o755 / 0o775)
    assert (tmp_path / "converted").stat().st_mode & 0o777 == {0o022: 0o755, 0o002: 0o775}[umask]
    assert (tmp_path / "converted" / "sub").stat().st_mode & 0o777 == 0o777 & ~umask
    assert (tmp_path / "out.txt").stat().st_mode & 0o777 == {0o022: 0o644, 0o002: 0o664}[umask]


def test_killed_directory_writer_leftover_is_removed_on_rerun(tmp_path):
    target = tmp_path / "raw" / "lidc"
    _kill(_start_writer("dir", target))
    leftovers = _hidden(target.parent)
    assert len(leftovers) == 1 and leftovers[0].startswith(".lidc.") and leftovers[0].endswith(".tmp")
    assert (target.parent / leftovers[0] / "part.bin").stat().st_size == 100000
    with atomic_directory(target) as tmp:  # the rerun of the killed job
        (tmp / "done.txt").write_text("complete")
    assert _hidden(target.parent) == []
    assert sorted(p.name for p in target.iterdir()) == ["done.txt"]
    assert (target / "done.txt").read_text() == "complete"


def test_killed_file_writer_leftover_is_removed_on_rerun(tmp_path):
    target = tmp_path / "model_final.pth"
    _kill(_start_writer("file", target))
    assert len(_hidden(tmp_path)) == 1
    save_torch(target, {"weights": torch.arange(3)})
    assert _hidden(tmp_path) == []
    assert torch.equal(torch.load(target, weights_only=True)["weights"], torch.arange(3))


def test_temporary_of_a_live_writer_is_kept(tmp_path):
    target = tmp_path / "model_final.pth"
    writer = _start_writer("file", target)
    try:
        theirs = _hidden(tmp_path)
        write_json(tmp_path / "other.json", {"a": 1})  # a write into the same folder while they still write
        assert _hidden(tmp_path) == theirs  # their pid is alive: not stale
    finally:
        _kill(writer)


def test_temporaries_of_other_hosts_are_removed_only_when_old(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_CLEANED", set())
    fresh = tmp_path / ".out.txt.4242@othernode.abcdefgh.tmp.txt"
    old = tmp_path / ".out.txt.4243@othernode.ijklmnop.tmp.txt"
    legacy = tmp_path / ".out.txt.qrstuvwx.tmp.txt"  # the name this module used before pids were recorded
    unrelated = tmp_path / ".bashrc"
    for path in (fresh, old, legacy, unrelated):
        path.write_text("x")
    hours_ago = time.time() - STALE_FOREIGN_SECONDS - 60
    for path in (old, legacy):
        os.utime(path, (hours_ago, hours_ago))
    write_json(tmp_path / "out.txt", {"b": 2})
    assert _hidden(tmp_path) == sorted([fresh.name, unrelated.name])
    assert json.loads((tmp_path / "out.txt").read_text()) == {"b": 2}


def test_disk_full_checkpoint_names_the_file_and_leaves_nothing(tmp_path, monkeypatch):
    def full_disk(obj, path):  # what torch raises when the disk fills up mid-checkpoint
        Path(path).write_bytes(b"PK\x03\x04 partial")
        raise RuntimeError("[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing file "
                           "data/3: file write failed")

    monkeypatch.setattr(torch, "save", full_disk)
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda path: SimpleNamespace(total=10**9, used=10**9 - 4096, free=4096))
    target = tmp_path / "run" / "checkpoint_latest.pth"
    with pytest.raises(CheckpointWriteError) as info:
        save_torch(target, {"x": 1})
    message = str(info.value)
    assert message.startswith(f"{target}: writing the checkpoint failed, the disk or quota is probably full")
    assert f"4096 bytes free on the filesystem of {target.parent}" in message
    assert "no partial file was left" in message
    assert "enforce fail" not in message and "inline_container" not in message
    assert list(target.parent.iterdir()) == []


def test_other_checkpoint_errors_pass_unchanged(tmp_path, monkeypatch):
    def broken(obj, path):
        raise RuntimeError("cannot pickle 'generator' object")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(RuntimeError, match="cannot pickle") as info:
        save_torch(tmp_path / "x.pth", {"x": 1})
    assert not isinstance(info.value, CheckpointWriteError)
    assert list(tmp_path.iterdir()) == []
