# Pre-training stage: one checkpoint per configured method (scratch has none).


rule pretrain:
    input:
        unpack(pretraining_inputs),
    output:
        "results/pretrain/{method}/checkpoint_final.pth",
    wildcard_constraints:
        method=PRETRAINING_METHODS,
    params:
        corpus=lambda w, input: str(Path(input.plans[0]).parent),
        method_class=lambda w: config["pretraining"]["methods"][w.method].get("method", w.method),
        settings=lambda w: as_json(pretraining_settings(config, w.method)),
        seed=config["seed"],
    log:
        "results/logs/pretrain/{method}.log",
    benchmark:
        "results/benchmarks/pretrain/{method}.tsv"
    conda:
        CONDA_ENV
    threads: rule_threads("pretrain")
    resources:
        **rule_resources("pretrain"),
    shell:
        "exec python -m pretrain_det3d.utils.attempt_log pretrain {log:q} python -m pretrain_det3d pretrain --corpus {params.corpus} --method {params.method_class} --settings {params.settings:q} "
        "--out {output} --seed {params.seed} --threads {threads}"


rule fetch_published_checkpoint:
    output:
        "results/pretrain/{method}/checkpoint_final.pth",
    wildcard_constraints:
        method=PUBLISHED_CHECKPOINTS,
    params:
        entry=lambda w: as_json(published_fetch_entry(w.method)),
    log:
        "results/logs/fetch_published_checkpoint/{method}.log",
    benchmark:
        "results/benchmarks/fetch_published_checkpoint/{method}.tsv"
    conda:
        CONDA_ENV
    threads: rule_threads("fetch_published_checkpoint")
    resources:
        **rule_resources("fetch_published_checkpoint"),
    shell:
        "exec python -m pretrain_det3d.utils.attempt_log fetch_published_checkpoint {log:q} python -m pretrain_det3d fetch-checkpoint --entry {params.entry:q} --name {wildcards.method} "
        "--out {output}"
