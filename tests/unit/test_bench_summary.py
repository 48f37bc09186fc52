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
    per_user: int = 1,
    endpoint: str | None = None,
) -> None:
    """A benchmarks.load JSON of `n` users sending `per_user` requests back to back, each `latency` s
    long with `tokens` tokens (the first `ok` requests succeed)."""
    cfg = load.RunConfig(
        name=name,
        endpoint=endpoint or ("stream" if ttft is not None else "generate"),
        mode="closed",
        base_url="http://x",
        max_new_tokens=max_new,
        sampling=load.Sampling(0.8, 0.95, 50),
        seed=0,
        seeded=False,
        timeout_s=30.0,
        users=n,
        requests_per_user=per_user,
        scenario=scenario,
    )
    ok = n * per_user if ok is None else ok
    results = []
    for i in range(n * per_user):
        user, k = divmod(i, per_user)
        r = load.RequestResult(i, user, cfg.endpoint, ok=i < ok, start_s=k * latency, latency_s=latency)
        r.ttft_s, r.itl_s, r.completion_tokens = ttft, list(itl or []), tokens
        r.prompt_tokens, r.error = 32, None if i < ok else "HTTP 503: busy"
        results.append(r)
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


def _engine(root: Path, name: str, p50s: dict[int, float]) -> None:
    rows = [engine_bench.RowsResult(n, 32, 0.01, (p50, p50, p50 * 1.2)) for n, p50 in p50s.items()]
    data = {"rows": {str(r.rows): r.summary() for r in rows}, "run": _info().to_dict()}
    (root / "engine").mkdir(exist_ok=True)
    (root / "engine" / f"{name}.json").write_text(json.dumps(data))


def _guidellm(directory: Path, tok_s: float) -> None:
    """guidellm's JSON report, the parts benchmarks.outside_client reads (shapes as guidellm 0.8.1 writes)."""

    def stat(mean: float, p50: float) -> dict[str, Any]:
        return {"successful": {"mean": mean, "median": p50, "percentiles": {"p50": p50}}, "errored": {}}

    metrics = {
        "request_totals": {"successful": 2048, "errored": 0, "incomplete": 0, "total": 2048},
        "output_tokens_per_second": stat(tok_s, tok_s * 0.9),
        "time_to_first_token_ms": stat(40.0, 35.0),
        "inter_token_latency_ms": stat(8.0, 7.5),
    }
    bench = {"config": {"strategy": {"type_": "concurrent", "streams": 512}}, "metrics": metrics, "duration": 4.2}
    report = {"metadata": {"guidellm_version": "0.8.1"}, "benchmarks": [bench]}
    (directory / "guidellm.json").write_text(json.dumps(report))


def _counters(
    directory: Path, tag: str, before: dict[str, float], after: dict[str, float], gw: tuple[str, str]
) -> None:
    _metrics(directory, tag, "before", before, gw[0])
    _metrics(directory, tag, "after", after, gw[1])


