"""Rate limits and token quotas on the `limits` library's async storage (memory or Redis).

* requests per minute (per key, per client IP for unauthenticated traffic, failed authentications
  per IP): `limits`' moving window. Its `acquire_entry` is one atomic step (a Lua script in Redis,
  a lock without awaits in memory), so N concurrent requests against a limit of L admit exactly L.
* tokens per day (per key): a counter per key and UTC day, `incr` by the reservation (atomic
  INCRBY); a reservation that overshoots is taken back at once and refused. This never admits more
  than the quota; under contention right at the limit a request may be refused that would have fit
  a moment later (the conservative side). Settling adds (used - reserved), usually negative.

Every storage call is bounded by `timeout_s`; a storage error or timeout raises
`SecurityBackendUnavailable` (503), or, with `fail_open`, lets the request through unmetered.

Storage: Redis when a URL is given (shared by every gateway, kept across restarts); else, with
`python -m frontend --workers N`, the engine core's memory over its IPC (`EngineCoreStorage`: one
process and one event loop hold every window, so the workers share them and `limits`' per-key
asyncio locks keep each operation atomic); else this process's memory.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import cache
from typing import TypeVar

from limits import RateLimitItem, RateLimitItemPerMinute
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import MovingWindowRateLimiter

from frontend import errors

log = logging.getLogger(__name__)
T = TypeVar("T")
_DAY_S = 86_400


@cache
def _per_minute(n: int) -> RateLimitItem:
    return RateLimitItemPerMinute(n)


def duration(seconds: float) -> str:
    """OpenAI's reset format: "20ms", "1s", "6m0s", "1h2m3s"."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    s = math.ceil(seconds)
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    if h:
        return f"{h}h{m}m{s}s"
    return f"{m}m{s}s" if m else f"{s}s"


@dataclass(frozen=True)
class Decision:
    allowed: bool
    limit: int
    remaining: int
    reset_s: float  # seconds until a unit frees (requests) or the quota resets (tokens)

    def headers(self, kind: str) -> dict[str, str]:
        return {
            f"x-ratelimit-limit-{kind}": str(self.limit),
            f"x-ratelimit-remaining-{kind}": str(max(0, self.remaining)),
            f"x-ratelimit-reset-{kind}": duration(self.reset_s),
        }

    def refusal(self, kind: str, message: str) -> errors.RateLimited:
        return errors.RateLimited(message, retry_after_s=max(1, math.ceil(self.reset_s)), headers=self.headers(kind))


def build_storage(url: str | None, timeout_s: float, *, engine_core: bool = False) -> Storage:
    """Redis for `url`; else the engine core's memory when there is one (`--workers N`), else ours."""
    if not url or not url.strip():
        if engine_core:
            from frontend.security.core_storage import EngineCoreStorage

            return EngineCoreStorage()
        return MemoryStorage()
    from frontend.security.keys import redis_pool

    uri = url.strip()
    uri = uri if uri.startswith("async+") else f"async+{uri}"
    pool = redis_pool(uri.removeprefix("async+"), timeout_s)
    return RedisStorage(uri, implementation="redispy", key_prefix="gateway-limits", connection_pool=pool)  # type: ignore[arg-type]


STORAGE_CONCURRENCY = 32  # storage operations in flight per process (redis_pool's max_connections)


