"""Label-efficiency curves and the labels-saved table, against hand-worked numbers on a tiny study on disk."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from pretrain_det3d.analysis.bootstrap import dataset_seed, resample_indices
from pretrain_det3d.analysis.label_efficiency import (
    AT_MOST,
    INTERPOLATED,
    NOT_REACHED,
    LabelEfficiency,
    labels_saved_markdown,
    matching_cases,
)
from pretrain_det3d.analysis.outputs import StudyInputs, make_figure, make_table
from pretrain_det3d.analysis.tables import AnalysisInputError
from pretrain_det3d.cli import main


def test_matching_on_hand_worked_curves():
    # half-way between 0.30 and 0.50 in AP is half-way between 10 and 40 cases in log: sqrt(10 * 40) = 20
    assert matching_cases([10, 40, 100], [0.30, 0.50, 0.60], 0.40) == (pytest.approx(20.0), INTERPOLATED)
    # the first crossing counts, not a later dip: t = 0.15 / 0.2 = 0.75, 10 * 4 ** 0.75 = 28.284...
    cases, outcome = matching_cases([10, 40, 60, 100], [0.30, 0.50, 0.35, 0.60], 0.45)
    assert outcome == INTERPOLATED and cases == pytest.approx(10 * 4 ** 0.75) and round(cases, 3) == 28.284
    # reaching the target exactly at a point is that point
    assert matching_cases([2, 4, 8], [0.1, 0.2, 0.4], 0.4) == (pytest.approx(8.0), INTERPOLATED)
    assert matching_cases([5, 10], [0.5, 0.6], 0.45) == (5.0, AT_MOST)
    assert matching_cases([5, 10], [0.1, 0.2], 0.45) == (math.inf, NOT_REACHED)
    with pytest.raises(ValueError, match="non-decreasing"):
        matching_cases([10, 5], [0.1, 0.2], 0.1)


def test_labels_saved_of_given_curves_and_draws():
    # 2 initialisations x 3 fractions (1, 2, 4 cases), 3 resamples written out by hand
    estimate = np.array([[0.1, 0.2, 0.4],    # scratch: target 0.4
                         [0.2, 0.6, 0.8]])   # mae: crosses 0.4 half-way between 1 and 2 cases: sqrt(2)
    draws = np.array([[[0.1, 0.2, 0.4], [0.4, 0.5, 0.6]],      # mae reaches 0.4 at once: at most 1 case
                      [[0.1, 0.2, 0.3], [0.1, 0.2, 0.25]],     # mae below 0.3 everywhere: not reached
                      [[0.0, 0.1, 0.2], [0.1, 0.3, 0.5]]])     # 0.2 between 0.1 and 0.3: sqrt(2) cases
    eff = LabelEfficiency("retina_unet", "lung", ("scratch", "mae"), np.array([0.25, 0.5, 1.0]),
                          np.array([1.0, 2.0, 4.0]), estimate, draws, confidence=0.5)
    table = eff.labels_saved().set_index("initialisation")
    mae = table.loc["mae"]
    assert mae["match"] == INTERPOLATED and mae["cases_needed"] == pytest.approx(math.sqrt(2))
    assert mae["fraction_needed"] == pytest.approx(math.sqrt(2) / 4) and mae["cases_saved"] == pytest.approx(4 - 2 ** .5)
    # fractions on the resamples: 1/4, inf, sqrt(2)/4; order statistics at 25 % and 75 % (inverted_cdf)
    assert mae["fraction_ci_low"] == pytest.approx(0.25) and mae["fraction_ci_high"] == math.inf
    scratch = table.loc["scratch"]
    assert scratch["target_ap"] == 0.4 and scratch["fraction_needed"] == 1.0 and scratch["cases_saved"] == 0
    markdown = labels_saved_markdown(eff.labels_saved())
    assert "1.4 of 4 (35.4 %)" in markdown and "25.0 % - not reached" in markdown
    curves = eff.curves()
    assert curves["ap"].tolist() == estimate.ravel().tolist() and set(curves["num_cases"]) == {1.0, 2.0, 4.0}


# ---- a tiny study on disk: 8 cases with one object each, 2 folds of 4 -------------------------------------------

CASES = [f"lung_{i}" for i in range(8)]
BOX = [2, 2, 2, 5, 6, 6]
#: cases found (a box on the object, score 0.9; nothing else) per initialisation and fraction: recall k / 8, so AP
#: (COCO's 101 recall points, precision 1 up to recall k / 8) = (floor(100 k / 8) + 1) / 101
FOUND = {("scratch", 0.25): 1, ("scratch", 0.5): 2, ("scratch", 1.0): 4,
         ("mae", 0.25): 2, ("mae", 0.5): 6, ("mae", 1.0): 8,
         ("voco", 0.25): 1, ("voco", 0.5): 1, ("voco", 1.0): 1}
TRAIN_CASES = {0.25: 1, 0.5: 2, 1.0: 4}


def hand_ap(found: int, total: int = 8) -> float:
    return (math.floor(100 * found / total) + 1) / 101


def write_fraction_study(root: Path) -> dict[str, Path]:
    converted, predictions = root / "converted" / "lung", root / "predictions"
    (converted / "labelsTr").mkdir(parents=True)
    (converted / "dataset.json").write_text(json.dumps({"name": "lung", "labels": {"0": "nodule"}}))
    for case in CASES:
        labels = np.zeros((10, 10, 10), dtype=np.int16)
        labels[3:5, 3:6, 3:6] = 1  # nnDetection's box of it: [2, 2, 2, 5, 6, 6]
        sitk.WriteImage(sitk.GetImageFromArray(labels), str(converted / "labelsTr" / f"{case}.nii.gz"))
        (converted / "labelsTr" / f"{case}.json").write_text(json.dumps({"instances": {"1": 0}}))
    folds = [CASES[:4], CASES[4:]]
    splits = root / "splits.json"
    splits.write_text(json.dumps([{"train": folds[1], "val": folds[0]}, {"train": folds[0], "val": folds[1]}]))
    entries = []
    for (init, fraction), found in FOUND.items():
        segment = "" if fraction == 1.0 else f"fraction{fraction:g}/"
        for fold, val in enumerate(folds):
            folder = predictions / "retina_unet" / init / "lung" / f"{segment}fold{fold}"
            folder.mkdir(parents=True)
            for case in val:
                hit = CASES.index(case) < found
                (folder / f"{case}.json").write_text(json.dumps(
                    {"boxes": [BOX] if hit else [], "scores": [0.9] if hit else [], "labels": [0] if hit else []}))
            metrics = root / "metrics" / "retina_unet" / init / "lung" / f"{segment}fold{fold}.json"
            metrics.parent.mkdir(parents=True, exist_ok=True)
            metrics.write_text(json.dumps({"AP_IoU_0.10_MaxDet_100": 0.5, "mAP_IoU_0.10_0.50_0.05_MaxDet_100": 0.4,
                                           "FROC_score_IoU_0.10": 0.3}))
            if fraction == 1.0:
                train_cases = splits
            else:
                train_cases = root / "subsets" / f"{fraction:g}_fold{fold}.json"
                train_cases.parent.mkdir(exist_ok=True)
                train_cases.write_text(json.dumps({"fold": fold, "train": folds[1 - fold][:TRAIN_CASES[fraction]]}))
            entries.append({"detector": "retina_unet", "initialisation": init, "dataset": "lung", "fold": fold,
                            "fraction": fraction, "metrics": str(metrics), "train_cases": str(train_cases)})
    runs_csv = root / "runs.csv"
    main(["label-fraction-runs", "--runs", json.dumps(entries), "--out-csv", str(runs_csv)])
    return {"runs_csv": runs_csv, "predictions": predictions, "converted": root / "converted"}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return write_fraction_study(tmp_path_factory.mktemp("fractions"))


SETTINGS = {"n_resamples": 60, "seed": 4, "confidence": 0.9}


def test_run_table_has_fractions_and_training_cases(study):
    runs = pd.read_csv(study["runs_csv"])
    assert len(runs) == len(FOUND) * 2 * 3  # runs x folds x the three summary metrics
    sizes = runs.drop_duplicates(["initialisation", "fold", "fraction"]).set_index(["fraction"])["num_train_cases"]
    assert all((sizes.loc[f] == n).all() for f, n in TRAIN_CASES.items())


def test_labels_saved_table_against_hand_worked_numbers(study, tmp_path):
    inputs = StudyInputs(runs_csv=study["runs_csv"], predictions_root=study["predictions"],
                         converted_root=study["converted"])
    paths = {"csv": tmp_path / "saved.csv", "md": tmp_path / "saved.md"}
    make_table("labels_saved", inputs, paths, SETTINGS)
    table = pd.read_csv(paths["csv"]).set_index("initialisation")
    target = hand_ap(4)  # scratch at 100 %: 4 of 8 found, AP 51 / 101
    assert table["target_ap"].tolist() == pytest.approx([target] * 3)
    # mae: 26/101 with 1 case, 76/101 with 2: the target lies half-way, at sqrt(2) cases (log interpolation)
    assert table.loc["mae", "match"] == INTERPOLATED
    assert table.loc["mae", "cases_needed"] == pytest.approx(math.sqrt(2))
    assert table.loc["mae", "fraction_needed"] == pytest.approx(math.sqrt(2) / 4)
    assert table.loc["voco", "match"] == NOT_REACHED and table.loc["scratch", "fraction_needed"] == 1.0

    # the interval, recomputed by brute force: the same resamples (dataset seed), AP by the formula above
    found_cases = {key: set(CASES[:k]) for key, k in FOUND.items()}
    fractions = [0.25, 0.5, 1.0]
    drawn = []
    for positions in resample_indices(8, SETTINGS["n_resamples"], dataset_seed(SETTINGS["seed"], "lung")):
        sample = [CASES[p] for p in positions]
        ap = {key: hand_ap(sum(case in cases for case in sample)) for key, cases in found_cases.items()}
        curve = [ap[("mae", f)] for f in fractions]
        drawn.append(matching_cases([1, 2, 4], curve, ap[("scratch", 1.0)])[0] / 4)
    low, high = np.quantile(drawn, [0.05, 0.95], method="inverted_cdf")
    assert table.loc["mae", "fraction_ci_low"] == pytest.approx(low)
    assert table.loc["mae", "fraction_ci_high"] == pytest.approx(high)
    assert "not reached" in paths["md"].read_text()


def test_figure_is_drawn(study, tmp_path):
    inputs = StudyInputs(runs_csv=study["runs_csv"], predictions_root=study["predictions"],
                         converted_root=study["converted"])
    make_figure("label_efficiency", inputs, tmp_path / "f.png", tmp_path / "f.pdf", SETTINGS)
    assert (tmp_path / "f.png").stat().st_size > 5000 and (tmp_path / "f.pdf").is_file()


def test_missing_fraction_run_is_a_clear_error(study, tmp_path):
    runs = pd.read_csv(study["runs_csv"])
    runs = runs[~((runs["initialisation"] == "voco") & (runs["fraction"] == 0.5))]
    path = tmp_path / "runs.csv"
    runs.to_csv(path, index=False)
    inputs = StudyInputs(runs_csv=path, predictions_root=study["predictions"], converted_root=study["converted"])
    with pytest.raises(AnalysisInputError, match=r"retina_unet/voco/lung: runs at fractions \[0.25, 1.0\]"):
        make_table("labels_saved", inputs, {"csv": tmp_path / "a.csv", "md": tmp_path / "a.md"}, SETTINGS)
    assert not (tmp_path / "a.csv").exists()
