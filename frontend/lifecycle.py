"""The gateway's lifecycle: listen at once, start the engine in the background, drain on SIGTERM.

    starting ──(engine.start() succeeded)──▶ serving ──(drain: SIGTERM)──▶ draining ──▶ closed

* **starting**: the HTTP server already listens. `/health/live` answers 200, `/health/ready` and
  every generation route 503 (with Retry-After) while the engine waits for Triton; a failed start
  is logged and tried again, so a gateway started before Triton comes up by itself.
* **draining** (`drain()`, called by `python -m frontend` on the first SIGTERM or SIGINT):
  readiness and new requests get 503 at once; generations already running get up to
  `drain_timeout_s` to finish; then the engine is closed, which ends every generation still running
  with an error (a stream gets a final error event, and `[DONE]` on the OpenAI route) and releases
  its KV slot on Triton. Only then does the server stop.

The signal side (uvicorn's server and worker supervisor) is `frontend.draining`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time

from frontend import errors
from frontend.engine.protocol import Engine

log = logging.getLogger(__name__)

START_RETRY_S = 1.0


#: The collector's thresholds once serving (CPython's default is 700, 10, 10). Every stream keeps
#: its chunks alive until it ends, and each young collection promotes them, so at 512 streams the
#: default spent ~1 s of CPU in ~840 collections over 131k tokens (six full ones of ~100 ms, the
#: loop stalled) in benchmarks/single_process_bench.py; a young generation of 100k objects cut that
#: to ~0.5 s in 6 and the server's CPU per token by ~10%. Garbage in cycles waits a little longer.
GC_THRESHOLDS = (100_000, 20, 10)


class Lifecycle:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.started = asyncio.Event()
        self.draining = False
        self.start_error: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def state(self) -> str:
        if self.draining:
            return "draining"
        return "serving" if self.started.is_set() else "starting"

    def begin(self) -> None:
        """Start the engine in the background (retried until it succeeds or `close()`)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._start(), name="engine-start")

    async def _start(self) -> None:
        while not self._closed:
            try:
                await self.engine.start()
            except asyncio.CancelledError:
                raise
            except Exception as err:
                self.start_error = str(err) or type(err).__name__
                log.error("the engine did not start (%s); trying again in %.0f s", self.start_error, START_RETRY_S)
                with contextlib.suppress(Exception):
                    await self.engine.close()  # drop what the failed attempt built
                await asyncio.sleep(START_RETRY_S)
                continue
            self.start_error = None
            # What start-up built (tokenizer, clients, torch/transformers modules) lives as long as
            # the process: keep it out of the garbage collector's scans, which stall the step loop.
            gc.collect()
            gc.freeze()
            gc.set_threshold(*GC_THRESHOLDS)
            self.started.set()
            return

    async def wait_started(self, timeout_s: float) -> bool:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self.started.wait()
        return self.started.is_set()

    def check(self) -> None:
        """Raise a 503 unless new generations are accepted now."""
        if self.draining:
            raise errors.UpstreamUnavailable("the gateway is shutting down", code="draining", retry_after_s=1)
        if not self.started.is_set():
            detail = f": {self.start_error}" if self.start_error else ""
            raise errors.UpstreamUnavailable(
                f"the gateway is starting; the model server is not ready yet{detail}", code="starting", retry_after_s=1
            )

    async def drain(self, timeout_s: float) -> None:
        """Refuse new work, give running generations up to `timeout_s`, then end the rest."""
        if self.draining:
            return
        self.draining = True
        deadline = time.monotonic() + timeout_s
        log.info("draining: %d generations in flight; up to %.1f s", self._in_flight(), timeout_s)
        while self._in_flight() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if left := self._in_flight():
            log.warning("drain timeout: ending %d generations", left)
        await self.close()

    def _in_flight(self) -> int:
        """This process's generations: a worker of `--workers N` has its own (`in_flight`); the
        engine's load is the whole engine core's, as of its last heartbeat."""
        in_flight = getattr(self.engine, "in_flight", None)
        if callable(in_flight):
            return int(in_flight())
        running, waiting = self.engine.load()
        return running + waiting

    async def close(self) -> None:
        """Stop starting, close the engine (idempotent)."""
        self._closed = True
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        await self.engine.close()
