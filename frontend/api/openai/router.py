"""OpenAI-compatible HTTP routes: POST /v1/completions, GET /v1/models, GET /v1/models/{id}.
HTTP only: parsing and dependencies here, the work in serving.py."""

from __future__ import annotations

from fastapi import APIRouter

from frontend.api.deps import AuthDep, ServiceDep, SettingsDep, TimeoutHeaderDep
from frontend.api.openai import protocol as oai
from frontend.api.openai import serving
from frontend.api.responses import GENERATION_ERRORS, error_responses

router = APIRouter(prefix="/v1", tags=["openai"])


@router.get("/models", response_model=oai.ModelList, responses=error_responses(401, 403, 503))
async def list_models(_auth: AuthDep, service: ServiceDep) -> oai.ModelList:
    return serving.list_models(service)


@router.get("/models/{model_id:path}", response_model=oai.Model, responses=error_responses(401, 403, 404, 503))
async def get_model(model_id: str, _auth: AuthDep, service: ServiceDep) -> oai.Model:
    """The served model; 404 (`model_not_found`) for any other id."""
    return serving.get_model(service, model_id)


@router.post("/completions", response_model=oai.Completion, responses=error_responses(*GENERATION_ERRORS))
async def create_completion(
    body: oai.CompletionRequest, _auth: AuthDep, service: ServiceDep, settings: SettingsDep, timeout: TimeoutHeaderDep
) -> object:
    """OpenAI legacy completions; with `stream`, server-sent events ending with `data: [DONE]`."""
    return await serving.create_completion(body, service, settings, timeout_s=timeout)
