"""Unit tests for frontend.sampling.batched: the vectorized sampler equals the per-row one.

The per-row :func:`frontend.sampling.sample` is the reference. For every row the batch decides,
token, logprob (bitwise) and top_logprobs must be exactly what ``sample`` returns; every row that
``sample`` decides from the window must be decided by the batch too (apart from the declines the
module documents: repetition penalty, logsumexp == 0, malformed rows).
"""

from __future__ import annotations

import dataclasses
import math
import struct
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

from frontend.sampling import (
    BatchParams,
    BatchSampled,
    NeedFullRow,
    Sampled,
    SamplingParams,
    StepLogits,
    batched,
    sample,
    sample_window_batch,
)

pytestmark = pytest.mark.unit

F32 = NDArray[np.float32]
F64 = NDArray[np.float64]
I64 = NDArray[np.int64]


# ----------------------------------------------------------------------------- helpers


@dataclasses.dataclass
class Batch:
    logits: F32
    ids: I64
    lse: NDArray[np.float32]
    params: list[SamplingParams]
    u: F64


def bits(x: float) -> bytes:
    return struct.pack("<d", x)


def same(a: Sampled, b: Sampled) -> bool:
    """Exact equality, floats compared bit for bit."""
    return (
        a.token_id == b.token_id
        and bits(a.logprob) == bits(b.logprob)
        and len(a.top_logprobs) == len(b.top_logprobs)
        and all(
            ia == ib and type(ia) is int and bits(la) == bits(lb)
            for (ia, la), (ib, lb) in zip(a.top_logprobs, b.top_logprobs, strict=True)
        )
    )


def reference(batch: Batch, i: int) -> Sampled | None:
    step = StepLogits(batch.logits[i], batch.ids[i], float(batch.lse[i]))
    try:
        return sample(step, batch.params[i], float(batch.u[i]))
    except (NeedFullRow, ValueError):
        return None


def compare(batch: Batch, out: BatchSampled) -> tuple[int, list[int], list[int]]:
    """-> (rows decided by both, rows decided differently, rows only the per-row path decided)."""
    agree, wrong, missed = 0, [], []
    for i in range(len(batch.params)):
        ref = reference(batch, i)
        if out.decided[i]:
            if ref is not None and same(out.sampled(i), ref):
                agree += 1
            else:
                wrong.append(i)
        elif ref is not None:
            missed.append(i)
    return agree, wrong, missed


def run(batch: Batch) -> BatchSampled:
    return sample_window_batch(batch.logits, batch.ids, batch.lse, BatchParams.from_params(batch.params), batch.u)


def make_batch(
    rng: np.random.Generator,
    params: list[SamplingParams],
    *,
    k: int,
    vocab: int = 400,
    quantum: float | None = None,
    fp16: bool = False,
    shuffle: bool = False,
    tie_rows: float = 0.0,
) -> Batch:
    """Server windows for random rows: scaled by each row's temperature in float32, optionally
    fp16- or coarsely quantized (ties, also at the window edge; all rows or a ``tie_rows``
    fraction), top-K taken by an adversarial server (ties in random order, a random part of an
    edge tie group), optionally shuffled."""
    n = len(params)
    raw = rng.standard_normal((n, vocab)) * rng.uniform(0.5, 3.0, (n, 1))
    hot = rng.integers(0, vocab, (n, 4))
    np.add.at(raw, (np.arange(n)[:, None], hot), rng.uniform(0.0, 6.0, (n, 4)))
    temps = np.array([p.temperature if p.temperature > 0 else 1.0 for p in params], dtype=np.float32)
    z = (raw.astype(np.float32) / temps[:, None]).astype(np.float32)
    if fp16:
        z = z.astype(np.float16).astype(np.float32)
    if quantum is not None:
        z = (np.round(z / quantum) * quantum).astype(np.float32)
    if tie_rows > 0.0:  # a few rows with ties among float32 ones
        some = rng.random(n) < tie_rows
        z[some] = (np.round(z[some] * 4.0) / 4.0).astype(np.float32)
    z64 = z.astype(np.float64)
    top = z64.max(axis=1, keepdims=True)
    lse = (top[:, 0] + np.log(np.exp(z64 - top).sum(axis=1))).astype(np.float32)
    order = np.lexsort((rng.random(z.shape), -z), axis=1)[:, :k]  # random tie order
    if shuffle:
        order = rng.permuted(order, axis=1)
    logits = np.take_along_axis(z, order, axis=1)
    u = rng.random(n)
    u[rng.random(n) < 0.04] = 0.0
    u[rng.random(n) < 0.04] = np.nextafter(1.0, 0.0)
    u[rng.random(n) < 0.04] = 1.0 - 1e-9
    return Batch(np.ascontiguousarray(logits), order.astype(np.int64), lse, params, u)


