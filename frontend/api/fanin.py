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
  still running, so each choice's `finally` frees its KV slot;
* a choice's next item is pulled only once its previous one was read (one stream is read
  directly, with no task between): a reader slower than the engine leaves the tokens waiting in
  the generation's queue, where the next pull takes them all as one item (coalescing, see
  `frontend.generation.stream`), instead of a queue of one-token items here.

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


def _internal_error(index: int) -> errors.APIError:
    log.exception("choice %d failed", index)
    return errors.APIError("internal error during generation")


class _Single(Generic[T]):
    """One stream, read directly by the reader's own task (no pump, no queue: one task switch less
    per item, and the reader's pace reaches the generation)."""

    def __init__(self, stream: AsyncIterator[T]) -> None:
        self._stream = stream
        self._ended = False

    async def next(self) -> tuple[int, T] | None:
        if self._ended:
            return None
        try:
            return 0, await anext(self._stream)
        except StopAsyncIteration:
            self._ended = True
            return None
        except errors.APIError:
            self._ended = True
            raise
        except Exception as err:  # never a traceback to the client: a logged 500
            self._ended = True
            raise _internal_error(0) from err

    async def close(self) -> None:
        aclose = getattr(self._stream, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()  # the stream's own `finally` runs now (cancels the generation)


class _Merged(Generic[T]):
    def __init__(self, streams: Sequence[AsyncIterator[T]]) -> None:
        self._queue: asyncio.Queue[tuple[int, T | _End | errors.APIError]] = asyncio.Queue()
        # Set when the choice's last item was read: its pump pulls the next one only then.
        self._read = [asyncio.Event() for _ in streams]
        self._tasks = [asyncio.create_task(self._pump(i, s), name=f"choice-{i}") for i, s in enumerate(streams)]
        self._pending = len(streams)

    async def _pump(self, index: int, stream: AsyncIterator[T]) -> None:
        read = self._read[index]
        try:
            async for item in stream:
                read.clear()
                self._queue.put_nowait((index, item))
                await read.wait()
            self._queue.put_nowait((index, _END))
        except errors.APIError as err:
            self._queue.put_nowait((index, err))
        except Exception:  # never leave the reader waiting on a choice that died
            self._queue.put_nowait((index, _internal_error(index)))
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()  # cancelled mid-iteration: the stream's own `finally` runs now

    async def next(self) -> tuple[int, T] | None:
        """The next item of any choice; None when all ended; raises a choice's failure."""
        while self._pending:
            index, item = await self._queue.get()
            self._read[index].set()
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
    merged: _Single[T] | _Merged[T] = _Single(streams[0]) if len(streams) == 1 else _Merged(streams)
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
