# The README's vocabulary: run, test, lint, export, triton, bench. Everything else is set-up.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MODEL ?= gpt2
REPOSITORY ?= model_repository
PORT ?= 8080
# Triton models serving MODEL, one KV pool each (one per GPU where there are several): README
# "Several model instances (GPUs) on one host".
INSTANCES ?= 1
# Plain GPT-2 has no chat template: `make run` serves it with the example one, so chat clients
# (guidellm's default request type among them) work out of the box; CHAT_TEMPLATE= turns it off.
CHAT_TEMPLATE ?= $(if $(filter gpt2,$(MODEL)),examples/chat_template.jinja,)
REQUIREMENTS := $(if $(shell command -v nvidia-smi 2>/dev/null),requirements-gpu.txt,requirements-cpu.txt)
# Without nvidia-smi, torch's CPU build: uv's `--torch-backend cpu` knows where PyTorch publishes
# it. Where that cannot be reached, pip installs the build its own indexes offer (PyPI's is the
# CUDA build: several GB, but it runs on a CPU too).
TORCH_PIN := $(shell grep -E '^torch==' requirements.txt | cut -d' ' -f1)
UV := uv==0.13.9

.PHONY: setup run test test-unit test-api test-integration test-resilience lint format export triton bench clean \
	redis-server prometheus

$(BIN)/.installed: requirements.txt requirements-cpu.txt requirements-gpu.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@if [ "$(REQUIREMENTS)" = requirements-cpu.txt ]; then \
	  echo "no nvidia-smi: installing torch's CPU build ($(TORCH_PIN))"; \
	  $(BIN)/python -m pip install -q "$(UV)" && \
	  $(BIN)/python -m uv pip install -q --python $(BIN)/python --torch-backend cpu "$(TORCH_PIN)" || \
	  echo "torch's CPU build could not be fetched; pip installs the torch its indexes offer"; \
	fi
	$(BIN)/python -m pip install -q -r requirements-dev.txt -r $(REQUIREMENTS)
	touch $@

setup: $(BIN)/.installed ## create the virtual environment

run: setup ## export a default model if needed, start Triton + the gateway; Ctrl-C stops both
	GATEWAY_CHAT_TEMPLATE=$${GATEWAY_CHAT_TEMPLATE-$(CHAT_TEMPLATE)} \
	  $(BIN)/python -m embedded_triton.stack --model $(MODEL) --repository $(REPOSITORY) --port $(PORT) \
	  --instances $(INSTANCES)

test: setup redis-server prometheus kubectl ## unit, api, integration (+ manifests); real servers started by fixtures
	$(BIN)/python -m pytest --ignore=tests/resilience

# One tier at a time (the pytest markers of the same names): the first two need no server.
test-unit: setup ## pure functions: sampler, scheduler against a scripted backend, text, breaker
	$(BIN)/python -m pytest tests/unit

test-api: setup ## the gateway app with a fake engine: error shapes, validation, limits
	$(BIN)/python -m pytest tests/api

test-integration: setup redis-server prometheus ## real tritonserver / redis-server / Prometheus started by fixtures
	$(BIN)/python -m pytest tests/integration

test-resilience: setup redis-server prometheus ## the fault tier: real servers killed, frozen, flooded (CI runs it after make test)
	$(BIN)/python -m pytest tests/resilience

redis-server: ## the Redis tests start a real redis-server: install Debian's package when missing
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "installing redis-server (Debian package) for the Redis tests"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; }; }

prometheus: ## the dashboard test queries a real Prometheus: install Debian's package when missing
	@command -v prometheus >/dev/null 2>&1 || { \
	  echo "installing prometheus (Debian package) for the dashboard test"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null; }; }

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
	$(BIN)/python -m embedded_triton --repository $(REPOSITORY) --model $(MODEL) --instances $(INSTANCES)

bench: setup ## load benchmark against a running gateway; see docs/benchmarks.md
	$(BIN)/python -m benchmarks.load $(ARGS)

clean: ## the virtual environment, tool caches, and the embedded Triton's work directory
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache $(HOME)/.cache/gpt2-serving

# ------------------------------------------------------------------------------ containers
# README "Running with Docker Compose": every image is built here from this checkout (no image
# registry needed); docker/compose.sh starts a Docker engine when none answers.
.PHONY: compose-up compose-down test-compose kubectl test-balancer haproxy

compose-up: setup ## export a default model if needed, build the images, start the stack; returns once :8080 is ready
	@$(BIN)/python -c "import sys; from pathlib import Path; from embedded_triton.stack import export_default, has_version; \
	  repo = Path('$(REPOSITORY)'); has_version(repo, '$(MODEL)') or export_default(repo, '$(MODEL)')"
	GPT2_MODEL_REPOSITORY=$${GPT2_MODEL_REPOSITORY-$(abspath $(REPOSITORY))} GPT2_MODEL=$${GPT2_MODEL-$(MODEL)} \
	  GPT2_GATEWAY_PORT=$${GPT2_GATEWAY_PORT-$(PORT)} docker/compose.sh up

compose-down: ## stop and remove the stack's containers
	docker/compose.sh down

test-compose: setup ## the compose tier: build the images, a request through the stack, Prometheus's scrapes
	docker/engine.sh
	$(BIN)/python -m pytest -m compose tests/compose

kubectl: ## tests/deploy renders deploy/kubernetes with kubectl's kustomize: install the package when missing
	@command -v kubectl >/dev/null 2>&1 || { \
	  echo "installing kubectl (apt package) for the Kubernetes manifest test"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq kubectl >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq kubectl >/dev/null; }; }

test-balancer: setup redis-server haproxy ## the balancer tier: HAProxy in front of two real units, one killed under load
	$(BIN)/python -m pytest -m balancer tests/balancer

haproxy: ## tests/balancer runs deploy/balancer/haproxy.cfg: install Debian's package when missing
	@command -v haproxy >/dev/null 2>&1 || { \
	  echo "installing haproxy (Debian package) for the balancer tests"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy >/dev/null; }; }