def random_params(rng: np.random.Generator, n: int, *, penalty_rate: float = 0.0) -> list[SamplingParams]:
    """Mixed settings per row; some objects repeat (as in the scheduler), some are equal copies."""
    pool: list[SamplingParams] = []
    for _ in range(n):
        if pool and rng.random() < 0.3:
            pool.append(pool[int(rng.integers(len(pool)))])
            continue
        greedy = rng.random() < 0.2
        kw: dict[str, Any] = {
            "temperature": 0.0 if greedy else float(rng.choice([0.3, 0.7, 0.8, 1.0, 1.5])),
            "logprobs": int(rng.integers(0, 6)) if rng.random() < 0.4 else 0,
        }
        if not greedy:
            if rng.random() < 0.5:
                kw["top_k"] = int(rng.choice([1, 2, 5, 10, 20, 50]))
            if rng.random() < 0.5:
                kw["top_p"] = float(rng.choice([0.3, 0.8, 0.9, 0.95, 0.99]))
            if rng.random() < 0.3:
                kw["min_p"] = float(rng.choice([0.01, 0.05, 0.2, 0.9, 1.0]))
        if rng.random() < penalty_rate:
            kw["repetition_penalty"] = 1.2
        pool.append(SamplingParams(**kw))
    return pool


def batches(seed: int, count: int) -> Iterator[Batch]:
    rng = np.random.default_rng(seed)
    for b in range(count):
        params = random_params(rng, 96)
        k = int(rng.choice([1, 2, 3, 6, 12, 24, 54, 64]))
        kind = b % 5  # float32, fp16, coarse ties, shuffled windows, a few tied rows
        yield make_batch(
            rng,
            params,
            k=k,
            fp16=kind == 1,
            quantum=float(rng.choice([0.125, 0.25, 0.5])) if kind == 2 else None,
            shuffle=kind == 3 or (kind != 4 and rng.random() < 0.15),
            tie_rows=0.1 if kind == 4 else 0.0,
        )


# ----------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_batch_equals_per_row_sampler(seed: int) -> None:
    agree = 0
    for batch in batches(seed, 24):
        out = run(batch)
        ok, wrong, missed = compare(batch, out)
        assert not wrong, [(i, batch.params[i], out.sampled(i), reference(batch, i)) for i in wrong[:3]]
        # Every row the per-row window path decides is decided here too.
        assert not missed, [(i, batch.params[i]) for i in missed[:3]]
        agree += ok
    assert agree > 0.35 * 24 * 96  # the comparison is not vacuous


