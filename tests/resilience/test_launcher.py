"""The embedded launchers against the faults of their own processes: `python -m embedded_triton`
SIGKILLed must not leave tritonserver holding its ports (the next start would fail "Address already
in use"), and a port that is taken before start must fail the start at once, naming the port and
the setting that moves it (not a gateway waiting minutes on a readiness another server answers)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from embedded_triton import TritonPorts
from embedded_triton.server import port_in_use
from tests.integration.redis_server import free_port
from tests.resilience.conftest import wait_for

pytestmark = pytest.mark.resilience

ROOT = Path(__file__).resolve().parents[2]


def _children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = (entry / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper that may never come is dead for our purpose)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _launcher(args: list[str], log: Path, cwd: Path | None = None) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "GATEWAY_ENVIRONMENT": "test"}
    with log.open("wb") as out:
        command = [sys.executable, "-m", *args]
        return subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture
def occupied_port() -> Iterator[int]:
    """A loopback port held by a plain listening socket (as another server would hold it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


def test_a_sigkilled_launcher_takes_tritonserver_with_it(model_repository: Path, tmp_path: Path) -> None:
    ports = TritonPorts.free()
    log = tmp_path / "launcher.log"
    flags = ["--http-port", str(ports.http), "--grpc-port", str(ports.grpc), "--metrics-port", str(ports.metrics)]
    launcher = _launcher(["embedded_triton", "--repository", str(model_repository), *flags], log)
    survivors: list[int] = []
    try:
        ready = wait_for(lambda: "triton ready" in log.read_text() or launcher.poll() is not None, 180, 0.2)
        assert ready and launcher.poll() is None, log.read_text(errors="replace")
        server = _children(launcher.pid)
        assert len(server) == 1, f"expected one tritonserver child, got {server}"
        stubs = _children(server[0])  # the Python backend's stubs, one per model instance
        launcher.kill()  # SIGKILL: no handler of ours runs
        launcher.wait(10)
        wait_for(lambda: not any(_alive(pid) for pid in server + stubs), 10, 0.1)
        survivors = [pid for pid in server + stubs if _alive(pid)]
        assert not survivors, f"outlived the SIGKILLed launcher: {survivors}"
        assert wait_for(lambda: not port_in_use(ports.grpc), 5, 0.1), "the gRPC port is still held"
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait(10)
        for pid in survivors:  # the old behaviour: clean up what this test started
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)


def test_a_taken_triton_port_fails_the_launcher_at_once(
    model_repository: Path, tmp_path: Path, occupied_port: int
) -> None:
    http, metrics = free_port(), free_port()
    log = tmp_path / "launcher.log"
    flags = ["--http-port", str(http), "--grpc-port", str(occupied_port), "--metrics-port", str(metrics)]
    started = time.monotonic()
    launcher = _launcher(["embedded_triton", "--repository", str(model_repository), *flags], log)
    try:
        code = launcher.wait(30)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait(10)
    output = log.read_text(errors="replace")
    assert code != 0, output
    assert time.monotonic() - started < 20, "it should fail before starting anything"
    assert f"gRPC port {occupied_port}" in output and "--grpc-port" in output, output


def _stack_output(model_repository: Path, tmp_path: Path, *, port: int, grpc_port: int) -> tuple[int, str]:
    """Run `make run`'s launcher (embedded_triton.stack) with these ports; its exit code and output."""
    stack_args = ["--model", "tiny", "--repository", str(model_repository), "--port", str(port)]
    stack_args += ["--triton-http-port", str(free_port()), "--triton-grpc-port", str(grpc_port)]
    stack_args += ["--triton-metrics-port", str(free_port())]
    log = tmp_path / "stack.log"
    launcher = _launcher(["embedded_triton.stack", *stack_args], log, cwd=tmp_path)
    try:
        code = launcher.wait(30)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait(10)
    return code, log.read_text(errors="replace")


def test_make_run_names_a_taken_triton_port(model_repository: Path, tmp_path: Path, occupied_port: int) -> None:
    """`make run` (embedded_triton.stack): the port and the variable that moves it, before any export."""
    code, output = _stack_output(model_repository, tmp_path, port=free_port(), grpc_port=occupied_port)
    assert code == 1, output
    assert f"gRPC port {occupied_port}" in output and "TRITON_GRPC_PORT" in output, output
    assert "starting tritonserver" not in output, output


def test_make_run_names_a_taken_gateway_port(model_repository: Path, tmp_path: Path, occupied_port: int) -> None:
    code, output = _stack_output(model_repository, tmp_path, port=occupied_port, grpc_port=free_port())
    assert code == 1, output
    assert f"gateway's port {occupied_port}" in output and "PORT=" in output, output
