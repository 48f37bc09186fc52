"""Load across units: HAProxy (deploy/balancer/haproxy.cfg: least outstanding requests, health
checks on /health/ready) in front of two real units, each a tritonserver and a `python -m
frontend` process, with API keys, quotas and the result cache in one shared redis-server.

The tests run in file order on one set of processes; the last one kills a unit.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from embedded_triton import TritonPorts, TritonServer
from frontend.security.keys import RedisKeyStore, make_record, redis_client
from tests.conftest import TINY
from tests.integration.redis_server import REDIS_SERVER, RedisServer, free_port

pytestmark = pytest.mark.balancer

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "deploy" / "balancer" / "haproxy.cfg"
HAPROXY = shutil.which("haproxy")
HEALTH_CHECK_S = 2.0  # haproxy.cfg: inter 1s, fall 2


@dataclass
class Unit:
    name: str
    triton: TritonServer
    gateway: subprocess.Popen[bytes]
    url: str

    def kill(self) -> None:
        """The whole unit dies at once: the gateway's process group, then its Triton."""
        os.killpg(self.gateway.pid, signal.SIGKILL)
        self.gateway.wait()
        self.triton.stop(timeout_s=1)

    def requests_served(self) -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=5).text
        return sum(
            s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == "gateway_requests_total" and s.labels.get("route") == "/v1/completions"
        )


@pytest.fixture(scope="module")
def redis_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    if REDIS_SERVER is None:
        pytest.fail("redis-server is not installed (make redis-server installs Debian's package)")
    server = RedisServer(REDIS_SERVER, tmp_path_factory.mktemp("redis"))
    server.start()
    yield server.port
    server.stop()


def _start_gateway(
    name: str, triton: TritonServer, repository: Path, redis_port: int, log: Path
) -> tuple[str, subprocess.Popen[bytes]]:
    port = free_port()
    env = {
        **os.environ,
        "GATEWAY_ENVIRONMENT": "test",
        "GATEWAY_TRITON_URL": triton.grpc_url,
        "GATEWAY_MODEL": TINY,
        "GATEWAY_MODEL_VERSION": "1",
        "GATEWAY_REPOSITORY": str(repository),
        "GATEWAY_CACHE_URL": f"redis://127.0.0.1:{redis_port}/0",
        "GATEWAY_KEYS_URL": f"redis://127.0.0.1:{redis_port}/1",
        "GATEWAY_RATELIMIT_URL": f"redis://127.0.0.1:{redis_port}/1",
        "GATEWAY_TRUSTED_PROXIES": "127.0.0.1",
        "GATEWAY_ACCESS_LOG": "false",
    }
    for var in ("GATEWAY_ENGINE_CORE_URL", "PROMETHEUS_MULTIPROC_DIR", "prometheus_multiproc_dir"):
        env.pop(var, None)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "frontend", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return f"http://127.0.0.1:{port}", proc


def _wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, f"{url} not ready:\n{log.read_text()[-3000:]}"
        try:
            if httpx.get(f"{url}/health/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)


@pytest.fixture(scope="module")
def units(model_repository: Path, redis_port: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Unit]]:
    work = tmp_path_factory.mktemp("units")
    started: list[Unit] = []
    try:
        for name in ("unit1", "unit2"):
            triton = TritonServer(
                model_repository,
                ports=TritonPorts.free(),
                work_dir=work / name,
                log_path=work / f"{name}-triton.log",
            ).start()
            url, proc = _start_gateway(name, triton, model_repository, redis_port, work / f"{name}-gateway.log")
            started.append(Unit(name, triton, proc, url))
        for unit in started:
            _wait_ready(unit.url, unit.gateway, work / f"{unit.name}-gateway.log")
        yield started
    finally:
        for unit in started:
            if unit.gateway.poll() is None:
                os.killpg(unit.gateway.pid, signal.SIGKILL)
                unit.gateway.wait()
            unit.triton.stop()


def _server_states(stats_url: str) -> dict[str, str]:
    """unit name -> HAProxy's status (UP, DOWN, ...) from its CSV statistics."""
    lines = httpx.get(f"{stats_url};csv", timeout=2).text.splitlines()
    header = lines[0].lstrip("# ").split(",")
    rows = [dict(zip(header, line.split(","), strict=False)) for line in lines[1:] if line]
    return {r["svname"]: r["status"] for r in rows if r["pxname"] == "units" and r["svname"].startswith("unit")}


@dataclass(frozen=True)
class Balancer:
    url: str
    stats: str


@pytest.fixture(scope="module")
def balancer(units: list[Unit], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Balancer]:
    if HAPROXY is None:  # make test-balancer installs it: a missing binary is a broken setup
        pytest.fail("haproxy is not installed (make haproxy installs Debian's package)")
    port, stats_port = free_port(), free_port()
    env = {
        **os.environ,
        "BALANCER_BIND": f"127.0.0.1:{port}",
        "BALANCER_STATS_BIND": f"127.0.0.1:{stats_port}",
        **{f"UNIT{i}": u.url.removeprefix("http://") for i, u in enumerate(units, 1)},
    }
    log = tmp_path_factory.mktemp("haproxy") / "haproxy.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([HAPROXY, "-f", str(CONFIG), "-db"], env=env, stdout=out, stderr=subprocess.STDOUT)
    stats = f"http://127.0.0.1:{stats_port}/stats"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if set(_server_states(stats).values()) == {"UP"}:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"haproxy never saw both units up:\n{log.read_text()}"
            time.sleep(0.2)
        yield Balancer(f"http://127.0.0.1:{port}", stats)
    finally:
        proc.terminate()
        proc.wait(10)


