"""Unit tests for the benchmark helpers: percentiles, summaries, markdown/CSV rendering, SSE parsing,
load-run planning and summarizing, and the baseline's arithmetic. No servers, no models."""

from __future__ import annotations

import argparse
import asyncio
import csv
import dataclasses
import io
import json
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from benchmarks import baseline, load
from benchmarks.load import runner
from benchmarks.report import (
    NA,
    Distribution,
    MachineInfo,
    RunInfo,
    csv_text,
    fmt,
    fmt_pct,
    markdown_table,
    percentile,
    ratio,
    write_outputs,
)

pytestmark = pytest.mark.unit

QS = [0, 1, 5, 25, 50, 75, 90, 95, 99, 100]


# ----------------------------------------------------------------------------------------- percentiles


def test_percentile_of_no_samples_is_none_and_renders_na() -> None:
    for q in QS:
        assert percentile([], q) is None
    dist = Distribution.of([])
    assert dist.n == 0
    assert (dist.mean, dist.p50, dist.p95, dist.p99, dist.min, dist.max) == (None,) * 6
    assert fmt(dist.p95) == NA
    assert fmt_pct(None) == NA
    assert fmt(dist.p95) != "0.000"


def test_percentile_of_one_sample_is_that_sample() -> None:
    for q in QS:
        assert percentile([1.25], q) == 1.25
    dist = Distribution.of([1.25])
    assert (dist.mean, dist.p50, dist.p95, dist.p99, dist.min, dist.max) == (1.25,) * 6


@pytest.mark.parametrize("n", [2, 3, 100])
def test_percentile_matches_numpy_linear(n: int) -> None:
    rng = np.random.default_rng(n)
    samples = rng.lognormal(mean=0.0, sigma=1.0, size=n).tolist()
    for q in QS:
        assert percentile(samples, q) == pytest.approx(float(np.percentile(samples, q)), rel=1e-12, abs=1e-15)
    dist = Distribution.of(samples)
    assert dist.n == n
    assert dist.mean == pytest.approx(float(np.mean(samples)))
    assert dist.p50 == pytest.approx(float(np.percentile(samples, 50)))
    assert dist.p95 == pytest.approx(float(np.percentile(samples, 95)))
    assert dist.p99 == pytest.approx(float(np.percentile(samples, 99)))
    assert (dist.min, dist.max) == (min(samples), max(samples))


def test_percentile_of_two_samples_interpolates() -> None:
    assert percentile([2.0, 1.0], 50) == pytest.approx(1.5)
    assert percentile([1.0, 2.0], 95) == pytest.approx(1.95)
    assert percentile([1.0, 2.0], 0) == 1.0
    assert percentile([1.0, 2.0], 100) == 2.0


def test_percentile_is_order_independent_and_accepts_generators() -> None:
    xs = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert percentile(iter(xs), 50) == 3.0
    assert percentile(sorted(xs, reverse=True), 25) == percentile(xs, 25) == 2.0


@pytest.mark.parametrize("q", [-1, 100.5])
def test_percentile_rejects_out_of_range_q(q: float) -> None:
    with pytest.raises(ValueError):
        percentile([1.0], q)


def test_percentile_rejects_nan() -> None:
    with pytest.raises(ValueError):
        percentile([1.0, float("nan")], 50)


def test_distribution_scaled_keeps_none() -> None:
    assert Distribution.of([]).scaled(1000).p50 is None
    assert Distribution.of([0.002]).scaled(1000).p50 == pytest.approx(2.0)


def test_ratio_and_fmt() -> None:
    assert ratio(1.0, 2.0) == 0.5
    assert ratio(None, 2.0) is None
    assert ratio(1.0, 0) is None
    assert fmt(0.0) == "0.000"
    assert fmt(3) == "3"
    assert fmt(0.0123, 1, 1000) == "12.3"
    assert fmt(float("nan")) == NA
    assert fmt_pct(0.992) == "99.2%"


# ------------------------------------------------------------------------------------------- rendering


