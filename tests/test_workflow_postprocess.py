"""DAG tests of the post-processing stage: fold k's parameters come from the other folds only, and datasets with
held-out test cases get fold-ensemble predictions and their own metric targets."""

from __future__ import annotations

import re

import yaml

from conftest import SMOKE_CONFIG
from test_workflow_dag import job_counts

RUN = "retina_unet/scratch/smoke_lesions"


def _config(tmp_path, folds, num_folds, num_test_cases=0):
    config = yaml.safe_load(SMOKE_CONFIG.read_text())
    config["study"].update(initialisations=["scratch"], folds=folds, num_folds=num_folds)
    if num_test_cases:
        config["datasets"]["smoke_lesions"]["synthetic"]["num_test_cases"] = num_test_cases
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _jobs(stdout: str) -> list[dict[str, str]]:
    """Rule, input and shell command of every job a dry run (with -p) lists."""
    jobs = []
    for block in re.split(r"\n(?=(?:local)?rule \w+:\n)", stdout):
        head = re.match(r"(?:local)?rule (\w+):\n", block)
        if head:
            inputs = re.search(r"^\s+input: (.*)$", block, re.M)
            output = re.search(r"^\s+output: (.*)$", block, re.M)
            shell = re.search(r"^Shell command: (.*)$", block, re.M)
            jobs.append({"rule": head.group(1), "input": inputs.group(1) if inputs else "",
                         "output": output.group(1) if output else "", "shell": shell.group(1) if shell else ""})
    return jobs


def test_fold_k_is_swept_on_the_other_folds_only(tmp_path, snakemake_runner):
    config = _config(tmp_path, [0, 1, 2], 3)
    result = snakemake_runner(tmp_path, "-n", "-p", f"results/metrics/{RUN}/fold1.json", configfile=config)
    jobs = _jobs(result.stdout)
    (sweep,) = [job for job in jobs if job["rule"] == "sweep"]
    raw = {fold: f"results/raw_predictions/{RUN}/fold{fold}" for fold in range(3)}
    inputs = sweep["input"].split(", ")
    assert raw[0] in inputs and raw[2] in inputs and raw[1] not in inputs
    assert sweep["output"] == f"results/postprocessing/{RUN}/fold1.json"
    assert f"--raw {raw[0]} {raw[2]} --folds 0 2 " in sweep["shell"]
    # fold 1's own raw predictions go only into its consolidation, whose parameters the sweep chose
    readers = {job["rule"] for job in jobs if raw[1] in job["input"].split(", ")}
    assert readers == {"consolidate"}
    (consolidate,) = [job for job in jobs if job["rule"] == "consolidate"]
    assert f"results/postprocessing/{RUN}/fold1.json" in consolidate["input"]
    (evaluate,) = [job for job in jobs if job["rule"] == "evaluate"]
    assert f"--postprocessing results/postprocessing/{RUN}/fold1.json" in evaluate["shell"]
    counts = job_counts(result.stdout)
    assert counts["finetune"] == counts["predict"] == 3 and counts["evaluate"] == 1
    assert not any(rule in counts for rule in ("predict_test", "evaluate_test", "preprocess_test_cases"))


def test_single_fold_study_sweeps_nothing(tmp_path, snakemake_runner):
    result = snakemake_runner(tmp_path, "-n", "-p", f"results/metrics/{RUN}/fold0.json",
                              configfile=_config(tmp_path, [0], 2))
    (sweep,) = [job for job in _jobs(result.stdout) if job["rule"] == "sweep"]
    assert "raw_predictions" not in sweep["input"] and "--raw  --folds  " in sweep["shell"]


def test_dataset_with_test_cases_schedules_the_fold_ensemble_and_its_metrics(tmp_path, snakemake_runner):
    result = snakemake_runner(tmp_path, "-n", "-p", configfile=_config(tmp_path, [0, 1], 2, num_test_cases=2))
    counts = job_counts(result.stdout)
    assert counts["preprocess_test_cases"] == 1 and counts["predict_test"] == counts["evaluate_test"] == 1
    assert counts["sweep"] == counts["consolidate"] == counts["evaluate"] + 1 == 3
    jobs = _jobs(result.stdout)
    (predict_test,) = [job for job in jobs if job["rule"] == "predict_test"]
    models = [f"results/finetune/{RUN}/fold{fold}/model_final.pth" for fold in (0, 1)]
    assert all(model in predict_test["input"] for model in models)
    assert f"--model {models[0]} {models[1]} " in predict_test["shell"] and "--test" in predict_test["shell"]
    (sweep,) = [job for job in jobs if job["rule"] == "sweep" and job["output"].endswith("/test.json")]
    assert "--folds 0 1 " in sweep["shell"]  # the test cases' parameters: swept on every fold's validation cases
    (evaluate,) = [job for job in jobs if job["rule"] == "evaluate_test"]
    assert f"results/metrics/{RUN}/test.json" in evaluate["output"] and "--test" in evaluate["shell"]
    (rule_all,) = [job for job in jobs if job["rule"] == "all"]
    assert f"results/metrics/{RUN}/test.json" in rule_all["input"]
