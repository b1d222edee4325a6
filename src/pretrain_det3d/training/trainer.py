"""The shared iteration-based training loop, and the detector trainer built on it.

``IterationTrainer`` owns everything a training run needs besides the loss: optimiser and schedule, mixed
precision (CUDA only), gradient clipping, a CSV log, regular ``checkpoint_latest.pth`` files and automatic,
exact resume. Subclasses override small hooks (nnU-Net style): ``compute_losses`` and ``save_final`` always,
``configure_optimizer``, ``train_step``, ``on_iteration_end``, ``checkpoint_state`` ... when needed.
``DetectorTrainer`` (here) and ``pretraining.trainer.PretrainingTrainer`` are the two subclasses.

Why resume is exact: a checkpoint holds model, optimiser, grad scaler, the iteration count and the torch,
numpy and python generator states, and the data stream is a pure function of ``(seed, batch index)`` (see
``training.dataloader``), so the sampler state is just the iteration count. A run stopped at iteration k and
resumed reaches the same weights as an uninterrupted run (tests pin this on CPU).

Why resume refuses stale checkpoints: a rerun after a config change must not continue the old run and report it
as the new one. Every checkpoint records a *fingerprint* of what determines the run's result (``run_fingerprint``:
the result-relevant training settings, the detector's build arguments or the pre-training method's settings, the
sha256 of the initialisation checkpoint, the training case ids, the seed, and the package / checkpoint-format /
torch versions). On resume it is compared with the current run before any tensor is read; any difference, a
checkpoint without a fingerprint (older format), or weights that do not fit the model raises
``StaleCheckpointError`` naming the file, each differing key (old -> new) and the two ways to start over:
delete the file, or set ``PRETRAIN_DET3D_STALE_CHECKPOINT=move`` (the stale file is renamed to
``checkpoint_latest.stale-<UTC time>.pth`` beside it and training starts from iteration 0). Settings that do not
change results (threads, workers, checkpoint interval, logging, device, ...: ``NON_RESULT_SETTINGS``) may change
between reruns.

Progress: on a terminal a tqdm bar; otherwise (a log file, SLURM's output) one plain log line every
``log_every`` iterations (default ``progress_log_every(iterations)``) with the mean loss terms since the previous
line, the learning rate, iterations per second and the ETA, so a long run's log stays small.

Example:
    >>> trainer = DetectorTrainer(model, "retina_unet", settings, records, out_dir="results/finetune/x",
    ...                           seed=0)  # doctest: +SKIP
    >>> trainer.run()  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import hashlib
import logging
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, TextIO

import numpy as np
import torch
from tqdm import tqdm

from pretrain_det3d import __version__
from pretrain_det3d.settings.training import GRAD_CLIP_NORM, TrainingSettings  # noqa: F401 (GRAD_CLIP_NORM re-exported)
from pretrain_det3d.training.dataloader import CaseRecord, PatchBatchStream, build_loader
from pretrain_det3d.training.schedule import PolyWarmupSchedule, build_optimizer
from pretrain_det3d.utils.atomic import atomic_path, save_torch

LOGGER = logging.getLogger(__name__)

CHECKPOINT_LATEST = "checkpoint_latest.pth"
MODEL_FINAL = "model_final.pth"
LOG_NAME = "log.csv"
RUNNING_LOG_SUFFIX = ".running"  # the log grows here during training; the named log appears whole at the end
#: ``amp_dtype`` values: "auto" = bf16 where the GPU supports it, else fp16, and full precision on CPU
AMP_DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
CHANNELS_LAST_CHOICES = ("auto", True, False)
# 2: checkpoints carry the run fingerprint (``"fingerprint"``); format-1 files are refused on resume
CHECKPOINT_FORMAT = 2
#: environment variable deciding what a rerun does with a ``checkpoint_latest.pth`` of a different run:
#: unset / "refuse" -> raise ``StaleCheckpointError``; "move" -> rename it aside and start from scratch.
#: An environment variable, not a setting, because it must reach SLURM jobs and local jobs alike without
#: changing the config (which would itself change the fingerprint).
STALE_CHECKPOINT_ENV = "PRETRAIN_DET3D_STALE_CHECKPOINT"
STALE_CHECKPOINT_ACTIONS = ("refuse", "move")
#: settings keys left out of the run fingerprint: they change speed, logging or where things run, not the
#: numbers a run produces (the batch stream is the same for every worker count and with or without memory maps,
#: see training.dataloader; channels_last / compile / cudnn_benchmark / device pick other kernels for the same
#: maths). Everything else, including keys added to the settings later, is part of the fingerprint.
NON_RESULT_SETTINGS = frozenset({
    "threads", "num_workers", "checkpoint_every", "progress_bar", "log_every", "pin_memory",
    "persistent_workers", "prefetch_factor", "memory_map", "keep_latest_checkpoint", "device",
    "cudnn_benchmark", "channels_last", "compile",
    # detector-level job knobs that reach the settings mapping (training.staging)
    "stage_to_local", "stage_dir",
})
#: progress lines when the output is not a terminal: every ``LOG_EVERY`` iterations; ``None`` ->
#: ``progress_log_every(iterations)``. A settings key ``log_every`` wins when the settings class has one.
LOG_EVERY: int | None = None
PROGRESS_LINES_PER_RUN = 100  # the automatic interval aims at about this many lines per run ...
PROGRESS_LOG_EVERY_MAX = 500  # ... but never fewer than one line per this many iterations
#: signals that end a run early with a checkpoint: SLURM sends SIGTERM at the time limit or on preemption, and
#: SIGUSR1 ahead of it when asked (profiles/slurm: --signal=USR1@600)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
#: Inside a SLURM job (``SLURM_JOB_ID`` set) the trainer also stops by itself, exactly as on a stop signal, this
#: many seconds before the job's end time (read once from ``squeue`` when ``IterationTrainer.run`` starts). It does
#: not depend on the signal reaching the trainer, which it does not with ``ProctrackType=proctrack/cgroup`` (SLURM
#: then signals only the step's task, the inner Snakemake). Keep it equal to the warning offset of the SLURM
#: profiles (``--signal=TERM@600`` in profiles/slurm and profiles/slurm-cpu), so both ask for the same stop.
SLURM_STOP_BEFORE_END_S = 600
#: environment variable overriding ``SLURM_STOP_BEFORE_END_S`` (seconds, >= 0)
SLURM_STOP_BEFORE_END_ENV = "PRETRAIN_DET3D_STOP_BEFORE_END_S"
#: what ``squeue -o %e`` prints for a job without an end time
_NO_END_TIMES = frozenset({"", "N/A", "UNLIMITED", "NONE", "UNKNOWN", "INFINITE"})


class TrainingInterrupted(RuntimeError):
    """A stop signal arrived; the run saved ``checkpoint_latest.pth`` and resumes from it when started again."""


class StaleCheckpointError(RuntimeError):
    """``checkpoint_latest.pth`` was written by a different run (or an older format) and cannot be resumed."""


@contextlib.contextmanager
def stop_requests(signals: Sequence[int] = STOP_SIGNALS) -> Iterator[threading.Event]:
    """Turn the given signals into a flag the training loop polls between iterations (main thread only).

    An iteration in flight finishes first, so the checkpoint written afterwards is consistent.
    """
    requested = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield requested
        return

    def handler(signum: int, _frame: Any) -> None:
        LOGGER.warning("received %s: stopping after this iteration and saving a checkpoint", signal.Signals(signum).name)
        requested.set()

    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield requested
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


@dataclass(frozen=True)
class JobDeadline:
    """The end of the SLURM job this process runs in (Unix seconds) and how long before it the trainer stops."""

    end: float
    margin_s: float
    clock: Callable[[], float] = time.time

    @property
    def stop_at(self) -> float:
        return self.end - self.margin_s

    def remaining(self) -> float:
        """Seconds until the job's end."""
        return self.end - self.clock()

    def reached(self) -> bool:
        return self.clock() >= self.stop_at

    def describe(self) -> str:
        end = datetime.datetime.fromtimestamp(self.end).isoformat(timespec="seconds")
        return f"SLURM job ends at {end}: stopping {self.margin_s:g} s before it"


