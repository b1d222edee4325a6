"""FROC: hand-worked curves, an sklearn roc_curve reference (nnDetection's construction), pooled/per-class keys."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_curve

from pretrain_det3d.evaluation.froc import FP_PER_SCAN, compute_froc_metrics, froc_curve
from pretrain_det3d.evaluation.matching import match_case


def cube(z: float, y: float, x: float, size: float) -> list[float]:
    return [z, y, x, z + size, y + size, x + size]


def test_rates_are_the_luna16_ones() -> None:
    assert FP_PER_SCAN == (0.125, 0.25, 0.5, 1, 2, 4, 8)


def test_hand_worked_curve_and_score() -> None:
    # 2 scans, 4 objects. Ranked TP FP TP FP FP TP FP -> points (fp/scan, sens):
    # (0,0) (0,.25) (.5,.25) (.5,.5) (1,.5) (1.5,.5) (1.5,.75) (2,.75)
    hits = np.array([1, 0, 1, 0, 0, 1, 0], dtype=bool)
    scores = np.linspace(0.9, 0.3, 7)
    curve = froc_curve(scores, hits, num_gt=4, num_scans=2)
    expected = [0.25, 0.25, 0.5, 0.5, 0.75, 0.75, 0.75]  # at 1/8 1/4 1/2 1 2 4 8
    np.testing.assert_allclose(curve, expected, atol=1e-12)
    assert np.mean(curve) == pytest.approx(3.75 / 7)


def test_tied_scores_enter_together_and_are_interpolated_linearly() -> None:
    # 1 scan, 2 objects: TP at 0.9, then a TP and an FP tied at 0.5 -> points (0,0) (0,.5) (1,1)
    curve = froc_curve(np.array([0.9, 0.5, 0.5]), np.array([True, False, True]), 2, 1, [0.125, 0.5, 1, 2])
    np.testing.assert_allclose(curve, [0.5625, 0.75, 1.0, 1.0], atol=1e-12)


def test_edge_cases() -> None:
    # no false positives: the final sensitivity holds at every rate
    np.testing.assert_allclose(froc_curve(np.array([0.9]), np.array([True]), 2, 3), 0.5)
    # no true positives: 0 (nnDetection's sklearn path gives NaN here)
    np.testing.assert_allclose(froc_curve(np.array([0.9, 0.1]), np.array([False, False]), 2, 1), 0.0)
    # no detections at all
    np.testing.assert_allclose(froc_curve(np.zeros(0), np.zeros(0, dtype=bool), 2, 1), 0.0)
    # no ground truth: undefined
    np.testing.assert_allclose(froc_curve(np.array([0.9]), np.array([False]), 0, 1), -1.0)
    with pytest.raises(ValueError, match="descending"):
        froc_curve(np.array([0.1, 0.9]), np.array([True, False]), 1, 1)


def sklearn_reference(scores: np.ndarray, hits: np.ndarray, num_gt: int, num_scans: int) -> np.ndarray:
    """nnDetection's construction: ROC over detections, rescaled to FP per scan and sensitivity."""
    fpr, tpr, _ = roc_curve(hits.astype(int), scores)
    fps = fpr * np.sum(~hits) / num_scans
    sensitivity = tpr * np.sum(hits) / num_gt
    return np.interp(FP_PER_SCAN, fps, sensitivity)


@pytest.mark.parametrize("seed", range(6))
def test_agrees_with_sklearn_roc_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    num = int(rng.integers(5, 80))
    hits = rng.random(num) < 0.4
    hits[:2] = [True, False]  # at least one of each, where the reference is defined
    scores = np.round(rng.random(num), 1 if seed % 2 else 6)  # odd seeds: many tied scores
    order = np.argsort(-scores, kind="mergesort")
    num_gt = int(hits.sum() + rng.integers(0, 5))
    num_scans = int(rng.integers(1, 10))
    ours = froc_curve(scores[order], hits[order], num_gt, num_scans)
    np.testing.assert_allclose(ours, sklearn_reference(scores, hits, num_gt, num_scans), atol=1e-12)


def test_metrics_pool_classes_and_count_empty_scans() -> None:
    a, b = cube(0, 0, 0, 5), cube(20, 20, 20, 5)
    far = cube(100, 100, 100, 3)
    cases = [
        match_case(np.array([a, far]), [0.9, 0.8], [0, 0], np.array([a]), [0], [0.1]),   # class 0: TP, FP
        match_case(np.array([far]), [0.95], [1], np.array([b]), [1], [0.1]),              # class 1: FP, miss
        match_case(np.zeros((0, 6)), [], [], np.zeros((0, 6)), [], [0.1]),               # empty scan
        match_case(np.zeros((0, 6)), [], [], np.zeros((0, 6)), [], [0.1]),               # empty scan
    ]
    m = compute_froc_metrics(cases, [0, 1], [0.1], [0.1])
    # pooled: FP .95, TP .9, FP .8 over 4 scans, 2 objects -> (0,0) (.25,0) (.25,.5) (.5,.5)
    # at 1/8 -> 0 (halfway up a flat segment), every rate >= 1/4 -> .5
    np.testing.assert_allclose(m["FROC_curve_IoU_0.10"], [0, .5, .5, .5, .5, .5, .5], atol=1e-12)
    assert m["FROC_score_IoU_0.10"] == pytest.approx(3 / 7)
    assert m["FROC_sens_IoU_0.10_FPI_0.125"] == pytest.approx(0.0)
    assert m["FROC_sens_IoU_0.10_FPI_8"] == pytest.approx(0.5)
    # class 0 alone: TP .9, FP .8 -> sensitivity 1 from the start; class 1: nothing found
    assert m["0_FROC_score_IoU_0.10"] == pytest.approx(1.0)
    assert m["1_FROC_score_IoU_0.10"] == pytest.approx(0.0)
    assert m["mc_FROC_score_IoU_0.10"] == pytest.approx(0.5)
    assert m["FROC_num_images"] == 4 and m["FROC_fpi_thresholds"] == list(FP_PER_SCAN)


def test_metrics_without_ground_truth_are_undefined() -> None:
    cases = [match_case(np.array([cube(0, 0, 0, 2)]), [0.5], [0], np.zeros((0, 6)), [], [0.1])]
    m = compute_froc_metrics(cases, [0], [0.1], [0.1])
    assert m["FROC_score_IoU_0.10"] == -1.0 and m["0_FROC_score_IoU_0.10"] == -1.0
    assert m["mc_FROC_score_IoU_0.10"] == -1.0
