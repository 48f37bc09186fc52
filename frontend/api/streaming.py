"""Server-sent events done right: errors before the first byte become ordinary JSON errors,
errors after it end the stream with an error event, and a client that goes away cancels the
generation (sse-starlette cancels the iterator; the service's `finally` frees the KV slot)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from sse_starlette import EventSourceResponse, ServerSentEvent

from frontend.errors import APIError


async def prime(stream: AsyncIterator[object]) -> AsyncIterator[object]:
    """Run `stream` up to its first item now, so early failures raise before the response starts."""
    first = await anext(stream)

    async def chained() -> AsyncIterator[object]:
        yield first
        async for item in stream:
            yield item

    return chained()


def sse_response(
    events: AsyncIterator[ServerSentEvent], on_error: Callable[[APIError], ServerSentEvent]
) -> EventSourceResponse:
    async def guarded() -> AsyncIterator[ServerSentEvent]:
        try:
            async for event in events:
                yield event
        except APIError as err:
            yield on_error(err)

    return EventSourceResponse(guarded(), ping=15, send_timeout=30)
