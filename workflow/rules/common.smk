# Config helpers, targets and wildcard constraints shared by every rule file.
import json
import os
import re
import sys
from pathlib import Path

# Rules run `python -m pretrain_det3d`; the workflow's own source is importable in every job (local, conda or
# SLURM, where the Snakefile is parsed again), so a job always runs the code of this checkout.
_SRC = str(Path(workflow.basedir) / "src")
sys.path.insert(0, _SRC)
os.environ.update(PYTHONPATH=os.pathsep.join(p for p in (_SRC, os.environ.get("PYTHONPATH")) if p))

from pretrain_det3d.catalog import REPORT_FIGURES, REPORT_TABLES
from pretrain_det3d.config import (
    ConfigError,
    converted_datasets,
    datasets_with_test_cases,
    detector_initialisations,
    postprocessing_settings,
    synthetic_datasets,
    finetuning_settings,
    pretraining_datasets,
    inference_settings,
    pretraining_settings,
    validate_config,
    validate_study_config,
)

# Every section is checked by its settings class (pretrain_det3d.settings): unknown keys and wrong types fail
# here, at the dry run, naming the key. `--config detectors='{retina_unet: {iterations: 5}}'` arrives as strings
# (Snakemake parses nested values with YAML's BaseLoader); the classes coerce them to the declared types.
try:
    validate_study_config(config)
    validate_config(config)
except ConfigError as error:
    raise WorkflowError(f"invalid configuration:\n{error}") from None

STUDY = config["study"]
DATA = config.get("data_dir", "results/data")
# no corpus: a study whose initialisations are scratch, published checkpoints or supervised methods only
CORPUS_ENTRY = config["pretraining"].get("corpus") or {}
CORPUS = CORPUS_ENTRY.get("name")
CORPUS_SHARDS = int(CORPUS_ENTRY.get("shards", 1))
CONDA_ENV = "../../envs/pretrain_det3d.yaml"
SCRATCH = "scratch"


wildcard_constraints:
    dataset="[A-Za-z0-9_.-]+",
    arch="[A-Za-z0-9_]+",
    init="[A-Za-z0-9_.-]+",
    method="[A-Za-z0-9_.-]+",
    fold=r"\d+",
    part=r"fold\d+|test",
    # label fractions (workflow/rules/label_fractions.smk): "" at fraction 1 (today's paths), "fraction0.25/" below
    subset=r"(fraction[0-9.]+/)?",


def one_of(names):
    """A wildcard regex matching exactly these names (and nothing when the list is empty)."""
    return "|".join(re.escape(n) for n in names) if names else "(?!)"


SYNTHETIC_DATASETS = one_of(synthetic_datasets(config))
CONVERTED_DATASETS = one_of(converted_datasets(config))
SOURCES = config.get("sources", {}) or {}
PUBLISHED = config["pretraining"].get("published", {}) or {}
PRETRAINING_METHODS = one_of(list(config["pretraining"]["methods"]))
PUBLISHED_CHECKPOINTS = one_of(list(PUBLISHED))


def dataset_source(wildcards):
    """The fetched source that a converted dataset is made from."""
    return f"{DATA}/raw/{config['datasets'][wildcards.dataset]['source']}/source.json"


def as_json(obj):
    """Settings travel to the package as one JSON argument (quoted with :q in shell commands)."""
    return json.dumps(obj, sort_keys=True)


# Every rule's shell command is `exec python -m pretrain_det3d.utils.attempt_log <rule> {log:q} <command>`:
# each attempt appends to the log under a header (time, rule, attempt number, host, SLURM job), kept across the
# retries after a time limit (Snakemake deletes `{log}` before each attempt, so the attempts live in
# `<log name>.attempts.log` and `{log}` is a hard link to it), and the command replaces the shell and the wrapper
# so that the time-limit SIGTERM of profiles/slurm reaches the trainer (see that module's docstring).


def rule_threads(rule_name):
    resources = config.get("resources", {})
    return int(resources.get(rule_name, {}).get("threads", resources.get("default", {}).get("threads", 1)))


def rule_resources(rule_name):
    """Memory and runtime per rule from config 'resources' (GPU requests come from the profile)."""
    defaults = {"mem_mb": 4000, "runtime": 60}
    resources = config.get("resources", {})
    merged = {**defaults, **resources.get("default", {}), **resources.get(rule_name, {})}
    merged.pop("threads", None)
    return merged


