"""Prometheus metrics of the gateway, on a registry built per app (no import-time globals).

Two families of names for the same measurements:

* `gateway_*`: the gateway's own names (they read like TGI's), next to Triton's `nv_inference_*`
  and the step model's `gpt2_*`.
* `vllm:*` with a `model_name` label: vLLM's names and label conventions, so dashboards and
  autoscalers built for vLLM read this gateway unchanged (README "Metrics" says which are exact
  equivalents).

Which process owns which series:

* `registry`: HTTP and generation series (requests, latencies, tokens, finish reasons, cache
  lookups). Always the process that serves the HTTP request. With `python -m frontend --workers N`
  the launcher gives every worker one PROMETHEUS_MULTIPROC_DIR (`frontend.observability.multiprocess`):
  prometheus-client then keeps these values in per-process files and `render` sums every
  worker's, so one scrape of any worker shows the whole gateway.
* `engine_registry`: the scheduler's series (`gateway_step_*`, `gateway_full_row_fetches_total`,
  the running/waiting gauges and their `vllm:` twins, `vllm:kv_cache_usage_perc`), fed by the
  `StepObserver` calls. Owned by the process that runs the scheduler: the gateway process itself
  with one worker, the engine-core process (`frontend.engine.core`) with `--workers N`. There, each
  HTTP worker's `engine_registry` stays unused and `render` appends the core's exposition instead
  (`engine_exposition`, fetched over the core's socket), so a scrape shows each series once.
"""

from __future__ import annotations

import bisect
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess as prometheus_multiprocess
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from starlette.responses import Response
from starlette.routing import Match

