"""The step engine alone (no Triton, no gateway): `python -m benchmarks.engine_bench --help`.

    python -m benchmarks.engine_bench VERSION_DIR --rows 1,64,512 --out DIR [--profile 1,512]

For every N in --rows: prefill N new sequences with --prompt-tokens-token prompts (in chunks of
--prefill-chunk rows per step), run --warmup untimed decode steps, then time --steps decode steps
with all N sequences stepping, and free them. Reports per N the decode step's p50/min/mean/p95 wall
time and tokens/s = N / p50. With --profile, a torch.profiler kernel table of 5 more decode steps
per listed N (`profile_N<N>.txt` sorted by device time, `profile_cpu_N<N>.txt` by host time).

Contracts:
- Every engine call goes through `make_engine`, `prefill_request`, `decode_request`,
  `release_request` and `check_step` below, so an engine API change is adapted there only.
- A step on CUDA is bracketed by `torch.cuda.synchronize()`; the engine copies the top-K outputs to
  the host, so a step is finished when it returns either way.
- Token ids are uniform random over the vocabulary (seeded); content does not change a step's cost.
- Writes DIR/engine_bench<-tag>.{md,csv,json} (report.write_outputs), the JSON with the provenance.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.report import RunInfo, fmt, markdown_table, percentile, write_outputs
from step_model import contract

# ------------------------------------------------------------------------------- engine adapter
# The only code that knows the engine's API (step_model.engine, imported on first use so that
# `--help` and the report helpers need no torch). StepRequest/StepResult field changes are
# absorbed here.
ENGINE_MODULE = "step_model.engine"


@functools.cache
def engine_module() -> Any:
    """The module holding StepEngine, StepRequest and ModelMeta."""
    return importlib.import_module(ENGINE_MODULE)


def make_engine(
    version_dir: Path, *, capacity: int, device: str, strict_device: bool, extra: dict[str, Any] | None = None
) -> tuple[Any, Any]:
    """(engine, meta) for the exported model in `version_dir`, built as the Triton model builds it."""
    mod = engine_module()
    meta = mod.ModelMeta.load(version_dir)
    engine = mod.StepEngine(
        version_dir / contract.VERSION_ONNX,
        meta,
        capacity=capacity,
        device=device,
        strict_device=strict_device,
        **(extra or {}),
    )
    if hasattr(engine, "warm_up"):
        engine.warm_up()  # as the Triton model does before serving (captures CUDA graphs when enabled)
    return engine, meta


def _rows_request(
    ids: Sequence[int], tokens: np.ndarray, *, start: bool, end: bool, temperature: float, window: int
) -> Any:
    mod = engine_module()
    n = len(ids)
    return mod.StepRequest(
        sequence_ids=np.asarray(ids, dtype=np.uint64),
        input_ids=tokens.astype(np.int64),
        lengths=np.full(n, tokens.shape[1] if tokens.size and not end else 0, dtype=np.int32),
        start=np.full(n, start, dtype=bool),
        end=np.full(n, end, dtype=bool),
        temperature=np.full(n, temperature, dtype=np.float32),
        window=window,
    )


def prefill_request(
    ids: Sequence[int],
    prompts: np.ndarray,
    temperature: float = 0.8,
    window: int = 64,
    invariant: np.ndarray | None = None,
) -> Any:
    """Start sequences `ids` with prompts [N, T] (every row T tokens long); `invariant`: the rows
    flagged batch-invariant (contract.PARAM_INVARIANT_ROWS), bool [N]."""
    request = _rows_request(ids, prompts, start=True, end=False, temperature=temperature, window=window)
    if invariant is not None and invariant.any():
        request.invariant = invariant
    return request


def decode_request(
    ids: Sequence[int],
    tokens: np.ndarray,
    temperature: float = 0.8,
    window: int = 64,
    draw: np.ndarray | None = None,
    ahead: int = 0,
    ahead_u: np.ndarray | None = None,
) -> Any:
    """One decode step for live sequences `ids`, one new token each (tokens [N, 1]); `draw`: the
    rows' DRAW columns [N, 4] (u, top_p, top_k, min_p), a device draw where the window falls short;
    `ahead`: decodes every row runs ahead (contract.PARAM_AHEAD), `ahead_u` [N, ahead] their uniforms."""
    request = _rows_request(ids, tokens, start=False, end=False, temperature=temperature, window=window)
    request.draw = draw
    if ahead:
        request.ahead = np.full(len(ids), ahead, dtype=np.int32)
        request.ahead_u = ahead_u
    return request


def parse_draw(text: str) -> tuple[float, float, float] | None:
    """--draw "top_p=0.9[,top_k=K][,min_p=M]" -> (top_p, top_k, min_p); "" -> None."""
    if not text:
        return None
    values = {"top_p": 1.0, "top_k": 0.0, "min_p": 0.0}
    for item in text.split(","):
        key, _, value = item.partition("=")
        if key.strip() not in values:
            raise ValueError(f"--draw takes top_p, top_k and min_p, got {key!r}")
        values[key.strip()] = float(value)
    return values["top_p"], values["top_k"], values["min_p"]


def release_request(ids: Sequence[int]) -> Any:
    """Free sequences `ids` (no new token)."""
    return _rows_request(ids, np.zeros((len(ids), 1), dtype=np.int64), start=False, end=True, temperature=1.0, window=1)


def check_step(results: Sequence[Any]) -> None:
    """Raise if the engine refused a request or a row (per-row status, where the engine has one)."""
    for res in results:
        if isinstance(res, BaseException):
            raise RuntimeError(f"engine refused a request: {res!r}")
        status = getattr(res, "status", None)
        if status is not None and np.any(np.asarray(status) != 0):
            bad = np.flatnonzero(np.asarray(status).reshape(-1) != 0)
            raise RuntimeError(f"engine refused {bad.size} row(s), first statuses {np.asarray(status)[bad[:4]]}")


# --------------------------------------------------------------------------------- measurement


@dataclass(frozen=True)
class RowsResult:
    """Timings of one N (seconds)."""

    rows: int
    prompt_tokens: int
    prefill_s: float
    step_times_s: tuple[float, ...]
    ahead: int = 0  # decodes each row ran ahead per step: 1 + ahead tokens per row per step

    @property
    def p50_s(self) -> float:
        p = percentile(self.step_times_s, 50)
        assert p is not None
        return p

    def summary(self) -> dict[str, Any]:
        """JSON-ready figures (ms and tokens/s)."""
        times = self.step_times_s
        return {
            "rows": self.rows,
            "prompt_tokens": self.prompt_tokens,
            "steps": len(times),
            "prefill_s": self.prefill_s,
            "decode_step_p50_ms": self.p50_s * 1e3,
            "decode_step_min_ms": min(times) * 1e3,
            "decode_step_mean_ms": statistics.fmean(times) * 1e3,
            "decode_step_p95_ms": (percentile(times, 95) or 0.0) * 1e3,
            "tok_per_s_at_p50": self.rows * (1 + self.ahead) / self.p50_s,
            "ahead": self.ahead,
            "ms_per_decode_at_p50": self.p50_s * 1e3 / (1 + self.ahead),
        }


def parse_rows(text: str) -> list[int]:
    """ "1,64,512" -> [1, 64, 512]; "" -> []. Raises ValueError on a non-positive or non-integer entry."""
    try:
        rows = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from err
    if any(r < 1 for r in rows):
        raise ValueError(f"row counts must be positive, got {text!r}")
    return list(dict.fromkeys(rows))


def parse_engine_kw(items: Sequence[str]) -> dict[str, Any]:
    """["cuda_graphs=true", "threads=2"] -> {"cuda_graphs": True, "threads": 2} (values as JSON, else str)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--engine-kw wants KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _syncer(engine: Any) -> tuple[bool, Callable[[], None]]:
    """(whether the engine runs on CUDA, a function that waits for its device: a no-op off CUDA)."""
    import torch

    if torch.cuda.is_available() and str(getattr(engine, "device", "cpu")).startswith("cuda"):
        return True, torch.cuda.synchronize
    return False, lambda: None


