"""Detection examples figure: the chosen run and cases, the drawn rectangles, notes, determinism, registry entry.

A tiny converted dataset and its predictions are written by the test, with per-case APs worked out by hand:

- ``t_a``: one object, found by the top-scoring box (0.9), and false positives (0.3, 0.25, 0.2) below it: AP 1;
- ``t_b``: one object, found (0.8) above its false positives (0.7, 0.2, 0.05): AP 1 too; the tie goes to the case
  whose most confident false positive scores lower, so ``t_a`` is the best case;
- ``t_c``: two objects, a false positive (0.95) ranked above the one hit (0.5): precision 1/2 at recall 1/2 and
  nothing beyond, so AP = 0.5 * 51 / 101 (51 of COCO's 101 recall points reachable): the worst case;
- ``t_d``: no object, a false positive at 0.99: no AP, so it is neither best nor worst.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from pretrain_det3d.analysis.figures_cases import (
    GT_GID,
    PRED_GID,
    FP_LINESTYLE,
    TP_LINESTYLE,
    best_runs,
    choose_cases,
    intensity_window,
    view_limits,
    dataset_examples,
    detection_examples,
    examples_figure,
    plot_detection_examples,
    score_cases,
)
from pretrain_det3d.analysis.outputs import FIGURES, StudyInputs, make_figure
from pretrain_det3d.evaluation.run import load_ground_truth, load_prediction

SHAPE = (10, 20, 24)  # z, y, x
SPACING = (2.0, 1.0, 1.5)  # z, y, x in mm
METRIC = "AP_IoU_0.10_MaxDet_100"
GT = {
    "t_a": [[2, 4, 5, 6, 10, 12]],
    "t_b": [[1, 2, 2, 5, 8, 8]],
    "t_c": [[1, 1, 1, 4, 5, 5], [6, 12, 14, 9, 18, 22]],
    "t_d": [],
}
# (voxel extent [first, last + 1) per axis, score) per case; the first box of t_b and the second of t_c equal a
# ground-truth box (true positives). Predictions are written as boxes (``as_box``), like the ground truth's.
PRED_EXTENTS = {
    "t_a": [([2, 4, 5, 6, 10, 12], 0.9), ([7, 14, 16, 9, 18, 22], 0.3),
            ([3, 0, 6, 4, 3, 11], 0.25), ([5, 0, 6, 7, 3, 11], 0.2)],  # end at / start after slice z = 4: not on it
    "t_b": [([1, 2, 2, 5, 8, 8], 0.8), ([2, 12, 14, 4, 16, 20], 0.2),  # on the best case's axial slice z = 3
            ([6, 12, 14, 8, 16, 20], 0.7),  # off that slice (z 6-7): not drawn there
            ([3, 10, 10, 4, 12, 12], 0.05)],  # on the slice but below the minimum score
    "t_c": [([1, 14, 1, 3, 18, 5], 0.95), ([6, 12, 14, 9, 18, 22], 0.5)],
    "t_d": [([4, 4, 4, 6, 8, 8], 0.99)],
}


def as_box(extent) -> list[float]:
    """nnDetection's box of the voxels ``[first, last + 1)`` per axis: ``[first - 1, last + 1]``."""
    return [v - 1 for v in extent[:3]] + list(extent[3:])


def rect(x0, y0, width, height, style):
    """A drawn rectangle of a voxel extent (Rectangle((x0, y0), w, h) of the extent) in box coordinates."""
    return (x0 - 1.0, y0 - 1.0, width + 1.0, height + 1.0, style)


PRED = {case: [(as_box(extent), score) for extent, score in pairs] for case, pairs in PRED_EXTENTS.items()}
FOLD_OF = {"t_a": 0, "t_b": 0, "t_c": 1, "t_d": 1}
WORST_AP = 0.5 * 51 / 101


def volume_of(case: str) -> np.ndarray:
    """A deterministic image whose values differ per case (so the drawn slice can be identified)."""
    z, y, x = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
    return (100.0 * z + 10.0 * y + x + 1000.0 * (ord(case[-1]) - ord("a"))).astype(np.float32)


def write_image(array: np.ndarray, path: Path) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(reversed(SPACING)))  # SimpleITK wants x, y, z
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))


