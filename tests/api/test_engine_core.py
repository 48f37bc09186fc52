"""The engine core and its HTTP-worker side over a real ipc socket: `EngineCore` around the
FakeEngine (or a lockstep engine) and `RemoteEngine`s, all in this test's event loop."""

from __future__ import annotations

import asyncio
import pickle
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
import zmq
import zmq.asyncio
from prometheus_client.parser import text_string_to_metric_families

from frontend.app import create_app, remote_engine
from frontend.cache import MemoryResultCache
from frontend.engine import ipc
from frontend.engine.core import EngineCore
from frontend.engine.model import ServedModel
from frontend.engine.protocol import (
    EngineRequest,
    ErrorEvent,
    Event,
    EventSink,
    FinishEvent,
    GenerationHandle,
    Overloaded,
    PromptLogprobsEvent,
    StepRejected,
    TokenEvent,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from frontend.engine.remote import RemoteEngine
from frontend.observability import GatewayMetrics
from frontend.sampling import SamplingParams
from frontend.settings import Settings
from tests.api.conftest import assert_error_envelope
from tests.api.fake_engine import FakeEngine, FakeHandle

pytestmark = [pytest.mark.api, pytest.mark.asyncio]

WORKER_TIMEOUT_S = 0.4
HEARTBEAT_S = 0.05
GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture
def address(tmp_path: Path) -> str:
    path = tmp_path / "core.sock"
    assert len(str(path)) < 100, "ipc paths are limited to ~107 bytes"
    return f"ipc://{path}"


@pytest.fixture
def core_metrics() -> GatewayMetrics:
    metrics = GatewayMetrics()
    metrics.step_finished(rows=3, duration_s=0.002)  # as the scheduler in the core would
    metrics.queue_changed(waiting=1, running=3)
    return metrics


@pytest_asyncio.fixture
async def core(fake: FakeEngine, address: str, core_metrics: GatewayMetrics) -> AsyncIterator[EngineCore]:
    c = EngineCore(fake, address, worker_timeout_s=WORKER_TIMEOUT_S, metrics_text=core_metrics.engine_text)
    await c.start()
    yield c
    await c.close()


def remote_for(address: str, model: ServedModel) -> RemoteEngine:
    return RemoteEngine(
        address,
        model_loader=lambda _name, _version: model,
        heartbeat_s=HEARTBEAT_S,
        timeout_s=WORKER_TIMEOUT_S,
        startup_timeout_s=2.0,
    )


@pytest_asyncio.fixture
async def remote(core: EngineCore, address: str, served_model: ServedModel) -> AsyncIterator[RemoteEngine]:
    r = remote_for(address, served_model)
    await r.start()
    yield r
    await r.close()


async def collect(handle: GenerationHandle, timeout_s: float = 2.0) -> list[Event]:
    out: list[Event] = []
    async with asyncio.timeout(timeout_s):
        while True:
            event = await handle.events.get()
            out.append(event)
            if not isinstance(event, TokenEvent | PromptLogprobsEvent):
                return out


async def eventually(check: Callable[[], bool], timeout_s: float = 2.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not check():
            await asyncio.sleep(0.01)


def prompt(model: ServedModel, text: str) -> list[int]:
    return list(model.tokenizer(text)["input_ids"])


# ---------------------------------------------------------------------------------- streaming
async def test_hello_loads_the_cores_model(remote: RemoteEngine, served_model: ServedModel) -> None:
    assert remote.model is served_model
    assert await remote.ready()


async def test_tokens_arrive_in_order_and_complete(
    remote: RemoteEngine, fake: FakeEngine, served_model: ServedModel
) -> None:
    ids = prompt(served_model, "The cat runs")
    handle = remote.submit(EngineRequest(ids, GREEDY, 12, None))
    events = await collect(handle)
    assert events[-1] == FinishEvent("length")
    assert [e.token_id for e in events if isinstance(e, TokenEvent)] == fake.expected_tokens(ids, GREEDY, 12, None)
    assert fake.live == 0  # the core released the finished generation itself
    remote.cancel(handle)  # what the service always does: a no-op now, nothing is sent


async def test_concurrent_requests_keep_their_own_streams(
    remote: RemoteEngine, fake: FakeEngine, served_model: ServedModel
) -> None:
    params = SamplingParams(temperature=0.9, logprobs=2)
    jobs = [(prompt(served_model, f"prompt number {i}"), 6 + i, i) for i in range(8)]
    handles = [remote.submit(EngineRequest(ids, params, n, seed)) for ids, n, seed in jobs]
    results = await asyncio.gather(*(collect(h) for h in handles))
    for (ids, n, seed), events in zip(jobs, results, strict=True):
        tokens = [e for e in events if isinstance(e, TokenEvent)]
        assert [t.token_id for t in tokens] == fake.expected_tokens(ids, params, n, seed)
        assert all(len(t.top_logprobs) == 2 for t in tokens)
        assert events[-1] == FinishEvent("length")
    assert fake.live == 0


class LockstepEngine(FakeEngine):
    """Emits one token for every live generation in ONE synchronous pass per `step()`, as the
    scheduler does after a Triton step; the sinks are the core's."""

    def __init__(self, model: ServedModel) -> None:
        super().__init__(model)
        self.sinks: dict[int, EventSink] = {}
        self._next = 0

    def submit(self, request: EngineRequest, events: EventSink | None = None) -> FakeHandle:
        assert events is not None
        self._next += 1
        self.sinks[self._next] = events
        return super().submit(replace(request, max_new_tokens=0))  # a handle for cancel/live only

    def step(self, token_id: int, *, last: bool = False) -> None:
        for sink in self.sinks.values():
            sink.put_nowait(TokenEvent(token_id, -0.5, ()))
            if last:
                sink.put_nowait(FinishEvent("length"))


async def test_one_message_per_worker_per_step(address: str, served_model: ServedModel) -> None:
    engine = LockstepEngine(served_model)
    core = EngineCore(engine, address, worker_timeout_s=WORKER_TIMEOUT_S)
    await core.start()
    workers = [remote_for(address, served_model) for _ in range(2)]
    try:
        for w in workers:
            await w.start()
        handles = [w.submit(EngineRequest([1, 2], GREEDY, 3, None)) for w in workers for _ in range(16)]
        await eventually(lambda: len(engine.sinks) == 32)
        before = [w.event_messages for w in workers]
        for step in range(3):
            engine.step(100 + step, last=step == 2)
            want = step + 1
            await eventually(lambda: all(h.events.qsize() >= want for h in handles))  # noqa: B023
        results = await asyncio.gather(*(collect(h) for h in handles))
        for events in results:
            tokens = [TokenEvent(100 + i, -0.5, ()) for i in range(3)]
            assert events == [*tokens, FinishEvent("length")]
        # 3 steps x 16 generations per worker: 3 messages each, not 48 (nor 64 with the finishes).
        assert [w.event_messages - b for w, b in zip(workers, before, strict=True)] == [3, 3]
        assert [w.events_received for w in workers] == [64, 64]
        assert core.event_messages == 6
    finally:
        for w in workers:
            await w.close()
        await core.close()


async def test_prompt_logprobs_cross_to_the_worker_before_the_tokens(
    remote: RemoteEngine, core: EngineCore, served_model: ServedModel
) -> None:
    ids = prompt(served_model, "Hello there")
    echoed = await collect(remote.submit(EngineRequest(ids, GREEDY, 2, None, prompt_logprobs=2)))
    assert echoed[0] == FakeEngine.prompt_logprobs_event(ids, 2)
    assert [type(e) for e in echoed[1:]] == [TokenEvent, TokenEvent, FinishEvent]
    only = await collect(remote.submit(EngineRequest(ids, GREEDY, 0, None, prompt_logprobs=1)))  # echo, max_tokens 0
    assert [type(e) for e in only] == [PromptLogprobsEvent, FinishEvent]


async def test_free_running_generations_are_batched(
    remote: RemoteEngine, core: EngineCore, served_model: ServedModel
) -> None:
    handles = [remote.submit(EngineRequest(prompt(served_model, f"p{i}"), GREEDY, 10, None)) for i in range(16)]
    await asyncio.gather(*(collect(h) for h in handles))
    assert core.events_sent == 16 * 11
    assert core.event_messages * 4 <= core.events_sent, (core.event_messages, core.events_sent)


# ---------------------------------------------------------------------------------- releasing
async def test_cancel_frees_the_generation(remote: RemoteEngine, fake: FakeEngine, served_model: ServedModel) -> None:
    fake.delay_s = 0.01
    handle = remote.submit(EngineRequest(prompt(served_model, "long one"), GREEDY, 500, None))
    first = await asyncio.wait_for(handle.events.get(), 2.0)
    assert isinstance(first, TokenEvent)
    assert fake.live == 1
    remote.cancel(handle)
    await eventually(lambda: fake.live == 0)


async def test_goodbye_cancels_the_workers_generations(
    core: EngineCore, address: str, fake: FakeEngine, served_model: ServedModel
) -> None:
    fake.delay_s = 0.01
    worker = remote_for(address, served_model)
    await worker.start()
    worker.submit(EngineRequest(prompt(served_model, "a"), GREEDY, 500, None))
    worker.submit(EngineRequest(prompt(served_model, "b"), GREEDY, 500, None))
    await eventually(lambda: fake.live == 2)
    await worker.close()
    await eventually(lambda: fake.live == 0 and core.workers == 0, timeout_s=WORKER_TIMEOUT_S / 2)


async def test_a_silent_worker_loses_its_generations(
    core: EngineCore, address: str, fake: FakeEngine, served_model: ServedModel
) -> None:
    fake.delay_s = 0.01
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.DEALER)  # a worker that submits, then hangs: no heartbeat, no goodbye
    ipc.configure(sock)
    sock.connect(address)
    try:
        await sock.send(ipc.dumps((ipc.SUBMIT, 1, EngineRequest(prompt(served_model, "x"), GREEDY, 500))))
        await sock.send(ipc.dumps((ipc.SUBMIT, 2, EngineRequest(prompt(served_model, "y"), GREEDY, 500))))
        await eventually(lambda: fake.live == 2)
        assert core.workers == 1
        await eventually(lambda: fake.live == 0, timeout_s=WORKER_TIMEOUT_S * 3)
        assert core.workers == 0
        # It was told, in case it was only slow: each generation ends with an error.
        errors: dict[int, Event] = {}
        async with asyncio.timeout(1.0):
            while len(errors) < 2:
                kind, *rest = ipc.loads(await sock.recv())
                if kind == ipc.EVENTS:
                    errors.update({item[0]: item[1] for item in rest[0] if ipc.is_terminal(item)})
        assert all(isinstance(e, ErrorEvent) and isinstance(e.error, UpstreamUnavailable) for e in errors.values())
    finally:
        sock.close()
        ctx.term()


# ---------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "error",
    [Overloaded("2 generations already waiting"), UpstreamUnavailable("triton down"), UpstreamTimeout("step deadline")],
    ids=lambda e: type(e).__name__,
)
async def test_submit_errors_keep_their_type(remote: RemoteEngine, fake: FakeEngine, error: Exception) -> None:
    fake.submit_error = error
    events = await collect(remote.submit(EngineRequest([1, 2, 3], GREEDY, 4, None)))
    assert len(events) == 1 and isinstance(events[0], ErrorEvent)
    assert type(events[0].error) is type(error)
    assert str(events[0].error) == str(error)
    assert fake.live == 0


