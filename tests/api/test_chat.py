"""/v1/chat/completions through the official `openai` SDK: the example template given at start
(GATEWAY_CHAT_TEMPLATE), a checkpoint's own template, streaming and not, vLLM's extensions, and the
one error shape for bad input (no template, unknown fields, out-of-range values)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import pytest_asyncio
from transformers import AutoTokenizer

from frontend.app import create_app
from frontend.cache import MemoryResultCache
from frontend.chat import load_chat_template, render_chat
from frontend.engine.model import ServedModel
from frontend.sampling import SamplingParams
from frontend.settings import Settings
from tests.api.conftest import MODEL, assert_error_envelope, parse_sse
from tests.api.fake_engine import EOS_TRIGGER, FakeEngine

pytestmark = [pytest.mark.api, pytest.mark.asyncio]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "chat_template.jinja"
MESSAGES: list[Any] = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hello there"},
]
GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The API tier's settings, started with the example template."""
    return settings.model_copy(update={"chat_template": EXAMPLE})


def _prompt_ids(model: ServedModel, messages: list[Any] = MESSAGES) -> list[int]:
    text = render_chat(model.tokenizer, EXAMPLE.read_text(), messages)
    return list(model.tokenizer(text, add_special_tokens=False)["input_ids"])


async def test_example_template_renders_a_transcript(served_model: ServedModel) -> None:
    template = load_chat_template(EXAMPLE)
    text = render_chat(served_model.tokenizer, template, MESSAGES)
    assert text == "System: You are terse.\n\nUser: Hello there\n\nAssistant:"
    assert not render_chat(served_model.tokenizer, template, MESSAGES, add_generation_prompt=False).endswith(
        "Assistant:"
    )


async def test_a_bad_template_file_fails_the_start(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read"):
        load_chat_template(tmp_path / "missing.jinja")
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}")
    with pytest.raises(ValueError, match="line 1"):
        load_chat_template(broken)


async def test_chat_non_stream(oai: openai.AsyncOpenAI, fake: FakeEngine, served_model: ServedModel) -> None:
    c = await oai.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=5, temperature=0)
    assert c.object == "chat.completion" and c.id.startswith("chatcmpl-") and c.model == MODEL
    (choice,) = c.choices
    ids = _prompt_ids(served_model)
    assert fake.submitted[0].prompt_ids == ids  # the conversation, rendered by the template
    expected = fake.expected_tokens(ids, GREEDY, 5, None)
    assert choice.message.role == "assistant"
    assert choice.message.content == served_model.tokenizer.decode(expected)
    assert choice.finish_reason == "length" and choice.logprobs is None
    assert c.usage is not None
    assert (c.usage.prompt_tokens, c.usage.completion_tokens, c.usage.total_tokens) == (len(ids), 5, len(ids) + 5)
    assert fake.live == 0


async def test_chat_stream(oai: openai.AsyncOpenAI, fake: FakeEngine, served_model: ServedModel) -> None:
    stream = await oai.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=4,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    first = chunks[0].choices[0]
    assert (first.delta.role, first.delta.content) == ("assistant", "")
    text = "".join(ch.delta.content or "" for c in chunks for ch in c.choices)
    ids = _prompt_ids(served_model)
    assert text == served_model.tokenizer.decode(fake.expected_tokens(ids, GREEDY, 4, None))
    finishes = [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 4 and chunks[-1].usage.prompt_tokens == len(ids)


async def test_chat_stream_wire_format(client: httpx.AsyncClient) -> None:
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2, "stream": True, "n": 2, "seed": 3}
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(r.text)
    assert events[-1].data == "[DONE]"
    payloads = [e.json() for e in events[:-1]]
    assert [p["choices"][0]["delta"] for p in payloads[:2]] == [{"role": "assistant", "content": ""}] * 2
    assert sorted(p["choices"][0]["index"] for p in payloads if p["choices"][0].get("finish_reason")) == [0, 1]


