"""The adjusted rows' fast paths against their references: the incremental AdjustmentTracker
against logit_adjustment rebuilt from all tokens, and the vectorized sample_adjusted_batch against
the per-row sampler (same token and bitwise the same logprob on every row it decides)."""

from __future__ import annotations

import numpy as np
import pytest

from frontend.sampling import (
    AdjustmentTracker,
    NeedFullRow,
    SamplingParams,
    StepLogits,
    logit_adjustment,
    sample,
    sample_adjusted_batch,
    window_size,
)
from tests.unit.test_sampling import logsumexp, peaky_row, scaled, server_extras, tied_row, window_step

pytestmark = pytest.mark.unit

VOCAB = 400
SETTINGS = [
    SamplingParams(temperature=0.0, presence_penalty=1.5),
    SamplingParams(temperature=0.8, top_k=20, frequency_penalty=0.7, repetition_penalty=1.2),
    SamplingParams(temperature=1.1, top_p=0.9, logit_bias=((3, 5.0), (7, -100.0))),
    SamplingParams(temperature=0.9, min_p=0.05, presence_penalty=-1.0, frequency_penalty=0.3),
    SamplingParams(temperature=0.7, top_k=30, top_p=0.8, repetition_penalty=1.5, logit_bias=((11, 2.0),)),
    SamplingParams(temperature=1.0, repetition_penalty=0.8),
    SamplingParams(temperature=0.8, top_k=10, logprobs=2, presence_penalty=0.5),
]


@pytest.mark.parametrize("params", SETTINGS)
def test_tracker_equals_a_rebuild_after_every_token(params: SamplingParams) -> None:
    rng = np.random.default_rng(3)
    prompt = rng.integers(0, 50, 12).tolist()
    tracker = AdjustmentTracker(params, prompt, banned_ids=(49, 7), min_tokens=5, vocab_size=VOCAB)
    outputs: list[int] = []
    for _ in range(40):
        expected = logit_adjustment(
            params,
            prompt_ids=prompt,
            output_ids=outputs,
            banned_ids=(49, 7) if len(outputs) < 5 else (),
            vocab_size=VOCAB,
        )
        got = tracker.current()
        if expected is None:
            assert got is None
        else:
            assert got is not None
            for name in ("ids", "bias", "repeated", "counts", "banned"):
                assert getattr(got, name).tolist() == getattr(expected, name).tolist(), name
        before = None if got is None else got.counts.copy()
        token = int(rng.integers(0, 60))
        outputs.append(token)
        tracker.append(token)
        if got is not None and before is not None:
            assert got.counts.tolist() == before.tolist()  # a returned adjustment never changes


Row = tuple[np.ndarray, SamplingParams, object, StepLogits]


def _rows(rng: np.random.Generator, n: int, masked: bool) -> list[Row]:
    out = []
    for i in range(n):
        params = SETTINGS[i % len(SETTINGS)]
        raw = tied_row(rng, VOCAB, step=1 / 16) if i % 5 == 4 else peaky_row(rng, VOCAB)
        z = scaled(raw, params.temperature)
        hot = np.argsort(-z, kind="stable")[:8]
        prompt = rng.choice(hot, size=3).tolist() + rng.integers(0, VOCAB, 5).tolist()
        output = rng.choice(hot, size=4).tolist()
        banned = (int(hot[0]),) if i % 3 == 0 else ()
        adjustment = logit_adjustment(params, prompt_ids=prompt, output_ids=output, banned_ids=banned, vocab_size=VOCAB)
        assert adjustment is not None
        k = window_size(params, default_window=24, vocab_size=VOCAB)
        out.append((z, params, adjustment, window_step(z, k, adjustment=adjustment, masked=masked)))
    return out


@pytest.mark.parametrize("masked", [True, False], ids=["window_of_the_rest", "window_of_all"])
def test_batch_decides_as_the_per_row_sampler(masked: bool) -> None:
    rng = np.random.default_rng(17 if masked else 18)
    for _ in range(6):
        rows = _rows(rng, 60, masked)
        k = max(step.topk_ids.shape[0] for *_, step in rows)
        n = len(rows)
        # Pad every window to the batch's K with its own last entry (the server sends one K per step).
        topk = np.zeros((n, k), dtype=np.float32)
        ids = np.zeros((n, k), dtype=np.int64)
        width = max(a.size for _, _, a, _ in rows)  # type: ignore[attr-defined]
        extra = np.zeros((n, width), dtype=np.float32)
        rest = np.zeros(n, dtype=np.float32)
        lse = np.zeros(n, dtype=np.float32)
        for r, (z, params, adjustment, step) in enumerate(rows):
            kk = window_size(params, default_window=24, vocab_size=VOCAB)
            full = window_step(z, k, adjustment=adjustment, masked=masked) if kk < k else step
            topk[r], ids[r] = full.topk_logits, full.topk_ids
            e, rest_r = server_extras(z, adjustment)  # type: ignore[arg-type]
            assert e is not None and rest_r is not None
            extra[r, : e.shape[0]] = e
            rest[r] = rest_r
            lse[r] = logsumexp(z)
        u = rng.random(n)
        params_list = [p for _, p, _, _ in rows]
        adjustments = [a for _, _, a, _ in rows]
        got = sample_adjusted_batch(topk, ids, extra, rest, lse, adjustments, params_list, u)  # type: ignore[arg-type]
        # A window of the rest keeps K entries; one of all tokens loses the adjusted ones, and a
        # K-wide adjusted window then cannot be filled (those rows go per row).
        assert got.decided.sum() >= (n // 2 if masked else 1)
        for r in np.flatnonzero(got.decided).tolist():
            step = StepLogits(topk[r], ids[r], float(lse[r]), None, extra[r], float(rest[r]))
            try:
                ref = sample(step, params_list[r], float(u[r]), adjustments[r])  # type: ignore[arg-type]
            except NeedFullRow:
                z = rows[r][0]
                ref = sample(
                    StepLogits(topk[r], ids[r], float(lse[r]), z, extra[r], float(rest[r])),
                    params_list[r],
                    float(u[r]),
                    adjustments[r],  # type: ignore[arg-type]
                )
            assert int(got.token_ids[r]) == ref.token_id, r
            assert float(got.logprobs[r]) == ref.logprob, r  # bitwise
        assert not got.decided[[i for i, p in enumerate(params_list) if p.logprobs]].any()
