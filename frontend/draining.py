"""uvicorn with the gateway's drain (frontend.lifecycle) on SIGTERM/SIGINT, for one process and
for the workers of `python -m frontend --workers N`.

Kept import-light on purpose (no FastAPI, no engine): uvicorn starts each worker with `spawn` and
unpickles its `Process` (with our server in it) BEFORE the worker answers the supervisor's health
pings; a module that pulled in the gateway (numpy, tokenizers, torch) made those pings miss
uvicorn's 5 s deadline and the workers were killed as hung. It cannot live in `__main__` either:
`spawn` does not re-import a package's `__main__`.
"""

from __future__ import annotations

import asyncio
import signal
import socket
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.supervisors.multiprocess import Multiprocess, Process


class DrainingServer(uvicorn.Server):
    """uvicorn, but the first SIGTERM/SIGINT drains before the server stops (frontend.lifecycle):
    readiness and new requests get 503 at once, running generations get `drain_timeout_s`, streams
    still open then end with an error event, KV slots are released; a second signal stops at once.

    `app` None (a worker of `--workers N`, whose app uvicorn builds from the factory): the
    lifecycle is found on the loaded app. `worker`: a repeated SIGTERM does not cut the drain short
    (uvicorn's supervisor forwards SIGTERM to workers that the process group's signal already
    reached); a second SIGINT (Ctrl-C twice) still stops at once."""

    def __init__(self, config: uvicorn.Config, app: Any, drain_timeout_s: float, *, worker: bool = False) -> None:
        super().__init__(config)
        self._app = app
        self._drain_timeout_s = drain_timeout_s
        self._worker = worker
        self._drain_task: asyncio.Future[None] | None = None

    def _lifecycle(self) -> Any:
        app: object = self._app if self._app is not None else getattr(self.config, "loaded_app", None)
        for _ in range(16):  # through uvicorn's wrappers (proxy headers, message logger)
            state = getattr(app, "state", None)
            lifecycle = getattr(state, "lifecycle", None) if state is not None else None
            if lifecycle is not None and hasattr(lifecycle, "drain"):  # frontend.lifecycle.Lifecycle
                return lifecycle
            app = getattr(app, "app", None)
            if app is None:
                break
        return None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        lifecycle = self._lifecycle()
        if self._drain_task is not None and self._worker and sig != signal.SIGINT:
            return  # the supervisor's copy of a SIGTERM this worker is already draining for
        if self._drain_task is not None or lifecycle is None or self.should_exit:
            super().handle_exit(sig, frame)  # a second signal, or nothing to drain: stop now
            return
        loop = asyncio.get_event_loop()

        async def drain() -> None:
            try:
                await lifecycle.drain(self._drain_timeout_s)
            finally:
                super(DrainingServer, self).handle_exit(sig, None)

        def begin() -> None:
            self._drain_task = loop.create_task(drain(), name="gateway-drain")

        self._drain_task = asyncio.Future()  # marks "draining" until the task replaces it
        loop.call_soon_threadsafe(begin)  # a signal handler: wake the loop through its self-pipe


class _DrainingWorker(Process):
    """A uvicorn worker process whose server is a `DrainingServer` (uvicorn's is a plain Server)."""

    def __init__(self, config: uvicorn.Config, sockets: list[socket.socket], drain_timeout_s: float) -> None:
        super().__init__(config, sockets)
        self._server = DrainingServer(config, None, drain_timeout_s, worker=True)


class DrainingMultiprocess(Multiprocess):
    """uvicorn's worker supervisor with draining workers. On SIGTERM/SIGINT the supervisor sends
    each worker SIGTERM and waits for it: each drains its own streams (final error event and
    `[DONE]` for those still open after `drain_timeout_s`), says goodbye to the engine core and
    exits. Only the start of workers differs from uvicorn's (SIGHUP restarts get plain workers)."""

    def __init__(self, config: uvicorn.Config, sockets: list[socket.socket], drain_timeout_s: float) -> None:
        super().__init__(config, sockets)
        self._drain_timeout_s = drain_timeout_s

    def init_processes(self) -> None:
        for _ in range(self.processes_num):
            process = _DrainingWorker(self.config, self.sockets, self._drain_timeout_s)
            process.start()
            self.processes.append(process)
