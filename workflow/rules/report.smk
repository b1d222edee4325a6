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
        "exec python -m pretrain_det3d.utils.attempt_log aggregate {log:q} python -m pretrain_det3d aggregate --runs {params.runs:q} --out-csv {output.table} --out-md {output.markdown} "
        "--runs-csv {output.runs}"


# One rule per figure and per table (captions differ, and a report caption cannot hold a wildcard).
for _figure in REPORT_FIGURES:

    rule:
        name:
            f"figure_{_figure}"
        input:
            unpack(report_inputs),
        output:
            png=report(
                f"results/figures/{_figure}.png",
                caption=f"../report/{_figure}.rst",
                category="Figures",
            ),
            pdf=f"results/figures/{_figure}.pdf",
        params:
            name=_figure,
            inputs=report_arguments,
            settings=as_json(config.get("statistics", {})),
        log:
            f"results/logs/figure/{_figure}.log",
        benchmark:
            f"results/benchmarks/figure/{_figure}.tsv"
        conda:
            CONDA_ENV
        localrule: True
        threads: rule_threads("figure")
        resources:
            **rule_resources("figure"),
        shell:
            "exec python -m pretrain_det3d.utils.attempt_log aggregate {log:q} python -m pretrain_det3d figure --name {params.name} {params.inputs} --settings {params.settings:q} "
            "--out-png {output.png} --out-pdf {output.pdf}"


for _table, _formats in REPORT_TABLES.items():

    rule:
        name:
            f"table_{_table}"
        input:
            unpack(report_inputs),
        output:
            **{
                fmt: (
                    report(f"results/tables/{_table}.{fmt}", caption=f"../report/{_table}.rst", category="Tables")
                    if fmt == "csv"
                    else f"results/tables/{_table}.{fmt}"
                )
                for fmt in _formats
            },
        params:
            name=_table,
            inputs=report_arguments,
            settings=as_json(config.get("statistics", {})),
            outputs=lambda w, output: " ".join(f"--out-{fmt} {path}" for fmt, path in output.items()),
        log:
            f"results/logs/table/{_table}.log",
        benchmark:
            f"results/benchmarks/table/{_table}.tsv"
        conda:
            CONDA_ENV
        localrule: True
        threads: rule_threads("table")
        resources:
            **rule_resources("table"),
        shell:
            "exec python -m pretrain_det3d.utils.attempt_log aggregate {log:q} python -m pretrain_det3d table --name {params.name} {params.inputs} --settings {params.settings:q} "
            "{params.outputs}"


# The learning curve of every fine-tuning run: its per-iteration training losses and its validation AP.
rule learning_curve:
    input:
        log_csv="results/finetune/{arch}/{init}/{dataset}/fold{fold}/log.csv",
        metrics="results/metrics/{arch}/{init}/{dataset}/fold{fold}.json",
    output:
        report(
            "results/figures/learning_curves/{arch}/{init}/{dataset}/fold{fold}.png",
            caption="../report/learning_curve.rst",
            category="Learning curves",
            subcategory="{dataset}",
            labels={"detector": "{arch}", "initialisation": "{init}", "fold": "{fold}"},
        ),
    params:
        title=lambda w: f"{w.arch} / {w.init} / {w.dataset} / fold {w.fold}",
    log:
        "results/logs/learning_curve/{arch}/{init}/{dataset}/fold{fold}.log",
    conda:
        CONDA_ENV
    localrule: True
    threads: rule_threads("figure")
    resources:
        **rule_resources("figure"),
    shell:
        "exec python -m pretrain_det3d.utils.attempt_log learning_curve {log:q} python -m pretrain_det3d learning-curve --log {input.log_csv} --metrics {input.metrics} "
        "--out-png {output} --title {params.title:q}"
