"""Several instances of one model on one host (one per GPU): where each new sequence goes, and
where a failed instance's sequences go.

Triton's own `instance_group { count: N }` would hand each request to whichever instance is free,
but a sequence's KV cache lives inside ONE instance (one Python-backend stub, on one GPU) and one
step carries many sequences: the gateway has to choose. So the repository serves the model as N
Triton models of one instance each (`<model>`, `<model>_1`, ...: `export.repository.write_instances`),
and `PlacementEngine` runs one `TritonEngine` per instance (its step client, scheduler and circuit
breaker) behind the same `Engine` protocol as a single `TritonEngine`:

* **placement**: a new sequence goes to a healthy instance (started, breaker closed; one whose
  last step failed only after those whose did not) with the most free slots (its scheduler's
  `max_running` minus running and waiting), then the shortest queue, then in turn;
* **stickiness**: a sequence lives in one instance's scheduler, so every step of it goes to that
  instance, until that instance fails;
* **failover**: when an instance's breaker opens (`breaker_failures` failed steps in a row: Triton
  unreachable, the model unloaded, its stub dead), that instance's loop calls `_failover` before
  it fails anything (`Scheduler.on_breaker_open`): its sequences move to the healthy instances
  (`take_sequences`, `adopt`), where those that had started start again from their prompt plus
  the tokens generated so far, as after a Triton restart (`frontend.engine.recovery`: greedy and
  seeded streams go on token for token), and queued ones queue. With no healthy instance they stay
  where they are and wait or fail exactly as with one instance. New work goes only to healthy
  instances; a failed instance whose probe step succeeds again (its breaker closes) takes new work
  again;
* **start**: every instance starts at once and keeps trying until it has; the engine serves as
  soon as one has (readiness: at least one instance ready).

The gateway's scheduler series are the sums over the instances (the breaker gauge: the best
state), and `gateway_instance_*{instance}` are each instance's (`_Board`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from frontend.engine.errors import Overloaded, UpstreamUnavailable
from frontend.engine.events import EventSink
from frontend.engine.model import ServedModel
from frontend.engine.protocol import EngineRequest, GenerationHandle
from step_model.contract import model_config

if TYPE_CHECKING:
    from frontend.engine.breaker import CircuitBreaker
    from frontend.engine.protocol import Engine
    from frontend.engine.scheduler import ActiveSequence, Scheduler
    from frontend.observability import GatewayMetrics
    from frontend.settings import Settings

log = logging.getLogger(__name__)

START_RETRY_S = 1.0  # an instance that did not start tries again after this


class Instance(Protocol):
    """One model instance as placement needs it (`TritonEngine` is one; tests build others)."""

    name: str
    breaker: CircuitBreaker

    @property
    def model(self) -> ServedModel: ...
    @property
    def scheduler(self) -> Scheduler | None: ...
    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def ready(self) -> bool: ...
    def submit(self, request: EngineRequest, events: EventSink | None = None) -> GenerationHandle: ...
    def cancel(self, handle: GenerationHandle) -> None: ...


def engine_from_settings(settings: Settings, metrics: GatewayMetrics | None = None) -> Engine:
    """The engine GATEWAY_* settings describe: one `TritonEngine`, or with
    GATEWAY_MODEL_INSTANCES > 1 a `PlacementEngine` over that many. Binds `metrics` to the
    model and its KV slots (all instances') for `vllm:kv_cache_usage_perc`."""
    from frontend.engine.triton_engine import TritonEngine, model_kv_capacity

    capacity = model_kv_capacity(settings.repository, settings.model)
    if metrics is not None:
        metrics.set_model(settings.model, kv_capacity=capacity * settings.model_instances if capacity else None)
    if settings.model_instances == 1:
        return TritonEngine.from_settings(settings, observer=metrics)
    return PlacementEngine.from_settings(settings, metrics)


class PlacementEngine:
    """The `Engine` over several instances of one model (see the module docstring)."""

    def __init__(
        self, instances: Sequence[Instance], *, metrics: GatewayMetrics | None = None, retry_s: float = START_RETRY_S
    ) -> None:
        if not instances:
            raise ValueError("a PlacementEngine needs at least one instance")
        self.instances = list(instances)
        self._metrics = metrics
        self._retry_s = retry_s
        self._serving: list[Instance] = []  # started, in the order of `instances`
        self._served: ServedModel | None = None  # the model the first instance to start serves
        # Each live handle's instance (cancel goes there); the handle is kept so its id stays its own.
        self._owner: dict[int, tuple[GenerationHandle, Instance]] = {}
        self._turn = 0  # ties in placement go round
        self._starters: list[asyncio.Task[None]] = []
        self._start_errors: dict[str, BaseException] = {}
        self._progress = asyncio.Event()
        self._closed = False

    @classmethod
    def from_settings(cls, settings: Settings, metrics: GatewayMetrics | None = None) -> PlacementEngine:
        """One `TritonEngine` per Triton model of `model_config.instance_names`, each with its own
        breaker and scheduler, all of GATEWAY_*'s settings."""
        from frontend.engine.triton_engine import TritonEngine

        board = _Board(metrics) if metrics is not None else None
        names = model_config.instance_names(settings.model, settings.model_instances)
        instances = [
            TritonEngine.from_settings(
                settings, observer=board.observer(name) if board is not None else None, triton_model=name
            )
            for name in names
        ]
        return cls(instances, metrics=metrics)

    # ------------------------------------------------------------------ the Engine protocol
    @property
    def model(self) -> ServedModel:
        if self._served is None:
            raise UpstreamUnavailable("no model instance has started yet")
        return self._served

    @property
    def breaker(self) -> CircuitBreaker | None:
        """The breaker readiness reads: a closed one while any serving instance's is closed (the
        gateway can serve), else the first serving instance's; None before any has started."""
        for instance in self._serving:
            if instance.breaker.closed:
                return instance.breaker
        return self._serving[0].breaker if self._serving else None

    async def start(self) -> None:
        """Start every instance (each keeps trying in the background until it has); return once
        one serves. Raises when every instance failed its first attempt (the caller retries)."""
        self._closed = False
        self._served = None
        self._start_errors.clear()
        self._starters = [
            asyncio.create_task(self._keep_starting(instance), name=f"start-{instance.name}")
            for instance in self.instances
            if instance not in self._serving
        ]
        while not self._serving:
            if len(self._start_errors) >= len(self.instances):
                why = "; ".join(f"{name}: {err}" for name, err in self._start_errors.items())
                await self._stop_starting()
                raise UpstreamUnavailable(f"no model instance started ({why})")
            self._progress.clear()
            await self._progress.wait()

    async def close(self) -> None:
        """Stop starting, close every instance (their live generations end with an error and their
        KV slots are released). Idempotent."""
        self._closed = True
        await self._stop_starting()
        self._serving = []
        self._owner.clear()
        await asyncio.gather(*(instance.close() for instance in self.instances), return_exceptions=True)

    async def ready(self) -> bool:
        """At least one started instance is ready (its own test: breaker closed, a real step),
        answered as soon as one is: a failing instance's slow probe does not hold readiness."""
        checks = [asyncio.ensure_future(instance.ready()) for instance in self._serving]
        try:
            for answer in asyncio.as_completed(checks):
                with contextlib.suppress(Exception):
                    if await answer is True:
                        return True
            return False
        finally:
            for check in checks:
                check.cancel()

    def submit(self, request: EngineRequest, events: EventSink | None = None) -> GenerationHandle:
        """Place a new generation (see the module docstring); an instance that refuses it now
        (breaker open, queue full, closing) passes it to the next. Raises the first refusal when
        every instance refuses."""
        refusal: Exception | None = None
        for instance in self._ranked():
            try:
                handle = instance.submit(request, events)
            except (UpstreamUnavailable, Overloaded) as err:
                refusal = refusal or err
                continue
            self._turn += 1
            self._owner[id(handle)] = (handle, instance)
            if len(self._owner) > 2 * sum(self.load()) + 256:
                self._forget_finished()
            return handle
        raise refusal or UpstreamUnavailable("no model instance has started yet")

    def cancel(self, handle: GenerationHandle) -> None:
        entry = self._owner.pop(id(handle), None)
        if entry is not None:
            entry[1].cancel(handle)

    def load(self) -> tuple[int, int]:
        running = waiting = 0
        for instance in self._serving:
            scheduler = instance.scheduler
            if scheduler is not None:
                running += scheduler.running
                waiting += scheduler.waiting
        return running, waiting

    def instances_status(self) -> list[dict[str, Any]]:
        """Each instance's state, for the readiness answer: name, serving, breaker, running, waiting."""
        out = []
        for instance in self.instances:
            scheduler = instance.scheduler if instance in self._serving else None
            out.append(
                {
                    "name": instance.name,
                    "serving": scheduler is not None,
                    "breaker": str(instance.breaker.state.value),
                    "running": scheduler.running if scheduler is not None else 0,
                    "waiting": scheduler.waiting if scheduler is not None else 0,
                }
            )
        return out

    # ------------------------------------------------------------------ placement
    def _ranked(self) -> list[Instance]:
        """Serving instances, best first: breaker closed, last step not failed, most free slots,
        shortest queue, then in turn."""
        n = len(self.instances)

        def key(item: tuple[int, Instance]) -> tuple[bool, bool, int, int, int]:
            index, instance = item
            scheduler = instance.scheduler
            if scheduler is None:  # closing
                return (True, True, 0, 0, index)
            free = max(0, scheduler.max_running - scheduler.running - scheduler.waiting)
            breaker = instance.breaker
            return (not breaker.closed, breaker.failures > 0, -free, scheduler.waiting, (index - self._turn) % n)

        serving = [(self.instances.index(instance), instance) for instance in self._serving]
        return [instance for _, instance in sorted(serving, key=key)]

    def _failover(self, source: Instance) -> None:
        """`source`'s breaker is open (its loop calls this between steps): hand its sequences to
        the healthy instances, each to the one with the most free slots as they are placed."""
        scheduler = source.scheduler
        if scheduler is None or not (scheduler.running or scheduler.waiting):
            return
        targets = [t for t in self._serving if t is not source and t.breaker.closed and t.scheduler is not None]
        if not targets:
            return  # nowhere better: they wait for `source` (or fail) as with one instance
        # Those whose last step succeeded, if any (a whole Triton restarting fails them all in turn).
        targets = [t for t in targets if not t.breaker.failures] or targets
        why = source.breaker.last_error or "steps failed"
        error = UpstreamUnavailable(f"model instance {source.name} failed: {why}")
        taken = scheduler.take_sequences()
        assigned: dict[int, list[ActiveSequence]] = {id(t): [] for t in targets}

        def free(target: Instance) -> int:
            s = target.scheduler
            assert s is not None
            return s.max_running - s.running - s.waiting - len(assigned[id(target)])

        for seq in taken:
            target = max(targets, key=free)  # the first of equals: `_serving`'s order
            assigned[id(target)].append(seq)
            self._owner[id(seq)] = (seq, target)
        for target in targets:
            moved = assigned[id(target)]
            if not moved:
                continue
            assert target.scheduler is not None
            target.scheduler.adopt(moved, error)
            if self._metrics is not None:
                self._metrics.sequences_moved(source.name, target.name, len(moved))
        log.warning(
            "model instance %s failed (%s): %d generations moved to %s",
            source.name,
            why,
            len(taken),
            ", ".join(f"{t.name} ({len(assigned[id(t)])})" for t in targets if assigned[id(t)]),
        )

    # ------------------------------------------------------------------ starting
    async def _keep_starting(self, instance: Instance) -> None:
        while not self._closed:
            try:
                await instance.start()
                self._check_version(instance)
            except asyncio.CancelledError:
                raise
            except Exception as err:
                self._start_errors.setdefault(instance.name, err)
                log.warning(
                    "model instance %s did not start (%s); trying again in %.0f s", instance.name, err, self._retry_s
                )
                with contextlib.suppress(Exception):
                    await instance.close()
                self._progress.set()
                await asyncio.sleep(self._retry_s)
                continue
            scheduler = instance.scheduler
            assert scheduler is not None
            scheduler.on_breaker_open = lambda: self._failover(instance)
            self._serving = [i for i in self.instances if i in self._serving or i is instance]
            log.info("model instance %s serving (%d of %d)", instance.name, len(self._serving), len(self.instances))
            self._progress.set()
            return

    def _check_version(self, instance: Instance) -> None:
        """Every instance must serve the version the first one serves (same tokenizer, same weights)."""
        model = instance.model
        if self._served is None:
            self._served = model
        elif model.version != self._served.version:
            raise UpstreamUnavailable(
                f"it serves version {model.version}, the others {self._served.version}: "
                "run write_instances again (or pin GATEWAY_MODEL_VERSION)"
            )

    async def _stop_starting(self) -> None:
        starters, self._starters = self._starters, []
        for task in starters:
            task.cancel()
        for task in starters:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def _forget_finished(self) -> None:
        self._owner = {k: v for k, v in self._owner.items() if not getattr(v[0], "done", False)}


class _Board:
    """The instances' scheduler series: the gateway's own (`queue_changed`, the breaker gauge) as
    the sums over the instances, and each instance's under its `instance` label."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self.metrics = metrics
        self.queues: dict[str, tuple[int, int]] = {}
        self.breakers: dict[str, object] = {}

    def observer(self, instance: str) -> _InstanceObserver:
        """The observer of a new instance (its series start at empty and closed)."""
        self.metrics.instance_queue_changed(instance, 0, 0)
        self.metrics.instance_breaker_changed(instance, "closed")
        return _InstanceObserver(self, instance)

    def queue_changed(self, instance: str, waiting: int, running: int) -> None:
        self.queues[instance] = (waiting, running)
        self.metrics.queue_changed(sum(w for w, _ in self.queues.values()), sum(r for _, r in self.queues.values()))
        self.metrics.instance_queue_changed(instance, waiting, running)

    def breaker_changed(self, instance: str, state: object) -> None:
        from frontend.observability.metrics import breaker_level

        self.breakers[instance] = state
        best = min(self.breakers.values(), key=breaker_level)
        self.metrics.breaker_changed(best)  # type: ignore[arg-type]
        self.metrics.instance_breaker_changed(instance, state)  # type: ignore[arg-type]


class _InstanceObserver:
    """One instance's `StepObserver` (and breaker listener), feeding the `_Board`."""

    def __init__(self, board: _Board, instance: str) -> None:
        self._board = board
        self._instance = instance
        metrics = board.metrics
        self.step_finished = metrics.step_finished
        self.full_row_fetched = metrics.full_row_fetched
        self.ahead_judged = metrics.ahead_judged
        self.sequence_admitted = metrics.sequence_admitted

    def queue_changed(self, waiting: int, running: int) -> None:
        self._board.queue_changed(self._instance, waiting, running)

    def breaker_changed(self, state: object) -> None:
        self._board.breaker_changed(self._instance, state)
