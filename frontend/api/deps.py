"""Typed dependencies: route signatures read like prose (`service: ServiceDep`)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from frontend.generation.service import GenerationService
from frontend.settings import Settings


def get_service(request: Request) -> GenerationService:
    return request.app.state.service  # type: ignore[no-any-return]


def get_settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


ServiceDep = Annotated[GenerationService, Depends(get_service)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
