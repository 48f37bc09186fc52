"""`RemoteEngine`: the `Engine` of an HTTP worker when the scheduler runs in the engine core
(`frontend.engine.core`, `python -m frontend --workers N`).

The worker keeps everything but the step loop: it loads the same `ServedModel` (tokenizer) as the
core, and per generation it holds a handle whose `events` queue a receiver task fills from the
core's batched event messages. One DEALER socket carries every message in order (wire format:
`frontend.engine.ipc`); `submit` and `cancel` are synchronous and send without awaiting (pyzmq's
asyncio socket tries a NOBLOCK send at once and otherwise queues it behind the earlier ones, so a
cancel never overtakes its submit).

Heartbeats go out every `heartbeat_s`; the core answers each with its load, which `load()`
returns. A core silent for `timeout_s` is treated as gone: live generations end with
`UpstreamUnavailable`, `submit` refuses, `ready()` is false until it answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from frontend.engine import ipc
from frontend.engine.model import ServedModel
from frontend.engine.protocol import (
    EngineRequest,
    ErrorEvent,
    Event,
    EventSink,
    GenerationHandle,
    Overloaded,
    UpstreamUnavailable,
)

log = logging.getLogger(__name__)

ModelLoader = Callable[[str, str], ServedModel]


@dataclass(eq=False)
class RemoteHandle:
    """One generation running in the engine core; its events arrive on `events` (or `sink`)."""

    request_id: int
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    sink: EventSink | None = None
    finished: bool = False  # its last event arrived, or it was cancelled


class RemoteEngine:
    def __init__(
        self,
        address: str,
        *,
        repository: Path | None = None,
        model_loader: ModelLoader | None = None,
        heartbeat_s: float = 1.0,
        timeout_s: float = 5.0,
        startup_timeout_s: float = 120.0,
        query_timeout_s: float | None = None,
    ) -> None:
        """`model_loader(name, version)` gives the ServedModel (default: `ServedModel.load` from
        `repository`, the one the core's Triton serves). `query_timeout_s` bounds `ready()` and
        metrics questions (default min(1 s, timeout_s))."""
        if model_loader is None:
            if repository is None:
                raise ValueError("RemoteEngine needs a repository or a model_loader")
            repo = repository

            def model_loader(name: str, version: str) -> ServedModel:
                return ServedModel.load(repo, name, version)

        self.address = address
        self._model_loader = model_loader
        self._heartbeat_s = heartbeat_s
        self._timeout_s = timeout_s
        self._startup_timeout_s = startup_timeout_s
        self._query_timeout_s = query_timeout_s if query_timeout_s is not None else min(1.0, timeout_s)
        self._model: ServedModel | None = None
        self._ctx: zmq.asyncio.Context | None = None
        self._sock: zmq.asyncio.Socket | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._handles: dict[int, RemoteHandle] = {}
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._ids = itertools.count(1)
        self._load = (0, 0)
        self._last_heard = 0.0
        self._core_up = False
        self._closed = False
        self.identity = f"worker-{os.getpid()}-{secrets.token_hex(3)}".encode()
        self.event_messages = 0  # batched event messages received (tests assert on it)
        self.events_received = 0

    # ------------------------------------------------------------------ Engine protocol
    @property
    def model(self) -> ServedModel:
        if self._model is None:
            raise UpstreamUnavailable("the engine core has not answered yet")
        return self._model

    async def start(self) -> None:
        """Say hello to the core and load its model. Callable again after a failed start (the
        lifecycle retries it) or a close: each start opens a fresh socket."""
        self._loop = asyncio.get_running_loop()
        self._closed = False
        self._core_up = False
        self._model = None
        self._ctx = zmq.asyncio.Context()
        sock = self._ctx.socket(zmq.DEALER)
        ipc.configure(sock)
        sock.setsockopt(zmq.IDENTITY, self.identity)
        sock.connect(self.address)  # messages queue until the core is there
        self._sock = sock
        self._tasks.append(self._loop.create_task(self._receive(), name="remote-engine-receive"))
        try:
            name, version = await self._ask(ipc.HELLO, self._startup_timeout_s)
        except TimeoutError as err:
            await self.close()
            raise UpstreamUnavailable(f"no engine core answered at {self.address}") from err
        except BaseException:
            await self.close()
            raise
        self._model = self._model_loader(name, version)
        self._mark_heard()
        self._tasks.append(self._loop.create_task(self._heartbeats(), name="remote-engine-heartbeat"))
        log.info(
            "worker %s: engine core at %s serves %s version %s", self.identity.decode(), self.address, name, version
        )

    async def ready(self) -> bool:
        if self._sock is None or self._closed or not self._core_up:
            return False
        try:
            return bool(await self._ask(ipc.READY, self._query_timeout_s))
        except Exception:  # unreachable (timeout) or any failure: not ready
            return False

    def submit(self, request: EngineRequest, events: EventSink | None = None) -> GenerationHandle:
        if self._sock is None or self._closed:
            raise UpstreamUnavailable("the engine core is not connected")
        if not self._core_up:
            raise UpstreamUnavailable("the engine core is not answering")
        handle = RemoteHandle(next(self._ids), sink=events)
        self._handles[handle.request_id] = handle
        self._send((ipc.SUBMIT, handle.request_id, request))
        return handle

    def cancel(self, handle: GenerationHandle) -> None:
        if not isinstance(handle, RemoteHandle) or handle.finished:
            return  # a finished generation is already released in the core: nothing to send
        handle.finished = True
        if self._handles.pop(handle.request_id, None) is not None and not self._closed:
            self._send((ipc.CANCEL, handle.request_id))

    def load(self) -> tuple[int, int]:
        """The core's (running, waiting), as of its last heartbeat answer."""
        return self._load

    def in_flight(self) -> int:
        """This worker's own live generations (a worker drains these, not the whole core's)."""
        return len(self._handles)

    async def engine_metrics(self) -> bytes:
        """The core's exposition of the scheduler's series (GatewayMetrics.engine_exposition)."""
        if self._sock is None or self._closed:
            return b""
        value = await self._ask(ipc.METRICS, self._query_timeout_s)
        return value if isinstance(value, bytes) else b""

    async def limits_call(self, method: str, args: tuple[Any, ...]) -> Any:
        """One rate-limit storage operation run by the core (frontend.security.core_storage); the
        caller bounds the wait. Raises ConnectionError while the core is not connected."""
        if self._sock is None or self._closed or not self._core_up:
            raise ConnectionError("the engine core is not connected")
        return await self._ask(ipc.LIMITS, None, method, args)

    async def close(self) -> None:
        if self._closed:
            return
        if self._sock is not None and self._model is not None:
            self._send((ipc.GOODBYE,))  # the core cancels whatever this worker still has
        self._closed = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        self._fail_all(Overloaded("the gateway is shutting down"), tell_core=False)
        for future in self._pending.values():
            future.cancel()
        self._pending.clear()
        if self._sock is not None:
            # Let the goodbye reach a live core; do not hang on a dead one.
            self._sock.close(linger=int(min(0.5, self._timeout_s) * 1000))
            self._sock = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    # ------------------------------------------------------------------ internals
    def _send(self, msg: tuple[Any, ...]) -> None:
        assert self._sock is not None
        future = ipc.send(self._sock, [ipc.dumps(msg)])
        if not future.done():
            future.add_done_callback(_log_send_failure)
        elif (err := future.exception()) is not None:
            log.error("worker: sending %r to the engine core failed: %s", msg[0], err)

    async def _ask(self, kind: str, timeout_s: float | None, *payload: Any) -> Any:
        corr = next(self._ids)
        future: asyncio.Future[Any] = self._loop.create_future()
        self._pending[corr] = future
        try:
            self._send((kind, corr, *payload))
            async with asyncio.timeout(timeout_s):
                value = await future
        finally:
            self._pending.pop(corr, None)
        if isinstance(value, BaseException):
            raise value
        return value

    async def _receive(self) -> None:
        assert self._sock is not None
        sock = self._sock
        while True:
            frames = await sock.recv_multipart()
            try:
                msg = ipc.loads(frames[-1])
            except Exception:
                log.exception("worker: malformed message from the engine core")
                continue
            self._mark_heard()
            kind = msg[0]
            if kind == ipc.EVENTS:
                self._dispatch(msg[1])
            elif kind == ipc.LOAD:
                self._load = (int(msg[1]), int(msg[2]))
            elif kind == ipc.REPLY:
                future = self._pending.get(msg[1])
                if future is not None and not future.done():
                    future.set_result(msg[2])

    def _dispatch(self, items: list[ipc.EventItem]) -> None:
        self.event_messages += 1
        self.events_received += len(items)
        handles = self._handles
        for item in items:
            handle = handles.get(item[0])
            if handle is None:
                continue  # cancelled here while its events were on the way
            if ipc.is_terminal(item):
                handle.finished = True
                del handles[item[0]]
            (handle.sink or handle.events).put_nowait(ipc.decode_event(item))

    def _mark_heard(self) -> None:
        self._last_heard = self._loop.time()
        if not self._core_up:
            self._core_up = True
            if self._model is not None:
                log.info("worker %s: the engine core answers again", self.identity.decode())

    async def _heartbeats(self) -> None:
        while True:
            self._send((ipc.HEARTBEAT,))
            await asyncio.sleep(self._heartbeat_s)
            silent = self._loop.time() - self._last_heard
            if self._core_up and silent > self._timeout_s:
                self._core_up = False
                log.error("worker %s: engine core silent for %.1f s", self.identity.decode(), silent)
                self._fail_all(UpstreamUnavailable("the engine core stopped answering"), tell_core=True)

    def _fail_all(self, error: Exception, *, tell_core: bool) -> None:
        handles, self._handles = self._handles, {}
        for handle in handles.values():
            handle.finished = True
            (handle.sink or handle.events).put_nowait(ErrorEvent(error))
            if tell_core:  # if it comes back, it frees them
                self._send((ipc.CANCEL, handle.request_id))


def _log_send_failure(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and (err := future.exception()) is not None:
        log.error("worker: a message to the engine core was not sent: %s", err)
