"""The SSE response's per-stream send watchdog (frontend.api.streaming._EventStream): a send that
takes longer than `send_timeout` ends the stream with `SendTimeoutError` and closes the body
iterator, as sse-starlette's per-send timeout does; a stream whose sends are quick is never cut,
however long it runs or waits between events."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sse_starlette import EventSourceResponse
from sse_starlette.sse import SendTimeoutError

from frontend.api.streaming import sse_response

TIMEOUT = 0.05


async def _collect(response: Any, send_delay: float) -> tuple[list[Any], BaseException | None]:
    sent: list[Any] = []

    async def send(message: Any) -> None:
        if message["type"] == "http.response.body" and message["body"]:
            await asyncio.sleep(send_delay)
        sent.append(message)

    try:
        await response._stream_response(send)
    except BaseException as err:  # cancellation too: the test inspects it
        return sent, err
    return sent, None


def _response(events: AsyncIterator[bytes]) -> Any:
    return sse_response(events, lambda err: b"", send_timeout_s=TIMEOUT)


def _library(events: AsyncIterator[bytes]) -> Any:
    """sse-starlette's own response (a timeout per send), for the same outcome."""
    return EventSourceResponse(events, ping=15, send_timeout=TIMEOUT)


MAKERS = pytest.mark.parametrize("make", [_response, _library], ids=["watch", "library"])


@MAKERS
def test_quick_sends_are_never_cut_however_long_the_stream(make: Any) -> None:
    async def events() -> AsyncIterator[bytes]:
        for i in range(6):
            await asyncio.sleep(TIMEOUT * 0.7)  # the whole stream takes several timeouts
            yield f"data: {i}\r\n\r\n".encode()

    sent, err = asyncio.run(_collect(make(events()), send_delay=TIMEOUT * 0.3))
    assert err is None
    bodies = [m["body"] for m in sent if m["type"] == "http.response.body"]
    assert bodies == [f"data: {i}\r\n\r\n".encode() for i in range(6)] + [b""]
    assert sent[-1]["more_body"] is False


@MAKERS
def test_a_stuck_send_times_out_and_closes_the_iterator(make: Any) -> None:
    closed = []

    async def events() -> AsyncIterator[bytes]:
        try:
            yield b"data: 0\r\n\r\n"
            yield b"data: 1\r\n\r\n"
        finally:
            closed.append(True)

    async def run() -> tuple[list[Any], BaseException | None, float]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        sent, err = await _collect(make(events()), send_delay=10.0)
        return sent, err, loop.time() - start

    sent, err, took = asyncio.run(run())
    assert isinstance(err, SendTimeoutError)
    assert closed == [True]
    assert TIMEOUT <= took < 1.0
    assert [m["type"] for m in sent] == ["http.response.start"]  # the stuck body send never finished


@MAKERS
@pytest.mark.parametrize("delay", [0.0, TIMEOUT * 0.5])
def test_an_outer_cancel_is_not_taken_for_a_timeout(make: Any, delay: float) -> None:
    async def events() -> AsyncIterator[bytes]:
        while True:
            yield b"data: x\r\n\r\n"
            await asyncio.sleep(0.01)

    async def run() -> BaseException | None:
        task = asyncio.ensure_future(_collect(make(events()), send_delay=delay))
        await asyncio.sleep(TIMEOUT * 0.5)
        task.cancel()
        _, err = await task
        return err

    assert type(asyncio.run(run())) is asyncio.CancelledError
