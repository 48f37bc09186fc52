"""RedisResultCache against a real, throw-away ``redis-server``.

Skipped only when the ``redis-server`` binary is absent (CI installs it, so these run there).
Each test gets its own server on a free port (start-up takes a few milliseconds).
"""

from __future__ import annotations

import asyncio
import logging

import pytest
import redis.asyncio as aioredis

from frontend.cache import (
    CachedResult,
    RedisResultCache,
    build_result_cache,
    cache_key,
)
from tests.integration.redis_server import RedisServer

pytestmark = pytest.mark.integration


def make_result(text: str = "東京は日本の首都です。") -> CachedResult:
    return CachedResult(
        text=text,
        token_ids=[30266, 12859, 23513],
        pieces=["東京", "は日本の", "首都です。"],
        finish_reason="stop",
        prompt_tokens=5,
        completion_tokens=3,
        logprobs=[{"logprob": -0.5}, {"logprob": -1.25}, {"logprob": -0.125}],
    )


def make_key(version: str = "v1") -> str:
    return cache_key(
        model="gpt2",
        model_version=version,
        prompt_ids=[464, 3139, 286],
        params={"temperature": 0.0, "max_new_tokens": 3, "seed": None, "stop": []},
    )


@pytest.mark.asyncio
async def test_put_get_and_real_ttl_expiry(redis_server: RedisServer) -> None:
    client = aioredis.Redis(port=redis_server.port)
    cache = RedisResultCache(client, ttl_s=1)
    try:
        key = make_key()
        assert await cache.get(key) is None
        await cache.put(key, make_result())
        assert await cache.get(key) == make_result()
        # Value and expiry were written by one SET: the key exists with a TTL right away.
        assert await client.keys("*") == [b"gen:" + key.encode()]
        assert 0 < await client.pttl("gen:" + key) <= 1000
        st = cache.stats()
        assert (st.hits, st.misses, st.stores, st.errors) == (1, 1, 1, 0)
        await asyncio.sleep(1.2)
        assert await cache.get(key) is None
    finally:
        await cache.close()


@pytest.mark.asyncio
async def test_other_model_version_misses(redis_server: RedisServer) -> None:
    cache = build_result_cache(redis_server.url, max_entries=10, ttl_s=30, max_bytes=1 << 20)
    assert isinstance(cache, RedisResultCache)
    try:
        await cache.put(make_key("v1"), make_result())
        assert await cache.get(make_key("v1")) == make_result()
        assert await cache.get(make_key("v2")) is None
    finally:
        await cache.close()


@pytest.mark.asyncio
async def test_corrupt_entry_is_a_miss(redis_server: RedisServer) -> None:
    client = aioredis.Redis(port=redis_server.port)
    cache = RedisResultCache(client, ttl_s=30, prefix="test:")
    try:
        await client.set("test:bad", b"{not json")
        assert await cache.get("bad") is None
        assert cache.stats().errors == 1
    finally:
        await cache.close()


@pytest.mark.asyncio
async def test_oversized_value_not_stored(redis_server: RedisServer) -> None:
    cache = build_result_cache(redis_server.url, max_entries=10, ttl_s=30, max_bytes=100)
    try:
        await cache.put(make_key(), make_result("x" * 1000))
        assert await cache.get(make_key()) is None
        assert cache.stats().stores == 0
    finally:
        await cache.close()


@pytest.mark.asyncio
async def test_dead_redis_get_misses_and_put_does_not_raise(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    # Built by the factory, so its client settings (short timeouts, one retry) are exercised.
    cache = build_result_cache(redis_server.url, max_entries=10, ttl_s=30, max_bytes=1 << 20)
    key = make_key()
    try:
        await cache.put(key, make_result())
        assert await cache.get(key) == make_result()  # pooled connection now open

        redis_server.stop()
        loop = asyncio.get_running_loop()
        start = loop.time()
        with caplog.at_level(logging.WARNING, logger="frontend.cache"):
            assert await cache.get(key) is None
            await cache.put(key, make_result())  # must not raise
            assert await cache.get(key) is None
        assert loop.time() - start < 2.0  # a dead Redis costs little per request
        st = cache.stats()
        assert st.errors == 1  # after the first error the cache backs off Redis
        assert (st.hits, st.misses, st.stores) == (1, 2, 1)
        assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    finally:
        await cache.close()


@pytest.mark.asyncio
async def test_recovers_when_redis_comes_back(redis_server: RedisServer) -> None:
    client = aioredis.from_url(redis_server.url, socket_timeout=0.5, socket_connect_timeout=0.5)
    cache = RedisResultCache(client, ttl_s=30, backoff_s=0)  # probe Redis on every call
    key = make_key()
    try:
        await cache.put(key, make_result())
        redis_server.stop()
        assert await cache.get(key) is None
        await cache.put(key, make_result())
        assert cache.stats().errors == 2

        redis_server.start()  # same port, empty data set (no persistence)
        assert await cache.get(key) is None
        await cache.put(key, make_result())
        assert await cache.get(key) == make_result()
    finally:
        await cache.close()
