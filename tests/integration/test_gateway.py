"""The gateway end to end: real tritonserver, real uvicorn, the official openai SDK."""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from transformers import AutoTokenizer, GPT2LMHeadModel

from embedded_triton import TritonServer
from tests.conftest import TINY, hf_greedy
from tests.integration.conftest import serve_gateway

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def gateway(triton: TritonServer, model_repository: Path) -> Iterator[str]:
    yield from serve_gateway(triton, model_repository, default_window=16)


@pytest.fixture(scope="module")
def second_gateway(triton: TritonServer, model_repository: Path) -> Iterator[str]:
    """Another gateway process's worth of state (own scheduler, own cache) on the same Triton."""
    yield from serve_gateway(triton, model_repository, default_window=16)


@pytest.fixture(scope="module")
def oai(gateway: str) -> Iterator[openai.OpenAI]:
    client = openai.OpenAI(base_url=f"{gateway}/v1", api_key="unused", max_retries=0)
    yield client
    client.close()


def triton_metric(triton: TritonServer, name: str) -> float:
    text = urllib.request.urlopen(triton.metrics_url, timeout=5).read().decode()
    match = re.search(rf'{name}{{model="{TINY}",version="1"}} (\S+)', text)
    assert match, f"{name} missing"
    return float(match.group(1))


def stream_events(gateway: str, body: dict) -> list[tuple[str, dict]]:
    events = []
    with httpx.stream("POST", f"{gateway}/generate/stream", json=body, timeout=30) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        event = None
        for line in r.iter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                events.append((event or "message", json.loads(line.split(":", 1)[1])))
    return events


def test_openai_sdk_completion(oai: openai.OpenAI) -> None:
    out = oai.completions.create(model=TINY, prompt="Hello there", max_tokens=7, temperature=0)
    assert out.object == "text_completion" and out.model == TINY
    assert out.choices[0].finish_reason in {"length", "stop"}
    assert out.usage is not None and out.usage.completion_tokens <= 7
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    models = oai.models.list()
    assert [m.id for m in models.data] == [TINY]


def test_openai_sdk_streaming_with_usage(oai: openai.OpenAI) -> None:
    chunks = list(
        oai.completions.create(
            model=TINY,
            prompt=["日本語のテキスト", "abc"],
            max_tokens=5,
            n=2,
            stream=True,
            stream_options={"include_usage": True},
            seed=3,
            temperature=0.9,
            top_p=0.9,
        )
    )
    finished = {
        c.choices[0].index: c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    }
    assert sorted(finished) == [0, 1, 2, 3]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    # 4 choices of at most 5 tokens; one that ends at end-of-sequence ("stop") may be shorter.
    full = sum(reason == "length" for reason in finished.values())
    assert 5 * full + (4 - full) <= chunks[-1].usage.completion_tokens <= 20
    text = {i: "".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i) for i in range(4)}
    # Same prompt, same seed offset per choice -> choices 0/2 differ in prompt, 0/1 differ in seed.
    again = oai.completions.create(
        model=TINY, prompt=["日本語のテキスト", "abc"], max_tokens=5, n=2, seed=3, temperature=0.9, top_p=0.9
    )
    assert {c.index: c.text for c in again.choices} == text


