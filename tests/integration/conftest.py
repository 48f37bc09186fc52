"""Fixtures and helpers of the integration tier beyond the session-wide Triton of tests/conftest.py:
the gateway app in a thread of this process, and `python -m frontend
--workers N` as its own process group."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from embedded_triton import TritonServer
from frontend.app import create_app
from frontend.settings import Settings
from tests.conftest import TINY
from tests.integration.redis_server import free_port


def serve_gateway(triton: TritonServer, model_repository: Path, **overrides: Any) -> Iterator[str]:
    """The gateway app (settings for the tiny model on `triton`, plus `overrides`) under uvicorn in
    a thread; yields its URL once it is ready (it listens before Triton's model is: waiting for
    readiness keeps the first test from meeting a 503 `starting`)."""
    settings = Settings(
        **{
            "environment": "test",
            "triton_url": triton.grpc_url,
            "model": TINY,
            "model_version": "1",
            "repository": model_repository,
            **overrides,
        }
    )
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while not (server.started and httpx.get(f"{url}/health/ready", timeout=5).status_code == 200):
        assert thread.is_alive() and time.monotonic() < deadline, "gateway did not become ready"
        time.sleep(0.05)
    yield url
    server.should_exit = True
    thread.join(10)


def serve_workers(
    triton: TritonServer, model_repository: Path, log: Path, workers: int = 2, **env_overrides: str
) -> Iterator[tuple[str, subprocess.Popen[bytes], Path]]:
    """`python -m frontend --workers N` in its own process group (as a terminal gives it); yields
    (url, process, log) once every worker is ready, and kills the group afterwards."""
    port = free_port()
    env = {
        **os.environ,
        "GATEWAY_ENVIRONMENT": "test",
        "GATEWAY_TRITON_URL": triton.grpc_url,
        "GATEWAY_MODEL": TINY,
        "GATEWAY_MODEL_VERSION": "1",
        "GATEWAY_REPOSITORY": str(model_repository),
        **env_overrides,
    }
    for name in ("GATEWAY_ENGINE_CORE_URL", "PROMETHEUS_MULTIPROC_DIR", "prometheus_multiproc_dir"):
        env.pop(name, None)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "frontend", "--workers", str(workers), "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "the gateway did not become ready:\n" + log.read_text()
        try:
            # Every worker ready, not just the one that answered: each logs when its engine core
            # answered (a worker that does not accept yet gets no probe, so probes alone cannot tell),
            # then ready probes pass (the core's model server is up).
            started = log.read_text(errors="replace").count(": engine core at ")
            if started >= workers and httpx.get(f"{url}/health/ready", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    yield url, proc, log
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
