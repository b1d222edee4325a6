"""Tests for inference.postprocessing: raw passes saved and re-consolidated exactly, nnDetection's sequential
sweep on hand-built case sets, the sweep record, held-out test cases written, checked and preprocessed."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from torch import nn

from pretrain_det3d.data.dataset_format import check_converted_dataset
from pretrain_det3d.data.io import list_case_ids, read_case, write_case, write_dataset_json
from pretrain_det3d.data.preprocessing import run_preprocessing
from pretrain_det3d.data.synthetic import write_synthetic_dataset
from pretrain_det3d.evaluation.run import CaseBoxes, evaluate_cases, load_ground_truth
from pretrain_det3d.inference.consolidation import CONSOLIDATION_KEYS, consolidate_source
from pretrain_det3d.inference.postprocessing import (
    SWEEP_ORDER,
    RawCase,
    RawPredictionError,
    _SourceStep,
    consolidate_raw,
    consolidation_parameters,
    load_raw_case,
    preprocess_test_cases,
    run_consolidation,
    run_raw_prediction,
    run_sweep,
    save_raw_case,
    sweep_parameters,
)
from pretrain_det3d.inference.predict import run_prediction
from pretrain_det3d.inference.sliding_window import predict_case, predict_sources
from pretrain_det3d.models.registry import build_detector, save_detector
from pretrain_det3d.settings.study import InferenceSettings, PostprocessingSettings


class RandomBoxDetector(nn.Module):
    """Many random boxes per tile (two classes, overlapping), drawn from a seed made of the tile's content, so a
    tile always gives the same boxes: NMS, WBC, thresholds and the candidate cut all have work to do."""

    def __init__(self, salt: int) -> None:
        super().__init__()
        self.salt = salt

    def predict(self, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        out = []
        for image in images:
            seed = int(abs(float(image.double().sum())) * 1e6) % (2**31) + self.salt
            rng = np.random.default_rng(seed)
            n = 40
            lows = rng.uniform(-2, 14, size=(n, 3))
            sizes = rng.uniform(0.005, 6, size=(n, 3))
            out.append({"boxes": torch.from_numpy(np.concatenate([lows, lows + sizes], axis=1)).float(),
                        "scores": torch.from_numpy(rng.uniform(0, 1, n)).float(),
                        "labels": torch.from_numpy(rng.integers(0, 2, n))})
        return out


NON_DEFAULT = {"candidates": 25, "score_threshold": 0.2, "min_box_size": 1.0, "nms_iou": 0.3, "weighted_nms": False,
               "wbc_iou": 0.2, "wbc_score_threshold": 0.05, "max_detections": 30}


@pytest.mark.parametrize("params", [consolidation_parameters({}), {**consolidation_parameters({}), "candidates": 25},
                                    NON_DEFAULT])
def test_consolidation_of_saved_raw_passes_equals_predict_case_exactly(tmp_path, params) -> None:
    image = np.random.default_rng(3).normal(size=(1, 20, 18, 16)).astype(np.float32)
    models = [RandomBoxDetector(1), RandomBoxDetector(2)]
    direct = predict_case(models, image, [12, 12, 12], 0.5, (0, 2), **params)
    assert len(direct["boxes"]) > 3  # the case has something to consolidate
    sources = predict_sources(models, image, [12, 12, 12], 0.5, (0, 2), candidates=params["candidates"])
    assert len(sources) == 2 * 4 and all(len(s[1]) <= params["candidates"] for s in sources)
    path = tmp_path / "case.npz"
    save_raw_case(path, RawCase("case", sources, (20, 18, 16), {"shape": [20, 18, 16]}, params["candidates"]))
    again = consolidate_raw(load_raw_case(path), params)
    for key in ("boxes", "scores", "labels"):
        assert again[key].dtype == direct[key].dtype
        np.testing.assert_array_equal(again[key], direct[key])


def test_the_sweeps_cached_source_step_equals_consolidate_source_exactly() -> None:
    rng = np.random.default_rng(7)
    n = 300
    lows = rng.uniform(-4, 40, size=(n, 3))
    boxes = np.concatenate([lows, lows + rng.uniform(0.001, 9, size=(n, 3))], axis=1)
    scores = np.round(rng.uniform(0, 1, n), 2)  # ties in the scores, so the stable orders matter
    labels, weights = rng.integers(0, 3, n), rng.uniform(0.5, 1, n)
    shape = (40, 36, 32)
    for candidates in (1000, 120):
        step = _SourceStep((boxes, scores, labels, weights), shape, candidates)
        for score_threshold, min_size, nms_iou, weighted in itertools.product((0.0, 0.3), (0.01, 3.0),
                                                                              (1e-5, 0.1, 0.5), (False, True)):
            expected = consolidate_source(boxes, scores, labels, weights, shape, candidates=candidates,
                                          score_threshold=score_threshold, min_size=min_size, nms_iou=nms_iou,
                                          weighted_nms=weighted)
            got = step(score_threshold, min_size, nms_iou, weighted)
            assert len(expected[0]) > 0
            for a, b in zip(got, expected):
                assert a.dtype == b.dtype
                np.testing.assert_array_equal(a, b)


def test_raw_passes_refuse_more_candidates_than_kept_and_damaged_files(tmp_path) -> None:
    raw = RawCase("c", [(np.zeros((0, 6)), np.zeros(0), np.zeros(0, int), np.zeros(0))], (8, 8, 8), {}, 10)
    save_raw_case(tmp_path / "c.npz", raw)
    with pytest.raises(RawPredictionError, match="kept 10"):
        consolidate_raw(load_raw_case(tmp_path / "c.npz"), {**consolidation_parameters({}), "candidates": 11})
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(RawPredictionError, match="bad.npz"):
        load_raw_case(tmp_path / "bad.npz")


def test_workflow_files_equal_run_prediction_exactly(tmp_path) -> None:
    torch.manual_seed(0)
    model = build_detector(
        "retina_unet", {"preset": "resenc_demo", "fpn_channels": 8, "head_convs": 1, "score_threshold": 0.0}, 1, 1,
        {"box_sizes": [[4, 4, 4]]},
    )
    save_detector(tmp_path / "m.pth", model, "retina_unet", model.build_kwargs, {})
    cases = tmp_path / "pre" / "cases"
    cases.mkdir(parents=True)
    np.save(cases / "c0.npy", np.random.default_rng(1).normal(size=(1, 16, 16, 16)).astype(np.float32))
    meta = {"case_id": "c0", "shape": [16, 16, 16], "original_shape": [12, 32, 16], "spacing": [1.0] * 3,
            "original_spacing": [2.0, 0.5, 1.0], "origin": [-5.0, 3.0, 7.0], "direction": [1, 0, 0, 0, 1, 0, 0, 0, 1]}
    (cases / "c0.json").write_text(json.dumps(meta))
    settings = {"patch_size": [16, 16, 16], "mirror": True, "nms_iou": 0.3, "max_detections": 6}
    run_prediction(tmp_path / "m.pth", tmp_path / "pre", ["c0"], tmp_path / "direct", settings)
    run_raw_prediction([tmp_path / "m.pth"], cases, ["c0"], tmp_path / "raw", settings)
    run_consolidation(tmp_path / "raw", tmp_path / "consolidated", settings)
    direct = json.loads((tmp_path / "direct" / "c0.json").read_text())
    assert direct["boxes"]
    assert json.loads((tmp_path / "consolidated" / "c0.json").read_text()) == direct


# ---- the sweep on hand-built case sets ------------------------------------------------------------------
A = [10.0, 10, 10, 20, 20, 20]
A_SHIFTED = [14.0, 10, 10, 24, 20, 20]  # IoU with A: 600 / 1400 = 0.43, between the two NMS thresholds
FAR = [30.0, 30, 30, 38, 38, 38]
META = {"shape": [48, 48, 48], "original_shape": [48, 48, 48],  # the identity map to converted voxels
        "original_spacing": [1.0, 1.0, 1.0], "origin": [0.0, 0.0, 0.0], "direction": [1, 0, 0, 0, 1, 0, 0, 0, 1]}


def _case(boxes, scores) -> RawCase:
    source = (np.asarray(boxes, float), np.asarray(scores, float), np.zeros(len(scores), np.int64),
              np.ones(len(scores)))
    return RawCase("c", [source], (48, 48, 48), dict(META), 1000)


def _gt(boxes) -> CaseBoxes:
    return CaseBoxes(np.asarray(boxes, float), np.zeros(len(boxes), np.int64))


def _ap(case: RawCase, gt: CaseBoxes, **params) -> float:
    result = consolidate_raw(case, {**consolidation_parameters({}), **params})
    metrics, _ = evaluate_cases(["c"], [gt], [CaseBoxes(result["boxes"], result["labels"], result["scores"])], [0])
    return metrics["AP_IoU_0.10_MaxDet_100"]


@pytest.mark.parametrize("start", [0.1, 0.5])
def test_sweep_picks_the_nms_iou_that_removes_a_duplicate(start) -> None:
    # two objects; a duplicate of the first (IoU 0.43) outscores the second object's box: NMS at 0.1 removes it
    case, gt = _case([A, A_SHIFTED, FAR], [0.9, 0.8, 0.7]), _gt([A, FAR])
    assert _ap(case, gt, nms_iou=0.1) == 1.0 and _ap(case, gt, nms_iou=0.5) < 0.9  # the hand-known answer
    start_params = {**consolidation_parameters({}), "nms_iou": start}
    chosen, table = sweep_parameters([case], [gt], [0], start_params, {"nms_iou": [0.5, 0.1]},
                                     "AP_IoU_0.10_MaxDet_100")
    assert chosen == {**start_params, "nms_iou": 0.1}
    assert [(row["value"], row["chosen"]) for row in table] == [(0.5, False), (0.1, True)]
    assert table[1]["AP_IoU_0.10_MaxDet_100"] == 1.0


def test_sweep_picks_the_nms_iou_that_keeps_two_touching_objects() -> None:
    # the same boxes are two real, overlapping objects now: NMS at 0.1 drops one of them
    case, gt = _case([A, A_SHIFTED], [0.9, 0.8]), _gt([A, A_SHIFTED])
    assert _ap(case, gt, nms_iou=0.5) == 1.0 and _ap(case, gt, nms_iou=0.1) < 0.6
    # the same grid as above: here the first value wins, there the last, each by its score
    chosen, _ = sweep_parameters([case], [gt], [0], consolidation_parameters({}), {"nms_iou": [0.5, 0.1]},
                                 "AP_IoU_0.10_MaxDet_100")
    assert chosen["nms_iou"] == 0.5


def test_sweep_goes_one_parameter_after_the_other_and_ties_keep_the_first_value() -> None:
    case, gt = _case([A, A_SHIFTED, FAR], [0.9, 0.8, 0.7]), _gt([A, FAR])
    grid = PostprocessingSettings().model_dump()
    chosen, table = sweep_parameters([case], [gt], [0], consolidation_parameters({}),
                                     {k: grid[k] for k in SWEEP_ORDER}, "AP_IoU_0.10_MaxDet_100")
    assert [row["parameter"] for row in table] == [k for k in SWEEP_ORDER for _ in grid[k]]
    # every NMS IoU up to 0.4 removes the duplicate (AP 1); the first of the tied values wins
    assert chosen["nms_iou"] == 1e-5 and chosen["weighted_nms"] is False
    # a score threshold of 0.7 or more would drop the second object: all tried values (<= 0.6) tie, first wins
    assert chosen["score_threshold"] == 0.0 and chosen["min_box_size"] == 0.01
    # each row was tried with the values chosen before it
    rows = {(row["parameter"], row["value"]): row for row in table}
    assert rows[("wbc_iou", 0.3)]["parameters"]["nms_iou"] == 1e-5


def test_sweep_record_without_other_folds_uses_the_configured_parameters(tmp_path) -> None:
    record = run_sweep([], tmp_path, tmp_path / "fold0.json", {"patch_size": [8, 8, 8], "nms_iou": 0.2}, {},
                       evaluated="fold 0")
    written = json.loads((tmp_path / "fold0.json").read_text())
    assert written == json.loads(json.dumps(record))
    assert written["source"] == "configured" and "no other fold" in written["reason"]
    assert written["parameters"] == {**consolidation_parameters({}), "nms_iou": 0.2}
    assert set(written["parameters"]) == set(CONSOLIDATION_KEYS)
    assert consolidation_parameters({})["nms_iou"] == InferenceSettings.default("nms_iou")


def test_run_sweep_on_raw_folders_against_converted_ground_truth(tmp_path) -> None:
    converted = tmp_path / "converted"
    instance_map = np.zeros((48, 48, 48), np.int16)
    instance_map[11:20, 11:20, 11:20] = 1  # box [10, 20] per axis in the [first - 1, last + 1] convention
    instance_map[31:37, 31:37, 31:37] = 2
    write_case(converted, "c", np.zeros((1, 48, 48, 48), np.int16), instance_map, {1: 0, 2: 0}, spacing=(1, 1, 1))
    write_dataset_json(converted, "d", ["CT"], ["lesion"], "CC0", "test", 1)
    gt = load_ground_truth(converted, "c")
    np.testing.assert_array_equal(gt.boxes, [A, [30, 30, 30, 37, 37, 37]])
    save_raw_case(tmp_path / "fold1" / "c.npz", _case([A, A_SHIFTED, [30, 30, 30, 37, 37, 37]], [0.9, 0.8, 0.7]))
    record = run_sweep([tmp_path / "fold1"], converted, tmp_path / "fold0.json", {"patch_size": [8, 8, 8]},
                       {"target_metric": "AP_IoU_0.10_MaxDet_100", "nms_iou": [0.5, 0.1]}, folds=[1],
                       evaluated="fold 0")
    assert record["source"] == "sweep" and record["sweep_folds"] == [1] and record["num_cases"] == 1
    assert record["parameters"]["nms_iou"] == 0.1 and record["target_final"] == 1.0
    # the consolidation of the workflow reads the chosen parameters from the record
    params = run_consolidation(tmp_path / "fold1", tmp_path / "out", {"patch_size": [8, 8, 8]}, tmp_path / "fold0.json")
    assert params == record["parameters"]
    assert len(json.loads((tmp_path / "out" / "c.json").read_text())["boxes"]) == 2


# ---- held-out test cases --------------------------------------------------------------------------------
SYNTH = {"num_cases": 2, "shape": [16, 16, 16], "spacing": [2.0, 1.0, 1.0], "lesions_per_case": [1, 2],
         "lesion_diameter": [3, 5]}


def test_synthetic_test_cases_are_held_out_and_change_no_training_case(tmp_path) -> None:
    write_synthetic_dataset(tmp_path / "plain", "d", SYNTH, seed=4)
    write_synthetic_dataset(tmp_path / "with_test", "d", {**SYNTH, "num_test_cases": 2}, seed=4)
    assert not (tmp_path / "plain" / "imagesTs").exists()
    assert list_case_ids(tmp_path / "with_test", test=True) == ["d_test_0000", "d_test_0001"]
    for case in ("d_0000", "d_0001"):
        a, b = read_case(tmp_path / "plain", case), read_case(tmp_path / "with_test", case)
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.instance_map, b.instance_map)
    test_case = read_case(tmp_path / "with_test", "d_test_0000", test=True)
    assert not any(np.array_equal(test_case.image, read_case(tmp_path / "plain", c).image) for c in ("d_0000", "d_0001"))
    summary = check_converted_dataset(tmp_path / "with_test")
    assert summary.case_ids == ["d_0000", "d_0001"] and summary.test_case_ids == ["d_test_0000", "d_test_0001"]
    assert json.loads((tmp_path / "with_test" / "dataset.json").read_text())["num_test_cases"] == 2


def test_test_cases_are_preprocessed_exactly_as_training_cases(tmp_path) -> None:
    root = tmp_path / "converted"
    rng = np.random.default_rng(0)
    images = [rng.integers(-1000, 400, size=(1, 12, 14, 10)).astype(np.int16) for _ in range(3)]
    seg = np.zeros((12, 14, 10), np.int16)
    seg[3:6, 4:8, 2:5] = 1
    for index, image in enumerate(images[:2]):
        write_case(root, f"a{index}", image, seg, {1: 0}, spacing=(2.0 + index, 1.0, 1.5))
    # a test case holding the very image of training case a1: it must come out identical
    write_case(root, "t0", images[1], seg, {1: 0}, spacing=(3.0, 1.0, 1.5), test=True)
    write_dataset_json(root, "d", ["CT"], ["lesion"], "CC0", "test", 2)
    run_preprocessing(root, tmp_path / "pre", 2, 0, {})
    assert preprocess_test_cases(root, tmp_path / "pre" / "plan.json", tmp_path / "test_cases") == ["t0"]
    np.testing.assert_array_equal(np.load(tmp_path / "test_cases" / "t0.npy"), np.load(tmp_path / "pre" / "cases" / "a1.npy"))
    test_meta = json.loads((tmp_path / "test_cases" / "t0.json").read_text())
    train_meta = json.loads((tmp_path / "pre" / "cases" / "a1.json").read_text())
    for key in ("shape", "original_shape", "original_spacing", "spacing", "origin", "direction"):
        assert test_meta[key] == train_meta[key], key
    plan = json.loads((tmp_path / "pre" / "plan.json").read_text())
    assert "t0" not in plan["case_ids"] and "t0" not in json.dumps(json.loads((tmp_path / "pre" / "splits.json").read_text()))
    assert load_ground_truth(root, "t0", test=True).boxes.tolist() == [[2.0, 3.0, 1.0, 6.0, 8.0, 5.0]]
