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
buffer (rows of different lengths, right-padded; on the GPU in bucketed shapes, small ones
replayed as CUDA graphs: `step_model.prefill`) and is copied into the new sequences' slots.

Batch invariance (docs/architecture.md): a row's outputs are a function of its own tokens (on the
CPU the log-sum-exp is computed per row, `step_model.kernels`). With `invariant_slots` R > 0 the
top R slots are kept for rows flagged invariant: each such prompt is prefilled in a pass of its
own, and the range decodes in its own run over all R slots every step (fixed shapes, as the GPU's
kernels need). A start row with `replay_from` (a sequence the server lost) prefills its prompt and
replays its generated tokens one decode run each, so its cache is the lost one bit for bit.

Per-row outcomes: a row the table refuses (no free slot for a start row, an unknown sequence, a
malformed row) gets a `RowStatus` and changes nothing; the other rows run. Only a malformed
request (shapes, a sequence named twice) fails as a whole.

Host work per step is array operations over the rows, independent of their number (no Python
loop over rows); inputs and outputs live in per-bucket device buffers, outputs come back through
pinned host memory with one stream synchronisation per run.

Decode runs (buffers, IOBindings, CUDA graphs per bucket) are `step_model.decode`'s; per-row
outputs beyond the window (EXTRA_IDS' logits, DRAW's device draws, prompt logprobs) are
`step_model.row_outputs`'.

Thread safety: `step` and the idle sweep may run on different threads; `_lock` guards the table.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from itertools import repeat
from pathlib import Path
from typing import Any

import numpy as np
import torch

from step_model import contract
from step_model.ahead import AHEAD_FIELDS, GREEDY, AheadAnswers, run_ahead
from step_model.contract import RowStatus, graph_io
from step_model.decode import DecodeRunner, DecodeSetup
from step_model.draw import draw_method as draw_method_for
from step_model.draw import draw_rows_searched
from step_model.draw_graphs import GraphedDraw, never_flagged
from step_model.kernels import row_logsumexp
from step_model.ort_runtime import (
    DecodeBuffers,
    available_device,
    make_session,
)
from step_model.prefill import PrefillRunner, prompt_feeds
from step_model.row_outputs import fill_draws, fill_extra_logits, fill_prompt_logprobs, rows_to_draw
from step_model.rows import EngineError, InvalidRequest, StepRequest, StepResult, check_shapes, row_status
from step_model.slots import SlotPool

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

_WARM_PREFILL_ROWS = 64  # warm_up runs prefill shapes of up to this many rows
# Device draws replayed from CUDA graphs: the captured (flagging) function and its fallback.
_GRAPHED_DRAWS = {
    draw_rows_searched: (never_flagged(draw_rows_searched), draw_rows_searched),
}


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
    drawn_rows_total: int = 0  # rows drawn on the device (DRAW), their window short of their cut
    replayed_tokens_total: int = 0  # generated tokens replayed into a rebuilt cache (PARAM_REPLAY_FROM)
    ahead_tokens_total: int = 0  # tokens decoded ahead of their row's answer (PARAM_AHEAD)
    # Where a step's wall time goes (microseconds, summed over steps; the GPU work is inside,
    # every phase ends with its results on the host): prompts prefilled (prefill_runs_total
    # eager passes), decode runs, and the answers (fetches, draws, extra logits, full rows).
    prefill_runs_total: int = 0
    prefill_graph_replays_total: int = 0  # prefill passes replayed from a captured CUDA graph
    prefill_us_total: int = 0
    decode_us_total: int = 0
    finish_us_total: int = 0


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


def _own_stream(device: torch.device) -> Any:
    """A CUDA stream of our own (not the legacy default stream) shared with ONNX Runtime. Current
    streams are per thread and Triton may call execute from another thread than initialize, so
    every step enters it explicitly (see `StepEngine.step`)."""
    torch.cuda.set_device(device)
    stream = torch.cuda.Stream(device)
    torch.cuda.set_stream(stream)
    return stream


