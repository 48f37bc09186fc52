"""`python -m frontend --workers 2`: one scrape shows the whole gateway (prometheus-client's
multiprocess mode in a per-run directory). Exactly 1,000 requests, and every scrape, whichever
worker answers it, reads 1,000. Cheap on purpose: greedy requests with one prompt, so after each
worker's first generations its result cache answers (the counters do not care)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from embedded_triton import TritonServer
from tests.integration.conftest import serve_workers

pytestmark = pytest.mark.integration

REQUESTS = 1000


@pytest.fixture(scope="module")
def two_workers(
    triton: TritonServer, model_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, subprocess.Popen[bytes], Path]]:
    log = tmp_path_factory.mktemp("metrics-workers") / "gateway.log"
    # 1,000 requests from one address; no access log lines for them.
    yield from serve_workers(triton, model_repository, log, GATEWAY_IP_RPM="0", GATEWAY_ACCESS_LOG="false")


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


def test_every_scrape_counts_every_worker(two_workers: tuple[str, subprocess.Popen[bytes], Path]) -> None:
    url, proc, log = two_workers
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
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C
    assert proc.wait(60) == 0, log.read_text()
    assert not directory.exists(), "the per-run metrics directory outlived the gateway"


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
