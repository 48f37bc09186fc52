"""The OpenAI-compatible routes, driven by the official `openai` SDK (and raw HTTP where the SDK hides
the wire format)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from frontend.engine.model import ServedModel
from frontend.sampling import SamplingParams
from tests.api.conftest import MODEL, parse_sse
from tests.api.fake_engine import EOS_TRIGGER, FakeEngine

pytestmark = [pytest.mark.api, pytest.mark.asyncio]

GREEDY = SamplingParams(temperature=0.0)


def _ids(model: ServedModel, text: str) -> list[int]:
    return list(model.tokenizer(text)["input_ids"])


async def test_completion_non_stream(oai: openai.AsyncOpenAI, fake: FakeEngine, served_model: ServedModel) -> None:
    c = await oai.completions.create(model=MODEL, prompt="Hello world", max_tokens=5, temperature=0)
    assert c.object == "text_completion"
    assert c.id.startswith("cmpl-")
    assert c.model == MODEL
    assert isinstance(c.created, int)
    (choice,) = c.choices
    expected = fake.expected_tokens(_ids(served_model, "Hello world"), GREEDY, 5, None)
    assert choice.text == served_model.tokenizer.decode(expected)
    assert choice.index == 0
    assert choice.finish_reason == "length"
    assert choice.logprobs is None
    n = len(_ids(served_model, "Hello world"))
    assert c.usage is not None
    assert (c.usage.prompt_tokens, c.usage.completion_tokens, c.usage.total_tokens) == (n, 5, n + 5)
    assert fake.live == 0


async def test_defaults_and_extensions(oai: openai.AsyncOpenAI, fake: FakeEngine) -> None:
    await oai.completions.create(model=MODEL, prompt="Hi")
    await oai.completions.create(
        model=MODEL,
        prompt="Hi",
        max_tokens=3,
        seed=5,
        top_p=0.5,
        extra_body={"top_k": 7, "min_p": 0.1, "repetition_penalty": 1.3},
    )
    default, extended = fake.submitted
    assert default.max_new_tokens == 16 and default.params == SamplingParams() and default.seed is None
    assert extended.params == SamplingParams(temperature=1.0, top_k=7, top_p=0.5, min_p=0.1, repetition_penalty=1.3)
    assert extended.seed == 5 and extended.max_new_tokens == 3


async def test_finish_reason_stop(oai: openai.AsyncOpenAI) -> None:
    c = await oai.completions.create(model=MODEL, prompt=f"{EOS_TRIGGER}!", max_tokens=10, temperature=0)
    assert c.choices[0].finish_reason == "stop"
    assert c.usage is not None and c.usage.completion_tokens == 3


async def test_stop_sequence(oai: openai.AsyncOpenAI, served_model: ServedModel, fake: FakeEngine) -> None:
    tokens = fake.expected_tokens(_ids(served_model, "Hello world"), GREEDY, 8, None)
    pieces = [served_model.tokenizer.decode([t]) for t in tokens]
    c = await oai.completions.create(model=MODEL, prompt="Hello world", max_tokens=8, temperature=0, stop=[pieces[3]])
    assert c.choices[0].text == "".join(pieces[:3])
    assert c.choices[0].finish_reason == "stop"


async def test_list_prompt_with_n(oai: openai.AsyncOpenAI, fake: FakeEngine, served_model: ServedModel) -> None:
    prompts = ["The cat", "A small dog"]
    c = await oai.completions.create(model=MODEL, prompt=prompts, n=2, max_tokens=4, temperature=0.8, seed=100)
    assert [ch.index for ch in c.choices] == [0, 1, 2, 3]
    for ch in c.choices:
        p = prompts[ch.index // 2]
        seed = 100 + ch.index % 2  # choice j of a prompt samples with seed + j
        expected = fake.expected_tokens(_ids(served_model, p), SamplingParams(temperature=0.8), 4, seed)
        assert ch.text == served_model.tokenizer.decode(expected)
    assert c.choices[0].text != c.choices[1].text
    prompt_tokens = sum(len(_ids(served_model, p)) for p in prompts)  # each prompt counted once
    assert c.usage is not None
    assert c.usage.prompt_tokens == prompt_tokens
    assert c.usage.completion_tokens == 16
    assert c.usage.total_tokens == prompt_tokens + 16


async def test_token_id_prompts(oai: openai.AsyncOpenAI, fake: FakeEngine) -> None:
    c = await oai.completions.create(model=MODEL, prompt=[[10, 20, 30], [40]], max_tokens=2, temperature=0)
    assert [ch.index for ch in c.choices] == [0, 1]
    assert [h.prompt_ids for h in fake.submitted] == [[10, 20, 30], [40]]
    c = await oai.completions.create(model=MODEL, prompt=[5, 6], max_tokens=2, temperature=0)
    assert len(c.choices) == 1
    assert fake.submitted[-1].prompt_ids == [5, 6]


async def test_stream_with_usage(oai: openai.AsyncOpenAI, served_model: ServedModel, fake: FakeEngine) -> None:
    stream = await oai.completions.create(
        model=MODEL,
        prompt="Hello world",
        max_tokens=5,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    *body, last = chunks
    assert last.choices == []
    assert last.usage is not None
    n = len(_ids(served_model, "Hello world"))
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == (n, 5, n + 5)
    assert all(ch.usage is None for ch in body)
    assert all(len(ch.choices) == 1 and ch.choices[0].index == 0 for ch in body)
    assert len({ch.id for ch in chunks}) == 1
    text = "".join(ch.choices[0].text for ch in body)
    expected = fake.expected_tokens(_ids(served_model, "Hello world"), GREEDY, 5, None)
    assert text == served_model.tokenizer.decode(expected)
    assert [ch.choices[0].finish_reason for ch in body] == [None] * 5 + ["length"]
    assert fake.live == 0


async def test_stream_wire_format(client: httpx.AsyncClient, fake: FakeEngine) -> None:
    fake.paced = True  # a reader that keeps up: one chunk per token
    r = await client.post(
        "/v1/completions", json={"model": MODEL, "prompt": ["a", "b"], "n": 2, "max_tokens": 3, "stream": True}
    )
    assert r.status_code == 200
    assert r.headers["content-type"].split(";")[0] == "text/event-stream"
    events = parse_sse(r.text)
    assert all(e.event is None for e in events)
    assert events[-1].data == "[DONE]"
    chunks = [e.json() for e in events[:-1]]
    assert all(c["object"] == "text_completion" and "usage" not in c for c in chunks)
    finals = sorted(c["choices"][0]["index"] for c in chunks if c["choices"][0].get("finish_reason"))
    assert finals == [0, 1, 2, 3]
    per_choice = {i: sum(1 for c in chunks if c["choices"][0]["index"] == i) for i in range(4)}
    assert per_choice == {i: 4 for i in range(4)}  # 3 tokens + the finish chunk


@pytest.mark.parametrize("include_usage", [False, True])
async def test_stream_chunks_exactly(
    client: httpx.AsyncClient, served_model: ServedModel, fake: FakeEngine, include_usage: bool
) -> None:
    """A streamed completion's chunks byte for byte: without include_usage the nulls are left out
    but a choice's `logprobs` and `finish_reason` (OpenAI sends them on every chunk); with it every
    field is there, `"usage": null` but in the last chunk."""
    body: dict[str, Any] = {"model": MODEL, "prompt": "Hello world", "max_tokens": 2, "temperature": 0, "logprobs": 1}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    r = await client.post("/v1/completions", json={**body, "stream": True})
    assert r.status_code == 200
    events = parse_sse(r.text)
    head = {"id": events[0].json()["id"], "object": "text_completion", "created": events[0].json()["created"]}
    head["model"] = MODEL
    ids = _ids(served_model, "Hello world")
    t0, t1 = [served_model.tokenizer.decode([t]) for t in fake.expected_tokens(ids, GREEDY, 2, None)]
    lp0 = {"tokens": [t0], "token_logprobs": [-0.25], "top_logprobs": [{t0: -0.25}], "text_offset": [0]}
    lp1 = {"tokens": [t1], "token_logprobs": [-0.5], "top_logprobs": [{t1: -0.5}], "text_offset": [len(t0)]}
    if include_usage:
        nulls = {"usage": None, "system_fingerprint": None}
        expected = [
            {**head, "choices": [{"text": t0, "index": 0, "logprobs": lp0, "finish_reason": None}], **nulls},
            {**head, "choices": [{"text": t1, "index": 0, "logprobs": lp1, "finish_reason": None}], **nulls},
            {**head, "choices": [{"text": "", "index": 0, "logprobs": None, "finish_reason": "length"}], **nulls},
            {
                **head,
                "choices": [],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": 2, "total_tokens": len(ids) + 2},
                "system_fingerprint": None,
            },
        ]
    else:
        expected = [
            {**head, "choices": [{"text": t0, "index": 0, "logprobs": lp0, "finish_reason": None}]},
            {**head, "choices": [{"text": t1, "index": 0, "logprobs": lp1, "finish_reason": None}]},
            {**head, "choices": [{"text": "", "index": 0, "logprobs": None, "finish_reason": "length"}]},
        ]
    assert [e.data for e in events] == [json.dumps(x, ensure_ascii=False) for x in expected] + ["[DONE]"]


async def test_logprobs_shape(oai: openai.AsyncOpenAI, served_model: ServedModel, fake: FakeEngine) -> None:
    c = await oai.completions.create(model=MODEL, prompt="Hello world", max_tokens=4, temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert lp is not None
    expected = fake.expected_tokens(_ids(served_model, "Hello world"), GREEDY, 4, None)
    assert lp.tokens == [served_model.tokenizer.decode([t]) for t in expected]
    assert lp.token_logprobs is not None and len(lp.token_logprobs) == 4
    assert all(isinstance(x, float) and x <= 0 for x in lp.token_logprobs)
    assert lp.top_logprobs is not None and len(lp.top_logprobs) == 4
    for token, chosen_lp, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) == 2
        assert top[token] == chosen_lp
    offsets = [0]
    for token in lp.tokens[:-1]:
        offsets.append(offsets[-1] + len(token))
    assert lp.text_offset == offsets


async def test_logprobs_zero(oai: openai.AsyncOpenAI) -> None:
    c = await oai.completions.create(model=MODEL, prompt="Hello", max_tokens=3, temperature=0, logprobs=0)
    lp = c.choices[0].logprobs
    assert lp is not None and lp.tokens is not None and len(lp.tokens) == 3
    assert lp.top_logprobs == [None, None, None]


async def test_stream_logprobs_match_non_stream(oai: openai.AsyncOpenAI) -> None:
    args: dict[str, Any] = {"model": MODEL, "prompt": "Hello world", "max_tokens": 4, "temperature": 0, "logprobs": 2}
    plain = (await oai.completions.create(**args)).choices[0].logprobs
    stream = await oai.completions.create(**args, stream=True)
    pieces = [ch.choices[0].logprobs for ch in [c async for c in stream] if ch.choices and ch.choices[0].logprobs]
    assert plain is not None
    assert [t for p in pieces for t in (p.tokens or [])] == plain.tokens
    assert [t for p in pieces for t in (p.top_logprobs or [])] == plain.top_logprobs
    assert [t for p in pieces for t in (p.text_offset or [])] == plain.text_offset


async def test_echo(oai: openai.AsyncOpenAI, served_model: ServedModel, fake: FakeEngine) -> None:
    c = await oai.completions.create(model=MODEL, prompt="Hello world", max_tokens=3, temperature=0, echo=True)
    expected = fake.expected_tokens(_ids(served_model, "Hello world"), GREEDY, 3, None)
    assert c.choices[0].text == "Hello world" + served_model.tokenizer.decode(expected)
    assert c.usage is not None and c.usage.completion_tokens == 3
    ids = _ids(served_model, "Hello world")
    c = await oai.completions.create(model=MODEL, prompt=ids, max_tokens=3, temperature=0, echo=True)
    assert c.choices[0].text.startswith("Hello world")
    stream = await oai.completions.create(
        model=MODEL, prompt="Hello world", max_tokens=3, temperature=0, echo=True, stream=True
    )
    texts = [ch.choices[0].text async for ch in stream]
    assert texts[0].startswith("Hello world")
    assert "".join(texts) == "Hello world" + served_model.tokenizer.decode(expected)


async def test_models_list(oai: openai.AsyncOpenAI, served_model: ServedModel) -> None:
    page = await oai.models.list()
    models = [m async for m in page]
    assert [m.id for m in models] == [MODEL]
    assert models[0].object == "model"
    assert models[0].created == served_model.created
    assert isinstance(models[0].owned_by, str)


async def test_unknown_model_is_not_found(oai: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        await oai.completions.create(model="gpt-3.5-turbo-instruct", prompt="Hi")
    assert info.value.status_code == 404
    assert "gpt-3.5-turbo-instruct" in info.value.message
    assert info.value.code == "model_not_found"
    assert info.value.param == "model"


@pytest.mark.parametrize(
    ("kwargs", "param", "fragment"),
    [
        ({"presence_penalty": -2.5}, "presence_penalty", "greater than or equal"),
        ({"n": 9}, "n", "at most 3"),
        ({"max_tokens": 0, "stream": True}, "max_tokens", "echo"),
        ({"logprobs": 6}, "logprobs", "5"),
        ({"prompt": ""}, "prompt", "empty"),
    ],
)
async def test_bad_request_errors(
    oai: openai.AsyncOpenAI, kwargs: dict[str, object], param: str, fragment: str
) -> None:
    args: dict[str, object] = {"model": MODEL, "prompt": "Hi", **kwargs}
    with pytest.raises(openai.BadRequestError) as info:
        await oai.completions.create(**args)  # type: ignore[call-overload]
    assert info.value.status_code == 400
    assert info.value.param == param
    assert info.value.type == "invalid_request_error"
    assert fragment in info.value.message


async def test_overloaded_through_sdk(oai: openai.AsyncOpenAI, fake: FakeEngine) -> None:
    from frontend.engine.protocol import Overloaded

    fake.submit_error = Overloaded("queue full")
    with pytest.raises(openai.InternalServerError) as info:
        await oai.completions.create(model=MODEL, prompt="Hi")
    assert info.value.status_code == 503
    assert info.value.response.headers["retry-after"] == "1"


async def test_stream_error_chunk_through_sdk(oai: openai.AsyncOpenAI, fake: FakeEngine) -> None:
    fake.fail_after = 2
    stream = await oai.completions.create(model=MODEL, prompt="Hi", max_tokens=6, stream=True)
    seen = []
    with pytest.raises(openai.APIError) as info:
        async for chunk in stream:
            seen.append(chunk)
    assert len(seen) == 2
    assert "went away" in info.value.message
    await fake.drain()
    assert fake.live == 0


async def test_seeded_n_is_cached_per_choice(oai: openai.AsyncOpenAI, fake: FakeEngine) -> None:
    a = await oai.completions.create(model=MODEL, prompt="Hi there", n=2, max_tokens=3, seed=1)
    b = await oai.completions.create(model=MODEL, prompt="Hi there", n=2, max_tokens=3, seed=1)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len(fake.submitted) == 2  # the second request was served from the cache
    c = await oai.completions.create(model=MODEL, prompt="Hi there", n=2, max_tokens=3)
    d = await oai.completions.create(model=MODEL, prompt="Hi there", n=2, max_tokens=3)
    assert len(fake.submitted) == 6  # unseeded: never cached
    assert len({x.text for x in [*c.choices, *d.choices]}) == 4


async def test_logprobs_text_offset_with_held_back_text(
    oai: openai.AsyncOpenAI, served_model: ServedModel, fake: FakeEngine
) -> None:
    tokens = fake.expected_tokens(_ids(served_model, "Hello world"), GREEDY, 6, None)
    pieces = [served_model.tokenizer.decode([t]) for t in tokens]
    stop = pieces[2] + "\x07never"  # pieces[2] looks like the start of a stop string, then is released
    c = await oai.completions.create(
        model=MODEL, prompt="Hello world", max_tokens=6, temperature=0, logprobs=1, stop=[stop]
    )
    choice = c.choices[0]
    assert choice.text == "".join(pieces) and choice.finish_reason == "length"  # the stop never matched
    assert choice.logprobs is not None and choice.logprobs.tokens == pieces
    offsets = [sum(len(p) for p in pieces[:i]) for i in range(len(pieces))]
    assert choice.logprobs.text_offset == offsets


async def test_failed_choice_cancels_its_siblings(client: httpx.AsyncClient, fake: FakeEngine) -> None:
    fake.delay_s = 0.005
    fake.fail_after = 1
    fake.fail_only_if_prompt_contains = "boom"
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": ["fine", "boom"], "max_tokens": 40})
    assert r.status_code == 503
    try:
        assert fake.live == 0  # the request is over: nothing may still be generating for it
    finally:
        fake.delay_s = 0
        await fake.drain()
