"""``run_benchmark``: every measurement for one detector / preset / patch / batch, as one JSON record.

Example:
    >>> record = run_benchmark({"preset": "resenc_demo", "patch_size": [32, 32, 32], "batch_size": 2,
    ...                         "detector_settings": {"fpn_channels": 32}}, out_json="benchmark.json")  # doctest: +SKIP
    >>> print(format_table(record))  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
import yaml
from tqdm import tqdm

from pretrain_det3d.benchmark.comparisons import compare_loaders, compare_train_steps
from pretrain_det3d.benchmark.evaluation import DEFAULT_EVAL_BOXES, DEFAULT_EVAL_CASES, measure_evaluation
from pretrain_det3d.benchmark.fixtures import read_plan, write_benchmark_cases
from pretrain_det3d.benchmark.inference import DEFAULT_INFERENCE_REPEATS, measure_inference
from pretrain_det3d.benchmark.loading import DEFAULT_LOADER_BATCHES, DEFAULT_LOADER_WARMUP, measure_loading
from pretrain_det3d.benchmark.report import SCHEMA_VERSION, validate_record
from pretrain_det3d.benchmark.timing import DEFAULT_REPEATS, DEFAULT_WARMUP
from pretrain_det3d.benchmark.training import measure_training
from pretrain_det3d.data.io import load_npy
from pretrain_det3d.training.dataloader import list_corpus_cases, load_case_records
from pretrain_det3d.training.trainer import DetectorTrainer, TrainingSettings, seed_everything
from pretrain_det3d.utils.atomic import write_json

LOGGER = logging.getLogger(__name__)

DEFAULT_NUM_WORKERS = 2
DEFAULT_NUM_CASES = 4
DEFAULT_CASE_SHAPE = (64, 64, 64)
#: training-settings keys a study config's detector entry holds that are not detector constructor settings
TRAINING_KEYS = set(TrainingSettings.model_fields)
MONAI_COMPARABLE = ("retina_unet",)  # the MONAI comparison reuses the Retina U-Net's features and anchors


@dataclass(frozen=True)
class BenchmarkSettings:
    """What to benchmark and how long.

    ``detector_settings`` go to ``models.registry.build_detector`` (with ``preset``); ``training`` holds
    ``TrainingSettings`` overrides (fast-path switches: ``amp_dtype``, ``compile``, ``cudnn_benchmark``,
    ``pin_memory``, ...). ``preprocessed`` benchmarks a real preprocessed dataset instead of synthetic cases.

    Example:
        >>> BenchmarkSettings.from_settings({"patch_size": 32}).patch_size
        (32, 32, 32)
    """

    detector: str = "retina_unet"
    preset: str = "resenc_demo"
    patch_size: tuple[int, int, int] = (32, 32, 32)
    batch_size: int = 2
    detector_settings: Mapping[str, Any] = field(default_factory=dict)
    training: Mapping[str, Any] = field(default_factory=dict)
    num_workers: int = DEFAULT_NUM_WORKERS
    device: str = "auto"
    threads: int | None = None
    warmup: int = DEFAULT_WARMUP
    repeats: int = DEFAULT_REPEATS
    loader_batches: int = DEFAULT_LOADER_BATCHES
    loader_warmup: int = DEFAULT_LOADER_WARMUP
    num_cases: int = DEFAULT_NUM_CASES
    case_shape: tuple[int, int, int] = DEFAULT_CASE_SHAPE
    preprocessed: str | None = None
    inference: bool = True
    inference_repeats: int = DEFAULT_INFERENCE_REPEATS
    evaluation: bool = True
    eval_cases: int = DEFAULT_EVAL_CASES
    eval_boxes: int = DEFAULT_EVAL_BOXES
    compare: bool = True
    count_flops: bool = True
    seed: int = 0

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any] | None) -> "BenchmarkSettings":
        """Build from a mapping; an unknown key is an error naming it."""
        values = dict(settings or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise KeyError(f"unknown benchmark settings {unknown}; known: {sorted(known)}")
        for key in ("patch_size", "case_shape"):
            if key in values:
                value = values[key]
                value = [value] * 3 if isinstance(value, int) else list(value)
                if len(value) != 3 or any(int(v) <= 0 for v in value):
                    raise ValueError(f"benchmark setting {key!r} must be three positive integers, got {values[key]}")
                values[key] = tuple(int(v) for v in value)
        for key in ("batch_size", "repeats", "loader_batches", "num_cases", "inference_repeats"):
            if key in values and int(values[key]) <= 0:
                raise ValueError(f"benchmark setting {key!r} must be positive, got {values[key]}")
        return cls(**values)


def settings_from_study_config(config_path: str | os.PathLike, detector_entry: str) -> dict[str, Any]:
    """Benchmark settings matching ``detectors.{detector_entry}`` of a study config (and its ``backbone``).

    Example:
        >>> settings_from_study_config("config/config.yaml", "retina_unet")["batch_size"]  # doctest: +SKIP
        2
    """
    path = Path(config_path)
    config = yaml.safe_load(path.read_text())
    try:
        entry = dict(config["detectors"][detector_entry])
    except (KeyError, TypeError):
        raise KeyError(f"{path}: has no detectors.{detector_entry} entry") from None
    preset = entry.pop("preset", config.get("backbone", "resenc_l"))
    out: dict[str, Any] = {"detector": entry.pop("detector", detector_entry), "preset": preset}
    for key in ("patch_size", "batch_size", "num_workers"):
        if key in entry:
            out[key] = entry[key]
    out["training"] = {k: v for k, v in entry.items() if k in TRAINING_KEYS and k not in out}
    out["detector_settings"] = {k: v for k, v in entry.items() if k not in TRAINING_KEYS}
    return out


def _environment(device: torch.device) -> dict[str, Any]:
    return {"torch": torch.__version__, "python": platform.python_version(),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def run_benchmark(
    settings: BenchmarkSettings | Mapping[str, Any],
    out_json: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Measure training, loading, inference, evaluation and the comparisons; write ``out_json`` atomically."""
    from pretrain_det3d.models.registry import build_detector

    s = settings if isinstance(settings, BenchmarkSettings) else BenchmarkSettings.from_settings(settings)
    if s.threads:
        torch.set_num_threads(int(s.threads))
    with tempfile.TemporaryDirectory(prefix="pretrain_det3d_benchmark_") as scratch:
        if s.preprocessed is None:
            root = Path(scratch) / "data"
            cases = write_benchmark_cases(root, s.num_cases, s.case_shape, s.seed)
        else:
            root = Path(s.preprocessed)
            cases = list_corpus_cases(root)[: s.num_cases]
        plan = read_plan(root)
        records = load_case_records(root, cases)
        training = TrainingSettings.from_settings(
            {**dict(s.training), "patch_size": s.patch_size, "batch_size": s.batch_size, "device": s.device,
             "num_workers": s.num_workers, "progress_bar": False},
            iterations=10**6, warmup_iterations=0,
        )
        seed_everything(s.seed)
        model = build_detector(s.detector, {"preset": s.preset, **dict(s.detector_settings)},
                               len(plan["modalities"]), int(plan["num_classes"]), plan)
        trainer = DetectorTrainer(model, s.detector, training, records, out_dir=Path(scratch) / "train", seed=s.seed)
        batch = trainer.make_stream(0).make_batch(0)
        device = trainer.device
        config = {"detector": s.detector, "preset": s.preset, "patch_size": list(s.patch_size),
                  "batch_size": s.batch_size, "num_workers": s.num_workers, "device": str(device),
                  "warmup": s.warmup, "repeats": s.repeats, "detector_settings": dict(s.detector_settings),
                  "training": {k: v for k, v in training.model_dump().items()
                               if k in ("amp_dtype", "mixed_precision", "cudnn_benchmark", "pin_memory",
                                        "persistent_workers", "memory_map", "compile", "channels_last",
                                        "augmentation")},
                  "data": "synthetic" if s.preprocessed is None else str(root), "num_cases": len(cases),
                  "case_shape": list(s.case_shape) if s.preprocessed is None else None}
        record: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "config": config,
                                  "environment": _environment(device)}
        stages = tqdm(total=5, desc="benchmark", unit="stage")

        record["training"] = measure_training(trainer, batch, s.warmup, s.repeats, count_flops=s.count_flops)
        stages.update(1)
        model_rate = record["training"]["iterations_per_second"]
        loading = measure_loading(records, s.patch_size, s.batch_size, s.num_workers, s.seed,
                                  augmentation=training.augmentation_params(), num_batches=s.loader_batches,
                                  warmup=s.loader_warmup, memory_map=training.memory_map,
                                  foreground_fraction=training.foreground_fraction)
        loading.update(model_iterations_per_second=model_rate,
                       loader_to_model_ratio=loading["batches_per_second"] / model_rate,
                       keeps_up=bool(loading["batches_per_second"] >= model_rate))
        record["loading"] = loading
        stages.update(1)

        record["inference"] = None
        if s.inference:
            image = load_npy(records[0].image_path, mmap_mode="r")
            # no warm-up pass: the training stage already ran this model at this patch size
            record["inference"] = measure_inference(trainer.model, image, s.patch_size, device=device,
                                                    warmup=0, repeats=s.inference_repeats)
            trainer.model.to(device)
        stages.update(1)
        # ours and MONAI's matching_batch + COCOMetric on the same boxes, interleaved (when compare is on)
        record["evaluation"] = (measure_evaluation(s.eval_cases, s.eval_boxes, s.seed, repeats=max(1, min(s.repeats, 3)),
                                                   compare=s.compare)
                                if s.evaluation else None)
        stages.update(1)

        comparisons: dict[str, Any] = {"loader_vs_nnunet": None, "train_step_vs_monai": None}
        if s.compare:
            comparisons["loader_vs_nnunet"] = compare_loaders(records, s.patch_size, s.batch_size, s.num_workers,
                                                              s.seed, s.loader_batches, s.loader_warmup)
            if s.detector in MONAI_COMPARABLE:
                # last: it trains the shared encoder and FPN further
                comparisons["train_step_vs_monai"] = compare_train_steps(trainer, batch, s.warmup, s.repeats)
            else:
                LOGGER.info("no MONAI counterpart for detector %r; train_step_vs_monai left null", s.detector)
        record["comparisons"] = comparisons
        stages.update(1)
        stages.close()
    validate_record(record)
    if out_json is not None:
        write_json(out_json, record)
    return record
