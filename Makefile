# Set-up and entry points. Every target installs what it needs first, so on a fresh machine
# `make demo` and `make test` are each the only command to type.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
# Rules call `python -m pretrain_det3d`: the venv's python must come first on PATH.
RUN := PATH="$(BIN):$$PATH"
CORES ?= 2

.PHONY: install demo test test-fast dag report clean-results clean-data constraints

install: $(VENV)/.installed

# Versions are pinned by constraints.txt (refresh it with `make constraints`); a change of either file reinstalls.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

## Re-pin constraints.txt: a fresh venv installs pyproject.toml's dependencies without constraints (the newest
## releases they allow), and its `pip freeze` becomes constraints.txt. Review the diff, then run `make install`.
CONSTRAINTS_VENV ?= $(abspath build/constraints-venv)
constraints:
	rm -rf $(CONSTRAINTS_VENV)
	$(PYTHON) -m venv $(CONSTRAINTS_VENV)
	$(CONSTRAINTS_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(CONSTRAINTS_VENV)/bin/python -m pip install --quiet -e '.[test]'
	{ echo "# Pinned versions of every package that \`make install\` installs (pip install -c constraints.txt -e '.[test]')."; \
	  echo "# Generated with \`pip freeze --exclude-editable\` by \`make constraints\` (a fresh venv from pyproject.toml, installed"; \
	  echo "# without constraints)."; \
	  $(CONSTRAINTS_VENV)/bin/python -m pip freeze --exclude-editable | grep -viE '^pretrain[-_]det3d([ =@]|$$)'; \
	} > constraints.txt.tmp
	mv constraints.txt.tmp constraints.txt
	rm -rf $(CONSTRAINTS_VENV)

## The built-in synthetic demo study (CPU, minutes): tables in results/tables, figures in results/figures,
## everything in the HTML report results/report.html.
demo: install
	$(RUN) snakemake --cores $(CORES)
	$(RUN) snakemake --report results/report.html

## The full demo (config/demo_full.yaml over the default): all three folds and nnDetection's native Retina U-Net;
## about three times the default's time.
.PHONY: demo-full
demo-full: install
	$(RUN) snakemake --cores $(CORES) --configfile config/config.yaml config/demo_full.yaml
	$(RUN) snakemake --report results/report.html --configfile config/config.yaml config/demo_full.yaml

## The HTML report of whatever the workflow has produced so far.
report: install
	$(RUN) snakemake --report results/report.html

## The whole test suite, including an end-to-end run of the smoke study. tests/system/ensure_test_system.sh first
## installs Chromium and starts a one-node SLURM cluster when run as root (otherwise it says what is missing).
test: install
	bash tests/system/ensure_test_system.sh
	$(RUN) python -m pytest -q

## Submit one tiny job through the SLURM profile(s) and report, in about a minute, the partition and node, CPUs and
## GPUs, whether the time-limit signal reaches the job's program, and whether Snakemake's status polling works:
##   make cluster-check PROFILE="profiles/slurm profiles/slurm-cpu" [PARTITION=short] [CHECK_ARGS="--timeout 300"]
## (python -m pretrain_det3d cluster-check --help lists the options). Run it on a login node, in a folder the
## compute nodes see.
PROFILE ?= profiles/slurm
PARTITION ?=
CHECK_ARGS ?=
.PHONY: cluster-check
cluster-check: install
	$(RUN) python -m pretrain_det3d cluster-check $(foreach p,$(PROFILE),--profile $(p)) \
	  $(if $(PARTITION),--partition $(PARTITION)) $(CHECK_ARGS)

## Detection quality against a peer: our Retina U-Net and Deformable DETR and MONAI's RetinaNet (its 3D tutorial's
## set-up) trained side by side on one synthetic set; prints AP@0.1, mAP and FROC with case-bootstrap intervals and
## writes results/benchmark/quality/{quality.json,learning_curve.png}. QUALITY_SETTINGS='{"iterations": 600}' etc.
QUALITY_SETTINGS ?= {}
.PHONY: benchmark-quality
benchmark-quality: install
	$(RUN) python -m pretrain_det3d benchmark-quality --out results/benchmark/quality --settings '$(QUALITY_SETTINGS)'

## Rewrite the README's demo table (between its demo-table markers) from the last demo's
## results/tables/main_results.csv, dated by its metric files.
.PHONY: demo-table
demo-table: install
	$(RUN) python -m pretrain_det3d demo-table

## Unit tests only (no workflow runs; the browser checker's own tests need Chromium).
test-fast: install
	bash tests/system/ensure_test_system.sh chromium
	$(RUN) python -m pytest -q -m "not slow"

## Re-draw the DAG picture of the README from the paper's study (needs graphviz's `dot`).
dag: install
	$(RUN) snakemake --configfile config/paper.yaml config/paper_pretrain.yaml --rulegraph > docs/rulegraph.dot.tmp
	dot -Tpng -Gdpi=110 docs/rulegraph.dot.tmp > docs/rulegraph.png.tmp
	mv docs/rulegraph.png.tmp docs/rulegraph.png
	rm -f docs/rulegraph.dot.tmp

# data_dir of the configs (config/config.yaml and config/paper.yaml both use results/data); override with
# `make clean-results DATA_DIR=...` for a study whose data_dir differs.
DATA_DIR ?= results/data

## Delete every result (models, predictions, metrics, tables, figures, logs) but keep results/README.md and the
## downloaded and converted data in $(DATA_DIR).
RESULTS_ABS := $(abspath results)
DATA_ABS := $(abspath $(DATA_DIR))
clean-results:
	find '$(RESULTS_ABS)' -mindepth 1 -path '$(DATA_ABS)' -prune -o ! -type d ! -path '$(RESULTS_ABS)/README.md' -print0 \
	  | xargs -0r rm -f
	find '$(RESULTS_ABS)' -mindepth 1 -path '$(DATA_ABS)' -prune -o -type d -print0 | sort -rz | xargs -0r rmdir --ignore-fail-on-non-empty

## Delete the downloaded, converted and preprocessed data ($(DATA_DIR)) as well; a later run downloads again.
clean-data: clean-results
	rm -rf $(DATA_DIR)
