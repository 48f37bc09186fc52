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
exactly on a boundary). `draw_rows` does it in linear passes over the rows (value bins; one bin
sorted per cut) instead of sorting whole rows: 2.4x faster than `draw_rows_sorted` for 16 rows of
GPT-2's vocabulary on one CPU core, which stays as the line-for-line reference. On the GPU the
binned passes cost 6.4 ms for 512 rows (H100, 2026-12-07: float64 scatter-adds and a top-K as wide
as the fullest bin) where one segmented sort is a few kernels: `draw_method` picks the sort there
("sort") and the bins on the CPU ("bins"); the config parameter `draw_method` overrides it. The caller gets
the token and its scaled logit; the logprob is ``logit - logsumexp``, computed by the gateway as
on every other path.

Which rows need it (`needs_draw`) is decided from the window already on the host: the draw costs
a sort of the row, so rows whose window holds the cut (or whose ``u`` lands inside it, without
truncation) are left to the gateway's window sampler.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

__all__ = ["DRAW_COLUMNS", "DRAW_METHODS", "draw_method", "draw_rows", "draw_rows_sorted", "needs_draw"]

DRAW_COLUMNS = 4  # u, top_p, top_k, min_p
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
    asked = u >= 0.0
    window = topk_logits.shape[1]
    z = topk_logits.astype(np.float64)
    mass = np.exp(z - logsumexp.astype(np.float64)[:, None]).sum(axis=1)
    k_inside = (top_k > 0) & (top_k < window)  # top-k's cut, and so every later cut, is inside
    wide_k = top_k >= window
    p_outside = (top_p < 1.0) & (mass < top_p + _MARGIN)
    with np.errstate(divide="ignore"):
        m_outside = (min_p > 0.0) & (z[:, -1] >= z[:, 0] + np.log(np.maximum(min_p, 1e-300)))
    untruncated = (top_k <= 0) & (top_p >= 1.0) & (min_p <= 0.0)
    beyond = untruncated & (u >= mass - _MARGIN)  # the draw lands past the window's mass
    result: np.ndarray = asked & ~k_inside & (wide_k | p_outside | m_outside | beyond)
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


