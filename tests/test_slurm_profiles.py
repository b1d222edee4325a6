"""What the SLURM profiles would submit, read from dry runs of the paper's study (no cluster needed).

Snakemake caps every rule's threads at ``--cores``, also for jobs it submits to SLURM, and the auto-loaded workflow
profile (profiles/default) overrides every ``--profile``: a ``cores: all`` there made a 2-core login node submit
2-thread jobs. These tests dry-run config/paper.yaml with the SLURM profile on 2 cores and check that each heavy job
asks for the threads and memory of the config's ``resources:`` section, and that the CPU-only overlay keeps every
setting of profiles/slurm but the GPU requests (the time-limit signal included).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO

PAPER = REPO / "config" / "paper.yaml"
# the overlay that re-runs the pre-trainings: paper.yaml alone schedules no pretrain / preprocess_corpus job
PAPER_PRETRAIN = REPO / "config" / "paper_pretrain.yaml"
SLURM = REPO / "profiles" / "slurm"
SLURM_CPU = REPO / "profiles" / "slurm-cpu"
HEAVY_RULES = ("preprocess_dataset", "preprocess_corpus", "pretrain", "finetune", "predict")
GPU_RULES = ("pretrain", "finetune", "finetune_label_fraction", "predict", "predict_test")
TRAINING_RULES = ("pretrain", "finetune", "finetune_label_fraction")


def parse_dry_run(text: str) -> list[dict]:
    """One dict per job of a dry run's job descriptions: rule, threads, resources, shell command."""
    jobs = []
    for block in re.split(r"\n(?=(?:local)?rule \w+:\n)", text):
        head = re.match(r"(?:local)?rule (\w+):\n", block)
        if not head:
            continue
        threads = re.search(r"^\s+threads: (\d+)$", block, re.M)
        resources = re.search(r"^\s+resources: (.*)$", block, re.M)
        shell = re.search(r"^Shell command: (.*)$", block, re.M)
        jobs.append({
            "rule": head.group(1),
            "threads": int(threads.group(1)) if threads else 1,  # Snakemake prints no threads line for 1
            "resources": dict(item.split("=", 1) for item in resources.group(1).split(", ")) if resources else {},
            "shell": shell.group(1) if shell else "",
        })
    return jobs