def write_dataset(converted: Path, truth: dict[str, list], with_images: bool = True) -> None:
    converted.mkdir(parents=True)
    (converted / "dataset.json").write_text(json.dumps({"name": converted.name, "modality": {"0": "CT"},
                                                        "labels": {"0": "lesion"}}))
    for case, boxes in truth.items():
        labels = np.zeros(SHAPE, dtype=np.int16)
        for instance, (z0, y0, x0, z1, y1, x1) in enumerate(boxes, start=1):
            labels[z0:z1, y0:y1, x0:x1] = instance
        write_image(labels, converted / "labelsTr" / f"{case}.nii.gz")
        (converted / "labelsTr" / f"{case}.json").write_text(
            json.dumps({"instances": {str(i): 0 for i in range(1, len(boxes) + 1)}}))
        if with_images:
            write_image(volume_of(case), converted / "imagesTr" / f"{case}_0000.nii.gz")


def write_predictions(folder: Path, cases: list[str], predictions: dict[str, list]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for case in cases:
        pairs = predictions.get(case, [])
        record = {"boxes": [b for b, _ in pairs], "scores": [s for _, s in pairs], "labels": [0] * len(pairs)}
        (folder / f"{case}.json").write_text(json.dumps(record))


@pytest.fixture()
def study(tmp_path: Path) -> dict[str, Path]:
    converted, predictions = tmp_path / "converted", tmp_path / "predictions"
    write_dataset(converted / "tiny", GT)
    # an empty dataset: no objects, no predictions, no images
    write_dataset(converted / "empty", {"e_0": [], "e_1": []}, with_images=False)
    rows = []
    for init, values in (("scratch", (0.3, 0.3)), ("mae", (0.6, 0.4))):  # mae: mean 0.5, the best run
        for fold in (0, 1):
            cases = [case for case, f in FOLD_OF.items() if f == fold]
            # scratch finds nothing (its predictions would choose other cases): the figure must not use them
            write_predictions(predictions / "retina_unet" / init / "tiny" / f"fold{fold}", cases,
                              PRED if init == "mae" else {})
            write_predictions(predictions / "retina_unet" / init / "empty" / f"fold{fold}", [f"e_{fold}"], {})
            rows.append(dict(detector="retina_unet", initialisation=init, dataset="tiny", fold=fold, metric=METRIC,
                             value=values[fold]))
            rows.append(dict(detector="retina_unet", initialisation=init, dataset="empty", fold=fold, metric=METRIC,
                             value=-1.0))
    runs_csv = tmp_path / "runs.csv"
    pd.DataFrame(rows).to_csv(runs_csv, index=False)
    return {"converted": converted, "predictions": predictions, "runs_csv": runs_csv}


def test_best_run_is_the_highest_mean_over_folds(study: dict[str, Path]) -> None:
    best = best_runs(pd.read_csv(study["runs_csv"]), METRIC)
    assert (best["tiny"].detector, best["tiny"].initialisation, best["tiny"].folds) == ("retina_unet", "mae", (0, 1))
    assert best["tiny"].value == pytest.approx(0.5)
    # undefined everywhere: the first run in the report's order (scratch first), value NaN
    assert best["empty"].initialisation == "scratch" and math.isnan(best["empty"].value)


def test_per_case_ap_and_the_chosen_cases(study: dict[str, Path]) -> None:
    root = study["converted"] / "tiny"
    folders = {case: study["predictions"] / "retina_unet" / "mae" / "tiny" / f"fold{fold}"
               for case, fold in FOLD_OF.items()}
    gt = {case: load_ground_truth(root, case) for case in GT}
    pred = {case: load_prediction(folders[case], case) for case in GT}
    scores, hits = score_cases(gt, pred, FOLD_OF, [0])
    by_case = {s.case: s for s in scores}
    assert by_case["t_a"].ap == by_case["t_b"].ap == 1.0
    assert by_case["t_c"].ap == pytest.approx(WORST_AP, abs=1e-12)
    assert math.isnan(by_case["t_d"].ap) and by_case["t_d"].num_gt == 0
    assert (by_case["t_a"].max_fp_score, by_case["t_b"].max_fp_score) == (0.3, 0.7)
    assert hits["t_b"].tolist() == [True, False, False, False] and hits["t_c"].tolist() == [False, True]
    # t_a and t_b tie at AP 1; t_a's most confident false positive (0.3) is below t_b's (0.7)
    choices = choose_cases(scores)
    assert [(c.role, c.score.case, c.rule) for c in choices] == [("best", "t_a", "AP"), ("worst", "t_c", "AP")]


def test_drawn_rectangles_are_the_boxes(study: dict[str, Path]) -> None:
    [empty, tiny] = detection_examples(pd.read_csv(study["runs_csv"]), study["predictions"], study["converted"])
    assert (empty.dataset, tiny.dataset) == ("empty", "tiny")
    assert [(v.title.split(":")[0], v.plane) for v in tiny.views] == [
        ("best", "axial"), ("best", "coronal"), ("worst", "axial"), ("worst", "coronal")]
    fig = examples_figure([empty, tiny])
    try:
        axes = fig.subfigs[1].axes
        best_axial, best_coronal, worst_axial, worst_coronal = axes
        # best case t_a: its one object z 2-5 -> axial slice floor((2 + 6) / 2) = 4, coronal y = floor(14 / 2) = 7
        assert "t_a (fold 0)" in best_axial.get_title() and "z=4" in best_axial.get_title()
        assert "y=7" in best_coronal.get_title()
        image = best_axial.images[0]
        np.testing.assert_array_equal(image.get_array(), volume_of("t_a")[4])
        np.testing.assert_array_equal(best_coronal.images[0].get_array(), volume_of("t_a")[:, 7, :])
        assert list(image.get_extent()) == [-0.5, 23.5, 19.5, -0.5]  # pixel i covers [i - 0.5, i + 0.5]
        expected_window = tuple(np.percentile(volume_of("t_a"), [0.5, 99.5]))
        assert image.get_clim() == pytest.approx(expected_window)
        assert best_axial.get_aspect() == pytest.approx(SPACING[1] / SPACING[2])
        assert best_coronal.get_aspect() == pytest.approx(SPACING[0] / SPACING[2])

        def rectangles(ax, gid):
            return sorted((p.get_x(), p.get_y(), p.get_width(), p.get_height(), p.get_linestyle())
                          for p in ax.patches if p.get_gid() == gid)

        solid, dashed = "-", "--"
        assert (TP_LINESTYLE, FP_LINESTYLE) == (solid, dashed)
        # axial (rows y, columns x): Rectangle((x0, y0), x1 - x0, y1 - y0)
        assert rectangles(best_axial, GT_GID) == [rect(5.0, 4.0, 7.0, 6.0, solid)]
        # the FPs at z 7-8, z [3, 4) and z [5, 7) all miss slice z = 4 ([4, 5))
        assert rectangles(best_axial, PRED_GID) == [rect(5.0, 4.0, 7.0, 6.0, solid)]
        # coronal (rows z, columns x) at y = 7: the FP's y range 14-17 misses it
        assert rectangles(best_coronal, GT_GID) == [rect(5.0, 2.0, 7.0, 4.0, solid)]
        assert rectangles(best_coronal, PRED_GID) == [rect(5.0, 2.0, 7.0, 4.0, solid)]
        # worst case t_c: largest object [6, 12, 14, 9, 18, 22] -> z = 7, y = 15
        assert "t_c (fold 1)" in worst_axial.get_title() and "z=7" in worst_axial.get_title()
        assert rectangles(worst_axial, GT_GID) == [rect(14.0, 12.0, 8.0, 6.0, solid)]
        assert rectangles(worst_axial, PRED_GID) == [rect(14.0, 12.0, 8.0, 6.0, solid)]
        assert rectangles(worst_coronal, GT_GID) == [rect(14.0, 6.0, 8.0, 3.0, solid)]
        # the 0.95 false positive (z 1-2, y 14-17) crosses y = 15 but not z = 7
        assert rectangles(worst_coronal, PRED_GID) == [rect(1.0, 1.0, 4.0, 2.0, dashed), rect(14.0, 6.0, 8.0, 3.0, solid)]
        texts = sorted(t.get_text() for t in worst_coronal.texts)
        assert texts == ["0.50", "0.95"]
        # the empty dataset: a row with notes, blank slices, no boxes
        notes = [t.get_text() for ax in fig.subfigs[0].axes for t in ax.texts]
        assert any("no ground truth and no predictions" in n for n in notes)
        assert any("image not readable: e_0_0000.nii.gz" in n for n in notes)
        assert not any(ax.patches for ax in fig.subfigs[0].axes)
        assert "undefined (no ground truth)" in empty.title
    finally:
        plt.close(fig)


def test_top_k_min_score_and_slice_intersection(study: dict[str, Path]) -> None:
    best = best_runs(pd.read_csv(study["runs_csv"]), METRIC)["tiny"]
    # t_b, drawn as a best case: make t_a worse by giving its hit a low score under a higher false positive
    PRED_SWAPPED = {**PRED, "t_a": [([2, 4, 5, 6, 10, 12], 0.2), ([7, 14, 16, 9, 18, 22], 0.3)]}
    write_predictions(study["predictions"] / "retina_unet" / "mae" / "tiny" / "fold0", ["t_a", "t_b"], PRED_SWAPPED)
    row = dataset_examples(best, study["predictions"], study["converted"], top_k=1, min_score=0.1)
    axial = row.views[0]
    assert axial.title.startswith("best: t_b") and axial.index == 3  # floor((1 + 5) / 2)
    # on z = 3: the hit (0.8), the FP (0.2); the 0.7 box lies at z 6-7 and the 0.05 box is below min_score
    assert axial.pred_texts == ("0.80",) and axial.pred_hits == (True,)
    np.testing.assert_array_equal(axial.pred_boxes, [[1, 1, 8, 8]])  # extent y 2-7, x 2-7 as a box
    row = dataset_examples(best, study["predictions"], study["converted"], top_k=5, min_score=0.1)
    assert row.views[0].pred_texts == ("0.80", "0.20")
    row = dataset_examples(best, study["predictions"], study["converted"], top_k=5, min_score=0.0)
    assert row.views[0].pred_texts == ("0.80", "0.20", "0.05")


def test_figure_files_are_deterministic_and_atomic(study: dict[str, Path], tmp_path: Path) -> None:
    rows = detection_examples(pd.read_csv(study["runs_csv"]), study["predictions"], study["converted"])
    out = tmp_path / "figures"
    contents = []
    for _ in range(2):
        plot_detection_examples(rows, out / "d.png", out / "d.pdf")
        contents.append(((out / "d.png").read_bytes(), (out / "d.pdf").read_bytes()))
    assert contents[0] == contents[1]
    assert contents[0][0][:8] == b"\x89PNG\r\n\x1a\n" and contents[0][1][:5] == b"%PDF-"
    assert sorted(p.name for p in out.iterdir()) == ["d.pdf", "d.png"]  # no temporaries left


def test_registered_figure(study: dict[str, Path], tmp_path: Path) -> None:
    assert FIGURES.get("detection_examples").requires == ("runs_csv", "predictions_root", "converted_root")
    make_figure("detection_examples", StudyInputs(runs_csv=study["runs_csv"], predictions_root=study["predictions"],
                                                  converted_root=study["converted"]),
                tmp_path / "x.png", tmp_path / "x.pdf")
    assert (tmp_path / "x.png").stat().st_size > 5000 and (tmp_path / "x.pdf").is_file()


def test_dataset_without_cases_gets_a_note(study: dict[str, Path], tmp_path: Path) -> None:
    for fold in (0, 1):
        for path in (study["predictions"] / "retina_unet" / "mae" / "tiny" / f"fold{fold}").glob("*.json"):
            path.unlink()
    best = best_runs(pd.read_csv(study["runs_csv"]), METRIC)["tiny"]
    row = dataset_examples(best, study["predictions"], study["converted"])
    assert row.views == () and row.note == "no validation cases were predicted"
    fig = examples_figure([row])
    try:
        assert "no validation cases were predicted" in [t.get_text() for ax in fig.axes for t in ax.texts]
    finally:
        plt.close(fig)


def test_window_and_view_by_hand() -> None:
    values = np.arange(10001, dtype=np.int16).reshape(1, 1, -1)
    assert intensity_window(values, "CT") == (50.0, 9950.0)  # 0.5 / 99.5 percentiles
    assert intensity_window(values, "MRI") == (100.0, 9900.0)  # 1 / 99 for every other modality
    assert intensity_window(np.zeros((2, 2, 2)), "CT") == (0.0, 1.0)  # flat image: a window of width 1
    # 100 mm square around the box centre (205, 205): 200 rows of 0.5 mm, 100 columns of 1 mm
    assert view_limits(np.array([200, 200, 210, 210.]), (400, 400), (0.5, 1.0)) == (105.0, 305.0, 155.0, 255.0)
    # at a border the square moves inside the slice (centre 375 +- 50 would pass 400)
    assert view_limits(np.array([0, 0, 4, 4.]), (400, 400), (0.5, 1.0)) == (-0.5, 199.5, -0.5, 99.5)
    assert view_limits(np.array([370, 370, 380, 380.]), (400, 400), (1.0, 1.0)) == (299.5, 399.5, 299.5, 399.5)
    # a 60 mm box widens the square to 4 x 60 = 240 mm: centre 330 +- 120, moved back to end at 400
    assert view_limits(np.array([300, 300, 360, 360.]), (400, 400), (1.0, 1.0)) == (159.5, 399.5, 159.5, 399.5)
    # a 120 mm box asks for 480 mm: the whole 400 mm slice
    assert view_limits(np.array([200, 200, 320, 320.]), (400, 400), (1.0, 1.0)) == (-0.5, 399.5, -0.5, 399.5)
