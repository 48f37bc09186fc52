"""A gateway started before Triton: one process and `--workers 2` answer alike. Both listen at
once (live 200, ready 503 `starting`) and both become ready by themselves once Triton comes up
(before, `--workers N` refused connections until its engine core had reached Triton, and exited
after GATEWAY_STARTUP_TIMEOUT_S)."""

from __future__ import annotations

import signal
from pathlib import Path

import httpx
import pytest

from embedded_triton import TritonPorts, TritonServer
from tests.conftest import TINY
from tests.resilience.conftest import GatewayProcess, wait_for

pytestmark = [pytest.mark.resilience, pytest.mark.slow]


def _status(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.HTTPError:
        return None


def test_one_process_and_workers_answer_alike_while_triton_is_down(model_repository: Path, tmp_path: Path) -> None:
    ports = TritonPorts.free()
    env = {
        "GATEWAY_ENVIRONMENT": "test",
        "GATEWAY_TRITON_URL": f"127.0.0.1:{ports.grpc}",  # nothing listens there yet
        "GATEWAY_MODEL": TINY,
        "GATEWAY_MODEL_VERSION": "1",
        "GATEWAY_REPOSITORY": str(model_repository),
        "GATEWAY_DEFAULT_WINDOW": "16",
        "GATEWAY_STARTUP_TIMEOUT_S": "5",  # shorter than Triton's absence: no deadline may end the gateway
    }
    gateways = {n: GatewayProcess(env, tmp_path / f"gateway-{n}.log", workers=n) for n in (1, 2)}
    triton = TritonServer(model_repository, ports=ports, work_dir=tmp_path / "triton", log_path=tmp_path / "t.log")
    try:
        for n, gw in gateways.items():
            live = wait_for(lambda gw=gw: _status(f"{gw.url}/health/live") == 200, 90, 0.2)  # type: ignore[misc]
            assert live, f"{n} worker(s): not listening while Triton is down\n" + gw.text()[-3000:]
        for n, gw in gateways.items():
            r = httpx.get(f"{gw.url}/health/ready", timeout=2)
            assert r.status_code == 503 and r.json()["error"]["code"] == "starting", (n, r.text)
            r = httpx.get(f"{gw.url}/health", timeout=2)
            assert r.status_code == 503, (n, r.text)
        wait_for(lambda: False, 6)  # past GATEWAY_STARTUP_TIMEOUT_S: both still up, still starting
        assert all(gw.proc.poll() is None for gw in gateways.values()), [gw.text()[-2000:] for gw in gateways.values()]
        triton.start(120)
        for gw in gateways.values():
            gw.wait_ready(120)
        gateways[2].wait_workers(2)
    finally:
        for gw in gateways.values():
            if gw.proc.poll() is None:
                gw.signal_group(signal.SIGTERM)
        for gw in gateways.values():
            try:
                gw.wait(60)
            finally:
                gw.kill()
        triton.stop()


def test_a_stop_while_the_engine_core_waits_for_triton_is_a_stop_not_an_error(
    model_repository: Path, tmp_path: Path
) -> None:
    ports = TritonPorts.free()  # nothing ever listens there
    env = {
        "GATEWAY_ENVIRONMENT": "test",
        "GATEWAY_TRITON_URL": f"127.0.0.1:{ports.grpc}",
        "GATEWAY_MODEL": TINY,
        "GATEWAY_MODEL_VERSION": "1",
        "GATEWAY_REPOSITORY": str(model_repository),
    }
    gw = GatewayProcess(env, tmp_path / "gateway.log", workers=2)
    try:
        assert wait_for(lambda: _status(f"{gw.url}/health/live") == 200, 90, 0.2), gw.text()[-3000:]
        assert wait_for(lambda: "waiting for Triton" in gw.text(), 30, 0.1), gw.text()[-3000:]
        gw.signal_group(signal.SIGTERM)
        assert gw.wait(60) in (0, -signal.SIGTERM), gw.text()[-3000:]
        text = gw.text()
        assert "cannot start without its engine core" not in text, text[-3000:]
        assert "engine core stopped before it was ready" in text, text[-3000:]
        assert "Traceback" not in text, text[-3000:]
    finally:
        gw.kill()