def test_markdown_table_smoke() -> None:
    text = markdown_table(["a", "b|c"], [[1, None], ["x", 2.5]])
    lines = text.strip().splitlines()
    assert lines[0] == "| a | b\\|c |"
    assert lines[1] == "|---|---|"
    assert lines[2] == f"| 1 | {NA} |"
    assert lines[3] == "| x | 2.5 |"


def test_markdown_table_rejects_ragged_rows() -> None:
    with pytest.raises(ValueError):
        markdown_table(["a", "b"], [[1]])


def test_csv_text_round_trips() -> None:
    rows: list[dict[str, Any]] = [{"a": 1, "b": None, "c": [1.5, 2]}, {"a": 2, "d": "x,y"}]
    parsed = list(csv.DictReader(io.StringIO(csv_text(rows))))
    assert list(parsed[0]) == ["a", "b", "c", "d"]
    assert parsed[0] == {"a": "1", "b": "", "c": "[1.5, 2]", "d": ""}
    assert parsed[1]["d"] == "x,y"


def _info() -> RunInfo:
    machine = MachineInfo("host", 8, "Linux", "3.11", ["GPU 0: Fake"])
    return RunInfo("2025-01-01T00:00:00Z", machine, "abc123", "python -m x", {"k": 1})


def test_run_info_markdown_and_write_outputs(tmp_path: Path) -> None:
    info = _info()
    md = info.markdown()
    assert "2025-01-01T00:00:00Z" in md and "GPU 0: Fake" in md and "abc123" in md and "`k=1`" in md
    paths = write_outputs(tmp_path / "out", "light/generate", md, [{"x": 1}], {"run": info, "nan": float("nan")})
    assert [p.name for p in paths] == ["light_generate.md", "light_generate.csv", "light_generate.json"]
    data = json.loads(paths[2].read_text())
    assert data["run"]["machine"]["gpus"] == ["GPU 0: Fake"]
    assert data["nan"] is None


def test_run_info_collect_has_date_and_machine() -> None:
    info = RunInfo.collect({"a": 1}, argv=["prog"])
    assert info.date_utc.endswith("Z")
    assert info.machine.cpu_count is None or info.machine.cpu_count >= 1
    assert info.parameters == {"a": 1}


# ------------------------------------------------------------------------------------------------ load


def test_sse_parser_events() -> None:
    parser = load.SSEParser()
    lines = [
        ": comment",
        "event: token",
        'data: {"text": "a"}',
        "",
        "data: x",
        "data:y",
        "",
        "event: done",
        "data: {}",
    ]
    events = [e for e in (parser.feed(line) for line in lines) if e is not None]
    tail = parser.flush()
    assert events == [load.SSEEvent("token", '{"text": "a"}'), load.SSEEvent("message", "x\ny")]
    assert tail == load.SSEEvent("done", "{}")
    assert parser.flush() is None


def _cfg(**kw: object) -> load.RunConfig:
    base: dict[str, object] = {
        "name": "t",
        "endpoint": "stream",
        "mode": "closed",
        "base_url": "http://x",
        "max_new_tokens": 8,
        "sampling": load.Sampling(),
        "seed": 0,
        "seeded": False,
        "timeout_s": 1.0,
        "users": 2,
        "requests_per_user": 3,
    }
    base.update(kw)
    return load.RunConfig(**base)  # type: ignore[arg-type]


def test_plans_are_deterministic_and_seeded_only_on_request() -> None:
    cfg = _cfg()
    a, b = load.closed_loop_plans(cfg, load.PROMPTS), load.closed_loop_plans(cfg, load.PROMPTS)
    assert a == b
    assert [len(u) for u in a] == [3, 3]
    assert all(s is None for u in a for p in u for s in p.seeds)
    seeded = load.closed_loop_plans(_cfg(seeded=True), load.PROMPTS)
    assert [p.prompts for u in seeded for p in u] == [p.prompts for u in a for p in u]
    assert all(isinstance(s, int) for u in seeded for p in u for s in p.seeds)
    batch = load.closed_loop_plans(_cfg(endpoint="batch"), load.PROMPTS)
    assert all(len(p.prompts) == load.BATCH_SIZE for u in batch for p in u)