def timed_step(engine: Any, request: Any, sync: Callable[[], None]) -> float:
    """Wall time (s) of one `engine.step([request])`, the device synchronised on both sides;
    raises when the engine refused the request or a row."""
    sync()
    t0 = time.perf_counter()
    res = engine.step([request])
    sync()
    elapsed = time.perf_counter() - t0
    check_step(res)
    return elapsed


def measure(
    engine: Any,
    vocab_size: int,
    rows: Sequence[int],
    *,
    prompt_tokens: int,
    steps: int,
    warmup: int,
    prefill_chunk: int,
    profile: Sequence[int],
    out: Path,
    seed: int,
    log: Callable[[str], None],
    draw: tuple[float, float, float] | None = None,
    invariant_rows: int = 0,
    ahead: int = 0,
) -> list[RowsResult]:
    """Prefill, warm up, time and (optionally) profile every N in `rows`; see the module docstring.
    `invariant_rows`: the first that many sequences of each N are flagged batch-invariant."""
    cuda, sync = _syncer(engine)
    rng = np.random.default_rng(seed)
    results = []
    next_id = 1
    for n in rows:
        ids = list(range(next_id, next_id + n))
        next_id += n
        sync()
        t0 = time.perf_counter()
        for k in range(0, n, prefill_chunk):
            chunk = ids[k : k + prefill_chunk]
            flags = np.arange(k, k + len(chunk)) < invariant_rows
            prompts = rng.integers(0, vocab_size, (len(chunk), prompt_tokens))
            check_step(engine.step([prefill_request(chunk, prompts, invariant=flags)]))
        sync()
        prefill_s = time.perf_counter() - t0

        def one_step(ids: list[int] = ids, n: int = n) -> float:
            columns = None
            if draw is not None:  # every row asks: a fresh uniform each step, the same cuts
                columns = np.column_stack((rng.random(n), np.tile(np.asarray(draw), (n, 1))))
            uniforms = rng.random((n, ahead)) if ahead else None
            request = decode_request(
                ids, rng.integers(0, vocab_size, (n, 1)), draw=columns, ahead=ahead, ahead_u=uniforms
            )
            return timed_step(engine, request, sync)

        try:
            for _ in range(warmup):
                one_step()
            times = tuple(one_step() for _ in range(steps))
            result = RowsResult(n, prompt_tokens, prefill_s, times, ahead)
            s = result.summary()
            log(
                f"[engine] N={n:4d} prefill {prefill_s * 1e3:8.1f} ms  step p50 {s['decode_step_p50_ms']:7.3f} ms "
                f"min {s['decode_step_min_ms']:7.3f} ms -> {s['tok_per_s_at_p50']:10.0f} tok/s"
            )
            results.append(result)
            if n in profile:
                write_profile(one_step, n, out, cuda)
                log(f"[engine] N={n}: wrote {out / f'profile_N{n}.txt'}")
        finally:
            check_step(engine.step([release_request(ids)]))
    return results


