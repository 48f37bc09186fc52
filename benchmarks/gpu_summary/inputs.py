"""What one `benchmarks/gpu_suite.sh` run wrote, read into `SuiteData`; never fails on a missing or
malformed file (that part is None or empty, and shows as "not run").

The layout (gpu_suite.sh writes it; the names are the constants below):

    stages.tsv                        stage, status, rc, seconds, limit_s
    env/versions.json                 package versions, GPU, git commit
    metadata_*.json                   the served export's metadata.json (shape, dtype, parity)
    engine/engine_bench.json          benchmarks.engine_bench, plain
    engine/engine_bench-draw.json     benchmarks.engine_bench --draw top_p=0.9 (every row drawn on the device)
    engine/engine_bench-invariant.json  benchmarks.engine_bench --invariant-rows 16 (a reserved range of 64)
    stack_w<W>/<name>-<tag>.json      benchmarks.load, tag in LOAD_TAGS (<W> = gateway workers)
    stack_w<W>/guidellm.json          benchmarks.outside_client (guidellm's report)
    stack_w<W>/metrics/<tag>_{before,after}_{triton,gateway}.txt
                                      Prometheus scrapes around each run, tag in RUN_TAGS
    hf/baseline-*-plain.json          benchmarks.baseline
    hf/hf-static-*.json               benchmarks.hf_static
    tests/*.xml                       pytest --junitxml
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.gpu_summary.metrics import Counters, run_counters
from benchmarks.outside_client import REPORT_NAME, OutsideRun, read_guidellm

# The load runs of one gateway worker count (benchmarks.load --tag):
#   single       1 stream, /v1/completions SSE, 12 requests (TTFT, ITL)
#   streams      512 streams, /generate, 6 requests each, top-k 50
#   completions  512 streams, /v1/completions SSE, 6 requests each, top-k 50
#   topp         the same with the seed's default request: temperature 0.7, top-p 0.9, top-k off
#   penalty      512 streams /generate with presence, frequency and repetition penalties
#   seed         the seed article's light / medium / heavy scenarios
LOAD_TAGS = ("single", "streams", "completions", "topp", "penalty", "seed")
RUN_TAGS = (*LOAD_TAGS, "guidellm")  # runs with counter scrapes around them
SCENARIOS = ("light", "medium", "heavy")


def read_json(path: Path) -> Any:
    """The parsed JSON file, or None when it is missing or malformed."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


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
    """One gateway worker count's runs."""

    workers: int
    loads: dict[str, dict[str, Any] | None]  # tag (or "seed:<scenario>") -> load summary
    counters: dict[str, Counters]  # tag in RUN_TAGS -> counter deltas
    outside: OutsideRun | None = None  # guidellm's figures


def read_stack(directory: Path, workers: int) -> StackRun:
    loads: dict[str, dict[str, Any] | None] = {
        tag: load_summary(directory, f"-{tag}") for tag in LOAD_TAGS if tag != "seed"
    }
    for sc in SCENARIOS:
        loads[f"seed:{sc}"] = load_summary(directory, f"{sc}-generate-seed")
    counters = {tag: run_counters(directory / "metrics", tag) for tag in RUN_TAGS}
    return StackRun(workers, loads, counters, read_guidellm(directory / REPORT_NAME))


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


def engine_rows(path: Path) -> dict[str, dict[str, Any]]:
    """str(N) -> engine_bench row of one engine_bench JSON ({} when missing)."""
    data = read_json(path)
    rows = data.get("rows") if isinstance(data, dict) else None
    return {k: v for k, v in rows.items() if isinstance(v, dict)} if isinstance(rows, dict) else {}


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
    engine_draw: dict[str, dict[str, Any]] = field(default_factory=dict)  # engine_bench --draw top_p=0.9
    # engine_bench --ahead A: every row runs A decodes ahead per step (top-k 50 + top-p 0.95; top-p 0.9)
    engine_ahead: dict[str, dict[str, Any]] = field(default_factory=dict)
    engine_ahead_topp: dict[str, dict[str, Any]] = field(default_factory=dict)
    # engine_bench --invariant-rows 16 --engine-kw invariant_slots=64 (batch invariance's cost)
    engine_invariant: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def card(self) -> str | None:
        """The GPU's name as nvidia-smi gave it."""
        gpu = self.env.get("gpu")
        return gpu.strip().splitlines()[0] if isinstance(gpu, str) and gpu.strip() else None

    def stack(self, workers: int) -> StackRun | None:
        return next((s for s in self.stacks if s.workers == workers), None)


def collect(root: Path) -> SuiteData:
    """Read a results directory (any part may be missing)."""
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
        engine=engine_rows(root / "engine" / "engine_bench.json"),
        stacks=stacks,
        hf_plain=hf_results(root / "hf", "baseline-*-plain.json"),
        hf_static=hf_results(root / "hf", "hf-static-*.json"),
        tests=tests,
        stages=read_stages(root / "stages.tsv"),
        env=env if isinstance(env, dict) else {},
        model=metas[0] if metas else {},
        engine_draw=engine_rows(root / "engine" / "engine_bench-draw.json"),
        engine_ahead=engine_rows(root / "engine" / "engine_bench-ahead.json"),
        engine_ahead_topp=engine_rows(root / "engine" / "engine_bench-ahead-topp.json"),
        engine_invariant=engine_rows(root / "engine" / "engine_bench-invariant.json"),
    )
