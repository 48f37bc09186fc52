"""The rows of one step as the step model's own types: a `step_model.rows.StepRequest` goes to
Triton and a `step_model.rows.StepResult` comes back, the same pair the model decodes the wire
into and encodes its answer from (`step_model.triton_model`), so the columns are written down
once for both sides of gRPC. Pure numpy: the scheduler builds steps without importing gRPC.

`compose` lays out a scheduler step (decode rows, start rows, release rows) straight into
columns, without a per-row object; `from_rows` takes a few `Row`s (warm-up, probes, releases,
full-row fetches, tests).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from step_model.contract import RowStatus
from step_model.rows import StepRequest, StepResult

__all__ = ["ROW_REFUSALS", "Row", "StepRequest", "StepResult", "compose", "from_rows"]


@dataclass(frozen=True, slots=True)
class Row:
    """One sequence's part of a step: its new tokens (the prompt when start), or none."""

    sequence_id: int
    tokens: Sequence[int]
    start: bool = False
    end: bool = False
    temperature: float = 1.0


def from_rows(rows: Sequence[Row], *, kv_partition: int | None = None) -> StepRequest:
    n = len(rows)
    lengths = np.fromiter((len(r.tokens) for r in rows), dtype=np.int32, count=n)
    ids = np.zeros((n, max(1, int(lengths.max(initial=0)))), dtype=np.int64)
    for i in np.flatnonzero(lengths).tolist():
        ids[i, : lengths[i]] = rows[i].tokens
    return StepRequest(
        np.fromiter((r.sequence_id for r in rows), dtype=np.uint64, count=n),
        ids,
        lengths,
        np.fromiter((r.start for r in rows), dtype=bool, count=n),
        np.fromiter((r.end for r in rows), dtype=bool, count=n),
        np.fromiter((r.temperature for r in rows), dtype=np.float32, count=n),
        kv_partition=kv_partition,
    )


def compose(
    decode_ids: np.ndarray,
    decode_tokens: np.ndarray,
    decode_temperature: np.ndarray,
    starts: Sequence[tuple[int, Sequence[int], float]],
    releases: Sequence[int],
    request_ids: Sequence[str] = (),
    start_prompt_logprobs: Sequence[int] = (),
    extra_ids: Sequence[np.ndarray | None] = (),
    draw: np.ndarray | None = None,
    kv_partition: int | None = None,
    *,
    start_invariant: Sequence[bool] = (),
    start_replay_from: Sequence[int] = (),
    decode_ahead: np.ndarray | None = None,
    decode_ahead_u: np.ndarray | None = None,
    decode_rewind: np.ndarray | None = None,
) -> StepRequest:
    """Decode rows (one token each, given as arrays), then start rows (id, prompt,
    temperature), then release rows (ids): the layout of a scheduler step. `request_ids` are
    the decode and start rows' (in that order); `start_prompt_logprobs` the start rows';
    `extra_ids` the decode and start rows' ids whose logits they need (None: none); `draw` the
    decode and start rows' DRAW columns [d + s, 4] (u < 0: not asked; release rows never ask).
    Each is kept only when some row has one (an id, a k >= 0, an extra id, a u >= 0).
    `kv_partition`: the KV partition of the step's lane (None: one lane, the parameter unsent).
    `start_invariant` / `start_replay_from`: the start rows' batch-invariance flags and replay
    points (contract.PARAM_INVARIANT_ROWS, PARAM_REPLAY_FROM; -1: none), kept when one is set.
    `decode_ahead` / `decode_ahead_u` / `decode_rewind`: the decode rows' decodes run ahead, their
    uniforms [d, A] and the cached tokens each drops first (contract.PARAM_AHEAD, AHEAD_U,
    PARAM_REWIND), kept when a row has one."""
    d, s, r = int(decode_ids.shape[0]), len(starts), len(releases)
    n = d + s + r
    width = max([1, *(len(p) for _, p, _ in starts)])
    ids = np.zeros((n, width), dtype=np.int64)
    ids[:d, 0] = decode_tokens
    lengths = np.zeros(n, dtype=np.int32)
    lengths[:d] = 1
    for j, (_, prompt, _) in enumerate(starts):
        ids[d + j, : len(prompt)] = prompt
        lengths[d + j] = len(prompt)
    sequence_ids = np.empty(n, dtype=np.uint64)
    sequence_ids[:d] = decode_ids
    sequence_ids[d : d + s] = [sid for sid, _, _ in starts]
    sequence_ids[d + s :] = releases
    start = np.zeros(n, dtype=bool)
    start[d : d + s] = True
    end = np.zeros(n, dtype=bool)
    end[d + s :] = True
    temperature = np.ones(n, dtype=np.float32)
    temperature[:d] = decode_temperature
    temperature[d : d + s] = [t for _, _, t in starts]
    row_ids = (*request_ids, *([""] * (n - len(request_ids)))) if any(request_ids) else ()
    echo = None
    if any(k >= 0 for k in start_prompt_logprobs):
        echo = np.full(n, -1, dtype=np.int32)
        echo[d : d + len(start_prompt_logprobs)] = start_prompt_logprobs
    invariant = None
    if any(start_invariant):
        invariant = np.zeros(n, dtype=bool)
        invariant[d : d + len(start_invariant)] = start_invariant
    replay_from = None
    if any(p >= 0 for p in start_replay_from):
        replay_from = np.full(n, -1, dtype=np.int32)
        replay_from[d : d + len(start_replay_from)] = start_replay_from
    columns = None
    if draw is not None and bool((draw[:, 0] >= 0).any()):
        columns = np.full((n, 4), -1.0)
        columns[: draw.shape[0]] = draw
    ahead = ahead_u = rewind = None
    if decode_ahead is not None and bool(decode_ahead.any()):
        ahead = np.zeros(n, dtype=np.int32)
        ahead[:d] = decode_ahead
        if decode_ahead_u is not None:
            ahead_u = np.zeros((n, decode_ahead_u.shape[1]), dtype=np.float64)
            ahead_u[:d] = decode_ahead_u
    if decode_rewind is not None and bool(decode_rewind.any()):
        rewind = np.zeros(n, dtype=np.int32)
        rewind[:d] = decode_rewind
    return StepRequest(
        sequence_ids,
        ids,
        lengths,
        start,
        end,
        temperature,
        ahead=ahead,
        ahead_u=ahead_u,
        rewind=rewind,
        request_ids=row_ids,
        prompt_logprobs=echo,
        extra_ids=_pad_rows(extra_ids, n),
        draw=columns,
        kv_partition=kv_partition,
        invariant=invariant,
        replay_from=replay_from,
    )


def _pad_rows(rows: Sequence[np.ndarray | None], n: int) -> np.ndarray | None:
    """Per-row id lists as one int64 [n, E] array padded with -1; None when every row has none."""
    width = max((r.shape[0] for r in rows if r is not None), default=0)
    if width == 0:
        return None
    out = np.full((n, width), -1, dtype=np.int64)
    for i, r in enumerate(rows):
        if r is not None and r.shape[0]:
            out[i, : r.shape[0]] = r
    return out


ROW_REFUSALS: dict[int, str] = {
    RowStatus.NOT_FOUND: "the model server no longer knows this sequence (ended, or evicted as idle)",
    RowStatus.ALREADY_EXISTS: "the model server already holds a sequence with this id",
    RowStatus.INVALID: "the model server refused this sequence's step as malformed",
}
