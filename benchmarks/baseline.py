"""Plain-transformers baseline the service must beat: `python -m benchmarks.baseline --help`.

Runs `GPT2LMHeadModel.generate()` in-process (no server, no batching across requests, transformers'
own KV cache) with top-p sampling and measures, per batch size:
- generated tokens/s = batch_size x new_tokens / median wall time of one full `generate()` call;
- first-token time = median time of `generate(max_new_tokens=1)` (prefill + one sampled token);
- per-token latency = full time / new_tokens, and decode ms/token = (full - first) / (new_tokens - 1).
The batch-1 row is the single-request per-token latency to compare with the gateway's ITL.

Contracts:
- Every row generates exactly `--new-tokens` tokens (`min_new_tokens == max_new_tokens`, checked).
- Prompts are random token ids (uniform over the vocabulary, excluding the EOS id) of exactly
  `--prompt-tokens` tokens, seeded by `--seed`; content does not change the compute of a GPT-2 step.
- One untimed warm-up of each measured call precedes the timed runs; on cuda every timed region
  is bracketed by `torch.cuda.synchronize()`.
- torch and transformers are imported when `main()` runs, not at import time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from benchmarks.report import RunInfo, fmt, markdown_table, to_jsonable, write_outputs

# Random-weight shapes (the same as export.checkpoint's): "gpt2" is the real 124M shape.
RANDOM_CONFIGS: dict[str, dict[str, int]] = {
    "gpt2": {"n_layer": 12, "n_head": 12, "n_embd": 768, "n_positions": 1024, "vocab_size": 50257},
    "tiny": {"n_layer": 2, "n_head": 4, "n_embd": 64, "n_positions": 256, "vocab_size": 1024},
}


def parse_batch_sizes(text: str) -> list[int]:
    """ "1,4,16" -> [1, 4, 16]. Raises ValueError on an empty list or a non-positive size."""
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise ValueError(f"--batch-sizes must be comma-separated integers, got {text!r}") from err
    if not sizes or any(s < 1 for s in sizes):
        raise ValueError(f"--batch-sizes must be positive integers, got {text!r}")
    return list(dict.fromkeys(sizes))


@dataclass(frozen=True)
class BaselineConfig:
    """What one baseline run measures."""

    model: str | None
    random_config: str | None
    device: str
    dtype: str
    batch_sizes: tuple[int, ...]
    prompt_tokens: int
    new_tokens: int
    top_p: float
    top_k: int
    temperature: float
    repeats: int
    warmup: int
    seed: int
    threads: int | None


@dataclass(frozen=True)
class BatchResult:
    """Measurements for one batch size (seconds)."""

    batch_size: int
    full_times_s: tuple[float, ...]
    first_times_s: tuple[float, ...]
    prompt_tokens: int
    new_tokens: int

    @property
    def full_median_s(self) -> float:
        """Median wall time of a full generate() call."""
        return statistics.median(self.full_times_s)

    @property
    def full_mean_s(self) -> float:
        """Mean wall time of a full generate() call."""
        return statistics.fmean(self.full_times_s)

    @property
    def first_median_s(self) -> float | None:
        """Median wall time of generate(max_new_tokens=1); None if not measured."""
        return statistics.median(self.first_times_s) if self.first_times_s else None

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens (all rows) per second of the median full call."""
        return self.batch_size * self.new_tokens / self.full_median_s

    @property
    def per_token_s(self) -> float:
        """Median full time / new tokens: the mean time per generated step, prefill included."""
        return self.full_median_s / self.new_tokens

    @property
    def decode_per_token_s(self) -> float | None:
        """(full - first) / (new_tokens - 1): the time per step after the first; None if new_tokens == 1."""
        first = self.first_median_s
        if first is None or self.new_tokens < 2:
            return None
        return max(0.0, self.full_median_s - first) / (self.new_tokens - 1)

    def summary(self) -> dict[str, Any]:
        """JSON-ready numbers."""
        return {
            "batch_size": self.batch_size,
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "runs": len(self.full_times_s),
            "full_median_s": self.full_median_s,
            "full_mean_s": self.full_mean_s,
            "first_token_median_s": self.first_median_s,
            "tokens_per_s": self.tokens_per_s,
            "per_token_s": self.per_token_s,
            "decode_per_token_s": self.decode_per_token_s,
        }


