"""Vectorized sampling of the rows of a step that carry a logit adjustment (penalties,
logit_bias, banned ids).

Contract
--------
:func:`sample_adjusted_batch` takes, per row, the server's window of the tokens not adjusted
(``EXTRA_IDS`` rows: the step model leaves the adjusted ids out of it; a window that includes
them works too), the adjusted ids' own logits and the log-sum-exp of the rest of the row, and the
row's :class:`~frontend.sampling.adjust.LogitAdjustment`. It builds a window of the *adjusted* row
per row and hands all of them to :func:`frontend.sampling.sample_window_batch` at once. For every
row it decides, the token equals what the per-row :func:`frontend.sampling.sample` returns with
the same ``u`` and adjustment, and the logprob is the same unadjusted one; rows it leaves
undecided (and rows that report ``logprobs``, whose alternatives come from the unadjusted row)
go through the per-row sampler, which decides them or asks for the full row.

Why the adjusted window is exact: let ``w`` be the server window's smallest logit. Every token in
neither the window nor the adjustment keeps its logit, which is <= ``w``. Merge the window (its
unadjusted entries) with the adjusted ids at their adjusted values, drop what is below ``w``, and
keep the K largest: every token outside those K has an adjusted logit <= their smallest, so they
are a top-K window of the adjusted row in the sense of the sampler's contract. Its normaliser is
``log(exp(rest) + sum(exp(adjusted)))``, computed per row by the same function as the per-row path
(so both decide on bitwise equal numbers). Hand-written: no library samples exactly from windows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
from numpy.typing import NDArray

from frontend.sampling.adjust import LogitAdjustment, apply_rows
from frontend.sampling.batched import BatchParams, BatchSampled, sample_window_batch
from frontend.sampling.sampler import SamplingParams, _adjusted_logsumexp

__all__ = ["sample_adjusted_batch"]


def sample_adjusted_batch(
    topk_logits: NDArray[np.float32],
    topk_ids: NDArray[np.integer],
    extra_logits: NDArray[np.float32],
    rest_logsumexp: NDArray[np.floating],
    logsumexp: NDArray[np.floating],
    adjustments: Sequence[LogitAdjustment],
    params: Sequence[SamplingParams],
    u: NDArray[np.float64],
) -> BatchSampled:
    """Sample R adjusted rows; see the module docstring.

    Args:
        topk_logits, topk_ids: [R, K], the server's windows.
        extra_logits: [R, >= E_r], row r's first ``adjustments[r].size`` entries are the scaled
            logits of ``adjustments[r].ids``, in that order.
        rest_logsumexp: [R], log-sum-exp of each row without its adjusted ids.
        logsumexp: [R], log-sum-exp of each whole (unadjusted) row: reported logprobs use it.
        adjustments, params, u: per row.
    """
    n, k = topk_logits.shape
    width = max(1, max((a.size for a in adjustments), default=0))
    ids = np.full((n, width), -1, dtype=np.int64)
    raw = np.zeros((n, width), dtype=np.float64)
    bias = np.zeros((n, width), dtype=np.float64)
    counts = np.zeros((n, width), dtype=np.float64)
    repeated = np.zeros((n, width), dtype=bool)
    banned = np.zeros((n, width), dtype=bool)
    sizes = np.fromiter((a.size for a in adjustments), dtype=np.int64, count=n)
    for r, a in enumerate(adjustments):  # slice copies only
        e = a.size
        ids[r, :e], bias[r, :e], counts[r, :e] = a.ids, a.bias, a.counts
        repeated[r, :e], banned[r, :e] = a.repeated, a.banned
        raw[r, :e] = extra_logits[r, :e]
    settings = np.array(
        [(p.temperature or 1.0, p.repetition_penalty, p.frequency_penalty, p.presence_penalty) for p in params],
        dtype=np.float64,
    ).reshape(n, 4)  # temperature 0 (greedy): the server scaled by 1
    adjusted = apply_rows(raw, bias, repeated, counts, banned, *settings.T)
    adjusted[np.arange(width)[None, :] >= sizes[:, None]] = -np.inf  # padding
    rest = np.asarray(rest_logsumexp, dtype=np.float64)
    # The normaliser row by row with the per-row path's own function (a padded, vectorized sum
    # could differ in the last bit, and with it a razor-edge draw).
    lse = np.fromiter(
        (_adjusted_logsumexp(float(rest[r]), adjusted[r, : sizes[r]]) for r in range(n)), dtype=np.float64, count=n
    )

    window = np.asarray(topk_logits, dtype=np.float32)
    window_ids = np.asarray(topk_ids, dtype=np.int64)
    edge = window.min(axis=1).astype(np.float64)  # w per row
    # A window entry that is also an adjusted id (a server that did not leave them out) is
    # replaced by its adjusted value: drop it from the window part.
    taken = _member(window_ids, ids)
    merged = np.concatenate((np.where(taken, -np.inf, window.astype(np.float64)), adjusted), axis=1)
    merged_ids = np.concatenate((window_ids, ids), axis=1)
    merged[merged < edge[:, None]] = -np.inf  # below w: unknown tokens may come first
    # The K largest of each row (ties at the K-th value: any of them, as a server's window).
    top = np.argpartition(-merged, k - 1, axis=1)[:, :k]
    rows = np.arange(n)[:, None]
    adjusted_window = merged[rows, top].astype(np.float32)  # the values are float32 already
    adjusted_ids = merged_ids[rows, top]

    # The repetition penalty is part of the adjustment, already applied to these windows.
    batch_params = replace(BatchParams.from_params(list(params)), repetition_penalty=np.ones(n))
    out = sample_window_batch(adjusted_window, adjusted_ids, lse, batch_params, u)
    # Fewer than K entries at or above w (a window that held adjusted ids): the K-wide window would
    # end in -inf and trust entries equal to w. Rows reporting logprobs: their alternatives come
    # from the unadjusted row. Both go through the per-row sampler.
    decided = out.decided & (batch_params.logprobs == 0) & np.isfinite(adjusted_window).all(axis=1)
    # The reported logprob is the unadjusted one: the adjusted id's own logit, else (a token the
    # adjustment does not touch) its window value, which the adjustment left as it was.
    tokens = np.where(decided, out.token_ids, -2)
    hit = ids == tokens[:, None]
    own = np.where(hit.any(axis=1), raw[rows[:, 0], hit.argmax(axis=1)], np.nan)
    picked = adjusted_window[rows[:, 0], np.argmax(adjusted_ids == tokens[:, None], axis=1)].astype(np.float64)
    logit = np.where(hit.any(axis=1), own, picked)
    logprobs = np.where(decided, logit - np.asarray(logsumexp, dtype=np.float64), np.nan)
    return BatchSampled(out.token_ids, logprobs, decided, [() for _ in range(n)])


def _member(window_ids: NDArray[np.int64], ids: NDArray[np.int64]) -> NDArray[np.bool_]:
    """[R, K]: whether each window entry's id is among its row's adjusted ids (-1 = padding)."""
    n = window_ids.shape[0]
    span = int(max(window_ids.max(initial=0), ids.max(initial=0))) + 2
    offsets = np.arange(n, dtype=np.int64)[:, None] * span
    keys = np.sort((ids + offsets)[ids >= 0])
    wanted = (window_ids + offsets).ravel()
    at = np.minimum(np.searchsorted(keys, wanted), max(keys.size - 1, 0))
    found = keys[at] == wanted if keys.size else np.zeros(wanted.shape, dtype=bool)
    return found.reshape(window_ids.shape)
