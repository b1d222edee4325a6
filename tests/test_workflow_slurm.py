"""The smoke study through a real SLURM cluster with Snakemake's SLURM executor, with the real profiles.

Needs a running SLURM (``tests/slurm/start_local_slurm.sh`` installs and starts a one-node cluster as root;
``.ci/run`` and ``make test`` do that through tests/system/ensure_test_system.sh). The runs use profiles/slurm with
profiles/slurm-cpu on top (the node has no GPUs) and tests/slurm/site-profile (executor options of the test site
only), so every resource setting of profiles/slurm, the time-limit signal included, is what gets submitted.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import yaml

import pytest

from conftest import REPO, SNAKEFILE, run_snakemake

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
            "no SLURM cluster is running: start one with `sudo bash tests/slurm/start_local_slurm.sh`, "
            "or deselect these tests with -m 'not slurm'"
        )


PROFILES = ("--profile", str(REPO / "profiles" / "slurm"), "--profile", str(REPO / "profiles" / "slurm-cpu"),
            "--profile", str(REPO / "tests" / "slurm" / "site-profile"))


def run_pinned_to_one_cpu(workdir, *args):
    """Snakemake as run_snakemake runs it, but pinned to one CPU (jobs run by slurmd are not pinned)."""
    command = ["taskset", "-c", str(min(os.sched_getaffinity(0))), sys.executable, "-m", "snakemake",
               "-s", str(SNAKEFILE), "--directory", str(workdir), *args]
    env = dict(os.environ, PATH=os.pathsep.join([str(REPO / ".venv" / "bin"), str(os.path.dirname(sys.executable)),
                                                 os.environ.get("PATH", "")]))
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1500)
    assert result.returncode == 0, f"snakemake failed:\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
    return result


def test_smoke_study_runs_through_slurm(tmp_path, slurm_cluster):
    overlay = tmp_path / "threads.yaml"
    # fine-tuning asks for 2 threads; the submitting Snakemake is pinned to one CPU (a small login node). The training
    # jobs get a time limit above the profile's warning offset (600 s): a shorter one gets the warning at once.
    overlay.write_text("resources:\n  finetune: {threads: 2, mem_mb: 1000, runtime: 30}\n"
                       "  pretrain: {threads: 1, mem_mb: 1000, runtime: 30}\n")
    result = run_pinned_to_one_cpu(
        tmp_path,
        *PROFILES,
        "--slurm-logdir", str(tmp_path / "slurm_logs"),
        "--slurm-keep-successful-logs",
        # two initialisations are enough to show the chain runs through SLURM; both detectors go through it
        "--config", "study={datasets: [smoke_lesions], detectors: [retina_unet, deformable_detr], "
        "initialisations: [scratch, mae], "
        "folds: [0], num_folds: 2}",
        "--configfile", str(REPO / "tests" / "configs" / "smoke.yaml"), str(overlay),
    )
    output = result.stdout + result.stderr
    job_ids = set(re.findall(r"submitted with SLURM jobid (\d+)", output))
    assert job_ids, f"no SLURM job ids in the Snakemake log:\n{output[-3000:]}"
    assert (tmp_path / "results/tables/main_results.csv").stat().st_size > 0
    for detector in ("retina_unet", "deformable_detr"):
        assert (tmp_path / f"results/metrics/{detector}/mae/smoke_lesions/fold0.json").stat().st_size > 0
    assert (tmp_path / "results/figures/ap_by_init.png").stat().st_size > 0
    slurm_logs = list((tmp_path / "slurm_logs").rglob("*.log"))
    assert slurm_logs, "the SLURM executor wrote no job logs"
    # the heavy rules ran as SLURM jobs (the plugin files logs per rule, named by job id); the localrules ran here
    logged_rules = {path.relative_to(tmp_path / "slurm_logs").parts[0].removeprefix("rule_") for path in slurm_logs}
    assert {"pretrain", "finetune", "predict", "evaluate"} <= logged_rules, logged_rules
    assert (tmp_path / "results/logs/aggregate.log").exists() and list((tmp_path / "results/logs/check_dataset").glob("*.log"))
    assert not {"aggregate", "check_dataset", "all"} & logged_rules, logged_rules
    assert {path.stem for path in slurm_logs} <= job_ids
    # the threads of the config, not the submitting host's one CPU: the job step ran the package with --threads 2
    finetune_logs = list((tmp_path / "slurm_logs" / "rule_finetune").rglob("*.log"))
    assert len(finetune_logs) == 4
    for path in finetune_logs:
        assert re.search(r"attempt_log finetune \S+ python -m pretrain_det3d finetune .* --threads 2\b", path.read_text()), path


def proctrack_type() -> str:
    result = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, check=False)
    found = re.search(r"^ProctrackType\s*=\s*(\S+)", result.stdout, re.MULTILINE)
    return found.group(1) if found else "unknown"


def test_trainer_saves_on_the_time_limit_warning(tmp_path, slurm_cluster, monkeypatch):
    """Pre-training that cannot finish in SLURM's shortest time limit: each attempt stops before the limit, saves
    checkpoint_latest.pth and exits; the retry resumes from it.

    Two things stop the trainer, whichever comes first: the profile's warning signal (reaches the trainer with
    proctrack/linuxproc, not with proctrack/cgroup) and the trainer's own deadline, the job's end time read from
    squeue less PRETRAIN_DET3D_STOP_BEFORE_END_S (works with either). The profile's warning offset (600 s) would
    make a short test job get the warning at once, before the trainer has started, so this run uses
    profiles/slurm-cpu with only that offset shortened to 60 s (read from the file and written to a scratch
    profile: signal, delivery and every other setting stay as in the profile), the trainer's margin set to the same
    60 s, and a 3-minute limit (tests/slurm/time_limit.yaml says why these numbers).
    """
    monkeypatch.setenv("PRETRAIN_DET3D_STOP_BEFORE_END_S", "60")  # reaches the jobs: sbatch exports the environment
    tracking = proctrack_type()
    cpu_profile = yaml.safe_load((REPO / "profiles" / "slurm-cpu" / "config.yaml").read_text())
    signal = cpu_profile["set-resources"]["pretrain"]["slurm_extra"]
    assert re.fullmatch(r"'--signal=TERM@\d+'", signal), signal
    for values in cpu_profile["set-resources"].values():
        values["slurm_extra"] = re.sub(r"@\d+", "@60", values["slurm_extra"])
    (tmp_path / "profile").mkdir()
    (tmp_path / "profile" / "config.yaml").write_text(yaml.safe_dump(cpu_profile))
    result = run_snakemake(
        tmp_path,
        "--profile", str(REPO / "profiles" / "slurm"), "--profile", str(tmp_path / "profile"),
        "--profile", str(REPO / "tests" / "slurm" / "site-profile"),
        "--retries", "1",
        "--slurm-logdir", str(tmp_path / "slurm_logs"), "--slurm-keep-successful-logs",
        "--configfile", str(REPO / "tests" / "configs" / "smoke.yaml"),
        str(REPO / "tests" / "slurm" / "time_limit.yaml"),
        "--", "results/pretrain/mae/checkpoint_final.pth",
        configfile=None, check=False, timeout=900,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0, "pre-training of a million iterations finished within three minutes?"
    assert "--signal=TERM@60" in output, "the job was not submitted with the profile's signal"
    log = (tmp_path / "results/logs/pretrain/mae.log").read_text()
    attempts = re.split(r"\n===== .* pretrain  attempt (\d+)  on .* \(SLURM job (\d+)\) =====\n", log)[1:]
    numbers, job_ids, texts = attempts[0::3], attempts[1::3], attempts[2::3]
    assert numbers == ["1", "2"], f"attempts numbered 1, 2 expected, got {numbers}"
    assert len(job_ids) == 2 and len(set(job_ids)) == 2, f"two attempts as two SLURM jobs expected:\n{log[-3000:]}"
    stopped_at = []
    for text in texts:
        # the deadline was armed from squeue's end time inside the job, with the test's margin
        assert re.search(r"SLURM job ends at \S+: stopping 60 s before it", text), (tracking, text[-2000:])
        signalled = "received SIGTERM: stopping after this iteration and saving a checkpoint" in text
        at_deadline = re.search(r"job end in \d+ s: stopping at iteration \d+ and saving a checkpoint", text)
        assert signalled or at_deadline, (tracking, text[-2000:])
        stop = re.search(r"stopped (by a signal|before the SLURM job's end) at iteration (\d+)/", text)
        assert stop, f"the trainer did not save before the limit ({tracking}):\n{text[-2000:]}"
        # a SIGTERM that comes while the trainer saves at the deadline is logged too: the deadline line decides
        assert stop.group(1) == ("before the SLURM job's end" if at_deadline else "by a signal"), text[-2000:]
        stopped_at.append(int(stop.group(2)))
    resumed = re.search(r"resumed from \S+checkpoint_latest.pth at iteration (\d+)", texts[1])
    assert resumed and int(resumed.group(1)) == stopped_at[0], texts[1][-2000:]
    assert stopped_at[1] > stopped_at[0]
    assert (tmp_path / "results/pretrain/mae/checkpoint_latest.pth").stat().st_size > 0
    # saved on the warning, not killed at the limit: SLURM writes this line into the job's log at the time limit
    for job_id in job_ids:
        slurm_log = next((tmp_path / "slurm_logs").rglob(f"{job_id}.log")).read_text()
        assert "DUE TO TIME LIMIT" not in slurm_log, slurm_log[-2000:]
