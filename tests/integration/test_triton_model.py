"""The step model served by a real tritonserver, checked against transformers."""

from __future__ import annotations

import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from transformers import AutoTokenizer, GPT2LMHeadModel
from tritonclient.utils import InferenceServerException

from embedded_triton import TritonServer
from step_model.contract import RowStatus
from tests.conftest import DTYPE, IDLE_TIMEOUT_S, KV_CAPACITY, TINY, assert_logits_close, hf_greedy
from tests.integration.steps import Row, send, statuses, step

pytestmark = pytest.mark.integration

_ids = iter(range(1_000_000, 2_000_000))


def new_id() -> int:
    return next(_ids)


@pytest.fixture(scope="module")
def client(triton: TritonServer) -> Iterator[grpcclient.InferenceServerClient]:
    with grpcclient.InferenceServerClient(triton.grpc_url) as c:
        yield c


@pytest.fixture(scope="module")
def reference(tiny_checkpoint: Path) -> GPT2LMHeadModel:
    return GPT2LMHeadModel.from_pretrained(tiny_checkpoint).eval()


def ref_logits(model: GPT2LMHeadModel, tokens: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0, -1].numpy()


def metric_value(triton: TritonServer, name: str, version: str = "1") -> float:
    text = urllib.request.urlopen(triton.metrics_url, timeout=5).read().decode()
    match = re.search(rf'{name}{{model="{TINY}",version="{version}"}} (\S+)', text)
    assert match, f"{name} missing from Triton's metrics"
    return float(match.group(1))


def live_sequences(triton: TritonServer, version: str = "1") -> float:
    return metric_value(triton, "gpt2_kv_live_sequences", version)


def test_logits_equal_transformers_for_staggered_sequences(client, reference) -> None:
    rng = np.random.default_rng(7)
    prompts = {new_id(): rng.integers(0, 1023, n).tolist() for n in (3, 11, 6, 1)}
    sids = list(prompts)
    tokens = {sid: list(p) for sid, p in prompts.items()}
    starts = {sids[0]: 0, sids[1]: 0, sids[2]: 2, sids[3]: 4}
    ends = {sids[0]: 5, sids[1]: 3, sids[2]: 7, sids[3]: 6}
    for t in range(8):
        rows = []
        for sid in sids:
            if starts[sid] == t:
                rows.append(Row(sid, tokens[sid], start=True))
            elif starts[sid] < t <= ends[sid]:
                tok = int(rng.integers(0, 1023))
                tokens[sid].append(tok)
                rows.append(Row(sid, [tok], end=t == ends[sid]))
        out = step(client, TINY, rows, logits=True, version="1")
        for i, row in enumerate(rows):
            ref = ref_logits(reference, tokens[row.sequence_id])
            assert_logits_close(out["LOGITS"][i], ref)
            # The window is the top of the same row (as far as the dtype can tell near-ties apart),
            # and the log-sum-exp covers the whole row.
            assert_logits_close(ref[out["TOPK_IDS"][i]], np.sort(ref)[::-1][:8])
            if DTYPE == "fp32":
                np.testing.assert_array_equal(out["TOPK_IDS"][i], np.argsort(-ref, kind="stable")[:8])
            assert_logits_close(out["LOGSUMEXP"][i], np.log(np.exp(ref.astype(np.float64)).sum(keepdims=True)))


