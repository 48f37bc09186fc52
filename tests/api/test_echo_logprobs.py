"""OpenAI `echo` with `logprobs`: the prompt's own logprobs come back before the completion's
(what lm-evaluation-harness's loglikelihood requests read), through the official SDK, streamed
(vLLM's way: in each choice's first chunk) and not. The values
here are the fake engine's; their exactness against transformers is tested on the step engine
(tests/unit/test_step_engine.py) and through a real Triton (tests/integration)."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI
from openai.types import CompletionChoice, CompletionUsage

from frontend.engine.model import ServedModel
from tests.api.conftest import MODEL, asgi_post, parse_sse
from tests.api.fake_engine import FakeEngine

pytestmark = [pytest.mark.api, pytest.mark.asyncio]


@pytest.mark.parametrize("max_tokens", [0, 2])
async def test_echo_returns_the_prompts_logprobs_first(
    oai: openai.AsyncOpenAI, fake: FakeEngine, served_model: ServedModel, max_tokens: int
) -> None:
    ids = served_model.tokenizer("Hello there, world")["input_ids"]
    c = await oai.completions.create(
        model=MODEL, prompt=ids, max_tokens=max_tokens, temperature=0, logprobs=2, echo=True
    )
    choice = c.choices[0]
    decode = served_model.tokenizer.decode
    assert choice.text.startswith(decode(ids))
    lp = choice.logprobs
    assert lp is not None and lp.tokens is not None and lp.token_logprobs is not None and lp.top_logprobs is not None
    assert lp.tokens[: len(ids)] == [decode([t]) for t in ids]
    expected = fake.prompt_logprobs_event(ids, 2)
    assert lp.token_logprobs[: len(ids)] == pytest.approx(list(expected.logprobs))
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.top_logprobs[1] == {decode([t]): v for t, v in expected.top_logprobs[1]}
    assert lp.text_offset is not None and lp.text_offset[0] == 0
    assert len(lp.tokens) == len(ids) + max_tokens  # then the completion's own tokens
    assert c.usage is not None and c.usage.completion_tokens == max_tokens
    assert choice.finish_reason == "length"
    await fake.drain()
    assert fake.live == 0


@pytest.mark.parametrize("stream", [False, True])
async def test_max_tokens_zero_needs_echo(oai: openai.AsyncOpenAI, stream: bool) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await oai.completions.create(model=MODEL, prompt="Hi", max_tokens=0, logprobs=1, stream=stream)
    assert info.value.param == "max_tokens" and "echo" in info.value.message


_FIELDS = ("tokens", "token_logprobs", "top_logprobs", "text_offset")


async def _streamed_choices(
    oai: openai.AsyncOpenAI, args: dict[str, Any]
) -> tuple[dict[int, list[CompletionChoice]], CompletionUsage | None]:
    """Each choice's streamed pieces, in order, and the usage chunk's usage (None without one)."""
    stream = await oai.completions.create(stream=True, **args)
    pieces: dict[int, list[CompletionChoice]] = {}
    usage = None
    async for chunk in stream:
        for c in chunk.choices:
            pieces.setdefault(c.index, []).append(c)
        if chunk.usage is not None:
            assert chunk.choices == []  # only the last chunk carries the usage
            usage = chunk.usage
    return pieces, usage


def _joined(pieces: list[CompletionChoice]) -> dict[str, Any]:
    """A streamed choice put together: its text, finish_reason and logprobs, as one choice."""
    logprobs: dict[str, list[Any]] = {field: [] for field in _FIELDS}
    for piece in pieces:
        if piece.logprobs is not None:
            for field in _FIELDS:
                logprobs[field] += getattr(piece.logprobs, field) or []
    finishes = [p.finish_reason for p in pieces if p.finish_reason]
    assert len(finishes) == 1 and pieces[-1].finish_reason  # one finish, in the choice's last piece
    return {"text": "".join(p.text for p in pieces), "finish_reason": finishes[0], "logprobs": logprobs}


@pytest.mark.parametrize("include_usage", [False, True])
@pytest.mark.parametrize("max_tokens", [0, 3])
@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 0.9, "seed": 7}], ids=["greedy", "seeded"])
async def test_streamed_echo_logprobs_equal_the_responses(
    oai: openai.AsyncOpenAI,
    served_model: ServedModel,
    fake: FakeEngine,
    include_usage: bool,
    max_tokens: int,
    sampling: dict[str, Any],
) -> None:
    """vLLM's streamed echo: each choice's first chunk opens with the prompt's text and the prompt's
    logprobs; the generated tokens' chunks follow with theirs, text offsets continuing after the
    prompt. Put together, the chunks of a choice are the choice of the same request not streamed."""
    fake.paced = True  # a reader that keeps up: one chunk per token
    prompt = "Hello there, world"
    args: dict[str, Any] = {
        "model": MODEL,
        "prompt": prompt,
        "n": 2,
        "max_tokens": max_tokens,
        "logprobs": 2,
        "echo": True,
        **sampling,
    }
    plain = await oai.completions.create(**args)
    options = {"stream_options": {"include_usage": True}} if include_usage else {}
    pieces, usage = await _streamed_choices(oai, {**args, **options})

    assert sorted(pieces) == [c.index for c in plain.choices] == [0, 1]
    ids = served_model.tokenizer(prompt)["input_ids"]
    decode = served_model.tokenizer.decode
    for choice in plain.choices:
        assert choice.logprobs is not None
        assert _joined(pieces[choice.index]) == {
            "text": choice.text,
            "finish_reason": choice.finish_reason,
            "logprobs": {field: getattr(choice.logprobs, field) for field in _FIELDS},
        }
        first = pieces[choice.index][0]
        assert first.text.startswith(prompt) and first.logprobs is not None
        assert first.logprobs.tokens is not None and first.logprobs.token_logprobs is not None
        assert first.logprobs.top_logprobs is not None and first.logprobs.text_offset is not None
        assert first.logprobs.tokens[: len(ids)] == [decode([t]) for t in ids]
        assert first.logprobs.token_logprobs[0] is None and first.logprobs.top_logprobs[0] is None
        assert first.logprobs.text_offset[: len(ids)] == choice.logprobs.text_offset[: len(ids)]
        assert first.logprobs.text_offset[0] == 0
        if max_tokens == 0:  # the prompt alone, in one chunk that ends the choice
            assert len(pieces[choice.index]) == 1 and first.text == prompt and first.finish_reason == "length"
            assert len(first.logprobs.tokens) == len(ids)
        else:  # then one chunk per generated token (the first token's logprobs with the prompt's), then the finish
            assert len(pieces[choice.index]) == max_tokens + 1
            later = [p.logprobs for p in pieces[choice.index][1:max_tokens]]
            assert all(lp is not None and lp.text_offset and lp.text_offset[0] >= len(prompt) for lp in later)
    if max_tokens:
        assert plain.choices[0].text != plain.choices[1].text or "seed" not in sampling  # choice j: seed + j
    assert usage == (plain.usage if include_usage else None)
    assert [h.prompt_logprobs for h in fake.submitted] == [2] * 4  # each choice asked the prompt's logprobs


async def test_streamed_echo_logprobs_wire_format(client: httpx.AsyncClient, served_model: ServedModel) -> None:
    """lm-evaluation-harness's request streamed: two token-id prompts x n=2, max_tokens 0. Each choice
    is one chunk (the prompt's text, its logprobs, finish_reason "length"), in the completions
    stream's usual shape (nulls left out without include_usage)."""
    prompts = [served_model.tokenizer(p)["input_ids"] for p in ("The cat sat", "A dog")]
    body = {"model": MODEL, "prompt": prompts, "n": 2, "max_tokens": 0, "echo": True, "logprobs": 1, "stream": True}
    r = await client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    events = parse_sse(r.text)
    assert events[-1].data == "[DONE]"
    chunks = [e.json() for e in events[:-1]]
    assert sorted(c["choices"][0]["index"] for c in chunks) == [0, 1, 2, 3]
    decode = served_model.tokenizer.decode
    for chunk in chunks:
        assert set(chunk) == {"id", "object", "created", "model", "choices"}
        (choice,) = chunk["choices"]
        ids = prompts[choice["index"] // 2]
        expected = FakeEngine.prompt_logprobs_event(ids, 1)
        tokens = [decode([t]) for t in ids]
        assert choice == {
            "text": decode(ids),
            "index": choice["index"],
            "logprobs": {
                "tokens": tokens,
                "token_logprobs": list(expected.logprobs),
                "top_logprobs": [None] + [{decode([t]): lp for t, lp in top} for top in expected.top_logprobs[1:]],
                "text_offset": [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))],
            },
            "finish_reason": "length",
        }


