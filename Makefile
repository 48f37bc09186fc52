# The README's vocabulary: run, test, lint, export, triton, bench. Everything else is set-up.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MODEL ?= gpt2
REPOSITORY ?= model_repository
PORT ?= 8080
REQUIREMENTS := $(if $(shell command -v nvidia-smi 2>/dev/null),requirements-gpu.txt,requirements.txt)

.PHONY: setup run test lint format export triton bench clean

$(BIN)/.installed: requirements.txt requirements-dev.txt requirements-gpu.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements-dev.txt -r $(REQUIREMENTS)
	touch $@

setup: $(BIN)/.installed ## create the virtual environment

run: setup ## export a default model if needed, start Triton + the gateway; Ctrl-C stops both
	$(BIN)/python -m embedded_triton.stack --model $(MODEL) --repository $(REPOSITORY) --port $(PORT)

test: setup ## the whole suite; real servers are started by fixtures
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

export: setup ## make export ARGS="--model path/to/checkpoint --name gpt2 --dtype fp16"
	$(BIN)/python -m export $(ARGS)

triton: setup ## only the embedded tritonserver on $(REPOSITORY)
	$(BIN)/python -m embedded_triton --repository $(REPOSITORY)

bench: setup ## load benchmark against a running gateway; see docs/benchmarks.md
	$(BIN)/python -m benchmarks.load $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
