# Data stage: obtain each dataset in the converted format, check it, preprocess it; same for the corpus.


rule synthesize_dataset:
    output:
        directory(f"{DATA}/converted/{{dataset}}"),
    wildcard_constraints:
        dataset=SYNTHETIC_DATASETS,
    params:
        settings=lambda w: as_json(config["datasets"][w.dataset].get("synthetic", {})),
        seed=lambda w: config["datasets"][w.dataset].get("seed", config["seed"]),
    log:
        "results/logs/synthesize_dataset/{dataset}.log",
    benchmark:
        "results/benchmarks/synthesize_dataset/{dataset}.tsv"
    conda:
        CONDA_ENV
    threads: rule_threads("synthesize_dataset")
    resources:
        **rule_resources("synthesize_dataset"),
    shell:
        "exec python -m pretrain_det3d.utils.attempt_log synthesize_dataset {log:q} python -m pretrain_det3d synthesize-dataset --out {output} --name {wildcards.dataset} "
        "--settings {params.settings:q} --seed {params.seed}"


rule download_source:
    output:
        f"{DATA}/raw/{{source}}/source.json",
    params:
        entry=lambda w: as_json(SOURCES[w.source]),
        out_dir=lambda w, output: str(Path(output[0]).parent),
    log:
        "results/logs/download_source/{source}.log",
    benchmark:
        "results/benchmarks/download_source/{source}.tsv"
    conda:
        CONDA_ENV
    threads: rule_threads("download_source")
    resources:
        **rule_resources("download_source"),
    shell:
        "exec python -m pretrain_det3d.utils.attempt_log download_source {log:q} python -m pretrain_det3d download --source-json {params.entry:q} --out {params.out_dir}"


rule convert_dataset:
    input:
        dataset_source,
    output:
        directory(f"{DATA}/converted/{{dataset}}"),
    wildcard_constraints:
        dataset=CONVERTED_DATASETS,
    params:
        converter=lambda w: config["datasets"][w.dataset]["converter"],
        settings=lambda w: as_json(config["datasets"][w.dataset].get("convert", {})),
        source_dir=lambda w, input: str(Path(input[0]).parent),
    log:
        "results/logs/convert_dataset/{dataset}.log",
    benchmark:
        "results/benchmarks/convert_dataset/{dataset}.tsv"
    conda:
        CONDA_ENV
    threads: rule_threads("convert_dataset")
    resources:
        **rule_resources("convert_dataset"),
    shell:
        "exec python -m pretrain_det3d.utils.attempt_log convert_dataset {log:q} python -m pretrain_det3d convert --converter {params.converter} --source {params.source_dir} "
        "--out {output} --settings {params.settings:q}"


rule check_dataset:
    input:
        f"{DATA}/converted/{{dataset}}",
    output:
        f"{DATA}/checks/{{dataset}}.json",
    log:
        "results/logs/check_dataset/{dataset}.log",
    benchmark:
        "results/benchmarks/check_dataset/{dataset}.tsv"
    conda:
        CONDA_ENV
    threads: rule_threads("check_dataset")
    resources:
        **rule_resources("check_dataset"),
    shell:
        "exec python -m pretrain_det3d.utils.attempt_log check_dataset {log:q} python -m pretrain_det3d check-dataset --root {input} --out {output}"


rule preprocess_dataset:
    input:
        converted=f"{DATA}/converted/{{dataset}}",
        check=f"{DATA}/checks/{{dataset}}.json",
        # a dataset's official folds (preprocessing.splits_file), when it names one
        splits_file=lambda w: config["datasets"][w.dataset].get("preprocessing", {}).get("splits_file") or [],
    output:
        plan=f"{DATA}/preprocessed/{{dataset}}/plan.json",
        splits=f"{DATA}/preprocessed/{{dataset}}/splits.json",
        cases=directory(f"{DATA}/preprocessed/{{dataset}}/cases"),
    params:
        out=lambda w, output: str(Path(output.plan).parent),
        settings=lambda w: as_json(config["datasets"][w.dataset].get("preprocessing", {})),
        num_folds=STUDY["num_folds"],
        seed=config["seed"],
    log:
        "results/logs/preprocess_dataset/{dataset}.log",
    benchmark:
        "results/benchmarks/preprocess_dataset/{dataset}.tsv"
    conda:
        CONDA_ENV
    threads: rule_threads("preprocess_dataset")
    resources:
        **rule_resources("preprocess_dataset"),
    shell:
        "exec python -m pretrain_det3d.utils.attempt_log preprocess_dataset {log:q} python -m pretrain_det3d preprocess --converted {input.converted} --out {params.out} --num-folds {params.num_folds} "
        "--seed {params.seed} --settings {params.settings:q}"


rule synthesize_corpus:
    output:
        directory(f"{DATA}/corpus/{{corpus}}"),
    params:
        settings=lambda w: as_json(config["pretraining"]["corpus"].get("synthetic", {})),
        seed=config["pretraining"]["corpus"].get("seed", config["seed"] + 1000),
    log:
        "results/logs/synthesize_corpus/{corpus}.log",
    benchmark:
        "results/benchmarks/synthesize_corpus/{corpus}.tsv"
    conda:
        CONDA_ENV
    threads: rule_threads("synthesize_corpus")
    resources:
        **rule_resources("synthesize_corpus"),
    shell:
        "exec python -m pretrain_det3d.utils.attempt_log synthesize_corpus {log:q} python -m pretrain_det3d synthesize-corpus --out {output} --settings {params.settings:q} --seed {params.seed}"


rule preprocess_corpus:
    input:
        f"{DATA}/corpus/{{corpus}}",
    output:
        plan=f"{DATA}/preprocessed_corpus/{{corpus}}/plan.json",
        cases=directory(f"{DATA}/preprocessed_corpus/{{corpus}}/cases"),
    params:
        out=lambda w, output: str(Path(output.plan).parent),
        settings=as_json(config["pretraining"]["corpus"].get("preprocessing", {})),
    log:
        "results/logs/preprocess_corpus/{corpus}.log",
    benchmark:
        "results/benchmarks/preprocess_corpus/{corpus}.tsv"
    conda:
        CONDA_ENV
    threads: rule_threads("preprocess_corpus")
    resources:
        **rule_resources("preprocess_corpus"),
    shell:
        "exec python -m pretrain_det3d.utils.attempt_log preprocess_corpus {log:q} python -m pretrain_det3d preprocess-corpus --corpus {input} --out {params.out} --settings {params.settings:q}"
