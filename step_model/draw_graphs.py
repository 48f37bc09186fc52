"""The device draw (step_model.draw) replayed from CUDA graphs, one per row bucket.

The draw is some forty small kernels (a sort, a cumulative sum, binary searches, gathers):
eagerly on an H100 it took 1.15 ms for one row and 1.17 ms for 64 (benchmarks/tail_bench.py,
2026-12-07), nearly all of it launches, on every step of a top-p request whose nucleus is wider
than the window. Replayed from a graph it is one launch plus the kernels' own time.

Rows are rounded up to a bucket (powers of two up to 64, then multiples of 64); a padding row keeps
whatever the bucket's buffers last held (any finite row draws; its answer is dropped). The graphs
share one memory pool: they never run at once. More rows than the largest bucket, or a bucket whose
capture failed, run the draw eagerly: the same function, so the same tokens. The captured function
may also flag rows it could not settle; those are drawn again by the fallback, eagerly (the
searched draw settles every row: `never_flagged`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from step_model.draw import DRAW_COLUMNS, DrawFunction

# (z, log-sum-exp, DRAW columns) -> (token ids, their z, bool [M]: not answered, draw again)
FlaggedDraw = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]

__all__ = ["FlaggedDraw", "GraphedDraw", "draw_buckets", "never_flagged"]

log = logging.getLogger(__name__)

_POW2_UP_TO = 64  # buckets double up to this many rows, then grow by it


def draw_buckets(max_rows: int) -> list[int]:
    """The row buckets up to `max_rows` (the last one holds it)."""
    out = [1]
    while out[-1] < max_rows:
        out.append(out[-1] * 2 if out[-1] < _POW2_UP_TO else out[-1] + _POW2_UP_TO)
    return out


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    z: torch.Tensor  # float32 [B, V]
    lse: torch.Tensor  # float32 [B]
    draw: torch.Tensor  # float64 [B, DRAW_COLUMNS]
    ids: torch.Tensor  # int64 [B], the graph's outputs
    logits: torch.Tensor  # float32 [B]
    again: torch.Tensor  # bool [B]


def never_flagged(fn: DrawFunction) -> FlaggedDraw:
    """A draw that answers every row, as a `FlaggedDraw`."""

    def flagged(
        z: torch.Tensor, lse: torch.Tensor, draw: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids, logits = fn(z, lse, draw)
        return ids, logits, torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)

    return flagged


class GraphedDraw:
    """A `DrawFunction` that replays `fn` (sync-free: no host reads) from per-bucket CUDA graphs
    and draws the rows it flags again with `fallback`.

    Its results are views of the bucket's output buffers, valid until the next call: the caller
    copies them to the host at once (step_model.row_outputs.fill_draws does).
    """

    def __init__(
        self, fn: FlaggedDraw, fallback: DrawFunction, vocab_size: int, device: torch.device, max_rows: int
    ) -> None:
        self.fn = fn
        self.fallback = fallback
        self.vocab_size = vocab_size
        self.device = device
        self.buckets = draw_buckets(max(1, max_rows))
        self._graphs: dict[int, _Captured | None] = {}
        self._pool: Any = None  # the first graph's memory pool, shared by the others
        self.replays = 0

    def warm_up(self) -> None:
        """Capture every bucket now rather than at its first draw (a capture costs milliseconds)."""
        for rows in self.buckets:
            self._graph(rows)

    def __call__(self, z: torch.Tensor, lse: torch.Tensor, draw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = z.shape[0]
        bucket = next((b for b in self.buckets if b >= m), None)
        captured = self._graph(bucket) if bucket is not None else None
        if captured is None:
            ids, logits, again = self.fn(z, lse, draw)
        else:
            captured.z[:m].copy_(z)
            captured.lse[:m].copy_(lse)
            captured.draw[:m].copy_(draw)
            captured.graph.replay()
            self.replays += 1
            ids, logits, again = captured.ids[:m], captured.logits[:m], captured.again[:m]
        if bool(again.any()):  # the caller reads the results on the host next anyway
            redo = again.nonzero().squeeze(1)
            ids, logits = ids.clone(), logits.clone()
            ids[redo], logits[redo] = self.fallback(z[redo], lse[redo], draw[redo])
        return ids, logits

    def _graph(self, rows: int) -> _Captured | None:
        if rows in self._graphs:
            return self._graphs[rows]
        captured = None
        try:
            captured = self._capture(rows)
        except Exception as err:  # a kernel that cannot be captured: this bucket draws eagerly
            log.warning(
                "device draw: no CUDA graph for %d rows (%s: %s), drawing eagerly", rows, type(err).__name__, err
            )
        self._graphs[rows] = captured
        return captured

    def _capture(self, rows: int) -> _Captured:
        dev = self.device
        z = torch.zeros(rows, self.vocab_size, dtype=torch.float32, device=dev)
        lse = torch.full((rows,), math.log(self.vocab_size), dtype=torch.float32, device=dev)
        draw = torch.zeros(rows, DRAW_COLUMNS, dtype=torch.float64, device=dev)
        draw[:, 1] = 1.0  # top_p 1: untruncated
        side = torch.cuda.Stream(dev)  # one eager run first, off the capture (allocations, library set-up)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            self.fn(z, lse, draw)
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            ids, logits, again = self.fn(z, lse, draw)
        if self._pool is None:
            self._pool = graph.pool()
        return _Captured(graph, z, lse, draw, ids, logits, again)
