"""Lanes (frontend.engine.lanes): several steps in flight at once, each for its own sequences,
against test_scheduler's scripted step backend. The backend here also watches the wire: it
records every request in flight and any sequence id two of them name at once (Triton's dynamic
batcher may run them in one execution, where that fails the later request as a whole)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from frontend.engine.protocol import (
    EngineRequest,
    ErrorEvent,
    Event,
    FinishEvent,
    StepRejected,
    TokenEvent,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from frontend.engine.scheduler import Scheduler
from frontend.engine.step_rows import Row, StepRequest, StepResult, compose, from_rows
from frontend.engine.triton_client import StepClient, StepClientConfig
from frontend.engine.triton_engine import model_kv_partitions
from frontend.sampling import SamplingParams
from frontend.settings import Settings
from step_model import contract
from tests.unit.test_scheduler import GREEDY, ScriptedBackend, drain, scheduler

pytestmark = [pytest.mark.unit, pytest.mark.asyncio]


class WireBackend(ScriptedBackend):
    """The scripted model server, watching its requests in flight. `holds[p]` holds the requests
    of KV partition p; `fail_next[p]` fails the next one of partition p as a whole."""

    def __init__(self, capacity: int = 16) -> None:
        super().__init__(capacity=capacity)
        self.sent: list[StepRequest] = []  # every request, as it arrived
        self.wire: list[tuple[int, StepRequest, set[int]]] = []  # in flight: (arrival number, request, ids)
        self.waiting: list[int | None] = []  # the partitions of the requests waiting on their hold
        self.overlaps: list[set[int]] = []
        self.most_in_flight = 0
        self.holds: dict[int | None, asyncio.Event] = {}
        self.fail_next: dict[int | None, Exception] = {}

    async def step(self, rows: StepRequest | Sequence[Row], *, window: int, want_logits: bool = False) -> StepResult:
        batch = rows if isinstance(rows, StepRequest) else from_rows(rows)
        ids = set(batch.sequence_ids.tolist())
        self.overlaps += [ids & other for _, _, other in self.wire if ids & other]
        entry = (len(self.sent), batch, ids)
        self.sent.append(batch)
        self.wire.append(entry)
        self.most_in_flight = max(self.most_in_flight, len(self.wire))
        try:
            hold = self.holds.get(batch.kv_partition)
            if hold is not None and not hold.is_set():
                self.waiting.append(batch.kv_partition)
                await hold.wait()
                self.waiting.remove(batch.kv_partition)
            error = self.fail_next.pop(batch.kv_partition, None)
            if error is not None:
                raise error
            return await self.execute(entry[0], batch, window, want_logits)
        finally:
            self.wire = [e for e in self.wire if e is not entry]

    async def execute(self, arrival: int, batch: StepRequest, window: int, want_logits: bool) -> StepResult:
        """Run the `arrival`-th request (once its hold, if any, let it go)."""
        return await ScriptedBackend.step(self, batch, window=window, want_logits=want_logits)


def lanes(backend: ScriptedBackend, n: int = 2, **config: Any) -> Scheduler:
    """A scheduler of `n` lanes on a model of `n` KV partitions."""
    return scheduler(backend, lanes=n, kv_partitions=n, **config)


async def until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.001)


def tokens(events: list[Event]) -> list[int]:
    return [e.token_id for e in events if isinstance(e, TokenEvent)]


async def test_two_lanes_keep_two_steps_in_flight_each_with_its_own_sequences_and_partition() -> None:
    backend = WireBackend()
    held = asyncio.Event()
    backend.holds = {0: held, 1: held}
    sched = lanes(backend)
    seqs = [sched.submit(EngineRequest([1, i], GREEDY, 4, seed=None)) for i in range(4)]
    sched.start()
    await until(lambda: len(backend.wire) == 2)  # both lanes' steps are pending together
    assert [s.lane for s in seqs] == [0, 1, 0, 1]  # each joined the lane with the fewest
    for _, batch, ids in backend.wire:
        assert batch.kv_partition in (0, 1)
        assert ids == {s.sequence_id for s in seqs if s.lane == batch.kv_partition}
    held.set()
    for events in await asyncio.gather(*(drain(s.events) for s in seqs)):  # type: ignore[arg-type]
        assert [type(e) for e in events] == [TokenEvent] * 4 + [FinishEvent]
    await sched.close()
    assert {b.kv_partition for b in backend.sent if b.lengths.any()} == {0, 1}
    assert backend.most_in_flight == 2 and not backend.overlaps and not backend.live


async def test_no_id_is_ever_on_the_wire_twice_while_sequences_finish_and_are_cancelled() -> None:
    backend = WireBackend()
    backend.delay_s = 0.002
    sched = lanes(backend, prefill_hold_s=0.0)
    sched.start()
    seqs = [sched.submit(EngineRequest([2, i], GREEDY, 3 + 2 * i, seed=None)) for i in range(12)]
    for k, seq in enumerate(seqs):
        if k % 3 == 0:  # cancelled at all sorts of moments: in flight, between steps, waiting
            await asyncio.sleep(0.003 * k)
            sched.cancel(seq)
    await until(lambda: all(s.done for s in seqs))
    await until(lambda: not backend.live and not backend.wire)  # the releases went
    await sched.close()
    assert backend.most_in_flight == 2 and not backend.overlaps


async def test_a_cancel_while_its_lanes_step_is_in_flight_is_released_after_that_step() -> None:
    backend = WireBackend()
    backend.delay_s = 0.001
    sched = lanes(backend)
    sched.start()
    cancelled = sched.submit(EngineRequest([1], GREEDY, 1000, seed=None))
    other = sched.submit(EngineRequest([2], GREEDY, 1000, seed=None))
    await cancelled.events.get()
    await other.events.get()
    assert (cancelled.lane, other.lane) == (0, 1)
    backend.holds[0] = held = asyncio.Event()
    await until(lambda: 0 in backend.waiting)  # lane 0's step is on the wire, held
    sid = cancelled.sequence_id
    sched.cancel(cancelled)
    meanwhile = len(backend.sent)
    await until(lambda: len(backend.sent) > meanwhile + 5)  # lane 1 goes on stepping
    assert all(sid not in b.sequence_ids.tolist() for b in backend.sent[meanwhile:])  # ... without it
    held.set()
    await until(lambda: sid not in backend.live)
    release = next(b for b in backend.sent[meanwhile:] if sid in b.sequence_ids.tolist())
    assert bool(release.end[release.sequence_ids.tolist().index(sid)])
    sched.cancel(other)
    await until(lambda: not backend.live)
    await sched.close()
    assert not backend.overlaps


async def test_a_failed_step_of_one_lane_fails_only_that_lanes_sequences() -> None:
    backend = WireBackend()
    backend.delay_s = 0.001
    sched = lanes(backend, resume_timeout_s=0.0)  # resuming off: the lane's sequences fail
    seqs = [sched.submit(EngineRequest([3, i], GREEDY, 20, seed=None)) for i in range(4)]
    sched.start()
    first = [await s.events.get() for s in seqs]
    backend.fail_next[0] = UpstreamUnavailable("lane 0's request was lost")
    results = [[f, *await drain(s.events)] for f, s in zip(first, seqs, strict=True)]  # type: ignore[arg-type]
    for seq, events in zip(seqs, results, strict=True):
        if seq.lane == 0:
            assert isinstance(events[-1], ErrorEvent) and isinstance(events[-1].error, UpstreamUnavailable)
        else:
            assert [type(e) for e in events] == [TokenEvent] * 20 + [FinishEvent]
    await until(lambda: not backend.live)  # the failed lane's ids were released
    await sched.close()
    assert not backend.overlaps


async def undisturbed(n: int, prompts: list[list[int]], new_tokens: int, params: SamplingParams) -> list[list[int]]:
    """Each prompt's tokens on a model whose windows follow the content (not the ids), `n` lanes."""
    backend = WireBackend()
    backend.by_content = True
    sched = lanes(backend, n)
    seqs = [sched.submit(EngineRequest(p, params, new_tokens, seed=40 + i)) for i, p in enumerate(prompts)]
    sched.start()
    results = await asyncio.gather(*(drain(s.events) for s in seqs))  # type: ignore[arg-type]
    await sched.close()
    assert not backend.overlaps
    return [tokens(events) for events in results]


