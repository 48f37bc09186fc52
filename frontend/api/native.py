"""The native routes: the seed article's API, done right."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi import APIRouter
from sse_starlette import EventSourceResponse, ServerSentEvent

from frontend import errors
from frontend.api.deps import AuthDep, ServiceDep, SettingsDep, TimeoutHeaderDep
from frontend.api.fanin import merge_streams
from frontend.api.native_protocol import (
    BatchItem,
    BatchRequest,
    BatchResponse,
    GenerateRequest,
    GenerateResponse,
    PromptTokenLogprob,
    Timings,
    TokenLogprob,
    Usage,
)
from frontend.api.responses import GENERATION_ERRORS, error_responses
from frontend.api.streaming import sse_frame, sse_json, sse_response
from frontend.generation.params import FieldNames
from frontend.generation.service import GenerationService
from frontend.generation.types import Completion, GenerationRequest, MergedChunk, PromptLogprobs, StreamItem, TextChunk

router = APIRouter(tags=["native"])


def _prepare(
    service: GenerationService, body: GenerateRequest, prefix: str = "", timeout_s: float | None = None
) -> GenerationRequest:
    names = FieldNames().under(prefix)
    ids = service.tokenize(body.prompt, param=names.prompt)
    return service.prepare(ids, body.to_generation_params(timeout_s=timeout_s), names)


def _only_on_generate(body: GenerateRequest, prefix: str = "") -> None:
    if body.prompt_logprobs is not None:
        raise errors.InvalidRequest("prompt_logprobs is returned by /generate only", param=f"{prefix}prompt_logprobs")


def _response(service: GenerationService, c: Completion, prompt_ids: tuple[int, ...] = ()) -> GenerateResponse:
    prompt_logprobs = None
    if c.prompt_logprobs is not None and c.prompt_top_logprobs is not None:
        decode = service.tokenizer.decode
        prompt_logprobs = [
            PromptTokenLogprob(
                token_id=t,
                text=decode([t]),
                logprob=lp,
                top_logprobs=[TokenLogprob(token_id=i, logprob=v) for i, v in top],
            )
            for t, lp, top in zip(prompt_ids, c.prompt_logprobs, c.prompt_top_logprobs, strict=True)
        ]
    extra = {} if prompt_logprobs is None else {"prompt_logprobs": prompt_logprobs}  # only when asked
    return GenerateResponse(
        **extra,  # type: ignore[arg-type]
        generated_text=c.text,
        model=service.model_name,
        finish_reason=c.finish_reason,
        completion_tokens=c.completion_tokens,
        usage=Usage(**c.usage),
        cached=c.cached,
        timings=Timings(time_to_first_token_s=c.time_to_first_token_s, total_s=c.total_s),
    )


@router.post(
    "/generate",
    response_model=GenerateResponse,
    response_model_exclude_unset=True,  # `prompt_logprobs` appears only when asked for
    responses=error_responses(*GENERATION_ERRORS),
)
async def generate(
    body: GenerateRequest, _auth: AuthDep, service: ServiceDep, timeout: TimeoutHeaderDep
) -> GenerateResponse:
    prepared = _prepare(service, body, timeout_s=timeout)
    completion = await service.complete(prepared)
    return _response(service, completion, prepared.prompt_ids)


@router.post("/generate/stream", response_class=EventSourceResponse, responses=error_responses(*GENERATION_ERRORS))
async def generate_stream(
    body: GenerateRequest, _auth: AuthDep, service: ServiceDep, timeout: TimeoutHeaderDep
) -> EventSourceResponse:
    """SSE: `token` events {text, position, token_id}, then `done` {finish_reason, usage, cached}.
    A client that reads slower than tokens come gets several in one `token` event: its `text` is
    theirs, `position`/`token_id` the first's, and `token_ids` lists them all."""
    _only_on_generate(body)
    # Raises here, before any byte, when the generation cannot start: a plain JSON error.
    merged = await merge_streams([service.stream(_prepare(service, body, timeout_s=timeout))])

    async def events() -> AsyncIterator[bytes]:
        async with aclosing(merged):  # type: ignore[type-var]  # an async generator: closing cancels it
            async for _, item in merged:
                yield _stream_event(item)

    return sse_response(
        events(),
        lambda err: ServerSentEvent(sse_json(err.body()), event="error"),
        send_timeout_s=service.settings.sse_send_timeout_s,
    )


def _stream_event(item: StreamItem) -> bytes:
    assert not isinstance(item, PromptLogprobs)  # refused on this route (_only_on_generate)
    if isinstance(item, TextChunk):
        data: dict[str, object] = {"text": item.text, "position": item.position, "token_id": item.token_id}
        return sse_frame(sse_json(data), "token")
    if isinstance(item, MergedChunk):
        # Several tokens (the client or the process fell behind): `position`/`token_id` name the
        # first, `token_ids` lists them all (positions position, position + 1, ...).
        ids = [c.token_id for c in item.chunks if c.token_id is not None]
        first = next((c for c in item.chunks if c.token_id is not None), item.chunks[0])
        data = {"text": item.text, "position": first.position, "token_id": first.token_id}
        if len(ids) > 1:
            data["token_ids"] = ids
        return sse_frame(sse_json(data), "token")
    done = {
        "finish_reason": item.finish_reason,
        "usage": item.usage,
        "cached": item.cached,
        "generated_text": item.text,
    }
    return sse_frame(sse_json(done), "done")


@router.post("/generate/batch", response_model=BatchResponse, responses=error_responses(*GENERATION_ERRORS))
async def generate_batch(
    body: BatchRequest, _auth: AuthDep, service: ServiceDep, settings: SettingsDep, timeout: TimeoutHeaderDep
) -> BatchResponse:
    """Every item with its own parameters; results in request order; all items join one batch."""
    if len(body.requests) > settings.max_batch_requests:
        raise errors.InvalidRequest(f"a batch holds at most {settings.max_batch_requests} requests", param="requests")
    for i, item in enumerate(body.requests):
        _only_on_generate(item, f"requests[{i}].")
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
