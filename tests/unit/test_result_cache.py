"""Unit tests for frontend.cache: keys, cacheability, CachedResult, MemoryResultCache.

RedisResultCache error handling is also covered here against an in-process fake client;
the real-server behaviour lives in tests/integration/test_redis_cache.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

import pytest

from frontend.cache import (
    CachedResult,
    CacheEntryError,
    CacheStats,
    MemoryResultCache,
    RedisResultCache,
    ResultCache,
    build_result_cache,
    cache_key,
    is_cacheable,
)

pytestmark = pytest.mark.unit

BASE_PARAMS: dict[str, Any] = {
    "max_new_tokens": 32,
    "temperature": 0.7,
    "top_p": 0.9,
    "top_k": 50,
    "min_p": 0.05,
    "repetition_penalty": 1.1,
    "stop": ["\n\n", "END"],
    "seed": 1234,
    "logprobs": 0,
    "echo": False,
    "n": 1,
}


def key(**overrides: Any) -> str:
    params = {**BASE_PARAMS, **overrides.pop("params", {})}
    args: dict[str, Any] = {
        "model": "gpt2",
        "model_version": "v1",
        "prompt_ids": [15496, 11, 995],
        "params": params,
    }
    args.update(overrides)
    return cache_key(**args)


def result(text: str = "hello world", **overrides: Any) -> CachedResult:
    fields: dict[str, Any] = {
        "text": text,
        "token_ids": [31373, 995],
        "pieces": ["hello", " world"],
        "finish_reason": "length",
        "prompt_tokens": 3,
        "completion_tokens": 2,
    }
    fields.update(overrides)
    return CachedResult(**fields)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# --------------------------------------------------------------------------- cache_key


def test_key_is_sha256_hex_and_stable() -> None:
    k = key()
    assert len(k) == 64
    assert all(c in "0123456789abcdef" for c in k)
    assert key() == k


def test_key_independent_of_param_insertion_order() -> None:
    reordered = dict(reversed(list(BASE_PARAMS.items())))
    assert cache_key(model="gpt2", model_version="v1", prompt_ids=[15496, 11, 995], params=reordered) == key()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("max_new_tokens", 33),
        ("temperature", 0.8),
        ("top_p", 0.95),
        ("top_k", 40),
        ("min_p", 0.0),
        ("repetition_penalty", 1.0),
        ("stop", ["\n\n"]),
        ("seed", 1235),
        ("logprobs", 5),
        ("echo", True),
        ("n", 2),
    ],
)
def test_every_param_changes_key(name: str, value: Any) -> None:
    assert BASE_PARAMS[name] != value
    assert key(params={name: value}) != key()


def test_added_or_none_param_changes_key() -> None:
    # The cache does not interpret params: callers pass the fully resolved set.
    assert key(params={"frequency_penalty": 0.5}) != key()
    assert key(params={"seed": None}) != key()


def test_model_version_model_and_prompt_change_key() -> None:
    assert key(model_version="v2") != key()
    assert key(model="gpt2-medium") != key()
    assert key(prompt_ids=[15496, 11]) != key()
    assert key(prompt_ids=[11, 15496, 995]) != key()


def test_int_and_float_normalised() -> None:
    assert key(params={"temperature": 1}) == key(params={"temperature": 1.0})
    assert key(params={"top_k": 50.0}) == key(params={"top_k": 50})
    assert key(params={"min_p": -0.0}) == key(params={"min_p": 0})
    # Nested values are normalised too (e.g. logit_bias).
    assert key(params={"logit_bias": {"50256": -100}}) == key(params={"logit_bias": {"50256": -100.0}})
    # Non-integral floats are compared exactly.
    assert key(params={"top_p": 0.9}) != key(params={"top_p": 0.90000001})


def test_bool_is_not_int() -> None:
    assert key(params={"echo": True}) != key(params={"echo": 1})
    assert key(params={"logprobs": False}) != key(params={"logprobs": 0})


def test_numpy_scalars_match_python_numbers() -> None:
    np = pytest.importorskip("numpy")
    assert key(params={"top_k": np.int64(50), "temperature": np.float64(0.7)}) == key()
    assert key(prompt_ids=np.array([15496, 11, 995])) == key()


def test_stop_order_matters_but_tuple_equals_list() -> None:
    # Decision: sequence order is significant (the cache cannot know the engine's stop
    # semantics, so it prefers a miss to a wrong hit). Tuples and lists are the same.
    assert key(params={"stop": ["END", "\n\n"]}) != key()
    assert key(params={"stop": ("\n\n", "END")}) == key()


def test_unicode_params_and_prompt_are_fine() -> None:
    k1 = key(params={"stop": ["。", "\n"]})
    k2 = key(params={"stop": ["、", "\n"]})
    assert k1 != k2
    assert k1 == key(params={"stop": ["。", "\n"]})


@pytest.mark.parametrize(
    ("overrides", "exc"),
    [
        ({"params": {"temperature": float("nan")}}, ValueError),
        ({"params": {"top_p": float("inf")}}, ValueError),
        ({"params": {"stop": {"a", "b"}}}, TypeError),
        ({"params": {"logit_bias": {50256: -100}}}, TypeError),
        ({"params": {"stop": b"END"}}, TypeError),
        ({"params": {"obj": object()}}, TypeError),
        ({"model_version": ""}, ValueError),
        ({"model": ""}, ValueError),
        ({"prompt_ids": "hello"}, TypeError),
        ({"prompt_ids": [1.5]}, TypeError),
        ({"prompt_ids": [True]}, TypeError),
    ],
)
def test_key_rejects_ambiguous_input(overrides: dict[str, Any], exc: type[Exception]) -> None:
    with pytest.raises(exc):
        key(**overrides)


# --------------------------------------------------------------------------- is_cacheable


@pytest.mark.parametrize(
    ("temperature", "seed", "expected"),
    [
        (0, None, True),
        (0.0, None, True),
        (0.0, 7, True),
        (0.7, 7, True),
        (0.7, 0, True),  # seed 0 is an explicit seed
        (0.7, None, False),
        (1.0, None, False),
        (-0.5, 7, False),
        (float("nan"), 7, False),
        (float("inf"), 7, False),
    ],
)
def test_is_cacheable(temperature: float, seed: int | None, expected: bool) -> None:
    assert is_cacheable(temperature, seed) is expected


# --------------------------------------------------------------------------- CachedResult


def test_json_round_trip_with_japanese_text_and_logprobs() -> None:
    r = CachedResult(
        text="こんにちは、世界！🌸",
        token_ids=[34402, 22174, 28618, 0, 50256],
        pieces=["こん", "にちは", "、世界", "！", "🌸"],
        finish_reason="stop",
        prompt_tokens=4,
        completion_tokens=5,
        logprobs=[{"token": "こん", "logprob": -0.25, "top": {"こん": -0.25}}, None],
    )
    s = r.to_json()
    assert "こんにちは" in s  # stored as UTF-8, not \\u escapes
    assert CachedResult.from_json(s) == r
    assert CachedResult.from_json(s.encode("utf-8")) == r
    assert CachedResult.from_json(result().to_json()) == result()  # logprobs None


@pytest.mark.parametrize(
    "raw",
    [
        "not json",
        b"\xff\xfe",
        "[]",
        json.dumps({"v": 999}),
        json.dumps({**json.loads(result().to_json()), "token_ids": ["1"]}),
        json.dumps({**json.loads(result().to_json()), "token_ids": [True]}),
        json.dumps({**json.loads(result().to_json()), "pieces": [1]}),
        json.dumps({**json.loads(result().to_json()), "prompt_tokens": -1}),
        json.dumps({**json.loads(result().to_json()), "logprobs": {"a": 1}}),
        json.dumps({k: v for k, v in json.loads(result().to_json()).items() if k != "text"}),
    ],
)
def test_from_json_rejects_malformed(raw: str | bytes) -> None:
    with pytest.raises(CacheEntryError):
        CachedResult.from_json(raw)


def test_cached_result_is_frozen() -> None:
    r = result()
    with pytest.raises(AttributeError):
        r.text = "x"  # type: ignore[misc]


# --------------------------------------------------------------------------- memory cache


@pytest.mark.asyncio
async def test_memory_get_put_and_stats() -> None:
    cache = MemoryResultCache(max_entries=4, ttl_s=60)
    assert isinstance(cache, ResultCache)
    assert await cache.get("k") is None
    await cache.put("k", result())
    assert await cache.get("k") == result()
    st = cache.stats()
    assert isinstance(st, CacheStats)
    assert (st.backend, st.hits, st.misses, st.stores, st.size) == ("memory", 1, 1, 1, 1)
    assert st.bytes == len(result().to_json().encode())


@pytest.mark.asyncio
async def test_memory_returns_copies() -> None:
    cache = MemoryResultCache(max_entries=4, ttl_s=60)
    await cache.put("k", result())
    got = await cache.get("k")
    assert got is not None
    got.pieces.append("mutated")
    assert await cache.get("k") == result()


@pytest.mark.asyncio
async def test_memory_lru_eviction() -> None:
    cache = MemoryResultCache(max_entries=2, ttl_s=60)
    await cache.put("a", result("a"))
    await cache.put("b", result("b"))
    assert await cache.get("a") is not None  # a is now most recently used
    await cache.put("c", result("c"))  # evicts b
    assert await cache.get("b") is None
    assert (await cache.get("a")) == result("a")
    assert (await cache.get("c")) == result("c")
    assert cache.stats().size == 2


@pytest.mark.asyncio
async def test_memory_overwrite_does_not_double_count() -> None:
    cache = MemoryResultCache(max_entries=2, ttl_s=60)
    await cache.put("a", result("a"))
    await cache.put("a", result("a2"))
    st = cache.stats()
    assert st.size == 1
    assert st.bytes == len(result("a2").to_json().encode())
    assert await cache.get("a") == result("a2")


@pytest.mark.asyncio
async def test_memory_ttl_expiry_with_injected_clock() -> None:
    clock = FakeClock()
    cache = MemoryResultCache(max_entries=10, ttl_s=5.0, clock=clock)
    await cache.put("a", result("a"))
    clock.advance(3)
    await cache.put("b", result("b"))
    clock.advance(1.9)
    assert await cache.get("a") is not None  # 4.9 s old; reads do not extend the TTL
    clock.advance(0.1)
    assert await cache.get("a") is None  # exactly 5 s old: expired
    assert await cache.get("b") is not None
    assert cache.stats().size == 1
    clock.advance(3)
    assert cache.stats().size == 0
    assert cache.stats().bytes == 0


@pytest.mark.asyncio
async def test_memory_rewrite_restarts_ttl() -> None:
    clock = FakeClock()
    cache = MemoryResultCache(max_entries=10, ttl_s=5.0, clock=clock)
    await cache.put("a", result("a"))
    await cache.put("b", result("b"))
    clock.advance(4)
    await cache.put("a", result("a"))
    clock.advance(2)
    assert await cache.get("b") is None
    assert await cache.get("a") is not None


@pytest.mark.asyncio
async def test_memory_clock_going_backwards_still_expires() -> None:
    clock = FakeClock()
    cache = MemoryResultCache(max_entries=10, ttl_s=5.0, clock=clock)
    await cache.put("a", result("a"))
    clock.advance(-10)
    await cache.put("b", result("b"))  # expiry order now differs from write order
    clock.advance(11)
    assert await cache.get("b") is None


@pytest.mark.asyncio
async def test_memory_max_bytes() -> None:
    one = len(result("x" * 100).to_json().encode())
    cache = MemoryResultCache(max_entries=100, ttl_s=60, max_bytes=2 * one + 10)
    await cache.put("a", result("x" * 100))
    await cache.put("b", result("y" * 100))
    await cache.put("c", result("z" * 100))  # exceeds max_bytes -> evicts LRU "a"
    st = cache.stats()
    assert st.size == 2
    assert st.bytes is not None
    assert st.bytes <= 2 * one + 10
    assert await cache.get("a") is None
    # A single result larger than the whole budget is not stored and evicts nothing.
    await cache.put("huge", result("h" * 10_000))
    assert await cache.get("huge") is None
    assert await cache.get("b") is not None
    assert await cache.get("c") is not None


@pytest.mark.asyncio
async def test_memory_max_bytes_counts_utf8_bytes() -> None:
    ja = result("日本語" * 50, pieces=["日本語"] * 50)
    size = len(ja.to_json().encode("utf-8"))
    assert size > len(ja.to_json())  # multi-byte characters are counted as bytes
    cache = MemoryResultCache(max_entries=10, ttl_s=60, max_bytes=size - 1)
    await cache.put("ja", ja)
    assert await cache.get("ja") is None


@pytest.mark.asyncio
async def test_memory_unserialisable_result_is_not_stored_and_does_not_raise() -> None:
    cache = MemoryResultCache(max_entries=10, ttl_s=60)
    await cache.put("bad", result(logprobs=[object()]))
    assert await cache.get("bad") is None
    assert cache.stats().errors == 1


@pytest.mark.asyncio
async def test_memory_close_clears() -> None:
    cache = MemoryResultCache(max_entries=10, ttl_s=60)
    await cache.put("a", result())
    await cache.close()
    assert cache.stats().size == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_entries": 0, "ttl_s": 1},
        {"max_entries": 1, "ttl_s": 0},
        {"max_entries": 1, "ttl_s": 1, "max_bytes": 0},
    ],
)
def test_memory_rejects_bad_config(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="must be"):
        MemoryResultCache(**kwargs)


# --------------------------------------------------------------------------- factory


@pytest.mark.asyncio
async def test_build_result_cache_selects_backend() -> None:
    for url in (None, "", "  "):
        cache = build_result_cache(url, max_entries=3, ttl_s=10, max_bytes=1000)
        assert isinstance(cache, MemoryResultCache)
    # No connection is attempted at construction time.
    cache = build_result_cache("redis://127.0.0.1:1/0", max_entries=3, ttl_s=10, max_bytes=1000)
    assert isinstance(cache, RedisResultCache)
    assert isinstance(cache, ResultCache)
    await cache.close()


# --------------------------------------------------------------------------- redis error paths


class FailingRedis:
    """Stands in for redis.asyncio.Redis: every command raises or hangs."""

    def __init__(self, exc: Exception | None = None, hang: bool = False) -> None:
        self.exc = exc or ConnectionError("connection refused")
        self.hang = hang
        self.calls = 0
        self.closed = False

    async def _cmd(self) -> Any:
        self.calls += 1
        if self.hang:
            await asyncio.sleep(60)
        raise self.exc

    async def get(self, name: str) -> Any:
        return await self._cmd()

    async def set(self, name: str, value: bytes, ex: int | None = None, px: int | None = None) -> Any:
        return await self._cmd()

    async def aclose(self) -> None:
        self.closed = True


def redis_cache(client: Any, clock: Callable[[], float] | None = None, **kwargs: Any) -> RedisResultCache:
    if clock is not None:
        kwargs["clock"] = clock
    return RedisResultCache(client, ttl_s=60, **kwargs)


@pytest.mark.asyncio
async def test_redis_errors_are_misses_logged_once_and_back_off(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from redis.exceptions import ConnectionError as RedisConnectionError

    client = FailingRedis(RedisConnectionError("boom"))
    clock = FakeClock()
    cache = redis_cache(client, clock, backoff_s=2.0)
    with caplog.at_level(logging.DEBUG, logger="frontend.cache"):
        assert await cache.get("k") is None
        await cache.put("k", result())  # within backoff: Redis is not contacted
        assert await cache.get("k") is None
        assert client.calls == 1
        clock.advance(2.5)
        assert await cache.get("k") is None
        await cache.put("k", result())
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "get failed" in warnings[0].getMessage()
    st = cache.stats()
    assert (st.backend, st.hits, st.misses, st.size, st.bytes) == ("redis", 0, 3, None, None)
    assert st.errors == 2
    assert client.calls == 2


@pytest.mark.asyncio
async def test_redis_put_error_is_swallowed() -> None:
    client = FailingRedis(OSError("broken pipe"))
    cache = redis_cache(client, backoff_s=0)
    await cache.put("k", result())
    await cache.put("k", result())
    assert client.calls == 2
    assert cache.stats().errors == 2
    assert cache.stats().stores == 0


@pytest.mark.asyncio
async def test_redis_hung_server_times_out_as_miss() -> None:
    cache = redis_cache(FailingRedis(hang=True), op_timeout_s=0.05)
    loop = asyncio.get_running_loop()
    start = loop.time()
    assert await cache.get("k") is None
    assert loop.time() - start < 1.0
    assert cache.stats().errors == 1


@pytest.mark.asyncio
async def test_redis_close_respects_ownership() -> None:
    owned, shared = FailingRedis(), FailingRedis()
    await redis_cache(owned).close()
    await redis_cache(shared, close_client=False).close()
    assert owned.closed
    assert not shared.closed
