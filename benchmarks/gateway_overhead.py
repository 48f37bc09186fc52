"""`python -m benchmarks.gateway_overhead`: the gateway's own cost per generated token.

Drives the real scheduler, sampler, detokenizer, stop matcher, metrics and cache (the whole
`GenerationService` minus HTTP) against an instant fake Triton, so the figure is what one gateway
process can push at most, whatever the model server does. It bounds how much of a measured step
time belongs to the gateway (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import time
from pathlib import Path

import numpy as np

from frontend.cache import MemoryResultCache
from frontend.engine.model import ServedModel
from frontend.engine.protocol import EngineRequest, EventSink, GenerationHandle
from frontend.engine.scheduler import Scheduler, SchedulerConfig
from frontend.engine.step_rows import StepRequest, StepResult
from frontend.generation.service import GenerationService
from frontend.observability import GatewayMetrics
from frontend.sampling import BatchParams, SamplingParams, sample_window_batch
from frontend.settings import Settings


class InstantTriton:
    """Answers every step at once with a plausible descending window of random token ids. Rows that
    run decodes ahead get a window per ahead decode and, as proposals, the tokens the gateway's
    sampler picks for them (`params`, every request's, and the row's uniform): a model whose every
    proposal is accepted, so the figure is the judging's own cost."""

    def __init__(self, vocab_size: int, params: SamplingParams, seed: int = 0) -> None:
        self.vocab_size = vocab_size
        self.params = params
        self.rng = np.random.default_rng(seed)

    def _windows(self, shape: tuple[int, ...], window: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        values = -np.sort(-self.rng.normal(0, 3, (*shape, window)).astype(np.float32), axis=-1)
        ids = self.rng.choice(self.vocab_size - 1, window, replace=False)  # distinct, as a real window's
        ids = np.broadcast_to(ids, values.shape).astype(np.int64)
        return values, ids, (values[..., 0] + 2.0).astype(np.float32)

    async def step(self, rows: StepRequest, *, window: int, want_logits: bool = False) -> StepResult:
        n = int(rows.sequence_ids.shape[0])
        values, ids, lse = self._windows((n,), window)
        out = StepResult(np.zeros(n, dtype=np.int32), values, ids, lse, None)  # every row OK
        if rows.ahead is not None and rows.ahead_u is not None:
            depth = int(rows.ahead.max())
            z, zi, zl = self._windows((n, depth), window)
            proposed = np.zeros((n, depth), dtype=np.int64)
            params = BatchParams.from_params([self.params] * n)
            for s in range(depth):
                batch = sample_window_batch(z[:, s], zi[:, s], zl[:, s], params, rows.ahead_u[:, s])
                proposed[:, s] = np.where(batch.decided, batch.token_ids, zi[:, s, 0])
            out.ahead_topk_logits, out.ahead_topk_ids, out.ahead_logsumexp = z, zi, zl
            out.ahead_ids, out.ahead_logits = proposed, np.zeros((n, depth), dtype=np.float32)
            out.ahead_drawn = np.zeros((n, depth), dtype=bool)
        return out


class _Engine:
    def __init__(self, scheduler: Scheduler, model: ServedModel) -> None:
        self.scheduler = scheduler
        self.model = model

    def submit(self, request: EngineRequest, events: EventSink | None = None) -> GenerationHandle:
        return self.scheduler.submit(request, events)

    def cancel(self, handle: GenerationHandle) -> None:
        self.scheduler.cancel(handle)  # type: ignore[arg-type]


async def measure(model: ServedModel, concurrency: int, new_tokens: int, top_k: int, ahead: int = 0) -> float:
    metrics = GatewayMetrics()
    params = SamplingParams(temperature=0.8, top_k=top_k)
    scheduler = Scheduler(
        InstantTriton(model.vocab_size, params),  # type: ignore[arg-type]
        SchedulerConfig(max_running=concurrency, decode_ahead=ahead),
        eos_token_id=model.eos_token_id,
        vocab_size=model.vocab_size,
        observer=metrics,
    )
    scheduler.start()
    service = GenerationService(
        _Engine(scheduler, model),  # type: ignore[arg-type]
        MemoryResultCache(16, 60),
        metrics,
        settings=Settings(environment="test"),
    )
    prompt = tuple(range(5, 29))

    async def one() -> None:
        req = service.request(
            prompt,
            max_new_tokens=new_tokens,
            temperature=0.8,
            top_p=1.0,
            top_k=top_k,
            min_p=0.0,
            repetition_penalty=1.0,
            stop=[],
            seed=None,
        )
        async for _ in service.stream(req):
            pass

    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    await scheduler.close()
    return concurrency * new_tokens / elapsed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gateway_overhead", description=__doc__.splitlines()[0])
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument("--model", default="gpt2")
    p.add_argument("--version", default="1")
    p.add_argument("--concurrency", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--top-k", type=int, default=50, help="1 or more: the fake's windows hold no full rows")
    p.add_argument("--ahead", type=int, default=0, help="decodes run ahead per step (GATEWAY_DECODE_AHEAD)")
    args = p.parse_args(argv)
    if args.top_k < 1:
        p.error("--top-k must be 1 or more (the instant Triton answers no full rows)")
    model = ServedModel.load(args.repository, args.model, args.version)
    rate = asyncio.run(measure(model, args.concurrency, args.new_tokens, args.top_k, args.ahead))
    print(
        f"gateway overhead ({platform.node()}, {time.strftime('%Y-%m-%d')}): {args.concurrency} concurrent x "
        f"{args.new_tokens} tokens, top-k {args.top_k}, {args.ahead} ahead: {rate:,.0f} tokens/s per process = "
        f"{1e6 / rate:.1f} us per token"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
