"""Check a SLURM site with one tiny job before submitting the study: ``python -m pretrain_det3d cluster-check``.

The check writes a one-rule Snakefile into a scratch folder, runs ``snakemake --profile ... -s <it> --directory
<folder>`` with the profiles the study would use, and reports, one line each:

- ``submit``: the job id and what was asked (partition, threads, the time-limit signal of the profile), or the
  sbatch error (invalid partition, invalid gres, no account, ...) with what fixes it;
- ``placement``: the partition and node the job ran on;
- ``resources``: its CPUs (``SLURM_CPUS_PER_TASK`` and the CPUs the process may use) and GPUs
  (``CUDA_VISIBLE_DEVICES``, ``nvidia-smi -L``, what torch sees);
- ``signal``: whether the job's program got the SIGTERM that the profile's ``--signal=TERM@600`` sends to the job
  step before the time limit (emulated with ``scancel --signal=TERM <job>``, which signals the job's steps and not
  the batch shell, as ``--signal`` without ``B:`` does), i.e. whether the trainer saves on the warning;
- ``deadline``: whether the job's end time can be read from ``squeue`` inside the job (the trainer's own stop,
  ``training/trainer.py``, for clusters where the signal does not reach it);
- ``status``: whether Snakemake noticed the job's end, the status command it used, what ``sacct`` says, and the
  status command this site needs (a cluster without accounting needs ``--slurm-status-command squeue``; without it
  Snakemake waits forever after the jobs have finished).

The rule is named ``finetune`` so that the profile's ``set-resources`` of the study's fine-tuning jobs (GPU
partition, GPU, time-limit signal) apply to it unchanged; its threads and memory are asked through the rule's
``threads``/``resources``, as the study's rules do, and its command ``exec``s the probe (``python -m
pretrain_det3d.cluster_check probe``, run inside the job) through ``pretrain_det3d.utils.attempt_log`` exactly as
the study's rules run their programs. The scratch folder is made under ``.snakemake/cluster-check/`` of the current
directory (a compute node must see it: run the check from the shared file system you run the study from) and
removed after a passing check.

Example (prints one line per check; exit status 1 when any line says FAIL):
    python -m pretrain_det3d cluster-check --profile profiles/slurm --profile profiles/slurm-cpu
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

#: the rule name of the tiny job: the profiles' set-resources for the study's fine-tuning apply to it
RULE = "finetune"
#: the job's files, relative to the scratch folder
INFO_FILE = "check/probe.json"
EVENTS_FILE = "check/events.txt"
OUTPUT_FILE = "check/done.txt"
LOG_FILE = "check/finetune.log"
#: the line the probe writes when the signal reaches it
SIGNAL_LINE = "received SIGTERM"
#: how long (s) the probe waits for the signal after it has said it is running
PROBE_WAIT_S = 30
#: after the job has ended, how long (s) Snakemake may take to notice before the check calls its polling broken
STATUS_GRACE_S = 30
#: the Snakemake SLURM executor's default seconds before its first status check
DEFAULT_INIT_SECONDS = 40
#: job states after which a job runs no more
ENDED_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                          "BOOT_FAIL", "DEADLINE", "PREEMPTED", "SPECIAL_EXIT", "REVOKED"})

SNAKEFILE = """\
# Written by `python -m pretrain_det3d cluster-check` (pretrain_det3d/cluster_check.py): one tiny job through the
# SLURM profile(s) given. Named `{rule}` so that the profiles' set-resources of the study's fine-tuning jobs apply.
rule {rule}:
    output:
        "{output}",
    log:
        "{log}",
    threads: {threads}
    resources:
        mem_mb={mem_mb},
        runtime={runtime},
    shell:
        "exec python -m pretrain_det3d.utils.attempt_log {rule} {{log:q}} python -m pretrain_det3d.cluster_check "
        "probe --info {info} --events {events} --wait {wait} --out {{output:q}}"
