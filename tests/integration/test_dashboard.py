"""The Grafana dashboard's queries against a real Prometheus scraping a running stack.

A real `prometheus` (Debian's package; `make test` and `.ci/run` install it like redis-server)
scrapes the gateway's /metrics and Triton's metrics port every 250 ms while the gateway serves
some generations; then every panel expression of docker/grafana/dashboards/gpt2-serving.json is
evaluated through Prometheus's HTTP API. Each must be valid PromQL, and each must return data
except the few that only have data after an event this test does not cause (errors, full-row
fetches, queueing).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from embedded_triton import TritonServer
from tests.integration.conftest import free_port, serve_gateway

pytestmark = pytest.mark.integration

PROMETHEUS = shutil.which("prometheus")
DASHBOARD = Path(__file__).resolve().parents[2] / "docker" / "grafana" / "dashboards" / "gpt2-serving.json"
# Series that exist only once something goes wrong or waits: valid PromQL, empty here.
MAY_BE_EMPTY = ('status=~"4..|5.."', "gateway_full_row_fetches_total", "request_queue_time_seconds")


def _exprs() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p.get("targets", []) if t.get("expr")]


@pytest.fixture(scope="module")
def gateway(triton: TritonServer, model_repository: Path) -> Iterator[str]:
    yield from serve_gateway(triton, model_repository)


@pytest.fixture
def prometheus(gateway: str, triton: TritonServer, tmp_path: Path) -> Iterator[str]:
    if PROMETHEUS is None:  # `make test` and .ci/run install it: a missing binary is a broken setup
        pytest.fail("prometheus is not installed (make prometheus installs Debian's package)")
    config = tmp_path / "prometheus.yml"
    targets = {"gateway": gateway.removeprefix("http://"), "triton": triton.metrics_url.split("/")[2]}
    config.write_text(
        # 250 ms (was 1 s): Prometheus's first scrape comes ~5 s after its start (its discovery
        # manager's update throttle), the panels' rates need two more: about 2 s of make test.
        "global:\n  scrape_interval: 250ms\n  evaluation_interval: 250ms\nscrape_configs:\n"
        + "".join(f"  - job_name: {job}\n    static_configs:\n      - targets: ['{t}']\n" for job, t in targets.items())
    )
    port = free_port()
    log = (tmp_path / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()[-2000:]
            try:
                if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "prometheus did not become ready"
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _query(prometheus: str, expr: str) -> dict:
    # The dashboard's range windows ([1m], [5m]) hold only the last few seconds' scrapes here.
    r = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", (expr, body)
    return body["data"]


def test_every_dashboard_query_is_valid_and_shows_the_running_stack(gateway: str, prometheus: str) -> None:
    exprs = _exprs()
    assert len(exprs) >= 15

    def empty_panels() -> list[str]:
        empty = []
        for title, expr in exprs:
            result = _query(prometheus, expr)["result"]  # valid PromQL or the query fails here
            if not result and not any(marker in expr for marker in MAY_BE_EMPTY):
                empty.append(f"{title}: {expr}")
        return empty

    # Traffic while Prometheus scrapes (every 250 ms), until every panel has the two points its
    # rates need: Triton refreshes its counters on its own interval, so some panels fill later.
    deadline = time.monotonic() + 60
    while True:
        for i in range(4):
            body = {"prompt": f"Hello {i}", "max_new_tokens": 6, "temperature": 0.8}
            assert httpx.post(f"{gateway}/generate", json=body, timeout=30).status_code == 200
        with httpx.stream(
            "POST", f"{gateway}/generate/stream", json={"prompt": "Once", "max_new_tokens": 6}, timeout=30
        ) as r:
            assert r.status_code == 200
            r.read()
        empty = empty_panels()
        if not empty or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not empty, "panels without data:\n" + "\n".join(empty)
