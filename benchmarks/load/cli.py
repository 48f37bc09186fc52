"""The command line: `python -m benchmarks.load --help`; writes <name>.md/.csv/.json and the charts."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.load.charts import Series, write_charts
from benchmarks.load.client import CSV_FIELDS
from benchmarks.load.runner import RunResult, execute
from benchmarks.load.scenarios import (
    DEFAULT_BASE_URL,
    DEFAULT_MODEL,
    ENDPOINTS,
    SCENARIOS,
    THINK_TIME_S,
    RunConfig,
    Sampling,
    prompt_pool,
)
from benchmarks.load.summary import render_markdown, run_shape, summarize
from benchmarks.report import (
    RunInfo,
    write_outputs,
)


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
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--model", default=DEFAULT_MODEL, help="/v1/completions: the model name sent (default %(default)s)")
    p.add_argument(
        "--ignore-eos",
        action="store_true",
        help="/v1/completions: ask for max tokens whatever the end-of-text token (as benchmark clients do)",
    )
    p.add_argument("--seed", type=int, default=0, help="picks prompts (and per-request seeds); default %(default)s")
    p.add_argument("--seeded", action="store_true", help="send a per-request sampling seed (else seed: null)")
    p.add_argument("--timeout-s", type=float, default=120.0, help="per-request limit (default %(default)s)")
    p.add_argument("--warmup", type=int, default=1, help="untimed requests before each run (default %(default)s)")
    p.add_argument("--api-key", help="Bearer key (default: $BENCH_API_KEY if set)")
    p.add_argument(
        "--processes",
        type=int,
        default=1,
        help="load processes the users (or arrivals) are spread over, so the client keeps up with "
        "hundreds of concurrent streams (default %(default)s)",
    )
    p.add_argument("--out", help="directory for <name>.md/.csv/.json")
    p.add_argument("--tag", help="suffix for the run names / output files")
    p.add_argument(
        "--baseline",
        metavar="CSV",
        help="an earlier run's <name>.csv: drawn in grey in this run's charts (written with --out)",
    )
    return p


def configs_from_args(args: argparse.Namespace) -> list[RunConfig]:
    """Resolve the CLI into one RunConfig per run. Raises ValueError for an invalid combination."""
    for flag in ("concurrency", "requests", "max_new_tokens", "prompt_tokens", "warmup"):
        value = getattr(args, flag)
        if value is not None and value < (0 if flag == "warmup" else 1):
            raise ValueError(f"--{flag.replace('_', '-')} must be positive")
    if args.timeout_s <= 0:
        raise ValueError("--timeout-s must be positive")
    sampling = Sampling(
        args.temperature,
        args.top_p,
        args.top_k,
        args.presence_penalty,
        args.frequency_penalty,
        args.repetition_penalty,
    )
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
        "processes": max(1, args.processes),
        "model": args.model,
        "ignore_eos": args.ignore_eos,
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
        _log(f"[load] {cfg.name}: {run_shape(cfg)}, max_new_tokens={cfg.max_new_tokens}, {cfg.base_url}")
        run = await execute(cfg, prompts)
        s = summarize(run)
        _log(f"[load] {cfg.name}: {s.ok}/{s.requests} ok in {run.wall_s:.2f} s")
        runs.append(run)
    return runs


def _chart_links(charts: Sequence[Path]) -> str:
    """The charts, linked from the markdown written next to them."""
    if not charts:
        return ""
    return "\n### Charts\n\n" + "".join(f"![{p.stem}]({p.name})\n" for p in charts)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point. Returns 0 when the runs completed (whatever their success rate), 2 on bad arguments."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        configs = configs_from_args(args)
        prompts = prompt_pool(args.prompt_tokens, args.tokenizer)
        baseline = Series.from_csv(args.baseline) if args.baseline else None
    except (ValueError, OSError, KeyError) as err:
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
            charts = write_charts(args.out, cfg.name, [Series.of(cfg.name, run.results)], baseline)
            md = render_markdown([(cfg, s)], info, f"Gateway load benchmark: {cfg.name}") + _chart_links(charts)
            summary = {"summary": s, "run": info.to_dict(), "config": cfg.public()}
            written += write_outputs(args.out, cfg.name, md, [r.row() for r in run.results], summary, CSV_FIELDS)
            written += charts
        if len(runs) > 1:
            name = f"all-{args.endpoint}{'-' + args.tag if args.tag else ''}"
            charts = write_charts(args.out, name, [Series.of(run.config.name, run.results) for run in runs], baseline)
            rows = [{"run": run.config.name, **r.row()} for run in runs for r in run.results]
            summary = {"summaries": [s for _, s in pairs], "run": info.to_dict(), "parameters": params}
            written += write_outputs(
                args.out, name, combined + _chart_links(charts), rows, summary, ["run", *CSV_FIELDS]
            )
            written += charts
        _log("[load] wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
