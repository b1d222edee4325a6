"""Report figures (change heat map, FROC, rank distribution, significance map): files, sizes, marks, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest

from pretrain_det3d.analysis.case_level import from_case_records
from pretrain_det3d.analysis.comparisons import compare_with_baseline
from pretrain_det3d.analysis.figures import PNG_DPI, significance_stars
from pretrain_det3d.analysis.figures_change import change_figure_size, plot_change_heatmap
from pretrain_det3d.analysis.figures_froc import froc_figure_size, plot_froc_curves, read_froc_curves
from pretrain_det3d.analysis.figures_ranks import plot_rank_distribution, rank_figure_size
from pretrain_det3d.analysis.figures_significance import (
    p_value_class,
    plot_significance_map,
    significance_figure_size,
)
from pretrain_det3d.analysis.pairwise import compare_pairwise
from pretrain_det3d.analysis.ranking import mean_rank_stability, rank_stability
from pretrain_det3d.analysis.tables import AnalysisInputError

DETECTORS, INITS, DATASETS = ["retina_unet", "detr"], ["scratch", "mae", "voco"], ["a", "b", "c"]


def make_runs() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    shift = {"scratch": 0.0, "mae": 0.2, "voco": 0.1}
    return pd.DataFrame([dict(detector=d, initialisation=i, dataset=s, fold=f, metric="AP_IoU_0.10_MaxDet_100",
                              value=float(0.3 + shift[i] + rng.normal(0, 0.03)))
                         for d in DETECTORS for i in INITS for s in DATASETS for f in range(5)])


def make_case_data():
    rng = np.random.default_rng(1)
    rate = {"scratch": 0.3, "mae": 0.7, "voco": 0.5}
    records = pd.DataFrame([dict(detector=d, initialisation=i, dataset=s, fold=c % 5, case=f"{s}{c}", num_gt=2,
                                 tp=int(rng.binomial(2, rate[i])))
                            for d in DETECTORS for i in INITS for s in DATASETS for c in range(8)])
    return records, from_case_records(records)


def check_files(png: Path, pdf: Path, size: tuple[float, float]) -> None:
    assert png.stat().st_size > 5000 and pdf.read_bytes()[:5] == b"%PDF-"
    image = mpimg.imread(png)
    expected = np.array([size[1], size[0]]) * PNG_DPI
    assert np.all(np.abs(np.array(image.shape[:2]) - expected) <= 1)  # matplotlib truncates half pixels
    assert image[..., :3].std() > 0.05
    assert sorted(p.name for p in png.parent.iterdir()) == sorted([png.name, pdf.name])  # no temporary files


def test_stars_and_p_classes() -> None:
    assert [significance_stars(p, 0.1) for p in (0.001, 0.01, 0.05, 0.2)] == ["***", "**", "*", ""]
    assert [p_value_class(p, 0.05) for p in (0.2, 0.04, 0.009, 0.0009, float("nan"))] == [0, 1, 2, 3, 0]


def test_change_heatmap(tmp_path: Path) -> None:
    _, data = make_case_data()
    comparisons = compare_with_baseline(make_runs(), case_data=data, n_resamples=50)
    png, pdf = tmp_path / "f" / "change.png", tmp_path / "f" / "change.pdf"
    plot_change_heatmap(comparisons, png, pdf, test="bootstrap")
    check_files(png, pdf, change_figure_size(2, 3, 2))
    with pytest.raises(AnalysisInputError, match="test must be one of"):
        plot_change_heatmap(comparisons, png, pdf, test="t-test")
    with pytest.raises(AnalysisInputError, match=r"missing column\(s\) \['mean_diff'\]"):
        plot_change_heatmap(comparisons.drop(columns="mean_diff"), png, pdf)
    with pytest.raises(AnalysisInputError, match="no bootstrap p-values"):
        plot_change_heatmap(compare_with_baseline(make_runs()), png, pdf, test="bootstrap")


def write_metric(path: Path, curve: list[float]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rates = [0.125, 0.25, 0.5, 1, 2, 4, 8]
    path.write_text(json.dumps({"FROC_curve_IoU_0.10": curve, "FROC_fpi_thresholds": rates}))
    return path


def test_froc_curves_average_over_folds(tmp_path: Path) -> None:
    files = []
    for d in DETECTORS:
        for i, init in enumerate(INITS):
            for s in DATASETS[:2]:
                for fold in range(2):
                    curve = list(np.clip(np.linspace(0.1, 0.8, 7) + 0.05 * i + 0.02 * fold, 0, 1))
                    files.append((d, init, s, fold, write_metric(tmp_path / "m" / d / init / s / f"fold{fold}.json",
                                                                 curve)))
    curves = read_froc_curves(files)
    assert len(curves) == len(files) * 7
    first = curves[(curves.detector == "detr") & (curves.initialisation == "mae") & (curves.dataset == "a")]
    mean = first.groupby("fp_per_scan")["sensitivity"].mean()
    assert mean.loc[0.125] == pytest.approx(0.1 + 0.05 + 0.01)  # folds 0 and 1 differ by 0.02
    png, pdf = tmp_path / "f" / "froc.png", tmp_path / "f" / "froc.pdf"
    plot_froc_curves(curves, png, pdf)
    check_files(png, pdf, froc_figure_size(2, 2))

    bad = write_metric(tmp_path / "bad.json", [-1.0] * 7)
    with pytest.raises(ValueError, match=r"bad\.json: 'FROC_curve_IoU_0.10' is undefined"):
        read_froc_curves([("d", "scratch", "a", 0, bad)])
    bad.write_text(json.dumps({"FROC_score_IoU_0.10": 0.5}))
    with pytest.raises(ValueError, match=r"bad\.json: expected lists"):
        read_froc_curves([("d", "scratch", "a", 0, bad)])
    with pytest.raises(ValueError, match=r"absent\.json: metric file not found"):
        read_froc_curves([("d", "scratch", "a", 0, tmp_path / "absent.json")])


def test_rank_distribution(tmp_path: Path) -> None:
    records, data = make_case_data()
    stability = rank_stability(records, data, n_resamples=40)
    mean_stability = mean_rank_stability(records, data, n_resamples=40)
    png, pdf = tmp_path / "f" / "ranks.png", tmp_path / "f" / "ranks.pdf"
    plot_rank_distribution(stability, png, pdf, mean_stability=mean_stability)
    check_files(png, pdf, rank_figure_size(2, 4, 3))
    plot_rank_distribution(stability, png, pdf)  # without the mean-rank column; overwrites
    check_files(png, pdf, rank_figure_size(2, 3, 3))
    with pytest.raises(AnalysisInputError, match="rank stability table: no rows"):
        plot_rank_distribution(stability.iloc[:0], png, pdf)


def test_significance_map(tmp_path: Path) -> None:
    _, data = make_case_data()
    pairwise = compare_pairwise(make_runs(), case_data=data, n_resamples=150, order=INITS)
    assert pairwise["reject_bootstrap_holm"].any()  # something to shade
    png, pdf = tmp_path / "f" / "sig.png", tmp_path / "f" / "sig.pdf"
    plot_significance_map(pairwise, png, pdf, test="bootstrap")
    check_files(png, pdf, significance_figure_size(2, 3))
    with pytest.raises(AnalysisInputError, match="no bootstrap p-values"):
        plot_significance_map(compare_pairwise(make_runs()), png, pdf, test="bootstrap")
    with pytest.raises(AnalysisInputError, match="pairwise comparison table: missing column"):
        plot_significance_map(pairwise.drop(columns="initialisation_b"), png, pdf)
