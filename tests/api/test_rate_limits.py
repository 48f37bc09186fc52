"""Rate limits and token quotas (frontend.security.ratelimit) on the memory storage, fake engine."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from starlette.requests import Request

from frontend.app import create_app
from frontend.security.clientip import client_ip, parse_networks
from frontend.security.gateway import Security
from frontend.security.ratelimit import RateLimiter, duration
from frontend.settings import Settings
from tests.api.conftest import MODEL, assert_error_envelope
from tests.api.fake_engine import EOS_TRIGGER, FakeEngine
from tests.api.test_auth import add_key, bearer

pytestmark = pytest.mark.api


def base_settings(tmp_path: Path | None, **kw: Any) -> Settings:
    return Settings(
        environment="test",
        model=MODEL,
        max_new_tokens_limit=48,
        request_timeout_s=5.0,
        keys_path=None if tmp_path is None else tmp_path / "keys.sqlite3",
        **kw,
    )


@asynccontextmanager
async def running(settings: Settings, fake: FakeEngine, peer: str = "127.0.0.1") -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings, engine_factory=lambda _s, _m: fake)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, client=(peer, 1234))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            c.app = app  # type: ignore[attr-defined]
            yield c
        await fake.drain()
    assert fake.live == 0


def tokens_used(client: httpx.AsyncClient, key_id: str) -> int:
    app: FastAPI = client.app  # type: ignore[attr-defined]
    limiter: RateLimiter = app.state.security.limiter
    day = RateLimiter._day(time.time())[0]
    return int(limiter.storage.storage.get(f"tokens/{key_id}/{day}", 0))  # type: ignore[attr-defined]


def n_prompt(fake: FakeEngine, text: str) -> int:
    return len(fake.model.tokenizer(text)["input_ids"])


# ------------------------------------------------------------------------------ requests per minute
@pytest.mark.asyncio
async def test_200_concurrent_requests_against_a_limit_of_100_admit_exactly_100(
    tmp_path: Path, fake: FakeEngine
) -> None:
    _, key = await add_key(tmp_path / "keys.sqlite3", rpm=100)
    async with running(base_settings(tmp_path), fake) as c:
        rs = await asyncio.gather(*(c.get("/v1/models", headers=bearer(key)) for _ in range(200)))
    codes = [r.status_code for r in rs]
    assert codes.count(200) == 100 and codes.count(429) == 100, codes
    refused = next(r for r in rs if r.status_code == 429)
    err = assert_error_envelope(refused)
    assert err["type"] == "rate_limit_error" and err["code"] == "rate_limit_exceeded"
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert refused.headers["x-ratelimit-limit-requests"] == "100"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.headers["x-ratelimit-reset-requests"].endswith("s")


@pytest.mark.asyncio
async def test_each_key_has_its_own_window_and_the_default_applies(tmp_path: Path, fake: FakeEngine) -> None:
    _, a = await add_key(tmp_path / "keys.sqlite3", rpm=2)
    _, b = await add_key(tmp_path / "keys.sqlite3")  # the gateway's default
    _, unlimited = await add_key(tmp_path / "keys.sqlite3", rpm=0)
    async with running(base_settings(tmp_path, default_key_rpm=3), fake) as c:
        assert [(await c.get("/v1/models", headers=bearer(a))).status_code for _ in range(3)] == [200, 200, 429]
        assert [(await c.get("/v1/models", headers=bearer(b))).status_code for _ in range(4)] == [200] * 3 + [429]
        assert all([(await c.get("/v1/models", headers=bearer(unlimited))).status_code == 200 for _ in range(20)])


# ------------------------------------------------------------------------------ tokens per day
@pytest.mark.asyncio
async def test_tokens_are_reserved_then_settled_to_the_real_count(tmp_path: Path, fake: FakeEngine) -> None:
    key_id, key = await add_key(tmp_path / "keys.sqlite3", tokens_per_day=1000)
    async with running(base_settings(tmp_path), fake) as c:
        prompt = f"Say {EOS_TRIGGER} now"  # the fake stops after 3 tokens whatever max_new_tokens says
        fake.delay_s = 0.05
        task = asyncio.create_task(
            c.post("/generate", json={"prompt": prompt, "max_new_tokens": 40, "temperature": 0}, headers=bearer(key))
        )
        deadline = time.monotonic() + 2
        while not fake.submitted and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        assert fake.submitted and not task.done()
        assert tokens_used(c, key_id) == n_prompt(fake, prompt) + 40  # reserved at admission
        r = await task
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        assert usage["completion_tokens"] == 3
        assert tokens_used(c, key_id) == usage["total_tokens"]  # settled


@pytest.mark.asyncio
async def test_a_request_that_does_not_fit_gets_429_with_token_headers(tmp_path: Path, fake: FakeEngine) -> None:
    key_id, key = await add_key(tmp_path / "keys.sqlite3", tokens_per_day=60)
    async with running(base_settings(tmp_path), fake) as c:
        body = {"prompt": "Once upon a time", "max_new_tokens": 20, "temperature": 0}
        cost = n_prompt(fake, "Once upon a time") + 20
        statuses = [(await c.post("/generate", json=body, headers=bearer(key))).status_code for _ in range(60 // cost)]
        assert statuses == [200] * (60 // cost)
        r = await c.post("/generate", json=body, headers=bearer(key))
        assert r.status_code == 429
        assert assert_error_envelope(r)["type"] == "rate_limit_error"
        assert r.headers["x-ratelimit-limit-tokens"] == "60"
        assert int(r.headers["x-ratelimit-remaining-tokens"]) == 60 - (60 // cost) * cost
        assert int(r.headers["retry-after"]) <= 86_400
        assert "x-ratelimit-reset-tokens" in r.headers
        assert tokens_used(c, key_id) == (60 // cost) * cost  # the refused reservation was taken back
        # the OpenAI route refuses the same way, streaming or not, before any byte of a stream
        oai = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 20}
        for stream in (False, True):
            r = await c.post("/v1/completions", json={**oai, "stream": stream}, headers=bearer(key))
            assert r.status_code == 429 and r.headers["x-ratelimit-limit-tokens"] == "60", r.text


@pytest.mark.asyncio
async def test_a_failed_generation_is_refunded(tmp_path: Path, fake: FakeEngine) -> None:
    key_id, key = await add_key(tmp_path / "keys.sqlite3", tokens_per_day=1000)
    async with running(base_settings(tmp_path), fake) as c:
        fake.fail_after = 2
        r = await c.post("/generate", json={"prompt": "Hello", "max_new_tokens": 10}, headers=bearer(key))
        assert r.status_code == 503
        assert tokens_used(c, key_id) == 0


@pytest.mark.asyncio
async def test_200_concurrent_generations_against_a_token_quota_for_100(tmp_path: Path, fake: FakeEngine) -> None:
    prompt = "Once upon a time"
    cost = n_prompt(fake, prompt) + 2
    key_id, key = await add_key(tmp_path / "keys.sqlite3", tokens_per_day=100 * cost, rpm=0)
    async with running(base_settings(tmp_path), fake) as c:
        body = {"prompt": prompt, "max_new_tokens": 2, "temperature": 0.7}
        rs = await asyncio.gather(*(c.post("/generate", json=body, headers=bearer(key)) for _ in range(200)))
        codes = [r.status_code for r in rs]
        assert codes.count(200) == 100 and codes.count(429) == 100, sorted({(r.status_code, r.text[:150]) for r in rs})
        assert tokens_used(c, key_id) == 100 * cost


# ------------------------------------------------------------------------------ per client IP
@pytest.mark.asyncio
async def test_unauthenticated_traffic_is_limited_per_ip(fake: FakeEngine) -> None:
    async with running(base_settings(None, ip_rpm=3), fake, peer="203.0.113.5") as c:
        spoofed = {"X-Forwarded-For": "192.0.2.77"}
        codes = [(await c.get("/v1/models", headers=spoofed)).status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429], "an untrusted peer's X-Forwarded-For must not open new buckets"
        r = await c.get("/v1/models", headers={"X-Forwarded-For": "192.0.2.78"})
        assert r.status_code == 429 and r.headers["x-ratelimit-limit-requests"] == "3"


@pytest.mark.asyncio
async def test_x_forwarded_for_counts_from_a_trusted_proxy(fake: FakeEngine) -> None:
    settings = base_settings(None, ip_rpm=2, trusted_proxies="10.0.0.0/8")
    async with running(settings, fake, peer="10.1.2.3") as c:
        for client in ("192.0.2.1", "192.0.2.2"):
            h = {"X-Forwarded-For": f"6.6.6.6, {client}"}  # the left entry is the client's own claim
            codes = [(await c.get("/v1/models", headers=h)).status_code for _ in range(3)]
            assert codes == [200, 200, 429], client


def _request(peer: str, xff: list[str]) -> Request:
    headers = [(b"x-forwarded-for", v.encode()) for v in xff]
    return Request({"type": "http", "client": (peer, 1), "headers": headers, "method": "GET", "path": "/"})


def test_client_ip_walks_x_forwarded_for_from_the_right() -> None:
    trusted = parse_networks("10.0.0.0/8, 192.168.1.1, ::1")
    assert client_ip(_request("203.0.113.1", ["1.2.3.4"]), trusted) == "203.0.113.1"  # untrusted peer
    assert client_ip(_request("10.0.0.5", ["1.2.3.4"]), trusted) == "1.2.3.4"
    assert client_ip(_request("10.0.0.5", ["9.9.9.9, 1.2.3.4, 192.168.1.1"]), trusted) == "1.2.3.4"
    assert client_ip(_request("10.0.0.5", ["9.9.9.9", "1.2.3.4"]), trusted) == "1.2.3.4"  # two header lines
    assert client_ip(_request("10.0.0.5", []), trusted) == "10.0.0.5"
    assert client_ip(_request("10.0.0.5", ["garbage, 10.0.0.7"]), trusted) == "10.0.0.7"
    assert client_ip(_request("::1", ["2001:db8::1"]), trusted) == "2001:db8::1"
    assert client_ip(_request("10.0.0.5", ["1.2.3.4"]), ()) == "10.0.0.5"


def test_reset_durations_look_like_openais() -> None:
    assert [duration(x) for x in (0.02, 1, 59.2, 60, 360, 3723)] == ["20ms", "1s", "1m0s", "1m0s", "6m0s", "1h2m3s"]


# ------------------------------------------------------------------------------ storage down
class _BrokenStorage:
    """Stands in for a Redis that hangs (`hang`) or refuses connections."""

    def __init__(self, hang: bool) -> None:
        self.hang = hang

    async def _fail(self, *a: object, **k: object) -> Any:
        if self.hang:
            await asyncio.sleep(30)
        raise ConnectionError("connection refused")

    incr = get = acquire_entry = get_moving_window = get_expiry = clear = _fail


def _broken_limiter(settings: Settings, hang: bool) -> RateLimiter:
    limiter = RateLimiter.__new__(RateLimiter)
    limiter.storage = _BrokenStorage(hang)  # type: ignore[assignment]
    from limits.aio.strategies import MovingWindowRateLimiter

    limiter.window = MovingWindowRateLimiter.__new__(MovingWindowRateLimiter)
    limiter.window.storage = limiter.storage  # type: ignore[assignment]
    limiter.timeout_s = settings.security_timeout_s
    limiter.fail_open = settings.ratelimit_fail_open
    limiter._outage = False
    return limiter


@pytest.mark.asyncio
@pytest.mark.parametrize("hang", [True, False], ids=["hangs", "refuses"])
@pytest.mark.parametrize("fail_open", [False, True], ids=["fail-closed", "fail-open"])
async def test_limit_storage_down_is_a_fast_503_unless_fail_open(
    tmp_path: Path, fake: FakeEngine, hang: bool, fail_open: bool
) -> None:
    _, key = await add_key(tmp_path / "keys.sqlite3", tokens_per_day=500)
    settings = base_settings(tmp_path, ratelimit_fail_open=fail_open, security_timeout_s=0.2)
    app = create_app(settings, engine_factory=lambda _s, _m: fake)
    security: Security = app.state.security
    security.limiter = _broken_limiter(settings, hang)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            started = time.monotonic()
            r = await c.post("/generate", json={"prompt": "Hi", "max_new_tokens": 2}, headers=bearer(key))
            elapsed = time.monotonic() - started
        if fail_open:
            assert r.status_code == 200, r.text
        else:
            assert r.status_code == 503, r.text
            assert assert_error_envelope(r)["code"] == "security_backend_unavailable"
            assert r.headers["retry-after"] == "1"
        assert elapsed < 1.0, elapsed
        await fake.drain()
