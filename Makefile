# Two commands do all the set-up on a fresh machine with Python 3.11+:
#   make run    run TaskRelay on its embedded SQLite store, with the provider sandbox
#   make test   lint, type-check and run the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev
# Test processes (pytest-xdist): half of the suite's time is spent waiting on real processes,
# so two keep two cores busy. PYTEST_WORKERS=0 runs everything in this one process.
PYTEST_WORKERS ?= 2

.PHONY: run test lint install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The demo token and sandbox are defaults for trying TaskRelay out; set your own in production.
run: $(STAMP)
	$(BIN)/taskrelay serve --demo

lint: $(STAMP)
	$(BIN)/ruff check service tests migrations bench
	$(BIN)/ruff format --check service tests migrations bench
	$(BIN)/mypy

test: lint
	$(BIN)/pytest -n $(PYTEST_WORKERS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
