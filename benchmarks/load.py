"""Load generator for the gateway: `python -m benchmarks.load --help`.

Closed loop (`--scenario light|medium|heavy|all`, or `--concurrency N --requests M`): N simulated users,
each sends M requests one after another and pauses `--think-time-s` (0.1 s) between its own requests.
Open loop (`--rate R --duration-s D`): requests start at Poisson arrival times (rate R per second) for
D seconds whatever the server's progress, so queueing shows up in latency instead of being hidden by
users who wait for their previous answer.

Contracts:
- A request never raises into the run: HTTP errors, `event: error`, malformed bodies, connection errors and
  the per-request `--timeout-s` all become a failed `RequestResult` with `error` set.
- Latency is end-to-end on the client (request sent -> last byte / `done` event). For the stream
  endpoint TTFT is the time to the first `token` event and ITLs are the gaps between consecutive
  `token` events as the client sees them (a proxy that buffers makes them 0 ms and TTFT large).
- Latency/TTFT/ITL statistics use successful requests only; failures are counted in the success rate.
- "req/s" is successful requests per second of wall time; "gen tok/s" is the completion tokens reported
  by the server (`usage.completion_tokens`; for the stream endpoint the `done` event's usage, or the
  number of `token` events when usage is missing) of successful requests over the wall time.
- Wall time runs from the first request's start to the last request's end (warm-up excluded).
- Batch endpoint: one request = one HTTP call carrying BATCH_SIZE (4) prompts; it succeeds only if every
  item does (an item succeeds when its `error` is null and `generated_text` is a string). req/s counts
  HTTP calls; prompts/s (details) counts successful items.
- The gateway's result cache answers seeded (`--seeded`) or greedy (`--temperature 0`) requests it has seen:
  rerunning with the same `--seed` can hit it. Hits the gateway reports (`cached`, `cache_hits`) are recorded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import sys
import time
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import httpx

from benchmarks.report import (
    Distribution,
    RunInfo,
    fmt,
    fmt_pct,
    markdown_table,
    ratio,
    to_jsonable,
    write_outputs,
)

DEFAULT_BASE_URL = "http://127.0.0.1:8080"
THINK_TIME_S = 0.1
BATCH_SIZE = 4  # prompts per /generate/batch request
ENDPOINTS = {"generate": "/generate", "stream": "/generate/stream", "batch": "/generate/batch"}


@dataclass(frozen=True)
class Scenario:
    """A closed-loop scenario of the seed article: `users` x `requests_per_user`, `max_new_tokens` each."""

    name: str
    users: int
    requests_per_user: int
    max_new_tokens: int


SCENARIOS: dict[str, Scenario] = {
    "light": Scenario("light", users=5, requests_per_user=10, max_new_tokens=50),
    "medium": Scenario("medium", users=15, requests_per_user=10, max_new_tokens=100),
    "heavy": Scenario("heavy", users=30, requests_per_user=5, max_new_tokens=200),
}


@dataclass(frozen=True)
class SeedRow:
    """One row of the seed article's published results (hardware unknown)."""

    endpoint: str
    success_rate: float
    mean_s: float
    p95_s: float
    requests_per_s: float


SEED_ARTICLE: dict[str, SeedRow] = {
    "/generate/robust": SeedRow("/generate/robust", 0.992, 1.234, 2.156, 24.3),
    "/generate/secure": SeedRow("/generate/secure", 0.987, 1.387, 2.245, 21.8),
    "/generate/batch": SeedRow("/generate/batch", 0.998, 0.892, 1.432, 33.7),
}

# Deterministic prompt pool: varied English and Japanese. Order matters (the --seed picks by index).
PROMPTS: tuple[str, ...] = (
    "The history of the printing press begins",
    "Once upon a time, in a small village by the sea,",
    "Write a short product description for a waterproof hiking backpack:",
    "The three most important things to know about photosynthesis are",
    "In today's news, scientists announced",
    "def fibonacci(n):",
    "Dear hiring manager, I am writing to apply for",
    "The recipe calls for two cups of flour, one egg, and",
    "Explain to a ten-year-old why the sky is blue.",
    "The stock market opened lower on Monday as investors",
    "Here is a haiku about autumn leaves:",
    "Q: What is the capital of Australia?\nA:",
    "The old lighthouse keeper climbed the stairs one last time and",
    "Summary of the meeting: the team agreed to",
    "昔々、ある山奥の村に",
    "今日の東京の天気は",
    "人工知能の未来について考えると、",
    "このレストランのおすすめ料理は",
    "日本の四季の中で一番好きなのは",
    "新しいスマートフォンの特徴を説明します。まず、",
    "吾輩は猫である。名前はまだ無い。",
    "東京から大阪まで新幹線で行くと、",
)