def _w8(root: Path) -> Path:
    """The 8-worker stack: completions 65,536 tok/s steady, /generate 32,768 (whole run), top-p 54,613,
    single stream ITL 1.2 ms and TTFT 8 ms, guidellm at 60,000 tok/s."""
    w8 = root / "stack_w8"
    _write_load(w8, "closed-completions-c512-r6-t128-completions", n=512, latency=1.0, tokens=128, wall=6.5, per_user=6)
    _write_load(w8, "closed-generate-c512-r1-t128-streams", n=512, latency=2.0, tokens=128, wall=2.0)
    _write_load(w8, "closed-completions-c512-r6-t128-topp", n=512, latency=1.2, tokens=128, wall=7.5, per_user=6)
    itl = [0.0012] * 3
    _write_load(
        w8,
        "closed-completions-c1-r12-t128-single",
        n=1,
        latency=0.008 + 127 * 0.0012,
        tokens=128,
        wall=3,
        ttft=0.008,
        itl=itl,
    )
    for sc, mean in (("light", 0.2), ("medium", 0.24), ("heavy", 0.3)):
        _write_load(w8, f"{sc}-generate-seed", n=5, latency=mean, tokens=50, wall=2.0, scenario=sc, per_user=2)
    before: dict[str, float] = {
        "nv_inference_count": 1000.0,
        "nv_inference_exec_count": 100.0,
        "nv_inference_request_success": 100.0,
    }
    before |= {"nv_inference_compute_infer_duration_us": 5e5, "nv_inference_queue_duration_us": 1e4}
    before |= {"gpt2_rows_total": 1000, "gpt2_steps_total": 100, "gpt2_graph_replays_total": 90}
    before |= {"gpt2_decode_tokens_total": 500, "gpt2_live_at_step_total": 500, "gpt2_drawn_rows_total": 7}
    after: dict[str, float] = {"nv_inference_count": 1000 + 128 * 480, "nv_inference_exec_count": 228}
    after |= {"nv_inference_request_success": 400, "nv_inference_compute_infer_duration_us": 5e5 + 128 * 2000.0}
    after |= {"nv_inference_queue_duration_us": 1e4 + 300 * 100.0, "gpt2_kv_live_sequences": 0}
    after |= {"gpt2_rows_total": 1000 + 128 * 480, "gpt2_steps_total": 228, "gpt2_graph_replays_total": 210}
    after |= {"gpt2_decode_tokens_total": 500 + 128 * 470, "gpt2_live_at_step_total": 500 + 128 * 480}
    after |= {"gpt2_drawn_rows_total": 7}
    phases = {"execute": 96_000, "parse": 6_400, "respond": 3_200, "prefill": 12_800, "decode": 64_000, "finish": 6_400}
    before |= {f"gpt2_{k}_us_total": 0 for k in phases} | {"gpt2_prefill_runs_total": 0}
    after |= {f"gpt2_{k}_us_total": v for k, v in phases.items()} | {"gpt2_prefill_runs_total": 64}
    fetches = 'gateway_full_row_fetches_total{reason="top_k"}'
    gw_before = f"gateway_step_rows_sum 10.0\ngateway_step_rows_count 5.0\n{fetches} 2.0\n"
    gw_after = f"gateway_step_rows_sum 61450.0\ngateway_step_rows_count 133.0\n{fetches} 5.0\n"
    _counters(w8, "completions", before, after, (gw_before, gw_after))
    topp_after = {**after, "nv_inference_count": after["nv_inference_count"] + 1, "gpt2_drawn_rows_total": 60_007}
    topp_gw = gw_after + 'gateway_full_row_fetches_total{reason="top_p"} 12.0\n'
    _counters(w8, "topp", after, topp_after, (gw_after, topp_gw))
    _guidellm(w8, 60_000.0)
    return w8


def _suite(root: Path) -> Path:
    """A results directory: engine plain and with the draw, transformers static at batch 1 and 512 (plain
    at 512 only), the 8-worker stack, a 1-worker stack with its completions run only."""
    root.mkdir(parents=True)
    (root / "stages.tsv").write_text(
        "stage\tstatus\trc\tseconds\tlimit_s\nexport\tok\t0\t40\t240\nhf_plain\ttimeout\t124\t150\t150\n"
    )
    (root / "env").mkdir()
    meta = {"source": "random:gpt2:seed=0", "dtype": "fp16", "n_layer": 12, "max_context": 1024}
    (root / "metadata_gpt2_fp16.json").write_text(
        json.dumps({**meta, "parity": {"max_abs_error": 0.004, "device": "cuda"}})
    )
    (root / "env" / "versions.json").write_text(
        json.dumps({"gpu": "NVIDIA H200\n", "git_commit": "abc1234", "versions": {"torch": "2.11"}})
    )
    _engine(root, "engine_bench", {1: 0.0004, 64: 0.001, 512: 0.002})  # 512 rows: 256,000 tok/s
    _engine(root, "engine_bench-draw", {1: 0.0005, 512: 0.0022})
    _engine(root, "engine_bench-invariant", {64: 0.0012, 512: 0.0021})
    _w8(root)
    _write_load(
        root / "stack_w1", "closed-completions-c512-r6-t128-completions", n=512, latency=3.0, tokens=128, wall=19.0,
        per_user=6, ok=512 * 6 - 10,
    )  # fmt: skip
    (root / "hf").mkdir()
    static = [
        hf_static.StaticResult(1, 32, 128, (5.0,), (0.256,)),
        hf_static.StaticResult(512, 32, 128, (20.0,), (2.0,)),
    ]
    (root / "hf" / "hf-static-random-gpt2-cuda-fp16-static.json").write_text(
        json.dumps({"results": [r.summary() for r in static], "run": _info().to_dict()})
    )
    plain = [baseline.BatchResult(512, (1.0, 1.1, 0.9), (0.01,), 32, 128)]
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


