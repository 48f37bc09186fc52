"""The load report's charts (benchmarks/load/charts.py) and the package split keeping the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import load
from benchmarks.report import write_outputs

pytestmark = pytest.mark.unit

PNG = b"\x89PNG\r\n\x1a\n"


def _results(n: int, *, stream: bool, slow: float = 1.0) -> list[load.RequestResult]:
    out = []
    for i in range(n):
        r = load.RequestResult(i, i % 4, "stream" if stream else "generate", ok=i % 10 != 9)
        r.start_s = i * 0.05
        r.latency_s = (0.2 + 0.01 * (i % 7)) * slow
        r.completion_tokens = 16
        if stream:
            r.ttft_s = 0.03 * slow + 0.001 * i
            r.itl_s = [0.01 * slow + 0.0001 * k for k in range(15)]
        out.append(r)
    return out


def _assert_pngs(paths: list[Path], expected: set[str]) -> None:
    assert {p.name for p in paths} == expected
    for p in paths:
        data = p.read_bytes()
        assert data.startswith(PNG) and len(data) > 5_000, p


def test_stream_runs_get_every_chart(tmp_path: Path) -> None:
    series = load.Series.of("run", _results(40, stream=True))
    assert len(series.latency_s) == 36  # failed requests are left out
    paths = load.write_charts(tmp_path, "closed-stream-c4", [series])
    _assert_pngs(paths, {f"closed-stream-c4-{c}.png" for c in load.CHARTS})


def test_non_stream_runs_skip_ttft_and_itl(tmp_path: Path) -> None:
    paths = load.write_charts(tmp_path, "gen", [load.Series.of("gen", _results(12, stream=False))])
    _assert_pngs(paths, {"gen-latency-cdf.png", "gen-tokens-per-s.png"})


def test_the_baseline_comes_from_an_earlier_runs_csv(tmp_path: Path) -> None:
    earlier = _results(20, stream=True, slow=2.0)
    (_, csv_path, _) = write_outputs(tmp_path, "before", "# md\n", [r.row() for r in earlier], {}, load.CSV_FIELDS)
    baseline = load.Series.from_csv(csv_path)
    assert baseline.baseline and baseline.label == "baseline (before)"
    expected = load.Series.of("x", earlier)
    assert baseline.latency_s == pytest.approx(expected.latency_s)
    assert baseline.itl_s == pytest.approx(expected.itl_s)
    assert [t for t, _ in baseline.finished] == pytest.approx([t for t, _ in expected.finished])
    assert [n for _, n in baseline.finished] == [n for _, n in expected.finished]
    current = load.Series.of("now", _results(20, stream=True))
    with_baseline = load.write_charts(tmp_path / "a", "run", [current], baseline)
    alone = load.write_charts(tmp_path / "b", "run", [current])
    for a, b in zip(sorted(with_baseline), sorted(alone), strict=True):
        assert a.read_bytes() != b.read_bytes()  # the baseline is drawn in the same chart


def test_every_existing_flag_still_parses() -> None:
    args = load.build_parser().parse_args(
        [
            "--base-url", "http://x:1", "--endpoint", "stream", "--concurrency", "2", "--requests", "3",
            "--max-new-tokens", "4", "--prompt-tokens", "5", "--tokenizer", "t", "--think-time-s", "0",
            "--temperature", "0.5", "--top-p", "0.9", "--top-k", "7", "--seed", "3", "--seeded",
            "--timeout-s", "9", "--warmup", "0", "--api-key", "k", "--out", "o", "--tag", "t",
            "--baseline", "b.csv",
        ]
    )  # fmt: skip
    assert args.endpoint == "stream" and args.baseline == "b.csv" and args.tag == "t"
    assert load.build_parser().parse_args(["--rate", "2", "--duration-s", "3"]).rate == 2.0
    assert load.build_parser().parse_args(["--scenario", "all"]).scenario == "all"


def test_python_dash_m_benchmarks_load_still_runs() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.load", "--help"], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.startswith("usage: python -m benchmarks.load") and "--baseline" in out.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "benchmarks.load", "--baseline", "/no/such.csv"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "such.csv" in bad.stderr
