"""benchmarks.engine_bench: argument parsing, the engine adapter's checks, and a CPU smoke run on a
tiny fp32 model exported the way the tests export (no Triton, no GPU)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from benchmarks import engine_bench
from export.cli import main as export_main

pytestmark = pytest.mark.unit


def test_parse_rows_and_engine_kw() -> None:
    assert engine_bench.parse_rows("1, 64,512,64") == [1, 64, 512]
    assert engine_bench.parse_rows("") == []
    for bad in ("0", "a,b", "-3"):
        with pytest.raises(ValueError):
            engine_bench.parse_rows(bad)
    assert engine_bench.parse_engine_kw(["cuda_graphs=true", "threads=2", "name=x"]) == {
        "cuda_graphs": True,
        "threads": 2,
        "name": "x",
    }
    with pytest.raises(ValueError):
        engine_bench.parse_engine_kw(["novalue"])


def test_check_step_raises_on_refusals() -> None:
    engine_bench.check_step([SimpleNamespace(topk_ids=np.zeros((2, 1)))])  # no status field: fine
    engine_bench.check_step([SimpleNamespace(status=np.zeros((2, 1), dtype=np.int32))])
    with pytest.raises(RuntimeError, match="refused a request"):
        engine_bench.check_step([ValueError("cache full")])
    with pytest.raises(RuntimeError, match="refused 1 row"):
        engine_bench.check_step([SimpleNamespace(status=np.array([[0], [1]], dtype=np.int32))])


def test_requests_have_the_engine_shapes() -> None:
    prefill = engine_bench.prefill_request([5, 6], np.ones((2, 3), dtype=np.int64))
    assert prefill.lengths.tolist() == [3, 3] and prefill.start.all() and not prefill.end.any()
    decode = engine_bench.decode_request([5, 6], np.ones((2, 1), dtype=np.int64))
    assert decode.lengths.tolist() == [1, 1] and not decode.start.any()
    release = engine_bench.release_request([5, 6])
    assert release.lengths.tolist() == [0, 0] and release.end.all()


def test_cpu_smoke_run(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    args = ["--random-config", "tiny", "--repository", str(repo), "--name", "tiny", "--kv-capacity", "4"]
    assert export_main([*args, "--dtype", "fp32", "--device", "cpu"]) == 0
    out = tmp_path / "out"
    argv = [str(repo / "tiny" / "1"), "--rows", "1,3", "--steps", "4", "--warmup", "1", "--prompt-tokens", "8"]
    argv += ["--profile", "3", "--capacity", "4", "--device", "cpu", "--out", str(out), "--tag", "smoke"]
    argv += ["--draw", "top_p=0.9"]  # every decode row asks for a device draw (the seed's request)
    argv += ["--prefill-rows", "1,2"]  # steps that only start sequences
    assert engine_bench.main(argv) == 0
    report = json.loads((out / "engine_bench-smoke.json").read_text())
    assert set(report["rows"]) == {"1", "3"}
    for n, row in report["rows"].items():
        assert row["steps"] == 4 and row["prompt_tokens"] == 8
        assert 0 < row["decode_step_min_ms"] <= row["decode_step_p50_ms"]
        assert row["tok_per_s_at_p50"] == pytest.approx(int(n) / (row["decode_step_p50_ms"] / 1e3))
    assert report["run"]["parameters"]["rows"] == "1,3"
    assert set(report["prefill"]) == {"1", "2"}
    assert all(0 < p["step_min_ms"] <= p["step_p50_ms"] for p in report["prefill"].values())
    assert "### Prefill steps" in (out / "engine_bench-smoke.md").read_text()
    assert (out / "profile_N3.txt").stat().st_size > 0 and not (out / "profile_N1.txt").exists()
    assert "| 3 | 8 |" in (out / "engine_bench-smoke.md").read_text()
    assert len((out / "engine_bench-smoke.csv").read_text().splitlines()) == 1 + 2 * 4
    # The tiny model's random rows: the nucleus is wider than the window, so rows were drawn.
    assert report["environment"]["device draws"] == "top_p=0.9" and report["environment"]["drawn rows"] > 0
