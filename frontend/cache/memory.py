"""In-process LRU + TTL result cache with entry-count and byte bounds."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from frontend.cache.base import CacheStats, _OutageLog
from frontend.cache.result import CachedResult

__all__ = ["DEFAULT_MAX_BYTES", "MemoryResultCache"]

logger = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class _Entry:
    data: bytes  # the result's UTF-8 JSON: exact size accounting + callers get fresh copies
    expires_at: float


class MemoryResultCache:
    """Bounded LRU cache with a fixed TTL, for a single process / event loop.

    Contract:
      * At most ``max_entries`` entries and at most ``max_bytes`` bytes of serialised
        results (UTF-8 JSON, so >= the text bytes) are held; least recently *read or
        written* entries are evicted first. A single result larger than ``max_bytes``
        is not stored at all.
      * An entry expires ``ttl_s`` after it was put (reads do not extend it), measured
        with ``clock`` (monotonic seconds; injectable for tests). Expired entries are
        never returned and are purged incrementally.
      * Results are stored serialised, so ``get`` returns a fresh ``CachedResult`` that
        the caller may mutate without corrupting the cache.
      * Not thread-safe; methods contain no awaits, so concurrent tasks on one event
        loop are safe without a lock.
    """

    # Written here rather than cachetools.TTLCache: that bounds one measure (entries or weighted
    # size), and this cache must bound both the entry count and the stored bytes.

    def __init__(
        self,
        max_entries: int,
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        if not ttl_s > 0:
            raise ValueError("ttl_s must be > 0")
        if max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        self._max_entries = max_entries
        self._ttl_s = float(ttl_s)
        self._max_bytes = max_bytes
        self._clock = clock
        # LRU order: least recently used first.
        self._lru: OrderedDict[str, _Entry] = OrderedDict()
        # Write order == expiry order (fixed TTL, monotonic clock): oldest expiry first.
        self._by_expiry: OrderedDict[str, float] = OrderedDict()
        self._bytes = 0
        self._hits = 0
        self._misses = 0
        self._stores = 0
        self._errors = 0
        self._encode_log = _OutageLog(logger, "memory result cache serialisation")

    async def get(self, key: str) -> CachedResult | None:
        """Return the live entry for ``key`` (marking it recently used) or ``None``."""
        now = self._clock()
        self._purge_expired(now)
        entry = self._lru.get(key)
        if entry is None or entry.expires_at <= now:
            if entry is not None:  # only reachable if the injected clock went backwards
                self._remove(key)
            self._misses += 1
            return None
        self._lru.move_to_end(key)
        self._hits += 1
        return CachedResult.from_json(entry.data)

    async def put(self, key: str, result: CachedResult) -> None:
        """Store a complete result, evicting LRU entries to respect both bounds.

        Never raises: an unserialisable result is logged and not stored.
        """
        try:
            data = result.to_json().encode("utf-8")
        except (TypeError, ValueError) as exc:  # bad logprobs payload, lone surrogates
            self._errors += 1
            self._encode_log.failure("put", exc)
            return
        self._encode_log.success()
        now = self._clock()
        self._purge_expired(now)
        if len(data) > self._max_bytes:
            logger.debug("result of %d bytes exceeds max_bytes=%d; not cached", len(data), self._max_bytes)
            return
        if key in self._lru:
            self._remove(key)
        self._lru[key] = _Entry(data, now + self._ttl_s)
        self._by_expiry[key] = now + self._ttl_s
        self._bytes += len(data)
        self._stores += 1
        while len(self._lru) > self._max_entries or self._bytes > self._max_bytes:
            oldest = next(iter(self._lru))
            self._remove(oldest)

    async def close(self) -> None:
        """Drop all entries."""
        self._lru.clear()
        self._by_expiry.clear()
        self._bytes = 0

    def stats(self) -> CacheStats:
        """Counters plus the live entry count and stored bytes."""
        self._purge_expired(self._clock())
        return CacheStats(
            backend="memory",
            hits=self._hits,
            misses=self._misses,
            stores=self._stores,
            errors=self._errors,
            size=len(self._lru),
            bytes=self._bytes,
        )

    def _remove(self, key: str) -> None:
        entry = self._lru.pop(key)
        self._by_expiry.pop(key, None)
        self._bytes -= len(entry.data)

    def _purge_expired(self, now: float) -> None:
        while self._by_expiry:
            key, expires_at = next(iter(self._by_expiry.items()))
            if expires_at > now:
                break
            self._remove(key)
