"""Summary of one `benchmarks/gpu_suite.sh` run: `python -m benchmarks.gpu_summary RESULTS_DIR`.

Reads what the suite wrote under RESULTS_DIR and writes RESULTS_DIR/summary.md (and summary.json):
issue 16's targets, each met / missed / not run with the figures it was judged on (ratios between
figures of the same run), the rows kept for context, the Triton / gateway counters of every run, the
correctness suites, the stages' outcomes and the environment. Anything missing (a stage that failed,
timed out or was skipped) shows as "not run"; this program never fails on missing or malformed inputs.

    inputs.py   the results directory -> SuiteData (its layout is documented there)
    metrics.py  Prometheus scrapes -> counter deltas per run (rows per execution, device-drawn rows, ...)
    targets.py  issue 16's targets as rows of the table (the goals are its constants)
    rows.py     the whole table: the targets, then the report-only rows
    render.py   summary.md, summary.json and the command line
"""

from __future__ import annotations

from benchmarks.gpu_summary.inputs import LOAD_TAGS, RUN_TAGS, SCENARIOS, StackRun, SuiteData, collect
from benchmarks.gpu_summary.metrics import (
    COUNTER_METRICS,
    Counters,
    delta,
    metric_sum,
    parse_prometheus,
    ratio,
    run_counters,
)
from benchmarks.gpu_summary.render import counters_table, main, phases_table, render, to_json
from benchmarks.gpu_summary.rows import issue_targets, target_rows
from benchmarks.gpu_summary.targets import MET, MISSED, NOT_RUN, REFERENCE, REPORT, STREAMS, Row, judge, stack_rate

__all__ = [
    "COUNTER_METRICS",
    "LOAD_TAGS",
    "MET",
    "MISSED",
    "NOT_RUN",
    "REFERENCE",
    "REPORT",
    "RUN_TAGS",
    "SCENARIOS",
    "STREAMS",
    "Counters",
    "Row",
    "StackRun",
    "SuiteData",
    "collect",
    "counters_table",
    "delta",
    "issue_targets",
    "judge",
    "main",
    "metric_sum",
    "parse_prometheus",
    "phases_table",
    "ratio",
    "render",
    "run_counters",
    "stack_rate",
    "target_rows",
    "to_json",
]
