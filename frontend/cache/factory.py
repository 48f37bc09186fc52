"""Choose the result-cache backend from configuration."""

from __future__ import annotations

from frontend.cache.base import ResultCache
from frontend.cache.memory import MemoryResultCache
from frontend.cache.redis_cache import RedisResultCache

__all__ = ["build_result_cache"]

# Client-side limits for the cache's own Redis client: the cache sits on the request path,
# so a dead or slow Redis must cost milliseconds, not redis-py's default ~10 retries.
_SOCKET_TIMEOUT_S = 0.5
_CONNECT_TIMEOUT_S = 0.5
_RETRIES = 1  # one immediate retry heals a pooled connection that Redis closed


def build_result_cache(
    url: str | None,
    *,
    max_entries: int,
    ttl_s: float,
    max_bytes: int,
) -> ResultCache:
    """Return a ``MemoryResultCache`` when ``url`` is None/blank, else a ``RedisResultCache``.

    Memory: LRU bounded by ``max_entries`` and ``max_bytes`` (total serialised bytes).
    Redis: ``redis.asyncio.from_url(url)`` with short timeouts and one retry; Redis's own
    ``maxmemory`` policy bounds the total, ``max_entries`` is unused and ``max_bytes``
    caps a single stored value. No connection is made here (redis-py connects lazily),
    so a Redis that is down at start-up only yields misses. The URL (which may hold a
    password) is never logged.
    """
    if url is None or not url.strip():
        return MemoryResultCache(max_entries, ttl_s, max_bytes=max_bytes)

    import redis.asyncio as aioredis  # imported lazily: memory-only setups need no redis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    client = aioredis.from_url(
        url.strip(),
        socket_timeout=_SOCKET_TIMEOUT_S,
        socket_connect_timeout=_CONNECT_TIMEOUT_S,
        retry=Retry(NoBackoff(), _RETRIES),
    )
    return RedisResultCache(client, ttl_s, max_value_bytes=max_bytes)