@pytest.mark.parametrize("include_usage", [False, True])
async def test_chat_stream_chunks_exactly(
    client: httpx.AsyncClient, served_model: ServedModel, fake: FakeEngine, include_usage: bool
) -> None:
    """A streamed chat's chunks byte for byte: nulls left out (no `system_fingerprint`), but a
    choice's `logprobs` and `finish_reason`, on every chunk as OpenAI sends them, and with
    include_usage `"usage": null` in all but the last."""
    body: dict[str, Any] = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2, "temperature": 0}
    body |= {"logprobs": True, "top_logprobs": 1}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    r = await client.post("/v1/chat/completions", json={**body, "stream": True})
    assert r.status_code == 200
    events = parse_sse(r.text)
    head = {"id": events[0].json()["id"], "object": "chat.completion.chunk", "created": events[0].json()["created"]}
    head["model"] = MODEL
    ids = _prompt_ids(served_model)
    t0, t1 = [served_model.tokenizer.decode([t]) for t in fake.expected_tokens(ids, GREEDY, 2, None)]

    def logprobs(token: str, value: float) -> dict[str, Any]:
        entry = {"token": token, "logprob": value, "bytes": list(token.encode())}
        return {"content": [{**entry, "top_logprobs": [entry]}]}

    choices = [
        [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}],
        [{"index": 0, "delta": {"content": t0}, "logprobs": logprobs(t0, -0.25), "finish_reason": None}],
        [{"index": 0, "delta": {"content": t1}, "logprobs": logprobs(t1, -0.5), "finish_reason": None}],
        [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}],
    ]
    if include_usage:
        expected = [{**head, "choices": c, "usage": None} for c in choices]
        usage = {"prompt_tokens": len(ids), "completion_tokens": 2, "total_tokens": len(ids) + 2}
        expected.append({**head, "choices": [], "usage": usage})
    else:
        expected = [{**head, "choices": c} for c in choices]
    assert [e.data for e in events] == [json.dumps(x, ensure_ascii=False) for x in expected] + ["[DONE]"]


async def test_chat_n_and_seed(oai: openai.AsyncOpenAI, fake: FakeEngine, served_model: ServedModel) -> None:
    c = await oai.chat.completions.create(model=MODEL, messages=MESSAGES, n=2, max_tokens=3, temperature=0.7, seed=40)
    ids = _prompt_ids(served_model)
    for choice in c.choices:
        sampled = SamplingParams(temperature=0.7)
        expected = fake.expected_tokens(ids, sampled, 3, 40 + choice.index)
        assert choice.message.content == served_model.tokenizer.decode(expected)
    assert [h.seed for h in fake.submitted] == [40, 41]
    assert c.usage is not None and c.usage.prompt_tokens == len(ids)  # the shared prompt counts once


async def test_chat_logprobs(oai: openai.AsyncOpenAI, served_model: ServedModel) -> None:
    c = await oai.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=3, temperature=0, logprobs=True, top_logprobs=2
    )
    content = c.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 3
    assert "".join(t.token for t in content) == c.choices[0].message.content
    for t in content:
        assert t.logprob <= 0 and t.bytes == list(t.token.encode())
        assert len(t.top_logprobs) == 2 and t.top_logprobs[0].token == t.token
    stream = await oai.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=3, temperature=0, logprobs=True, top_logprobs=2, stream=True
    )
    streamed = [
        t for ch in [x async for x in stream] for c_ in ch.choices if c_.logprobs for t in c_.logprobs.content or []
    ]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in content]


