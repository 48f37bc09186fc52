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
for the same ``u`` (up to the order of a parallel prefix sum's roundings on a GPU: a draw exactly
on a boundary, probability ~1e-16). The caller gets the token and its scaled logit; the logprob
is ``logit - logsumexp``, computed by the gateway as on every other path.

Which rows need it (`needs_draw`) is decided from the window already on the host: the draw costs
a sort of the row, so rows whose window holds the cut (or whose ``u`` lands inside it, without
truncation) are left to the gateway's window sampler.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["DRAW_COLUMNS", "draw_rows", "needs_draw"]

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


def draw_rows(z: torch.Tensor, logsumexp: torch.Tensor, draw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The chosen token of each row and its scaled logit.

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
