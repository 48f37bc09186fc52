"""`python -m frontend --workers 2` end to end: one engine-core process, two uvicorn workers, a
real tritonserver; one scrape shows the whole gateway (prometheus-client's multiprocess mode in a
per-run directory); Ctrl-C stops every process, removes that directory and leaves no KV slot
behind. One launch serves the module (each launch costs ~10 s of make test): the tests run in file
order, the exact-count one first."""

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

REQUESTS = 1000


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
    # 1,000 requests from one address (test_every_scrape_counts_every_worker); no access log lines.
    yield from serve_workers(
        triton,
        model_repository,
        log,
        GATEWAY_DEFAULT_WINDOW="16",
        GATEWAY_IP_RPM="0",
        GATEWAY_ACCESS_LOG="false",
    )


def _scrape(client: httpx.Client) -> dict[str, float]:
    text = client.get("/metrics").text
    families = [f.name for f in text_string_to_metric_families(text)]
    assert len(families) == len(set(families)), "a series family appears twice"
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "gateway_requests_total" and s.labels["route"] == "/generate":
                out["requests"] = out.get("requests", 0.0) + s.value
            elif s.name == "gateway_cache_lookups_total":
                out["lookups"] = out.get("lookups", 0.0) + s.value
                if s.labels["result"] == "miss":
                    out["misses"] = out.get("misses", 0.0) + s.value
            elif s.name == "vllm:request_success_total":
                out["generations"] = out.get("generations", 0.0) + s.value
            elif s.name == "gateway_step_rows_count":
                out["steps"] = s.value
    return out


def test_every_scrape_counts_every_worker(launched: tuple[str, subprocess.Popen[bytes], Path]) -> None:
    """Exactly 1,000 requests, and every scrape, whichever worker answers it, reads 1,000 (so this
    test runs first on the module's launch). Cheap on purpose: greedy requests with one prompt, so
    after each worker's first generations its result cache answers (the counters do not care)."""
    url, proc, _ = launched
    body = {"prompt": "count me", "max_new_tokens": 2, "temperature": 0}

    refusals: list[str] = []

    async def load() -> list[int]:
        limits = httpx.Limits(max_connections=16, max_keepalive_connections=0)  # new connections spread the workers
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
            sem = asyncio.Semaphore(16)

            async def one() -> int:
                async with sem:
                    r = await client.post("/generate", json=body)
                    if r.status_code != 200:
                        refusals.append(r.text)
                    return r.status_code

            return await asyncio.gather(*(one() for _ in range(REQUESTS)))

    statuses = asyncio.run(load())
    assert statuses.count(200) == REQUESTS, ({s: statuses.count(s) for s in set(statuses)}, refusals[:3])
    seen = []
    for _ in range(12):  # fresh connections: the scrapes land on both workers
        with httpx.Client(base_url=url, timeout=10) as client:
            seen.append(_scrape(client))
    assert all(s["requests"] == REQUESTS for s in seen), seen
    assert all(s["lookups"] == REQUESTS for s in seen), seen  # every request looked the cache up once
    assert all(1 <= s["generations"] == s["misses"] for s in seen), seen  # a miss generates, a hit replays
    assert all(s["steps"] >= 1 for s in seen), seen  # the core's series, once

    dirs = _multiproc_dirs(proc.pid)
    assert len(dirs) == 1, dirs  # both workers share one directory
    (directory,) = dirs
    assert directory.is_dir() and any(directory.glob("*.db"))
    # Ctrl-C and the directory's removal: test_ctrl_c_stops_every_process_and_frees_the_kv_cache.


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
    (metrics_dir,) = _multiproc_dirs(proc.pid)  # the workers' per-run metrics directory
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
    assert not metrics_dir.exists(), "the per-run metrics directory outlived the gateway"
    deadline = time.monotonic() + 3  # the model publishes its gauges every 0.1 s
    while triton_metric(triton, "gpt2_kv_live_sequences") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert triton_metric(triton, "gpt2_kv_live_sequences") == 0


def _multiproc_dirs(launcher: int) -> set[Path]:
    """PROMETHEUS_MULTIPROC_DIR of the launcher's children (their environment at start)."""
    children = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
    found = set()
    for pid in children:
        with open(f"/proc/{pid}/environ", "rb") as f:
            for item in f.read().split(b"\0"):
                if item.startswith(b"PROMETHEUS_MULTIPROC_DIR="):
                    found.add(Path(item.split(b"=", 1)[1].decode()))
    return found
