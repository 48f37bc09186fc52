"""Server-sent events done right: errors before the first byte become ordinary JSON errors,
errors after it end the stream with an error event, and a client that goes away cancels the
generation (sse-starlette cancels the iterator; the service's `finally` frees the KV slot)."""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator, Callable
from json.encoder import encode_basestring  # type: ignore[attr-defined]  # json.dumps(str, ensure_ascii=False)

from sse_starlette import EventSourceResponse, ServerSentEvent

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
    return EventSourceResponse(guarded(), ping=15, send_timeout=send_timeout_s)
