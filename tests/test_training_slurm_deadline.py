"""The trainer's own stop before the SLURM job's end (for clusters whose process tracking keeps the time-limit
signal from the trainer): parsing squeue's end time, the margin, and the loop stopping and saving at the deadline.

No SLURM needed: squeue outputs are written by hand, the clock is a function of the iteration, and ``squeue``
itself is a script on PATH.
"""

from __future__ import annotations

import datetime
import logging
import re
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO
from pretrain_det3d.training import trainer as trainer_module
from pretrain_det3d.training.trainer import (
    CHECKPOINT_LATEST,
    SLURM_STOP_BEFORE_END_ENV,
    SLURM_STOP_BEFORE_END_S,
    JobDeadline,
    TrainingInterrupted,
    parse_slurm_end_time,
    slurm_job_deadline,
    squeue_end_time,
    stop_before_end_s,
)
from test_training_trainer import _final_state, _log_rows, _trainer, _write_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("preprocessed")
    _write_dataset(root)
    return root


@pytest.fixture
def berlin_time(monkeypatch):
    """The local time zone set to Europe/Berlin (UTC+1 in December), as on a cluster outside UTC."""
    monkeypatch.setenv("TZ", "Europe/Berlin")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


# ------------------------------------------------------------------------------------------------ squeue's end time
def test_end_time_is_read_in_the_local_time_zone(berlin_time):
    end = parse_slurm_end_time("2026-12-01T07:40:00\n")
    assert end == datetime.datetime(2026, 12, 1, 6, 40, tzinfo=datetime.timezone.utc).timestamp()


@pytest.mark.parametrize("output", ["N/A\n", "UNLIMITED\n", "NONE\n", "", "\n", "soon\n", "2026-13-01T00:00:00\n",
                                    "2026-12-01T06:40:00\n2026-12-01T07:40:00\n"])
def test_no_end_time(output):
    assert parse_slurm_end_time(output) is None


def test_margin_defaults_to_the_profiles_warning_offset(monkeypatch):
    assert stop_before_end_s({}) == SLURM_STOP_BEFORE_END_S
    assert stop_before_end_s({SLURM_STOP_BEFORE_END_ENV: " 60 "}) == 60
    assert stop_before_end_s({SLURM_STOP_BEFORE_END_ENV: "0"}) == 0
    for bad in ("-5", "ten", "nan", "inf"):
        with pytest.raises(ValueError, match=SLURM_STOP_BEFORE_END_ENV):
            stop_before_end_s({SLURM_STOP_BEFORE_END_ENV: bad})
    # the two ways of stopping before the limit ask for the same time: the profiles' --signal=TERM@<seconds>
    for profile in ("slurm", "slurm-cpu"):
        config = yaml.safe_load((REPO / "profiles" / profile / "config.yaml").read_text())
        offsets = {re.search(r"--signal=\w+@(\d+)", values["slurm_extra"]).group(1)
                   for values in config["set-resources"].values() if "--signal" in values.get("slurm_extra", "")}
        assert offsets == {str(SLURM_STOP_BEFORE_END_S)}, (profile, offsets)


def test_deadline_only_inside_a_slurm_job():
    def query(job_id):
        raise AssertionError("squeue asked outside a SLURM job")

    assert slurm_job_deadline({}, query=query) is None
    assert slurm_job_deadline({"SLURM_JOB_ID": ""}, query=query) is None


def test_deadline_from_squeue_output():
    asked = []

    def query(job_id):
        asked.append(job_id)
        return "2026-12-01T06:40:00\n"

    deadline = slurm_job_deadline({"SLURM_JOB_ID": "42", SLURM_STOP_BEFORE_END_ENV: "60"}, query=query,
                                  clock=lambda: 0.0)
    end = datetime.datetime(2026, 12, 1, 6, 40).timestamp()
    assert asked == ["42"]
    assert deadline == JobDeadline(end=end, margin_s=60.0, clock=deadline.clock)
    assert deadline.stop_at == end - 60
    assert deadline.describe() == "SLURM job ends at 2026-12-01T06:40:00: stopping 60 s before it"
    default = slurm_job_deadline({"SLURM_JOB_ID": "42"}, query=query)
    assert default.margin_s == SLURM_STOP_BEFORE_END_S


@pytest.mark.parametrize("answer", ["UNLIMITED\n", "N/A\n", RuntimeError("squeue exited with 1: timeout"),
                                    FileNotFoundError("squeue")])
