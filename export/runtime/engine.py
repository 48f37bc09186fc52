"""The decoding-step engine: one ONNX Runtime session, a KV pool resident on the device, and the
table of live sequences.

It is the part of the Triton model that does not know Triton, so the exporter's parity check and
the unit tests drive exactly the code that serves. The same code runs on the CPU and CUDA
execution providers; only the device of the torch buffers and the provider list differ.

KV pool: one tensor [n_layer, 2, capacity, n_head, max_context, head_dim] on the device. A live
sequence owns one slot (a batch row). Because the slot is the outer dimension of each layer's
[capacity, H, MAX, D] block, rows [0, hi) are contiguous and are bound to GroupQueryAttention's
past/present by pointer: a decode step copies no KV at all.

A decode run covers slots [0, hi), hi = highest stepping slot + 1 (slots are handed out lowest
first, so hi tracks the live count). Rows in that range that are not stepping this time run a
harmless dummy token at their own next position: GroupQueryAttention writes it just past the
row's cached length, which the row's next real step overwrites, and nothing reads it before.
A prefill runs in a scratch buffer (rows of different lengths, right-padded) and is copied into
the new sequences' slots.

Thread safety: `step` and the idle sweep may run on different threads; `_lock` guards the table.
"""

from __future__ import annotations

import json
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

_ELEMENT_TYPES = {torch.float16: np.float16, torch.float32: np.float32}


class EngineError(Exception):
    """A request the engine refuses; `code` names the Triton error class it maps to."""

    code = "INVALID_ARG"


class InvalidRequest(EngineError):
    code = "INVALID_ARG"


class SequenceNotFound(EngineError):
    code = "NOT_FOUND"


class SequenceExists(EngineError):
    code = "ALREADY_EXISTS"


class CacheFull(EngineError):
    code = "UNAVAILABLE"


@dataclass
class StepRequest:
    """One caller's rows. Row i: sequence_ids[i], its new tokens input_ids[i, :lengths[i]]."""

    sequence_ids: np.ndarray  # uint64 [N]
    input_ids: np.ndarray  # int64 [N, T], right-padded
    lengths: np.ndarray  # int32 [N]; 0 = no new token (fetch logits, or release with end)
    start: np.ndarray  # bool [N]; the row's tokens are a new sequence's prompt
    end: np.ndarray  # bool [N]; free the sequence after this step
    temperature: np.ndarray  # float32 [N]
    window: int = 1  # K of the top-K window returned
    want_logits: bool = False  # also return the full temperature-scaled row


@dataclass
class StepResult:
    topk_logits: np.ndarray  # float32 [N, window]
    topk_ids: np.ndarray  # int64 [N, window]
    logsumexp: np.ndarray  # float32 [N]
    logits: np.ndarray | None = None  # float32 [N, V] when asked


@dataclass
class _Sequence:
    slot: int
    length: int  # tokens whose keys/values are cached
    last_used: float


@dataclass
class EngineStats:
    capacity: int
    max_context: int
    live_sequences: int = 0
    cached_tokens: int = 0
    prefill_tokens_total: int = 0
    decode_tokens_total: int = 0
    steps_total: int = 0
    rejected_full_total: int = 0
    idle_evicted_total: int = 0
    ended_total: int = 0


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
        data = json.loads((version_dir / "metadata.json").read_text())
        return cls(
            n_layer=data["n_layer"],
            n_head=data["n_head"],
            head_dim=data["head_dim"],
            vocab_size=data["vocab_size"],
            max_context=data["max_context"],
            dtype=data["dtype"],
            eos_token_id=data["eos_token_id"],
        )