class RateLimiter:
    def __init__(self, storage: Storage, *, timeout_s: float = 0.25, fail_open: bool = False) -> None:
        self.storage = storage
        self.window = MovingWindowRateLimiter(storage)
        self.timeout_s = timeout_s
        self.fail_open = fail_open
        self._outage = False
        # A burst queues here for one of the pool's connections (redis_pool's 32), so the deadline
        # below measures the storage, not the queue: 200 requests at once on a loaded 2-core machine
        # spent it waiting for a connection and answered 503 "storage unavailable" (2026-12-07).
        self._slots = asyncio.Semaphore(STORAGE_CONCURRENCY)

    async def _bounded(self, op: Callable[[], Awaitable[T]]) -> T | None:
        """Run one storage operation within `timeout_s`; None = unknown (fail-open)."""
        try:
            if self._outage and self._slots.locked():  # while the storage is down, do not queue for it
                raise ConnectionError("rate-limit storage still unavailable")
            async with self._slots:
                async with asyncio.timeout(self.timeout_s):
                    result = await op()
        except Exception as err:
            if not self._outage:
                self._outage = True
                log.warning(
                    "rate-limit storage unavailable (%s); %s",
                    type(err).__name__,
                    "letting requests through (fail-open)" if self.fail_open else "answering 503",
                )
            if self.fail_open:
                return None
            raise errors.SecurityBackendUnavailable(
                "rate limiting is temporarily unavailable", retry_after_s=1
            ) from err
        if self._outage:
            self._outage = False
            log.info("rate-limit storage reachable again")
        return result

    # ------------------------------------------------------------------ requests per minute
    async def hit(self, limit: int, *ids: str) -> Decision:
        """Take one request from a per-minute moving window of `limit` (0 = unlimited)."""
        if limit <= 0:
            return Decision(True, 0, 0, 0.0)
        item = _per_minute(limit)
        ok = await self._bounded(lambda: self.window.hit(item, *ids))
        if ok is None:  # fail-open: nothing is known about the window
            return Decision(True, limit, -1, 0.0)
        # One more storage call on success: the x-ratelimit-* headers of every response say
        # how much of the window is left.
        return await self.stats(limit, *ids, allowed=bool(ok))

    async def exhausted(self, limit: int, *ids: str) -> Decision | None:
        """The refusal when the window is already full (nothing is taken), else None."""
        if limit <= 0:
            return None
        item = _per_minute(limit)
        ok = await self._bounded(lambda: self.window.test(item, *ids))
        if ok is None or ok:
            return None
        return await self.stats(limit, *ids, allowed=False)

    async def stats(self, limit: int, *ids: str, allowed: bool) -> Decision:
        item = _per_minute(limit)
        stats = await self._bounded(lambda: self.window.get_window_stats(item, *ids))
        if stats is None:
            return Decision(allowed, limit, 0 if not allowed else -1, 60.0)
        return Decision(allowed, limit, stats.remaining, max(0.0, stats.reset_time - time.time()))

    # ------------------------------------------------------------------ tokens per day
    @staticmethod
    def _day(now: float) -> tuple[str, float]:
        """The UTC day's name and the seconds until it ends."""
        today = dt.datetime.fromtimestamp(now, dt.UTC)
        midnight = dt.datetime.combine(today.date() + dt.timedelta(days=1), dt.time(), dt.UTC)
        return today.strftime("%Y-%m-%d"), (midnight - today).total_seconds()

    async def reserve_tokens(self, limit: int, key_id: str, amount: int) -> tuple[Decision, str | None]:
        """Reserve `amount` tokens of today's `limit`; returns the decision and the counter's key
        (None when nothing was reserved: refused, unlimited, or fail-open)."""
        day, reset_s = self._day(time.time())
        if limit <= 0:
            return Decision(True, 0, 0, reset_s), None
        counter = f"tokens/{key_id}/{day}"
        total = await self._bounded(lambda: self.storage.incr(counter, 2 * _DAY_S, amount))
        if total is None:
            return Decision(True, limit, -1, reset_s), None
        if total <= limit:
            return Decision(True, limit, limit - total, reset_s), counter
        await self._bounded(lambda: self.storage.incr(counter, 2 * _DAY_S, -amount))
        return Decision(False, limit, max(0, limit - (total - amount)), reset_s), None

    async def adjust_tokens(self, counter: str, delta: int) -> None:
        """Settle a reservation: add `delta` (negative = refund). Never raises."""
        if delta == 0:
            return
        try:
            async with asyncio.timeout(self.timeout_s):
                await self.storage.incr(counter, 2 * _DAY_S, delta)
        except Exception as err:
            log.warning("could not settle a token reservation (%s): %+d tokens lost", type(err).__name__, delta)

    async def close(self) -> None:
        if isinstance(self.storage, MemoryStorage):
            timer = self.storage.timer
            if timer is not None and not timer.done():
                timer.cancel()
            return
        bridge = getattr(self.storage, "bridge", None)
        client = getattr(bridge, "storage", None)
        if client is not None and hasattr(client, "aclose"):
            await client.aclose()
            await client.connection_pool.disconnect()