PROMPTS = [[5, 6, 7], [8], [9, 10], [11, 12, 13, 14], [15], [16, 17]]


async def test_seeded_sampling_gives_the_same_tokens_with_one_lane_and_with_two() -> None:
    params = SamplingParams(temperature=0.8, top_k=5)
    one = await undisturbed(1, PROMPTS, 10, params)
    assert one == await undisturbed(2, PROMPTS, 10, params)  # uniforms are per sequence, not per step
    assert len({t for seq in one for t in seq}) > 5  # it really sampled


@pytest.mark.parametrize("error", [UpstreamUnavailable("lost"), UpstreamTimeout("Deadline Exceeded")])
async def test_a_lane_whose_step_failed_resumes_its_sequences_token_for_token(error: Exception) -> None:
    expected = await undisturbed(1, PROMPTS, 12, GREEDY)
    backend = WireBackend()
    backend.by_content = True
    backend.delay_s = 0.001
    sched = lanes(backend)
    seqs = [sched.submit(EngineRequest(p, GREEDY, 12, seed=40 + i)) for i, p in enumerate(PROMPTS)]
    sched.start()
    first = [await s.events.get() for s in seqs]
    failed_at = len(backend.sent)
    backend.fail_next[0] = error
    results = [[f, *await drain(s.events)] for f, s in zip(first, seqs, strict=True)]  # type: ignore[arg-type]
    assert [tokens(events) for events in results] == expected
    assert all(isinstance(events[-1], FinishEvent) for events in results)
    restarts = {b.kv_partition for b in backend.sent[failed_at:] if b.start.any()}
    assert restarts == {0}  # lane 0's sequences started again (prompt + tokens so far), lane 1's went on
    await until(lambda: not backend.live)  # the lost ids were released (a timed-out step's later)
    await sched.close()
    assert not backend.overlaps