async def test_a_failed_streamed_echo_ends_with_the_error(client: httpx.AsyncClient, fake: FakeEngine) -> None:
    fake.fail_after = 1
    body = {"model": MODEL, "prompt": "Hi there", "max_tokens": 4, "echo": True, "logprobs": 1, "stream": True}
    r = await client.post("/v1/completions", json=body)
    assert r.status_code == 200
    events = parse_sse(r.text)
    assert [e.data for e in events[-1:]] == ["[DONE]"]
    assert events[-2].json()["error"]["type"] == "upstream_unavailable"
    await fake.drain()
    assert fake.live == 0


async def test_echo_without_logprobs_asks_no_prompt_logprobs(oai: openai.AsyncOpenAI, fake: FakeEngine) -> None:
    c = await oai.completions.create(model=MODEL, prompt="Hi", max_tokens=2, temperature=0, echo=True)
    assert c.choices[0].text.startswith("Hi") and c.choices[0].logprobs is None
    assert fake.submitted[-1].prompt_logprobs == -1


async def test_the_native_route_returns_prompt_logprobs(client: httpx.AsyncClient, served_model: ServedModel) -> None:
    r = await client.post(
        "/generate", json={"prompt": "Hello there", "max_new_tokens": 2, "temperature": 0, "prompt_logprobs": 2}
    )
    assert r.status_code == 200, r.text
    ids = served_model.tokenizer("Hello there")["input_ids"]
    entries = r.json()["prompt_logprobs"]
    expected = FakeEngine.prompt_logprobs_event(ids, 2)
    assert [e["token_id"] for e in entries] == ids
    assert [e["logprob"] for e in entries] == pytest.approx(list(expected.logprobs))
    assert entries[0]["top_logprobs"] == [] and len(entries[1]["top_logprobs"]) == 2
    for path in ("/generate/stream", "/generate/batch"):
        body = {"prompt": "Hi", "prompt_logprobs": 1}
        r = await client.post(path, json={"requests": [body]} if path.endswith("batch") else body)
        assert r.status_code == 400 and "prompt_logprobs" in r.json()["error"]["param"]


