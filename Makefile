# Set-up and entry points. Every target installs what it needs first, so on a fresh machine
# `make demo` and `make test` are each the only command to type.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
# Rules call `python -m pretrain_det3d`: the venv's python must come first on PATH.
RUN := PATH="$(BIN):$$PATH"
CORES ?= 2

.PHONY: install demo test test-fast dag report clean-results

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

## The built-in synthetic demo study (CPU, minutes): tables in results/tables, figures in results/figures,
## everything in the HTML report results/report.html.
demo: install
	$(RUN) snakemake --cores $(CORES)
	$(RUN) snakemake --report results/report.html

## The HTML report of whatever the workflow has produced so far.
report: install
	$(RUN) snakemake --report results/report.html

## The whole test suite, including an end-to-end run of the smoke study.
test: install
	$(RUN) python -m pytest -q

## Rewrite the README's demo table (between its demo-table markers) from the last demo's
## results/tables/main_results.csv, dated by its metric files.
.PHONY: demo-table
demo-table: install
	$(RUN) python -m pretrain_det3d demo-table

## Unit tests only (no workflow runs).
test-fast: install
	$(RUN) python -m pytest -q -m "not slow"

## Re-draw the DAG picture of the README (needs graphviz's `dot`).
dag: install
	$(RUN) snakemake --rulegraph | dot -Tpng -Gdpi=110 > docs/rulegraph.png

clean-results:
	find results -mindepth 1 -not -name README.md -delete
