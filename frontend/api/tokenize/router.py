"""POST /tokenize and POST /detokenize (vLLM's routes). HTTP only; the tokenizer is the service's."""

from __future__ import annotations

from fastapi import APIRouter

from frontend import errors
from frontend.api.deps import AuthDep, ServiceDep
from frontend.api.responses import error_responses
from frontend.api.tokenize.protocol import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse

router = APIRouter(tags=["tokenization"])


@router.post("/tokenize", response_model=TokenizeResponse, responses=error_responses(401, 403, 404, 503))
async def tokenize(body: TokenizeRequest, _auth: AuthDep, service: ServiceDep) -> TokenizeResponse:
    """A `prompt`, or `messages` rendered by the chat template (as /v1/chat/completions would)."""
    service.check_model(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise errors.InvalidRequest("send either `prompt` or `messages`", param="prompt")
    if body.messages is not None:
        text = service.chat_prompt(
            [m.for_template() for m in body.messages], add_generation_prompt=body.add_generation_prompt
        )
        ids = service.tokenize(text, param="messages", add_special_tokens=bool(body.add_special_tokens))
    elif body.prompt:
        add_special_tokens = True if body.add_special_tokens is None else body.add_special_tokens
        ids = service.tokenize(body.prompt, param="prompt", add_special_tokens=add_special_tokens)
    else:
        ids = ()  # an empty prompt has no tokens (generation refuses it; counting it is fine)
    token_strs = service.tokenizer.convert_ids_to_tokens(list(ids)) if body.return_token_strs else None
    return TokenizeResponse(
        count=len(ids), max_model_len=service.model.max_context, tokens=list(ids), token_strs=token_strs
    )


@router.post("/detokenize", response_model=DetokenizeResponse, responses=error_responses(401, 403, 404, 503))
async def detokenize(body: DetokenizeRequest, _auth: AuthDep, service: ServiceDep) -> DetokenizeResponse:
    service.check_model(body.model)
    return DetokenizeResponse(prompt=service.detokenize(body.tokens))
