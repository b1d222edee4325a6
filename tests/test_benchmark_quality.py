"""The quality benchmark: its parts against hand-worked cases, and a tiny end-to-end run's output schema."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from pretrain_det3d.benchmark.quality import (
    AP_KEY, CURVE_FILE, FROC_KEY, MAP_KEY, PEER, RANDOM, RECORD_FILE, QualitySettings, detector_recipe, eval_iterations,
    format_quality_table, metrics_with_intervals,
)
from pretrain_det3d.cli import main
from pretrain_det3d.evaluation.run import CaseBoxes, evaluate_cases

REPO = Path(__file__).resolve().parents[1]


def test_eval_iterations_are_evenly_spaced_and_end_at_the_last_iteration():
    assert eval_iterations(1200, 4) == [300, 600, 900, 1200]
    assert eval_iterations(5, 5) == [1, 2, 3, 4, 5]
    assert eval_iterations(7, 1) == [7]


def test_settings_refuse_unknown_keys_and_impossible_values():
    with pytest.raises(ValueError, match="unknown keys \\['iteratons'\\]"):
        QualitySettings.from_mapping({"iteratons": 3})
    with pytest.raises(ValueError, match="eval_points"):
        QualitySettings.from_mapping({"iterations": 2, "eval_points": 3})
    with pytest.raises(ValueError, match="'detectors': unknown \\['yolo'\\]"):
        QualitySettings.from_mapping({"detectors": ["yolo"]})
    assert QualitySettings.from_mapping({"iterations": 10}).iterations == 10


def test_metrics_with_intervals_match_the_evaluation_and_hand_worked_intervals():
    gt = CaseBoxes(np.array([[0, 0, 0, 4, 4, 4.0]]), np.array([0]))
    hit = CaseBoxes(gt.boxes, gt.labels, np.array([0.9]))
    far = CaseBoxes(np.array([[10, 10, 10, 12, 12, 12.0]]), np.array([0]), np.array([0.8]))
    cases = ["a", "b", "c", "d"]
    # every case detected perfectly: every resample has AP 1, so the interval collapses to 1
    perfect = metrics_with_intervals(cases, [gt] * 4, [hit] * 4, [0], n_resamples=50, confidence=0.95, seed=0)
    for metric in (AP_KEY, MAP_KEY, FROC_KEY):
        assert perfect[metric] == {"estimate": 1.0, "ci_low": 1.0, "ci_high": 1.0}
    # two hits and two misses: the estimate is the evaluation's number, the interval brackets it and spans
    # the resamples that draw only hits (AP 1) down to ones that draw mostly misses
    predictions = [hit, hit, far, far]
    mixed = metrics_with_intervals(cases, [gt] * 4, predictions, [0], n_resamples=400, confidence=0.95, seed=1)
    reference, _ = evaluate_cases(cases, [gt] * 4, predictions, [0])
    assert mixed[AP_KEY]["estimate"] == pytest.approx(reference[AP_KEY])
    assert mixed[AP_KEY]["estimate"] == pytest.approx(0.5, abs=0.01)  # hits outscore misses: precision 1 to recall 0.5
    assert mixed[AP_KEY]["ci_low"] < mixed[AP_KEY]["estimate"] < mixed[AP_KEY]["ci_high"] == 1.0
    assert mixed[FROC_KEY]["estimate"] == pytest.approx(reference[FROC_KEY])


def test_format_quality_table_lists_every_detector_and_a_failure():
    entry = {"estimate": 0.5, "ci_low": 0.25, "ci_high": 0.75}
    final = {AP_KEY: entry, MAP_KEY: entry, FROC_KEY: entry}
    record = {"settings": {"iterations": 10, "threads": 2, "n_resamples": 100},
              "data": {"train_cases": 4, "test_cases": 2, "test_objects": 3, "classes": [0, 1]},
              "wall_seconds": 60.0,
              "detectors": {"retina_unet": {"final": final, "train_seconds": 5, "test_seconds": 1, "parameters": 9},
                            PEER: {"final": None, "failure": "diverged before iteration 5", "train_seconds": 1,
                                   "test_seconds": 0, "parameters": 7}}}
    table = format_quality_table(record)
    assert "0.500 [0.250, 0.750]" in table
    assert "failed: diverged before iteration 5" in table
    assert "10 iterations, 2 threads; 4 training and 2 test cases (3 objects, 2 classes)" in table


@pytest.mark.slow
def test_tiny_benchmark_run_writes_the_record_table_and_curve(tmp_path, capsys):
    settings = {"config": str(REPO / "config" / "config.yaml"), "iterations": 4, "eval_points": 2, "threads": 1,
                "num_cases": 6, "num_folds": 2, "shape": [32, 32, 32], "lesions_per_case": [1, 2],
                "n_resamples": 20}
    out = tmp_path / "quality"
    assert main(["benchmark-quality", "--out", str(out), "--settings", json.dumps(settings)]) == 0
    printed = capsys.readouterr().out
    record = json.loads((out / RECORD_FILE).read_text())
    assert (out / CURVE_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert record["data"]["train_cases"] == 3 and record["data"]["test_cases"] == 3
    assert set(record["detectors"]) == {"retina_unet", "deformable_detr", PEER, RANDOM}
    for name, result in record["detectors"].items():
        assert name in printed
        assert result["failure"] is None
        assert [point["iteration"] for point in result["curve"]] == ([] if name == RANDOM else [2, 4])
        for metric in (AP_KEY, MAP_KEY, FROC_KEY):
            value = result["final"][metric]
            assert -1.0 <= value["estimate"] <= 1.0
            assert set(value) == {"estimate", "ci_low", "ci_high"}
        if name != RANDOM:
            assert result["train_seconds"] > 0 and result["test_seconds"] > 0 and result["parameters"] > 0
    # the last curve point is the final evaluation
    assert record["detectors"]["retina_unet"]["curve"][-1][AP_KEY] == pytest.approx(
        record["detectors"]["retina_unet"]["final"][AP_KEY]["estimate"])


def test_recipe_overrides_reach_our_recipe_and_are_validated():
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    assert config["detectors"]["retina_unet"]["head_strides"] == [4, 8]  # the demo's CPU-budget levels
    default = QualitySettings.from_mapping({})
    assert detector_recipe(config, "retina_unet", default)["head_strides"] is None  # the release's rule
    assert detector_recipe(config, PEER, default).get("head_strides") is None
    # the DETR: the release's learning rate, not the demo's short-schedule 1e-3
    assert config["detectors"]["deformable_detr"]["lr"] == pytest.approx(1e-3)
    assert detector_recipe(config, "deformable_detr", default)["lr"] == pytest.approx(3e-4)
    kept = QualitySettings.from_mapping({"recipe_overrides": {}})
    assert detector_recipe(config, "retina_unet", kept)["head_strides"] == [4, 8]
    assert detector_recipe(config, "deformable_detr", kept)["lr"] == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="unknown detector entries \\['yolo'\\]"):
        QualitySettings.from_mapping({"recipe_overrides": {"yolo": {}}})
    typo = QualitySettings.from_mapping({"recipe_overrides": {"retina_unet": {"head_stride": [2, 4]}}})
    with pytest.raises(Exception, match="head_stride"):
        detector_recipe(config, "retina_unet", typo)