def _by_number(rows: list[gpu_summary.Row]) -> dict[str, list[gpu_summary.Row]]:
    """Target rows by their number ("1." ... "6."), in table order."""
    out: dict[str, list[gpu_summary.Row]] = {}
    for r in rows:
        head = r.what.split(" ", 1)[0]
        if head.endswith(".") and head[:-1].isdigit():
            out.setdefault(head, []).append(r)
    return out


def test_every_target_row_met_missed_or_not_run(tmp_path: Path) -> None:
    rows = _by_number(gpu_summary.target_rows(gpu_summary.collect(_suite(tmp_path / "2026-12-01-h200"))))
    assert [len(rows[f"{k}."]) for k in range(1, 7)] == [4, 1, 2, 2, 1, 1]
    sse_hf, sse_engine, gen_hf, gen_engine = rows["1."]
    assert "/v1/completions SSE, 8 workers, vs transformers static cache" in sse_hf.what
    assert sse_hf.status == "met" and sse_hf.target == ">= 2x"  # 65,536 / 32,768 = 2.00
    assert sse_hf.measured.startswith("65,536 tok/s (steady, 100.0% ok) / transformers static cache + compile 32,768")
    assert sse_hf.measured.endswith("= 2.00x")
    assert sse_engine.status == "missed" and "256,000 tok/s (2.000 ms/step) = 0.26x" in sse_engine.measured
    assert gen_hf.status == "missed" and "(whole run: no steady window, 100.0% ok)" in gen_hf.measured  # 1.00x
    assert gen_engine.status == "missed"
    (topp,) = rows["2."]
    assert topp.status == "met" and topp.target == ">= 0.8x" and "= 0.83x" in topp.measured  # 1.0 s / 1.2 s
    assert "full-row fetches 12, device-drawn rows 60,000" in topp.measured
    itl, ttft = rows["3."]
    assert itl.status == "met" and itl.measured == "ITL 1.20 ms, TPOT 1.20 ms / 2.00 ms = 0.60x"  # <= 0.6x
    assert ttft.status == "met" and ttft.measured.startswith("8.00 ms (32-token prompts")
    engine_512, engine_1 = rows["4."]
    assert engine_512.status == "missed" and "(NVIDIA H200)" in engine_512.what  # 2.0 ms > 1.7 ms
    assert "<= 1.70 ms on an H100" in engine_512.target and "1.70x the speed of the reference" in engine_512.measured
    assert "the reference is an H100's, this card differs" in engine_512.measured
    assert engine_1.status == "met" and engine_1.measured == "0.400 ms/step"
    (one,) = rows["5."]
    assert one.status == "missed" and "= 0.33x" in one.measured and "99.7% ok" in one.measured  # 3.0 s vs 1.0 s
    (outside,) = rows["6."]
    assert outside.status == "met" and outside.target == "within 10%"  # 60,000 / 65,536 = 0.92
    assert outside.measured.startswith("guidellm 0.8.1: 60,000 tok/s over its 4.20 s window (2,048 ok, 0 failed")
    assert outside.measured.endswith("= 0.92x")


