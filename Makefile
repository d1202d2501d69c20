# steptrack: everyday commands. `make run` and `make test` work on a fresh
# machine with Python 3.11+; each sets up .venv first when it is missing or
# older than the packaging files.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Extra arguments for `make run`, e.g. make run ARGS="--store memory:"
ARGS ?=
# Extra arguments for `make bench`, e.g. make bench BENCH_ARGS="--runs 5",
# BENCH_ARGS="--quick" (smoke run), or BENCH_ARGS="--steptrack-args='--workers 1'"
# (also measure steptrack with extra daemon arguments)
BENCH_ARGS ?=
# Python 2.7 for the Autobahn|Testsuite; empty: fuzz/run.sh finds one
PYTHON2 ?=

.PHONY: run test lint format check-format typecheck bench fuzz clean

$(STAMP): setup.py pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The build backend comes from constraints.txt too (no build isolation),
	# so a new setuptools cannot change how the project installs.
	$(BIN)/pip install --quiet --constraint constraints.txt setuptools wheel
	$(BIN)/pip install --quiet --constraint constraints.txt --no-build-isolation \
		--config-settings editable_mode=compat --editable '.[dev]'
	touch $(STAMP)

## run: set up and run the daemon in the foreground on the default ports
run: $(STAMP)
	$(BIN)/twistd --nodaemon --pidfile= steptrack $(ARGS)

## test: set up, lint, and run the whole test suite
test: lint
	$(BIN)/python -m pytest

## lint: formatting, ruff and mypy
lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy

## format: rewrite the code in the project's format
format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

## bench: measure steptrack beside the reference servers, as ratios (minutes; not part of test)
bench: $(STAMP)
	$(BIN)/python bench/run.py $(BENCH_ARGS)

## fuzz: run the Autobahn|Testsuite fuzzing client against a real daemon
fuzz: $(STAMP)
	PYTHON2='$(PYTHON2)' bash fuzz/run.sh

clean:
	rm -rf $(VENV) build dist *.egg-info twisted/plugins/dropin.cache
