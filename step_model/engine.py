"""The decoding-step engine: ONNX Runtime sessions, a KV pool resident on the device, and the
table of live sequences.

It is the part of the Triton model that does not know Triton, so the exporter's parity check,
the benchmarks and the unit tests drive exactly the code that serves. The same code runs on the
CPU and CUDA execution providers; only the device of the torch buffers and the providers differ.

KV pool: one tensor [n_layer, 2, capacity, n_head, max_context, head_dim] on the device. A live
sequence owns one slot (a batch row). Because the slot is the outer dimension of each layer's
[capacity, H, MAX, D] block, rows [0, b) are contiguous and are bound to GroupQueryAttention's
past/present by pointer: a decode step copies no KV at all.

A decode run covers slots [0, b), b >= highest stepping slot + 1 (slots are handed out lowest
first, so b tracks the live count; on the GPU b is rounded up to a bucket so that a captured CUDA
graph can be replayed). Rows in that range that are not stepping run a harmless dummy token at
their own next position: GroupQueryAttention writes it just past the row's cached length, which
the row's next real step overwrites, and nothing reads it before. A prefill runs in a scratch
buffer (rows of different lengths, right-padded) and is copied into the new sequences' slots.

Per-row outcomes: a row the table refuses (no free slot for a start row, an unknown sequence, a
malformed row) gets a `RowStatus` and changes nothing; the other rows run. Only a malformed
request (shapes, a sequence named twice) fails as a whole.

Host work per step is array operations over the rows, independent of their number (no Python
loop over rows); inputs and outputs live in per-bucket device buffers, outputs come back through
pinned host memory with one stream synchronisation per run.

CUDA graphs (GPU, `cuda_graphs=True`): a second session with ONNX Runtime's `enable_cuda_graph`
replays one captured graph per decode bucket (`gpu_graph_id`), all bindings at fixed addresses.
GroupQueryAttention's `total_sequence_length` and TopK's K are host inputs read at capture time,
so graph runs pass the pool's full context (each row's own length comes from `seqlens_k`) and a
fixed window (`graph_window`); a step that needs a wider window runs eagerly.

Thread safety: `step` and the idle sweep may run on different threads; `_lock` guards the table.
"""

from __future__ import annotations

import heapq
import json
import logging
import threading
import time
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass, replace
from itertools import repeat
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from step_model import contract
from step_model.contract import RowStatus
from step_model.ort_runtime import (
    DecodeBuffers,
    available_device,
    bind_kv,
    bind_tensor,
    env_var,
    make_session,
    pruned_to_logits,
)
from step_model.rows import EngineError, InvalidRequest, StepRequest, StepResult, check_shapes, row_status

# The engine's public surface (request types and errors live in step_model.rows).
__all__ = [
    "EngineError",
    "EngineStats",
    "InvalidRequest",
    "ModelMeta",
    "StepEngine",
    "StepRequest",
    "StepResult",
    "available_device",
]

log = logging.getLogger(__name__)

# Decode buckets on the GPU: a step over b live slots runs the smallest bucket >= b.
_GPU_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 448, 512, 640, 768, 1024)
_CACHED_BINDINGS = 32  # eager decode bindings kept per session (CPU: one per distinct b)


@dataclass
class EngineStats:
    capacity: int
    max_context: int
    live_sequences: int = 0
    cached_tokens: int = 0
    prefill_tokens_total: int = 0
    decode_tokens_total: int = 0
    steps_total: int = 0
    rows_total: int = 0
    live_at_step_total: int = 0  # live sequences at the start of each step, summed
    rejected_full_total: int = 0
    idle_evicted_total: int = 0
    ended_total: int = 0
    graph_replays_total: int = 0


@dataclass(frozen=True)
class ModelMeta:
    """What the exporter recorded next to the graph (metadata.json)."""

    n_layer: int
    n_head: int
    head_dim: int
    vocab_size: int
    max_context: int
    dtype: str
    eos_token_id: int

    @classmethod
    def load(cls, version_dir: Path) -> ModelMeta:
        data = json.loads((version_dir / contract.VERSION_METADATA).read_text())
        return cls(
            n_layer=data[contract.META_N_LAYER],
            n_head=data[contract.META_N_HEAD],
            head_dim=data[contract.META_HEAD_DIM],
            vocab_size=data[contract.META_VOCAB_SIZE],
            max_context=data[contract.META_MAX_CONTEXT],
            dtype=data[contract.META_DTYPE],
            eos_token_id=data[contract.META_EOS_TOKEN_ID],
        )