@pytest.mark.parametrize("text", ["Hello, my name is", "The quick brown fox", "こんにちは、今日はいい天気ですね"])
def test_greedy_equals_transformers_generate(client, reference, tiny_checkpoint: Path, text: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    prompt = tokenizer(text)["input_ids"]
    expected = hf_greedy(reference, prompt, 16, tokenizer.eos_token_id, exact=True)
    sid = new_id()
    out = step(client, TINY, [Row(sid, prompt, start=True)], window=1, version="1")
    got = [int(out["TOPK_IDS"][0, 0])]
    while len(got) < 16:
        out = step(client, TINY, [Row(sid, [got[-1]], end=len(got) == 15)], window=1, version="1")
        got.append(int(out["TOPK_IDS"][0, 0]))
    if DTYPE == "fp32":
        assert got == expected
    else:
        # fp16 may break a near-tie the other way; then the two continuations part. Check every
        # token up to the first difference, and that the difference is a tie within tolerance.
        same = next((i for i, (a, b) in enumerate(zip(got, expected, strict=True)) if a != b), len(got))
        if same < len(got):
            ref = ref_logits(reference, prompt + got[:same])
            assert_logits_close(ref[[got[same]]], ref[[expected[same]]])


def test_ended_and_idle_sequences_are_freed(client, triton) -> None:
    ended = [new_id() for _ in range(4)]
    idle = [new_id() for _ in range(3)]
    step(client, TINY, [Row(s, [1, 2, 3], start=True) for s in ended + idle], version="1")
    step(client, TINY, [Row(s, [4]) for s in ended + idle], version="1")
    # The model publishes its metrics every 0.1 s (never from a step): wait for them.
    deadline = time.monotonic() + 2
    while live_sequences(triton) < 7 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert live_sequences(triton) >= 7
    step(client, TINY, [Row(s, [], end=True) for s in ended], version="1")  # release without a token
    deadline = time.monotonic() + IDLE_TIMEOUT_S + 5
    while live_sequences(triton) and time.monotonic() < deadline:
        time.sleep(0.25)
    assert live_sequences(triton) == 0
    assert statuses(step(client, TINY, [Row(idle[0], [5])], version="1")) == [RowStatus.NOT_FOUND]


def test_where_an_execution_goes_is_published(client, triton) -> None:
    """The step model's phase counters (benchmarks/gpu_summary's 'where an execution's time goes'):
    a prefill run per step with start rows, and the stub's own phases inside its execute time."""
    names = ("execute", "parse", "respond", "prefill", "decode", "finish")
    before = {n: metric_value(triton, f"gpt2_{n}_us_total") for n in names}
    runs_before = metric_value(triton, "gpt2_prefill_runs_total")
    ids = [new_id() for _ in range(3)]
    step(client, TINY, [Row(s, [1, 2, 3], start=True) for s in ids], version="1")
    step(client, TINY, [Row(s, [4], end=True) for s in ids], version="1")
    deadline = time.monotonic() + 2
    while metric_value(triton, "gpt2_prefill_runs_total") < runs_before + 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.25)  # both steps published
    after = {n: metric_value(triton, f"gpt2_{n}_us_total") for n in names}
    assert metric_value(triton, "gpt2_prefill_runs_total") == runs_before + 1  # one pass for the three prompts
    grew = {n: after[n] - before[n] for n in names}
    assert grew["execute"] > 0 and grew["prefill"] > 0 and grew["decode"] > 0
    assert grew["execute"] >= grew["parse"] + grew["respond"] + grew["prefill"] + grew["decode"] + grew["finish"]


def test_two_versions_serve_side_by_side(client) -> None:
    assert client.is_model_ready(TINY, "1") and client.is_model_ready(TINY, "2")
    prompt = [5, 6, 7, 8]
    v1 = step(client, TINY, [Row(new_id(), prompt, start=True, end=True)], logits=True, version="1")["LOGITS"]
    v2 = step(client, TINY, [Row(new_id(), prompt, start=True, end=True)], logits=True, version="2")["LOGITS"]
    assert not np.allclose(v1, v2)
    latest = step(client, TINY, [Row(new_id(), prompt, start=True, end=True)], logits=True)["LOGITS"]
    np.testing.assert_allclose(latest, v2, atol=1e-6)


def test_bad_rows_are_refused_alone_and_leave_others_unharmed(client, reference) -> None:
    sid, other = new_id(), new_id()
    tokens = [10, 20, 30]
    step(client, TINY, [Row(sid, tokens, start=True), Row(other, [1], start=True)], version="1")
    bad = [
        (Row(new_id(), [1]), RowStatus.NOT_FOUND),
        (Row(new_id(), [1] * 257, start=True), RowStatus.INVALID),  # longer than the context
        (Row(other, [1], start=True), RowStatus.ALREADY_EXISTS),
        (Row(new_id(), [5000], start=True), RowStatus.INVALID),  # token id outside the vocabulary
        (Row(new_id(), [5], start=True, temperature=0.0), RowStatus.INVALID),
    ]
    # Each refused row changes nothing; the good row in the same request runs.
    tokens.append(40)
    out = step(client, TINY, [Row(sid, [40]), *(row for row, _ in bad)], logits=True, version="1")
    assert statuses(out) == [RowStatus.OK, *(code for _, code in bad)]
    assert_logits_close(out["LOGITS"][0], ref_logits(reference, tokens))
    malformed = {
        "SEQUENCE_ID": np.array([[new_id()], [new_id()]], dtype=np.uint64),
        "INPUT_IDS": np.zeros((2, 2), dtype=np.int64),
        "LENGTH": np.array([[2]], dtype=np.int32),
        "START": np.array([[True], [True]]),
        "END": np.array([[False], [False]]),
        "TEMPERATURE": np.ones((2, 1), dtype=np.float32),
    }
    with pytest.raises(InferenceServerException):
        send(client, TINY, malformed, version="1")
    twice = [Row(sid, [50]), Row(sid, [51])]
    with pytest.raises(InferenceServerException, match="twice"):
        step(client, TINY, twice, version="1")
    # Neither failed request changed the sequence: it continues from its last real token.
    tokens.append(60)
    out = step(client, TINY, [Row(sid, [60], end=True), Row(other, [], end=True)], logits=True, version="1")
    assert_logits_close(out["LOGITS"][0], ref_logits(reference, tokens))


