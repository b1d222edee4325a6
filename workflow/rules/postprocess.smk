# Post-processing stage (docs/postprocessing.md): the consolidation parameters of each run's fold k are chosen by
# nnDetection's sweep on the raw predictions of the run's other folds, never on fold k's own cases; the fold
# ensemble predicts held-out test cases where a dataset has them. `part` is `fold<k>` or `test`.


rule sweep:
    input:
        raw=sweep_inputs,
        converted=f"{DATA}/converted/{{dataset}}",
    output:
        "results/postprocessing/{arch}/{init}/{dataset}/{subset}{part}.json",
    params:
        folds=lambda w: " ".join(str(f) for f in sweep_folds(w)),
        settings=lambda w: as_json(inference_settings(config, w.arch)),
        postprocessing=as_json(postprocessing_settings(config)),
        label=lambda w: "test cases" if w.part == "test" else w.part.replace("fold", "fold "),
    log:
        "results/logs/sweep/{arch}/{init}/{dataset}/{subset}{part}.log",
    benchmark:
        "results/benchmarks/sweep/{arch}/{init}/{dataset}/{subset}{part}.tsv"
    conda:
        CONDA_ENV
    threads: rule_threads("sweep")
    resources:
        **rule_resources("sweep"),
    shell:
        "exec python -m pretrain_det3d.utils.attempt_log sweep {log:q} python -m pretrain_det3d sweep --raw {input.raw} --folds {params.folds} "
        "--converted {input.converted} --settings {params.settings:q} --postprocessing {params.postprocessing:q} "
        "--for {params.label:q} --out {output}"


rule consolidate:
    input:
        raw="results/raw_predictions/{arch}/{init}/{dataset}/{subset}{part}",
        postprocessing="results/postprocessing/{arch}/{init}/{dataset}/{subset}{part}.json",
    output:
        directory("results/predictions/{arch}/{init}/{dataset}/{subset}{part}"),
    params:
        settings=lambda w: as_json(inference_settings(config, w.arch)),
    log:
        "results/logs/consolidate/{arch}/{init}/{dataset}/{subset}{part}.log",
    benchmark:
        "results/benchmarks/consolidate/{arch}/{init}/{dataset}/{subset}{part}.tsv"
    conda:
        CONDA_ENV
    threads: rule_threads("consolidate")
    resources:
        **rule_resources("consolidate"),
    shell:
        "exec python -m pretrain_det3d.utils.attempt_log consolidate {log:q} python -m pretrain_det3d consolidate --raw {input.raw} "
        "--postprocessing-json {input.postprocessing} --settings {params.settings:q} --out-dir {output}"


rule preprocess_test_cases:
    input:
        converted=f"{DATA}/converted/{{dataset}}",
        plan=f"{DATA}/preprocessed/{{dataset}}/plan.json",
    output:
        directory(f"{DATA}/preprocessed/{{dataset}}/test_cases"),
    log:
        "results/logs/preprocess_test_cases/{dataset}.log",
    benchmark:
        "results/benchmarks/preprocess_test_cases/{dataset}.tsv"
    conda:
        CONDA_ENV
    threads: rule_threads("preprocess_test_cases")
    resources:
        **rule_resources("preprocess_test_cases"),
    shell:
        "exec python -m pretrain_det3d.utils.attempt_log preprocess_test_cases {log:q} python -m pretrain_det3d preprocess-test --converted {input.converted} "
        "--plan {input.plan} --out {output}"


rule predict_test:
    input:
        models=fold_models,
        cases=f"{DATA}/preprocessed/{{dataset}}/test_cases",
    output:
        directory("results/raw_predictions/{arch}/{init}/{dataset}/test"),
    params:
        preprocessed=lambda w, input: str(Path(input.cases).parent),
        settings=lambda w: as_json(inference_settings(config, w.arch)),
    log:
        "results/logs/predict_test/{arch}/{init}/{dataset}.log",
    benchmark:
        "results/benchmarks/predict_test/{arch}/{init}/{dataset}.tsv"
    conda:
        CONDA_ENV
    threads: rule_threads("predict_test")
    resources:
        **rule_resources("predict_test"),
    shell:
        "exec python -m pretrain_det3d.utils.attempt_log predict_test {log:q} python -m pretrain_det3d predict-raw --model {input.models} --preprocessed {params.preprocessed} --test "
        "--settings {params.settings:q} --out-dir {output} --threads {threads}"


rule evaluate_test:
    input:
        predictions="results/predictions/{arch}/{init}/{dataset}/test",
        converted=f"{DATA}/converted/{{dataset}}",
        postprocessing="results/postprocessing/{arch}/{init}/{dataset}/test.json",
    output:
        metrics="results/metrics/{arch}/{init}/{dataset}/test.json",
        cases="results/metrics/{arch}/{init}/{dataset}/test_cases.csv",
    log:
        "results/logs/evaluate_test/{arch}/{init}/{dataset}.log",
    benchmark:
        "results/benchmarks/evaluate_test/{arch}/{init}/{dataset}.tsv"
    conda:
        CONDA_ENV
    threads: rule_threads("evaluate_test")
    resources:
        **rule_resources("evaluate_test"),
    shell:
        "exec python -m pretrain_det3d.utils.attempt_log evaluate_test {log:q} python -m pretrain_det3d evaluate --predictions {input.predictions} --converted {input.converted} --test "
        "--postprocessing {input.postprocessing} --out-json {output.metrics} --out-csv {output.cases}"
