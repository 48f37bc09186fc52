"""The app factory. Settings, engine, cache and metrics are built here and in the lifespan,
never at import time, and reach routes through typed dependencies (frontend.api.deps)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from frontend.api import health, native, openai
from frontend.api.client_hygiene import BodyLimitMiddleware, CancelOnDisconnectMiddleware
from frontend.api.openapi import install_openapi
from frontend.cache import ResultCache, build_result_cache
from frontend.engine.protocol import Engine
from frontend.engine.remote import ModelLoader, RemoteEngine
from frontend.engine.triton_engine import TritonEngine
from frontend.errors import install_error_handlers
from frontend.generation.service import GenerationService
from frontend.lifecycle import Lifecycle
from frontend.metrics import GatewayMetrics, MetricsMiddleware
from frontend.security.gateway import Security, guard_operations
from frontend.settings import Settings

log = logging.getLogger(__name__)

EngineFactory = Callable[[Settings, GatewayMetrics], Engine]


def triton_engine(settings: Settings, metrics: GatewayMetrics) -> Engine:
    return TritonEngine(
        triton_url=settings.triton_url,
        model=settings.model,
        version=settings.model_version,
        repository=settings.repository,
        step_timeout_s=settings.step_timeout_s,
        default_window=settings.default_window,
        max_running=settings.max_running,
        max_waiting=settings.max_waiting,
        queue_timeout_s=settings.queue_timeout_s,
        startup_timeout_s=settings.startup_timeout_s,
        observer=metrics,
        probe_timeout_s=settings.probe_timeout_s,
        reconnect_backoff_ms=settings.reconnect_backoff_ms,
        connect_retries=settings.connect_retries,
        breaker_failures=settings.breaker_failures,
        breaker_reset_s=settings.breaker_reset_s,
    )


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
    if not logging.getLogger().handlers:  # worker processes of `--workers N` start bare
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    metrics = GatewayMetrics()
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

    app = FastAPI(
        title="GPT-2 serving gateway",
        version="0.1.0",
        description="Exact custom sampling over NVIDIA Triton; OpenAI-compatible and native routes.",
        lifespan=security.lifespan(lifespan),  # closes the key store and limit storage at shutdown
        **security.fastapi_kwargs(),
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.security = security
    install_error_handlers(app)
    app.include_router(openai.router)
    app.include_router(native.router)
    app.include_router(health.router, dependencies=[Depends(guard_operations)])
    security.install_docs(app)
    install_openapi(app, settings)  # 400 (not 422) and the settings' limits in the schema
    # Client hygiene (docs/security.md): cancel work whose client left; refuse oversized or slow bodies.
    app.add_middleware(CancelOnDisconnectMiddleware)  # type: ignore[arg-type]
    app.add_middleware(
        BodyLimitMiddleware,  # type: ignore[arg-type]
        max_body_bytes=settings.body_limit,
        body_timeout_s=settings.body_timeout_s,
    )
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # type: ignore[arg-type]
    return app
