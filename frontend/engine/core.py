"""The engine core: ONE process owns the engine (Triton client + continuous-batching scheduler,
sampling included) and serves every HTTP worker of `python -m frontend --workers N` over ZeroMQ.

HTTP workers parse, tokenize, detokenize and stream (`frontend.engine.remote.RemoteEngine`); the
core only steps sequences. Each submission gets an event sink that appends to its worker's outbox
and schedules ONE flush (`loop.call_soon`) when the outbox goes non-empty, so all events the
scheduler emits in one step's synchronous sampling pass leave as one message per worker per step.
The wire format is in `frontend.engine.ipc`.

A worker that says goodbye, or that has not been heard from for `worker_timeout_s` (workers
heartbeat every `GATEWAY_ENGINE_CORE_HEARTBEAT_S`), loses its generations: the core cancels them,
which frees their KV slots on Triton at the next step.

Run by `python -m frontend --workers N` through `EngineCoreProcess` (a `spawn` child that ignores
Ctrl-C: the launcher stops it after the HTTP workers have drained), or on its own:
`python -m frontend.engine.core --address ipc:///tmp/core/sock` (settings from GATEWAY_*).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import zmq
import zmq.asyncio

from frontend.engine import ipc
from frontend.engine.protocol import (
    Engine,
    EngineRequest,
    ErrorEvent,
    Event,
    GenerationHandle,
    TokenEvent,
    UpstreamUnavailable,
)
from frontend.settings import Settings

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Worker:
    identity: bytes
    last_seen: float
    live: dict[int, GenerationHandle] = field(default_factory=dict)
    outbox: list[ipc.EventItem] = field(default_factory=list)
    finished: list[int] = field(default_factory=list)  # rids whose last event is in the outbox
    flush_scheduled: bool = False
    gone: bool = False


class _Sink:
    """The `EventSink` of one submission: batches its events into the worker's outbox."""

    __slots__ = ("_core", "_rid", "_worker")

    def __init__(self, core: EngineCore, worker: _Worker, rid: int) -> None:
        self._core = core
        self._worker = worker
        self._rid = rid

    def put_nowait(self, item: Event, /) -> None:
        worker = self._worker
        if worker.gone:
            return
        if type(item) is TokenEvent:  # the hot path: a plain tuple pickles ~35x faster
            worker.outbox.append((self._rid, item.token_id, item.logprob, item.top_logprobs))
        else:
            encoded = ipc.encode_event(self._rid, item)
            worker.outbox.append(encoded)
            if ipc.is_terminal(encoded):
                worker.finished.append(self._rid)
        if not worker.flush_scheduled:
            worker.flush_scheduled = True
            self._core._loop.call_soon(self._core._flush, worker)


