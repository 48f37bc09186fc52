"""Abusive clients against the real stack (a gateway on a loopback port, a real tritonserver):
a 10 MB body (413, memory growth under 5 MB), slowloris, a stalled SSE reader (dropped, its KV
slot freed on Triton), hostile text through the real tokenizer, and 10x overload (every refusal a
429/503 with Retry-After, p99 of the refusals under 100 ms: the issue's requirement)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import httpx
import numpy as np
import pytest

from embedded_triton import TritonServer
from tests.conftest import TINY
from tests.rawhttp import (
    body_pieces,
    closed_by_peer,
    framing_header,
    read_response,
    send_in_background,
    send_json,
    slowloris,
)
from tests.resilience.conftest import (
    GatewayProcess,
    ThreadGateway,
    assert_kv_released,
    gateway_env,
    gateway_settings,
    kv_live,
    report,
    wait_for,
)

pytestmark = [pytest.mark.resilience]

DEADLINE_S = 0.5  # header, keep-alive and SSE send deadlines of the gateway under test


@pytest.fixture(scope="module")
def gateway(fault_triton: TritonServer, model_repository: Path) -> Iterator[ThreadGateway]:
    settings = gateway_settings(
        fault_triton.grpc_url,
        model_repository,
        header_timeout_s=DEADLINE_S,
        keep_alive_timeout_s=DEADLINE_S,
        sse_send_timeout_s=DEADLINE_S,
        body_timeout_s=1.0,
        step_timeout_s=10.0,
        max_batch_requests=4,  # body limit 850 KB: a legal body is buffered, so growth is bounded by it
    )
    gw = ThreadGateway(settings, sndbuf=8192)  # a small send buffer: a stalled reader stalls us fast
    try:
        gw.wait_ready(30)
        yield gw
    finally:
        gw.stop()


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_10_mb_body_is_refused_and_costs_no_memory(gateway: ThreadGateway, framing: str) -> None:
    total = 10_000_000
    pieces = body_pieces(framing, total)
    tracemalloc.start()  # the gateway runs in this process: its allocations are traced
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        with gateway.connect() as s:
            s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: t\r\n{framing_header(framing, total)}\r\n\r\n".encode())
            sender = send_in_background(s, pieces)
            status, _, body = read_response(s)
            assert closed_by_peer(s, 3.0) is not None, "the connection must be closed after the 413"
            sender.join(5)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert status == 413, body
    assert json.loads(body)["error"]["code"] == "request_too_large"
    growth = peak - before
    report(f"10 MB body ({framing}): 413, peak traced memory growth {growth / 1e6:.2f} MB")
    assert growth < 5 * 1024 * 1024, f"memory grew by {growth / 1e6:.1f} MB"


def test_slowloris_connections_are_cut(gateway: ThreadGateway) -> None:
    conns = [gateway.connect() for _ in range(20)]
    try:
        open_, started = slowloris(conns, DEADLINE_S + 3.0)  # a header line every 100 ms: the head never completes
        assert not open_, f"{len(open_)} of 20 slowloris connections still open"
        report(f"slowloris: 20 of 20 connections cut after {time.monotonic() - started:.2f} s")
        with gateway.connect() as idle:  # and one that sends nothing at all
            assert closed_by_peer(idle, DEADLINE_S + 2.0) is not None
    finally:
        for s in conns:
            s.close()


def test_a_stalled_sse_reader_is_dropped_and_its_kv_slot_freed(
    gateway: ThreadGateway, fault_triton: TritonServer
) -> None:
    body = {"model": TINY, "prompt": "Once upon a time", "max_tokens": 240, "n": 4, "stream": True, "logprobs": 5}
    s = gateway.connect(rcvbuf=4096)
    try:
        send_json(s, "/v1/completions", body)
        assert wait_for(lambda: kv_live(fault_triton) > 0, 5, 0.01), "the generation did not start"
        # Read nothing: the buffers fill, the send deadline passes, the gateway drops the stream.
        started = time.monotonic()
        assert_kv_released(fault_triton, within_s=DEADLINE_S + 3.0)
        report(f"stalled SSE reader: KV slot freed {time.monotonic() - started:.2f} s after the reader stopped")
        # The reader was dropped, not served: what the kernel still holds for it ends without [DONE]
        # and then the connection is closed.
        received = b""
        s.settimeout(5.0)
        with contextlib.suppress(OSError):
            while chunk := s.recv(65536):
                received += chunk
        assert received.startswith(b"HTTP/1.1 200"), received[:100]
        assert b"[DONE]" not in received, "the stalled reader was served to the end"
    finally:
        s.close()


@pytest.mark.parametrize(
    "body",
    [
        {"model": TINY, "prompt": "abc\ud800def", "max_tokens": 2},
        {"model": TINY, "prompt": ["ok", "x\udfffy"], "max_tokens": 2},
        {"model": "\ud800", "prompt": "hi", "max_tokens": 2},
        {"model": TINY, "prompt": "hi", "max_tokens": 2, "stop": ["\udc00"]},
    ],
    ids=["prompt", "prompt-list", "model", "stop"],
)
def test_lone_surrogates_are_400_through_the_real_tokenizer(gateway: ThreadGateway, body: dict) -> None:
    raw = json.dumps(body).encode()  # ensure_ascii: the surrogate travels as a valid JSON escape
    r = httpx.post(
        f"{gateway.url}/v1/completions", content=raw, headers={"Content-Type": "application/json"}, timeout=10
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_other_scripts_and_odd_characters_are_served(gateway: ThreadGateway) -> None:
    for prompt in ("日本語のテキスト", "NUL\x00here", "bidi\u202eoverride", "zero\u200bwidth", "emoji 🙂"):
        r = httpx.post(
            f"{gateway.url}/v1/completions", json={"model": TINY, "prompt": prompt, "max_tokens": 2}, timeout=10
        )
        assert r.status_code == 200, (prompt, r.text)
    r = httpx.post(
        f"{gateway.url}/v1/completions",
        content=b'{"model": "tiny", "prompt": "\xff\xfe"}',
        headers={"Content-Type": "application/json"},
        timeout=10,
    )
    assert r.status_code == 400


@pytest.mark.slow
def test_ten_times_overload_is_refused_fast_with_retry_after(
    fault_triton: TritonServer, model_repository: Path, tmp_path: Path
) -> None:
    running, waiting = 8, 8  # the model's KV capacity is 8
    capacity = running + waiting
    env = gateway_env(
        fault_triton,
        model_repository,
        GATEWAY_MAX_RUNNING=str(running),
        GATEWAY_MAX_WAITING=str(waiting),
        GATEWAY_IP_RPM="0",
    )
    gw = GatewayProcess(env, tmp_path / "gateway.log")  # its own process: the client does not share its GIL
    try:
        gw.wait_ready()
        body = {"prompt": "Once upon a time", "max_new_tokens": 200, "temperature": 0.8}

        async def overload() -> tuple[list[tuple[int, dict[str, str]]], list[float]]:
            # aiohttp, not httpx: httpx's pool with ~150 connections costs seconds on this machine
            # (benchmarks/load/client.py), which would be measured as the gateway's refusal time.
            connector = aiohttp.TCPConnector(limit=20 * capacity)
            async with aiohttp.ClientSession(gw.url, connector=connector) as client:
                # Warm the connection pool, so latencies are the gateway's, not TCP set-up.
                async def live() -> None:
                    async with client.get("/health/live") as r:
                        await r.read()

                await asyncio.gather(*(live() for _ in range(10 * capacity)))

                async def post() -> tuple[int, dict[str, str]]:
                    async with client.post("/generate", json=body) as r:
                        await r.read()
                        return r.status, dict(r.headers)

                fill = [asyncio.create_task(post()) for _ in range(capacity)]
                await asyncio.sleep(1.0)  # running and waiting are full

                # The other 9x arrive as a steady stream over half a second (a burst of 144 at one
                # instant would measure the client's own send queue: every request then waits for
                # all those sent before it, p50 = p99 ~ 80 ms on the 2-core machine).
                extra, spread_s = 9 * capacity, 0.5

                async def timed(i: int) -> tuple[tuple[int, dict[str, str]], float]:
                    await asyncio.sleep(i * spread_s / extra)
                    started = time.perf_counter()
                    r = await post()
                    return r, time.perf_counter() - started

                results = await asyncio.gather(*(timed(i) for i in range(extra)))  # 10x the capacity
                for task in fill:
                    task.cancel()
                for task in fill:
                    with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError):
                        await task
            return [r for r, _ in results], [t for r, t in results if r[0] != 200]

        responses, refusal_s = asyncio.run(overload())
        codes = [status for status, _ in responses]
        refused = [(status, headers) for status, headers in responses if status != 200]
        assert {status for status, _ in refused} <= {429, 503}, sorted(set(codes))
        # Most are refused (generations that end meanwhile let a few of the burst in).
        assert len(refused) >= len(responses) // 2, sorted(set(codes))
        assert all(int(headers["Retry-After"]) >= 1 for _, headers in refused)
        p50, p99 = (float(np.percentile(refusal_s, q)) * 1000 for q in (50, 99))
        report(f"10x overload: {len(refused)} refusals ({sorted(set(codes))}), p50 {p50:.1f} ms, p99 {p99:.1f} ms")
        assert p99 < 100, f"p99 of the refusals {p99:.1f} ms"
    finally:
        gw.kill()
    assert_kv_released(fault_triton, within_s=15)
