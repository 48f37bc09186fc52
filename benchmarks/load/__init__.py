"""Load generator for the gateway: `python -m benchmarks.load --help`.

    scenarios.py  named scenarios, prompts, run configurations and request plans
    sse.py        the server-sent-events parser
    client.py     one HTTP request (generate / stream / batch / completions) -> RequestResult
    steady.py     a closed-loop run's steady-state window and rate
    runner.py     closed loop and open loop runs -> RunResult
    summary.py    a run's numbers and the markdown report
    charts.py     PNG charts next to the markdown (latency CDF, TTFT/ITL histograms, tokens/s)
    cli.py        the command line (`main`)

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
- "steady tok/s" (closed loop, 2+ requests per user) is the tokens generated while every user was busy, from
  every user's first answer to the first user's last answer, over that window (steady.py): the figure without
  the ramp-up and the tail. The suite reports it for its 512-stream runs (6 requests per user).
- /v1/completions (`--endpoint completions`) is sent as OpenAI clients send it: `stream: true` with
  `stream_options.include_usage`; TTFT is the first chunk with text, ITLs the gaps between such chunks, the token
  count the usage chunk's. `--ignore-eos` asks for `max_tokens` every time (vLLM's extension).
- Wall time runs from the first request's start to the last request's end (warm-up excluded).
- Batch endpoint: one request = one HTTP call carrying BATCH_SIZE (4) prompts; it succeeds only if every
  item does (an item succeeds when its `error` is null and `generated_text` is a string). req/s counts
  HTTP calls; prompts/s (details) counts successful items.
- The gateway's result cache answers seeded (`--seeded`) or greedy (`--temperature 0`) requests it has seen:
  rerunning with the same `--seed` can hit it. Hits the gateway reports (`cached`, `cache_hits`) are recorded.
"""

from __future__ import annotations

from benchmarks.load.charts import CHARTS, Series, write_charts
from benchmarks.load.cli import build_parser, configs_from_args, main
from benchmarks.load.client import CSV_FIELDS, RequestResult, request_body, send
from benchmarks.load.runner import RunResult, execute
from benchmarks.load.scenarios import (
    BATCH_SIZE,
    DEFAULT_BASE_URL,
    ENDPOINTS,
    PROMPTS,
    SCENARIOS,
    SEED_ARTICLE,
    THINK_TIME_S,
    RequestPlan,
    RunConfig,
    Sampling,
    Scenario,
    SeedRow,
    closed_loop_plans,
    estimate_tokens,
    fit_prompt,
    make_plan,
    open_loop_plans,
    poisson_arrivals,
    prompt_pool,
)
from benchmarks.load.sse import SSEEvent, SSEParser, sse_events
from benchmarks.load.steady import SteadyState, steady_state, steady_window
from benchmarks.load.summary import (
    COMPARISON_HEADERS,
    SUMMARY_HEADERS,
    LoadSummary,
    comparison_table,
    render_markdown,
    run_shape,
    seed_row_for,
    summarize,
    summary_table,
)

__all__ = [
    "BATCH_SIZE",
    "CHARTS",
    "COMPARISON_HEADERS",
    "CSV_FIELDS",
    "DEFAULT_BASE_URL",
    "ENDPOINTS",
    "PROMPTS",
    "SCENARIOS",
    "SEED_ARTICLE",
    "SUMMARY_HEADERS",
    "THINK_TIME_S",
    "LoadSummary",
    "RequestPlan",
    "RequestResult",
    "RunConfig",
    "RunResult",
    "SSEEvent",
    "SSEParser",
    "Sampling",
    "Scenario",
    "SeedRow",
    "Series",
    "SteadyState",
    "build_parser",
    "closed_loop_plans",
    "comparison_table",
    "configs_from_args",
    "estimate_tokens",
    "execute",
    "fit_prompt",
    "main",
    "make_plan",
    "open_loop_plans",
    "poisson_arrivals",
    "prompt_pool",
    "render_markdown",
    "request_body",
    "run_shape",
    "seed_row_for",
    "send",
    "sse_events",
    "steady_state",
    "steady_window",
    "summarize",
    "summary_table",
    "write_charts",
]
