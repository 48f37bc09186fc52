"""POST /v1/chat/completions. HTTP only: parsing and dependencies here, the work in serving.py."""

from __future__ import annotations

from fastapi import APIRouter

from frontend.api.deps import AuthDep, ServiceDep, SettingsDep, TimeoutHeaderDep
from frontend.api.openai.chat import protocol as chat
from frontend.api.openai.chat import serving
from frontend.api.responses import GENERATION_ERRORS, error_responses

router = APIRouter(prefix="/v1", tags=["openai"])


@router.post("/chat/completions", response_model=chat.ChatCompletion, responses=error_responses(*GENERATION_ERRORS))
async def create_chat_completion(
    body: chat.ChatCompletionRequest,
    _auth: AuthDep,
    service: ServiceDep,
    settings: SettingsDep,
    timeout: TimeoutHeaderDep,
) -> object:
    """Chat completions for a model with a chat template (the checkpoint's, or GATEWAY_CHAT_TEMPLATE);
    without one, 400 `chat_template_missing` says how to configure it. With `stream`, server-sent
    events ending with `data: [DONE]`."""
    return await serving.create_chat_completion(body, service, settings, timeout_s=timeout)
