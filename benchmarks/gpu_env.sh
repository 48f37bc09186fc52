# Sourced by the GPU scripts: the environment of the GPU machine after the wheels of
# ../shared/device/stage.py are installed into /root/site (see docs/benchmarks.md).
export PYTHONPATH=/root/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
# Triton 2.51's Python stub needs numpy<2 (empty tensors with 2.x), but the image's transformers
# imports scipy, which needs numpy 2: only the stub gets the staged numpy 1.26.
mkdir -p /root/np1 && mv /root/site/numpy /root/site/numpy-1.26.4.dist-info /root/site/numpy.libs /root/np1/ 2>/dev/null
export TRITON_STUB_PYTHONPATH=/root/np1
PY=python3