def parse_slurm_end_time(text: str) -> float | None:
    """The job end time in ``squeue -h -o %e`` output (``2026-12-01T06:40:00``, the local time zone), as Unix
    seconds; ``None`` for a job without one ("N/A", "UNLIMITED") or output that is not a time.

        >>> parse_slurm_end_time("UNLIMITED") is None
        True
    """
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) != 1 or lines[0].upper() in _NO_END_TIMES:
        return None
    try:
        end = datetime.datetime.fromisoformat(lines[0])
    except ValueError:
        return None
    return end.timestamp()  # a naive time is taken as local time, as squeue prints it


def stop_before_end_s(environ: Mapping[str, str] = os.environ) -> float:
    """The margin before the job's end: ``PRETRAIN_DET3D_STOP_BEFORE_END_S`` if set, else ``SLURM_STOP_BEFORE_END_S``."""
    value = environ.get(SLURM_STOP_BEFORE_END_ENV, "").strip()
    if not value:
        return float(SLURM_STOP_BEFORE_END_S)
    try:
        margin = float(value)
    except ValueError:
        margin = float("nan")
    if not math.isfinite(margin) or margin < 0:
        raise ValueError(f"{SLURM_STOP_BEFORE_END_ENV}={value!r}: expected a number of seconds >= 0")
    return margin


def squeue_end_time(job_id: str) -> str:
    """``squeue``'s end time of the given job (raises on a missing ``squeue`` or a failure)."""
    result = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%e"], capture_output=True, text=True, timeout=60,
                            check=False)
    if result.returncode != 0:
        raise RuntimeError(f"squeue exited with {result.returncode}: {result.stderr.strip()[:200]}")
    return result.stdout


def slurm_job_deadline(
    environ: Mapping[str, str] = os.environ,
    query: Callable[[str], str] | None = None,
    clock: Callable[[], float] = time.time,
) -> JobDeadline | None:
    """The deadline of the SLURM job this process runs in, or ``None`` outside SLURM or when its end time is
    unknown (one log line says why; the stop signals still work). ``query`` defaults to ``squeue_end_time``."""
    job_id = environ.get("SLURM_JOB_ID", "").strip()
    if not job_id:
        return None
    margin = stop_before_end_s(environ)
    try:
        output = (query or squeue_end_time)(job_id)
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:  # no squeue, controller unreachable, ...
        LOGGER.info("SLURM job %s: no end time (%s); only a stop signal ends training early", job_id, error)
        return None
    end = parse_slurm_end_time(output)
    if end is None:
        LOGGER.info("SLURM job %s: no end time (squeue printed %r); only a stop signal ends training early",
                    job_id, output.strip()[:100])
        return None
    return JobDeadline(end=end, margin_s=margin, clock=clock)


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA if available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"settings key 'device' asks for {name!r} but CUDA is not available")
    return device


