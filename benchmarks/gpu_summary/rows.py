"""The whole "target vs measured" table: issue 16's targets (targets.py) in its order, then the rows
kept for context, judged against nothing: the seed article's scenarios, the rows per Triton execution,
the penalties run and the transformers references."""

from __future__ import annotations

from benchmarks.gpu_summary.inputs import SCENARIOS, StackRun, SuiteData, dist, num
from benchmarks.gpu_summary.metrics import ratio
from benchmarks.gpu_summary.targets import (
    MANY_WORKERS,
    NOT_RUN,
    REFERENCE,
    REPORT,
    STREAMS,
    Row,
    engine_target_rows,
    f0,
    f2,
    f3,
    one_process_rows,
    outside_rows,
    pct,
    rate_text,
    single_stream_rows,
    stack_rate,
    throughput_rows,
    topp_rows,
    workers_label,
)
from benchmarks.load.scenarios import SEED_ARTICLE
from benchmarks.report import NA


def engine_draw_rows(data: SuiteData, streams: int) -> list[Row]:
    """The step engine's cost of the device draw (issue 16, 2): every row asks for it, beside plain."""
    rows = []
    for n in dict.fromkeys((1, streams)):
        plain_ms = num(data.engine.get(str(n)), "decode_step_p50_ms")
        drawn_ms = num(data.engine_draw.get(str(n)), "decode_step_p50_ms")
        rows.append(
            Row(
                f"step engine alone, {n} row{'s' if n != 1 else ''}, every row drawn on the device (top-p 0.9)",
                "report only (beside the plain figure)",
                f"{f3(drawn_ms)} ms/step / {f3(plain_ms)} ms/step plain = {f2(ratio(drawn_ms, plain_ms))}x",
                _seen(drawn_ms),
            )
        )
    return rows


def engine_ahead_rows(data: SuiteData, streams: int) -> list[Row]:
    """Decodes run ahead on the step engine (step_model/ahead.py): its time per decoded token beside
    one token per step (the plain figure), with the load's cuts and with the seed's top-p."""
    rows = []
    runs_by_cuts = (("top-k 50, top-p 0.95", data.engine_ahead), ("top-p 0.9, drawn whole", data.engine_ahead_topp))
    for label, runs in runs_by_cuts:
        for n in dict.fromkeys((1, streams)):
            run = runs.get(str(n))
            if run is None:
                continue  # a suite from before the stage
            plain_ms = num(data.engine.get(str(n)), "decode_step_p50_ms")
            per_token_ms = num(run, "ms_per_decode_at_p50")
            ahead = run.get("ahead", "?")
            rows.append(
                Row(
                    f"step engine alone, {n} row{'s' if n != 1 else ''}, {ahead} decodes ahead per step ({label})",
                    "report only (target 4's figures are one token per step)",
                    f"{f3(per_token_ms)} ms/token / {f3(plain_ms)} ms/step plain = "
                    f"{f2(ratio(per_token_ms, plain_ms))}x; {num(run, 'tok_per_s_at_p50') or 0:,.0f} tok/s",
                    _seen(per_token_ms),
                )
            )
    return rows


def engine_invariant_rows(data: SuiteData, streams: int) -> list[Row]:
    """Batch invariance's cost on the step engine (issue 15): 16 of the rows flagged, decoded in a
    reserved range of 64 slots in a run of their own, beside the plain figure."""
    rows = []
    for n in dict.fromkeys((64, streams)):
        plain_ms = num(data.engine.get(str(n)), "decode_step_p50_ms")
        invariant_ms = num(data.engine_invariant.get(str(n)), "decode_step_p50_ms")
        rows.append(
            Row(
                f"step engine alone, {n} rows, 16 of them batch-invariant (invariant_slots 64)",
                "report only (on by default if under 10% more)",
                f"{f3(invariant_ms)} ms/step / {f3(plain_ms)} ms/step plain = {f2(ratio(invariant_ms, plain_ms))}x",
                _seen(invariant_ms),
            )
        )
    return rows


def _seen(source: object) -> str:
    return REPORT if source is not None else NOT_RUN


def _kept(groups: list[list[Row]]) -> list[Row]:
    """The worker counts' row groups that ran; the first (most workers) as "not run" when none did."""
    ran = [g for g in groups if any(r.status != NOT_RUN for r in g)]
    return [r for g in (ran or groups[:1]) for r in g]


