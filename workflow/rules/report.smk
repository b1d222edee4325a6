# Report stage: tables and figures from the metrics; no training job is upstream of a re-plot.


rule aggregate:
    input:
        fold_metric_files(),
    output:
        table=report(
            "results/tables/main_results.csv",
            caption="../report/main_results.rst",
            category="Tables",
        ),
        markdown="results/tables/main_results.md",
        runs="results/tables/runs.csv",
    params:
        runs=lambda w, input: as_json(
            [
                dict(zip(("arch", "init", "dataset", "fold"), parse_metric_path(path)), path=path)
                for path in input
            ]
        ),
    log:
        "results/logs/aggregate.log",
    benchmark:
        "results/benchmarks/aggregate.tsv"
    conda:
        CONDA_ENV
    threads: rule_threads("aggregate")
    resources:
        **rule_resources("aggregate"),
    shell:
        "python -m pretrain_det3d aggregate --runs {params.runs:q} --out-csv {output.table} --out-md {output.markdown} "
        "--runs-csv {output.runs} > {log} 2>&1"


rule plot_ap_by_init:
    input:
        "results/tables/runs.csv",
    output:
        png=report(
            "results/figures/ap_by_init.png",
            caption="../report/ap_by_init.rst",
            category="Figures",
        ),
        pdf="results/figures/ap_by_init.pdf",
    log:
        "results/logs/plot_ap_by_init.log",
    benchmark:
        "results/benchmarks/plot_ap_by_init.tsv"
    conda:
        CONDA_ENV
    threads: rule_threads("plot_ap_by_init")
    resources:
        **rule_resources("plot_ap_by_init"),
    shell:
        "python -m pretrain_det3d plot-ap-by-init --runs-csv {input} --out-png {output.png} --out-pdf {output.pdf} > {log} 2>&1"