class StepEngine:
    """Runs decoding steps for many sequences at once; see the module docstring."""

    def __init__(
        self,
        model_path: Path,
        meta: ModelMeta,
        *,
        capacity: int,
        idle_timeout_s: float = 60.0,
        device: str = "auto",
        device_id: int = 0,
        strict_device: bool = False,
        cuda_graphs: bool = False,
        graph_window: int = 64,
        torch_tail: bool | None = None,
        xqa_max_rows: int = 64,
        threads: int = 0,
        clock: Any = time.monotonic,
    ) -> None:
        self.meta = meta
        self.capacity = capacity
        self.idle_timeout_s = idle_timeout_s
        self._clock = clock
        self.device_kind = available_device(device)
        self.device = torch.device("cuda", device_id) if self.device_kind == "cuda" else torch.device("cpu")
        self._device_id = device_id
        self.dtype = torch.float16 if meta.dtype == "fp16" else torch.float32
        self._stream: Any = None
        if self.device_kind == "cuda":
            # A stream of our own (not the legacy default stream) shared with ORT below. Current
            # streams are per thread and Triton may call execute from another thread than
            # initialize, so every step enters it explicitly (see `step`).
            torch.cuda.set_device(self.device)
            self._stream = torch.cuda.Stream(self.device)
            torch.cuda.set_stream(self._stream)
        # Top-K and log-sum-exp of decode runs: torch's kernels on the GPU (ONNX Runtime's TopK
        # and reductions were the slowest kernels of a 512-row step), the graph's own on the CPU.
        # Decode sessions then run a copy of the graph pruned to `logits` and the KV outputs.
        self.torch_tail = self.device_kind == "cuda" if torch_tail is None else torch_tail
        pruned: Path | bytes = pruned_to_logits(model_path) if self.torch_tail else model_path
        self.session = self._make_session(model_path, strict_device, threads, graphs=False)
        self._decode_session = (
            self._make_session(pruned, strict_device, threads, graphs=False) if self.torch_tail else self.session
        )
        self.cuda_graphs = cuda_graphs and self.device_kind == "cuda"
        self.graph_window = max(1, min(graph_window, meta.vocab_size))
        # Attention kernel by batch size (measured on the H200, 2026-11-30): ONNX Runtime's XQA
        # decode kernel is faster up to ~64 rows, its cuDNN flash path beyond (0.76 vs 2.3 ms of
        # attention per 512-row step). The choice is read when a session is created.
        self.xqa_max_rows = xqa_max_rows
        self._graphed: Any = None  # buckets <= xqa_max_rows
        self._graphed_large: Any = None  # larger buckets
        if self.cuda_graphs:
            try:
                # Small buckets: the full graph (its own top-K tail was faster than torch's up
                # to 64 rows) with XQA; large buckets: the pruned graph, torch's tail, cuDNN.
                with env_var("ORT_ENABLE_XQA", "1"):
                    self._graphed = self._make_session(model_path, True, threads, graphs=True)
                with env_var("ORT_ENABLE_XQA", "0"):
                    self._graphed_large = self._make_session(pruned, True, threads, graphs=True)
            except Exception as err:  # e.g. a node that cannot be captured: serve eagerly instead
                log.warning("CUDA graphs disabled, the graph session failed: %s", err)
                self.cuda_graphs = False
        shape = (meta.n_layer, 2, capacity, meta.n_head, meta.max_context, meta.head_dim)
        self.pool = torch.zeros(shape, dtype=self.dtype, device=self.device)
        # Last step's logits per slot, so a caller whose top-K window fell short can fetch the row.
        self.last_logits = torch.zeros((capacity, meta.vocab_size), dtype=torch.float32, device=self.device)
        # The sequence table, as arrays indexed by slot plus one id -> slot map.
        self._slot_of: dict[int, int] = {}
        self._length = np.zeros(capacity, dtype=np.int64)  # tokens cached; 0 for a free slot
        self._last_used = np.zeros(capacity, dtype=np.float64)
        self._sequence_of = np.zeros(capacity, dtype=np.uint64)
        self._free_slots = list(range(capacity))  # a heap: lowest slot first keeps b small
        self._buckets = self._bucket_sizes()
        self._eager: OrderedDict[int, DecodeBuffers] = OrderedDict()
        self._graphs: dict[int, DecodeBuffers] = {}
        # Where each slot's latest logits live: -1 = `last_logits`, else the key of the decode
        # buffer that produced them. Decode runs leave their rows in their own buffer; rows are
        # copied into `last_logits` only when that buffer is about to be overwritten while the
        # row did not step (a bystander of another caller's step) or evicted, or when fetched.
        self._home = np.full(capacity, -1, dtype=np.int64)
        self._buffers: dict[int, DecodeBuffers] = {}
        self._lock = threading.Lock()
        self.stats = EngineStats(capacity=capacity, max_context=meta.max_context)

    # ----------------------------------------------------------------------------- set-up
    def _make_session(self, model: Path | bytes, strict_device: bool, threads: int, *, graphs: bool) -> Any:
        stream = self._stream.cuda_stream if self._stream is not None else None
        return make_session(
            model,
            device_kind=self.device_kind,
            device_id=self._device_id,
            cuda_stream=stream,
            strict_device=strict_device,
            threads=threads,
            cuda_graphs=graphs,
        )

    def _bucket_sizes(self) -> tuple[int, ...]:
        if self.device_kind != "cuda":
            return ()  # CPU: run exactly the slots in use, padding rows cost real compute there
        return tuple(sorted({b for b in _GPU_BUCKETS if b < self.capacity} | {self.capacity}))

    def warm_up(self) -> None:
        """Capture every decode bucket's CUDA graph now instead of at its first use."""
        if not self.cuda_graphs:
            return
        with self._lock, self._on_stream():
            try:
                for b in self._buckets:
                    decode = self._graph_decode(b)
                    while decode.runs < 3:  # ORT runs a graph eagerly before it captures it
                        self._fill_decode(decode, np.zeros(0, dtype=np.int64), np.zeros(0), np.zeros(0))
                        self._run_decode_binding(decode, graphed=True)
            except Exception as err:
                log.warning("CUDA graphs disabled, capture failed: %s", err)
                self.cuda_graphs, self._graphs, self._graphed, self._graphed_large = False, {}, None, None

    def _on_stream(self) -> Any:
        return torch.cuda.stream(self._stream) if self._stream is not None else nullcontext()

    # ----------------------------------------------------------------------------- state
    def live_sequences(self) -> int:
        with self._lock:
            return len(self._slot_of)

    def snapshot(self) -> EngineStats:
        with self._lock:
            self.stats.live_sequences = len(self._slot_of)
            self.stats.cached_tokens = int(self._length.sum())
            return replace(self.stats)

    def evict_idle(self) -> int:
        """Free sequences untouched for idle_timeout_s (a caller that vanished); returns count."""
        deadline = self._clock() - self.idle_timeout_s
        with self._lock:
            live = np.fromiter(self._slot_of.values(), dtype=np.int64, count=len(self._slot_of))
            stale = live[self._last_used[live] < deadline]
            self._free_slots_of(stale)
            self.stats.idle_evicted_total += int(stale.size)
        return int(stale.size)

    def _free_slots_of(self, slots: np.ndarray) -> None:
        for slot in slots.tolist():  # per freed sequence, not per row of a step
            del self._slot_of[int(self._sequence_of[slot])]
            heapq.heappush(self._free_slots, slot)
        self._length[slots] = 0
        self._home[slots] = -1

    def _slots(self, sequence_ids: np.ndarray) -> np.ndarray:
        """Slot of each id, -1 where unknown (dict lookups in C, no Python loop)."""
        n = int(sequence_ids.shape[0])
        return np.fromiter(map(self._slot_of.get, sequence_ids.tolist(), repeat(-1)), dtype=np.int64, count=n)

    # ----------------------------------------------------------------------------- validation
    # ----------------------------------------------------------------------------- stepping
    def step(self, requests: list[StepRequest]) -> list[StepResult | EngineError]:
        """Run one step for every request; a malformed one gets its error, others go on."""
        with self._lock, self._on_stream():
            return self._step_locked(requests)

    def _step_locked(self, requests: list[StepRequest]) -> list[StepResult | EngineError]:
        now = self._clock()
        outcomes: list[StepResult | EngineError] = []
        claimed: set[int] = set()
        free_left = len(self._free_slots)
        parts: list[tuple[StepRequest, np.ndarray, StepResult]] = []
        for req in requests:
            try:
                check_shapes(req, claimed, self.meta.vocab_size)
            except EngineError as err:
                outcomes.append(err)
                continue
            slots = self._slots(req.sequence_ids)
            cached = np.where(slots >= 0, self._length[np.maximum(slots, 0)], 0)
            status, messages, refused_full = row_status(
                req, slots >= 0, cached, free_left, vocab_size=self.meta.vocab_size, max_context=self.meta.max_context
            )
            self.stats.rejected_full_total += refused_full
            free_left -= int((req.start & (status == RowStatus.OK)).sum())
            n = status.shape[0]
            result = StepResult(
                status,
                np.zeros((n, req.window), dtype=np.float32),
                np.zeros((n, req.window), dtype=np.int64),
                np.zeros(n, dtype=np.float32),
                messages=messages,
            )
            parts.append((req, slots, result))
            outcomes.append(result)
        if not parts:
            return outcomes
        self.stats.live_at_step_total += len(self._slot_of)  # before this step's prefills
        window = max(req.window for req, _, _ in parts)
        self._prompt_logprobs(parts)  # before the prefill: it reads the requests only
        self._run_prefills(parts, window, now)
        self._run_decodes(parts, window, now)
        self._finish(parts, now)
        self.stats.steps_total += 1
        self.stats.rows_total += sum(int(r.status.shape[0]) for _, _, r in parts)
        return outcomes

    def _run_prefills(self, parts: list[tuple[StepRequest, np.ndarray, StepResult]], window: int, now: float) -> None:
        chosen = [
            (req, slots, res, np.flatnonzero(req.start & (res.status == RowStatus.OK))) for req, slots, res in parts
        ]
        chosen = [c for c in chosen if c[3].size]
        if not chosen:
            return
        lengths = np.concatenate([req.lengths[rows] for req, _, _, rows in chosen]).astype(np.int64)
        b, s = int(lengths.shape[0]), int(lengths.max())
        input_ids = np.zeros((b, s), dtype=np.int64)
        at = 0
        for req, _, _, rows in chosen:  # per request, not per row
            width = min(s, req.input_ids.shape[1])
            input_ids[at : at + rows.size, :width] = req.input_ids[rows, :width]
            at += rows.size
        input_ids[np.arange(s)[None, :] >= lengths[:, None]] = 0
        new_slots = np.array([heapq.heappop(self._free_slots) for _ in range(b)], dtype=np.int64)
        scratch = torch.empty(
            (self.meta.n_layer, 2, b, self.meta.n_head, s, self.meta.head_dim), dtype=self.dtype, device=self.device
        )
        feeds = {
            "input_ids": input_ids,
            "position_ids": np.broadcast_to(np.arange(s, dtype=np.int64), (b, s)).copy(),
            "seqlens_k": (lengths - 1).astype(np.int32),
            "total_sequence_length": np.array(s, dtype=np.int32),  # == S: GQA's first-prompt mode
            "gather_index": np.arange(b, dtype=np.int64) * s + lengths - 1,
            "temperature": np.concatenate([req.temperature[rows] for req, _, _, rows in chosen]).astype(np.float32),
            "window": np.array([window], dtype=np.int64),
        }
        logits, topk_logits, topk_ids, lse = self._run_eager(feeds, scratch, b)
        index = torch.from_numpy(new_slots).to(self.device)
        # Copy the prompts' keys/values into their slots (positions past a row's length are
        # padding; they are overwritten by the row's next steps before anything reads them).
        self.pool[:, :, index, :, :s, :] = scratch
        self.last_logits.index_copy_(0, index, logits)
        self._home[new_slots] = -1
        at = 0
        for req, slots, res, rows in chosen:
            ids = req.sequence_ids[rows]
            taken = new_slots[at : at + rows.size]
            slots[rows] = taken
            self._slot_of.update(zip(ids.tolist(), taken.tolist(), strict=True))
            self._sequence_of[taken] = ids
            self._length[taken] = lengths[at : at + rows.size]
            self._last_used[taken] = now
            k = req.window
            res.topk_logits[rows], res.topk_ids[rows] = (
                topk_logits[at : at + rows.size, :k],
                topk_ids[at : at + rows.size, :k],
            )
            res.logsumexp[rows] = lse[at : at + rows.size]
            at += rows.size
        self.stats.prefill_tokens_total += int(lengths.sum())

    def _prompt_logprobs(self, parts: list[tuple[StepRequest, np.ndarray, StepResult]]) -> None:
        """OpenAI's `echo` logprobs: one extra eager pass over the prompts of the start rows that ask,
        reading the logits at EVERY position (gather_index over all of them) at temperature 1, into
        throw-away KV buffers. (Not folded into the prefill itself: that pass gathers only each
        row's last position, and echo requests are rare.)"""
        for req, _, res in parts:
            if req.prompt_logprobs is None:
                continue
            n, width = req.input_ids.shape
            k = max(1, int(req.prompt_logprobs.max(initial=0)))
            res.prompt_logprobs = np.zeros((n, width), dtype=np.float32)
            res.prompt_top_ids = np.zeros((n, width, k), dtype=np.int64)
            res.prompt_top_logprobs = np.zeros((n, width, k), dtype=np.float32)
            rows = np.flatnonzero(req.start & (res.status == RowStatus.OK) & (req.prompt_logprobs >= 0))
            if not rows.size:
                continue
            lengths = req.lengths[rows].astype(np.int64)
            b, s = int(rows.size), int(lengths.max())
            ids = req.input_ids[rows, :s].astype(np.int64).copy()
            ids[np.arange(s)[None, :] >= lengths[:, None]] = 0
            scratch = torch.empty(
                (self.meta.n_layer, 2, b, self.meta.n_head, s, self.meta.head_dim), dtype=self.dtype, device=self.device
            )
            feeds: dict[str, np.ndarray] = {
                "input_ids": ids,
                "position_ids": np.broadcast_to(np.arange(s, dtype=np.int64), (b, s)).copy(),
                "seqlens_k": (lengths - 1).astype(np.int32),
                "total_sequence_length": np.array(s, dtype=np.int32),
                "gather_index": np.arange(b * s, dtype=np.int64),  # every position of every row
                "temperature": np.ones(b * s, dtype=np.float32),
                "window": np.array([k], dtype=np.int64),
            }
            logits, top_values, top_ids, lse = self._run_eager(feeds, scratch, b * s)
            # Position t predicts token t + 1: log p(ids[t + 1] | ids[: t + 1]) = logit - logsumexp.
            nxt = torch.from_numpy(np.concatenate([ids[:, 1:], np.zeros((b, 1), dtype=np.int64)], axis=1))
            picked = logits.view(b, s, -1).gather(2, nxt.to(self.device).view(b, s, 1)).view(b, s).cpu().numpy()
            lse2 = lse.reshape(b, s)
            valid = np.arange(1, s)[None, :] < lengths[:, None]  # [b, s - 1]: positions 1..len-1
            res.prompt_logprobs[rows, 1:s] = np.where(valid, picked[:, :-1] - lse2[:, :-1], 0.0)
            tops = (top_values.reshape(b, s, k) - lse2[:, :, None])[:, :-1]
            res.prompt_top_logprobs[rows, 1:s] = np.where(valid[:, :, None], tops, 0.0)
            res.prompt_top_ids[rows, 1:s] = np.where(valid[:, :, None], top_ids.reshape(b, s, k)[:, :-1], 0)

    def _run_decodes(self, parts: list[tuple[StepRequest, np.ndarray, StepResult]], window: int, now: float) -> None:
        chosen = [
            (req, slots, res, np.flatnonzero(~req.start & (req.lengths == 1) & (res.status == RowStatus.OK)))
            for req, slots, res in parts
        ]
        chosen = [c for c in chosen if c[3].size]
        if not chosen:
            return
        step_slots = np.concatenate([slots[rows] for _, slots, _, rows in chosen])
        tokens = np.concatenate([req.input_ids[rows, 0] for req, _, _, rows in chosen]).astype(np.int64)
        temperature = np.concatenate([req.temperature[rows] for req, _, _, rows in chosen]).astype(np.float32)
        hi = int(step_slots.max()) + 1
        graphed = self.cuda_graphs and window <= self.graph_window
        if graphed:
            decode = self._graph_decode(self._bucket(hi))
        else:
            decode = self._eager_decode(self._bucket(hi) if self._buckets else hi)
            self._bind_window(decode, window)
        self._fill_decode(decode, step_slots, tokens, temperature)
        self._save_bystanders(decode, step_slots)
        self._run_decode_binding(decode, graphed=graphed)
        host = decode.host
        self._home[step_slots] = decode.key
        self._length[step_slots] += 1
        self._last_used[step_slots] = now
        at = 0
        for req, _, res, rows in chosen:
            mine = step_slots[at : at + rows.size]
            k = req.window
            res.topk_logits[rows] = host["topk_logits"].numpy()[mine, :k]
            res.topk_ids[rows] = host["topk_ids"].numpy()[mine, :k]
            res.logsumexp[rows] = host["lse"].numpy()[mine]
            at += rows.size
        self.stats.decode_tokens_total += int(step_slots.size)

    def _bucket(self, rows: int) -> int:
        i = int(np.searchsorted(self._buckets, rows))
        return self._buckets[min(i, len(self._buckets) - 1)]

    # ----------------------------------------------------------------------------- decode buffers
    def _new_decode(self, b: int, session: Any, *, torch_tail: bool) -> DecodeBuffers:
        dev = self.device
        decode = DecodeBuffers(
            rows=b,
            binding=session.io_binding(),
            input_ids=torch.zeros((b, 1), dtype=torch.int64, device=dev),
            positions=torch.zeros((b, 1), dtype=torch.int64, device=dev),
            seqlens_k=torch.zeros(b, dtype=torch.int32, device=dev),
            temperature=torch.ones(b, dtype=torch.float32, device=dev),
            total_length=np.array(self.meta.max_context, dtype=np.int32),
            window=np.array([1], dtype=np.int64),
            logits=torch.empty((b, self.meta.vocab_size), dtype=torch.float32, device=dev),
            lse=torch.empty(b, dtype=torch.float32, device=dev),
            gather_index=torch.arange(b, dtype=torch.int64, device=dev),
            session=session,
            torch_tail=torch_tail,
        )
        decode.key = len(self._buffers)
        while decode.key in self._buffers:
            decode.key += 1
        self._buffers[decode.key] = decode
        binding = decode.binding
        for name, tensor in (
            ("input_ids", decode.input_ids),
            ("position_ids", decode.positions),
            ("seqlens_k", decode.seqlens_k),
            ("gather_index", decode.gather_index),
            ("temperature", decode.temperature),
        ):
            self._bind(binding, name, tensor, output=False)
        self._bind_kv(binding, self.pool[:, :, :b])
        self._bind(binding, "logits", decode.logits, output=True)
        if not torch_tail:
            self._bind(binding, "logsumexp", decode.lse, output=True)
        return decode

    def _graph_decode(self, b: int) -> DecodeBuffers:
        decode = self._graphs.get(b)
        if decode is None:
            small = b <= self.xqa_max_rows
            session = self._graphed if small else self._graphed_large
            assert session is not None
            decode = self._new_decode(b, session, torch_tail=self.torch_tail and not small)
            decode.graph_id = len(self._graphs)
            decode.binding.bind_cpu_input("total_sequence_length", decode.total_length)
            self._bind_window(decode, self.graph_window)
            self._graphs[b] = decode
        return decode

    def _eager_decode(self, b: int) -> DecodeBuffers:
        decode = self._eager.get(b)
        if decode is None:
            decode = self._new_decode(b, self._decode_session, torch_tail=self.torch_tail)
            self._eager[b] = decode
            if len(self._eager) > _CACHED_BINDINGS:
                _, evicted = self._eager.popitem(last=False)
                self._save_rows(evicted, np.flatnonzero(self._home == evicted.key))
                del self._buffers[evicted.key]
        else:
            self._eager.move_to_end(b)
        return decode

    def _bind_window(self, decode: DecodeBuffers, window: int) -> None:
        if decode.topk_logits is not None and decode.topk_logits.shape[1] == window:
            return
        b, dev = decode.rows, self.device
        decode.window[0] = window
        if not decode.torch_tail:  # the pruned decode graph has no TopK, hence no window input
            decode.binding.bind_cpu_input("window", decode.window)
        decode.topk_logits = torch.empty((b, window), dtype=torch.float32, device=dev)
        decode.topk_ids = torch.empty((b, window), dtype=torch.int64, device=dev)
        if not decode.torch_tail:
            self._bind(decode.binding, "topk_logits", decode.topk_logits, output=True)
            self._bind(decode.binding, "topk_ids", decode.topk_ids, output=True)
        pin = self.device_kind == "cuda"
        for name, tensor in (("topk_logits", decode.topk_logits), ("topk_ids", decode.topk_ids), ("lse", decode.lse)):
            decode.host[name] = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=pin)

    def _fill_decode(
        self, decode: DecodeBuffers, slots: np.ndarray, tokens: np.ndarray, temperature: np.ndarray
    ) -> None:
        """Stage one decode step's inputs: stepping slots get their token, the rest a dummy."""
        b = decode.rows
        positions = np.minimum(self._length[:b], self.meta.max_context - 1)
        input_ids = np.zeros(b, dtype=np.int64)
        input_ids[slots] = tokens
        temps = np.ones(b, dtype=np.float32)
        temps[slots] = temperature
        staged = np.concatenate((input_ids, positions)).reshape(2, b, 1)
        decode.input_ids.copy_(torch.from_numpy(staged[0]), non_blocking=True)
        decode.positions.copy_(torch.from_numpy(staged[1]), non_blocking=True)
        decode.seqlens_k.copy_(torch.from_numpy(positions.astype(np.int32)), non_blocking=True)
        decode.temperature.copy_(torch.from_numpy(temps), non_blocking=True)
        if decode.graph_id < 0:  # eager runs attend exactly as far as the longest row
            decode.total_length[...] = int(positions.max()) + 1
            decode.binding.bind_cpu_input("total_sequence_length", decode.total_length)

    def _run_decode_binding(self, decode: DecodeBuffers, *, graphed: bool) -> None:
        if graphed:
            options = ort.RunOptions()
            options.add_run_config_entry("gpu_graph_id", str(decode.graph_id))
            decode.session.run_with_iobinding(decode.binding, options)
            self.stats.graph_replays_total += int(decode.runs >= 2)
        else:
            decode.session.run_with_iobinding(decode.binding)
        decode.runs += 1
        assert decode.topk_logits is not None and decode.topk_ids is not None
        if decode.torch_tail:
            torch.topk(decode.logits, decode.topk_logits.shape[1], dim=-1, out=(decode.topk_logits, decode.topk_ids))
            torch.logsumexp(decode.logits, dim=-1, out=decode.lse)
        for name, tensor in (("topk_logits", decode.topk_logits), ("topk_ids", decode.topk_ids), ("lse", decode.lse)):
            decode.host[name].copy_(tensor, non_blocking=True)
        if self._stream is not None:
            self._stream.synchronize()

    # ----------------------------------------------------------------------------- stored logits
    def _save_rows(self, decode: DecodeBuffers, slots: np.ndarray) -> None:
        """Copy rows whose latest logits live in `decode`'s buffer into `last_logits`."""
        if slots.size:
            index = torch.from_numpy(slots).to(self.device)
            self.last_logits.index_copy_(0, index, decode.logits.index_select(0, index))
            self._home[slots] = -1

    def _save_bystanders(self, decode: DecodeBuffers, stepping: np.ndarray) -> None:
        """Before `decode` overwrites its buffer: keep the rows of slots that do not step now."""
        mine = self._home[: decode.rows] == decode.key
        if mine.any():
            mine[stepping] = False
            self._save_rows(decode, np.flatnonzero(mine))

    def _stored_logits(self, slots: np.ndarray) -> torch.Tensor:
        """The latest logits rows of `slots` [n, V], wherever they live."""
        homes = self._home[slots]
        for key in np.unique(homes[homes >= 0]).tolist():
            self._save_rows(self._buffers[key], slots[homes == key])
        return self.last_logits.index_select(0, torch.from_numpy(slots).to(self.device))

    # ----------------------------------------------------------------------------- ORT plumbing
    def _bind(self, binding: Any, name: str, tensor: torch.Tensor, *, output: bool) -> None:
        bind_tensor(binding, name, tensor, self.device_kind, self._device_id, output=output)

    def _bind_kv(self, binding: Any, kv: torch.Tensor) -> None:
        bind_kv(binding, kv, self.device_kind, self._device_id, self.meta.n_layer)

    def _run_eager(
        self, feeds: dict[str, np.ndarray], kv: torch.Tensor, batch: int
    ) -> tuple[torch.Tensor, np.ndarray, np.ndarray, np.ndarray]:
        """One ORT run with past/present bound to `kv` [L, 2, batch, H, S, D] in place."""
        binding = self.session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        self._bind_kv(binding, kv)
        logits = torch.empty((batch, self.meta.vocab_size), dtype=torch.float32, device=self.device)
        self._bind(binding, "logits", logits, output=True)
        for name in ("topk_logits", "topk_ids", "logsumexp"):
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        topk_logits, topk_ids, lse = (v.numpy() for v in binding.get_outputs()[-3:])
        return logits, topk_logits, topk_ids, lse

    # ----------------------------------------------------------------------------- answers
    def _extra_logits(self, req: StepRequest, slots: np.ndarray, res: StepResult, answered: np.ndarray) -> None:
        """The logits of each row's EXTRA_IDS, the log-sum-exp of the rest of its row, and the
        row's window taken over the rest (the caller adjusts those ids itself: penalties,
        logit_bias). The rest is summed with the ids masked to -inf, so it carries no cancellation
        however much mass the ids held; and the window keeps K entries however many of the ids
        would have filled it (a penalised favourite drops out of the adjusted row's top K)."""
        assert req.extra_ids is not None
        extra = req.extra_ids.astype(np.int64, copy=False)
        n, e = extra.shape
        res.extra_logits = np.zeros((n, e), dtype=np.float32)
        res.rest_logsumexp = res.logsumexp.copy()
        valid = extra >= 0
        rows = np.flatnonzero(answered & valid.any(axis=1))
        if not rows.size or e == 0:
            return
        mine = extra[rows]
        # Padding points at the row's first real id: a duplicate index writes the same -inf.
        first = mine[np.arange(rows.size), valid[rows].argmax(axis=1)]
        index = torch.from_numpy(np.where(valid[rows], mine, first[:, None])).to(self.device)
        stored = self._stored_logits(slots[rows])
        values = stored.gather(1, index).cpu().numpy()
        masked = stored.scatter(1, index, float("-inf"))
        rest = torch.logsumexp(masked, dim=-1).cpu().numpy()
        top_values, top_ids = torch.topk(masked, res.topk_logits.shape[1], dim=-1)
        res.extra_logits[rows] = np.where(valid[rows], values, 0.0)
        res.rest_logsumexp[rows] = rest
        res.topk_logits[rows] = top_values.cpu().numpy()
        res.topk_ids[rows] = top_ids.cpu().numpy()

    def _finish(self, parts: list[tuple[StepRequest, np.ndarray, StepResult]], now: float) -> None:
        """Answer fetch rows from the stored logits, attach full rows when asked, free END rows."""
        for req, slots, res in parts:
            ok = res.status == RowStatus.OK
            live = ok & (slots >= 0)
            fetch = np.flatnonzero(live & (req.lengths == 0) & ~req.end.astype(bool))
            if fetch.size:
                stored = self._stored_logits(slots[fetch])
                top_values, top_ids = torch.topk(stored, req.window, dim=-1)
                res.topk_logits[fetch] = top_values.cpu().numpy()
                res.topk_ids[fetch] = top_ids.cpu().numpy()
                res.logsumexp[fetch] = torch.logsumexp(stored, dim=-1).cpu().numpy()
            self._last_used[slots[live]] = now
            if req.extra_ids is not None:
                self._extra_logits(req, slots, res, live & ~(req.end.astype(bool) & (req.lengths == 0)))
            if req.want_logits:
                res.logits = np.zeros((res.status.shape[0], self.meta.vocab_size), dtype=np.float32)
                rows = np.flatnonzero(live)
                if rows.size:
                    res.logits[rows] = self._stored_logits(slots[rows]).cpu().numpy()
            ending = live & req.end.astype(bool)
            if ending.any():
                self._free_slots_of(slots[ending])
                self.stats.ended_total += int(ending.sum())