class StepEngine:
    """Runs decoding steps for many sequences at once; see the module docstring."""

    def __init__(
        self,
        model_path: Path,
        meta: ModelMeta,
        *,
        capacity: int,
        partitions: int = 1,
        invariant_slots: int = 0,
        draw_method: str = "auto",
        idle_timeout_s: float = 60.0,
        device: str = "auto",
        device_id: int = 0,
        strict_device: bool = False,
        cuda_graphs: bool = False,
        graph_window: int = 64,
        torch_tail: bool | None = None,
        xqa_max_rows: int = 64,
        prefill_buckets: bool | None = None,
        threads: int = 0,
        clock: Any = time.monotonic,
    ) -> None:
        self.meta = meta
        self.capacity = capacity
        self.idle_timeout_s = idle_timeout_s
        self._clock = clock
        self.device_kind = available_device(device)
        self._draw = draw_method_for(draw_method, self.device_kind)
        self.device = torch.device("cuda", device_id) if self.device_kind == "cuda" else torch.device("cpu")
        self._device_id = device_id
        self.dtype = torch.float16 if meta.dtype == "fp16" else torch.float32
        self._stream: Any = _own_stream(self.device) if self.device_kind == "cuda" else None
        self.session = self._open_session(model_path, strict_device=strict_device, threads=threads)
        shape = (meta.n_layer, 2, capacity, meta.n_head, meta.max_context, meta.head_dim)
        self.pool = torch.zeros(shape, dtype=self.dtype, device=self.device)
        # Last step's logits per slot, so a caller whose top-K window fell short can fetch the row.
        self.last_logits = torch.zeros((capacity, meta.vocab_size), dtype=torch.float32, device=self.device)
        # The sequence table, as arrays indexed by slot plus one id -> slot map.
        self._slot_of: dict[int, int] = {}
        self._length = np.zeros(capacity, dtype=np.int64)  # tokens cached; 0 for a free slot
        self._last_used = np.zeros(capacity, dtype=np.float64)
        self._sequence_of = np.zeros(capacity, dtype=np.uint64)
        # Lowest slot first keeps decode ranges short; the top `invariant_slots` are the reserved range.
        self._free_slots = SlotPool(capacity, partitions, invariant_slots)
        self.invariant_slots = invariant_slots
        setup = DecodeSetup(
            self.device,
            self.device_kind,
            device_id,
            self.pool,
            meta.vocab_size,
            meta.max_context,
            meta.n_layer,
            self._stream,
        )
        self.decoder = DecodeRunner(
            setup,
            model_path,
            session=self.session,
            strict_device=strict_device,
            threads=threads,
            cuda_graphs=cuda_graphs,
            graph_window=graph_window,
            # Top-K and log-sum-exp of decode runs by torch on the GPU, the graph's own on the CPU.
            torch_tail=self.device_kind == "cuda" if torch_tail is None else torch_tail,
            xqa_max_rows=xqa_max_rows,
            on_evict=lambda evicted: self._save_rows(evicted, np.flatnonzero(self._home == evicted.key)),
        )
        self.prefiller = PrefillRunner(
            self.session,
            self._prefill_graph_session(model_path, strict_device, threads) if self.decoder.cuda_graphs else None,
            device=self.device,
            device_id=device_id,
            dtype=self.dtype,
            n_layer=meta.n_layer,
            kv_dims=(meta.n_head, meta.head_dim),
            vocab_size=meta.vocab_size,
            max_context=meta.max_context,
            graph_window=graph_window,
            bucketed=prefill_buckets,
        )
        if self.decoder.cuda_graphs and self._draw in _GRAPHED_DRAWS:  # launch-bound: replay it
            fn, fallback = _GRAPHED_DRAWS[self._draw]
            self._draw = GraphedDraw(fn, fallback, meta.vocab_size, self.device, capacity)
        # Where each slot's latest logits live: -1 = `last_logits`, else the key of the decode
        # buffer that produced them. Decode runs leave their rows in their own buffer; rows are
        # copied into `last_logits` only when that buffer is about to be overwritten while the
        # row did not step (a bystander of another caller's step) or evicted, or when fetched.
        self._home = np.full(capacity, -1, dtype=np.int64)
        self._lock = threading.Lock()
        self.stats = EngineStats(capacity=capacity, max_context=meta.max_context)

    # ----------------------------------------------------------------------------- set-up
    def _open_session(self, model_path: Path, *, strict_device: bool, threads: int, cuda_graphs: bool = False) -> Any:
        """A session of `model_path` on the engine's device, sharing its stream."""
        return make_session(
            model_path,
            device_kind=self.device_kind,
            device_id=self._device_id,
            cuda_stream=self._stream.cuda_stream if self._stream is not None else None,
            strict_device=strict_device,
            threads=threads,
            cuda_graphs=cuda_graphs,
        )

    def _prefill_graph_session(self, model_path: Path, strict_device: bool, threads: int) -> Any:
        """A session of the full graph with CUDA graphs on for prefill passes, or None."""
        try:
            return self._open_session(model_path, strict_device=strict_device, threads=threads, cuda_graphs=True)
        except Exception as err:  # e.g. a node the graph cannot hold: eager prefills serve
            log.warning("prefill CUDA graphs off, the session failed: %s", err)
            return None

    def warm_up(self) -> None:
        """Capture every decode bucket's CUDA graph and run every common prefill shape now, instead
        of at their first use (a first run of a shape costs tens of ms on the GPU)."""
        with self._lock, self._on_stream():
            self.prefiller.warm_up(min(self.capacity, _WARM_PREFILL_ROWS))
            if isinstance(self._draw, GraphedDraw):
                self._draw.warm_up()
        decoder = self.decoder
        if not decoder.cuda_graphs:
            return
        with self._lock, self._on_stream():
            try:
                for first, b in self._graph_ranges():
                    decode = decoder.graph_buffers(first, b)
                    while decode.runs < 3:  # ORT runs a graph eagerly before it captures it
                        decoder.fill(decode, self._length, np.zeros(0, dtype=np.int64), np.zeros(0), np.zeros(0))
                        decoder.run(decode, graphed=True)
            except Exception as err:
                log.warning("CUDA graphs disabled, capture failed: %s", err)
                decoder.disable_graphs()

    def _graph_ranges(self) -> list[tuple[int, int]]:
        """(first, bucket) of every decode range a step can run: from each partition's start, and the
        reserved range's one run."""
        pool = self._free_slots
        starts = range(0, pool.capacity, pool.size)
        end = pool.reserved_start
        ranges = {(first, self.decoder.bucket(first, b, end)) for first in starts for b in self.decoder.buckets}
        if pool.reserved:
            ranges.add((pool.reserved_start, pool.reserved))
        return sorted(ranges)

    def _on_stream(self) -> Any:
        return torch.cuda.stream(self._stream) if self._stream is not None else nullcontext()

    @property
    def cuda_graphs(self) -> bool:
        return self.decoder.cuda_graphs

    # ----------------------------------------------------------------------------- state
    def live_sequences(self) -> int:
        with self._lock:
            return len(self._slot_of)

    def snapshot(self) -> EngineStats:
        with self._lock:
            self.stats.live_sequences = len(self._slot_of)
            self.stats.cached_tokens = int(self._length.sum())
            self.stats.prefill_graph_replays_total = self.prefiller.graph_replays
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
            self._free_slots.give(slot)
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
        free_left, reserved_left = len(self._free_slots), self._free_slots.reserved_free()
        parts: list[tuple[StepRequest, np.ndarray, StepResult]] = []
        for req in requests:
            try:
                check_shapes(req, claimed, self.meta.vocab_size)
            except EngineError as err:
                outcomes.append(err)
                continue
            slots = self._slots(req.sequence_ids)
            cached = np.where(slots >= 0, self._length[np.maximum(slots, 0)], 0)
            reserved = self._in_reserved(req)
            status, messages, refused_full = row_status(
                req,
                slots >= 0,
                cached,
                free_left,
                vocab_size=self.meta.vocab_size,
                max_context=self.meta.max_context,
                reserved=reserved,
                reserved_left=reserved_left,
            )
            self.stats.rejected_full_total += refused_full
            if req.rewind is not None:  # tokens fed after a proposal the caller did not accept
                back = (status == RowStatus.OK) & (req.rewind > 0)
                self._length[slots[back]] -= req.rewind[back]
            started = req.start & (status == RowStatus.OK)
            free_left -= int((started & ~reserved).sum())
            reserved_left -= int((started & reserved).sum())
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
        clock = time.perf_counter_ns
        t0 = clock()
        self._prompt_logprobs(parts)  # before the prefill: it reads the requests only
        self._run_prefills(parts, window, now)
        t1 = clock()
        self._run_decodes(parts, window, now)
        t2 = clock()
        self._finish(parts, now)
        stats = self.stats
        stats.prefill_us_total += (t1 - t0) // 1000
        stats.decode_us_total += (t2 - t1) // 1000
        stats.finish_us_total += (clock() - t2) // 1000
        stats.steps_total += 1
        stats.rows_total += sum(int(r.status.shape[0]) for _, _, r in parts)
        return outcomes

    def _in_reserved(self, req: StepRequest) -> np.ndarray:
        """Rows whose sequences live in the reserved invariant range (flagged, and the range exists)."""
        n = int(req.sequence_ids.shape[0])
        if req.invariant is None or not self.invariant_slots:
            return np.zeros(n, dtype=bool)
        return req.invariant.astype(bool)

    def _run_prefills(self, parts: list[tuple[StepRequest, np.ndarray, StepResult]], window: int, now: float) -> None:
        """Start rows: their prompts prefilled (rows of the reserved range one pass each, so that the
        pass's shapes depend on the row's own prompt only; the others in one pass), then the tokens
        they replay (PARAM_REPLAY_FROM) decoded one run each."""
        chosen = [
            (req, slots, res, np.flatnonzero(req.start & (res.status == RowStatus.OK))) for req, slots, res in parts
        ]
        chosen = [c for c in chosen if c[3].size]
        if not chosen:
            return
        lengths = np.concatenate([req.lengths[rows] for req, _, _, rows in chosen]).astype(np.int64)
        prompt = np.concatenate(
            [
                np.where(req.replay_from[rows] >= 0, req.replay_from[rows], req.lengths[rows])
                if req.replay_from is not None
                else req.lengths[rows]
                for req, _, _, rows in chosen
            ]
        ).astype(np.int64)
        reserved = np.concatenate([self._in_reserved(req)[rows] for req, _, _, rows in chosen])
        temperature = np.concatenate([req.temperature[rows] for req, _, _, rows in chosen]).astype(np.float32)
        b, s = int(lengths.shape[0]), int(lengths.max())
        input_ids = np.zeros((b, s), dtype=np.int64)
        at = 0
        for req, _, _, rows in chosen:  # per request, not per row
            width = min(s, req.input_ids.shape[1])
            input_ids[at : at + rows.size, :width] = req.input_ids[rows, :width]
            at += rows.size
        input_ids[np.arange(s)[None, :] >= lengths[:, None]] = 0
        pool = self._free_slots
        partitions = [req.kv_partition for req, _, _, rows in chosen for _ in range(rows.size)]
        new_slots = np.array(
            [pool.take_reserved() if r else pool.take(p) for r, p in zip(reserved.tolist(), partitions, strict=True)],
            dtype=np.int64,
        )
        topk_logits = np.zeros((b, window), dtype=np.float32)
        topk_ids = np.zeros((b, window), dtype=np.int64)
        lse = np.zeros(b, dtype=np.float32)
        groups = [np.flatnonzero(~reserved)] + [np.array([i]) for i in np.flatnonzero(reserved).tolist()]
        for group in groups:
            if group.size:
                out = self._prefill(input_ids[group], prompt[group], temperature[group], new_slots[group], window)
                self.stats.prefill_runs_total += 1
                topk_logits[group], topk_ids[group], lse[group] = out
        self._length[new_slots] = prompt
        self._last_used[new_slots] = now
        self.stats.prefill_tokens_total += int(prompt.sum())
        # Replayed tokens: one decode run per position, teacher-forced, as the lost cache was built.
        for j in range(int((lengths - prompt).max())):
            stepping = np.flatnonzero(prompt + j < lengths)
            tokens = input_ids[stepping, prompt[stepping] + j]
            none_ahead = np.zeros(stepping.size, dtype=np.int64)
            run = self._decode(new_slots[stepping], tokens, temperature[stepping], window, now, none_ahead)
            topk_logits[stepping], topk_ids[stepping], lse[stepping] = run.topk_logits, run.topk_ids, run.logsumexp
            self.stats.replayed_tokens_total += int(stepping.size)
        at = 0
        for req, slots, res, rows in chosen:
            ids = req.sequence_ids[rows]
            taken = new_slots[at : at + rows.size]
            slots[rows] = taken
            self._slot_of.update(zip(ids.tolist(), taken.tolist(), strict=True))
            self._sequence_of[taken] = ids
            k = req.window
            res.topk_logits[rows] = topk_logits[at : at + rows.size, :k]
            res.topk_ids[rows] = topk_ids[at : at + rows.size, :k]
            res.logsumexp[rows] = lse[at : at + rows.size]
            at += rows.size

    def _prefill(
        self, input_ids: np.ndarray, lengths: np.ndarray, temperature: np.ndarray, slots: np.ndarray, window: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One pass over right-padded prompts into `slots`: (top-K logits, ids, log-sum-exp)."""
        out = self.prefiller.run(input_ids, lengths, temperature, window)
        index = torch.from_numpy(slots).to(self.device)
        # Copy the prompts' keys/values into their slots (positions past a row's length are
        # padding; they are overwritten by the row's next steps before anything reads them).
        self.pool[:, :, index, :, : out.kv.shape[4], :] = out.kv
        self.last_logits.index_copy_(0, index, out.logits)
        self._home[slots] = -1
        return out.topk_logits, out.topk_ids, out.lse

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
            feeds = prompt_feeds(
                ids,
                lengths,
                gather_index=np.arange(b * s, dtype=np.int64),  # every position of every row
                temperature=np.ones(b * s, dtype=np.float32),
                window=k,
            )
            outputs = self.prefiller.eager(feeds, self.prefiller.kv_block(b, s), b * s)
            fill_prompt_logprobs(res, rows, ids, lengths, *outputs)

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
        ahead = np.concatenate([req.ahead_of(rows) for req, _, _, rows in chosen])
        depth = int(ahead.max())
        draw = ahead_u = None
        if depth:  # the rows' cuts and uniforms for the proposals (step_model.ahead)
            draw = np.concatenate([_draw_columns(req, rows) for req, _, _, rows in chosen])
            ahead_u = np.concatenate([_ahead_uniforms(req, rows, depth) for req, _, _, rows in chosen])
        run = self._decode(step_slots, tokens, temperature, window, now, ahead, draw, ahead_u)
        at = 0
        for req, _, res, rows in chosen:
            k, end = req.window, at + rows.size
            res.topk_logits[rows] = run.topk_logits[at:end, :k]
            res.topk_ids[rows] = run.topk_ids[at:end, :k]
            res.logsumexp[rows] = run.logsumexp[at:end]
            if depth and req.ahead is not None:
                _answer_ahead(res, rows, run, at, k, int(req.ahead.max()))
            at = end

    def _decode(
        self,
        slots: np.ndarray,
        tokens: np.ndarray,
        temperature: np.ndarray,
        window: int,
        now: float,
        ahead: np.ndarray,
        draw: np.ndarray | None = None,
        ahead_u: np.ndarray | None = None,
    ) -> AheadAnswers:
        """1 + ahead[i] tokens for each of `slots` (step_model.ahead): each row's last decode's
        window and log-sum-exp in their order, and the ahead decodes'. Slots outside the reserved
        range decode in one run over [start of the lowest one's partition, highest + 1); reserved
        ones in the reserved range's own run, always over all of it (a fixed row count, and on the
        CPU a fixed attention length: the pool's context)."""
        pool = self._free_slots
        n, depth = int(slots.shape[0]), int(ahead.max())
        out = AheadAnswers.empty(n, depth, window)
        reserved = slots >= pool.reserved_start
        for group, fixed in ((np.flatnonzero(~reserved), False), (np.flatnonzero(reserved), True)):
            if not group.size:
                continue
            mine_slots = slots[group]
            if fixed:
                first, hi, end = pool.reserved_start, self.capacity, self.capacity
            else:
                first, hi, end = pool.start_of(int(mine_slots.min())), int(mine_slots.max()) + 1, pool.reserved_start
            decode, graphed = self.decoder.buffers_for(first, hi, window, end=end, fixed=fixed)
            self.decoder.fill(decode, self._length, mine_slots, tokens[group], temperature[group], fixed=fixed)
            self._save_bystanders(decode, mine_slots)
            mine = mine_slots - decode.first
            if int(ahead[group].max()):
                self._decode_ahead(decode, graphed, fixed, mine, group, ahead, draw, ahead_u, window, out)
                self._home[mine_slots[ahead[group] == int(ahead[group].max())]] = decode.key
                continue
            self.stats.graph_replays_total += int(self.decoder.run(decode, graphed=graphed))
            host = decode.host
            if host["topk_logits"].shape[1] >= window:
                out.topk_logits[group] = host["topk_logits"].numpy()[mine, :window]
                out.topk_ids[group] = host["topk_ids"].numpy()[mine, :window]
            else:  # a graph of the reserved range, narrower than this step's window
                rows = decode.logits.index_select(0, torch.from_numpy(mine).to(self.device))
                values, ids = torch.topk(rows, window, dim=-1)
                out.topk_logits[group], out.topk_ids[group] = values.cpu().numpy(), ids.cpu().numpy()
            out.logsumexp[group] = host["lse"].numpy()[mine]
            self._home[mine_slots] = decode.key
        self._length[slots] += 1 + ahead
        self._last_used[slots] = now
        self.stats.decode_tokens_total += n + int(ahead.sum())
        self.stats.ahead_tokens_total += int(ahead.sum())
        return out

    def _decode_ahead(
        self,
        decode: DecodeBuffers,
        graphed: bool,
        fixed: bool,
        mine: np.ndarray,
        group: np.ndarray,
        ahead: np.ndarray,
        draw: np.ndarray | None,
        ahead_u: np.ndarray | None,
        window: int,
        out: AheadAnswers,
    ) -> None:
        """`_decode`'s run of one slot range whose rows run ahead (step_model.ahead)."""

        def run() -> None:
            self.stats.graph_replays_total += int(self.decoder.run(decode, graphed=graphed, collect=False))

        def save(buffer_rows: np.ndarray, buffer_rows_t: torch.Tensor) -> None:
            self._save_rows(decode, buffer_rows + decode.first, buffer_rows_t)

        total_length = None
        if not graphed:  # an eager run attends as far as its longest row, which grows by one a decode
            longest = int(self._length[decode.first : decode.first + decode.rows].max())

            def total_length(s: int) -> None:
                reach = self.meta.max_context if fixed else min(self.meta.max_context, longest + 1 + s)
                decode.total_length[...] = reach
                decode.binding.bind_cpu_input(graph_io.TOTAL_SEQUENCE_LENGTH, decode.total_length)

        answers = run_ahead(
            decode,
            run,
            mine,
            ahead[group],
            draw[group] if draw is not None else None,
            ahead_u[group] if ahead_u is not None else None,
            window,
            self._draw,
            save,
            total_length,
        )
        out.put(group, answers)

    # ----------------------------------------------------------------------------- stored logits
    def _save_rows(self, decode: DecodeBuffers, slots: np.ndarray, rows: torch.Tensor | None = None) -> None:
        """Copy rows whose latest logits live in `decode`'s buffer into `last_logits`. `rows`: their
        buffer rows already on the device (a run ahead made them before its first decode, so that
        no host-to-device copy waits for the stream between its decodes)."""
        if slots.size:
            if rows is None:
                rows = torch.from_numpy(slots - decode.first).to(self.device)
            self.last_logits.index_copy_(0, rows + decode.first, decode.logits.index_select(0, rows))
            self._home[slots] = -1

    def _save_bystanders(self, decode: DecodeBuffers, stepping: np.ndarray) -> None:
        """Before `decode` overwrites its buffer: keep the rows of slots that do not step now."""
        mine = self._home[decode.first : decode.first + decode.rows] == decode.key
        if mine.any():
            mine[stepping - decode.first] = False
            self._save_rows(decode, np.flatnonzero(mine) + decode.first)

    def _stored_logits(self, slots: np.ndarray) -> torch.Tensor:
        """The latest logits rows of `slots` [n, V], wherever they live."""
        homes = self._home[slots]
        for key in np.unique(homes[homes >= 0]).tolist():
            self._save_rows(self.decoder.buffers[key], slots[homes == key])
        return self.last_logits.index_select(0, torch.from_numpy(slots).to(self.device))

    def _lse_out(self, rows: int) -> torch.Tensor:
        return torch.empty(rows, dtype=torch.float32, device=self.device)

    # ----------------------------------------------------------------------------- answers
    def _row_outputs(self, req: StepRequest, slots: np.ndarray, res: StepResult, answered: np.ndarray) -> None:
        """EXTRA_IDS' logits and DRAW's draws for the answered rows that ask (step_model.row_outputs)."""
        if req.extra_ids is not None:
            extra = req.extra_ids.astype(np.int64, copy=False)
            res.extra_logits = np.zeros(extra.shape, dtype=np.float32)
            res.rest_logsumexp = res.logsumexp.copy()
            rows = np.flatnonzero(answered & (extra >= 0).any(axis=1))
            if rows.size and extra.shape[1]:
                fill_extra_logits(res, rows, extra, self._stored_logits(slots[rows]))
        if req.draw is not None:
            res.drawn_ids = np.full(answered.shape[0], -1, dtype=np.int64)
            res.drawn_logits = np.zeros(answered.shape[0], dtype=np.float32)
            rows = rows_to_draw(req, res, answered)
            if rows.size:
                fill_draws(req, res, rows, self._stored_logits(slots[rows]), self._draw)
                self.stats.drawn_rows_total += int(rows.size)

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
                res.logsumexp[fetch] = row_logsumexp(stored, self._lse_out(fetch.size)).cpu().numpy()
            self._last_used[slots[live]] = now
            self._row_outputs(req, slots, res, live & ~(req.end.astype(bool) & (req.lengths == 0)))
            if req.want_logits:
                res.logits = np.zeros((res.status.shape[0], self.meta.vocab_size), dtype=np.float32)
                rows = np.flatnonzero(live)
                if rows.size:
                    res.logits[rows] = self._stored_logits(slots[rows]).cpu().numpy()
            ending = live & req.end.astype(bool)
            if ending.any():
                self._free_slots_of(slots[ending])
                self.stats.ended_total += int(ending.sum())


def _draw_columns(req: StepRequest, rows: np.ndarray) -> np.ndarray:
    """The rows' DRAW columns; an argmax's where the request carries none."""
    if req.draw is not None:
        return req.draw[rows]
    return np.tile(GREEDY, (rows.size, 1))


def _ahead_uniforms(req: StepRequest, rows: np.ndarray, depth: int) -> np.ndarray:
    """The rows' AHEAD_U, `depth` wide (zeros where the request carries fewer)."""
    u = np.zeros((rows.size, depth), dtype=np.float64)
    if req.ahead_u is not None:
        width = min(depth, req.ahead_u.shape[1])
        u[:, :width] = req.ahead_u[rows, :width]
    return u


def _answer_ahead(res: StepResult, rows: np.ndarray, run: AheadAnswers, at: int, window: int, depth: int) -> None:
    """A request's ahead answers (contract.AHEAD_OUTPUTS), `depth` wide: its rows' share of `run`."""
    answers = AheadAnswers.empty(res.status.shape[0], depth, window)  # unanswered rows as in AheadAnswers
    for name in AHEAD_FIELDS:
        share = getattr(run, name)[at : at + rows.size, :depth]
        getattr(answers, name)[rows] = share[..., :window] if share.ndim == 3 else share
        setattr(res, name, getattr(answers, name))