class EngineCore:
    """Serves `engine` to HTTP workers on a ROUTER socket at `address` (see `frontend.engine.ipc`).

    `start()` starts the engine, then binds; `close()` stops serving and closes the engine (which
    releases every KV slot). `event_messages` / `events_sent` count what left, for tests."""

    def __init__(
        self,
        engine: Engine,
        address: str,
        *,
        worker_timeout_s: float = 5.0,
        metrics_text: Callable[[], bytes] | None = None,
    ) -> None:
        self.engine = engine
        self.address = address
        self.worker_timeout_s = worker_timeout_s
        self._metrics_text = metrics_text
        self._workers: dict[bytes, _Worker] = {}
        self._ctx: zmq.asyncio.Context | None = None
        self._sock: zmq.asyncio.Socket | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self.event_messages = 0
        self.events_sent = 0
        self._limits: Any = None  # the workers' shared rate-limit storage, made on first use

    @property
    def workers(self) -> int:
        return len(self._workers)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self.engine.start()
        # What start-up built (tokenizer, clients, torch/transformers modules) lives as long as the
        # process: keep it out of the garbage collector's scans, which otherwise stall the step loop.
        gc.collect()
        gc.freeze()
        self._ctx = zmq.asyncio.Context()
        sock = self._ctx.socket(zmq.ROUTER)
        ipc.configure(sock)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a vanished worker raises, never vanishes
        sock.bind(self.address)
        self._sock = sock
        self._spawn(self._receive(), "engine-core-receive")
        self._spawn(self._sweep(), "engine-core-sweep")
        log.info("engine core serving %s at %s", self.engine.model.name, self.address)

    async def wait_for_workers(self, timeout_s: float) -> None:
        """Return once no worker is connected (all said goodbye or went silent), or after timeout_s."""
        deadline = time.monotonic() + timeout_s
        while self._workers and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.engine.close()  # generations still running end with an error event
        timer = getattr(self._limits, "timer", None)  # MemoryStorage's expiry task
        if timer is not None and not timer.done():
            timer.cancel()
        for worker in list(self._workers.values()):
            self._flush(worker)  # those errors leave now, before the socket closes
        if self._sock is not None:
            self._sock.close(linger=200)
            self._sock = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    # ------------------------------------------------------------------ receiving
    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _receive(self) -> None:
        assert self._sock is not None
        sock = self._sock
        while True:
            frames = await sock.recv_multipart()
            try:
                identity, payload = frames
                self._handle(identity, ipc.loads(payload))
            except Exception:  # one bad message must not stop the core
                log.exception("engine core: cannot handle a message of %d frames", len(frames))

    def _handle(self, identity: bytes, msg: tuple[Any, ...]) -> None:
        kind = msg[0]
        worker = self._workers.get(identity)
        if worker is None:
            if kind == ipc.GOODBYE:
                return
            worker = self._workers[identity] = _Worker(identity, self._loop.time())
            log.info("engine core: worker %s connected", identity.decode(errors="replace"))
        worker.last_seen = self._loop.time()
        if kind == ipc.SUBMIT:
            self._submit(worker, msg[1], msg[2])
        elif kind == ipc.CANCEL:
            handle = worker.live.pop(msg[1], None)
            if handle is not None:
                self.engine.cancel(handle)
        elif kind == ipc.HEARTBEAT:
            self._send(worker, (ipc.LOAD, *self.engine.load()))
        elif kind == ipc.HELLO:
            try:
                model = self.engine.model
                reply: Any = (model.name, model.version)
            except Exception as err:
                reply = ipc.portable_error(err)
            self._send(worker, (ipc.REPLY, msg[1], reply))
        elif kind == ipc.READY:
            self._spawn(self._answer_ready(worker, msg[1]), "engine-core-ready")
        elif kind == ipc.METRICS:
            text = self._metrics_text() if self._metrics_text is not None else b""
            self._send(worker, (ipc.REPLY, msg[1], text))
        elif kind == ipc.GOODBYE:
            log.info("engine core: worker %s said goodbye", identity.decode(errors="replace"))
            self._drop(worker, notify=False)
        elif kind == ipc.LIMITS:
            self._spawn(self._answer_limits(worker, msg[1], msg[2], msg[3]), "engine-core-limits")
        else:
            log.warning("engine core: unknown message %r", kind)

    def _submit(self, worker: _Worker, rid: int, request: EngineRequest) -> None:
        sink = _Sink(self, worker, rid)
        try:
            handle = self.engine.submit(request, sink)
        except Exception as err:  # Overloaded, UpstreamUnavailable, ...: the worker gets it as an event
            sink.put_nowait(ErrorEvent(err))
            return
        # Registered before any flush can run (flushes are call_soon callbacks), so even a
        # generation that ended inside submit is cancelled (released) by its flush.
        worker.live[rid] = handle

    async def _answer_ready(self, worker: _Worker, corr: int) -> None:
        try:
            ok = bool(await self.engine.ready())
        except Exception as err:
            log.warning("engine core: readiness check failed: %s", err)
            ok = False
        self._send(worker, (ipc.REPLY, corr, ok))

    _LIMITS_METHODS = frozenset(
        {"incr", "get", "get_expiry", "check", "reset", "clear", "acquire_entry", "get_moving_window"}
    )

    async def _answer_limits(self, worker: _Worker, corr: int, method: str, args: tuple[Any, ...]) -> None:
        """One operation on the rate-limit storage all workers share (frontend.security.core_storage).
        Atomic: it runs on this one event loop, and MemoryStorage locks each key's read-modify-write."""
        if self._limits is None:
            from limits.aio.storage import MemoryStorage

            self._limits = MemoryStorage()
        try:
            if method not in self._LIMITS_METHODS:
                raise ValueError(f"unknown limits operation {method!r}")
            reply: Any = await getattr(self._limits, method)(*args)
        except Exception as err:
            reply = ipc.portable_error(err)
        self._send(worker, (ipc.REPLY, corr, reply))

    # ------------------------------------------------------------------ sending
    def _flush(self, worker: _Worker) -> None:
        worker.flush_scheduled = False
        items, worker.outbox = worker.outbox, []
        finished, worker.finished = worker.finished, []
        if items and not worker.gone:
            self.event_messages += 1
            self.events_sent += len(items)
            self._send(worker, (ipc.EVENTS, items))
        for rid in finished:  # done on the engine's side; cancel releases the handle (a no-op for the scheduler)
            handle = worker.live.pop(rid, None)
            if handle is not None:
                self.engine.cancel(handle)

    def _send(self, worker: _Worker, msg: tuple[Any, ...]) -> None:
        if self._sock is None or worker.gone:
            return
        try:
            # Never blocks: no high-water mark, so the NOBLOCK attempt inside pyzmq succeeds or fails now.
            future = ipc.send(self._sock, [worker.identity, ipc.dumps(msg)])
        except zmq.ZMQError as err:
            self._lost(worker, err)
            return
        if future.done():
            if (failure := future.exception()) is not None:
                self._lost(worker, failure)
        else:
            future.add_done_callback(lambda f: self._sent(worker, f))

    def _sent(self, worker: _Worker, future: asyncio.Future[Any]) -> None:
        if not future.cancelled() and (err := future.exception()) is not None:
            self._lost(worker, err)

    def _lost(self, worker: _Worker, err: BaseException) -> None:
        if worker.gone:
            return
        log.warning("engine core: worker %s unreachable (%s)", worker.identity.decode(errors="replace"), err)
        self._drop(worker, notify=False)

    # ------------------------------------------------------------------ workers going away
    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.worker_timeout_s / 4)
            now = self._loop.time()
            for worker in list(self._workers.values()):
                if now - worker.last_seen > self.worker_timeout_s:
                    log.warning(
                        "engine core: worker %s silent for %.1f s; cancelling its %d generations",
                        worker.identity.decode(errors="replace"),
                        now - worker.last_seen,
                        len(worker.live),
                    )
                    self._drop(worker, notify=True)

    def _drop(self, worker: _Worker, *, notify: bool) -> None:
        """Forget a worker and cancel its generations (their KV slots are released next step).
        `notify`: tell it, in case it is only slow (it then fails those requests instead of hanging)."""
        self._workers.pop(worker.identity, None)
        live, worker.live = worker.live, {}
        for handle in live.values():
            self.engine.cancel(handle)
        worker.outbox.clear()
        worker.finished.clear()
        if notify and live:
            error = ErrorEvent(UpstreamUnavailable("the engine core lost contact with this gateway worker"))
            self._send(worker, (ipc.EVENTS, [(rid, error) for rid in live]))
        worker.gone = True


