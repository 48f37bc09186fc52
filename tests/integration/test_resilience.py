"""Resilience against a real tritonserver: a frozen Triton (SIGSTOP) makes readiness 503 within a
second and opens the circuit breaker, which closes after SIGCONT; the gateway reconnects within
about a second of a restarted Triton's return; it listens while Triton is down; SIGTERM drains
a live stream into an error event and `[DONE]` and releases every KV slot; `python -m
embedded_triton` cleans up its process group and shared memory when tritonserver dies.

Destructive tests use their own TritonServer (the session's `triton` fixture is shared)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn

from embedded_triton import TritonPorts, TritonServer
from frontend.app import create_app
from frontend.settings import Settings
from tests.conftest import TINY
from tests.integration.test_gateway import triton_metric

pytestmark = pytest.mark.integration

PROMPT = {"prompt": "Hello there", "max_new_tokens": 4, "temperature": 1.0}  # no seed: never cached


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _settings(grpc_url: str, repository: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
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
    return Settings(**values)  # type: ignore[arg-type]


class ThreadGateway:
    """The gateway app under uvicorn in a thread (no signal handling: see the SIGTERM test)."""

    def __init__(self, settings: Settings) -> None:
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "gateway did not start"
            time.sleep(0.02)

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

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)


def _breaker_state(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    match = re.search(r"^gateway_circuit_breaker_state (\S+)$", text, re.M)
    assert match, "gateway_circuit_breaker_state missing"
    return float(match.group(1))


@pytest.fixture(scope="module")
def own_triton(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    work = tmp_path_factory.mktemp("triton-resilience")
    server = TritonServer(model_repository, ports=TritonPorts.free(), work_dir=work, log_path=work / "triton.log")
    with server:
        yield server


def test_the_gateway_listens_while_triton_is_down(model_repository: Path) -> None:
    gateway = ThreadGateway(_settings(f"127.0.0.1:{_free_port()}", model_repository))
    try:
        assert httpx.get(f"{gateway.url}/health/live", timeout=2).status_code == 200
        r = httpx.get(f"{gateway.url}/health/ready", timeout=2)
        assert r.status_code == 503 and r.json()["error"]["code"] == "starting"
        r = httpx.post(f"{gateway.url}/generate", json=PROMPT, timeout=2)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
    finally:
        gateway.stop()


def test_sigterm_drains_a_live_stream_into_an_error_event_and_done(
    own_triton: TritonServer, model_repository: Path, tmp_path: Path
) -> None:
    port = _free_port()
    env = {
        **os.environ,
        "GATEWAY_ENVIRONMENT": "test",
        "GATEWAY_TRITON_URL": own_triton.grpc_url,
        "GATEWAY_MODEL": TINY,
        "GATEWAY_MODEL_VERSION": "1",
        "GATEWAY_REPOSITORY": str(model_repository),
        "GATEWAY_DEFAULT_WINDOW": "16",
        "GATEWAY_DRAIN_TIMEOUT_S": "0.3",
    }
    env.pop("GATEWAY_ENGINE_CORE_URL", None)
    log = tmp_path / "gateway.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "frontend", "--port", str(port)], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            try:
                if httpx.get(f"{url}/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        body = {"model": TINY, "prompt": "Once upon a time", "max_tokens": 240, "stream": True, "temperature": 0}
        lines: list[str] = []
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data:"):
                    lines.append(line[5:].strip())
                    if len(lines) == 1:
                        proc.send_signal(signal.SIGTERM)
                        time.sleep(0.05)
                        ready = httpx.get(f"{url}/health/ready", timeout=2)
                        assert ready.status_code == 503 and ready.json()["error"]["code"] == "draining"
                        refused = httpx.post(f"{url}/generate", json=PROMPT, timeout=2)
                        assert refused.status_code == 503
        assert lines[-1] == "[DONE]", lines[-3:]
        assert json.loads(lines[-2])["error"]["message"] == "the gateway is shutting down", lines[-2]
        assert 1 < len(lines) < 240
        proc.wait(15)
        assert proc.returncode in (0, -signal.SIGTERM), log.read_text()
        assert "ASGI callable returned without completing response" not in log.read_text()
        # Every slot released (the model publishes its gauges every 0.1 s: give it a moment).
        deadline = time.monotonic() + 3
        while triton_metric(own_triton, "gpt2_kv_live_sequences") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert triton_metric(own_triton, "gpt2_kv_live_sequences") == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_frozen_triton_opens_the_breaker_and_sigcont_closes_it(
    own_triton: TritonServer, model_repository: Path
) -> None:
    gateway = ThreadGateway(_settings(own_triton.grpc_url, model_repository))
    assert own_triton.process is not None
    pid = own_triton.process.pid
    try:
        gateway.wait_ready(30)
        with httpx.Client(base_url=gateway.url, timeout=10) as client:
            assert client.post("/generate", json=PROMPT).status_code == 200
            os.kill(pid, signal.SIGSTOP)
            try:
                started = time.monotonic()
                assert client.get("/health/ready").status_code == 503
                assert time.monotonic() - started < 1.0  # readiness has a deadline
                # A generation's step times out (step_timeout_s 1 s), then the release of its id:
                # two whole-step failures open the breaker.
                assert client.post("/generate", json=PROMPT).status_code == 504
                deadline = time.monotonic() + 5
                while _breaker_state(gateway.url) != 2:
                    assert time.monotonic() < deadline, "the breaker did not open"
                    time.sleep(0.05)
                for _ in range(3):
                    started = time.monotonic()
                    r = client.post("/generate", json=PROMPT)
                    elapsed = time.monotonic() - started
                    assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
                    assert elapsed < 0.05, elapsed  # refused without a Triton call
                r = client.get("/health/ready")
                assert r.status_code == 503
            finally:
                os.kill(pid, signal.SIGCONT)
            resumed = time.monotonic()
            time.sleep(0.2)
            if own_triton.process.poll() is not None:
                # tritonserver 2.51 itself crashed after SIGCONT (seen once in a few runs: SIGSEGV in
                # pthread_mutex_lock, its log says "Signal (11) received"); not the gateway's doing.
                own_triton.stop()
                own_triton.start(120)
                pytest.skip("tritonserver crashed after SIGCONT (a Triton bug, see the comment)")
            gateway.wait_ready(10)
            recovery_s = time.monotonic() - resumed
            assert recovery_s < 3.0, recovery_s  # the next probe (every 0.5 s, 1 s deadline) closes it
            assert _breaker_state(gateway.url) == 0
            assert client.post("/generate", json=PROMPT).status_code == 200
    finally:
        gateway.stop()


def test_the_gateway_follows_a_restarted_triton_within_a_second(
    own_triton: TritonServer, model_repository: Path
) -> None:
    gateway = ThreadGateway(_settings(own_triton.grpc_url, model_repository))
    try:
        gateway.wait_ready(30)
        assert own_triton.process is not None
        os.killpg(own_triton.process.pid, signal.SIGKILL)  # a crash: server and stubs
        own_triton.stop()  # reaps it, removes its shared memory, closes its log
        started = time.monotonic()
        while httpx.get(f"{gateway.url}/health/ready", timeout=5).status_code == 200:
            assert time.monotonic() - started < 2, "readiness did not notice Triton's death"
            time.sleep(0.05)
        time.sleep(2.0)  # let gRPC's reconnect backoff grow: bounded by reconnect_backoff_ms
        own_triton.start(120)
        recovery_s = gateway.wait_ready(10)
        assert recovery_s < 1.5, recovery_s
        r = httpx.post(f"{gateway.url}/generate", json=PROMPT, timeout=10)
        assert r.status_code == 200, r.text
    finally:
        gateway.stop()


def test_embedded_triton_cleans_up_its_group_and_shared_memory_when_tritonserver_dies(
    model_repository: Path, tmp_path: Path
) -> None:
    ports = TritonPorts.free()
    log = tmp_path / "embedded.log"
    with log.open("wb") as out:  # a file, not a pipe: tritonserver and its stubs write to it too
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "embedded_triton",
                "--repository",
                str(model_repository),
                "--http-port",
                str(ports.http),
                "--grpc-port",
                str(ports.grpc),
                "--metrics-port",
                str(ports.metrics),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while "triton ready" not in log.read_text(errors="replace"):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-2000:]
            time.sleep(0.1)
        regions = list(Path("/dev/shm").glob(f"triton_gpt2_{proc.pid}_*"))
        assert regions, "the Python backend's regions carry this server's prefix"
        server_pid = next(
            int(p.name)
            for p in Path("/proc").iterdir()
            if p.name.isdigit() and _ppid(p) == proc.pid and "tritonserver" in _cmdline(p)
        )
        stubs = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _pgid(p) == server_pid]
        assert len(stubs) > 1  # the server and its Python-backend stubs
        os.kill(server_pid, signal.SIGKILL)  # the server alone: its stubs would outlive it
        assert proc.wait(15) == 1, log.read_text(errors="replace")[-2000:]
        # Nothing of its group runs any more (zombies aside: their reaper is PID 1's business).
        assert not [p.name for p in Path("/proc").iterdir() if p.name.isdigit() and _live_in_group(p, server_pid)]
        assert not list(Path("/dev/shm").glob(f"triton_gpt2_{proc.pid}_*"))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _stat(p: Path) -> list[str]:
    try:
        return p.joinpath("stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return []


def _ppid(p: Path) -> int:
    fields = _stat(p)
    return int(fields[1]) if fields else -1


def _pgid(p: Path) -> int:
    fields = _stat(p)
    return int(fields[2]) if fields else -1


def _live_in_group(p: Path, pgid: int) -> bool:
    fields = _stat(p)
    return bool(fields) and int(fields[2]) == pgid and fields[0] != "Z"


def _cmdline(p: Path) -> str:
    try:
        return p.joinpath("cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""
