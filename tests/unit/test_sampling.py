"""Unit tests for frontend.sampling: exactness of the window path, parity with transformers."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

from frontend.sampling import (
    NeedFullRow,
    Sampled,
    SamplingParams,
    StepLogits,
    needs_full_row,
    sample,
    window_size,
)
from frontend.sampling.sampler import _sample_full

pytestmark = pytest.mark.unit

F32 = NDArray[np.float32]
F64 = NDArray[np.float64]


# ----------------------------------------------------------------------------- helpers


def scaled(raw: F32, temperature: float) -> F32:
    """What the server computes: logits / T in float32 (T = 1 for greedy)."""
    t = np.float32(temperature if temperature > 0 else 1.0)
    return (raw / t).astype(np.float32)


def logsumexp(z: F32) -> float:
    z64 = z.astype(np.float64)
    m = float(z64.max())
    return m + math.log(float(np.exp(z64 - m).sum()))


def server_topk(z: F32, k: int, rng: np.random.Generator | None = None) -> NDArray[np.int64]:
    """The K largest entries, descending. With ``rng``, ties come in random order and a random
    subset of a tie group straddling the window edge is included (an adversarial server)."""
    if rng is None:
        return np.argsort(-z, kind="stable")[:k].astype(np.int64)
    perm = rng.permutation(z.shape[0])
    return perm[np.argsort(-z[perm], kind="stable")][:k].astype(np.int64)


def window_step(z: F32, k: int, rng: np.random.Generator | None = None) -> StepLogits:
    ids = server_topk(z, k, rng)
    return StepLogits(z[ids], ids, logsumexp(z))


def full_step(z: F32) -> StepLogits:
    ids = server_topk(z, 1)
    return StepLogits(z[ids], ids, logsumexp(z), z)


def try_window(
    step: StepLogits,
    params: SamplingParams,
    u: float,
    seen: Sequence[int] = (),
) -> Sampled | None:
    try:
        return sample(step, params, u, seen)
    except NeedFullRow:
        return None


def gateway_sample(
    z: F32,
    params: SamplingParams,
    u: float,
    seen: Sequence[int] = (),
    *,
    default_window: int = 16,
) -> tuple[Sampled, bool]:
    """The gateway protocol: window first, full row on NeedFullRow (same u). -> (result, full?)"""
    if not needs_full_row(params):
        k = window_size(params, default_window=default_window, vocab_size=z.shape[0])
        got = try_window(window_step(z, k), params, u, seen)
        if got is not None:
            return got, False
    return sample(full_step(z), params, u, seen), True


def peaky_row(rng: np.random.Generator, vocab: int, scale: float = 2.0) -> F32:
    raw = rng.standard_normal(vocab) * scale
    hot = rng.choice(vocab, size=6, replace=False)
    raw[hot] += np.array([5.0, 4.0, 3.5, 3.0, 2.0, 1.0])
    return raw.astype(np.float32)


def tied_row(rng: np.random.Generator, vocab: int, step: float = 0.5) -> F32:
    """Quantised logits (as from a low-precision model): exact ties, many when ``step`` is big."""
    return (np.round(peaky_row(rng, vocab) / step) * step).astype(np.float32)


# ------------------------------------------------------------ transformers reference


@pytest.fixture(scope="module")
def hf() -> Any:
    pytest.importorskip("torch")
    return pytest.importorskip("transformers.generation.logits_process")


def hf_probs(
    hf: Any,
    raw: F32,
    params: SamplingParams,
    seen: Sequence[int] = (),
    *,
    order: str = "hf",
) -> F64:
    """Exact sampling distribution of transformers' processors on the raw (unscaled) row.

    ``order="hf"`` is transformers' own order; other values build deliberately wrong pipelines
    used to show that the statistical test has power.
    """
    import torch

    scores = torch.tensor(raw, dtype=torch.float64)[None, :]
    input_ids = torch.tensor([list(seen) or [0]], dtype=torch.long)
    if params.repetition_penalty != 1.0 and seen and order != "no_penalty":
        scores = hf.RepetitionPenaltyLogitsProcessor(params.repetition_penalty)(input_ids, scores)
    if params.temperature == 0.0:
        out = np.zeros(raw.shape[0])
        out[int(torch.argmax(scores))] = 1.0
        return out
    temp = hf.TemperatureLogitsWarper(params.temperature)
    steps: list[Callable[[Any, Any], Any]] = [temp]
    if params.top_k > 0:
        steps.append(hf.TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        steps.append(hf.TopPLogitsWarper(params.top_p))
    if params.min_p > 0.0:
        steps.append(hf.MinPLogitsWarper(params.min_p))
    if order == "truncate_before_temperature":
        steps = [*steps[1:], temp]
    for step in steps:
        scores = step(input_ids, scores)
    probs: F64 = torch.softmax(scores, dim=-1)[0].numpy()
    return probs


def nucleus_off_by_one(raw: F32, params: SamplingParams, shift: int) -> F64:
    """Top-p (no top-k / min-p) whose nucleus is ``shift`` tokens longer than it should be."""
    z = raw.astype(np.float64) / params.temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    before = np.concatenate(([0.0], np.cumsum(p[order])[:-1]))
    n_keep = int(np.count_nonzero(before < params.top_p)) + shift
    out = np.zeros_like(p)
    out[order[:n_keep]] = p[order[:n_keep]]
    return out / out.sum()


def tv(a: F64, b: F64) -> float:
    return 0.5 * float(np.abs(a - b).sum())


def tv_threshold(p: F64, n: int, alpha: float = 1e-6) -> float:
    """Bound on the TV distance between ``p`` and the empirical distribution of n draws from it,
    exceeded with probability < alpha: E[TV] <= 0.5 * sum sqrt(p(1-p)/n) (Jensen), and TV is
    (1/n)-Lipschitz in each draw, so McDiarmid adds sqrt(ln(1/alpha) / (2n))."""
    return 0.5 * float(np.sqrt(p * (1.0 - p) / n).sum()) + math.sqrt(math.log(1 / alpha) / (2 * n))


# ------------------------------------------------------------------------- API basics


def test_window_size() -> None:
    v = 50257

    def size(params: SamplingParams, vocab: int = v) -> int:
        return window_size(params, default_window=256, vocab_size=vocab)

    # A few guard entries beyond those used, so ties with the last used entry are visible.
    guard = size(SamplingParams(temperature=0.0)) - 1
    assert 1 <= guard <= 8
    assert size(SamplingParams(temperature=0.0, logprobs=5)) == 5 + guard
    assert size(SamplingParams(top_k=50)) == 50 + guard
    assert size(SamplingParams(top_k=2, logprobs=5)) == 5 + guard
    assert size(SamplingParams(top_p=0.9, logprobs=5)) == 256
    assert size(SamplingParams(min_p=0.1)) == 256
    assert size(SamplingParams(top_k=v)) == v
    assert size(SamplingParams(), 100) == 100


def test_needs_full_row() -> None:
    assert not needs_full_row(SamplingParams(top_p=0.5, min_p=0.1, top_k=3))
    assert needs_full_row(SamplingParams(repetition_penalty=1.2))
    assert needs_full_row(SamplingParams(temperature=0.0, repetition_penalty=0.9))


def test_rejects_bad_u() -> None:
    z = peaky_row(np.random.default_rng(0), 50)
    for u in (-0.1, 1.0, math.nan):
        with pytest.raises(ValueError):
            sample(full_step(z), SamplingParams(), u)


# ----------------------------------------------------------------------------- greedy


def test_greedy_picks_argmax() -> None:
    rng = np.random.default_rng(1)
    params = SamplingParams(temperature=0.0)
    for _ in range(50):
        z = peaky_row(rng, 300)
        expected = int(np.argmax(z))
        k = window_size(params, default_window=64, vocab_size=300)
        for step in (window_step(z, k), full_step(z)):
            got = sample(step, params, float(rng.random()))
            assert got.token_id == expected
            assert got.logprob == pytest.approx(float(z[expected]) - logsumexp(z), abs=1e-9)


def test_greedy_tie_takes_lowest_id_like_torch_argmax() -> None:
    z = np.array([0.0, 1.0, 3.0, 3.0, -1.0, 3.0], dtype=np.float32)
    params = SamplingParams(temperature=0.0)
    assert sample(full_step(z), params, 0.5).token_id == 2
    # A window of 2 full of tied maxima cannot rule out a lower id outside it.
    with pytest.raises(NeedFullRow):
        sample(StepLogits(z[[5, 3]], np.array([5, 3]), logsumexp(z)), params, 0.5)
    # A window that shows the tie group ending inside it can, whatever the server's tie order.
    step = StepLogits(z[[5, 3, 2, 1]], np.array([5, 3, 2, 1]), logsumexp(z))
    assert sample(step, params, 0.5).token_id == 2


def test_greedy_with_repetition_penalty(hf: Any) -> None:
    # Token 4 is the argmax, token 7 a close second; 4 was seen, so a penalty of 1.5 flips them.
    z = np.array([0.5, -2.0, 1.0, -0.5, 3.0, -4.0, 0.0, 2.5], dtype=np.float32)
    params = SamplingParams(temperature=0.0, repetition_penalty=1.5)
    assert sample(full_step(z), params, 0.3, [4]).token_id == 7
    assert sample(full_step(z), params, 0.3, [4, 4, 99]).token_id == 7  # dupes/out-of-vocab
    assert sample(full_step(z), params, 0.3, [1]).token_id == 4
    # Negative logits are multiplied: seen tokens 3 (-0.4) and 2 (-0.45) drop below token 0 ...
    neg = np.array([-0.5, -3.0, -0.45, -0.4, -2.0], dtype=np.float32)
    assert sample(full_step(neg), params, 0.3, [3, 2]).token_id == 0
    for row, seen in ((z, [4]), (z, [1, 7]), (neg, [3, 2]), (neg, [0])):
        expected = int(np.argmax(hf_probs(hf, row, params, seen)))
        assert sample(full_step(row), params, 0.3, seen).token_id == expected
    # ... which the window cannot reproduce. Without seen tokens the penalty is a no-op.
    with pytest.raises(NeedFullRow):
        sample(window_step(z, 2), params, 0.3, [4])
    assert sample(window_step(z, 2), params, 0.3, []).token_id == 4
    # logprob is that of the unpenalised distribution.
    got = sample(full_step(z), params, 0.3, [4])
    assert got.logprob == pytest.approx(float(z[7]) - logsumexp(z), abs=1e-9)


# ------------------------------------------------------- window path == full-row path

AGREEMENT_SETTINGS = {
    "greedy": SamplingParams(temperature=0.0),
    "greedy_logprobs": SamplingParams(temperature=0.0, logprobs=5),
    "plain": SamplingParams(temperature=1.0),
    "plain_hot_logprobs": SamplingParams(temperature=1.5, logprobs=3),
    "top_k": SamplingParams(temperature=0.8, top_k=20),
    "top_k_1": SamplingParams(temperature=1.0, top_k=1),
    "top_p": SamplingParams(temperature=0.9, top_p=0.9),
    "top_p_low": SamplingParams(temperature=1.2, top_p=0.5),
    "min_p": SamplingParams(temperature=1.1, min_p=0.05),
    "top_k_top_p": SamplingParams(temperature=0.7, top_k=40, top_p=0.8),
    "top_p_min_p": SamplingParams(temperature=1.0, top_p=0.95, min_p=0.02),
    "all": SamplingParams(temperature=0.8, top_k=30, top_p=0.9, min_p=0.01, logprobs=2),
}


@pytest.mark.parametrize("name", sorted(AGREEMENT_SETTINGS))
def test_window_path_matches_full_row(name: str) -> None:
    params = AGREEMENT_SETTINGS[name]
    rng = np.random.default_rng(sorted(AGREEMENT_SETTINGS).index(name))
    vocab = 500
    asked = {"peaky": 0, "flat": 0, "some_ties": 0, "tied": 0}
    for row_kind in asked:
        for _ in range(3):
            if row_kind == "peaky":
                raw = peaky_row(rng, vocab)
            elif row_kind == "flat":
                raw = (rng.standard_normal(vocab) * 0.7).astype(np.float32)
            elif row_kind == "some_ties":
                raw = tied_row(rng, vocab, step=1 / 32)
            else:
                raw = tied_row(rng, vocab)
            z = scaled(raw, params.temperature)
            k = window_size(params, default_window=64, vocab_size=vocab)
            full = full_step(z)
            for _ in range(60):
                u = float(rng.random())
                expected = sample(full, params, u)
                # The prefix shortcut of the full path must not change anything.
                assert expected == _sample_full(z, full.logsumexp, params, u, (), prefixes=())
                # An adversarial server: random tie order and random edge-tie members.
                got = try_window(window_step(z, k, rng), params, u)
                if got is None:
                    asked[row_kind] += 1
                else:
                    assert got == expected, (row_kind, u)
    assert min(asked.values()) < 3 * 60  # the window answered for every kind of row
    if name in ("greedy", "greedy_logprobs", "top_k", "top_k_1", "top_k_top_p", "all"):
        # Without ties at the window edge these settings are always decided by the window.
        assert asked["peaky"] == 0 and asked["flat"] == 0


def test_distinct_logits_topk_never_needs_full_row() -> None:
    rng = np.random.default_rng(7)
    for top_k in (1, 5, 50):
        params = SamplingParams(temperature=0.7, top_k=top_k, top_p=0.95, min_p=0.01)
        for _ in range(20):
            z = scaled(peaky_row(rng, 1000), params.temperature)
            k = window_size(params, default_window=64, vocab_size=1000)
            u = float(rng.random())
            assert sample(window_step(z, k), params, u) == sample(full_step(z), params, u)


# ------------------------------------------------------------------ asking for the row


def test_plain_sampling_spills_past_window() -> None:
    z = np.linspace(2.0, -2.0, 400).astype(np.float32)  # flat: 16 tokens hold little mass
    step = window_step(z, 16)
    mass = float(np.exp(step.topk_logits.astype(np.float64) - step.logsumexp).sum())
    params = SamplingParams()
    assert try_window(step, params, mass * 0.5) == sample(full_step(z), params, mass * 0.5)
    for u in (mass * 1.01, 0.5, 0.99):
        with pytest.raises(NeedFullRow):
            sample(step, params, u)
        assert sample(full_step(z), params, u).token_id >= 16  # beyond the window


def test_top_p_spills_when_window_mass_is_short() -> None:
    z = np.linspace(2.0, -2.0, 400).astype(np.float32)
    step = window_step(z, 16)
    params = SamplingParams(top_p=0.9)
    for u in (0.05, 0.5, 0.95):
        with pytest.raises(NeedFullRow):
            sample(step, params, u)
    # With the window's mass just short of top_p, the kept total is pinned down to a narrow
    # interval and most draws are still decided by the window, identically to the full row.
    z = peaky_row(np.random.default_rng(0), 400)
    step = window_step(z, 16)
    mass = float(np.exp(step.topk_logits.astype(np.float64) - step.logsumexp).sum())
    assert mass < 0.9
    params = SamplingParams(top_p=mass + 1e-4)
    decided = 0
    for u in np.linspace(0.0, 0.999, 200):
        got = try_window(step, params, float(u))
        if got is not None:
            decided += 1
            assert got == sample(full_step(z), params, float(u))
    assert decided > 150


def test_top_p_cut_exactly_at_the_window_edge() -> None:
    """HF removes a token when the mass before it is >= top_p. With top_p equal to the window's
    cumulative mass, the cut is the window's last entry: the full row keeps no token beyond it,
    and the window path, which cannot vouch for that entry's identity, asks for the row when
    the draw lands on it."""
    z = np.array([3.0, 2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0], dtype=np.float32)
    step = window_step(z, 4)
    cum = np.cumsum(np.exp(step.topk_logits.astype(np.float64) - step.logsumexp))
    params = SamplingParams(top_p=float(cum[-1]))
    full = full_step(z)
    last_start = cum[-2] / cum[-1]
    for u in np.linspace(0.0, 0.999, 300):
        expected = sample(full, params, float(u))
        assert expected.token_id in (0, 1, 2, 3)
        got = try_window(step, params, float(u))
        if u < last_start - 1e-9:
            assert got == expected
        elif u > last_start + 1e-9:
            assert got is None and expected.token_id == 3
    # One ulp above: the cut moves beyond the window (keeping token 4 too).
    params = SamplingParams(top_p=float(np.nextafter(cum[-1], 1.0)))
    assert sample(full, params, 0.999).token_id == 4
    assert try_window(step, params, 0.999) is None


def test_min_p_spills_when_cut_is_outside_window() -> None:
    z = np.linspace(2.0, -2.0, 400).astype(np.float32)
    step = window_step(z, 16)
    with pytest.raises(NeedFullRow):
        sample(step, SamplingParams(min_p=0.01), 0.5)  # threshold far below the window
    params = SamplingParams(min_p=0.97)  # threshold inside the window: exact
    for u in np.linspace(0.0, 0.999, 50):
        assert sample(step, params, float(u)) == sample(full_step(z), params, float(u))


def test_top_k_tie_at_kth_value(hf: Any) -> None:
    """transformers keeps every token tied with the k-th logit, even beyond k."""
    z = np.array([1.0, 3.0, 2.0, 0.0, 2.0, 2.0, -1.0], dtype=np.float32)  # top-2: 1, then 2/4/5
    params = SamplingParams(top_k=2)
    full = full_step(z)
    grid = (np.arange(20000) + 0.5) / 20000
    counts = np.bincount([sample(full, params, float(u)).token_id for u in grid], minlength=7)
    assert np.abs(counts / grid.size - hf_probs(hf, z, params)).max() < 2e-4
    assert counts[4] > 0 and counts[5] > 0
    # A window of 3 ends in the tie group: it cannot know how many ties lie outside.
    with pytest.raises(NeedFullRow):
        sample(window_step(z, 3), params, 0.1)
    # window_size's guard entries show the tie group ending inside the window.
    step = window_step(z, window_size(params, default_window=4, vocab_size=7))
    for u in grid[::97]:
        assert sample(step, params, float(u)) == sample(full, params, float(u))


def test_logprobs_tied_at_window_edge_need_full_row() -> None:
    z = np.array([4.0, 3.0, 2.0, 2.0, 2.0, 1.0], dtype=np.float32)
    params = SamplingParams(top_k=1, logprobs=3)
    step = window_step(z, 4)  # the third alternative may be any of ids 2, 3, 4 or one outside
    with pytest.raises(NeedFullRow):
        sample(step, params, 0.5)
    got = sample(full_step(z), params, 0.5)
    assert [i for i, _ in got.top_logprobs] == [0, 1, 2]


# --------------------------------------------------------------- logprob reporting


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.0, logprobs=5),
        SamplingParams(temperature=0.7, top_k=10, logprobs=3),
        SamplingParams(temperature=1.3, top_p=0.8, logprobs=5),
        SamplingParams(temperature=0.9, repetition_penalty=1.3, logprobs=2),
    ],
)
def test_logprobs_equal_log_softmax_of_scaled_row(params: SamplingParams) -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(11)
    for _ in range(20):
        raw = peaky_row(rng, 200)
        z = scaled(raw, params.temperature)
        ref = torch.log_softmax(torch.tensor(z, dtype=torch.float64), dim=-1).numpy()
        top = np.argsort(-ref, kind="stable")[: params.logprobs]
        seen = list(rng.choice(200, size=5, replace=False))
        u = float(rng.random())
        results = [sample(full_step(z), params, u, seen)]
        k = window_size(params, default_window=32, vocab_size=200)
        window = try_window(window_step(z, k), params, u, seen)
        if window is not None:
            results.append(window)
        for got in results:
            assert got.logprob == pytest.approx(ref[got.token_id], abs=1e-6)
            assert [i for i, _ in got.top_logprobs] == top.tolist()
            assert [lp for _, lp in got.top_logprobs] == pytest.approx(ref[top], abs=1e-6)


# --------------------------------------------------- distribution vs transformers


def _stat_row() -> F32:
    """A fixed, moderately peaky row: a few favourites over a long tail."""
    rng = np.random.default_rng(2024)
    raw = rng.standard_normal(120) * 1.2
    raw[rng.choice(120, size=6, replace=False)] += np.array([2.5, 2.0, 1.8, 1.5, 1.0, 0.5])
    return raw.astype(np.float32)


def _off_by_one_top_p(raw: F32, temperature: float) -> float:
    """A top_p whose nucleus ends on a heavy token, halfway through that token's mass."""
    z = raw.astype(np.float64) / temperature
    p = np.sort(np.exp(z - z.max()))[::-1]
    p /= p.sum()
    cum = np.cumsum(p)
    j = int(np.argmax(p[3:10] / cum[3:10])) + 3  # the heaviest boundary, nucleus of 4-10
    return float((cum[j - 1] + cum[j]) / 2)