# ---------------------------------------------------------------------- the process
def core_scheduling() -> None:
    """How the schedulers of the engine-core process step: each lane lets the loop run between the
    outcome of a step that started sequences and its next plan, so their first tokens leave
    (`EngineCore._flush`) first."""
    from frontend.engine.scheduler import Scheduler

    Scheduler.yield_between_steps = True


async def _serve(settings: Settings, address: str, report: Callable[[str, str], None], gateway_child: bool) -> int:
    # Here, not at the top: the launcher imports this module too, and only the core talks gRPC.
    from frontend.engine.placement import engine_from_settings
    from frontend.observability import GatewayMetrics

    core_scheduling()

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    orphaned = False
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    if not gateway_child:
        loop.add_signal_handler(signal.SIGINT, stop.set)
    parent = multiprocessing.parent_process()
    if parent is not None:  # the launcher died without stopping us: do not outlive it

        def _orphaned() -> None:
            nonlocal orphaned
            orphaned = True
            loop.remove_reader(parent.sentinel)
            log.warning("engine core: the gateway process is gone; stopping")
            stop.set()

        loop.add_reader(parent.sentinel, _orphaned)

    metrics = GatewayMetrics()  # only its engine_registry is fed and served here
    core = EngineCore(
        engine_from_settings(settings, metrics),  # a TritonEngine, or a PlacementEngine over several
        address,
        worker_timeout_s=settings.engine_core_timeout_s,
        metrics_text=metrics.engine_text,
    )
    starting = asyncio.create_task(core.start())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await starting
        await core.close()
        report("stopped", "stopped before it was ready")
        return 0
    if (err := starting.exception()) is not None:
        stopping.cancel()
        log.error("engine core failed to start: %s", err)
        report("failed", str(err) or type(err).__name__)
        await core.close()
        return 3
    report("ready", address)
    await stopping
    # Workers that are still serving (a SIGTERM to the whole process group) keep their streams
    # until they have drained and said goodbye, or gone silent; a generation's deadline caps it.
    # Not when the launcher died: nothing supervises those workers any more.
    if core.workers and not orphaned:
        log.info("engine core: waiting for %d gateway workers to finish", core.workers)
        await core.wait_for_workers(settings.request_timeout_s)
    await core.close()
    log.info("engine core stopped")
    return 0


