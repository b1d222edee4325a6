"""The smoke study through a real SLURM cluster with Snakemake's SLURM executor.

Needs a running SLURM (``tests/slurm/start_local_slurm.sh`` installs and starts a one-node cluster as root;
``.ci/run`` does that before the tests).
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from conftest import REPO, run_snakemake

pytestmark = [pytest.mark.slow, pytest.mark.slurm]


def slurm_is_up() -> bool:
    if shutil.which("sinfo") is None:
        return False
    result = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    return result.returncode == 0 and any(s in result.stdout for s in ("idle", "mixed", "allocated"))


@pytest.fixture(scope="module")
def slurm_cluster():
    if not slurm_is_up():
        raise RuntimeError(
            "no SLURM cluster is running: start one with `sudo tests/slurm/start_local_slurm.sh`, "
            "or deselect these tests with -m 'not slurm'"
        )


def test_smoke_study_runs_through_slurm(tmp_path, slurm_cluster):
    result = run_snakemake(
        tmp_path,
        "--profile", str(REPO / "profiles" / "slurm"),
        # the test cluster: one CPU partition, no GPUs, no accounting database
        "--default-resources", "slurm_partition=debug",
        "--set-resources", "pretrain:gpu=0", "finetune:gpu=0", "predict:gpu=0",
        "--slurm-no-account",
        "--slurm-status-command", "squeue",
        "--slurm-init-seconds-before-status-checks", "1",
        "--latency-wait", "5",
        "--slurm-logdir", str(tmp_path / "slurm_logs"),
        "--slurm-keep-successful-logs",
        "--jobs", "4",
        # two initialisations are enough to show the chain runs through SLURM; both detectors go through it
        "--config", "study={datasets: [smoke_lesions], detectors: [retina_unet, deformable_detr], "
        "initialisations: [scratch, mae], "
        "folds: [0], num_folds: 2}",
        timeout=1500,
    )
    output = result.stdout + result.stderr
    job_ids = set(re.findall(r"SLURM jobid (\d+)", output)) | set(re.findall(r"Job \d+ has been submitted with SLURM jobid (\d+)", output))
    assert job_ids, f"no SLURM job ids in the Snakemake log:\n{output[-3000:]}"
    assert (tmp_path / "results/tables/main_results.csv").stat().st_size > 0
    for detector in ("retina_unet", "deformable_detr"):
        assert (tmp_path / f"results/metrics/{detector}/mae/smoke_lesions/fold0.json").stat().st_size > 0
    assert (tmp_path / "results/figures/ap_by_init.png").stat().st_size > 0
    slurm_logs = list((tmp_path / "slurm_logs").rglob("*.log"))
    assert slurm_logs, "the SLURM executor wrote no job logs"
    # the heavy rules ran as SLURM jobs (the plugin files logs per rule, named by job id); light ones stayed local
    logged_rules = {path.relative_to(tmp_path / "slurm_logs").parts[0].removeprefix("rule_") for path in slurm_logs}
    assert {"pretrain", "finetune", "predict", "evaluate"} <= logged_rules, logged_rules
    assert not {"aggregate", "plot_ap_by_init", "check_dataset"} & logged_rules
    assert {path.stem for path in slurm_logs} <= job_ids
