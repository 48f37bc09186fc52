"""Liveness, readiness, vLLM's /health, the version, and metrics."""

from __future__ import annotations

import asyncio
import contextlib

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from frontend.errors import ErrorResponse, error_body

router = APIRouter(tags=["operations"])
# HEAD beside GET on every probe (load balancers and uptime checkers send it); out of the schema,
# where it would repeat the GET's operation.
head = router.head


@head("/health/live", include_in_schema=False)
@router.get("/health/live")
async def live() -> dict[str, str]:
    """The process is up and its event loop answers: 200 also while Triton is down or loading."""
    return {"status": "ok"}


@head("/health/ready", include_in_schema=False)
@router.get("/health/ready")
async def ready(request: Request) -> Response:
    """Ready only when the engine has started, the gateway is not draining, the circuit breaker is
    closed, and Triton reports the model ready within the probe deadline (a frozen Triton: 503
    in under a second)."""
    return await _readiness(request)


@head("/health", include_in_schema=False)
@router.get(
    "/health",
    response_class=Response,
    responses={
        200: {"content": {}, "description": "ready: an empty body"},
        503: {"model": ErrorResponse, "description": "not ready (see /health/ready)"},
    },
)
async def health(request: Request) -> Response:
    """vLLM's health check, which benchmark tools probe: 200 with an empty body when ready (the
    same test as /health/ready), else /health/ready's 503."""
    answer = await _readiness(request)
    return Response(status_code=200) if answer.status_code == 200 else answer


class Version(BaseModel):
    version: str


@head("/version", include_in_schema=False)
@router.get("/version", response_model=Version)
async def version(request: Request) -> Version:
    """The gateway's version, as vLLM's /version."""
    return Version(version=request.app.version)


async def _readiness(request: Request) -> JSONResponse:
    state = request.app.state
    lifecycle = getattr(state, "lifecycle", None)
    settings = state.settings
    if lifecycle is not None and lifecycle.state != "serving":
        return _not_ready(f"the gateway is {lifecycle.state}", lifecycle.state)
    engine = state.service.engine
    breaker = getattr(engine, "breaker", None)
    breaker_state = str(breaker.state.value) if breaker is not None else None
    if breaker is not None and not breaker.closed:
        return _not_ready(f"the circuit breaker around Triton is {breaker_state}", "breaker_open")
    ok = False
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(settings.probe_timeout_s + 0.25):  # a hung call cannot hold readiness
            ok = await engine.ready()
    if not ok:
        return _not_ready("the model server is not ready", "not_ready")
    model = state.service.model
    running, waiting = engine.load()
    body = {"status": "ready", "model": model.name, "version": model.version, "running": running, "waiting": waiting}
    if breaker_state is not None:
        body["breaker"] = breaker_state
    instances = getattr(engine, "instances_status", None)  # several model instances (placement)
    if callable(instances):
        body["instances"] = instances()
    return JSONResponse(body)


def _not_ready(message: str, code: str) -> JSONResponse:
    return JSONResponse(error_body(message, "upstream_unavailable", code=code), status_code=503)


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    """This process's series, plus the scheduler's (from the engine core with `--workers N`)."""
    return await request.app.state.metrics.render()  # type: ignore[no-any-return]
