"""The scheduler running decodes ahead (GATEWAY_DECODE_AHEAD) against the real step engine (the tiny
model, in process: the contract's own StepRequest / StepResult, no Triton): every generation is
token for token, logprob for logprob, the one it is stepping one token per execution, whatever the
sampling (greedy, top-k, top-p with a nucleus wider than any window, logprobs), also when the
model's proposals are wrong (every refused one rewound), and a stop or max_tokens inside a run
ahead ends the generation there."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import step_model.ahead as ahead_module
from frontend.engine.protocol import EngineRequest, Event, FinishEvent, TokenEvent
from frontend.engine.scheduler import ActiveSequence, Scheduler, SchedulerConfig
from frontend.engine.step_rows import Row, StepRequest, StepResult, from_rows
from frontend.sampling import SamplingParams
from step_model.engine import ModelMeta, StepEngine
from tests.conftest import DEVICE, STRICT, TINY

pytestmark = [pytest.mark.unit, pytest.mark.asyncio]

PROMPTS = [[5, 6, 7, 8], [9, 10], [11], [12, 13, 14]]
REQUESTS = [
    (SamplingParams(temperature=0.0), None),  # greedy
    (SamplingParams(temperature=0.8, top_k=20, logprobs=3), 7),  # top-k inside the window, alternatives
    (SamplingParams(temperature=0.7, top_p=0.9), 11),  # the seed's request: drawn from the whole row
    (SamplingParams(temperature=1.0, top_k=40, top_p=0.95, min_p=0.01), 13),
]


class EngineBackend:
    """The scheduler's StepBackend over a StepEngine in this process; `restart_at`: before that step
    the engine is replaced by a fresh one (a Triton restart: every sequence lost)."""

    def __init__(self, engine: StepEngine, restart_at: int = 0, fresh: Callable[[], StepEngine] | None = None) -> None:
        self.engine = engine
        self.batches: list[StepRequest] = []
        self.restart_at, self.fresh = restart_at, fresh

    async def step(self, rows: StepRequest | Sequence[Row], *, window: int, want_logits: bool = False) -> StepResult:
        batch = rows if isinstance(rows, StepRequest) else from_rows(rows)
        batch = replace(batch, window=window, want_logits=want_logits)
        self.batches.append(batch)
        if self.fresh is not None and len(self.batches) == self.restart_at:
            self.engine = self.fresh()
        out = self.engine.step([batch])[0]
        assert isinstance(out, StepResult), out
        return out


@pytest.fixture(scope="module")
def version_dir(model_repository: Path) -> Path:
    return model_repository / TINY / "1"


def make_engine(version_dir: Path) -> StepEngine:
    meta = ModelMeta.load(version_dir)
    eng = StepEngine(
        version_dir / "model.onnx", meta, capacity=8, device=DEVICE, strict_device=STRICT, cuda_graphs=True
    )
    eng.warm_up()
    return eng


async def until_finished(
    seq: ActiveSequence,
) -> tuple[list[tuple[int, float, tuple[tuple[int, float], ...]]], FinishEvent]:
    """A generation's tokens (id, logprob, alternatives) and the event that finished it."""
    events: list[Event] = []
    while not events or not isinstance(events[-1], FinishEvent):
        events.append(await asyncio.wait_for(seq.events.get(), 30))
    last = events[-1]
    assert isinstance(last, FinishEvent)
    return [(e.token_id, e.logprob, e.top_logprobs) for e in events if isinstance(e, TokenEvent)], last


async def generate(
    version_dir: Path,
    ahead: int,
    *,
    max_new_tokens: int = 24,
    stop_token_ids: Sequence[int] = (),
    restart_at: int = 0,
) -> tuple[list[list[tuple[int, float, tuple[tuple[int, float], ...]]]], list[str], EngineBackend]:
    engine = make_engine(version_dir)
    backend = EngineBackend(engine, restart_at, lambda: make_engine(version_dir))
    meta = engine.meta
    config = SchedulerConfig(default_window=16, max_running=8, decode_ahead=ahead, prefill_hold_s=0.0)
    sched = Scheduler(backend, config, eos_token_id=meta.eos_token_id, vocab_size=meta.vocab_size)
    sched.start()
    seqs = [
        sched.submit(EngineRequest(p, params, max_new_tokens, seed=seed, stop_token_ids=stop_token_ids))
        for p, (params, seed) in zip(PROMPTS, REQUESTS, strict=True)
    ]
    tokens: list[list[tuple[int, float, tuple[tuple[int, float], ...]]]] = []
    finishes = []
    for seq in seqs:
        got, finish = await until_finished(seq)
        tokens.append(got)
        finishes.append(finish.reason)
    await sched.close()
    assert backend.engine.live_sequences() == 0  # every slot released
    return tokens, finishes, backend


