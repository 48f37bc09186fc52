"""Vectorized window sampling: one numpy pass over a whole step's [N, K] windows.

Contract
--------
:func:`sample_window_batch` is :func:`frontend.sampling.sampler.sample` (window path, no seen
tokens) applied to every row at once. For every row ``i`` with ``decided[i]``, ``token_ids[i]``,
``logprobs[i]`` (bitwise) and ``top_logprobs[i]`` equal what

    sample(StepLogits(topk_logits[i], topk_ids[i], float(logsumexp[i])), params_i, float(u[i]))

returns. A row is left undecided when that call would raise :class:`NeedFullRow` or
``ValueError``, and also in a few cases this module declines on purpose (below). The caller
re-does undecided rows with the per-row :func:`sample` (same ``u``), which decides them or asks for
the full row; so leaving a row undecided is always safe, it only costs time.

Decided here, vectorized: greedy, plain sampling, top-k, top-p, min-p and their combinations,
with any ``logprobs``, under exactly the per-row rules (trusted prefix, stage order top-k -> top-p
-> min-p, the draw rule, the ``top_p_open`` bounds). Every row the per-row window path decides is
decided here too, except the rows declined on purpose:

* ``repetition_penalty != 1``: the penalty needs the request's seen tokens and, with any seen
  token, the full row; this function has neither.
* ``logsumexp == 0.0`` exactly: the sort key below does not keep the sign of a zero logit, and
  ``-0.0 - 0.0`` differs bitwise from ``0.0 - 0.0`` (for any other logsumexp ``±0 - lse`` agree).
* malformed rows the API layer and the server never produce: a NaN or +inf logit, a window of
  only -inf, a non-finite window mass (``exp(z - lse)`` overflowing), ``min_p > 1``, or (in a row
  that needs re-sorting) a token id outside ``[0, 2**32)``.

Numerics: the same float64 operations as the per-row path, on the same values, per element:
``exp(z - lse)`` on fresh C-contiguous arrays as there (numpy picks SIMD or libm code by memory
layout, and they may differ in the last bit), ``cumsum(axis=1)`` (numpy accumulates sequentially,
so prefix sums match the per-row ``cumsum`` bitwise), ``log(min_p)`` via :func:`math.log`. Each
per-row ``searchsorted`` is a count over a monotone row here, which is the same integer. The
tests check all of this bitwise.

Cost: 512 rows of 54-64 entries take about 0.3 ms (greedy) to 1.2 ms (top-k / top-p, fp16
windows, whose ties need a sort) on a busy 2-core machine where the per-row loop takes 12-20 ms;
``logprobs`` add ~1-2 us a row for building the Python tuples; :meth:`BatchParams.from_params`
~0.1 ms. The work arrays are kept per thread between calls (a few MiB at most), so concurrent
calls from different threads are safe.
"""

from __future__ import annotations

import math
import struct
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from frontend.sampling.sampler import _BOUND_SLACK, Sampled, SamplingParams

__all__ = ["BatchParams", "BatchSampled", "sample_window_batch"]

_F32 = NDArray[np.float32]
_F64 = NDArray[np.float64]
_U32 = NDArray[np.uint32]
_Ids = NDArray[np.integer[Any]]
_I64 = NDArray[np.int64]
_Bool = NDArray[np.bool_]
_TopLogprobs = tuple[tuple[int, float], ...]

# BatchParams.from_params packs each SamplingParams into one row of float64s, cached per object:
# the scheduler passes the same request objects step after step, and joining cached bytes is far
# cheaper than reading six attributes per row. Keys are id(); the entry keeps its object alive, so
# the id cannot be reused by another object while the entry exists.
_ROW_FORMAT = struct.Struct("=7d")
_ROW_CACHE: dict[int, tuple[SamplingParams, bytes]] = {}
_ROW_CACHE_LIMIT = 8192
# Integer settings are clamped into a range float64 holds exactly; beyond it they act the same
# (a top_k or logprobs above any window size is never decided from the window).
_INT_CLAMP = 2**31

