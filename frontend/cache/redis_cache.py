"""Redis-backed result cache (shared between gateway replicas)."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from frontend.cache.base import CacheStats, _OutageLog
from frontend.cache.result import CachedResult, CacheEntryError

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["RedisResultCache"]

logger = logging.getLogger(__name__)


class RedisResultCache:
    """Result cache stored in Redis as ``prefix + key`` -> result JSON (UTF-8).

    Contract:
      * ``put`` is one ``SET key value EX ttl`` command (``PX`` when ``ttl_s`` has a
        fractional part), so the value and its expiry are written atomically and a
        reader sees either the complete entry or nothing.
      * The cache never fails a request: any error talking to Redis (connection,
        timeout, protocol, ...) makes ``get`` a miss and ``put`` a no-op. The first
        error of an outage is logged at WARNING, the rest at DEBUG, recovery at INFO.
      * After an error, Redis is not contacted for ``backoff_s`` seconds (gets miss
        immediately, puts are dropped) so an outage costs one timeout, not one per
        request. ``op_timeout_s`` bounds each command regardless of client settings.
        (A fixed window, not a full circuit breaker: a miss is always a safe fallback,
        so there is no half-open state to manage.)
      * An entry that cannot be decoded (corrupt, foreign, older format) is a miss.
      * A result whose JSON exceeds ``max_value_bytes`` is not stored.
      * ``close`` closes ``client`` unless ``close_client=False`` (shared client).
    """

    def __init__(
        self,
        client: Redis,
        ttl_s: float,
        prefix: str = "gen:",
        *,
        op_timeout_s: float | None = 0.5,
        backoff_s: float = 2.0,
        max_value_bytes: int | None = None,
        close_client: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not ttl_s > 0 or not math.isfinite(ttl_s):
            raise ValueError("ttl_s must be a positive finite number")
        if op_timeout_s is not None and not op_timeout_s > 0:
            raise ValueError("op_timeout_s must be > 0 or None")
        if backoff_s < 0:
            raise ValueError("backoff_s must be >= 0")
        self._client = client
        self._prefix = prefix
        # EX for whole seconds; PX keeps sub-second TTLs exact. Either way one SET command.
        self._ex: int | None = int(ttl_s) if float(ttl_s).is_integer() else None
        self._px: int | None = None if self._ex is not None else max(1, round(ttl_s * 1000))
        self._op_timeout_s = op_timeout_s
        self._backoff_s = backoff_s
        self._max_value_bytes = max_value_bytes
        self._close_client = close_client
        self._clock = clock
        self._skip_until = -math.inf
        self._hits = 0
        self._misses = 0
        self._stores = 0
        self._errors = 0
        self._backend_log = _OutageLog(logger, "redis result cache")
        self._data_log = _OutageLog(logger, "redis result cache (data)")

    async def get(self, key: str) -> CachedResult | None:
        """Return the cached result or ``None`` (miss, undecodable entry or Redis error)."""
        if self._backing_off():
            self._misses += 1
            return None
        try:
            async with asyncio.timeout(self._op_timeout_s):
                raw = await self._client.get(self._prefix + key)
        except Exception as exc:
            self._on_backend_error("get", exc)
            self._misses += 1
            return None
        self._backend_log.success()
        if raw is None:
            self._misses += 1
            return None
        try:
            result = CachedResult.from_json(raw)
        except CacheEntryError as exc:
            self._errors += 1
            self._data_log.failure("decode", exc)
            self._misses += 1
            return None
        self._data_log.success()
        self._hits += 1
        return result

    async def put(self, key: str, result: CachedResult) -> None:
        """Store a complete result with the TTL; never raises."""
        try:
            data = result.to_json().encode("utf-8")
        except (TypeError, ValueError) as exc:  # bad logprobs payload, lone surrogates
            self._errors += 1
            self._data_log.failure("encode", exc)
            return
        if self._max_value_bytes is not None and len(data) > self._max_value_bytes:
            logger.debug(
                "result of %d bytes exceeds max_value_bytes=%d; not cached",
                len(data),
                self._max_value_bytes,
            )
            return
        if self._backing_off():
            return
        try:
            async with asyncio.timeout(self._op_timeout_s):
                await self._client.set(self._prefix + key, data, ex=self._ex, px=self._px)
        except Exception as exc:
            self._on_backend_error("put", exc)
            return
        self._backend_log.success()
        self._stores += 1

    async def close(self) -> None:
        """Close the client (if owned). Errors are logged, not raised."""
        if not self._close_client:
            return
        try:
            await self._client.aclose()
        except Exception as exc:
            logger.debug("closing redis client failed: %r", exc)

    def stats(self) -> CacheStats:
        """Counters; ``size``/``bytes`` are ``None`` (not tracked for a shared Redis)."""
        return CacheStats(
            backend="redis",
            hits=self._hits,
            misses=self._misses,
            stores=self._stores,
            errors=self._errors,
            size=None,
            bytes=None,
        )

    def _backing_off(self) -> bool:
        return self._clock() < self._skip_until

    def _on_backend_error(self, op: str, exc: Exception) -> None:
        self._errors += 1
        self._skip_until = self._clock() + self._backoff_s
        self._backend_log.failure(op, exc)
