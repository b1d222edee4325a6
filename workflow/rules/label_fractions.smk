# Label-efficiency curves (study.label_fractions; data/label_fractions.py, analysis/label_efficiency.py): every run of
# the study again on nested, stratified shares of each fold's training cases, validated on the whole fold.
# Fraction 1 is the study's runs as they are (finetune.smk, today's paths). A fraction f below 1 adds the segment
# "fraction{f}/" after the dataset (the `subset` wildcard, common.smk); its subset file, its fine-tuning here, then
# predict/sweep/consolidate/evaluate as for any run (their paths carry `{subset}`). Adding a fraction to a finished
# study schedules only that fraction's chains (and redraws the curves); the subsets of other fractions stay as they are.

from pretrain_det3d.data.label_fractions import SUBSETS_DIR, fraction_segment, segment_fraction

LABEL_FRACTIONS = sorted(float(f) for f in STUDY.get("label_fractions", [1.0]))
LABEL_SUBSETS = [fraction_segment(f) for f in LABEL_FRACTIONS]  # "" for fraction 1
LABEL_SCHEDULE = STUDY.get("label_fraction_schedule", "same")
BELOW_ONE = r"fraction[0-9.]+/"  # a `subset` below fraction 1 (never the empty one of fraction 1)


def label_subset_file(wildcards):
    return f"{DATA}/preprocessed/{wildcards.dataset}/{SUBSETS_DIR}/{wildcards.subset}fold{wildcards.fold}.json"


def label_fraction_entries(wildcards):
    """Every run of one detector and dataset at every label fraction: its metrics and training-case files."""
    entries = []
    for init in detector_initialisations(config, wildcards.arch):
        for fraction, subset in zip(LABEL_FRACTIONS, LABEL_SUBSETS):
            for fold in STUDY["folds"]:
                entries.append({
                    "detector": wildcards.arch, "initialisation": init, "dataset": wildcards.dataset, "fold": fold,
                    "fraction": fraction,
                    "metrics": f"results/metrics/{wildcards.arch}/{init}/{wildcards.dataset}/{subset}fold{fold}.json",
                    "train_cases": (f"{DATA}/preprocessed/{wildcards.dataset}/{SUBSETS_DIR}/{subset}fold{fold}.json"
                                    if subset else f"{DATA}/preprocessed/{wildcards.dataset}/splits.json"),
                })
    return entries


def label_fraction_run_inputs(wildcards):
    entries = label_fraction_entries(wildcards)
    return {"metrics": [e["metrics"] for e in entries], "train_cases": sorted({e["train_cases"] for e in entries})}


def label_fraction_predictions(wildcards):
    return [e["metrics"].replace("results/metrics/", "results/predictions/", 1).removesuffix(".json")
            for e in label_fraction_entries(wildcards)]


def label_efficiency_inputs(wildcards):
    return {
        "runs": f"results/tables/label_efficiency/{wildcards.arch}/{wildcards.dataset}_runs.csv",
        "predictions": label_fraction_predictions(wildcards),
        "converted": f"{DATA}/converted/{wildcards.dataset}",
    }


def label_efficiency_arguments(wildcards, input):
    return (f"--runs-csv {input.runs} --predictions-root results/predictions "
            f"--converted-root {Path(input.converted).parent}")


def label_fraction_outputs():
    """The curves and labels-saved tables per detector x dataset, when the study runs more than fraction 1."""
    if len(LABEL_FRACTIONS) < 2:
        return []
    pairs = [(arch, dataset) for arch in STUDY["detectors"] for dataset in STUDY["datasets"]]
    return ([f"results/figures/label_efficiency/{a}/{d}.{ext}" for a, d in pairs for ext in ("png", "pdf")]
            + [f"results/tables/labels_saved/{a}/{d}.{fmt}" for a, d in pairs for fmt in ("csv", "md")])


# The nested, stratified subset of a fold's training cases at one fraction below 1 (reproducible, inspectable).
rule label_subset:
    input:
        splits=f"{DATA}/preprocessed/{{dataset}}/splits.json",
        cases=f"{DATA}/preprocessed/{{dataset}}/cases",
    output:
        f"{DATA}/preprocessed/{{dataset}}/{SUBSETS_DIR}/{{subset}}fold{{fold}}.json",
    wildcard_constraints:
        subset=BELOW_ONE,
    params:
        preprocessed=lambda w, input: str(Path(input.splits).parent),
        fraction=lambda w: segment_fraction(w.subset),
        seed=config["seed"],
    log:
        "results/logs/label_subset/{dataset}/{subset}fold{fold}.log",
    conda:
        CONDA_ENV
    localrule: True
    threads: rule_threads("label_subset")
    resources:
        **rule_resources("label_subset"),
    shell:
        "exec python -m pretrain_det3d.utils.attempt_log label_subset {log:q} python -m pretrain_det3d label-subset --preprocessed {params.preprocessed} --fold {wildcards.fold} "
        "--fraction {params.fraction} --seed {params.seed} --out {output}"


