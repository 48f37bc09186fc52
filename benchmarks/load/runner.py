"""Running a configuration: closed loop (users with think time) or open loop (Poisson arrivals)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx

from benchmarks.load.client import RequestResult, send
from benchmarks.load.scenarios import BATCH_SIZE, RequestPlan, RunConfig, closed_loop_plans, open_loop_plans


@dataclass
class RunResult:
    """The results of one run plus the run-level measurements."""

    config: RunConfig
    results: list[RequestResult]
    wall_s: float
    max_in_flight: int
    warmup_errors: list[str] = field(default_factory=list)


def _client(cfg: RunConfig, max_connections: int | None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    return httpx.AsyncClient(
        base_url=cfg.base_url,
        headers=headers,
        timeout=httpx.Timeout(cfg.timeout_s),
        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
    )


async def _warmup(client: httpx.AsyncClient, cfg: RunConfig) -> list[str]:
    errors = []
    for i in range(cfg.warmup):
        n = BATCH_SIZE if cfg.endpoint == "batch" else 1
        plan = RequestPlan(-1 - i, -1, (f"Warm-up request {i}.",) * n, (None,) * n)
        res = await send(client, cfg, plan, time.perf_counter())
        if not res.ok:
            errors.append(res.error or "unknown error")
    return errors


async def run_closed_loop(cfg: RunConfig, prompts: Sequence[str]) -> RunResult:
    """`cfg.users` concurrent users, each sending its requests in order with `think_time_s` between them."""
    plans = closed_loop_plans(cfg, prompts)
    results: list[RequestResult] = []
    in_flight = max_in_flight = 0
    async with _client(cfg, max_connections=max(cfg.users, 1)) as client:
        warm = await _warmup(client, cfg)
        t0 = time.perf_counter()

        async def user(mine: list[RequestPlan]) -> None:
            nonlocal in_flight, max_in_flight
            for k, plan in enumerate(mine):
                if k:
                    await asyncio.sleep(cfg.think_time_s)
                in_flight += 1
                max_in_flight = max(max_in_flight, in_flight)
                results.append(await send(client, cfg, plan, t0))
                in_flight -= 1

        await asyncio.gather(*(user(mine) for mine in plans))
        wall = time.perf_counter() - t0
    results.sort(key=lambda r: r.index)
    return RunResult(cfg, results, wall, max_in_flight, warm)


async def run_open_loop(cfg: RunConfig, prompts: Sequence[str]) -> RunResult:
    """Start each planned request at its Poisson arrival time, without waiting for earlier ones."""
    plans = open_loop_plans(cfg, prompts)
    in_flight = max_in_flight = 0
    async with _client(cfg, max_connections=None) as client:
        warm = await _warmup(client, cfg)
        t0 = time.perf_counter()

        async def one(plan: RequestPlan) -> RequestResult:
            nonlocal in_flight, max_in_flight
            in_flight += 1
            max_in_flight = max(max_in_flight, in_flight)
            try:
                return await send(client, cfg, plan, t0)
            finally:
                in_flight -= 1

        tasks = []
        for plan in plans:
            assert plan.scheduled_s is not None
            delay = t0 + plan.scheduled_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(plan)))
        results = list(await asyncio.gather(*tasks))
        wall = time.perf_counter() - t0
    return RunResult(cfg, results, wall, max_in_flight, warm)


async def execute(cfg: RunConfig, prompts: Sequence[str]) -> RunResult:
    """Run one configuration (closed or open loop)."""
    if cfg.mode == "open":
        return await run_open_loop(cfg, prompts)
    return await run_closed_loop(cfg, prompts)