@pytest.mark.parametrize("stream", [False, True])
async def test_chat_extensions(
    oai: openai.AsyncOpenAI, fake: FakeEngine, served_model: ServedModel, stream: bool
) -> None:
    messages = [{"role": "user", "content": f"say {EOS_TRIGGER}"}]
    ids = _prompt_ids(served_model, messages)
    expected = fake.expected_tokens(ids, GREEDY, 6, None, ignore_eos=True, stop_token_ids=[])
    stop_id = next(t for t in expected[3:] if t != served_model.eos_token_id and t not in expected[:3])
    extra = {
        "ignore_eos": True,
        "stop_token_ids": [stop_id],
        "include_stop_str_in_output": True,
        "top_k": 4,
        "min_p": 0.01,
        "repetition_penalty": 1.1,
    }
    args: dict[str, Any] = {"model": MODEL, "messages": messages, "max_tokens": 6, "temperature": 0}
    if stream:
        s = await oai.chat.completions.create(stream=True, extra_body=extra, **args)
        chunks = [c async for c in s]
        text = "".join(ch.delta.content or "" for c in chunks for ch in c.choices)
        finish = next(ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason)
    else:
        c = await oai.chat.completions.create(extra_body=extra, **args)
        text, finish = c.choices[0].message.content or "", c.choices[0].finish_reason
    upto = expected[: expected.index(stop_id) + 1]
    assert text == served_model.tokenizer.decode(upto, skip_special_tokens=True)
    assert finish == "stop"
    handle = fake.submitted[-1]
    assert (handle.ignore_eos, handle.stop_token_ids) == (True, (stop_id,))
    assert handle.params == SamplingParams(temperature=0.0, top_k=4, min_p=0.01, repetition_penalty=1.1)


@pytest.mark.parametrize("stream", [False, True])
async def test_chat_penalties_and_logit_bias(oai: openai.AsyncOpenAI, fake: FakeEngine, stream: bool) -> None:
    args: dict[str, Any] = {
        "model": MODEL,
        "messages": MESSAGES,
        "max_tokens": 3,
        "presence_penalty": -0.5,
        "frequency_penalty": 1.5,
        "logit_bias": {"13": 5, "0": -100},
    }
    if stream:
        async for _ in await oai.chat.completions.create(stream=True, **args):
            pass
    else:
        await oai.chat.completions.create(**args)
    params = fake.submitted[-1].params
    assert (params.presence_penalty, params.frequency_penalty) == (-0.5, 1.5)
    assert params.logit_bias == ((0, -100.0), (13, 5.0))


async def test_text_content_parts(oai: openai.AsyncOpenAI, fake: FakeEngine, served_model: ServedModel) -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]}]
    await oai.chat.completions.create(model=MODEL, messages=parts, max_tokens=2)  # type: ignore[arg-type]
    assert fake.submitted[0].prompt_ids == _prompt_ids(served_model, [{"role": "user", "content": "Hello\nthere"}])