def test_a_bursty_single_stream_is_judged_on_its_time_per_token(tmp_path: Path) -> None:
    """Decodes run ahead send a stream's tokens in bursts: the gaps between chunks inside a burst are
    tiny, so the ITL p50 alone would pass; target 3 is judged on the time per output token too."""
    root = _suite(tmp_path / "2026-12-01-h200")
    burst = [0.0001] * 4 + [0.0060]  # five tokens per 6.4 ms execution: 1.28 ms a token
    _write_load(
        root / "stack_w8",
        "closed-completions-c1-r12-t128-single",
        n=1,
        latency=0.008 + 127 * 0.00128,
        tokens=128,
        wall=3,
        ttft=0.008,
        itl=burst * 25,
    )
    itl, _ = _by_number(gpu_summary.target_rows(gpu_summary.collect(root)))["3."]
    assert itl.status == "missed" and itl.measured == "ITL 0.10 ms, TPOT 1.28 ms / 2.00 ms = 0.64x"


def test_targets_not_run_when_their_runs_are_missing(tmp_path: Path) -> None:
    root = _suite(tmp_path / "r")
    for name in ("guidellm.json", "closed-completions-c512-r6-t128-topp.json"):
        (root / "stack_w8" / name).unlink()
    (root / "engine" / "engine_bench.json").unlink()
    for path in (root / "stack_w1").iterdir():
        path.unlink()
    _guidellm(root / "stack_w8", 50_000.0)  # back, but 0.76x the suite's own figure
    rows = _by_number(gpu_summary.target_rows(gpu_summary.collect(root)))
    assert [r.status for r in rows["1."]] == ["met", "not run", "missed", "not run"]
    assert rows["2."][0].status == "not run"
    assert [r.status for r in rows["4."]] == ["not run", "not run"]
    assert rows["5."][0].status == "not run" and rows["6."][0].status == "missed"


def test_report_rows_and_references(tmp_path: Path) -> None:
    rows = {r.what: r for r in gpu_summary.target_rows(gpu_summary.collect(_suite(tmp_path / "r")))}
    draw = rows["step engine alone, 1 row, every row drawn on the device (top-p 0.9)"]
    assert draw.status == "report only" and draw.measured == "0.500 ms/step / 0.400 ms/step plain = 1.25x"
    assert "= 1.10x" in rows["step engine alone, 512 rows, every row drawn on the device (top-p 0.9)"].measured
    invariant = rows["step engine alone, 64 rows, 16 of them batch-invariant (invariant_slots 64)"]
    assert invariant.measured == "1.200 ms/step / 1.000 ms/step plain = 1.20x" and invariant.status == "report only"
    seed = rows["seed scenario heavy (8 workers)"]
    assert seed.status == "report only" and seed.measured.startswith("mean 0.300 s, p95 0.300 s, 100.0% ok")
    rpe = rows["rows per Triton execution, 512 streams /v1/completions SSE (8 workers)"]
    assert rpe.status == "report only" and "= 480.0 (93.8% of 512)" in rpe.measured  # 61,440 rows / 128 executions
    share = rows["live sequences stepping together, 512 streams (8 workers)"]
    assert share.status == "report only" and share.measured.startswith("97.9%")  # 470 of 480 live rows per step
    assert "rows per Triton execution, 512 streams /v1/completions SSE (1 worker)" not in rows  # no scrapes there
    assert "seed scenario light (1 worker)" not in rows  # the runs a worker count did not make are left out
    assert (
        rows["512 streams /generate with presence 0.5, frequency 0.5, repetition 1.1 (8 workers)"].status == "not run"
    )
    assert rows["transformers static cache + compile, batch 1"].measured == "500 tok/s, 2.00 ms/token"
    assert rows["transformers plain generate, batch 512"].status == "reference"
    assert "65,536 tok/s" in rows["transformers plain generate, batch 512"].measured  # 512*128/1.0
    assert rows["transformers plain generate, batch 1"].status == "not run"
    assert not any(r.status in ("met", "missed") for r in rows.values() if not r.what.split(" ")[0].endswith("."))