def test_openai_sdk_errors(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        oai.completions.create(model=TINY, prompt="x " * 10, max_tokens=250)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        oai.completions.create(model="nope", prompt="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError):
        oai.completions.create(model=TINY, prompt="x", max_tokens=1, temperature=3)


def test_greedy_stream_equals_transformers(gateway: str, tiny_checkpoint: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    model = GPT2LMHeadModel.from_pretrained(tiny_checkpoint).eval()
    prompt = "東京は日本の首都です。"
    expected = hf_greedy(model, tokenizer(prompt)["input_ids"], 20, tokenizer.eos_token_id)
    events = stream_events(gateway, {"prompt": prompt, "max_new_tokens": 20, "temperature": 0})
    tokens = [d for e, d in events if e == "token" and d["token_id"] is not None]
    assert [t["position"] for t in tokens] == list(range(len(tokens)))
    assert [t["token_id"] for t in tokens] == [t for t in expected if t != tokenizer.eos_token_id]
    done = events[-1]
    assert done[0] == "done" and done[1]["usage"]["completion_tokens"] == len(expected)
    assert "".join(t["text"] for e, t in events if e == "token") == done[1]["generated_text"]


async def _generate(client: httpx.AsyncClient, body: dict) -> dict:
    r = await client.post("/generate", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_seeded_sampling_is_independent_of_batch_company(gateway: str) -> None:
    probe = {"prompt": "Once upon a time", "max_new_tokens": 24, "temperature": 0.8, "top_p": 0.9, "seed": 1234}
    # Vary the cache key without changing the sampling, so both runs really generate.
    alone_body = {**probe, "stop": ["never-appears-1"]}
    company_body = {**probe, "stop": ["never-appears-2"]}

    async def run() -> tuple[dict, dict]:
        async with httpx.AsyncClient(base_url=gateway, timeout=60) as client:
            alone = await _generate(client, alone_body)
            others = [
                {"prompt": f"noise {i} ノイズ", "max_new_tokens": 30 - i, "temperature": 1.0 + i / 10, "top_k": 5 * i}
                for i in range(6)
            ]
            results = await asyncio.gather(_generate(client, company_body), *(_generate(client, o) for o in others))
            return alone, results[0]

    alone, in_company = asyncio.run(run())
    assert not alone["cached"] and not in_company["cached"]
    assert alone["generated_text"] == in_company["generated_text"]


def test_result_cache_hits_and_misses(gateway: str) -> None:
    greedy = {"prompt": "cache me", "max_new_tokens": 6, "temperature": 0}
    unseeded = {"prompt": "cache me", "max_new_tokens": 6, "temperature": 0.9}
    first = httpx.post(f"{gateway}/generate", json=greedy, timeout=30).json()
    second = httpx.post(f"{gateway}/generate", json=greedy, timeout=30).json()
    assert (first["cached"], second["cached"]) == (False, True)
    assert first["generated_text"] == second["generated_text"]
    assert not any(httpx.post(f"{gateway}/generate", json=unseeded, timeout=30).json()["cached"] for _ in range(2))
    batch = httpx.post(
        f"{gateway}/generate/batch", json={"requests": [greedy, unseeded, {**greedy, "max_new_tokens": 2}]}, timeout=30
    ).json()
    assert [r["cached"] for r in batch["results"]] == [True, False, False] and batch["cache_hits"] == 1
    assert batch["results"][0]["generated_text"] == first["generated_text"]
    assert batch["results"][2]["completion_tokens"] == 2
    replay = stream_events(gateway, greedy)
    assert replay[-1][1]["cached"] is True
    assert "".join(d["text"] for e, d in replay if e == "token") == first["generated_text"]


def test_disconnect_frees_the_sequence(gateway: str, triton: TritonServer) -> None:
    decoded_before = triton_metric(triton, "gpt2_decode_tokens_total")
    body = {"prompt": "a long story", "max_new_tokens": 240, "temperature": 0.7, "top_k": 20}
    with httpx.stream("POST", f"{gateway}/generate/stream", json=body, timeout=30) as r:
        for n, _ in enumerate(r.iter_lines()):
            if n >= 6:
                break  # leave after a few tokens: closing the response drops the connection
    deadline = time.monotonic() + 1.0
    while triton_metric(triton, "gpt2_kv_live_sequences") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert triton_metric(triton, "gpt2_kv_live_sequences") == 0
    time.sleep(0.3)
    assert triton_metric(triton, "gpt2_decode_tokens_total") - decoded_before < 200


def test_validation_errors_are_4xx_in_one_shape(gateway: str) -> None:
    cases = [
        ({"prompt": "", "max_new_tokens": 5}, "prompt"),
        ({"prompt": "hi", "max_new_tokens": 1000}, "prompt"),
        ({"prompt": "hi", "top_p": 0}, "top_p"),
        ({"prompt": "hi", "unknown": 1}, "unknown"),
    ]
    for body, param in cases:
        r = httpx.post(f"{gateway}/generate", json=body, timeout=30)
        assert r.status_code == 400, (body, r.text)
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code", "request_id"} and error["param"] == param
        assert error["request_id"] == r.headers["x-request-id"]


def test_readiness_and_metrics(gateway: str) -> None:
    assert httpx.get(f"{gateway}/health/live").status_code == 200
    ready = httpx.get(f"{gateway}/health/ready").json()
    assert ready["status"] == "ready" and ready["version"] == "1"
    metrics = httpx.get(f"{gateway}/metrics").text
    assert 'gateway_requests_total{method="POST",route="/generate",status="200"}' in metrics
    assert "gateway_time_to_first_token_seconds_count" in metrics


def test_two_gateways_share_one_triton(gateway: str, second_gateway: str, triton: TritonServer) -> None:
    body = {"prompt": "two workers", "max_new_tokens": 20, "temperature": 0.9, "top_k": 30, "seed": 77}

    async def run() -> list[dict]:
        async with httpx.AsyncClient(timeout=60) as client:
            calls = []
            for i in range(12):
                base = gateway if i % 2 else second_gateway
                item = {**body, "seed": 77 + i % 3, "stop": [f"never-{i}"]}  # distinct cache keys
                calls.append(client.post(f"{base}/generate", json=item))
            return [r.json() for r in await asyncio.gather(*calls)]

    results = asyncio.run(run())
    by_seed: dict[int, set[str]] = {}
    for i, r in enumerate(results):
        assert not r["cached"]
        by_seed.setdefault(i % 3, set()).add(r["generated_text"])
    # The same seed gives the same text whichever gateway served it and whatever ran beside it.
    assert all(len(texts) == 1 for texts in by_seed.values())
    deadline = time.monotonic() + 1.0
    while triton_metric(triton, "gpt2_kv_live_sequences") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert triton_metric(triton, "gpt2_kv_live_sequences") == 0


def test_greedy_with_repetition_penalty_equals_transformers(gateway: str, tiny_checkpoint: Path) -> None:
    """A penalty reorders the logits: every step asks Triton for the seen ids' own logits
    (EXTRA_IDS) and samples from the adjusted window, or fetches the row when that does not decide."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    model = GPT2LMHeadModel.from_pretrained(tiny_checkpoint).eval()
    prompt = "repeat after me: la la la"
    expected = hf_greedy(model, tokenizer(prompt)["input_ids"], 24, tokenizer.eos_token_id, repetition_penalty=1.3)
    body = {"prompt": prompt, "max_new_tokens": 24, "temperature": 0, "repetition_penalty": 1.3}
    events = stream_events(gateway, body)
    tokens = [d["token_id"] for e, d in events if e == "token" and d["token_id"] is not None]
    assert tokens == [t for t in expected if t != tokenizer.eos_token_id]
    plain = stream_events(gateway, {**body, "repetition_penalty": 1.0})
    assert [d["token_id"] for e, d in plain if e == "token" and d["token_id"] is not None] != tokens


def reference_greedy(
    model: GPT2LMHeadModel,
    prompt_ids: list[int],
    new_tokens: int,
    *,
    presence: float = 0.0,
    frequency: float = 0.0,
    bias: dict[int, float] | None = None,
    repetition: float = 1.0,
) -> list[int]:
    """Greedy decoding on transformers' logits with logit_bias (SequenceBiasLogitsProcessor), the
    repetition penalty (RepetitionPenaltyLogitsProcessor) and OpenAI's presence / frequency
    penalties (its documented formula over the generated tokens), in vLLM's order."""
    import torch
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor, SequenceBiasLogitsProcessor

    ids, out = list(prompt_ids), []
    with torch.no_grad():
        for _ in range(new_tokens):
            scores = model(torch.tensor([ids])).logits[:, -1].double()
            if bias:
                scores = SequenceBiasLogitsProcessor([[[i], b] for i, b in bias.items()])(torch.tensor([ids]), scores)
            if repetition != 1.0:
                scores = RepetitionPenaltyLogitsProcessor(repetition)(torch.tensor([ids]), scores)
            counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=scores.shape[1]).double()
            scores = scores - frequency * counts - presence * (counts > 0).double()
            token = int(scores.argmax())
            out.append(token)
            ids.append(token)
    return out


@pytest.mark.parametrize(
    "settings",
    [
        {"presence_penalty": 1.5},
        {"frequency_penalty": 0.7},
        {"presence_penalty": -1.0, "frequency_penalty": 0.4, "repetition_penalty": 1.2},
        {"logit_bias": {"5": 8.0, "17": -100.0}},
    ],
    ids=["presence", "frequency", "mixed", "logit_bias"],
)
def test_greedy_with_penalties_and_logit_bias_equals_transformers(
    gateway: str, oai: openai.OpenAI, tiny_checkpoint: Path, settings: dict
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    model = GPT2LMHeadModel.from_pretrained(tiny_checkpoint).eval()
    prompt = "the cat sat on the mat and the cat sat"
    ids = tokenizer(prompt)["input_ids"]
    expected = reference_greedy(
        model,
        ids,
        20,
        presence=settings.get("presence_penalty", 0.0),
        frequency=settings.get("frequency_penalty", 0.0),
        bias={int(k): float(v) for k, v in settings.get("logit_bias", {}).items()},
        repetition=settings.get("repetition_penalty", 1.0),
    )
    # The native route returns token ids (eos included: the reference does not stop there) ...
    body = {"prompt": prompt, "max_new_tokens": 20, "temperature": 0, **settings}
    tokens = [d["token_id"] for e, d in stream_events(gateway, body) if e == "token" and d["token_id"] is not None]
    stop = expected.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in expected else len(expected)
    assert tokens == expected[:stop]
    plain = stream_events(gateway, {"prompt": prompt, "max_new_tokens": 20, "temperature": 0})
    assert [d["token_id"] for e, d in plain if e == "token" and d["token_id"] is not None] != tokens
    # ... and the OpenAI route the same text (ignore_eos: all 20 tokens).
    c = oai.completions.create(
        model=TINY,
        prompt=ids,
        max_tokens=20,
        temperature=0,
        extra_body={"ignore_eos": True, "repetition_penalty": settings.get("repetition_penalty", 1.0)},
        **{k: v for k, v in settings.items() if k != "repetition_penalty"},
    )
    assert c.choices[0].text == tokenizer.decode(expected, skip_special_tokens=True)


@pytest.mark.parametrize("max_tokens", [0, 1])
def test_echo_logprobs_equal_transformers_log_softmax(
    oai: openai.OpenAI, tiny_checkpoint: Path, max_tokens: int
) -> None:
    """lm-evaluation-harness's loglikelihood request: the prompt as token ids, echo, logprobs."""
    import torch

    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    model = GPT2LMHeadModel.from_pretrained(tiny_checkpoint).eval()
    ids = tokenizer("The quick brown fox jumps over the lazy dog")["input_ids"]
    out = oai.completions.create(model=TINY, prompt=ids, max_tokens=max_tokens, temperature=0, logprobs=2, echo=True)
    lp = out.choices[0].logprobs
    assert lp is not None and lp.token_logprobs is not None and lp.top_logprobs is not None
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
    expected = [float(ref[t - 1, ids[t]]) for t in range(1, len(ids))]
    assert lp.token_logprobs[0] is None
    assert lp.token_logprobs[1 : len(ids)] == pytest.approx(expected, abs=1e-4)
    best = {tokenizer.decode([int(i)]) for i in torch.topk(ref[0], 2).indices}
    assert set(lp.top_logprobs[1]) == best  # the alternatives after the first token
    assert len(lp.token_logprobs) == len(ids) + max_tokens


def _full_row_fetches(gateway: str) -> float:
    text = httpx.get(f"{gateway}/metrics", timeout=10).text
    return sum(float(v) for v in re.findall(r"^gateway_full_row_fetches_total\{[^}]*\} (\S+)$", text, re.M))


def test_a_wide_nucleus_is_drawn_on_the_device_without_full_rows(gateway: str, triton: TritonServer) -> None:
    """The seed's own request (temperature 0.7, top_p 0.9, no top_k) on random weights: where the
    nucleus is wider than the window Triton draws the token on the device (DRAW), and the gateway
    fetches no full row for any step; the seeded result is reproducible."""
    body = {"prompt": "Once upon a time", "max_new_tokens": 24, "temperature": 0.7, "top_p": 0.9, "seed": 4242}
    drawn, fetched = triton_metric(triton, "gpt2_drawn_rows_total"), _full_row_fetches(gateway)
    first = httpx.post(f"{gateway}/generate", json=body, timeout=60).json()
    assert first["completion_tokens"] == 24 or first["finish_reason"] == "stop"
    deadline = time.monotonic() + 5  # Triton's counters are published by the model's sweeper thread
    while triton_metric(triton, "gpt2_drawn_rows_total") == drawn and time.monotonic() < deadline:
        time.sleep(0.1)
    assert triton_metric(triton, "gpt2_drawn_rows_total") > drawn
    assert _full_row_fetches(gateway) == fetched
    again = httpx.post(f"{gateway}/generate", json={**body, "stop": ["never"]}, timeout=60).json()  # not cached
    assert again["generated_text"] == first["generated_text"]
