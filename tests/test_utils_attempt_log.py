"""Tests of the per-attempt job log wrapper (pretrain_det3d.utils.attempt_log)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from pretrain_det3d.utils.attempt_log import attempts_path

HEADER = re.compile(r"^===== \S+  (\S+)  attempt (\d+)  on \S+  \(SLURM job (\S+)\) =====$", re.M)


def run_wrapped(log: Path, rule: str, *command: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pretrain_det3d.utils.attempt_log", rule, str(log), *command],
                          capture_output=True, text=True, env={**os.environ, **(env or {})})


def test_attempts_are_appended_numbered_and_linked(tmp_path):
    log = tmp_path / "logs" / "job.log"
    first = run_wrapped(log, "pretrain", sys.executable, "-c", "print('first out'); import sys; "
                        "print('first err', file=sys.stderr); sys.exit(3)")
    assert first.returncode == 3  # the command's exit status, not the wrapper's
    assert first.stdout == "" and first.stderr == ""  # everything went to the log
    log.unlink()  # Snakemake deletes a job's log before the next attempt
    second = run_wrapped(log, "pretrain", sys.executable, "-c", "print('second')", env={"SLURM_JOB_ID": "42"})
    assert second.returncode == 0
    text = log.read_text()
    assert [m.groups() for m in HEADER.finditer(text)] == [("pretrain", "1", "none"), ("pretrain", "2", "42")]
    assert text.index("first out") < text.index("second") and "first err" in text
    assert os.path.samefile(log, attempts_path(log))


def test_wrapped_command_replaces_the_wrapper(tmp_path):
    # The job step must be the program itself, so that a SIGTERM reaches it: the pid is the wrapper's.
    log = tmp_path / "job.log"
    probe = "import os; print('pid', os.getpid())"
    proc = subprocess.Popen([sys.executable, "-m", "pretrain_det3d.utils.attempt_log", "demo", str(log),
                             sys.executable, "-c", probe])
    proc.wait()
    assert f"pid {proc.pid}" in log.read_text()


def test_missing_program_is_one_clear_message(tmp_path):
    result = run_wrapped(tmp_path / "job.log", "demo", "no-such-program-xyz")
    assert result.returncode != 0
    assert "cannot run 'no-such-program-xyz'" in (tmp_path / "job.log").read_text() + result.stderr


def test_attempts_path_name():
    assert attempts_path(Path("a/b/x.log")) == Path("a/b/x.attempts.log")
    assert attempts_path(Path("x.txt")) == Path("x.txt.attempts.log")
