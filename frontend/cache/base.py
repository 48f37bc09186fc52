"""The ``ResultCache`` protocol shared by all backends, plus small shared helpers."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from frontend.cache.result import CachedResult

__all__ = ["CacheStats", "ResultCache"]


@dataclass(frozen=True)
class CacheStats:
    """Counters for metrics. Counters are cumulative since the cache was created.

    ``size``/``bytes`` are the live entry count and stored bytes where the backend knows
    them (memory); ``None`` where it does not (Redis: shared, expired server-side).
    ``errors`` counts backend failures and undecodable/unserialisable entries.
    """

    backend: str
    hits: int
    misses: int
    stores: int
    errors: int
    size: int | None
    bytes: int | None


@runtime_checkable
class ResultCache(Protocol):
    """Async cache of complete generation results, keyed by ``cache_key(...)``.

    Contract for every implementation:
      * ``get`` returns a hit or ``None``; it never raises because of the backend
        (a backend failure is a miss).
      * ``put`` stores a *complete* result atomically (readers see the whole entry or
        nothing) with the cache's TTL; it never raises because of the backend, and may
        silently decline to store (e.g. an entry larger than the size limit).
      * ``close`` releases resources; the cache must not be used afterwards.
      * ``stats`` is cheap and synchronous (safe to call from a metrics collector).
    """

    async def get(self, key: str) -> CachedResult | None: ...

    async def put(self, key: str, result: CachedResult) -> None: ...

    async def close(self) -> None: ...

    def stats(self) -> CacheStats: ...


class _OutageLog:
    """Log the first failure of a run of failures at WARNING, the rest at DEBUG.

    A later success logs one INFO line and re-arms the warning, so an outage produces
    two log lines instead of one per request.
    """

    def __init__(self, logger: logging.Logger, what: str) -> None:
        self._logger = logger
        self._what = what
        self._failing = False

    def failure(self, op: str, exc: BaseException) -> None:
        if not self._failing:
            self._failing = True
            self._logger.warning(
                "%s %s failed (%s: %s); continuing without it, further errors logged at DEBUG",
                self._what,
                op,
                type(exc).__name__,
                exc,
            )
        else:
            self._logger.debug("%s %s failed again: %r", self._what, op, exc)

    def success(self) -> None:
        if self._failing:
            self._failing = False
            self._logger.info("%s recovered", self._what)
