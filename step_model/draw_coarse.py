"""The device draw with a half-width sort: the GPU's method (step_model.draw has the contract).

The full stable sort of every row was most of the draw's time on the GPU (H100, 2026-12-07,
benchmarks/tail_bench.py: 0.96 ms of 1.5 for 192 rows of GPT-2's vocabulary). Here rows are sorted
by their values rounded to float16 instead: a segmented radix sort over 16-bit keys makes about
half the passes. Rounding is monotone, so the coarse order is the exact order except inside a
run of equal float16 keys (a bucket: a few to a few dozen tokens, kept in ascending id by the
stable sort), and the cumulative mass at every bucket's end is the exact order's. Each query (the
k-th value, the token where a cumulative mass is reached) finds its bucket from the coarse sums,
sorts that bucket's tokens exactly (at most `WINDOW` of them) and reads its answer there.

The selection is `draw_rows_sorted`'s, line for line in positions of the exact order; only the
order of summation differs (bucket by bucket), so a target exactly on a boundary (probability
~1e-16) may fall to the neighbour, as with the binned draw. Every shape is fixed and nothing is read
on the host, so a CUDA graph holds it (step_model.draw_graphs). A row whose bucket at a query holds
more than `WINDOW` tokens (a row of thousands of equal values) cannot be answered so: its
`overflow` flag is raised and the caller draws it again with the full sort (`draw_rows_coarse`
does, eagerly: the flag is the one value it reads on the host).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["WINDOW", "draw_rows_coarse", "draw_rows_coarse_flagged"]

WINDOW = 128  # tokens of one bucket sorted exactly per query


class _Window(NamedTuple):
    """One bucket per row in exact order: positions start .. start + size - 1 of the exact order."""

    start: torch.Tensor  # int64 [M]
    size: torch.Tensor  # int64 [M]
    values: torch.Tensor  # float32 [M, W], descending (padding: -inf, last)
    ids: torch.Tensor  # int64 [M, W]
    cum: torch.Tensor  # float64 [M, W], the row's cumulative mass through each entry
    overflow: torch.Tensor  # bool [M]: the bucket has more than W tokens


class _Coarse:
    """A batch of rows sorted by float16 keys, with their masses' cumulative sums in that order."""

    def __init__(self, z: torch.Tensor, logsumexp: torch.Tensor) -> None:
        self.vocab = z.shape[1]
        keys, self.order = torch.sort(z.half(), dim=1, descending=True, stable=True)
        self.ascending = keys.float().neg_()  # searchsorted wants ascending rows
        self.z = z.gather(1, self.order)  # exact values in coarse order
        self.lse = logsumexp.double()[:, None]
        self.cum = torch.cumsum(torch.exp(self.z.double() - self.lse), dim=1)
        self.steps = torch.arange(WINDOW, device=z.device)

    def window(self, position: torch.Tensor) -> _Window:
        """The bucket holding each row's exact-order `position` (int64 [M], clamped into the row)."""
        position = position.clamp(0, self.vocab - 1)[:, None]
        key = self.ascending.gather(1, position).contiguous()
        start = torch.searchsorted(self.ascending, key).squeeze(1)
        size = torch.searchsorted(self.ascending, key, right=True).squeeze(1) - start
        index = (start[:, None] + self.steps).clamp_(max=self.vocab - 1)
        valid = self.steps[None, :] < size[:, None]
        values = torch.where(valid, self.z.gather(1, index), float("-inf"))
        values, inside = torch.sort(values, dim=1, descending=True, stable=True)  # ties: ascending id
        ids = self.order.gather(1, index).gather(1, inside)
        masses = torch.where(valid, torch.exp(values.double() - self.lse), 0.0)  # valid: a prefix still
        before = torch.where(start > 0, self.cum.gather(1, (start - 1).clamp(min=0)[:, None]).squeeze(1), 0.0)
        return _Window(start, size, values, ids, before[:, None] + torch.cumsum(masses, dim=1), size > WINDOW)

    def first_reaching(self, target: torch.Tensor, *, inclusive: bool) -> tuple[torch.Tensor, torch.Tensor, _Window]:
        """Per row the exact-order position of the first token whose cumulative mass reaches
        `target` (>= when inclusive, else >): count(cum < target), or count(cum <= target); the row
        length when none does. Also the cumulative mass through it and its window."""
        t = target[:, None].contiguous()
        position = torch.searchsorted(self.cum, t, right=not inclusive).squeeze(1)
        w = self.window(position)
        j = torch.searchsorted(w.cum, t, right=not inclusive).squeeze(1)
        j = torch.minimum(j, (w.size.clamp(max=WINDOW) - 1).clamp(min=0))  # rounding between the sums: stay inside
        found = position < self.vocab
        return torch.where(found, w.start + j, self.vocab), w.cum.gather(1, j[:, None]).squeeze(1), w


