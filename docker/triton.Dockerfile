# The Triton side of docker-compose.yml: NVIDIA's Triton 24.10 image (tritonserver 2.51, the
# same server version the nvidia-pytriton wheel behind `make run` ships) plus the Python packages
# the step model (step_model/, copied into every model version) imports:
# numpy, torch (the KV pool and DLPack tensors) and ONNX Runtime (the graph).
#
# Build context: docker/ (this image needs no project files; the model repository is mounted).
#
# NOT BUILT OR RUN HERE: the machine these files were written on has no Docker engine. Read the
# version notes below before relying on it.
#
# Versions. tritonserver:24.10-py3 is Ubuntu 22.04 with Python 3.10 and CUDA 12.6 / cuDNN 9, and
# the Python-backend stub runs the image's python3, so every package must have a cp310 wheel:
#   * onnxruntime-gpu 1.31.1 (what requirements-gpu.txt pins and the H100 run used, on Python
#     3.12) publishes no Python 3.10 wheel; 1.23.2 is the newest that does (checked with
#     `pip index versions onnxruntime-gpu --python-version 3.10`), and it is built for CUDA 12 +
#     cuDNN 9, which this image carries. The exported graph (ONNX IR 9, opset 17, the contrib
#     ops GroupQueryAttention and FastGelu) is within what 1.23 runs, but this pairing has not
#     been through the parity tests.
#   * torch must be a CUDA build for the model to use the GPU: engine.py picks "cuda" only when
#     torch.cuda.is_available() and ONNX Runtime offers CUDAExecutionProvider, and otherwise
#     serves on the CPU. PyPI's torch 2.13.0 (the version requirements.txt pins) depends on the
#     CUDA 13 runtime packages (nvidia-*-cu13; driver >= 580), a second CUDA next to the image's
#     12.6. The default below is the CUDA 12.6 build of torch 2.9.1 from PyTorch's own index, a
#     release that index is known to carry for cu126; that index cannot be reached from the
#     machine these files were written on, so the pair is unchecked. The step model uses only
#     long-standing torch APIs (tensors on a device, streams, DLPack). Pass the index with
#     --build-arg TORCH_INDEX_URL=<PyTorch's cu126 wheel index> (or its CPU index for a CPU-only
#     Triton, dropping the GPU reservation in docker-compose.yml; onnxruntime-gpu still carries
#     the CPU provider). Without it, pip's configured index is used.
#   * numpy stays 1.x: Triton 2.51's Python-backend stub returns empty tensors with numpy 2.
ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:24.10-py3
FROM ${TRITON_IMAGE}

ARG TORCH_VERSION=2.9.1
ARG TORCH_INDEX_URL=""
ARG ORT_GPU_VERSION=1.23.2
ARG NUMPY_VERSION=1.26.4

# torch first, from its own index; numpy and ONNX Runtime last so their pins win.
RUN python3 -m pip install --no-cache-dir ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==${TORCH_VERSION}" \
 && python3 -m pip install --no-cache-dir "numpy==${NUMPY_VERSION}" "onnxruntime-gpu==${ORT_GPU_VERSION}" \
 && python3 -c "import numpy, onnxruntime, torch; print('numpy', numpy.__version__, '| onnxruntime', onnxruntime.__version__, onnxruntime.get_available_providers(), '| torch', torch.__version__)"

# docker-compose.yml mounts the model repository at /models, read-only.
EXPOSE 8000 8001 8002

# Same server options as embedded_triton/server.py (the Python backend's shared-memory sizes
# included); `command:` in docker-compose.yml may replace them.
CMD ["tritonserver", "--model-repository=/models", "--allow-metrics=true", \
     "--backend-config=python,shm-default-byte-size=16777216", \
     "--backend-config=python,shm-growth-byte-size=16777216", \
     "--log-verbose=0"]
