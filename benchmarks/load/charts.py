"""PNG charts of a load run, written next to its markdown: DIR/<name>-<chart>.png.

* `latency-cdf`: end-to-end latency CDF of the successful requests;
* `ttft`, `itl`: histograms of time to first token and of inter-token latency (stream endpoint;
  skipped when no request measured them);
* `tokens-per-s`: generated tokens per second over the run (each successful request's tokens
  counted at its end, in one-second bins, or finer for short runs).

Each chart overlays every run given (one per `--scenario all` run) and the baseline (`--baseline`,
an earlier run's CSV) in grey. matplotlib with the Agg backend (no display needed).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from benchmarks.load.client import RequestResult
from benchmarks.report import safe_name

CHARTS = ("latency-cdf", "ttft", "itl", "tokens-per-s")
BASELINE_COLOR = "0.55"


@dataclass
class Series:
    """What the charts need from one run: successful requests only, times in seconds."""

    label: str
    latency_s: list[float] = field(default_factory=list)
    ttft_s: list[float] = field(default_factory=list)
    itl_s: list[float] = field(default_factory=list)
    finished: list[tuple[float, int]] = field(default_factory=list)  # (end time from run start, tokens)
    baseline: bool = False

    @classmethod
    def of(cls, label: str, results: Sequence[RequestResult], *, baseline: bool = False) -> Series:
        s = cls(label, baseline=baseline)
        for r in results:
            if not r.ok or r.latency_s is None:
                continue
            s.latency_s.append(r.latency_s)
            if r.ttft_s is not None:
                s.ttft_s.append(r.ttft_s)
            s.itl_s.extend(r.itl_s)
            s.finished.append((r.start_s + r.latency_s, r.completion_tokens))
        return s

    @classmethod
    def from_csv(cls, path: str | Path, label: str | None = None) -> Series:
        """A baseline from the CSV `python -m benchmarks.load --out` wrote (one row per request)."""
        results = []
        with open(path, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                results.append(
                    RequestResult(
                        index=int(row["index"]),
                        user=int(row["user"]),
                        endpoint=row["endpoint"],
                        ok=row["ok"] == "1",
                        start_s=float(row["start_s"] or 0.0),
                        latency_s=_float(row["latency_s"]),
                        ttft_s=_float(row["ttft_s"]),
                        itl_s=[ms / 1000 for ms in json.loads(row["itl_ms"] or "[]")],
                        completion_tokens=int(row["completion_tokens"] or 0),
                    )
                )
        return cls.of(label or f"baseline ({Path(path).stem})", results, baseline=True)


def _float(text: str) -> float | None:
    return float(text) if text else None


def write_charts(out_dir: str | Path, name: str, runs: Sequence[Series], baseline: Series | None = None) -> list[Path]:
    """Write the charts that have data; returns their paths."""
    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    series = [*runs, *([baseline] if baseline is not None else [])]
    stem = safe_name(name)
    written = []
    for chart, draw in (
        ("latency-cdf", _latency_cdf),
        ("ttft", _ttft),
        ("itl", _itl),
        ("tokens-per-s", _tokens_per_s),
    ):
        fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
        try:
            if not draw(ax, series):
                continue
            ax.grid(True, alpha=0.3)
            ax.legend(loc="best", fontsize="small")
            fig.tight_layout()
            path = directory / f"{stem}-{chart}.png"
            fig.savefig(path, format="png")
            written.append(path)
        finally:
            plt.close(fig)
    return written


def _style(s: Series) -> dict[str, Any]:
    return {"color": BASELINE_COLOR, "linestyle": "--"} if s.baseline else {}


def _latency_cdf(ax: plt.Axes, series: Sequence[Series]) -> bool:
    drawn = False
    for s in series:
        if not s.latency_s:
            continue
        values = sorted(s.latency_s)
        fractions = [(i + 1) / len(values) for i in range(len(values))]
        ax.step(values, fractions, where="post", label=f"{s.label} (n={len(values)})", **_style(s))
        drawn = True
    ax.set(title="End-to-end latency CDF", xlabel="latency (s)", ylabel="fraction of requests", ylim=(0, 1.02))
    return drawn


def _histogram(ax: plt.Axes, series: Sequence[Series], attr: str, title: str) -> bool:
    present = [s for s in series if getattr(s, attr)]
    if not present:
        return False
    top = max(max(getattr(s, attr)) for s in present) * 1000
    bins = [top * i / 40 for i in range(41)] if top > 0 else 10
    for s in present:
        values = [v * 1000 for v in getattr(s, attr)]
        kind: Literal["step", "stepfilled"] = "step" if s.baseline else "stepfilled"
        alpha = 1.0 if s.baseline else 0.5
        ax.hist(values, bins=bins, histtype=kind, alpha=alpha, label=f"{s.label} (n={len(values)})", **_style(s))
    ax.set(title=title, xlabel="milliseconds", ylabel="count")
    return True


def _ttft(ax: plt.Axes, series: Sequence[Series]) -> bool:
    return _histogram(ax, series, "ttft_s", "Time to first token")


def _itl(ax: plt.Axes, series: Sequence[Series]) -> bool:
    return _histogram(ax, series, "itl_s", "Inter-token latency")


def _tokens_per_s(ax: plt.Axes, series: Sequence[Series]) -> bool:
    drawn = False
    for s in series:
        if not s.finished:
            continue
        end = max(t for t, _ in s.finished)
        width = 1.0 if end >= 10 else max(end / 10, 0.01)  # at least ten bins
        n = max(1, math.ceil(end / width))
        tokens = [0.0] * n
        for t, count in s.finished:
            tokens[min(int(t / width), n - 1)] += count
        xs = [(i + 1) * width for i in range(n)]
        ax.step(xs, [c / width for c in tokens], where="pre", label=s.label, **_style(s))
        drawn = True
    ax.set(title="Generated tokens per second", xlabel="time since the run started (s)", ylabel="tokens/s")
    return drawn
