"""`python -m frontend --workers 2` end to end: one engine-core process, two uvicorn workers, a
real tritonserver; Ctrl-C stops every process and leaves no KV slot behind."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from embedded_triton import TritonServer
from tests.integration.conftest import serve_workers
from tests.integration.test_gateway import triton_metric

pytestmark = pytest.mark.integration


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def launched(
    triton: TritonServer, model_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, subprocess.Popen[bytes], Path]]:
    log = tmp_path_factory.mktemp("workers") / "gateway.log"
    yield from serve_workers(triton, model_repository, log, GATEWAY_DEFAULT_WINDOW="16")


def test_workers_share_the_engine_core(
    launched: tuple[str, subprocess.Popen[bytes], Path], triton: TritonServer
) -> None:
    url, _, _ = launched
    body = {"prompt": "many workers", "max_new_tokens": 20, "temperature": 0.9, "top_k": 30}

    async def run() -> list[dict]:
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            calls = [
                client.post("/generate", json={**body, "seed": 5 + i % 3, "stop": [f"never-{i}"]}) for i in range(12)
            ]
            responses = await asyncio.gather(*calls)
        assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
        return [r.json() for r in responses]

    results = asyncio.run(run())
    by_seed: dict[int, set[str]] = {}
    for i, r in enumerate(results):
        assert r["completion_tokens"] >= 1
        by_seed.setdefault(i % 3, set()).add(r["generated_text"])
    assert all(len(texts) == 1 for texts in by_seed.values())  # whichever worker served it

    text = httpx.get(f"{url}/metrics", timeout=10).text
    families = [f.name for f in text_string_to_metric_families(text)]
    assert len(families) == len(set(families))
    samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}
    assert samples["gateway_step_rows_count"] > 0  # the core's series, through a worker
    assert samples["gateway_step_rows_sum"] >= 12 * 20 * 0.5  # every token of every request was a row somewhere

    deadline = time.monotonic() + 2.0
    while triton_metric(triton, "gpt2_kv_live_sequences") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert triton_metric(triton, "gpt2_kv_live_sequences") == 0


def test_ctrl_c_stops_every_process_and_frees_the_kv_cache(
    launched: tuple[str, subprocess.Popen[bytes], Path], triton: TritonServer
) -> None:
    url, proc, log = launched
    body = {"prompt": "a long story", "max_new_tokens": 240, "temperature": 0.7, "top_k": 20}
    with httpx.stream("POST", f"{url}/generate/stream", json=body, timeout=30) as r:
        for n, _ in enumerate(r.iter_lines()):
            if n >= 6:
                break  # a generation is running in the core
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        assert proc.wait(60) == 0, log.read_text()
    deadline = time.monotonic() + 5
    while _group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _group_alive(proc.pid), "a process of the gateway outlived it"
    output = log.read_text()
    assert "Traceback" not in output, output
    assert "engine core stopped" in output
    deadline = time.monotonic() + 3  # the model publishes its gauges every 0.1 s
    while triton_metric(triton, "gpt2_kv_live_sequences") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert triton_metric(triton, "gpt2_kv_live_sequences") == 0