def test_prompt_pool_has_english_and_japanese() -> None:
    assert any(p.isascii() for p in load.PROMPTS)
    assert any(any("\u3040" <= ch <= "\u30ff" for ch in p) for p in load.PROMPTS)


def test_poisson_arrivals() -> None:
    times = load.poisson_arrivals(50.0, 20.0, seed=3)
    assert times == sorted(times) and all(0 <= t < 20.0 for t in times)
    assert 800 < len(times) < 1200
    assert times == load.poisson_arrivals(50.0, 20.0, seed=3)


def test_fit_prompt_pads_and_truncates() -> None:
    padded = load.fit_prompt("Hello there", 20)
    assert load.estimate_tokens(padded) == 20
    short = load.fit_prompt("吾輩は猫である。名前はまだ無い。", 6)
    assert load.estimate_tokens(short) <= 6 and short


def _result(i: int, ok: bool, latency: float, **kw: object) -> load.RequestResult:
    r = load.RequestResult(i, 0, "stream", ok=ok, latency_s=latency, **kw)  # type: ignore[arg-type]
    return r


def test_summarize_counts_and_statistics() -> None:
    results = [
        _result(0, True, 1.0, ttft_s=0.1, itl_s=[0.01, 0.02], completion_tokens=3),
        _result(1, True, 3.0, ttft_s=0.3, itl_s=[0.03], completion_tokens=2),
        _result(2, False, 9.0, error="HTTP 503: busy"),
    ]
    s = load.summarize(load.RunResult(_cfg(), results, wall_s=2.0, max_in_flight=2))
    assert (s.requests, s.ok, s.failed) == (3, 2, 1)
    assert s.success_rate == pytest.approx(2 / 3)
    assert s.latency.n == 2 and s.latency.mean == pytest.approx(2.0)  # the failure's 9 s is excluded
    assert s.latency.p50 == pytest.approx(2.0)
    assert s.requests_per_s == pytest.approx(1.0)
    assert s.tokens_per_s == pytest.approx(2.5)
    assert s.ttft.n == 2 and s.itl.n == 3
    assert s.errors == {"HTTP 503: busy": 1}


def test_summarize_single_and_empty_runs_render() -> None:
    one = load.summarize(load.RunResult(_cfg(), [_result(0, True, 0.5, ttft_s=0.2)], 0.5, 1))
    assert (one.latency.p50, one.latency.p95, one.latency.p99) == (0.5, 0.5, 0.5)
    assert one.itl.p99 is None
    empty = load.summarize(load.RunResult(_cfg(), [], 0.0, 0))
    assert empty.success_rate is None and empty.latency.p95 is None
    cfg = _cfg(scenario="light")
    text = load.render_markdown([(cfg, one), (cfg, empty)], _info(), "smoke")
    assert "| 0.500 | 0.500 | 0.500 | 0.500 |" in text
    assert NA in text
    assert "/generate/robust" in text  # compared with the seed article


def test_comparison_picks_the_seed_row() -> None:
    assert load.seed_row_for("batch", auth=False).endpoint == "/generate/batch"
    assert load.seed_row_for("generate", auth=True).endpoint == "/generate/secure"
    assert load.seed_row_for("generate", auth=False).endpoint == "/generate/robust"
    s = load.summarize(load.RunResult(_cfg(endpoint="generate"), [_result(0, True, 2.468)], 1.0, 1))
    table = load.comparison_table([(_cfg(endpoint="generate", scenario="heavy"), s)])
    assert table is not None and "| 2.00 |" in table  # 2.468 / 1.234
    assert load.comparison_table([(_cfg(), s)]) is None  # custom runs have no seed counterpart


def test_configs_from_args() -> None:
    parser = load.build_parser()
    cfgs = load.configs_from_args(parser.parse_args(["--scenario", "all", "--endpoint", "batch"]))
    assert [(c.users, c.requests_per_user, c.max_new_tokens) for c in cfgs] == [
        (5, 10, 50),
        (15, 10, 100),
        (30, 5, 200),
    ]
    assert all(not c.modified and c.endpoint == "batch" for c in cfgs)
    small = load.configs_from_args(parser.parse_args(["--scenario", "heavy", "--requests", "1"]))
    assert small[0].modified and small[0].users == 30 and small[0].requests_per_user == 1
    open_args = parser.parse_args(["--rate", "5", "--duration-s", "2", "--api-key", "s3cr3t-key"])
    open_cfg = load.configs_from_args(open_args)[0]
    assert open_cfg.mode == "open" and "s3cr3t" not in json.dumps(open_cfg.public())
    with pytest.raises(ValueError):
        load.configs_from_args(parser.parse_args(["--rate", "5", "--scenario", "light"]))


