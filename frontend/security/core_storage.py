"""Rate-limit storage kept in the engine core (`python -m frontend --workers N` without Redis).

Every HTTP worker already has one ordered socket to the ONE engine-core process
(`frontend.engine.remote.RemoteEngine`). This `limits` storage forwards each operation over it
(`ipc.LIMITS`); the core runs it on a `limits` `MemoryStorage` in its own event loop
(`frontend.engine.core`), so all workers share every window and quota. It is atomic for the same
reason the memory storage is within one process: one event loop runs each operation, and
`MemoryStorage` guards each key's read-modify-write with an asyncio lock (`acquire_entry`,
`incr`). Chosen over a file (SQLite) storage because it needs no disk, no cross-process locking
and no polling: a write transaction per request from N processes would serialize on the file lock
and block their event loops. Like any memory storage it is lost when the gateway restarts; Redis
(`GATEWAY_RATELIMIT_URL`) keeps limits across restarts and gateways.
"""

from __future__ import annotations

from typing import Any, Protocol

from limits.aio.storage import MovingWindowSupport, Storage


class LimitsChannel(Protocol):
    """What the storage needs of the engine: one call answered by the core (RemoteEngine)."""

    async def limits_call(self, method: str, args: tuple[Any, ...]) -> Any: ...


class CoreUnreachable(ConnectionError):
    """No engine core to ask (not connected yet, or closed): the limiter answers 503."""


class EngineCoreStorage(Storage, MovingWindowSupport):
    STORAGE_SCHEME: list[str] | None = ["async+gateway-engine-core"]  # noqa: RUF012 (limits declares it so)

    def __init__(self, uri: str | None = None, **options: Any) -> None:
        super().__init__(uri, wrap_exceptions=False)
        self.channel: LimitsChannel | None = None

    def attach(self, channel: LimitsChannel) -> None:
        """Bind to the worker's engine (done in the app's lifespan, once the engine exists)."""
        self.channel = channel

    async def _call(self, method: str, *args: Any) -> Any:
        if self.channel is None:
            raise CoreUnreachable("the engine core is not connected")
        return await self.channel.limits_call(method, args)

    @property
    def base_exceptions(self) -> type[Exception] | tuple[type[Exception], ...]:
        return (ConnectionError, TimeoutError)

    async def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        return int(await self._call("incr", key, expiry, amount))

    async def get(self, key: str) -> int:
        return int(await self._call("get", key))

    async def get_expiry(self, key: str) -> float:
        return float(await self._call("get_expiry", key))

    async def check(self) -> bool:
        return bool(await self._call("check"))

    async def reset(self) -> int | None:
        value = await self._call("reset")
        return None if value is None else int(value)

    async def clear(self, key: str) -> None:
        await self._call("clear", key)

    async def acquire_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        return bool(await self._call("acquire_entry", key, limit, expiry, amount))

    async def get_moving_window(self, key: str, limit: int, expiry: int) -> tuple[float, int]:
        start, count = await self._call("get_moving_window", key, limit, expiry)
        return float(start), int(count)
