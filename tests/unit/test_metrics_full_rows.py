"""`gateway_full_row_fetches_total{reason}` as the scheduler feeds it: a repetition penalty really
shows up as `reason="repetition_penalty"`, whether the step carried the rows itself (most rows
wanted them) or a second round trip fetched them. The scheduler runs against the scripted backend
of tests/unit/test_scheduler.py with `GatewayMetrics` as its observer."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client.parser import text_string_to_metric_families

from frontend.engine.protocol import EngineRequest, FinishEvent, TokenEvent
from frontend.observability.metrics import GatewayMetrics
from frontend.sampling import SamplingParams
from tests.unit.test_scheduler import GREEDY, ScriptedBackend, drain, scheduler

pytestmark = [pytest.mark.unit, pytest.mark.asyncio]

PENALTY = SamplingParams(temperature=0.8, repetition_penalty=1.3)


def fetches(metrics: GatewayMetrics) -> dict[str, float]:
    text = metrics.engine_text().decode()
    return {
        s.labels["reason"]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "gateway_full_row_fetches_total"
    }


async def test_a_repetition_penalty_counts_as_its_own_reason_in_the_step() -> None:
    backend = ScriptedBackend(capacity=4)
    metrics = GatewayMetrics(model_name="tiny")
    sched = scheduler(backend, observer=metrics)
    sched.start()
    seq = sched.submit(EngineRequest([1, 2, 3], PENALTY, 4, seed=7))
    events = await drain(seq.events)  # type: ignore[arg-type]
    await sched.close()
    assert [type(e) for e in events] == [TokenEvent] * 4 + [FinishEvent]
    assert any(backend.wanted_logits)  # the only row wanted its full row: the step carried it
    assert fetches(metrics) == {"repetition_penalty": 4.0}  # every token of the sequence


async def test_a_repetition_penalty_counts_when_fetched_in_a_second_round_trip() -> None:
    backend = ScriptedBackend(capacity=8)
    metrics = GatewayMetrics(model_name="tiny")
    sched = scheduler(backend, observer=metrics)
    sched.start()
    greedy = [sched.submit(EngineRequest([4, 5], GREEDY, 3, seed=None)) for _ in range(3)]
    penalised = sched.submit(EngineRequest([1, 2, 3], PENALTY, 3, seed=1))
    results = await asyncio.gather(*(drain(s.events) for s in [*greedy, penalised]))  # type: ignore[arg-type]
    await sched.close()
    assert all(isinstance(r[-1], FinishEvent) for r in results)
    assert not backend.wanted_logits[0]  # 1 of 4 rows: the step did not carry full rows
    tokens = sum(isinstance(e, TokenEvent) for e in results[-1])
    assert tokens >= 1 and backend.batches[1].sequence_ids.shape == (1,)  # its row came by a second request
    assert fetches(metrics)["repetition_penalty"] == tokens  # one fetch per token it drew
    assert set(fetches(metrics)) == {"repetition_penalty"}  # greedy rows were decided by the window


async def test_kv_usage_and_vllm_queue_gauges_follow_the_scheduler() -> None:
    backend = ScriptedBackend(capacity=4)
    metrics = GatewayMetrics(model_name="tiny", kv_capacity=4)
    sched = scheduler(backend, observer=metrics)
    sched.start()
    seqs = [sched.submit(EngineRequest([1, 2], GREEDY, 2, seed=None)) for _ in range(2)]
    metrics.queue_changed(waiting=1, running=2)  # as the scheduler reports while they run
    samples = {
        (s.name, s.labels.get("model_name")): s.value
        for family in text_string_to_metric_families(metrics.engine_text().decode())
        for s in family.samples
    }
    assert samples[("vllm:kv_cache_usage_perc", "tiny")] == 0.5
    assert samples[("vllm:num_requests_running", "tiny")] == 2
    assert samples[("vllm:num_requests_waiting", "tiny")] == 1
    await asyncio.gather(*(drain(s.events) for s in seqs))  # type: ignore[arg-type]
    await sched.close()
