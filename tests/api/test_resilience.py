"""Resilience at the API: the gateway listens before the engine is up, drains on shutdown, maps
backpressure and the circuit breaker to fast 429/503 with Retry-After, enforces per-request
deadlines, and keeps readiness bounded in time (FakeEngine; no servers)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI

from frontend import lifecycle as lifecycle_module
from frontend.app import create_app
from frontend.cache import MemoryResultCache
from frontend.engine.breaker import BreakerState, CircuitBreaker
from frontend.engine.model import ServedModel
from frontend.engine.protocol import BreakerOpen, ErrorEvent, Overloaded, QueueFull
from frontend.settings import Settings
from tests.api.conftest import assert_error_envelope, parse_sse
from tests.api.fake_engine import FakeEngine

pytestmark = [pytest.mark.api, pytest.mark.asyncio]

NATIVE = {"prompt": "Hello world", "max_new_tokens": 4}
OPENAI = {"model": "tiny", "prompt": "Hello world", "max_tokens": 4}


class SlowStartEngine(FakeEngine):
    """Starts only when `go` is set; the first `failures` starts raise (Triton not there yet)."""

    def __init__(self, model: ServedModel, failures: int = 0) -> None:
        super().__init__(model)
        self.go = asyncio.Event()
        self.failures = failures
        self.attempts = 0
        self.breaker: CircuitBreaker | None = None

    async def start(self) -> None:
        self.attempts += 1
        if self.attempts <= self.failures:
            raise ConnectionError("triton is not up yet")
        await self.go.wait()
        await super().start()


@pytest_asyncio.fixture
async def slow(
    served_model: ServedModel, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[FastAPI, SlowStartEngine, httpx.AsyncClient]]:
    monkeypatch.setattr(lifecycle_module, "START_RETRY_S", 0.01)
    engine = SlowStartEngine(served_model, failures=2)
    app = create_app(
        settings, engine_factory=lambda _s, _m: engine, cache=MemoryResultCache(64, 60.0, max_bytes=1 << 20)
    )
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield app, engine, client


async def test_the_gateway_answers_before_the_engine_is_up(slow: Any) -> None:
    app, engine, client = slow
    assert (await client.get("/health/live")).status_code == 200
    r = await client.get("/health/ready")
    assert r.status_code == 503 and assert_error_envelope(r)["code"] == "starting"
    r = await client.post("/generate", json=NATIVE)
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert assert_error_envelope(r)["code"] == "starting"
    for _ in range(200):  # failed starts are retried
        if engine.attempts > 2:
            break
        await asyncio.sleep(0.01)
    assert engine.attempts == 3
    engine.go.set()
    assert await app.state.lifecycle.wait_started(2)
    assert (await client.get("/health/ready")).status_code == 200
    assert (await client.post("/generate", json=NATIVE)).status_code == 200


def close_like_the_real_engines(fake: FakeEngine) -> None:
    """TritonEngine.close (its scheduler) and RemoteEngine.close end live generations with an error."""
    close = fake.close

    async def closing() -> None:
        for handle in list(fake.handles):
            if handle.task is not None and not handle.task.done():
                (handle.sink or handle.events).put_nowait(ErrorEvent(Overloaded("the gateway is shutting down")))
        await close()

    fake.close = closing  # type: ignore[method-assign]


async def test_drain_refuses_new_work_and_ends_open_streams_with_error_then_done(
    app: FastAPI, client: httpx.AsyncClient, fake: FakeEngine
) -> None:
    close_like_the_real_engines(fake)
    fake.delay_s = 0.02
    stream = asyncio.create_task(client.post("/v1/completions", json={**OPENAI, "max_tokens": 40, "stream": True}))
    while not fake.live:
        await asyncio.sleep(0.005)
    drain = asyncio.create_task(app.state.lifecycle.drain(0.1))
    await asyncio.sleep(0.01)
    r = await client.get("/health/ready")
    assert r.status_code == 503 and assert_error_envelope(r)["code"] == "draining"
    r = await client.post("/generate", json=NATIVE)
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    await drain
    r = await stream
    events = parse_sse(r.text)
    assert events[-1].data == "[DONE]"
    assert events[-2].json()["error"]["type"] == "overloaded_error"  # ended by the drain
    assert len(events) > 2  # it streamed tokens before
    assert fake.live == 0 and fake.closed


async def test_drain_lets_a_short_generation_finish(app: FastAPI, client: httpx.AsyncClient, fake: FakeEngine) -> None:
    fake.delay_s = 0.01
    request = asyncio.create_task(client.post("/generate", json={**NATIVE, "max_new_tokens": 5}))
    while not fake.live:
        await asyncio.sleep(0.005)
    await app.state.lifecycle.drain(5.0)
    r = await request
    assert r.status_code == 200 and r.json()["completion_tokens"] == 5


@pytest.mark.parametrize("where", ["body", "header"])
async def test_a_request_deadline_ends_the_generation_with_504(
    client: httpx.AsyncClient, fake: FakeEngine, where: str
) -> None:
    fake.delay_s = 0.02
    body: dict[str, Any] = {**NATIVE, "max_new_tokens": 40}
    headers = {}
    if where == "body":
        body["timeout"] = 0.1
    else:
        headers["X-Request-Timeout"] = "0.1"
    started = time.perf_counter()
    r = await client.post("/generate", json=body, headers=headers)
    assert r.status_code == 504 and time.perf_counter() - started < 1.0
    assert "0.1 s" in assert_error_envelope(r)["message"]


async def test_a_request_deadline_is_capped_by_the_server_maximum(
    app: FastAPI, client: httpx.AsyncClient, fake: FakeEngine
) -> None:
    app.state.service.request_timeout_s = 0.1
    fake.delay_s = 0.02
    r = await client.post("/generate", json={**NATIVE, "max_new_tokens": 40, "timeout": 100})
    assert r.status_code == 504


async def test_a_deadline_mid_stream_is_an_error_event(client: httpx.AsyncClient, fake: FakeEngine) -> None:
    fake.delay_s = 0.02
    r = await client.post("/generate/stream", json={**NATIVE, "max_new_tokens": 40, "timeout": 0.15})
    events = parse_sse(r.text)
    assert events[0].event == "token" and events[-1].event == "error"
    assert events[-1].json()["error"]["type"] == "upstream_timeout"


async def test_invalid_timeouts_are_400(client: httpx.AsyncClient) -> None:
    assert (await client.post("/generate", json={**NATIVE, "timeout": 0})).status_code == 400
    r = await client.post("/generate", json=NATIVE, headers={"X-Request-Timeout": "soon"})
    assert r.status_code == 400


async def test_the_waiting_cap_is_an_immediate_429(client: httpx.AsyncClient, fake: FakeEngine) -> None:
    fake.submit_error = QueueFull("1024 generations already waiting")
    started = time.perf_counter()
    r = await client.post("/v1/completions", json=OPENAI)
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert time.perf_counter() - started < 0.1
    err = assert_error_envelope(r)
    assert err["type"] == "rate_limit_error" and err["code"] == "queue_full"


async def test_an_open_breaker_is_a_fast_503_with_retry_after(client: httpx.AsyncClient, fake: FakeEngine) -> None:
    assert (await client.post("/generate", json=NATIVE)).status_code == 200  # first-request set-up aside
    fake.submit_error = BreakerOpen("circuit breaker open", retry_after_s=2.6)
    started = time.perf_counter()
    r = await client.post("/generate", json=NATIVE)
    assert time.perf_counter() - started < 0.05
    assert r.status_code == 503 and r.headers["retry-after"] == "3"
    assert assert_error_envelope(r)["type"] == "upstream_unavailable"


async def test_readiness_reports_the_breaker_and_never_hangs(
    client: httpx.AsyncClient, fake: FakeEngine, settings: Settings
) -> None:
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout_s=30)
    fake.breaker = breaker  # type: ignore[attr-defined]
    r = await client.get("/health/ready")
    assert r.status_code == 200 and r.json()["breaker"] == "closed"
    breaker.record_failure("down")
    assert breaker.state is BreakerState.OPEN
    r = await client.get("/health/ready")
    assert r.status_code == 503 and assert_error_envelope(r)["code"] == "breaker_open"
    breaker.record_success()

    async def hangs() -> bool:
        await asyncio.sleep(30)
        return True

    fake.ready = hangs  # type: ignore[method-assign]
    started = time.perf_counter()
    r = await client.get("/health/ready")
    assert r.status_code == 503 and time.perf_counter() - started < settings.probe_timeout_s + 0.5


async def test_breaker_state_is_a_metric(app: FastAPI, client: httpx.AsyncClient) -> None:
    app.state.metrics.breaker_changed(BreakerState.OPEN)
    text = (await client.get("/metrics")).text
    assert "gateway_circuit_breaker_state 2.0" in text


async def test_a_draining_gateway_refuses_generations_at_the_door(app: FastAPI, client: httpx.AsyncClient) -> None:
    """Before routing, authentication and parsing (whose backends may already be gone when a
    whole process group stops): even a malformed body gets the 503 draining."""
    app.state.lifecycle.draining = True
    try:
        for path in ("/generate", "/generate/stream", "/generate/batch", "/v1/completions", "/v1/chat/completions"):
            r = await client.post(path, content=b"{not json")
            assert r.status_code == 503, (path, r.text)
            assert assert_error_envelope(r)["code"] == "draining"
            assert r.headers["retry-after"] == "1"
    finally:
        app.state.lifecycle.draining = False
