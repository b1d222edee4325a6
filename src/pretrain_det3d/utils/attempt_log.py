"""Run a workflow job's command with its output appended to the job's log, one header per attempt.

Every rule's shell command is ``exec python -m pretrain_det3d.utils.attempt_log <rule> <log> <command...>``:

- the output of every attempt goes to ``<log minus .log>.attempts.log``, and ``<log>`` is a hard link to it, so
  a retry or a SLURM requeue appends instead of replacing the log of the attempt that failed, while ``<log>``
  stays the name Snakemake knows (where hard links fail, ``<log>`` holds the latest attempt only);
- each attempt starts with a header line: UTC time, rule, attempt number, host and SLURM job id;
- the command replaces this process (``os.execvp``): no shell or Python parent stays in between that a signal
  would kill, so the time-limit SIGTERM of profiles/slurm reaches the trainer, which saves.

Kept free of heavy imports: it runs before every job.

Example:
    >>> import pathlib, tempfile
    >>> log = pathlib.Path(tempfile.mkdtemp()) / "job.log"
    >>> open_attempt_log(log, "demo").close(); open_attempt_log(log, "demo").close()
    >>> [line.split("  ")[1:3] for line in log.read_text().splitlines() if line.startswith("=====")]
    [['demo', 'attempt 1'], ['demo', 'attempt 2']]
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
from pathlib import Path
from typing import IO

HEADER_PREFIX = "===== "


def attempts_path(log: Path) -> Path:
    """The file that collects every attempt of ``log`` (``x.log`` -> ``x.attempts.log``)."""
    stem = log.name[: -len(".log")] if log.name.endswith(".log") else log.name
    return log.with_name(f"{stem}.attempts.log")


def _attempt_number(attempts: Path) -> int:
    with open(attempts, "rb") as handle:
        return 1 + sum(line.startswith(HEADER_PREFIX.encode()) for line in handle)


def open_attempt_log(log: Path, rule: str) -> IO[str]:
    """Link ``log`` to its attempts file, append this attempt's header and return the file, open for appending."""
    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    attempts = attempts_path(log)
    attempts.touch()
    try:
        if not (log.exists() and os.path.samefile(log, attempts)):
            log.unlink(missing_ok=True)
            os.link(attempts, log)
    except OSError:
        pass  # no hard links here (some network file systems): the log then holds the latest attempt only
    number = _attempt_number(attempts)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    job = os.environ.get("SLURM_JOB_ID", "none")
    handle = open(log, "a", encoding="utf-8")
    handle.write(f"\n{HEADER_PREFIX}{now}  {rule}  attempt {number}  on {socket.gethostname()}  "
                 f"(SLURM job {job}) =====\n")
    handle.flush()
    return handle


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 3:
        sys.exit("usage: python -m pretrain_det3d.utils.attempt_log <rule> <log> <command> [args...]")
    rule, log, command = args[0], Path(args[1]), args[2:]
    handle = open_attempt_log(log, rule)
    os.dup2(handle.fileno(), sys.stdout.fileno())
    os.dup2(handle.fileno(), sys.stderr.fileno())
    handle.close()
    try:
        os.execvp(command[0], command)
    except OSError as error:
        sys.exit(f"attempt_log: cannot run {command[0]!r}: {error}")


if __name__ == "__main__":
    main()