# Fine-tuning on a subset: the finetune rule's command and settings, plus the subset and the schedule choice.
rule finetune_label_fraction:
    input:
        plan=f"{DATA}/preprocessed/{{dataset}}/plan.json",
        splits=f"{DATA}/preprocessed/{{dataset}}/splits.json",
        cases=f"{DATA}/preprocessed/{{dataset}}/cases",
        init=init_checkpoint,
        subset=label_subset_file,
    output:
        model="results/finetune/{arch}/{init}/{dataset}/{subset}fold{fold}/model_final.pth",
        log_csv="results/finetune/{arch}/{init}/{dataset}/{subset}fold{fold}/log.csv",
    wildcard_constraints:
        subset=BELOW_ONE,
    params:
        preprocessed=lambda w, input: str(Path(input.plan).parent),
        detector=lambda w: config["detectors"][w.arch].get("detector", w.arch),
        settings=lambda w: as_json(finetuning_settings(config, w.arch)),
        init_arg=lambda w, input: f"--init {input.init}" if input.init else "",
        out_dir=lambda w, output: str(Path(output.model).parent),
        seed=config["seed"],
        schedule=LABEL_SCHEDULE,
    log:
        "results/logs/finetune/{arch}/{init}/{dataset}/{subset}fold{fold}.log",
    benchmark:
        "results/benchmarks/finetune/{arch}/{init}/{dataset}/{subset}fold{fold}.tsv"
    conda:
        CONDA_ENV
    threads: rule_threads("finetune")
    resources:
        **rule_resources("finetune"),
    shell:
        FINETUNE_COMMAND + " --train-subset {input.subset} --schedule {params.schedule}"


# The runs of one detector and dataset at every fraction: metrics, fraction and training cases per run.
rule label_fraction_runs:
    input:
        unpack(label_fraction_run_inputs),
    output:
        "results/tables/label_efficiency/{arch}/{dataset}_runs.csv",
    params:
        runs=lambda w: as_json(label_fraction_entries(w)),
    log:
        "results/logs/label_fraction_runs/{arch}/{dataset}.log",
    conda:
        CONDA_ENV
    localrule: True
    threads: rule_threads("aggregate")
    resources:
        **rule_resources("aggregate"),
    shell:
        "exec python -m pretrain_det3d.utils.attempt_log label_fraction_runs {log:q} python -m pretrain_det3d label-fraction-runs --runs {params.runs:q} --out-csv {output}"


rule figure_label_efficiency:
    input:
        unpack(label_efficiency_inputs),
    output:
        png=report(
            "results/figures/label_efficiency/{arch}/{dataset}.png",
            caption="../report/label_efficiency.rst",
            category="Label efficiency",
            subcategory="{dataset}",
            labels={"detector": "{arch}", "dataset": "{dataset}", "output": "figure"},
        ),
        pdf="results/figures/label_efficiency/{arch}/{dataset}.pdf",
    params:
        inputs=label_efficiency_arguments,
        settings=as_json(config.get("statistics", {})),
    log:
        "results/logs/figure/label_efficiency/{arch}/{dataset}.log",
    benchmark:
        "results/benchmarks/figure/label_efficiency/{arch}/{dataset}.tsv"
    conda:
        CONDA_ENV
    localrule: True
    threads: rule_threads("figure")
    resources:
        **rule_resources("figure"),
    shell:
        "exec python -m pretrain_det3d.utils.attempt_log figure_label_efficiency {log:q} python -m pretrain_det3d figure --name label_efficiency {params.inputs} --settings {params.settings:q} "
        "--out-png {output.png} --out-pdf {output.pdf}"


rule table_labels_saved:
    input:
        unpack(label_efficiency_inputs),
    output:
        csv=report(
            "results/tables/labels_saved/{arch}/{dataset}.csv",
            caption="../report/labels_saved.rst",
            category="Label efficiency",
            subcategory="{dataset}",
            labels={"detector": "{arch}", "dataset": "{dataset}", "output": "labels saved"},
        ),
        md="results/tables/labels_saved/{arch}/{dataset}.md",
    params:
        inputs=label_efficiency_arguments,
        settings=as_json(config.get("statistics", {})),
    log:
        "results/logs/table/labels_saved/{arch}/{dataset}.log",
    benchmark:
        "results/benchmarks/table/labels_saved/{arch}/{dataset}.tsv"
    conda:
        CONDA_ENV
    localrule: True
    threads: rule_threads("table")
    resources:
        **rule_resources("table"),
    shell:
        "exec python -m pretrain_det3d.utils.attempt_log table_labels_saved {log:q} python -m pretrain_det3d table --name labels_saved {params.inputs} --settings {params.settings:q} "
        "--out-csv {output.csv} --out-md {output.md}"
