"""A run's numbers (pure) and the markdown report: summary table, seed-article comparison, details."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from benchmarks.load.runner import RunResult
from benchmarks.load.scenarios import ENDPOINTS, SEED_ARTICLE, RunConfig, SeedRow
from benchmarks.load.steady import SteadyState, steady_state
from benchmarks.report import (
    Distribution,
    RunInfo,
    fmt,
    fmt_pct,
    markdown_table,
    ratio,
)


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
    steady: SteadyState | None  # closed loop: the rate while every user was busy (steady.py)
    cache_hits: int | None  # prompts the gateway answered from its result cache; None if it never said
    prompt_tokens_mean: float | None
    latency: Distribution
    ttft: Distribution
    itl: Distribution
    # Time per output token of each streamed request: (latency - TTFT) / (tokens - 1). Equal to the
    # ITL when every chunk carries one token; the honest per-token figure when a server sends tokens
    # in bursts (several per chunk, or several chunks at once: decodes run ahead), where ITLs are
    # the gaps between chunks. transformers' ms/token is this.
    tpot: Distribution
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
        steady=steady_state(results) if cfg.mode != "open" else None,
        cache_hits=_sum_known(r.cache_hits for r in ok),
        prompt_tokens_mean=sum(prompt_counts) / len(prompt_counts) if prompt_counts else None,
        latency=Distribution.of(r.latency_s for r in ok if r.latency_s is not None),
        ttft=Distribution.of(r.ttft_s for r in ok if r.ttft_s is not None),
        itl=Distribution.of(x for r in ok for x in r.itl_s),
        tpot=Distribution.of(
            (r.latency_s - r.ttft_s) / (r.completion_tokens - 1)
            for r in ok
            if r.ttft_s is not None and r.latency_s is not None and r.completion_tokens > 1
        ),
        dispatch_lag=Distribution.of(r.dispatch_lag_s for r in results if r.dispatch_lag_s is not None),
        offered_rate=ratio(len(results), cfg.duration_s) if cfg.mode == "open" else None,
        max_in_flight=run.max_in_flight,
        errors=dict(Counter(_error_kind(r.error) for r in results if r.error).most_common(10)),
        warmup_errors=run.warmup_errors,
    )


def run_shape(cfg: RunConfig) -> str:
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
    "steady tok/s",
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
                run_shape(cfg),
                cfg.max_new_tokens,
                s.requests,
                fmt_pct(s.success_rate),
                fmt(s.latency.mean),
                fmt(s.latency.p50),
                fmt(s.latency.p95),
                fmt(s.latency.p99),
                fmt(s.requests_per_s, 2),
                fmt(s.tokens_per_s, 1),
                fmt(s.steady.tokens_per_s if s.steady else None, 1),
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
        "time; gen tok/s = completion tokens of successful requests / wall time; steady tok/s = the tokens generated "
        "while every user was busy (from every user's first answer to the first user's last answer) / that "
        "window (benchmarks/load/steady.py). TTFT/ITL only for the streamed endpoints.\n"
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
        if s.steady is not None:
            line += (
                f", steady window {s.steady.start_s:.2f}-{s.steady.end_s:.2f} s "
                f"({fmt_pct(s.steady.share_of_tokens)} of the tokens)"
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
