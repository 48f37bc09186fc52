"""Server-sent events as the stream endpoint sends them: an incremental parser."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass


@dataclass(frozen=True)
class SSEEvent:
    """One server-sent event: `event` defaults to "message"; `data` is the joined data lines."""

    event: str
    data: str


class SSEParser:
    """Incremental Server-Sent Events parser fed one line at a time (without the line terminator).

    `feed` returns the completed event when a blank line ends one, else None; `flush` returns a
    trailing event the stream ended without a blank line after. Comments (":...") and fields other
    than `event`/`data` are ignored, per the SSE spec.
    """

    def __init__(self) -> None:
        self._event = ""
        self._data: list[str] = []

    def feed(self, line: str) -> SSEEvent | None:
        """Consume one line; return an event when it completes one."""
        if line == "":
            return self.flush()
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        return None

    def flush(self) -> SSEEvent | None:
        """The pending event, if any field was seen since the last one; resets the parser."""
        if not self._data and not self._event:
            return None
        event = SSEEvent(self._event or "message", "\n".join(self._data))
        self._event, self._data = "", []
        return event


async def sse_events(lines: AsyncIterator[str]) -> AsyncGenerator[SSEEvent, None]:
    """The events of an SSE line stream, including a final one not followed by a blank line."""
    parser = SSEParser()
    async for line in lines:
        event = parser.feed(line)
        if event is not None:
            yield event
    tail = parser.flush()
    if tail is not None:
        yield tail
