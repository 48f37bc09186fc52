"""Pure helpers shared by the load generator and the transformers baseline.

Contracts:
- `percentile` uses linear interpolation between closest ranks on the sorted sample, the same as
  `numpy.percentile(..., method="linear")` (numpy's default). It is defined for every non-empty
  sample (with one sample every percentile is that sample) and returns None for an empty one;
  None is rendered as "n/a", never as 0.
- Rendering functions return strings and never touch the file system; only `write_outputs` writes,
  and only `machine_info` / `git_commit` / `RunInfo.collect` look at the machine, when called.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

NA = "n/a"


def percentile(samples: Iterable[float], q: float) -> float | None:
    """The q-th percentile (0 <= q <= 100) of `samples`, or None if there are none.

    Linear interpolation on the sorted sample: rank h = (n - 1) * q / 100, result
    x[floor(h)] + (h - floor(h)) * (x[floor(h) + 1] - x[floor(h)]). Equals numpy's default method.
    Raises ValueError for q outside [0, 100] or a NaN sample.
    """
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    xs = sorted(float(x) for x in samples)
    if not xs:
        return None
    if any(math.isnan(x) for x in xs):
        raise ValueError("percentile of a sample containing NaN")
    h = (len(xs) - 1) * q / 100.0
    lo = math.floor(h)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (h - lo) * (xs[hi] - xs[lo])


def mean(samples: Sequence[float]) -> float | None:
    """Arithmetic mean, or None for an empty sample."""
    return math.fsum(samples) / len(samples) if samples else None


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None if either is missing or the denominator is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


@dataclass(frozen=True)
class Distribution:
    """Summary of one sample. Every statistic is None when n == 0."""

    n: int
    mean: float | None
    p50: float | None
    p95: float | None
    p99: float | None
    min: float | None
    max: float | None

    @classmethod
    def of(cls, samples: Iterable[float]) -> Distribution:
        """Summarize `samples` (any iterable of numbers, possibly empty)."""
        xs = sorted(float(x) for x in samples)
        return cls(
            n=len(xs),
            mean=mean(xs),
            p50=percentile(xs, 50),
            p95=percentile(xs, 95),
            p99=percentile(xs, 99),
            min=xs[0] if xs else None,
            max=xs[-1] if xs else None,
        )

    def scaled(self, factor: float) -> Distribution:
        """The same distribution with every statistic multiplied by `factor` (e.g. 1000 for s -> ms)."""

        def s(v: float | None) -> float | None:
            return None if v is None else v * factor

        return Distribution(self.n, s(self.mean), s(self.p50), s(self.p95), s(self.p99), s(self.min), s(self.max))


def fmt(value: float | int | None, digits: int = 3, scale: float = 1.0) -> str:
    """Format a number for a table: None (or NaN) -> "n/a", ints as ints, floats with `digits` decimals."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return NA
    if isinstance(value, int) and not isinstance(value, bool) and scale == 1.0:
        return str(value)
    return f"{value * scale:.{digits}f}"


def fmt_pct(value: float | None, digits: int = 1) -> str:
    """Format a fraction in [0, 1] as a percentage ("99.2%"); None -> "n/a"."""
    return NA if value is None else f"{value * 100:.{digits}f}%"


