"""The native routes: the seed article's API, done right."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi import APIRouter
from sse_starlette import EventSourceResponse, ServerSentEvent

from frontend import errors
from frontend.api.deps import AuthDep, ServiceDep, SettingsDep, TimeoutHeaderDep
from frontend.api.native_protocol import (
    BatchItem,
    BatchRequest,
    BatchResponse,
    GenerateRequest,
    GenerateResponse,
    Timings,
    Usage,
)
from frontend.api.streaming import prime, sse_json, sse_response
from frontend.generation.service import Completion, GenerationRequest, GenerationService, TextChunk

router = APIRouter(tags=["native"])


def _prepare(
    service: GenerationService, body: GenerateRequest, prefix: str = "", timeout_s: float | None = None
) -> GenerationRequest:
    ids = service.tokenize(body.prompt, param=f"{prefix}prompt")
    return service.request(
        ids,
        max_new_tokens=body.max_new_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        min_p=body.min_p,
        repetition_penalty=body.repetition_penalty,
        stop=body.stop,
        seed=body.seed,
        prompt_param=f"{prefix}prompt",
        max_tokens_param=f"{prefix}max_new_tokens",
        stop_param=f"{prefix}stop",
        timeout_s=body.timeout or timeout_s,
    )


def _response(service: GenerationService, c: Completion) -> GenerateResponse:
    return GenerateResponse(
        generated_text=c.text,
        model=service.engine.model.name,
        finish_reason=c.finish_reason,
        completion_tokens=c.completion_tokens,
        usage=Usage(**c.usage),
        cached=c.cached,
        timings=Timings(time_to_first_token_s=c.time_to_first_token_s, total_s=c.total_s),
    )


@router.post("/generate", response_model=GenerateResponse)
async def generate(
    body: GenerateRequest, _auth: AuthDep, service: ServiceDep, timeout: TimeoutHeaderDep
) -> GenerateResponse:
    completion = await service.complete(_prepare(service, body, timeout_s=timeout))
    return _response(service, completion)


@router.post("/generate/stream", response_class=EventSourceResponse)
async def generate_stream(
    body: GenerateRequest, _auth: AuthDep, service: ServiceDep, timeout: TimeoutHeaderDep
) -> EventSourceResponse:
    """SSE: `token` events {text, position, token_id}, then `done` {finish_reason, usage, cached}."""
    stream = await prime(service.stream(_prepare(service, body, timeout_s=timeout)))

    async def events() -> AsyncIterator[ServerSentEvent]:
        async for item in stream:
            if isinstance(item, TextChunk):
                data: dict[str, object] = {"text": item.text, "position": item.position, "token_id": item.token_id}
                yield ServerSentEvent(sse_json(data), event="token")
            elif isinstance(item, Completion):
                data = {
                    "finish_reason": item.finish_reason,
                    "usage": item.usage,
                    "cached": item.cached,
                    "generated_text": item.text,
                }
                yield ServerSentEvent(sse_json(data), event="done")

    return sse_response(
        events(),
        lambda err: ServerSentEvent(sse_json(err.body()), event="error"),
        send_timeout_s=service.settings.sse_send_timeout_s,
    )


@router.post("/generate/batch", response_model=BatchResponse)
async def generate_batch(
    body: BatchRequest, _auth: AuthDep, service: ServiceDep, settings: SettingsDep, timeout: TimeoutHeaderDep
) -> BatchResponse:
    """Every item with its own parameters; results in request order; all items join one batch."""
    if len(body.requests) > settings.max_batch_requests:
        raise errors.InvalidRequest(f"a batch holds at most {settings.max_batch_requests} requests", param="requests")
    prepared = [
        _prepare(service, item, prefix=f"requests[{i}].", timeout_s=timeout) for i, item in enumerate(body.requests)
    ]
    outcomes = await asyncio.gather(*(service.complete(p) for p in prepared), return_exceptions=True)
    results: list[BatchItem] = []
    for outcome in outcomes:
        if isinstance(outcome, errors.APIError):
            results.append(BatchItem(error=outcome.body()["error"]))
        elif isinstance(outcome, BaseException):
            raise outcome
        else:
            results.append(
                BatchItem(
                    generated_text=outcome.text,
                    finish_reason=outcome.finish_reason,
                    completion_tokens=outcome.completion_tokens,
                    usage=Usage(**outcome.usage),
                    cached=outcome.cached,
                )
            )
    return BatchResponse(results=results, cache_hits=sum(r.cached for r in results))
