"""A tritonserver that answers ready while its model's Python stub is dead (seen after SIGSTOP/SIGCONT
of the stub, which also crashed tritonserver 2.51 at times; SIGKILL of the stub gives the same
state every time: Triton ready, no step runs). The gateway's readiness runs a real step and says
503; `python -m embedded_triton` notices it with a real step per model and restarts tritonserver."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from embedded_triton import TritonPorts, TritonServer
from tests.conftest import TINY
from tests.resilience.conftest import ThreadGateway, gateway_settings, report, wait_for
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
        for pid in stubs:  # the model's process alone: tritonserver goes on answering, "ready"
            os.kill(pid, signal.SIGKILL)
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


def test_the_gateway_is_not_ready_while_tritons_model_cannot_step(
    fault_triton: TritonServer, model_repository: Path
) -> None:
    gateway = ThreadGateway(gateway_settings(fault_triton.grpc_url, model_repository))
    try:
        gateway.wait_ready(30)
        assert fault_triton.process is not None
        for pid in _stubs(fault_triton.process.pid):
            os.kill(pid, signal.SIGKILL)
        ready = f"{gateway.url}/health/ready"
        assert wait_for(lambda: httpx.get(ready, timeout=5).status_code == 503, 5, 0.1), "readiness missed it"
        assert fault_triton.is_ready()  # Triton itself still says ready
        r = httpx.get(ready, timeout=5)
        assert r.status_code == 503 and r.json()["error"]["code"] in ("not_ready", "breaker_open"), r.text
        fault_triton.stop()  # as embedded_triton does (test above): restart it
        fault_triton.start(120)
        gateway.wait_ready(15)
    finally:
        gateway.stop()


def test_with_two_instances_embedded_triton_reloads_the_broken_one_alone(
    model_repository: Path, tmp_path: Path
) -> None:
    """`python -m embedded_triton --instances 2` (what `make run INSTANCES=2` starts): one
    instance's stub dies; the launcher reloads that model alone (explicit model control), and the
    other instance's stub is never touched (its sequences would have had to start again)."""
    repo = tmp_path / "repo"
    shutil.copytree(model_repository / TINY / "1", repo / TINY / "1")
    shutil.copy2(model_repository / TINY / "config.pbtxt", repo / TINY / "config.pbtxt")
    ports = TritonPorts.free()
    log = tmp_path / "embedded.log"
    args = [sys.executable, "-m", "embedded_triton", "--repository", str(repo), "--model", TINY]
    args += ["--instances", "2", "--gpus", "none", "--health-interval-s", "1", "--health-failures", "2"]
    args += ["--http-port", str(ports.http), "--grpc-port", str(ports.grpc), "--metrics-port", str(ports.metrics)]
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    text = lambda: log.read_text(errors="replace")  # noqa: E731
    probe = TritonServer(repo, ports=ports)  # only its HTTP helpers: it starts nothing
    try:
        deadline = time.monotonic() + 120
        while "triton ready" not in text():
            assert proc.poll() is None and time.monotonic() < deadline, text()[-2000:]
            time.sleep(0.1)
        assert f"serving {TINY} as 2 instances: {TINY}, {TINY}_1" in text()
        assert probe.ready_models() == [TINY, f"{TINY}_1"]
        server_pid = next(
            int(p.name)
            for p in Path("/proc").iterdir()
            if p.name.isdigit() and _ppid(p) == proc.pid and "tritonserver" in _cmdline(p)
        )
        stubs = {pid: _cmdline(Path(f"/proc/{pid}")) for pid in _stubs(server_pid)}
        broken = next(pid for pid, cmd in stubs.items() if f"/{TINY}_1/" in cmd)
        healthy = next(pid for pid, cmd in stubs.items() if f"/{TINY}/" in cmd)
        os.kill(broken, signal.SIGKILL)
        stalled = time.monotonic()
        while "triton ready again" not in text():
            assert proc.poll() is None, "the launcher exited:\n" + text()[-3000:]
            assert time.monotonic() < stalled + 90, text()[-3000:]
            time.sleep(0.2)
        assert f"reloaded {TINY}_1" in text(), text()[-3000:]
        assert probe.model_steps(f"{TINY}_1") and probe.model_steps(TINY)
        assert Path(f"/proc/{healthy}").exists() and healthy in _stubs(server_pid)  # never restarted
        report(f"two instances, one stub dead: embedded_triton reloaded it alone in {time.monotonic() - stalled:.1f} s")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
