"""Resilience controls without servers: the circuit breaker's state machine, the scheduler with a
breaker over the scripted step backend, the step client's safe retries and channel options, and
the model's KV capacity as the cap on running sequences."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from frontend.engine.breaker import BreakerState, CircuitBreaker
from frontend.engine.errors import IncompleteAnswer
from frontend.engine.protocol import (
    BreakerOpen,
    ConnectFailed,
    EngineRequest,
    ErrorEvent,
    FinishEvent,
    QueueFull,
    StepRejected,
    TokenEvent,
    UpstreamTimeout,
)
from frontend.engine.step_rows import from_rows
from frontend.engine.triton_client import Row, StepClient, StepClientConfig, channel_args
from frontend.engine.triton_engine import model_kv_capacity
from tests.unit.test_scheduler import GREEDY, ScriptedBackend, drain, scheduler

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# ------------------------------------------------------------------------------ state machine
def test_the_breaker_opens_after_n_consecutive_failures_only() -> None:
    changes: list[BreakerState] = []
    b = CircuitBreaker(failure_threshold=3, reset_timeout_s=1.0, clock=Clock(), on_change=changes.append)
    b.record_failure("x")
    b.record_failure("x")
    b.record_success()  # not consecutive: the count starts again
    b.record_failure("x")
    b.record_failure("x")
    assert b.state is BreakerState.CLOSED
    b.check()
    b.record_failure("triton down")
    assert b.state is BreakerState.OPEN and changes == [BreakerState.OPEN]
    with pytest.raises(BreakerOpen, match="triton down") as info:
        b.check()
    assert 0.1 <= info.value.retry_after_s <= 1.0


def test_half_open_probe_closes_or_reopens() -> None:
    clock = Clock()
    b = CircuitBreaker(failure_threshold=1, reset_timeout_s=2.0, clock=clock)
    b.record_failure("down")
    assert not b.probe_due()  # too early
    clock.now += 2.0
    assert b.probe_due() and b.state is BreakerState.HALF_OPEN
    assert not b.probe_due()  # one probe at a time
    with pytest.raises(BreakerOpen):
        b.check()  # still refusing while the probe runs
    b.record_failure("still down")
    assert b.state is BreakerState.OPEN and b.retry_after_s() == pytest.approx(2.0)
    clock.now += 2.0
    assert b.probe_due()
    b.record_success()
    assert b.state is BreakerState.CLOSED and b.retry_after_s() == 0.0
    b.check()


def test_breaker_open_survives_pickling_for_the_engine_core() -> None:
    import pickle

    err = pickle.loads(pickle.dumps(BreakerOpen("open", 0.7)))
    assert type(err) is BreakerOpen and str(err) == "open" and err.retry_after_s == 0.7


# ------------------------------------------------------------------------------ scheduler + breaker
class FailingBackend(ScriptedBackend):
    """The scripted model server, but every step fails while `down` is set."""

    def __init__(self) -> None:
        super().__init__(capacity=4)
        self.down = False
        self.calls = 0

    async def step(self, rows: Any, *, window: int, want_logits: bool = False) -> Any:
        self.calls += 1
        if self.hold is not None:
            await self.hold.wait()
        if self.down:
            raise UpstreamTimeout("frozen")
        return await super().step(rows, window=window, want_logits=want_logits)


@pytest.mark.asyncio
async def test_scheduler_opens_the_breaker_refuses_fast_and_a_probe_closes_it() -> None:
    backend = FailingBackend()
    breaker = CircuitBreaker(failure_threshold=2, reset_timeout_s=0.2)
    sched = scheduler(backend, breaker=breaker, resume_timeout_s=0.0)  # resuming: tests/unit/test_scheduler.py
    sched.start()
    backend.down = True
    # Two failed steps fail their generations (the ids of a timed-out step are released only
    # after a later step succeeds: no release step is sent meanwhile).
    for _ in range(2):
        seq = sched.submit(EngineRequest([1], GREEDY, 3, seed=None))
        events = await drain(seq.events)  # type: ignore[arg-type]
        assert isinstance(events[-1], ErrorEvent) and isinstance(events[-1].error, UpstreamTimeout)
    for _ in range(100):
        if not breaker.closed:
            break
        await asyncio.sleep(0.001)
    assert breaker.state is BreakerState.OPEN
    calls = backend.calls
    started = time.perf_counter()
    with pytest.raises(BreakerOpen):
        sched.submit(EngineRequest([1], GREEDY, 3, seed=None))
    assert time.perf_counter() - started < 0.05
    await asyncio.sleep(0.1)
    assert backend.calls == calls  # no Triton call while open (before the reset timeout)
    # Probes fail while it is down; once it is back, the next probe closes the breaker.
    await asyncio.sleep(0.3)
    assert backend.calls > calls and breaker.state is not BreakerState.CLOSED
    backend.down = False
    for _ in range(100):
        if breaker.closed:
            break
        await asyncio.sleep(0.01)
    assert breaker.closed
    seq = sched.submit(EngineRequest([2], GREEDY, 2, seed=None))
    assert isinstance((await drain(seq.events))[-1], FinishEvent)  # type: ignore[arg-type]
    await sched.close()
    assert not backend.live  # probes start and end in one step: they hold no slot


@pytest.mark.asyncio
async def test_queued_generations_fail_fast_when_the_breaker_opens() -> None:
    backend = FailingBackend()
    backend.capacity = 1
    backend.hold = asyncio.Event()
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout_s=5.0)
    sched = scheduler(backend, breaker=breaker, max_running=1)
    sched.start()
    sched.submit(EngineRequest([1], GREEDY, 100, seed=None))
    while not backend.calls:  # its start row is in flight
        await asyncio.sleep(0.001)
    queued = sched.submit(EngineRequest([2], GREEDY, 5, seed=None))  # waits for max_running
    backend.down = True
    backend.hold.set()
    started = time.perf_counter()
    last = (await drain(queued.events))[-1]  # type: ignore[arg-type]
    assert isinstance(last, ErrorEvent) and isinstance(last.error, BreakerOpen)
    assert time.perf_counter() - started < 1.0
    await sched.close()


@pytest.mark.asyncio
async def test_the_waiting_cap_refuses_with_queue_full() -> None:
    backend = ScriptedBackend(capacity=1)
    backend.hold = asyncio.Event()
    sched = scheduler(backend, max_running=1, max_waiting=1)
    sched.start()
    sched.submit(EngineRequest([1], GREEDY, 2, seed=None))
    while not backend.batches:
        await asyncio.sleep(0.001)
    sched.submit(EngineRequest([2], GREEDY, 2, seed=None))
    with pytest.raises(QueueFull):
        sched.submit(EngineRequest([3], GREEDY, 2, seed=None))
    backend.hold.set()
    await sched.close()


# ------------------------------------------------------------------------------ step client
class FakeGrpc:
    def __init__(self, failures: int, status: str = "StatusCode.UNAVAILABLE") -> None:
        self.failures = failures
        self.status = status
        self.calls = 0
        self.timeouts: list[float | None] = []
        self.result = _Result()

    async def infer(self, *_: Any, client_timeout: float | None = None, **__: Any) -> Any:
        self.calls += 1
        self.timeouts.append(client_timeout)
        if self.calls <= self.failures:
            raise InferenceServerException("connection refused", status=self.status)
        return self.result

    async def is_model_ready(self, *_: Any, client_timeout: float | None = None, **__: Any) -> bool:
        self.timeouts.append(client_timeout)
        await asyncio.sleep(10)
        return True


class _Result:
    def __init__(self, missing: str = "") -> None:
        self.missing = missing

    def as_numpy(self, name: str) -> np.ndarray | None:
        return None if name == self.missing else np.zeros((1, 1), dtype=np.float32)


def client_with(fake: FakeGrpc, retries: int = 2) -> StepClient:
    client = StepClient("127.0.0.1:1", "m", "1", StepClientConfig(timeout_s=3.0, connect_retries=retries))
    client._client = fake  # type: ignore[assignment]
    return client


@pytest.mark.asyncio
async def test_a_token_less_step_is_retried_on_unavailable() -> None:
    fake = FakeGrpc(failures=2)
    await client_with(fake).step([Row(1, [5, 6], start=True), Row(2, [], end=True)], window=4)
    assert fake.calls == 3 and fake.timeouts == [3.0] * 3  # every attempt has its deadline


@pytest.mark.asyncio
async def test_a_step_with_a_decode_row_is_never_retried() -> None:
    fake = FakeGrpc(failures=1)
    with pytest.raises(ConnectFailed):
        await client_with(fake).step([Row(1, [5], start=True), Row(2, [7])], window=4)
    assert fake.calls == 1


@pytest.mark.asyncio
async def test_an_answer_without_an_asked_output_is_an_in_doubt_step_error() -> None:
    """Seen in the fault tier (tests/resilience/test_triton_stall.py, about one run in five, before
    this): right after a frozen Triton resumed, a step came back without LOGSUMEXP and the client's
    parsing failed the lane's generations as an internal error. Now the step is in doubt, as after a
    timeout (IncompleteAnswer is an UpstreamTimeout): its sequences start again."""
    fake = FakeGrpc(failures=0)
    fake.result = _Result(missing="LOGSUMEXP")
    with pytest.raises(IncompleteAnswer, match="LOGSUMEXP") as caught:
        await client_with(fake).step([Row(1, [5])], window=4)
    assert isinstance(caught.value, UpstreamTimeout)


@pytest.mark.asyncio
async def test_only_unavailable_is_retried_and_retries_are_bounded() -> None:
    fake = FakeGrpc(failures=1, status="StatusCode.DEADLINE_EXCEEDED")
    with pytest.raises(UpstreamTimeout):
        await client_with(fake).step([Row(1, [5], start=True)], window=4)
    assert fake.calls == 1
    fake = FakeGrpc(failures=10)
    with pytest.raises(ConnectFailed):
        await client_with(fake, retries=2).step([Row(1, [5], start=True)], window=4)
    assert fake.calls == 3


@pytest.mark.asyncio
async def test_readiness_has_a_deadline() -> None:
    fake = FakeGrpc(failures=0)
    client = client_with(fake)
    # The fake ignores client_timeout (a real channel enforces it); it must be passed.
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await client.model_ready()
    assert fake.timeouts == [client.probe_timeout_s]


def test_channel_args_bound_the_reconnect_backoff() -> None:
    args = dict(channel_args(400))
    assert args["grpc.max_reconnect_backoff_ms"] == 400
    assert args["grpc.initial_reconnect_backoff_ms"] == 100 and args["grpc.min_reconnect_backoff_ms"] == 100
    assert args["grpc.max_receive_message_length"] == 2**31 - 1  # tritonclient's defaults kept


# ------------------------------------------------------------------------------ KV capacity
def test_kv_capacity_from_config_pbtxt_or_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GPT2_KV_CAPACITY", raising=False)
    assert model_kv_capacity(tmp_path, "m") is None
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.pbtxt").write_text(
        'name: "m"\nparameters { key: "idle_timeout_s" value: { string_value: "3" } }\n'
        'parameters { key: "kv_capacity" value: { string_value: "16" } }\n'
    )
    assert model_kv_capacity(tmp_path, "m") == 16
    monkeypatch.setenv("GPT2_KV_CAPACITY", "5")
    assert model_kv_capacity(tmp_path, "m") == 5


def test_events_module_exports() -> None:
    assert TokenEvent and FinishEvent  # the scheduler's event types are what the breaker tests drain


def test_kv_capacity_reads_the_config_as_the_model_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The old regex missed what protobuf text format allows (another field order, single quotes,
    # comments) and read a commented-out entry; a file the model cannot parse gives None.
    monkeypatch.delenv("GPT2_KV_CAPACITY", raising=False)
    (tmp_path / "m").mkdir()
    config = tmp_path / "m" / "config.pbtxt"
    config.write_text(
        '# parameters { key: "kv_capacity" value: { string_value: "99" } }\n'
        "parameters {\n  value { string_value: '12' }\n  key: 'kv_capacity'\n}\n"
    )
    assert model_kv_capacity(tmp_path, "m") == 12
    config.write_text('parameters { key: "kv_capacity" value: { string_value: "12" ')
    assert model_kv_capacity(tmp_path, "m") is None
    monkeypatch.setenv("GPT2_KV_CAPACITY", "")  # empty means unset
    config.write_text('parameters { key: "kv_capacity" value: { string_value: "7" } }')
    assert model_kv_capacity(tmp_path, "m") == 7


# ------------------------------------------------------------------------------ timed-out steps
class StallingBackend(ScriptedBackend):
    """Triton's dynamic batcher behind a stalled model: a step the client gave up on (timed out)
    stays queued on the server and runs in ONE execution with the next request, where a sequence
    named by both refuses the later request as a whole (the model's INVALID_ARG), as the model does."""

    def __init__(self, stall_at: set[int]) -> None:
        super().__init__(capacity=8)
        self.by_content = True
        self.stall_at = stall_at  # call numbers whose client times out while the server keeps them
        self.queued: list[Any] = []  # the timed-out steps still on the server
        self.calls = 0
        self.refused = 0

    async def step(self, rows: Any, *, window: int, want_logits: bool = False) -> Any:
        self.calls += 1
        batch = rows if not isinstance(rows, list) else from_rows(rows)
        if self.calls in self.stall_at:
            self.queued.append(batch)
            raise UpstreamTimeout("Deadline Exceeded")
        queued, self.queued = self.queued, []
        claimed: set[int] = set()
        for old in queued:  # they run first, in the same execution
            claimed |= set(old.sequence_ids.tolist())
            await super().step(old, window=window)
        if not claimed.isdisjoint(batch.sequence_ids.tolist()):
            self.refused += 1
            raise StepRejected("a sequence appears twice in one step")
        return await super().step(batch, window=window, want_logits=want_logits)


@pytest.mark.asyncio
async def test_a_timed_out_step_never_shares_an_execution_with_the_next_one() -> None:
    undisturbed = ScriptedBackend(capacity=8)
    undisturbed.by_content = True
    sched = scheduler(undisturbed)
    sched.start()
    expected = await drain(sched.submit(EngineRequest([5, 6, 7], GREEDY, 12, seed=None)).events)  # type: ignore[arg-type]
    await sched.close()

    backend = StallingBackend(stall_at={4, 5})  # two decode steps time out in a row
    sched = scheduler(backend)
    sched.start()
    got = await drain(sched.submit(EngineRequest([5, 6, 7], GREEDY, 12, seed=None)).events)  # type: ignore[arg-type]
    await sched.close()
    assert got == expected, got[-1]
    assert backend.refused == 0  # the releases of the timed-out steps' ids waited for a later step
    assert not backend.live  # ... and were sent: nothing the stalled steps started is left behind


@pytest.mark.asyncio
async def test_a_whole_step_refused_as_malformed_is_retried_once_then_fails() -> None:
    backend = ScriptedBackend(capacity=4)
    backend.by_content = True
    real_step = backend.step
    refusals = {"left": 1}

    async def refuse(rows: Any, *, window: int, want_logits: bool = False) -> Any:
        if len(backend.batches) == 3 and refusals["left"]:
            refusals["left"] -= 1
            backend.batches.append(rows)
            raise StepRejected("a sequence appears twice in one step")
        return await real_step(rows, window=window, want_logits=want_logits)

    backend.step = refuse  # type: ignore[method-assign]
    sched = scheduler(backend)
    sched.start()
    events = await drain(sched.submit(EngineRequest([5, 6, 7], GREEDY, 8, seed=None)).events)  # type: ignore[arg-type]
    assert isinstance(events[-1], FinishEvent) and len(events) == 9  # retried, not fatal

    async def always_refuse(rows: Any, *, window: int, want_logits: bool = False) -> Any:
        raise StepRejected("malformed")

    backend.step = always_refuse  # type: ignore[method-assign]
    started = time.monotonic()
    events = await drain(sched.submit(EngineRequest([5], GREEDY, 8, seed=None)).events)  # type: ignore[arg-type]
    assert isinstance(events[-1], ErrorEvent) and isinstance(events[-1].error, StepRejected)
    assert time.monotonic() - started < 1.0  # a request the model keeps refusing fails on its second refusal
    await sched.close()


@pytest.mark.asyncio
async def test_when_the_breaker_opens_a_generation_with_no_token_fails_fast_and_a_stream_waits() -> None:
    backend = FailingBackend()
    backend.by_content = True
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout_s=0.3)
    sched = scheduler(backend, breaker=breaker, resume_timeout_s=30.0)
    sched.start()
    streaming = sched.submit(EngineRequest([1], GREEDY, 40, seed=None))
    first = await streaming.events.get()
    assert isinstance(first, TokenEvent)
    real_step = backend.step
    fresh_ids: set[int] = set()

    async def fail_from_fresh_on(rows: Any, *, window: int, want_logits: bool = False) -> Any:
        batch = from_rows(rows) if isinstance(rows, list) else rows
        if fresh_ids & set(batch.sequence_ids.tolist()):
            backend.down = True  # the step that carries `fresh` fails, and so does what follows
        return await real_step(rows, window=window, want_logits=want_logits)

    backend.step = fail_from_fresh_on  # type: ignore[method-assign]
    fresh = sched.submit(EngineRequest([2], GREEDY, 5, seed=None))  # just before the breaker opens
    fresh_ids.add(fresh.sequence_id)
    started = time.perf_counter()
    last = (await drain(fresh.events))[-1]  # type: ignore[arg-type]
    assert isinstance(last, ErrorEvent) and isinstance(last.error, BreakerOpen), last
    assert time.perf_counter() - started < 0.2  # not resume_timeout_s
    backend.down = False  # Triton returns: the running stream resumes and finishes
    events = await drain(streaming.events)  # type: ignore[arg-type]
    assert isinstance(events[-1], FinishEvent) and len(events) == 40
    await sched.close()


