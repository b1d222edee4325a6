"""Stale checkpoints: a rerun resumes ``checkpoint_latest.pth`` only when it was written by the same run.

The measured faults this guards against: a run killed at iteration 71 of 200, rerun with ``iterations: 50``,
resumed at 71 and wrote a "50 iteration" model; a scratch checkpoint resumed under ``--init mae.pth`` was
recorded as an MAE run. Each test pauses a tiny run (``stop_at``), changes one thing and reruns.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from corpus_fixtures import write_blob_corpus
from pretrain_det3d.training.dataloader import load_case_records
from pretrain_det3d.training.trainer import (
    CHECKPOINT_LATEST,
    STALE_CHECKPOINT_ENV,
    DetectorTrainer,
    StaleCheckpointError,
    TrainingSettings,
    fingerprint_differences,
    run_fingerprint,
    seed_everything,
)

PATCH = [16, 16, 16]
SETTINGS = {
    "iterations": 6, "batch_size": 1, "patch_size": PATCH, "lr": 0.05, "warmup_iterations": 2,
    "checkpoint_every": 2, "num_workers": 0, "augmentation": False, "threads": 1, "progress_bar": False,
}
CASES = ["case_000", "case_001"]


class TinyDetector(nn.Module):
    """A conv encoder and a segmentation loss: enough for a checkpoint with model, optimiser and RNG state."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv3d(1, width, 3, padding=1), nn.ReLU(), nn.Dropout(0.3))
        self.seg_head = nn.Conv3d(width, 1, 1)

    def compute_losses(self, images, targets, seg):
        loss = nn.functional.binary_cross_entropy_with_logits(self.seg_head(self.encoder(images)), seg.float())
        return {"loss": loss}


def _write_dataset(root: Path, num_cases: int = 3) -> None:
    rng = np.random.default_rng(0)
    (root / "cases").mkdir(parents=True)
    for i in range(num_cases):
        seg = np.zeros((20, 20, 20), dtype=np.int16)
        seg[5:10, 6:12, 4:9] = 1
        image = rng.normal(size=(1, 20, 20, 20)).astype(np.float32) + 2 * (seg > 0)
        np.save(root / "cases" / f"case_{i:03d}.npy", image)
        np.save(root / "cases" / f"case_{i:03d}_seg.npy", seg)
        meta = {"instances": {"1": 0}, "foreground_locations": np.argwhere(seg > 0)[::7].tolist()}
        (root / "cases" / f"case_{i:03d}.json").write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fingerprint_data")
    _write_dataset(root)
    return root


def _trainer(root: Path, out_dir: Path, cases=CASES, init_checkpoint=None, width: int = 4, extra=None,
             **overrides) -> DetectorTrainer:
    seed_everything(0)
    settings = TrainingSettings.from_settings({**SETTINGS, **overrides})
    return DetectorTrainer(TinyDetector(width), "tiny", settings, load_case_records(root, cases), out_dir, seed=0,
                           build_kwargs={"width": 4}, init_checkpoint=init_checkpoint, extra=extra)


def _paused(root: Path, out_dir: Path, **overrides) -> Path:
    _trainer(root, out_dir, **overrides).run(stop_at=3)
    path = out_dir / CHECKPOINT_LATEST
    assert path.is_file() and not (out_dir / "model_final.pth").exists()
    return path


def _refused(trainer: DetectorTrainer) -> str:
    with pytest.raises(StaleCheckpointError) as caught:
        trainer.run()
    message = str(caught.value)
    # every refusal names the file and both ways to start over, and leaves the old state untouched
    assert str(trainer.checkpoint_path) in message and CHECKPOINT_LATEST in message
    assert f"delete {trainer.checkpoint_path}" in message and f"{STALE_CHECKPOINT_ENV}=move" in message
    assert trainer.checkpoint_path.is_file() and not (trainer.out_dir / "model_final.pth").exists()
    assert trainer.iteration == 0
    return message


def test_changed_iterations_are_refused_naming_file_and_key(dataset, tmp_path, monkeypatch):
    monkeypatch.delenv(STALE_CHECKPOINT_ENV, raising=False)
    _paused(dataset, tmp_path)
    message = _refused(_trainer(dataset, tmp_path, iterations=4))
    assert "  training.iterations: 6 -> 4\n" in message
    assert "seed" not in message and "cases" not in message  # only what differs is listed


def test_knobs_that_do_not_change_results_still_resume(dataset, tmp_path, monkeypatch):
    monkeypatch.delenv(STALE_CHECKPOINT_ENV, raising=False)
    _paused(dataset, tmp_path)
    trainer = _trainer(dataset, tmp_path, checkpoint_every=1, threads=1, progress_bar=True, num_workers=0)
    trainer.progress_stream = None
    trainer.run(stop_at=4)
    assert torch.load(tmp_path / CHECKPOINT_LATEST, weights_only=True)["iteration"] == 4