STAT_ROW = _stat_row()
STAT_SEEN = [int(i) for i in np.argsort(-STAT_ROW)[:3]]
# (params, wrong variants that the test must be able to tell apart)
STAT_CASES: dict[str, tuple[SamplingParams, tuple[str, ...]]] = {
    "plain_hot": (SamplingParams(temperature=1.3), ()),
    "top_p_cold": (SamplingParams(temperature=0.6, top_p=0.8), ("truncate_before_temperature",)),
    "top_p_hot": (SamplingParams(temperature=1.8, top_p=0.5), ("truncate_before_temperature",)),
    "top_p_boundary": (
        SamplingParams(temperature=1.0, top_p=_off_by_one_top_p(STAT_ROW, 1.0)),
        ("nucleus-1", "nucleus+1"),
    ),
    "min_p_hot": (SamplingParams(temperature=1.5, min_p=0.1), ("truncate_before_temperature",)),
    "top_k_top_p_min_p": (
        SamplingParams(temperature=1.5, top_k=15, top_p=0.8, min_p=0.05),
        ("truncate_before_temperature",),
    ),
    "penalty_top_p": (
        SamplingParams(temperature=0.9, top_p=0.9, repetition_penalty=1.6),
        ("no_penalty",),
    ),
}


@pytest.mark.parametrize("name", list(STAT_CASES))
def test_distribution_matches_transformers(hf: Any, name: str) -> None:
    params, wrong_variants = STAT_CASES[name]
    raw = STAT_ROW
    seen = STAT_SEEN if params.repetition_penalty != 1.0 else []
    exact = hf_probs(hf, raw, params, seen)
    vocab = raw.shape[0]
    z = scaled(raw, params.temperature)
    k = window_size(params, default_window=16, vocab_size=vocab)
    window = window_step(z, k)
    full = full_step(z)

    def draw(u: float) -> int:
        if not needs_full_row(params):
            got = try_window(window, params, u, seen)
            if got is not None:
                return int(got.token_id)
        return sample(full, params, u, seen).token_id

    # 1. Exact check: a stratified grid of u gives each token a frequency within 1/n of its
    #    probability under inverse-CDF sampling.
    n_grid = 2000
    grid = (np.arange(n_grid) + 0.5) / n_grid
    freq = np.bincount([draw(float(u)) for u in grid], minlength=vocab) / n_grid
    assert np.abs(freq - exact).max() <= 1.0 / n_grid + 1e-6

    # 2. Statistical check with the caller's seeded generator.
    n = 20000
    gen = np.random.default_rng(99)
    counts = np.bincount([draw(float(gen.random())) for _ in range(n)], minlength=vocab)
    threshold = tv_threshold(exact, n)
    assert tv(counts / n, exact) < threshold

    # 3. Power: the wrong pipelines are far from the exact distribution, and draws from them fail
    #    the same check.
    for variant in wrong_variants:
        if variant.startswith("nucleus"):
            wrong = nucleus_off_by_one(raw, params, 1 if variant.endswith("+1") else -1)
        else:
            wrong = hf_probs(hf, raw, params, seen, order=variant)
        assert tv(wrong, exact) > 2 * threshold, variant
        wrong_counts = np.bincount(gen.choice(vocab, size=n, p=wrong), minlength=vocab)
        assert tv(wrong_counts / n, exact) > threshold, variant