# Words that are a single GPT-2 BPE token each when preceded by a space; used to pad prompts.
_FILLER = (
    "the of and to in is was for on that with as it by at from this be are or an not but have had one "
    "all were we when there can more if will so about out up into time some could them other than then "
    "now only its over new also after two most made way may first well water long little very"
)
_PIECE = re.compile(r"[A-Za-z]+|\d|\s+|[^\sA-Za-z\d]")


def estimate_tokens(text: str) -> int:
    """Rough GPT-2 BPE token count without a tokenizer: one per ASCII word/digit/symbol, two per non-ASCII char.

    Only used to size prompts for `--prompt-tokens` when no `--tokenizer` is given; the count the server
    reports (`usage.prompt_tokens`) is what gets recorded.
    """
    count = 0
    for piece in _PIECE.findall(text):
        if piece.isspace():
            continue
        count += 2 * len(piece) if not piece.isascii() else 1
    return count


def _longest_prefix(text: str, limit: int, counter: Any) -> str:
    """The longest prefix of `text` (at least one character) with at most `limit` tokens."""
    lo, hi = 1, len(text)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if counter(text[:mid]) <= limit:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo]


def fit_prompt(prompt: str, target_tokens: int, count_tokens: Any = None) -> str:
    """`prompt` truncated, or padded with common English words, to about `target_tokens` tokens.

    `count_tokens(text) -> int` is the exact counter if given (a tokenizer), else `estimate_tokens`.
    The result never has more than `target_tokens` tokens by that counter (unless one character alone
    does) and usually has exactly that many. Deterministic.
    """
    counter = count_tokens or estimate_tokens
    if target_tokens <= 0:
        raise ValueError("target_tokens must be positive")
    if counter(prompt) > target_tokens:
        return _longest_prefix(prompt, target_tokens, counter)
    words = _FILLER.split()
    text = prompt
    i = 0
    while counter(text) < target_tokens:
        text += " " + words[i % len(words)]
        i += 1
    return text if counter(text) == target_tokens else _longest_prefix(text, target_tokens, counter)


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters sent with every request."""

    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 0


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines one run. `api_key` is never written to reports."""

    name: str
    endpoint: str  # generate | stream | batch
    mode: str  # closed | open
    base_url: str
    max_new_tokens: int
    sampling: Sampling
    seed: int
    seeded: bool
    timeout_s: float
    users: int = 0  # closed loop
    requests_per_user: int = 0  # closed loop
    think_time_s: float = THINK_TIME_S  # closed loop
    rate: float = 0.0  # open loop, requests per second
    duration_s: float = 0.0  # open loop
    prompt_tokens: int | None = None
    scenario: str | None = None  # light|medium|heavy when run as a named scenario
    modified: bool = False  # the named scenario's sizes were overridden by flags
    warmup: int = 1
    api_key: str | None = field(default=None, repr=False)

    def public(self) -> dict[str, Any]:
        """Parameters for reports (no secret; `api_key` becomes a boolean)."""
        d = to_jsonable(self)
        d.pop("api_key", None)
        d["auth"] = self.api_key is not None
        return d


@dataclass(frozen=True)
class RequestPlan:
    """One HTTP request to send. `prompts` has 1 entry, or BATCH_SIZE for the batch endpoint."""

    index: int
    user: int  # closed loop user id; -1 in open loop
    prompts: tuple[str, ...]
    seeds: tuple[int | None, ...]
    scheduled_s: float | None = None  # open loop: arrival offset from the run start


@dataclass
class RequestResult:
    """What happened to one request. Times are seconds; `start_s` is relative to the run start."""

    index: int
    user: int
    endpoint: str
    ok: bool = False
    status: int | None = None
    error: str | None = None
    start_s: float = 0.0
    latency_s: float | None = None
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    prompt_tokens: int | None = None
    finish_reason: str | None = None
    items: int = 1
    items_ok: int = 0
    cache_hits: int | None = None  # items served from the gateway's result cache ("cached" / "cache_hits")
    server_ttft_s: float | None = None  # /generate only: the gateway's own timings
    server_total_s: float | None = None
    scheduled_s: float | None = None
    dispatch_lag_s: float | None = None

    def row(self) -> dict[str, Any]:
        """One CSV row (times in seconds, ITLs as a JSON list of milliseconds)."""
        return {
            "index": self.index,
            "user": self.user,
            "endpoint": self.endpoint,
            "ok": int(self.ok),
            "status": self.status,
            "error": self.error,
            "start_s": round(self.start_s, 6),
            "latency_s": None if self.latency_s is None else round(self.latency_s, 6),
            "ttft_s": None if self.ttft_s is None else round(self.ttft_s, 6),
            "n_itl": len(self.itl_s),
            "itl_ms": [round(x * 1000, 3) for x in self.itl_s],
            "completion_tokens": self.completion_tokens,
            "prompt_tokens": self.prompt_tokens,
            "finish_reason": self.finish_reason,
            "items": self.items,
            "items_ok": self.items_ok,
            "cache_hits": self.cache_hits,
            "server_ttft_s": self.server_ttft_s,
            "server_total_s": self.server_total_s,
            "scheduled_s": None if self.scheduled_s is None else round(self.scheduled_s, 6),
            "dispatch_lag_s": None if self.dispatch_lag_s is None else round(self.dispatch_lag_s, 6),
        }


