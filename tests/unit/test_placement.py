"""Several instances of one model (`frontend.engine.placement`) over scripted step backends: where
new sequences go, that every step of a sequence goes to its instance, and that a failed instance's
generations finish on a healthy one token for token while new work avoids it. Also the repository
side (`export.repository.write_instances`) and the per-instance metrics."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from embedded_triton.instances import InstancesError, derived_instances, write_instances
from export.repository import ServingConfig, config_pbtxt
from frontend.engine.breaker import CircuitBreaker
from frontend.engine.placement import PlacementEngine, _Board, engine_from_settings
from frontend.engine.protocol import (
    BreakerOpen,
    EngineRequest,
    ErrorEvent,
    Event,
    EventSink,
    FinishEvent,
    GenerationHandle,
    StepRejected,
    TokenEvent,
    UpstreamUnavailable,
)
from frontend.engine.scheduler import ActiveSequence, Scheduler
from frontend.engine.step_rows import StepRequest, StepResult, from_rows
from frontend.engine.triton_engine import TritonEngine
from frontend.observability import GatewayMetrics
from frontend.sampling import SamplingParams
from frontend.settings import Settings
from step_model.contract import model_config
from tests.unit.test_scheduler import GREEDY, ScriptedBackend, drain, scheduler

pytestmark = pytest.mark.unit


class InstanceBackend(ScriptedBackend):
    """A scripted step model that can go down (every step raises, as an unloaded model's do)."""

    def __init__(self, capacity: int = 8) -> None:
        super().__init__(capacity)
        self.by_content = True  # a sequence started again elsewhere continues as it would have
        self.delay_s = 0.002
        self.down = False
        self.refused = 0

    async def step(self, rows: Any, *, window: int, want_logits: bool = False) -> StepResult:
        if self.down:
            self.refused += 1
            await asyncio.sleep(0.001)
            raise UpstreamUnavailable("Request for unknown model: 'tiny_1' is not found")
        return await super().step(rows, window=window, want_logits=want_logits)

    def started_ids(self) -> set[int]:
        """The sequence ids of every start row this instance ran."""
        batches = [b if isinstance(b, StepRequest) else from_rows(b) for b in self.batches]
        return {int(sid) for b in batches for sid, start in zip(b.sequence_ids, b.start, strict=True) if start}

    def stepped_ids(self) -> set[int]:
        return {int(sid) for b in self.batches for sid in b.sequence_ids.tolist()}


class FakeInstance:
    """A `TritonEngine` without Triton: a scheduler over an `InstanceBackend`."""

    def __init__(self, name: str, *, capacity: int = 8, version: str = "1", **config: Any) -> None:
        self.name = name
        self.backend = InstanceBackend(capacity)
        self.breaker = CircuitBreaker(failure_threshold=2, reset_timeout_s=0.05)
        self.model = SimpleNamespace(name="tiny", version=version)
        self.config = {"max_running": capacity, "prefill_hold_s": 0.0, **config}
        self.failing_starts = 0
        self.starts = 0
        self._scheduler: Scheduler | None = None

    @property
    def scheduler(self) -> Scheduler | None:
        return self._scheduler

    async def start(self) -> None:
        self.starts += 1
        if self.failing_starts:
            self.failing_starts -= 1
            raise UpstreamUnavailable(f"model {self.name!r} not ready on Triton")
        self._scheduler = scheduler(self.backend, breaker=self.breaker, **self.config)
        self._scheduler.start()

    async def close(self) -> None:
        sched, self._scheduler = self._scheduler, None
        if sched is not None:
            await sched.close()

    async def ready(self) -> bool:
        return self._scheduler is not None and self.breaker.closed and not self.backend.down

    def submit(self, request: EngineRequest, events: EventSink | None = None) -> GenerationHandle:
        if self._scheduler is None:
            raise UpstreamUnavailable("the engine is not started")
        return self._scheduler.submit(request, events)

    def cancel(self, handle: GenerationHandle) -> None:
        if self._scheduler is not None and isinstance(handle, ActiveSequence):
            self._scheduler.cancel(handle)


async def started(*instances: FakeInstance, **kwargs: Any) -> PlacementEngine:
    engine = PlacementEngine(instances, retry_s=0.01, **kwargs)  # type: ignore[arg-type]
    await engine.start()
    for _ in range(200):  # every instance, not only the first
        if len(engine._serving) == len(instances):
            break
        await asyncio.sleep(0.005)
    return engine


def request(prompt: list[int], n: int) -> EngineRequest:
    return EngineRequest(prompt, GREEDY, n, seed=None)


def tokens(events: list[Event]) -> list[int]:
    return [e.token_id for e in events if isinstance(e, TokenEvent)]


async def undisturbed(prompts: list[list[int]], n: int) -> list[list[int]]:
    """The greedy tokens of each prompt on one instance nobody disturbs."""
    instance = FakeInstance("alone")
    await instance.start()
    handles = [instance.submit(request(p, n)) for p in prompts]
    out = [tokens(await drain(h.events)) for h in handles]
    await instance.close()
    return out


def holder(handle: GenerationHandle, *instances: FakeInstance) -> str:
    """The instance whose scheduler holds `handle` now."""
    for instance in instances:
        sched = instance.scheduler
        running = [s for lane in sched._lanes for s in lane.running] if sched is not None else []
        if sched is not None and any(s is handle for s in [*running, *sched._waiting]):
            return instance.name
    return "none"


def placed_on(instance: FakeInstance, handle: GenerationHandle) -> bool:
    assert isinstance(handle, ActiveSequence)
    return handle.sequence_id in instance.backend.stepped_ids()


# ------------------------------------------------------------------------------ placement
@pytest.mark.asyncio
async def test_new_sequences_alternate_between_equal_instances_and_every_step_stays_on_one() -> None:
    a, b = FakeInstance("tiny"), FakeInstance("tiny_1")
    engine = await started(a, b)
    prompts = [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10]]
    handles = [engine.submit(request(p, 12)) for p in prompts]
    results = [await drain(h.events) for h in handles]  # type: ignore[arg-type]
    assert engine.load() == (0, 0)
    assert [placed_on(a, h) for h in handles] == [True, False, True, False]
    assert [placed_on(b, h) for h in handles] == [False, True, False, True]
    # Stickiness: no sequence id ever reached the other instance, and each ran start, 11 decodes, release.
    assert not (a.backend.stepped_ids() & b.backend.stepped_ids())
    assert len(a.backend.started_ids()) == len(b.backend.started_ids()) == 2
    assert all([type(e) for e in r] == [TokenEvent] * 12 + [FinishEvent] for r in results)
    assert [tokens(r) for r in results] == await undisturbed(prompts, 12)
    await engine.close()
    assert not a.backend.live and not b.backend.live