"""


# ----------------------------------------------------------------------------------------------------------------
# inside the job


def _nvidia_smi() -> str | None:
    """``nvidia-smi -L``'s lines joined by "; ", or None where there is no nvidia-smi."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        result = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError) as error:
        return f"failed: {error}"
    text = (result.stdout if result.returncode == 0 else f"failed: {result.stderr or result.stdout}").strip()
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def _torch_gpus() -> int | str:
    try:
        import torch
    except Exception as error:  # noqa: BLE001 - reported, not raised: the check is about the cluster
        return f"torch not importable: {error}"
    return int(torch.cuda.device_count())


def _job_deadline() -> dict[str, Any]:
    """What the trainer reads from squeue inside the job (its own stop before the time limit)."""
    from pretrain_det3d.training import trainer

    job_id = os.environ.get("SLURM_JOB_ID", "").strip()
    if not job_id:
        return {"ok": False, "why": "no SLURM_JOB_ID in the job's environment"}
    try:
        output = trainer.squeue_end_time(job_id)
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        return {"ok": False, "why": f"squeue failed inside the job: {error}"}
    end = trainer.parse_slurm_end_time(output)
    if end is None:
        return {"ok": False, "why": f"squeue printed no end time ({output.strip()[:80]!r})"}
    return {"ok": True, "end": output.strip(), "seconds_left": round(end - time.time()),
            "margin_s": trainer.stop_before_end_s()}


def probe_info(environ: dict[str, str] | None = None) -> dict[str, Any]:
    """What the job sees of its allocation (written to the info file)."""
    env = dict(os.environ if environ is None else environ)
    return {
        "job_id": env.get("SLURM_JOB_ID"),
        "step_id": env.get("SLURM_STEP_ID"),
        "partition": env.get("SLURM_JOB_PARTITION"),
        "node": env.get("SLURMD_NODENAME") or socket.gethostname(),
        "cpus_per_task": env.get("SLURM_CPUS_PER_TASK"),
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cuda_visible_devices": env.get("CUDA_VISIBLE_DEVICES"),
        "nvidia_smi": _nvidia_smi(),
        "torch_gpus": _torch_gpus(),
        "deadline": _job_deadline(),
        "pid": os.getpid(),
        "python": sys.executable,
    }


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _append(path: Path, line: str) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def probe(info: Path, events: Path, out: Path, wait_s: float) -> int:
    """Inside the job: say what the job got, then wait for SIGTERM (at most ``wait_s``) and say whether it came."""
    received: list[float] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(time.time()))
    try:
        return _probe(info, events, out, wait_s, received)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _probe(info: Path, events: Path, out: Path, wait_s: float, received: list[float]) -> int:
    for path in (info, events, out):
        path.parent.mkdir(parents=True, exist_ok=True)
    details = probe_info()
    details["running_since"] = time.time()
    _write_atomic(info, json.dumps(details, indent=1))
    print(f"cluster-check probe running: {json.dumps(details)}", flush=True)
    end = time.monotonic() + wait_s
    while not received and time.monotonic() < end:
        time.sleep(0.05)
    if received:
        line = f"{SIGNAL_LINE} at {received[0]:.3f} (pid {os.getpid()})"
    else:
        line = f"no SIGTERM within {wait_s:g} s"
    _append(events, line)
    print(f"cluster-check probe: {line}", flush=True)
    _write_atomic(out, line + "\n")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# on the submit host: profiles


def resolve_profile(name: str, cwd: Path | None = None) -> Path:
    """A ``--profile`` value as Snakemake finds it: a folder path, else a name under the user's and the system's
    Snakemake config folders."""
    candidate = Path(name).expanduser()
    if not candidate.is_absolute():
        candidate = (cwd or Path.cwd()) / candidate
    if candidate.is_dir():
        return candidate.resolve()
    config_home = Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config"))
    dirs = [config_home] + [Path(d) for d in os.environ.get("XDG_CONFIG_DIRS", "/etc/xdg").split(os.pathsep) if d]
    for base in dirs:
        if (base / "snakemake" / name).is_dir():
            return (base / "snakemake" / name).resolve()
    raise FileNotFoundError(f"profile {name!r}: no such folder, nor under {', '.join(str(d / 'snakemake') for d in dirs)}")


