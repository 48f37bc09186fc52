"""ONNX Runtime plumbing of the step engine: device choice, sessions (eager, CUDA-graph, pruned
to the logits), IOBinding of device tensors, and the per-bucket decode buffers. No sequence
state lives here: that is `step_model.engine`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from step_model.contract import graph_io

__all__ = [
    "DecodeBuffers",
    "available_device",
    "bind_kv",
    "bind_tensor",
    "env_var",
    "input_block",
    "make_session",
    "pruned_to_logits",
]

_ELEMENT_TYPES: dict[torch.dtype, type] = {
    torch.float16: np.float16,
    torch.float32: np.float32,
    torch.int64: np.int64,
    torch.int32: np.int32,
}


def available_device(preference: str = "auto") -> str:
    """'cuda' when asked or when auto and both torch and ONNX Runtime see a GPU, else 'cpu'."""
    gpu = torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers()
    if preference == "cuda" and not gpu:
        raise RuntimeError("device=cuda asked for, but torch or onnxruntime sees no CUDA GPU")
    if preference == "cpu":
        return "cpu"
    return "cuda" if gpu else "cpu"


@contextmanager
def env_var(name: str, value: str) -> Iterator[None]:
    """Set an environment variable for the duration (ONNX Runtime reads some kernel choices
    from the environment when a session creates its kernels)."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before


def pruned_to_logits(model_path: Path) -> bytes:
    """The step graph without its top-K / log-sum-exp tail (`graph_io.TAIL_OUTPUTS`): only the
    nodes the logits and the KV outputs depend on (the engine takes the tail with torch on the GPU)."""
    model = onnx.load(str(model_path))
    graph = model.graph
    keep_outputs = [o for o in graph.output if o.name == graph_io.LOGITS or graph_io.is_present(o.name)]
    needed = {o.name for o in keep_outputs}
    kept: list[onnx.NodeProto] = []
    for node in reversed(graph.node):  # nodes are in topological order
        if any(out in needed for out in node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    del graph.output[:]
    graph.output.extend(keep_outputs)
    inputs = [i for i in graph.input if i.name in needed]
    del graph.input[:]
    graph.input.extend(inputs)
    initializers = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    return model.SerializeToString()  # type: ignore[no-any-return]


@dataclass
class DecodeBuffers:
    """Device buffers and the IOBinding of decode runs over slots [first, first + rows) (fixed
    addresses); row i of every buffer is slot first + i."""

    rows: int
    binding: Any
    # The four inputs are views of ONE device block [3, b] int64 (ids, positions, then b int32
    # lengths and b float32 temperatures), so a step stages them with one copy from `staging`.
    input_ids: torch.Tensor  # [b, 1] int64
    positions: torch.Tensor  # [b, 1] int64
    seqlens_k: torch.Tensor  # [b] int32
    temperature: torch.Tensor  # [b] float32
    inputs: torch.Tensor  # [3, b] int64, the block the four views share
    staging: torch.Tensor  # [3, b] int64 on the host (pinned on the GPU), laid out as `inputs`
    staged: dict[str, np.ndarray]  # numpy views of `staging` by input name (`input_block`)
    total_length: np.ndarray  # [] int32 (host input)
    window: np.ndarray  # [1] int64 (host input)
    logits: torch.Tensor  # [b, V] float32
    lse: torch.Tensor  # [b] float32
    gather_index: torch.Tensor  # [b] int64, constant 0..b-1
    topk_logits: torch.Tensor | None = None  # [b, K]
    topk_ids: torch.Tensor | None = None
    host: dict[str, torch.Tensor] = field(default_factory=dict)  # pinned copies of the outputs
    graph_id: int = -1  # >= 0: replayed as this CUDA graph
    runs: int = 0
    key: int = 0  # this buffer's id in the engine's logits-home table
    session: Any = None  # the ONNX Runtime session this binding belongs to
    torch_tail: bool = False  # top-K / log-sum-exp by torch (the session runs the pruned graph)
    first: int = 0  # the first slot of the range


def input_block(rows: int, device: torch.device, *, pin: bool) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(device block [3, rows] int64, host staging block of the same layout, the views by name:
    "device" torch views of the block, "host" numpy views of the staging block: input_ids [rows, 1]
    int64, positions [rows, 1] int64, seqlens_k [rows] int32, temperature [rows] float32). One copy
    of the host block stages a decode run's four inputs."""
    block = torch.zeros((3, rows), dtype=torch.int64, device=device)
    staging = torch.zeros((3, rows), dtype=torch.int64, pin_memory=pin)

    def views(t: torch.Tensor) -> dict[str, torch.Tensor]:
        last = t[2]
        return {
            "input_ids": t[0].view(rows, 1),
            "positions": t[1].view(rows, 1),
            "seqlens_k": last.view(torch.int32)[:rows],
            "temperature": last.view(torch.float32)[rows:],
        }

    host = {name: view.numpy() for name, view in views(staging).items()}
    return block, staging, {"device": views(block), "host": host}


def make_session(
    model: Path | bytes,
    *,
    device_kind: str,
    device_id: int = 0,
    cuda_stream: int | None = None,
    strict_device: bool = False,
    threads: int = 0,
    cuda_graphs: bool = False,
) -> Any:
    """An InferenceSession on the CPU or the CUDA EP (sharing `cuda_stream` with torch, so copies
    into the KV pool are ordered with the runs); `cuda_graphs` captures replayable graphs."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    if device_kind == "cpu":
        # Triton, the gateway and this process share the cores: idle threads sleep instead of
        # spinning, so they do not take CPU time from the gateway between steps.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers: list[Any] = ["CPUExecutionProvider"]
    if device_kind == "cuda":
        cuda_options = {"device_id": str(device_id), "user_compute_stream": str(cuda_stream)}
        if cuda_graphs:
            cuda_options["enable_cuda_graph"] = "1"
        providers = [("CUDAExecutionProvider", cuda_options)]
        if strict_device or cuda_graphs:  # every node on the GPU, or session creation fails
            options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        else:
            providers.append("CPUExecutionProvider")
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, sess_options=options, providers=providers)


def bind_tensor(
    binding: Any, name: str, tensor: torch.Tensor, device_kind: str, device_id: int, *, output: bool
) -> None:
    """Bind a contiguous torch tensor by pointer as input or output `name`."""
    assert tensor.is_contiguous()
    args = (name, device_kind, device_id, _ELEMENT_TYPES[tensor.dtype], tuple(tensor.shape), tensor.data_ptr())
    (binding.bind_output if output else binding.bind_input)(*args)


def bind_kv(binding: Any, kv: torch.Tensor, device_kind: str, device_id: int, n_layer: int) -> None:
    """Bind past and present of every layer to the same block of `kv` [L, 2, b, H, S, D]."""
    element_type = _ELEMENT_TYPES[kv.dtype]
    for layer in range(n_layer):
        for half, kind in enumerate(graph_io.KV_KINDS):
            block = kv[layer, half]
            assert block.is_contiguous()
            shape, ptr = tuple(block.shape), block.data_ptr()
            binding.bind_input(graph_io.past(kind, layer), device_kind, device_id, element_type, shape, ptr)
            binding.bind_output(graph_io.present(kind, layer), device_kind, device_id, element_type, shape, ptr)