def pretraining_inputs(wildcards):
    """The unlabelled corpus, or the preprocessed labelled datasets of a supervised method (multitalent)."""
    labelled = pretraining_datasets(config, wildcards.method)
    if labelled:
        return {"plans": [f"{DATA}/preprocessed/{d}/plan.json" for d in labelled]}
    return {
        "plans": [f"{DATA}/preprocessed_corpus/{CORPUS}/plan.json"],
        "cases": f"{DATA}/preprocessed_corpus/{CORPUS}/cases",
    }


def corpus_index_inputs(wildcards):
    """What index_corpus reads from the DAG: the synthesized folder, or the converted datasets of the 'datasets'
    source; nothing for folders outside the workflow and for the Hugging Face download."""
    source = CORPUS_ENTRY["source"]
    if source == "synthetic":
        return [f"{DATA}/corpus/{wildcards.corpus}"]
    if source == "datasets":
        return [f"{DATA}/converted/{d}" for d in CORPUS_ENTRY["datasets"]]
    return []


def corpus_source(wildcards):
    """The source of the corpus as index-corpus reads it (pretrain_det3d.data.corpus.source_volumes)."""
    source = CORPUS_ENTRY["source"]
    if source == "synthetic":
        return {"source": source, "folders": [f"{DATA}/corpus/{wildcards.corpus}"]}
    if source == "folders":
        return {"source": source, "folders": list(CORPUS_ENTRY["folders"])}
    if source == "datasets":
        return {"source": source, "datasets": {d: f"{DATA}/converted/{d}" for d in CORPUS_ENTRY["datasets"]}}
    settings = dict(CORPUS_ENTRY.get("ct_rate") or {})
    cache_dir = settings.pop("cache_dir", None) or f"{DATA}/raw/corpus_{wildcards.corpus}/huggingface"
    return {"source": source, "ct_rate": settings, "cache_dir": cache_dir}


def corpus_shards(wildcards):
    return [f"{DATA}/corpus_shards/{wildcards.corpus}/shard{i}" for i in range(CORPUS_SHARDS)]


if CORPUS_ENTRY.get("source") == "datasets":
    _unknown = sorted(set(CORPUS_ENTRY["datasets"]) - set(config["datasets"]))
    if _unknown:
        raise WorkflowError(f"invalid configuration:\nconfig key 'pretraining.corpus.datasets': {_unknown} are not "
                            f"datasets (datasets: {sorted(config['datasets'])})")


def init_checkpoint(wildcards):
    """Fine-tuning input: the pre-training checkpoint of the initialisation, nothing for scratch."""
    if wildcards.init == SCRATCH:
        return []
    return f"results/pretrain/{wildcards.init}/checkpoint_final.pth"


def published_fetch_entry(name):
    """The fetch's entry: the file's keys only (choosing another stem must not fetch the checkpoint again)."""
    from pretrain_det3d.models.published import fetch_entry

    return fetch_entry(PUBLISHED[name])


def init_args(wildcards, input):
    """Fine-tuning's `--init` and, for a published checkpoint, the stem it loads (models.published.published_init_stem:
    pretraining.published.<init>.stem_per_dataset.<dataset>, else .stem; one-stem checkpoints ignore it)."""
    from shlex import quote
    from pretrain_det3d.models.published import published_init_stem

    if not input.init:
        return ""
    if wildcards.init not in PUBLISHED:
        return f"--init {input.init}"
    stem, key = published_init_stem(PUBLISHED[wildcards.init], wildcards.dataset,
                                     f"pretraining.published.{wildcards.init}")
    return f"--init {input.init} --init-stem {quote(stem)} --init-stem-key {quote(key)}"


def expand_runs(pattern, **wildcards):
    """``expand`` over the study's runs: each detector with its initialisations (``detector_initialisations``:
    its own ``initialisations`` list, else the study's), not the full product of detectors and initialisations."""
    return [path for arch in STUDY["detectors"] for init in detector_initialisations(config, arch)
            for path in expand(pattern, arch=arch, init=init, **wildcards)]


def fold_metric_files():
    return expand_runs(
        "results/metrics/{arch}/{init}/{dataset}/fold{fold}.json",
        dataset=STUDY["datasets"],
        fold=STUDY["folds"],
    )


def test_metric_files():
    """Metrics of the fold ensembles on the held-out test cases, for the datasets that have test cases."""
    return expand_runs(
        "results/metrics/{arch}/{init}/{dataset}/test.json",
        dataset=datasets_with_test_cases(config),
    )


def sweep_folds(wildcards):
    """The folds whose validation predictions choose the post-processing of ``part``: for fold k the study's
    other folds (never fold k's own cases), for the test cases all of the study's folds."""
    if wildcards.part == "test":
        return list(STUDY["folds"])
    fold = int(wildcards.part.removeprefix("fold"))
    return [f for f in STUDY["folds"] if f != fold]