def resolve_amp_dtype(device: torch.device, mixed_precision: bool, amp_dtype: str = "auto") -> torch.dtype | None:
    """The autocast dtype of a run, or ``None`` (full precision).

    ``"auto"``: bf16 where the GPU supports it, else fp16 (with loss scaling); full precision on CPU, where
    autocast rarely pays off. ``"bfloat16"`` autocasts on CPU too (explicit opt-in); ``"float16"`` on CPU is a
    no-op with a logged note (CPU kernels for fp16 are slow or missing), as is bf16 on a GPU without it.

    Example:
        >>> resolve_amp_dtype(torch.device("cpu"), True, "auto") is None
        True
        >>> resolve_amp_dtype(torch.device("cpu"), True, "bfloat16")
        torch.bfloat16
    """
    if amp_dtype not in AMP_DTYPES:
        raise ValueError(f"settings key 'amp_dtype' must be one of {sorted(AMP_DTYPES)}, got {amp_dtype!r}")
    if not mixed_precision:
        return None
    if device.type == "cuda":
        if amp_dtype == "float16":
            return torch.float16
        bf16 = torch.cuda.is_bf16_supported()
        if amp_dtype == "bfloat16" and not bf16:
            LOGGER.warning("amp_dtype: this GPU has no bfloat16; using float16 with loss scaling")
        return torch.bfloat16 if bf16 else torch.float16
    if amp_dtype == "bfloat16":
        return torch.bfloat16
    if amp_dtype == "float16":
        LOGGER.info("amp_dtype float16: no effect on %s (CUDA only); training in full precision", device.type)
    return None


def uses_loss_scaling(device: torch.device, amp_dtype: torch.dtype | None) -> bool:
    """Whether a run scales its loss: fp16 autocast on CUDA (fp16's narrow exponent range lets small gradients
    underflow to zero without it); bf16 and full precision need none.

    Example:
        >>> cuda = torch.device("cuda")
        >>> [uses_loss_scaling(cuda, dtype) for dtype in (torch.float16, torch.bfloat16, None)]
        [True, False, False]
    """
    return amp_dtype == torch.float16 and device.type == "cuda"