async def test_errors_mid_generation_keep_their_type(
    remote: RemoteEngine, fake: FakeEngine, served_model: ServedModel
) -> None:
    fake.fail_after = 2
    fake.error = StepRejected("bad row")
    events = await collect(remote.submit(EngineRequest(prompt(served_model, "z"), GREEDY, 8, None)))
    assert [type(e) for e in events] == [TokenEvent, TokenEvent, ErrorEvent]
    assert isinstance(events[-1], ErrorEvent) and type(events[-1].error) is StepRejected


class _Unpicklable(Exception):
    def __init__(self, a: int, b: int) -> None:  # pickle re-creates exceptions from args: this breaks it
        super().__init__(f"{a}/{b}")


async def test_an_exception_pickle_cannot_carry_becomes_a_runtime_error() -> None:
    with pytest.raises(TypeError):
        pickle.loads(pickle.dumps(_Unpicklable(1, 2)))
    item = ipc.encode_event(7, ErrorEvent(_Unpicklable(1, 2)))
    event = ipc.decode_event(pickle.loads(pickle.dumps(item)))
    assert isinstance(event, ErrorEvent) and type(event.error) is RuntimeError
    assert "_Unpicklable" in str(event.error)


async def test_a_request_crosses_the_wire_whole() -> None:
    params = SamplingParams(temperature=0.7, top_p=0.9, logprobs=2, logit_bias=((5, -1.5),))
    request = EngineRequest(
        (1, 2, 3),
        params,
        9,
        seed=42,
        ignore_eos=True,
        min_tokens=2,
        stop_token_ids=(7, 8),
        request_id="req-1",
        prompt_logprobs=1,
    )
    kind, rid, copy = ipc.loads(ipc.dumps((ipc.SUBMIT, 3, request)))
    assert (kind, rid) == (ipc.SUBMIT, 3)
    assert copy == request and type(copy.params) is SamplingParams