class StalledLaneBackend(WireBackend):
    """Triton's batcher in order, behind a model that stalls once: the armed request of partition 0
    times out on the client but stays queued, and runs first in the execution of the next request
    that arrived after it, where a sequence both name refuses that request as a whole. A request
    that arrived before it (another lane's) runs without it."""

    def __init__(self) -> None:
        super().__init__()
        self.by_content = True
        self.armed = False
        self.queued: tuple[int, StepRequest] | None = None  # (arrival number, request)
        self.refused = 0

    async def step(self, rows: StepRequest | Sequence[Row], *, window: int, want_logits: bool = False) -> StepResult:
        batch = rows if isinstance(rows, StepRequest) else from_rows(rows)
        if self.armed and batch.kv_partition == 0 and not batch.start.any() and batch.lengths.any():
            self.armed = False
            self.queued = (len(self.sent), batch)
            self.sent.append(batch)
            self.holds[0] = asyncio.Event()  # lane 0 waits while lane 1's earlier step completes
            raise UpstreamTimeout("Deadline Exceeded")
        return await super().step(batch, window=window, want_logits=want_logits)

    async def execute(self, arrival: int, batch: StepRequest, window: int, want_logits: bool) -> StepResult:
        if self.queued is not None and arrival > self.queued[0]:
            stalled, self.queued = self.queued[1], None
            if set(stalled.sequence_ids.tolist()) & set(batch.sequence_ids.tolist()):
                self.refused += 1
                raise StepRejected("a sequence appears twice in one step")
            await ScriptedBackend.step(self, stalled, window=window)
        return await super().execute(arrival, batch, window, want_logits)


async def test_a_timed_out_lanes_ids_wait_for_a_success_of_a_request_sent_after_it() -> None:
    """Lane 1's step, sent before lane 0's timed out, succeeds after: it proves nothing about the
    stalled request (still queued), so lane 0's ids are not released until a later request ran."""
    expected = await undisturbed(1, PROMPTS[:2], 12, GREEDY)
    backend = StalledLaneBackend()
    backend.delay_s = 0.001
    sched = lanes(backend)
    seqs = [sched.submit(EngineRequest(p, GREEDY, 12, seed=40 + i)) for i, p in enumerate(PROMPTS[:2])]
    sched.start()
    first = [await s.events.get() for s in seqs]
    backend.holds[1] = lane_1 = asyncio.Event()
    await until(lambda: 1 in backend.waiting)  # lane 1's step is on the wire, held
    backend.armed = True
    await until(lambda: backend.queued is not None)  # lane 0's next step timed out, still queued
    lane_1.set()  # lane 1's earlier step completes; its next ones run the stalled request first
    await until(lambda: backend.queued is None)
    backend.holds[0].set()
    results = [[f, *await drain(s.events)] for f, s in zip(first, seqs, strict=True)]  # type: ignore[arg-type]
    assert [tokens(events) for events in results] == expected
    await until(lambda: not backend.live)
    await sched.close()
    assert backend.refused == 0


