"""DAG tests: dry runs resolve the study grid from config alone, without data on disk."""

from __future__ import annotations

import re
import time

import pytest
import yaml

from conftest import REPO, SMOKE_CONFIG
from pretrain_det3d import catalog


def job_counts(stdout: str) -> dict[str, int]:
    """Parse the 'Job stats' table that a Snakemake dry run prints."""
    table = stdout.split("Job stats:", 1)[1]
    counts = {}
    for line in table.splitlines()[3:]:
        match = re.match(r"^(\w+)\s+(\d+)$", line.strip())
        if not match:
            break
        counts[match.group(1)] = int(match.group(2))
    return counts


def expected_grid(config: dict) -> int:
    """Runs of the study: each detector with its own ``initialisations`` (else the study's) x datasets x folds."""
    study = config["study"]
    runs = sum(len(config["detectors"][arch].get("initialisations") or study["initialisations"])
               for arch in study["detectors"])
    return runs * len(study["datasets"]) * len(study["folds"])


@pytest.mark.parametrize("configfile", ["config/config.yaml", "config/paper.yaml", "tests/configs/smoke.yaml"])
def test_dry_run_resolves_the_grid(tmp_path, snakemake_runner, configfile):
    config = yaml.safe_load((REPO / configfile).read_text())
    started = time.perf_counter()
    result = snakemake_runner(tmp_path, "-n", configfile=REPO / configfile)
    print(f"dry run of {configfile}: {time.perf_counter() - started:.1f} s")
    counts = job_counts(result.stdout)
    grid = expected_grid(config)
    assert counts["finetune"] == counts["predict"] == counts["evaluate"] == grid
    published = set(config["pretraining"].get("published") or {})
    used = {i for arch in config["study"]["detectors"]
            for i in config["detectors"][arch].get("initialisations") or config["study"]["initialisations"]}
    pretrained = [i for i in used if i != "scratch" and i not in published]
    fetched = [i for i in used if i in published]
    assert counts.get("pretrain", 0) == len(pretrained)
    assert counts.get("fetch_published_checkpoint", 0) == len(fetched)
    labelled_pretraining = {d["dataset"] for m in config["pretraining"]["methods"].values() for d in m.get("datasets", [])}
    assert counts["preprocess_dataset"] == len(set(config["study"]["datasets"]) | labelled_pretraining)
    assert counts["aggregate"] == 1
    assert all(counts[f"figure_{name}"] == 1 for name in catalog.REPORT_FIGURES)
    assert all(counts[f"table_{name}"] == 1 for name in catalog.REPORT_TABLES)


def test_paper_config_has_the_papers_training_setup():
    paper = yaml.safe_load((REPO / "config/paper.yaml").read_text())
    assert paper["backbone"] == "resenc_l"
    retina = paper["detectors"]["retina_unet"]
    assert retina["patch_size"] == [128, 128, 128] and retina["batch_size"] == 4
    assert (retina["optimizer"], retina["lr"], retina["momentum"], retina["warmup_iterations"]) == ("sgd", 0.01, 0.9, 4000)
    assert retina["iterations"] == 50 * 2500  # nnDetection's sgd_base: 50 epochs of 2500 batches
    detr = paper["detectors"]["deformable_detr"]
    assert (detr["optimizer"], detr["lr"], detr["weight_decay"]) == ("adamw", 3e-4, 1e-4)
    assert detr["iterations"] == 100 * 2500  # adamw_100ep_high_lr_wd: 100 epochs of 2500 batches
    assert paper["study"]["num_folds"] == 5 and len(paper["study"]["datasets"]) == 8


@pytest.mark.parametrize(
    "section, key, value, config_key",
    [
        ("study", "datasets", ["missing"], "study.datasets[0]"),
        ("study", "detectors", ["yolo3d"], "study.detectors[0]"),
        ("study", "initialisations", ["scratch", "simclr"], "study.initialisations[1]"),
        (None, "backbone", "resnet_fifty", "backbone"),
    ],
)
def test_bad_config_fails_before_any_job(tmp_path, snakemake_runner, section, key, value, config_key):
    config = yaml.safe_load(SMOKE_CONFIG.read_text())
    (config[section] if section else config)[key] = value
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))
    result = snakemake_runner(tmp_path, "-n", configfile=bad, check=False)
    assert result.returncode != 0
    output = result.stderr + result.stdout
    assert f"'{config_key}'" in output and "invalid configuration" in output
    assert not (tmp_path / "results").exists()