def run_core(settings: Settings, address: str, conn: Connection | None = None, gateway_child: bool = True) -> None:
    """Process entry point. Reports ("ready", address), ("failed", why) or ("stopped", why) (a
    signal before it was ready) on `conn`."""
    if gateway_child:
        # Ctrl-C reaches the whole process group; the launcher stops the core after the workers.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def report(state: str, detail: str) -> None:
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.send((state, detail))
        elif state == "ready":
            print(f"engine core ready at {detail}", flush=True)

    code = asyncio.run(_serve(settings, address, report, gateway_child))
    if code:
        raise SystemExit(code)


class EngineCoreProcess:
    """Starts the engine core as a `spawn` child for `python -m frontend --workers N` and stops it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._dir = tempfile.mkdtemp(prefix="gpt2-engine-core-")  # 0700: only this user can connect
        self.address = f"ipc://{os.path.join(self._dir, 'core.sock')}"
        self._process: multiprocessing.process.BaseProcess | None = None
        self._stopping = False
        self.died = False  # the core exited before it was asked to

    def start(self) -> None:
        """Start the core and wait until it has reached Triton and run its warm-up step.
        Raises SystemExit(3) when it cannot start (the same code as a failed gateway start-up)."""
        ctx = multiprocessing.get_context("spawn")
        receiver, sender = ctx.Pipe(duplex=False)
        process = ctx.Process(
            target=run_core, args=(self.settings, self.address, sender), name="engine-core", daemon=True
        )
        process.start()
        sender.close()
        self._process = process
        log.info("engine core starting (pid %d)", process.pid)
        state, detail = "failed", "the engine core exited during start-up"
        while process.is_alive() or receiver.poll(0):
            if receiver.poll(0.2):
                with contextlib.suppress(EOFError):
                    state, detail = receiver.recv()
                break
        receiver.close()
        if state == "stopped":  # Ctrl-C or SIGTERM while it waited for Triton: a stop, not a failure
            log.info("engine core stopped before it was ready (the gateway is stopping)")
            self.stop()
            raise SystemExit(0)
        if state != "ready":
            log.error("the gateway cannot start without its engine core (%s)", detail)
            self.stop()
            raise SystemExit(3)
        threading.Thread(target=self._watch, name="engine-core-watch", daemon=True).start()

    def _watch(self) -> None:
        """The core is the only scheduler: when it dies, stop the gateway (a supervisor restarts it)."""
        assert self._process is not None
        multiprocessing.connection.wait([self._process.sentinel])
        # The sentinel fires as the process closes its end, which may be before it can be reaped:
        # its exit code read at once was None, and a clean stop (a SIGTERM to the whole group during
        # a drain) was taken for a death (exit 1).
        self._process.join(5)
        if self._stopping:
            return
        if self._process.exitcode == 0:
            # A signal to the whole process group (SIGTERM from a supervisor) stopped the core too: it
            # waited for the workers to drain and say goodbye, then closed. A clean stop, not a death.
            log.info("engine core stopped; stopping the gateway")
        else:
            self.died = True
            log.error("engine core exited unexpectedly (exit %s); stopping the gateway", self._process.exitcode)
        os.kill(os.getpid(), signal.SIGTERM)

    def stop(self) -> None:
        """Ask the core to stop (SIGTERM: it closes the engine, releasing every KV slot) and wait."""
        self._stopping = True
        process = self._process
        if process is not None and process.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGTERM)
            if not multiprocessing.connection.wait([process.sentinel], self.settings.request_timeout_s + 10):
                log.error("engine core did not stop; killing it")
                process.kill()
            process.join()
            if process.exitcode not in (0, -signal.SIGTERM, None):
                log.warning("engine core exited with code %s", process.exitcode)
        shutil.rmtree(self._dir, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m frontend.engine.core", description="Run the engine core alone.")
    p.add_argument(
        "--address", default=None, help="ipc:// (or tcp://) address to bind; default GATEWAY_ENGINE_CORE_URL"
    )
    args = p.parse_args()
    settings = Settings()
    address = args.address or settings.engine_core_url
    if not address:
        p.error("give --address or set GATEWAY_ENGINE_CORE_URL")
    run_core(settings, address, None, gateway_child=False)


if __name__ == "__main__":
    main()
