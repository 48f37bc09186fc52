"""A step's rows are sampled by the vectorized passes, or one by one by the reference sampler when
there are few of them (frontend.engine.step_sampling.PER_ROW_MAX): the generations must not tell
which. The scheduler against the real step engine (tiny model, in process), a mix of every sampling
path (greedy, top-k with alternatives, a nucleus wider than the window drawn on the device, min-p,
a repetition penalty, presence / frequency penalties with logit_bias, min_tokens), with the
threshold forcing each path and the default, token for token and logprob for logprob."""

from __future__ import annotations

from pathlib import Path

import pytest

import frontend.engine.step_sampling as step_sampling
from frontend.engine.protocol import EngineRequest
from frontend.engine.scheduler import Scheduler, SchedulerConfig
from frontend.sampling import SamplingParams
from tests.conftest import TINY
from tests.unit.test_scheduler_ahead import EngineBackend, make_engine, until_finished

pytestmark = [pytest.mark.unit, pytest.mark.asyncio]

MIX = [
    (SamplingParams(temperature=0.0), None, 0),
    (SamplingParams(temperature=0.8, top_k=20, logprobs=3), 7, 0),
    (SamplingParams(temperature=0.7, top_p=0.9), 11, 0),  # wider than any window: a device draw
    (SamplingParams(temperature=1.0, top_k=40, top_p=0.95, min_p=0.01), 13, 0),
    (SamplingParams(temperature=0.9, repetition_penalty=1.3, logprobs=2), 17, 0),
    (SamplingParams(temperature=0.8, presence_penalty=0.5, frequency_penalty=0.3, logit_bias=((5, 2.0),)), 19, 3),
    (SamplingParams(temperature=0.6, top_p=0.8, logprobs=1), 23, 0),
]
PROMPTS = [[5, 6, 7, 8], [9, 10], [11], [12, 13, 14], [5, 5, 6], [7], [8, 9, 10, 11, 12]]


async def generate(version_dir: Path, mix: list[tuple[SamplingParams, int | None, int]]) -> list[list[tuple]]:
    engine = make_engine(version_dir)
    meta = engine.meta
    sched = Scheduler(
        EngineBackend(engine),
        SchedulerConfig(default_window=16, max_running=8, prefill_hold_s=0.0),
        eos_token_id=meta.eos_token_id,
        vocab_size=meta.vocab_size,
    )
    sched.start()
    seqs = [
        sched.submit(EngineRequest(p, params, 12, seed=seed, min_tokens=min_tokens))
        for p, (params, seed, min_tokens) in zip(PROMPTS, mix, strict=False)
    ]
    got = [(await until_finished(seq))[0] for seq in seqs]
    await sched.close()
    assert engine.live_sequences() == 0
    return got


@pytest.mark.parametrize("rows", [3, len(MIX)], ids=["few rows", "many rows"])
async def test_the_per_row_and_the_vectorized_paths_generate_the_same(
    model_repository: Path, monkeypatch: pytest.MonkeyPatch, rows: int
) -> None:
    version_dir = model_repository / TINY / "1"
    mix = MIX[-rows:] if rows < len(MIX) else MIX  # the few: the penalties, logit_bias, a narrow top-p
    results = []
    for threshold in (0, step_sampling.PER_ROW_MAX, 1000):  # always vectorized, the default, always per row
        monkeypatch.setattr(step_sampling, "PER_ROW_MAX", threshold)
        results.append(await generate(version_dir, mix))
    assert results[0] == results[1] == results[2]
    assert all(len(tokens) == 12 for tokens in results[0])
