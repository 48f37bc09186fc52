"""Summary of one `benchmarks/gpu_suite.sh` run: `python -m benchmarks.gpu_summary RESULTS_DIR`.

Reads what the suite wrote under RESULTS_DIR and writes RESULTS_DIR/summary.md (and summary.json):
a "target vs measured" table, the Triton / gateway counters of every load run, the correctness
suites, the stages' outcomes and the environment. Anything missing (a stage that failed, timed out
or was skipped) shows as "not run"; this program never fails on missing or malformed inputs.

The layout it reads (gpu_suite.sh writes it; the names are the constants below):

    stages.tsv                        stage, status, rc, seconds, limit_s
    env/versions.json                 package versions, GPU, git commit
    metadata_*.json                   the served export's metadata.json (shape, dtype, parity)
    engine/engine_bench.json          benchmarks.engine_bench
    stack_w<W>/<name>-<tag>.json      benchmarks.load, tag in LOAD_TAGS (<W> = gateway workers)
    stack_w<W>/metrics/<tag>_{before,after}_{triton,gateway}.txt
                                      Prometheus scrapes around each load run
    hf/baseline-*-plain.json          benchmarks.baseline
    hf/hf-static-*.json               benchmarks.hf_static
    tests/*.xml                       pytest --junitxml

Rows per Triton execution = delta(nv_inference_count) / delta(nv_inference_exec_count) over one load
run. Triton's metrics guide (docs.nvidia.com/deeplearning/triton-inference-server/user-guide/docs/
user_guide/metrics.html): Inference Count is the "number of inferences performed (one request counts
as 'batch size' inferences)", Execution Count the "number of inference executions", and "for models
that support batching, the count metrics can be interpreted to determine average batch size as
Inference Count / Execution Count" (the statistics extension adds: each inference of a batched request
counts individually; successful requests only). The step model batches on its first dimension, one
row per sequence (max_batch_size 1024, dynamic batcher), so the quotient is the rows one `execute`
ran: rows sent by callers (decode, prefill, full-row fetch and release rows alike), not the engine's
bystander rows. gpt2_rows_total / gpt2_steps_total, the model's own count, is shown beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.report import NA, markdown_table

STREAMS = 512
LOAD_TAGS = ("single", "streams", "sse", "penalty", "seed", "topp")
SCENARIOS = ("light", "medium", "heavy")

# Targets.
TARGET_C512_TOK_S = 150_000.0
TARGET_ITL_P50_MS = 1.5
TARGET_TTFT_P50_MS = 10.0
TARGET_ENGINE_512_TOK_S = 300_000.0
TARGET_ENGINE_1_MS = 0.5
TARGET_SEED_MEAN_S = 0.25
TARGET_ROWS_PER_EXEC_FRACTION = 0.90

MET, MISSED, NOT_RUN, REPORT, REFERENCE = "met", "missed", "not run", "report only", "reference"


# ------------------------------------------------------------------------------------ inputs


def read_json(path: Path) -> Any:
    """The parsed JSON file, or None when it is missing or malformed."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Prometheus text exposition -> {metric name: [(labels, value), ...]}; comments and junk skipped."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if m is None:
            continue
        try:
            value = float(m.group(4))
        except ValueError:
            continue
        labels = dict(_LABEL.findall(m.group(3) or ""))
        out.setdefault(m.group(1), []).append((labels, value))
    return out