from frontend.observability.multiprocess import multiprocess_enabled

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TOKEN_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)
# vLLM's own buckets (vllm/v1/metrics/loggers.py), so its dashboards' quantiles read the same.
_VLLM_TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
    160.0, 640.0, 2560.0,
)  # fmt: skip
_VLLM_ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
_VLLM_REQUEST_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0,
    1920.0, 7680.0,
)  # fmt: skip
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class GatewayMetrics:
    """Every series of the gateway, and the `StepObserver` the scheduler feeds.

    `model_name` labels the `vllm:*` series (the served model, `GATEWAY_MODEL`); `kv_capacity`
    (the model's KV slots, from its config) turns the running count into `vllm:kv_cache_usage_perc`.
    Both can be set later with `set_model` (the engine factory knows the capacity)."""

    def __init__(self, model_name: str = "gpt2", *, kv_capacity: int | None = None) -> None:
        self.multiprocess = multiprocess_enabled()
        self.registry = CollectorRegistry()
        self._define_http_series(self.registry)
        self._define_generation_series(self.registry)
        self._define_vllm_generation_series(self.registry)
        # The scheduler's series: see the module docstring for which process owns them.
        self.engine_registry = CollectorRegistry()
        # Set when the scheduler runs in the engine-core process: returns its exposition text.
        self.engine_exposition: Callable[[], Awaitable[bytes]] | None = None
        self._define_scheduler_series(self.engine_registry)
        self._define_vllm_scheduler_series(self.engine_registry)
        self.set_model(model_name, kv_capacity=kv_capacity)
        # Multiprocess mode writes every process's values to the shared directory, this worker's
        # idle scheduler series too: they are left out of the sum (the core's are appended).
        self._engine_families = frozenset(m.name for m in self.engine_registry.collect())

    def _define_http_series(self, r: CollectorRegistry) -> None:
        """HTTP requests: count by route and status, latency, in flight."""
        self.requests = Counter(
            "gateway_requests", "HTTP requests by route and status", ["route", "method", "status"], registry=r
        )
        self.request_duration = Histogram(
            "gateway_request_duration_seconds",
            "HTTP request latency by route",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        # Several workers: the sum over the live ones (a dead worker's value is dropped).
        self.in_flight = Gauge(
            "gateway_requests_in_flight", "HTTP requests being served", registry=r, multiprocess_mode="livesum"
        )

    def _define_generation_series(self, r: CollectorRegistry) -> None:
        """Generations in `gateway_*` names: tokens, latencies, finish reasons, cache lookups."""
        self.prompt_tokens = Counter("gateway_prompt_tokens", "Prompt tokens of served generations", registry=r)
        self.generated_tokens = Counter(
            "gateway_generated_tokens", "Tokens generated (cache replays excluded)", registry=r
        )
        self.time_to_first_token = Histogram(
            "gateway_time_to_first_token_seconds",
            "From request to first generated token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            "gateway_inter_token_latency_seconds",
            "Gap between consecutive tokens of a generation",
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.generation_duration = Histogram(
            "gateway_generation_duration_seconds", "Whole generation time", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.finish_reasons = Counter("gateway_generations", "Finished generations by reason", ["reason"], registry=r)
        self.cache_lookups = Counter("gateway_cache_lookups", "Result-cache lookups", ["result"], registry=r)

    def _define_vllm_generation_series(self, r: CollectorRegistry) -> None:
        """vLLM's names for the same generation measurements (cache replays excluded, as in vLLM,
        whose engine never sees them), labelled by `model_name`."""
        labels = ["model_name"]
        self.vllm_ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            labels,
            buckets=_VLLM_TTFT_BUCKETS,
            registry=r,
        )
        self.vllm_itl = Histogram(
            "vllm:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            labels,
            buckets=_VLLM_ITL_BUCKETS,
            registry=r,
        )
        self.vllm_e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            labels,
            buckets=_VLLM_REQUEST_BUCKETS,
            registry=r,
        )
        self.vllm_prompt_tokens = Counter(
            "vllm:prompt_tokens", "Number of prefill tokens processed.", labels, registry=r
        )
        self.vllm_generation_tokens = Counter(
            "vllm:generation_tokens", "Number of generation tokens processed.", labels, registry=r
        )
        self.vllm_success = Counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            [*labels, "finished_reason"],
            registry=r,
        )

    def _define_scheduler_series(self, r: CollectorRegistry) -> None:
        """The scheduler's own series: batch and queue sizes, steps, full-row fetches, the breaker."""
        self.running = Gauge("gateway_batch_running_sequences", "Sequences in the continuous batch", registry=r)
        self.waiting = Gauge("gateway_queue_waiting_sequences", "Generations waiting for a batch slot", registry=r)
        self.step_rows = Histogram(
            "gateway_step_rows",
            "Rows (sequences) per batched step",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
            registry=r,
        )
        self.step_duration = Histogram(
            "gateway_step_duration_seconds",
            "Round trip of one batched step to Triton",
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.full_row_fetches = Counter(
            "gateway_full_row_fetches", "Steps whose top-K window did not decide the sample", ["reason"], registry=r
        )
        self.ahead_proposals = Counter(
            "gateway_ahead_proposals",
            "Tokens the model proposed in decodes run ahead (GATEWAY_DECODE_AHEAD), by the gateway's verdict",
            ["outcome"],
            registry=r,
        )
        self.breaker_state = Gauge(
            "gateway_circuit_breaker_state",
            "Circuit breaker around Triton steps: 0 closed, 1 half-open, 2 open",
            registry=r,
        )
        # Several model instances (GATEWAY_MODEL_INSTANCES > 1, frontend.engine.placement): each
        # one's own; the unlabelled series above are then their sums (the breaker: its best state).
        self.instance_running = Gauge(
            "gateway_instance_running_sequences", "Sequences in a model instance's batch", ["instance"], registry=r
        )
        self.instance_waiting = Gauge(
            "gateway_instance_waiting_sequences", "Generations waiting for a model instance", ["instance"], registry=r
        )
        self.instance_breaker_state = Gauge(
            "gateway_instance_circuit_breaker_state",
            "Circuit breaker around a model instance's steps: 0 closed, 1 half-open, 2 open",
            ["instance"],
            registry=r,
        )
        self.instance_moved = Counter(
            "gateway_instance_moved_sequences",
            "Generations moved from a failed model instance to a healthy one, where they started again",
            ["from_instance", "to_instance"],
            registry=r,
        )

    def _define_vllm_scheduler_series(self, r: CollectorRegistry) -> None:
        """vLLM's names for the scheduler's gauges, its KV-cache usage and queue time, labelled by
        `model_name`."""
        labels = ["model_name"]
        self.vllm_running = Gauge(
            "vllm:num_requests_running", "Number of requests in model execution batches.", labels, registry=r
        )
        self.vllm_waiting = Gauge(
            "vllm:num_requests_waiting", "Number of requests waiting to be processed.", labels, registry=r
        )
        self.vllm_kv_usage = Gauge(
            "vllm:kv_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage (running sequences / the model's KV slots).",
            labels,
            registry=r,
        )
        self.vllm_queue_time = Histogram(
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            labels,
            buckets=_VLLM_REQUEST_BUCKETS,
            registry=r,
        )

    def set_model(self, model_name: str, *, kv_capacity: int | None = None) -> None:
        """Bind the `vllm:*` series to the served model (and its KV slots, when known)."""
        self.model_name = model_name
        self.kv_capacity = kv_capacity if kv_capacity and kv_capacity > 0 else None
        self._ttft = self.vllm_ttft.labels(model_name)
        self._itl = self.vllm_itl.labels(model_name)
        self._e2e = self.vllm_e2e.labels(model_name)
        self._prompt = self.vllm_prompt_tokens.labels(model_name)
        self._generation = self.vllm_generation_tokens.labels(model_name)
        self._running = self.vllm_running.labels(model_name)
        self._waiting = self.vllm_waiting.labels(model_name)
        self._kv_usage = self.vllm_kv_usage.labels(model_name)
        self._queue_time = self.vllm_queue_time.labels(model_name)

    # Generation (frontend.generation: stream.py and caching.py)
    def cache_lookup(self, hit: bool) -> None:
        self.cache_lookups.labels("hit" if hit else "miss").inc()

    def first_token(self, ttft_s: float) -> None:
        self.time_to_first_token.observe(ttft_s)
        self._ttft.observe(ttft_s)

    def token_gap(self, gap_s: float) -> None:
        self.inter_token_latency.observe(gap_s)
        self._itl.observe(gap_s)

    def tokens_together(self, count: int) -> None:
        """`count` tokens read at once with the one before them: a gap of 0 each, as `count` calls
        of `token_gap(0.0)` record, in two increments per series instead of 2 x count observes."""
        if count > 0:
            observe_repeated(self.inter_token_latency, 0.0, count)
            observe_repeated(self._itl, 0.0, count)

    def generation_finished(self, *, prompt_tokens: int, generated_tokens: int, total_s: float, reason: str) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.generated_tokens.inc(generated_tokens)
        self.generation_duration.observe(total_s)
        self.finish_reasons.labels(reason).inc()
        self._prompt.inc(prompt_tokens)
        self._generation.inc(generated_tokens)
        self._e2e.observe(total_s)
        self.vllm_success.labels(self.model_name, reason).inc()

    # StepObserver (frontend.engine.scheduler)
    def step_finished(self, rows: int, duration_s: float) -> None:
        self.step_rows.observe(rows)
        self.step_duration.observe(duration_s)

    def full_row_fetched(self, reason: str) -> None:
        self.full_row_fetches.labels(reason).inc()

    def ahead_judged(self, accepted: int, refused: int) -> None:
        if accepted:
            self.ahead_proposals.labels("accepted").inc(accepted)
        if refused:
            self.ahead_proposals.labels("refused").inc(refused)

    def queue_changed(self, waiting: int, running: int) -> None:
        self.waiting.set(waiting)
        self.running.set(running)
        self._waiting.set(waiting)
        self._running.set(running)
        if self.kv_capacity is not None:
            self._kv_usage.set(min(1.0, running / self.kv_capacity))

    def sequence_admitted(self, queue_s: float) -> None:
        """A generation left the waiting queue for the batch after `queue_s` seconds (the
        scheduler hook that feeds `vllm:request_queue_time_seconds`; see README "Metrics")."""
        self._queue_time.observe(queue_s)

    def breaker_changed(self, state: str) -> None:
        self.breaker_state.set(breaker_level(state))

    # Several model instances (frontend.engine.placement)
    def instance_queue_changed(self, instance: str, waiting: int, running: int) -> None:
        self.instance_waiting.labels(instance).set(waiting)
        self.instance_running.labels(instance).set(running)

    def instance_breaker_changed(self, instance: str, state: str) -> None:
        self.instance_breaker_state.labels(instance).set(breaker_level(state))

    def sequences_moved(self, source: str, target: str, count: int) -> None:
        self.instance_moved.labels(source, target).inc(count)

    # Exposition
    def engine_text(self) -> bytes:
        """This process's scheduler series in the exposition format (what the engine core serves)."""
        return generate_latest(self.engine_registry)

    def http_text(self) -> bytes:
        """The HTTP and generation series: this process's, or every worker's summed in multiprocess mode."""
        if not self.multiprocess:
            return generate_latest(self.registry)
        collected = CollectorRegistry()
        collected.register(_WorkerSeries(self._engine_families))
        return generate_latest(collected)

    async def render(self) -> Response:
        if self.engine_exposition is None:
            engine = self.engine_text()
        else:
            try:
                engine = await self.engine_exposition()
            except Exception as err:  # a scrape must not fail because the core is away
                log.warning("engine core metrics unavailable: %s", err)
                engine = b""
        return Response(self.http_text() + engine, media_type=CONTENT_TYPE)

    def close(self) -> None:
        """At worker shutdown: drop this process's live gauges from the multiprocess sums."""
        if self.multiprocess:
            prometheus_multiprocess.mark_process_dead(os.getpid())


def breaker_level(state: object) -> int:
    """A breaker state (BreakerState or its value) as its gauge's number: 0 closed, 1 half-open, 2 open."""
    return {"closed": 0, "half_open": 1, "open": 2}.get(str(getattr(state, "value", state)), 2)


class _WorkerSeries(Collector):
    """Every worker's HTTP and generation series, summed from the multiprocess directory."""

    def __init__(self, excluded: frozenset[str]) -> None:
        self._excluded = excluded
        self._all = prometheus_multiprocess.MultiProcessCollector(None)

    def collect(self) -> Iterable[Metric]:
        return [m for m in self._all.collect() if m.name not in self._excluded]


def observe_repeated(histogram: Histogram, amount: float, count: int) -> None:
    """`histogram.observe(amount)` `count` times, as one increment of its sum and one of its bucket
    (prometheus_client's Histogram has no batch observe; its per-call loop is ~2 us a token on the
    streaming hot path). The same samples as the loop (tests/unit/test_stream_pacing.py)."""
    histogram._raise_if_not_observable()
    histogram._sum.inc(amount * count)
    histogram._buckets[bisect.bisect_left(histogram._upper_bounds, amount)].inc(count)


def route_template(scope: dict) -> str:  # type: ignore[type-arg]
    """The route TEMPLATE of a request (bounded label values), never its raw path.

    FastAPI's API routes put themselves in `scope["route"]`; Starlette's plain routes (the docs
    pages, `/openapi.json`) and mounts (the docs assets) do not, so those are matched here."""
    route = scope.get("route")
    template = getattr(route, "path", None)
    if template:
        return str(template)
    app = scope.get("app")
    router = getattr(app, "router", None)
    for candidate in getattr(router, "routes", ()):
        match, _ = candidate.matches(scope)
        if match == Match.FULL:
            return str(getattr(candidate, "path", "unmatched") or "unmatched")
    return "unmatched"


# A client that went away before its response started: nginx's and vLLM's 499 ("client closed
# request"), not the 500 a response that never started would otherwise be counted as. The ASGI
# scope carries the mark (set by frontend.api.client_hygiene) to every middleware outside it.
CLIENT_CLOSED_REQUEST = 499
_CLIENT_GONE = "gateway.client_gone"


def note_client_gone(scope: MutableMapping[str, Any]) -> None:
    scope[_CLIENT_GONE] = True


def unanswered_status(scope: Mapping[str, Any]) -> int:
    """The status to count for a request whose response never started: 499 or 500."""
    return CLIENT_CLOSED_REQUEST if scope.get(_CLIENT_GONE) else 500


class MetricsMiddleware:
    """Counts requests by route template. A request is counted when its response STARTS (its
    status is known then), so a client that has its answer always finds it in the counter."""

    def __init__(self, app: Callable[..., Awaitable[None]], metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:  # type: ignore[type-arg]
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        counted = False

        def count(status: int) -> str:
            nonlocal counted
            counted = True
            template = route_template(scope)
            self.metrics.requests.labels(template, scope.get("method", ""), str(status)).inc()
            return template

        async def send_wrapper(message: dict) -> None:  # type: ignore[type-arg]
            if message["type"] == "http.response.start" and not counted:
                count(message["status"])
            await send(message)

        started = time.perf_counter()
        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.in_flight.dec()
            template = route_template(scope) if counted else count(unanswered_status(scope))
            self.metrics.request_duration.labels(template).observe(time.perf_counter() - started)