@pytest.mark.parametrize(
    ("body", "status", "param", "fragment"),
    [
        ({"messages": []}, 400, "messages", "must not be empty"),
        ({"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role", "'system'"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            400,
            "messages[0].content[0].type",
            "'text'",
        ),
        ({"tools": []}, 400, "tools", "Extra inputs"),
        ({"ignore_eos_please": True}, 400, "ignore_eos_please", "Extra inputs"),
        ({"temperature": 3}, 400, "temperature", "less than or equal"),
        ({"max_completion_tokens": 49}, 400, "max_completion_tokens", "limit of 48"),
        ({"max_tokens": 49}, 400, "max_tokens", "limit of 48"),
        (
            {"messages": [{"role": "user", "content": "the cat " * 30}], "max_tokens": 40},
            400,
            "messages",
            "maximum context",
        ),
        ({"top_logprobs": 6, "logprobs": True}, 400, "top_logprobs", "less than or equal"),
        ({"top_logprobs": 2}, 400, "top_logprobs", "logprobs: true"),
        ({"presence_penalty": 2.5}, 400, "presence_penalty", "less than or equal"),
        ({"logit_bias": {"512": 1.0}}, 400, "logit_bias", "[0, 512)"),
        ({"n": 4}, 400, "n", "at most 3"),
        ({"min_tokens": 30, "max_tokens": 5}, 400, "min_tokens", "must not exceed max_tokens"),
        ({"model": "gpt-4o"}, 404, "model", "gpt-4o"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
async def test_bad_chat_requests(
    client: httpx.AsyncClient, body: dict[str, Any], status: int, param: str, fragment: str, stream: bool
) -> None:
    payload = {"model": MODEL, "messages": MESSAGES, "stream": stream, **body}
    r = await client.post("/v1/chat/completions", json=payload)
    assert r.status_code == status, r.text
    err = assert_error_envelope(r)
    assert err["param"] == param
    assert fragment in err["message"]


async def test_a_template_that_refuses_is_a_400(tmp_path: Path, fake: FakeEngine) -> None:
    strict = tmp_path / "strict.jinja"
    strict.write_text(
        "{% if messages[0]['role'] != 'system' %}{{ raise_exception('the first message must be a system message') }}"
        "{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    settings = Settings(environment="test", model=MODEL, chat_template=strict)
    app = create_app(settings, engine_factory=lambda _s, _m: fake, cache=MemoryResultCache(16, 60.0))
    async with app.router.lifespan_context(app):
        assert await app.state.lifecycle.wait_started(5)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
            r = await http.post("/v1/chat/completions", json=body)
    assert r.status_code == 400
    err = assert_error_envelope(r)
    assert err["param"] == "messages" and "must be a system message" in err["message"]
    assert fake.submitted == []


# ------------------------------------------------------------ without a template, and the checkpoint's own
@pytest_asyncio.fixture
async def sdk_for(fake: FakeEngine) -> AsyncIterator[Any]:
    """An SDK client over an app built from `settings` and a served model of the test's choosing."""
    stack: list[Any] = []

    async def make(settings: Settings, model: ServedModel) -> openai.AsyncOpenAI:
        fake.model = model
        app = create_app(settings, engine_factory=lambda _s, _m: fake, cache=MemoryResultCache(16, 60.0))
        lifespan = app.router.lifespan_context(app)
        await lifespan.__aenter__()
        stack.append(lifespan)
        assert await app.state.lifecycle.wait_started(5)
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
        stack.append(http)
        return openai.AsyncOpenAI(base_url="http://test/v1", api_key="x", http_client=http, max_retries=0)  # type: ignore[arg-type]

    yield make
    for item in reversed(stack):
        if isinstance(item, httpx.AsyncClient):
            await item.aclose()
        else:
            await item.__aexit__(None, None, None)
    await fake.drain()
    assert fake.live == 0


async def test_no_template_is_a_clear_400(sdk_for: Any, served_model: ServedModel) -> None:
    sdk = await sdk_for(Settings(environment="test", model=MODEL), served_model)
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as info:
            await sdk.chat.completions.create(model=MODEL, messages=MESSAGES, stream=stream)
        assert info.value.code == "chat_template_missing"
        assert info.value.param == "messages"
        assert "GATEWAY_CHAT_TEMPLATE" in info.value.message and "examples/chat_template.jinja" in info.value.message
    # Completions still work: the template is only what chat needs.
    assert (await sdk.completions.create(model=MODEL, prompt="Hi", max_tokens=2)).choices[0].text


async def test_the_checkpoints_own_template(
    sdk_for: Any, served_model: ServedModel, fake: FakeEngine, tmp_path: Path
) -> None:
    """A checkpoint whose tokenizer_config carries `chat_template` needs no setting; a setting wins."""
    tokenizer = AutoTokenizer.from_pretrained(_saved_tokenizer(served_model, tmp_path))
    assert tokenizer.chat_template is not None  # loaded from the checkpoint's files
    model = ServedModel(**{**served_model.__dict__, "tokenizer": tokenizer})
    sdk = await sdk_for(Settings(environment="test", model=MODEL), model)
    await sdk.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
    own = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert own == "<|system|>You are terse.<|user|>Hello there<|assistant|>"
    assert fake.submitted[-1].prompt_ids == list(tokenizer(own, add_special_tokens=False)["input_ids"])

    sdk = await sdk_for(Settings(environment="test", model=MODEL, chat_template=EXAMPLE), model)
    await sdk.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
    assert fake.submitted[-1].prompt_ids == _prompt_ids(served_model)


def _saved_tokenizer(model: ServedModel, tmp_path: Path) -> Path:
    out = tmp_path / "checkpoint"
    tokenizer = AutoTokenizer.from_pretrained(model.tokenizer.name_or_path)
    tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    tokenizer.save_pretrained(out)
    return out