def sweep_inputs(wildcards):
    return expand(
        "results/raw_predictions/{arch}/{init}/{dataset}/{subset}fold{fold}",
        arch=wildcards.arch,
        init=wildcards.init,
        dataset=wildcards.dataset,
        subset=wildcards.subset,  # the other folds at the same label fraction
        fold=sweep_folds(wildcards),
    )


def fold_models(wildcards):
    """The models of all of the study's folds of one run (they predict the test cases together)."""
    return expand(
        "results/finetune/{arch}/{init}/{dataset}/fold{fold}/model_final.pth",
        arch=wildcards.arch,
        init=wildcards.init,
        dataset=wildcards.dataset,
        fold=STUDY["folds"],
    )


def luna16_datasets():
    """The study's datasets converted with the LUNA16 converter (they get LUNA16's own CSV and score)."""
    return [d for d in STUDY["datasets"] if config["datasets"][d].get("converter") == "luna16"]


def luna16_exports():
    """LUNA16's own CSV format, for every dataset converted with the LUNA16 converter."""
    return expand_runs(
        "results/luna16/{arch}/{init}/{dataset}/fold{fold}.csv",
        dataset=luna16_datasets(),
        fold=STUDY["folds"],
    )


def luna16_cpm_folds(wildcards):
    """The folds a LUNA16 score covers: one fold, or all of the study's folds pooled (as LUNA16 scores a CV)."""
    return list(STUDY["folds"]) if wildcards.scope == "pooled" else [int(wildcards.scope.removeprefix("fold"))]


def luna16_cpm_candidates(wildcards):
    return expand(
        "results/luna16/{arch}/{init}/{dataset}/fold{fold}.csv",
        arch=wildcards.arch,
        init=wildcards.init,
        dataset=wildcards.dataset,
        fold=luna16_cpm_folds(wildcards),
    )


def luna16_scores():
    """LUNA16's own score (CPM, FROC curve) per fold and over the study's folds pooled."""
    return expand_runs(
        "results/luna16/{arch}/{init}/{dataset}/{scope}_{kind}",
        dataset=luna16_datasets(),
        scope=[f"fold{f}" for f in STUDY["folds"]] + ["pooled"],
        kind=("cpm.json", "froc.csv"),
    )


def prediction_folders():
    return expand_runs(
        "results/predictions/{arch}/{init}/{dataset}/fold{fold}",
        dataset=STUDY["datasets"],
        fold=STUDY["folds"],
    )


def report_inputs(wildcards):
    """What every figure and table may read: the run table, the fold metrics, predictions and ground truth."""
    return {
        "runs": "results/tables/runs.csv",
        "metrics": fold_metric_files(),
        "predictions": prediction_folders(),
        "converted": expand(f"{DATA}/converted/{{dataset}}", dataset=STUDY["datasets"]),
    }


def report_arguments(wildcards, input):
    return (
        f"--runs-csv {input.runs} --metrics-root results/metrics --predictions-root results/predictions "
        f"--converted-root {DATA}/converted"
    )


def report_outputs():
    figures = expand("results/figures/{figure}.{ext}", figure=REPORT_FIGURES, ext=("png", "pdf"))
    tables = [f"results/tables/{name}.{fmt}" for name, formats in REPORT_TABLES.items() for fmt in formats]
    return figures + tables


def learning_curve_figures():
    """One learning-curve figure per fine-tuning run (its training log and validation metrics)."""
    return [path.replace("results/metrics/", "results/figures/learning_curves/").replace(".json", ".png")
            for path in fold_metric_files()]


def chance_level_files():
    """The chance level (random boxes) of every dataset and fold of the study."""
    return expand("results/metrics/chance/{dataset}/fold{fold}.json", dataset=STUDY["datasets"], fold=STUDY["folds"])


def final_outputs():
    return (luna16_exports() + luna16_scores() + test_metric_files() + report_outputs() + learning_curve_figures()
            + chance_level_files() + [
        "results/tables/main_results.csv",
        "results/tables/main_results.md",
    ])


def parse_metric_path(path):
    """(arch, init, dataset, fold) of results/metrics/{arch}/{init}/{dataset}/fold{fold}.json."""
    parts = Path(path).parts
    return parts[-4], parts[-3], parts[-2], int(parts[-1].removeprefix("fold").removesuffix(".json"))


# Light bookkeeping runs on the submit host even under a cluster executor.
localrules:
    all,
    check_dataset,
    aggregate,
