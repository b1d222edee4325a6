"""DAG tests of study.label_fractions: the runs below fraction 1, their paths, and adding a fraction to a finished
study (its outputs made by hand from a dry run's job list, their provenance recorded by ``--touch``) schedules only
the new fraction's chains."""

from __future__ import annotations

import os
import re
from pathlib import Path

import yaml

from conftest import SMOKE_CONFIG
from test_workflow_dag import job_counts


def write_config(path: Path, fractions: list[float], **study) -> Path:
    config = yaml.safe_load(SMOKE_CONFIG.read_text())
    config["study"].update(label_fractions=fractions, **study)
    path.write_text(yaml.safe_dump(config))
    return path


def jobs(stdout: str) -> list[tuple[str, list[str], str]]:
    """(rule, outputs, shell command) of every job a dry run lists."""
    found = []
    for block in re.split(r"\n(?=(?:local)?rule \w+:\n)", stdout):
        head = re.match(r"(?:local)?rule (\w+):\n", block)
        if head:
            output = re.search(r"^\s+output: (.*)$", block, re.M)
            shell = re.search(r"^Shell command: (.*)$", block, re.M)
            found.append((head.group(1), output.group(1).split(", ") if output else [],
                          shell.group(1) if shell else ""))
    return found


def make_outputs(workdir: Path, listed: list[tuple[str, list[str], str]]) -> None:
    """Every listed output, as if the jobs had run: folders for names without a suffix (the workflow's
    directory() outputs), empty files otherwise; all with one modification time, so none is older than an input."""
    paths = []
    for _, outputs, _ in listed:
        for output in outputs:
            path = workdir / output
            if Path(output).suffix:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()
            else:
                path.mkdir(parents=True, exist_ok=True)
            paths.append(path)
    stamp = 1_700_000_000
    for path in paths:
        os.utime(path, (stamp, stamp))


def test_fractions_below_one_add_their_chains_and_paths(tmp_path, snakemake_runner):
    config = write_config(tmp_path / "curve.yaml", [0.25, 1.0], label_fraction_schedule="scaled")
    result = snakemake_runner(tmp_path, "-n", configfile=config)
    counts = job_counts(result.stdout)
    smoke = yaml.safe_load(SMOKE_CONFIG.read_text())
    grid = len(smoke["study"]["initialisations"]) * len(smoke["study"]["folds"])
    assert counts["finetune"] == counts["finetune_label_fraction"] == grid
    assert counts["predict"] == counts["evaluate"] == counts["consolidate"] == counts["sweep"] == 2 * grid
    assert counts["label_subset"] == len(smoke["study"]["folds"])
    assert counts["figure_label_efficiency"] == counts["table_labels_saved"] == counts["label_fraction_runs"] == 1
    listed = jobs(result.stdout)
    full = [shell for rule, _, shell in listed if rule == "finetune"]
    below = [(outputs, shell) for rule, outputs, shell in listed if rule == "finetune_label_fraction"]
    # fraction 1: today's paths and command; below: the fraction segment, the subset file and the schedule
    assert all("--train-subset" not in shell and "/fraction" not in shell for shell in full)
    assert all("/smoke_lesions/fraction0.25/fold0/model_final.pth" in outputs[0] for outputs, _ in below)
    assert all("--train-subset results/data/preprocessed/smoke_lesions/label_fractions/fraction0.25/fold0.json "
               "--schedule scaled" in shell for _, shell in below)
    assert "results/metrics/retina_unet/mae/smoke_lesions/fold0.json" in result.stdout
    assert "results/metrics/retina_unet/mae/smoke_lesions/fraction0.25/fold0.json" in result.stdout
    assert "results/figures/label_efficiency/retina_unet/smoke_lesions.png" in result.stdout


def test_a_study_without_fractions_runs_fraction_one_only(tmp_path, snakemake_runner):
    result = snakemake_runner(tmp_path, "-n")
    counts = job_counts(result.stdout)
    assert "finetune_label_fraction" not in counts and "label_subset" not in counts
    assert "figure_label_efficiency" not in counts


def test_adding_a_fraction_schedules_only_the_new_chain(tmp_path, snakemake_runner):
    before = write_config(tmp_path / "before.yaml", [0.5, 1.0])
    after = write_config(tmp_path / "after.yaml", [0.25, 0.5, 1.0])
    first = snakemake_runner(tmp_path, "-n", configfile=before)
    make_outputs(tmp_path, jobs(first.stdout))
    # record every job's provenance (inputs, params, code) as a real run would, so the triggers see the change
    snakemake_runner(tmp_path, "--touch", "--forceall", "--cores", "1", configfile=before)
    assert "Nothing to be done" in snakemake_runner(tmp_path, "-n", configfile=before).stdout

    second = snakemake_runner(tmp_path, "-n", configfile=after)
    counts = job_counts(second.stdout)
    smoke = yaml.safe_load(SMOKE_CONFIG.read_text())
    grid = len(smoke["study"]["initialisations"]) * len(smoke["study"]["folds"])
    assert counts["finetune_label_fraction"] == counts["predict"] == counts["evaluate"] == grid
    assert counts["label_subset"] == len(smoke["study"]["folds"])
    for rule in ("finetune", "pretrain", "preprocess_dataset", "aggregate", "learning_curve"):
        assert rule not in counts, (rule, counts)
    chain = ("label_subset", "finetune_label_fraction", "predict", "sweep", "consolidate", "evaluate")
    for rule, outputs, _ in jobs(second.stdout):
        if rule in chain:
            assert outputs and all("/fraction0.25/" in output for output in outputs), (rule, outputs)
    # the curves are drawn again from every fraction; nothing else runs
    assert set(counts) == {*chain, "label_fraction_runs", "figure_label_efficiency", "table_labels_saved", "all",
                           "total"}


def test_labels_saved_table_only_where_scratch_runs(tmp_path, snakemake_runner):
    config = yaml.safe_load(SMOKE_CONFIG.read_text())
    config["study"]["label_fractions"] = [0.5, 1.0]
    config["detectors"]["retina_unet"]["initialisations"] = ["mae"]
    path = tmp_path / "no_scratch.yaml"
    path.write_text(yaml.safe_dump(config))
    counts = job_counts(snakemake_runner(tmp_path, "-n", configfile=path).stdout)
    assert counts["figure_label_efficiency"] == 1 and "table_labels_saved" not in counts
