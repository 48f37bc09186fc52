"""`python -m frontend`: serve the gateway with uvicorn (settings from GATEWAY_* variables).

With `--workers N` (N > 1) the scheduler runs in ONE engine-core process (frontend.engine.core)
started first; the N uvicorn workers parse, tokenize, detokenize and stream, and reach it at the
ipc:// address passed to them as GATEWAY_ENGINE_CORE_URL. Ctrl-C / SIGTERM: every worker drains
(`DrainingServer`, as a single process does) and closes, then the core closes (releasing every KV
slot on Triton).
"""

from __future__ import annotations

import argparse
import os

import uvicorn

from frontend.api.client_hygiene import uvicorn_options
from frontend.app import create_app
from frontend.draining import DrainingMultiprocess, DrainingServer
from frontend.observability.logs import configure_logging, uvicorn_log_config
from frontend.observability.multiprocess import multiprocess_dir
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

    core = EngineCoreProcess(settings)
    try:
        core.start()  # returns once Triton is reached and the warm-up step ran
    except KeyboardInterrupt:
        core.stop()
        raise SystemExit(130) from None
    # Worker processes build their own app from the same GATEWAY_* environment, plus the core's address.
    os.environ["GATEWAY_ENGINE_CORE_URL"] = core.address
    try:
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
        # One metrics directory for this run's workers (set after the core started, which keeps its
        # own series in memory): any worker's /metrics sums them all. Removed when they stopped.
        with multiprocess_dir():
            try:
                DrainingMultiprocess(config, [sock], settings.drain_timeout_s).run()
            finally:
                sock.close()
    finally:
        core.stop()  # after the workers have drained and said goodbye
    if core.died:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
