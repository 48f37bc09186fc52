# The gateway (frontend/ and the contract it speaks, step_model/contract/): FastAPI + the
# continuous-batching scheduler, talking gRPC to Triton.
#
# Build context: the repository root (docker-compose.yml sets it); docker/gateway.Dockerfile.dockerignore
# keeps the virtualenv, model_repository/, .env and build output out of the context.
#
# Dependencies: requirements.txt's pins, minus the packages only the exporter and the embedded
# Triton use (torch, onnx, onnxruntime, nvidia-pytriton): the gateway imports none of them (it
# loads only the tokenizer, with `transformers` and `tokenizers`). That reduced set was checked
# on this project's machine: a fresh Python 3.11 venv with exactly these pins served /generate
# from a copy of frontend/ against a real tritonserver. The image itself was not built here (no
# Docker engine).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

COPY requirements.txt /tmp/requirements.txt
RUN grep -vE '^(torch|onnx|onnxruntime|nvidia-pytriton)==' /tmp/requirements.txt > /tmp/gateway-requirements.txt \
 && python -m pip install -r /tmp/gateway-requirements.txt \
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

HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/health/ready', timeout=2)"]

CMD ["python", "-m", "frontend", "--host", "0.0.0.0", "--port", "8080"]