def metric_sum(parsed: Mapping[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float | None:
    """Sum of `name` over the samples whose labels include `labels`; None when there is none."""
    values = [v for lab, v in parsed.get(name, []) if all(lab.get(k) == want for k, want in labels.items())]
    return math.fsum(values) if values else None


def read_metrics(path: Path) -> dict[str, list[tuple[dict[str, str], float]]] | None:
    """A parsed scrape, or None when the file is missing or holds no sample (the scrape failed)."""
    try:
        parsed = parse_prometheus(path.read_text(encoding="utf-8"))
    except OSError:
        return None
    return parsed or None


def delta(before: Mapping[str, Any] | None, after: Mapping[str, Any] | None, name: str, **labels: str) -> float | None:
    """after - before of a counter; None when either side lacks it or it went backwards (another process)."""
    if before is None or after is None:
        return None
    b, a = metric_sum(before, name, **labels), metric_sum(after, name, **labels)
    if a is None:
        return None
    d = a - (b or 0.0)
    return d if d >= 0 else None


def ratio(num: float | None, den: float | None) -> float | None:
    """num / den, None when either is missing or den is 0."""
    return None if num is None or den is None or den == 0 else num / den


@dataclass
class Counters:
    """Triton and gateway counter deltas over one load run."""

    rows: float | None = None  # nv_inference_count
    executions: float | None = None  # nv_inference_exec_count
    requests: float | None = None  # nv_inference_request_success
    compute_infer_us: float | None = None
    compute_input_us: float | None = None
    compute_output_us: float | None = None
    queue_us: float | None = None
    gateway_step_rows: float | None = None  # gateway_step_rows_sum
    gateway_steps: float | None = None  # gateway_step_rows_count
    full_row_fetches: dict[str, float] = field(default_factory=dict)
    kv_live_after: float | None = None  # gpt2_kv_live_sequences after the run
    engine_rows: float | None = None  # gpt2_rows_total (the step model's own count, a cross-check)
    engine_steps: float | None = None  # gpt2_steps_total
    graph_replays: float | None = None  # gpt2_graph_replays_total
    engine_decode_rows: float | None = None  # gpt2_decode_tokens_total
    engine_live_at_step: float | None = None  # gpt2_live_at_step_total

    @property
    def live_share(self) -> float | None:
        """Share of the live sequences that stepped in each execution (1.0 = never fragmented)."""
        return ratio(self.engine_decode_rows, self.engine_live_at_step)

    @property
    def rows_per_exec(self) -> float | None:
        return ratio(self.rows, self.executions)


# Counters field -> (scrape, counter): the field holds the counter's delta over the run.
COUNTER_METRICS = {
    "rows": ("triton", "nv_inference_count"),
    "executions": ("triton", "nv_inference_exec_count"),
    "requests": ("triton", "nv_inference_request_success"),
    "compute_infer_us": ("triton", "nv_inference_compute_infer_duration_us"),
    "compute_input_us": ("triton", "nv_inference_compute_input_duration_us"),
    "compute_output_us": ("triton", "nv_inference_compute_output_duration_us"),
    "queue_us": ("triton", "nv_inference_queue_duration_us"),
    "gateway_step_rows": ("gateway", "gateway_step_rows_sum"),
    "gateway_steps": ("gateway", "gateway_step_rows_count"),
    "engine_rows": ("triton", "gpt2_rows_total"),
    "engine_steps": ("triton", "gpt2_steps_total"),
    "graph_replays": ("triton", "gpt2_graph_replays_total"),
    "engine_decode_rows": ("triton", "gpt2_decode_tokens_total"),
    "engine_live_at_step": ("triton", "gpt2_live_at_step_total"),
}


def run_counters(metrics_dir: Path, tag: str) -> Counters:
    """Counter deltas of the load run `tag` from its before/after scrapes."""
    scrape = {
        (server, when): read_metrics(metrics_dir / f"{tag}_{when}_{server}.txt")
        for server in ("triton", "gateway")
        for when in ("before", "after")
    }
    ta, gb, ga = scrape["triton", "after"], scrape["gateway", "before"], scrape["gateway", "after"]
    c = Counters(kv_live_after=metric_sum(ta, "gpt2_kv_live_sequences") if ta else None)
    for name, (server, metric) in COUNTER_METRICS.items():
        setattr(c, name, delta(scrape[server, "before"], scrape[server, "after"], metric))
    if ga is not None:
        reasons = sorted({lab.get("reason", "") for lab, _ in ga.get("gateway_full_row_fetches_total", [])})
        for reason in reasons:
            d = delta(gb, ga, "gateway_full_row_fetches_total", reason=reason)
            if d is not None:
                c.full_row_fetches[reason] = d
    return c


def load_summary(directory: Path, name_suffix: str) -> dict[str, Any] | None:
    """The `summary` of the one benchmarks.load JSON in `directory` whose stem ends with `name_suffix`."""
    for path in sorted(directory.glob(f"*{name_suffix}.json")):
        data = read_json(path)
        if isinstance(data, dict) and isinstance(data.get("summary"), dict):
            config = data.get("config")
            max_new = config.get("max_new_tokens") if isinstance(config, dict) else None
            return {**data["summary"], "max_new_tokens": max_new}
    return None


def dist(summary: Mapping[str, Any] | None, key: str, stat: str) -> float | None:
    """summary[key][stat] as a float, or None."""
    if not summary or not isinstance(summary.get(key), dict):
        return None
    value = summary[key].get(stat)
    return float(value) if isinstance(value, int | float) else None


def num(mapping: Mapping[str, Any] | None, key: str) -> float | None:
    """mapping[key] as a float, or None."""
    if not mapping:
        return None
    value = mapping.get(key)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


@dataclass
class StackRun:
    """One gateway worker count's load runs."""

    workers: int
    loads: dict[str, dict[str, Any] | None]  # tag (or "seed:<scenario>") -> load summary
    counters: dict[str, Counters]


def read_stack(directory: Path, workers: int) -> StackRun:
    loads: dict[str, dict[str, Any] | None] = {
        tag: load_summary(directory, f"-{tag}") for tag in LOAD_TAGS if tag != "seed"
    }
    for sc in SCENARIOS:
        loads[f"seed:{sc}"] = load_summary(directory, f"{sc}-generate-seed")
    counters = {tag: run_counters(directory / "metrics", tag) for tag in LOAD_TAGS}
    return StackRun(workers, loads, counters)


def junit_counts(path: Path) -> dict[str, int] | None:
    """{tests, failures, errors, skipped, passed} of a pytest --junitxml file; None if unreadable."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    if not suites:
        return None
    counts = {k: sum(int(s.get(k, 0) or 0) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


def read_stages(path: Path) -> list[dict[str, str]]:
    """Rows of stages.tsv (tab-separated with a header); [] when missing."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    if not lines:
        return []
    header = lines[0].split("\t")
    return [dict(zip(header, line.split("\t"), strict=False)) for line in lines[1:] if line.strip()]


def hf_results(directory: Path, pattern: str) -> dict[int, dict[str, Any]]:
    """batch size -> result summary from the newest JSON matching `pattern` ({} when none)."""
    for path in sorted(directory.glob(pattern), key=lambda p: p.stat().st_mtime, reverse=True):
        data = read_json(path)
        if isinstance(data, dict) and isinstance(data.get("results"), list):
            return {int(r["batch_size"]): r for r in data["results"] if isinstance(r, dict) and "batch_size" in r}
    return {}


@dataclass
class SuiteData:
    """Everything the summary is made of."""

    root: Path
    engine: dict[str, dict[str, Any]]  # str(N) -> engine_bench row
    stacks: list[StackRun]
    hf_plain: dict[int, dict[str, Any]]
    hf_static: dict[int, dict[str, Any]]
    tests: dict[str, dict[str, int] | None]
    stages: list[dict[str, str]]
    env: dict[str, Any]
    model: dict[str, Any] = field(default_factory=dict)  # the export's metadata.json


def collect(root: Path) -> SuiteData:
    """Read a results directory (any part may be missing)."""
    engine = read_json(root / "engine" / "engine_bench.json")
    engine_rows = engine.get("rows", {}) if isinstance(engine, dict) else {}
    stacks = []
    for d in sorted(root.glob("stack_w*"), key=lambda p: int(re.sub(r"\D", "", p.name) or 0)):
        m = re.fullmatch(r"stack_w(\d+)", d.name)
        if m and d.is_dir():
            stacks.append(read_stack(d, int(m.group(1))))
    tests = {p.stem: junit_counts(p) for p in sorted((root / "tests").glob("*.xml"))}
    env = read_json(root / "env" / "versions.json")
    metas = [m for m in (read_json(p) for p in sorted(root.glob("metadata_*.json"))) if isinstance(m, dict)]
    return SuiteData(
        root=root,
        engine=engine_rows if isinstance(engine_rows, dict) else {},
        stacks=stacks,
        hf_plain=hf_results(root / "hf", "baseline-*-plain.json"),
        hf_static=hf_results(root / "hf", "hf-static-*.json"),
        tests=tests,
        stages=read_stages(root / "stages.tsv"),
        env=env if isinstance(env, dict) else {},
        model=metas[0] if metas else {},
    )


# ------------------------------------------------------------------------------------ targets


@dataclass(frozen=True)
class Row:
    """One line of the target table."""

    what: str
    target: str
    measured: str
    status: str


def f0(x: float | None) -> str:
    return NA if x is None else f"{x:,.0f}"


def f2(x: float | None) -> str:
    return NA if x is None else f"{x:.2f}"


def f3(x: float | None) -> str:
    return NA if x is None else f"{x:.3f}"


def pct(x: float | None) -> str:
    return NA if x is None else f"{x * 100:.1f}%"


def judge(value: float | None, target: float, higher_is_better: bool) -> str:
    """met / missed / not run."""
    if value is None:
        return NOT_RUN
    return MET if (value >= target if higher_is_better else value <= target) else MISSED


def _report_row(label: str, load: dict[str, Any] | None, detail: str, fetches: float | None) -> Row:
    """A report-only row of a load run: tok/s and success rate, `detail`, the full-row fetches."""
    measured = NA
    if load is not None:
        measured = f"{f0(num(load, 'tokens_per_s'))} tok/s, {pct(num(load, 'success_rate'))} ok{detail}"
        measured += f", full-row fetches {f0(fetches)}" if fetches is not None else ""
    return Row(label, "report only", measured, REPORT if load is not None else NOT_RUN)


def _w(workers: int) -> str:
    return f"{workers} worker{'s' if workers != 1 else ''}"


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


@dataclass(frozen=True)
class Target:
    """A target judged met / missed / not run. `value` reads the figure from its source (a load summary,
    an engine_bench row or a run's Counters; None when missing) and `shown` writes the measured column
    from (source, value); `what` is a template for {streams}, {workers} and {route}."""

    what: str
    target: str
    goal: float
    higher_is_better: bool
    value: Callable[[Any], float | None]
    shown: Callable[[Any, float | None], str]

    def row(self, source: Any, **names: Any) -> Row:
        value = self.value(source)
        what = self.what.format(**names)
        return Row(what, self.target, self.shown(source, value), judge(value, self.goal, self.higher_is_better))


# The many-stream runs, per gateway worker count: (load tag, route).
STREAM_RUNS = (("streams", "/generate"), ("sse", "/generate/stream, SSE per token"))
STREAM_TARGET = Target(
    "{streams} streams, {route}, tok/s ({workers})",
    f">= {TARGET_C512_TOK_S:,.0f}",
    TARGET_C512_TOK_S,
    True,
    lambda load: num(load, "tokens_per_s"),
    lambda load, tok: NA if load is None else f"{f0(tok)} tok/s ({pct(num(load, 'success_rate'))} ok)",
)
# From the single-stream run, per gateway worker count.
SINGLE_STREAM_TARGETS = (
    Target(
        "single stream ITL p50 ({workers})",
        f"<= {TARGET_ITL_P50_MS} ms",
        TARGET_ITL_P50_MS,
        False,
        lambda load: _ms(dist(load, "itl", "p50")),
        lambda _, ms: NA if ms is None else f"{ms:.2f} ms",
    ),
    Target(
        "single stream TTFT p50 ({workers})",
        f"<= {TARGET_TTFT_P50_MS:g} ms",
        TARGET_TTFT_P50_MS,
        False,
        lambda load: _ms(dist(load, "ttft", "p50")),
        lambda _, ms: NA if ms is None else f"{ms:.1f} ms",
    ),
)
# The step engine alone, by engine_bench row count ("{streams}": the --streams count).
ENGINE_TARGETS = {
    "{streams}": Target(
        "step engine alone, {streams} rows, tok/s",
        f">= {TARGET_ENGINE_512_TOK_S:,.0f}",
        TARGET_ENGINE_512_TOK_S,
        True,
        lambda row: num(row, "tok_per_s_at_p50"),
        lambda row, tok: NA if row is None else f"{f0(tok)} tok/s ({f3(num(row, 'decode_step_p50_ms'))} ms/step)",
    ),
    "1": Target(
        "step engine alone, 1 row, ms/step (p50)",
        f"<= {TARGET_ENGINE_1_MS} ms",
        TARGET_ENGINE_1_MS,
        False,
        lambda row: num(row, "decode_step_p50_ms"),
        lambda _, ms: NA if ms is None else f"{ms:.3f} ms",
    ),
}
# From the many-stream run's counters, per gateway worker count.
LIVE_SHARE_TARGET = Target(
    "live sequences stepping together at {streams} streams ({workers})",
    f">= {TARGET_ROWS_PER_EXEC_FRACTION:.0%} of live sequences",
    TARGET_ROWS_PER_EXEC_FRACTION,
    True,
    lambda c: c.live_share if c else None,
    lambda _, share: NA if share is None else f"{pct(share)} (decode rows / live sequences at each step)",
)


def target_rows(data: SuiteData, streams: int = STREAMS) -> list[Row]:
    """The "target vs measured" rows, in the order of the brief."""
    rows: list[Row] = []
    stacks = data.stacks or [StackRun(w, {}, {}) for w in (1, 8)]
    for tag, route in STREAM_RUNS:
        for s in stacks:
            load = s.loads.get(tag)
            if load is None and tag == "sse":
                continue  # suites before 2026-12-01 had no SSE run
            rows.append(STREAM_TARGET.row(load, streams=streams, route=route, workers=_w(s.workers)))
    for target in SINGLE_STREAM_TARGETS:
        rows += [target.row(s.loads.get("single"), workers=_w(s.workers)) for s in stacks]
    for key, target in ENGINE_TARGETS.items():
        engine_row = data.engine.get(key.format(streams=streams))
        rows.append(target.row(engine_row if isinstance(engine_row, dict) else None, streams=streams))
    for s in stacks:
        for sc in SCENARIOS:
            load = s.loads.get(f"seed:{sc}")
            mean_s, ok = dist(load, "latency", "mean"), num(load, "success_rate")
            if load is None or mean_s is None:
                status = NOT_RUN
            else:
                status = MET if mean_s <= TARGET_SEED_MEAN_S and ok == 1.0 else MISSED
            rows.append(
                Row(
                    f"seed {sc} mean latency ({_w(s.workers)})",
                    f"<= {TARGET_SEED_MEAN_S} s, 100% ok",
                    NA if load is None else f"{f3(mean_s)} s, {pct(ok)} ok",
                    status,
                )
            )
    for s in stacks:
        c = s.counters.get("streams")
        rpe = c.rows_per_exec if c else None
        frac = None if rpe is None else rpe / streams
        measured = NA
        if c is not None and rpe is not None:
            measured = f"{f0(c.rows)} rows / {f0(c.executions)} executions = {rpe:.1f} ({pct(frac)} of {streams})"
        rows.append(
            Row(
                f"rows per Triton execution at {streams} streams ({_w(s.workers)})",
                "report only (clients think and wait between requests)",
                measured,
                REPORT if c is not None and rpe is not None else NOT_RUN,
            )
        )
        rows.append(LIVE_SHARE_TARGET.row(c, streams=streams, workers=_w(s.workers)))
    for s in stacks:
        load, plain = s.loads.get("penalty"), s.loads.get("streams")
        c = s.counters.get("penalty")
        ratio = (
            None
            if load is None or plain is None
            else (num(load, "tokens_per_s") or 0.0) / (num(plain, "tokens_per_s") or 1.0)
        )
        rows.append(
            _report_row(
                f"{streams} streams with presence 0.5, frequency 0.5, repetition 1.1 ({_w(s.workers)})",
                load,
                f", {ratio:.2f}x the same run without penalties" if ratio is not None else "",
                sum(c.full_row_fetches.values()) if c and c.full_row_fetches else 0 if c else None,
            )
        )
    for s in stacks:
        load = s.loads.get("topp")
        c = s.counters.get("topp")
        detail = "" if load is None else f", {f0(num(load, 'max_new_tokens'))} new tokens"
        detail += "" if load is None else f", {f0(num(load, 'max_in_flight'))} streams"
        rows.append(
            _report_row(
                f"top-p 0.95 (top-k off), tok/s ({_w(s.workers)})",
                load,
                detail,
                sum(c.full_row_fetches.values()) if c and c.full_row_fetches else None,
            )
        )
    for label, results in (("plain generate", data.hf_plain), ("static cache + compile", data.hf_static)):
        for bs in dict.fromkeys((1, 32, streams)):
            r = results.get(bs)
            tok = num(r, "tokens_per_s")
            ms = num(r, "ms_per_token")
            if ms is None and num(r, "per_token_s") is not None:
                ms = (num(r, "per_token_s") or 0.0) * 1e3
            rows.append(
                Row(
                    f"transformers {label}, batch {bs}",
                    "comparison",
                    NA if r is None else f"{f0(tok)} tok/s, {f2(ms)} ms/token",
                    REFERENCE if r is not None else NOT_RUN,
                )
            )
    return rows


# ------------------------------------------------------------------------------------ rendering

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
    "gateway rows/step",
    "full-row fetches",
    "KV live after",
]


def counters_table(data: SuiteData) -> str:
    rows = []
    for s in data.stacks:
        for tag in LOAD_TAGS:
            c = s.counters.get(tag)
            if c is None or c == Counters():
                continue  # the run (or both its scrapes) did not happen
            fetches = ", ".join(f"{k}: {v:.0f}" for k, v in c.full_row_fetches.items()) or NA
            rows.append(
                [
                    s.workers,
                    tag,
                    f0(c.rows),
                    f0(c.executions),
                    f2(c.rows_per_exec),
                    f0(c.requests),
                    f3(None if (r := ratio(c.compute_infer_us, c.executions)) is None else r / 1e3),
                    f3(None if (q := ratio(c.queue_us, c.requests)) is None else q / 1e3),
                    f2(ratio(c.engine_rows, c.engine_steps)),
                    f0(c.graph_replays),
                    f2(ratio(c.gateway_step_rows, c.gateway_steps)),
                    fetches,
                    f0(c.kv_live_after),
                ]
            )
    return markdown_table(COUNTER_HEADERS, rows) if rows else "no counters (the stack did not run)\n"


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


def render(data: SuiteData, streams: int = STREAMS) -> str:
    """summary.md."""
    rows = target_rows(data, streams)
    tally = {k: sum(1 for r in rows if r.status == k) for k in (MET, MISSED, NOT_RUN)}
    env = data.env
    meta = data.model
    parity: dict[str, Any] = meta["parity"] if isinstance(meta.get("parity"), dict) else {}
    err = parity.get("max_abs_error")
    model = (
        f"{meta.get('source', NA)}, {meta.get('dtype', NA)}, {meta.get('n_layer', NA)} layers, "
        f"context {meta.get('max_context', NA)}; export parity max abs error "
        f"{f'{err:.3g}' if isinstance(err, int | float) else NA} on {parity.get('device', NA)}"
        if meta
        else "no export metadata"
    )
    head = [
        f"# GPU suite summary: {data.root.name}\n\n",
        f"- GPU: {env.get('gpu') or NA}; commit {env.get('git_commit') or NA}; date {env.get('date_utc') or NA}\n",
        f"- model: {model}\n",
        f"- targets: {tally[MET]} met, {tally[MISSED]} missed, {tally[NOT_RUN]} not run\n",
        "\n## Target vs measured\n\n",
        markdown_table(
            ["what", "target", "measured", "status"], [[r.what, r.target, r.measured, r.status] for r in rows]
        ),
        "\nLoad: 32-token prompts, 128 new tokens, "
        "temperature 0.8 (top-k 50 with top-p 0.95 unless noted; the top-p row has top-k off). Rows per execution "
        "= delta(nv_inference_count) / delta(nv_inference_exec_count) over the run (Triton counts a request "
        "of N rows as N inferences; see benchmarks/gpu_summary.py).\n",
        "\n## Triton and gateway counters per load run\n\n",
        counters_table(data),
        "\nTriton columns are whole-server counters. The gateway columns come from the process that answered "
        "each scrape (with several workers and no shared registry, n/a when the two scrapes disagree). Engine "
        "rows/step = delta(gpt2_rows_total) / delta(gpt2_steps_total), the step model's own count.\n",
        "\n## Correctness on the GPU\n\n",
        tests_table(data),
        "\n## Stages\n\n",
        stages_table(data),
    ]
    versions = env.get("versions")
    if isinstance(versions, dict) and versions:
        head.append("\n## Environment\n\n")
        head.append("".join(f"- {k}: {v}\n" for k, v in versions.items()))
    return "".join(head)


def to_json(data: SuiteData, streams: int = STREAMS) -> dict[str, Any]:
    """summary.json: the target rows and the per-run counters."""
    return {
        "targets": [asdict(r) for r in target_rows(data, streams)],
        "counters": {
            f"w{s.workers}": {tag: {**asdict(c), "rows_per_exec": c.rows_per_exec} for tag, c in s.counters.items()}
            for s in data.stacks
        },
        "tests": data.tests,
        "stages": data.stages,
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_summary", description=__doc__.split("\n")[0])
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


if __name__ == "__main__":
    raise SystemExit(main())
