# Report stage: tables and figures from the metrics and predictions. Nothing upstream of evaluation is an
# input, so `snakemake results/figures/<name>.pdf` re-draws one figure without any training job.


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


rule figure:
    input:
        unpack(report_inputs),
    output:
        png=report(
            "results/figures/{figure}.png",
            caption="../report/{figure}.rst",
            category="Figures",
        ),
        pdf="results/figures/{figure}.pdf",
    wildcard_constraints:
        figure=one_of(REPORT_FIGURES),
    params:
        inputs=report_arguments,
        settings=as_json(config.get("statistics", {})),
    log:
        "results/logs/figure/{figure}.log",
    benchmark:
        "results/benchmarks/figure/{figure}.tsv"
    conda:
        CONDA_ENV
    threads: rule_threads("figure")
    resources:
        **rule_resources("figure"),
    shell:
        "python -m pretrain_det3d figure --name {wildcards.figure} {params.inputs} --settings {params.settings:q} "
        "--out-png {output.png} --out-pdf {output.pdf} > {log} 2>&1"


rule table:
    input:
        unpack(report_inputs),
    output:
        csv=report(
            "results/tables/{table}.csv",
            caption="../report/{table}.rst",
            category="Tables",
        ),
        md="results/tables/{table}.md",
    wildcard_constraints:
        table=one_of([t for t, formats in REPORT_TABLES.items() if "tex" not in formats]),
    params:
        inputs=report_arguments,
        settings=as_json(config.get("statistics", {})),
    log:
        "results/logs/table/{table}.log",
    benchmark:
        "results/benchmarks/table/{table}.tsv"
    conda:
        CONDA_ENV
    threads: rule_threads("table")
    resources:
        **rule_resources("table"),
    shell:
        "python -m pretrain_det3d table --name {wildcards.table} {params.inputs} --settings {params.settings:q} "
        "--out-csv {output.csv} --out-md {output.md} > {log} 2>&1"


rule table_with_latex:
    input:
        unpack(report_inputs),
    output:
        csv=report(
            "results/tables/{table}.csv",
            caption="../report/{table}.rst",
            category="Tables",
        ),
        md="results/tables/{table}.md",
        tex="results/tables/{table}.tex",
    wildcard_constraints:
        table=one_of([t for t, formats in REPORT_TABLES.items() if "tex" in formats]),
    params:
        inputs=report_arguments,
        settings=as_json(config.get("statistics", {})),
    log:
        "results/logs/table/{table}.log",
    benchmark:
        "results/benchmarks/table/{table}.tsv"
    conda:
        CONDA_ENV
    threads: rule_threads("table")
    resources:
        **rule_resources("table"),
    shell:
        "python -m pretrain_det3d table --name {wildcards.table} {params.inputs} --settings {params.settings:q} "
        "--out-csv {output.csv} --out-md {output.md} --out-tex {output.tex} > {log} 2>&1"
