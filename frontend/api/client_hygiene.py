"""Client hygiene: what a slow, stalled, vanished or oversized client may cost the gateway.

* `BodyLimitMiddleware`: a request body larger than `max_body_bytes` gets a 413 in the error
  envelope before anything parses it: a declared `Content-Length` over the limit is refused
  before a byte of the body is read, a chunked body is counted as it arrives and cut at the limit.
  A body that trickles in slower than `body_timeout_s` (start to end) gets a 408. Both close the
  connection. Hand-written: Starlette's `RequestBodyLimitMiddleware` (FastAPI's `max_body_size`)
  replaces any response with a plain-text 413 outside the project's envelope and has no timeout.
* `CancelOnDisconnectMiddleware`: while a request is being worked on and no response has
  started (a non-streaming generation, or a stream waiting for its first token), a client that
  disconnects cancels the work, so the generation's `finally` frees its KV slot at once.
  Streams that have started are sse-starlette's job (disconnect listener + `send_timeout`).
* `GuardedH11Protocol`: uvicorn's h11 protocol with a header-read deadline. uvicorn (0.54) has
  no header timeout (its keep-alive timer only runs between requests and any byte cancels it),
  so a slowloris client that trickles a header forever holds its connection forever; this
  subclass closes a connection whose request head is not complete `header_timeout_s` after the
  connection opened (or after its first byte, for the next request on a kept-alive connection).
  It also bounds each connection's kernel send buffer (`SEND_BUFFER_BYTES`), so that a stream
  whose reader stops reading blocks soon and sse-starlette's send timeout drops it, which cancels
  its generation and frees its KV slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import socket
from collections.abc import Callable
from typing import Any, ClassVar

import h11
from sse_starlette.sse import SendTimeoutError
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from frontend.errors import error_body
from frontend.observability.metrics import note_client_gone
from frontend.settings import Settings

log = logging.getLogger(__name__)

_DISCONNECT: Message = {"type": "http.disconnect"}


async def _send_error(send: Send, status: int, message: str, error_type: str, code: str) -> None:
    body = json.dumps(error_body(message, error_type, None, code)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),  # the unread rest of the body is never read
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _declared_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            with contextlib.suppress(ValueError):
                return int(value)
    return None


def json_values(body: bytes, at_most: int) -> int:
    """How many JSON values `body` holds in its arrays and objects (commas outside strings, plus
    one), or a number above `at_most` as soon as that is certain. A few passes of C over the bytes
    (no Python object per value): what a parser would build, counted before it builds it."""
    commas = body.count(b",")
    if commas <= at_most:  # the common case: not even every comma could exceed it
        return commas + 1
    plain = body.replace(b"\\\\", b"").replace(b'\\"', b"")  # escaped backslashes, then quotes
    if plain.count(b'"') // 2 > at_most:  # more strings than values allowed
        return plain.count(b'"') // 2
    return b"".join(plain.split(b'"')[::2]).count(b",") + 1  # the commas outside strings


class BodyLimitMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        max_body_bytes: int,
        body_timeout_s: float,
        max_json_values: Callable[[], int] | None = None,
    ) -> None:
        """`max_json_values()`: the most JSON values (token ids, strings, numbers) a body may
        hold; a 6 MB list of token ids fits the byte limit but cost +753 MiB and blocked the event
        loop 1.7 s in parsing and validation before the context check refused it."""
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.max_json_values = max_json_values

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_body_bytes
        declared = _declared_length(scope)
        if declared is not None and declared > limit:
            await _send_error(send, 413, _too_large(limit), "invalid_request_error", "request_too_large")
            return

        received = 0
        body_done = False
        chunks: list[bytes] = []
        values_limit = self.max_json_values() if self.max_json_values is not None else None
        refused = False  # our error went out; whatever the app says after that is dropped
        started = False
        loop = asyncio.get_running_loop()
        deadline: float | None = None

        async def refuse(status: int, message: str, code: str) -> Message:
            nonlocal refused
            refused = True
            if not started:
                await _send_error(send, status, message, "invalid_request_error", code)
            return _DISCONNECT  # the app sees a client that went away

        async def limited_receive() -> Message:
            nonlocal received, body_done, deadline
            if refused:
                return _DISCONNECT
            if body_done:
                return await receive()
            if deadline is None:
                deadline = loop.time() + self.body_timeout_s
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                return await refuse(408, f"the request body did not arrive within {self.body_timeout_s:g} s", "timeout")
            if message["type"] == "http.request":
                chunk = message.get("body", b"")
                received += len(chunk)
                if received > limit:
                    return await refuse(413, _too_large(limit), "request_too_large")
                body_done = not message.get("more_body", False)
                if values_limit is not None:
                    chunks.append(chunk)  # references: the app holds the same bytes
                    # Under 2 bytes per value ("1,") the body cannot hold too many: not scanned.
                    if body_done and received > 2 * values_limit:
                        values = json_values(b"".join(chunks), values_limit)
                        if values > values_limit:
                            return await refuse(413, _too_many_values(values, values_limit), "request_too_large")
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not refused:
                raise
            log.debug("request refused for its body; the app's error is dropped", exc_info=True)


def _too_large(limit: int) -> str:
    return f"the request body exceeds this server's limit of {limit} bytes"


def _too_many_values(values: int, limit: int) -> str:
    return (
        f"the request body holds {values} JSON values (token ids, strings); this server takes at most {limit} "
        "(the largest batch of prompts of the model's context)"
    )


class CancelOnDisconnectMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        watcher: asyncio.Task[None] | None = None
        gone = False
        started = False

        async def watch() -> None:
            nonlocal gone
            message = await receive()  # after the body, the only message left is the disconnect
            if message["type"] == "http.disconnect" and not started:
                gone = True
                work.cancel()

        def stop_watching() -> None:
            if watcher is not None and not watcher.done():
                watcher.cancel()

        async def watched_receive() -> Message:
            nonlocal watcher
            if watcher is not None:  # the app listens itself now (a stream's disconnect listener)
                stop_watching()
                if gone:
                    return _DISCONNECT
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False) and not started:
                watcher = asyncio.get_running_loop().create_task(watch(), name="disconnect-watch")
            return message

        async def watched_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                stop_watching()
            await send(message)

        async def run() -> None:
            await self.app(scope, watched_receive, watched_send)

        work: asyncio.Task[None] = asyncio.get_running_loop().create_task(run())
        try:
            await asyncio.shield(work)
        except asyncio.CancelledError:
            if not work.done():  # we were cancelled ourselves: take the work down with us
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await work
                raise
            if not gone:
                raise
            note_client_gone(scope)  # counted and logged as 499, not as a 500
            log.info("client disconnected before the response; its generation was cancelled")
        except SendTimeoutError:
            # A stream whose reader stopped reading: sse-starlette closed the generator (which
            # cancels the generation); uvicorn closes the connection when we return.
            log.warning("dropped an SSE client that stopped reading")
        finally:
            stop_watching()


# --------------------------------------------------------------------------- uvicorn
@functools.cache
def _env_header_timeout() -> float:
    return Settings().header_timeout_s


SEND_BUFFER_BYTES = 64 * 1024  # per connection (Linux doubles it): ample for a stream that is read


class GuardedH11Protocol(H11Protocol):
    """h11 with a deadline on reading a request head, and a bounded send buffer (see the module
    docstring)."""

    header_timeout_s: ClassVar[float | None] = None  # None: GATEWAY_HEADER_TIMEOUT_S

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        timeout = type(self).header_timeout_s
        self._header_timeout_s = _env_header_timeout() if timeout is None else timeout
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # What a reader that stopped reading may hold unread on our side: without a bound the
            # kernel grows the send buffer to 4 MiB, which absorbs the largest allowed stream, so the
            # SSE send timeout never fired and its generation ran to the end (80 s, 8 sequences).
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        super().connection_made(transport)
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self._arm_header_timer()  # (part of) a request head: the clock runs from its first byte
        else:
            self._disarm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self._header_timeout_s, self._header_timed_out)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            log.info("closing a connection whose request head did not arrive within %g s", self._header_timeout_s)
            self.transport.close()


def guarded_h11(header_timeout_s: float) -> type[GuardedH11Protocol]:
    """The protocol class with a fixed header deadline (one process; `--workers N` uses
    `GuardedH11Protocol` itself, which reads GATEWAY_HEADER_TIMEOUT_S in each worker)."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"header_timeout_s": header_timeout_s})


def uvicorn_options(settings: Settings, *, workers: int = 1) -> dict[str, Any]:
    """The uvicorn.run / uvicorn.Config arguments of the slow-client controls. `proxy_headers` off:
    uvicorn would otherwise take the client address from X-Forwarded-For of any loopback peer
    (its FORWARDED_ALLOW_IPS default), so a local client could pick its own identity; the gateway
    honours X-Forwarded-For only from GATEWAY_TRUSTED_PROXIES (frontend.security.clientip)."""
    return {
        "http": guarded_h11(settings.header_timeout_s) if workers == 1 else GuardedH11Protocol,
        "timeout_keep_alive": settings.keep_alive_timeout_s,
        "proxy_headers": False,
    }
