"""Result-cache semantics seen through the API: only complete, deterministic generations are cached."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from frontend.cache import MemoryResultCache
from tests.api.conftest import asgi_post, parse_sse
from tests.api.fake_engine import FakeEngine

pytestmark = [pytest.mark.api, pytest.mark.asyncio]


async def _gen(client: httpx.AsyncClient, **payload: Any) -> dict[str, Any]:
    r = await client.post("/generate", json={"prompt": "Once upon a time", "max_new_tokens": 6, **payload})
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


async def test_greedy_twice_second_cached(client: httpx.AsyncClient, fake: FakeEngine) -> None:
    first = await _gen(client, temperature=0)
    second = await _gen(client, temperature=0)
    assert (first["cached"], second["cached"]) == (False, True)
    assert second["generated_text"] == first["generated_text"]
    assert second["usage"] == first["usage"]
    assert second["finish_reason"] == first["finish_reason"]
    assert len(fake.submitted) == 1  # the hit never reached the engine


async def test_seeded_sampling_twice_cached_identical(client: httpx.AsyncClient, fake: FakeEngine) -> None:
    first = await _gen(client, temperature=0.9, seed=42)
    second = await _gen(client, temperature=0.9, seed=42)
    assert (first["cached"], second["cached"]) == (False, True)
    assert second["generated_text"] == first["generated_text"]
    other_seed = await _gen(client, temperature=0.9, seed=43)
    assert other_seed["cached"] is False
    assert other_seed["generated_text"] != first["generated_text"]
    assert len(fake.submitted) == 2


async def test_unseeded_sampling_never_cached(
    client: httpx.AsyncClient, fake: FakeEngine, cache: MemoryResultCache
) -> None:
    results = [await _gen(client, temperature=0.9) for _ in range(3)]
    assert [r["cached"] for r in results] == [False] * 3
    assert len({r["generated_text"] for r in results}) == 3  # really sampled anew each time
    assert len(fake.submitted) == 3
    assert cache.stats().stores == 0


@pytest.mark.parametrize(
    "change", [{"max_new_tokens": 5}, {"stop": ["zzz"]}, {"top_k": 3}, {"prompt": "Once upon a tim"}]
)
async def test_any_parameter_change_is_a_miss(client: httpx.AsyncClient, change: dict[str, Any]) -> None:
    assert (await _gen(client, temperature=0))["cached"] is False
    assert (await _gen(client, temperature=0, **change))["cached"] is False


async def test_cached_stream_replays_the_same_events(client: httpx.AsyncClient, fake: FakeEngine) -> None:
    payload = {"prompt": "Stream me", "max_new_tokens": 5, "temperature": 0.5, "seed": 9}
    first = parse_sse((await client.post("/generate/stream", json=payload)).text)
    second = parse_sse((await client.post("/generate/stream", json=payload)).text)
    assert [e.event for e in second] == ["token"] * 5 + ["done"]
    assert [(e.event, e.json()) for e in second[:-1]] == [(e.event, e.json()) for e in first[:-1]]
    d1, d2 = first[-1].json(), second[-1].json()
    assert (d1["cached"], d2["cached"]) == (False, True)
    assert {k: v for k, v in d1.items() if k != "cached"} == {k: v for k, v in d2.items() if k != "cached"}
    assert len(fake.submitted) == 1
    # and a non-stream request reads the same entry
    plain = (await client.post("/generate", json=payload)).json()
    assert plain["cached"] is True and plain["generated_text"] == d1["generated_text"]


async def test_failed_generation_is_not_cached(
    client: httpx.AsyncClient, fake: FakeEngine, cache: MemoryResultCache
) -> None:
    fake.fail_after = 3
    r = await client.post("/generate", json={"prompt": "fragile", "max_new_tokens": 6, "temperature": 0})
    assert r.status_code == 503
    fake.fail_after = None
    retry = await client.post("/generate", json={"prompt": "fragile", "max_new_tokens": 6, "temperature": 0})
    assert retry.status_code == 200
    assert retry.json()["cached"] is False
    assert retry.json()["completion_tokens"] == 6
    assert cache.stats().stores == 1
    assert fake.live == 0


async def test_failed_stream_is_not_cached(client: httpx.AsyncClient, fake: FakeEngine) -> None:
    payload = {"prompt": "fragile stream", "max_new_tokens": 6, "temperature": 0}
    fake.fail_after = 3
    events = parse_sse((await client.post("/generate/stream", json=payload)).text)
    assert events[-1].event == "error"
    fake.fail_after = None
    events = parse_sse((await client.post("/generate/stream", json=payload)).text)
    assert events[-1].event == "done" and events[-1].json()["cached"] is False


async def test_cancelled_stream_is_not_cached_and_frees_the_slot(
    app: FastAPI, client: httpx.AsyncClient, fake: FakeEngine, cache: MemoryResultCache
) -> None:
    payload = {"prompt": "walk away", "max_new_tokens": 40, "temperature": 0}
    fake.delay_s = 0.01
    exchange = await asgi_post(
        app, "/generate/stream", payload, disconnect_when=lambda body: body.count("event: token") >= 2
    )
    assert exchange.status == 200
    read = parse_sse(exchange.body)
    assert [e.event for e in read][:2] == ["token", "token"]
    await fake.drain()
    (handle,) = fake.submitted
    assert handle.cancelled
    assert len(handle.emitted) < 40  # the generation stopped, it did not run to the end
    assert fake.live == 0
    assert cache.stats().stores == 0
    fake.delay_s = 0.0
    again = await client.post("/generate", json=payload)
    assert again.json()["cached"] is False
    assert again.json()["completion_tokens"] == 40


async def test_cancelled_openai_stream_frees_every_choice(
    app: FastAPI, fake: FakeEngine, cache: MemoryResultCache
) -> None:
    payload = {"model": "tiny", "prompt": ["a b", "c d"], "n": 2, "max_tokens": 40, "stream": True, "temperature": 0}
    fake.delay_s = 0.01
    exchange = await asgi_post(app, "/v1/completions", payload, disconnect_when=lambda body: body.count("data:") >= 3)
    assert exchange.status == 200
    await fake.drain()
    assert len(fake.submitted) == 4
    assert all(h.cancelled and len(h.emitted) < 40 for h in fake.submitted)
    assert fake.live == 0
    assert cache.stats().stores == 0