def seed_rows(stacks: list[StackRun]) -> list[Row]:
    """The seed article's scenarios (its /generate/robust row beside ours; its hardware is unknown)."""
    seed = SEED_ARTICLE["/generate/robust"]
    groups = []
    for s in stacks:
        group = []
        for sc in SCENARIOS:
            load = s.loads.get(f"seed:{sc}")
            measured = NA
            if load is not None:
                measured = (
                    f"mean {f3(dist(load, 'latency', 'mean'))} s, p95 {f3(dist(load, 'latency', 'p95'))} s, "
                    f"{pct(num(load, 'success_rate'))} ok (the seed article: mean {seed.mean_s} s)"
                )
            group.append(Row(f"seed scenario {sc} ({workers_label(s.workers)})", "report only", measured, _seen(load)))
        groups.append(group)
    return _kept(groups)


def batching_rows(stacks: list[StackRun], streams: int) -> list[Row]:
    """Rows per Triton execution and the share of live sequences stepping together, per worker count."""
    groups = []
    for s in stacks:
        c = s.counters.get("completions")
        rpe = c.rows_per_exec if c else None
        measured = NA
        if c is not None and rpe is not None:
            measured = (
                f"{f0(c.rows)} rows / {f0(c.executions)} executions = {rpe:.1f} ({pct(rpe / streams)} of {streams})"
            )
        what = f"rows per Triton execution, {streams} streams /v1/completions SSE ({workers_label(s.workers)})"
        share = c.live_share if c else None
        groups.append(
            [
                Row(what, "report only (clients think and wait between requests)", measured, _seen(rpe)),
                Row(
                    f"live sequences stepping together, {streams} streams ({workers_label(s.workers)})",
                    "report only",
                    NA if share is None else f"{pct(share)} (decode rows / live sequences at each step)",
                    _seen(share),
                ),
            ]
        )
    return _kept(groups)


def penalty_rows(stacks: list[StackRun], streams: int) -> list[Row]:
    """The /generate run with presence, frequency and repetition penalties, vs the same run without."""
    groups = []
    for s in stacks:
        load, plain = s.loads.get("penalty"), s.loads.get("streams")
        c = s.counters.get("penalty")
        measured = NA
        if load is not None:
            measured = (
                f"{rate_text(load)}, {f2(ratio(stack_rate(load)[0], stack_rate(plain)[0]))}x the same run without "
                f"penalties, full-row fetches {f0(c.full_row_fetches_total if c else None)}"
            )
        penalties = "presence 0.5, frequency 0.5, repetition 1.1"
        what = f"{streams} streams /generate with {penalties} ({workers_label(s.workers)})"
        groups.append([Row(what, "report only", measured, _seen(load))])
    return _kept(groups)


def reference_rows(data: SuiteData, streams: int) -> list[Row]:
    """transformers on the same card: the static cache + compile the targets use, and plain generate."""
    rows = []
    for label, results in (("static cache + compile", data.hf_static), ("plain generate", data.hf_plain)):
        for bs in dict.fromkeys((1, streams)):
            r = results.get(bs)
            ms = num(r, "ms_per_token")
            if ms is None and num(r, "per_token_s") is not None:
                ms = (num(r, "per_token_s") or 0.0) * 1e3
            rows.append(
                Row(
                    f"transformers {label}, batch {bs}",
                    "comparison",
                    NA if r is None else f"{f0(num(r, 'tokens_per_s'))} tok/s, {f2(ms)} ms/token",
                    REFERENCE if r is not None else NOT_RUN,
                )
            )
    return rows


def issue_targets(data: SuiteData, streams: int = STREAMS) -> list[Row]:
    """Issue 16's targets 1-6, in its order: each met, missed or not run."""
    rows = throughput_rows(data, streams) + topp_rows(data, streams) + single_stream_rows(data)
    return rows + engine_target_rows(data, streams) + one_process_rows(data, streams) + outside_rows(data, streams)


def target_rows(data: SuiteData, streams: int = STREAMS) -> list[Row]:
    """The "target vs measured" table: the targets (the engine's draw beside target 4), then the report rows."""
    targets = issue_targets(data, streams)
    after_engine = max(i for i, r in enumerate(targets) if r.what.startswith("4.")) + 1
    rows = (
        targets[:after_engine]
        + engine_draw_rows(data, streams)
        + engine_ahead_rows(data, streams)
        + engine_invariant_rows(data, streams)
        + targets[after_engine:]
    )
    stacks = sorted(data.stacks, key=lambda s: -s.workers) or [StackRun(MANY_WORKERS, {}, {})]
    rows += seed_rows(stacks) + batching_rows(stacks, streams) + penalty_rows(stacks, streams)
    return rows + reference_rows(data, streams)
