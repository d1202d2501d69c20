# steptrack: everyday commands. `make run` and `make test` work on a fresh
# machine with Python 3.10+; each sets up .venv first when it is missing or
# older than the packaging files.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Extra arguments for `make run`, e.g. make run ARGS="--store memory:"
ARGS ?=

.PHONY: run test lint format check-format typecheck bench fuzz clean

$(STAMP): setup.py pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --constraint constraints.txt \
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

clean:
	rm -rf $(VENV) build dist *.egg-info twisted/plugins/dropin.cache