def test_init_checkpoint_from_scratch_to_a_file_is_refused(dataset, tmp_path, monkeypatch):
    monkeypatch.delenv(STALE_CHECKPOINT_ENV, raising=False)
    out = tmp_path / "run"
    _paused(dataset, out)
    init = tmp_path / "mae.pth"
    init.write_bytes(b"pretrained weights v1")
    message = _refused(_trainer(dataset, out, init_checkpoint=init))
    sha = hashlib.sha256(b"pretrained weights v1").hexdigest()
    assert f"  init_checkpoint_sha256: None -> '{sha}'\n" in message


def test_replaced_init_checkpoint_file_is_refused(dataset, tmp_path, monkeypatch):
    monkeypatch.delenv(STALE_CHECKPOINT_ENV, raising=False)
    out, init = tmp_path / "run", tmp_path / "mae.pth"
    init.write_bytes(b"v1")
    _paused(dataset, out, init_checkpoint=init)
    init.write_bytes(b"v2")  # same path, other weights
    message = _refused(_trainer(dataset, out, init_checkpoint=init))
    old, new = hashlib.sha256(b"v1").hexdigest(), hashlib.sha256(b"v2").hexdigest()
    assert f"init_checkpoint_sha256: '{old}' -> '{new}'" in message


def test_other_stem_of_the_same_checkpoint_is_refused(dataset, tmp_path, monkeypatch):
    # a multi-stem (MultiTalent) checkpoint: same file, same sha256, another stem loaded into the encoder
    monkeypatch.delenv(STALE_CHECKPOINT_ENV, raising=False)
    out, init = tmp_path / "run", tmp_path / "multitalent.pth"
    init.write_bytes(b"several stems")
    _paused(dataset, out, init_checkpoint=init, extra={"init_stem": "encoder.stem.351_0"})
    message = _refused(_trainer(dataset, out, init_checkpoint=init, extra={"init_stem": "encoder.stem.004"}))
    assert "model.init_stem: 'encoder.stem.351_0' -> 'encoder.stem.004'" in message


def test_changed_training_cases_are_refused(dataset, tmp_path, monkeypatch):
    monkeypatch.delenv(STALE_CHECKPOINT_ENV, raising=False)
    _paused(dataset, tmp_path)
    message = _refused(_trainer(dataset, tmp_path, cases=["case_000", "case_002"]))
    assert "  cases: ['case_000', 'case_001'] -> ['case_000', 'case_002']\n" in message


def test_long_case_lists_are_summarised():
    old = [f"case_{i:03d}" for i in range(50)]
    new = old[2:] + ["case_900"]
    lines = fingerprint_differences({"cases": old}, {"cases": new})
    assert lines == ["cases: 50 entries -> 49 entries: 1 added (case_900), 2 removed (case_000, case_001)"]


def test_fingerprint_leaves_out_knobs_and_keeps_result_settings():
    a = run_fingerprint(TrainingSettings(threads=1, num_workers=0, checkpoint_every=10, device="cpu"),
                        model={"detector": "tiny"}, case_ids=CASES, seed=0)
    b = run_fingerprint(TrainingSettings(threads=8, num_workers=4, checkpoint_every=500, device="cuda"),
                        model={"detector": "tiny"}, case_ids=CASES, seed=0)
    assert a == b
    c = run_fingerprint(TrainingSettings(lr=0.02), model={"detector": "tiny"}, case_ids=CASES, seed=1)
    assert fingerprint_differences(a, c) == ["seed: 0 -> 1", "training.lr: 0.01 -> 0.02"]
    assert set(a["versions"]) == {"pretrain_det3d", "checkpoint_format", "torch"}
    assert a["versions"]["torch"] == ".".join(torch.__version__.split("+")[0].split(".")[:2])


def test_unchanged_rerun_resumes_exactly_and_final_record_holds_the_fingerprint(dataset, tmp_path, monkeypatch):
    monkeypatch.delenv(STALE_CHECKPOINT_ENV, raising=False)
    reference = _trainer(dataset, tmp_path / "reference")
    reference.run()
    _paused(dataset, tmp_path / "resumed")
    torch.manual_seed(99)  # other global state, replaced by the checkpoint's
    resumed = _trainer(dataset, tmp_path / "resumed")
    resumed.run()
    a = torch.load(tmp_path / "reference" / "model_final.pth", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "model_final.pth", weights_only=True)
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    assert b["fingerprint"] == reference.fingerprint
    assert b["iterations"] == b["fingerprint"]["training"]["iterations"] == 6
    assert b["init_checkpoint_sha256"] is None and b["fingerprint"]["cases"] == CASES
    assert b["fingerprint"]["model"] == {"detector": "tiny", "build_kwargs": {"width": 4}}


