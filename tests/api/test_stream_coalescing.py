"""Coalescing by backpressure on every streaming route: a reader slower than the engine gets the
tokens waiting for it as ONE chunk, whose concatenation is the per-token stream (text, logprobs,
finish reason, usage); a reader that keeps up gets one chunk per token.

The fake engine plays both readers: `burst` queues that many tokens before the gateway pulls (a
reader that many steps behind), `paced` queues a token only once the last was read. Greedy runs
are deterministic; the cache is off here, so every run reaches the engine."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from frontend.cache import CachedResult, MemoryResultCache
from frontend.engine.model import ServedModel
from frontend.sampling import SamplingParams
from frontend.settings import Settings
from tests.api.conftest import MODEL, parse_sse
from tests.api.fake_engine import FakeEngine

pytestmark = [pytest.mark.api, pytest.mark.asyncio]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "chat_template.jinja"
MESSAGES = [{"role": "user", "content": "Hello there"}]
TOKENS = 12
SLOW = [3, TOKENS]  # the reader 3 steps behind; the whole generation waiting at once


class _NoCache(MemoryResultCache):
    async def put(self, key: str, result: CachedResult) -> None:
        return None  # every run of a test reaches the engine


@pytest.fixture
def cache() -> MemoryResultCache:
    return _NoCache(16, 60.0, max_bytes=1 << 20)


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The API tier's settings, started with the example template."""
    return settings.model_copy(update={"chat_template": EXAMPLE})


async def _stream(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> list[Any]:
    r = await client.post(path, json={**body, "stream": True} if path.startswith("/v1/") else body)
    assert r.status_code == 200, r.text
    events = parse_sse(r.text)
    if path.startswith("/v1/"):
        assert events[-1].data == "[DONE]"
        return [e.json() for e in events[:-1]]
    return [(e.event, e.json()) for e in events]


async def _paced_and_slow(
    client: httpx.AsyncClient, fake: FakeEngine, path: str, body: dict[str, Any], burst: int
) -> tuple[list[Any], list[Any]]:
    """The same request read by a reader that keeps up, then by one `burst` steps behind."""
    fake.paced, fake.burst = True, 1
    fast = await _stream(client, path, body)
    fake.paced, fake.burst = False, burst
    slow = await _stream(client, path, body)
    return fast, slow


# ------------------------------------------------------------------------------- completions
def _completion_choice(chunks: list[dict[str, Any]], index: int = 0) -> dict[str, Any]:
    """A choice's chunks put together: text, logprobs lists, finish reason, chunk count."""
    mine = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == index]
    logprobs: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for choice in mine:
        for field, values in (choice["logprobs"] or {}).items():
            logprobs[field] += values
    return {
        "text": "".join(c["text"] for c in mine),
        "logprobs": logprobs,
        "finish_reason": [c["finish_reason"] for c in mine if c["finish_reason"]],
        "chunks": len(mine),
    }