@pytest.mark.asyncio
async def test_a_new_sequence_goes_to_the_instance_with_the_most_free_slots_then_the_shortest_queue() -> None:
    a, b = FakeInstance("tiny", capacity=4), FakeInstance("tiny_1", capacity=4)
    engine = await started(a, b)
    busy = [a.submit(request([i], 10_000)) for i in range(1, 4)]  # 3 of tiny's 4 slots, placed by hand
    await asyncio.sleep(0.02)
    first = [engine.submit(request([9], 10_000)) for _ in range(3)]
    assert [holder(h, a, b) for h in first] == ["tiny_1"] * 3  # 4, 3, 2 free slots against 1
    # One free slot each, tiny_1's 3 still queued: the shorter queue; then both full: the shorter queue.
    more = [engine.submit(request([9], 10_000)) for _ in range(4)]
    assert [holder(h, a, b) for h in more] == ["tiny", "tiny_1", "tiny", "tiny"]
    for handle in busy:
        a.cancel(handle)
    for handle in [*first, *more]:
        engine.cancel(handle)
    await engine.close()


@pytest.mark.asyncio
async def test_new_work_skips_an_instance_whose_breaker_is_open_and_readiness_needs_one_instance() -> None:
    a, b = FakeInstance("tiny"), FakeInstance("tiny_1")
    engine = await started(a, b)
    a.breaker.record_failure("down")
    a.breaker.record_failure("down")
    assert not a.breaker.closed
    handles = [engine.submit(request([i], 3)) for i in range(1, 4)]
    for h in handles:
        await drain(h.events)  # type: ignore[arg-type]
    assert all(placed_on(b, h) for h in handles) and not a.backend.started_ids()
    assert await engine.ready() and engine.breaker is b.breaker
    status = {s["name"]: s for s in engine.instances_status()}
    assert status["tiny"]["breaker"] == "open" and status["tiny_1"]["breaker"] == "closed"
    b.breaker.record_failure("down")
    b.breaker.record_failure("down")
    with pytest.raises(BreakerOpen):  # every instance refuses: the first refusal
        engine.submit(request([1], 3))
    assert engine.breaker is not None and not engine.breaker.closed
    await engine.close()


