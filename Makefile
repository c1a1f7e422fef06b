# Every target that needs Python depends on the .venv it makes (idempotent, pinned by constraints.txt).
# `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
STAMP_AIRFLOW := $(VENV)/.installed-airflow
FLOOR_VENV := .venv-floor
FLOOR_AIRFLOW_VENV := .venv-floor-airflow

CONFIG ?= configs/train/smoke.yaml
SWEEP ?= configs/sweeps/default.yaml
WORKERS ?=
SUITE ?= configs/regression/smoke.yaml
PORT ?= 5000
ARGS ?=
BENCH_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install install-airflow train sweep report regress ui bench test test-fast test-kernels test-floor test-floor-airflow floor-deps lint format browser clean

help: ## Show this help
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | sed 's/$$(PORT)/$(PORT)/' | awk -v c="$$( [ -t 1 ] && printf '\033[36m' )" -v r="$$( [ -t 1 ] && printf '\033[0m' )" 'BEGIN {FS = ":.*?## "}; {printf "  %s%-18s%s %s\n", c, $$1, r, $$2}'
	@echo "  Variables: CONFIG=$(CONFIG) SWEEP=$(SWEEP) WORKERS=N SUITE=$(SUITE) PORT=$(PORT) ARGS='key=value ...' (test targets: pytest's) BENCH_ARGS='--quick ...' TEST_JOBS=$(TEST_JOBS) (0: one process)"

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e '.[dev,postgres]' 'setuptools>=77'
	touch $@

install: $(STAMP) ## Create .venv with the pinned dependencies (idempotent)

$(STAMP_AIRFLOW): $(STAMP)
	$(PIP) install -q -c constraints.txt -e '.[dev,postgres,airflow]'
	touch $@

install-airflow: $(STAMP_AIRFLOW) ## Add the optional Airflow 3 extra (for the DAG and its tests)

train: $(STAMP) ## Train one run: make train CONFIG=configs/train/smoke.yaml ARGS='model.cell=lstm'
	$(PY) -m pipeline train --config $(CONFIG) $(ARGS)

sweep: $(STAMP) ## Run the Optuna sweep (default: configs/sweeps/default.yaml, embedded stores)
	$(PY) -m pipeline sweep --config $(SWEEP) $(if $(WORKERS),--workers $(WORKERS)) $(ARGS)

report: $(STAMP) ## Write the comparison report for the last sweep under reports/
	$(PY) -m pipeline report $(ARGS)

regress: $(STAMP) ## Run the regression suite against laws and baseline (SUITE=...)
	$(PY) -m pipeline regress --suite $(SUITE) $(ARGS)

ui: $(STAMP) ## Serve the MLflow UI on 127.0.0.1:$(PORT) over the default store
	$(PY) -m pipeline ui --port $(PORT) $(ARGS)

bench: $(STAMP) ## Run the benchmarks and print the README table
	$(PY) -m benchmarks $(BENCH_ARGS)

# The test targets run pytest in TEST_JOBS processes (pytest-xdist, --dist worksteal); TEST_JOBS=0 runs
# one process (for -s, --pdb or a few tests). 2 suits a 2-core machine: the suite there took 8.4 to 10.3
# min against 13.4 in one process (README, "Development"). TEST_JOBS=auto takes one per core.
TEST_JOBS ?= 2
XDIST = -n $(TEST_JOBS) --dist worksteal

test: $(STAMP_AIRFLOW) ## Run the test suite in TEST_JOBS processes (installs what it needs)
	$(PY) -m pytest $(XDIST) $(ARGS)

test-fast: $(STAMP) ## Run the tests not marked slow
	$(PY) -m pytest $(XDIST) -m "not slow" $(ARGS)

# The tests that compare numbers (fused kernels against members alone, theory, independent computations,
# regression baselines) once more on another CPU's kernels: torch's unvectorised ops and MKL without AVX,
# as on an older x86 CPU (README, "Development"). Tests marked kernel_free (processes, records and faults,
# no number a kernel computes, or two runs compared on the same kernels) are left out.
NUMERIC_TESTS = tests/test_batched.py tests/test_regression.py tests/test_bptt.py tests/test_independent.py \
	tests/test_laws_fail.py tests/test_guard.py tests/test_diagnostics.py tests/test_cornn.py tests/test_lem.py \
	tests/test_modern.py tests/test_models.py tests/test_remedies.py tests/test_penalty.py tests/test_module.py \
	tests/test_api.py tests/test_api_modes.py tests/test_api_robust.py tests/test_api_memory.py tests/test_saturation.py \
	tests/test_api_setups.py
