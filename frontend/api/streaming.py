"""Server-sent events done right: errors before the first byte become ordinary JSON errors,
errors after it end the stream with an error event, and a client that goes away cancels the
generation (sse-starlette cancels the iterator; the service's `finally` frees the KV slot)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable

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


def sse_response(
    events: AsyncIterator[ServerSentEvent],
    on_error: Callable[[APIError], ServerSentEvent | list[ServerSentEvent]],
    *,
    send_timeout_s: float = 15.0,
) -> EventSourceResponse:
    async def guarded() -> AsyncIterator[ServerSentEvent]:
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
