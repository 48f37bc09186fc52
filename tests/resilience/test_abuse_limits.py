"""Limits against real gateways on loopback ports (a real tritonserver behind them): one window
shared by the workers of `python -m frontend --workers 2` without Redis, brute force of bad keys,
spoofed X-Forwarded-For, and x-ratelimit-* headers on successful responses."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from embedded_triton import TritonServer
from frontend.security.keys import SQLiteKeyStore, make_record
from tests.resilience.conftest import GatewayProcess, ThreadGateway, gateway_env, gateway_settings, report

pytestmark = [pytest.mark.resilience]


def _add_key(path: Path, **limits: int | None) -> str:
    async def add() -> str:
        record, key = make_record("abuse", **limits)
        store = SQLiteKeyStore(path)
        await store.add(record)
        await store.close()
        return key

    return asyncio.run(add())


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.slow
def test_two_workers_share_one_window_without_redis(
    fault_triton: TritonServer, model_repository: Path, tmp_path: Path
) -> None:
    keys = tmp_path / "keys.sqlite3"
    key = _add_key(keys, rpm=100)
    env = gateway_env(fault_triton, model_repository, GATEWAY_KEYS_PATH=str(keys))
    gw = GatewayProcess(env, tmp_path / "gateway.log", workers=2)
    try:
        gw.wait_ready()
        gw.wait_workers(2)

        async def burst() -> list[httpx.Response]:
            # A fresh connection per request: the kernel spreads them over both workers' accepts.
            limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
            async with httpx.AsyncClient(base_url=gw.url, timeout=30, limits=limits) as client:
                return await asyncio.gather(*(client.get("/v1/models", headers=_bearer(key)) for _ in range(200)))

        responses = asyncio.run(burst())
        codes = [r.status_code for r in responses]
        assert codes.count(200) == 100 and codes.count(429) == 100, sorted(set(codes))
        admitted = [r for r in responses if r.status_code == 200]
        assert {r.headers["x-ratelimit-limit-requests"] for r in admitted} == {"100"}
        assert all(0 <= int(r.headers["x-ratelimit-remaining-requests"]) < 100 for r in admitted)
        assert gw.text().count("said goodbye") == 0  # both workers served all along
    finally:
        gw.kill()


@pytest.fixture
def keyed_gateway(fault_triton: TritonServer, model_repository: Path, tmp_path: Path):  # type: ignore[no-untyped-def]
    keys = tmp_path / "keys.sqlite3"
    key = _add_key(keys, rpm=50, tokens_per_day=10_000)
    settings = gateway_settings(
        fault_triton.grpc_url, model_repository, keys_path=keys, auth_failures_per_ip=5, request_timeout_s=30
    )
    gw = ThreadGateway(settings)
    try:
        gw.wait_ready(30)
        yield gw, key
    finally:
        gw.stop()


def test_successful_responses_carry_the_rate_limit_headers(keyed_gateway: tuple[ThreadGateway, str]) -> None:
    gw, key = keyed_gateway
    with httpx.Client(base_url=gw.url, timeout=30, headers=_bearer(key)) as client:
        r = client.get("/v1/models")
        assert r.status_code == 200
        assert r.headers["x-ratelimit-limit-requests"] == "50"
        assert r.headers["x-ratelimit-remaining-requests"] == "49"
        assert r.headers["x-ratelimit-reset-requests"].endswith("s")
        body = {"prompt": "Hello", "max_new_tokens": 4, "temperature": 0}
        r = client.post("/generate", json=body)
        assert r.status_code == 200, r.text
        assert r.headers["x-ratelimit-remaining-requests"] == "48"
        assert r.headers["x-ratelimit-limit-tokens"] == "10000"
        assert int(r.headers["x-ratelimit-remaining-tokens"]) <= 10_000 - 4
        with client.stream("POST", "/generate/stream", json=body) as s:  # a stream's head carries them too
            assert s.status_code == 200 and s.headers["x-ratelimit-limit-tokens"] == "10000"
            s.read()


def test_brute_force_of_bad_keys_ends_in_429_whatever_x_forwarded_for_says(
    keyed_gateway: tuple[ThreadGateway, str],
) -> None:
    gw, key = keyed_gateway
    with httpx.Client(base_url=gw.url, timeout=10) as client:
        codes = []
        for i in range(8):  # a new claimed address each time: the peer is untrusted, the header ignored
            guess = f"gsk_{i:012x}_{'x' * 43}"
            headers = {**_bearer(guess), "X-Forwarded-For": f"198.51.100.{i}"}
            codes.append(client.get("/v1/models", headers=headers).status_code)
        assert codes == [401] * 5 + [429] * 3, codes
        r = client.get("/v1/models", headers=_bearer(key))  # even a correct key, from that address
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert r.headers["x-ratelimit-limit-requests"] == "5"


def test_a_spoofed_x_forwarded_for_does_not_open_new_buckets(
    fault_triton: TritonServer, model_repository: Path
) -> None:
    settings = gateway_settings(fault_triton.grpc_url, model_repository, ip_rpm=3)  # auth off: per-IP limit
    gw = ThreadGateway(settings)
    try:
        gw.wait_ready(30)
        with httpx.Client(base_url=gw.url, timeout=10) as client:
            codes = [
                client.get("/v1/models", headers={"X-Forwarded-For": f"192.0.2.{i}"}).status_code for i in range(5)
            ]
        assert codes == [200, 200, 200, 429, 429], codes
        report("spoofed X-Forwarded-For from 127.0.0.1 (untrusted): one bucket for every claimed address")
    finally:
        gw.stop()