FAMILIES: dict[str, list[SamplingParams]] = {
    "greedy": [SamplingParams(temperature=0.0)],
    "greedy_logprobs": [SamplingParams(temperature=0.0, logprobs=n) for n in range(1, 6)],
    "plain": [SamplingParams(temperature=t) for t in (0.7, 1.0)],
    "top_k": [SamplingParams(temperature=0.8, top_k=k) for k in (1, 2, 10, 50)],
    "top_p": [SamplingParams(temperature=0.8, top_p=p) for p in (0.5, 0.9, 0.95)],
    "top_k_top_p": [SamplingParams(temperature=0.8, top_k=50, top_p=p) for p in (0.5, 0.9, 0.95)],
    "min_p": [SamplingParams(temperature=1.0, min_p=m) for m in (0.05, 0.1, 0.3)],
    "uniform_logprobs": [SamplingParams(temperature=0.8, top_k=50, top_p=0.9, logprobs=3)],
    "everything": [SamplingParams(temperature=0.9, top_k=20, top_p=0.9, min_p=0.05, logprobs=5)],
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_common_settings_are_all_decided(family: str) -> None:
    """Per family: no wrong row, no row left to the per-row path that it decides, and plenty of
    decided rows in float32, fp16 and coarsely quantized windows (where ties straddling the
    window edge also stop the per-row path, so fewer are decidable at all)."""
    rng = np.random.default_rng(zlib.crc32(family.encode()))
    choices = FAMILIES[family]
    for fp16, quantum, least in ((False, None, 0.4), (True, None, 0.4), (False, 0.25, 0.2)):
        params = [choices[int(i)] for i in rng.integers(0, len(choices), 128)]
        k = 54 if any(p.top_k == 50 for p in params) else 64
        batch = make_batch(rng, params, k=k, vocab=1000, fp16=fp16, quantum=quantum)
        ok, wrong, missed = compare(batch, run(batch))
        assert not wrong
        assert not missed
        assert ok >= least * len(params), (fp16, quantum, ok)


def test_declined_rows_are_left_to_the_per_row_path() -> None:
    """Documented declines: repetition penalty, logsumexp == 0, and malformed inputs."""
    rng = np.random.default_rng(7)
    params = random_params(rng, 64)
    batch = make_batch(rng, params, k=16)
    batch.params[0] = SamplingParams(repetition_penalty=1.3)
    batch.params[1] = SamplingParams(temperature=0.0, repetition_penalty=0.8)
    for i in (2, 3, 4, 5):
        batch.params[i] = SamplingParams(temperature=0.0)
    batch.lse[2] = 0.0
    batch.logits[3, 0] = np.nan  # (this also sends the whole batch through the general sort)
    batch.logits[4, 0] = np.inf
    batch.ids[5, 0] = -1  # not a key the sort can hold
    batch.u[6] = 1.0  # sample() raises ValueError for these two
    batch.u[7] = -0.5
    out = run(batch)
    assert not out.decided[:8].any()
    assert out.token_ids[:8].tolist() == [-1] * 8
    assert np.isnan(out.logprobs[:8]).all()
    assert out.top_logprobs[:8] == [()] * 8
    with pytest.raises(ValueError):
        out.sampled(0)
    # The rest of the batch is unaffected; only these rows are left that sample() decides.
    _, wrong, missed = compare(batch, out)
    assert not wrong
    assert set(missed) <= {0, 1, 2, 3, 4, 5}


def test_odd_ids_in_rows_that_need_no_sort() -> None:
    """A row already in final order is used as it is, whatever its ids (like sample())."""
    rng = np.random.default_rng(8)
    batch = make_batch(rng, [SamplingParams(temperature=0.0, logprobs=2)] * 4, k=8)
    assert (batch.logits[:, :-1] > batch.logits[:, 1:]).all()
    batch.ids[1, 0] = -7
    out = run(batch)
    assert out.decided.all()
    assert out.token_ids[1] == -7 and out.top_logprobs[1][0][0] == -7
    assert compare(batch, out)[0] == 4


def test_vanishing_mass_takes_the_rounding_fallback() -> None:
    """When u * total rounds up to the kept mass (subnormal or zero masses), the draw falls back
    to the last candidate of positive mass, in both paths."""
    rng = np.random.default_rng(12)
    settings = [
        SamplingParams(top_k=3),
        SamplingParams(top_p=0.5),
        SamplingParams(min_p=0.1),
        SamplingParams(),
        SamplingParams(top_k=5, top_p=0.7, logprobs=2),
    ]
    params = [p for p in settings for _ in range(4 * 4)]
    batch = make_batch(rng, params, k=10, quantum=0.5)
    offsets = np.tile(np.repeat([700.0, 740.0, 744.5, 800.0], 4), len(settings))
    batch.lse[:] = (batch.logits[:, 0] + offsets).astype(np.float32)
    batch.u[:] = np.tile([0.0, 0.5, 0.9, np.nextafter(1.0, 0.0)], len(params) // 4)
    out = run(batch)
    ok, wrong, missed = compare(batch, out)
    assert not wrong and not missed
    zero_mass = [i for i in range(len(params)) if offsets[i] == 800.0 and params[i].top_k == 3]
    assert out.decided[zero_mass].all() and ok >= len(zero_mass)


def test_exp_and_prefix_sums_match_per_row_bitwise() -> None:
    """The numerics the contract rests on: 2-D exp and cumsum(axis=1) equal the 1-D per-row ones."""
    rng = np.random.default_rng(3)
    for k in (1, 3, 7, 8, 9, 16, 17, 54, 64, 256):
        z = (rng.standard_normal((300, k)) * 4).astype(np.float32)
        lse = rng.standard_normal(300) * 3 + 5
        p = np.empty((300, k))
        np.subtract(z, lse[:, None], out=p)
        np.exp(p, out=p)
        cum = np.cumsum(p, axis=1, out=np.empty_like(p))
        for i in range(300):
            row_p = np.exp(z[i].astype(np.float64) - float(lse[i]))
            assert row_p.tobytes() == p[i].tobytes()
            assert row_p.cumsum().tobytes() == cum[i].tobytes()


# ------------------------------------------------------------------------ teeth


def crafted_order_row() -> Batch:
    """Masses 0.5, 0.3, 0.2 (+ a tiny guard): top_k=2 then top_p=0.6 keeps only token 10 (0.5/0.8
    >= 0.6); top-p first would keep tokens 10 and 11. With u = 0.9 the two orders disagree."""
    p = np.array([0.5, 0.3, 0.2 - 1e-6, 1e-6])
    logits = np.log(p).astype(np.float32)[None, :]
    ids = np.array([[10, 11, 12, 13]], dtype=np.int64)
    lse = np.array([math.log(float(np.exp(logits.astype(np.float64)).sum()))], dtype=np.float32)
    params = [SamplingParams(temperature=1.0, top_k=2, top_p=0.6)]
    return Batch(logits, ids, lse, params, np.array([0.9]))


def swapped_truncate(real: Callable[..., Any]) -> Callable[..., Any]:
    """A deliberately wrong stage order: top-p / min-p on the whole distribution, then top-k."""

    def wrong(z: F32, cum: F64, sub: Any, n_trusted: I64) -> Any:
        no_k = dataclasses.replace(sub, top_k=np.zeros_like(sub.top_k))
        only_k = dataclasses.replace(sub, top_p=np.ones_like(sub.top_p), min_p=np.zeros_like(sub.min_p))
        cut, top_p_open, min_p_open, good = real(z, cum, no_k, n_trusted)
        cut_k, _, _, good_k = real(z, cum, only_k, n_trusted)
        both = (cut >= 0) & (cut_k >= 0)
        cut = np.where(both, np.minimum(cut, cut_k), np.maximum(cut, cut_k))
        k_on = cut_k >= 0
        return cut, top_p_open & ~k_on, min_p_open & ~k_on, good & good_k

    return wrong


def test_stage_order_matters_and_the_comparison_sees_it(monkeypatch: pytest.MonkeyPatch) -> None:
    batch = crafted_order_row()
    ref = reference(batch, 0)
    assert ref is not None and ref.token_id == 10
    # top-p alone (what "top-p before top-k" amounts to on this row) picks another token.
    alone = sample(StepLogits(batch.logits[0], batch.ids[0], float(batch.lse[0])), SamplingParams(top_p=0.6), 0.9)
    assert alone.token_id == 11
    out = run(batch)
    assert out.decided[0] and same(out.sampled(0), ref)

    monkeypatch.setattr(batched, "_truncate", swapped_truncate(batched._truncate))
    out = run(batch)
    assert out.decided[0] and out.token_ids[0] == 11
    assert compare(batch, out)[1] == [0]
    # And on random batches the equality test flags the wrong order.
    wrong_rows = sum(len(compare(b, run(b))[1]) for b in batches(11, 6))
    assert wrong_rows > 0


def test_tie_order_matters_and_the_comparison_sees_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Trusting the server's tie order (no re-sort by id) is caught on fp16 windows."""

    def no_sort(logits: F32, ids: I64) -> tuple[F32, I64, NDArray[np.bool_]]:
        return logits, ids, np.isfinite(logits[:, 0])

    monkeypatch.setattr(batched, "_sort_rows", no_sort)
    rng = np.random.default_rng(5)
    params = [SamplingParams(temperature=0.0, logprobs=5)] * 128
    batch = make_batch(rng, params, k=12, quantum=0.5)
    assert len(compare(batch, run(batch))[1]) > 0


# ------------------------------------------------------------------- API details


def test_batch_params_from_params() -> None:
    a = SamplingParams(temperature=0.7, top_k=40, top_p=0.9, min_p=0.05, repetition_penalty=1.1, logprobs=2)
    b = SamplingParams(temperature=0.0, logprobs=-3, top_k=10**30)
    c = SamplingParams(min_p=1.5)
    bp = BatchParams.from_params([a, b, a, c])
    assert len(bp) == 4
    assert bp.temperature.tolist() == [0.7, 0.0, 0.7, 1.0]
    assert bp.top_k.tolist() == [40, 2**31, 40, 0]
    assert bp.top_p.tolist() == [0.9, 1.0, 0.9, 1.0]
    assert bp.min_p.tolist() == [0.05, 0.0, 0.05, 1.5]
    assert bp.logprobs.tolist() == [2, 0, 2, 0]
    assert bp.repetition_penalty.tolist() == [1.1, 1.0, 1.1, 1.0]
    assert bits(float(bp.log_min_p[0])) == bits(math.log(0.05))
    assert bp.log_min_p[1] == 0.0 and bp.log_min_p[3] == 0.0
    # Again (cached rows), and as arrays without the log given (computed the same way).
    again = BatchParams.from_params([a, b, a, c])
    assert again.log_min_p.tobytes() == bp.log_min_p.tobytes()
    direct = BatchParams(bp.temperature, bp.top_k, bp.top_p, bp.min_p, bp.logprobs, bp.repetition_penalty)
    assert direct.log_min_p.tobytes() == bp.log_min_p.tobytes()
    assert len(BatchParams.from_params([])) == 0
    with pytest.raises(ValueError):
        BatchParams(bp.temperature, bp.top_k[:2], bp.top_p, bp.min_p, bp.logprobs, bp.repetition_penalty)


def test_shapes_and_dtypes() -> None:
    rng = np.random.default_rng(9)
    params = [SamplingParams(temperature=0.8, top_k=5, logprobs=2)] * 8
    batch = make_batch(rng, params, k=12)
    bp = BatchParams.from_params(params)
    # int32 ids are accepted as they are.
    out = sample_window_batch(batch.logits, batch.ids.astype(np.int32), batch.lse, bp, batch.u)
    assert not compare(batch, out)[1]
    assert out.token_ids.dtype == np.int64 and out.logprobs.dtype == np.float64
    empty = sample_window_batch(
        np.zeros((0, 4), np.float32), np.zeros((0, 4), np.int64), [], BatchParams.from_params([]), []
    )
    assert empty.token_ids.shape == (0,) and empty.top_logprobs == []
    with pytest.raises(ValueError):
        sample_window_batch(batch.logits.astype(np.float64), batch.ids, batch.lse, bp, batch.u)
    with pytest.raises(ValueError):
        sample_window_batch(batch.logits, batch.ids[:, :3], batch.lse, bp, batch.u)
    with pytest.raises(ValueError):
        sample_window_batch(batch.logits, batch.ids, batch.lse[:3], bp, batch.u)
    with pytest.raises(ValueError):
        sample_window_batch(batch.logits[:, :0], batch.ids[:, :0], batch.lse, bp, batch.u)


def test_a_subset_of_batch_params_is_the_params_of_those_rows() -> None:
    params = [
        SamplingParams(temperature=0.7, top_p=0.9),
        SamplingParams(temperature=0.0, logprobs=2),
        SamplingParams(temperature=1.0, top_k=40, min_p=0.05, repetition_penalty=1.2),
    ]
    index = np.array([2, 0, 2])
    got, expected = BatchParams.from_params(params).subset(index), BatchParams.from_params([params[i] for i in index])
    for name in ("temperature", "top_k", "top_p", "min_p", "logprobs", "repetition_penalty", "log_min_p"):
        np.testing.assert_array_equal(getattr(got, name), getattr(expected, name), err_msg=name)
