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

Example:
    >>> trainer = DetectorTrainer(model, "retina_unet", settings, records, out_dir="results/finetune/x",
    ...                           seed=0)  # doctest: +SKIP
    >>> trainer.run()  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import logging
import os
import random
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from tqdm import tqdm

from pretrain_det3d.training.augmentation import AugmentationParams
from pretrain_det3d.training.dataloader import CaseRecord, PatchBatchStream, build_loader
from pretrain_det3d.training.schedule import PolyWarmupSchedule, build_optimizer
from pretrain_det3d.utils.atomic import atomic_path, save_torch

LOGGER = logging.getLogger(__name__)

CHECKPOINT_LATEST = "checkpoint_latest.pth"
MODEL_FINAL = "model_final.pth"
LOG_NAME = "log.csv"
RUNNING_LOG_SUFFIX = ".running"  # the log grows here during training; the named log appears whole at the end
GRAD_CLIP_NORM = 12.0
#: ``amp_dtype`` values: "auto" = bf16 where the GPU supports it, else fp16, and full precision on CPU
AMP_DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
CHANNELS_LAST_CHOICES = ("auto", True, False)
CHECKPOINT_FORMAT = 1
#: signals that end a run early with a checkpoint: SLURM sends SIGTERM at the time limit or on preemption, and
#: SIGUSR1 ahead of it when asked (profiles/slurm: --signal=USR1@600)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class TrainingInterrupted(RuntimeError):
    """A stop signal arrived; the run saved ``checkpoint_latest.pth`` and resumes from it when started again."""


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
class TrainingSettings:
    """Every knob of the training loop, with the fine-tuning defaults of the paper's Retina U-Net.

    ``augmentation`` is ``True`` (defaults), ``False`` (off) or a mapping of ``AugmentationParams`` overrides.
    ``threads`` sets ``torch.set_num_threads`` (``None`` leaves torch's choice). ``device`` is ``"auto"``
    (CUDA when available), ``"cpu"`` or ``"cuda[:i]"``.

    Example:
        >>> s = TrainingSettings.from_settings({"iterations": 10, "warmup_iterations": 2, "preset": "ignored"})
        >>> s.iterations, s.optimizer, s.grad_clip
        (10, 'sgd', 12.0)
    """

    iterations: int = 1000
    batch_size: int = 2
    patch_size: tuple[int, int, int] = (64, 64, 64)
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 3e-5
    warmup_iterations: int = 100
    grad_clip: float = GRAD_CLIP_NORM
    checkpoint_every: int = 100
    num_workers: int = 0
    augmentation: bool | Mapping[str, Any] = True
    foreground_fraction: float = 0.5
    device: str = "auto"
    threads: int | None = None
    mixed_precision: bool = True
    # ---- fast paths (see docs/benchmark.md); each falls back to the plain path where it cannot apply
    amp_dtype: str = "auto"  # "auto" | "bfloat16" | "float16"; "bfloat16" also autocasts on CPU
    cudnn_benchmark: bool = True  # CUDA only: let cuDNN pick the fastest convolution algorithms
    pin_memory: bool = True  # CUDA only: page-locked batches and non-blocking host-to-device copies
    persistent_workers: bool = True  # with num_workers > 0: keep the loader processes alive between passes
    prefetch_factor: int = 2  # with num_workers > 0: batches each worker prepares ahead
    memory_map: bool = True  # read patches out of memory-mapped arrays instead of loading whole cases
    compile: bool = False  # torch.compile the model's forward (nn.Module.compile keeps state-dict keys)
    # "auto" | true | false: 3D conv weights in channels-last layout ("auto": on CPU, where it was measured)
    channels_last: bool | str = "auto"
    keep_latest_checkpoint: bool = False  # nnU-Net style: drop checkpoint_latest once the final file exists
    progress_bar: bool = True

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any] | None, **defaults: Any) -> "TrainingSettings":
        """Known keys of ``settings`` over ``defaults`` over the class defaults; other keys are ignored
        (they belong to the detector or the pre-training method)."""
        known = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(defaults) - known)
        if bad:
            raise KeyError(f"unknown training defaults {bad}")
        values = {**defaults, **{k: v for k, v in dict(settings or {}).items() if k in known}}
        if "patch_size" in values:
            patch = values["patch_size"]
            patch = [patch] * 3 if isinstance(patch, int) else list(patch)
            if len(patch) != 3:
                raise ValueError(f"settings key 'patch_size' must have three entries, got {values['patch_size']}")
            values["patch_size"] = tuple(int(p) for p in patch)
        resolved = cls(**values)
        resolved.validate()
        return resolved

    def validate(self) -> None:
        for key in ("iterations", "batch_size", "checkpoint_every"):
            if int(getattr(self, key)) <= 0:
                raise ValueError(f"settings key {key!r} must be positive, got {getattr(self, key)}")
        if not 0 <= self.warmup_iterations < self.iterations:
            raise ValueError(
                f"settings key 'warmup_iterations' must lie in [0, iterations={self.iterations}), "
                f"got {self.warmup_iterations}"
            )
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"settings key 'grad_clip' must be positive or null, got {self.grad_clip}")
        if self.amp_dtype not in AMP_DTYPES:
            raise ValueError(f"settings key 'amp_dtype' must be one of {sorted(AMP_DTYPES)}, got {self.amp_dtype!r}")
        if int(self.prefetch_factor) <= 0:
            raise ValueError(f"settings key 'prefetch_factor' must be positive, got {self.prefetch_factor}")
        check_channels_last(self.channels_last)

    def augmentation_params(self) -> AugmentationParams | None:
        if self.augmentation is True:
            return AugmentationParams()
        if not self.augmentation:
            return None
        if isinstance(self.augmentation, Mapping):
            return AugmentationParams.from_settings(self.augmentation)
        raise ValueError(f"settings key 'augmentation' must be true, false or a mapping, got {self.augmentation!r}")


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
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=self.amp_dtype == torch.float16 and self.device.type == "cuda"
        )
        self.iteration = 0  # completed iterations
        self.log = _CsvLog(Path(log_path) if log_path is not None else self.out_dir / LOG_NAME)

    # ----------------------------------------------------------------- hooks a subclass may override
    def configure_optimizer(self) -> torch.optim.Optimizer:
        return build_optimizer(self.model.parameters(), dataclasses.asdict(self.settings))

    def configure_schedule(self) -> PolyWarmupSchedule:
        s = self.settings
        return PolyWarmupSchedule(base_lr=s.lr, max_iterations=s.iterations, warmup_iterations=s.warmup_iterations)

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

    def checkpoint_state(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "iteration": self.iteration,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": capture_rng_states(),
            "data": {"next_batch": self.iteration, "seed": self.seed},
            "settings": _plain(dataclasses.asdict(self.settings)),
        }

    def load_checkpoint_state(self, state: Mapping[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.iteration = int(state["iteration"])
        if int(state["data"]["seed"]) != self.seed:
            raise ValueError(f"{self.checkpoint_path}: written with seed {state['data']['seed']}, now {self.seed}")
        restore_rng_states(state["rng"])

    # ----------------------------------------------------------------- the loop
    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / CHECKPOINT_LATEST

    def save_checkpoint(self) -> None:
        save_torch(self.checkpoint_path, self.checkpoint_state())

    def load_checkpoint(self) -> bool:
        """Resume from ``checkpoint_latest.pth`` if it exists; returns whether it did."""
        if not self.checkpoint_path.is_file():
            return False
        try:
            state = torch.load(self.checkpoint_path, map_location=self.device, weights_only=True)
        except Exception as error:  # a foreign or damaged file: say which
            raise RuntimeError(f"{self.checkpoint_path}: cannot resume from this checkpoint ({error})") from error
        self.load_checkpoint_state(state)
        LOGGER.info("resumed from %s at iteration %d", self.checkpoint_path, self.iteration)
        return True

    def run(self, stop_at: int | None = None) -> None:
        """Train until ``settings.iterations`` (or pause after ``stop_at`` iterations, saving a checkpoint).

        Resumes automatically from ``checkpoint_latest.pth``.
        """
        total = self.settings.iterations
        end = total if stop_at is None else min(int(stop_at), total)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.load_checkpoint()
        self.log.start(self.iteration)
        with stop_requests() as stop:
            try:
                if self.iteration < end:
                    self._loop(end, stop)
            finally:
                self.log.close()
            if stop.is_set():
                self.save_checkpoint()
                raise TrainingInterrupted(
                    f"stopped by a signal at iteration {self.iteration}/{total}; {self.checkpoint_path} holds the "
                    "state and a rerun resumes from it"
                )
        if self.iteration < total:
            self.save_checkpoint()  # paused on purpose
            return
        self.save_final()
        self.log.publish()
        if not self.settings.keep_latest_checkpoint:
            self.checkpoint_path.unlink(missing_ok=True)

    def _loop(self, end: int, stop: threading.Event | None = None) -> None:
        batches: Iterator[dict[str, Any]] = iter(self.build_batches(self.iteration))
        progress = tqdm(total=self.settings.iterations, initial=self.iteration, desc=type(self).__name__,
                        disable=not self.settings.progress_bar, dynamic_ncols=True)
        try:
            while self.iteration < end and not (stop is not None and stop.is_set()):
                started = time.perf_counter()
                lr = self.schedule.apply(self.optimizer, self.iteration)
                batch = move_to_device(next(batches), self.device, non_blocking=self.uses_pinned_memory)
                losses = self.train_step(batch)
                row = {"iteration": self.iteration, "lr": lr, **losses, "seconds": time.perf_counter() - started}
                self.log.append(row)
                self.on_iteration_end(self.iteration, row)
                self.iteration += 1
                progress.update(1)
                progress.set_postfix(loss=f"{losses['loss']:.4f}", lr=f"{lr:.2e}")
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
    ) -> None:
        super().__init__(model, settings, records, out_dir, seed, log_path)
        self.detector = detector
        # the detector's constructor arguments; None -> model.build_kwargs (set by models.registry.build_detector)
        self.build_kwargs = None if build_kwargs is None else dict(build_kwargs)
        self.extra = dict(extra or {})

    def compute_losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return self.model.compute_losses(batch["images"], batch["targets"], batch["seg"])

    def save_final(self) -> None:
        from pretrain_det3d.models.registry import save_detector

        extra = {**self.extra, "iterations": self.iteration, "seed": self.seed,
                 "settings": _plain(dataclasses.asdict(self.settings))}
        save_detector(self.out_dir / MODEL_FINAL, self.model.cpu(), self.detector, self.build_kwargs, extra)
        self.model.to(self.device)


def _plain(value: Any) -> Any:
    """JSON-like copy (tuples -> lists) for storing settings in checkpoints."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
