"""A tritonserver that answers ready while its model's Python stub is dead or wedged (seen after
SIGSTOP/SIGCONT of the stub): `python -m embedded_triton` notices it with a real step per model,
and restarts tritonserver; the gateway's readiness runs a real step too (tests/unit/test_resilience.py)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from embedded_triton import TritonPorts, TritonServer
from tests.conftest import TINY
from tests.resilience.conftest import report
from tests.resilience.test_triton_faults import _cmdline, _pgid, _ppid

pytestmark = [pytest.mark.resilience, pytest.mark.slow]


def _stubs(server_pid: int) -> list[int]:
    return [
        int(p.name)
        for p in Path("/proc").iterdir()
        if p.name.isdigit() and int(p.name) != server_pid and _pgid(p) == server_pid
    ]


def test_embedded_triton_restarts_a_tritonserver_whose_model_cannot_step(
    model_repository: Path, tmp_path: Path
) -> None:
    ports = TritonPorts.free()
    log = tmp_path / "embedded.log"
    args = [sys.executable, "-m", "embedded_triton", "--repository", str(model_repository)]
    args += ["--http-port", str(ports.http), "--grpc-port", str(ports.grpc), "--metrics-port", str(ports.metrics)]
    args += ["--health-interval-s", "1", "--health-failures", "2"]
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    text = lambda: log.read_text(errors="replace")  # noqa: E731
    probe = TritonServer(model_repository, ports=ports)  # only its HTTP helpers: it starts nothing
    try:
        deadline = time.monotonic() + 90
        while "triton ready" not in text():
            assert proc.poll() is None and time.monotonic() < deadline, text()[-2000:]
            time.sleep(0.1)
        assert probe.model_steps(TINY)
        server_pid = next(
            int(p.name)
            for p in Path("/proc").iterdir()
            if p.name.isdigit() and _ppid(p) == proc.pid and "tritonserver" in _cmdline(p)
        )
        stubs = _stubs(server_pid)
        assert stubs
        for pid in stubs:  # the model's process alone: tritonserver goes on answering
            os.kill(pid, signal.SIGSTOP)
        time.sleep(3)
        for pid in stubs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        stalled = time.monotonic()
        deadline = stalled + 90
        while "triton ready again" not in text():
            assert proc.poll() is None, "the launcher exited:\n" + text()[-3000:]
            assert time.monotonic() < deadline, text()[-3000:]
            time.sleep(0.2)
        assert "cannot run a step" in text() or "not ready" in text(), text()[-3000:]
        assert probe.model_steps(TINY), text()[-3000:]
        took_s = time.monotonic() - stalled
        report(f"a dead Python stub: embedded_triton restarted tritonserver; it steps {took_s:.1f} s later")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