def test_nucleus_helper_matches_transformers(hf: Any) -> None:
    params = STAT_CASES["top_p_boundary"][0]
    assert np.allclose(nucleus_off_by_one(STAT_ROW, params, 0), hf_probs(hf, STAT_ROW, params))


# --------------------------------------------------------------------- determinism


def test_same_u_sequence_same_tokens_whatever_the_path() -> None:
    params = SamplingParams(temperature=0.9, top_p=0.92, min_p=0.01)
    rows = [scaled(peaky_row(np.random.default_rng(i), 300), 0.9) for i in range(60)]

    def run(seed: int, *, window_first: bool) -> tuple[list[int], int]:
        gen = np.random.default_rng(seed)
        tokens, full_rows = [], 0
        for z in rows:
            u = float(gen.random())  # exactly one draw per step, whatever happens
            if window_first:
                got, used_full = gateway_sample(z, params, u, default_window=16)
            else:
                got, used_full = sample(full_step(z), params, u), True
            tokens.append(got.token_id)
            full_rows += used_full
        return tokens, full_rows

    first, full_rows = run(1234, window_first=True)
    assert run(1234, window_first=True)[0] == first
    assert run(1234, window_first=False)[0] == first
    assert 0 < full_rows < len(rows)  # both paths were exercised
    assert run(4321, window_first=True)[0] != first


