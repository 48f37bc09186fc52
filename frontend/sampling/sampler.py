"""Exact next-token sampling from a top-K window of logits, or from the full row.

Contract
--------
The inference server returns, per sequence and step, the temperature-scaled row ``z = logits / T``
only as a *window*: its K largest values (:attr:`StepLogits.topk_logits`, with ids), plus
``logsumexp(z)`` over the whole vocabulary; on request it also returns the whole row. For greedy
requests the server uses T = 1. :func:`sample` draws the next token from exactly the distribution
that transformers' ``generate(do_sample=True)`` samples from with the same settings, i.e.
``RepetitionPenaltyLogitsProcessor -> TemperatureLogitsWarper -> TopKLogitsWarper ->
TopPLogitsWarper -> MinPLogitsWarper -> softmax`` (greedy: argmax after the repetition penalty),
with OpenAI's ``logit_bias`` before and its presence / frequency penalties after the repetition
penalty (vLLM's order; :mod:`frontend.sampling.adjust`).
When the window cannot *prove* the answer, it raises :class:`NeedFullRow`; the caller then fetches
the full row for this step and calls :func:`sample` again **with the same ``u``**.

Determinism: the token is a deterministic function of ``(row, params, u, adjustment)``. The
window path and the full-row path return the same token (and the same logprobs) for the same
``u``, because both run the same selection code over the same descending, stably tie-broken order
of the row; the window path only answers when every quantity it needs is provably identical to
what the full row would give. So a seeded request yields the same tokens whichever path each step
took, provided the caller consumes exactly one ``u`` per step.

Semantics (all masses are ``p_i = exp(z_i - logsumexp)``, candidates sorted by descending logit,
ties by ascending token id, the order ``np.argsort(-z, kind="stable")`` gives):

* adjustments (logit_bias, repetition / presence / frequency penalties, banned ids) change the
  logits of a known set of ids E (:class:`frontend.sampling.adjust.LogitAdjustment`). The server
  returns those ids' logits and the log-sum-exp of the rest of the row (``rest``), so the adjusted
  row's log-sum-exp is ``log(exp(rest) + sum exp(z'_E))``, without cancellation.
* top-k keeps every token whose logit is >= the k-th largest (ties at the k-th value are all kept,
  as in ``TopKLogitsWarper``).
* top-p keeps token i iff the (renormalised) mass of the tokens before it is < top_p: this is
  ``TopPLogitsWarper`` (remove where ascending cumulative probability <= 1 - top_p, keep at least
  one) written in descending order. Without top-k, the total mass is taken to be exactly 1 (the
  server's logsumexp defines normalisation).
* min-p keeps tokens with ``z >= z_max + log(min_p)``, i.e. ``prob >= min_p * max_prob``.
* the draw: ``x = u * total`` where ``total`` is the kept mass (1 when nothing was truncated); the
  token is the first candidate whose cumulative mass exceeds ``x`` (if rounding leaves ``x`` at or
  above the last cumulative sum, the last candidate of positive mass).

Window exactness (no ``full_logits``). The window is *a* set of K largest values; its entries are
re-sorted here by (descending logit, ascending id). Let ``w`` be its smallest logit. Tokens with
``z > w`` form the *trusted prefix*: they are exactly the first entries of the full row's stable
order. Entries equal to ``w`` are known in value but not in identity, because tokens outside the
window may tie with ``w`` (and may carry lower ids). Prefix sums of masses depend only on values,
so they equal the full row's over the whole window. The window answers iff:

* greedy: the argmax is trusted (``K >= 2`` and no tie reaches the window edge);
* the ``logprobs`` reported alternatives are trusted;
* top-k: the k-th largest logit is trusted (``k`` < K barring edge ties), so all its ties are
  inside the window;
* top-p: the cumulative mass reaches the threshold inside the window (``S_j >= top_p * base``,
  ``j < K``), so the kept total is known. Otherwise (top-k off) the kept total is only bounded,
  ``S_K <= total < top_p + p_min``; the draw is still exact when ``u`` times both bounds lands on
  the same trusted candidate. At the boundary: if ``S_K == top_p`` exactly, token K+1 is removed
  (the mass before it is not < top_p) on both paths, but the K-th entry itself is never trusted,
  so a draw landing on it asks for the full row;
* min-p: the window's smallest logit is below the threshold (the cut is inside the window);
* no truncation: ``u`` lands inside the trusted prefix's mass;
* and, in every case, the drawn candidate is trusted.
Combinations use the same rules stage by stage (a min-p cut inside the window also settles a top-p
cut beyond it). With an adjustment, the window is first merged with the adjusted ids: every
other token keeps a logit <= ``w``, so the merged entries above ``w`` are the adjusted row's
trusted prefix, entries equal to ``w`` are kept untrusted and entries below ``w`` are dropped
(unknown tokens may precede them); then the same rules apply.
:func:`window_size` asks for a few guard entries so that the entries used are normally trusted.

``logprob`` and ``top_logprobs`` describe the model's temperature-scaled distribution *before*
any adjustment and truncation: ``z_i - logsumexp`` with the server's logsumexp.

Numerics: float64 throughout. The server's logsumexp is trusted as the normaliser (with no
truncation the total mass is 1 by definition), so probabilities are exact up to its rounding.
Decisions match transformers' float32 arithmetic only up to rounding (a cumulative mass within
~1e-7 of top_p may be decided differently), and when a tie group straddles the top-p cut, the
lower ids are kept (transformers' choice there depends on torch.sort's tie order).

Cost: the window path is O(K log K), about 15-30 us; the full path partitions the row (O(V),
~0.5 ms for 50257 entries) and sorts only a prefix, falling back to sorting the whole row (~1 ms
more) only when the prefix cannot decide.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

if TYPE_CHECKING:
    from frontend.sampling.adjust import LogitAdjustment

__all__ = [
    "NeedFullRow",
    "Sampled",
    "SamplingParams",
    "StepLogits",
    "drawn",
    "sample",
    "window_size",
]

_F64 = NDArray[np.float64]
_I64 = NDArray[np.int64]

# Prefix sizes tried on a full row before sorting all of it. A try is an O(V) partition plus an
# O(M log M) sort, about half the cost of sorting 50257 entries; the selection code proves from
# the prefix alone whether it decides the step, exactly as for a server window. (Larger prefixes
# rarely pay off: a top-p cut beyond 256 tokens is usually far beyond.)
_FULL_ROW_PREFIXES: tuple[int, ...] = (256,)

# Extra window entries beyond those the sampler uses; see window_size. One suffices for distinct
# logits; a few more keep short tie groups (fp16 logits) from forcing a full row.
_TIE_GUARD = 4

# Upper bound on the kept mass when top-p's cut lies beyond the window is top_p + p_min; this
# relative slack absorbs the rounding of that addition and of exp() (a few ulp), so the bound is
# safe. It only makes the window path slightly more willing to ask for the full row.
_BOUND_SLACK = 1e-12


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Per-request sampling settings (validated by the API layer, not here).

    Attributes:
        temperature: >= 0; 0 means greedy (argmax). The server applies it, this module does not.
        top_k: >= 0; 0 disables top-k. Values >= vocab size are a no-op in transformers; the API
            layer should map them to 0 (otherwise the window is the whole vocabulary and the
            sampler may ask for the full row needlessly).
        top_p: in (0, 1]; 1 disables top-p.
        min_p: in [0, 1]; 0 disables min-p.
        repetition_penalty: > 0; 1 disables it.
        logprobs: 0-5, how many most likely alternatives to report in ``top_logprobs``.
        presence_penalty, frequency_penalty: OpenAI's, in raw-logit units; 0 disables them.
        logit_bias: ``(token_id, bias)`` pairs added to the raw logits (OpenAI's ``logit_bias``).
    The last four act through a :class:`frontend.sampling.adjust.LogitAdjustment`.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True, slots=True, eq=False)
class StepLogits:
    """What the server returned for one sequence at one step (temperature already applied).

    Attributes:
        topk_logits: float32 [K], the K largest scaled logits, sorted descending. Ties may come in
            any order, and at the window edge any of the tied tokens may be included.
        topk_ids: int64 [K], their token ids.
        logsumexp: log-sum-exp of the whole scaled row.
        full_logits: float32 [V], the whole scaled row, when the gateway asked for it.
        extra_logits: float32 [>= E], the scaled logits of the step's adjustment ids, in their
            order (the server's EXTRA_LOGITS row; entries past E are padding).
        rest_logsumexp: log-sum-exp of the scaled row without those ids (REST_LOGSUMEXP).
    """

    topk_logits: NDArray[np.float32]
    topk_ids: NDArray[np.int64]
    logsumexp: float
    full_logits: NDArray[np.float32] | None = None
    extra_logits: NDArray[np.float32] | None = None
    rest_logsumexp: float | None = None


@dataclass(frozen=True, slots=True)
class Sampled:
    """The chosen token.

    Attributes:
        token_id: the sampled (or greedy) token.
        logprob: its log-probability under the temperature-scaled distribution, before the
            repetition penalty and truncation: ``z[token_id] - logsumexp``.
        top_logprobs: the ``params.logprobs`` most likely tokens of that same distribution, as
            ``(token_id, logprob)`` pairs, most likely first (ties: lower id first).
    """

    token_id: int
    logprob: float
    top_logprobs: tuple[tuple[int, float], ...]


class NeedFullRow(Exception):
    """Raised by :func:`sample` when the window does not provably determine this step.

    Fetch the full scaled row for this step and call :func:`sample` again with the *same* ``u``
    (the draw for the step is already spent). ``reason`` says which rule failed (for metrics).
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def window_size(params: SamplingParams, *, default_window: int, vocab_size: int) -> int:
    """How many top entries to ask the server for.

    ``_TIE_GUARD`` slots more than the entries used (greedy: ``max(1, logprobs) + guard``; top-k:
    ``max(top_k, logprobs) + guard``; otherwise ``max(default_window, logprobs + guard)``), capped
    at ``vocab_size``. The sampler only uses entries strictly above the window's smallest logit,
    since a token outside the window may tie with it (transformers keeps *all* ties of the k-th
    logit and breaks an argmax tie by lowest id); the guard lets a tie group that starts at the
    k-th entry end inside the window, which matters for low-precision (e.g. fp16) logits.
    """
    if params.temperature == 0.0:
        k = max(1, params.logprobs) + _TIE_GUARD
    elif params.top_k > 0:
        k = max(params.top_k, params.logprobs) + _TIE_GUARD
    else:
        k = max(default_window, params.logprobs + _TIE_GUARD)
    return max(1, min(k, vocab_size))


def sample(
    step: StepLogits,
    params: SamplingParams,
    u: float,
    adjustment: LogitAdjustment | None = None,
) -> Sampled:
    """Choose the next token; see the module docstring for the exact semantics.

    Args:
        step: the server's output for this sequence and step.
        params: the request's sampling settings.
        u: the step's uniform draw in [0, 1) (unused but still consumed when greedy).
        adjustment: the step's logit adjustment (logit_bias, penalties, banned ids; built by
            :func:`frontend.sampling.adjust.logit_adjustment` from the sequence's tokens), or None.
            The window path needs ``step.extra_logits`` and ``step.rest_logsumexp`` for its ids.
            Reported logprobs stay those of the unadjusted distribution.

    Raises:
        NeedFullRow: ``step.full_logits`` is None and the window does not decide this step.
        ValueError: ``u`` outside [0, 1), or an empty / malformed window.
    """
    if not 0.0 <= u < 1.0:
        raise ValueError(f"u must be in [0, 1), got {u!r}")
    lse = float(step.logsumexp)
    if not math.isfinite(lse):
        raise ValueError(f"logsumexp must be finite, got {lse!r}")
    if step.full_logits is not None:
        return _sample_full(step, lse, params, u, adjustment, _FULL_ROW_PREFIXES)
    logits = np.asarray(step.topk_logits)
    ids = np.asarray(step.topk_ids)
    if logits.ndim != 1 or logits.shape != ids.shape or logits.size == 0:
        raise ValueError("topk_logits and topk_ids must be non-empty 1-D arrays of equal length")
    z, sorted_ids = _stable_window(logits, ids)
    if adjustment is None:
        n_trusted = _trusted_count(z)
        top = _trusted_top(z, sorted_ids, lse, params.logprobs, n_trusted)
        idx = _select(z, lse, params, u, n_trusted, complete=False)
        return Sampled(int(sorted_ids[idx]), float(z[idx] - lse), top)
    if step.extra_logits is None or step.rest_logsumexp is None:
        raise NeedFullRow(adjustment.reason)
    # The server's window covers the tokens not adjusted (or all of them, from a server that does
    # not leave the adjusted ids out): merged with the adjusted ids' own values it is a window of
    # the adjusted row, and merged with their raw values one of the raw row (reported logprobs).
    extra = np.asarray(step.extra_logits)[: adjustment.size].astype(np.float64)
    raw, raw_ids, raw_trusted = _merge_window(z, sorted_ids, adjustment.ids, extra)
    if params.logprobs > raw_trusted:
        raise NeedFullRow("logprobs")
    adjusted = adjustment.apply(extra, params)
    merged, merged_ids, trusted = _merge_window(z, sorted_ids, adjustment.ids, adjusted)
    if not merged.size:  # an unmasked window made only of adjusted ids, all pushed below its edge
        raise NeedFullRow("tie_at_window_edge")
    j = _select(merged, _adjusted_logsumexp(float(step.rest_logsumexp), adjusted), params, u, trusted, complete=False)
    token = int(merged_ids[j])
    top = tuple((int(raw_ids[i]), float(raw[i] - lse)) for i in range(params.logprobs))
    return Sampled(token, _raw_logit(token, adjustment.ids, extra, sorted_ids, z) - lse, top)


def drawn(step: StepLogits, params: SamplingParams, token_id: int, logit: float) -> Sampled:
    """The result of a step the server drew on the device (contract.DRAWN_IDS / DRAWN_LOGITS: the
    token the full-row path of :func:`sample` picks for the same ``u``), with the reported
    alternatives from the window, as :func:`sample` reports them.

    Raises:
        NeedFullRow: ``params.logprobs`` alternatives are not all trusted in the window.
    """
    lse = float(step.logsumexp)
    top: tuple[tuple[int, float], ...] = ()
    if params.logprobs > 0:
        z, ids = _stable_window(np.asarray(step.topk_logits), np.asarray(step.topk_ids))
        top = _trusted_top(z, ids, lse, params.logprobs, _trusted_count(z))
    return Sampled(int(token_id), float(logit) - lse, top)


def _stable_window(logits: NDArray[np.float32], ids: NDArray[np.int64]) -> tuple[_F64, _I64]:
    """A window re-sorted by (descending logit, ascending id): ties in the full row's stable order."""
    order = np.lexsort((ids, -logits))
    return logits[order].astype(np.float64), ids[order].astype(np.int64)


def _trusted_top(z: _F64, ids: _I64, lse: float, n: int, n_trusted: int) -> tuple[tuple[int, float], ...]:
    """The ``n`` reported alternatives of a stably sorted window; NeedFullRow unless all are trusted."""
    if n > n_trusted:
        raise NeedFullRow("logprobs")
    return tuple((int(ids[i]), float(z[i] - lse)) for i in range(n))


def _raw_logit(token: int, adjusted_ids: _I64, extra: _F64, window_ids: _I64, window: _F64) -> float:
    """The unadjusted logit of a token of the merged window: an adjusted id's own, or its window entry's."""
    at = int(np.searchsorted(adjusted_ids, token))
    if at < adjusted_ids.shape[0] and int(adjusted_ids[at]) == token:
        return float(extra[at])
    return float(window[int(np.flatnonzero(window_ids == token)[0])])


def _merge_window(z: _F64, ids: _I64, adjusted_ids: _I64, adjusted: _F64) -> tuple[_F64, _I64, int]:
    """A window of the row whose ``adjusted_ids`` take the values ``adjusted`` (their adjusted or
    their raw logits): (values, ids, trusted count), in stable descending order.

    Every token outside window and adjustment keeps its logit, which is <= the window's smallest
    ``w``. So the entries (window entries not adjusted, plus adjusted ids) whose value is > ``w``
    are exactly the adjusted row's first entries (trusted); those equal to ``w`` are known in
    value, not in identity; those below ``w`` may have unknown tokens before them and are dropped.
    Prefix sums over the result then equal the adjusted full row's, as for a server window.
    """
    w = z[-1]
    at = np.minimum(np.searchsorted(adjusted_ids, ids), max(adjusted_ids.shape[0] - 1, 0))
    keep = adjusted_ids[at] != ids if adjusted_ids.shape[0] else np.ones(ids.shape[0], dtype=bool)
    values = np.concatenate((z[keep], adjusted))
    names = np.concatenate((ids[keep], adjusted_ids))
    usable = values >= w
    values, names = values[usable], names[usable]
    order = np.lexsort((names, -values))
    return values[order], names[order], int(np.count_nonzero(values > w))


def _adjusted_logsumexp(rest: float, adjusted: _F64) -> float:
    """log(exp(rest) + sum(exp(adjusted))): the adjusted row's normaliser from the server's
    log-sum-exp of the unadjusted ids and the adjusted ids' values (no subtraction anywhere)."""
    top = max(rest, float(adjusted.max(initial=-np.inf)))
    if not math.isfinite(top):
        raise ValueError("the adjusted row has no finite logit")
    return top + math.log(math.exp(rest - top) + float(np.exp(adjusted - top).sum()))


def _trusted_count(z: _F64) -> int:
    """Number of leading entries of a descending window strictly above its smallest value.

    Only those are certainly the first entries of the full row's stable order: a token outside
    the window may tie with the smallest value and have a lower id.
    """
    # -z is ascending; the first position where -z >= -z[-1] is the first entry equal to z[-1].
    return int((-z).searchsorted(-z[-1], side="left"))


def _select(
    z: _F64,
    lse: float,
    params: SamplingParams,
    u: float,
    n_trusted: int,
    *,
    complete: bool,
) -> int:
    """Index into ``z`` (descending, stable) of the chosen candidate.

    ``complete`` means ``z`` is the whole row (everything trusted, every cut decidable); otherwise
    ``z`` is a top-K window with ``n_trusted`` trusted entries and NeedFullRow is raised whenever
    the answer could depend on what lies outside it. Both modes run the same arithmetic on the
    same leading values, so where the window answers it answers what the full row would.

    The cuts run in order top-k -> top-p -> min-p, each on what the previous kept, then the draw.
    """
    if params.temperature == 0.0:
        if n_trusted == 0:
            raise NeedFullRow("greedy_tie")
        return 0

    p = np.exp(z - lse)
    cum = p.cumsum()  # sequential sums: a window's prefix sums equal the full row's bitwise

    # `cut`: number of kept candidates once decided; None while it may lie beyond the window
    # (then `beyond` names the cut that does: "top_p" or "min_p") or nothing was truncated.
    cut: int | None = None
    beyond: str | None = None
    if params.top_k > 0:
        cut = _top_k_cut(z, params.top_k, n_trusted, complete=complete)
    if params.top_p < 1.0:
        cut, beyond = _top_p_cut(cum, params.top_p, cut, complete=complete)
    if params.min_p > 0.0:
        cut, beyond = _min_p_cut(z, params.min_p, cut, beyond, complete=complete)
    idx = _draw(p, cum, u, cut, beyond, params.top_p, complete=complete)
    if idx >= n_trusted:
        raise NeedFullRow("tie_at_window_edge")
    return idx


def _top_k_cut(z: _F64, k: int, n_trusted: int, *, complete: bool) -> int:
    """Top-k: how many candidates of ``z`` are kept, every one >= the k-th value (its ties too)."""
    if k > n_trusted:
        # The k-th value ties with the window edge: outside ties would also be kept.
        if not complete:
            raise NeedFullRow("top_k")
        k = z.shape[0]
    kth = z[k - 1]
    return int((-z).searchsorted(-kth, side="right"))  # every z >= kth


def _top_p_cut(cum: _F64, top_p: float, cut: int | None, *, complete: bool) -> tuple[int | None, str | None]:
    """Top-p over the first ``cut`` candidates (None: all): (cut, beyond) as in ``_select``.

    The kept candidates end at the first whose cumulative mass, relative to what top-k kept,
    reaches ``top_p``."""
    n = cum.shape[0]
    limit = n if cut is None else cut
    base = 1.0 if cut is None else float(cum[cut - 1])
    j = int(cum[:limit].searchsorted(top_p * base, side="left"))
    if j < limit:
        return j + 1, None  # the first token whose cumulative mass reaches top_p is the last kept
    if cut is None:
        if complete:
            return n, None  # rounding left the whole row's mass below top_p: keep everything
        return None, "top_p"  # the cut is beyond the window
    # (with top-k on, cum[cut-1] >= top_p * cum[cut-1] always, so j < limit)
    return cut, None


def _min_p_cut(
    z: _F64, min_p: float, cut: int | None, beyond: str | None, *, complete: bool
) -> tuple[int | None, str | None]:
    """Min-p over the first ``cut`` candidates (None: all, ``beyond`` saying why): keeps those
    with probability >= min_p times the most likely's. Returns (cut, beyond) as in ``_select``."""
    n = z.shape[0]
    limit = n if cut is None else cut
    threshold = z[0] + math.log(min_p)
    m = int((-z[:limit]).searchsorted(-threshold, side="right"))  # every z >= threshold
    if m < limit:
        # An entry (possibly an edge tie: its value is known) falls below the threshold, so
        # the final cut is m even if top-p's own cut lies beyond the window.
        return m, None
    if cut is None:
        if complete:
            return n, beyond
        return None, beyond or "min_p"  # an open top-p cut keeps precedence in the draw
    return cut, beyond


def _draw(p: _F64, cum: _F64, u: float, cut: int | None, beyond: str | None, top_p: float, *, complete: bool) -> int:
    """The candidate ``u`` picks by inverse CDF over the kept ones (``cut``, ``beyond`` as in
    ``_select``), or NeedFullRow when that depends on what lies beyond the window."""
    n = cum.shape[0]
    if cut is not None:
        total = float(cum[cut - 1])
        idx = int(cum[:cut].searchsorted(u * total, side="right"))
        return _last_positive(cum, cut) if idx >= cut else idx
    if beyond is None:
        # No truncation: the distribution is normalised by the server's logsumexp (total 1).
        idx = int(cum.searchsorted(u, side="right"))
        if idx >= n:
            if not complete:
                raise NeedFullRow("draw_beyond_window")
            idx = _last_positive(cum, n)
        return idx
    if beyond == "top_p":
        # The kept total lies in [cum[-1], top_p + p_min): every candidate beyond the window has
        # mass <= p_min and the mass before the last kept one is < top_p. If u times both bounds
        # picks the same candidate, so does u times the true total (both maps are monotone).
        lo = float(cum[-1])
        hi = (top_p + float(p[-1])) * (1.0 + _BOUND_SLACK)
        idx = int(cum.searchsorted(u * lo, side="right"))
        if idx != int(cum.searchsorted(u * hi, side="right")) or idx >= n:
            raise NeedFullRow("top_p")
        return idx
    raise NeedFullRow("min_p")  # min-p's cut is beyond the window: its total is unknown


def _last_positive(cum: _F64, n: int) -> int:
    """Index of the last of the first ``n`` candidates with positive mass (rounding fallback)."""
    return int(cum[:n].searchsorted(cum[n - 1], side="left"))


def _sample_full(
    step: StepLogits,
    lse: float,
    params: SamplingParams,
    u: float,
    adjustment: LogitAdjustment | None,
    prefixes: Sequence[int],
) -> Sampled:
    """Full-row path: the adjustment, then the same selection as the window path.

    ``prefixes`` are the sizes of top-M prefixes tried (as if they were server windows) before a
    full stable sort; the result does not depend on them (tests pass ``()`` to force the sort).
    The adjusted ids take the values and the rest's log-sum-exp the server returned with the
    window when it did (so both paths decide on the same numbers), else the row's own.
    """
    assert step.full_logits is not None
    raw = np.asarray(step.full_logits).astype(np.float64)
    if raw.ndim != 1 or raw.size == 0:
        raise ValueError("full_logits must be a non-empty 1-D array")
    vocab = raw.shape[0]
    z = raw
    z_lse = lse
    if adjustment is not None and adjustment.size:
        ids = adjustment.ids
        if step.extra_logits is not None and step.rest_logsumexp is not None:
            extra = np.asarray(step.extra_logits)[: adjustment.size].astype(np.float64)
            rest = float(step.rest_logsumexp)
        else:
            extra = raw[ids]
            masked = raw.copy()
            masked[ids] = -np.inf
            top_rest = float(masked.max())
            rest = top_rest + math.log(float(np.exp(masked - top_rest).sum())) if math.isfinite(top_rest) else top_rest
        adjusted = adjustment.apply(extra, params)
        z = raw.copy()
        z[ids] = adjusted
        z_lse = _adjusted_logsumexp(rest, adjusted)

    if params.temperature == 0.0:
        idx = int(np.argmax(z))  # first maximum = lowest id among ties, like torch.argmax
    else:
        idx = -1
        for m in prefixes:
            if m >= vocab:
                break
            m = max(m, params.top_k + 1)
            if m >= vocab:
                break
            part = np.argpartition(-z, m - 1)[:m]  # a set of m largest values (any edge ties)
            cand = part[np.lexsort((part, -z[part]))]
            zc = z[cand]
            try:
                idx = int(cand[_select(zc, z_lse, params, u, _trusted_count(zc), complete=False)])
                break
            except NeedFullRow:
                continue
        if idx < 0:
            order = _stable_descending(z)
            idx = int(order[_select(z[order], z_lse, params, u, vocab, complete=True)])

    top: tuple[tuple[int, float], ...] = ()
    if params.logprobs > 0:
        best = _stable_top(raw, params.logprobs)
        top = tuple((int(i), float(raw[i] - lse)) for i in best)
    return Sampled(idx, float(raw[idx] - lse), top)


def _stable_descending(z: _F64) -> _I64:
    """``np.argsort(-z, kind="stable")``, about 4x faster when ties are few.

    An unstable sort orders the values; only runs of equal values then need their ids sorted.
    """
    order = np.argsort(-z)
    zs = z[order]
    tie = zs[1:] == zs[:-1]
    if tie.any():
        in_run = np.zeros(z.shape[0], dtype=bool)
        in_run[1:] |= tie
        in_run[:-1] |= tie
        pos = np.flatnonzero(in_run)  # runs stay in place: their values are distinct
        sub = order[pos]
        order[pos] = sub[np.lexsort((sub, -zs[pos]))]
    result: _I64 = order.astype(np.int64, copy=False)
    return result


def _stable_top(z: _F64, n: int) -> _I64:
    """Ids of the ``n`` largest entries in stable descending order (ties: lower id first)."""
    if n >= z.shape[0]:
        return np.argsort(-z, kind="stable").astype(np.int64)
    threshold = np.partition(z, z.shape[0] - n)[z.shape[0] - n]  # the n-th largest value
    above = np.flatnonzero(z > threshold)
    tied = np.flatnonzero(z == threshold)[: n - above.size]
    idx = np.concatenate((above, tied))
    ordered: _I64 = idx[np.lexsort((idx, -z[idx]))].astype(np.int64)
    return ordered
