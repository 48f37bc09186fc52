"""Typed dependencies: route signatures read like prose (`service: ServiceDep`).

All `async def`: FastAPI runs a plain `def` dependency in its thread pool, a thread hop per
dependency per request (most of a refused request's cost before this was noticed)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request

from frontend.generation.service import GenerationService
from frontend.security.gateway import Principal, require_generate
from frontend.settings import Settings


async def get_service(request: Request) -> GenerationService:
    """The service, once the engine has started and while not draining (else 503, Retry-After)."""
    lifecycle = getattr(request.app.state, "lifecycle", None)
    if lifecycle is not None:
        lifecycle.check()
    return request.app.state.service  # type: ignore[no-any-return]


async def request_timeout(
    x_request_timeout: Annotated[
        float | None,
        Header(gt=0, description="seconds this generation may take (capped by the server's maximum)"),
    ] = None,
) -> float | None:
    return x_request_timeout


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


ServiceDep = Annotated[GenerationService, Depends(get_service)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
TimeoutHeaderDep = Annotated[float | None, Depends(request_timeout)]
# The caller, admitted (API key + rate limits, frontend.security): on every generation route.
AuthDep = Annotated[Principal, Depends(require_generate)]
