"""Triton's and the gateway's Prometheus scrapes around a load run, as counter deltas.

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

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Scrape = dict[str, list[tuple[dict[str, str], float]]]

_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str) -> Scrape:
    """Prometheus text exposition -> {metric name: [(labels, value), ...]}; comments and junk skipped."""
    out: Scrape = {}
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


def read_metrics(path: Path) -> Scrape | None:
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
    full_row_fetches: dict[str, float] = field(default_factory=dict)  # gateway_full_row_fetches_total by reason
    kv_live_after: float | None = None  # gpt2_kv_live_sequences after the run
    engine_rows: float | None = None  # gpt2_rows_total (the step model's own count, a cross-check)
    engine_steps: float | None = None  # gpt2_steps_total
    graph_replays: float | None = None  # gpt2_graph_replays_total
    engine_decode_rows: float | None = None  # gpt2_decode_tokens_total
    engine_live_at_step: float | None = None  # gpt2_live_at_step_total
    drawn_rows: float | None = None  # gpt2_drawn_rows_total: rows the step model drew on the device (DRAW)
    # The step model's phases (microseconds summed over executions; step_model.triton_model).
    execute_us: float | None = None  # gpt2_execute_us_total: inside execute
    parse_us: float | None = None  # gpt2_parse_us_total
    respond_us: float | None = None  # gpt2_respond_us_total
    prefill_us: float | None = None  # gpt2_prefill_us_total (engine)
    prefill_runs: float | None = None  # gpt2_prefill_runs_total
    prefill_graph_replays: float | None = None  # gpt2_prefill_graph_replays_total
    decode_us: float | None = None  # gpt2_decode_us_total (engine)
    finish_us: float | None = None  # gpt2_finish_us_total (engine)
    gateway_scraped: bool = False  # both gateway scrapes held samples (a fetch counter absent from them = 0)

    @property
    def live_share(self) -> float | None:
        """Share of the live sequences that stepped in each execution (1.0 = never fragmented)."""
        return ratio(self.engine_decode_rows, self.engine_live_at_step)

    @property
    def rows_per_exec(self) -> float | None:
        return ratio(self.rows, self.executions)

    @property
    def full_row_fetches_total(self) -> float | None:
        """All reasons together: 0 when the gateway's scrapes show none, None when they failed."""
        if self.full_row_fetches:
            return math.fsum(self.full_row_fetches.values())
        return 0.0 if self.gateway_scraped else None


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
    "drawn_rows": ("triton", "gpt2_drawn_rows_total"),
    "execute_us": ("triton", "gpt2_execute_us_total"),
    "parse_us": ("triton", "gpt2_parse_us_total"),
    "respond_us": ("triton", "gpt2_respond_us_total"),
    "prefill_us": ("triton", "gpt2_prefill_us_total"),
    "prefill_runs": ("triton", "gpt2_prefill_runs_total"),
    "prefill_graph_replays": ("triton", "gpt2_prefill_graph_replays_total"),
    "decode_us": ("triton", "gpt2_decode_us_total"),
    "finish_us": ("triton", "gpt2_finish_us_total"),
}
FULL_ROW_FETCHES = "gateway_full_row_fetches_total"


def run_counters(metrics_dir: Path, tag: str) -> Counters:
    """Counter deltas of the load run `tag` from its before/after scrapes."""
    scrape = {
        (server, when): read_metrics(metrics_dir / f"{tag}_{when}_{server}.txt")
        for server in ("triton", "gateway")
        for when in ("before", "after")
    }
    ta, gb, ga = scrape["triton", "after"], scrape["gateway", "before"], scrape["gateway", "after"]
    c = Counters(kv_live_after=metric_sum(ta, "gpt2_kv_live_sequences") if ta else None)
    c.gateway_scraped = gb is not None and ga is not None
    for name, (server, metric) in COUNTER_METRICS.items():
        setattr(c, name, delta(scrape[server, "before"], scrape[server, "after"], metric))
    if ga is not None:
        reasons = sorted({lab.get("reason", "") for lab, _ in ga.get(FULL_ROW_FETCHES, [])})
        for reason in reasons:
            d = delta(gb, ga, FULL_ROW_FETCHES, reason=reason)
            if d is not None:
                c.full_row_fetches[reason] = d
    return c
