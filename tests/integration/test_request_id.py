"""The gateway's request id reaches Triton.

A step that carries one generation goes to Triton under that generation's request id (what
Triton's trace records, checked here with a tritonserver started with tracing on); every step
also names its rows' request ids in the `request_ids` parameter (`step_model.contract`), which
the step model quotes in its log lines about a row.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from embedded_triton import TritonPorts, TritonServer
from tests.conftest import TINY
from tests.integration.conftest import serve_gateway

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def traced(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TritonServer, Path]]:
    work = tmp_path_factory.mktemp("triton-traced")
    trace = work / "trace.json"
    tracing = [f"--trace-config=triton,file={trace}", "--trace-config=level=TIMESTAMPS", "--trace-config=rate=1"]
    tracing += ["--trace-config=triton,log-frequency=1"]  # write each trace as it completes
    server = TritonServer(
        model_repository, ports=TritonPorts.free(), work_dir=work, log_path=work / "triton.log", extra_args=tracing
    )
    with server:
        yield server, trace


@pytest.fixture(scope="module")
def gateway(traced: tuple[TritonServer, Path], model_repository: Path) -> Iterator[str]:
    yield from serve_gateway(traced[0], model_repository)


def _traced_request_ids(trace: Path) -> set[str]:
    """Request ids of the step model's traced requests (records found by pattern: a file may still
    be being written)."""
    files = sorted(trace.parent.glob(trace.name + "*"))  # log-frequency=1: trace.json.0, .1, ...
    return {rid for f in files for rid in _RECORD.findall(f.read_text())}


_RECORD = re.compile(r'\{"id":\d+,"model_name":"' + TINY + r'","model_version":\d+,"request_id":"([^"]*)"')


def test_a_generation_reaches_triton_under_its_request_id(gateway: str, traced: tuple[TritonServer, Path]) -> None:
    _, trace = traced
    r = httpx.post(
        f"{gateway}/generate",
        json={"prompt": "Hello", "max_new_tokens": 3, "temperature": 0},
        headers={"X-Request-Id": "trace-me-0123"},
        timeout=30,
    )
    assert r.status_code == 200 and r.headers["x-request-id"] == "trace-me-0123"
    deadline = time.monotonic() + 10
    while "trace-me-0123" not in _traced_request_ids(trace):
        assert time.monotonic() < deadline, sorted(_traced_request_ids(trace))[:10]
        time.sleep(0.1)