# ------------------------------------------------------------------------------ failover
@pytest.mark.asyncio
@pytest.mark.parametrize("lanes", [1, 2])
async def test_a_failed_instances_generations_finish_on_the_other_token_for_token_and_new_work_avoids_it(
    lanes: int,
) -> None:
    """Also with two lanes per instance: a sequence in a step still on the wire when the breaker
    opens is handed over by a later pass, once that step has failed."""
    prompts = [[1, 2, 3], [4, 5], [6, 7], [8]]
    expected = await undisturbed(prompts, 30)
    a = FakeInstance("tiny", lanes=lanes, kv_partitions=lanes)
    b = FakeInstance("tiny_1", lanes=lanes, kv_partitions=lanes)
    metrics = GatewayMetrics(model_name="tiny")
    engine = await started(a, b, metrics=metrics)
    handles = [engine.submit(request(p, 30)) for p in prompts]
    on_b = [h for h in handles if holder(h, a, b) == "tiny_1"]
    readers = [asyncio.ensure_future(drain(h.events, timeout_s=10)) for h in handles]  # type: ignore[arg-type]
    while min(len(h.generated) for h in on_b) < 5:  # type: ignore[attr-defined]
        await asyncio.sleep(0.002)
    b.backend.down = True  # tiny_1 fails mid-generation: unloaded, its stub dead, its GPU gone
    results = await asyncio.gather(*readers)
    assert [tokens(r) for r in results] == expected
    assert all(isinstance(r[-1], FinishEvent) for r in results)
    assert len(on_b) == 2 and all(placed_on(a, h) for h in on_b)  # they restarted on tiny
    assert not b.breaker.closed and b.scheduler is not None and (b.scheduler.running, b.scheduler.waiting) == (0, 0)
    moved = metrics.instance_moved.labels("tiny_1", "tiny")._value.get()
    assert moved == 2
    # New work goes to the healthy instance only.
    later = [engine.submit(request([5, 5], 4)) for _ in range(3)]
    for h in later:
        assert isinstance((await drain(h.events))[-1], FinishEvent)  # type: ignore[arg-type]
    assert all(placed_on(a, h) for h in later)
    # tiny_1 comes back (loaded again: it knows no sequence); its probe closes the breaker and it
    # takes new work again.
    b.backend.live.clear()
    b.backend.down = False
    deadline = time.monotonic() + 2
    while not b.breaker.closed and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert b.breaker.closed
    again = engine.submit(request([3], 2))
    await drain(again.events)  # type: ignore[arg-type]
    assert placed_on(b, again)
    await engine.close()
    assert not a.backend.live and not b.backend.live