def _pick(w: _Window, position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(value, id, cumulative mass) at exact-order `position`, which lies in window `w`."""
    j = (position - w.start).clamp(0, WINDOW - 1)[:, None]
    return w.values.gather(1, j).squeeze(1), w.ids.gather(1, j).squeeze(1), w.cum.gather(1, j).squeeze(1)


def draw_rows_coarse_flagged(
    z: torch.Tensor, logsumexp: torch.Tensor, draw: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`draw_rows_sorted`'s (token ids, their z) and per row whether a bucket overflowed its window
    (those rows' answers are not to be used). No host synchronisation."""
    rows, vocab = z.shape
    c = _Coarse(z, logsumexp)
    u, top_p, top_k, min_p = draw.unbind(1)
    k = top_k.long().clamp(0, vocab)
    has_k, has_p, has_m = k > 0, top_p < 1.0, min_p > 0.0
    full = torch.full((rows,), vocab, dtype=torch.int64, device=z.device)
    # top-k: every token >= the k-th value (its ties share its bucket, so its window holds the cut).
    wk = c.window(k.clamp(min=1) - 1)
    kth = _pick(wk, k.clamp(min=1) - 1)[0]
    cut_k = wk.start + ((wk.values >= kth[:, None]) & (c.steps[None, :] < wk.size[:, None])).sum(dim=1)
    cut = torch.where(has_k, cut_k, full)
    base = torch.where(has_k, _pick(wk, cut_k - 1)[2], torch.ones_like(u))
    overflow = has_k & wk.overflow
    # top-p: through the first token whose cumulative mass reaches top_p (of what top-k kept).
    p_at, p_through, wp = c.first_reaching(top_p * base, inclusive=True)
    by_p = has_p & (p_at < cut)
    cut = torch.where(by_p, p_at + 1, cut)
    overflow |= has_p & wp.overflow
    # min-p: every token >= z_max + log(min_p) (a float64 threshold: the smallest float32 >= it).
    threshold = z.amax(dim=1).double() + torch.log(min_p.clamp(min=1e-300))
    t32 = threshold.float()
    t32 = torch.where(t32.double() < threshold, torch.nextafter(t32, torch.full_like(t32, float("inf"))), t32)
    above_m = (z >= t32[:, None]).sum(dim=1)
    by_m = has_m & (above_m < cut)
    cut = torch.where(by_m, above_m, cut)
    wm = c.window(above_m - 1)
    overflow |= by_m & wm.overflow
    total = torch.where(has_p | has_m, c.cum[:, -1], torch.ones_like(u))  # cut nowhere: all of it
    total = torch.where(has_k, base, total)
    total = torch.where(by_p, p_through, total)
    total = torch.where(by_m, _pick(wm, above_m - 1)[2], total)
    # The draw: the first token whose cumulative mass exceeds u * total, inside the cut; past it by
    # rounding, the last token whose cumulative mass still grew (count(cum < total)).
    truncated = has_k | has_p | has_m
    d_at, _, wd = c.first_reaching(u * total, inclusive=False)
    last_at, _, wl = c.first_reaching(torch.where(truncated, total, c.cum[:, -1]), inclusive=True)
    inside = d_at < cut
    last_at = torch.minimum(last_at, cut - 1)
    d_value, d_id, _ = _pick(wd, d_at)
    l_value, l_id, _ = _pick(wl, last_at)
    overflow |= torch.where(inside, wd.overflow, wl.overflow)
    return torch.where(inside, d_id, l_id), torch.where(inside, d_value, l_value), overflow


def draw_rows_coarse(z: torch.Tensor, logsumexp: torch.Tensor, draw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`draw_rows_coarse_flagged`, with any overflowing row drawn again by the full sort."""
    from step_model.draw import draw_rows_searched  # the fallback (draw.py registers this module)

    ids, values, overflow = draw_rows_coarse_flagged(z, logsumexp, draw)
    if bool(overflow.any()):
        rows = overflow.nonzero().squeeze(1)
        again = draw_rows_searched(z[rows], logsumexp[rows], draw[rows])
        ids, values = ids.clone(), values.clone()
        ids[rows], values[rows] = again
    return ids, values