def test_scratch_needs_no_pretraining(tmp_path, snakemake_runner):
    result = snakemake_runner(tmp_path, "-n", "results/metrics/retina_unet/scratch/smoke_lesions/fold0.json")
    counts = job_counts(result.stdout)
    assert "pretrain" not in counts and "synthesize_corpus" not in counts
    assert counts["finetune"] == 1


def test_target_path_schedules_only_its_chain(tmp_path, snakemake_runner):
    result = snakemake_runner(tmp_path, "-n", "results/metrics/retina_unet/mae/smoke_lesions/fold1.json")
    counts = job_counts(result.stdout)
    # fold 1's post-processing is swept on the run's other fold (0): its model and raw predictions join the chain
    assert counts["finetune"] == counts["predict"] == 2
    assert counts["evaluate"] == counts["sweep"] == counts["consolidate"] == counts["pretrain"] == 1
    assert "aggregate" not in counts and not any(rule.startswith(("figure_", "table_")) for rule in counts)
    assert "results/finetune/retina_unet/mae/smoke_lesions/fold1/model_final.pth" in result.stdout
    assert "results/metrics/retina_unet/mae/smoke_lesions/fold0.json" not in result.stdout
    assert "results/predictions/retina_unet/mae/smoke_lesions/fold0" not in result.stdout


def test_config_subset_schedules_only_the_subset(tmp_path, snakemake_runner):
    subset = "study={datasets: [smoke_lesions], detectors: [retina_unet], initialisations: [scratch], folds: [1], num_folds: 2}"
    result = snakemake_runner(tmp_path, "-n", "--config", subset)
    counts = job_counts(result.stdout)
    assert counts["finetune"] == 1 and "pretrain" not in counts
    assert "results/finetune/retina_unet/scratch/smoke_lesions/fold1/model_final.pth" in result.stdout


def test_published_checkpoint_replaces_pretraining(tmp_path, snakemake_runner):
    config = yaml.safe_load(SMOKE_CONFIG.read_text())
    config["pretraining"]["published"] = {"authors_mae": {"url": "http://127.0.0.1:9/checkpoint_final.pth", "sha256": None}}
    config["study"]["initialisations"] = ["scratch", "authors_mae"]
    path = tmp_path / "published.yaml"
    path.write_text(yaml.safe_dump(config))
    result = snakemake_runner(tmp_path, "-n", configfile=path)
    counts = job_counts(result.stdout)
    assert counts["fetch_published_checkpoint"] == 1 and "pretrain" not in counts
    assert counts["finetune"] == 2 * len(config["study"]["folds"]) * len(config["study"]["detectors"])
    assert "results/pretrain/authors_mae/checkpoint_final.pth" in result.stdout


def test_workflow_passes_snakemakes_linter(tmp_path, snakemake_runner):
    # The catalog's standard: rules without path composition or shell logic the linter flags.
    result = snakemake_runner(tmp_path, "--lint", configfile=REPO / "config/config.yaml", check=False)
    assert "Congratulations, your workflow is in a good condition!" in result.stdout + result.stderr, (
        result.stdout[-4000:] + result.stderr[-4000:])


def test_demo_full_overlay_adds_all_folds_and_the_native_detector(tmp_path, snakemake_runner):
    base = yaml.safe_load((REPO / "config/config.yaml").read_text())
    overlay = yaml.safe_load((REPO / "config/demo_full.yaml").read_text())
    result = snakemake_runner(tmp_path, "-n", "--configfile", str(REPO / "config/config.yaml"),
                              str(REPO / "config/demo_full.yaml"), configfile=None)
    counts = job_counts(result.stdout)
    folds = len(overlay["study"]["folds"])
    # Retina U-Net and Deformable DETR with all six initialisations, the native one from scratch only, every fold
    assert overlay["detectors"]["deformable_detr"]["initialisations"] == base["study"]["initialisations"]
    expected = (len(base["study"]["initialisations"]) * 2 + 1) * folds
    assert counts["finetune"] == counts["evaluate"] == counts["learning_curve"] == expected
    assert counts["chance_level"] == folds
    assert "retina_unet_native" in overlay["study"]["detectors"] and folds == 3
    # the default demo: one fold, Retina U-Net from six initialisations, Deformable DETR from scratch
    default = job_counts(snakemake_runner(tmp_path, "-n", configfile=REPO / "config/config.yaml").stdout)
    assert default["finetune"] == expected_grid(base) == 7 and default["chance_level"] == 1
