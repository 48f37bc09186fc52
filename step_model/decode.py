"""Decode runs of the step engine: one token per stepping slot over slots [first, first + b) of the
KV pool (first: the start of the lowest stepping slot's partition, step_model.slots).

Per (first, b), device buffers at fixed addresses and an ONNX Runtime IOBinding (`DecodeBuffers`): eager
ones cached least-recently-used; on the GPU with CUDA graphs, one captured graph per bucket
(`gpu_graph_id`), all bindings at fixed addresses. GroupQueryAttention's `total_sequence_length`
and TopK's K are host inputs read at capture time, so graph runs pass the pool's full context
(each row's own length comes from `seqlens_k`) and a fixed window (`graph_window`); a step that
needs a wider window runs eagerly.

Sessions: small buckets run the full graph (its own top-K tail was faster than torch's up to 64
rows) with ONNX Runtime's XQA attention; larger ones the graph pruned to logits, torch's top-K and
log-sum-exp (ORT's TopK and reductions were the slowest kernels of a 512-row step), and cuDNN's
flash attention (measured on the H200, 2026-11-30: 0.76 vs 2.3 ms of attention per 512-row step).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from step_model.contract import graph_io
from step_model.kernels import row_logsumexp
from step_model.ort_runtime import (
    DecodeBuffers,
    bind_kv,
    bind_tensor,
    env_var,
    input_block,
    make_session,
    pruned_to_logits,
)

__all__ = ["DecodeRunner", "DecodeSetup"]

log = logging.getLogger(__name__)

# Decode buckets on the GPU: a step over b live slots runs the smallest bucket >= b.
_GPU_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 448, 512, 640, 768, 1024)
_CACHED_BINDINGS = 32  # eager decode bindings kept (CPU: one per distinct b)


@dataclass(frozen=True)
class DecodeSetup:
    """Where decode runs: the engine's device, pool and stream, and the model's sizes."""

    device: torch.device
    device_kind: str
    device_id: int
    pool: torch.Tensor  # [L, 2, capacity, H, MAX, D]
    vocab_size: int
    max_context: int
    n_layer: int
    stream: Any  # torch.cuda.Stream, or None on the CPU


class DecodeRunner:
    """Owns the decode sessions and buffers; `on_evict(buffers)` is called before an eager
    buffer is dropped (the engine keeps the rows whose latest logits live there)."""

    def __init__(
        self,
        setup: DecodeSetup,
        model_path: Path,
        *,
        session: Any,
        strict_device: bool,
        threads: int,
        cuda_graphs: bool,
        graph_window: int,
        torch_tail: bool,
        xqa_max_rows: int,
        on_evict: Callable[[DecodeBuffers], None],
    ) -> None:
        self.setup = setup
        self.torch_tail = torch_tail
        self.graph_window = max(1, min(graph_window, setup.vocab_size))
        self.xqa_max_rows = xqa_max_rows
        self._on_evict = on_evict
        stream = setup.stream.cuda_stream if setup.stream is not None else None

        def open_session(model: Path | bytes, strict: bool, graphs: bool) -> Any:
            return make_session(
                model,
                device_kind=setup.device_kind,
                device_id=setup.device_id,
                cuda_stream=stream,
                strict_device=strict,
                threads=threads,
                cuda_graphs=graphs,
            )

        pruned: Path | bytes = pruned_to_logits(model_path) if torch_tail else model_path
        self.session = open_session(pruned, strict_device, False) if torch_tail else session
        self.cuda_graphs = cuda_graphs and setup.device_kind == "cuda"
        self._graphed: Any = None  # buckets <= xqa_max_rows
        self._graphed_large: Any = None  # larger buckets
        if self.cuda_graphs:
            try:
                with env_var("ORT_ENABLE_XQA", "1"):
                    self._graphed = open_session(model_path, True, True)
                with env_var("ORT_ENABLE_XQA", "0"):
                    self._graphed_large = open_session(pruned, True, True)
            except Exception as err:  # e.g. a node that cannot be captured: serve eagerly instead
                log.warning("CUDA graphs disabled, the graph session failed: %s", err)
                self.cuda_graphs = False
        capacity = setup.pool.shape[2]
        self.buckets: tuple[int, ...] = (
            tuple(sorted({b for b in _GPU_BUCKETS if b < capacity} | {capacity}))
            if setup.device_kind == "cuda"
            else ()  # CPU: run exactly the slots in use, padding rows cost real compute there
        )
        self._eager: OrderedDict[tuple[int, int], DecodeBuffers] = OrderedDict()
        self._graphs: dict[tuple[int, int], DecodeBuffers] = {}
        self.buffers: dict[int, DecodeBuffers] = {}  # by key: where a slot's latest logits live

    def disable_graphs(self) -> None:
        self.cuda_graphs, self._graphs, self._graphed, self._graphed_large = False, {}, None, None

    def buffers_for(
        self, first: int, hi: int, window: int, *, end: int | None = None, fixed: bool = False
    ) -> tuple[DecodeBuffers, bool]:
        """The buffers of a run over slots [first, >= hi) (and < `end`, the pool's end by default)
        returning `window` entries, and whether the run replays a CUDA graph. `fixed`: the run of
        the reserved invariant range, always the same graph when graphs are on, whatever the
        window (the graph's window may then be narrower than `window`: the caller takes its top-K
        from the logits)."""
        graphed = self.cuda_graphs and (window <= self.graph_window or fixed)
        if graphed:
            return self.graph_buffers(first, self.bucket(first, hi - first, end)), True
        decode = self._eager_buffers(first, self.bucket(first, hi - first, end) if self.buckets else hi - first)
        self._bind_window(decode, window)
        return decode, False

    def bucket(self, first: int, rows: int, end: int | None = None) -> int:
        """The smallest bucket >= rows, within the pool from `first` on (up to `end`)."""
        room = (self.setup.pool.shape[2] if end is None else end) - first
        i = int(np.searchsorted(self.buckets, rows))
        return min(self.buckets[min(i, len(self.buckets) - 1)], room)

    def _bind(self, binding: Any, name: str, tensor: torch.Tensor, *, output: bool) -> None:
        bind_tensor(binding, name, tensor, self.setup.device_kind, self.setup.device_id, output=output)

    def _new_buffers(self, first: int, b: int, session: Any, *, torch_tail: bool) -> DecodeBuffers:
        dev, setup = self.setup.device, self.setup
        block, staging, views = input_block(b, dev, pin=setup.device_kind == "cuda")
        inputs = views["device"]
        inputs["temperature"].fill_(1.0)
        decode = DecodeBuffers(
            rows=b,
            binding=session.io_binding(),
            input_ids=inputs["input_ids"],
            positions=inputs["positions"],
            seqlens_k=inputs["seqlens_k"],
            temperature=inputs["temperature"],
            inputs=block,
            staging=staging,
            staged=views["host"],
            total_length=np.array(setup.max_context, dtype=np.int32),
            window=np.array([1], dtype=np.int64),
            logits=torch.empty((b, setup.vocab_size), dtype=torch.float32, device=dev),
            lse=torch.empty(b, dtype=torch.float32, device=dev),
            gather_index=torch.arange(b, dtype=torch.int64, device=dev),
            session=session,
            torch_tail=torch_tail,
            first=first,
        )
        decode.key = len(self.buffers)
        while decode.key in self.buffers:
            decode.key += 1
        self.buffers[decode.key] = decode
        binding = decode.binding
        for name, tensor in (
            (graph_io.INPUT_IDS, decode.input_ids),
            (graph_io.POSITION_IDS, decode.positions),
            (graph_io.SEQLENS_K, decode.seqlens_k),
            (graph_io.GATHER_INDEX, decode.gather_index),
            (graph_io.TEMPERATURE, decode.temperature),
        ):
            self._bind(binding, name, tensor, output=False)
        bind_kv(binding, setup.pool[:, :, first : first + b], setup.device_kind, setup.device_id, setup.n_layer)
        self._bind(binding, graph_io.LOGITS, decode.logits, output=True)
        if not torch_tail:
            self._bind(binding, graph_io.LOGSUMEXP, decode.lse, output=True)
        return decode

    def graph_buffers(self, first: int, b: int) -> DecodeBuffers:
        decode = self._graphs.get((first, b))
        if decode is None:
            small = b <= self.xqa_max_rows
            session = self._graphed if small else self._graphed_large
            assert session is not None
            decode = self._new_buffers(first, b, session, torch_tail=self.torch_tail and not small)
            decode.graph_id = len(self._graphs)
            decode.binding.bind_cpu_input(graph_io.TOTAL_SEQUENCE_LENGTH, decode.total_length)
            self._bind_window(decode, self.graph_window)
            self._graphs[first, b] = decode
        return decode

    def _eager_buffers(self, first: int, b: int) -> DecodeBuffers:
        decode = self._eager.get((first, b))
        if decode is None:
            decode = self._new_buffers(first, b, self.session, torch_tail=self.torch_tail)
            self._eager[first, b] = decode
            if len(self._eager) > _CACHED_BINDINGS:
                _, evicted = self._eager.popitem(last=False)
                self._on_evict(evicted)
                del self.buffers[evicted.key]
        else:
            self._eager.move_to_end((first, b))
        return decode

    def _bind_window(self, decode: DecodeBuffers, window: int) -> None:
        if decode.topk_logits is not None and decode.topk_logits.shape[1] == window:
            return
        b, dev = decode.rows, self.setup.device
        decode.window[0] = window
        if not decode.torch_tail:  # the pruned decode graph has no TopK, hence no window input
            decode.binding.bind_cpu_input(graph_io.WINDOW, decode.window)
        decode.topk_logits = torch.empty((b, window), dtype=torch.float32, device=dev)
        decode.topk_ids = torch.empty((b, window), dtype=torch.int64, device=dev)
        if not decode.torch_tail:
            self._bind(decode.binding, graph_io.TOPK_LOGITS, decode.topk_logits, output=True)
            self._bind(decode.binding, graph_io.TOPK_IDS, decode.topk_ids, output=True)
        pin = self.setup.device_kind == "cuda"
        for name, tensor in (("topk_logits", decode.topk_logits), ("topk_ids", decode.topk_ids), ("lse", decode.lse)):
            decode.host[name] = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=pin)

    def fill(
        self,
        decode: DecodeBuffers,
        lengths: np.ndarray,
        slots: np.ndarray,
        tokens: np.ndarray,
        temperature: np.ndarray,
        *,
        fixed: bool = False,
    ) -> None:
        """Stage one run's inputs: stepping slots get their token, the rest a dummy at their own
        next position (`lengths`: every slot's cached tokens). `fixed`: an eager run attends over
        the pool's whole context, as a graph does, not as far as its longest row."""
        b, first = decode.rows, decode.first
        positions = np.minimum(lengths[first : first + b], self.setup.max_context - 1)
        # The host block is written in place and copied whole: the previous run's copy must be done
        # (the stream synchronises at the end of every run, so it is).
        host, mine = decode.staged, slots - first
        host["input_ids"][:] = 0
        host["input_ids"][mine, 0] = tokens
        host["positions"][:, 0] = positions
        host["seqlens_k"][:] = positions
        host["temperature"][:] = 1.0
        host["temperature"][mine] = temperature
        decode.inputs.copy_(decode.staging, non_blocking=True)
        if decode.graph_id < 0:  # eager runs attend exactly as far as the longest row
            decode.total_length[...] = self.setup.max_context if fixed else int(positions.max()) + 1
            decode.binding.bind_cpu_input(graph_io.TOTAL_SEQUENCE_LENGTH, decode.total_length)

    def run(self, decode: DecodeBuffers, *, graphed: bool, collect: bool = True) -> bool:
        """Run it; its window and log-sum-exp land in `decode.host` (`collect`; else they stay on
        the device, unsynchronised: a run ahead reads them there, step_model.ahead). Returns
        whether a captured graph was replayed (ONNX Runtime runs a graph eagerly twice before it
        captures it)."""
        if graphed:
            options = ort.RunOptions()
            options.add_run_config_entry("gpu_graph_id", str(decode.graph_id))
            decode.session.run_with_iobinding(decode.binding, options)
        else:
            decode.session.run_with_iobinding(decode.binding)
        replayed = graphed and decode.runs >= 2
        decode.runs += 1
        assert decode.topk_logits is not None and decode.topk_ids is not None
        if decode.torch_tail:
            torch.topk(decode.logits, decode.topk_logits.shape[1], dim=-1, out=(decode.topk_logits, decode.topk_ids))
        if decode.torch_tail:
            row_logsumexp(decode.logits, decode.lse)
        elif self.setup.device_kind != "cuda":
            # On the CPU the graph's own log-sum-exp depends on the row count (step_model.kernels);
            # each row's maximum is its window's first entry.
            row_logsumexp(decode.logits, decode.lse, decode.topk_logits[:, 0])
        if not collect:
            return replayed
        for name, tensor in (("topk_logits", decode.topk_logits), ("topk_ids", decode.topk_ids), ("lse", decode.lse)):
            decode.host[name].copy_(tensor, non_blocking=True)
        if self.setup.stream is not None:
            self.setup.stream.synchronize()
        return replayed