@pytest.fixture(scope="module")
def one_per_step(version_dir: Path) -> tuple[list, list[str]]:
    tokens, finishes, backend = asyncio.run(generate(version_dir, 0))
    assert all(b.ahead is None for b in backend.batches)
    return tokens, finishes


async def test_running_ahead_generates_exactly_what_one_token_per_step_does(
    version_dir: Path, one_per_step: tuple[list, list[str]]
) -> None:
    tokens, finishes, backend = await generate(version_dir, 4)
    assert tokens == one_per_step[0] and finishes == one_per_step[1] == ["length"] * 4
    assert any(b.ahead is not None for b in backend.batches)
    assert backend.engine.stats.ahead_tokens_total > 0
    assert len(backend.batches) < 24  # fewer executions than tokens


@pytest.fixture
def wrong_proposals(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The model proposes a wrong token now and then (as a rounding could): every third proposal of
    every row is shifted by one id."""
    real = ahead_module.propose_from_window
    calls = [0]

    def propose(z: torch.Tensor, ids: torch.Tensor, lse: torch.Tensor, draw: torch.Tensor) -> tuple:
        token, logit = real(z, ids, lse, draw)
        calls[0] += 1
        if calls[0] % 3 == 0:
            token = (token + 1) % 50
        return token, logit

    monkeypatch.setattr(ahead_module, "propose_from_window", propose)
    yield


async def test_wrong_proposals_are_refused_and_rewound(
    version_dir: Path, one_per_step: tuple[list, list[str]], wrong_proposals: None
) -> None:
    tokens, finishes, backend = await generate(version_dir, 3)
    assert tokens == one_per_step[0] and finishes == one_per_step[1]
    assert any(b.rewind is not None for b in backend.batches)


async def test_a_stop_inside_a_run_ahead_ends_the_generation_there(
    version_dir: Path, one_per_step: tuple[list, list[str]]
) -> None:
    greedy = [t for t, _, _ in one_per_step[0][0]]
    stop = greedy[5]
    tokens, finishes, _ = await generate(version_dir, 4, stop_token_ids=[stop])
    assert [t for t, _, _ in tokens[0]] == greedy[: greedy.index(stop) + 1] and finishes[0] == "stop"
    for got, want in zip(tokens[1:], one_per_step[0][1:], strict=True):
        ids = [t for t, _, _ in want]
        cut = ids.index(stop) + 1 if stop in ids else len(ids)
        assert got == want[:cut]


async def test_max_tokens_caps_the_decodes_run_ahead(version_dir: Path) -> None:
    tokens, finishes, backend = await generate(version_dir, 8, max_new_tokens=5)
    assert [len(t) for t in tokens] == [5] * 4 and finishes == ["length"] * 4
    for b in backend.batches:
        if b.ahead is not None:
            assert int(np.max(b.ahead)) <= 4


async def test_sequences_running_ahead_survive_a_triton_restart(
    version_dir: Path, one_per_step: tuple[list, list[str]], wrong_proposals: None
) -> None:
    """Triton restarts while rows run ahead and some proposals are refused: the sequences start
    again (prompt, then their tokens replayed: they are seeded or greedy), run ahead again, and
    finish token for token as one token per step does."""
    tokens, finishes, backend = await generate(version_dir, 3, restart_at=4)
    assert tokens == one_per_step[0] and finishes == one_per_step[1]
    restarted = backend.batches[4:]
    assert any(b.replay_from is not None and (b.replay_from > 0).any() for b in restarted)
