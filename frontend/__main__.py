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
    args = p.parse_args()
    overrides = {k: v for k, v in {"host": args.host, "port": args.port}.items() if v is not None}
    settings = Settings(**overrides)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info", access_log=False)


if __name__ == "__main__":
    main()
