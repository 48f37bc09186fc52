"""`python -m frontend`: serve the gateway with uvicorn (settings from GATEWAY_* variables).

With `--workers N` (N > 1) the scheduler runs in ONE engine-core process (frontend.engine.core),
started first, in the background: the workers listen at once and answer as one process does while
the core waits for Triton (live 200, ready 503 `starting`). The N uvicorn workers parse, tokenize,
detokenize and stream, and reach the core at the ipc:// address passed to them as
GATEWAY_ENGINE_CORE_URL. Ctrl-C / SIGTERM: every worker drains (`DrainingServer`, as a single
process does) and closes, then the core closes (releasing every KV slot on Triton).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import threading
import time
from typing import TYPE_CHECKING

import uvicorn

from frontend.api.client_hygiene import uvicorn_options
from frontend.app import create_app
from frontend.draining import DrainingMultiprocess, DrainingServer
from frontend.observability.logs import configure_logging, uvicorn_log_config
from frontend.observability.multiprocess import multiprocess_dir
from frontend.settings import Settings

if TYPE_CHECKING:
    from frontend.engine.core import EngineCoreProcess

UNBOUNDED_S = 10 * 365 * 86400.0  # "no deadline", as a number every timer accepts


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
    configure_logging(settings.log_format)  # GATEWAY_LOG_FORMAT: text (default) or json
    if args.workers > 1:
        _serve_with_engine_core(settings, args.workers)
    else:
        app = create_app(settings)
        config = uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            log_level="info",
            access_log=False,  # the gateway writes its own (frontend.observability.requests)
            log_config=uvicorn_log_config(settings.log_format),
            **uvicorn_options(settings),  # header and keep-alive timeouts (docs/security.md)
        )
        DrainingServer(config, app, settings.drain_timeout_s).run()


def _serve_with_engine_core(settings: Settings, workers: int) -> None:
    from frontend.engine.core import EngineCoreProcess

    # The workers listen at once, as one process does (live 200, ready 503 `starting`), while the
    # core waits for Triton; without a deadline, as one process retries its start until it succeeds.
    core = EngineCoreProcess(settings.model_copy(update={"startup_timeout_s": UNBOUNDED_S}))
    # Worker processes build their own app from the same GATEWAY_* environment, plus the core's
    # address; they wait for the core's answer as long as it waits for Triton (a worker whose wait
    # timed out would try again, as the lifecycle retries any failed start).
    os.environ["GATEWAY_ENGINE_CORE_URL"] = core.address
    os.environ["GATEWAY_STARTUP_TIMEOUT_S"] = str(UNBOUNDED_S)
    config = uvicorn.Config(
        "frontend.app:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=workers,
        **uvicorn_options(settings, workers=workers),
        log_level="info",
        access_log=False,
        log_config=uvicorn_log_config(settings.log_format),
    )
    sock = config.bind_socket()
    # Its signal handlers are in place before the core starts: a core that fails stops us with SIGTERM.
    supervisor = DrainingMultiprocess(config, [sock], settings.drain_timeout_s)
    failed, stopping = threading.Event(), threading.Event()
    starting = threading.Thread(
        target=_start_core, args=(core, failed, stopping), name="engine-core-start", daemon=True
    )
    starting.start()
    try:
        # The core is spawned before PROMETHEUS_MULTIPROC_DIR is set (multiprocess_dir below): its
        # scheduler series stay in its own memory (frontend.observability.multiprocess).
        while starting.is_alive() and not any(p.name == "engine-core" for p in multiprocessing.active_children()):
            time.sleep(0.01)
        # One metrics directory for this run's workers: any worker's /metrics sums them all.
        # Removed when they stopped.
        with multiprocess_dir():
            supervisor.run()
    finally:
        sock.close()
        stopping.set()
        core.stop()  # after the workers have drained and said goodbye (or while it still starts)
        starting.join(10)
    if failed.is_set():
        raise SystemExit(3)  # the core could not start: the code of a failed gateway start-up
    if core.died:
        raise SystemExit(1)


def _start_core(core: EngineCoreProcess, failed: threading.Event, stopping: threading.Event) -> None:
    """Start the core (it returns once Triton is reached and a warm-up step ran); a core that
    cannot start stops the gateway, as one that dies later does (SIGTERM: the workers drain)."""
    try:
        core.start()
    except SystemExit as stop:
        if not stopping.is_set():
            if stop.code:  # stopped by a signal (code 0): not a failed start, but stop all the same
                failed.set()
            os.kill(os.getpid(), signal.SIGTERM)


if __name__ == "__main__":
    main()
