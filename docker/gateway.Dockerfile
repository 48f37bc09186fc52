# The gateway (frontend/ and the contract it speaks, step_model/contract/): FastAPI + the
# continuous-batching scheduler, talking gRPC to Triton.
#
# Base: gpt2-serving/base:bookworm, a debootstrapped Debian 12 with Debian's Python 3.11
# (docker/base/build.sh; `make compose-up` builds it when missing: no image registry needed).
# Where a registry is reachable, `--build-arg BASE_IMAGE=debian:bookworm-slim` works too (the
# first RUN installs python3 and python3-venv when the base lacks them).
#
# Build context: the repository root. BuildKit reads docker/gateway.Dockerfile.dockerignore; the
# classic builder (docker-compose v1, a docker CLI without buildx) reads the root .dockerignore.
# Both keep .venv/, model_repository/, .env and build output out of the context.
#
# Dependencies: requirements.txt's pins, minus the packages only the exporter and the embedded
# Triton use (torch, onnx, onnxruntime, nvidia-pytriton): the gateway imports none of them (it
# loads only the tokenizer, with `transformers` and `tokenizers`). Built and run by
# tests/compose/ (the whole stack, an OpenAI SDK request through it).
ARG BASE_IMAGE=gpt2-serving/base:bookworm
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

RUN (python3 -c "import ensurepip, venv" 2>/dev/null || \
      (apt-get update && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
       && rm -rf /var/lib/apt/lists/*)) \
 && python3 -m venv /opt/venv

WORKDIR /app

COPY requirements.txt /tmp/requirements.txt
RUN grep -vE '^(torch|onnx|onnxruntime|nvidia-pytriton)==' /tmp/requirements.txt > /tmp/gateway-requirements.txt \
 && pip install -r /tmp/gateway-requirements.txt \
 && rm /tmp/requirements.txt /tmp/gateway-requirements.txt

# The gateway's code and the step model's contract it speaks (`step_model.contract`: tensor names,
# row statuses, metadata and config keys; pure Python). Only the contract: the rest of step_model/
# runs inside Triton and imports torch and ONNX Runtime, which this image does not install.
# tests/unit/test_contract.py checks that these lines copy every package `frontend` imports.
COPY frontend/ /app/frontend/
COPY step_model/__init__.py /app/step_model/__init__.py
COPY step_model/contract/ /app/step_model/contract/
COPY step_model/rows.py /app/step_model/rows.py

# Not root at run time. The model repository (tokenizer + metadata.json of each version) is
# mounted at /models read-only; the gateway writes nothing.
RUN useradd --create-home --uid 10001 gateway
USER gateway

ENV GATEWAY_REPOSITORY=/models \
    GATEWAY_HOST=0.0.0.0 \
    GATEWAY_PORT=8080
EXPOSE 8080

# Probes the port the gateway was given (GATEWAY_PORT), so host networking may move it.
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ.get('GATEWAY_PORT', '8080')}/health/ready\", timeout=2)"]

CMD ["python", "-m", "frontend"]
