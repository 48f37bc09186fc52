# Triton with the GPT-2 step model's Python packages (numpy, torch, onnx, ONNX Runtime), in two flavours
# from this one file, chosen by the build target (docker-compose.yml: TRITON_TARGET):
#
#   wheel  (default) the real tritonserver 2.51 of the nvidia-pytriton wheel, started by
#          embedded_triton/ exactly as `make run` starts it, on gpt2-serving/base:bookworm
#          (Debian 12, Python 3.11; docker/base/build.sh). Needs no image registry. CPU by default;
#          `--build-arg REQUIREMENTS=requirements-gpu.txt` installs onnxruntime-gpu and PyPI's
#          torch (a CUDA build) instead, for a GPU machine without NVIDIA's registry.
#   nvidia NVIDIA's Triton 24.10 image (tritonserver 2.51, the same server version) from nvcr.io,
#          for GPUs where that registry is reachable; `--build-arg TRITON_IMAGE=...` picks another.
#
# Build context: the repository root (the wheel flavour copies embedded_triton/ and the pins of
# requirements*.txt). BuildKit reads docker/triton.Dockerfile.dockerignore, the classic builder the
# root .dockerignore.
#
# The wheel flavour is built and run by tests/compose/ on a CPU (a request through the stack,
# Prometheus scraping Triton's nv_* series). The nvidia flavour was not built here (no registry).
ARG BASE_IMAGE=gpt2-serving/base:bookworm
ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:24.10-py3

# ------------------------------------------------------------------------------ wheel (default)
FROM ${BASE_IMAGE} AS wheel
# requirements-cpu.txt (onnxruntime) or requirements-gpu.txt (onnxruntime-gpu); torch, numpy, onnx
# and nvidia-pytriton come from requirements.txt's pins: the same versions as `make setup` installs.
ARG REQUIREMENTS=requirements-cpu.txt
# Where torch's CPU build comes from. docker/wheels/ first: `make compose-up` stages there the
# torch wheel the host's pip has on local disk, if any (PyPI's torch==2.13.0 is the CUDA build,
# several GB). Elsewhere pass PyTorch's CPU wheel index: --build-arg TORCH_INDEX_URL=<index>.
# docker/wheels/ is ignored for requirements-gpu.txt: there torch must be PyPI's CUDA build.
ARG TORCH_INDEX_URL=""

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

