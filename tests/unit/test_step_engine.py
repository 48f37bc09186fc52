"""The step engine called directly (no Triton): per-row statuses, the torch tail, stored logits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from step_model.contract import RowStatus
from step_model.engine import InvalidRequest, ModelMeta, StepEngine, StepRequest
from tests.conftest import TINY

pytestmark = pytest.mark.unit


def request(rows: list[tuple[int, list[int], bool, bool]], *, window: int = 8, logits: bool = False) -> StepRequest:
    """rows: (sequence id, tokens, start, end)."""
    width = max(1, max(len(t) for _, t, _, _ in rows))
    ids = np.zeros((len(rows), width), dtype=np.int64)
    for i, (_, tokens, _, _) in enumerate(rows):
        ids[i, : len(tokens)] = tokens
    return StepRequest(
        sequence_ids=np.array([r[0] for r in rows], dtype=np.uint64),
        input_ids=ids,
        lengths=np.array([len(r[1]) for r in rows], dtype=np.int32),
        start=np.array([r[2] for r in rows]),
        end=np.array([r[3] for r in rows]),
        temperature=np.full(len(rows), 0.9, dtype=np.float32),
        window=window,
        want_logits=logits,
    )


@pytest.fixture(scope="module")
def version_dir(model_repository: Path) -> Path:
    return model_repository / TINY / "1"


def engine(version_dir: Path, **kwargs: object) -> StepEngine:
    meta = ModelMeta.load(version_dir)
    return StepEngine(version_dir / "model.onnx", meta, capacity=4, device="cpu", **kwargs)  # type: ignore[arg-type]


def test_torch_tail_equals_the_graphs_own_top_k_and_logsumexp(version_dir: Path) -> None:
    outs = []
    for torch_tail in (False, True):
        eng = engine(version_dir, torch_tail=torch_tail)
        eng.step([request([(1, [5, 6, 7], True, False), (2, [8], True, False)])])
        res = eng.step([request([(1, [9], False, False), (2, [10], False, False)])])[0]
        assert not isinstance(res, Exception)
        outs.append(res)
    graph, torch_tail = outs
    np.testing.assert_allclose(torch_tail.topk_logits, graph.topk_logits, rtol=1e-6)
    np.testing.assert_allclose(torch_tail.logsumexp, graph.logsumexp, rtol=1e-6)
    np.testing.assert_array_equal(torch_tail.topk_ids, graph.topk_ids)


def test_a_bystanders_logits_survive_another_callers_step(version_dir: Path) -> None:
    eng = engine(version_dir)
    # Slot 0 -> sequence 10, slot 1 -> sequence 11; both step, then only 11 steps (the same
    # decode buffer covers slots [0, 2)): 10's last logits must still be the ones of its step.
    eng.step([request([(10, [1, 2], True, False), (11, [3, 4], True, False)])])
    both = eng.step([request([(10, [5], False, False), (11, [6], False, False)], logits=True)])[0]
    assert not isinstance(both, Exception) and both.logits is not None
    eng.step([request([(11, [7], False, False)])])
    fetched = eng.step([request([(10, [], False, False)], logits=True)])[0]
    assert not isinstance(fetched, Exception) and fetched.logits is not None
    np.testing.assert_array_equal(fetched.logits[0], both.logits[0])
    np.testing.assert_array_equal(fetched.topk_ids[0], both.topk_ids[0])


def test_rows_are_refused_alone_and_malformed_requests_as_a_whole(version_dir: Path) -> None:
    eng = engine(version_dir)
    eng.step([request([(1, [1], True, False), (2, [1], True, False), (3, [1], True, False)])])
    res = eng.step(
        [request([(4, [2], True, False), (5, [2], True, False), (1, [3], False, False), (99, [3], False, False)])]
    )[0]
    assert not isinstance(res, Exception)
    assert res.status.tolist() == [RowStatus.OK, RowStatus.CACHE_FULL, RowStatus.OK, RowStatus.NOT_FOUND]
    assert res.messages.keys() == {1, 3}
    assert eng.live_sequences() == 4
    twice = eng.step([request([(1, [4], False, False), (1, [4], False, False)])])[0]
    assert isinstance(twice, InvalidRequest)
    released = eng.step([request([(s, [], False, True) for s in (1, 2, 3, 4, 77)])])[0]
    assert not isinstance(released, Exception) and (released.status == RowStatus.OK).all()
    assert eng.live_sequences() == 0


def test_prompt_logprobs_equal_transformers_log_softmax(version_dir: Path, tiny_checkpoint: Path) -> None:
    import torch
    from transformers import GPT2LMHeadModel

    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    eng = engine(version_dir)
    req = request([(1, prompts[0], True, False), (2, prompts[1], True, False), (3, [4], True, False)])
    req.prompt_logprobs = np.array([2, 3, -1], dtype=np.int32)
    res = eng.step([req])[0]
    assert res.prompt_logprobs is not None and res.prompt_top_ids is not None and res.prompt_top_logprobs is not None
    model = GPT2LMHeadModel.from_pretrained(tiny_checkpoint).eval()
    for row, prompt in enumerate(prompts):
        with torch.no_grad():
            ref = torch.log_softmax(model(torch.tensor([prompt])).logits[0].double(), dim=-1)
        expected = [float(ref[t - 1, prompt[t]]) for t in range(1, len(prompt))]
        np.testing.assert_allclose(res.prompt_logprobs[row, 1 : len(prompt)], expected, atol=1e-4)
        assert res.prompt_logprobs[row, 0] == 0.0 and not res.prompt_logprobs[row, len(prompt) :].any()
        top = torch.topk(ref, 3, dim=-1)
        for t in range(1, len(prompt)):
            np.testing.assert_array_equal(res.prompt_top_ids[row, t], top.indices[t - 1].numpy())
            np.testing.assert_allclose(res.prompt_top_logprobs[row, t], top.values[t - 1].numpy(), atol=1e-4)
    assert not res.prompt_logprobs[2].any()  # the row that did not ask
    # The prompts were prefilled as usual: their sequences decode on.
    assert (eng.step([request([(1, [3], False, False), (2, [3], False, False)])])[0].status == RowStatus.OK).all()


def test_extra_ids_return_their_logits_and_the_rest_of_the_rows_logsumexp(version_dir: Path) -> None:
    """EXTRA_IDS (the gateway's penalised / biased ids): their scaled logits, and the log-sum-exp
    of the row without them, on start, decode and fetch rows; padding (-1) and rows without ids
    get zeros and the whole row's log-sum-exp; an id beyond the vocabulary refuses its row."""
    import dataclasses

    import torch

    eng = engine(version_dir)
    vocab = eng.meta.vocab_size

    def check(req: StepRequest, extra: np.ndarray) -> None:
        req = dataclasses.replace(req, extra_ids=extra, want_logits=True)
        res = eng.step([req])[0]
        assert not isinstance(res, Exception)
        assert res.logits is not None and res.extra_logits is not None and res.rest_logsumexp is not None
        for i in range(extra.shape[0]):
            row = torch.tensor(res.logits[i], dtype=torch.float64)
            ids = [int(t) for t in extra[i] if t >= 0]
            got = res.extra_logits[i]
            assert got[: len(ids)].tolist() == pytest.approx(res.logits[i][ids].tolist(), abs=0)
            assert not got[len(ids) :].any()  # padding
            rest = row.clone()
            rest[ids] = float("-inf")
            assert float(res.rest_logsumexp[i]) == pytest.approx(float(torch.logsumexp(rest, 0)), abs=1e-4)
            if not ids:
                assert res.rest_logsumexp[i] == res.logsumexp[i]
            # The window covers the other tokens: the K largest once the ids are masked.
            k = res.topk_ids.shape[1]
            assert not set(res.topk_ids[i].tolist()) & set(ids)
            assert res.topk_logits[i].tolist() == pytest.approx(torch.topk(rest, k).values.tolist(), abs=1e-6)

    start = request([(1, [5, 6, 7], True, False), (2, [8, 9], True, False)])
    check(start, np.array([[7, 3, 5, -1], [-1, -1, -1, -1]], dtype=np.int64))
    decode = request([(1, [11], False, False), (2, [12], False, False)])
    check(decode, np.array([[0, vocab - 1, 4, 4], [12, -1, -1, -1]], dtype=np.int64))  # a repeated id is harmless
    fetch = request([(1, [], False, False)])
    check(fetch, np.array([[1, 2]], dtype=np.int64))
    bad = dataclasses.replace(request([(2, [13], False, False)]), extra_ids=np.array([[vocab]], dtype=np.int64))
    res = eng.step([bad])[0]
    assert not isinstance(res, Exception) and res.status[0] == RowStatus.INVALID


@pytest.mark.parametrize("method", ["host", "bins", "sort"])
def test_draw_rows_get_the_gateways_full_row_token_and_the_others_none(version_dir: Path, method: str) -> None:
    """DRAW: rows whose window cannot hold their cut are drawn on the device, exactly as the
    gateway's full-row sampler would draw them (same u); rows that do not ask, whose window
    holds the cut (top-k inside it), or that carry EXTRA_IDS get -1. Start, decode and fetch rows
    alike. Every draw method (value bins in numpy, the CPU's default; in torch; a sort, the GPU's)."""
    from frontend.sampling import SamplingParams, StepLogits, sample

    eng = engine(version_dir, draw_method=method)
    first = request([(1, [5, 6, 7], True, False), (2, [8], True, False), (3, [9, 4], True, False)], window=4)
    asks = np.array([[0.3, 0.9, 0, 0], [0.7, 1.0, 3, 0], [-1.0, 0.5, 0, 0]])  # top-p; top-k 3 < window; not asked
    first.draw, first.want_logits = asks, True
    second = request([(1, [11], False, False), (2, [], False, False), (3, [12], False, False)], window=4)
    second.draw, second.want_logits = np.array([[0.99, 0.95, 0, 0.01], [0.2, 1.0, 0, 0], [0.5, 1.0, 40, 0]]), True
    second.extra_ids = np.array([[-1], [-1], [7]])  # row 3 is adjusted: its caller draws it
    for req, drawn in ((first, [True, False, False]), (second, [True, True, False])):
        res = eng.step([req])[0]
        assert not isinstance(res, Exception) and res.drawn_ids is not None and res.drawn_logits is not None
        assert res.logits is not None and req.draw is not None
        assert (res.drawn_ids >= 0).tolist() == drawn
        for i in np.flatnonzero(res.drawn_ids >= 0):
            u, top_p, top_k, min_p = req.draw[i]
            params = SamplingParams(temperature=0.9, top_p=top_p, top_k=int(top_k), min_p=min_p)
            row = StepLogits(res.topk_logits[i], res.topk_ids[i], float(res.logsumexp[i]), full_logits=res.logits[i])
            want = sample(row, params, float(u))
            assert int(res.drawn_ids[i]) == want.token_id
            assert float(res.drawn_logits[i]) - float(res.logsumexp[i]) == want.logprob
    assert eng.stats.drawn_rows_total == 3


def test_an_unknown_draw_method_is_refused(version_dir: Path) -> None:
    with pytest.raises(ValueError, match="draw_method"):
        engine(version_dir, draw_method="quantum")


def test_a_malformed_draw_refuses_its_row_or_the_request(version_dir: Path) -> None:
    eng = engine(version_dir)
    req = request([(1, [5], True, False), (2, [6], True, False)])
    req.draw = np.array([[1.5, 0.9, 0, 0], [0.5, 0.9, 0, 0]])  # u outside [0, 1)
    res = eng.step([req])[0]
    assert not isinstance(res, Exception)
    assert res.status.tolist() == [RowStatus.INVALID, RowStatus.OK]
    bad = request([(3, [5], True, False)])
    bad.draw = np.zeros((1, 3))
    assert isinstance(eng.step([bad])[0], InvalidRequest)


def test_bucketed_prefills_give_the_exact_shapes_results(version_dir: Path) -> None:
    """The GPU's prefill shapes (rows and prompt tokens rounded up: padding rows and positions,
    step_model.prefill) change no real row's results: the same prompts prefilled exactly and in
    buckets, then decoded, give the same windows (the KV copied into the slots is the same)."""
    prompts = {1: [5, 6, 7], 2: list(range(20, 39)), 3: [8]}  # 3 rows -> 4; 19 tokens -> 32
    outs = []
    for buckets in (False, True):
        eng = engine(version_dir, prefill_buckets=buckets)
        assert eng.prefiller.shape(3, 19) == ((4, 32) if buckets else (3, 19))
        steps = [eng.step([request([(sid, toks, True, False) for sid, toks in prompts.items()])])[0]]
        for t in range(4):
            steps.append(eng.step([request([(sid, [30 + t], False, False) for sid in prompts])])[0])
        assert not any(isinstance(s, Exception) for s in steps)
        outs.append(steps)
    for exact, bucketed in zip(*outs, strict=True):
        assert exact.status.tolist() == bucketed.status.tolist() == [RowStatus.OK] * 3
        np.testing.assert_allclose(bucketed.topk_logits, exact.topk_logits, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(bucketed.logsumexp, exact.logsumexp, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(bucketed.topk_ids, exact.topk_ids)


def test_warm_up_runs_the_bucketed_prefill_shapes_and_frees_nothing(version_dir: Path) -> None:
    eng = engine(version_dir, prefill_buckets=True)
    eng.warm_up()
    assert eng.live_sequences() == 0 and eng.stats.prefill_runs_total == 0  # warm-up passes are not steps
    res = eng.step([request([(1, [5, 6, 7], True, False)])])[0]
    assert not isinstance(res, Exception) and res.status.tolist() == [RowStatus.OK]
