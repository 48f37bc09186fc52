"""Fixtures of the fault-and-abuse tier: a tritonserver of its own (tests kill, freeze and restart
it), throw-away redis-servers, and gateways on free loopback ports, in a thread of this process
(`ThreadGateway`) or as real `python -m frontend` processes (`GatewayProcess`, for signals and
`--workers N`). Every loop is bounded; nothing listens beyond 127.0.0.1."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from embedded_triton import TritonPorts, TritonServer
from frontend.api.client_hygiene import uvicorn_options
from frontend.app import create_app
from frontend.settings import Settings
from tests import rawhttp
from tests.conftest import TINY
from tests.integration.redis_server import free_port
from tests.integration.test_gateway import triton_metric

RESULTS: list[str] = []  # measurements reported at the end of the run (recovery times, latencies)


def report(line: str) -> None:
    """A measurement worth reading in the test output (printed in the terminal summary)."""
    RESULTS.append(line)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if RESULTS:
        terminalreporter.section("fault-and-abuse measurements")
        for line in RESULTS:
            terminalreporter.write_line(line)


def wait_for(condition: Callable[[], bool], timeout_s: float, interval_s: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval_s)
    return condition()


def kv_live(triton: TritonServer) -> float:
    return triton_metric(triton, "gpt2_kv_live_sequences")


def assert_kv_released(triton: TritonServer, within_s: float = 3.0) -> None:
    """Every KV slot free on Triton (the model publishes its gauges every 0.1 s)."""
    wait_for(lambda: kv_live(triton) == 0, within_s, 0.05)
    assert kv_live(triton) == 0, "a KV slot was left behind"


def gateway_settings(grpc_url: str, repository: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "environment": "test",
        "triton_url": grpc_url,
        "model": TINY,
        "model_version": "1",
        "repository": repository,
        "default_window": 16,
        "step_timeout_s": 1.0,
        "probe_timeout_s": 0.5,
        "breaker_failures": 2,
        "breaker_reset_s": 0.5,
        "reconnect_backoff_ms": 300,
        **overrides,
    }
    return Settings(**values)


class ThreadGateway:
    """The gateway app under uvicorn (with the gateway's own uvicorn options) in a thread of this
    process, on a socket bound here (`sndbuf`: a small send buffer, so a reader that stops reading
    stalls the server quickly). No signal handling: signals are `GatewayProcess`'s business."""

    def __init__(self, settings: Settings, *, sndbuf: int | None = None, **app_kwargs: Any) -> None:
        self.settings = settings
        self.app = create_app(settings, **app_kwargs)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if sndbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)  # inherited by accepted sockets
        sock.bind(("127.0.0.1", 0))
        self.sock = sock
        self.port = int(sock.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, log_level="warning", access_log=False, **uvicorn_options(settings))
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=lambda: self.server.run(sockets=[sock]), daemon=True)
        self.thread.start()
        assert wait_for(lambda: self.server.started or not self.thread.is_alive(), 30), "gateway did not start"
        assert self.thread.is_alive(), "gateway thread died"

    def wait_ready(self, timeout_s: float) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            try:
                if httpx.get(f"{self.url}/health/ready", timeout=2).status_code == 200:
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            time.sleep(0.02)
        raise AssertionError(f"not ready within {timeout_s} s")

    def connect(self, rcvbuf: int | None = None, timeout_s: float = 5.0) -> socket.socket:
        return rawhttp.connect(self.port, rcvbuf, timeout_s)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()


class GatewayProcess:
    """`python -m frontend [--workers N]` as a child process in its own process group."""

    def __init__(self, env: dict[str, str], log: Path, *, workers: int = 1, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        full = {**os.environ, **env}
        full.pop("GATEWAY_ENGINE_CORE_URL", None)
        args = [sys.executable, "-m", "frontend", "--port", str(self.port)]
        if workers > 1:
            args += ["--workers", str(workers)]
        with log.open("ab") as out:
            self.proc = subprocess.Popen(args, env=full, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.proc.poll() is None, self.text()[-3000:]
            assert time.monotonic() < deadline, "the gateway did not become ready:\n" + self.text()[-3000:]
            try:
                if httpx.get(f"{self.url}/health/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)

    def wait_workers(self, workers: int, timeout_s: float = 120) -> None:
        """Every worker of `--workers N` has reached the engine core (readiness needs only one)."""
        ok = wait_for(lambda: self.text().count("serves tiny version") >= workers, timeout_s, 0.1)
        assert ok, "the workers did not all start:\n" + self.text()[-3000:]

    def signal_group(self, sig: int) -> None:
        os.killpg(self.proc.pid, sig)

    def wait(self, timeout_s: float) -> int:
        return self.proc.wait(timeout_s)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def gateway_env(triton: TritonServer, repository: Path, **extra: str) -> dict[str, str]:
    return {
        "GATEWAY_ENVIRONMENT": "test",
        "GATEWAY_TRITON_URL": triton.grpc_url,
        "GATEWAY_MODEL": TINY,
        "GATEWAY_MODEL_VERSION": "1",
        "GATEWAY_REPOSITORY": str(repository),
        "GATEWAY_DEFAULT_WINDOW": "16",
        **extra,
    }


@pytest.fixture(scope="session")
def fault_triton(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    """This tier's own tritonserver: tests may freeze, kill and restart it (and must leave it up)."""
    work = tmp_path_factory.mktemp("triton-faults")
    server = TritonServer(model_repository, ports=TritonPorts.free(), work_dir=work, log_path=work / "triton.log")
    with server:
        yield server


@pytest.fixture(autouse=True)
def _triton_is_up(request: pytest.FixtureRequest) -> None:
    """Isolation: a test that left this tier's tritonserver dead (a failed kill/restart, or Triton
    crashing after a freeze) must not fail the tests after it; that test fails on its own."""
    if "fault_triton" not in request.fixturenames:
        return
    server: TritonServer = request.getfixturevalue("fault_triton")
    if server.process is None or server.process.poll() is not None:
        server.stop()
        server.start(120)