# Sort keys are int64s built as two uint32 halves: the logit order (high) and the token id (low).
_ID_MASK = 0xFFFFFFFF
_HI, _LO = (1, 0) if sys.byteorder == "little" else (0, 1)


class _Scratch(threading.local):
    """Per-thread [N, K] work arrays, reused from call to call.

    Fresh arrays of this size (128-256 KiB) are handed back to the OS when freed, so each call
    would fault in ~1 MiB of new pages, which costs more than the arithmetic done on them.
    """

    def __init__(self) -> None:
        self.buffers: dict[str, NDArray[Any]] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: type[Any]) -> NDArray[Any]:
        """A C-contiguous array of ``shape``, valid until the next request for ``name``."""
        size = math.prod(shape)
        buf = self.buffers.get(name)
        if buf is None or buf.dtype != dtype or buf.size < size:
            buf = self.buffers[name] = np.empty(size, dtype=dtype)
        return buf[:size].reshape(shape)


_SCRATCH = _Scratch()


@dataclass(frozen=True, slots=True, eq=False)
class BatchParams:
    """Struct-of-arrays form of one ``SamplingParams`` per row (all arrays [N]).

    Build it with :meth:`from_params`. ``log_min_p`` is ``math.log(min_p)`` where
    ``0 < min_p <= 1`` (0 elsewhere); it is computed here, with :func:`math.log` as the per-row
    path does, when not given.
    """

    temperature: _F64
    top_k: _I64
    top_p: _F64
    min_p: _F64
    logprobs: _I64
    repetition_penalty: _F64
    log_min_p: _F64 = field(default_factory=lambda: np.zeros(0))

    def __post_init__(self) -> None:
        n = self.temperature.shape[0]
        if self.log_min_p.shape[0] != n:
            exact = [_exact_log(float(m)) for m in self.min_p.tolist()]
            object.__setattr__(self, "log_min_p", np.array(exact, dtype=np.float64))
        arrays = (self.top_k, self.top_p, self.min_p, self.logprobs, self.repetition_penalty)
        if any(a.shape != (n,) for a in arrays):
            raise ValueError("BatchParams arrays must all have shape [N]")

    def __len__(self) -> int:
        return int(self.temperature.shape[0])

    def subset(self, index: np.ndarray) -> BatchParams:
        """The rows at `index`, in that order."""
        return BatchParams(
            self.temperature[index],
            self.top_k[index],
            self.top_p[index],
            self.min_p[index],
            self.logprobs[index],
            self.repetition_penalty[index],
            self.log_min_p[index],
        )

    @classmethod
    def from_params(cls, params: Sequence[SamplingParams]) -> BatchParams:
        """One row per entry of ``params`` (cheap when the same objects recur across steps)."""
        cache = _ROW_CACHE
        try:
            blob = b"".join([cache[id(p)][1] for p in params])
        except KeyError:
            blob = b"".join([_cached_row(p) for p in params])
        table = np.frombuffer(blob, dtype=np.float64).reshape(len(params), 7).T.copy()
        return cls(
            temperature=table[0],
            top_k=table[1].astype(np.int64),
            top_p=table[2],
            min_p=table[3],
            logprobs=table[4].astype(np.int64),
            repetition_penalty=table[5],
            log_min_p=table[6],
        )


@dataclass(frozen=True, slots=True, eq=False)
class BatchSampled:
    """Per-row results; entries of undecided rows are placeholders (-1, NaN, ``()``).

    Attributes:
        token_ids: int64 [N], the chosen tokens.
        logprobs: float64 [N], ``z[token] - logsumexp`` as in :class:`Sampled`.
        decided: bool [N], False where the caller must call the per-row :func:`sample`.
        top_logprobs: per row, the ``(token_id, logprob)`` pairs :func:`sample` reports.
    """

    token_ids: _I64
    logprobs: _F64
    decided: _Bool
    top_logprobs: list[_TopLogprobs]

    def sampled(self, i: int) -> Sampled:
        """Row ``i`` as the per-row sampler's result (only for decided rows)."""
        if not self.decided[i]:
            raise ValueError(f"row {i} was not decided by the batch sampler")
        return Sampled(int(self.token_ids[i]), float(self.logprobs[i]), self.top_logprobs[i])


