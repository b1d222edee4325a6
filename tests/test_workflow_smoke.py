"""End to end: the smoke study runs through every rule of the DAG and writes every final output."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
import yaml

from conftest import SMOKE_CONFIG

pytestmark = pytest.mark.slow

MAIN_METRIC = "AP_IoU_0.10_MaxDet_100"


# `smoke_run` and `smoke_report` (conftest.py): one run of the smoke study per test session, shared with the
# browser test of the report


def test_every_final_output_exists(smoke_run):
    from pretrain_det3d import catalog

    paths = ["tables/main_results.csv", "tables/main_results.md", "tables/runs.csv"]
    paths += [f"figures/{name}.{ext}" for name in catalog.REPORT_FIGURES for ext in ("png", "pdf")]
    paths += [f"tables/{name}.{fmt}" for name, formats in catalog.REPORT_TABLES.items() for fmt in formats]
    for path in paths:
        assert (smoke_run / "results" / path).stat().st_size > 0, path


def test_html_report(smoke_report):
    html = smoke_report.read_text(errors="replace")
    for name in ("change_vs_scratch", "froc", "main_results_ranked"):
        assert name in html


def test_metrics_and_predictions_per_run(smoke_run):
    config = yaml.safe_load(SMOKE_CONFIG.read_text())
    study = config["study"]
    dataset = study["datasets"][0]
    splits = json.loads((smoke_run / "results/data/preprocessed" / dataset / "splits.json").read_text())
    assert len(splits) == study["num_folds"]
    for init in study["initialisations"]:
        for fold in study["folds"]:
            metrics = json.loads((smoke_run / f"results/metrics/retina_unet/{init}/{dataset}/fold{fold}.json").read_text())
            assert 0.0 <= metrics[MAIN_METRIC] <= 1.0
            assert "mAP_IoU_0.10_0.50_0.05_MaxDet_100" in metrics and "FROC_score_IoU_0.10" in metrics
            predictions = smoke_run / f"results/predictions/retina_unet/{init}/{dataset}/fold{fold}"
            assert sorted(p.stem for p in predictions.glob("*.json")) == sorted(splits[fold]["val"])
            record = json.loads(next(predictions.glob("*.json")).read_text())
            assert set(record) >= {"boxes", "scores", "labels"}
            assert len(record["boxes"]) <= config["inference"]["max_detections"]
            log = pd.read_csv(smoke_run / f"results/finetune/retina_unet/{init}/{dataset}/fold{fold}/log.csv")
            assert len(log) == config["detectors"]["retina_unet"]["iterations"]


def test_table_has_one_row_per_run_group(smoke_run):
    table = pd.read_csv(smoke_run / "results/tables/main_results.csv")
    study = yaml.safe_load(SMOKE_CONFIG.read_text())["study"]
    assert len(table) == len(study["initialisations"]) * len(study["detectors"]) * len(study["datasets"])
    runs = pd.read_csv(smoke_run / "results/tables/runs.csv")
    main = runs[runs["metric"] == MAIN_METRIC]
    for (detector, init), group in main.groupby(["detector", "initialisation"]):
        row = table[(table["detector"] == detector) & (table["initialisation"] == init)].iloc[0]
        assert abs(row[f"{MAIN_METRIC}_mean"] - group["value"].mean()) < 1e-9


@pytest.mark.parametrize("method", ["mae", "spark3d", "models_genesis", "voco", "multitalent"])
def test_pretraining_checkpoint_is_nnssl_schema(smoke_run, method):
    checkpoint = torch.load(smoke_run / f"results/pretrain/{method}/checkpoint_final.pth", weights_only=True)
    plan = checkpoint["nnssl_adaptation_plan"]
    assert plan["key_to_encoder"] == "encoder.stages"
    # multitalent keeps one stem per dataset (the release's layout): the plan names the default one
    stem = "encoder.stem.smoke_organs_a" if method == "multitalent" else "encoder.stem"
    assert plan["key_to_stem"] == stem
    assert any(k.startswith(stem + ".") for k in checkpoint["network_weights"])
    assert any(k.startswith("encoder.stages.") for k in checkpoint["network_weights"])
    model = torch.load(smoke_run / f"results/finetune/retina_unet/{method}/smoke_lesions/fold0/model_final.pth",
                       weights_only=True)
    assert model["transfer_report"]["loaded"] > 0


def test_second_run_has_nothing_to_do(smoke_run):
    from conftest import run_snakemake

    result = run_snakemake(smoke_run, "-n")
    assert "Nothing to be done" in result.stdout + result.stderr


def test_replotting_a_figure_touches_no_training(smoke_run):
    from conftest import run_snakemake

    result = run_snakemake(smoke_run, "-n", "--forcerun", "figure_froc", "results/figures/froc.pdf")
    output = result.stdout
    assert "rule figure_froc:" in output and "results/figures/froc.pdf" in output
    for rule in ("finetune", "pretrain", "predict", "evaluate", "preprocess_dataset"):
        assert f"rule {rule}:" not in output, rule


def test_changed_method_parameter_reruns_only_its_descendants(smoke_run, tmp_path):
    from conftest import run_snakemake

    config = yaml.safe_load(SMOKE_CONFIG.read_text())
    config["pretraining"]["methods"]["mae"]["mask_ratio"] = 0.6
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(config))
    result = run_snakemake(smoke_run, "-n", configfile=changed)
    output = result.stdout
    assert "rule pretrain:" in output
    assert "results/finetune/retina_unet/mae/" in output
    assert "results/finetune/retina_unet/scratch/" not in output
    assert "rule preprocess_dataset:" not in output and "rule synthesize_corpus:" not in output