# ------------------------------------------------------------------------------ readiness
class ReadyButStubDead:
    """Triton's answers while the model's Python stub is dead: the model is "ready", no step runs."""

    def __init__(self) -> None:
        self.steps_ok = False
        self.step_calls = 0

    async def model_ready(self) -> bool:
        return True

    async def steps(self) -> bool:
        self.step_calls += 1
        await asyncio.sleep(0.01)
        return self.steps_ok


@pytest.mark.asyncio
async def test_readiness_runs_a_real_step_cached_briefly(tmp_path: Path) -> None:
    from frontend.engine import triton_engine

    engine = triton_engine.TritonEngine(triton_url="x", model="m", version="1", repository=tmp_path)
    client = ReadyButStubDead()
    engine._client = client  # type: ignore[assignment]
    engine._warm = True
    engine._stepped_at = -1e9
    assert not await engine.ready()  # Triton says ready; the step says otherwise
    client.steps_ok = True
    results = await asyncio.gather(*(engine.ready() for _ in range(5)))
    assert all(results) and client.step_calls == 2  # concurrent probes share one step
    assert await engine.ready() and client.step_calls == 2  # then it stands for a moment
    engine._stepped_at -= triton_engine.READY_STEP_TTL_S
    client.steps_ok = False
    assert not await engine.ready() and client.step_calls == 3
