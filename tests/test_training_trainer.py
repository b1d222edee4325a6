"""The shared training loop: exact resume, crash recovery, logging, clipping; and run_finetuning end to end."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pretrain_det3d.training.dataloader import load_case_records
from pretrain_det3d.training.trainer import (
    CHECKPOINT_LATEST,
    DetectorTrainer,
    TrainingSettings,
    seed_everything,
)

PATCH = [16, 16, 16]


class TinyDetector(nn.Module):
    """Stand-in detector: a conv encoder, dropout (so the torch generator matters) and two loss terms."""

    def __init__(self, in_channels: int = 1) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv3d(in_channels, 4, 3, padding=1), nn.ReLU(), nn.Dropout(0.3))
        self.seg_head = nn.Conv3d(4, 1, 1)
        self.box_head = nn.Linear(4, 6)

    def compute_losses(self, images, targets, seg):
        features = self.encoder(images)
        seg_loss = nn.functional.binary_cross_entropy_with_logits(self.seg_head(features), seg.float())
        pooled = self.box_head(features.mean(dim=(2, 3, 4)))  # [B, 6]
        wanted = torch.stack([t["boxes"].mean(0) if len(t["boxes"]) else torch.zeros(6) for t in targets])
        box_loss = nn.functional.l1_loss(pooled, wanted / 16)
        return {"loss": seg_loss + box_loss, "seg": seg_loss, "box": box_loss}


def _write_dataset(root: Path, num_cases: int = 3) -> list[str]:
    rng = np.random.default_rng(0)
    cases_dir = root / "cases"
    cases_dir.mkdir(parents=True)
    names = []
    for i in range(num_cases):
        seg = np.zeros((20, 24, 24), dtype=np.int16)
        z, y, x = rng.integers(2, 14, size=3)
        seg[z:z + 5, y:y + 6, x:x + 4] = 1
        image = rng.normal(size=(1, 20, 24, 24)).astype(np.float32) + 2 * (seg > 0)
        name = f"case_{i:03d}"
        np.save(cases_dir / f"{name}.npy", image)
        np.save(cases_dir / f"{name}_seg.npy", seg)
        meta = {"instances": {"1": 0}, "foreground_locations": np.argwhere(seg > 0)[::5].tolist(),
                "boxes": [], "labels": [0]}
        (cases_dir / f"{name}.json").write_text(json.dumps(meta))
        names.append(name)
    (root / "plan.json").write_text(json.dumps({
        "target_spacing": [1, 1, 1], "modalities": {"0": "CT"}, "normalisation": [{"scheme": "zscore"}],
        "num_classes": 1, "class_names": ["lesion"], "median_shape": [20, 24, 24],
        "box_sizes": [[5, 6, 4]] * 3,
    }))
    (root / "splits.json").write_text(json.dumps([{"train": names[:2], "val": names[2:]},
                                                  {"train": names[1:], "val": names[:1]}]))
    return names


SETTINGS = {
    "iterations": 6, "batch_size": 2, "patch_size": PATCH, "lr": 0.05, "warmup_iterations": 2,
    "checkpoint_every": 2, "num_workers": 0, "augmentation": True, "threads": 1, "progress_bar": False,
}


def _trainer(root: Path, out_dir: Path, init_seed: int = 0, **overrides) -> DetectorTrainer:
    seed_everything(init_seed)
    settings = TrainingSettings.from_settings({**SETTINGS, **overrides})
    return DetectorTrainer(TinyDetector(), "tiny", settings, load_case_records(root, ["case_000", "case_001"]),
                           out_dir, seed=0, build_kwargs={"in_channels": 1})


def _final_state(out_dir: Path) -> dict[str, torch.Tensor]:
    record = torch.load(out_dir / "model_final.pth", weights_only=True)
    assert record["detector"] == "tiny" and record["build_kwargs"] == {"in_channels": 1}
    return record["state_dict"]


def _log_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(handle)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("preprocessed")
    _write_dataset(root)
    return root


@pytest.fixture(scope="module")
def uninterrupted(dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    _trainer(dataset, out).run()
    return out


def test_uninterrupted_run_writes_final_model_and_log(uninterrupted):
    assert (uninterrupted / "model_final.pth").is_file()
    assert not (uninterrupted / CHECKPOINT_LATEST).exists()  # dropped once the final model exists
    rows = _log_rows(uninterrupted / "log.csv")
    assert [int(r["iteration"]) for r in rows] == list(range(6))
    assert list(rows[0]) == ["iteration", "lr", "loss", "box", "seg"]
    # the lr column is the schedule: warm-up s + (b - s) * (it + 1) / 2 from s = 1e-6, then poly over the 4
    # remaining iterations
    expected = [1e-6 + (0.05 - 1e-6) / 2, 0.05] + [0.05 * (1 - k / 4) ** 0.9 for k in range(4)]
    assert [float(r["lr"]) for r in rows] == pytest.approx(expected)
    assert all(np.isfinite(float(r["loss"])) for r in rows)


def test_paused_and_resumed_run_equals_uninterrupted(dataset, uninterrupted, tmp_path):
    _trainer(dataset, tmp_path).run(stop_at=3)
    assert (tmp_path / CHECKPOINT_LATEST).is_file() and not (tmp_path / "model_final.pth").exists()
    assert not (tmp_path / "log.csv").exists()  # the named log appears only when complete
    # a new process: different initial weights and global generator states, all replaced by the checkpoint
    torch.manual_seed(123)
    np.random.seed(123)
    _trainer(dataset, tmp_path, init_seed=99).run()
    reference, resumed = _final_state(uninterrupted), _final_state(tmp_path)
    assert reference.keys() == resumed.keys()
    for key in reference:
        assert torch.equal(reference[key], resumed[key]), key
    assert _log_rows(tmp_path / "log.csv") == _log_rows(uninterrupted / "log.csv")


class _Crash(RuntimeError):
    pass


def test_crash_resumes_from_latest_checkpoint(dataset, uninterrupted, tmp_path):
    trainer = _trainer(dataset, tmp_path)

    def crash_at_4(iteration, row):
        if iteration == 4:
            raise _Crash("simulated SLURM time limit")

    trainer.on_iteration_end = crash_at_4
    with pytest.raises(_Crash):
        trainer.run()
    state = torch.load(tmp_path / CHECKPOINT_LATEST, weights_only=True)
    assert state["iteration"] == 4 and state["data"]["next_batch"] == 4
    assert {"model", "optimizer", "scaler", "rng"} <= set(state)
    assert {"torch", "numpy", "python"} <= set(state["rng"])
    _trainer(dataset, tmp_path, init_seed=5).run()
    for key, value in _final_state(uninterrupted).items():
        assert torch.equal(value, _final_state(tmp_path)[key]), key
    assert _log_rows(tmp_path / "log.csv") == _log_rows(uninterrupted / "log.csv")


def test_gradient_clipping_bounds_the_first_update(dataset, tmp_path):
    clip, lr, momentum = 1e-3, 0.05, 0.9
    trainer = _trainer(dataset, tmp_path, grad_clip=clip, warmup_iterations=0, weight_decay=0.0, iterations=2)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.run(stop_at=1)
    step = torch.cat([(p.detach() - b).flatten() for p, b in zip(trainer.model.parameters(), before)])
    # first Nesterov step from an empty momentum buffer: w -= lr * (1 + momentum) * g_clipped, |g_clipped| = clip
    assert step.norm().item() == pytest.approx(lr * (1 + momentum) * clip, rel=1e-3)


def test_cpu_runs_in_full_precision_and_threads_are_set(dataset, tmp_path):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        trainer = _trainer(dataset, tmp_path, threads=2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert trainer.device.type == "cpu" and trainer.amp_dtype is None and not trainer.scaler.is_enabled()


def test_bad_settings_name_the_key():
    with pytest.raises(ValueError, match="warmup_iterations"):
        TrainingSettings.from_settings({"iterations": 5, "warmup_iterations": 5})
    with pytest.raises(ValueError, match="patch_size"):
        TrainingSettings.from_settings({"patch_size": [16, 16]})


def test_run_finetuning_with_real_detector_and_pretrained_encoder(tmp_path):
    from pretrain_det3d.models.backbone import build_resenc_unet
    from pretrain_det3d.models.checkpoint import save_pretraining_checkpoint
    from pretrain_det3d.models.registry import load_detector
    from pretrain_det3d.training.finetune import run_finetuning

    root = tmp_path / "preprocessed"
    _write_dataset(root)
    torch.manual_seed(1234)  # not the fine-tuning seed, so a missing transfer would show
    network = build_resenc_unet("resenc_demo", 1, 1)
    save_pretraining_checkpoint(tmp_path / "pre.pth", network, "resenc_demo", 1, PATCH, "mae")
    settings = {**SETTINGS, "iterations": 2, "warmup_iterations": 1, "lr": 0.0, "preset": "resenc_demo",
                "fpn_channels": 8, "optimizer": "sgd", "weight_decay": 0.0}
    out = tmp_path / "fold1"
    path = run_finetuning(root, 1, "retina_unet", settings, tmp_path / "pre.pth", out, seed=0)
    assert path == out / "model_final.pth"
    model, record = load_detector(path)
    assert record["fold"] == 1 and record["init_checkpoint"] == str(tmp_path / "pre.pth")
    assert record["transfer_report"]["loaded"] > 10
    # lr 0: the transferred stem and encoder are exactly the pre-trained ones
    pretrained = network.encoder.state_dict()
    compared = 0
    for key, value in model.encoder.state_dict().items():
        if key in pretrained and (key.startswith("stem") or key.startswith("stages")):
            assert torch.equal(value, pretrained[key]), key
            compared += 1
    assert compared > 10
    rows = _log_rows(out / "log.csv")
    assert [int(r["iteration"]) for r in rows] == [0, 1] and "loss" in rows[0]
