"""The benchmark's JSON record (schema, validation) and its short text table.

Example:
    >>> validate_record({"schema_version": 0})
    Traceback (most recent call last):
    ...
    ValueError: benchmark record: schema_version is 0, expected 1
"""

from __future__ import annotations

from typing import Any, Mapping

SCHEMA_VERSION = 1

#: section -> required keys; a value of ``None`` is allowed where a number cannot be measured (no GPU, skipped)
REQUIRED_KEYS: dict[str, tuple[str, ...]] = {
    "config": ("detector", "preset", "patch_size", "batch_size", "num_workers", "device", "warmup", "repeats"),
    "environment": ("torch", "python", "device_name", "cpu_count", "torch_threads"),
    "training": ("iterations_per_second", "step", "flops_per_iteration", "achieved_flops_per_second",
                 "peak_device_memory_bytes", "peak_host_memory_bytes", "amp_dtype"),
    "loading": ("batches_per_second", "num_workers", "model_iterations_per_second", "loader_to_model_ratio",
                "keeps_up"),
    "inference": ("seconds_per_case", "tiles", "case_shape"),
    "evaluation": ("seconds", "num_cases", "boxes_per_case", "monai_seconds", "ratio"),
    "comparisons": ("loader_vs_nnunet", "train_step_vs_monai"),
}
OPTIONAL_SECTIONS = ("inference", "evaluation")  # may be null when switched off
POSITIVE_NUMBERS = (("training", "iterations_per_second"), ("loading", "batches_per_second"))


def validate_record(record: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming the first missing section / key or non-positive rate."""
    if record.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"benchmark record: schema_version is {record.get('schema_version')}, expected {SCHEMA_VERSION}")
    for section, keys in REQUIRED_KEYS.items():
        if section not in record:
            raise ValueError(f"benchmark record: section {section!r} is missing")
        body = record[section]
        if body is None and section in OPTIONAL_SECTIONS:
            continue
        if not isinstance(body, Mapping):
            raise ValueError(f"benchmark record: section {section!r} must be an object, got {type(body).__name__}")
        missing = [key for key in keys if key not in body]
        if missing:
            raise ValueError(f"benchmark record: {section} lacks {missing}")
    for section, key in POSITIVE_NUMBERS:
        value = record[section][key]
        if not isinstance(value, (int, float)) or value <= 0:
            raise ValueError(f"benchmark record: {section}.{key} must be a positive number, got {value!r}")


def _fmt(value: Any, unit: str = "", digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}g}{unit}"
    return f"{value}{unit}"


def _scaled(value: float | None, scale: float, unit: str) -> str:
    return "n/a" if value is None else f"{value / scale:.3g} {unit}"


def format_table(record: Mapping[str, Any]) -> str:
    """A two-column text table of the headline numbers."""
    c, t, l = record["config"], record["training"], record["loading"]
    rows = [
        ("detector / preset", f"{c['detector']} / {c['preset']}"),
        ("patch, batch", f"{'x'.join(str(p) for p in c['patch_size'])}, {c['batch_size']}"),
        ("device", f"{record['environment']['device_name']} (amp: {t['amp_dtype'] or 'off'})"),
        ("train iterations/s", _fmt(t["iterations_per_second"])),
        ("train step median", _fmt(t["step"]["median_s"], " s")),
        ("FLOPs per iteration", _scaled(t["flops_per_iteration"], 1e9, "GFLOP")),
        ("achieved FLOP rate", _scaled(t["achieved_flops_per_second"], 1e12, "TFLOP/s")),
        ("peak device memory", _scaled(t["peak_device_memory_bytes"], 2**20, "MiB")),
        ("peak host memory", _scaled(t["peak_host_memory_bytes"], 2**20, "MiB")),
        (f"loader batches/s ({l['num_workers']} workers)", _fmt(l["batches_per_second"])),
        ("loader / model rate", f"{_fmt(l['loader_to_model_ratio'])} ({'keeps up' if l['keeps_up'] else 'data-bound'})"),
    ]
    if record.get("inference"):
        rows.append(("inference s/case", f"{_fmt(record['inference']['seconds_per_case'])} "
                                          f"({record['inference']['tiles']} tiles)"))
    if record.get("evaluation"):
        e = record["evaluation"]
        rows.append((f"evaluation s ({e['num_cases']} cases x {e['boxes_per_case']} boxes)", _fmt(e["seconds"])))
        if e.get("ratio") is not None:
            rows.append(("evaluation time MONAI / ours", f"{_fmt(e['ratio'])} (ours {_fmt(e['seconds'], ' s')} vs "
                                                         f"MONAI matching_batch + COCOMetric {_fmt(e['monai_seconds'], ' s')})"))
    comparisons = record["comparisons"]
    if comparisons.get("loader_vs_nnunet"):
        x = comparisons["loader_vs_nnunet"]
        rows.append(("loader rate ours / nnU-Net", f"{_fmt(x['ratio'])} (ours {_fmt(x['ours']['batches_per_second'])}"
                                                   f" vs nnU-Net {_fmt(x['nnunet']['batches_per_second'])} batches/s)"))
    if comparisons.get("train_step_vs_monai"):
        x = comparisons["train_step_vs_monai"]
        rows.append(("step time MONAI / ours", f"{_fmt(x['ratio'])} (ours {_fmt(x['ours_iterations_per_second'])}"
                                               f" vs MONAI {_fmt(x['monai_iterations_per_second'])} it/s)"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