test-kernels: $(STAMP) ## Run the numeric tests again on other CPU kernels (no AVX)
	ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=SSE4_2 $(PY) -m pytest $(XDIST) -p no:cacheprovider -m "not kernel_free" $(NUMERIC_TESTS) $(ARGS)

# The oldest releases pyproject.toml admits (README, "Supported versions"), each set in a venv of its own,
# made afresh when pyproject.toml or its constraints file changes. setuptools: pyproject's build backend, for
# tests/test_packaging.py's wheel (built without isolation).
# Each venv is made in two steps: `.deps`, pyproject.toml's requirements with the extras (the long part,
# minutes), which writes nothing in the checkout, so `.ci/run` makes it while `make test` runs; then the
# package itself, editable (seconds), whose build writes its egg-info into the checkout.
FLOOR_TESTS ?=
requirements = $(PYTHON) -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
	print(*p['dependencies'], *(r for e in '$(1)'.split() for r in p['optional-dependencies'][e]), sep='\n')"

$(FLOOR_VENV)/.deps: pyproject.toml constraints-floor.txt
$(FLOOR_VENV)/.deps: CONSTRAINTS = constraints-floor.txt
$(FLOOR_VENV)/.deps: EXTRAS = dev postgres system-metrics
$(FLOOR_VENV)/.deps: MORE = 'setuptools>=77'
$(FLOOR_AIRFLOW_VENV)/.deps: pyproject.toml constraints-floor-airflow.txt
$(FLOOR_AIRFLOW_VENV)/.deps: CONSTRAINTS = constraints-floor-airflow.txt
$(FLOOR_AIRFLOW_VENV)/.deps: EXTRAS = dev postgres airflow
$(FLOOR_AIRFLOW_VENV)/.deps: MORE =

%/.deps:
	rm -rf $*
	$(PYTHON) -m venv $*
	$*/bin/python -m pip install -q --upgrade pip
	$(call requirements,$(EXTRAS)) > $*/requirements.txt
	$*/bin/python -m pip install -q -c $(CONSTRAINTS) -r $*/requirements.txt $(MORE)
	touch $@

# (.venv/.installed has a rule of its own above, which make takes over this one)
%/.installed: %/.deps
	$*/bin/python -m pip install -q --no-deps -e .
	touch $@

floor-deps: $(FLOOR_VENV)/.deps $(FLOOR_AIRFLOW_VENV)/.deps ## Install the floor venvs' dependencies only (nothing written in the checkout)

test-floor: $(FLOOR_VENV)/.installed ## The tests on the oldest releases pyproject.toml admits (FLOOR_TESTS=files; all by default)
	$(FLOOR_VENV)/bin/python -m pytest $(XDIST) -p no:cacheprovider $(FLOOR_TESTS) $(ARGS)

test-floor-airflow: $(FLOOR_AIRFLOW_VENV)/.installed ## The DAG's tests with the airflow extra at its oldest release
	$(FLOOR_AIRFLOW_VENV)/bin/python -m pytest $(XDIST) -p no:cacheprovider tests/test_dag.py $(ARGS)

lint: $(STAMP) ## ruff check, ruff format --check, mypy (strict on bptt/ and the shared floor)
	$(PY) -m ruff check pipeline dags tests benchmarks examples
	$(PY) -m ruff format --check pipeline dags tests benchmarks examples
	$(PY) -m mypy

format: $(STAMP) ## ruff format and the safe ruff fixes
	$(PY) -m ruff format pipeline dags tests benchmarks examples
	$(PY) -m ruff check --fix pipeline dags tests benchmarks examples

browser: ## Install Debian's chromium for the headless UI test (needs root / apt)
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)

clean: ## Remove the venv, local stores and outputs
	rm -rf $(VENV) $(FLOOR_VENV) $(FLOOR_AIRFLOW_VENV) mlflow.db mlflow.db-wal mlflow.db-shm mlflow.db.create-lock mlflow.db.creating-* mlruns mlartifacts optuna reports runs tutorial.db* img benchmarks/out test-output .pytest_cache *.egg-info
