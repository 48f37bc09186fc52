"""The binned draw on the host, a row at a time in numpy: the CPU's draw.

The same selection and the same binning as `step_model.draw.draw_rows` (value bins per row, each
cut and the draw a prefix query that sorts one bin; see there), written for the CPU: torch's
version is ~100 small tensor operations per call whatever the row count, launch-free but each a
few microseconds on the host, so on 2 cores it cost 2.5 ms for one row of GPT-2's vocabulary and
18 ms for 16 (2026-12-07), a quarter of a 16-row top-p step. Here the whole-block passes (masses,
bins, the binned sums) are one operation each for all rows and the queries are a few numpy calls
per row. A row's numbers depend on that row alone: its masses are one exp call of its own, its
bins' sums are taken in ascending id (`np.bincount`), every row with the same operations.

Written by hand because no library draws with the gateway's exact cut semantics (stable
descending order, ties by id, top-k keeping every tie, float64 masses).
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["VALUE_BINS", "draw_rows_host"]

VALUE_BINS = 2048  # value bins per row, step_model.draw's torch version's too: a query sorts one bin


class _Row:
    """One row's bins: token values `z` (float32), masses `p` (float64), bin of each token, and the
    bins' cumulative masses."""

    def __init__(
        self, z: np.ndarray, p: np.ndarray, bins: np.ndarray, cum: np.ndarray, zmax: np.float32, scale: np.float32
    ) -> None:
        self.z, self.p, self.bins, self.cum, self.zmax, self.scale = z, p, bins, cum, zmax, scale

    def bin_of(self, value: np.float32) -> int:
        """The bin of a value of this row (the float32 operations that binned its tokens)."""
        d = min(float(np.float32(self.zmax - value) * self.scale), VALUE_BINS - 1.0)  # a -inf value: the last bin
        return max(math.floor(d), 0)

    def members(self, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        """Bin `b`'s tokens in stable descending order: (ids, values, cumulative mass through each,
        the cumulative mass before the bin)."""
        ids = np.flatnonzero(self.bins == b)  # ascending id
        values = self.z[ids]
        order = np.argsort(-values, kind="stable")  # ties keep ascending id
        ids, values = ids[order], values[order]
        before = float(self.cum[b - 1]) if b > 0 else 0.0
        return ids, values, before + np.cumsum(self.p[ids]), before

    def first_reaching(self, target: float, *, inclusive: bool) -> tuple[float, int, bool, float]:
        """The first token whose cumulative mass reaches `target` (>= when inclusive, else >):
        (its value, its id, found, the cumulative mass through it)."""
        b = min(int(np.searchsorted(self.cum, target, side="left" if inclusive else "right")), VALUE_BINS - 1)
        ids, values, running, before = self.members(b)
        if not ids.size:
            return float("-inf"), 0, False, before
        j = int(np.searchsorted(running, target, side="left" if inclusive else "right"))
        found = j < ids.size
        j = min(j, ids.size - 1)
        return float(values[j]), int(ids[j]), found, float(running[j])

    def prefix_mass(self, zc: float, ic: int) -> float:
        """The cumulative mass through the prefix ``z > zc or (z == zc and id <= ic)`` (zc a value of the row)."""
        ids, values, running, before = self.members(self.bin_of(np.float32(zc)))
        n = int(np.count_nonzero((values > zc) | ((values == zc) & (ids <= ic))))  # a prefix of the bin
        return float(running[n - 1]) if n else before


def _shorter(z1: float, i1: int, z2: float, i2: int) -> bool:
    """Whether the token or prefix end (z1, i1) comes at or before (z2, i2) in the stable descending order."""
    return z1 > z2 or (z1 == z2 and i1 <= i2)


def draw_rows_host(z: torch.Tensor, logsumexp: torch.Tensor, draw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The chosen token of each row and its scaled logit (`step_model.draw.draw_rows_sorted`'s
    arguments and results; the tensors are read on, and the results returned to, their device)."""
    device = z.device
    zn = z.detach().to("cpu", torch.float32).numpy()
    rows, vocab = zn.shape
    # Masses in float64 (torch's vectorised exp), one call per row: a call's last few elements take
    # the scalar exp, which may differ in the last bit, so a row must be its own call to stay its own.
    masses = torch.from_numpy(zn).double()
    lse = logsumexp.detach().to("cpu", torch.float64).tolist()
    for r in range(rows):
        masses[r].sub_(lse[r]).exp_()
    p = masses.numpy()
    zmax, zmin = zn.max(axis=1), zn.min(axis=1)
    banned = np.flatnonzero(np.isneginf(zmin))  # a banned token's -inf would make the range infinite
    for r in banned.tolist():
        finite = zn[r][np.isfinite(zn[r])]
        zmin[r] = finite.min() if finite.size else zmax[r]
    zmin = np.minimum(zmin, zmax)
    scale = (np.float32(VALUE_BINS - 1) / np.maximum(zmax - zmin, np.float32(1e-30))).astype(np.float32)
    # floor((zmax - z) * scale) clamped to the last bin, in float32 as `_Row.bin_of`: the product is
    # >= 0, so truncation is the floor, and the clamp first turns a -inf token's inf into the last bin.
    d = zmax[:, None] - zn
    d *= scale[:, None]
    np.minimum(d, np.float32(VALUE_BINS - 1), out=d)
    bins = d.astype(np.int64)
    offsets = (np.arange(rows, dtype=np.int64) * VALUE_BINS)[:, None]
    binned = np.bincount((bins + offsets).ravel(), weights=p.ravel(), minlength=rows * VALUE_BINS)
    cum = np.cumsum(binned.reshape(rows, VALUE_BINS), axis=1)
    columns = draw.detach().to("cpu", torch.float64).numpy()
    tokens = np.zeros(rows, dtype=np.int64)
    values = np.zeros(rows, dtype=np.float32)
    for r in range(rows):
        row = _Row(zn[r], p[r], bins[r], cum[r], zmax[r], scale[r])
        tokens[r], values[r] = _draw_one(row, vocab, *(float(c) for c in columns[r]))
    return torch.from_numpy(tokens).to(device), torch.from_numpy(values).to(device)


def _draw_one(row: _Row, vocab: int, u: float, top_p: float, top_k: float, min_p: float) -> tuple[int, float]:
    """One row's draw: its cuts in order (top-k, top-p over what top-k kept, min-p), then the first
    token whose cumulative kept mass exceeds ``u * total``."""
    k = int(min(max(top_k, 0), vocab))
    # The kept set is a prefix of the stable descending order: (cut value, highest id kept at it).
    cut_z, cut_id = float("-inf"), vocab
    total = float(row.cum[-1])  # the kept mass, the whole row's until a cut
    if k > 0:
        kth = float(np.partition(row.z, vocab - k)[vocab - k])  # every tie of the k-th value is kept
        cut_z, total = kth, row.prefix_mass(kth, vocab)
    if top_p < 1.0:
        base = total if k > 0 else 1.0  # top-p renormalises over what top-k kept
        pz, pid, reached, through = row.first_reaching(top_p * base, inclusive=True)
        if reached and _shorter(pz, pid, cut_z, cut_id):  # else rounding: keep all
            cut_z, cut_id, total = pz, pid, through
    if min_p > 0.0:
        threshold = float(row.zmax) + math.log(min_p)
        mz = float(row.z[row.z.astype(np.float64) >= threshold].min())  # zmax at least
        if _shorter(mz, vocab, cut_z, cut_id):
            cut_z, cut_id, total = mz, vocab, row.prefix_mass(mz, vocab)
    if not (k > 0 or top_p < 1.0 or min_p > 0.0):
        total = 1.0
    token_z, token_id, found, _ = row.first_reaching(u * total, inclusive=False)
    if found and _shorter(token_z, token_id, cut_z, cut_id):
        return token_id, token_z
    # At or past the kept total by rounding: the last kept token of positive mass.
    ids = np.arange(vocab)
    kept = (row.z > cut_z) | ((row.z == cut_z) & (ids <= cut_id))
    positive = kept & (row.p > 0)
    if not positive.any():  # (no mass at all: not a row a model gives) the first token of the order
        first = int(np.flatnonzero(row.z == row.zmax)[0])
        return first, float(row.zmax)
    low = row.z[positive].min()
    return int(np.flatnonzero(positive & (row.z == low)).max()), float(low)
