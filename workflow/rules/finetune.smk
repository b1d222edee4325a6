# Fine-tuning stage: detector x initialisation x dataset x fold, then prediction on the fold's validation cases
# (raw passes, consolidated in workflow/rules/postprocess.smk with parameters swept on the other folds).
# `{subset}` is "" for the full folds and "fraction0.25/" for runs on a share of the training cases
# (workflow/rules/label_fractions.smk fine-tunes those; predicting and evaluating them is the same).

FINETUNE_COMMAND = (
    "exec python -m pretrain_det3d.utils.attempt_log finetune {log:q} python -m pretrain_det3d finetune --preprocessed {params.preprocessed} --fold {wildcards.fold} --detector {params.detector} "
    "--settings {params.settings:q} {params.init_arg} --out-dir {params.out_dir} --seed {params.seed} "
    "--threads {threads}"
)


rule finetune:
    input:
        plan=f"{DATA}/preprocessed/{{dataset}}/plan.json",
        splits=f"{DATA}/preprocessed/{{dataset}}/splits.json",
        cases=f"{DATA}/preprocessed/{{dataset}}/cases",
        init=init_checkpoint,
    output:
        model="results/finetune/{arch}/{init}/{dataset}/fold{fold}/model_final.pth",
        log_csv="results/finetune/{arch}/{init}/{dataset}/fold{fold}/log.csv",
    params:
        preprocessed=lambda w, input: str(Path(input.plan).parent),
        detector=lambda w: config["detectors"][w.arch].get("detector", w.arch),
        settings=lambda w: as_json(finetuning_settings(config, w.arch)),
        init_arg=init_args,
        out_dir=lambda w, output: str(Path(output.model).parent),
        seed=config["seed"],
    log:
        "results/logs/finetune/{arch}/{init}/{dataset}/fold{fold}.log",
    benchmark:
        "results/benchmarks/finetune/{arch}/{init}/{dataset}/fold{fold}.tsv"
    conda:
        CONDA_ENV
    threads: rule_threads("finetune")
    resources:
        **rule_resources("finetune"),
    shell:
        FINETUNE_COMMAND


rule predict:
    input:
        model="results/finetune/{arch}/{init}/{dataset}/{subset}fold{fold}/model_final.pth",
        splits=f"{DATA}/preprocessed/{{dataset}}/splits.json",
        cases=f"{DATA}/preprocessed/{{dataset}}/cases",
    output:
        directory("results/raw_predictions/{arch}/{init}/{dataset}/{subset}fold{fold}"),
    params:
        preprocessed=lambda w, input: str(Path(input.splits).parent),
        settings=lambda w: as_json(inference_settings(config, w.arch)),
    log:
        "results/logs/predict/{arch}/{init}/{dataset}/{subset}fold{fold}.log",
    benchmark:
        "results/benchmarks/predict/{arch}/{init}/{dataset}/{subset}fold{fold}.tsv"
    conda:
        CONDA_ENV
    threads: rule_threads("predict")
    resources:
        **rule_resources("predict"),
    shell:
        "exec python -m pretrain_det3d.utils.attempt_log predict {log:q} python -m pretrain_det3d predict-raw --model {input.model} --preprocessed {params.preprocessed} --fold {wildcards.fold} "
        "--settings {params.settings:q} --out-dir {output} --threads {threads}"