def _add_key(redis_port: int, **limits: int) -> str:
    async def add() -> str:
        record, key = make_record("balancer-test", **limits)
        store = RedisKeyStore(redis_client(f"redis://127.0.0.1:{redis_port}/1", 1.0))
        await store.add(record)
        await store.close()
        return key

    return asyncio.run(add())


def _completion(prompt: str, max_tokens: int = 4) -> dict[str, object]:
    return {"model": TINY, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}


def test_a_result_cached_by_one_unit_is_a_hit_on_the_other(units: list[Unit], redis_port: int) -> None:
    headers = {"Authorization": f"Bearer {_add_key(redis_port, rpm=0, tokens_per_day=0)}"}
    body = _completion("A cached story about two units")
    first = httpx.post(f"{units[0].url}/v1/completions", json=body, headers=headers, timeout=60)
    assert first.status_code == 200, first.text
    hits_before = _cache_hits(units[1])
    second = httpx.post(f"{units[1].url}/v1/completions", json=body, headers=headers, timeout=60)
    assert second.status_code == 200, second.text
    assert second.json()["choices"][0]["text"] == first.json()["choices"][0]["text"]
    assert _cache_hits(units[1]) == hits_before + 1


def _cache_hits(unit: Unit) -> float:
    text = httpx.get(f"{unit.url}/metrics", timeout=5).text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "gateway_cache_lookups_total" and s.labels.get("result") == "hit"
    )


def test_a_keys_quota_holds_exactly_across_units(balancer: Balancer, units: list[Unit], redis_port: int) -> None:
    rpm = 10
    headers = {"Authorization": f"Bearer {_add_key(redis_port, rpm=rpm, tokens_per_day=0)}"}
    served_before = [u.requests_served() for u in units]

    async def burst() -> list[int]:
        async with httpx.AsyncClient(base_url=balancer.url, timeout=60) as client:
            # distinct prompts: no request is a cache hit, every one is generated by some unit
            rs = await asyncio.gather(
                *(client.post("/v1/completions", json=_completion(f"quota {i}", 8), headers=headers) for i in range(30))
            )
        return [r.status_code for r in rs]

    codes = asyncio.run(burst())
    assert codes.count(200) == rpm and codes.count(429) == 30 - rpm, codes
    served = [u.requests_served() - before for u, before in zip(units, served_before, strict=True)]
    assert all(n > 0 for n in served), f"the balancer sent every request to one unit: {served}"
    assert sum(served) == 30


def test_new_requests_succeed_after_a_unit_is_killed_under_load(
    balancer: Balancer, units: list[Unit], redis_port: int
) -> None:
    headers = {"Authorization": f"Bearer {_add_key(redis_port, rpm=0, tokens_per_day=0)}"}
    results: list[tuple[float, float, int | str]] = []  # (start, end, status or error)
    stop = threading.Event()

    def client(worker: int) -> None:
        with httpx.Client(base_url=balancer.url, timeout=30) as c:
            i = 0
            while not stop.is_set():
                start = time.monotonic()
                try:
                    status: int | str = c.post(
                        "/v1/completions", json=_completion(f"load {worker} {i}", 8), headers=headers
                    ).status_code
                except httpx.HTTPError as err:
                    status = type(err).__name__
                results.append((start, time.monotonic(), status))
                i += 1

    threads = [threading.Thread(target=client, args=(w,)) for w in range(4)]
    served_before = units[1].requests_served()
    for t in threads:
        t.start()
    time.sleep(3)
    assert units[1].requests_served() > served_before, "unit2 took no load before it was killed"
    killed_at = time.monotonic()
    units[1].kill()
    time.sleep(6)
    stop.set()
    for t in threads:
        t.join(40)

    done_before = [s for _, end, s in results if end < killed_at]
    # in flight on the killed unit: lost with its KV cache (HAProxy retries only unanswered connections)
    in_flight = [s for start, end, s in results if start < killed_at <= end]
    window = [s for start, _, s in results if killed_at <= start <= killed_at + HEALTH_CHECK_S]
    after = [s for start, _, s in results if start > killed_at + HEALTH_CHECK_S]
    sys.stderr.write(
        f"\n{len(done_before)} requests done before the kill; in flight {in_flight}; "
        f"started within the check interval {window}; {len(after)} after it\n"
    )
    assert done_before and all(s == 200 for s in done_before), done_before
    assert len(after) >= 8 and all(s == 200 for s in after), after
    assert _server_states(balancer.stats) == {"unit1": "UP", "unit2": "DOWN"}