def available_device(preference: str = "auto") -> str:
    """'cuda' when asked or when auto and both torch and ONNX Runtime see a GPU, else 'cpu'."""
    gpu = torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers()
    if preference == "cuda" and not gpu:
        raise RuntimeError("device=cuda asked for, but torch or onnxruntime sees no CUDA GPU")
    if preference == "cpu":
        return "cpu"
    return "cuda" if gpu else "cpu"


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
        self.session = self._make_session(model_path, strict_device, threads)
        shape = (meta.n_layer, 2, capacity, meta.n_head, meta.max_context, meta.head_dim)
        self.pool = torch.zeros(shape, dtype=self.dtype, device=self.device)
        # Last step's logits per slot, so a caller whose top-K window fell short can fetch the row.
        self.last_logits = torch.zeros((capacity, meta.vocab_size), dtype=torch.float32, device=self.device)
        self._sequences: dict[int, _Sequence] = {}
        self._free_slots = list(range(capacity))  # kept sorted: lowest slot first keeps hi small
        self._lock = threading.Lock()
        self.stats = EngineStats(capacity=capacity, max_context=meta.max_context)

    # ----------------------------------------------------------------------------- set-up
    def _make_session(self, model_path: Path, strict_device: bool, threads: int) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        if self.device_kind == "cpu":
            # Triton, the gateway and this process share the cores: idle threads sleep instead of
            # spinning, so they do not take CPU time from the gateway between steps.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers: list[Any] = ["CPUExecutionProvider"]
        if self.device_kind == "cuda":
            stream = self._stream.cuda_stream
            # One stream for torch and ORT: copies into the pool are ordered with the run.
            cuda_options = {"device_id": str(self._device_id), "user_compute_stream": str(stream)}
            providers = [("CUDAExecutionProvider", cuda_options)]
            if strict_device:  # every node on the GPU, or session creation fails
                options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
            else:
                providers.append("CPUExecutionProvider")
        return ort.InferenceSession(str(model_path), sess_options=options, providers=providers)

    # ----------------------------------------------------------------------------- state
    def live_sequences(self) -> int:
        with self._lock:
            return len(self._sequences)

    def snapshot(self) -> EngineStats:
        with self._lock:
            self.stats.live_sequences = len(self._sequences)
            self.stats.cached_tokens = sum(s.length for s in self._sequences.values())
            return replace(self.stats)

    def evict_idle(self) -> int:
        """Free sequences untouched for idle_timeout_s (a caller that vanished); returns count."""
        deadline = self._clock() - self.idle_timeout_s
        with self._lock:
            stale = [sid for sid, s in self._sequences.items() if s.last_used < deadline]
            for sid in stale:
                self._free(sid)
            self.stats.idle_evicted_total += len(stale)
        return len(stale)

    def _free(self, sequence_id: int) -> None:
        seq = self._sequences.pop(sequence_id)
        # insort keeps the free list ordered so allocation stays lowest-first.
        lo, hi = 0, len(self._free_slots)
        while lo < hi:
            mid = (lo + hi) // 2
            if self._free_slots[mid] < seq.slot:
                lo = mid + 1
            else:
                hi = mid
        self._free_slots.insert(lo, seq.slot)

    # ----------------------------------------------------------------------------- validation
    def _validate(self, req: StepRequest, claimed: set[int], free_left: int) -> int:
        """Check one request against the table; returns how many new slots it needs."""
        n = int(req.sequence_ids.shape[0])
        if n == 0:
            raise InvalidRequest("request carries no sequences")
        for name, arr in (
            ("LENGTH", req.lengths),
            ("START", req.start),
            ("END", req.end),
            ("TEMPERATURE", req.temperature),
        ):
            if arr.shape[0] != n:
                raise InvalidRequest(f"{name} has {arr.shape[0]} rows, SEQUENCE_ID has {n}")
        if req.input_ids.ndim != 2 or req.input_ids.shape[0] != n:
            raise InvalidRequest(f"INPUT_IDS must be [{n}, T], got {list(req.input_ids.shape)}")
        if not 1 <= req.window <= self.meta.vocab_size:
            raise InvalidRequest(f"logits_window must be in [1, {self.meta.vocab_size}], got {req.window}")
        width = req.input_ids.shape[1]
        if np.any(req.lengths < 0) or np.any(req.lengths > width):
            raise InvalidRequest(f"LENGTH must be in [0, {width}] (the width of INPUT_IDS)")
        if not np.all(np.isfinite(req.temperature)) or np.any(req.temperature <= 0):
            raise InvalidRequest("TEMPERATURE must be finite and > 0 (send 1.0 for greedy)")
        mask = np.arange(width)[None, :] < req.lengths[:, None]
        used = req.input_ids[mask]
        if used.size and (used.min() < 0 or used.max() >= self.meta.vocab_size):
            raise InvalidRequest(f"token ids must be in [0, {self.meta.vocab_size})")
        new = 0
        for i in range(n):
            sid, length = int(req.sequence_ids[i]), int(req.lengths[i])
            if sid in claimed:
                raise InvalidRequest(f"sequence {sid} appears twice in one step")
            claimed.add(sid)
            if req.start[i]:
                if sid in self._sequences:
                    raise SequenceExists(f"sequence {sid} already exists")
                if length == 0:
                    raise InvalidRequest(f"sequence {sid}: a start row needs at least one token")
                if length > self.meta.max_context:
                    raise InvalidRequest(
                        f"sequence {sid}: prompt of {length} tokens exceeds the context of {self.meta.max_context}"
                    )
                new += 1
                continue
            seq = self._sequences.get(sid)
            if seq is None:
                if length == 0 and req.end[i]:
                    continue  # releasing an unknown (already freed) sequence is a no-op
                raise SequenceNotFound(f"sequence {sid} is unknown (never started, ended, or evicted as idle)")
            if length > 1:
                raise InvalidRequest(f"sequence {sid}: a decode row carries one token, got {length}")
            if seq.length + length > self.meta.max_context:
                raise InvalidRequest(f"sequence {sid} would exceed the context of {self.meta.max_context} tokens")
        if new > free_left:
            self.stats.rejected_full_total += 1
            raise CacheFull(f"KV cache full: {new} new sequences asked, {free_left} slots free of {self.capacity}")
        return new

    # ----------------------------------------------------------------------------- stepping
    def step(self, requests: list[StepRequest]) -> list[StepResult | EngineError]:
        """Run one step for every valid request; an invalid one gets its error, others go on."""
        with self._lock, torch.cuda.stream(self._stream) if self._stream is not None else nullcontext():
            return self._step_locked(requests)

    def _step_locked(self, requests: list[StepRequest]) -> list[StepResult | EngineError]:
        now = self._clock()
        outcomes: list[StepResult | EngineError | None] = [None] * len(requests)
        claimed: set[int] = set()
        free_left = len(self._free_slots)
        accepted: list[int] = []
        for r, req in enumerate(requests):
            before = set(claimed)
            try:
                free_left -= self._validate(req, claimed, free_left)
                accepted.append(r)
            except EngineError as err:
                claimed = before  # a rejected request claims nothing
                outcomes[r] = err

        prefill: list[tuple[int, int]] = []  # (request, row)
        decode: list[tuple[int, int]] = []
        for r in accepted:
            req = requests[r]
            for i in range(req.sequence_ids.shape[0]):
                if req.start[i]:
                    prefill.append((r, i))
                elif req.lengths[i] == 1:
                    decode.append((r, i))
        window = max((requests[r].window for r in accepted), default=1)
        computed: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, float]] = {}
        if prefill:
            computed.update(self._run_prefill(requests, prefill, window, now))
        if decode:
            computed.update(self._run_decode(requests, decode, window, now))

        for r in accepted:
            outcomes[r] = self._collect(requests[r], computed, r, now)
        self.stats.steps_total += 1
        return [o for o in outcomes if o is not None]

    def _run_prefill(
        self, requests: list[StepRequest], rows: list[tuple[int, int]], window: int, now: float
    ) -> dict[tuple[int, int], tuple[np.ndarray, np.ndarray, float]]:
        lengths = np.array([requests[r].lengths[i] for r, i in rows], dtype=np.int64)
        b, s = len(rows), int(lengths.max())
        input_ids = np.zeros((b, s), dtype=np.int64)
        for j, (r, i) in enumerate(rows):
            input_ids[j, : lengths[j]] = requests[r].input_ids[i, : lengths[j]]
        slots = []
        for j, (r, i) in enumerate(rows):
            slot = self._free_slots.pop(0)
            self._sequences[int(requests[r].sequence_ids[i])] = _Sequence(slot, int(lengths[j]), now)
            slots.append(slot)
        scratch = torch.empty(
            (self.meta.n_layer, 2, b, self.meta.n_head, s, self.meta.head_dim), dtype=self.dtype, device=self.device
        )
        feeds: dict[str, np.ndarray] = {
            "input_ids": input_ids,
            "position_ids": np.broadcast_to(np.arange(s, dtype=np.int64), (b, s)).copy(),
            "seqlens_k": (lengths - 1).astype(np.int32),
            "total_sequence_length": np.array(s, dtype=np.int32),  # == S: GQA's first-prompt mode
            "gather_index": np.arange(b, dtype=np.int64) * s + lengths - 1,
            "temperature": np.array([requests[r].temperature[i] for r, i in rows], dtype=np.float32),
            "window": np.array([window], dtype=np.int64),
        }
        logits, topk_logits, topk_ids, lse = self._run(feeds, scratch, b)
        index = torch.tensor(slots, device=self.device)
        # Copy the prompts' keys/values into their slots (positions past a row's length are
        # padding; they are overwritten by the row's next steps before anything reads them).
        self.pool[:, :, index, :, :s, :] = scratch
        self.last_logits.index_copy_(0, index, logits)
        self.stats.prefill_tokens_total += int(lengths.sum())
        return {row: (topk_logits[j], topk_ids[j], float(lse[j])) for j, row in enumerate(rows)}

    def _run_decode(
        self, requests: list[StepRequest], rows: list[tuple[int, int]], window: int, now: float
    ) -> dict[tuple[int, int], tuple[np.ndarray, np.ndarray, float]]:
        stepping = [(self._sequences[int(requests[r].sequence_ids[i])], r, i) for r, i in rows]
        hi = max(seq.slot for seq, _, _ in stepping) + 1
        max_pos = self.meta.max_context - 1
        # Every row in [0, hi) runs; bystanders (live but not stepping, or free) get a dummy token
        # at their own next position, which they overwrite later (see the module docstring).
        positions = np.zeros(hi, dtype=np.int64)
        for seq in self._sequences.values():
            if seq.slot < hi:
                positions[seq.slot] = min(seq.length, max_pos)
        input_ids = np.zeros((hi, 1), dtype=np.int64)
        temperature = np.ones(hi, dtype=np.float32)
        for seq, r, i in stepping:
            input_ids[seq.slot, 0] = requests[r].input_ids[i, 0]
            temperature[seq.slot] = requests[r].temperature[i]
        feeds: dict[str, np.ndarray] = {
            "input_ids": input_ids,
            "position_ids": positions[:, None].copy(),
            "seqlens_k": positions.astype(np.int32),
            "total_sequence_length": np.array(int(positions.max()) + 1, dtype=np.int32),
            "gather_index": np.arange(hi, dtype=np.int64),
            "temperature": temperature,
            "window": np.array([window], dtype=np.int64),
        }
        logits, topk_logits, topk_ids, lse = self._run(feeds, self.pool[:, :, :hi], hi)
        slots = [seq.slot for seq, _, _ in stepping]
        index = torch.tensor(slots, device=self.device)
        self.last_logits.index_copy_(0, index, logits.index_select(0, index))
        for seq, _, _ in stepping:
            seq.length += 1
            seq.last_used = now
        self.stats.decode_tokens_total += len(stepping)
        return {(r, i): (topk_logits[seq.slot], topk_ids[seq.slot], float(lse[seq.slot])) for seq, r, i in stepping}

    def _run(
        self, feeds: dict[str, np.ndarray], kv: torch.Tensor, batch: int
    ) -> tuple[torch.Tensor, np.ndarray, np.ndarray, np.ndarray]:
        """One ORT run with past/present bound to `kv` [L, 2, batch, H, S, D] in place."""
        binding = self.session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        element_type = _ELEMENT_TYPES[self.dtype]
        dev, dev_id = self.device_kind, self._device_id
        for layer in range(self.meta.n_layer):
            for kind, half in (("key", 0), ("value", 1)):
                block = kv[layer, half]
                assert block.is_contiguous()
                shape = tuple(block.shape)
                ptr = block.data_ptr()
                binding.bind_input(f"past_{kind}_{layer}", dev, dev_id, element_type, shape, ptr)
                binding.bind_output(f"present_{kind}_{layer}", dev, dev_id, element_type, shape, ptr)
        logits = torch.empty((batch, self.meta.vocab_size), dtype=torch.float32, device=self.device)
        binding.bind_output("logits", dev, dev_id, np.float32, tuple(logits.shape), logits.data_ptr())
        for name in ("topk_logits", "topk_ids", "logsumexp"):
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        topk_logits, topk_ids, lse = (v.numpy() for v in binding.get_outputs()[-3:])
        return logits, topk_logits, topk_ids, lse

    def _collect(
        self,
        req: StepRequest,
        computed: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, float]],
        r: int,
        now: float,
    ) -> StepResult:
        n, k = int(req.sequence_ids.shape[0]), req.window
        topk_logits = np.zeros((n, k), dtype=np.float32)
        topk_ids = np.zeros((n, k), dtype=np.int64)
        lse = np.zeros(n, dtype=np.float32)
        slots: list[int] = []
        fetch_rows: list[int] = []
        for i in range(n):
            sid = int(req.sequence_ids[i])
            seq = self._sequences.get(sid)
            slots.append(seq.slot if seq is not None else -1)
            if (r, i) in computed:
                vals, ids, row_lse = computed[(r, i)]
                topk_logits[i], topk_ids[i], lse[i] = vals[:k], ids[:k], row_lse
            elif seq is not None and not req.end[i]:
                fetch_rows.append(i)  # no new token: answer from the stored last logits
            if seq is not None:
                seq.last_used = now
        if fetch_rows:
            stored = self.last_logits.index_select(0, torch.tensor([slots[i] for i in fetch_rows], device=self.device))
            top_values, top_ids = torch.topk(stored, k, dim=-1)
            topk_logits[fetch_rows] = top_values.cpu().numpy()
            topk_ids[fetch_rows] = top_ids.cpu().numpy()
            lse[fetch_rows] = torch.logsumexp(stored, dim=-1).cpu().numpy()
        logits = None
        if req.want_logits:
            logits = np.zeros((n, self.meta.vocab_size), dtype=np.float32)
            live = [i for i in range(n) if slots[i] >= 0]
            if live:
                index = torch.tensor([slots[i] for i in live], device=self.device)
                logits[live] = self.last_logits.index_select(0, index).cpu().numpy()
        for i in range(n):
            sid = int(req.sequence_ids[i])
            if req.end[i] and sid in self._sequences:
                self._free(sid)
                self.stats.ended_total += 1
        return StepResult(topk_logits, topk_ids, lse, logits)
