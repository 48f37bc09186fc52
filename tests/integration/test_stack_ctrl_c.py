"""`make run` (python -m embedded_triton.stack) and Ctrl-C: the terminal's SIGINT reaches the
whole foreground process group; the stack must stop the gateway and tritonserver once each, the
gateway must shut down cleanly (no `CancelledError`, no traceback) and no process may outlive it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import TINY
from tests.integration.redis_server import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{entry.name}: {cmdline}")
    return found


def test_ctrl_c_stops_the_stack_cleanly(model_repository: Path, tmp_path: Path) -> None:
    # tiny's newest version alone (what the stack serves): one Python-backend stub to start and
    # stop instead of two, ~3 s of this test on 2 cores; nothing here is about several versions.
    repository = tmp_path / "repository"
    shutil.copytree(model_repository / TINY / "2", repository / TINY / "2")
    shutil.copy2(model_repository / TINY / "config.pbtxt", repository / TINY / "config.pbtxt")
    port, http, grpc, metrics = (free_port() for _ in range(4))
    log = tmp_path / "stack.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "GATEWAY_ENVIRONMENT": "test"}
    cmd = [
        sys.executable, "-m", "embedded_triton.stack", "--model", TINY, "--repository", str(repository),
        "--port", str(port), "--triton-http-port", str(http), "--triton-grpc-port", str(grpc),
        "--triton-metrics-port", str(metrics),
    ]  # fmt: skip
    with log.open("wb") as out:
        # Its own process group, as a terminal gives a foreground job: Ctrl-C signals the group.
        stack = subprocess.Popen(
            cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 240
        while "Ctrl-C stops both" not in log.read_text(errors="replace"):
            assert stack.poll() is None, log.read_text(errors="replace")
            assert time.monotonic() < deadline, "the stack did not come up:\n" + log.read_text(errors="replace")
            time.sleep(0.3)
        assert _processes_mentioning(f"--port {port}"), "the gateway should be running"
        os.killpg(stack.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
        assert stack.wait(90) == 0, log.read_text(errors="replace")
    finally:
        if stack.poll() is None:
            os.killpg(stack.pid, signal.SIGKILL)
            stack.wait()
    output = log.read_text(errors="replace")
    assert "stopped." in output
    for bad in ("Traceback", "CancelledError", "ERROR"):
        assert bad not in output, output
    deadline = time.monotonic() + 10
    while (_processes_mentioning(f"--port {port}") or _processes_mentioning(f"{grpc}")) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _processes_mentioning(f"--port {port}"), "the gateway outlived the stack"
    assert not _processes_mentioning(f"--grpc-port={grpc}") and not _processes_mentioning(f"--grpc-port {grpc}")
