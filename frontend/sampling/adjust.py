"""Logit adjustments that depend on the request's tokens: ``logit_bias``, the repetition penalty,
OpenAI's presence and frequency penalties, and banned ids (vLLM's ``min_tokens``).

Each changes the logits of a known, usually small, set of token ids and nothing else. So the
gateway names those ids to the server every step (``EXTRA_IDS``), gets back their logits and the
log-sum-exp of the rest of the row (``EXTRA_LOGITS``, ``REST_LOGSUMEXP``), and applies the exact
adjustment to them: :func:`frontend.sampling.sample` then samples from the true adjusted
distribution with the window, and from the full row only when the adjusted window does not decide.

Semantics (vLLM's order, OpenAI's formulas), on the raw logits ``l`` of the ids touched:

1. ``logit_bias``: ``l + bias[id]``;
2. repetition penalty (ids in the prompt or the output, as transformers and vLLM count them):
   ``l * penalty`` where ``l < 0``, else ``l / penalty``;
3. ``l - frequency_penalty * count[id] - presence_penalty * (count[id] > 0)``, ``count`` over the
   *generated* tokens only (OpenAI's definition; vLLM's too);
4. banned ids (while fewer than ``min_tokens`` were generated): ``-inf``;

then the temperature divides the row. The server returns the row already divided by ``T``; since
the repetition penalty only depends on the sign, which ``T > 0`` keeps, applying 1-3 to the scaled
value ``z = l / T`` with the additive terms divided by ``T`` is the same. Greedy requests (T = 0)
get the server's ``T = 1``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from frontend.sampling.sampler import SamplingParams

__all__ = ["AdjustmentTracker", "LogitAdjustment", "logit_adjustment"]

_F64 = NDArray[np.float64]
_I64 = NDArray[np.int64]
_Bool = NDArray[np.bool_]


@dataclass(frozen=True, slots=True, eq=False)
class LogitAdjustment:
    """What one step's adjustment does to the logits of ``ids`` (sorted, unique, in the vocabulary).

    Attributes:
        ids: int64 [E], the ids whose logits change (the server's EXTRA_IDS for this row).
        bias: float64 [E], ``logit_bias`` per id (raw-logit units; 0 where none).
        repeated: bool [E], the id occurs in the prompt or the output (repetition penalty).
        counts: float64 [E], occurrences in the generated tokens (frequency / presence penalty).
        banned: bool [E], the id gets probability 0.
    """

    ids: _I64
    bias: _F64
    repeated: _Bool
    counts: _F64
    banned: _Bool

    @property
    def size(self) -> int:
        return int(self.ids.shape[0])

    @property
    def reason(self) -> str:
        """Which setting needs these ids (a NeedFullRow reason when the server cannot return them)."""
        if self.banned.any():
            return "min_tokens"
        if self.bias.any():
            return "logit_bias"
        if self.counts.any():
            return "presence_frequency_penalty"
        return "repetition_penalty"

    def apply(self, z: _F64, params: SamplingParams) -> _F64:
        """The adjusted scaled logits of ``ids``, given their scaled logits ``z`` (float64 [E]),
        rounded to float32 as a logit is (so that every path samples from the very same values)."""
        t = params.temperature if params.temperature > 0.0 else 1.0
        out = z + self.bias / t
        penalty = params.repetition_penalty
        if penalty != 1.0:
            out = np.where(self.repeated, np.where(out < 0.0, out * penalty, out / penalty), out)
        if params.frequency_penalty != 0.0 or params.presence_penalty != 0.0:
            out = out - (params.frequency_penalty * self.counts + params.presence_penalty * (self.counts > 0)) / t
        if self.banned.any():
            out = np.where(self.banned, -np.inf, out)
        result: _F64 = out.astype(np.float32).astype(np.float64)
        return result


def logit_adjustment(
    params: SamplingParams,
    *,
    prompt_ids: Sequence[int] | NDArray[np.integer] = (),
    output_ids: Sequence[int] | NDArray[np.integer] = (),
    banned_ids: Iterable[int] = (),
    vocab_size: int | None = None,
) -> LogitAdjustment | None:
    """The adjustment of the next step of a sequence with these tokens so far, or None when the
    request's settings change nothing. Ids outside ``[0, vocab_size)`` are ignored."""
    repetition = params.repetition_penalty != 1.0
    penalties = params.frequency_penalty != 0.0 or params.presence_penalty != 0.0
    banned = np.fromiter(banned_ids, dtype=np.int64)
    if not (repetition or penalties or params.logit_bias or banned.size):
        return None
    output = np.asarray(output_ids, dtype=np.int64).reshape(-1)
    prompt = np.asarray(prompt_ids, dtype=np.int64).reshape(-1)
    bias_ids = np.fromiter((i for i, _ in params.logit_bias), dtype=np.int64, count=len(params.logit_bias))
    bias_values = np.fromiter((b for _, b in params.logit_bias), dtype=np.float64, count=len(params.logit_bias))
    parts = [bias_ids, banned]
    if repetition:
        parts += [prompt, output]
    elif penalties:
        parts.append(output)
    ids = np.unique(np.concatenate(parts))
    ids = ids[(ids >= 0) & (ids < (vocab_size if vocab_size is not None else np.iinfo(np.int64).max))]
    if not ids.size:
        return None
    bias = np.zeros(ids.shape[0], dtype=np.float64)
    if bias_ids.size:
        at, found = _positions(ids, bias_ids)
        bias[at[found]] = bias_values[found]
    counts = np.zeros(ids.shape[0], dtype=np.float64)
    if penalties and output.size:
        seen, n = np.unique(output, return_counts=True)
        at, found = _positions(ids, seen)
        counts[at[found]] = n[found]
    repeated = np.isin(ids, np.concatenate((prompt, output))) if repetition else np.zeros(ids.shape[0], dtype=bool)
    return LogitAdjustment(ids, bias, repeated, counts, np.isin(ids, banned))


def _positions(ids: _I64, wanted: _I64) -> tuple[_I64, _Bool]:
    """Where each of ``wanted`` sits in the sorted ``ids``, and whether it is there at all."""
    at: _I64 = np.searchsorted(ids, wanted).astype(np.int64)
    found: _Bool = (at < ids.size) & (ids[np.minimum(at, ids.size - 1)] == wanted)
    return at, found


class AdjustmentTracker:
    """One sequence's adjustment, kept up to date token by token: :meth:`append` inserts or counts
    the generated token (O(E) array work instead of rebuilding from all tokens every step);
    :meth:`current` is what :func:`logit_adjustment` would build from the tokens so far. The
    adjustment it returns is never changed afterwards (a step may still be sampling with it)."""

    def __init__(
        self,
        params: SamplingParams,
        prompt_ids: Sequence[int],
        *,
        banned_ids: Iterable[int] = (),
        min_tokens: int = 0,
        vocab_size: int | None = None,
        output_ids: Sequence[int] = (),
    ) -> None:
        self.params = params
        self.prompt_ids = list(prompt_ids)
        self.banned_ids = tuple(banned_ids)
        self.min_tokens = min_tokens
        self.vocab_size = vocab_size
        self.output_ids = list(output_ids)
        self._repetition = params.repetition_penalty != 1.0
        self._penalties = params.frequency_penalty != 0.0 or params.presence_penalty != 0.0
        self._current = self._rebuild()

    def _rebuild(self) -> LogitAdjustment | None:
        banned = self.banned_ids if len(self.output_ids) < self.min_tokens else ()
        return logit_adjustment(
            self.params,
            prompt_ids=self.prompt_ids,
            output_ids=self.output_ids,
            banned_ids=banned,
            vocab_size=self.vocab_size,
        )

    def current(self) -> LogitAdjustment | None:
        return self._current

    def append(self, token: int) -> None:
        self.output_ids.append(token)
        now = self._current
        if len(self.output_ids) == self.min_tokens or now is None:  # the ban lifts (or nothing yet)
            self._current = self._rebuild()
            return
        if not (self._repetition or self._penalties):
            return  # only logit_bias / bans: the generated tokens change nothing
        if self.vocab_size is not None and not 0 <= token < self.vocab_size:
            return
        at = int(np.searchsorted(now.ids, token))
        if at < now.size and int(now.ids[at]) == token:
            counts = now.counts
            if self._penalties:
                counts = counts.copy()
                counts[at] += 1
            repeated = now.repeated
            if self._repetition and not repeated[at]:
                repeated = repeated.copy()
                repeated[at] = True
            self._current = LogitAdjustment(now.ids, now.bias, repeated, counts, now.banned)
            return
        self._current = LogitAdjustment(
            _insert(now.ids, at, token),
            _insert(now.bias, at, 0.0),
            _insert(now.repeated, at, self._repetition),
            _insert(now.counts, at, 1.0 if self._penalties else 0.0),
            _insert(now.banned, at, False),
        )


def _insert(a: NDArray[Any], at: int, value: object) -> NDArray[Any]:
    """A copy of ``a`` with ``value`` at ``at`` (np.insert's generality costs ~4x more here)."""
    out = np.empty(a.shape[0] + 1, dtype=a.dtype)
    out[:at] = a[:at]
    out[at] = value
    out[at + 1 :] = a[at:]
    return out


def apply_rows(
    z: _F64,
    bias: _F64,
    repeated: _Bool,
    counts: _F64,
    banned: _Bool,
    temperature: _F64,
    repetition_penalty: _F64,
    frequency_penalty: _F64,
    presence_penalty: _F64,
) -> _F64:
    """:meth:`LogitAdjustment.apply` for R rows at once ([R, E] arrays, [R] settings; greedy rows
    with temperature 1), bitwise equal to it row by row: the same elementwise operations in the
    same order (a neutral setting is an exact no-op here: x / 1, x * 1 and x - 0.0 are x)."""
    t = temperature[:, None]
    out = z + bias / t
    penalty = repetition_penalty[:, None]
    out = np.where(repeated, np.where(out < 0.0, out * penalty, out / penalty), out)
    out = out - (frequency_penalty[:, None] * counts + presence_penalty[:, None] * (counts > 0)) / t
    out = np.where(banned, -np.inf, out)
    result: _F64 = out.astype(np.float32).astype(np.float64)
    return result
