"""Chat completions: the conversation becomes one prompt through the chat template
(frontend.chat), then runs exactly as a completion with `n` choices."""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from sse_starlette import EventSourceResponse

from frontend.api.fanin import collect, merge_streams
from frontend.api.openai.chat import protocol as chat
from frontend.api.openai.serving import ChunkFrames, check_request, chunk_events, openai_sse, usage
from frontend.generation.params import FieldNames
from frontend.generation.service import GenerationService
from frontend.generation.types import Completion, GenerationRequest, MergedChunk, StreamItem, TextChunk, token_chunks
from frontend.settings import Settings

# What OpenAI reports for a token the model gives no probability (JSON has no -Infinity).
_IMPROBABLE = -9999.0


def plan_chat(
    body: chat.ChatCompletionRequest, service: GenerationService, timeout_s: float | None = None
) -> list[GenerationRequest]:
    """One request per choice; choice j samples with seed + j."""
    prompt = service.chat_prompt(
        [m.for_template() for m in body.messages], add_generation_prompt=body.add_generation_prompt
    )
    # The template writes every special token itself (vLLM's default for chat).
    ids = service.tokenize(prompt, param="messages", add_special_tokens=False)
    params = body.to_generation_params(timeout_s=timeout_s)
    names = FieldNames(prompt="messages", max_new_tokens=body.max_tokens_field)
    return [service.prepare(ids, params.for_choice(j), names) for j in range(body.n)]


def _logprob(value: float | None) -> float:
    return value if value is not None and math.isfinite(value) else _IMPROBABLE


def chat_logprobs(service: GenerationService, chunks: Sequence[TextChunk]) -> chat.ChoiceLogprobs:
    decode = service.tokenizer.decode

    def entry(token_id: int, logprob: float | None) -> chat.TopLogprob:
        token = decode([token_id])
        return chat.TopLogprob(token=token, logprob=_logprob(logprob), bytes=list(token.encode()))

    content = []
    for ch in chunks:
        if ch.token_id is None:
            continue
        top = [entry(t, lp) for t, lp in ch.top_logprobs]
        content.append(chat.TokenLogprob(**entry(ch.token_id, ch.logprob).model_dump(), top_logprobs=top))
    return chat.ChoiceLogprobs(content=content)


async def create_chat_completion(
    body: chat.ChatCompletionRequest, service: GenerationService, settings: Settings, *, timeout_s: float | None
) -> chat.ChatCompletion | EventSourceResponse:
    check_request(body, service, settings)
    plan = plan_chat(body, service, timeout_s)
    completion_id = f"chatcmpl-{secrets.token_hex(12)}"
    created = int(time.time())
    streams = [service.stream(req) for req in plan]
    if body.stream:
        # Raises here, before any byte, when no choice could start: a plain JSON error.
        merged = await merge_streams(streams)
        return openai_sse(_chat_events(body, service, len(plan), merged, completion_id, created), service)
    items = await collect(streams)
    choices = []
    completion_tokens = 0
    for index in range(len(plan)):
        result = items[index][-1]
        assert isinstance(result, Completion)
        completion_tokens += result.completion_tokens
        choices.append(
            chat.ChatChoice(
                index=index,
                message=chat.AssistantMessage(content=result.text),
                logprobs=chat_logprobs(service, result.chunks) if body.logprobs else None,
                finish_reason=result.finish_reason,  # type: ignore[arg-type]
            )
        )
    return chat.ChatCompletion(
        id=completion_id,
        created=created,
        model=service.model_name,
        choices=choices,
        usage=usage(len(plan[0].prompt_ids), completion_tokens),
    )


def _chat_events(
    body: chat.ChatCompletionRequest,
    service: GenerationService,
    n: int,
    merged: AsyncIterator[tuple[int, StreamItem]],
    completion_id: str,
    created: int,
) -> AsyncIterator[bytes]:
    model = service.model_name

    def envelope(choices: list[chat.ChatChunkChoice], usage_: chat.Usage | None) -> dict[str, Any]:
        # Every null left out, include_usage or not (its `"usage": null` is ChunkFrames' own).
        body_ = chat.ChatCompletionChunk(id=completion_id, created=created, model=model, choices=choices, usage=usage_)
        return body_.model_dump(exclude_none=True)

    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    frames = ChunkFrames(
        envelope,
        include_usage=include_usage,
        text_choice=lambda index, text: chat.ChatChunkChoice(index=index, delta=chat.Delta(content=text)),
    )

    def choices(index: int, item: StreamItem) -> list[chat.ChatChunkChoice | bytes]:
        if isinstance(item, Completion):
            finish = item.finish_reason
            return [chat.ChatChunkChoice(index=index, delta=chat.Delta(), finish_reason=finish)]  # type: ignore[arg-type]
        if not isinstance(item, TextChunk | MergedChunk):
            return []  # a chat never asks the prompt's logprobs
        # A merged chunk (the reader or the process fell behind): its tokens' entries in order in `content`.
        if not body.logprobs or not item.token_count:
            return [frames.text(index, item.text)] if item.text else []
        logprobs = chat_logprobs(service, token_chunks(item))
        return [chat.ChatChunkChoice(index=index, delta=chat.Delta(content=item.text), logprobs=logprobs)]

    # Every choice opens with the assistant's role (OpenAI's first chunk), once one has started.
    opening = [chat.ChatChunkChoice(index=index, delta=chat.Delta(role="assistant", content="")) for index in range(n)]
    return chunk_events(merged, n=n, streams=n, frames=frames, choices=choices, opening=opening)
