# The two front-door commands: `make demo` and `make test`. Both set everything up first.
PYTHON ?= python3
# The product and what it needs to run (demo, UI, benchmark): no optional extras. Spark Connect's
# client libraries are such an extra: pyspark imports pandas and pyarrow, when they are installed,
# on a run's first call into the JVM, which costs each run about 0.5 s.
VENV := .venv
BIN := $(VENV)/bin
# The test suite, linters and every extra (Spark Connect, PostgreSQL), apart from the product's.
DEV_VENV := .venv-dev
DEV_BIN := $(DEV_VENV)/bin
export DAGSTER_HOME := $(CURDIR)/dagster_home

.PHONY: demo test test-all ui lint bench clean

$(BIN)/dagster: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[bench]"
	$(BIN)/heartbeat-delta-jars
	touch $@

$(DEV_BIN)/pytest: pyproject.toml
	$(PYTHON) -m venv $(DEV_VENV)
	$(DEV_BIN)/pip install --quiet --upgrade pip
	$(DEV_BIN)/pip install --quiet -e ".[dev]"
	$(DEV_BIN)/heartbeat-delta-jars --s3
	touch $@

## Land the sample files, run the medallion job on local Spark, print the gold tables.
demo: $(BIN)/dagster
	$(BIN)/heartbeat-demo

## Run the test suite: the end-to-end oracle runs, a crash per layer, hostile input, sensors, the UI, units.
# One worker per core (pytest-xdist), each with its own Spark session; whole modules to a worker, so
# that a module's shared lakehouse is built once, in the order tests/conftest.py gives.
test: $(DEV_BIN)/pytest
	$(DEV_BIN)/pytest -q -m "not slow" -n auto --dist loadfile --no-loadscope-reorder

## Every test: also the cluster, Spark Connect and PostgreSQL servers, every kill point, operations.
test-all: $(DEV_BIN)/pytest
	$(DEV_BIN)/pytest -q

## The Dagster UI and daemon (sensors, schedule, run queue) on http://127.0.0.1:3000.
ui: $(BIN)/dagster
	$(BIN)/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000

# Spark Declarative Pipelines, the benchmark's peer, apart from the product's environment: the same
# pyspark, with the pipelines CLI and its Spark Connect client libraries.
DECLARATIVE_VENV := .venv-declarative
DECLARATIVE_BIN := $(DECLARATIVE_VENV)/bin

$(DECLARATIVE_BIN)/spark-pipelines: $(BIN)/dagster
	$(PYTHON) -m venv $(DECLARATIVE_VENV)
	$(DECLARATIVE_BIN)/pip install --quiet "pyspark[pipelines]==$$($(BIN)/python -c 'import pyspark; print(pyspark.__version__)')" "pandas>=2.2,<3"
	touch $@

## The benchmark against the notebook-style baseline (35-65 minutes by the machine; results in benchmarks/results/).
bench: $(BIN)/dagster $(DECLARATIVE_BIN)/spark-pipelines
	$(BIN)/python -m benchmarks.run

lint: $(DEV_BIN)/pytest
	$(DEV_BIN)/ruff check . && $(DEV_BIN)/ruff format --check .

## Remove generated tables, checkpoints, landed copies and Dagster run history.
clean:
	rm -rf data/landing data/lakehouse data/checkpoints data/.lakehouse.lock
	find dagster_home -mindepth 1 ! -name dagster.yaml -exec rm -rf {} +