TABLE_HEADERS = [
    "batch",
    "prompt tok",
    "new tok",
    "runs",
    "median s",
    "mean s",
    "gen tok/s",
    "first token ms",
    "ms/token (full/new)",
    "decode ms/token",
]


def results_table(results: Sequence[BatchResult]) -> str:
    """Markdown table, one row per batch size."""
    rows = [
        [
            r.batch_size,
            r.prompt_tokens,
            r.new_tokens,
            len(r.full_times_s),
            fmt(r.full_median_s, 4),
            fmt(r.full_mean_s, 4),
            fmt(r.tokens_per_s, 1),
            fmt(r.first_median_s, 2, 1000),
            fmt(r.per_token_s, 2, 1000),
            fmt(r.decode_per_token_s, 2, 1000),
        ]
        for r in results
    ]
    return markdown_table(TABLE_HEADERS, rows)


def render_markdown(cfg: BaselineConfig, results: Sequence[BatchResult], info: RunInfo, extra: dict[str, Any]) -> str:
    """The full markdown report."""
    source = cfg.model or f"random:{cfg.random_config}"
    parts = [
        f"## transformers baseline: {source}, {cfg.device}, {cfg.dtype}\n",
        results_table(results),
        f"\ntop-p {cfg.top_p} sampling (top_k {cfg.top_k}, temperature {cfg.temperature}), "
        f"min_new_tokens = max_new_tokens = {cfg.new_tokens}, median of {cfg.repeats} timed runs after "
        f"{cfg.warmup} warm-up. gen tok/s = batch x new tokens / median time.\n",
    ]
    one = next((r for r in results if r.batch_size == 1), None)
    if one is not None:
        parts.append(
            f"\nPer-token latency at batch 1: {fmt(one.per_token_s, 2, 1000)} ms (full/new), "
            f"{fmt(one.decode_per_token_s, 2, 1000)} ms decode-only; "
            f"first token {fmt(one.first_median_s, 2, 1000)} ms.\n"
        )
    parts.append("\n### Provenance\n")
    parts.append(info.markdown())
    for key, value in extra.items():
        parts.append(f"- {key}: {value}\n")
    return "".join(parts)


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.baseline",
        description="Plain transformers GPT2LMHeadModel.generate() throughput/latency baseline.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="checkpoint directory (or hub id) for GPT2LMHeadModel.from_pretrained")
    src.add_argument("--random-config", choices=list(RANDOM_CONFIGS), help="random weights of a named shape")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32")
    p.add_argument("--batch-sizes", default="1,4,16", help="comma-separated (default %(default)s)")
    p.add_argument("--prompt-tokens", type=int, default=24)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=0, help="0 disables top-k (default %(default)s)")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per batch size (default %(default)s)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per batch size (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--out", help="directory for <name>.md/.csv/.json")
    p.add_argument("--tag", help="suffix for the output file names")
    return p


def config_from_args(args: argparse.Namespace, cuda_available: bool) -> BaselineConfig:
    """Validate and resolve the CLI. Raises ValueError on an invalid combination."""
    device = args.device or ("cuda" if cuda_available else "cpu")
    if device == "cuda" and not cuda_available:
        raise ValueError("--device cuda but torch.cuda.is_available() is False")
    for flag in ("prompt_tokens", "new_tokens", "repeats"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        raise ValueError("--warmup must be >= 0")
    if not 0.0 < args.top_p <= 1.0:
        raise ValueError("--top-p must be in (0, 1]")
    return BaselineConfig(
        model=args.model,
        random_config=args.random_config,
        device=device,
        dtype=args.dtype,
        batch_sizes=tuple(parse_batch_sizes(args.batch_sizes)),
        prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens,
        top_p=args.top_p,
        top_k=args.top_k,
        temperature=args.temperature,
        repeats=args.repeats,
        warmup=args.warmup,
        seed=args.seed,
        threads=args.threads,
    )


def load_model(cfg: BaselineConfig) -> Any:
    """A GPT2LMHeadModel in eval mode on cfg.device with cfg.dtype (random weights seeded by cfg.seed)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    dtype = torch.float16 if cfg.dtype == "fp16" else torch.float32
    if cfg.model is not None:
        model = GPT2LMHeadModel.from_pretrained(cfg.model, dtype=dtype)
    else:
        assert cfg.random_config is not None
        dims: dict[str, Any] = dict(RANDOM_CONFIGS[cfg.random_config])
        eos = dims["vocab_size"] - 1
        torch.manual_seed(cfg.seed)
        model = GPT2LMHeadModel(GPT2Config(**dims, bos_token_id=eos, eos_token_id=eos))
        model = model.to(dtype)  # type: ignore[arg-type]
    return model.to(cfg.device).eval()  # type: ignore[arg-type]


def prompt_batches(cfg: BaselineConfig, model: Any) -> Iterator[tuple[int, Any]]:
    """(batch size, prompt ids on cfg.device) for every batch size, drawn in order from one generator
    seeded by cfg.seed: random token ids excluding the EOS id. Raises ValueError (before any work)
    if prompt + new tokens do not fit the model's n_positions."""
    import torch

    n_positions = model.config.n_positions
    if cfg.prompt_tokens + cfg.new_tokens > n_positions:
        raise ValueError(f"prompt + new tokens = {cfg.prompt_tokens + cfg.new_tokens} > n_positions {n_positions}")
    vocab, eos = model.config.vocab_size, model.config.eos_token_id

    def batches() -> Iterator[tuple[int, Any]]:
        gen = torch.Generator().manual_seed(cfg.seed)
        for bs in cfg.batch_sizes:
            ids = torch.randint(0, vocab - 1, (bs, cfg.prompt_tokens), generator=gen)
            if isinstance(eos, int):
                ids[ids == eos] = (eos + 1) % vocab if eos + 1 < vocab else 0
            yield bs, ids.to(cfg.device)

    return batches()


def timed_generate(cfg: BaselineConfig, model: Any, ids: Any, new: int, **extra: Any) -> Callable[[], float]:
    """A function that runs one sampled generate() of exactly `new` tokens on `ids` (cfg's top-p, top-k
    and temperature, `extra` passed on to generate) and returns its wall time in seconds, bracketed by
    torch.cuda.synchronize() on cuda. It raises RuntimeError if generate returns another length."""
    import torch

    eos = model.config.eos_token_id
    kwargs: dict[str, Any] = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "do_sample": True,
        "top_p": cfg.top_p,
        "top_k": cfg.top_k,
        "temperature": cfg.temperature,
        "max_new_tokens": new,
        "min_new_tokens": new,
        "pad_token_id": eos if isinstance(eos, int) else 0,
        **extra,
    }
    cuda = cfg.device == "cuda"

    def run() -> float:
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**kwargs)
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        if out.shape[1] != cfg.prompt_tokens + new:
            raise RuntimeError(f"generate returned {out.shape[1] - cfg.prompt_tokens} new tokens, expected {new}")
        return elapsed

    return run


