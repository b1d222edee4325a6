"""Progress output: a tqdm bar on a terminal, plain log lines every N iterations in a log file; key summaries.

In a log file tqdm's redraws (joined by carriage returns, ~200 bytes per iteration) made paper-scale logs tens of
MB; a non-terminal stream must get whole lines at a known interval instead.
"""

from __future__ import annotations

import io
import json
import logging
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

import pretrain_det3d.training.trainer as trainer_module
from pretrain_det3d.training.dataloader import load_case_records
from pretrain_det3d.training.finetune import summarize_keys
from pretrain_det3d.training.trainer import (
    DetectorTrainer,
    ProgressReporter,
    TrainingSettings,
    progress_log_every,
    seed_everything,
)

LOGGER_NAME = "pretrain_det3d.training.trainer"
LINE = re.compile(r"^DetectorTrainer (\d+)/(\d+): loss [-0-9.e]+, seg [-0-9.e]+; lr [0-9.e+-]+; [0-9.]+ it/s; "
                  r"ETA \d+:\d\d:\d\d$")


class FakeClock:
    """A clock the test advances by hand, so rates and ETAs can be worked out exactly."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_reporter_lines_are_hand_worked_means_rates_and_etas(caplog):
    clock = FakeClock()
    logger = logging.getLogger("test_progress_reporter")
    stream = io.StringIO()
    report = ProgressReporter(total=6, initial=0, desc="Tiny", stream=stream, every=2, logger=logger, clock=clock)
    losses = [(1.0, 0.5), (2.0, 0.5), (3.0, 1.0), (5.0, 2.0), (4.0, 1.0)]
    with caplog.at_level(logging.INFO, logger="test_progress_reporter"):
        for i, (loss, box) in enumerate(losses):
            clock.now += 0.5  # 2 iterations per second
            report.update({"loss": loss, "box": box}, lr=0.01 * (i + 1))
        clock.now += 4.0  # a stop after 5 of 6 iterations: close reports the one iteration not yet reported
        report.close()
    assert [r.getMessage() for r in caplog.records] == [
        # iterations 1-2: mean loss 1.5, box 0.5; 2 it in 1 s; 4 left -> 2 s
        "Tiny 2/6: loss 1.5, box 0.5; lr 2.000e-02; 2.00 it/s; ETA 0:00:02",
        # iterations 3-4: mean loss 4, box 1.5; 2 left -> 1 s
        "Tiny 4/6: loss 4, box 1.5; lr 4.000e-02; 2.00 it/s; ETA 0:00:01",
        # iteration 5 over 0.5 + 4 s: 1 / 4.5 it/s; 1 left -> 4.5 s, rounded to even
        "Tiny 5/6: loss 4, box 1; lr 5.000e-02; 0.22 it/s; ETA 0:00:04",
    ]
    assert stream.getvalue() == ""  # nothing drawn on a non-terminal


def test_reporter_on_a_terminal_draws_a_bar_and_logs_nothing(caplog):
    stream = Terminal()
    with caplog.at_level(logging.INFO, logger="test_progress_terminal"):
        report = ProgressReporter(total=4, initial=0, desc="Tiny", stream=stream, every=1,
                                  logger=logging.getLogger("test_progress_terminal"))
        for _ in range(4):
            report.update({"loss": 1.0}, lr=0.1)
        report.close()
    assert caplog.records == []
    assert "Tiny" in stream.getvalue() and "4/4" in stream.getvalue()


def test_automatic_interval():
    # about 100 lines per run, at least one line per 500 iterations
    assert [progress_log_every(n) for n in (1, 99, 250, 12000, 50000, 10**6)] == [1, 1, 2, 120, 500, 500]


def _write_dataset(root: Path) -> None:
    rng = np.random.default_rng(0)
    (root / "cases").mkdir(parents=True)
    seg = np.zeros((16, 16, 16), dtype=np.int16)
    seg[4:9, 5:10, 3:8] = 1
    np.save(root / "cases" / "case_000.npy", rng.normal(size=(1, 16, 16, 16)).astype(np.float32))
    np.save(root / "cases" / "case_000_seg.npy", seg)
    meta = {"instances": {"1": 0}, "foreground_locations": np.argwhere(seg > 0)[::9].tolist()}
    (root / "cases" / "case_000.json").write_text(json.dumps(meta))


class TinySegmenter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 1, 3, padding=1)

    def compute_losses(self, images, targets, seg):
        loss = nn.functional.binary_cross_entropy_with_logits(self.conv(images), seg.float())
        return {"loss": loss, "seg": loss.detach()}


def _run(root: Path, out: Path, stream: io.StringIO, stop_at: int | None = None) -> None:
    seed_everything(0)
    settings = TrainingSettings.from_settings({"iterations": 7, "warmup_iterations": 1, "batch_size": 1,
                                               "patch_size": [8, 8, 8], "checkpoint_every": 100, "threads": 1,
                                               "augmentation": False})
    trainer = DetectorTrainer(TinySegmenter(), "tiny", settings, load_case_records(root, ["case_000"]), out,
                              seed=0, build_kwargs={})
    trainer.progress_stream = stream
    trainer.run(stop_at=stop_at)


def test_training_log_gets_one_plain_line_every_n_iterations(tmp_path, monkeypatch, caplog):
    _write_dataset(tmp_path / "data")
    monkeypatch.setattr(trainer_module, "LOG_EVERY", 3)
    stream = io.StringIO()  # not a terminal
    with caplog.at_level(logging.INFO, logger=LOGGER_NAME):
        _run(tmp_path / "data", tmp_path / "out", stream)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("DetectorTrainer ")]
    # 7 iterations, every 3: after 3, 6 and the last one
    assert [LINE.match(line).group(1, 2) for line in lines] == [("3", "7"), ("6", "7"), ("7", "7")]
    assert all("ETA" in line and "it/s" in line and "lr" in line for line in lines)
    assert "\r" not in stream.getvalue() and "\r" not in caplog.text and stream.getvalue() == ""


def test_paused_and_resumed_runs_report_their_own_iterations(tmp_path, monkeypatch, caplog):
    _write_dataset(tmp_path / "data")
    monkeypatch.setattr(trainer_module, "LOG_EVERY", 3)
    with caplog.at_level(logging.INFO, logger=LOGGER_NAME):
        _run(tmp_path / "data", tmp_path / "out", io.StringIO(), stop_at=4)
        _run(tmp_path / "data", tmp_path / "out", io.StringIO())
    counts = [LINE.match(r.getMessage()).group(1) for r in caplog.records if LINE.match(r.getMessage())]
    # first process: 3 and the paused 4; the resumed one: 6 and 7
    assert counts == ["3", "4", "6", "7"]


def test_automatic_interval_in_a_run_logs_every_iteration_of_a_short_run(tmp_path, caplog):
    _write_dataset(tmp_path / "data")
    with caplog.at_level(logging.INFO, logger=LOGGER_NAME):
        _run(tmp_path / "data", tmp_path / "out", io.StringIO())
    counts = [LINE.match(r.getMessage()).group(1) for r in caplog.records if LINE.match(r.getMessage())]
    assert counts == [str(i) for i in range(1, 8)]  # progress_log_every(7) == 1


def test_progress_bar_false_is_silent(tmp_path, monkeypatch, caplog):
    _write_dataset(tmp_path / "data")
    seed_everything(0)
    settings = TrainingSettings.from_settings({"iterations": 3, "warmup_iterations": 0, "batch_size": 1,
                                               "patch_size": [8, 8, 8], "progress_bar": False,
                                               "augmentation": False})
    trainer = DetectorTrainer(TinySegmenter(), "tiny", settings, load_case_records(tmp_path / "data", ["case_000"]),
                              tmp_path / "out", seed=0, build_kwargs={})
    trainer.progress_stream = Terminal()
    with caplog.at_level(logging.INFO, logger=LOGGER_NAME):
        trainer.run()
    assert not any(LINE.match(r.getMessage()) for r in caplog.records)
    assert trainer.progress_stream.getvalue() == ""


def test_skipped_key_summary_is_hand_written():
    keys = ([f"decoder.stages.{i}.convs.0.conv.weight" for i in range(40)] + ["decoder.seg_layers.4.weight",
            "decoder.seg_layers.4.bias", "encoder.stem.convs.0.norm.weight", "mask_token"])
    assert summarize_keys(keys) == (
        "44 keys: decoder.*: 42, encoder.*: 1, mask_token: 1 "
        "(e.g. decoder.stages.0.convs.0.conv.weight, decoder.stages.1.convs.0.conv.weight, "
        "decoder.stages.2.convs.0.conv.weight, ...)"
    )
    assert summarize_keys(["head.weight"]) == "1 key: head.*: 1 (e.g. head.weight)"
    assert summarize_keys([]) == "none"


def test_finetuning_log_line_summarises_skipped_keys(tmp_path, caplog):
    from pretrain_det3d.models.backbone import build_resenc_unet
    from pretrain_det3d.models.checkpoint import save_pretraining_checkpoint
    from pretrain_det3d.training.finetune import run_finetuning

    root = tmp_path / "data"
    _write_dataset(root)
    (root / "plan.json").write_text(json.dumps({"modalities": {"0": "CT"}, "num_classes": 1,
                                                "box_sizes": [[5, 5, 5]]}))
    (root / "splits.json").write_text(json.dumps([{"train": ["case_000"], "val": []}]))
    torch.manual_seed(0)
    save_pretraining_checkpoint(tmp_path / "pre.pth", build_resenc_unet("resenc_demo", 1, 1), "resenc_demo", 1,
                                [16, 16, 16], "mae")
    settings = {"iterations": 1, "warmup_iterations": 0, "batch_size": 1, "patch_size": [16, 16, 16],
                "preset": "resenc_demo", "fpn_channels": 8, "progress_bar": False, "threads": 1,
                "augmentation": False}
    with caplog.at_level(logging.INFO, logger="pretrain_det3d.training.finetune"):
        run_finetuning(root, 0, "retina_unet", settings, tmp_path / "pre.pth", tmp_path / "out", seed=0)
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("encoder transfer")]
    match = re.search(r"\(skipped: (\d+) keys: decoder\.\*: (\d+) \(e\.g\. decoder\.[^,]+, decoder\.[^,]+, "
                      r"decoder\.[^,]+, \.\.\.\); adapted: none\)$", line)
    assert match is not None, line
    assert match.group(1) == match.group(2)  # every skipped key is the pre-training decoder's
    assert line.count("decoder.") == 4  # three examples and the group, not the whole list
