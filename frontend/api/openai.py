"""OpenAI-compatible routes: POST /v1/completions and GET /v1/models."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter
from sse_starlette import ServerSentEvent

from frontend import errors
from frontend.api import openai_protocol as oai
from frontend.api.deps import AuthDep, ServiceDep, SettingsDep, TimeoutHeaderDep
from frontend.api.streaming import sse_json, sse_response
from frontend.generation.service import Completion, GenerationRequest, GenerationService, TextChunk

router = APIRouter(prefix="/v1", tags=["openai"])
log = logging.getLogger(__name__)


def _check_supported(body: oai.CompletionRequest, service: GenerationService, max_n: int) -> None:
    model = service.engine.model
    if body.model != model.name:
        raise errors.ModelNotFound(
            f"The model `{body.model}` does not exist. This server serves `{model.name}`.", param="model"
        )
    if body.n > max_n:
        raise errors.InvalidRequest(f"n must be at most {max_n}", param="n")
    if body.best_of not in (None, body.n):
        raise errors.InvalidRequest("best_of is not supported", param="best_of")
    if body.presence_penalty or body.frequency_penalty:
        raise errors.InvalidRequest(
            "presence_penalty and frequency_penalty are not supported; use repetition_penalty",
            param="presence_penalty" if body.presence_penalty else "frequency_penalty",
        )
    if body.logit_bias:
        raise errors.InvalidRequest("logit_bias is not supported", param="logit_bias")
    if body.suffix:
        raise errors.InvalidRequest("suffix is not supported", param="suffix")
    if body.echo and body.logprobs is not None:
        raise errors.InvalidRequest(
            "echo with logprobs is not supported (prompt logprobs are not computed)", param="echo"
        )


def _prompts(body: oai.CompletionRequest) -> list[str | list[int]]:
    p = body.prompt
    if isinstance(p, str):
        return [p]
    if not p:
        raise errors.InvalidRequest("prompt must not be empty", param="prompt")
    if all(isinstance(x, int) for x in p):
        return [list(p)]  # type: ignore[arg-type]
    return list(p)  # type: ignore[arg-type]


def _plan(
    body: oai.CompletionRequest, service: GenerationService, timeout_s: float | None = None
) -> list[tuple[int, str, GenerationRequest]]:
    """(choice index, echoed prompt text, request) for every prompt x n."""
    prompts = _prompts(body)
    limit = service.settings.max_batch_requests
    if len(prompts) * body.n > limit:
        raise errors.InvalidRequest(
            f"{len(prompts)} prompts x n={body.n} asks for more than {limit} completions in one request", param="prompt"
        )
    plan = []
    temperature = 1.0 if body.temperature is None else body.temperature
    top_p = 1.0 if body.top_p is None else body.top_p
    for p_index, prompt in enumerate(prompts):
        param = "prompt" if isinstance(body.prompt, str) else f"prompt[{p_index}]"
        ids = service.tokenize(prompt, param=param)
        echo = (
            (prompt if isinstance(prompt, str) else service.engine.model.tokenizer.decode(list(ids)))
            if body.echo
            else ""
        )
        for j in range(body.n):
            req = service.request(
                ids,
                max_new_tokens=body.max_tokens or 16,
                temperature=temperature,
                top_p=top_p,
                top_k=body.top_k,
                min_p=body.min_p,
                repetition_penalty=body.repetition_penalty,
                stop=body.stop_list(),
                seed=None if body.seed is None else body.seed + j,
                logprobs=body.logprobs or 0,
                prompt_param=param,
                max_tokens_param="max_tokens",
                timeout_s=timeout_s,
            )
            plan.append((p_index * body.n + j, echo, req))
    return plan


def _logprobs(service: GenerationService, chunks: list[TextChunk], offset: int) -> tuple[oai.LogProbs, int]:
    """OpenAI's logprobs for `chunks`, the first token at text offset `offset`; returns the offset
    after the last token. Offsets advance by each token's own text (not by the text released with
    it, which a pending stop string can delay)."""
    decode = service.engine.model.tokenizer.decode
    tokens, token_lps, tops, offsets = [], [], [], []
    for ch in chunks:
        if ch.token_id is None:
            continue
        token = decode([ch.token_id])
        tokens.append(token)
        token_lps.append(ch.logprob)
        tops.append({decode([t]): lp for t, lp in ch.top_logprobs} if ch.top_logprobs else None)
        offsets.append(offset)
        offset += len(token)
    return oai.LogProbs(tokens=tokens, token_logprobs=token_lps, top_logprobs=tops, text_offset=offsets), offset


@router.get("/models", response_model=oai.ModelList)
async def list_models(_auth: AuthDep, service: ServiceDep) -> oai.ModelList:
    model = service.engine.model
    return oai.ModelList(data=[oai.Model(id=model.name, created=model.created)])


@router.post("/completions", response_model=oai.Completion)
async def create_completion(
    body: oai.CompletionRequest, _auth: AuthDep, service: ServiceDep, settings: SettingsDep, timeout: TimeoutHeaderDep
) -> object:
    _check_supported(body, service, settings.max_n)
    plan = _plan(body, service, timeout_s=body.timeout or timeout)
    completion_id = f"cmpl-{secrets.token_hex(12)}"
    created = int(time.time())
    model = service.engine.model.name
    if body.stream:
        return await _stream(body, service, plan, completion_id, created, model)
    try:
        # A TaskGroup cancels the sibling choices as soon as one fails: nothing outlives the request.
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(service.complete(req)) for _, _, req in plan]
    except* errors.APIError as failed:
        raise failed.exceptions[0] from None
    results = [t.result() for t in tasks]
    choices = []
    prompt_tokens = completion_tokens = 0
    seen_prompts: set[int] = set()
    for (index, echo, req), result in zip(plan, results, strict=True):
        logprobs = _logprobs(service, result.chunks, len(echo))[0] if body.logprobs is not None else None
        choices.append(
            oai.Choice(text=echo + result.text, index=index, logprobs=logprobs, finish_reason=result.finish_reason)
        )  # type: ignore[arg-type]
        if index // body.n not in seen_prompts:  # a prompt shared by n choices counts once
            seen_prompts.add(index // body.n)
            prompt_tokens += len(req.prompt_ids)
        completion_tokens += result.completion_tokens
    usage = oai.Usage(
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens
    )
    return oai.Completion(id=completion_id, created=created, model=model, choices=choices, usage=usage)


async def _stream(
    body: oai.CompletionRequest,
    service: GenerationService,
    plan: list[tuple[int, str, GenerationRequest]],
    completion_id: str,
    created: int,
    model: str,
) -> object:
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    queue: asyncio.Queue[tuple[int, str, TextChunk | Completion | errors.APIError]] = asyncio.Queue()

    async def run(index: int, echo: str, req: GenerationRequest) -> None:
        try:
            async for item in service.stream(req):
                queue.put_nowait((index, echo, item))
        except errors.APIError as err:
            queue.put_nowait((index, echo, err))
        except Exception:  # never leave the reader waiting on a choice that died
            log.exception("streamed choice %d failed", index)
            queue.put_nowait((index, echo, errors.APIError("internal error during generation")))

    # Fail before the first byte when nothing can start (e.g. overloaded): a plain JSON error.
    tasks = [asyncio.create_task(run(i, e, r)) for i, e, r in plan]
    first = await queue.get()
    if isinstance(first[2], errors.APIError):
        for t in tasks:
            t.cancel()
        return errors.render(first[2])

    def chunk(choices: list[oai.Choice], usage: oai.Usage | None = None) -> ServerSentEvent:
        body_ = oai.Completion(id=completion_id, created=created, model=model, choices=choices, usage=usage)
        data = body_.model_dump(exclude_none=not include_usage)
        if include_usage and usage is None:
            data["usage"] = None
        return ServerSentEvent(sse_json(data))

    async def events() -> AsyncIterator[ServerSentEvent]:
        pending = len(plan)
        echoed: set[int] = set()
        offsets = {index: len(echo) for index, echo, _ in plan}
        prompt_tokens = completion_tokens = 0
        item: tuple[int, str, TextChunk | Completion | errors.APIError] | None = first
        try:
            while pending:
                index, echo, payload = item if item is not None else await queue.get()
                item = None
                if isinstance(payload, errors.APIError):
                    raise payload
                prefix = ""
                if echo and index not in echoed:
                    echoed.add(index)
                    prefix = echo
                if isinstance(payload, TextChunk):
                    logprobs = None
                    if body.logprobs is not None:
                        logprobs, offsets[index] = _logprobs(service, [payload], offsets[index])
                    yield chunk([oai.Choice(text=prefix + payload.text, index=index, logprobs=logprobs)])
                else:
                    pending -= 1
                    if index % body.n == 0:
                        prompt_tokens += payload.prompt_tokens
                    completion_tokens += payload.completion_tokens
                    yield chunk([oai.Choice(text=prefix, index=index, finish_reason=payload.finish_reason)])  # type: ignore[arg-type]
            if include_usage:
                total = prompt_tokens + completion_tokens
                yield chunk(
                    [], oai.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=total)
                )
            yield ServerSentEvent("[DONE]")
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t

    def on_error(err: errors.APIError) -> list[ServerSentEvent]:
        # The error as the last data event, then `[DONE]`: clients that wait for it stop cleanly
        # (e.g. a generation ended by the drain on SIGTERM or by its deadline).
        return [ServerSentEvent(sse_json(err.body())), ServerSentEvent("[DONE]")]

    return sse_response(events(), on_error, send_timeout_s=service.settings.sse_send_timeout_s)