CSV_FIELDS = list(RequestResult(0, 0, "").row())


# ---------------------------------------------------------------------------------------------- SSE


@dataclass(frozen=True)
class SSEEvent:
    """One server-sent event: `event` defaults to "message"; `data` is the joined data lines."""

    event: str
    data: str


class SSEParser:
    """Incremental Server-Sent Events parser fed one line at a time (without the line terminator).

    `feed` returns the completed event when a blank line ends one, else None; `flush` returns a
    trailing event the stream ended without a blank line after. Comments (":...") and fields other
    than `event`/`data` are ignored, per the SSE spec.
    """

    def __init__(self) -> None:
        self._event = ""
        self._data: list[str] = []

    def feed(self, line: str) -> SSEEvent | None:
        """Consume one line; return an event when it completes one."""
        if line == "":
            return self.flush()
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        return None

    def flush(self) -> SSEEvent | None:
        """The pending event, if any field was seen since the last one; resets the parser."""
        if not self._data and not self._event:
            return None
        event = SSEEvent(self._event or "message", "\n".join(self._data))
        self._event, self._data = "", []
        return event


async def sse_events(lines: AsyncIterator[str]) -> AsyncGenerator[SSEEvent, None]:
    """The events of an SSE line stream, including a final one not followed by a blank line."""
    parser = SSEParser()
    async for line in lines:
        event = parser.feed(line)
        if event is not None:
            yield event
    tail = parser.flush()
    if tail is not None:
        yield tail


# ------------------------------------------------------------------------------------------ requests


def request_body(prompt: str, max_new_tokens: int, sampling: Sampling, seed: int | None) -> dict[str, Any]:
    """The JSON body of /generate and /generate/stream (and one item of /generate/batch)."""
    return {
        "prompt": prompt,
        "max_new_tokens": max_new_tokens,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": sampling.top_k,
        "seed": seed,
    }


def _tokens_from(payload: Any) -> tuple[int, int | None]:
    """(completion_tokens, prompt_tokens) from a generate response or a batch result."""
    usage = payload.get("usage") if isinstance(payload, dict) else None
    usage = usage if isinstance(usage, dict) else {}
    completion = usage.get("completion_tokens", payload.get("completion_tokens", 0) if isinstance(payload, dict) else 0)
    prompt = usage.get("prompt_tokens")
    return int(completion or 0), (int(prompt) if prompt is not None else None)


def _cached(payload: Any) -> int | None:
    """1/0 from a response's boolean "cached" field, None when the gateway does not say."""
    value = payload.get("cached") if isinstance(payload, dict) else None
    return int(value) if isinstance(value, bool) else None