def measure_prefills(
    engine: Any,
    vocab_size: int,
    batches: Sequence[int],
    *,
    prompt_tokens: int,
    steps: int,
    warmup: int,
    seed: int,
    log: Callable[[str], None],
) -> dict[int, tuple[float, ...]]:
    """Per B in `batches`: wall times (s) of `steps` steps that each start B new sequences with
    `prompt_tokens`-token prompts (one prefill run; the sequences are freed after each, untimed),
    after `warmup` untimed ones: what a start row adds to the step it joins."""
    _, sync = _syncer(engine)
    rng = np.random.default_rng(seed + 1)
    out: dict[int, tuple[float, ...]] = {}
    next_id = 10**9  # away from measure()'s ids
    for b in batches:
        times = []
        for i in range(warmup + steps):
            ids = list(range(next_id, next_id + b))
            next_id += b
            elapsed = timed_step(engine, prefill_request(ids, rng.integers(0, vocab_size, (b, prompt_tokens))), sync)
            check_step(engine.step([release_request(ids)]))
            if i >= warmup:
                times.append(elapsed)
        out[b] = tuple(times)
        p50 = percentile(times, 50) or 0.0
        low = min(times) * 1e3
        log(f"[engine] prefill B={b:3d} x {prompt_tokens} tokens: step p50 {p50 * 1e3:7.3f} ms min {low:7.3f} ms")
    return out


def prefill_summary(prefills: dict[int, tuple[float, ...]]) -> dict[str, dict[str, float]]:
    """JSON-ready: per B, p50 / min / p95 ms of a prefill step."""
    return {
        str(b): {
            "step_p50_ms": (percentile(t, 50) or 0.0) * 1e3,
            "step_min_ms": min(t) * 1e3,
            "step_p95_ms": (percentile(t, 95) or 0.0) * 1e3,
        }
        for b, t in prefills.items()
    }