def _exact_log(min_p: float) -> float:
    return math.log(min_p) if 0.0 < min_p <= 1.0 else 0.0


def _cached_row(p: SamplingParams) -> bytes:
    hit = _ROW_CACHE.get(id(p))
    if hit is None:
        if len(_ROW_CACHE) >= _ROW_CACHE_LIMIT:
            _ROW_CACHE.clear()  # simplest bound: live requests repopulate it next step
        row = _ROW_FORMAT.pack(
            p.temperature,
            min(p.top_k, _INT_CLAMP),
            p.top_p,
            p.min_p,
            max(0, min(p.logprobs, _INT_CLAMP)),  # negative reports nothing, like range()
            p.repetition_penalty,
            _exact_log(p.min_p),
        )
        hit = _ROW_CACHE[id(p)] = (p, row)
    return hit[1]


def sample_window_batch(
    topk_logits: ArrayLike,
    topk_ids: ArrayLike,
    logsumexp: ArrayLike,
    params: BatchParams,
    u: ArrayLike,
) -> BatchSampled:
    """Sample every row of a step from its window; see the module docstring for the contract.

    Args:
        topk_logits: float32 [N, K], each row a server window (temperature already applied).
        topk_ids: integer [N, K], their token ids.
        logsumexp: float [N], each row's log-sum-exp over the whole vocabulary.
        params: the rows' settings.
        u: float64 [N], each row's uniform draw for this step.

    Raises:
        ValueError: shapes that do not fit together, an empty window, or logits that float32
            cannot hold exactly.
    """
    logits = np.asarray(topk_logits)
    ids = np.asarray(topk_ids)
    if not np.can_cast(logits.dtype, np.float32, casting="safe") or ids.dtype.kind not in "iu":
        raise ValueError(f"need float32 logits and integer ids, got {logits.dtype} and {ids.dtype}")
    logits = np.ascontiguousarray(logits, dtype=np.float32)
    if not np.can_cast(ids.dtype, np.int64, casting="safe"):
        ids = ids.astype(np.int64)  # (uint64) wraps as the per-row path's astype does
    lse = np.ascontiguousarray(logsumexp, dtype=np.float64)
    draws = np.ascontiguousarray(u, dtype=np.float64)
    if logits.ndim != 2 or ids.shape != logits.shape or logits.shape[1] == 0:
        raise ValueError("topk_logits and topk_ids must be [N, K] arrays of one shape, K >= 1")
    n = logits.shape[0]
    if lse.shape != (n,) or draws.shape != (n,) or len(params) != n:
        raise ValueError("logsumexp, u and params must have one entry per row")

    z, sorted_ids, usable = _sort_rows(logits, ids)
    # The trusted prefix: entries strictly above the window's smallest logit. A sorted row ends
    # in the entries equal to it, so the prefix ends at the first of them.
    n_trusted = _first_true(np.equal, z, z[:, -1])
    ok = (
        usable
        & (draws >= 0.0)
        & (draws < 1.0)
        & np.isfinite(lse)
        & (lse != 0.0)
        & (params.repetition_penalty == 1.0)
        & (params.logprobs <= n_trusted)
    )
    idx, ok = _select_rows(z, lse, params, draws, n_trusted, ok)

    rows = np.arange(n)
    token_ids = np.where(ok, sorted_ids[rows, idx].astype(np.int64), -1)
    logprobs = np.where(ok, z[rows, idx] - lse, np.nan)  # float32 - float64: exact upcast first
    top = _top_logprobs(z, sorted_ids, lse, np.where(ok, params.logprobs, 0))
    return BatchSampled(token_ids, logprobs, ok, top)