def _float_or_none(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _error_text(status: int, body: bytes) -> str:
    text = body.decode("utf-8", errors="replace").strip().replace("\n", " ")
    return f"HTTP {status}: {text[:200]}"


async def _post_json(client: httpx.AsyncClient, path: str, body: Any, res: RequestResult) -> Any:
    """POST, record latency and status; the decoded body on 200, else None with `res.error` set."""
    t0 = time.perf_counter()
    resp = await client.post(path, json=body)
    res.latency_s = time.perf_counter() - t0
    res.status = resp.status_code
    if resp.status_code != 200:
        res.error = _error_text(resp.status_code, resp.content)
        return None
    return resp.json()


async def _do_generate(client: httpx.AsyncClient, cfg: RunConfig, plan: RequestPlan, res: RequestResult) -> None:
    body = request_body(plan.prompts[0], cfg.max_new_tokens, cfg.sampling, plan.seeds[0])
    payload = await _post_json(client, ENDPOINTS["generate"], body, res)
    if res.error is not None:
        return
    if not isinstance(payload, dict) or "generated_text" not in payload:
        res.error = "malformed response: no generated_text"
        return
    res.completion_tokens, res.prompt_tokens = _tokens_from(payload)
    res.finish_reason = payload.get("finish_reason")
    res.cache_hits = _cached(payload)
    timings = payload.get("timings")
    if isinstance(timings, dict):
        res.server_ttft_s = _float_or_none(timings.get("time_to_first_token_s"))
        res.server_total_s = _float_or_none(timings.get("total_s"))
    res.ok, res.items_ok = True, 1


async def _do_batch(client: httpx.AsyncClient, cfg: RunConfig, plan: RequestPlan, res: RequestResult) -> None:
    items = [
        request_body(p, cfg.max_new_tokens, cfg.sampling, s) for p, s in zip(plan.prompts, plan.seeds, strict=True)
    ]
    res.items = len(items)
    payload = await _post_json(client, ENDPOINTS["batch"], {"requests": items}, res)
    if res.error is not None:
        return
    results = payload.get("results") if isinstance(payload, dict) else None
    if not isinstance(results, list):
        res.error = "malformed response: no results list"
        return
    res.cache_hits = payload.get("cache_hits")
    prompt_total = 0
    for item in results:
        if isinstance(item, dict) and item.get("error") is None and isinstance(item.get("generated_text"), str):
            res.items_ok += 1
            completion, prompt = _tokens_from(item)
            res.completion_tokens += completion
            prompt_total += prompt or 0
    res.prompt_tokens = prompt_total or None
    if len(results) != len(items):
        res.error = f"batch returned {len(results)} results for {len(items)} requests"
    elif res.items_ok != len(items):
        res.error = f"batch: {len(items) - res.items_ok} of {len(items)} items failed"
    else:
        res.ok = True


async def _do_stream(client: httpx.AsyncClient, cfg: RunConfig, plan: RequestPlan, res: RequestResult) -> None:
    body = request_body(plan.prompts[0], cfg.max_new_tokens, cfg.sampling, plan.seeds[0])
    tokens = 0
    last_token_t: float | None = None
    done: dict[str, Any] | None = None
    t0 = time.perf_counter()
    async with client.stream("POST", ENDPOINTS["stream"], json=body) as resp:
        res.status = resp.status_code
        if resp.status_code != 200:
            res.error = _error_text(resp.status_code, await resp.aread())
            res.latency_s = time.perf_counter() - t0
            return
        async with aclosing(sse_events(resp.aiter_lines())) as events:
            async for event in events:
                now = time.perf_counter()
                if event.event == "token":
                    tokens += 1
                    if last_token_t is None:
                        res.ttft_s = now - t0
                    else:
                        res.itl_s.append(now - last_token_t)
                    last_token_t = now
                elif event.event == "done":
                    res.latency_s = now - t0
                    done = json.loads(event.data) if event.data else {}
                    break
                elif event.event == "error":
                    res.latency_s = now - t0
                    res.error = f"error event: {event.data[:200]}"
                    return
    if done is None:
        res.latency_s = time.perf_counter() - t0
        res.error = f"stream ended without a done event after {tokens} tokens"
        return
    completion, res.prompt_tokens = _tokens_from(done)
    res.completion_tokens = completion or tokens
    res.finish_reason = done.get("finish_reason") if isinstance(done, dict) else None
    res.cache_hits = _cached(done)
    res.ok, res.items_ok = True, 1


_HANDLERS = {"generate": _do_generate, "stream": _do_stream, "batch": _do_batch}


async def send(client: httpx.AsyncClient, cfg: RunConfig, plan: RequestPlan, run_t0: float) -> RequestResult:
    """Send one planned request and return its result. Never raises (except on cancellation)."""
    res = RequestResult(plan.index, plan.user, cfg.endpoint, items=len(plan.prompts), scheduled_s=plan.scheduled_s)
    start = time.perf_counter()
    res.start_s = start - run_t0
    if plan.scheduled_s is not None:
        res.dispatch_lag_s = max(0.0, res.start_s - plan.scheduled_s)
    try:
        async with asyncio.timeout(cfg.timeout_s):
            await _HANDLERS[cfg.endpoint](client, cfg, plan, res)
    except TimeoutError:
        res.ok, res.error = False, f"timeout after {cfg.timeout_s:g} s"
    except httpx.HTTPError as err:
        res.ok, res.error = False, f"{type(err).__name__}: {str(err)[:200] or 'connection error'}"
    except Exception as err:  # malformed JSON or an unexpected shape: a failed request, not a crashed run
        res.ok, res.error = False, f"{type(err).__name__}: {str(err)[:200]}"
    if res.latency_s is None or not res.ok:
        res.latency_s = time.perf_counter() - start
    return res


# ------------------------------------------------------------------------------------------- planning


def make_plan(
    index: int, user: int, rng: random.Random, cfg: RunConfig, prompts: Sequence[str], scheduled_s: float | None = None
) -> RequestPlan:
    """One request: random prompt(s) and seed(s) from `rng` (seeds drawn even when unused, so --seeded
    does not change which prompts are picked)."""
    n = BATCH_SIZE if cfg.endpoint == "batch" else 1
    chosen = tuple(rng.choice(prompts) for _ in range(n))
    seeds = tuple(rng.randrange(2**31) for _ in range(n))
    return RequestPlan(index, user, chosen, seeds if cfg.seeded else (None,) * n, scheduled_s)


def closed_loop_plans(cfg: RunConfig, prompts: Sequence[str]) -> list[list[RequestPlan]]:
    """Per user, the list of requests it sends in order. Deterministic in `cfg.seed`."""
    rng = random.Random(cfg.seed)
    plans: list[list[RequestPlan]] = []
    index = 0
    for user in range(cfg.users):
        mine = []
        for _ in range(cfg.requests_per_user):
            mine.append(make_plan(index, user, rng, cfg, prompts))
            index += 1
        plans.append(mine)
    return plans


def poisson_arrivals(rate: float, duration_s: float, seed: int) -> list[float]:
    """Arrival offsets (seconds) of a Poisson process of `rate` per second within [0, duration_s)."""
    if rate <= 0 or duration_s <= 0:
        raise ValueError("rate and duration must be positive")
    rng = random.Random(seed * 2 + 1)
    times: list[float] = []
    t = rng.expovariate(rate)
    while t < duration_s:
        times.append(t)
        t += rng.expovariate(rate)
    return times


def open_loop_plans(cfg: RunConfig, prompts: Sequence[str]) -> list[RequestPlan]:
    """Requests with their scheduled arrival offsets. Deterministic in `cfg.seed`."""
    rng = random.Random(cfg.seed)
    arrivals = poisson_arrivals(cfg.rate, cfg.duration_s, cfg.seed)
    return [make_plan(i, -1, rng, cfg, prompts, scheduled_s=t) for i, t in enumerate(arrivals)]


def prompt_pool(prompt_tokens: int | None, tokenizer: str | None = None) -> list[str]:
    """PROMPTS, each fitted to `prompt_tokens` tokens when given (exactly with `tokenizer`, else estimated)."""
    if prompt_tokens is None:
        return list(PROMPTS)
    counter = None
    if tokenizer:
        from transformers import AutoTokenizer  # heavy import only when asked for

        tok = AutoTokenizer.from_pretrained(tokenizer)

        def counter(text: str) -> int:
            return len(tok(text)["input_ids"])

    return [fit_prompt(p, prompt_tokens, counter) for p in PROMPTS]


# -------------------------------------------------------------------------------------------- running


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


# ------------------------------------------------------------------------------------------ reporting


@dataclass(frozen=True)
class LoadSummary:
    """Run-level numbers. Distributions are in seconds and cover successful requests only."""

    name: str
    endpoint: str
    mode: str
    scenario: str | None
    modified: bool
    requests: int
    ok: int
    failed: int
    success_rate: float | None
    items: int
    items_ok: int
    wall_s: float
    requests_per_s: float | None  # successful requests / wall
    attempted_per_s: float | None  # all requests / wall
    items_per_s: float | None  # successful prompts / wall (a failed batch's good items count here)
    generated_tokens: int
    tokens_per_s: float | None
    cache_hits: int | None  # prompts the gateway answered from its result cache; None if it never said
    prompt_tokens_mean: float | None
    latency: Distribution
    ttft: Distribution
    itl: Distribution
    dispatch_lag: Distribution
    offered_rate: float | None
    max_in_flight: int
    errors: dict[str, int]
    warmup_errors: list[str]


def _error_kind(error: str) -> str:
    """Errors grouped for the summary: the HTTP status kept, other numbers replaced by N, cut to 120 chars."""
    status = re.match(r"HTTP \d+: ", error)
    head = status.group(0) if status else ""
    return (head + re.sub(r"\d+(\.\d+)?", "N", error[len(head) :]))[:120]


def _sum_known(values: Iterable[int | None]) -> int | None:
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def summarize(run: RunResult) -> LoadSummary:
    """Aggregate a run's request results (pure; empty runs give None statistics, never 0)."""
    cfg, results = run.config, run.results
    ok = [r for r in results if r.ok]
    wall = run.wall_s if run.wall_s > 0 else None
    tokens = sum(r.completion_tokens for r in ok)
    prompt_counts = [r.prompt_tokens / max(r.items, 1) for r in ok if r.prompt_tokens is not None]
    return LoadSummary(
        name=cfg.name,
        endpoint=cfg.endpoint,
        mode=cfg.mode,
        scenario=cfg.scenario,
        modified=cfg.modified,
        requests=len(results),
        ok=len(ok),
        failed=len(results) - len(ok),
        success_rate=len(ok) / len(results) if results else None,
        items=sum(r.items for r in results),
        items_ok=sum(r.items_ok for r in results),
        wall_s=run.wall_s,
        requests_per_s=ratio(len(ok), wall),
        attempted_per_s=ratio(len(results), wall),
        items_per_s=ratio(sum(r.items_ok for r in results), wall),
        generated_tokens=tokens,
        tokens_per_s=ratio(tokens, wall),
        cache_hits=_sum_known(r.cache_hits for r in ok),
        prompt_tokens_mean=sum(prompt_counts) / len(prompt_counts) if prompt_counts else None,
        latency=Distribution.of(r.latency_s for r in ok if r.latency_s is not None),
        ttft=Distribution.of(r.ttft_s for r in ok if r.ttft_s is not None),
        itl=Distribution.of(x for r in ok for x in r.itl_s),
        dispatch_lag=Distribution.of(r.dispatch_lag_s for r in results if r.dispatch_lag_s is not None),
        offered_rate=ratio(len(results), cfg.duration_s) if cfg.mode == "open" else None,
        max_in_flight=run.max_in_flight,
        errors=dict(Counter(_error_kind(r.error) for r in results if r.error).most_common(10)),
        warmup_errors=run.warmup_errors,
    )


def _shape(cfg: RunConfig) -> str:
    if cfg.mode == "open":
        return f"open {cfg.rate:g} req/s x {cfg.duration_s:g} s"
    return f"closed {cfg.users}x{cfg.requests_per_user}"


SUMMARY_HEADERS = [
    "run",
    "endpoint",
    "load",
    "max new",
    "requests",
    "success",
    "mean s",
    "p50 s",
    "p95 s",
    "p99 s",
    "req/s",
    "gen tok/s",
    "TTFT p50 ms",
    "TTFT p95 ms",
    "ITL p50 ms",
    "ITL p95 ms",
    "ITL p99 ms",
]


def summary_table(runs: Sequence[tuple[RunConfig, LoadSummary]]) -> str:
    """The main markdown table, one row per run. Missing statistics render as "n/a"."""
    rows = []
    for cfg, s in runs:
        rows.append(
            [
                s.name,
                ENDPOINTS[s.endpoint],
                _shape(cfg),
                cfg.max_new_tokens,
                s.requests,
                fmt_pct(s.success_rate),
                fmt(s.latency.mean),
                fmt(s.latency.p50),
                fmt(s.latency.p95),
                fmt(s.latency.p99),
                fmt(s.requests_per_s, 2),
                fmt(s.tokens_per_s, 1),
                fmt(s.ttft.p50, 1, 1000),
                fmt(s.ttft.p95, 1, 1000),
                fmt(s.itl.p50, 2, 1000),
                fmt(s.itl.p95, 2, 1000),
                fmt(s.itl.p99, 2, 1000),
            ]
        )
    return markdown_table(SUMMARY_HEADERS, rows)


def seed_row_for(endpoint: str, auth: bool) -> SeedRow:
    """The seed article's row our endpoint is compared with: batch -> /generate/batch; generate and stream ->
    /generate/secure with an API key, /generate/robust without."""
    if endpoint == "batch":
        return SEED_ARTICLE["/generate/batch"]
    return SEED_ARTICLE["/generate/secure" if auth else "/generate/robust"]


COMPARISON_HEADERS = [
    "scenario",
    "ours",
    "seed",
    "success ours / seed",
    "mean s ours / seed",
    "p95 s ours / seed",
    "req/s ours / seed",
    "mean latency ratio ours÷seed",
]


def comparison_table(runs: Sequence[tuple[RunConfig, LoadSummary]]) -> str | None:
    """Our named-scenario runs next to the seed article's table; None if no run is a named scenario.

    The scenario, endpoint and auth come from each run's config; the numbers from its summary.
    """
    rows = []
    for cfg, s in runs:
        if cfg.scenario is None:
            continue
        seed = seed_row_for(cfg.endpoint, cfg.api_key is not None)
        label = cfg.scenario + (" (modified)" if cfg.modified else "")
        rows.append(
            [
                label,
                ENDPOINTS[s.endpoint],
                seed.endpoint,
                f"{fmt_pct(s.success_rate)} / {fmt_pct(seed.success_rate)}",
                f"{fmt(s.latency.mean)} / {seed.mean_s:.3f}",
                f"{fmt(s.latency.p95)} / {seed.p95_s:.3f}",
                f"{fmt(s.requests_per_s, 1)} / {seed.requests_per_s:.1f}",
                fmt(ratio(s.latency.mean, seed.mean_s), 2),
            ]
        )
    if not rows:
        return None
    note = (
        "\nSeed numbers are the seed article's published table (hardware and scenario unknown). "
        "Ratio < 1 means our mean latency is lower. The stream endpoint is compared on end-to-end latency "
        "with the seed's non-streaming endpoint.\n"
    )
    return markdown_table(COMPARISON_HEADERS, rows) + note


def render_markdown(runs: Sequence[tuple[RunConfig, LoadSummary]], info: RunInfo, title: str) -> str:
    """The full markdown report: results, comparison with the seed article, details, provenance."""
    parts = [f"## {title}\n", summary_table(runs)]
    parts.append(
        "\nLatencies are end-to-end on the client over successful requests; req/s = successful requests / wall "
        "time; gen tok/s = completion tokens of successful requests / wall time. TTFT/ITL only for the stream "
        "endpoint.\n"
    )
    comparison = comparison_table(runs)
    if comparison:
        parts += ["\n### Compared with the seed article\n", comparison]
    parts.append("\n### Details\n")
    for cfg, s in runs:
        line = (
            f"- **{s.name}**: {s.ok}/{s.requests} ok, wall {s.wall_s:.2f} s, "
            f"{s.items_ok}/{s.items} prompts ok ({fmt(s.items_per_s, 2)} prompts/s), "
            f"{s.generated_tokens} tokens generated, mean prompt tokens {fmt(s.prompt_tokens_mean, 1)} "
            f"(server-reported), result-cache hits {fmt(s.cache_hits)}, max in flight {s.max_in_flight}"
        )
        if cfg.mode == "open":
            line += f", offered {fmt(s.offered_rate, 2)} req/s, dispatch lag p99 {fmt(s.dispatch_lag.p99, 1, 1000)} ms"
        parts.append(line + "\n")
        for kind, count in s.errors.items():
            parts.append(f"  - {count} x `{kind}`\n")
        if s.warmup_errors:
            parts.append(f"  - warm-up failed: `{s.warmup_errors[0][:120]}`\n")
    parts += ["\n### Provenance\n", info.markdown()]
    return "".join(parts)


# ------------------------------------------------------------------------------------------------ CLI


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.load",
        description="Load generator for the GPT-2 gateway (closed-loop scenarios or open-loop Poisson arrivals).",
    )
    p.add_argument("--base-url", default=DEFAULT_BASE_URL, help="gateway base URL (default %(default)s)")
    p.add_argument(
        "--endpoint", choices=list(ENDPOINTS), default="generate", help="route to load (default %(default)s)"
    )
    p.add_argument("--scenario", choices=[*SCENARIOS, "all"], help="a seed-article scenario (closed loop)")
    p.add_argument("--concurrency", type=int, help="closed loop: concurrent users (overrides the scenario's)")
    p.add_argument("--requests", type=int, help="closed loop: requests per user (overrides the scenario's)")
    p.add_argument("--max-new-tokens", type=int, help="tokens to generate per prompt (overrides the scenario's)")
    p.add_argument("--prompt-tokens", type=int, help="fit every prompt to about this many tokens")
    p.add_argument("--tokenizer", help="tokenizer path for exact --prompt-tokens (default: an estimate)")
    p.add_argument(
        "--think-time-s", type=float, default=THINK_TIME_S, help="closed loop pause between a user's requests"
    )
    p.add_argument("--rate", type=float, help="open loop: Poisson arrival rate, requests per second")
    p.add_argument("--duration-s", type=float, default=30.0, help="open loop: arrival window (default %(default)s)")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0, help="picks prompts (and per-request seeds); default %(default)s")
    p.add_argument("--seeded", action="store_true", help="send a per-request sampling seed (else seed: null)")
    p.add_argument("--timeout-s", type=float, default=120.0, help="per-request limit (default %(default)s)")
    p.add_argument("--warmup", type=int, default=1, help="untimed requests before each run (default %(default)s)")
    p.add_argument("--api-key", help="Bearer key (default: $BENCH_API_KEY if set)")
    p.add_argument("--out", help="directory for <name>.md/.csv/.json")
    p.add_argument("--tag", help="suffix for the run names / output files")
    return p