# -------------------------------------------------------------------------------------------- baseline


def test_baseline_batch_result_arithmetic() -> None:
    r = baseline.BatchResult(4, (2.0, 1.0, 3.0), (0.2, 0.1, 0.3), prompt_tokens=24, new_tokens=11)
    assert r.full_median_s == 2.0
    assert r.tokens_per_s == pytest.approx(4 * 11 / 2.0)
    assert r.per_token_s == pytest.approx(2.0 / 11)
    assert r.decode_per_token_s == pytest.approx((2.0 - 0.2) / 10)
    table = baseline.results_table([r])
    assert table.splitlines()[2].startswith("| 4 | 24 | 11 | 3 |")
    rows = baseline.csv_rows([r])
    assert len(rows) == 6 and {row["kind"] for row in rows} == {"full", "first_token"}


def test_baseline_args() -> None:
    assert baseline.parse_batch_sizes("1, 4,16,4") == [1, 4, 16]
    with pytest.raises(ValueError):
        baseline.parse_batch_sizes("0")
    args = baseline.build_parser().parse_args(["--random-config", "tiny"])
    cfg = baseline.config_from_args(args, cuda_available=False)
    assert cfg.device == "cpu" and cfg.batch_sizes == (1, 4, 16)
    with pytest.raises(ValueError):
        baseline.config_from_args(argparse.Namespace(**{**vars(args), "device": "cuda"}), cuda_available=False)


# ------------------------------------------------------------------- request handlers (a loopback aiohttp server)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _send(cfg: load.RunConfig, handler: Handler, prompts: int = 1) -> load.RequestResult:
    """Run load.send against a real loopback server whose every POST is `handler`."""
    plan = load.RequestPlan(0, 0, ("hi",) * prompts, (None,) * prompts)

    async def go() -> load.RequestResult:
        app = web.Application()
        app.router.add_post("/{path:.*}", handler)
        async with TestServer(app, host="127.0.0.1") as server:
            live = dataclasses.replace(cfg, base_url=str(server.make_url("")).rstrip("/"))
            async with runner._client(live, max_connections=4) as client:
                return await load.send(client, live, plan, run_t0=0.0)

    return asyncio.run(go())


def _json(payload: object, status: int = 200) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        return web.json_response(payload, status=status)

    return handler


def _raw(body: bytes, status: int = 200) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=body, status=status)

    return handler


def _usage(n: int) -> dict[str, int]:
    return {"prompt_tokens": 2, "completion_tokens": n, "total_tokens": 2 + n}


def test_generate_ok_and_http_error() -> None:
    async def ok(request: web.Request) -> web.Response:
        body = await request.json()
        assert request.path == "/generate" and body["seed"] is None and body["top_k"] == 0
        payload = {"generated_text": "x", "completion_tokens": 5, "finish_reason": "length", "usage": _usage(5)}
        payload |= {"cached": True, "timings": {"time_to_first_token_s": 0.01, "total_s": 0.2}}
        return web.json_response(payload)

    res = _send(_cfg(endpoint="generate"), ok)
    assert res.ok and res.completion_tokens == 5 and res.prompt_tokens == 2 and res.cache_hits == 1
    assert res.server_total_s == 0.2 and res.latency_s is not None
    res = _send(_cfg(endpoint="generate"), _json({"error": {"message": "busy"}}, status=503))
    assert not res.ok and res.status == 503 and res.error is not None and res.error.startswith("HTTP 503")