def _sort_rows(logits: _F32, ids: _Ids) -> tuple[_F32, _Ids, _Bool]:
    """Rows in (descending logit, ascending id) order, as ``np.lexsort((ids, -logits))`` puts one
    row: the logits, the ids and which rows are usable (the arrays may be scratch views).

    Server windows come sorted by logit with ties in any order, so usually only tie runs move,
    and with float32 logits few rows have ties at all.
    """
    n, k = logits.shape
    steps = _SCRATCH.get("steps", (n, k - 1), np.bool_)
    np.greater_equal(logits[:, :-1], logits[:, 1:], out=steps)
    if not steps.all():  # some row is out of logit order (or holds a NaN): sort everything
        return _sort_keys(logits, ids, decode=True)
    # Sorting a row that is in logit order only permutes equal values: its logits stay put.
    np.greater(logits[:, :-1], logits[:, 1:], out=steps)
    tied = np.flatnonzero(~steps.all(axis=1))
    usable = np.isfinite(logits[:, 0])
    if tied.size == 0:
        return logits, ids, usable
    if 4 * tied.size > n:
        _, sorted_ids, ok = _sort_keys(logits, ids, decode=False)
        return logits, sorted_ids, usable & ok
    # A few rows with ties (float32 logits): sort just those.
    _, tied_ids, ok = _sort_keys(logits[tied], ids[tied], decode=False)
    sorted_all = ids.astype(np.int64)
    sorted_all[tied] = tied_ids
    usable[tied] &= ok
    return logits, sorted_all, usable


def _sort_keys(logits: _F32, ids: _Ids, *, decode: bool) -> tuple[_F32, _U32, _Bool]:
    """The general sort behind :func:`_sort_rows`; the logits are decoded only when ``decode``.

    Each entry becomes one int64 key, logit order in the high half and id in the low half; one
    in-place sort of the keys per row is about fifty times cheaper than a 2-D lexsort, and both
    columns are read back from the sorted halves.
    """
    n, k = logits.shape
    usable = np.ones(n, dtype=np.bool_)
    if int(ids.min()) < 0 or int(ids.max()) > _ID_MASK:
        bad = ((ids < 0) | (ids > _ID_MASK)).any(axis=1)
        usable &= ~bad
        ids = np.where(bad[:, None], 0, ids)
    order = _SCRATCH.get("order", (n, k), np.int32)
    # + 0.0 turns -0.0 into +0.0: lexsort ranks the two zeros equal (then by id), so must the key.
    np.add(logits, np.float32(0.0), out=order.view(np.float32))
    _flip_negative(order)  # now signed int order is float order
    np.invert(order, out=order)  # reversed: ascending keys are descending logits
    halves = _SCRATCH.get("halves", (n, k, 2), np.uint32)
    halves[:, :, _HI] = order.view(np.uint32)
    halves[:, :, _LO] = ids
    # Ties come in short runs in otherwise sorted rows: a stable (merge) sort is fastest there.
    halves.view(np.int64).reshape(n, k).sort(axis=1, kind="stable")
    z = logits
    if decode:
        np.invert(halves[:, :, _HI].view(np.int32), out=order)
        _flip_negative(order)
        z = order.view(np.float32)
    # NaNs sort to either end, by sign; +inf is first. Such rows stay with the per-row path.
    usable &= np.isfinite(z[:, 0]) & ~np.isnan(z[:, -1])
    return z, halves[:, :, _LO], usable


def _flip_negative(bits: NDArray[np.int32]) -> None:
    """In place: flip the magnitude bits of negative float32 bit patterns (an involution).

    Afterwards signed integer order is float order (-0.0 just below +0.0, NaNs beyond ±inf).
    """
    mask = _SCRATCH.get("mask", bits.shape, np.int32)
    np.right_shift(bits, 31, out=mask)
    mask &= 0x7FFFFFFF
    bits ^= mask


def _first_true(compare: np.ufunc, a: NDArray[Any], b: NDArray[Any]) -> _I64:
    """Per row, the index of the first ``compare(a[row], b[row])`` that holds, where the row of
    results has the form F..FT..T; the row length if none holds.

    That is the count of leading Falses, i.e. the per-row ``searchsorted`` on a monotone row:
    ``searchsorted(cum, x, side="right") == _first_true(np.greater, cum, x)``.
    """
    hits = _SCRATCH.get("hits", a.shape, np.bool_)
    compare(a, b[:, None], out=hits)
    first: _I64 = np.where(hits[:, -1], hits.argmax(axis=1), a.shape[1])  # argmax: first True
    return first


