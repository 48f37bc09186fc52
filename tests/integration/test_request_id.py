"""The gateway's request id reaches Triton.

A step that carries one generation goes to Triton under that generation's request id (what
Triton's trace records, checked here with the session tritonserver's tracing turned on); every step
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

from embedded_triton import TritonServer
from tests.conftest import TINY, TRACE_FILE
from tests.integration.conftest import serve_gateway

pytestmark = pytest.mark.integration


def _trace_setting(triton: TritonServer, setting: dict[str, object]) -> dict:
    """Triton's trace extension for the `tiny` model alone (HTTP)."""
    r = httpx.post(f"{triton.http_url}/v2/models/{TINY}/trace/setting", json=setting, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def traced(triton: TritonServer) -> Iterator[tuple[TritonServer, Path]]:
    """The session tritonserver (started with a trace file, tracing off) tracing every request of
    `tiny` while this module runs, each trace written as it completes (log frequency 1); the
    model's own settings are cleared afterwards (back to the server's: off)."""
    trace = triton.work_dir / TRACE_FILE
    got = _trace_setting(triton, {"trace_level": ["TIMESTAMPS"], "trace_rate": "1", "log_frequency": "1"})
    assert got["trace_level"] == ["TIMESTAMPS"] and got["trace_file"] == str(trace), got
    try:
        yield triton, trace
    finally:
        off = _trace_setting(triton, {"trace_level": None, "trace_rate": None, "log_frequency": None})
        assert off["trace_level"] == ["OFF"], off


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
