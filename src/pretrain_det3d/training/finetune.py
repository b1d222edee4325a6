"""Fine-tuning of a detector on one cross-validation fold (the ``finetune`` rule).

A rerun resumes from ``{out_dir}/checkpoint_latest.pth`` only when that checkpoint's run fingerprint matches this
run's: training settings, the detector's build arguments, the sha256 of ``init_checkpoint``, the fold's training
cases, the seed and the code versions (see ``training.trainer``). Otherwise it stops with an error listing what
changed; ``PRETRAIN_DET3D_STALE_CHECKPOINT=move`` moves the old checkpoint aside and starts over instead.

Example:
    >>> run_finetuning("results/data/preprocessed/synthetic", fold=0, detector="retina_unet",
    ...                settings={"iterations": 200, "patch_size": [48, 48, 48]},
    ...                init_checkpoint="results/pretrain/mae/checkpoint_final.pth",
    ...                out_dir="results/finetune/retina_unet/mae/synthetic/fold0", seed=0)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Sequence

from pretrain_det3d.data.label_fractions import SCHEDULES, read_label_subset, scaled_iterations
from pretrain_det3d.training.dataloader import load_case_records
from pretrain_det3d.training.staging import staged_cases
from pretrain_det3d.training.trainer import DetectorTrainer, TrainingSettings, seed_everything

LOGGER = logging.getLogger(__name__)

KEY_EXAMPLES = 3  # example keys shown after the per-module counts of a key summary
#: entries of the dataset's plan.json kept in model_final.pth, so that `detect` preprocesses new scans the same way
PLAN_KEYS_FOR_INFERENCE = ("dataset", "target_spacing", "modalities", "normalisation", "foreground_source",
                           "num_classes", "class_names")


def summarize_keys(keys: Sequence[str], examples: int = KEY_EXAMPLES) -> str:
    """Count ``keys`` per top-level module (``decoder.*: 42``), plus a few examples: one log line, however
    many keys (a ResEnc-L decoder alone has hundreds).

    Example:
        >>> summarize_keys(["decoder.seg.weight", "decoder.seg.bias", "head.weight", "scale"], examples=2)
        '4 keys: decoder.*: 2, head.*: 1, scale: 1 (e.g. decoder.seg.weight, decoder.seg.bias, ...)'
        >>> summarize_keys([])
        'none'
    """
    if not keys:
        return "none"
    # a key without a dot is its own group; the others group by the module before the first dot
    counts = Counter(key.split(".", 1)[0] + (".*" if "." in key else "") for key in keys)
    groups = ", ".join(f"{group}: {count}" for group, count in sorted(counts.items()))
    shown = ", ".join(keys[:examples]) + (", ..." if len(keys) > examples else "")
    return f"{len(keys)} key{'s' if len(keys) != 1 else ''}: {groups} (e.g. {shown})"


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (run preprocessing first)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None


def fold_cases(preprocessed_root: str | os.PathLike, fold: int, part: str = "train") -> list[str]:
    """Case ids of ``part`` (``"train"`` or ``"val"``) of ``fold`` in ``splits.json``."""
    path = Path(preprocessed_root) / "splits.json"
    splits = _read_json(path)
    if not isinstance(splits, list) or not 0 <= fold < len(splits):
        raise ValueError(f"{path}: has no fold {fold} (it lists {len(splits) if isinstance(splits, list) else 0})")
    try:
        return list(splits[fold][part])
    except (KeyError, TypeError):
        raise ValueError(f"{path}: fold {fold} has no {part!r} list") from None


def run_finetuning(
    preprocessed_root: str | os.PathLike,
    fold: int,
    detector: str,
    settings: Mapping[str, Any],
    init_checkpoint: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    seed: int,
    log_path: str | os.PathLike | None = None,
    train_subset: str | os.PathLike | None = None,
    schedule: str = "same",
    init_stem: str | None = None,
    init_stem_key: str = "stem",
) -> Path:
    """Train ``detector`` on the training cases of ``fold`` and write ``{out_dir}/model_final.pth``.

    ``settings`` holds the training keys of ``TrainingSettings`` (iterations, batch_size, patch_size,
    optimizer, lr, momentum, weight_decay, warmup_iterations, grad_clip, checkpoint_every, num_workers,
    augmentation, foreground_fraction, device, threads) and whatever the detector reads. With
    ``init_checkpoint`` the stem and encoder stages are copied from that pre-training checkpoint (a detector
    with its own ``load_pretrained``, the native Retina U-Net, loads its release's layout instead); everything
    is then trained from the first iteration (the warm-up protects the transferred weights). Reruns resume
    from ``{out_dir}/checkpoint_latest.pth`` when it was written by this same run (fingerprint: settings, build
    arguments, ``init_checkpoint``'s sha256, the fold's training cases, seed, versions), and otherwise raise
    ``StaleCheckpointError`` (see ``training.trainer``). ``log_path`` defaults to ``{out_dir}/log.csv``.
    ``train_subset`` (a label-fraction subset file, ``data.label_fractions``) replaces the fold's training cases by
    its ``train`` list; with ``schedule="scaled"`` the iterations and warm-up are then scaled by the subset's share
    of the fold's training cases (``"same"``: unchanged). ``init_stem``: the stem to load from a checkpoint with one
    stem per source dataset (MultiTalent; ``init_stem_key`` is the config key that chose it, for the error that
    lists the stems present); a checkpoint with one stem ignores it. Returns the path of the final model.
    """
    from pretrain_det3d.models.registry import build_detector, get_detector_class, transfer_pretrained

    root = Path(preprocessed_root)
    out_dir = Path(out_dir)
    plan = _read_json(root / "plan.json")
    try:
        num_classes = int(plan["num_classes"])
        in_channels = len(plan["modalities"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{root / 'plan.json'}: needs 'num_classes' and 'modalities'") from None
    train_cases = fold_cases(root, fold, "train")
    # a detector's own defaults (the DETR's AdamW schedule) apply where the config is silent
    training = TrainingSettings.from_settings(settings, **getattr(get_detector_class(detector), "training_defaults", {}))
    label_fraction: dict[str, Any] | None = None
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if train_subset is not None:
        fold_train = train_cases
        train_cases = read_label_subset(train_subset, fold, fold_train)
        share = len(train_cases) / len(fold_train)
        if schedule == "scaled":
            iterations, warmup = scaled_iterations(training.iterations, training.warmup_iterations, share)
            training = training.model_copy(update={"iterations": iterations, "warmup_iterations": warmup})
        label_fraction = {"subset_file": str(train_subset), "num_cases": len(train_cases),
                          "num_fold_train": len(fold_train), "schedule": schedule,
                          "iterations": training.iterations}
        LOGGER.info("label fraction: %d of the fold's %d training cases (%s), %s schedule: %d iterations",
                    len(train_cases), len(fold_train), train_subset, schedule, training.iterations)

    seed_everything(seed)  # the detector's random initialisation depends on it
    # a detector whose network the checkpoint fixes (retina_unet_native) reads its architecture from it
    model = build_detector(detector, dict(settings), in_channels, num_classes, plan, init_checkpoint)
    extra: dict[str, Any] = {"fold": fold, "init_checkpoint": None if init_checkpoint is None else str(init_checkpoint)}
    # what `detect` (inference.detect) needs to preprocess new scans as this run's training cases were
    extra["preprocessed_root"] = str(root)
    extra["preprocessing_plan"] = {key: plan[key] for key in PLAN_KEYS_FOR_INFERENCE if key in plan}
    if label_fraction is not None:
        extra["label_fraction"] = label_fraction
    if init_checkpoint is not None:
        report = transfer_pretrained(model, init_checkpoint, stem=init_stem, stem_key=init_stem_key)
        counts = {"loaded": len(report.loaded_keys), "skipped": len(report.skipped_keys),
                  "adapted": len(report.adapted_keys)}
        LOGGER.info("encoder transfer from %s (stem %s): %s (skipped: %s; adapted: %s)", init_checkpoint,
                    getattr(report, "stem", None), counts, summarize_keys(report.skipped_keys),
                    summarize_keys(report.adapted_keys))
        extra["transfer_report"] = counts
        if getattr(report, "stem", None) is not None:
            extra["init_stem"] = report.stem  # the checkpoint prefix that was loaded

    with contextlib.ExitStack() as stack:
        data_root = root
        if settings.get("stage_to_local", False):
            data_root = stack.enter_context(staged_cases(root, train_cases, settings.get("stage_dir")))
        trainer = DetectorTrainer(
            model,
            detector=detector,
            settings=training,
            records=load_case_records(data_root, train_cases),
            out_dir=out_dir,
            seed=seed,
            log_path=log_path,
            extra=extra,
            init_checkpoint=init_checkpoint,
        )
        trainer.run()
    return out_dir / "model_final.pth"
