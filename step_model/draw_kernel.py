"""The device draw without sorting rows: one Triton program per row (the GPU's draw).

Sorting every row was most of the draw's time on the GPU (H100, 2026-12-07: the stable sort 0.96 of
the 1.5 ms that 192 rows of GPT-2's vocabulary took; `benchmarks/tail_bench.py`). Every cut and the
draw itself ask for one thing: the first token, in the stable descending order, at which a
cumulative amount (a count, or a mass) reaches a target. Here that token is found by search over
the row's values instead:

* each value maps to an int32 key that ascends as the order does (descending values; ties share
  a key and keep ascending ids), so "the first key at which the cumulative amount reaches T" is
  a search over 2**32 keys: P pivots per pass over the row (P sums in one sweep), 8 passes;
* masses are searched twice in float32 first (T - DELTA and T + DELTA: the float32 sums stay
  within DELTA of the float64 ones), which leaves a narrow band of keys holding the answer; the
  band's tokens are gathered (ascending id), the float64 mass before the band summed in the same
  sweep, and the answer found exactly in float64 within the band, its ties resolved in id order.

The selection is `step_model.draw.draw_rows_sorted`'s in positions of that order (top-k, top-p
renormalised over what top-k kept, min-p, the draw at u * kept mass, the last token whose mass
still counted when rounding runs past the end); only the order of summation differs, so a target
exactly on a boundary (probability ~1e-16) may fall to the neighbour, as with the binned draw. A
row is one program: its answer never depends on the rows beside it (issue 15). A row the search
cannot settle (a band of more than BAND tokens, a boundary case of rounding) is flagged and drawn
again by `draw_rows_searched`, the full sort.

Written here because neither torch nor Triton offers a weighted selection without a sort; Triton
(which comes with torch's CUDA builds) compiles it for the card. `kernel_draw` returns None where
Triton or a GPU is missing, and the engine then keeps the sort.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

__all__ = ["BAND", "DELTA", "kernel_available", "kernel_draw", "kernel_draw_flagged", "unavailable_reason"]

log = logging.getLogger(__name__)

BAND = 4096  # tokens a row's exact band may hold (more: drawn again by the sort)
DELTA = 2.0**-12  # float32 masses stay this close to the float64 ones (GPT-2's vocabulary: ~1e-6)
_PIVOTS = 16
_BLOCK = 1024
_kernel: Any = None
_unavailable = ""


def _build() -> Any:
    from step_model._draw_triton import draw_kernel

    return draw_kernel


def unavailable_reason() -> str:
    """Why `kernel_available` said no ("" before it was asked, or when it said yes)."""
    return _unavailable


def kernel_available(device: torch.device) -> bool:
    """Whether the kernel compiles here and its probe draws the reference's tokens (checked once
    per process; False without Triton or a GPU, unless TRITON_INTERPRET=1: the interpreter the CPU
    tests use)."""
    global _kernel, _unavailable
    if _kernel is None and not _unavailable:
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            _unavailable = "no GPU"
        else:
            try:
                _kernel = _build()
                _unavailable = _probe(device)
            except Exception as err:  # no Triton, no compiler: the sort serves
                _unavailable = f"{type(err).__name__}: {err}"[:300]
            if _unavailable:
                _kernel = None
                log.warning("device draw kernel unavailable (%s): sorting rows", _unavailable)
    return _kernel is not None


def _probe(device: torch.device) -> str:
    """ "" when the kernel draws the full sort's tokens on a few rows of mixed settings, else why not."""
    from step_model.draw import draw_rows_sorted

    gen = torch.Generator().manual_seed(7)
    z = torch.randn(6, 3000, generator=gen) * torch.tensor([0.3, 1.0, 3.0, 1.0, 1.0, 8.0])[:, None]
    draw = torch.tensor(
        [
            [0.3, 0.9, 0, 0],
            [0.7, 1.0, 50, 0],
            [0.5, 0.95, 200, 0],
            [0.9, 1.0, 0, 0.05],
            [0.0, 0.5, 0, 0],
            [0.99, 1, 0, 0],
        ],
        dtype=torch.float64,
    )
    lse = torch.logsumexp(z, dim=1)
    want = draw_rows_sorted(z, lse, draw)[0]
    got, _, again = kernel_draw_flagged(z.to(device), lse.to(device), draw.to(device))
    ok = (got.cpu() == want) | again.cpu()
    return (
        ""
        if bool(ok.all())
        else f"its probe disagrees with the sort on rows {ok.logical_not().nonzero().flatten().tolist()}"
    )


def kernel_draw_flagged(
    z: torch.Tensor, logsumexp: torch.Tensor, draw: torch.Tensor, rows: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token ids, their z, bool [M]: not settled, draw again) for rows `rows` (int64 [M], default
    all) of `z` [R, V] (float32, unit stride along rows); `logsumexp` [M] and `draw` [M, 4] per
    drawn row. No host synchronisation."""
    if _kernel is None:
        raise RuntimeError(f"device draw kernel unavailable: {_unavailable or 'kernel_available() not asked'}")
    vocab = z.shape[1]
    if rows is None:
        rows = torch.arange(z.shape[0], device=z.device)
    m = rows.shape[0]
    ids = torch.empty(m, dtype=torch.int64, device=z.device)
    values = torch.empty(m, dtype=torch.float32, device=z.device)
    settled = torch.empty(m, dtype=torch.int8, device=z.device)
    band = torch.empty((m, BAND), dtype=torch.int32, device=z.device)
    if m:
        _kernel[(m,)](
            z,
            z.stride(0),
            rows,
            logsumexp.float().contiguous(),
            draw.double().contiguous(),
            band,
            ids,
            values,
            settled,
            vocab,
            DELTA_=DELTA,
            BAND_=BAND,
            P=_PIVOTS,
            BLOCK=_BLOCK,
            num_warps=8,
        )
    return ids, values, settled == 0


def kernel_draw(z: torch.Tensor, logsumexp: torch.Tensor, draw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`kernel_draw_flagged` for every row of z, the unsettled ones drawn again by the full sort."""
    from step_model.draw import draw_rows_searched  # the fallback (draw.py registers this module)

    ids, values, again = kernel_draw_flagged(z, logsumexp, draw)
    if bool(again.any()):
        redo = again.nonzero().squeeze(1)
        ids[redo], values[redo] = draw_rows_searched(z[redo], logsumexp[redo], draw[redo])
    return ids, values
