"""An outside benchmark client against the gateway: guidellm, `python -m benchmarks.outside_client --help`.

    python -m benchmarks.outside_client --base-url http://127.0.0.1:8080 --streams 512 --requests-per-stream 6 \\
        --tokenizer VERSION_DIR/tokenizer --out DIR

Runs guidellm (0.8.1; its own wheels, see docs/benchmarks.md) with the load of the suite's own 512-stream
/v1/completions run: a closed loop of --streams concurrent streams (guidellm's `concurrent` profile),
--streams x --requests-per-stream requests, synthetic prompts of --prompt-tokens tokens (by the served
tokenizer), --new-tokens tokens each (`max_tokens` with `ignore_eos`, as guidellm sends them), streamed
with the usage chunk, top-k 50, top-p 0.95, temperature 0.8. guidellm's warm-up and cool-down leave the
first and the last --streams requests out of its figures (its `requests` transient phases), the same
idea as the load tool's steady window. Writes DIR/guidellm.json (guidellm's own report; per-request data
left out) and prints guidellm's console tables.

Exit status: guidellm's, or 3 when guidellm is not importable (the suite records the stage as skipped).
`read_guidellm` reads the figures the suite compares from guidellm's JSON report.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

NOT_INSTALLED = 3
REPORT_NAME = "guidellm.json"
SAMPLING = {"temperature": 0.8, "top_p": 0.95, "top_k": 50}  # the suite's top-k 50 runs


def guidellm_args(
    *,
    base_url: str,
    model: str,
    streams: int,
    requests_per_stream: int,
    prompt_tokens: int,
    new_tokens: int,
    tokenizer: str,
    report: Path,
    max_seconds: float,
) -> list[str]:
    """The arguments of `guidellm run` for the load above (guidellm's `key=value,...` option syntax)."""
    extras = ",".join(f"extras.body.{k}={v}" for k, v in SAMPLING.items())
    backend = f"kind=openai_http,target={base_url},request_format=/v1/completions,model={model},http2=false,{extras}"
    # guidellm's transient phases in requests: the first and the last `streams` requests are left out
    transient = ",".join(f"{phase}.mode=requests,{phase}.value={streams}" for phase in ("warmup", "cooldown"))
    return [
        "run",
        "--backend",
        backend,
        "--profile",
        f"kind=concurrent,streams={streams},{transient}",
        "--constraint",
        f"kind=max_requests,count={streams * requests_per_stream}",
        "--constraint",
        f"kind=max_duration,seconds={max_seconds:g}",
        "--data",
        f"kind=synthetic_text,prompt_tokens={prompt_tokens},output_tokens={new_tokens}",
        "--tokenizer",
        f"kind=huggingface_auto,model={tokenizer}",
        "--metrics",
        "kind=generative,sample_size=0",
        "--output",
        f"kind=json,path={report}",
        "--output",
        "kind=console",
        "--disable-console-interactive",
    ]


@dataclass(frozen=True)
class OutsideRun:
    """guidellm's figures for its measured window (warm-up and cool-down left out)."""

    client: str
    version: str | None
    streams: int | None
    output_tokens_per_s: float | None  # guidellm's "Output Tokens Per Sec, Mean" (successful requests)
    requests_ok: int | None
    requests_failed: int | None
    window_s: float | None
    ttft_p50_ms: float | None
    itl_p50_ms: float | None


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _stat(metrics: Mapping[str, Any], name: str, stat: str) -> float | None:
    """metrics[name]["successful"][stat] (a percentile such as "p50" from its "percentiles")."""
    group = _dict(_dict(metrics.get(name)).get("successful"))
    value = _dict(group.get("percentiles")).get(stat) if stat.startswith("p") else group.get(stat)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def parse_guidellm(report: Mapping[str, Any]) -> OutsideRun | None:
    """The figures of guidellm's JSON report (its first benchmark); None when it holds none."""
    benchmarks = report.get("benchmarks")
    if not isinstance(benchmarks, list) or not benchmarks or not isinstance(benchmarks[0], dict):
        return None
    bench = benchmarks[0]
    metrics = _dict(bench.get("metrics"))
    totals = _dict(metrics.get("request_totals"))
    failed = [n for n in (_int(totals.get("errored")), _int(totals.get("incomplete"))) if n is not None]
    duration = bench.get("duration")
    return OutsideRun(
        client="guidellm",
        version=_dict(report.get("metadata")).get("guidellm_version"),
        streams=_int(_dict(_dict(bench.get("config")).get("strategy")).get("streams")),
        output_tokens_per_s=_stat(metrics, "output_tokens_per_second", "mean"),
        requests_ok=_int(totals.get("successful")),
        requests_failed=sum(failed) if failed else None,
        window_s=float(duration) if isinstance(duration, int | float) else None,
        ttft_p50_ms=_stat(metrics, "time_to_first_token_ms", "p50"),
        itl_p50_ms=_stat(metrics, "inter_token_latency_ms", "p50"),
    )


def read_guidellm(path: Path) -> OutsideRun | None:
    """`parse_guidellm` of a report file; None when it is missing or malformed."""
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return parse_guidellm(report) if isinstance(report, dict) else None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.outside_client", description=__doc__.split("\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8080")
    p.add_argument("--model", default="gpt2", help="the served model's name (default %(default)s)")
    p.add_argument("--streams", type=int, default=512)
    p.add_argument("--requests-per-stream", type=int, default=6)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--tokenizer", required=True, help="the served model's tokenizer directory")
    p.add_argument("--max-seconds", type=float, default=90.0, help="guidellm stops sending after this long")
    p.add_argument("--processes", type=int, help="guidellm's worker processes (default: guidellm's own, 10)")
    p.add_argument("--out", type=Path, required=True)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if importlib.util.find_spec("guidellm") is None:
        print("guidellm is not importable: stage guidellm==0.8.1 and its wheels (docs/benchmarks.md)", file=sys.stderr)
        return NOT_INSTALLED
    args.out.mkdir(parents=True, exist_ok=True)
    cmd = guidellm_args(
        base_url=args.base_url.rstrip("/"),
        model=args.model,
        streams=args.streams,
        requests_per_stream=args.requests_per_stream,
        prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens,
        tokenizer=args.tokenizer,
        report=args.out / REPORT_NAME,
        max_seconds=args.max_seconds,
    )
    env = dict(os.environ)
    if args.processes:
        env["GUIDELLM__MAX_WORKER_PROCESSES"] = str(args.processes)
    print("guidellm " + " ".join(cmd), flush=True)
    return subprocess.run([sys.executable, "-m", "guidellm", *cmd], env=env, check=False).returncode


if __name__ == "__main__":
    raise SystemExit(main())