def draw_method(
    name: str, device_kind: str
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The draw function for `name` ("sort", "bins", or "auto": sort on CUDA, bins on the CPU)."""
    if name == "auto":
        name = "sort" if device_kind == "cuda" else "bins"
    try:
        return DRAW_METHODS[name]
    except KeyError:
        raise ValueError(f"draw_method must be auto, {' or '.join(DRAW_METHODS)}; got {name!r}") from None


_BINS = 2048  # value bins per row: a cut or a draw sorts only the tokens of one bin


def draw_rows(z: torch.Tensor, logsumexp: torch.Tensor, draw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The chosen token of each row and its scaled logit, without sorting whole rows.

    The same selection as `draw_rows_sorted` (the gateway's), in linear passes: every cut is a
    prefix of the stable descending order, so it is a value threshold plus, among the tokens tied
    at it, the lowest ids. Top-k keeps ``z >= kth``; min-p keeps ``z >= z_max + log(min_p)``; the
    top-p cut and the draw are the first token (in that order) whose cumulative mass reaches a
    target: the rows' masses are summed into value bins, the bin holding the target found from
    their prefix sums, and only that bin's tokens sorted (`_first_reaching`). Masses in float64, as
    on the gateway; only the order of summation differs (the bins), so a target exactly on a
    boundary (probability ~1e-16) may fall to the neighbour.

    Args and returns as `draw_rows_sorted`.
    """
    vocab = z.shape[1]
    u, top_p, top_k, min_p = draw.unbind(1)
    p = torch.exp(z.double() - logsumexp.double()[:, None])
    zmax = z.max(dim=1).values
    ids = torch.arange(vocab, device=z.device)
    bins = _value_bins(z, zmax)
    k = top_k.long().clamp(0, vocab)
    has_k, has_p, has_m = k > 0, top_p < 1.0, min_p > 0.0
    # Passes a cut no row asks for are left out (the seed's request: top-p alone).
    keep: torch.Tensor | None = None
    kept = p
    if bool(has_k.any()):
        kth = torch.topk(z, int(k.max()), dim=1).values.gather(1, (k.clamp(min=1) - 1)[:, None])
        keep = ~has_k[:, None] | (z >= kth)  # every tie of the k-th value
        kept = p * keep
    base = torch.where(has_k, _row_sums(kept), torch.ones_like(u)) if keep is not None else torch.ones_like(u)
    # Top-p: the last kept token is the first whose cumulative mass reaches top_p * base.
    cut_z, cut_id, reached = _first_reaching(z, kept, bins, top_p * base, inclusive=True)
    cut_p = has_p & reached  # else rounding left the kept mass below top_p: keep everything
    in_p = ~cut_p[:, None] | (z > cut_z[:, None]) | ((z == cut_z[:, None]) & (ids[None, :] <= cut_id[:, None]))
    final = in_p
    if bool(has_m.any()):
        # Min-p: its prefix is the shorter one when the top-p cut's value lies below its threshold.
        threshold = zmax.double() + torch.log(min_p.clamp(min=1e-300))
        in_m = z.double() >= threshold[:, None]
        by_m = has_m & ~(cut_p & (cut_z.double() >= threshold))
        final = torch.where(by_m[:, None], in_m, in_p)
    if keep is not None:
        final = keep & final
    mass = p * final
    truncated = has_k | has_p | has_m
    total = torch.where(truncated, _row_sums(mass), torch.ones_like(u))
    token_z, token_id, found = _first_reaching(z, mass, bins, u * total, inclusive=False)
    if not bool(found.all()):  # x at or past the kept total by rounding: the last kept token of mass
        last_z, last_id = _last_positive(z, mass)
        token_z, token_id = torch.where(found, token_z, last_z), torch.where(found, token_id, last_id)
    return token_id, token_z


DRAW_METHODS = {"sort": draw_rows_sorted, "bins": draw_rows}


def _row_sums(x: torch.Tensor) -> torch.Tensor:
    """Each row's sum, a function of the row alone: on the CPU torch splits the reduction of a
    single row across its threads (another order of summation than with two rows or more), so
    there numpy's per-row pairwise sum."""
    if x.is_cuda:
        return x.sum(dim=1)
    return torch.from_numpy(x.numpy().sum(axis=1))


def _value_bins(z: torch.Tensor, zmax: torch.Tensor) -> torch.Tensor:
    """Each token's bin, 0 for the highest values: non-decreasing as z decreases, so the bins
    follow the descending order and equal values share a bin."""
    zmin = z.min(dim=1).values
    scale = (_BINS - 1) / torch.clamp(zmax - zmin, min=1e-30)
    return ((zmax[:, None] - z) * scale[:, None]).floor().clamp(0, _BINS - 1).long()


def _first_reaching(
    z: torch.Tensor, weights: torch.Tensor, bins: torch.Tensor, target: torch.Tensor, *, inclusive: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row, the first token in stable descending order whose cumulative weight reaches
    `target` (``>= target`` when inclusive, else ``> target``): (its z, its id, found). Rows where
    no token reaches it report found False (z and id then meaningless)."""
    rows = z.shape[0]
    offset = (torch.arange(rows, device=z.device) * _BINS)[:, None]
    binned = torch.zeros(rows * _BINS, dtype=weights.dtype, device=z.device)
    binned.scatter_add_(0, (bins + offset).reshape(-1), weights.reshape(-1))
    cum = torch.cumsum(binned.view(rows, _BINS), dim=1)
    below = (cum < target[:, None]) if inclusive else (cum <= target[:, None])
    b = below.sum(dim=1).clamp(max=_BINS - 1)
    before = torch.where(b > 0, cum.gather(1, (b - 1).clamp(min=0)[:, None]).squeeze(1), torch.zeros_like(target))
    # The bin's tokens in stable descending order: gathered by value, then ordered by id, value.
    member = bins == b[:, None]
    size = member.sum(dim=1)
    width = max(1, int(size.max()))
    key = torch.where(member, z, torch.full_like(z, float("-inf")))
    index = torch.topk(key, width, dim=1).indices
    index = torch.sort(index, dim=1).values  # ascending id (padding entries: tokens of other bins)
    valid = member.gather(1, index)
    values = torch.where(valid, z.gather(1, index), torch.full_like(index, 0, dtype=z.dtype) - float("inf"))
    order = torch.sort(values, dim=1, descending=True, stable=True).indices
    index, values, valid = index.gather(1, order), values.gather(1, order), valid.gather(1, order)
    running = before[:, None] + torch.cumsum(torch.where(valid, weights.gather(1, index), 0.0), dim=1)
    short = (running < target[:, None]) if inclusive else (running <= target[:, None])
    j = (short & valid).sum(dim=1)  # valid entries lead, and `short` holds on a prefix of them
    found = j < size
    j = j.clamp(max=width - 1)
    return values.gather(1, j[:, None]).squeeze(1), index.gather(1, j[:, None]).squeeze(1), found


def _last_positive(z: torch.Tensor, mass: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The last token of positive mass in stable descending order (lowest value, then highest id)."""
    vocab = z.shape[1]
    ids = torch.arange(vocab, device=z.device)
    low = torch.where(mass > 0, z, torch.full_like(z, float("inf"))).min(dim=1).values
    at_low = (mass > 0) & (z == low[:, None])
    last = torch.where(at_low, ids[None, :], torch.full_like(ids, -1)[None, :]).max(dim=1).values
    return low, last
