"""DAG tests: dry runs resolve the study grid from config alone, without data on disk."""

from __future__ import annotations

import re
import time

import pytest
import yaml

from conftest import REPO, SMOKE_CONFIG


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
    study = config["study"]
    return len(study["detectors"]) * len(study["initialisations"]) * len(study["datasets"]) * len(study["folds"])


@pytest.mark.parametrize("configfile", ["config/config.yaml", "config/paper.yaml", "tests/configs/smoke.yaml"])
def test_dry_run_resolves_the_grid(tmp_path, snakemake_runner, configfile):
    config = yaml.safe_load((REPO / configfile).read_text())
    started = time.perf_counter()
    result = snakemake_runner(tmp_path, "-n", configfile=REPO / configfile)
    print(f"dry run of {configfile}: {time.perf_counter() - started:.1f} s")
    counts = job_counts(result.stdout)
    grid = expected_grid(config)
    assert counts["finetune"] == counts["predict"] == counts["evaluate"] == grid
    pretrained = [i for i in config["study"]["initialisations"] if i != "scratch"]
    assert counts.get("pretrain", 0) == len(pretrained)
    assert counts["preprocess_dataset"] == len(config["study"]["datasets"])
    assert counts["aggregate"] == counts["plot_ap_by_init"] == 1


def test_paper_config_has_the_papers_training_setup():
    paper = yaml.safe_load((REPO / "config/paper.yaml").read_text())
    assert paper["backbone"] == "resenc_l"
    retina = paper["detectors"]["retina_unet"]
    assert retina["patch_size"] == [128, 128, 128] and retina["batch_size"] == 4
    assert (retina["optimizer"], retina["lr"], retina["momentum"], retina["warmup_iterations"]) == ("sgd", 0.01, 0.9, 4000)
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