def _cell(value: Any) -> str:
    text = NA if value is None else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table. None cells render as "n/a"; pipes are escaped.

    Raises ValueError if a row's length differs from the header's.
    """
    lines = ["| " + " | ".join(_cell(h) for h in headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row has {len(row)} cells, header has {len(headers)}")
        lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
    return "\n".join(lines) + "\n"


def csv_text(rows: Sequence[Mapping[str, Any]], fieldnames: Sequence[str] | None = None) -> str:
    """CSV with a header row. Columns are `fieldnames`, or the union of the rows' keys in first-seen order.

    None becomes an empty cell; lists/dicts are JSON-encoded.
    """
    if fieldnames is None:
        seen: dict[str, None] = {}
        for row in rows:
            seen.update(dict.fromkeys(row))
        fieldnames = list(seen)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(fieldnames), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_value(row.get(k)) for k in fieldnames})
    return buf.getvalue()


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, list | tuple | dict):
        return json.dumps(value, ensure_ascii=False)
    return value


@dataclass(frozen=True)
class MachineInfo:
    """Where a benchmark ran. `gpus` is `nvidia-smi -L` output lines, empty if it is missing or fails."""

    hostname: str
    cpu_count: int | None
    platform: str
    python: str
    gpus: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """One line: hostname, CPUs, GPUs."""
        gpu = "; ".join(self.gpus) if self.gpus else "no GPU (nvidia-smi -L unavailable)"
        return f"{self.hostname}, {self.cpu_count} CPUs, {self.platform}, Python {self.python}, {gpu}"


def _run_quiet(cmd: Sequence[str], cwd: str | Path | None = None, timeout_s: float = 10.0) -> str | None:
    """stdout of `cmd`, or None if the program is missing, fails or times out."""
    if shutil.which(cmd[0]) is None:
        return None
    try:
        proc = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def gpu_names() -> list[str]:
    """Lines of `nvidia-smi -L` (e.g. "GPU 0: NVIDIA H100 ... (UUID: ...)"), UUIDs stripped; [] if unavailable."""
    out = _run_quiet(["nvidia-smi", "-L"])
    if not out:
        return []
    return [re.sub(r"\s*\(UUID:[^)]*\)", "", line).strip() for line in out.splitlines() if line.strip()]


def machine_info() -> MachineInfo:
    """Describe this machine (runs `nvidia-smi -L` if present)."""
    return MachineInfo(
        hostname=socket.gethostname(),
        cpu_count=os.cpu_count(),
        platform=platform.platform(),
        python=platform.python_version(),
        gpus=gpu_names(),
    )


def git_commit(cwd: str | Path | None = None) -> str | None:
    """`git rev-parse --short HEAD` (with "-dirty" if tracked files changed), or None outside a git checkout."""
    commit = _run_quiet(["git", "rev-parse", "--short", "HEAD"], cwd=cwd)
    if not commit:
        return None
    commit = commit.strip()
    status = _run_quiet(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd)
    return f"{commit}-dirty" if status else commit


@dataclass(frozen=True)
class RunInfo:
    """Provenance recorded with every report: when, where, which commit, with which parameters."""

    date_utc: str
    machine: MachineInfo
    git_commit: str | None
    command: str
    parameters: dict[str, Any]

    @classmethod
    def collect(cls, parameters: Mapping[str, Any], argv: Sequence[str] | None = None) -> RunInfo:
        """Gather date (UTC, ISO 8601), machine info and git commit now."""
        args = list(sys.argv if argv is None else argv)
        return cls(
            date_utc=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            machine=machine_info(),
            git_commit=git_commit(),
            command=" ".join(args),
            parameters=dict(parameters),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary."""
        return asdict(self)

    def markdown(self) -> str:
        """A short markdown block with the provenance, for the end of a report."""
        params = ", ".join(f"`{k}={v}`" for k, v in self.parameters.items())
        return (
            f"- date (UTC): {self.date_utc}\n"
            f"- machine: {self.machine.describe()}\n"
            f"- git commit: {self.git_commit or NA}\n"
            f"- command: `{self.command}`\n"
            f"- parameters: {params}\n"
        )


_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(name: str) -> str:
    """`name` made safe as a file name stem (runs of other characters become '_')."""
    cleaned = _SAFE_NAME.sub("_", name).strip("._")
    return cleaned or "run"


def to_jsonable(value: Any) -> Any:
    """Dataclasses -> dicts, tuples -> lists, NaN/inf -> None, recursively."""
    if hasattr(value, "__dataclass_fields__") and not isinstance(value, type):
        return to_jsonable(asdict(value))
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_outputs(
    out_dir: str | Path,
    name: str,
    markdown: str,
    rows: Sequence[Mapping[str, Any]],
    summary: Mapping[str, Any],
    fieldnames: Sequence[str] | None = None,
) -> list[Path]:
    """Write DIR/<name>.md, DIR/<name>.csv (one row per entry of `rows`) and DIR/<name>.json (`summary`).

    Creates DIR if needed, overwrites existing files, returns the three paths.
    """
    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    stem = safe_name(name)
    md_path, csv_path, json_path = (directory / f"{stem}{ext}" for ext in (".md", ".csv", ".json"))
    md_path.write_text(markdown, encoding="utf-8")
    csv_path.write_text(csv_text(rows, fieldnames), encoding="utf-8")
    json_path.write_text(json.dumps(to_jsonable(summary), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return [md_path, csv_path, json_path]