RUN (python3 -c "import ensurepip, venv" 2>/dev/null || \
      (apt-get update && apt-get install -y --no-install-recommends python3 python3-venv libpython3.11 ca-certificates \
       && rm -rf /var/lib/apt/lists/*)) \
 && python3 -m venv /opt/venv

COPY requirements.txt requirements-cpu.txt requirements-gpu.txt /tmp/req/
COPY docker/wheels/ /tmp/wheels/
RUN grep -hE '^(torch|numpy|onnx|nvidia-pytriton)==' /tmp/req/requirements.txt | cut -d' ' -f1 > /tmp/req/triton.txt \
 && grep -hE '^onnxruntime(-gpu)?==' "/tmp/req/${REQUIREMENTS}" | cut -d' ' -f1 >> /tmp/req/triton.txt \
 && cat /tmp/req/triton.txt \
 && links="$([ "$REQUIREMENTS" = requirements-cpu.txt ] && echo --find-links=/tmp/wheels || true)" \
 && pip install $links ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} -r /tmp/req/triton.txt \
 && rm -rf /tmp/req /tmp/wheels \
 && python -c "import numpy, onnx, onnxruntime, torch; print('numpy', numpy.__version__, '| onnxruntime', onnxruntime.__version__, onnxruntime.get_available_providers(), '| torch', torch.__version__)"

# The launcher only (embedded_triton/: the wheel's backend directory, the stub for this Python,
# the environment tritonserver needs). The step model's code ships inside each model version.
COPY embedded_triton/ /app/embedded_triton/
# The launcher's model health step speaks the wire contract (pure Python).
COPY step_model/__init__.py /app/step_model/__init__.py
COPY step_model/contract/ /app/step_model/contract/
WORKDIR /app
RUN useradd --create-home --uid 10002 triton
USER triton

# docker-compose.yml mounts the model repository at /models, read-only, and sets the ports.
ENV TRITON_HTTP_PORT=8000 TRITON_GRPC_PORT=8001 TRITON_METRICS_PORT=8002 TRITON_ADDRESS=0.0.0.0
EXPOSE 8000 8001 8002
CMD ["sh", "-c", "exec python -m embedded_triton --repository /models --address \"$TRITON_ADDRESS\" --http-port \"$TRITON_HTTP_PORT\" --grpc-port \"$TRITON_GRPC_PORT\" --metrics-port \"$TRITON_METRICS_PORT\" --timeout-s 900"]

# ------------------------------------------------------------------------------ nvidia
# Versions. tritonserver:24.10-py3 is Ubuntu 22.04 with Python 3.10 and CUDA 12.6 / cuDNN 9, and
# the Python-backend stub runs the image's python3, so every package must have a cp310 wheel:
#   * onnxruntime-gpu 1.31.1 (what requirements-gpu.txt pins and the H100 run used, on Python
#     3.12) publishes no Python 3.10 wheel; 1.23.2 is the newest that does, built for CUDA 12 +
#     cuDNN 9, which this image carries. The exported graph (ONNX IR 9, opset 17, the contrib
#     ops GroupQueryAttention and FastGelu) is within what 1.23 runs, but this pairing has not
#     been through the parity tests.
#   * torch must be a CUDA build for the model to use the GPU. PyPI's torch 2.13.0 depends on the
#     CUDA 13 runtime packages (driver >= 580), a second CUDA next to the image's 12.6. The
#     default below is torch 2.9.1; pass PyTorch's cu126 wheel index with
#     --build-arg TORCH_INDEX_URL=<index>. Without it, pip's configured index is used.
#   * numpy stays 1.x: Triton 2.51's Python-backend stub returns empty tensors with numpy 2.
FROM ${TRITON_IMAGE} AS nvidia
ARG TORCH_VERSION=2.9.1
ARG TORCH_INDEX_URL=""
ARG ORT_GPU_VERSION=1.23.2
ARG NUMPY_VERSION=1.26.4
ARG ONNX_VERSION=1.23.2
RUN python3 -m pip install --no-cache-dir ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==${TORCH_VERSION}" \
 && python3 -m pip install --no-cache-dir "numpy==${NUMPY_VERSION}" "onnx==${ONNX_VERSION}" "onnxruntime-gpu==${ORT_GPU_VERSION}" \
 && python3 -c "import numpy, onnx, onnxruntime, torch; print('numpy', numpy.__version__, '| onnxruntime', onnxruntime.__version__, onnxruntime.get_available_providers(), '| torch', torch.__version__)"
ENV TRITON_HTTP_PORT=8000 TRITON_GRPC_PORT=8001 TRITON_METRICS_PORT=8002 TRITON_ADDRESS=0.0.0.0
EXPOSE 8000 8001 8002
# Same server options as embedded_triton/server.py (the Python backend's shared-memory sizes
# included), on the ports and address the environment gives.
CMD ["sh", "-c", "exec tritonserver --model-repository=/models --allow-metrics=true --http-address=\"$TRITON_ADDRESS\" --grpc-address=\"$TRITON_ADDRESS\" --metrics-address=\"$TRITON_ADDRESS\" --http-port=\"$TRITON_HTTP_PORT\" --grpc-port=\"$TRITON_GRPC_PORT\" --metrics-port=\"$TRITON_METRICS_PORT\" --backend-config=python,shm-default-byte-size=16777216 --backend-config=python,shm-growth-byte-size=16777216 --log-verbose=0"]
