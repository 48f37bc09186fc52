"""`python -m frontend`: serve the gateway with uvicorn (settings from GATEWAY_* variables)."""

from __future__ import annotations

import argparse
import logging

import uvicorn

from frontend.app import create_app
from frontend.settings import Settings


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m frontend", description="Run the gateway.")
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--workers", type=int, default=1, help="processes; each runs its own batching loop")
    args = p.parse_args()
    overrides = {k: v for k, v in {"host": args.host, "port": args.port}.items() if v is not None}
    settings = Settings(**overrides)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.workers > 1:
        # Worker processes build their own app from the same GATEWAY_* environment.
        uvicorn.run(
            "frontend.app:create_app",
            factory=True,
            host=settings.host,
            port=settings.port,
            workers=args.workers,
            log_level="info",
            access_log=False,
        )
    else:
        uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info", access_log=False)


if __name__ == "__main__":
    main()