async def test_a_worker_that_speaks_zeromq_imports_no_grpc() -> None:
    """An HTTP worker of `--workers N` holds `RemoteEngine` only: neither gRPC nor the scheduler."""
    code = (
        "import sys, frontend.engine.remote, frontend.engine.ipc\n"
        "loaded = [m for m in ('tritonclient', 'grpc', 'frontend.engine.scheduler') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2], timeout=120)


def app_settings(settings: Settings, address: str) -> Settings:
    return settings.model_copy(
        update={
            "engine_core_url": address,
            "engine_core_heartbeat_s": HEARTBEAT_S,
            "engine_core_timeout_s": WORKER_TIMEOUT_S,
        }
    )


@pytest_asyncio.fixture
async def app_client(
    core: EngineCore, address: str, settings: Settings, served_model: ServedModel
) -> AsyncIterator[httpx.AsyncClient]:
    """The real app whose engine is a RemoteEngine talking to the core."""
    app = create_app(
        app_settings(settings, address),
        engine_factory=lambda s, m: remote_engine(s, m, model_loader=lambda _n, _v: served_model),
        cache=MemoryResultCache(64, 60.0, max_bytes=1 << 20),
    )
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        assert await app.state.lifecycle.wait_started(5)  # the engine starts in the background
        yield c


async def test_overloaded_in_the_core_is_a_503(app_client: httpx.AsyncClient, fake: FakeEngine) -> None:
    fake.submit_error = Overloaded("1024 generations already waiting")
    r = await app_client.post("/generate", json={"prompt": "Hi", "max_new_tokens": 3})
    assert r.status_code == 503
    assert r.headers["retry-after"] == "1"
    err = assert_error_envelope(r)
    assert err["type"] == "overloaded_error"
    assert "already waiting" in err["message"]


async def test_the_app_generates_through_the_core(
    app_client: httpx.AsyncClient, fake: FakeEngine, served_model: ServedModel
) -> None:
    r = await app_client.post("/generate", json={"prompt": "Hello there", "max_new_tokens": 5, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["completion_tokens"] == 5
    expected = fake.expected_tokens(prompt(served_model, "Hello there"), GREEDY, 5, None)
    assert body["generated_text"] == served_model.tokenizer.decode(expected)
    r = await app_client.get("/health/ready")
    assert r.status_code == 200 and r.json()["status"] == "ready"
    await eventually(lambda: fake.live == 0)


async def test_metrics_show_the_cores_series_once(app_client: httpx.AsyncClient) -> None:
    await app_client.post("/generate", json={"prompt": "Hi", "max_new_tokens": 2})
    r = await app_client.get("/metrics")
    assert r.status_code == 200
    families = [f.name for f in text_string_to_metric_families(r.text)]
    assert len(families) == len(set(families)), sorted(families)
    samples = {s.name: s.value for f in text_string_to_metric_families(r.text) for s in f.samples if not s.labels}
    assert samples["gateway_step_rows_count"] == 1  # the core's observation, not the worker's
    assert samples["gateway_batch_running_sequences"] == 3
    assert samples["gateway_queue_waiting_sequences"] == 1
    assert samples["gateway_generated_tokens_total"] == 2  # the worker's own series


# ---------------------------------------------------------------------------------- core gone
async def test_core_gone_means_not_ready_and_failed_generations(
    remote: RemoteEngine, core: EngineCore, fake: FakeEngine, served_model: ServedModel
) -> None:
    fake.delay_s = 0.01
    handle = remote.submit(EngineRequest(prompt(served_model, "long"), GREEDY, 500, None))
    await asyncio.wait_for(handle.events.get(), 2.0)
    assert await remote.ready()
    await core.close()
    assert fake.live == 0  # closing the core closed its engine
    assert not await remote.ready()
    events = await collect(handle, timeout_s=WORKER_TIMEOUT_S * 4)
    assert isinstance(events[-1], ErrorEvent) and isinstance(events[-1].error, UpstreamUnavailable)
    with pytest.raises(UpstreamUnavailable):
        remote.submit(EngineRequest([1], GREEDY, 2, None))


async def test_start_fails_without_a_core(address: str, served_model: ServedModel) -> None:
    worker = RemoteEngine(address, model_loader=lambda _n, _v: served_model, startup_timeout_s=0.2)
    with pytest.raises(UpstreamUnavailable):
        await worker.start()
    assert not await worker.ready()


async def test_a_worker_whose_first_wait_timed_out_becomes_ready_once_the_core_is_up(
    fake: FakeEngine, address: str, served_model: ServedModel, core_metrics: GatewayMetrics
) -> None:
    # The lifecycle retries a failed start: the second start must not find the engine closed for good.
    remote = RemoteEngine(address, model_loader=lambda _n, _v: served_model, startup_timeout_s=0.2)
    with pytest.raises(UpstreamUnavailable):
        await remote.start()  # no core yet
    assert not await remote.ready()
    core = EngineCore(fake, address, worker_timeout_s=WORKER_TIMEOUT_S, metrics_text=core_metrics.engine_text)
    await core.start()
    try:
        await remote.start()
        assert await remote.ready()
        handle = remote.submit(EngineRequest(prompt(served_model, "Hi"), SamplingParams(temperature=0.0), 2))
        assert isinstance((await collect(handle))[-1], FinishEvent)
    finally:
        await remote.close()
        await core.close()
