"""Prometheus metrics of the gateway, on a registry built per app (no import-time globals).

Names follow Prometheus conventions and read like TGI's: a dashboard can put them next to
Triton's own (`nv_inference_*`) and the step model's (`gpt2_kv_*`).

Which process owns which series. Two registries:

* `registry`: HTTP and generation series (requests, latencies, tokens, finish reasons, cache
  lookups). Always the process that serves the HTTP request: each worker has its own.
* `engine_registry`: the scheduler's series (`gateway_step_rows`, `gateway_step_duration_seconds`,
  `gateway_full_row_fetches_total`, `gateway_batch_running_sequences`,
  `gateway_queue_waiting_sequences`), fed by the `StepObserver` calls. Owned by the process that
  runs the scheduler: the gateway process itself with one worker, the engine-core process
  (`frontend.engine.core`) with `--workers N`. There, each HTTP worker's `engine_registry` stays
  unused and `render` appends the core's exposition instead (`engine_exposition`, fetched over
  the core's socket), so a scrape of any worker shows each series exactly once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.responses import Response

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TOKEN_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
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
        self.in_flight = Gauge("gateway_requests_in_flight", "HTTP requests being served", registry=r)
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

        # The scheduler's series: see the module docstring for which process owns them.
        self.engine_registry = CollectorRegistry()
        r = self.engine_registry
        # Set when the scheduler runs in the engine-core process: returns its exposition text.
        self.engine_exposition: Callable[[], Awaitable[bytes]] | None = None
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
        self.breaker_state = Gauge(
            "gateway_circuit_breaker_state",
            "Circuit breaker around Triton steps: 0 closed, 1 half-open, 2 open",
            registry=r,
        )

    # StepObserver (frontend.engine.scheduler)
    def step_finished(self, rows: int, duration_s: float) -> None:
        self.step_rows.observe(rows)
        self.step_duration.observe(duration_s)

    def full_row_fetched(self, reason: str) -> None:
        self.full_row_fetches.labels(reason).inc()

    def queue_changed(self, waiting: int, running: int) -> None:
        self.waiting.set(waiting)
        self.running.set(running)

    def breaker_changed(self, state: str) -> None:
        self.breaker_state.set({"closed": 0, "half_open": 1, "open": 2}.get(str(getattr(state, "value", state)), 2))

    def engine_text(self) -> bytes:
        """This process's scheduler series in the exposition format (what the engine core serves)."""
        return generate_latest(self.engine_registry)

    async def render(self) -> Response:
        if self.engine_exposition is None:
            engine = self.engine_text()
        else:
            try:
                engine = await self.engine_exposition()
            except Exception as err:  # a scrape must not fail because the core is away
                log.warning("engine core metrics unavailable: %s", err)
                engine = b""
        body = generate_latest(self.registry) + engine
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")


class MetricsMiddleware:
    """Counts requests by route TEMPLATE (bounded label values), never by raw path."""

    def __init__(self, app: Callable[..., Awaitable[None]], metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:  # type: ignore[type-arg]
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}

        async def send_wrapper(message: dict) -> None:  # type: ignore[type-arg]
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        started = time.perf_counter()
        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.in_flight.dec()
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(template, scope.get("method", ""), str(status["code"])).inc()
            self.metrics.request_duration.labels(template).observe(time.perf_counter() - started)