def test_counters_arithmetic(tmp_path: Path) -> None:
    data = gpu_summary.collect(_suite(tmp_path / "r"))
    w8 = data.stack(8)
    assert w8 is not None and data.stack(1) is not None
    c = w8.counters["completions"]
    assert (c.rows, c.executions, c.requests) == (61440, 128, 300)
    assert c.rows_per_exec == pytest.approx(480.0)
    assert c.full_row_fetches == {"top_k": 3.0} and c.drawn_rows == 0
    assert gpu_summary.ratio(c.gateway_step_rows, c.gateway_steps) == pytest.approx(61440 / 128)
    assert c.kv_live_after == 0
    topp = w8.counters["topp"]
    assert topp.full_row_fetches == {"top_k": 0.0, "top_p": 12.0} and topp.drawn_rows == 60_000
    empty = w8.counters["streams"]
    assert empty.rows is None and empty.rows_per_exec is None and empty.full_row_fetches_total is None
    table = gpu_summary.counters_table(data)
    assert "\n| 1 |" not in table  # runs without scrapes are left out
    assert (
        "| 8 | completions | 61,440 | 128 | 480.00 | 300 | 0.853 | 0.100 | 480.00 | 120 | 0 | 480.00 | top_k: 3 | 0 |"
        in table
    )
    # 300 requests each carrying their execution's time: 256,000 us / 300 per execution, 128 executions.
    phases = gpu_summary.phases_table(data)
    assert "| 8 | completions | 0.853 | 0.750 | 0.103 | 0.050 | 0.100 | 0.50 | n/a | 0.500 | 0.050 | 0.025 |" in phases


def test_render_and_main_write_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _suite(tmp_path / "2026-12-01-h200")
    assert gpu_summary.main([str(root)]) == 0
    text = (root / "summary.md").read_text()
    assert text == capsys.readouterr().out
    assert "# GPU suite summary: 2026-12-01-h200" in text and "- GPU: NVIDIA H200;" in text and "abc1234" in text
    assert "targets (issue 16): 6 met, 5 missed, 0 not run" in text
    assert "steady-state rate (benchmarks/load/steady.py)" in text
    assert "| triton_model | 9 | 0 | 0 | 0 | ok |" in text
    assert (
        "- model: random:gpt2:seed=0, fp16, 12 layers, context 1024; export parity max abs error 0.004 on cuda" in text
    )
    assert "| gateway_seeded | n/a | n/a | n/a | n/a | unreadable |" in text
    assert "| hf_plain | timeout | 124 | 150 | 150 |" in text
    data: dict[str, Any] = json.loads((root / "summary.json").read_text())
    assert {t["status"] for t in data["targets"]} == {"met", "missed", "not run", "report only", "reference"}
    assert data["card"] == "NVIDIA H200" and data["outside"]["w8"]["output_tokens_per_s"] == 60_000.0


def test_empty_directory_is_all_not_run(tmp_path: Path) -> None:
    assert gpu_summary.main([str(tmp_path)]) == 0
    text = (tmp_path / "summary.md").read_text()
    rows = gpu_summary.target_rows(gpu_summary.collect(tmp_path))
    assert len(_by_number(rows)) == 6 and {r.status for r in rows} == {"not run"}
    assert "no stages.tsv" in text and "0 met, 0 missed, 11 not run" in text


