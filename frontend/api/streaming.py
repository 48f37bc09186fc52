"""Server-sent events done right: errors before the first byte become ordinary JSON errors,
errors after it end the stream with an error event, and a client that goes away cancels the
generation (sse-starlette cancels the iterator; the service's `finally` frees the KV slot)."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator, Callable
from json.encoder import encode_basestring  # type: ignore[attr-defined]  # json.dumps(str, ensure_ascii=False)

import anyio
from sse_starlette import EventSourceResponse, ServerSentEvent
from sse_starlette.event import ensure_bytes
from sse_starlette.sse import SendTimeoutError
from sse_starlette.sse import logger as sse_logger
from starlette.types import Send

from frontend.errors import APIError

# JSON leaves these raw inside strings, and line splitters that follow Unicode rather than the SSE
# spec (JavaScript's old eval, Python's str.splitlines) cut an event's data at them.
_LINE_BREAKS = str.maketrans({"\u0085": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse_json(data: object) -> str:
    """`data` as JSON for an SSE `data:` field: UTF-8 text, with U+0085, U+2028 and U+2029 escaped
    (they occur only inside JSON strings, where `\\uXXXX` means the same character)."""
    text = json.dumps(data, ensure_ascii=False)
    # str.translate walks every character in Python-level lookups (~12 us a chunk, as much as the
    # encoding); three substring scans are C loops, and these characters are rare.
    if "\u2028" in text or "\u2029" in text or "\u0085" in text:
        text = text.translate(_LINE_BREAKS)
    return text


def sse_frame(data: str, event: str | None = None) -> bytes:
    """One SSE event of single-line `data` (JSON, as `sse_json` writes it), the bytes
    `ServerSentEvent(data, event=event).encode()` gives, without building one: EventSourceResponse
    sends bytes as they are."""
    if event is None:
        return f"data: {data}\r\n\r\n".encode()
    return f"event: {event}\r\ndata: {data}\r\n\r\n".encode()


class TextFrame:
    """An SSE event whose only varying part is one JSON string (a text chunk's text), rendered ONCE
    the slow way (pydantic model, JSON, SSE encoding) around a placeholder and then filled in per
    chunk: the same bytes `render(text)` gives, at the cost of escaping `text` alone.

    `render(text)` must give the event's bytes, with `text` as one JSON string value somewhere in it."""

    __slots__ = ("_head", "_tail")

    def __init__(self, render: Callable[[str], bytes]) -> None:
        # Private-use characters: JSON leaves them raw, and no id, model name or number holds them.
        marker = f"\ue000{secrets.token_hex(8)}\ue000"
        head, sep, tail = render(marker).decode().partition(encode_basestring(marker))
        if not sep or encode_basestring(marker) in tail:
            raise ValueError("render(text) must hold text exactly once, as a JSON string")
        self._head, self._tail = head, tail

    def __call__(self, text: str) -> bytes:
        quoted = encode_basestring(text)
        if "\u2028" in quoted or "\u2029" in quoted or "\u0085" in quoted:  # as sse_json does
            quoted = quoted.translate(_LINE_BREAKS)
        return (self._head + quoted + self._tail).encode()


def sse_response(
    events: AsyncIterator[ServerSentEvent | bytes],
    on_error: Callable[[APIError], ServerSentEvent | bytes | list[ServerSentEvent | bytes]],
    *,
    send_timeout_s: float = 15.0,
) -> EventSourceResponse:
    async def guarded() -> AsyncIterator[ServerSentEvent | bytes]:
        try:
            async for event in events:
                yield event
        except APIError as err:
            final = on_error(err)  # one event, or several (OpenAI's stream ends with `[DONE]` even then)
            for event in final if isinstance(final, list) else [final]:
                yield event

    # send_timeout: a reader who takes nothing for that long is dropped; sse-starlette then closes
    # the generator, whose `finally` cancels the generation (frees the KV slot).
    return _EventStream(guarded(), ping=15, send_timeout=send_timeout_s)


class _EventStream(EventSourceResponse):
    """sse-starlette's response (3.x), its events' sends timed by ONE watchdog timer per stream
    (`_SendWatch`) instead of an anyio cancel scope and timer per send (~11 us an event, on the
    streaming hot path); the same outcome when a send takes longer than `send_timeout`: the send
    is cancelled, the body iterator closed, `SendTimeoutError` raised. Pings keep the library's
    per-send timeout (one per `ping` seconds)."""

    async def _stream_response(self, send: Send) -> None:
        if self.send_timeout is None:
            return await super()._stream_response(send)
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        loop = asyncio.get_running_loop()
        with anyio.CancelScope() as scope:
            watch = _SendWatch(loop, scope, self.send_timeout)
            try:
                async for data in self.body_iterator:
                    try:
                        chunk = ensure_bytes(data, self.sep)
                        sse_logger.debug("chunk: %s", chunk)
                        watch.started = loop.time()
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                        watch.started = None
                    except BaseException:
                        await self._close_body()
                        raise
            finally:
                watch.stop()
        if watch.timed_out:
            raise SendTimeoutError()
        async with self._send_lock:
            self.active = False
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _close_body(self) -> None:
        """The library's cleanup after a failed send: close the iterator (suspended at its yield)
        so its `finally` runs before the error escapes, within `cleanup_timeout`."""
        aclose = getattr(self.body_iterator, "aclose", None)
        if aclose is None:
            return
        with anyio.move_on_after(self._cleanup_timeout, shield=True) as cleanup_scope:
            try:
                await aclose()
            except Exception:
                sse_logger.exception("Error closing body iterator after encoding or send failure")
        if cleanup_scope.cancel_called:
            sse_logger.warning("Body iterator cleanup cancelled after %s seconds", self._cleanup_timeout)


class _SendWatch:
    """Cancels `scope` once a send has run for `timeout` seconds: `started` is when the send in
    progress began (None between sends). One timer, re-armed only when it fires (at most once
    per `timeout`), at the earliest moment a send could then time out."""

    __slots__ = ("_handle", "_loop", "_scope", "_timeout", "started", "timed_out")

    def __init__(self, loop: asyncio.AbstractEventLoop, scope: anyio.CancelScope, timeout: float) -> None:
        self._loop, self._scope, self._timeout = loop, scope, timeout
        self.started: float | None = None
        self.timed_out = False
        self._handle = loop.call_at(loop.time() + timeout, self._check)

    def _check(self) -> None:
        started = self.started
        if started is not None and self._loop.time() - started >= self._timeout:
            self.timed_out = True
            self._scope.cancel()
            return
        # No send yet can end before this: the one in progress, or one that starts from now.
        due = (self._loop.time() if started is None else started) + self._timeout
        self._handle = self._loop.call_at(due, self._check)

    def stop(self) -> None:
        self._handle.cancel()