def test_batch_items_with_null_error_are_ok() -> None:
    item = {"generated_text": "x", "finish_reason": "length", "completion_tokens": 3, "usage": _usage(3)}
    good = {**item, "cached": False, "error": None}
    bad = {"generated_text": None, "usage": None, "cached": False, "error": {"message": "nope"}}
    res = _send(_cfg(endpoint="batch"), _json({"results": [good] * 4, "cache_hits": 0}), 4)
    assert res.ok and res.items_ok == 4 and res.completion_tokens == 12 and res.cache_hits == 0
    res = _send(_cfg(endpoint="batch"), _json({"results": [good, good, bad, good], "cache_hits": 0}), 4)
    assert not res.ok and res.items_ok == 3 and "1 of 4" in (res.error or "")


def _sse(*events: tuple[str, object]) -> bytes:
    return "".join(f"event: {name}\ndata: {json.dumps(data)}\n\n" for name, data in events).encode()


def test_stream_ttft_itl_and_usage() -> None:
    tokens = [("token", {"text": f" t{i}", "position": i, "token_id": i}) for i in range(4)]
    done = ("done", {"finish_reason": "length", "usage": _usage(4), "cached": False})

    async def streamed(request: web.Request) -> web.StreamResponse:  # event by event, as the gateway sends them
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for event in (*tokens, done):
            await resp.write(_sse(event))
            await asyncio.sleep(0.002)
        await resp.write_eof()
        return resp

    res = _send(_cfg(), streamed)
    assert res.ok and res.completion_tokens == 4 and res.ttft_s is not None and len(res.itl_s) == 3
    assert all(gap > 0.001 for gap in res.itl_s)  # measured as the events arrived
    error = ("error", {"error": {"message": "engine died"}})
    res = _send(_cfg(), _raw(_sse(*tokens[:2], error)))
    assert not res.ok and "engine died" in (res.error or "")
    res = _send(_cfg(), _raw(_sse(*tokens[:2])))
    assert not res.ok and "without a done event" in (res.error or "")


def test_connection_errors_and_timeouts_are_failures_not_crashes() -> None:
    refused = _cfg(endpoint="generate", base_url=f"http://127.0.0.1:{_free_port()}")
    plan = load.RequestPlan(0, 0, ("hi",), (None,))

    async def go() -> load.RequestResult:
        async with runner._client(refused, max_connections=1) as client:
            return await load.send(client, refused, plan, run_t0=0.0)

    res = asyncio.run(go())
    assert not res.ok and res.error is not None and res.error.startswith("ClientConnectorError")

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.json_response({})

    res = _send(_cfg(endpoint="generate", timeout_s=0.05), slow)
    assert not res.ok and res.error == "timeout after 0.05 s"
    res = _send(_cfg(endpoint="generate"), _raw(b"not json"))
    assert not res.ok and res.error is not None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("mode", ["closed", "open"])
def test_a_run_spread_over_processes_sends_every_request_once(mode: str) -> None:
    """Two spawned load processes share the users (or arrivals) and start on one clock."""
    seen: list[int] = []

    async def generate(request: web.Request) -> web.Response:
        body = await request.json()
        seen.append(len(body["prompt"]))
        await asyncio.sleep(0.01)
        return web.json_response({"generated_text": "x", "finish_reason": "length", "usage": _usage(2)})

    async def go() -> load.RunResult:
        app = web.Application()
        app.router.add_post("/generate", generate)
        async with TestServer(app, host="127.0.0.1") as server:
            shape = {"users": 4, "requests_per_user": 3} if mode == "closed" else {"rate": 40.0, "duration_s": 0.5}
            cfg = _cfg(
                endpoint="generate",
                mode=mode,
                base_url=str(server.make_url("")).rstrip("/"),
                processes=2,
                warmup=1,
                think_time_s=0.0,
                timeout_s=10.0,
                **shape,
            )
            return await load.execute(cfg, ["a prompt"])

    run = asyncio.run(go())
    planned = 12 if mode == "closed" else len(load.poisson_arrivals(40.0, 0.5, 0))
    assert [r.index for r in run.results] == list(range(planned))  # each planned request once, merged
    assert all(r.ok for r in run.results) and len(seen) == planned + 2  # + one warm-up per process
    assert run.wall_s >= max(r.start_s + (r.latency_s or 0) for r in run.results) - 1e-6
    assert min(r.start_s for r in run.results) >= 0.0