def _select_rows(
    z: _F32,
    lse: _F64,
    params: BatchParams,
    u: _F64,
    n_trusted: _I64,
    ok: _Bool,
) -> tuple[_I64, _Bool]:
    """The per-row ``_select`` for all rows: the chosen index into each sorted row, and which
    rows it decides (``ok`` narrowed)."""
    n, k = z.shape
    greedy = params.temperature == 0.0
    idx = np.zeros(n, dtype=np.int64)
    # Greedy takes entry 0 when it is trusted; nothing else is needed for those rows.
    ok = ok & ~(greedy & (n_trusted == 0))
    rows = np.flatnonzero(ok & ~greedy)
    if rows.size == 0:
        return idx, ok
    every = rows.size == n  # the common all-sampled batch skips the row gathers
    zs = z if every else z[rows]
    p = _SCRATCH.get("p", zs.shape, np.float64)
    np.subtract(zs, (lse if every else lse[rows])[:, None], out=p)  # exact upcast, then subtract
    np.exp(p, out=p)  # the same float64 exp the per-row path takes (the tests check bitwise)
    cum = np.cumsum(p, axis=1, out=_SCRATCH.get("cum", zs.shape, np.float64))
    # (numpy accumulates sequentially per row: prefix sums equal the per-row path's bitwise)
    sub = _SubParams.take(params, rows, every)
    cut, top_p_open, min_p_open, good = _truncate(zs, cum, sub, n_trusted if every else n_trusted[rows])
    pick, drawn = _draw(cum, p[:, -1], cut, top_p_open, min_p_open, sub.top_p, u if every else u[rows])
    idx[rows] = np.minimum(pick, k - 1)
    ok[rows] = good & drawn & np.isfinite(cum[:, -1])
    # Every candidate that is drawn must be trusted (edge ties may hide lower-id tokens).
    ok &= idx < n_trusted
    return np.where(ok, idx, 0), ok  # undecided rows still index inside the window


@dataclass(frozen=True, slots=True)
class _SubParams:
    """The truncation settings of the sampled rows only."""

    top_k: _I64
    top_p: _F64
    min_p: _F64
    log_min_p: _F64

    @classmethod
    def take(cls, params: BatchParams, rows: _I64, every: bool) -> _SubParams:
        if every:
            return cls(params.top_k, params.top_p, params.min_p, params.log_min_p)
        return cls(params.top_k[rows], params.top_p[rows], params.min_p[rows], params.log_min_p[rows])


def _truncate(
    z: _F32,
    cum: _F64,
    sub: _SubParams,
    n_trusted: _I64,
) -> tuple[_I64, _Bool, _Bool, _Bool]:
    """Top-k, then top-p, then min-p, as the per-row ``_select`` runs them.

    Returns ``cut`` (kept candidates, -1 for "None"), ``top_p_open``, ``min_p_open`` and which
    rows the window can still decide. Each per-row ``searchsorted`` over a slice ``[:limit]`` is
    a :func:`_first_true` over the whole monotone row, capped at ``limit``.
    """
    m, k = z.shape
    ar = np.arange(m)
    cut = np.full(m, -1, dtype=np.int64)
    good = np.ones(m, dtype=np.bool_)
    top_p_open = np.zeros(m, dtype=np.bool_)
    min_p_open = np.zeros(m, dtype=np.bool_)

    top_k_on = sub.top_k > 0
    if top_k_on.any():
        # The k-th value must be trusted, else tokens outside the window tying with it are kept.
        good &= ~(top_k_on & (sub.top_k > n_trusted))
        kth = z[ar, np.clip(sub.top_k, 1, k) - 1]
        cut = np.where(top_k_on, _first_true(np.less, z, kth), cut)  # keeps every z >= kth

    top_p_on = sub.top_p < 1.0
    if top_p_on.any():
        has_cut = cut >= 0
        limit = np.where(has_cut, cut, k)
        base = np.where(has_cut, cum[ar, np.maximum(cut, 1) - 1], 1.0)
        j = np.minimum(_first_true(np.greater_equal, cum, sub.top_p * base), limit)
        inside = top_p_on & (j < limit)
        cut = np.where(inside, j + 1, cut)  # the first token reaching top_p is the last kept
        top_p_open = top_p_on & ~inside & ~has_cut  # the cut is beyond the window

    min_p_on = sub.min_p > 0.0
    if min_p_on.any():
        good &= ~(min_p_on & ~(sub.min_p <= 1.0))  # unvalidated min_p > 1 would cut everything
        has_cut = cut >= 0
        limit = np.where(has_cut, cut, k)
        threshold = z[:, 0] + sub.log_min_p  # float64, as z[0] + math.log(min_p) per row
        kept = np.minimum(_first_true(np.less, z, threshold), limit)  # keeps z >= threshold
        # An entry below the threshold settles the cut, even a top-p cut beyond the window.
        inside = min_p_on & (kept < limit)
        cut = np.where(inside, kept, cut)
        top_p_open &= ~inside
        min_p_open = min_p_on & ~inside & ~has_cut
    return cut, top_p_open, min_p_open, good


