"""One way to run a request's choice streams: `merge_streams` fans in the `n` (or prompts x n)
streams of one request, and fails before the first byte when nothing could start.

Every route that streams or collects generations uses it (OpenAI completions and chat, streaming
or not, and the native stream with one choice), so they agree on what a client sees:

* a failure before any choice produced an item (overloaded, the engine down, a prompt the engine
  refused) raises from `merge_streams` itself, before a response exists: the route's caller gets
  a plain JSON error with its real status, never a 200 stream that carries only an error;
* after that, the merged iterator yields `(index, item)` in arrival order and re-raises the
  first failure of any choice (an `APIError`; anything else becomes a logged 500), which ends a
  stream with its error event;
* closing the merged iterator (the client went away, an error, the end) cancels every choice
  still running, so each choice's `finally` frees its KV slot.

Written here rather than taken from a library: vLLM's `merge_async_iterators` is not a package of
its own, and aiostream's `merge` neither tags items with their source nor primes the first item.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Generic, TypeVar

from frontend import errors

log = logging.getLogger(__name__)

T = TypeVar("T")


class _End:
    """A choice's stream is exhausted."""


_END = _End()


class _Merged(Generic[T]):
    def __init__(self, streams: Sequence[AsyncIterator[T]]) -> None:
        self._queue: asyncio.Queue[tuple[int, T | _End | errors.APIError]] = asyncio.Queue()
        self._tasks = [asyncio.create_task(self._pump(i, s), name=f"choice-{i}") for i, s in enumerate(streams)]
        self._pending = len(streams)

    async def _pump(self, index: int, stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                self._queue.put_nowait((index, item))
            self._queue.put_nowait((index, _END))
        except errors.APIError as err:
            self._queue.put_nowait((index, err))
        except Exception:  # never leave the reader waiting on a choice that died
            log.exception("choice %d failed", index)
            self._queue.put_nowait((index, errors.APIError("internal error during generation")))
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()  # cancelled mid-iteration: the stream's own `finally` runs now

    async def next(self) -> tuple[int, T] | None:
        """The next item of any choice; None when all ended; raises a choice's failure."""
        while self._pending:
            index, item = await self._queue.get()
            if isinstance(item, _End):
                self._pending -= 1
                continue
            if isinstance(item, errors.APIError):
                raise item
            return index, item
        return None

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


async def merge_streams(streams: Sequence[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Start every stream; return once the first item arrived (raising the failure when the first
    thing to arrive is one). See the module docstring for the contract."""
    merged = _Merged(streams)
    try:
        first = await merged.next()
    except BaseException:
        await merged.close()
        raise

    async def items() -> AsyncIterator[tuple[int, T]]:
        try:
            item = first
            while item is not None:
                yield item
                item = await merged.next()
        finally:
            await merged.close()

    return items()


async def collect(streams: Sequence[AsyncIterator[T]]) -> dict[int, list[T]]:
    """Every item of every stream, per stream index (for responses that are not streamed)."""
    out: dict[int, list[T]] = {i: [] for i in range(len(streams))}
    merged = await merge_streams(streams)
    async with contextlib.aclosing(merged):  # type: ignore[type-var]  # an async generator
        async for index, item in merged:
            out[index].append(item)
    return out
