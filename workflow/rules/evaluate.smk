# Evaluation stage: nnDetection's metrics per fold, from the predictions against the converted labels.


rule evaluate:
    input:
        predictions="results/predictions/{arch}/{init}/{dataset}/{subset}fold{fold}",
        splits=f"{DATA}/preprocessed/{{dataset}}/splits.json",
        converted=f"{DATA}/converted/{{dataset}}",
        postprocessing="results/postprocessing/{arch}/{init}/{dataset}/{subset}fold{fold}.json",
    output:
        metrics="results/metrics/{arch}/{init}/{dataset}/{subset}fold{fold}.json",
        cases="results/metrics/{arch}/{init}/{dataset}/{subset}fold{fold}_cases.csv",
    log:
        "results/logs/evaluate/{arch}/{init}/{dataset}/{subset}fold{fold}.log",
    benchmark:
        "results/benchmarks/evaluate/{arch}/{init}/{dataset}/{subset}fold{fold}.tsv"
    conda:
        CONDA_ENV
    threads: rule_threads("evaluate")
    resources:
        **rule_resources("evaluate"),
    shell:
        "exec python -m pretrain_det3d.utils.attempt_log evaluate {log:q} python -m pretrain_det3d evaluate --predictions {input.predictions} --converted {input.converted} --splits {input.splits} "
        "--fold {wildcards.fold} --postprocessing {input.postprocessing} --out-json {output.metrics} --out-csv {output.cases}"


rule export_luna16:
    input:
        predictions="results/predictions/{arch}/{init}/{dataset}/fold{fold}",
        splits=f"{DATA}/preprocessed/{{dataset}}/splits.json",
        converted=f"{DATA}/converted/{{dataset}}",
    output:
        "results/luna16/{arch}/{init}/{dataset}/fold{fold}.csv",
    log:
        "results/logs/export_luna16/{arch}/{init}/{dataset}/fold{fold}.log",
    benchmark:
        "results/benchmarks/export_luna16/{arch}/{init}/{dataset}/fold{fold}.tsv"
    conda:
        CONDA_ENV
    threads: rule_threads("export_luna16")
    resources:
        **rule_resources("export_luna16"),
    shell:
        "exec python -m pretrain_det3d.utils.attempt_log export_luna16 {log:q} python -m pretrain_det3d export-luna16 --predictions {input.predictions} --converted {input.converted} "
        "--splits {input.splits} --fold {wildcards.fold} --out {output}"


rule luna16_cpm:
    input:
        candidates=luna16_cpm_candidates,
        splits=f"{DATA}/preprocessed/{{dataset}}/splits.json",
        converted=f"{DATA}/converted/{{dataset}}",
    output:
        score="results/luna16/{arch}/{init}/{dataset}/{scope}_cpm.json",
        froc="results/luna16/{arch}/{init}/{dataset}/{scope}_froc.csv",
    wildcard_constraints:
        scope=r"fold\d+|pooled",
    params:
        folds=lambda w: " ".join(str(f) for f in luna16_cpm_folds(w)),
    log:
        "results/logs/luna16_cpm/{arch}/{init}/{dataset}/{scope}.log",
    benchmark:
        "results/benchmarks/luna16_cpm/{arch}/{init}/{dataset}/{scope}.tsv"
    conda:
        CONDA_ENV
    threads: rule_threads("luna16_cpm")
    resources:
        **rule_resources("luna16_cpm"),
    shell:
        "exec python -m pretrain_det3d.utils.attempt_log luna16_cpm {log:q} python -m pretrain_det3d luna16-cpm --candidates {input.candidates} --converted {input.converted} "
        "--splits {input.splits} --folds {params.folds} --out-json {output.score} --out-froc {output.froc}"


# What boxes placed at random score on a fold's validation cases: the level a detector must clear.
rule chance_level:
    input:
        splits=f"{DATA}/preprocessed/{{dataset}}/splits.json",
        converted=f"{DATA}/converted/{{dataset}}",
    output:
        "results/metrics/chance/{dataset}/fold{fold}.json",
    params:
        settings=as_json({"seed": config["seed"]}),
    log:
        "results/logs/chance_level/{dataset}/fold{fold}.log",
    conda:
        CONDA_ENV
    threads: rule_threads("evaluate")
    resources:
        **rule_resources("evaluate"),
    shell:
        "exec python -m pretrain_det3d.utils.attempt_log chance_level {log:q} python -m pretrain_det3d chance-level --converted {input.converted} --splits {input.splits} "
        "--fold {wildcards.fold} --settings {params.settings:q} --out-json {output}"