def test_unknown_end_time_means_no_deadline_and_one_log_line(answer, caplog):
    def query(job_id):
        if isinstance(answer, Exception):
            raise answer
        return answer

    with caplog.at_level(logging.INFO, logger=trainer_module.LOGGER.name):
        assert slurm_job_deadline({"SLURM_JOB_ID": "42"}, query=query) is None
    lines = [r.getMessage() for r in caplog.records if r.name == trainer_module.LOGGER.name]
    assert len(lines) == 1 and "SLURM job 42: no end time" in lines[0], lines


def test_deadline_reached_by_the_clock():
    now = [1000.0]
    deadline = JobDeadline(end=1700.0, margin_s=600.0, clock=lambda: now[0])
    assert not deadline.reached() and deadline.remaining() == 700
    now[0] = 1099.9
    assert not deadline.reached()
    now[0] = 1100.0
    assert deadline.reached() and deadline.remaining() == 600


def test_squeue_is_asked_for_this_job_end_time(tmp_path, monkeypatch):
    (tmp_path / "bin").mkdir()
    squeue = tmp_path / "bin" / "squeue"
    squeue.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'args'}\necho 2026-12-01T06:40:00\n")
    squeue.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{__import__('os').environ['PATH']}")
    assert squeue_end_time("1234").strip() == "2026-12-01T06:40:00"
    assert (tmp_path / "args").read_text().split() == ["-h", "-j", "1234", "-o", "%e"]
    squeue.write_text("#!/bin/sh\necho 'slurm_load_jobs error: Invalid job id specified' >&2\nexit 1\n")
    with pytest.raises(RuntimeError, match="Invalid job id"):
        squeue_end_time("1234")


# ------------------------------------------------------------------------------------------------ the training loop
def test_loop_stops_and_saves_at_the_deadline_then_resumes_exactly(dataset, tmp_path, caplog):
    reference = tmp_path / "reference"
    _trainer(dataset, reference).run()

    out = tmp_path / "stopped"
    trainer = _trainer(dataset, out)
    # the clock reads the iteration: the deadline (end - margin) is reached once 3 iterations have run
    trainer.job_deadline = lambda: JobDeadline(end=103.0, margin_s=100.0, clock=lambda: float(trainer.iteration))
    with caplog.at_level(logging.INFO, logger=trainer_module.LOGGER.name):
        with pytest.raises(TrainingInterrupted, match=r"stopped before the SLURM job's end at iteration 3/6"):
            trainer.run()
    messages = [r.getMessage() for r in caplog.records if r.name == trainer_module.LOGGER.name]
    assert any(m.startswith("SLURM job ends at ") and m.endswith(": stopping 100 s before it") for m in messages)
    assert "job end in 100 s: stopping at iteration 3 and saving a checkpoint" in messages, messages
    assert trainer.stopped_by_deadline
    state = torch.load(out / CHECKPOINT_LATEST, weights_only=True)
    assert state["iteration"] == 3
    assert not (out / "model_final.pth").exists()

    # a rerun (no deadline: a new job) resumes from it and ends exactly as an uninterrupted run
    _trainer(dataset, out, init_seed=9).run()
    for key, value in _final_state(reference).items():
        assert torch.equal(value, _final_state(out)[key]), key
    assert _log_rows(out / "log.csv") == _log_rows(reference / "log.csv")


def test_run_reads_the_job_end_from_squeue(dataset, tmp_path, monkeypatch):
    """The default deadline: SLURM_JOB_ID set, squeue says the job ends in 30 s, the margin is 600 s -> the run
    stops before its first iteration and saves."""
    asked = []

    def fake_squeue(job_id):
        asked.append(job_id)
        end = datetime.datetime.now() + datetime.timedelta(seconds=30)
        return end.isoformat(timespec="seconds") + "\n"

    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.delenv(SLURM_STOP_BEFORE_END_ENV, raising=False)
    monkeypatch.setattr(trainer_module, "squeue_end_time", fake_squeue)
    with pytest.raises(TrainingInterrupted, match=r"stopped before the SLURM job's end at iteration 0/6"):
        _trainer(dataset, tmp_path).run()
    assert asked == ["77"]
    assert torch.load(tmp_path / CHECKPOINT_LATEST, weights_only=True)["iteration"] == 0

    # a job with plenty of time left runs to the end
    monkeypatch.setenv(SLURM_STOP_BEFORE_END_ENV, "5")
    _trainer(dataset, tmp_path).run()
    assert (tmp_path / "model_final.pth").is_file() and asked == ["77", "77"]


def test_no_slurm_job_no_deadline(dataset, tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setattr(trainer_module, "squeue_end_time", lambda job_id: pytest.fail("squeue asked"))
    trainer = _trainer(dataset, tmp_path)
    assert trainer.job_deadline() is None
    trainer.run()
    assert (tmp_path / "model_final.pth").is_file() and not trainer.stopped_by_deadline
