"""The chance level: random boxes inside the image with training-box sizes, evaluated as predictions are."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pretrain_det3d.cli import main
from pretrain_det3d.data.synthetic import write_synthetic_dataset
from pretrain_det3d.evaluation.chance import REPORTED_METRICS, box_extents, chance_metrics, random_boxes
from pretrain_det3d.evaluation.run import CaseBoxes, evaluate_cases


def test_random_boxes_lie_inside_the_image_with_training_box_sizes():
    sizes = np.array([[2.0, 3.0, 4.0], [6.0, 6.0, 6.0]])
    boxes = random_boxes((10, 20, 30), sizes, 500, [0, 1], np.random.default_rng(3))
    assert boxes.boxes.shape == (500, 6)
    assert (boxes.boxes[:, :3] >= 0).all() and (boxes.boxes[:, 3:] <= np.array([10, 20, 30])).all()
    extents = boxes.boxes[:, 3:] - boxes.boxes[:, :3]
    drawn = {tuple(np.round(e, 6)) for e in extents}
    assert drawn == {(2.0, 3.0, 4.0), (6.0, 6.0, 6.0)}  # every size is a training size, both are used
    assert set(boxes.labels.tolist()) == {0, 1}
    assert (np.diff(boxes.scores) <= 0).all()  # best score first, as detectors return them
    # a box larger than the image is clipped to the image
    big = random_boxes((4, 4, 4), np.array([[9.0, 2.0, 2.0]]), 3, [0], np.random.default_rng(0))
    assert np.allclose(big.boxes[:, 0], 0) and np.allclose(big.boxes[:, 3], 4)


def test_boxes_as_large_as_the_image_find_an_object_that_fills_it():
    """Hand-worked: the only training size is the whole image, so every random box is the image itself; the
    best-scored one matches the ground truth (IoU 1) and the rest are false positives after it: AP 1."""
    gt = CaseBoxes(np.array([[0, 0, 0, 10, 10, 10.0]]), np.array([0]))
    result = chance_metrics(["a"], [gt], [(10, 10, 10)], np.array([[10.0, 10.0, 10.0]]), [0], draws=3,
                            boxes_per_case=100)
    assert result["AP_IoU_0.10_MaxDet_100"] == 1.0
    assert result["std"]["AP_IoU_0.10_MaxDet_100"] == 0.0
    assert (result["draws"], result["boxes_per_case"], result["num_gt"], result["training_boxes"]) == (3, 100, 1, 1)


def test_chance_metrics_are_the_mean_over_draws_of_evaluated_random_boxes():
    rng = np.random.default_rng(5)
    shapes = [(20, 24, 28), (16, 16, 16)]
    gts = [CaseBoxes(np.array([[2, 3, 4, 8, 9, 10.0], [10, 10, 10, 14, 15, 16.0]]), np.array([0, 1])),
           CaseBoxes(np.array([[4, 4, 4, 9, 9, 9.0]]), np.array([1]))]
    sizes = np.array([[6.0, 6.0, 6.0], [4.0, 5.0, 6.0]])
    result = chance_metrics(["a", "b"], gts, shapes, sizes, [0, 1], draws=4, boxes_per_case=30, seed=9)
    per_draw = []
    for draw in range(4):  # the documented seeding, recomputed here
        draw_rng = np.random.default_rng([9, draw])
        predictions = [random_boxes(shape, sizes, 30, [0, 1], draw_rng) for shape in shapes]
        metrics, _ = evaluate_cases(["a", "b"], gts, predictions, [0, 1])
        per_draw.append([metrics[m] for m in REPORTED_METRICS])
    per_draw = np.array(per_draw)
    for column, metric in enumerate(REPORTED_METRICS):
        assert result[metric] == pytest.approx(per_draw[:, column].mean())
        assert result["std"][metric] == pytest.approx(per_draw[:, column].std())
    assert 0 < result["AP_IoU_0.10_MaxDet_100"] < 1  # large random boxes in small images hit now and then
    with pytest.raises(ValueError, match="draws"):
        chance_metrics(["a"], gts[:1], shapes[:1], sizes, [0, 1], draws=0)
    del rng


def test_box_extents_of_cases():
    cases = [CaseBoxes(np.array([[0, 0, 0, 2, 3, 4.0]]), np.array([0])), CaseBoxes(np.zeros((0, 6)), np.zeros(0))]
    assert box_extents(cases).tolist() == [[2.0, 3.0, 4.0]]
    assert box_extents([]).shape == (0, 3)


def test_chance_level_command_on_a_converted_dataset(tmp_path):
    root = tmp_path / "converted" / "demo"
    write_synthetic_dataset(root, "demo", {"num_cases": 4, "shape": [48, 48, 48], "spacing": [2, 1, 1],
                                           "lesions_per_case": [1, 2]}, seed=0)
    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps([{"train": ["demo_0000", "demo_0001"], "val": ["demo_0002", "demo_0003"]}]))
    out = tmp_path / "chance" / "fold0.json"
    assert main(["chance-level", "--converted", str(root), "--splits", str(splits), "--fold", "0",
                 "--out-json", str(out), "--settings", json.dumps({"draws": 2, "seed": 3})]) == 0
    record = json.loads(out.read_text())
    assert set(REPORTED_METRICS) <= set(record) and record["draws"] == 2 and record["num_cases"] == 2
    assert record["training_boxes"] >= 2  # at least one lesion in each training case
    assert all(-1 <= record[m] <= 1 for m in REPORTED_METRICS)
