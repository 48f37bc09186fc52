"""The Triton programs of `step_model.draw_kernel` (imported only where Triton is: a jit function
finds the functions it calls among its module's globals, so they live at a module's top level)."""

# mypy: ignore-errors
# ruff: noqa: SIM108  (Triton compiles if-blocks on constexpr flags; ternaries are not its idiom)

import triton
import triton.language as tl

# No annotations but constexpr's on jit functions: Triton resolves them as globals (kernels.py).


@triton.jit
def key_of(z):
    """int64 keys ascending as the stable descending order runs (-0.0 as +0.0)."""
    k = (z + 0.0).to(tl.int32, bitcast=True)
    k = k ^ ((k >> 31) & 0x7FFFFFFF)
    return (-1 - k).to(tl.int64)


@triton.jit
def weight(z, lse, keep, MODE: tl.constexpr):
    """0: counts (float32), 1: float32 masses (approximate), 2: float64 masses (exact)."""
    if MODE == 0:
        w = tl.where(keep, 1.0, 0.0)
    elif MODE == 1:
        w = tl.where(keep, tl.exp(z - lse), 0.0)
    else:
        w = tl.where(keep, tl.exp(z.to(tl.float64) - lse.to(tl.float64)), 0.0)
    return w


@triton.jit
def search(
    row,
    band,
    n,
    lse,
    lo,
    hi,
    base,
    target,
    STRICT: tl.constexpr,
    MODE: tl.constexpr,
    BANDED: tl.constexpr,
    P: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The smallest key x in [lo, hi] with base + W(lo <= key <= x) >= target (> when STRICT),
    where base = W(key < lo) and W sums the MODE's weight; returns (x, W(key < x)). When no
    key does, x = hi. BANDED: the tokens are band[0:n] (ids), else the row's first n."""
    j = tl.arange(0, P).to(tl.int64)
    while lo < hi:
        step = (hi - lo + P) // P
        piv = tl.minimum(lo + (j + 1) * step - 1, hi)
        if MODE == 2:
            acc = tl.zeros([P], dtype=tl.float64)
        else:
            acc = tl.zeros([P], dtype=tl.float32)
        for start in range(0, n, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            valid = offs < n
            if BANDED:
                ids = tl.load(band + offs, mask=valid, other=0)
            else:
                ids = offs
            z = tl.load(row + ids, mask=valid, other=0.0)
            d = key_of(z)
            w = weight(z, lse, valid & (d >= lo) & (d <= hi), MODE)
            acc += tl.sum(tl.where(d[:, None] <= piv[None, :], w[:, None], 0.0), axis=0)
        s = base + acc  # nondecreasing in j: the same reduction tree over growing sets
        if STRICT:
            ok = s > target
        else:
            ok = s >= target
        first = tl.min(tl.where(ok | (piv >= hi), j, P - 1), axis=0)
        base = tl.where(first > 0, tl.sum(tl.where(j == first - 1, s, 0.0), axis=0), base)
        hi = tl.sum(tl.where(j == first, piv, 0), axis=0)
        lo = lo + first * step
    return lo, base


@triton.jit
def gather_band(row, n, lse, lo, hi, band, BAND_: tl.constexpr, BLOCK: tl.constexpr):
    """Write the ids of the tokens with lo <= key <= hi to band (ascending id, at most BAND_);
    return their number and the float64 mass of the tokens before them (key < lo)."""
    count = tl.zeros([], dtype=tl.int32)
    below = tl.zeros([], dtype=tl.float64)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        valid = offs < n
        z = tl.load(row + offs, mask=valid, other=0.0)
        d = key_of(z)
        inside = valid & (d >= lo) & (d <= hi)
        at = count + tl.cumsum(inside.to(tl.int32), axis=0) - 1
        tl.store(band + at, offs, mask=inside & (at < BAND_))
        count += tl.sum(inside.to(tl.int32), axis=0)
        below += tl.sum(weight(z, lse, valid & (d < lo), 2), axis=0)
    return count, below


@triton.jit
def tie(row, band, n, lse, x, base, target, STRICT: tl.constexpr, BLOCK: tl.constexpr):
    """Among band tokens with key x, in ascending id: the first whose cumulative mass (base +
    the ties' masses so far) reaches target. Returns (id, mass through it, found)."""
    run = base
    pick = tl.full([], -1, dtype=tl.int64)
    through = base
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        valid = offs < n
        ids = tl.load(band + offs, mask=valid, other=0)
        z = tl.load(row + ids, mask=valid, other=0.0)
        same = valid & (key_of(z) == x)
        c = run + tl.cumsum(weight(z, lse, same, 2), axis=0)
        if STRICT:
            ok = same & (c > target)
        else:
            ok = same & (c >= target)
        j = tl.min(tl.where(ok, offs, n), axis=0)
        take = (pick < 0) & (j < n)
        pick = tl.where(take, tl.sum(tl.where(offs == j, ids, 0), axis=0).to(tl.int64), pick)
        through = tl.where(take, tl.sum(tl.where(offs == j, c, 0.0), axis=0), through)
        run = tl.sum(tl.where(offs == start + BLOCK - 1, c, 0.0), axis=0)
    return pick, through, pick >= 0


@triton.jit
def first_reaching(
    row,
    band,
    n,
    lse,
    target,
    STRICT: tl.constexpr,
    DELTA_: tl.constexpr,
    BAND_: tl.constexpr,
    P: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The first token in the order whose cumulative float64 mass reaches target (> when
    STRICT): (key, id, mass through it, found, settled: False when the band overflowed)."""
    lo0 = tl.full([], -2147483648, dtype=tl.int64)
    hi0 = tl.full([], 2147483647, dtype=tl.int64)
    zero32 = tl.zeros([], dtype=tl.float32)
    lo, _ = search(row, band, n, lse, lo0, hi0, zero32, (target - DELTA_).to(tl.float32), False, 1, False, P, BLOCK)
    hi, _ = search(row, band, n, lse, lo0, hi0, zero32, (target + DELTA_).to(tl.float32), False, 1, False, P, BLOCK)
    count, below = gather_band(row, n, lse, lo, hi, band, BAND_, BLOCK)
    # The band is a few tokens to a few hundred: smaller blocks there (and float64 tiles 8x smaller).
    x, base = search(row, band, tl.minimum(count, BAND_), lse, lo, hi, below, target, STRICT, 2, True, P, BLOCK // 8)
    tid, through, found = tie(row, band, tl.minimum(count, BAND_), lse, x, base, target, STRICT, BLOCK // 8)
    return x, tid, through, found, count <= BAND_


@triton.jit
def mass_through(row, n, lse, x, BLOCK: tl.constexpr):
    """The float64 mass of the tokens with key <= x."""
    total = tl.zeros([], dtype=tl.float64)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        valid = offs < n
        z = tl.load(row + offs, mask=valid, other=0.0)
        total += tl.sum(weight(z, lse, valid & (key_of(z) <= x), 2), axis=0)
    return total


@triton.jit
def draw_kernel(
    z_ptr,
    stride,
    rows_ptr,
    lse_ptr,
    draw_ptr,
    band_ptr,
    ids_out,
    values_out,
    settled_out,
    n,
    DELTA_: tl.constexpr,
    BAND_: tl.constexpr,
    P: tl.constexpr,
    BLOCK: tl.constexpr,
):
    i = tl.program_id(0)
    row = z_ptr + tl.load(rows_ptr + i).to(tl.int64) * stride
    band = band_ptr + i.to(tl.int64) * BAND_
    lse = tl.load(lse_ptr + i)
    u = tl.load(draw_ptr + i * 4)
    top_p = tl.load(draw_ptr + i * 4 + 1)
    top_k = tl.load(draw_ptr + i * 4 + 2)
    min_p = tl.load(draw_ptr + i * 4 + 3)
    has_k = top_k >= 1.0
    has_p = top_p < 1.0
    has_m = min_p > 0.0
    everything = tl.full([], 2147483648, dtype=tl.int64)  # past every key
    # The kept prefix: keys < cut_key, and at cut_key the ids <= cut_id.
    cut_key = everything
    cut_id = tl.full([], n, dtype=tl.int64)
    total = tl.full([], 1.0, dtype=tl.float64)  # the kept mass, 1 until a cut
    settled = tl.full([], 1, dtype=tl.int1)
    if has_k:  # every token >= the k-th value: all ties of its key
        k = tl.minimum(top_k, (n + 0).to(tl.float64)).to(tl.int64).to(tl.float32)
        lo0 = tl.full([], -2147483648, dtype=tl.int64)
        hi0 = tl.full([], 2147483647, dtype=tl.int64)
        kth, _ = search(row, band, n, lse, lo0, hi0, tl.zeros([], dtype=tl.float32), k, False, 0, False, P, BLOCK)
        cut_key = kth
        total = mass_through(row, n, lse, kth, BLOCK)
    if has_p:  # through the first token whose mass reaches top_p of what top-k kept
        pk, pid, pthrough, pfound, pok = first_reaching(
            row, band, n, lse, top_p * total, False, DELTA_, BAND_, P, BLOCK
        )
        settled = settled & pok
        shorter = pfound & ((pk < cut_key) | ((pk == cut_key) & (pid <= cut_id)))
        cut_key = tl.where(shorter, pk, cut_key)
        cut_id = tl.where(shorter, pid, cut_id)
        total = tl.where(shorter, pthrough, total)
    if has_m:  # every token >= z_max + log(min_p), compared in float64
        zmax = tl.full([], float("-inf"), dtype=tl.float32)
        for start in range(0, n, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            zmax = tl.maximum(zmax, tl.max(tl.load(row + offs, mask=offs < n, other=float("-inf")), axis=0))
        threshold = zmax.to(tl.float64) + tl.log(min_p)
        zmin = tl.full([], float("inf"), dtype=tl.float32)
        for start in range(0, n, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            z = tl.load(row + offs, mask=offs < n, other=float("-inf"))
            zmin = tl.minimum(zmin, tl.min(tl.where(z.to(tl.float64) >= threshold, z, float("inf")), axis=0))
        mk = key_of(zmin)
        fewer = mk < cut_key
        cut_key = tl.where(fewer, mk, cut_key)
        cut_id = tl.where(fewer, n, cut_id)
        total = tl.where(fewer, mass_through(row, n, lse, mk, BLOCK), total)
    truncated = has_k | has_p | has_m
    if truncated & (cut_key == everything):  # a cut asked for that kept everything: the row's mass
        total = mass_through(row, n, lse, everything, BLOCK)
    # The draw: the first token whose cumulative mass exceeds u * total, inside the cut.
    dk, did, _, dfound, dok = first_reaching(row, band, n, lse, u * total, True, DELTA_, BAND_, P, BLOCK)
    inside = dfound & ((dk < cut_key) | ((dk == cut_key) & (did <= cut_id)))
    settled = settled & dok
    if inside == 0:  # past the kept mass by rounding: the first token whose cumulative mass is all of it
        kept = total
        if truncated == 0:
            kept = mass_through(row, n, lse, everything, BLOCK)
        lk, lid, _, lfound, lok = first_reaching(row, band, n, lse, kept, False, DELTA_, BAND_, P, BLOCK)
        settled = settled & lok & lfound & ((lk < cut_key) | ((lk == cut_key) & (lid <= cut_id)))
        did = lid
    did = tl.maximum(tl.minimum(did, n - 1), 0)
    tl.store(ids_out + i, did)
    tl.store(values_out + i, tl.load(row + did))
    tl.store(settled_out + i, settled.to(tl.int8))