def configs_from_args(args: argparse.Namespace) -> list[RunConfig]:
    """Resolve the CLI into one RunConfig per run. Raises ValueError for an invalid combination."""
    for flag in ("concurrency", "requests", "max_new_tokens", "prompt_tokens", "warmup"):
        value = getattr(args, flag)
        if value is not None and value < (0 if flag == "warmup" else 1):
            raise ValueError(f"--{flag.replace('_', '-')} must be positive")
    if args.timeout_s <= 0:
        raise ValueError("--timeout-s must be positive")
    sampling = Sampling(args.temperature, args.top_p, args.top_k)
    api_key = args.api_key if args.api_key is not None else os.environ.get("BENCH_API_KEY") or None
    suffix = f"-{args.tag}" if args.tag else ""
    common: dict[str, Any] = {
        "endpoint": args.endpoint,
        "base_url": args.base_url.rstrip("/"),
        "sampling": sampling,
        "seed": args.seed,
        "seeded": args.seeded,
        "timeout_s": args.timeout_s,
        "prompt_tokens": args.prompt_tokens,
        "warmup": args.warmup,
        "api_key": api_key,
        "think_time_s": args.think_time_s,
    }
    if args.rate is not None:
        if args.scenario or args.concurrency or args.requests:
            raise ValueError("--rate (open loop) cannot be combined with --scenario/--concurrency/--requests")
        if args.rate <= 0 or args.duration_s <= 0:
            raise ValueError("--rate and --duration-s must be positive")
        tokens = args.max_new_tokens or SCENARIOS["light"].max_new_tokens
        name = f"open-{args.endpoint}-rate{args.rate:g}-d{args.duration_s:g}-t{tokens}{suffix}"
        return [
            RunConfig(
                name=name, mode="open", max_new_tokens=tokens, rate=args.rate, duration_s=args.duration_s, **common
            )
        ]
    if args.scenario:
        names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
        out = []
        for sname in names:
            sc = SCENARIOS[sname]
            modified = any(v is not None for v in (args.concurrency, args.requests, args.max_new_tokens))
            modified = modified or args.prompt_tokens is not None or args.think_time_s != THINK_TIME_S
            cfg = RunConfig(
                name=f"{sname}-{args.endpoint}{'-modified' if modified else ''}{suffix}",
                mode="closed",
                users=args.concurrency or sc.users,
                requests_per_user=args.requests or sc.requests_per_user,
                max_new_tokens=args.max_new_tokens or sc.max_new_tokens,
                scenario=sname,
                modified=modified,
                **common,
            )
            out.append(cfg)
        return out
    base = SCENARIOS["light"]
    users, reqs = args.concurrency or base.users, args.requests or base.requests_per_user
    tokens = args.max_new_tokens or base.max_new_tokens
    name = f"closed-{args.endpoint}-c{users}-r{reqs}-t{tokens}{suffix}"
    return [RunConfig(name=name, mode="closed", users=users, requests_per_user=reqs, max_new_tokens=tokens, **common)]


