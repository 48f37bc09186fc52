"""Running a configuration: closed loop (users with think time) or open loop (Poisson arrivals),
in one process or spread over `cfg.processes` load processes.

One Python process cannot parse the responses of hundreds of concurrent generations fast enough
to stay out of the measurement (at 512 streams on the H200 host the 2026-12-01 profile found the
gateway idle while requests waited in the client). With `processes > 1` the users (closed loop) or
arrivals (open loop) are dealt round-robin to spawned processes, each with its own event loop and
connection pool; they warm up, report ready, and start together at one instant the parent picks
(`time.perf_counter` is CLOCK_MONOTONIC on Linux, shared by every process), so `start_s` and the
wall time are on one clock.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

import aiohttp

from benchmarks.load.client import RequestResult, send
from benchmarks.load.scenarios import BATCH_SIZE, RequestPlan, RunConfig, closed_loop_plans, open_loop_plans

START_MARGIN_S = 0.2  # how far ahead of "everyone is ready" the parent sets the common start


@dataclass
class RunResult:
    """The results of one run plus the run-level measurements."""

    config: RunConfig
    results: list[RequestResult]
    wall_s: float
    max_in_flight: int
    warmup_errors: list[str] = field(default_factory=list)


@dataclass
class _Share:
    """What one load process measured (picklable: it crosses the process boundary)."""

    results: list[RequestResult]
    t0: float
    end: float
    max_in_flight: int
    warmup_errors: list[str]


def _client(cfg: RunConfig, max_connections: int | None) -> aiohttp.ClientSession:
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    return aiohttp.ClientSession(
        base_url=cfg.base_url,
        headers=headers,
        connector=aiohttp.TCPConnector(limit=max_connections or 0, force_close=False),
        timeout=aiohttp.ClientTimeout(total=None),  # `send` bounds each request with cfg.timeout_s
    )


async def _warmup(client: aiohttp.ClientSession, cfg: RunConfig) -> list[str]:
    errors = []
    for i in range(cfg.warmup):
        n = BATCH_SIZE if cfg.endpoint == "batch" else 1
        plan = RequestPlan(-1 - i, -1, (f"Warm-up request {i}.",) * n, (None,) * n)
        res = await send(client, cfg, plan, time.perf_counter())
        if not res.ok:
            errors.append(res.error or "unknown error")
    return errors


async def _start_now() -> float:
    return time.perf_counter()


async def _run_share(
    cfg: RunConfig, prompts: Sequence[str], part: int, parts: int, start: Callable[[], Awaitable[float]]
) -> _Share:
    """Warm up, wait for `start()` (the run's t0), then send this share of the run's requests."""
    closed = cfg.mode != "open"
    users = closed_loop_plans(cfg, prompts)[part::parts] if closed else []
    arrivals = [] if closed else open_loop_plans(cfg, prompts)[part::parts]
    results: list[RequestResult] = []
    in_flight = max_in_flight = 0
    async with _client(cfg, max_connections=max(len(users), 1) if closed else None) as client:
        warm = await _warmup(client, cfg)
        t0 = await start()
        await asyncio.sleep(max(0.0, t0 - time.perf_counter()))

        async def one(plan: RequestPlan) -> None:
            nonlocal in_flight, max_in_flight
            in_flight += 1
            max_in_flight = max(max_in_flight, in_flight)
            try:
                results.append(await send(client, cfg, plan, t0))
            finally:
                in_flight -= 1

        async def user(mine: list[RequestPlan]) -> None:
            for k, plan in enumerate(mine):
                if k:
                    await asyncio.sleep(cfg.think_time_s)
                await one(plan)

        if closed:
            await asyncio.gather(*(user(mine) for mine in users))
        else:
            tasks = []
            for plan in arrivals:
                assert plan.scheduled_s is not None
                delay = t0 + plan.scheduled_s - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(plan)))
            await asyncio.gather(*tasks)
        end = time.perf_counter()
    return _Share(results, t0, end, max_in_flight, warm)


def _share_process(cfg: RunConfig, prompts: Sequence[str], part: int, parts: int, conn: Connection) -> None:
    """A spawned load process: runs its share and sends it back over `conn`."""

    async def start() -> float:
        conn.send("ready")
        return float(await asyncio.get_running_loop().run_in_executor(None, conn.recv))

    try:
        share = asyncio.run(_run_share(cfg, prompts, part, parts, start))
        conn.send(share)
    finally:
        conn.close()


def _run_processes(cfg: RunConfig, prompts: Sequence[str], parts: int) -> list[_Share]:
    ctx = multiprocessing.get_context("spawn")  # no inherited event loop or sockets
    conns: list[Connection] = []
    procs = []
    for part in range(parts):
        mine, theirs = ctx.Pipe()
        proc = ctx.Process(target=_share_process, args=(cfg, list(prompts), part, parts, theirs), daemon=True)
        proc.start()
        theirs.close()
        conns.append(mine)
        procs.append(proc)
    try:
        for conn in conns:
            if conn.recv() != "ready":
                raise RuntimeError("a load process failed before it was ready")
        t0 = time.perf_counter() + START_MARGIN_S
        for conn in conns:
            conn.send(t0)
        shares = [conn.recv() for conn in conns]
    except EOFError as err:
        raise RuntimeError("a load process died; see its traceback above") from err
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
    return shares


async def execute(cfg: RunConfig, prompts: Sequence[str]) -> RunResult:
    """Run one configuration (closed or open loop), in `cfg.processes` load processes."""
    parts = max(1, min(cfg.processes, cfg.users if cfg.mode != "open" else cfg.processes))
    if parts == 1:
        shares = [await _run_share(cfg, prompts, 0, 1, _start_now)]
    else:
        shares = await asyncio.get_running_loop().run_in_executor(None, _run_processes, cfg, prompts, parts)
    t0 = min(s.t0 for s in shares)
    results = sorted((r for s in shares for r in s.results), key=lambda r: r.index)
    wall = max(s.end for s in shares) - t0
    # Each process's own peak, summed: an upper bound of the run's (the peaks need not coincide).
    max_in_flight = sum(s.max_in_flight for s in shares)
    return RunResult(cfg, results, wall, max_in_flight, [e for s in shares for e in s.warmup_errors])
