"""The scheduler's faults that one generation can cause (a row whose numbers cannot be sampled, a
failure outside the rows, a 0-token generation) against test_scheduler's scripted backend."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from frontend.engine.protocol import EngineRequest, ErrorEvent, FinishEvent, SamplingFailed, TokenEvent
from frontend.sampling import SamplingParams
from tests.unit.test_scheduler import GREEDY, ScriptedBackend, drain, scheduler

pytestmark = [pytest.mark.unit, pytest.mark.asyncio]


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
async def test_a_row_whose_numbers_cannot_be_sampled_fails_alone_and_the_others_go_on() -> None:
    """A repetition penalty of 1e-300 (the API now refuses it; any other way to a non-finite row
    too) overflows float32: that row fails with SamplingFailed, once; the rows sharing its steps,
    adjusted or not, finish as if it were not there (the old loop retried the step forever and no
    generation progressed)."""
    backend = ScriptedBackend(capacity=4)
    backend.answer_extras = True
    sched = scheduler(backend)
    sched.start()
    poison = sched.submit(EngineRequest([1, 2, 3], SamplingParams(temperature=1.0, repetition_penalty=1e-300), 6, 1))
    adjusted = sched.submit(EngineRequest([1, 2, 3], SamplingParams(temperature=0.8, repetition_penalty=1.3), 6, 2))
    plain = sched.submit(EngineRequest([4], GREEDY, 6, seed=None))
    results = await asyncio.gather(*(drain(s.events, timeout_s=2.0) for s in (poison, adjusted, plain)))  # type: ignore[arg-type]
    await sched.close()
    assert isinstance(results[0][-1], ErrorEvent) and isinstance(results[0][-1].error, SamplingFailed)
    for events in results[1:]:
        assert [type(e) for e in events] == [TokenEvent] * 6 + [FinishEvent]
    assert not backend.live  # the failed row's slot was released


async def test_an_iteration_that_fails_outside_the_rows_fails_its_step_once_not_forever() -> None:
    """Anything that raises while a step is planned or sampled fails the generations of that step
    with an error, once; a later generation runs normally (no loop of tracebacks)."""
    backend = ScriptedBackend(capacity=4)
    sched = scheduler(backend)
    original = sched._plan
    calls = {"n": 0}

    def failing_once(lane: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("a bug in planning")
        return original(lane)

    sched._plan = failing_once  # type: ignore[method-assign]
    sched.start()
    first = sched.submit(EngineRequest([1], GREEDY, 4, seed=None))
    events = await drain(first.events, timeout_s=2.0)  # type: ignore[arg-type]
    assert isinstance(events[-1], ErrorEvent)
    later = sched.submit(EngineRequest([2], GREEDY, 3, seed=None))
    events = await drain(later.events, timeout_s=2.0)  # type: ignore[arg-type]
    assert [type(e) for e in events] == [TokenEvent] * 3 + [FinishEvent]
    await sched.close()
    assert not backend.live


async def test_a_zero_token_generation_finishes_after_its_prefill_without_a_token() -> None:
    # max_new_tokens 0 with no prompt logprobs (the API layer answers echo itself; the engine
    # must be right too): the prefill runs (the model checks the prompt), then "length", no token.
    backend = ScriptedBackend(capacity=4)
    sched = scheduler(backend)
    sched.start()
    seq = sched.submit(EngineRequest([1, 2, 3], GREEDY, 0, seed=None))
    events = await drain(seq.events)  # type: ignore[arg-type]
    await sched.close()
    assert events == [FinishEvent("length")]
    assert backend.batches and bool(backend.batches[0].start.any())
    assert not backend.live
