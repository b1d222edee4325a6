"""Time limits and requeues: a fine-tuning job stopped by a signal, then hard-killed, resumes exactly.

The job runs as the workflow runs it (``python -m pretrain_det3d finetune`` in a subprocess). SIGUSR1 (what
profiles/slurm asks SLURM to send before the time limit) must save a checkpoint and exit non-zero; a SIGKILL
loses only the iterations since the last periodic checkpoint; the rerun continues and ends with the same
weights as an uninterrupted run (CPU, fixed seed).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from pretrain_det3d.data.preprocessing import run_preprocessing
from pretrain_det3d.data.synthetic import write_synthetic_dataset

ITERATIONS = 12
SETTINGS = {
    "preset": "resenc_demo", "iterations": ITERATIONS, "batch_size": 1, "patch_size": [32, 32, 32],
    "fpn_channels": 16, "checkpoint_every": 2, "warmup_iterations": 2, "num_workers": 0, "augmentation": True,
    "progress_bar": False, "keep_latest_checkpoint": True,
}


@pytest.fixture(scope="module")
def preprocessed(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume")
    write_synthetic_dataset(root / "converted", "resume", {"num_cases": 4, "shape": [40, 40, 40],
                            "spacing": [2.0, 1.5, 1.5], "num_classes": 1, "lesions_per_case": [1, 2],
                            "lesion_diameter": [5, 9]}, seed=3)
    run_preprocessing(root / "converted", root / "preprocessed", num_folds=2, seed=0, settings={})
    return root / "preprocessed"


def finetune_command(preprocessed: Path, out_dir: Path) -> list[str]:
    return [sys.executable, "-m", "pretrain_det3d", "finetune", "--preprocessed", str(preprocessed), "--fold", "0",
            "--detector", "retina_unet", "--settings", json.dumps(SETTINGS), "--out-dir", str(out_dir),
            "--seed", "7", "--threads", "1"]


def checkpoint_iteration(out_dir: Path) -> int:
    path = out_dir / "checkpoint_latest.pth"
    if not path.is_file():
        return -1
    try:
        return int(torch.load(path, weights_only=True)["iteration"])
    except Exception:  # being replaced right now
        return -1


def start_and_wait_for_checkpoint(command: list[str], out_dir: Path, at_least: int) -> subprocess.Popen:
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 240
    while checkpoint_iteration(out_dir) < at_least:
        if process.poll() is not None:
            raise AssertionError(f"the job ended early:\n{process.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("no checkpoint appeared in time")
        time.sleep(0.2)
    return process


def final_weights(out_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(out_dir / "model_final.pth", weights_only=True)["state_dict"]


def test_signal_then_hard_kill_then_resume_equals_uninterrupted(preprocessed, tmp_path):
    reference_dir, resumed_dir = tmp_path / "reference", tmp_path / "resumed"
    subprocess.run(finetune_command(preprocessed, reference_dir), check=True, capture_output=True)

    # 1. SIGUSR1 (SLURM's warning before the time limit): checkpoint, clear message, non-zero exit
    process = start_and_wait_for_checkpoint(finetune_command(preprocessed, resumed_dir), resumed_dir, 2)
    process.send_signal(signal.SIGUSR1)
    output, _ = process.communicate(timeout=120)
    assert process.returncode != 0
    assert "stopped by a signal" in output
    stopped_at = checkpoint_iteration(resumed_dir)
    assert 2 <= stopped_at < ITERATIONS
    assert not (resumed_dir / "model_final.pth").exists()

    # 2. rerun, then SIGKILL (no chance to save) once it has checkpointed past the first stop
    process = start_and_wait_for_checkpoint(finetune_command(preprocessed, resumed_dir), resumed_dir, stopped_at + 2)
    process.kill()
    process.wait(timeout=60)
    killed_at = checkpoint_iteration(resumed_dir)
    assert stopped_at < killed_at < ITERATIONS

    # 3. the final rerun finishes from the last checkpoint
    result = subprocess.run(finetune_command(preprocessed, resumed_dir), capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "resumed from" in result.stderr + result.stdout

    reference, resumed = final_weights(reference_dir), final_weights(resumed_dir)
    assert reference.keys() == resumed.keys()
    for key in reference:
        assert torch.equal(reference[key], resumed[key]), key
    log = pd.read_csv(resumed_dir / "log.csv")
    assert log["iteration"].tolist() == list(range(ITERATIONS))