def measure(cfg: BaselineConfig, model: Any, log: Callable[[str], None]) -> list[BatchResult]:
    """Warm up and time generate() for every batch size. Raises RuntimeError if a row is short."""
    results = []
    for bs, ids in prompt_batches(cfg, model):
        run_full = timed_generate(cfg, model, ids, cfg.new_tokens, use_cache=True)
        run_first = timed_generate(cfg, model, ids, 1, use_cache=True)
        for _ in range(cfg.warmup):
            run_full()
            run_first()
        full = tuple(run_full() for _ in range(cfg.repeats))
        first = tuple(run_first() for _ in range(cfg.repeats))
        result = BatchResult(bs, full, first, cfg.prompt_tokens, cfg.new_tokens)
        log(f"[baseline] batch {bs}: {result.tokens_per_s:.1f} tok/s, median {result.full_median_s:.3f} s")
        results.append(result)
    return results


def csv_rows(results: Sequence[BatchResult]) -> list[dict[str, Any]]:
    """One CSV row per timed run."""
    rows = []
    for r in results:
        for kind, times, new in (("full", r.full_times_s, r.new_tokens), ("first_token", r.first_times_s, 1)):
            for i, t in enumerate(times):
                rows.append(
                    {
                        "batch_size": r.batch_size,
                        "kind": kind,
                        "repeat": i,
                        "seconds": round(t, 6),
                        "prompt_tokens": r.prompt_tokens,
                        "new_tokens": new,
                        "generated_tokens": r.batch_size * new,
                        "tokens_per_s": round(r.batch_size * new / t, 3) if t > 0 else None,
                    }
                )
    return rows