def write_profile(step: Callable[[], float], n: int, out: Path, cuda: bool, steps: int = 5) -> None:
    """torch.profiler tables of `steps` decode steps: by device time (profile_N<n>.txt) and host time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the profiler warns about CUPTI and missing kernels; not our subject
        with profile(activities=activities) as prof:
            for _ in range(steps):
                step()
        averages = prof.key_averages()
        tables = {}
        for name, keys in (
            (f"profile_N{n}.txt", ("device_time_total", "cuda_time_total", "cpu_time_total")),
            (f"profile_cpu_N{n}.txt", ("cpu_time_total",)),
        ):
            for key in keys if cuda or name.startswith("profile_cpu") else ("cpu_time_total",):
                try:
                    tables[name] = averages.table(sort_by=key, row_limit=30)
                    break
                except (AttributeError, KeyError, RuntimeError, ValueError):
                    continue
    out.mkdir(parents=True, exist_ok=True)
    header = f"# {steps} decode steps, {n} rows each\n"
    for name, table in tables.items():
        (out / name).write_text(header + table + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------- reporting

TABLE_HEADERS = ["rows", "prompt tok", "prefill ms", "steps", "step p50 ms", "step min ms", "step p95 ms", "tok/s"]


def results_table(results: Sequence[RowsResult]) -> str:
    """Markdown table, one row per N."""
    rows = []
    for r in results:
        s = r.summary()
        rows.append(
            [
                r.rows,
                r.prompt_tokens,
                fmt(r.prefill_s, 1, 1000),
                len(r.step_times_s),
                fmt(s["decode_step_p50_ms"], 3),
                fmt(s["decode_step_min_ms"], 3),
                fmt(s["decode_step_p95_ms"], 3),
                fmt(s["tok_per_s_at_p50"], 0),
            ]
        )
    return markdown_table(TABLE_HEADERS, rows)


def render_markdown(
    results: Sequence[RowsResult],
    info: RunInfo,
    extra: dict[str, Any],
    prefills: dict[int, tuple[float, ...]] | None = None,
    prompt_tokens: int = 0,
) -> str:
    """The full markdown report."""
    parts = [
        "## Step engine alone (StepEngine called directly; no Triton, no gateway)\n",
        results_table(results),
        "\nAll N sequences step together; tok/s = N x (1 + decodes run ahead) / p50 step time. Times are wall "
        "time of `engine.step` (synchronized on CUDA), after the warm-up steps.\n",
    ]
    if prefills:
        rows = [
            [b, prompt_tokens, len(t), fmt(s["step_p50_ms"], 3), fmt(s["step_min_ms"], 3), fmt(s["step_p95_ms"], 3)]
            for (b, t), s in zip(prefills.items(), prefill_summary(prefills).values(), strict=True)
        ]
        parts += [
            "\n### Prefill steps (B new sequences, nothing else in the step)\n",
            markdown_table(["B", "prompt tok", "steps", "step p50 ms", "step min ms", "step p95 ms"], rows),
        ]
    parts += [
        "\n### Provenance\n",
        info.markdown(),
    ]
    parts += [f"- {key}: {value}\n" for key, value in extra.items()]
    return "".join(parts)


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.engine_bench", description=__doc__.split("\n")[0])
    p.add_argument("version_dir", type=Path, help="an exported version: model.onnx + metadata.json")
    p.add_argument("--rows", default="1,64,512", help="comma-separated N (default %(default)s)")
    p.add_argument("--out", type=Path, required=True, help="directory for the reports")
    p.add_argument("--profile", default="", help="N values to profile with torch.profiler (default none)")
    p.add_argument("--steps", type=int, default=48, help="timed decode steps per N (default %(default)s)")
    p.add_argument("--warmup", type=int, default=3, help="untimed decode steps per N (default %(default)s)")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--prefill-chunk", type=int, default=64, help="sequences per prefill step (default %(default)s)")
    p.add_argument("--capacity", type=int, help="KV slots (default: the largest N; Triton's export uses 640)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--strict-device", action="store_true", help="every node on the GPU (no CPU fallback)")
    p.add_argument("--engine-kw", action="append", default=[], metavar="KEY=VALUE", help="extra StepEngine argument")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", help="suffix for the output file names")
    p.add_argument(
        "--draw",
        default="",
        help='every decode row asks for a device draw with these cuts, e.g. "top_p=0.9" (the seed\'s request)',
    )
    p.add_argument(
        "--invariant-rows",
        type=int,
        default=0,
        help="the first K sequences of each N are flagged batch-invariant (with --engine-kw invariant_slots=R: "
        "they take reserved slots, are prefilled alone and decode in the reserved range's own run of R rows)",
    )
    p.add_argument(
        "--ahead",
        type=int,
        default=0,
        help="every decode row runs this many decodes ahead per step (contract.PARAM_AHEAD; tokens fed from the "
        "model's own proposals: greedy, or --draw's cuts)",
    )
    p.add_argument(
        "--prefill-rows",
        default="",
        help="also time steps that only start B new sequences, for each B listed (e.g. 1,2,4,8; default none)",
    )
    return p


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: 0 on success, 2 on bad arguments."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rows = parse_rows(args.rows)
        profile = parse_rows(args.profile)
        extra_kw = parse_engine_kw(args.engine_kw)
        draw = parse_draw(args.draw)
        prefill_rows = parse_rows(args.prefill_rows)
    except ValueError as err:
        parser.error(str(err))
    if not rows:
        parser.error("--rows is empty")
    if args.steps < 1 or args.warmup < 0 or args.prompt_tokens < 1 or args.prefill_chunk < 1:
        parser.error("--steps, --prompt-tokens and --prefill-chunk must be >= 1, --warmup >= 0")
    if not (args.version_dir / "metadata.json").is_file():
        parser.error(f"{args.version_dir} has no metadata.json (not an exported version)")
    import torch

    capacity = args.capacity or max(rows + prefill_rows)
    if capacity < max(rows + prefill_rows):
        parser.error(f"--capacity {capacity} < largest N or B {max(rows + prefill_rows)}")
    t0 = time.perf_counter()
    engine, meta = make_engine(
        args.version_dir, capacity=capacity, device=args.device, strict_device=args.strict_device, extra=extra_kw
    )
    setup_s = time.perf_counter() - t0
    if args.prompt_tokens + (args.warmup + args.steps) * (1 + args.ahead) + 5 > meta.max_context:
        parser.error(f"prompt + steps exceed the model's context of {meta.max_context}")
    device = str(getattr(engine, "device", args.device))
    _log(f"[engine] {engine_module().__name__}.StepEngine on {device}, capacity {capacity}, set-up {setup_s:.1f} s")
    results = measure(
        engine,
        meta.vocab_size,
        rows,
        prompt_tokens=args.prompt_tokens,
        steps=args.steps,
        warmup=args.warmup,
        prefill_chunk=args.prefill_chunk,
        profile=profile,
        out=args.out,
        seed=args.seed,
        log=_log,
        draw=draw,
        invariant_rows=args.invariant_rows,
        ahead=args.ahead,
    )
    prefills = measure_prefills(
        engine,
        meta.vocab_size,
        prefill_rows,
        prompt_tokens=args.prompt_tokens,
        steps=args.steps,
        warmup=max(args.warmup, 2),
        seed=args.seed,
        log=_log,
    )
    cuda = device.startswith("cuda")
    extra = {
        "engine module": engine_module().__name__,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "model": f"{args.version_dir} ({meta.dtype}, {meta.n_layer} layers, vocab {meta.vocab_size})",
        "capacity": capacity,
        "engine arguments": extra_kw or "defaults",
        "device draws": args.draw or "none",
        "invariant rows": args.invariant_rows,
        "decodes run ahead per step": args.ahead,
        "drawn rows": getattr(getattr(engine, "stats", None), "drawn_rows_total", "n/a"),
        "cuda graphs": getattr(engine, "cuda_graphs", "n/a"),
        "engine set-up s": round(setup_s, 2),
        "torch": torch.__version__,
    }
    if cuda:
        extra["max memory allocated GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    try:
        import onnxruntime

        extra["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    params = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    info = RunInfo.collect(
        params, argv=["python -m benchmarks.engine_bench", *(sys.argv[1:] if argv is None else argv)]
    )
    markdown = render_markdown(results, info, extra, prefills, args.prompt_tokens)
    sys.stdout.write(markdown)
    summary = {
        "rows": {str(r.rows): r.summary() for r in results},
        "prefill": prefill_summary(prefills),
        "run": info.to_dict(),
        "environment": extra,
    }
    csv_rows = [
        {"rows": r.rows, "step": i, "seconds": round(t, 7)} for r in results for i, t in enumerate(r.step_times_s)
    ]
    name = "engine_bench" + (f"-{args.tag}" if args.tag else "")
    written = write_outputs(args.out, name, markdown, csv_rows, summary)
    _log("[engine] wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