@pytest.mark.parametrize("burst", SLOW)
async def test_completions_slow_reader_gets_merged_chunks_equal_to_the_per_token_stream(
    client: httpx.AsyncClient, fake: FakeEngine, burst: int
) -> None:
    body = {"model": MODEL, "prompt": "Hello world", "max_tokens": TOKENS, "temperature": 0, "logprobs": 2}
    body["stream_options"] = {"include_usage": True}
    fast, slow = await _paced_and_slow(client, fake, "/v1/completions", body, burst)
    per_token, merged = _completion_choice(fast), _completion_choice(slow)
    assert per_token["chunks"] == TOKENS + 1  # one per token, then the finish
    assert merged["chunks"] < per_token["chunks"]
    assert {**merged, "chunks": 0} == {**per_token, "chunks": 0}
    assert len(merged["logprobs"]["tokens"]) == TOKENS and merged["finish_reason"] == ["length"]
    assert slow[-1]["usage"] == fast[-1]["usage"] and fast[-1]["usage"]["completion_tokens"] == TOKENS
    # Every merged chunk's logprobs lists are parallel: one entry per token, text offsets rising.
    for chunk in slow[:-2]:
        lp = chunk["choices"][0]["logprobs"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"])
        assert "".join(lp["tokens"]) == chunk["choices"][0]["text"]
    plain = await client.post("/v1/completions", json=body)
    choice = plain.json()["choices"][0]
    assert (choice["text"], choice["logprobs"]) == (merged["text"], merged["logprobs"])


async def test_completions_n_choices_merge_each_on_its_own(client: httpx.AsyncClient, fake: FakeEngine) -> None:
    body = {"model": MODEL, "prompt": ["a", "b"], "n": 2, "max_tokens": TOKENS, "temperature": 0, "logprobs": 1}
    fast, slow = await _paced_and_slow(client, fake, "/v1/completions", body, TOKENS)
    for index in range(4):
        per_token, merged = _completion_choice(fast, index), _completion_choice(slow, index)
        assert per_token["chunks"] == TOKENS + 1 and merged["chunks"] < per_token["chunks"]
        assert {**merged, "chunks": 0} == {**per_token, "chunks": 0}


def _stop_across_tokens(fake: FakeEngine, served_model: ServedModel) -> tuple[dict[str, Any], str]:
    """A greedy /v1/completions body whose stop string begins in token 6 and ends in token 7, and
    the text it must return (everything before the stop)."""
    ids = list(served_model.tokenizer("Hello world")["input_ids"])
    tokens = fake.expected_tokens(ids, SamplingParams(temperature=0.0), TOKENS, None)
    pieces = [served_model.tokenizer.decode([t]) for t in tokens]
    stop = pieces[5][-1] + pieces[6][0]
    full = "".join(pieces)
    body = {"model": MODEL, "prompt": "Hello world", "max_tokens": TOKENS, "temperature": 0, "stop": [stop]}
    body["stream_options"] = {"include_usage": True}
    return body, full[: full.index(stop)]


async def test_a_stop_string_spanning_a_merged_chunk_cuts_exactly(
    client: httpx.AsyncClient, fake: FakeEngine, served_model: ServedModel
) -> None:
    """The stop string begins in one token and ends in the next, both inside one merged chunk."""
    body, expected = _stop_across_tokens(fake, served_model)
    fast, slow = await _paced_and_slow(client, fake, "/v1/completions", body, TOKENS)
    per_token, merged = _completion_choice(fast), _completion_choice(slow)
    assert merged["text"] == per_token["text"] == expected
    assert merged["finish_reason"] == per_token["finish_reason"] == ["stop"]
    assert slow[-1]["usage"] == fast[-1]["usage"]
    assert merged["chunks"] == 2  # the text up to the stop, then the finish


# ------------------------------------------------------------------------------------- chat
def _chat_choice(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    mine = [c["choices"][0] for c in chunks if c["choices"]]
    content: list[Any] = []
    for choice in mine:
        content += (choice["logprobs"] or {}).get("content") or []
    return {
        "text": "".join(c["delta"].get("content") or "" for c in mine),
        "logprobs": content,
        "finish_reason": [c["finish_reason"] for c in mine if c["finish_reason"]],
        "chunks": len(mine),
    }


@pytest.mark.parametrize("burst", SLOW)
async def test_chat_slow_reader_gets_merged_chunks_equal_to_the_per_token_stream(
    client: httpx.AsyncClient, fake: FakeEngine, burst: int
) -> None:
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": TOKENS, "temperature": 0, "logprobs": True}
    body |= {"top_logprobs": 2, "stream_options": {"include_usage": True}}
    fast, slow = await _paced_and_slow(client, fake, "/v1/chat/completions", body, burst)
    per_token, merged = _chat_choice(fast), _chat_choice(slow)
    assert per_token["chunks"] == 1 + TOKENS + 1  # the role, one per token, the finish
    assert merged["chunks"] < per_token["chunks"]
    assert {**merged, "chunks": 0} == {**per_token, "chunks": 0}
    assert len(merged["logprobs"]) == TOKENS and merged["finish_reason"] == ["length"]
    assert slow[-1]["usage"] == fast[-1]["usage"]
    for chunk in slow[1:-2]:  # a merged delta's content is its logprobs entries' tokens, in order
        choice = chunk["choices"][0]
        assert "".join(e["token"] for e in choice["logprobs"]["content"]) == choice["delta"]["content"]


# ----------------------------------------------------------------------------------- native
def _native(events: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    tokens = [d for e, d in events if e == "token"]
    ids: list[int] = []
    for d in tokens:
        got = d.get("token_ids", [d["token_id"]] if d["token_id"] is not None else [])
        assert got[:1] == ([d["token_id"]] if d["token_id"] is not None else [])  # token_id: the first
        assert d["position"] == (len(ids) if got else None)  # position: the first's
        ids += got
    (done,) = [d for e, d in events if e == "done"]
    return {"text": "".join(d["text"] for d in tokens), "ids": ids, "done": done, "events": len(tokens)}


@pytest.mark.parametrize("burst", SLOW)
async def test_native_slow_reader_gets_merged_token_events(
    client: httpx.AsyncClient, fake: FakeEngine, served_model: ServedModel, burst: int
) -> None:
    body = {"prompt": "Hello world", "max_new_tokens": TOKENS, "temperature": 0}
    fast, slow = await _paced_and_slow(client, fake, "/generate/stream", body, burst)
    per_token, merged = _native(fast), _native(slow)
    assert per_token["events"] == TOKENS and all("token_ids" not in d for _, d in fast)
    assert merged["events"] < per_token["events"]
    assert {**merged, "events": 0} == {**per_token, "events": 0}
    ids = list(served_model.tokenizer("Hello world")["input_ids"])
    assert merged["ids"] == fake.expected_tokens(ids, SamplingParams(temperature=0.0), TOKENS, None)
    assert merged["done"]["generated_text"] == merged["text"]
    assert merged["done"]["usage"]["completion_tokens"] == TOKENS


# ------------------------------------------------------------------- the process falling behind
# Here every reader keeps up; the PROCESS does not: three streams at once, the fake queuing a token
# for each every loop round, and the service's pacer waking one stream per round
# (frontend.generation.pacing). A stream woken late finds several tokens waiting and sends them
# as one chunk; with the pacer out of the way (a round for everyone) each token goes alone.
STREAMS = 3


async def _fast_then_slow_process(
    client: httpx.AsyncClient, app: FastAPI, fake: FakeEngine, path: str, body: dict[str, Any]
) -> tuple[list[Any], list[list[Any]]]:
    """One stream read token by token, then STREAMS streams of the same request at once while the
    process falls behind."""
    fake.paced, fake.burst = True, 1  # one token at a time, each read before the next: per-token chunks
    fast = await _stream(client, path, body)
    fake.paced, fake.burst = False, 1
    app.state.service.pacer.per_round = 1
    slow = await asyncio.gather(*(_stream(client, path, body) for _ in range(STREAMS)))
    return fast, list(slow)


async def test_completions_coalesce_when_the_process_falls_behind(
    client: httpx.AsyncClient, app: FastAPI, fake: FakeEngine
) -> None:
    body = {"model": MODEL, "prompt": "Hello world", "max_tokens": TOKENS, "temperature": 0, "logprobs": 2}
    body["stream_options"] = {"include_usage": True}
    fast, slow = await _fast_then_slow_process(client, app, fake, "/v1/completions", body)
    per_token = _completion_choice(fast)
    assert per_token["chunks"] == TOKENS + 1  # one per token, then the finish
    sizes = []
    for chunks in slow:
        merged = _completion_choice(chunks)
        assert {**merged, "chunks": 0} == {**per_token, "chunks": 0}  # text, logprobs, finish: the same
        assert chunks[-1]["usage"] == fast[-1]["usage"]
        # A chunk of k tokens carries k logprobs entries, in order, whose tokens spell its text.
        for chunk in chunks[:-2]:
            choice = chunk["choices"][0]
            lp = choice["logprobs"]
            assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"])
            assert "".join(lp["tokens"]) == choice["text"]
            sizes.append(len(lp["tokens"]))
    assert max(sizes) > 1 and sum(sizes) == STREAMS * TOKENS  # coalesced, none lost
    assert len(sizes) < STREAMS * TOKENS


async def test_a_stop_string_across_tokens_coalesced_by_the_process_cuts_exactly(
    client: httpx.AsyncClient, app: FastAPI, fake: FakeEngine, served_model: ServedModel
) -> None:
    body, expected = _stop_across_tokens(fake, served_model)
    fast, slow = await _fast_then_slow_process(client, app, fake, "/v1/completions", body)
    per_token = _completion_choice(fast)
    assert per_token["text"] == expected and per_token["finish_reason"] == ["stop"]
    assert fast[-1]["usage"]["completion_tokens"] == 7  # up to the token that completed the stop
    for chunks in slow:
        merged = _completion_choice(chunks)
        assert (merged["text"], merged["finish_reason"]) == (per_token["text"], ["stop"])
        assert chunks[-1]["usage"] == fast[-1]["usage"]
    assert min(_completion_choice(chunks)["chunks"] for chunks in slow) < per_token["chunks"]  # coalesced


async def test_chat_coalesces_when_the_process_falls_behind(
    client: httpx.AsyncClient, app: FastAPI, fake: FakeEngine
) -> None:
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": TOKENS, "temperature": 0, "logprobs": True}
    body |= {"top_logprobs": 2, "stream_options": {"include_usage": True}}
    fast, slow = await _fast_then_slow_process(client, app, fake, "/v1/chat/completions", body)
    per_token = _chat_choice(fast)
    assert per_token["chunks"] == 1 + TOKENS + 1  # the role, one per token, the finish
    merged = [_chat_choice(chunks) for chunks in slow]
    assert min(m["chunks"] for m in merged) < per_token["chunks"]
    for m, chunks in zip(merged, slow, strict=True):
        assert {**m, "chunks": 0} == {**per_token, "chunks": 0}
        assert chunks[-1]["usage"] == fast[-1]["usage"]


async def test_native_streams_coalesce_when_the_process_falls_behind(
    client: httpx.AsyncClient, app: FastAPI, fake: FakeEngine
) -> None:
    body = {"prompt": "Hello world", "max_new_tokens": TOKENS, "temperature": 0}
    fast, slow = await _fast_then_slow_process(client, app, fake, "/generate/stream", body)
    per_token, merged = _native(fast), [_native(events) for events in slow]
    assert per_token["events"] == TOKENS
    assert min(m["events"] for m in merged) < TOKENS
    for m in merged:
        assert {**m, "events": 0} == {**per_token, "events": 0}