async def test_with_one_lane_no_partition_is_sent_and_the_request_is_as_before() -> None:
    backend = WireBackend()
    sched = scheduler(backend, lanes=1, kv_partitions=2)  # GATEWAY_ENGINE_LANES=1 on a model of 2
    seq = sched.submit(EngineRequest([1], GREEDY, 3, seed=None))
    sched.start()
    await drain(seq.events)  # type: ignore[arg-type]
    await sched.close()
    assert sched.lanes == 1 and all(b.kv_partition is None for b in backend.sent)

    class Grpc:
        def __init__(self) -> None:
            self.calls: list[dict[str, Any]] = []

        async def infer(self, model: str, inputs: list[Any], **kwargs: Any) -> Any:
            self.calls.append({"inputs": [(i.name(), i.shape(), i.datatype()) for i in inputs], **kwargs})
            return Answer()

    class Answer:
        def as_numpy(self, name: str) -> np.ndarray:
            return np.zeros((1, 1), dtype=np.float32)

    client = StepClient("127.0.0.1:1", "m", "1", StepClientConfig())
    client._client = fake = Grpc()  # type: ignore[assignment]
    ids, tokens_, temperature = np.array([7], dtype=np.uint64), np.array([5]), np.ones(1, dtype=np.float32)
    await client.step(compose(ids, tokens_, temperature, [], []), window=4)
    await client.step(compose(ids, tokens_, temperature, [], [], kv_partition=1), window=4)
    plain, lane = fake.calls
    assert plain["parameters"] == {contract.PARAM_LOGITS_WINDOW: 4}  # exactly what one lane sent before
    assert lane["parameters"] == {contract.PARAM_LOGITS_WINDOW: 4, contract.PARAM_KV_PARTITION: 1}
    assert plain["inputs"] == lane["inputs"]


async def test_lanes_come_from_the_setting_or_the_models_kv_partitions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GPT2_KV_PARTITIONS", raising=False)
    assert model_kv_partitions(tmp_path, "m") == 1  # no config: a model exported before partitions
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.pbtxt").write_text('parameters { key: "kv_partitions" value: { string_value: "2" } }')
    assert model_kv_partitions(tmp_path, "m") == 2
    monkeypatch.setenv("GPT2_KV_PARTITIONS", "4")
    assert model_kv_partitions(tmp_path, "m") == 4
    assert Settings(environment="test").engine_lanes == 0  # 0: the model's partitions (TritonEngine.start)
    backend = ScriptedBackend()
    assert scheduler(backend, lanes=4, kv_partitions=2, max_running=3).lanes == 3  # at most max_running
    sched = scheduler(backend, lanes=3, kv_partitions=2)
    assert [lane.kv_partition for lane in sched._lanes] == [0, 1, 0]
    assert scheduler(backend, lanes=0).lanes == 1


class HeldReleasesBackend(WireBackend):
    """Requests of releases alone wait on `releases` (once it is given)."""

    releases: asyncio.Event | None = None

    async def execute(self, arrival: int, batch: StepRequest, window: int, want_logits: bool) -> StepResult:
        if self.releases is not None and not batch.lengths.any():
            self.waiting.append(None)
            await self.releases.wait()
            self.waiting.remove(None)
        return await super().execute(arrival, batch, window, want_logits)


async def test_a_new_sequence_does_not_wait_for_a_request_of_releases_alone() -> None:
    """One lane: a sequence that finished leaves a release; with nothing else to step it goes in a
    request of its own, and a sequence submitted while that request is still unanswered starts in
    a request sent at once beside it (no id on the wire twice), not after its answer."""
    backend = HeldReleasesBackend()
    held = backend.releases = asyncio.Event()
    sched = scheduler(backend)
    sched.start()
    first = sched.submit(EngineRequest([1, 2], GREEDY, 2, seed=None))
    assert tokens(await drain(first.events))  # type: ignore[arg-type]
    await until(lambda: len(backend.waiting) == 1)  # its release, on the wire
    ((_, release, ids),) = backend.wire
    assert ids == {first.sequence_id} and release.end.all()
    second = sched.submit(EngineRequest([3, 4], GREEDY, 2, seed=None))
    events = await drain(second.events)  # type: ignore[arg-type]  # while the release is unanswered
    assert [type(e) for e in events] == [TokenEvent] * 2 + [FinishEvent]
    assert backend.waiting == [None] and backend.most_in_flight == 2
    held.set()
    await until(lambda: not backend.live and not backend.wire)  # both released
    await sched.close()
    assert not backend.overlaps
