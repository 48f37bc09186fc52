"""The OpenAI-compatible API, one package per endpoint as vLLM's: `router.py` (HTTP only),
`serving.py` (the work), `protocol.py` (pydantic models); legacy completions and models here,
chat completions in `chat/`. `router` holds them all (what the app includes)."""

from fastapi import APIRouter

from frontend.api.openai.chat.router import router as chat_router
from frontend.api.openai.router import router as completions_router

router = APIRouter()
router.include_router(completions_router)
router.include_router(chat_router)

__all__ = ["router"]
