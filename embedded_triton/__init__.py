"""Run the real `tritonserver` that ships inside the nvidia-pytriton wheel, with no Docker.

`TritonServer` prepares a backend directory (the wheel's Python backend plus the stub built for
the running Python), starts the binary on a model repository with the environment it needs
(the wheel's bundled libraries, this interpreter's `bin/` first on PATH so the stub imports the
project's numpy/onnxruntime/torch), waits until it is ready and stops it cleanly.
"""

from embedded_triton.server import PortInUse, StopFlag, TritonNotReady, TritonPorts, TritonServer, find_wheel

__all__ = ["PortInUse", "StopFlag", "TritonNotReady", "TritonPorts", "TritonServer", "find_wheel"]
