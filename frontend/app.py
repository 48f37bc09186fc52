"""The app factory. Settings, engine, cache and metrics are built here and in the lifespan,
never at import time, and reach routes through typed dependencies (frontend.api.deps)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from frontend.api import health, native, openai
from frontend.api.admission import AdmissionGateMiddleware
from frontend.api.client_hygiene import BodyLimitMiddleware, CancelOnDisconnectMiddleware
from frontend.api.docs import install_local_docs
from frontend.api.openapi import install_openapi
from frontend.api.tokenize.router import router as tokenize_router
from frontend.cache import ResultCache, build_result_cache
from frontend.engine.placement import engine_from_settings
from frontend.engine.protocol import Engine
from frontend.engine.remote import ModelLoader, RemoteEngine
from frontend.errors import install_error_handlers
from frontend.generation.service import GenerationService
from frontend.lifecycle import Lifecycle
from frontend.observability import (
    GatewayMetrics,
    MetricsMiddleware,
    RequestContextMiddleware,
    configure_logging,
    install_tracing,
)
from frontend.security.gateway import (
    RateLimitHeadersMiddleware,
    Security,
    guard_operations,
)
from frontend.settings import Settings

log = logging.getLogger(__name__)

EngineFactory = Callable[[Settings, GatewayMetrics], Engine]


def triton_engine(settings: Settings, metrics: GatewayMetrics) -> Engine:
    """A `TritonEngine`, or a `PlacementEngine` over GATEWAY_MODEL_INSTANCES of them; binds the
    metrics to the model's KV slots (vllm:kv_cache_usage_perc = running / slots, README "Metrics")."""
    return engine_from_settings(settings, metrics)


def remote_engine(settings: Settings, metrics: GatewayMetrics, *, model_loader: ModelLoader | None = None) -> Engine:
    """The engine of an HTTP worker when the scheduler runs in the engine core (`--workers N`).
    The scheduler's metrics then come from the core: `/metrics` appends its exposition."""
    assert settings.engine_core_url, "remote_engine needs GATEWAY_ENGINE_CORE_URL"
    engine = RemoteEngine(
        settings.engine_core_url,
        repository=settings.repository,
        model_loader=model_loader,
        heartbeat_s=settings.engine_core_heartbeat_s,
        timeout_s=settings.engine_core_timeout_s,
        startup_timeout_s=settings.startup_timeout_s,
    )
    metrics.engine_exposition = engine.engine_metrics
    return engine


def max_json_values(app: FastAPI, settings: Settings) -> int:
    """The most JSON values a request body may hold: the largest batch of prompts as token ids,
    each as long as the model's context (before the model is known: the longest prompt in
    characters), plus room for every other field."""
    service = getattr(app.state, "service", None)
    try:
        context = service.model.max_context if service is not None else settings.max_prompt_chars
    except Exception:  # the engine has not started: its model is not known yet
        context = settings.max_prompt_chars
    return settings.max_batch_requests * max(context, 1) + 16_384


def create_app(
    settings: Settings | None = None,
    *,
    engine_factory: EngineFactory | None = None,
    cache: ResultCache | None = None,
) -> FastAPI:
    settings = settings or Settings()
    if engine_factory is None:  # the engine core's address is set by `python -m frontend --workers N`
        engine_factory = remote_engine if settings.engine_core_url else triton_engine
    make_engine = engine_factory
    if settings.log_format == "json" or not logging.getLogger().handlers:  # `--workers N` workers start bare
        configure_logging(settings.log_format)
    metrics = GatewayMetrics(model_name=settings.model)
    security = Security.from_settings(settings)  # API keys and rate limits (docs/security.md)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = make_engine(settings, metrics)
        result_cache = cache or build_result_cache(
            settings.cache_url,
            max_entries=settings.cache_max_entries,
            ttl_s=settings.cache_ttl_s,
            max_bytes=settings.cache_max_bytes,
        )
        # The server listens at once; the engine starts in the background (frontend.lifecycle):
        # until it has, readiness and generation routes answer 503.
        lifecycle = app.state.lifecycle = Lifecycle(engine)
        app.state.service = GenerationService(engine, result_cache, metrics, settings=settings)
        lifecycle.begin()
        try:
            yield
        finally:
            await lifecycle.close()
            await result_cache.close()
            metrics.close()  # `--workers N`: this worker's live gauges leave the sums

    app = FastAPI(
        title="GPT-2 serving gateway",
        version="0.1.0",
        description="Exact custom sampling over NVIDIA Triton; OpenAI-compatible and native routes.",
        lifespan=security.lifespan(lifespan),  # closes the key store and limit storage at shutdown
        # /docs and /redoc with local assets (frontend.api.docs) unless security installs its own.
        **{"docs_url": None, "redoc_url": None, **security.fastapi_kwargs()},
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.security = security
    install_error_handlers(app)
    app.include_router(openai.router)
    app.include_router(native.router)
    app.include_router(tokenize_router)
    app.include_router(health.router, dependencies=[Depends(guard_operations)])
    security.install_docs(app)
    if not security.fastapi_kwargs():
        install_local_docs(app)
    install_openapi(app, settings)  # 400 (not 422) and the settings' limits in the schema
    # Client hygiene (docs/security.md): cancel work whose client left; refuse oversized or slow bodies.
    app.add_middleware(CancelOnDisconnectMiddleware)  # type: ignore[arg-type]
    app.add_middleware(
        BodyLimitMiddleware,  # type: ignore[arg-type]
        max_body_bytes=settings.body_limit,
        body_timeout_s=settings.body_timeout_s,
        max_json_values=lambda: max_json_values(app, settings),
    )
    # x-ratelimit-* headers on every admitted response, not only on 429s (docs/security.md).
    app.add_middleware(RateLimitHeadersMiddleware)  # type: ignore[arg-type]
    # Shed generation requests while the waiting queue is full, before any per-request work.
    # (MAX_WAITING is per model instance: the engine's waiting count is all of theirs.)
    max_waiting = settings.max_waiting * settings.model_instances
    app.add_middleware(AdmissionGateMiddleware, max_waiting=max_waiting)  # type: ignore[arg-type]
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # type: ignore[arg-type]
    # Outermost: the request id and its record exist for everything inside; one access-log line.
    app.add_middleware(RequestContextMiddleware, access_log_enabled=settings.access_log)  # type: ignore[arg-type]
    install_tracing(app, settings.otlp_endpoint, service_name=settings.otel_service_name)
    return app
