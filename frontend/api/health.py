"""Liveness, readiness and metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from frontend.api.deps import ServiceDep
from frontend.errors import error_body

router = APIRouter(tags=["operations"])


@router.get("/health/live")
async def live() -> dict[str, str]:
    """The process is up and its event loop answers."""
    return {"status": "ok"}


@router.get("/health/ready")
async def ready(service: ServiceDep) -> Response:
    """Ready only when Triton reports the model ready and a real step has succeeded."""
    if await service.engine.ready():
        model = service.engine.model
        running, waiting = service.engine.load()
        return JSONResponse(
            {"status": "ready", "model": model.name, "version": model.version, "running": running, "waiting": waiting}
        )
    body = error_body("the model server is not ready", "upstream_unavailable", code="not_ready")
    return JSONResponse(body, status_code=503)


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    """This process's series, plus the scheduler's (from the engine core with `--workers N`)."""
    return await request.app.state.metrics.render()  # type: ignore[no-any-return]