def build_grad_scaler(device: torch.device, amp_dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """``torch.amp.GradScaler`` for ``device``, enabled exactly when :func:`uses_loss_scaling` (the release's
    "16-mixed": dynamic loss scaling, steps with inf/NaN gradients skipped and the scale halved). A disabled
    scaler passes the loss and the step through unchanged. Its state goes into every training checkpoint.

    Example:
        >>> build_grad_scaler(torch.device("cpu"), None).is_enabled()
        False
    """
    return torch.amp.GradScaler(device.type, enabled=uses_loss_scaling(device, amp_dtype))


def check_channels_last(channels_last: bool | str) -> None:
    """Refuse a ``channels_last`` setting other than ``"auto"``, true or false, naming the key."""
    if channels_last not in CHANNELS_LAST_CHOICES:
        raise ValueError(f"settings key 'channels_last' must be 'auto', true or false, got {channels_last!r}")


def resolve_channels_last(device: torch.device, channels_last: bool | str = "auto") -> bool:
    """Whether a run keeps its 3D convolution weights in ``torch.channels_last_3d`` layout.

    ``"auto"``: on CPU only. There oneDNN then runs every convolution in channels-last layout, which measured
    1.1-1.2x faster per training step for the demo detectors on one thread (docs/benchmark.md); on a GPU it
    has not been measured here, so ``"auto"`` leaves CUDA runs in the default layout. Inputs stay as they
    are: the weights' layout decides the convolutions' layout, and converting the one-channel input costs more
    than it saves.

    Example:
        >>> resolve_channels_last(torch.device("cpu")), resolve_channels_last(torch.device("cpu"), False)
        (True, False)
    """
    check_channels_last(channels_last)
    if channels_last == "auto":
        return device.type == "cpu"
    return bool(channels_last)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices) from one number."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng_states() -> dict[str, Any]:
    """Generator states in plain types, so the checkpoint loads with ``weights_only=True``."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: Mapping[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    np_state = states["numpy"]
    np.random.set_state((np_state["kind"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    py = states["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def move_to_device(obj: Any, device: torch.device, non_blocking: bool = True) -> Any:
    """Move tensors nested in dicts / lists / tuples to ``device``.

    ``non_blocking`` copies overlap with computation only from pinned host memory; otherwise they are plain
    synchronous copies, so it is always safe for host-to-device moves.
    """
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=non_blocking)
    if isinstance(obj, Mapping):
        return {k: move_to_device(v, device, non_blocking) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(move_to_device(v, device, non_blocking) for v in obj)
    return obj


def code_versions() -> dict[str, Any]:
    """Versions that decide how a checkpoint is read and what training computes: this package, the checkpoint
    format, and torch's major.minor (patch releases do not change the maths we rely on).

    Example:
        >>> sorted(code_versions())
        ['checkpoint_format', 'pretrain_det3d', 'torch']
    """
    torch_version = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    return {"pretrain_det3d": __version__, "checkpoint_format": CHECKPOINT_FORMAT, "torch": torch_version}


def run_fingerprint(
    settings: TrainingSettings,
    *,
    model: Mapping[str, Any],
    case_ids: Sequence[str],
    seed: int,
    init_checkpoint_sha256: str | None = None,
) -> dict[str, Any]:
    """Everything that determines a training run's result, as plain containers (weights-only loadable).

    ``settings`` minus ``NON_RESULT_SETTINGS``; ``model``: the detector's build arguments or the pre-training
    method's settings; ``case_ids``: the training cases (the split) or the pre-training corpus, in order
    (the batch stream depends on it); ``init_checkpoint_sha256``: ``None`` when training from scratch.

    Example:
        >>> fp = run_fingerprint(TrainingSettings(iterations=500), model={"detector": "retina_unet"},
        ...                      case_ids=["case_000"], seed=0)
        >>> fp["training"]["iterations"], "threads" in fp["training"], fp["cases"], fp["init_checkpoint_sha256"]
        (500, False, ['case_000'], None)
    """
    training = {k: v for k, v in settings.model_dump().items() if k not in NON_RESULT_SETTINGS}
    return _plain({
        "training": training,
        "model": dict(model),
        "init_checkpoint_sha256": init_checkpoint_sha256,
        "cases": [str(c) for c in case_ids],
        "seed": int(seed),
        "versions": code_versions(),
    })


def compact_fingerprint(fingerprint: Mapping[str, Any]) -> dict[str, Any]:
    """A fingerprint with its case list replaced by ``{"count", "sha256"}`` (for records that travel: a
    pre-training corpus can list tens of thousands of cases).

    Example:
        >>> compact_fingerprint({"seed": 0, "cases": ["a", "b"]})["cases"]["count"]
        2
    """
    cases = [str(c) for c in fingerprint.get("cases", [])]
    digest = hashlib.sha256("\n".join(cases).encode()).hexdigest()
    return {**_plain(dict(fingerprint)), "cases": {"count": len(cases), "sha256": digest}}


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    # dicts become dotted keys so a difference is reported where it is ("training.iterations"); lists stay whole
    if isinstance(value, Mapping) and (value or not prefix):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: value}


_ABSENT = object()
_SHORT_VALUE = 60  # characters: longer values (case lists) are summarised instead of printed
_EXAMPLES = 3


def describe_change(old: Any, new: Any) -> str:
    """``old -> new`` for one fingerprint entry; long lists say how many entries differ instead.

    Example:
        >>> describe_change(200, 50)
        '200 -> 50'
        >>> describe_change([f"case_{i:03d}" for i in range(40)], [f"case_{i:03d}" for i in range(1, 41)])
        '40 entries -> 40 entries: 1 added (case_040), 1 removed (case_000)'
    """
    def show(value: Any) -> str:
        return "(absent)" if value is _ABSENT else repr(value)

    if isinstance(old, list) and isinstance(new, list) and len(repr(old)) + len(repr(new)) > 2 * _SHORT_VALUE:
        added = [v for v in new if v not in old]
        removed = [v for v in old if v not in new]
        parts = []
        for label, values in (("added", added), ("removed", removed)):
            if values:
                examples = ", ".join(str(v) for v in values[:_EXAMPLES]) + (", ..." if len(values) > _EXAMPLES else "")
                parts.append(f"{len(values)} {label} ({examples})")
        if not parts:
            parts.append("same entries, different order")
        return f"{len(old)} entries -> {len(new)} entries: " + ", ".join(parts)
    return f"{show(old)} -> {show(new)}"


def fingerprint_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """One line ``key: old -> new`` per differing entry of two fingerprints (dotted keys, sorted).

    Example:
        >>> fingerprint_differences({"seed": 0, "training": {"iterations": 200}},
        ...                         {"seed": 0, "training": {"iterations": 50}})
        ['training.iterations: 200 -> 50']
    """
    flat_old, flat_new = _flatten(old), _flatten(new)
    lines = []
    for key in sorted(set(flat_old) | set(flat_new)):
        before, after = flat_old.get(key, _ABSENT), flat_new.get(key, _ABSENT)
        if before is _ABSENT or after is _ABSENT or before != after:
            lines.append(f"{key}: {describe_change(before, after)}")
    return lines


def stale_checkpoint_action() -> str:
    """What to do with a stale checkpoint: ``$PRETRAIN_DET3D_STALE_CHECKPOINT`` ("refuse" when unset)."""
    value = os.environ.get(STALE_CHECKPOINT_ENV, "").strip().lower() or "refuse"
    if value not in STALE_CHECKPOINT_ACTIONS:
        raise ValueError(f"environment variable {STALE_CHECKPOINT_ENV} must be one of {list(STALE_CHECKPOINT_ACTIONS)} "
                         f"or unset, got {value!r}")
    return value


def move_aside(path: Path) -> Path:
    """Rename ``path`` to ``{stem}.stale-<UTC time>{suffix}`` beside it (never over an existing file).

    Example:
        >>> move_aside(Path("out/checkpoint_latest.pth"))  # doctest: +SKIP
        PosixPath('out/checkpoint_latest.stale-20250101T120000Z.pth')
    """
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    target = path.with_name(f"{path.stem}.stale-{stamp}{path.suffix}")
    counter = 1
    while target.exists():  # two moves within one second
        target = path.with_name(f"{path.stem}.stale-{stamp}-{counter}{path.suffix}")
        counter += 1
    os.replace(path, target)
    return target


def progress_log_every(iterations: int) -> int:
    """Iterations between progress lines when the output is not a terminal: about ``PROGRESS_LINES_PER_RUN``
    lines per run, at least one per ``PROGRESS_LOG_EVERY_MAX`` iterations.

    Example:
        >>> progress_log_every(50), progress_log_every(2000), progress_log_every(10**6)
        (1, 20, 500)
    """
    return max(1, min(int(iterations) // PROGRESS_LINES_PER_RUN, PROGRESS_LOG_EVERY_MAX))


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class ProgressReporter:
    """Training progress: a tqdm bar on a terminal, else a plain log line every ``every`` iterations.

    Log files get no carriage-return redraws: each line holds the iteration count, the mean of each loss term
    over the iterations since the previous line, the latest learning rate, iterations per second over that
    window and the ETA. A last line is written by ``close`` for iterations not yet reported (a paused or stopped
    run). ``clock`` is injectable so tests can work rates out by hand.

    Example (logs ``demo 2/4: loss 1; lr 1.000e-02; ... it/s; ETA ...`` and the same at 4/4):
        >>> report = ProgressReporter(total=4, initial=0, desc="demo", stream=io.StringIO(), every=2)  # doctest: +SKIP
        >>> for _ in range(4):  # doctest: +SKIP
        ...     report.update({"loss": 1.0}, lr=0.01)
        >>> report.close()  # doctest: +SKIP
    """

    def __init__(
        self,
        total: int,
        initial: int,
        desc: str,
        *,
        enabled: bool = True,
        stream: TextIO | None = None,
        every: int | None = None,
        logger: logging.Logger = LOGGER,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.total, self.iteration, self.desc = int(total), int(initial), desc
        self.enabled = enabled
        self.stream = sys.stderr if stream is None else stream
        self.every = int(every) if every else progress_log_every(total)
        if self.every <= 0:
            raise ValueError(f"progress: log_every must be positive, got {every}")
        self.logger, self.clock = logger, clock
        self.bar: tqdm | None = None
        if enabled and _is_terminal(self.stream):
            self.bar = tqdm(total=self.total, initial=self.iteration, desc=desc, file=self.stream, dynamic_ncols=True)
        self._window_start = clock()
        self._sums: dict[str, float] = {}
        self._count = 0
        self._lr = float("nan")

    def update(self, losses: Mapping[str, float], lr: float) -> None:
        """One iteration done with these loss terms and learning rate."""
        self.iteration += 1
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            # refresh=False: the bar redraws at tqdm's own pace, not on every call
            self.bar.set_postfix(loss=f"{losses['loss']:.4f}", lr=f"{lr:.2e}", refresh=False)
            return
        for key, value in losses.items():
            self._sums[key] = self._sums.get(key, 0.0) + float(value)
        self._count += 1
        self._lr = float(lr)
        if self.iteration % self.every == 0 or self.iteration == self.total:
            self._emit()

    def _emit(self) -> None:
        now = self.clock()
        elapsed = now - self._window_start
        rate = self._count / elapsed if elapsed > 0 else float("inf")
        remaining = max(self.total - self.iteration, 0)
        eta = datetime.timedelta(seconds=round(remaining / rate)) if math.isfinite(rate) and rate > 0 else "?"
        terms = ", ".join(f"{key} {total / self._count:.4g}" for key, total in self._sums.items())
        self.logger.info("%s %d/%d: %s; lr %.3e; %.2f it/s; ETA %s", self.desc, self.iteration, self.total, terms,
                         self._lr, rate, eta)
        self._window_start, self._sums, self._count = now, {}, 0

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.enabled and self._count:
            self._emit()


@dataclass
class _CsvLog:
    """Per-iteration CSV rows, appended to ``{path}.running`` and published atomically as ``path``."""

    path: Path
    fieldnames: list[str] | None = None
    _handle: Any = field(default=None, repr=False)
    _writer: Any = field(default=None, repr=False)

    @property
    def running_path(self) -> Path:
        return self.path.with_name(self.path.name + RUNNING_LOG_SUFFIX)

    def start(self, completed_iterations: int) -> None:
        """Keep the rows of iterations before ``completed_iterations`` (those a resumed run will not redo)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        rows: list[dict[str, str]] = []
        if completed_iterations > 0 and self.running_path.is_file():
            with open(self.running_path, newline="") as handle:
                reader = csv.DictReader(handle)
                self.fieldnames = list(reader.fieldnames or []) or None
                rows = [r for r in reader if int(r["iteration"]) < completed_iterations]
        self._handle = open(self.running_path, "w", newline="")
        if self.fieldnames:
            self._writer = csv.DictWriter(self._handle, fieldnames=self.fieldnames)
            self._writer.writeheader()
            self._writer.writerows(rows)
            self._handle.flush()

    def append(self, row: Mapping[str, float]) -> None:
        if self._writer is None:
            self.fieldnames = list(row)
            self._writer = csv.DictWriter(self._handle, fieldnames=self.fieldnames)
            self._writer.writeheader()
        self._writer.writerow({k: row.get(k, "") for k in self.fieldnames})
        self._handle.flush()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
            self._writer = None

    def publish(self) -> None:
        """Copy the finished log onto ``path`` atomically."""
        self.close()
        with atomic_path(self.path) as tmp:
            shutil.copyfile(self.running_path, tmp)
        self.running_path.unlink()


