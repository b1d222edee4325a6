# Label-efficiency curves (study.label_fractions; data/label_fractions.py, analysis/label_efficiency.py): every run of
# the study again on nested, stratified shares of each fold's training cases, validated on the whole fold.
# Fraction 1 is the study's runs as they are (finetune.smk, today's paths). A fraction f below 1 adds the segment
# "fraction{f}/" after the dataset (the `subset` wildcard, common.smk); its subset file, its fine-tuning here, then
# predict/sweep/consolidate/evaluate as for any run (their paths carry `{subset}`). Adding a fraction to a finished
# study schedules only that fraction's chains (and redraws the curves); the subsets of other fractions stay as they are.
# Helpers and targets: common_label_fractions.smk.


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
        init_arg=init_args,
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
        f"{FINETUNE_COMMAND} --train-subset {{input.subset}} --schedule {{params.schedule}}"


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