@pytest.mark.asyncio
async def test_a_moved_batch_invariant_generation_replays_its_tokens_on_the_other_instance() -> None:
    """Failover resumes as a Triton restart does (test_scheduler): a greedy or seeded generation
    (batch-invariant under GATEWAY_BATCH_INVARIANT=auto) starts again on the other instance with its
    start row flagged and replay_from = its prompt's length; an unseeded sampled one prefills its
    prompt plus tokens."""
    a, b = FakeInstance("tiny"), FakeInstance("tiny_1")
    a.backend.answer_draws = b.backend.answer_draws = True
    engine = await started(a, b)
    sampled = SamplingParams(temperature=0.8, top_p=0.9)
    # Equal instances alternate: tiny_1 takes the 2nd (seeded) and the 4th (unseeded sampled).
    bodies = [([1, 2, 3], GREEDY, None), ([4, 5], sampled, 7), ([8], sampled, None), ([6, 7], sampled, None)]
    handles = [engine.submit(EngineRequest(p, params, 30, seed=seed, ignore_eos=True)) for p, params, seed in bodies]
    on_b = [h for h in handles if holder(h, a, b) == "tiny_1"]
    readers = [asyncio.ensure_future(drain(h.events, timeout_s=10)) for h in handles]  # type: ignore[arg-type]
    while min(len(h.generated) for h in on_b) < 5:  # type: ignore[attr-defined]
        await asyncio.sleep(0.002)
    b.backend.down = True
    results = await asyncio.gather(*readers)
    assert all(isinstance(r[-1], FinishEvent) for r in results)
    assert on_b and all(placed_on(a, h) for h in on_b)
    for h in on_b:
        assert isinstance(h, ActiveSequence)
        batch, row = next(
            (batch, i)
            for batch in (x if isinstance(x, StepRequest) else from_rows(x) for x in a.backend.batches)
            for i, (sid, start) in enumerate(zip(batch.sequence_ids.tolist(), batch.start.tolist(), strict=True))
            if start and sid == h.sequence_id
        )
        assert int(batch.lengths[row]) > len(h.prompt_ids)  # prompt + the tokens generated on tiny_1
        flagged = batch.invariant is not None and bool(batch.invariant[row])
        replay = int(batch.replay_from[row]) if batch.replay_from is not None else -1
        assert (flagged, replay) == ((True, len(h.prompt_ids)) if h.invariant else (False, -1))
    assert {h.invariant for h in on_b} == {True, False}  # type: ignore[attr-defined]
    await engine.close()
    assert not a.backend.live  # (tiny_1 stays down: what it held went with it)


@pytest.mark.asyncio
async def test_queued_and_not_yet_started_generations_move_too_and_a_moved_one_is_cancelled_where_it_is() -> None:
    a, b = FakeInstance("tiny", capacity=2), FakeInstance("tiny_1", capacity=2)
    engine = await started(a, b)
    b.backend.down = True  # b is down before anything ran on it (its breaker still closed)
    handles = [engine.submit(request([i], 10_000)) for i in range(1, 7)]  # 3 each: one queued on each
    await asyncio.sleep(0.3)
    assert not b.breaker.closed and b.scheduler is not None and b.scheduler.running + b.scheduler.waiting == 0
    assert all(not h.done for h in handles)  # type: ignore[attr-defined]
    assert a.scheduler is not None and (a.scheduler.running, a.scheduler.waiting) == (2, 4)
    for h in handles:
        engine.cancel(h)
    await asyncio.sleep(0.05)
    assert not a.backend.live  # cancel reached the instance that holds them now
    await engine.close()


@pytest.mark.asyncio
async def test_when_every_instance_fails_at_once_generations_wait_and_resume_token_for_token() -> None:
    prompts = [[1, 2], [3, 4]]
    expected = await undisturbed(prompts, 20)
    a, b = FakeInstance("tiny"), FakeInstance("tiny_1")
    engine = await started(a, b)
    handles = [engine.submit(request(p, 20)) for p in prompts]
    readers = [asyncio.ensure_future(drain(h.events, timeout_s=10)) for h in handles]  # type: ignore[arg-type]
    while min(len(h.generated) for h in handles) < 3:  # type: ignore[attr-defined]
        await asyncio.sleep(0.002)
    a.backend.down = b.backend.down = True  # the whole Triton restarts: no instance to move to
    await asyncio.sleep(0.2)
    assert not a.breaker.closed and not b.breaker.closed
    a.backend.live.clear()
    b.backend.live.clear()
    a.backend.down = b.backend.down = False
    results = await asyncio.gather(*readers)
    assert [tokens(r) for r in results] == expected
    await engine.close()