def dry_run_on_two_cores(workdir, *profiles):
    """The paper's study dry-run with the given profiles, pinned to two CPUs like a small login node."""
    assert shutil.which("taskset"), "taskset (util-linux) is needed to pin the dry run to two CPUs"
    cpus = ",".join(map(str, sorted(os.sched_getaffinity(0))[:2]))
    command = ["taskset", "-c", cpus, sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"),
               "--directory", str(workdir), "--configfile", str(PAPER), str(PAPER_PRETRAIN), "-n"]
    command += [arg for profile in profiles for arg in ("--profile", str(profile))]
    env = dict(os.environ, PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    jobs = parse_dry_run(result.stdout + result.stderr)
    assert jobs, f"no job descriptions in the dry run:\n{result.stdout[-2000:]}"
    return jobs


@pytest.fixture(scope="module")
def dry_runs(tmp_path_factory):
    """Job descriptions of the dry run with profiles/slurm, and with profiles/slurm-cpu on top of it."""
    return {
        "gpu-nodes": dry_run_on_two_cores(tmp_path_factory.mktemp("gpu"), SLURM),
        "cpu-only": dry_run_on_two_cores(tmp_path_factory.mktemp("cpu"), SLURM, SLURM_CPU),
    }


@pytest.fixture(scope="module")
def paper_resources():
    resources = yaml.safe_load(PAPER.read_text())["resources"]
    return {**resources, **yaml.safe_load(PAPER_PRETRAIN.read_text())["resources"]}


def expected(resources: dict, rule: str, key: str):
    return resources.get(rule, {}).get(key, resources["default"][key])


@pytest.mark.parametrize("profiles", ["gpu-nodes", "cpu-only"])
def test_cluster_jobs_get_threads_and_memory_of_the_config(dry_runs, paper_resources, profiles):
    jobs = dry_runs[profiles]
    seen = set()
    for job in jobs:
        rule = job["rule"]
        if rule not in HEAVY_RULES:
            continue
        seen.add(rule)
        threads = expected(paper_resources, rule, "threads")
        assert threads > 2, f"config/paper.yaml asks {threads} threads for {rule}: no test of the 2-core cap"
        assert job["threads"] == threads, (rule, job["threads"], threads)
        assert int(job["resources"]["mem_mb"]) == expected(paper_resources, rule, "mem_mb"), (rule, job["resources"])
        assert int(job["resources"]["runtime"]) == expected(paper_resources, rule, "runtime"), (rule, job["resources"])
    assert seen == set(HEAVY_RULES), seen
    # the package is told the same number of threads that SLURM is asked for
    for rule in ("pretrain", "finetune", "predict"):
        shells = [job["shell"] for job in jobs if job["rule"] == rule]
        threads = expected(paper_resources, rule, "threads")
        assert shells and all(re.search(rf"--threads {threads}(\s|$)", shell) for shell in shells), rule


def test_gpu_requests_and_the_time_limit_signal(dry_runs):
    for job in dry_runs["gpu-nodes"]:
        resources = job["resources"]
        if job["rule"] in GPU_RULES:
            assert resources.get("gpu") == "1" and resources.get("slurm_partition") == "gpu", job
        else:
            assert "gpu" not in resources and resources.get("slurm_partition", "cpu") == "cpu", job
        if job["rule"] in TRAINING_RULES:
            assert resources.get("slurm_extra") == "--signal=TERM@600", job
        else:
            assert "slurm_extra" not in resources, job


def test_cpu_only_overlay_drops_only_the_gpu_requests(dry_runs):
    with_gpus = {(job["rule"], job["shell"]): job["resources"] for job in dry_runs["gpu-nodes"]}
    cpu_only = {(job["rule"], job["shell"]): job["resources"] for job in dry_runs["cpu-only"]}
    assert with_gpus.keys() == cpu_only.keys()
    gpu_keys = {"gpu", "slurm_partition"}
    for key, resources in with_gpus.items():
        other = cpu_only[key]
        assert "gpu" not in other and other.get("slurm_partition") == "cpu", (key[0], other)
        assert {k: v for k, v in resources.items() if k not in gpu_keys and "TBD" not in v} == \
            {k: v for k, v in other.items() if k not in gpu_keys and "TBD" not in v}, key[0]
    signalled = {rule for (rule, _), resources in cpu_only.items() if "--signal=" in resources.get("slurm_extra", "")}
    scheduled = {rule for rule, _ in cpu_only}
    assert signalled == set(TRAINING_RULES) & scheduled and {"pretrain", "finetune"} <= signalled
    # training rules the paper's dry run does not schedule (label-fraction fine-tuning) keep the signal too
    overlay = yaml.safe_load((SLURM_CPU / "config.yaml").read_text())["set-resources"]
    assert all("--signal=" in overlay[rule]["slurm_extra"] for rule in TRAINING_RULES)


def test_profile_files_differ_only_in_gpu_lines():
    slurm = yaml.safe_load((SLURM / "config.yaml").read_text())
    cpu = yaml.safe_load((SLURM_CPU / "config.yaml").read_text())
    assert set(cpu) == {"set-resources"}, "the overlay should override nothing but set-resources"
    stripped = {rule: {k: v for k, v in values.items() if k not in ("gpu", "slurm_partition")}
                for rule, values in slurm["set-resources"].items()}
    assert {rule: values for rule, values in stripped.items() if values} == cpu["set-resources"]
    # the workflow profile is loaded last and overrides every --profile: a `cores` there would cap cluster jobs
    default = yaml.safe_load((REPO / "profiles" / "default" / "config.yaml").read_text())
    assert "cores" not in default and slurm["cores"] >= max(
        r.get("threads", 1) for r in yaml.safe_load(PAPER.read_text())["resources"].values())
