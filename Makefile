# One-command entry points: `make test` and `make demo` work on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch is installed first so the `torch` extra resolves to it, not to a CUDA wheel.
TORCH_PIN ?= torch==2.13.0

.PHONY: test lint typecheck pytest demo bench install install-dev clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.core-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.dev-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q "$(TORCH_PIN)" || echo "torch unavailable: torch executor tests will skip"
	$(BIN)/python -m pip install -q -e ".[dev,bench]"
	touch $(VENV)/.core-installed $@

install: $(VENV)/.core-installed
install-dev: $(VENV)/.dev-installed

lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install-dev
	$(BIN)/mypy

pytest: install-dev
	$(BIN)/pytest

test: lint typecheck pytest

demo: install
	$(BIN)/loadsnap demo

bench: install-dev
	$(BIN)/python -m benchmarks.report

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
