# The two front-door commands: `make demo` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export DAGSTER_HOME := $(CURDIR)/dagster_home

.PHONY: demo test ui lint bench clean

$(BIN)/dagster: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

## Land the sample files, run the medallion job on local Spark, print the gold tables.
demo: $(BIN)/dagster
	$(BIN)/heartbeat-demo

## Run the test suite.
test: $(BIN)/dagster
	$(BIN)/pytest -q

## The Dagster UI and daemon (sensors, schedule, run queue) on http://127.0.0.1:3000.
ui: $(BIN)/dagster
	$(BIN)/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000

## The benchmark against the notebook-style baseline (25-35 minutes; results in benchmarks/results/).
bench: $(BIN)/dagster
	$(BIN)/python -m benchmarks.run

lint: $(BIN)/dagster
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

## Remove generated tables, checkpoints, landed copies and Dagster run history.
clean:
	rm -rf data/landing data/lakehouse data/checkpoints data/.lakehouse.lock
	find dagster_home -mindepth 1 ! -name dagster.yaml -exec rm -rf {} +