def log(msg: str) -> None:
    """Progress to stderr (stdout carries the report)."""
    print(msg, file=sys.stderr, flush=True)


def parse_config(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None
) -> tuple[argparse.Namespace, BaselineConfig]:
    """Parse argv with `parser` (build_parser's, perhaps extended) and resolve it; a bad combination
    exits through parser.error. Sets torch's thread count when --threads is given."""
    args = parser.parse_args(argv)
    import torch

    try:
        cfg = config_from_args(args, torch.cuda.is_available())
    except ValueError as err:
        parser.error(str(err))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return args, cfg


def command_line(prog: str, argv: Sequence[str] | None) -> list[str]:
    """The command as run, for the provenance."""
    return [prog, *(sys.argv[1:] if argv is None else argv)]


def output_name(prefix: str, cfg: BaselineConfig, tag: str | None) -> str:
    """<prefix>-<checkpoint dir name | random-<shape>>-<device>-<dtype>[-<tag>]: the output files' stem."""
    source = cfg.model.rstrip("/").split("/")[-1] if cfg.model else f"random-{cfg.random_config}"
    return f"{prefix}-{source}-{cfg.device}-{cfg.dtype}{'-' + tag if tag else ''}"


def parameter_count(model: Any) -> str:
    """The model's parameter count, with thousands separators."""
    return f"{sum(p.numel() for p in model.parameters()):,}"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: 0 on success, 2 on bad arguments."""
    parser = build_parser()
    args, cfg = parse_config(parser, argv)
    import torch
    import transformers

    if cfg.dtype == "fp16" and cfg.device == "cpu":
        warnings.warn("fp16 on CPU is usually slower than fp32; measuring anyway", stacklevel=1)
    model = load_model(cfg)
    try:
        results = measure(cfg, model, log)
    except ValueError as err:
        parser.error(str(err))
    extra = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch threads": torch.get_num_threads(),
        "device name": torch.cuda.get_device_name() if cfg.device == "cuda" else "cpu",
        "model parameters": parameter_count(model),
    }
    info = RunInfo.collect(to_jsonable(cfg), argv=command_line("python -m benchmarks.baseline", argv))
    markdown = render_markdown(cfg, results, info, extra)
    sys.stdout.write(markdown)
    if args.out:
        summary = {"results": [r.summary() for r in results], "run": info.to_dict(), "environment": extra}
        written = write_outputs(args.out, output_name("baseline", cfg, args.tag), markdown, csv_rows(results), summary)
        log("[baseline] wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
