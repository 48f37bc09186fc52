"""transformers `generate` with its static KV cache (and, on CUDA, its automatic torch.compile):
`python -m benchmarks.hf_static --help`.

The strongest plain-transformers reference we run: the same model, prompts and sampling as
`benchmarks.baseline` (same CLI, same defaults), but `cache_implementation="static"`, which makes
transformers compile the decoding forward pass on CUDA (CUDA graphs through torch.compile's
"reduce-overhead" mode, where torch can use them). Per batch size:
- `--warmup` untimed full calls first (they include the compilation; their times are recorded
  separately as `warmup_s`, never mixed with the timed ones);
- then `--repeats` timed full calls; gen tok/s = batch x new tokens / median time, ms/token =
  median / new tokens (prefill included).

Contracts:
- Every timed call generates exactly `--new-tokens` tokens (min = max new tokens, checked).
- On CUDA each timed region is bracketed by `torch.cuda.synchronize()`.
- The report (md/csv/json, `report.write_outputs`) is rewritten after every batch size, so a run cut
  short by a timeout still leaves the sizes it finished.
- `--no-compile` passes `disable_compile=True` (static cache, eager forward). Whether transformers
  compiled is recorded (`compiled` in the JSON).
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from benchmarks import baseline
from benchmarks.report import RunInfo, fmt, markdown_table, to_jsonable, write_outputs


@dataclass(frozen=True)
class StaticResult:
    """One batch size (seconds)."""

    batch_size: int
    prompt_tokens: int
    new_tokens: int
    warmup_s: tuple[float, ...]
    times_s: tuple[float, ...]

    @property
    def median_s(self) -> float:
        """Median wall time of a timed full call."""
        return statistics.median(self.times_s)

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens (all rows) per second of the median call."""
        return self.batch_size * self.new_tokens / self.median_s

    @property
    def ms_per_token(self) -> float:
        """Median call time / new tokens, in ms (the per-step time seen by one sequence)."""
        return self.median_s / self.new_tokens * 1e3

    def summary(self) -> dict[str, Any]:
        """JSON-ready figures."""
        return {
            "batch_size": self.batch_size,
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "warmup_s": list(self.warmup_s),
            "times_s": list(self.times_s),
            "median_s": self.median_s,
            "tokens_per_s": self.tokens_per_s,
            "ms_per_token": self.ms_per_token,
        }


TABLE_HEADERS = ["batch", "prompt tok", "new tok", "warm-up s (each)", "runs", "median s", "gen tok/s", "ms/token"]


def results_table(results: Sequence[StaticResult]) -> str:
    """Markdown table, one row per batch size."""
    rows = [
        [
            r.batch_size,
            r.prompt_tokens,
            r.new_tokens,
            " / ".join(f"{w:.1f}" for w in r.warmup_s) or "none",
            len(r.times_s),
            fmt(r.median_s, 4),
            fmt(r.tokens_per_s, 1),
            fmt(r.ms_per_token, 2),
        ]
        for r in results
    ]
    return markdown_table(TABLE_HEADERS, rows)


def render_markdown(
    cfg: baseline.BaselineConfig, results: Sequence[StaticResult], info: RunInfo, extra: dict[str, Any]
) -> str:
    """The full markdown report."""
    source = cfg.model or f"random:{cfg.random_config}"
    parts = [
        f"## transformers generate, static KV cache: {source}, {cfg.device}, {cfg.dtype}\n",
        results_table(results),
        f'\n`cache_implementation="static"`, compiled by transformers: {extra.get("compiled")}. '
        f"top-p {cfg.top_p} (top_k {cfg.top_k}, temperature {cfg.temperature}), "
        f"min_new_tokens = max_new_tokens = {cfg.new_tokens}; median of {cfg.repeats} timed runs after "
        f"{cfg.warmup} untimed warm-up runs (compilation happens there). "
        "gen tok/s = batch x new tokens / median time; ms/token = median / new tokens.\n",
        "\n### Provenance\n",
        info.markdown(),
    ]
    parts += [f"- {key}: {value}\n" for key, value in extra.items()]
    return "".join(parts)


def measure(
    cfg: baseline.BaselineConfig,
    model: Any,
    compile_: bool,
    log: Callable[[str], None],
    on_result: Callable[[list[StaticResult]], object] | None = None,
) -> list[StaticResult]:
    """Warm up and time static-cache generate() per batch size; `on_result` sees the list after each size.
    The prompts and the timed call are baseline's (`prompt_batches`, `timed_generate`)."""
    extra: dict[str, Any] = {"cache_implementation": "static"}
    if not compile_:
        extra["disable_compile"] = True
    results: list[StaticResult] = []
    for bs, ids in baseline.prompt_batches(cfg, model):
        run = baseline.timed_generate(cfg, model, ids, cfg.new_tokens, **extra)
        warm = tuple(run() for _ in range(cfg.warmup))
        timed = tuple(run() for _ in range(cfg.repeats))
        result = StaticResult(bs, cfg.prompt_tokens, cfg.new_tokens, warm, timed)
        log(
            f"[hf_static] batch {bs}: {result.tokens_per_s:.1f} tok/s, {result.ms_per_token:.2f} ms/token "
            f"(warm-up {', '.join(f'{w:.1f}' for w in warm)} s)"
        )
        results.append(result)
        if on_result is not None:
            on_result(results)
    return results


def csv_rows(results: Sequence[StaticResult]) -> list[dict[str, Any]]:
    """One CSV row per call, warm-up calls included (kind = warmup | timed)."""
    rows = []
    for r in results:
        for kind, times in (("warmup", r.warmup_s), ("timed", r.times_s)):
            for i, t in enumerate(times):
                rows.append(
                    {
                        "batch_size": r.batch_size,
                        "kind": kind,
                        "repeat": i,
                        "seconds": round(t, 6),
                        "generated_tokens": r.batch_size * r.new_tokens,
                        "tokens_per_s": round(r.batch_size * r.new_tokens / t, 3) if t > 0 else None,
                    }
                )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: 0 on success, 2 on bad arguments."""
    parser = baseline.build_parser()
    parser.prog = "python -m benchmarks.hf_static"
    parser.description = "transformers generate() with the static KV cache (auto-compiled on CUDA)."
    parser.add_argument("--no-compile", action="store_true", help="static cache without torch.compile")
    parser.set_defaults(warmup=2)
    args, cfg = baseline.parse_config(parser, argv)
    import torch
    import transformers

    model = baseline.load_model(cfg)
    cli = baseline.command_line("python -m benchmarks.hf_static", argv)
    info = RunInfo.collect({**to_jsonable(cfg), "no_compile": args.no_compile}, argv=cli)
    name = baseline.output_name("hf-static", cfg, args.tag)

    def environment() -> dict[str, Any]:
        return {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "device name": torch.cuda.get_device_name() if cfg.device == "cuda" else "cpu",
            "compiled": hasattr(model, "_compiled_call"),
            "model parameters": baseline.parameter_count(model),
        }

    def write(results: list[StaticResult]) -> str:
        extra = environment()
        markdown = render_markdown(cfg, results, info, extra)
        if args.out:
            summary = {"results": [r.summary() for r in results], "run": info.to_dict(), "environment": extra}
            written = write_outputs(args.out, name, markdown, csv_rows(results), summary)
            baseline.log("[hf_static] wrote " + ", ".join(str(p) for p in written))
        return markdown

    try:
        results = measure(cfg, model, not args.no_compile, baseline.log, on_result=write)
    except ValueError as err:
        parser.error(str(err))
    sys.stdout.write(write(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