def test_env_switch_moves_the_stale_checkpoint_aside_and_trains_from_zero(dataset, tmp_path, monkeypatch, caplog):
    _paused(dataset, tmp_path / "run")
    _trainer(dataset, tmp_path / "fresh", iterations=4).run()  # what a run from scratch with the new config gives
    monkeypatch.setenv(STALE_CHECKPOINT_ENV, "move")
    with caplog.at_level(logging.WARNING, logger="pretrain_det3d.training.trainer"):
        _trainer(dataset, tmp_path / "run", iterations=4).run()
    moved = sorted((tmp_path / "run").glob("checkpoint_latest.stale-*.pth"))
    assert len(moved) == 1 and moved[0].name.endswith("Z.pth")
    assert torch.load(moved[0], weights_only=True)["iteration"] == 3  # the old run's state is kept
    assert not (tmp_path / "run" / CHECKPOINT_LATEST).exists()
    assert moved[0].name in caplog.text and "training.iterations: 6 -> 4" in caplog.text
    fresh = torch.load(tmp_path / "fresh" / "model_final.pth", weights_only=True)
    rerun = torch.load(tmp_path / "run" / "model_final.pth", weights_only=True)
    assert rerun["iterations"] == 4
    for key, value in fresh["state_dict"].items():
        assert torch.equal(value, rerun["state_dict"][key]), key
    rows = (tmp_path / "run" / "log.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == [0, 1, 2, 3]


def test_unknown_env_switch_value_names_the_variable(dataset, tmp_path, monkeypatch):
    _paused(dataset, tmp_path)
    monkeypatch.setenv(STALE_CHECKPOINT_ENV, "delete")
    with pytest.raises(ValueError, match=STALE_CHECKPOINT_ENV):
        _trainer(dataset, tmp_path, iterations=4).run()


def _strip_fingerprint(path: Path) -> None:
    state = torch.load(path, weights_only=True)
    del state["fingerprint"]
    state["format"] = 1
    torch.save(state, path)


def test_checkpoint_without_fingerprint_is_refused(dataset, tmp_path, monkeypatch):
    monkeypatch.delenv(STALE_CHECKPOINT_ENV, raising=False)
    _strip_fingerprint(_paused(dataset, tmp_path))
    message = _refused(_trainer(dataset, tmp_path))  # same settings: the old format alone is refused
    assert "no run fingerprint (checkpoint format 1" in message
    monkeypatch.setenv(STALE_CHECKPOINT_ENV, "move")
    _trainer(dataset, tmp_path).run()
    assert (tmp_path / "model_final.pth").is_file()
    assert len(list(tmp_path.glob("checkpoint_latest.stale-*.pth"))) == 1


def test_weights_that_do_not_fit_name_the_file(dataset, tmp_path, monkeypatch):
    monkeypatch.delenv(STALE_CHECKPOINT_ENV, raising=False)
    path = _paused(dataset, tmp_path)
    # the same recorded build arguments but another architecture: only the shape check can tell
    message = _refused(_trainer(dataset, tmp_path, width=5))
    assert "model weight encoder.0.weight: shape [4, 1, 3, 3, 3] -> [5, 1, 3, 3, 3]" in message
    # and torch's own size-mismatch error, should it come first, is turned into the same advice
    trainer = _trainer(dataset, tmp_path, width=5)
    with pytest.raises(StaleCheckpointError, match="does not fit") as caught:
        trainer.load_checkpoint_state(torch.load(path, weights_only=True))
    assert str(path) in str(caught.value) and f"{STALE_CHECKPOINT_ENV}=move" in str(caught.value)


# ---------------------------------------------------------------- pre-training (MAE)
MAE_SETTINGS = {"preset": "resenc_demo", "patch_size": [16, 16, 16], "mask_block": 8, "iterations": 4,
                "batch_size": 1, "checkpoint_every": 2, "threads": 1, "progress_bar": False}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mae_corpus")
    write_blob_corpus(root, num_cases=3, shape=(20, 20, 20))
    return root


def _mae(corpus: Path, out: Path, cases=("vol_000", "vol_001"), **overrides):
    from pretrain_det3d.pretraining import METHODS

    seed_everything(0)
    records = load_case_records(corpus, list(cases), with_labels=False)
    return METHODS.get("mae")({**MAE_SETTINGS, **overrides}, records, in_channels=1, out_path=out, seed=0)


def test_mae_resume_checks_method_settings_iterations_and_corpus(corpus, tmp_path, monkeypatch):
    monkeypatch.delenv(STALE_CHECKPOINT_ENV, raising=False)
    out = tmp_path / "mae" / "checkpoint_final.pth"
    _mae(corpus, out).run(stop_at=2)
    checkpoint = out.parent / CHECKPOINT_LATEST
    for overrides, cases, expected in [
        ({"mask_ratio": 0.5}, ("vol_000", "vol_001"), "  model.settings.mask_ratio: (absent) -> 0.5\n"),
        ({"iterations": 6}, ("vol_000", "vol_001"), "  training.iterations: 4 -> 6\n"),
        ({}, ("vol_000", "vol_002"), "  cases: ['vol_000', 'vol_001'] -> ['vol_000', 'vol_002']\n"),
    ]:
        with pytest.raises(StaleCheckpointError) as caught:
            _mae(corpus, out, cases, **overrides).run()
        assert str(checkpoint) in str(caught.value) and expected in str(caught.value)
    # unchanged: resumes and records the fingerprint of the run that trained in the nnssl plan
    trainer = _mae(corpus, out, threads=1, checkpoint_every=1)
    trainer.run()
    plan = torch.load(out, weights_only=True)["nnssl_adaptation_plan"]
    recorded = plan["run_fingerprint"]  # beside nnssl's Plan, which takes no other keys
    assert recorded["model"]["method"] == "mae" and recorded["training"]["iterations"] == 4
    assert recorded["cases"] == {"count": 2, "sha256": hashlib.sha256(b"vol_000\nvol_001").hexdigest()}
    assert [c["patch_size"] for c in plan["pretrain_plan"]["configurations"].values()] == [[16, 16, 16]]


def test_mae_checkpoint_without_fingerprint_is_refused(corpus, tmp_path, monkeypatch):
    monkeypatch.delenv(STALE_CHECKPOINT_ENV, raising=False)
    out = tmp_path / "checkpoint_final.pth"
    _mae(corpus, out).run(stop_at=2)
    _strip_fingerprint(tmp_path / CHECKPOINT_LATEST)
    with pytest.raises(StaleCheckpointError, match="no run fingerprint") as caught:
        _mae(corpus, out).run()
    assert str(tmp_path / CHECKPOINT_LATEST) in str(caught.value)
    assert not out.exists()


# ---------------------------------------------------------------- the wiring of run_finetuning
def test_run_finetuning_refuses_a_scratch_checkpoint_under_an_init_checkpoint(tmp_path, monkeypatch):
    from pretrain_det3d.models.backbone import build_resenc_unet
    from pretrain_det3d.models.checkpoint import save_pretraining_checkpoint
    from pretrain_det3d.training.finetune import run_finetuning

    monkeypatch.delenv(STALE_CHECKPOINT_ENV, raising=False)
    root = tmp_path / "preprocessed"
    _write_dataset(root)
    (root / "plan.json").write_text(json.dumps({"modalities": {"0": "CT"}, "num_classes": 1,
                                                "box_sizes": [[5, 6, 5]]}))
    (root / "splits.json").write_text(json.dumps([{"train": CASES, "val": ["case_002"]}]))
    settings = {**SETTINGS, "iterations": 2, "warmup_iterations": 1, "checkpoint_every": 1,
                "keep_latest_checkpoint": True, "preset": "resenc_demo", "fpn_channels": 8}
    out = tmp_path / "fold0"
    run_finetuning(root, 0, "retina_unet", settings, None, out, seed=0)  # keeps checkpoint_latest at iteration 1
    save_pretraining_checkpoint(tmp_path / "mae.pth", build_resenc_unet("resenc_demo", 1, 1), "resenc_demo", 1,
                                PATCH, "mae")
    with pytest.raises(StaleCheckpointError, match=r"init_checkpoint_sha256: None -> '[0-9a-f]{64}'") as caught:
        run_finetuning(root, 0, "retina_unet", settings, tmp_path / "mae.pth", out, seed=0)
    assert str(out / CHECKPOINT_LATEST) in str(caught.value)
    (root / "splits.json").write_text(json.dumps([{"train": ["case_000", "case_002"], "val": ["case_001"]}]))
    with pytest.raises(StaleCheckpointError, match="cases: "):
        run_finetuning(root, 0, "retina_unet", settings, None, out, seed=0)
    with pytest.raises(StaleCheckpointError, match="model.build_kwargs.fpn_channels: 8 -> 16"):
        run_finetuning(root, 0, "retina_unet", {**settings, "fpn_channels": 16}, None, out, seed=0)