def profile_settings(profile: Path) -> dict[str, Any]:
    """The profile's config (``config.v8+.yaml`` before ``config.yaml``, as Snakemake 8+ reads them)."""
    for name in ("config.v8+.yaml", "config.yaml"):
        if (profile / name).is_file():
            return yaml.safe_load((profile / name).read_text()) or {}
    raise FileNotFoundError(f"profile {profile}: no config.yaml")


def merged_settings(profiles: Sequence[Path]) -> dict[str, Any]:
    """The profiles' keys merged as Snakemake merges them: a later profile's key replaces an earlier one's whole."""
    merged: dict[str, Any] = {}
    for profile in profiles:
        merged.update(profile_settings(profile))
    return merged


def partition_overlay(settings: dict[str, Any], partition: str) -> dict[str, Any]:
    """A profile that goes after the others and sends the check's rule to ``partition``, keeping every other entry
    of the profiles' ``set-resources`` (a profile's set-resources replaces the earlier ones as a whole)."""
    current = settings.get("set-resources") or {}
    if isinstance(current, dict):
        merged = {rule: dict(values or {}) for rule, values in current.items()}
        merged.setdefault(RULE, {})["slurm_partition"] = partition
        return {"set-resources": merged}
    return {"set-resources": [*current, f"{RULE}:slurm_partition={partition}"]}


# ----------------------------------------------------------------------------------------------------------------
# on the submit host: reading what Snakemake and SLURM say


def submitted_job_id(output: str) -> str | None:
    found = re.search(r"submitted with SLURM jobid (\d+)", output)
    return found.group(1) if found else None


def requested_resources(output: str) -> dict[str, str]:
    """The rule's resources as Snakemake printed them before submitting (``resources: a=1, b=x``)."""
    found = re.search(rf"rule {RULE}:.*?\n\s+resources: ([^\n]*)", output, re.DOTALL)
    if not found:
        return {}
    pairs = re.findall(r"(\w+)=(.*?)(?=, \w+=|$)", found.group(1))
    return {key: value.strip() for key, value in pairs}


_SBATCH_HINTS = (
    (r"invalid partition", "set `slurm_partition` in your profile (`sinfo -s` lists the partitions) or pass "
                           "--partition"),
    (r"gres|generic resource", "these nodes have no GPUs of that kind: add --profile profiles/slurm-cpu after "
                               "profiles/slurm, or set the GPU partition"),
    (r"account", "set `slurm_account` in your profile, or `slurm-no-account: true` where the site has no accounts"),
    (r"time limit|timelimit", "the partition's time limit is below the check's runtime: pass --runtime"),
    (r"memory|mem", "the partition cannot give the memory asked: pass --mem-mb"),
    (r"qos", "set the QOS your site wants (`slurm_qos`)"),
)


ACCOUNT_WARNING = r"Unable to guess SLURM account[^\n]*"


def submission_error(output: str, snakemake_ended: bool = False) -> str | None:
    """The sbatch error in Snakemake's output, with what fixes it, or None.

    The SLURM plugin's "Unable to guess SLURM account. Trying to proceed without." is a warning printed before it
    calls sbatch, which then often succeeds; it counts as the error only once Snakemake has ended without a job.
    """
    lines = [line.strip() for line in output.splitlines()]
    errors = [line for line in lines if re.search(r"sbatch: error:", line)]
    if not errors:
        found = re.search(r"SLURM sbatch failed\. The error message was ([^\n]*)", output) or \
            re.search(r"(Error submitting jobscript[^\n]*)", output) or \
            (re.search(f"({ACCOUNT_WARNING})", output) if snakemake_ended else None)
        if not found:
            return None
        errors = [found.group(1).strip()]
    cleaned = (re.sub(r"['\"]\.?$", "", re.sub(r"^.*?sbatch: error:\s*", "", e)).strip() for e in errors)
    text = " / ".join(dict.fromkeys(cleaned))
    for pattern, hint in _SBATCH_HINTS:
        if re.search(pattern, text, re.IGNORECASE):
            return f"sbatch: {text}: {hint}"
    return f"sbatch: {text}"


