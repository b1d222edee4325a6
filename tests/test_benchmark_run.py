"""The benchmark command at CI size: its JSON schema, its table, and the parts checked against references."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pretrain_det3d.benchmark import format_table, validate_record
from pretrain_det3d.benchmark.comparisons import NnUNetArrayDatasetFactory, ResEncFeatures, build_nnunet_loader
from pretrain_det3d.benchmark.evaluation import measure_evaluation, monai_evaluation, synthetic_cases
from pretrain_det3d.benchmark.fixtures import read_plan, write_benchmark_cases
from pretrain_det3d.benchmark.run import BenchmarkSettings, settings_from_study_config
from pretrain_det3d.benchmark.timing import summarize, time_repeats
from pretrain_det3d.benchmark.training import measure_training
from pretrain_det3d.cli import main
from pretrain_det3d.data.boxes import boxes_from_instance_map
from pretrain_det3d.models.registry import build_detector
from pretrain_det3d.training.dataloader import load_case_records
from pretrain_det3d.training.trainer import DetectorTrainer, TrainingSettings

REPO = Path(__file__).resolve().parents[1]
TINY = {"patch_size": 16, "batch_size": 1, "num_cases": 2, "case_shape": 16, "warmup": 1, "repeats": 1,
        "loader_batches": 2, "loader_warmup": 1, "num_workers": 0, "eval_cases": 3, "eval_boxes": 10,
        "detector_settings": {"fpn_channels": 8}, "threads": 1}


@pytest.fixture(scope="module")
def cli_record(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "benchmark.json"
    code = main(["benchmark", "--detector", "retina_unet", "--preset", "resenc_demo", "--device", "cpu",
                 "--settings", json.dumps(TINY), "--out", str(out)])
    assert code == 0
    return json.loads(out.read_text())


def test_cli_writes_a_valid_record(cli_record, capsys):
    validate_record(cli_record)
    assert cli_record["config"]["patch_size"] == [16, 16, 16] and cli_record["config"]["batch_size"] == 1
    training, loading = cli_record["training"], cli_record["loading"]
    assert training["iterations_per_second"] == pytest.approx(1 / training["step"]["median_s"])
    assert training["achieved_flops_per_second"] == pytest.approx(
        training["flops_per_iteration"] * training["iterations_per_second"])
    assert training["peak_device_memory_bytes"] is None  # no GPU: no device counter
    assert loading["loader_to_model_ratio"] == pytest.approx(
        loading["batches_per_second"] / training["iterations_per_second"])
    assert loading["keeps_up"] == (loading["loader_to_model_ratio"] >= 1)
    assert cli_record["inference"]["tiles"] == 1  # a 16^3 case in one 16^3 patch
    comparisons = cli_record["comparisons"]
    x = comparisons["loader_vs_nnunet"]
    assert x["ratio"] == pytest.approx(x["ours"]["batches_per_second"] / x["nnunet"]["batches_per_second"])
    y = comparisons["train_step_vs_monai"]
    assert y["ratio"] == pytest.approx(y["monai_step"]["median_s"] / y["ours_step"]["median_s"])
    table = format_table(cli_record)
    assert "train iterations/s" in table and "loader rate ours / nnU-Net" in table and "step time MONAI / ours" in table


@pytest.mark.parametrize("breakage", ["version", "section", "key", "rate"])
def test_validate_record_rejects_broken_records(cli_record, breakage):
    broken = copy.deepcopy(cli_record)
    if breakage == "version":
        broken["schema_version"] = 99
    elif breakage == "section":
        del broken["loading"]
    elif breakage == "key":
        del broken["training"]["flops_per_iteration"]
    else:
        broken["training"]["iterations_per_second"] = 0.0
    with pytest.raises(ValueError, match="benchmark record"):
        validate_record(broken)


class LinearDetector(nn.Module):
    """Hand-countable FLOPs: one matrix product forward, two backward (input and weight gradients)."""

    def __init__(self, features: int, outputs: int) -> None:
        super().__init__()
        self.linear = nn.Linear(features, outputs, bias=False)

    def compute_losses(self, images, targets, seg):
        return {"loss": self.linear(images.flatten(1)).sum()}


def test_flop_count_matches_hand_count(tmp_path):
    root = tmp_path / "data"
    records = load_case_records(root, write_benchmark_cases(root, 1, (8, 8, 8), seed=0))
    batch_size, outputs, features = 3, 5, 8**3
    settings = TrainingSettings.from_settings({"iterations": 5, "warmup_iterations": 0, "batch_size": batch_size,
                                               "patch_size": 8, "device": "cpu", "grad_clip": None,
                                               "progress_bar": False})
    trainer = DetectorTrainer(LinearDetector(features, outputs), "linear", settings, records, tmp_path / "t", seed=0,
                              build_kwargs={})
    result = measure_training(trainer, trainer.make_stream(0).make_batch(0), warmup=0, repeats=2)
    # forward 2*B*F*O; backward: grad of the weight 2*B*F*O (the input needs no gradient)
    assert result["flops_per_iteration"] == 2 * (2 * batch_size * features * outputs)
    assert len(result["step"]["repeats_s"]) == 2


def test_timing_excludes_warmup_and_takes_the_median():
    calls = []
    seconds = time_repeats(lambda: calls.append(1), warmup=3, repeats=4)
    assert len(calls) == 7 and len(seconds) == 4
    assert summarize([5.0, 1.0, 3.0, 100.0])["median_s"] == 4.0
    with pytest.raises(ValueError):
        time_repeats(lambda: None, repeats=0)


def test_fixture_cases_follow_the_preprocessed_format(tmp_path):
    cases = write_benchmark_cases(tmp_path, 2, (20, 24, 28), seed=1)
    plan = read_plan(tmp_path)
    for case in cases:
        image = np.load(tmp_path / "cases" / f"{case}.npy")
        seg = np.load(tmp_path / "cases" / f"{case}_seg.npy")
        meta = json.loads((tmp_path / "cases" / f"{case}.json").read_text())
        assert image.shape == (1, 20, 24, 28) and image.dtype == np.float32 and seg.dtype == np.int16
        ids, boxes = boxes_from_instance_map(seg)
        assert ids.tolist() == list(range(1, len(ids) + 1)) == sorted(int(k) for k in meta["instances"])
        np.testing.assert_array_equal(boxes, np.asarray(meta["boxes"]))
        assert all(seg[tuple(loc)] > 0 for loc in meta["foreground_locations"])
    assert plan["num_classes"] == 1 and len(plan["box_sizes"]) > 0


def test_settings_from_the_demo_config():
    settings = settings_from_study_config(REPO / "config" / "config.yaml", "retina_unet")
    resolved = BenchmarkSettings.from_settings(settings)
    assert resolved.preset == "resenc_demo" and resolved.patch_size == (32, 32, 32) and resolved.batch_size == 2
    assert resolved.detector_settings["fpn_channels"] == 32 and resolved.training["lr"] == 0.01
    assert "fpn_channels" not in resolved.training and "lr" not in resolved.detector_settings
    with pytest.raises(KeyError, match="unknown benchmark settings"):
        BenchmarkSettings.from_settings({"patch": 32})
    with pytest.raises(KeyError, match="detectors.nope"):
        settings_from_study_config(REPO / "config" / "config.yaml", "nope")


def test_resenc_features_equal_the_retina_unet_head_features(tmp_path):
    torch.manual_seed(0)
    model = build_detector("retina_unet", {"preset": "resenc_demo", "fpn_channels": 8}, 1, 1,
                           {"box_sizes": [[4, 4, 4]]}).eval()
    images = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        reference = model(images)["head_features"]
        features = ResEncFeatures(model)(images)
    assert len(features) == len(reference)
    for ours, ref in zip(features, reference):
        torch.testing.assert_close(ours, ref, rtol=0, atol=0)


def test_nnunet_loader_reads_our_arrays(tmp_path):
    records = load_case_records(tmp_path, write_benchmark_cases(tmp_path, 2, (24, 24, 24), seed=2))
    dataset = NnUNetArrayDatasetFactory()(records)
    data, seg, _, properties = dataset.load_case(records[0].case_id)
    np.testing.assert_array_equal(seg[0], np.load(records[0].seg_path))
    locations = properties["class_locations"][1]
    assert locations.shape[1] == 4 and all(seg[tuple(loc)] > 0 for loc in locations)
    # nnU-Net's transforms modify crops in place: the maps must be writable yet leave the files untouched
    assert data.flags.writeable and seg.flags.writeable
    before = np.load(records[0].image_path).copy()
    np.random.seed(0)
    loader = build_nnunet_loader(records, (16, 16, 16), batch_size=2)
    for _ in range(4):
        batch = next(loader)
        assert tuple(batch["data"].shape) == (2, 1, 16, 16, 16) and tuple(batch["target"].shape) == (2, 1, 16, 16, 16)
    np.testing.assert_array_equal(np.load(records[0].image_path), before)


def test_evaluation_timing_runs_the_real_metric():
    result = measure_evaluation(num_cases=4, boxes_per_case=20, seed=0, repeats=1, compare=False)
    assert result["seconds"] > 0 and result["num_cases"] == 4
    assert result["monai_seconds"] is None and result["ratio"] is None


def test_evaluation_is_timed_side_by_side_with_monai():
    result = measure_evaluation(num_cases=6, boxes_per_case=30, seed=1, repeats=2)
    assert len(result["timing"]["repeats_s"]) == 2 and len(result["monai_timing"]["repeats_s"]) == 2
    assert result["ratio"] == pytest.approx(result["monai_seconds"] / result["seconds"])
    # the same boxes: MONAI's AP/mAP equal ours (they differ only by MONAI's 2e-16 epsilon in the precision)
    assert result["max_ap_difference"] < 1e-12
    ids, gts, preds = synthetic_cases(6, 30, 1)
    theirs = monai_evaluation(gts, preds, [0])
    assert 0 < theirs["AP_IoU_0.10_MaxDet_100"] < 1  # a non-trivial comparison


def test_cli_record_holds_the_evaluation_comparison(cli_record):
    evaluation = cli_record["evaluation"]
    assert evaluation["num_cases"] == 3 and evaluation["boxes_per_case"] == 10
    assert evaluation["ratio"] == pytest.approx(evaluation["monai_seconds"] / evaluation["seconds"])
    assert "evaluation time MONAI / ours" in format_table(cli_record)