def _draw(
    cum: _F64,
    p_last: _F64,
    cut: _I64,
    top_p_open: _Bool,
    min_p_open: _Bool,
    top_p: _F64,
    u: _F64,
) -> tuple[_I64, _Bool]:
    """The per-row draw: the first candidate whose cumulative mass exceeds ``u * total``.

    Returns the index and which rows the window decides (the edge-trust check is the caller's).
    """
    m, k = cum.shape
    has_cut = cut >= 0
    kept = has_cut & ~top_p_open  # total = mass of the kept candidates
    whole = ~has_cut & ~top_p_open & ~min_p_open  # no truncation: total is 1 by definition
    # For top_p_open rows the lower bound of the total is the window's mass, cum[-1].
    total = np.where(kept, cum[np.arange(m), np.maximum(cut, 1) - 1], cum[:, -1])
    x = np.where(whole, u, u * total)
    idx = _first_true(np.greater, cum, x)
    good = ~(min_p_open & ~top_p_open)  # min-p's cut beyond the window: total unknown

    idx = np.where(kept, np.minimum(idx, cut), idx)
    spill = np.flatnonzero(kept & (idx >= cut))
    if spill.size:
        # Rounding left u * total at or above the last sum: the last candidate of positive mass.
        idx[spill] = _first_true(np.greater_equal, cum[spill], total[spill])
    good &= ~(whole & (idx >= k))

    if top_p_open.any():
        # The kept total lies in [cum[-1], top_p + p_min): decided when both bounds pick alike.
        # (One pass over all rows: cheaper than gathering the open ones.)
        hi = (top_p + p_last) * (1.0 + _BOUND_SLACK)
        idx_hi = _first_true(np.greater, cum, np.where(top_p_open, u * hi, x))
        good &= ~top_p_open | ((idx_hi == idx) & (idx < k))
    return idx, good


def _top_logprobs(z: _F32, ids: _Ids, lse: _F64, counts: _I64) -> list[_TopLogprobs]:
    """Per row, the first ``counts[row]`` (id, logprob) pairs of the sorted window."""
    top: list[_TopLogprobs] = [()] * z.shape[0]
    rows = np.flatnonzero(counts > 0)
    if rows.size == 0:
        return top
    want = counts[rows]
    width = int(want.max())
    # tolist() yields the same Python ints and floats as int() / float() of each element; one
    # zip over the whole block, then slices, keeps the per-row Python work small.
    block_ids = ids[rows, :width].ravel().tolist()
    block_lps = (z[rows, :width] - lse[rows, None]).ravel().tolist()
    pairs = list(zip(block_ids, block_lps, strict=True))
    if int(want.min()) == width:
        # Every row reports `width` pairs: chop the list into row tuples at C speed.
        chopped = zip(*[iter(pairs)] * width, strict=True)
        for r, row in zip(rows.tolist(), chopped, strict=True):
            top[r] = row
        return top
    for i, (r, c) in enumerate(zip(rows.tolist(), want.tolist(), strict=True)):
        top[r] = tuple(pairs[i * width : i * width + c])
    return top