def _mask_secret(previous: str, arg: str) -> str:
    """Hide the value of --api-key in the recorded command line."""
    if previous == "--api-key":
        return "***"
    return "--api-key=***" if arg.startswith("--api-key=") else arg


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


async def _run_all(configs: Sequence[RunConfig], prompts: Sequence[str]) -> list[RunResult]:
    runs = []
    for cfg in configs:
        _log(f"[load] {cfg.name}: {_shape(cfg)}, max_new_tokens={cfg.max_new_tokens}, {cfg.base_url}")
        run = await execute(cfg, prompts)
        s = summarize(run)
        _log(f"[load] {cfg.name}: {s.ok}/{s.requests} ok in {run.wall_s:.2f} s")
        runs.append(run)
    return runs


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point. Returns 0 when the runs completed (whatever their success rate), 2 on bad arguments."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        configs = configs_from_args(args)
        prompts = prompt_pool(args.prompt_tokens, args.tokenizer)
    except (ValueError, OSError) as err:
        parser.error(str(err))
    runs = asyncio.run(_run_all(configs, prompts))
    pairs = [(run.config, summarize(run)) for run in runs]
    params = {"runs": [cfg.public() for cfg in configs], "tokenizer": args.tokenizer}
    cli = ["python -m benchmarks.load", *(sys.argv[1:] if argv is None else argv)]
    cli = [_mask_secret(prev, a) for prev, a in zip(["", *cli], cli, strict=False)]
    info = RunInfo.collect({k: v for k, v in vars(args).items() if k != "api_key"}, argv=cli)
    title = "Gateway load benchmark" if len(runs) > 1 else f"Gateway load benchmark: {runs[0].config.name}"
    combined = render_markdown(pairs, info, title)
    sys.stdout.write(combined)
    if args.out:
        written = []
        for run, (cfg, s) in zip(runs, pairs, strict=True):
            md = render_markdown([(cfg, s)], info, f"Gateway load benchmark: {cfg.name}")
            summary = {"summary": s, "run": info.to_dict(), "config": cfg.public()}
            written += write_outputs(args.out, cfg.name, md, [r.row() for r in run.results], summary, CSV_FIELDS)
        if len(runs) > 1:
            name = f"all-{args.endpoint}{'-' + args.tag if args.tag else ''}"
            rows = [{"run": run.config.name, **r.row()} for run in runs for r in run.results]
            summary = {"summaries": [s for _, s in pairs], "run": info.to_dict(), "parameters": params}
            written += write_outputs(args.out, name, combined, rows, summary, ["run", *CSV_FIELDS])
        _log("[load] wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