# ------------------------------------------------------------------------------ start
@pytest.mark.asyncio
async def test_the_engine_serves_once_one_instance_started_and_the_others_join_later() -> None:
    a, b = FakeInstance("tiny"), FakeInstance("tiny_1")
    a.failing_starts = 3
    engine = PlacementEngine([a, b], retry_s=0.01)  # type: ignore[list-item]
    await engine.start()
    assert engine.model.version == "1" and engine._serving == [b]
    handle = engine.submit(request([1], 2))
    await drain(handle.events)  # type: ignore[arg-type]
    assert placed_on(b, handle)
    for _ in range(100):
        if len(engine._serving) == 2:
            break
        await asyncio.sleep(0.01)
    assert engine._serving == [a, b] and a.starts == 4
    await engine.close()


@pytest.mark.asyncio
async def test_the_start_fails_when_every_instance_failed_and_an_instance_of_another_version_never_joins() -> None:
    a, b = FakeInstance("tiny"), FakeInstance("tiny_1")
    a.failing_starts = b.failing_starts = 1
    engine = PlacementEngine([a, b], retry_s=0.01)  # type: ignore[list-item]
    with pytest.raises(UpstreamUnavailable, match="no model instance started"):
        await engine.start()
    await engine.close()
    a, b = FakeInstance("tiny"), FakeInstance("tiny_1", version="2")
    engine = PlacementEngine([a, b], retry_s=0.01)  # type: ignore[list-item]
    await engine.start()
    await asyncio.sleep(0.1)
    assert engine._serving == [a] and b.starts > 1
    await engine.close()


@pytest.mark.asyncio
async def test_a_refusal_that_every_instance_would_repeat_is_not_retried_elsewhere() -> None:
    a, b = FakeInstance("tiny"), FakeInstance("tiny_1")
    engine = await started(a, b)
    calls: list[str] = []

    def refuse(instance: FakeInstance) -> Any:
        def submit(request: EngineRequest, events: EventSink | None = None) -> GenerationHandle:
            calls.append(instance.name)
            raise StepRejected("exported before prompt logprobs")

        return submit

    a.submit, b.submit = refuse(a), refuse(b)  # type: ignore[method-assign]
    with pytest.raises(StepRejected):
        engine.submit(request([1], 2))
    assert len(calls) == 1
    await engine.close()


# ------------------------------------------------------------------------------ settings, metrics
def test_one_instance_is_the_plain_triton_engine_and_more_are_a_placement_engine(tmp_path: Path) -> None:
    settings = Settings(environment="test", model="tiny", repository=tmp_path)
    assert settings.model_instances == 1
    assert type(engine_from_settings(settings)) is TritonEngine
    engine = engine_from_settings(settings.model_copy(update={"model_instances": 3}))
    assert isinstance(engine, PlacementEngine)
    assert [i.name for i in engine.instances] == ["tiny", "tiny_1", "tiny_2"]  # type: ignore[attr-defined]
    assert len({id(i.breaker) for i in engine.instances}) == 3


def test_the_gateway_series_are_the_instances_sums_and_each_instance_has_its_own() -> None:
    metrics = GatewayMetrics(model_name="tiny", kv_capacity=16)
    board = _Board(metrics)
    one, two = board.observer("tiny"), board.observer("tiny_1")
    one.queue_changed(1, 5)
    two.queue_changed(2, 3)
    one.breaker_changed("open")
    two.breaker_changed("closed")
    text = metrics.engine_text().decode()
    assert "gateway_batch_running_sequences 8.0" in text and "gateway_queue_waiting_sequences 3.0" in text
    assert 'gateway_instance_running_sequences{instance="tiny"} 5.0' in text
    assert 'gateway_instance_waiting_sequences{instance="tiny_1"} 2.0' in text
    assert "gateway_circuit_breaker_state 0.0" in text  # one instance serves
    assert 'gateway_instance_circuit_breaker_state{instance="tiny"} 2.0' in text
    assert 'vllm:kv_cache_usage_perc{model_name="tiny"} 0.5' in text