async def test_streamed_echo_logprobs_come_before_the_generation_ends(app: FastAPI, fake: FakeEngine) -> None:
    """The prompt's chunk leaves as soon as the first token is there: a client that goes away after
    it cancels the generation long before max_tokens."""
    fake.delay_s = 0.01
    body = {"model": MODEL, "prompt": "Hello there", "max_tokens": 40, "echo": True, "logprobs": 1, "stream": True}
    exchange = await asgi_post(app, "/v1/completions", body, disconnect_when=lambda text: "Hello there" in text)
    assert exchange.status == 200 and '"token_logprobs": [null,' in exchange.body
    await fake.drain()
    fake.delay_s = 0
    assert fake.live == 0 and len(fake.submitted[-1].emitted) < 10


@pytest.mark.parametrize("stream", [False, True])
async def test_echo_with_max_tokens_zero_and_no_logprobs_is_the_prompt_alone(
    client: httpx.AsyncClient, fake: FakeEngine, served_model: ServedModel, stream: bool
) -> None:
    """vLLM's answer: the prompt, `finish_reason` length, no completion token, and no engine work
    (the engine samples one token for a 0-token generation that asks no prompt logprobs)."""
    prompts = ["Hello there", "Hi"]
    body = {"model": MODEL, "prompt": prompts, "max_tokens": 0, "echo": True, "n": 2, "stream": stream}
    body |= {"stream_options": {"include_usage": True}} if stream else {}
    r = await client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    prompt_tokens = sum(len(served_model.tokenizer(p)["input_ids"]) for p in prompts)
    if stream:
        events = parse_sse(r.text)
        assert events[-1].data == "[DONE]"
        chunks = [e.json() for e in events[:-1]]
        choices = sorted((c["choices"][0] for c in chunks if c["choices"]), key=lambda c: c["index"])
        usage = chunks[-1]["usage"]
    else:
        choices, usage = r.json()["choices"], r.json()["usage"]
    assert [c["text"] for c in choices] == [prompts[0], prompts[0], prompts[1], prompts[1]]
    assert all(c["finish_reason"] == "length" and c["logprobs"] is None for c in choices)
    assert usage == {"prompt_tokens": prompt_tokens, "completion_tokens": 0, "total_tokens": prompt_tokens}
    assert fake.submitted == []