@pytest.mark.parametrize(
    "params",
    [SamplingParams(temperature=0.7, top_p=0.9), SamplingParams(temperature=1.0, top_k=5), SamplingParams(0.0)],
    ids=["top_p", "top_k", "greedy"],
)
def test_banned_tokens_follow_transformers_min_new_tokens(hf: Any, params: SamplingParams) -> None:
    """min_tokens (vLLM) / MinNewTokensLengthLogitsProcessor (transformers): the end-of-text and
    stop ids get logit -inf before the other processors; the rest renormalises."""
    import torch

    raw = STAT_ROW
    vocab = raw.shape[0]
    z = scaled(raw, params.temperature)
    banned = [int(i) for i in np.argsort(-raw, kind="stable")[:2]]  # the two likeliest tokens
    scores = torch.tensor(raw, dtype=torch.float64)[None, :]
    masked = hf.MinNewTokensLengthLogitsProcessor(1, 3, eos_token_id=banned)(torch.tensor([[0]]), scores)
    exact = hf_probs(hf, masked[0].numpy().astype(np.float32), params)
    full = full_step(z)
    with pytest.raises(NeedFullRow):  # a window cannot know the banned tokens' share of the normaliser
        sample(window_step(z, 16), params, 0.5, (), banned)
    n_grid = 2000
    grid = (np.arange(n_grid) + 0.5) / n_grid
    picks = [sample(full, params, float(u), (), banned) for u in grid]
    freq = np.bincount([p.token_id for p in picks], minlength=vocab) / n_grid
    assert np.abs(freq - exact).max() <= 1.0 / n_grid + 1e-6
    assert not set(banned) & {p.token_id for p in picks}
    # Reported logprobs stay those of the unmodified (scaled) distribution.
    first = picks[0]
    assert first.logprob == pytest.approx(float(z[first.token_id] - full.logsumexp), abs=1e-9)
    # Power: without the ban the same grid lands on the banned tokens.
    unbanned = np.bincount([sample(full, params, float(u)).token_id for u in grid], minlength=vocab) / n_grid
    assert tv(unbanned, exact) > 0.05
