"""Prefill runs of the step engine: one pass over right-padded prompts [b, s] into a scratch block of
keys/values [L, 2, b, H, s, D] (GroupQueryAttention's first-prompt mode), answering each row's
logits at its last position; the engine then copies the block into the rows' slots.

On the GPU the pass's shape is rounded up to a bucket (rows: powers of two; prompt tokens: 16, 32,
64, ... up to the context): ONNX Runtime spends 55-60 ms on the first run of every new shape, and
at 512 streams every prefill met a new (rows, tokens), a quarter of each execution; a known shape
costs 2.4 ms, launch-bound (H100, 2026-12-07, docs/results/2026-12-07-h100-phases). Buckets of up
to `graph_tokens` rows x tokens are replayed as CUDA graphs (fixed buffers per bucket, their own
session), the rest run eagerly. Whether a pass replays depends on its shape alone, never on the
step's window (a graph's window is `graph_window` wide; a wider one is taken from its logits):
the two sessions need not give the same bits, and a batch-invariant row's prefill must not move
with a neighbour's top_k. Padding rows are one token long and their outputs are dropped; a
real row's positions past its length are padding the row's next steps overwrite before anything
reads them. On the CPU shapes are exact: there a padded row or position costs real compute.

The shape of a pass depends only on its rows' prompts, so a row prefilled alone (the engine's
batch-invariant rows) gets the same shape, hence the same keys, whatever else runs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import onnxruntime as ort
import torch

from step_model.contract import graph_io
from step_model.kernels import row_logsumexp
from step_model.ort_runtime import bind_kv, bind_tensor

__all__ = ["PrefillOutput", "PrefillRunner", "prompt_feeds"]

log = logging.getLogger(__name__)

_MIN_TOKENS = 16  # the smallest prompt-token bucket
_GRAPH_TOKENS = 2048  # buckets of at most this many rows x tokens are captured as CUDA graphs
_WARM_TOKENS = 128  # warm_up runs every row bucket up to this many prompt tokens


def _round_up(n: int, smallest: int = 1) -> int:
    """The smallest power-of-two multiple of `smallest` >= n."""
    out = smallest
    while out < n:
        out *= 2
    return out


def prompt_feeds(
    input_ids: np.ndarray, lengths: np.ndarray, *, gather_index: np.ndarray, temperature: np.ndarray, window: int
) -> dict[str, np.ndarray]:
    """The graph's inputs for an eager pass over right-padded prompts [b, s] (GroupQueryAttention's
    first-prompt mode: total_sequence_length == s); logits come out at `gather_index`."""
    b, s = input_ids.shape
    return {
        graph_io.INPUT_IDS: input_ids,
        graph_io.POSITION_IDS: np.broadcast_to(np.arange(s, dtype=np.int64), (b, s)).copy(),
        graph_io.SEQLENS_K: (lengths - 1).astype(np.int32),
        graph_io.TOTAL_SEQUENCE_LENGTH: np.array(s, dtype=np.int32),
        graph_io.GATHER_INDEX: gather_index,
        graph_io.TEMPERATURE: temperature,
        graph_io.WINDOW: np.array([window], dtype=np.int64),
    }


class PrefillOutput(NamedTuple):
    """One pass's results for its b real rows: `kv` [L, 2, b, H, s, D] and `logits` [b, V] on the
    device (views of buffers the next pass overwrites: copy them before), the rest on the host."""

    kv: torch.Tensor
    logits: torch.Tensor
    topk_logits: np.ndarray  # [b, window]
    topk_ids: np.ndarray
    lse: np.ndarray  # [b]


@dataclass
class _GraphBuffers:
    """A captured bucket: every input and output at a fixed address."""

    rows: int
    tokens: int
    graph_id: int
    binding: Any
    input_ids: torch.Tensor  # [B, S] int64
    positions: torch.Tensor  # [B, S] int64, constant 0..S-1 per row
    seqlens_k: torch.Tensor  # [B] int32
    gather_index: torch.Tensor  # [B] int64
    temperature: torch.Tensor  # [B] float32
    logits: torch.Tensor  # [B, V] float32
    topk_logits: torch.Tensor  # [B, W] float32
    topk_ids: torch.Tensor  # [B, W] int64
    graph_lse: torch.Tensor  # [B] float32, the graph's own (unused: row_logsumexp serves, as eagerly)
    kv: torch.Tensor  # [L, 2, B, H, S, D]
    host_inputs: tuple[np.ndarray, ...]  # total_sequence_length and window, bound by address
    runs: int = 0


class PrefillRunner:
    """Runs prefill passes (see the module docstring). `session`: the engine's eager session;
    `graph_session`: one built with CUDA graphs on, or None for eager passes only; `bucketed`:
    round shapes up (default: on the GPU only)."""

    def __init__(
        self,
        session: Any,
        graph_session: Any,
        *,
        device: torch.device,
        device_id: int,
        dtype: torch.dtype,
        n_layer: int,
        kv_dims: tuple[int, int],  # (heads, head_dim)
        vocab_size: int,
        max_context: int,
        graph_window: int,
        graph_tokens: int = _GRAPH_TOKENS,
        bucketed: bool | None = None,  # None: on the GPU only
    ) -> None:
        self.session = session
        self.graph_session = graph_session
        self.device, self.device_id, self.dtype = device, device_id, dtype
        self.device_kind = device.type
        self.n_layer, self.kv_dims = n_layer, kv_dims
        self.vocab_size, self.max_context = vocab_size, max_context
        self.graph_window = max(1, min(graph_window, vocab_size))
        self.graph_tokens = graph_tokens if graph_session is not None else 0
        self.bucketed = self.device_kind == "cuda" if bucketed is None else bucketed
        self._graphs: dict[tuple[int, int], _GraphBuffers] = {}
        self.unavailable_reason = "" if graph_session is not None else "no graph session"
        self.graph_replays = 0

    # ----------------------------------------------------------------------------- shapes
    def shape(self, rows: int, tokens: int) -> tuple[int, int]:
        """The pass's (rows, tokens) for `rows` prompts of at most `tokens` tokens."""
        if not self.bucketed:
            return rows, tokens
        return _round_up(rows), min(_round_up(tokens, _MIN_TOKENS), self.max_context)

    def _graphed(self, rows: int, tokens: int) -> bool:
        return rows * tokens <= self.graph_tokens

    def kv_block(self, rows: int, tokens: int) -> torch.Tensor:
        """Throw-away keys/values [L, 2, rows, H, tokens, D] for an eager pass."""
        heads, head_dim = self.kv_dims
        shape = (self.n_layer, 2, rows, heads, tokens, head_dim)
        return torch.empty(shape, dtype=self.dtype, device=self.device)

    # ----------------------------------------------------------------------------- passes
    def run(self, input_ids: np.ndarray, lengths: np.ndarray, temperature: np.ndarray, window: int) -> PrefillOutput:
        """One pass over prompts `input_ids` [b, >= max(lengths)] (tokens past a row's length are
        ignored) at `temperature` [b]; each row's window of `window` entries at its last token."""
        b, s = int(lengths.shape[0]), int(lengths.max())
        rows, tokens = self.shape(b, s)
        ids = np.zeros((rows, tokens), dtype=np.int64)
        ids[:b, :s] = input_ids[:, :s]
        ids[:b][np.arange(tokens)[None, :] >= lengths[:, None]] = 0
        padded_lengths = np.ones(rows, dtype=np.int64)
        padded_lengths[:b] = lengths
        temps = np.ones(rows, dtype=np.float32)
        temps[:b] = temperature
        gather = np.arange(rows, dtype=np.int64) * tokens + padded_lengths - 1  # each row's last position
        if self._graphed(rows, tokens):
            buffers = self._graphs.get((rows, tokens)) or self._capture(rows, tokens)
            if buffers is not None:
                try:
                    return self._replay(buffers, ids, padded_lengths, gather, temps, b, s, window)
                except Exception as err:  # e.g. a node that cannot be captured: eager from now on
                    self._disable(f"a {rows} x {tokens} prefill graph failed: {type(err).__name__}: {err}")
        feeds = prompt_feeds(ids, padded_lengths, gather_index=gather, temperature=temps, window=window)
        kv = self.kv_block(rows, tokens)
        logits, topk_logits, topk_ids, lse = self.eager(feeds, kv, rows)
        return PrefillOutput(kv[:, :, :b, :, :s], logits[:b], topk_logits[:b], topk_ids[:b], lse[:b])

    def eager(
        self, feeds: dict[str, np.ndarray], kv: torch.Tensor, batch: int
    ) -> tuple[torch.Tensor, np.ndarray, np.ndarray, np.ndarray]:
        """One eager run with past/present bound to `kv` [L, 2, b, H, S, D] in place: (logits
        [batch, V] on the device, top-K logits, ids, log-sum-exp on the host)."""
        binding = self.session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        bind_kv(binding, kv, self.device_kind, self.device_id, self.n_layer)
        logits = torch.empty((batch, self.vocab_size), dtype=torch.float32, device=self.device)
        bind_tensor(binding, graph_io.LOGITS, logits, self.device_kind, self.device_id, output=True)
        for name in graph_io.TAIL_OUTPUTS:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        topk_logits, topk_ids = (v.numpy() for v in binding.get_outputs()[-3:-1])
        # The graph's own log-sum-exp depends on the row count on the CPU (step_model.kernels).
        top = torch.from_numpy(topk_logits[:, 0].copy()) if self.device_kind != "cuda" else None
        lse_out = torch.empty(batch, dtype=torch.float32, device=self.device)
        return logits, topk_logits, topk_ids, row_logsumexp(logits, lse_out, top).cpu().numpy()

    # ----------------------------------------------------------------------------- CUDA graphs
    def warm_up(self, max_rows: int) -> None:
        """Run every bucket of up to `max_rows` rows and up to _WARM_TOKENS prompt tokens, or more
        tokens while it is a graph bucket, once (thrice and captured when graphs are on), so that
        no request of those shapes meets a shape's first run."""
        if not self.bucketed:
            return
        rows = 1
        while rows <= _round_up(max_rows):
            tokens = _MIN_TOKENS
            while tokens <= self.max_context and (tokens <= _WARM_TOKENS or rows * tokens <= self.graph_tokens):
                lengths = np.full(rows, tokens, dtype=np.int64)
                for _ in range(3 if self._graphed(rows, tokens) else 1):
                    self.run(np.zeros((rows, tokens), dtype=np.int64), lengths, np.ones(rows, np.float32), 1)
                tokens *= 2
            rows *= 2

    def _capture(self, rows: int, tokens: int) -> _GraphBuffers | None:
        """The bucket's fixed buffers and binding (ONNX Runtime captures on the graph's third run:
        the first two run eagerly); None when graphs are off or this bucket cannot be bound."""
        if self.graph_session is None:
            return None
        dev, w = self.device, self.graph_window
        try:
            buffers = _GraphBuffers(
                rows=rows,
                tokens=tokens,
                graph_id=len(self._graphs),
                binding=self.graph_session.io_binding(),
                input_ids=torch.zeros((rows, tokens), dtype=torch.int64, device=dev),
                positions=torch.arange(tokens, dtype=torch.int64, device=dev).expand(rows, tokens).contiguous(),
                seqlens_k=torch.zeros(rows, dtype=torch.int32, device=dev),
                gather_index=torch.zeros(rows, dtype=torch.int64, device=dev),
                temperature=torch.ones(rows, dtype=torch.float32, device=dev),
                logits=torch.empty((rows, self.vocab_size), dtype=torch.float32, device=dev),
                topk_logits=torch.empty((rows, w), dtype=torch.float32, device=dev),
                topk_ids=torch.empty((rows, w), dtype=torch.int64, device=dev),
                graph_lse=torch.empty(rows, dtype=torch.float32, device=dev),
                kv=self.kv_block(rows, tokens),
                host_inputs=(np.array(tokens, dtype=np.int32), np.array([w], dtype=np.int64)),
            )
            binding = buffers.binding
            for name, tensor, output in (
                (graph_io.INPUT_IDS, buffers.input_ids, False),
                (graph_io.POSITION_IDS, buffers.positions, False),
                (graph_io.SEQLENS_K, buffers.seqlens_k, False),
                (graph_io.GATHER_INDEX, buffers.gather_index, False),
                (graph_io.TEMPERATURE, buffers.temperature, False),
                (graph_io.LOGITS, buffers.logits, True),
                (graph_io.TOPK_LOGITS, buffers.topk_logits, True),
                (graph_io.TOPK_IDS, buffers.topk_ids, True),
                (graph_io.LOGSUMEXP, buffers.graph_lse, True),
            ):
                bind_tensor(binding, name, tensor, self.device_kind, self.device_id, output=output)
            binding.bind_cpu_input(graph_io.TOTAL_SEQUENCE_LENGTH, buffers.host_inputs[0])
            binding.bind_cpu_input(graph_io.WINDOW, buffers.host_inputs[1])
            bind_kv(binding, buffers.kv, self.device_kind, self.device_id, self.n_layer)
        except Exception as err:  # a binding ORT refuses: eager passes serve
            self._disable(f"binding a {rows} x {tokens} prefill graph failed: {type(err).__name__}: {err}")
            return None
        self._graphs[rows, tokens] = buffers
        return buffers

    def _replay(
        self,
        buffers: _GraphBuffers,
        ids: np.ndarray,
        lengths: np.ndarray,
        gather: np.ndarray,
        temps: np.ndarray,
        b: int,
        s: int,
        window: int,
    ) -> PrefillOutput:
        buffers.input_ids.copy_(torch.from_numpy(ids), non_blocking=True)
        buffers.seqlens_k.copy_(torch.from_numpy((lengths - 1).astype(np.int32)), non_blocking=True)
        buffers.gather_index.copy_(torch.from_numpy(gather), non_blocking=True)
        buffers.temperature.copy_(torch.from_numpy(temps), non_blocking=True)
        options = ort.RunOptions()
        options.add_run_config_entry("gpu_graph_id", str(buffers.graph_id))
        self.graph_session.run_with_iobinding(buffers.binding, options)
        if buffers.runs >= 2:
            self.graph_replays += 1
        buffers.runs += 1
        logits = buffers.logits[:b]
        lse = row_logsumexp(logits, torch.empty(b, dtype=torch.float32, device=self.device))
        if window <= self.graph_window:
            topk_logits, topk_ids = buffers.topk_logits[:b, :window], buffers.topk_ids[:b, :window]
        else:  # wider than the graph's window: from the logits (ties in another order, as any window's)
            topk_logits, topk_ids = torch.topk(logits, window, dim=-1)
        return PrefillOutput(
            buffers.kv[:, :, :b, :, :s], logits, topk_logits.cpu().numpy(), topk_ids.cpu().numpy(), lse.cpu().numpy()
        )

    def _disable(self, reason: str) -> None:
        self.unavailable_reason = reason[:300]
        log.warning("prefill CUDA graphs off: %s", self.unavailable_reason)
        self.graph_session, self.graph_tokens, self._graphs = None, 0, {}
