"""benchmarks.gpu_summary on synthetic results directories: the target table's verdicts, the counter
arithmetic, and "not run" (never a crash) for whatever is missing. The inputs are written by the
benchmark modules' own summary code, so a format change there shows up here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks import baseline, engine_bench, gpu_summary, hf_static, load
from benchmarks.report import MachineInfo, RunInfo, to_jsonable

pytestmark = pytest.mark.unit


def _info() -> RunInfo:
    return RunInfo(
        "2026-12-01T00:00:00Z", MachineInfo("h", 16, "Linux", "3.12", ["GPU 0: NVIDIA H200"]), "abc", "x", {}
    )


def _write_load(
    directory: Path,
    name: str,
    *,
    n: int,
    latency: float,
    tokens: int,
    wall: float,
    ok: int | None = None,
    ttft: float | None = None,
    itl: list[float] | None = None,
    max_new: int = 128,
    scenario: str | None = None,
) -> None:
    cfg = load.RunConfig(
        name=name,
        endpoint="stream" if ttft is not None else "generate",
        mode="closed",
        base_url="http://x",
        max_new_tokens=max_new,
        sampling=load.Sampling(0.8, 0.95, 50),
        seed=0,
        seeded=False,
        timeout_s=30.0,
        users=n,
        requests_per_user=1,
        scenario=scenario,
    )
    ok = n if ok is None else ok
    results = [
        load.RequestResult(
            i,
            i,
            cfg.endpoint,
            ok=i < ok,
            latency_s=latency,
            ttft_s=ttft,
            itl_s=list(itl or []),
            completion_tokens=tokens,
            error=None if i < ok else "HTTP 503: busy",
        )
        for i in range(n)
    ]
    summary = load.summarize(load.RunResult(cfg, results, wall, n))
    data = {"summary": summary, "run": _info().to_dict(), "config": cfg.public()}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.json").write_text(json.dumps(to_jsonable(data)))


def _metrics(directory: Path, tag: str, when: str, triton: dict[str, float], gateway: str = "") -> None:
    m = directory / "metrics"
    m.mkdir(parents=True, exist_ok=True)
    lines = [f'{k}{{model="gpt2",version="1"}} {v}' for k, v in triton.items()]
    (m / f"{tag}_{when}_triton.txt").write_text("\n".join(lines) + "\n")
    (m / f"{tag}_{when}_gateway.txt").write_text(gateway)


def _suite(root: Path) -> Path:
    """A results directory with a fast engine, a mixed 1-worker stack, no 8-worker runs, plain transformers only."""
    (root / "stages.tsv").parent.mkdir(parents=True, exist_ok=True)
    (root / "stages.tsv").write_text(
        "stage\tstatus\trc\tseconds\tlimit_s\nexport\tok\t0\t40\t240\nhf_static\ttimeout\t124\t150\t150\n"
    )
    (root / "env").mkdir()
    meta = {"source": "random:gpt2:seed=0", "dtype": "fp16", "n_layer": 12, "max_context": 1024}
    (root / "metadata_gpt2_fp16.json").write_text(
        json.dumps({**meta, "parity": {"max_abs_error": 0.004, "device": "cuda"}})
    )
    (root / "env" / "versions.json").write_text(
        json.dumps({"gpu": "NVIDIA H200", "git_commit": "abc1234", "versions": {"torch": "2.11"}})
    )
    rows = [
        engine_bench.RowsResult(1, 32, 0.01, (0.0004, 0.0004, 0.0005)),
        engine_bench.RowsResult(512, 32, 0.5, (0.002, 0.002, 0.003)),
    ]
    engine = {"rows": {str(r.rows): r.summary() for r in rows}, "run": _info().to_dict()}
    (root / "engine").mkdir()
    (root / "engine" / "engine_bench.json").write_text(json.dumps(engine))

    w1 = root / "stack_w1"
    itl = [0.0012, 0.0014, 0.0016]
    _write_load(w1, "closed-stream-c1-r12-t128-single", n=4, latency=0.2, tokens=128, wall=1.0, ttft=0.008, itl=itl)
    _write_load(w1, "closed-generate-c512-r2-t128-streams", n=512, latency=0.4, tokens=128, wall=0.4)  # 163,840 tok/s
    for sc, mean in (("light", 0.2), ("medium", 0.24), ("heavy", 0.3)):
        _write_load(w1, f"{sc}-generate-seed", n=5, latency=mean, tokens=50, wall=2.0, scenario=sc)
    _write_load(w1, "closed-generate-c512-r1-t32-topp", n=512, latency=2.0, tokens=32, wall=2.0, ok=500, max_new=32)
    before: dict[str, float] = {
        "nv_inference_count": 1000,
        "nv_inference_exec_count": 100,
        "nv_inference_request_success": 100,
    }
    before |= {"nv_inference_compute_infer_duration_us": 5e5, "nv_inference_queue_duration_us": 1e4}
    after: dict[str, float] = {"nv_inference_count": 1000 + 128 * 480, "nv_inference_exec_count": 228}
    after |= {"nv_inference_request_success": 400, "nv_inference_compute_infer_duration_us": 5e5 + 128 * 2000.0}
    after |= {"nv_inference_queue_duration_us": 1e4 + 300 * 100.0, "gpt2_kv_live_sequences": 0}
    before |= {"gpt2_rows_total": 1000, "gpt2_steps_total": 100, "gpt2_graph_replays_total": 90}
    after |= {"gpt2_rows_total": 1000 + 128 * 480, "gpt2_steps_total": 228, "gpt2_graph_replays_total": 210}
    before |= {"gpt2_decode_tokens_total": 500, "gpt2_live_at_step_total": 500}
    after |= {"gpt2_decode_tokens_total": 500 + 128 * 470, "gpt2_live_at_step_total": 500 + 128 * 480}
    fetches = 'gateway_full_row_fetches_total{reason="top_k"}'
    gw_before = f"gateway_step_rows_sum 10.0\ngateway_step_rows_count 5.0\n{fetches} 2.0\n"
    gw_after = f"gateway_step_rows_sum 61450.0\ngateway_step_rows_count 133.0\n{fetches} 5.0\n"
    _metrics(w1, "streams", "before", before, gw_before)
    _metrics(w1, "streams", "after", after, gw_after)
    topp_gw = gw_after + 'gateway_full_row_fetches_total{reason="top_p"} 16000.0\n'
    _metrics(w1, "topp", "before", after, gw_after)
    _metrics(w1, "topp", "after", {**after, "nv_inference_count": after["nv_inference_count"] + 1}, topp_gw)
    (root / "stack_w8").mkdir()  # started, but nothing finished

    plain = [baseline.BatchResult(bs, (1.0, 1.1, 0.9), (0.01,), 32, 128) for bs in (1, 32, 512)]
    (root / "hf").mkdir()
    (root / "hf" / "baseline-random-gpt2-cuda-fp16-plain.json").write_text(
        json.dumps({"results": [r.summary() for r in plain], "run": _info().to_dict()})
    )
    (root / "tests").mkdir()
    (root / "tests" / "triton_model.xml").write_text(
        '<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="9" failures="0" errors="0" skipped="0">'
        "</testsuite></testsuites>"
    )
    (root / "tests" / "gateway_seeded.xml").write_text("<not xml")
    return root


def _by_what(rows: list[gpu_summary.Row]) -> dict[str, gpu_summary.Row]:
    return {r.what: r for r in rows}


def test_targets_met_missed_and_not_run(tmp_path: Path) -> None:
    data = gpu_summary.collect(_suite(tmp_path / "2026-12-01-h200"))
    rows = _by_what(gpu_summary.target_rows(data))
    assert rows["512 streams, /generate, tok/s (1 worker)"].status == "met"  # 512*128/0.4 = 163,840
    assert "163,840 tok/s (100.0% ok)" in rows["512 streams, /generate, tok/s (1 worker)"].measured
    assert rows["512 streams, /generate, tok/s (8 workers)"].status == "not run"
    assert rows["single stream ITL p50 (1 worker)"].status == "met"  # 1.4 ms
    assert rows["single stream ITL p50 (1 worker)"].measured == "1.40 ms"
    assert rows["single stream TTFT p50 (1 worker)"].status == "met"  # 8 ms
    assert rows["step engine alone, 512 rows, tok/s"].status == "missed"  # 512 / 2 ms = 256,000
    assert rows["step engine alone, 1 row, ms/step (p50)"].status == "met"  # 0.4 ms
    assert rows["seed light mean latency (1 worker)"].status == "met"
    assert rows["seed medium mean latency (1 worker)"].status == "met"
    assert rows["seed heavy mean latency (1 worker)"].status == "missed"
    assert rows["seed heavy mean latency (8 workers)"].status == "not run"
    rpe = rows["rows per Triton execution at 512 streams (1 worker)"]
    assert rpe.status == "report only" and "= 480.0 (93.8% of 512)" in rpe.measured  # 61,440 rows / 128 executions
    share = rows["live sequences stepping together at 512 streams (1 worker)"]
    assert share.status == "met" and share.measured.startswith("97.9%")  # 470 of 480 live rows per step
    topp = rows["top-p 0.95 (top-k off), tok/s (1 worker)"]
    assert topp.status == "report only" and "97.7% ok" in topp.measured and "32 new tokens" in topp.measured
    assert "full-row fetches 16,000" in topp.measured  # a label absent before the run counts from zero
    assert rows["transformers plain generate, batch 512"].status == "reference"
    assert "65,536 tok/s" in rows["transformers plain generate, batch 512"].measured  # 512*128/1.0
    assert rows["transformers static cache + compile, batch 1"].status == "not run"


def test_counters_arithmetic(tmp_path: Path) -> None:
    data = gpu_summary.collect(_suite(tmp_path / "r"))
    c = data.stacks[0].counters["streams"]
    assert (c.rows, c.executions, c.requests) == (61440, 128, 300)
    assert c.rows_per_exec == pytest.approx(480.0)
    assert c.full_row_fetches == {"top_k": 3.0}
    assert gpu_summary.ratio(c.gateway_step_rows, c.gateway_steps) == pytest.approx(61440 / 128)
    assert c.kv_live_after == 0
    empty = data.stacks[1].counters["streams"]
    assert empty.rows is None and empty.rows_per_exec is None
    table = gpu_summary.counters_table(data)
    assert "| 8 |" not in table  # runs that did not happen are left out
    assert (
        "| 1 | streams | 61,440 | 128 | 480.00 | 300 | 2.000 | 0.100 | 480.00 | 120 | 480.00 | top_k: 3 | 0 |" in table
    )


def test_render_and_main_write_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _suite(tmp_path / "2026-12-01-h200")
    assert gpu_summary.main([str(root)]) == 0
    text = (root / "summary.md").read_text()
    assert text == capsys.readouterr().out
    assert "# GPU suite summary: 2026-12-01-h200" in text and "NVIDIA H200" in text and "abc1234" in text
    assert "| triton_model | 9 | 0 | 0 | 0 | ok |" in text
    assert (
        "- model: random:gpt2:seed=0, fp16, 12 layers, context 1024; export parity max abs error 0.004 on cuda" in text
    )
    assert "| gateway_seeded | n/a | n/a | n/a | n/a | unreadable |" in text
    assert "| hf_static | timeout | 124 | 150 | 150 |" in text
    data: dict[str, Any] = json.loads((root / "summary.json").read_text())
    assert {t["status"] for t in data["targets"]} >= {"met", "missed", "not run", "report only", "reference"}


def test_empty_directory_is_all_not_run(tmp_path: Path) -> None:
    assert gpu_summary.main([str(tmp_path)]) == 0
    text = (tmp_path / "summary.md").read_text()
    rows = gpu_summary.target_rows(gpu_summary.collect(tmp_path))
    assert rows and {r.status for r in rows} == {"not run"}
    assert "no stages.tsv" in text and "not run" in text


def test_malformed_inputs_do_not_crash(tmp_path: Path) -> None:
    (tmp_path / "engine").mkdir()
    (tmp_path / "engine" / "engine_bench.json").write_text("{truncated")
    w = tmp_path / "stack_w1"
    (w / "metrics").mkdir(parents=True)
    (w / "closed-generate-c512-r2-t128-streams.json").write_text(json.dumps({"summary": "oops"}))
    (w / "metrics" / "streams_before_triton.txt").write_text("garbage line\n# HELP x\n")
    (w / "metrics" / "streams_after_triton.txt").write_text("nv_inference_count 5\n")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "hf-static-x.json").write_text(json.dumps({"results": [{"no": "batch"}]}))
    data = gpu_summary.collect(tmp_path)
    assert data.stacks[0].counters["streams"].rows is None  # the "before" scrape had no sample
    assert {r.status for r in gpu_summary.target_rows(data)} == {"not run"}
    gpu_summary.render(data)


def test_prometheus_parsing_and_deltas() -> None:
    text = (
        "# HELP nv_inference_count x\n"
        'nv_inference_count{model="gpt2",version="1"} 10\n'
        'nv_inference_count{model="gpt2",version="2"} 5\n'
        'gateway_full_row_fetches_total{reason="top_p"} 7.0\n'
        "gateway_step_rows_sum 1.5e+03\n"
    )
    parsed = gpu_summary.parse_prometheus(text)
    assert gpu_summary.metric_sum(parsed, "nv_inference_count") == 15
    assert gpu_summary.metric_sum(parsed, "nv_inference_count", version="2") == 5
    assert gpu_summary.metric_sum(parsed, "gateway_step_rows_sum") == 1500
    assert gpu_summary.metric_sum(parsed, "missing") is None
    later = gpu_summary.parse_prometheus('nv_inference_count{model="gpt2",version="1"} 12\n')
    assert gpu_summary.delta(parsed, later, "nv_inference_count") is None  # went backwards: another process
    assert gpu_summary.delta(later, parsed, "nv_inference_count") == 3
    assert gpu_summary.delta(None, parsed, "nv_inference_count") is None


def test_hf_static_results_are_read(tmp_path: Path) -> None:
    r = hf_static.StaticResult(512, 32, 128, (20.0,), (0.5, 0.6, 0.7))
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "hf-static-random-gpt2-cuda-fp16-static.json").write_text(json.dumps({"results": [r.summary()]}))
    rows = _by_what(gpu_summary.target_rows(gpu_summary.collect(tmp_path)))
    static = rows["transformers static cache + compile, batch 512"]
    assert static.status == "reference" and static.measured == "109,227 tok/s, 4.69 ms/token"


# ------------------------------------------------------------------------------------- cpu_summary


def test_cpu_summary_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import cpu_summary

    for c in (1, 4):
        name = f"closed-stream-c{c}-r3-t64-cpu_stack_topk"
        _write_load(tmp_path, name, n=c, latency=1.0, tokens=64, wall=2.0, ttft=0.05, itl=[0.03, 0.031], max_new=64)
    # transformers: batch 1 slower than ours (32 tok/s), batch 4 faster (128 tok/s vs 256)
    results = [baseline.BatchResult(1, (2.5,), (0.1,), 24, 64), baseline.BatchResult(4, (1.0,), (0.1,), 24, 64)]
    (tmp_path / "baseline-random-gpt2-cpu-fp32-cpu_transformers_topk.json").write_text(
        json.dumps({"results": [r.summary() for r in results], "run": _info().to_dict()})
    )
    assert cpu_summary.main([str(tmp_path)]) == 0
    text = (tmp_path / "cpu_summary.md").read_text()
    assert text == capsys.readouterr().out
    rows = {(r["mode"], r["concurrency"]): r for r in json.loads((tmp_path / "cpu_summary.json").read_text())["rows"]}
    one, four = rows[("topk", 1)], rows[("topk", 4)]
    assert one["ours_tok_s"] == pytest.approx(32.0) and one["transformers_tok_s"] == pytest.approx(25.6)
    assert one["status"] == "met" and one["ours_over_transformers"] == pytest.approx(1.25)
    assert four["status"] == "missed" and four["ours_over_transformers"] == pytest.approx(128 / 256)
    assert one["ours_itl_p50_ms"] == pytest.approx(30.5)
    assert "1 of 2 rows met" in text and "top-k 50 (top-p off)" in text
    assert not any(mode == "topp" for mode, _ in rows)  # top-p did not run: no rows, no crash


def test_cpu_summary_of_an_empty_directory(tmp_path: Path) -> None:
    from benchmarks import cpu_summary

    assert cpu_summary.main([str(tmp_path)]) == 0
    assert "nothing ran" in (tmp_path / "cpu_summary.md").read_text()