def test_full_cache_refuses_only_the_rows_that_need_a_slot(client) -> None:
    holders = [new_id() for _ in range(KV_CAPACITY)]
    step(client, TINY, [Row(s, [1, 2], start=True) for s in holders[:-1]], version="2")
    # One slot left: the first start row takes it, the second is told to come back later,
    # and the decode rows of the same request run.
    late = new_id()
    rows = [Row(holders[-1], [1, 2], start=True), Row(late, [3], start=True), Row(holders[0], [3])]
    assert statuses(step(client, TINY, rows, version="2")) == [RowStatus.OK, RowStatus.CACHE_FULL, RowStatus.OK]
    out = step(
        client, TINY, [Row(s, [3], end=True) for s in holders[1:]] + [Row(holders[0], [4], end=True)], version="2"
    )
    assert out["TOPK_IDS"].shape == (KV_CAPACITY, 8)
    assert statuses(step(client, TINY, [Row(late, [3], start=True, end=True)], version="2")) == [RowStatus.OK]


def test_fetching_the_full_row_after_a_step(client, reference) -> None:
    sid = new_id()
    prompt = [11, 12, 13]
    first = step(client, TINY, [Row(sid, prompt, start=True, temperature=0.7)], window=4, version="1")
    again = step(client, TINY, [Row(sid, [], temperature=0.7)], window=4, logits=True, version="1")
    np.testing.assert_allclose(again["TOPK_LOGITS"], first["TOPK_LOGITS"], atol=1e-6)
    assert_logits_close(again["LOGITS"][0], ref_logits(reference, prompt) / 0.7)
    step(client, TINY, [Row(sid, [], end=True)], version="1")


def test_extra_ids_through_triton(client, reference) -> None:
    """EXTRA_IDS (optional input): the named ids' scaled logits equal the row's, and REST_LOGSUMEXP
    is the log-sum-exp of the row without them; a request without the input is unchanged."""
    a, b = new_id(), new_id()
    rows = [Row(a, [11, 12, 13], start=True, temperature=0.7), Row(b, [5, 6], start=True, temperature=1.0)]
    extra = np.array([[12, 40, 3], [-1, -1, -1]], dtype=np.int64)
    out = step(client, TINY, rows, window=4, logits=True, version="1", extra_ids=extra)
    assert statuses(out) == [RowStatus.OK, RowStatus.OK]
    full = out["LOGITS"].astype(np.float64)
    np.testing.assert_array_equal(out["EXTRA_LOGITS"][0], out["LOGITS"][0][[12, 40, 3]])
    assert not out["EXTRA_LOGITS"][1].any()
    rest = full[0].copy()
    rest[[12, 40, 3]] = -np.inf
    top = rest.max()
    assert out["REST_LOGSUMEXP"][0, 0] == pytest.approx(top + np.log(np.exp(rest - top).sum()), abs=1e-4)
    assert out["REST_LOGSUMEXP"][1, 0] == out["LOGSUMEXP"][1, 0]
    decode = step(
        client, TINY, [Row(a, [40], temperature=0.7)], window=4, logits=True, version="1", extra_ids=extra[:1]
    )
    np.testing.assert_array_equal(decode["EXTRA_LOGITS"][0], decode["LOGITS"][0][[12, 40, 3]])
    assert_logits_close(decode["LOGITS"][0], ref_logits(reference, [11, 12, 13, 40]) / 0.7)
    step(client, TINY, [Row(a, [], end=True), Row(b, [], end=True)], version="1")


def test_draws_through_triton_equal_the_gateways_full_row_sampler(client) -> None:
    """DRAW (optional input): a top-p row whose window cannot hold its nucleus is drawn on the
    device, the very token the gateway's own full-row sampler picks with the same u; a row whose
    top-k cut lies inside its window is not drawn (-1); a request without DRAW is unchanged."""
    from frontend.sampling import SamplingParams, StepLogits, sample

    a, b = new_id(), new_id()
    rows = [Row(a, [11, 12, 13], start=True, temperature=0.7), Row(b, [5, 6], start=True, temperature=1.0)]
    draw = np.array([[0.42, 0.9, 0, 0], [0.42, 1.0, 2, 0]])
    out = step(client, TINY, rows, window=4, logits=True, version="1", draw=draw)
    assert statuses(out) == [RowStatus.OK, RowStatus.OK]
    assert out["DRAWN_IDS"][1, 0] == -1
    params = SamplingParams(temperature=0.7, top_p=0.9)
    lse = float(out["LOGSUMEXP"][0, 0])
    want = sample(
        StepLogits(out["TOPK_LOGITS"][0], out["TOPK_IDS"][0], lse, full_logits=out["LOGITS"][0]), params, 0.42
    )
    assert int(out["DRAWN_IDS"][0, 0]) == want.token_id
    assert float(out["DRAWN_LOGITS"][0, 0]) - lse == want.logprob
    plain = step(client, TINY, [Row(a, [want.token_id], temperature=0.7)], window=4, version="1")
    assert "DRAWN_IDS" not in plain and statuses(plain) == [RowStatus.OK]
    step(client, TINY, [Row(a, [], end=True), Row(b, [], end=True)], version="1")