def sacct_accounting(run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> tuple[bool, str]:
    """(whether ``sacct -n -X`` works here, what it said)."""
    if shutil.which("sacct") is None:
        return False, "no sacct on PATH"
    try:
        result = run(["sacct", "-n", "-X"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError) as error:
        return False, f"sacct failed: {error}"
    said = " ".join((result.stderr or result.stdout or "").split())[:160]
    if result.returncode != 0 or "accounting storage is disabled" in said.lower():
        return False, said or f"exit status {result.returncode}"
    return True, "accounting works"


def min_job_age(run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> int | None:
    """SLURM's MinJobAge (s): how long squeue still lists a finished job."""
    try:
        result = run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"^MinJobAge\s*=\s*(\d+)", result.stdout or "", re.MULTILINE)
    return int(found.group(1)) if found else None


def effective_status_command(configured: str | None, sacct_on_path: bool, job_age: int | None,
                             init_seconds: int) -> str:
    """The status command the SLURM executor (plugin 2.x) will use: the profile's ``slurm-status-command``, else
    sacct where it is on PATH; squeue falls back to sacct where MinJobAge is under three status intervals."""
    command = configured or ("sacct" if sacct_on_path else "squeue")
    if command == "squeue" and sacct_on_path and (job_age is None or job_age < 3 * init_seconds):
        return "sacct"
    if command == "sacct" and not sacct_on_path:
        return "squeue"
    return command


def job_state(job_id: str, run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> tuple[str, str]:
    """(state, reason) of a job from squeue; ("GONE", "") once squeue no longer lists it."""
    try:
        result = run(["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T|%r"], capture_output=True, text=True,
                     timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return "UNKNOWN", ""
    return parse_job_state(result.stdout if result.returncode == 0 else "")


def parse_job_state(text: str) -> tuple[str, str]:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return "GONE", ""
    state, _, reason = lines[0].partition("|")
    return state.split()[0].upper() if state.strip() else "UNKNOWN", reason.strip()


# ----------------------------------------------------------------------------------------------------------------
# the report


@dataclass
class Line:
    name: str
    verdict: str  # OK, WARN, FAIL, SKIP
    text: str

    def __str__(self) -> str:
        return f"{self.name:<10} {self.verdict:<4} {self.text}"


@dataclass
class Observation:
    """What the check saw; ``report`` turns it into lines. Times are seconds since the check started."""

    profiles: list[str]
    job_id: str | None = None
    requested: dict[str, str] = field(default_factory=dict)
    threads: int = 1
    submit_error: str | None = None
    snakemake_failed_early: str | None = None  # Snakemake ended before any job was submitted: its last lines
    info: dict[str, Any] | None = None
    signal_sent_at: float | None = None
    signal_error: str | None = None
    events: list[str] = field(default_factory=list)
    job_ended_at: float | None = None
    job_final_state: str | None = None
    job_reason: str = ""
    snakemake_returned_at: float | None = None
    snakemake_returncode: int | None = None
    gave_up_at: float | None = None  # the check stopped waiting for Snakemake (status polling stuck)
    timed_out: bool = False
    timeout: float = 120
    status_command: str = "sacct"
    sacct_ok: bool = False
    sacct_said: str = ""


def _status_line(obs: Observation) -> Line:
    need = "squeue (set `slurm-status-command: squeue` in your profile)" if not obs.sacct_ok else "sacct (the default)"
    sacct = f"sacct: {'accounting works' if obs.sacct_ok else obs.sacct_said}"
    if obs.snakemake_returned_at is not None and obs.job_ended_at is not None:
        took = max(0.0, obs.snakemake_returned_at - obs.job_ended_at)
        return Line("status", "OK", f"Snakemake noticed the job's end {took:.0f} s after it (status command "
                                    f"{obs.status_command}; {sacct}): this site needs {need}")
    if obs.gave_up_at is not None:
        waited = obs.gave_up_at - (obs.job_ended_at or obs.gave_up_at)
        why = ("the cluster likely has no accounting and Snakemake polls sacct: add --slurm-status-command squeue "
               "(or uncomment `slurm-status-command: squeue` in profiles/slurm/config.yaml)") \
            if obs.status_command == "sacct" and not obs.sacct_ok else \
            f"its status command {obs.status_command} does not report the job"
        return Line("status", "FAIL", f"the job ended {waited:.0f} s ago but Snakemake has not noticed: {why}; "
                                      f"{sacct}")
    if obs.status_command == "sacct" and not obs.sacct_ok:
        return Line("status", "FAIL", f"Snakemake would poll sacct, which does not work here ({obs.sacct_said}): "
                                      "it would wait forever after the jobs end; add --slurm-status-command squeue")
    if obs.timed_out:
        state = obs.job_final_state or "unknown"
        return Line("status", "FAIL", f"timeout: Snakemake had not seen the job end within {obs.timeout:g} s (job "
                                      f"state {state}; status command {obs.status_command}; {sacct}); "
                                      f"this site needs {need}")
    return Line("status", "SKIP", f"the job did not end while the check watched; status command "
                                  f"{obs.status_command}; {sacct}; this site needs {need}")


def report(obs: Observation) -> list[Line]:
    """One line per check, from what was observed."""
    lines: list[Line] = []
    if obs.submit_error:
        lines.append(Line("submit", "FAIL", obs.submit_error))
        return lines
    if obs.job_id is None:
        why = "no job was submitted" + (f": {obs.snakemake_failed_early}" if obs.snakemake_failed_early else "")
        if obs.timed_out:
            why = "timeout: Snakemake submitted no job in time" + \
                  (f" (last output: {obs.snakemake_failed_early})" if obs.snakemake_failed_early else "")
        lines.append(Line("submit", "FAIL", why))
        return lines
    signal_asked = obs.requested.get("slurm_extra", "")
    found_signal = re.search(r"--signal=(\S+?)['\"]?(?:\s|$)", signal_asked)
    lines.append(Line("submit", "OK" if found_signal else "WARN",
                      f"job {obs.job_id} (rule {RULE}): partition {obs.requested.get('slurm_partition', '(default)')}, "
                      f"{obs.threads} thread(s), "
                      + (f"gpu {obs.requested['gpu']}, " if "gpu" in obs.requested else "no GPU asked, ")
                      + (f"time-limit warning --signal={found_signal.group(1)}" if found_signal else
                         "no --signal in the profile's slurm_extra for this rule: the trainer then relies on its own "
                         "deadline (squeue)")))
    info = obs.info
    if info is None:
        state = obs.job_final_state or "not started"
        reason = f" (reason: {obs.job_reason})" if obs.job_reason and obs.job_reason not in ("None", "") else ""
        verdict = f"timeout ({obs.timeout:g} s): " if obs.timed_out else ""
        hint = "" if obs.timed_out else (" (its log is in the kept folder's .snakemake/slurm_logs; a job that fails at "
                                         "once often cannot see the folder: run the check from a shared file system)")
        lines.append(Line("placement", "FAIL", f"{verdict}the job never ran the probe; its state: {state}{reason}"
                                               f"{hint}"))
        lines.append(_status_line(obs))
        return lines
    lines.append(Line("placement", "OK", f"partition {info.get('partition')}, node {info.get('node')}"))
    cpus, nproc = info.get("cpus_per_task"), info.get("nproc")
    enough = nproc is not None and int(nproc) >= obs.threads and (cpus is None or int(cpus) >= obs.threads)
    gpus = info.get("cuda_visible_devices")
    smi = info.get("nvidia_smi")
    gpu_text = (f"GPUs: CUDA_VISIBLE_DEVICES={gpus if gpus is not None else '(unset)'}, "
                f"nvidia-smi -L: {smi if smi is not None else '(no nvidia-smi)'}, torch sees {info.get('torch_gpus')}")
    wanted_gpu = obs.requested.get("gpu", "0") not in ("0", "")
    has_gpu = isinstance(info.get("torch_gpus"), int) and info["torch_gpus"] > 0
    verdict = "OK" if enough and (has_gpu or not wanted_gpu) else "WARN"
    lines.append(Line("resources", verdict, f"{cpus or '(no SLURM_CPUS_PER_TASK)'} CPUs per task, {nproc} usable "
                                            f"(asked {obs.threads}); {gpu_text}"))
    if obs.signal_error:
        lines.append(Line("signal", "FAIL", f"could not signal the job: {obs.signal_error}"))
    elif obs.signal_sent_at is None:
        lines.append(Line("signal", "SKIP", "the job was not signalled"))
    else:
        if any(e.startswith(SIGNAL_LINE) for e in obs.events):
            lines.append(Line("signal", "OK", f"the job's program received SIGTERM from `scancel --signal=TERM "
                                              f"{obs.job_id}` (the time-limit warning's path): the trainer saves on "
                                              f"the warning"))
        else:
            said = obs.events[0] if obs.events else "the probe wrote nothing"
            lines.append(Line("signal", "WARN", f"SIGTERM to the job's steps did not reach the job's program ({said}); "
                                                "the trainer then stops by its deadline (next line), not on the "
                                                "warning (`scontrol show config | grep ProctrackType`: "
                                                "proctrack/cgroup signals only the step's task)"))
    deadline = info.get("deadline") or {}
    if deadline.get("ok"):
        lines.append(Line("deadline", "OK", f"squeue inside the job gives its end time ({deadline['end']}, "
                                            f"{deadline['seconds_left']} s left): the trainer stops "
                                            f"{deadline['margin_s']:g} s before it by itself"))
    else:
        saves = any(e.startswith(SIGNAL_LINE) for e in obs.events)
        lines.append(Line("deadline", "WARN", f"the trainer cannot read the job's end time "
                                              f"({deadline.get('why', 'unknown')}): "
                          + ("it stops on the warning signal only" if saves else
                             "with the signal not reaching it either, a job at its time limit loses the iterations "
                             "since its last periodic checkpoint")))
    lines.append(_status_line(obs))
    return lines


# ----------------------------------------------------------------------------------------------------------------
# running the check


class _Reader(threading.Thread):
    """Collects a process's output lines (stdout and stderr together)."""

    def __init__(self, stream) -> None:
        super().__init__(daemon=True)
        self.stream = stream
        self.lines: list[str] = []
        self.lock = threading.Lock()

    def run(self) -> None:
        for line in self.stream:
            with self.lock:
                self.lines.append(line)

    def text(self) -> str:
        with self.lock:
            return "".join(self.lines)


def _stop(process: subprocess.Popen, job_id: str | None) -> None:
    """Stop Snakemake (SIGINT: it cancels its jobs; SIGTERM only makes it wait for them; a Snakemake stuck in its
    status polling does not end on SIGINT either, hence the kill) and the job."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if job_id:
        subprocess.run(["scancel", job_id], capture_output=True, check=False, timeout=30)


def write_workflow(folder: Path, threads: int, mem_mb: int, runtime: int, wait_s: float) -> Path:
    snakefile = folder / "Snakefile"
    snakefile.write_text(SNAKEFILE.format(rule=RULE, output=OUTPUT_FILE, log=LOG_FILE, threads=threads,
                                          mem_mb=mem_mb, runtime=runtime, info=INFO_FILE, events=EVENTS_FILE,
                                          wait=f"{wait_s:g}"))
    return snakefile


def run_check(profiles: Sequence[str], partition: str | None = None, timeout: float = 120, threads: int = 1,
              mem_mb: int = 1000, runtime: int = 15, workdir: Path | None = None, keep: bool = False,
              status_grace: float = STATUS_GRACE_S, extra_args: Sequence[str] = (),
              echo: Callable[[str], None] = lambda text: None) -> tuple[list[Line], Path | None]:
    """Submit the tiny job and watch it; returns the report's lines and the scratch folder if it was kept."""
    start = time.monotonic()
    now = lambda: time.monotonic() - start  # noqa: E731
    if shutil.which("sbatch") is None:
        return [Line("submit", "FAIL", "no `sbatch` on PATH: run the check on a SLURM login node (or load the "
                                       "site's slurm module)")], None
    try:
        paths = [resolve_profile(p) for p in profiles]
        settings = merged_settings(paths)
    except (OSError, yaml.YAMLError) as error:
        return [Line("submit", "FAIL", f"cannot read the profiles: {error}")], None
    sacct_ok, sacct_said = sacct_accounting()
    init_seconds = int(settings.get("slurm-init-seconds-before-status-checks", DEFAULT_INIT_SECONDS))
    obs = Observation(profiles=[str(p) for p in paths], threads=threads, sacct_ok=sacct_ok, sacct_said=sacct_said,
                      timeout=timeout,
                      status_command=effective_status_command(settings.get("slurm-status-command"),
                                                              shutil.which("sacct") is not None,
                                                              min_job_age(), init_seconds))
    base = Path(workdir) if workdir else Path.cwd() / ".snakemake" / "cluster-check"
    base.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=".cluster-check-", dir=base)).resolve()
    snakefile = write_workflow(folder, threads, mem_mb, runtime, PROBE_WAIT_S)
    profile_args = [arg for p in paths for arg in ("--profile", str(p))]
    if partition:
        (folder / "partition-profile").mkdir()
        (folder / "partition-profile" / "config.yaml").write_text(yaml.safe_dump(partition_overlay(settings, partition)))
        profile_args += ["--profile", str(folder / "partition-profile")]
    command = [sys.executable, "-m", "snakemake", "-s", str(snakefile), "--directory", str(folder), *profile_args,
               "--retries", "0", *extra_args, OUTPUT_FILE]
    src = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    echo(f"cluster-check: {' '.join(command)}")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                               cwd=folder)
    reader = _Reader(process.stdout)
    reader.start()
    try:
        _watch(obs, process, reader, folder, now, timeout, status_grace, echo)
    finally:
        _stop(process, obs.job_id if obs.job_ended_at is None else None)
        reader.join(timeout=5)
    output = reader.text()
    (folder / "snakemake-output.txt").write_text(output)
    lines = report(obs)
    failed = any(line.verdict == "FAIL" for line in lines)
    if failed or keep:
        return lines, folder
    shutil.rmtree(folder, ignore_errors=True)
    return lines, None


def _watch(obs: Observation, process: subprocess.Popen, reader: _Reader, folder: Path, now: Callable[[], float],
           timeout: float, status_grace: float, echo: Callable[[str], None]) -> None:
    info_path, events_path = folder / INFO_FILE, folder / EVENTS_FILE
    last_state_check = -10.0
    while True:
        time.sleep(0.25)
        output = reader.text()
        returned = process.poll()
        if returned is not None and obs.snakemake_returned_at is None:
            obs.snakemake_returned_at, obs.snakemake_returncode = now(), returned
            reader.join(timeout=5)
            output = reader.text()
        if obs.job_id is None:
            obs.job_id = submitted_job_id(output)
            if obs.job_id:
                obs.requested = requested_resources(output)
                echo(f"cluster-check: submitted job {obs.job_id}")
        if obs.job_id is None:
            error = submission_error(output, snakemake_ended=returned is not None)
            if error or returned is not None:
                obs.submit_error = error
                tail = [line for line in output.strip().splitlines() if line.strip()][-3:]
                obs.snakemake_failed_early = " / ".join(line.strip() for line in tail)[:400] or None
                return
        if obs.info is None and info_path.exists():
            obs.info = json.loads(info_path.read_text())
            echo(f"cluster-check: the probe runs on {obs.info.get('node')}; sending SIGTERM to its steps")
            result = subprocess.run(["scancel", "--signal=TERM", obs.job_id], capture_output=True, text=True,
                                    check=False, timeout=30)
            if result.returncode != 0:
                obs.signal_error = (result.stderr or result.stdout).strip()
            obs.signal_sent_at = now()
        if events_path.exists():
            obs.events = [line for line in events_path.read_text().splitlines() if line.strip()]
        if obs.job_id and obs.job_ended_at is None and now() - last_state_check >= 1:
            last_state_check = now()
            state, reason = job_state(obs.job_id)
            obs.job_final_state, obs.job_reason = state, reason
            if state in ENDED_STATES or state == "GONE" or (returned is not None and state != "RUNNING"):
                obs.job_ended_at = now()
                echo(f"cluster-check: the job ended ({state})")
        if obs.snakemake_returned_at is not None:
            if obs.job_ended_at is None:
                obs.job_ended_at = obs.snakemake_returned_at
            return
        if obs.job_ended_at is not None and now() - obs.job_ended_at > status_grace:
            broken = obs.status_command == "sacct" and not obs.sacct_ok
            if broken or now() > timeout:
                obs.gave_up_at = now()
                return
        if now() > timeout:
            obs.timed_out = True
            return


def cluster_check(args: argparse.Namespace) -> int:
    """The ``cluster-check`` verb: print the report, return 1 if any line failed."""
    profiles = args.profile or ["profiles/slurm"]
    echo = (lambda text: print(text, file=sys.stderr, flush=True)) if args.verbose else (lambda text: None)
    lines, kept = run_check(profiles, partition=args.partition, timeout=args.timeout, threads=args.threads,
                            mem_mb=args.mem_mb, runtime=args.runtime, workdir=args.workdir, keep=args.keep,
                            status_grace=args.status_grace, echo=echo)
    for line in lines:
        print(line, flush=True)
    if kept:
        print(f"{'':<10} {'':<4} files of the check (Snakefile, Snakemake's output, the job's log): {kept}")
    return 1 if any(line.verdict == "FAIL" for line in lines) else 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", action="append", default=None,
                        help="a Snakemake profile (folder or name), as for the study; repeat for several, in order "
                             "(default: profiles/slurm)")
    parser.add_argument("--partition", default=None, help="send the job to this partition (instead of the "
                                                          "profile's for finetune)")
    parser.add_argument("--timeout", type=float, default=120, help="seconds before the check gives up")
    parser.add_argument("--threads", type=int, default=1, help="threads the job asks for (the rule's threads)")
    parser.add_argument("--mem-mb", type=int, default=1000, help="memory the job asks for (MB)")
    parser.add_argument("--runtime", type=int, default=15,
                        help="the job's time limit in minutes (above the profile's 10-minute warning offset)")
    parser.add_argument("--status-grace", type=float, default=STATUS_GRACE_S,
                        help="seconds Snakemake may take to notice the job's end")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the scratch folder goes (default: .snakemake/cluster-check in the current "
                             "directory; the compute nodes must see it)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder of a passing check")
    parser.add_argument("--verbose", action="store_true", help="say on stderr what the check is doing")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["probe"]:
        parser = argparse.ArgumentParser(prog="python -m pretrain_det3d.cluster_check probe")
        parser.add_argument("--info", type=Path, required=True)
        parser.add_argument("--events", type=Path, required=True)
        parser.add_argument("--out", type=Path, required=True)
        parser.add_argument("--wait", type=float, default=PROBE_WAIT_S)
        a = parser.parse_args(args[1:])
        return probe(a.info, a.events, a.out, a.wait)
    parser = argparse.ArgumentParser(prog="python -m pretrain_det3d cluster-check", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return cluster_check(parser.parse_args(args))


if __name__ == "__main__":
    sys.exit(main())