def test_malformed_inputs_do_not_crash(tmp_path: Path) -> None:
    (tmp_path / "engine").mkdir()
    (tmp_path / "engine" / "engine_bench.json").write_text("{truncated")
    w = tmp_path / "stack_w8"
    (w / "metrics").mkdir(parents=True)
    (w / "closed-completions-c512-r6-t128-completions.json").write_text(json.dumps({"summary": "oops"}))
    (w / "guidellm.json").write_text(json.dumps({"benchmarks": [{"metrics": {"request_totals": []}}]}))
    (w / "metrics" / "completions_before_triton.txt").write_text("garbage line\n# HELP x\n")
    (w / "metrics" / "completions_after_triton.txt").write_text("nv_inference_count 5\n")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "hf-static-x.json").write_text(json.dumps({"results": [{"no": "batch"}]}))
    data = gpu_summary.collect(tmp_path)
    assert data.stacks[0].counters["completions"].rows is None  # the "before" scrape had no sample
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
    assert gpu_summary.COUNTER_METRICS["drawn_rows"] == ("triton", "gpt2_drawn_rows_total")


def test_outside_client_command_and_report() -> None:
    from benchmarks import outside_client

    args = outside_client.guidellm_args(
        base_url="http://127.0.0.1:8080", model="gpt2", streams=512, requests_per_stream=6, prompt_tokens=32,
        new_tokens=128, tokenizer="/t", report=Path("/o/guidellm.json"), max_seconds=80,
    )  # fmt: skip
    joined = " ".join(args)
    assert "request_format=/v1/completions" in joined and "extras.body.top_k=50" in joined
    assert "kind=concurrent,streams=512,warmup.mode=requests,warmup.value=512,cooldown.mode=requests" in joined
    assert "kind=max_requests,count=3072" in joined and "prompt_tokens=32,output_tokens=128" in joined
    assert outside_client.parse_guidellm({"benchmarks": []}) is None
    assert outside_client.main(["--tokenizer", "/t", "--out", "/nonexistent"]) in (0, outside_client.NOT_INSTALLED)


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
    ratios = json.loads((tmp_path / "cpu_summary.json").read_text())["topp_over_topk"]
    assert [r["status"] for r in ratios] == ["not run", "not run"]


def test_cpu_summary_top_p_over_top_k(tmp_path: Path) -> None:
    """Issue 16 target 7: per concurrency, the stack's top-p run over its top-k run, >= 0.8x."""
    from benchmarks import cpu_summary

    for mode, wall in (("topk", 2.0), ("topp", 2.2)):  # 0.91x
        name = f"closed-stream-c1-r3-t64-cpu_stack_{mode}"
        _write_load(tmp_path, name, n=1, latency=1.0, tokens=64, wall=wall, ttft=0.05, itl=[0.03], max_new=64)
    name = "closed-stream-c4-r3-t64-cpu_stack_topk"
    _write_load(tmp_path, name, n=4, latency=1.0, tokens=64, wall=2.0, ttft=0.05, itl=[0.03], max_new=64)
    name = "closed-stream-c4-r3-t64-cpu_stack_topp"
    _write_load(tmp_path, name, n=4, latency=1.0, tokens=64, wall=4.0, ttft=0.05, itl=[0.03], max_new=64)  # 0.5x
    assert cpu_summary.main([str(tmp_path)]) == 0
    ratios = {r["concurrency"]: r for r in json.loads((tmp_path / "cpu_summary.json").read_text())["topp_over_topk"]}
    assert ratios[1]["ratio"] == pytest.approx(2.0 / 2.2) and ratios[1]["status"] == "met"
    assert ratios[4]["ratio"] == pytest.approx(0.5) and ratios[4]["status"] == "missed"
    assert "top-p ÷ top-k" in (tmp_path / "cpu_summary.md").read_text()


def test_cpu_summary_of_an_empty_directory(tmp_path: Path) -> None:
    from benchmarks import cpu_summary

    assert cpu_summary.main([str(tmp_path)]) == 0
    assert "nothing ran" in (tmp_path / "cpu_summary.md").read_text()