class IterationTrainer:
    """Iteration-based training loop with exact resume; subclass and implement the two abstract hooks.

    Construct it after seeding (``seed_everything``) and building the model, so that the initial weights are
    reproducible too. ``run()`` resumes from ``{out_dir}/checkpoint_latest.pth`` when that file exists.
    """

    with_labels: bool = True  # whether batches carry detection targets
    stopped_by_deadline: bool = False  # the last run() stopped before the SLURM job's end (JobDeadline)

    def __init__(
        self,
        model: torch.nn.Module,
        settings: TrainingSettings,
        records: Sequence[CaseRecord],
        out_dir: str | os.PathLike,
        seed: int,
        log_path: str | os.PathLike | None = None,
    ) -> None:
        self.settings = settings
        self.records = list(records)
        self.out_dir = Path(out_dir)
        self.seed = int(seed)
        self.device = resolve_device(settings.device)
        if settings.threads:
            torch.set_num_threads(int(settings.threads))
        self.model = model.to(self.device)
        self.configure_backends()
        self.optimizer = self.configure_optimizer()
        self.schedule = self.configure_schedule()
        self.amp_dtype = self.configure_amp_dtype()
        self.scaler = build_grad_scaler(self.device, self.amp_dtype)
        self.iteration = 0  # completed iterations
        self.log = _CsvLog(Path(log_path) if log_path is not None else self.out_dir / LOG_NAME)
        self.progress_stream: TextIO | None = None  # where progress goes (None: sys.stderr at run time)
        self._fingerprint: dict[str, Any] | None = None

    # ----------------------------------------------------------------- hooks a subclass may override
    def configure_optimizer(self) -> torch.optim.Optimizer:
        return build_optimizer(self.model.parameters(), self.settings.model_dump())

    def configure_schedule(self) -> PolyWarmupSchedule:
        s = self.settings
        return PolyWarmupSchedule(base_lr=s.lr, max_iterations=s.iterations, warmup_iterations=s.warmup_iterations,
                                  start_lr=s.warmup_start_lr)

    def configure_amp_dtype(self) -> torch.dtype | None:
        """The autocast dtype, or ``None`` for full precision (see :func:`resolve_amp_dtype`)."""
        return resolve_amp_dtype(self.device, self.settings.mixed_precision, self.settings.amp_dtype)

    def configure_backends(self) -> None:
        """Switch on the fast paths of ``settings`` that apply to this device (cuDNN autotuning, compile).

        Each one that cannot apply is a no-op with a logged note, so one config serves CPU and GPU runs.
        """
        s = self.settings
        if s.cudnn_benchmark:
            if self.device.type == "cuda":
                torch.backends.cudnn.benchmark = True  # fixed patch sizes: autotuning pays off after 1 step
            else:
                LOGGER.info("cudnn_benchmark: no effect on %s (CUDA only)", self.device.type)
        if s.pin_memory and self.device.type != "cuda":
            LOGGER.info("pin_memory: no effect on %s (CUDA only); batches stay in pageable memory", self.device.type)
        if resolve_channels_last(self.device, s.channels_last):
            # in place: only 5-D parameters change layout; the state dict keeps its keys and values
            self.model.to(memory_format=torch.channels_last_3d)
            LOGGER.info("channels_last: 3D convolution weights in channels-last layout")
        if s.compile:
            # in place, so the state dict keeps its keys and compute_losses' self(images) runs compiled
            self.model.compile()
            LOGGER.info("compile: the model's forward runs through torch.compile")

    @property
    def uses_pinned_memory(self) -> bool:
        """Whether batches are pinned and copied without blocking (``pin_memory`` on a CUDA device)."""
        return bool(self.settings.pin_memory) and self.device.type == "cuda"

    def make_stream(self, start_batch: int) -> PatchBatchStream:
        s = self.settings
        return PatchBatchStream(
            self.records,
            patch_size=s.patch_size,
            batch_size=s.batch_size,
            seed=self.seed,
            foreground_fraction=s.foreground_fraction,
            augmentation=s.augmentation_params(),
            start_batch=start_batch,
            num_batches=s.iterations - start_batch,
            with_labels=self.with_labels,
            memory_map=s.memory_map,
        )

    def build_batches(self, start_iteration: int) -> Iterable[dict[str, Any]]:
        """Batches for iterations ``start_iteration, start_iteration + 1, ...``."""
        s = self.settings
        return build_loader(self.make_stream(start_iteration), s.num_workers, self.seed,
                            pin_memory=self.uses_pinned_memory, persistent_workers=s.persistent_workers,
                            prefetch_factor=s.prefetch_factor)

    def compute_losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Loss terms of one batch (already on the device); the total under ``"loss"``."""
        raise NotImplementedError

    def save_final(self) -> None:
        """Write the finished model (called once, after the last iteration)."""
        raise NotImplementedError

    def train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        """One optimiser step; returns the loss terms as floats."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        autocast = (
            torch.autocast(self.device.type, dtype=self.amp_dtype)
            if self.amp_dtype is not None
            else contextlib.nullcontext()
        )
        with autocast:
            losses = self.compute_losses(batch)
        if "loss" not in losses:
            raise KeyError(f"{type(self).__name__}.compute_losses must return the total under 'loss', got {list(losses)}")
        total = losses["loss"]
        if not torch.isfinite(total):
            raise FloatingPointError(f"loss is {total.item()} at iteration {self.iteration}: {self._floats(losses)}")
        self.scaler.scale(total).backward()
        if self.settings.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return self._floats(losses)

    def on_iteration_end(self, iteration: int, row: Mapping[str, float]) -> None:
        """Called after each iteration with its log row (``iteration`` counts from 0)."""

    def fingerprint_model(self) -> dict[str, Any]:
        """The model's / method's own settings for the run fingerprint (subclasses: build arguments)."""
        return {"class": type(self.model).__name__}

    def init_checkpoint_sha256(self) -> str | None:
        """sha256 of the file the weights were initialised from, or ``None`` (from scratch)."""
        return None

    @property
    def fingerprint(self) -> dict[str, Any]:
        """This run's :func:`run_fingerprint` (computed once: hashing an init checkpoint reads the whole file)."""
        if self._fingerprint is None:
            self._fingerprint = run_fingerprint(
                self.settings, model=self.fingerprint_model(), case_ids=[r.case_id for r in self.records],
                seed=self.seed, init_checkpoint_sha256=self.init_checkpoint_sha256(),
            )
        return self._fingerprint

    def checkpoint_state(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "fingerprint": self.fingerprint,
            "iteration": self.iteration,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": capture_rng_states(),
            "data": {"next_batch": self.iteration, "seed": self.seed},
            "settings": self.settings.as_dict(),
        }

    def checkpoint_problems(self, state: Mapping[str, Any]) -> list[str]:
        """Why ``state`` (read lazily, see ``load_checkpoint``) cannot be resumed by this run; empty if it can.

        Only metadata and tensor shapes are looked at, so nothing is loaded into the model yet.
        """
        if not isinstance(state, Mapping) or not isinstance(state.get("fingerprint"), Mapping):
            found = state.get("format", "unknown") if isinstance(state, Mapping) else type(state).__name__
            return [f"no run fingerprint (checkpoint format {found}, written by an older version; "
                    f"this version writes format {CHECKPOINT_FORMAT})"]
        problems = fingerprint_differences(state["fingerprint"], self.fingerprint)
        if problems:
            return problems
        # normally the build arguments above catch an architecture change; this catches the rest
        saved = {k: tuple(v.shape) for k, v in state.get("model", {}).items()}
        current = {k: tuple(v.shape) for k, v in self.model.state_dict().items()}
        missing, unexpected = sorted(set(current) - set(saved)), sorted(set(saved) - set(current))
        if missing:
            problems.append(f"model weights: {len(missing)} missing from the checkpoint (e.g. {', '.join(missing[:3])})")
        if unexpected:
            problems.append(f"model weights: {len(unexpected)} not in the model (e.g. {', '.join(unexpected[:3])})")
        for key in sorted(set(saved) & set(current)):
            if saved[key] != current[key]:
                problems.append(f"model weight {key}: shape {list(saved[key])} -> {list(current[key])}")
        if int(state.get("iteration", 0)) > int(self.settings.iterations):
            problems.append(f"iteration: the checkpoint is at {state['iteration']}, beyond iterations="
                            f"{self.settings.iterations}")
        return problems

    def load_checkpoint_state(self, state: Mapping[str, Any]) -> None:
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scaler.load_state_dict(state["scaler"])
        except (RuntimeError, ValueError, KeyError) as error:  # e.g. torch's size-mismatch text
            raise StaleCheckpointError(self._stale_message([f"the saved state does not fit this run: {error}"])) \
                from error
        self.iteration = int(state["iteration"])
        restore_rng_states(state["rng"])
        self._fingerprint = _plain(dict(state["fingerprint"]))  # the run that trained (equal to ours: checked)

    # ----------------------------------------------------------------- the loop
    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / CHECKPOINT_LATEST

    def save_checkpoint(self) -> None:
        save_torch(self.checkpoint_path, self.checkpoint_state())

    def _stale_message(self, problems: Sequence[str]) -> str:
        listed = "\n".join(f"  {line}" for line in problems)
        return (
            f"{self.checkpoint_path}: cannot resume, this checkpoint belongs to a different run (resuming it would "
            f"mix two runs' results):\n{listed}\n"
            f"To start over: delete {self.checkpoint_path}, or set the environment variable "
            f"{STALE_CHECKPOINT_ENV}=move to move it aside (kept as checkpoint_latest.stale-<UTC time>.pth) and "
            "train from iteration 0."
        )

    def load_checkpoint(self) -> bool:
        """Resume from ``checkpoint_latest.pth`` if it exists and belongs to this run; returns whether it did.

        A checkpoint of another run raises :class:`StaleCheckpointError`, or with
        ``PRETRAIN_DET3D_STALE_CHECKPOINT=move`` is renamed aside and the run starts from scratch.
        """
        if not self.checkpoint_path.is_file():
            return False
        try:
            # memory-mapped on the CPU: the fingerprint and shapes are checked before tensor data is read, and the
            # generator states must stay CPU tensors whatever the training device (torch.set_rng_state needs that)
            state = torch.load(self.checkpoint_path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as error:  # a foreign or damaged file: say which, and how to start over
            raise StaleCheckpointError(self._stale_message([f"the file cannot be read ({error})"])) from error
        problems = self.checkpoint_problems(state)
        if problems:
            del state  # drop the memory map before the file is renamed
            if stale_checkpoint_action() != "move":
                raise StaleCheckpointError(self._stale_message(problems))
            moved = move_aside(self.checkpoint_path)
            LOGGER.warning("%s belongs to a different run (%s); %s=move: moved it to %s and starting from "
                           "iteration 0", self.checkpoint_path, "; ".join(problems), STALE_CHECKPOINT_ENV, moved)
            return False
        self.load_checkpoint_state(state)
        LOGGER.info("resumed from %s at iteration %d", self.checkpoint_path, self.iteration)
        return True

    def run(self, stop_at: int | None = None) -> None:
        """Train until ``settings.iterations`` (or pause after ``stop_at`` iterations, saving a checkpoint).

        Resumes automatically from ``checkpoint_latest.pth``.
        """
        total = self.settings.iterations
        end = total if stop_at is None else min(int(stop_at), total)
        deadline = self.job_deadline()  # before anything is opened: a bad PRETRAIN_DET3D_STOP_BEFORE_END_S raises
        self.stopped_by_deadline = False
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.load_checkpoint()
        if deadline is not None:
            LOGGER.info("%s", deadline.describe())
        self.log.start(self.iteration)
        with stop_requests() as stop:
            try:
                if self.iteration < end:
                    self._loop(end, stop, deadline)
            finally:
                self.log.close()
            if stop.is_set():
                self.save_checkpoint()
                cause = "before the SLURM job's end" if self.stopped_by_deadline else "by a signal"
                raise TrainingInterrupted(
                    f"stopped {cause} at iteration {self.iteration}/{total}; {self.checkpoint_path} holds the "
                    "state and a rerun resumes from it"
                )
        if self.iteration < total:
            self.save_checkpoint()  # paused on purpose
            return
        self.save_final()
        self.log.publish()
        if not self.settings.keep_latest_checkpoint:
            self.checkpoint_path.unlink(missing_ok=True)

    def job_deadline(self) -> JobDeadline | None:
        """When to stop by itself before the SLURM job's end (``None``: outside SLURM, or no end time known)."""
        return slurm_job_deadline()

    def _loop(self, end: int, stop: threading.Event | None = None, deadline: JobDeadline | None = None) -> None:
        batches: Iterator[dict[str, Any]] = iter(self.build_batches(self.iteration))
        # a settings key log_every wins once the settings schema has one; else the module default
        every = getattr(self.settings, "log_every", None) or LOG_EVERY
        progress = ProgressReporter(self.settings.iterations, self.iteration, type(self).__name__,
                                    enabled=bool(self.settings.progress_bar), stream=self.progress_stream, every=every)
        try:
            while self.iteration < end and not (stop is not None and stop.is_set()):
                if deadline is not None and deadline.reached():
                    LOGGER.warning("job end in %.0f s: stopping at iteration %d and saving a checkpoint",
                                   deadline.remaining(), self.iteration)
                    self.stopped_by_deadline = True
                    if stop is None:
                        stop = threading.Event()
                    stop.set()
                    break
                started = time.perf_counter()
                lr = self.schedule.apply(self.optimizer, self.iteration)
                batch = move_to_device(next(batches), self.device, non_blocking=self.uses_pinned_memory)
                losses = self.train_step(batch)
                row = {"iteration": self.iteration, "lr": lr, **losses, "seconds": time.perf_counter() - started}
                self.log.append(row)
                self.on_iteration_end(self.iteration, row)
                self.iteration += 1
                progress.update(losses, lr)
                if self.iteration % self.settings.checkpoint_every == 0 and self.iteration < self.settings.iterations:
                    self.save_checkpoint()
        finally:
            progress.close()

    @staticmethod
    def _floats(losses: Mapping[str, torch.Tensor]) -> dict[str, float]:
        # the total first, then the terms in a stable order, so the CSV columns do not depend on dict order
        ordered = ["loss"] + sorted(k for k in losses if k != "loss")
        return {k: float(losses[k].detach().float().item()) for k in ordered if k in losses}


class DetectorTrainer(IterationTrainer):
    """Fine-tunes a detector (anything with ``compute_losses(images, targets, seg)``) on preprocessed cases.

    The final model is written by ``models.registry.save_detector`` to ``{out_dir}/model_final.pth``, with
    ``build_kwargs`` (default: the ``model.build_kwargs`` that ``models.registry.build_detector`` sets).
    """

    with_labels = True

    def __init__(
        self,
        model: torch.nn.Module,
        detector: str,
        settings: TrainingSettings,
        records: Sequence[CaseRecord],
        out_dir: str | os.PathLike,
        seed: int,
        log_path: str | os.PathLike | None = None,
        extra: Mapping[str, Any] | None = None,
        build_kwargs: Mapping[str, Any] | None = None,
        init_checkpoint: str | os.PathLike | None = None,
    ) -> None:
        super().__init__(model, settings, records, out_dir, seed, log_path)
        self.detector = detector
        # the detector's constructor arguments; None -> model.build_kwargs (set by models.registry.build_detector)
        self.build_kwargs = None if build_kwargs is None else dict(build_kwargs)
        self.extra = dict(extra or {})
        # the pre-training checkpoint the encoder was copied from (None: scratch); its bytes enter the fingerprint
        self.init_checkpoint = None if init_checkpoint is None else Path(init_checkpoint)

    def fingerprint_model(self) -> dict[str, Any]:
        build_kwargs = self.build_kwargs if self.build_kwargs is not None else getattr(self.model, "build_kwargs", None)
        model = {"detector": self.detector, "build_kwargs": build_kwargs}
        if self.extra.get("init_stem") is not None:
            # which stem of a multi-stem checkpoint was loaded: the file's sha256 alone does not say
            model["init_stem"] = self.extra["init_stem"]
        return model

    def init_checkpoint_sha256(self) -> str | None:
        from pretrain_det3d.data.download import file_digest  # reads in chunks: checkpoints can be GBs

        return None if self.init_checkpoint is None else file_digest(self.init_checkpoint, "sha256")

    def compute_losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return self.model.compute_losses(batch["images"], batch["targets"], batch["seg"])

    def save_final(self) -> None:
        from pretrain_det3d.models.registry import save_detector

        # metadata of the run that trained these weights: its fingerprint (checked on every resume)
        fingerprint = self.fingerprint
        extra = {**self.extra, "iterations": self.iteration, "seed": fingerprint["seed"],
                 "init_checkpoint_sha256": fingerprint["init_checkpoint_sha256"],
                 "settings": self.settings.as_dict(), "fingerprint": fingerprint}
        save_detector(self.out_dir / MODEL_FINAL, self.model.cpu(), self.detector, self.build_kwargs, extra)
        self.model.to(self.device)


def _plain(value: Any) -> Any:
    """JSON-like copy (tuples -> lists, paths -> str, numpy -> python) for storing settings in checkpoints."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, np.generic):
        return value.item()
    return value
