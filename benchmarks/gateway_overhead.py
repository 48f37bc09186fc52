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
from frontend.settings import Settings


class InstantTriton:
    """Answers every step at once with a plausible descending window of random token ids."""

    def __init__(self, vocab_size: int, seed: int = 0) -> None:
        self.vocab_size = vocab_size
        self.rng = np.random.default_rng(seed)

    async def step(self, rows: StepRequest, *, window: int, want_logits: bool = False) -> StepResult:
        n = int(rows.sequence_ids.shape[0])
        values = np.sort(self.rng.normal(0, 3, (n, window)).astype(np.float32), axis=1)[:, ::-1].copy()
        ids = self.rng.integers(0, self.vocab_size - 1, (n, window)).astype(np.int64)
        status = np.zeros(n, dtype=np.int32)  # every row OK
        return StepResult(status, values, ids, (values[:, 0] + 2.0).astype(np.float32), None)


class _Engine:
    def __init__(self, scheduler: Scheduler, model: ServedModel) -> None:
        self.scheduler = scheduler
        self.model = model

    def submit(self, request: EngineRequest, events: EventSink | None = None) -> GenerationHandle:
        return self.scheduler.submit(request, events)

    def cancel(self, handle: GenerationHandle) -> None:
        self.scheduler.cancel(handle)  # type: ignore[arg-type]


async def measure(model: ServedModel, concurrency: int, new_tokens: int, top_k: int) -> float:
    metrics = GatewayMetrics()
    scheduler = Scheduler(
        InstantTriton(model.vocab_size),  # type: ignore[arg-type]
        SchedulerConfig(max_running=concurrency),
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
    p.add_argument("--top-k", type=int, default=50)
    args = p.parse_args(argv)
    model = ServedModel.load(args.repository, args.model, args.version)
    rate = asyncio.run(measure(model, args.concurrency, args.new_tokens, args.top_k))
    print(
        f"gateway overhead ({platform.node()}, {time.strftime('%Y-%m-%d')}): {args.concurrency} concurrent x "
        f"{args.new_tokens} tokens, top-k {args.top_k}: {rate:,.0f} tokens/s per process = "
        f"{1e6 / rate:.1f} us per token"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