def test_one_instances_metrics_have_no_instance_series() -> None:
    text = GatewayMetrics(model_name="tiny").engine_text().decode()
    assert 'instance="' not in text


# ------------------------------------------------------------------------------ the repository
def _base_model(repository: Path, versions: tuple[int, ...] = (1, 2)) -> None:
    model = repository / "m"
    for version in versions:
        (model / str(version)).mkdir(parents=True)
        (model / str(version) / "model.py").write_text("# version\n")
    (model / "config.pbtxt").write_text(config_pbtxt("m", ServingConfig(kv_capacity=12)))


def test_write_instances_adds_models_that_link_the_versions_under_their_own_name_and_group(tmp_path: Path) -> None:
    _base_model(tmp_path)
    assert derived_instances(tmp_path, "m") == 0
    assert write_instances(tmp_path, "m", 3, gpus=[0, 1]) == ["m", "m_1", "m_2"]
    assert derived_instances(tmp_path, "m") == 2
    assert model_config.instance_names("m", 3) == ["m", "m_1", "m_2"]
    for index, name in enumerate(["m", "m_1", "m_2"]):
        config = (tmp_path / name / "config.pbtxt").read_text()
        fields = dict(model_config.parse(config))
        assert fields["name"] == name
        group = dict(fields["instance_group"])  # type: ignore[arg-type]
        assert group["kind"] == "KIND_GPU" and group["gpus"] == str(index % 2) and group["count"] == "1"
        assert model_config.parameters(config)["kv_capacity"] == "12"
        if name != "m":
            assert os.readlink(tmp_path / name / "1") == "../m/1"
            assert (tmp_path / name / "2" / "model.py").read_text() == "# version\n"
    # Idempotent; a new version is linked, a removed one unlinked; fewer instances remove the rest.
    (tmp_path / "m" / "3").mkdir()
    import shutil

    shutil.rmtree(tmp_path / "m" / "1")
    write_instances(tmp_path, "m", 2)
    assert sorted(p.name for p in (tmp_path / "m_1").iterdir()) == ["2", "3", "config.pbtxt"]
    assert not (tmp_path / "m_2").exists()
    assert "kind: KIND_MODEL" in (tmp_path / "m_1" / "config.pbtxt").read_text()
    assert "kind: KIND_MODEL" in (tmp_path / "m" / "config.pbtxt").read_text()
    write_instances(tmp_path, "m", 1)
    assert not (tmp_path / "m_1").exists() and derived_instances(tmp_path, "m") == 0


def test_write_instances_leaves_a_model_it_did_not_write_alone(tmp_path: Path) -> None:
    _base_model(tmp_path)
    (tmp_path / "m_1").mkdir()
    (tmp_path / "m_1" / "config.pbtxt").write_text('name: "m_1"\n')
    with pytest.raises(InstancesError, match="not an instance"):
        write_instances(tmp_path, "m", 2)
    with pytest.raises(InstancesError, match="no model"):
        write_instances(tmp_path, "absent", 2)
    assert (tmp_path / "m_1" / "config.pbtxt").read_text() == 'name: "m_1"\n'


def test_no_error_event_is_lost_when_the_engine_closes() -> None:
    # (closing ends what runs on every instance: the scheduler's own close, once per instance)
    async def run() -> list[Event]:
        a, b = FakeInstance("tiny"), FakeInstance("tiny_1")
        engine = await started(a, b)
        handles = [engine.submit(request([i], 10_000)) for i in (1, 2)]
        await asyncio.sleep(0.02)
        await engine.close()
        return [(await drain(h.events))[-1] for h in handles]  # type: ignore[arg-type]

    assert all(isinstance(e, ErrorEvent) for e in asyncio.run(run()))
