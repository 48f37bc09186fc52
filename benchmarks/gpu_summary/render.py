"""summary.md and summary.json of one suite run, and the command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks.gpu_summary.inputs import RUN_TAGS, SuiteData, collect
from benchmarks.gpu_summary.metrics import Counters, ratio
from benchmarks.gpu_summary.rows import issue_targets, target_rows
from benchmarks.gpu_summary.targets import MET, MISSED, NOT_RUN, STREAMS, f0, f2, f3
from benchmarks.report import NA, markdown_table

COUNTER_HEADERS = [
    "workers",
    "run",
    "rows (inference_count)",
    "executions",
    "rows/exec",
    "Triton requests",
    "compute infer ms/exec",
    "queue ms/request",
    "engine rows/step",
    "CUDA graph replays",
    "device-drawn rows",
    "gateway rows/step",
    "full-row fetches",
    "KV live after",
]


def _counter_cells(workers: int, tag: str, c: Counters) -> list[Any]:
    fetches = ", ".join(f"{k}: {v:.0f}" for k, v in c.full_row_fetches.items()) or NA
    return [
        workers,
        tag,
        f0(c.rows),
        f0(c.executions),
        f2(c.rows_per_exec),
        f0(c.requests),
        f3(None if (r := ratio(c.compute_infer_us, c.requests)) is None else r / 1e3),  # each request: its exec's
        f3(None if (q := ratio(c.queue_us, c.requests)) is None else q / 1e3),
        f2(ratio(c.engine_rows, c.engine_steps)),
        f0(c.graph_replays),
        f0(c.drawn_rows),
        f2(ratio(c.gateway_step_rows, c.gateway_steps)),
        fetches,
        f0(c.kv_live_after),
    ]


PHASE_HEADERS = [
    "workers",
    "run",
    "Triton compute",
    "inside execute",
    "outside execute (IPC)",
    "parse",
    "prefill",
    "prefill runs/exec",
    "prefill graph replays",
    "decode",
    "answers",
    "respond",
]


def _per_exec_ms(us: float | None, c: Counters) -> str:
    return f3(None if (r := ratio(us, c.engine_steps)) is None else r / 1e3)


def _phase_cells(workers: int, tag: str, c: Counters) -> list[Any]:
    # Triton adds an execution's whole compute time to each of its requests.
    compute = None if (r := ratio(c.compute_infer_us, c.requests)) is None else r * (c.executions or 0)
    outside = None if compute is None or c.execute_us is None else compute - c.execute_us
    return [
        workers,
        tag,
        _per_exec_ms(compute, c),
        _per_exec_ms(c.execute_us, c),
        _per_exec_ms(outside, c),
        _per_exec_ms(c.parse_us, c),
        _per_exec_ms(c.prefill_us, c),
        f2(ratio(c.prefill_runs, c.engine_steps)),
        f0(c.prefill_graph_replays),
        _per_exec_ms(c.decode_us, c),
        _per_exec_ms(c.finish_us, c),
        _per_exec_ms(c.respond_us, c),
    ]


def _runs(data: SuiteData) -> list[tuple[int, str, Counters]]:
    out = []
    for s in data.stacks:
        for tag in RUN_TAGS:
            c = s.counters.get(tag)
            if c is None or c == Counters():
                continue  # the run (or both its scrapes) did not happen
            out.append((s.workers, tag, c))
    return out


def counters_table(data: SuiteData) -> str:
    rows = [_counter_cells(w, tag, c) for w, tag, c in _runs(data)]
    return markdown_table(COUNTER_HEADERS, rows) if rows else "no counters (the stack did not run)\n"


def phases_table(data: SuiteData) -> str:
    """Where a Triton execution's time goes, ms per execution (the step model's own counters)."""
    rows = [_phase_cells(w, tag, c) for w, tag, c in _runs(data) if c.execute_us is not None]
    return markdown_table(PHASE_HEADERS, rows) if rows else "no phase counters (a step model without them)\n"


def tests_table(data: SuiteData) -> str:
    if not data.tests:
        return "not run\n"
    rows: list[list[Any]] = []
    for name, c in data.tests.items():
        if c is None:
            rows.append([name, NA, NA, NA, NA, "unreadable"])
        else:
            ok = c["failures"] == 0 and c["errors"] == 0 and c["passed"] > 0
            rows.append([name, c["passed"], c["failures"], c["errors"], c["skipped"], "ok" if ok else "FAILED"])
    return markdown_table(["suite", "passed", "failed", "errors", "skipped", "status"], rows)


def stages_table(data: SuiteData) -> str:
    if not data.stages:
        return "no stages.tsv\n"
    keys = ["stage", "status", "rc", "seconds", "limit_s"]
    return markdown_table(keys, [[st.get(k, NA) for k in keys] for st in data.stages])


def _model_line(meta: dict[str, Any]) -> str:
    if not meta:
        return "no export metadata"
    parity: dict[str, Any] = meta["parity"] if isinstance(meta.get("parity"), dict) else {}
    err = parity.get("max_abs_error")
    return (
        f"{meta.get('source', NA)}, {meta.get('dtype', NA)}, {meta.get('n_layer', NA)} layers, "
        f"context {meta.get('max_context', NA)}; export parity max abs error "
        f"{f'{err:.3g}' if isinstance(err, int | float) else NA} on {parity.get('device', NA)}"
    )


HOW = (
    "\nHow the figures are made. Load: 32-token prompts, 128 new tokens; the top-k runs send temperature 0.8, "
    "top-k 50, top-p 0.95 (as the transformers references); the top-p run sends the seed's default request "
    "(temperature 0.7, top-p 0.9, top-k off). /v1/completions is streamed as OpenAI clients send it "
    "(`stream: true`, `stream_options.include_usage`, `ignore_eos`). The 512-stream runs are closed loops of "
    "6 requests per user; their tok/s is the steady-state rate (benchmarks/load/steady.py): the tokens "
    "generated from the moment every user had its first answer to the moment the first user had its last, "
    "over that window (a request's tokens spread evenly from its first token to its end), which leaves the "
    "ramp-up and the tail out; 'whole run' marks a run that had no such window. The step engine's tok/s is "
    "rows / p50 decode step; transformers' is batch x new tokens / median call and its ms/token the median "
    "call / new tokens (prefill included). Every ratio is between figures of this run, on this card. The "
    "outside client (guidellm) leaves its first and last 512 requests out (its warm-up and cool-down). Rows "
    "per execution = delta(nv_inference_count) / delta(nv_inference_exec_count) over the run (Triton counts a "
    "request of N rows as N inferences; see benchmarks/gpu_summary/metrics.py).\n"
)


def render(data: SuiteData, streams: int = STREAMS) -> str:
    """summary.md."""
    rows = target_rows(data, streams)
    tally = {k: sum(1 for r in issue_targets(data, streams) if r.status == k) for k in (MET, MISSED, NOT_RUN)}
    env = data.env
    parts = [
        f"# GPU suite summary: {data.root.name}\n\n",
        f"- GPU: {data.card or NA}; commit {env.get('git_commit') or NA}; date {env.get('date_utc') or NA}\n",
        f"- model: {_model_line(data.model)}\n",
        f"- targets (issue 16): {tally[MET]} met, {tally[MISSED]} missed, {tally[NOT_RUN]} not run\n",
        "\n## Target vs measured\n\n",
        markdown_table(
            ["what", "target", "measured", "status"], [[r.what, r.target, r.measured, r.status] for r in rows]
        ),
        HOW,
        "\n## Triton and gateway counters per run\n\n",
        counters_table(data),
        "\nWhere an execution's time goes, ms per execution (the step model's own counters; Triton's compute is "
        "its per-request compute time, which every request of an execution carries whole; outside execute = Triton's "
        "compute minus the time inside the model's execute: the Python backend's messages and tensor copies):\n\n",
        phases_table(data),
        "\nTriton columns are whole-server counters. The gateway columns come from the process that answered "
        "each scrape (with several workers and no shared registry, n/a when the two scrapes disagree). Engine "
        "rows/step = delta(gpt2_rows_total) / delta(gpt2_steps_total), the step model's own count; device-drawn "
        "rows = delta(gpt2_drawn_rows_total).\n",
        "\n## Correctness on the GPU\n\n",
        tests_table(data),
        "\n## Stages\n\n",
        stages_table(data),
    ]
    versions = env.get("versions")
    if isinstance(versions, dict) and versions:
        parts.append("\n## Environment\n\n")
        parts.append("".join(f"- {k}: {v}\n" for k, v in versions.items()))
    return "".join(parts)


def to_json(data: SuiteData, streams: int = STREAMS) -> dict[str, Any]:
    """summary.json: the target rows and the per-run counters."""
    return {
        "card": data.card,
        "targets": [asdict(r) for r in target_rows(data, streams)],
        "counters": {
            f"w{s.workers}": {tag: {**asdict(c), "rows_per_exec": c.rows_per_exec} for tag, c in s.counters.items()}
            for s in data.stacks
        },
        "outside": {f"w{s.workers}": asdict(s.outside) for s in data.stacks if s.outside is not None},
        "tests": data.tests,
        "stages": data.stages,
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_summary", description="Summary of one GPU suite run.")
    p.add_argument("results_dir", type=Path)
    p.add_argument("--streams", type=int, default=STREAMS, help="concurrent streams of the big runs")
    args = p.parse_args(argv)
    if not args.results_dir.is_dir():
        p.error(f"{args.results_dir} is not a directory")
    data = collect(args.results_dir)
    text = render(data, args.streams)
    (args.results_dir / "summary.md").write_text(text, encoding="utf-8")
    (args.results_dir / "summary.json").write_text(json.dumps(to_json(data, args.streams), indent=1) + "\n")
    sys.stdout.write(text)
    return 0
