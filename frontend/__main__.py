"""`python -m frontend`: serve the gateway with uvicorn (settings from GATEWAY_* variables).

With `--workers N` (N > 1) the scheduler runs in ONE engine-core process (frontend.engine.core)
started first; the N uvicorn workers parse, tokenize, detokenize and stream, and reach it at the
ipc:// address passed to them as GATEWAY_ENGINE_CORE_URL. Ctrl-C / SIGTERM: the workers drain and
close, then the core closes (releasing every KV slot on Triton).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from types import FrameType

import uvicorn
from fastapi import FastAPI

from frontend.api.client_hygiene import uvicorn_options
from frontend.app import create_app
from frontend.settings import Settings


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m frontend", description="Run the gateway.")
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="HTTP worker processes; with more than one, a separate engine-core process runs the one "
        "batching loop they all share (default 1: everything in this process)",
    )
    args = p.parse_args()
    overrides = {k: v for k, v in {"host": args.host, "port": args.port}.items() if v is not None}
    settings = Settings(**overrides)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.workers > 1:
        _serve_with_engine_core(settings, args.workers)
    else:
        app = create_app(settings)
        config = uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            log_level="info",
            access_log=False,
            **uvicorn_options(settings),  # header and keep-alive timeouts (docs/security.md)
        )
        DrainingServer(config, app, settings.drain_timeout_s).run()


class DrainingServer(uvicorn.Server):
    """uvicorn, but the first SIGTERM/SIGINT drains before the server stops (frontend.lifecycle):
    readiness and new requests get 503 at once, running generations get `drain_timeout_s`, streams
    still open then end with an error event, KV slots are released; a second signal stops at once."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_timeout_s: float) -> None:
        super().__init__(config)
        self._app = app
        self._drain_timeout_s = drain_timeout_s
        self._drain_task: asyncio.Future[None] | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        lifecycle = getattr(self._app.state, "lifecycle", None)
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


def _serve_with_engine_core(settings: Settings, workers: int) -> None:
    from frontend.engine.core import EngineCoreProcess

    core = EngineCoreProcess(settings)
    try:
        core.start()  # returns once Triton is reached and the warm-up step ran
    except KeyboardInterrupt:
        core.stop()
        raise SystemExit(130) from None
    # Worker processes build their own app from the same GATEWAY_* environment, plus the core's address.
    os.environ["GATEWAY_ENGINE_CORE_URL"] = core.address
    try:
        uvicorn.run(
            "frontend.app:create_app",
            factory=True,
            host=settings.host,
            port=settings.port,
            workers=workers,
            **uvicorn_options(settings, workers=workers),
            log_level="info",
            access_log=False,
        )
    finally:
        core.stop()  # after the workers have drained and said goodbye
    if core.died:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
