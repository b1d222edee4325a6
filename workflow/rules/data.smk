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
        settings=lambda w: as_json(CORPUS_ENTRY.get("synthetic", {})),
        seed=CORPUS_ENTRY.get("seed", config["seed"] + 1000),
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


# The corpus (pretrain_det3d.data.corpus): index the volumes of its source (manifest with sha256; CT-RATE is
# downloaded here), plan (target spacing, normalisation), preprocess in pretraining.corpus.shards parallel jobs,
# gather into preprocessed_corpus/{corpus} (cases/, plan.json, failures.json), which pre-training reads.
rule index_corpus:
    input:
        corpus_index_inputs,
    output:
        f"{DATA}/corpus_index/{{corpus}}/manifest.json",
    params:
        source=lambda w: as_json(corpus_source(w)),
        num_workers=lambda w: rule_threads("index_corpus"),
    log:
        "results/logs/index_corpus/{corpus}.log",
    benchmark:
        "results/benchmarks/index_corpus/{corpus}.tsv"
    conda:
        CONDA_ENV
    threads: rule_threads("index_corpus")
    resources:
        **rule_resources("index_corpus"),
    shell:
        "exec python -m pretrain_det3d.utils.attempt_log index_corpus {log:q} python -m pretrain_det3d index-corpus --source-json {params.source:q} --out {output} --name {wildcards.corpus} --num-workers {params.num_workers}"


rule plan_corpus:
    input:
        f"{DATA}/corpus_index/{{corpus}}/manifest.json",
    output:
        f"{DATA}/corpus_index/{{corpus}}/plan.json",
    params:
        settings=as_json(CORPUS_ENTRY.get("preprocessing", {})),
    log:
        "results/logs/plan_corpus/{corpus}.log",
    benchmark:
        "results/benchmarks/plan_corpus/{corpus}.tsv"
    conda:
        CONDA_ENV
    threads: rule_threads("plan_corpus")
    resources:
        **rule_resources("plan_corpus"),
    shell:
        "exec python -m pretrain_det3d.utils.attempt_log plan_corpus {log:q} python -m pretrain_det3d plan-corpus --manifest {input} --out {output} --settings {params.settings:q}"


rule preprocess_corpus:
    input:
        f"{DATA}/corpus_index/{{corpus}}/plan.json",
    output:
        temp(directory(f"{DATA}/corpus_shards/{{corpus}}/shard{{shard}}")),
    wildcard_constraints:
        shard=r"\d+",
    params:
        num_shards=CORPUS_SHARDS,
        # worker processes: preprocessing.num_workers, else one per thread of the job
        num_workers=CORPUS_ENTRY.get("preprocessing", {}).get("num_workers")
        or rule_threads("preprocess_corpus"),
    log:
        "results/logs/preprocess_corpus/{corpus}_shard{shard}.log",
    benchmark:
        "results/benchmarks/preprocess_corpus/{corpus}_shard{shard}.tsv"
    conda:
        CONDA_ENV
    threads: rule_threads("preprocess_corpus")
    resources:
        **rule_resources("preprocess_corpus"),
    shell:
        "exec python -m pretrain_det3d.utils.attempt_log preprocess_corpus {log:q} python -m pretrain_det3d preprocess-corpus-shard --plan {input} --out {output} --shard {wildcards.shard} "
        "--num-shards {params.num_shards} --num-workers {params.num_workers}"


rule gather_corpus:
    input:
        plan=f"{DATA}/corpus_index/{{corpus}}/plan.json",
        shards=corpus_shards,
    output:
        plan=f"{DATA}/preprocessed_corpus/{{corpus}}/plan.json",
        cases=directory(f"{DATA}/preprocessed_corpus/{{corpus}}/cases"),
        failures=f"{DATA}/preprocessed_corpus/{{corpus}}/failures.json",
    params:
        out=lambda w, output: str(Path(output.plan).parent),
        max_failure_fraction=CORPUS_ENTRY.get("max_failure_fraction", 0.05),
    log:
        "results/logs/gather_corpus/{corpus}.log",
    benchmark:
        "results/benchmarks/gather_corpus/{corpus}.tsv"
    conda:
        CONDA_ENV
    threads: rule_threads("gather_corpus")
    resources:
        **rule_resources("gather_corpus"),
    shell:
        "exec python -m pretrain_det3d.utils.attempt_log gather_corpus {log:q} python -m pretrain_det3d gather-corpus --plan {input.plan} --shards {input.shards} --out {params.out} "
        "--max-failure-fraction {params.max_failure_fraction}"
