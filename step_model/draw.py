"""Draws on the device for rows whose top-K window cannot decide their step.

The seed's own request (temperature 0.7, top_p 0.9, no top_k) has a nucleus far wider than any
window whenever the model is unsure (always on random weights, often at a sentence start): the
gateway then fetched the whole row and sorted it on the host, 500x slower than top-k. Here the
row never leaves the device. The gateway still owns the rule and the draw: per asking row it sends
the uniform ``u`` it drew from the request's own generator and its cuts (``contract.DRAW``:
u, top_p, top_k, min_p; ``u < 0``: not asked), and this module applies exactly the selection of
``frontend.sampling.sampler`` to the whole scaled row:

* candidates in descending logit order, ties by ascending token id (a stable sort);
* top-k keeps every token whose logit is >= the k-th largest (all its ties);
* top-p keeps a token while the mass before it, renormalised over what top-k kept, is < top_p
  (``TopPLogitsWarper``);
* min-p keeps tokens with ``z >= z_max + log(min_p)``;
* the token is the first candidate whose cumulative kept mass exceeds ``u * total`` (``total``
  the kept mass, 1 when nothing was cut; past the end by rounding: the last one of positive mass).

Masses are float64 as on the gateway, so the token is the one the gateway's full-row path picks
for the same ``u``, up to float rounding met in another order of summation (a draw or a cut
exactly on a boundary). `draw_rows` does it without sorting whole rows (the masses summed into
value bins once, then one bin sorted per cut and for the draw): for 16 rows of GPT-2's vocabulary
on one CPU core, top-p 0.9, about 3x faster than `draw_rows_sorted`, which stays as the
line-for-line reference (docs/benchmarks.md). On the GPU an earlier binned version cost 6.4 ms for
512 rows (H100, 2026-12-07) where one segmented sort is a few kernels: `draw_method` picks the sort
there ("sort": `draw_rows_searched`, counts by binary search, replayed from CUDA graphs by
step_model.draw_graphs) and the bins on the CPU, there in numpy a row at a time ("host",
`step_model.draw_host`: 0.8 ms for one row of GPT-2's vocabulary and 7.3 ms for 16 on 2 cores,
against 2.3 and 16 ms for the same bins in torch's ~100 small operations, "bins"); the config
parameter `draw_method` overrides the choice. (A Triton kernel that searched each row's cuts
without sorting was measured and removed: 9.8 vs 3.1 ms for 512 rows on an H100, and 1 token in
2,632 off; docs/benchmarks.md.) The caller gets the token and its scaled logit; the logprob is
``logit - logsumexp``, computed by the gateway as on every other path.

Which rows need it (`needs_draw`) is decided from the window already on the host: the draw costs
a sort of the row, so rows whose window holds the cut (or whose ``u`` lands inside it, without
truncation) are left to the gateway's window sampler.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch

from step_model.draw_host import VALUE_BINS, draw_rows_host

__all__ = [
    "DRAW_COLUMNS",
    "DRAW_METHODS",
    "DrawFunction",
    "draw_method",
    "draw_rows",
    "draw_rows_searched",
    "draw_rows_sorted",
    "needs_draw",
]

DRAW_COLUMNS = 4  # u, top_p, top_k, min_p
# (z [M, V] float32, log-sum-exp [M] float32, DRAW columns [M, 4] float64) -> (token ids, their z)
DrawFunction = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
# The host's window masses are float32 sums; a row this close to its threshold is drawn anyway
# (a needless draw costs time, a missing one a full-row fetch by the gateway).
_MARGIN = 1e-6


def needs_draw(draw: np.ndarray, topk_logits: np.ndarray, logsumexp: np.ndarray) -> np.ndarray:
    """Which rows to draw on the device: asked (``u >= 0``) and their window cannot hold the cut.

    Args:
        draw: float64 [N, 4], the rows' DRAW columns.
        topk_logits: float32 [N, K], each row's window (descending), as the step returns it.
        logsumexp: float32 [N], each row's log-sum-exp.
    """
    u, top_p, top_k, min_p = (draw[:, i] for i in range(DRAW_COLUMNS))
    window = topk_logits.shape[1]
    k_inside = (top_k > 0) & (top_k < window)  # top-k's cut, and so every later cut, is inside
    result = (u >= 0.0) & ~k_inside
    rows = np.flatnonzero(result)  # only these need their window's mass (none in a top-k step)
    if not rows.size:
        return result
    u, top_p, top_k, min_p = u[rows], top_p[rows], top_k[rows], min_p[rows]
    z = topk_logits[rows].astype(np.float64)
    mass = np.exp(z - logsumexp[rows].astype(np.float64)[:, None]).sum(axis=1)
    wide_k = top_k >= window
    p_outside = (top_p < 1.0) & (mass < top_p + _MARGIN)
    with np.errstate(divide="ignore"):
        m_outside = (min_p > 0.0) & (z[:, -1] >= z[:, 0] + np.log(np.maximum(min_p, 1e-300)))
    untruncated = (top_k <= 0) & (top_p >= 1.0) & (min_p <= 0.0)
    beyond = untruncated & (u >= mass - _MARGIN)  # the draw lands past the window's mass
    result[rows] = wide_k | p_outside | m_outside | beyond
    return result


def draw_rows_sorted(z: torch.Tensor, logsumexp: torch.Tensor, draw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`draw_rows` by a full stable sort of every row: the selection written as the gateway's,
    line for line (the reference the binned `draw_rows` is tested against).

    Args:
        z: float32 [M, V], the rows' temperature-scaled logits (on any device).
        logsumexp: float32 [M], their log-sum-exp.
        draw: float64 [M, 4], their DRAW columns (u in [0, 1)), on the same device.
    Returns:
        (int64 [M] token ids, float32 [M] their logits in ``z``), on the same device.
    """
    rows, vocab = z.shape
    zs, order = torch.sort(z, dim=1, descending=True, stable=True)
    zd = zs.double()
    cum = torch.cumsum(torch.exp(zd - logsumexp.double()[:, None]), dim=1)
    u, top_p, top_k, min_p = draw.unbind(1)
    full = torch.full((rows,), vocab, dtype=torch.int64, device=z.device)

    def at(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return values.gather(1, (index - 1).clamp(0, vocab - 1)[:, None]).squeeze(1)

    def count(mask: torch.Tensor) -> torch.Tensor:  # a prefix, as the rows are sorted
        return mask.sum(dim=1)

    k = top_k.long().clamp(0, vocab)
    has_k, has_p, has_m = k > 0, top_p < 1.0, min_p > 0.0
    cut = torch.where(has_k, count(zd >= at(zd, k.clamp(min=1))[:, None]), full)
    base = torch.where(has_k, at(cum, cut), torch.ones_like(u))
    before_p = count(cum < (top_p * base)[:, None])  # tokens whose cumulative mass is < top_p
    cut = torch.where(has_p & (before_p < cut), before_p + 1, cut)
    above_m = count(zd >= (zd[:, 0] + torch.log(min_p.clamp(min=1e-300)))[:, None])
    cut = torch.where(has_m & (above_m < cut), above_m, cut)
    total = torch.where(has_k | has_p | has_m, at(cum, cut), torch.ones_like(u))
    index = torch.minimum(count(cum <= (u * total)[:, None]), cut)
    last_positive = count(cum < at(cum, cut)[:, None])
    index = torch.where(index >= cut, last_positive, index)
    tokens = order.gather(1, index[:, None]).squeeze(1)
    return tokens, zs.gather(1, index[:, None]).squeeze(1)


def draw_rows_searched(
    z: torch.Tensor, logsumexp: torch.Tensor, draw: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`draw_rows_sorted` with every count over a sorted row taken by binary search: the same
    selection (each count is over a monotone sequence: the sorted values, their cumulative masses),
    without the six passes over [M, V] float64 that counting by comparison costs, and without a
    host synchronisation, so that a CUDA graph can hold it (step_model.draw_graphs).

    Args and returns as `draw_rows_sorted`.
    """
    rows, vocab = z.shape
    zs, order = torch.sort(z, dim=1, descending=True, stable=True)
    cum = torch.cumsum(torch.exp(zs.double() - logsumexp.double()[:, None]), dim=1)
    ascending = zs.neg()  # searchsorted wants ascending rows: count(zs >= v) = count(-zs <= -v)
    u, top_p, top_k, min_p = draw.unbind(1)
    full = torch.full((rows,), vocab, dtype=torch.int64, device=z.device)

    def at(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return values.gather(1, (index - 1).clamp(0, vocab - 1)[:, None]).squeeze(1)

    def at_least(v: torch.Tensor) -> torch.Tensor:  # count(zs >= v), v float32 [M]
        return torch.searchsorted(ascending, v.neg()[:, None].contiguous(), right=True).squeeze(1)

    def cum_below(x: torch.Tensor, *, inclusive: bool) -> torch.Tensor:  # count(cum < x), or <= x
        return torch.searchsorted(cum, x[:, None].contiguous(), right=inclusive).squeeze(1)

    k = top_k.long().clamp(0, vocab)
    has_k, has_p, has_m = k > 0, top_p < 1.0, min_p > 0.0
    cut = torch.where(has_k, at_least(at(zs, k.clamp(min=1))), full)
    base = torch.where(has_k, at(cum, cut), torch.ones_like(u))
    before_p = cum_below(top_p * base, inclusive=False)
    cut = torch.where(has_p & (before_p < cut), before_p + 1, cut)
    # min-p compares float32 values with a float64 threshold: the smallest float32 >= it says the same.
    threshold = zs[:, 0].double() + torch.log(min_p.clamp(min=1e-300))
    t32 = threshold.float()
    t32 = torch.where(t32.double() < threshold, torch.nextafter(t32, torch.full_like(t32, float("inf"))), t32)
    above_m = at_least(t32)
    cut = torch.where(has_m & (above_m < cut), above_m, cut)
    total = torch.where(has_k | has_p | has_m, at(cum, cut), torch.ones_like(u))
    index = torch.minimum(cum_below(u * total, inclusive=True), cut)
    last_positive = cum_below(at(cum, cut), inclusive=False)
    index = torch.where(index >= cut, last_positive, index)
    tokens = order.gather(1, index[:, None]).squeeze(1)
    return tokens, zs.gather(1, index[:, None]).squeeze(1)


def draw_method(name: str, device_kind: str) -> DrawFunction:
    """The draw function for `name` ("sort", "bins", "host", or "auto": sort on CUDA, host on the CPU)."""
    if name == "auto":
        name = "sort" if device_kind == "cuda" else "host"
    if name not in DRAW_METHODS:
        raise ValueError(f"draw_method must be auto, {', '.join(DRAW_METHODS)}; got {name!r}")
    return DRAW_METHODS[name]


_BINS = VALUE_BINS  # value bins per row (as the host's draw): a cut or a draw sorts only one bin's tokens


def draw_rows(z: torch.Tensor, logsumexp: torch.Tensor, draw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The chosen token of each row and its scaled logit, without sorting whole rows.

    The same selection as `draw_rows_sorted` (the gateway's), without a sort of the row: every cut
    is a prefix of the stable descending order, so it is a value plus, among the tokens tied at
    it, the highest id kept. Top-k keeps ``z >= kth``; min-p keeps ``z >= z_max + log(min_p)``; the
    top-p cut and the draw are the first token (in that order) whose cumulative mass reaches a
    target. The rows' masses are summed into value bins once (`_Bins`); each query finds its bin
    from the bins' prefix sums and sorts only that bin's tokens, and the kept total is the
    cumulative mass through the final cut, so the kept set is never materialised. Masses in
    float64, as on the gateway; only the order of summation differs (the bins), so a target
    exactly on a boundary (probability ~1e-16) may fall to the neighbour.

    Args and returns as `draw_rows_sorted`.
    """
    rows, vocab = z.shape
    u, top_p, top_k, min_p = draw.unbind(1)
    p = torch.exp(z.double() - logsumexp.double()[:, None])
    binned = _Bins(z, p)
    all_ids = torch.full((rows,), vocab, dtype=torch.long, device=z.device)
    k = top_k.long().clamp(0, vocab)
    has_k, has_p, has_m = k > 0, top_p < 1.0, min_p > 0.0
    # The kept set is a prefix of the stable descending order: (cut value, highest id kept at it).
    cut_z = torch.full_like(binned.zmax, float("-inf"))
    cut_id = all_ids.clone()
    total = binned.cum[:, -1]  # the kept mass, the whole row's until a cut
    if bool(has_k.any()):
        kth = torch.topk(z, int(k.max()), dim=1).values.gather(1, (k.clamp(min=1) - 1)[:, None]).squeeze(1)
        cut_z = torch.where(has_k, kth, cut_z)  # every tie of the k-th value
        total = torch.where(has_k, binned.prefix_mass(kth, all_ids), total)
    if bool(has_p.any()):
        base = torch.where(has_k, total, torch.ones_like(u))  # top-p renormalises over what top-k kept
        pz, pid, reached, through = binned.first_reaching(top_p * base, inclusive=True)
        by_p = has_p & reached & _shorter(pz, pid, cut_z, cut_id)  # else rounding: keep all
        cut_z, cut_id = torch.where(by_p, pz, cut_z), torch.where(by_p, pid, cut_id)
        total = torch.where(by_p, through, total)
    if bool(has_m.any()):
        threshold = binned.zmax.double() + torch.log(min_p.clamp(min=1e-300))
        mz = torch.where(z.double() >= threshold[:, None], z, float("inf")).min(dim=1).values  # zmax at least
        by_m = has_m & _shorter(mz, all_ids, cut_z, cut_id)
        cut_z, cut_id = torch.where(by_m, mz, cut_z), torch.where(by_m, all_ids, cut_id)
        total = torch.where(by_m, binned.prefix_mass(mz, all_ids), total)
    truncated = has_k | has_p | has_m
    total = torch.where(truncated, total, torch.ones_like(u))
    token_z, token_id, found, _ = binned.first_reaching(u * total, inclusive=False)
    found = found & _shorter(token_z, token_id, cut_z, cut_id)
    if not bool(found.all()):  # at or past the kept total by rounding: the last kept token of mass
        ids = torch.arange(vocab, device=z.device)
        kept = _shorter(z, ids[None, :], cut_z[:, None], cut_id[:, None])
        last_z, last_id = _last_positive(z, p * kept)
        token_z, token_id = torch.where(found, token_z, last_z), torch.where(found, token_id, last_id)
    return token_id, token_z


DRAW_METHODS = {"sort": draw_rows_searched, "bins": draw_rows, "host": draw_rows_host}


class _Members(NamedTuple):
    """One bin's tokens per row in stable descending order, padded to the widest row's count."""

    ids: torch.Tensor  # int64 [M, W]
    values: torch.Tensor  # float32 [M, W], -inf past `size`
    valid: torch.Tensor  # bool [M, W], a prefix of each row
    running: torch.Tensor  # float64 [M, W], the cumulative mass of the row through each entry
    size: torch.Tensor  # int64 [M]
    before: torch.Tensor  # float64 [M], the cumulative mass before the bin


class _Bins:
    """The rows' masses summed once into value bins (bin 0 holds the highest values, and equal
    values share a bin): every cut and the draw is then a prefix query that sorts one bin."""

    def __init__(self, z: torch.Tensor, p: torch.Tensor) -> None:
        rows = z.shape[0]
        self.z, self.p = z, p
        zmax = z.amax(dim=1)
        # The lowest finite value: a banned token's -inf would make the range infinite (its bin: the last).
        zmin = torch.minimum(torch.where(torch.isinf(z), float("inf"), z).amin(dim=1), zmax)
        self.zmax = zmax
        self.scale = (_BINS - 1) / torch.clamp(zmax - zmin, min=1e-30)
        self.bins = self._bin_of(z)
        offset = (torch.arange(rows, device=z.device) * _BINS)[:, None]
        binned = torch.zeros(rows * _BINS, dtype=p.dtype, device=z.device)
        binned.scatter_add_(0, (self.bins + offset).reshape(-1), p.reshape(-1))
        self.cum = torch.cumsum(binned.view(rows, _BINS), dim=1)

    def _bin_of(self, values: torch.Tensor) -> torch.Tensor:
        """Bins of [rows, n] values (the same float operations for a row's tokens and its cut values)."""
        d = self.zmax[:, None] - values
        return d.mul_(self.scale[:, None]).floor_().clamp_(0, _BINS - 1).long()

    def _members(self, b: torch.Tensor) -> _Members:
        """Bin ``b[i]``'s tokens of each row i (one pass finds them: `nonzero` lists a row's in ascending id)."""
        rows = self.z.shape[0]
        where = (self.bins == b[:, None]).nonzero()  # row-major: ascending id within a row
        size = torch.bincount(where[:, 0], minlength=rows)
        width = max(1, int(size.max()))
        start = torch.cumsum(size, 0) - size
        col = torch.arange(where.shape[0], device=self.z.device) - start[where[:, 0]]
        ids = torch.zeros(rows, width, dtype=torch.long, device=self.z.device)
        ids[where[:, 0], col] = where[:, 1]
        valid = torch.arange(width, device=self.z.device)[None, :] < size[:, None]
        values = torch.where(valid, self.z.gather(1, ids), float("-inf"))
        order = torch.sort(values, dim=1, descending=True, stable=True).indices  # ties keep ascending id
        ids, values, valid = ids.gather(1, order), values.gather(1, order), valid.gather(1, order)
        masses = torch.where(valid, self.p.gather(1, ids), 0.0)
        before = torch.where(b > 0, self.cum.gather(1, (b - 1).clamp(min=0)[:, None]).squeeze(1), 0.0)
        running = before[:, None] + torch.cumsum(masses, dim=1)
        return _Members(ids, values, valid, running, size, before)

    def first_reaching(
        self, target: torch.Tensor, *, inclusive: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per row the first token whose cumulative mass reaches `target` (>= when inclusive, else >):
        (its z, its id, found, the cumulative mass through it)."""
        below = (self.cum < target[:, None]) if inclusive else (self.cum <= target[:, None])
        b = below.sum(dim=1).clamp(max=_BINS - 1)
        m = self._members(b)
        short = (m.running < target[:, None]) if inclusive else (m.running <= target[:, None])
        j = (short & m.valid).sum(dim=1)  # valid entries lead, and `short` holds on a prefix of them
        found = j < m.size
        at = j.clamp(max=m.ids.shape[1] - 1)[:, None]
        value, token, through = (t.gather(1, at).squeeze(1) for t in (m.values, m.ids, m.running))
        return value, token, found, through

    def prefix_mass(self, zc: torch.Tensor, ic: torch.Tensor) -> torch.Tensor:
        """The cumulative mass through the prefix ``z > zc or (z == zc and id <= ic)`` (zc a value of the row)."""
        m = self._members(self._bin_of(zc[:, None]).squeeze(1))
        inside = m.valid & _shorter(m.values, m.ids, zc[:, None], ic[:, None])
        n = inside.sum(dim=1)  # a prefix of the bin's sorted tokens
        return torch.where(n > 0, m.running.gather(1, (n - 1).clamp(min=0)[:, None]).squeeze(1), m.before)


def _shorter(z1: torch.Tensor, i1: torch.Tensor, z2: torch.Tensor, i2: torch.Tensor) -> torch.Tensor:
    """Whether the token or prefix end (z1, i1) comes at or before (z2, i2) in the stable descending order."""
    return (z1 > z2) | ((z1 == z2) & (i1 <= i2))


def _last_positive(z: torch.Tensor, mass: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The last token of positive mass in stable descending order (lowest value, then highest id)."""
    vocab = z.shape[1]
    ids = torch.arange(vocab, device=z.device)
    low = torch.where(mass > 0, z, torch.full_like(z, float("inf"))).min(dim=1).values
    at_low = (mass > 0) & (z == low[:, None])
    last = torch.where(at_low, ids[None, :], torch.full_like(ids, -1)[None, :]).max(dim=1).values
    return low, last
