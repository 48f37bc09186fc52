"""Legacy completions (`/v1/completions`) and the model list: the work behind the HTTP routes.

Also what the chat serving shares with it: the request checks, and the SSE framing of OpenAI
streams (`chunk_events`; a failure mid-stream is the last data event, then `[DONE]`)."""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sse_starlette import EventSourceResponse, ServerSentEvent

from frontend import errors
from frontend.api.fanin import collect, merge_streams
from frontend.api.openai import protocol as oai
from frontend.api.streaming import TextFrame, sse_frame, sse_json, sse_response
from frontend.generation.params import FieldNames
from frontend.generation.service import GenerationService
from frontend.generation.types import (
    Completion,
    GenerationRequest,
    MergedChunk,
    PromptLogprobs,
    StreamItem,
    TextChunk,
    token_chunks,
)
from frontend.observability.requests import current_request
from frontend.settings import Settings


def check_request(body: oai.SamplingRequest, service: GenerationService, settings: Settings) -> None:
    """Checks every OpenAI generation request goes through before any work: the model, `n`, and the
    fields this server accepts but does not implement."""
    service.check_model(body.model)
    if body.n > settings.max_n:
        raise errors.InvalidRequest(f"n must be at most {settings.max_n}", param="n")
    body.check_supported()


def openai_sse(events: AsyncIterator[bytes], service: GenerationService) -> EventSourceResponse:
    def on_error(err: errors.APIError) -> list[ServerSentEvent | bytes]:
        # The error as the last data event, then `[DONE]`: clients that wait for it stop cleanly
        # (e.g. a generation ended by the drain on SIGTERM or by its deadline).
        return [ServerSentEvent(sse_json(err.body())), _DONE]

    return sse_response(events, on_error, send_timeout_s=service.settings.sse_send_timeout_s)


def usage(prompt_tokens: int, completion_tokens: int) -> oai.Usage:
    return oai.Usage(
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens
    )


C = TypeVar("C")  # the choice model of a stream's chunks


class ChunkFrames(Generic[C]):
    """How one OpenAI stream writes its chunks: `event(choices, usage)` builds a chunk's JSON object
    with `envelope(choices, usage)` (the nulls its endpoint leaves out), every choice carrying
    `logprobs` and `finish_reason`, null or not, as OpenAI's chunks do, and with `include_usage`
    (`stream_options`) `"usage": null` unless it is the usage chunk. `text(index, text)` is the
    same bytes as `event([text_choice(index, text)])` for the commonest chunk (a choice's text and
    nothing else), rendered once per choice index (`TextFrame`) and filled in per chunk: no model
    built, validated and dumped per token."""

    def __init__(
        self,
        envelope: Callable[[list[C], oai.Usage | None], dict[str, Any]],
        *,
        include_usage: bool,
        text_choice: Callable[[int, str], C],
    ) -> None:
        self._envelope = envelope
        self.include_usage = include_usage
        self._text_choice = text_choice
        self._text: dict[int, TextFrame] = {}

    def event(self, choices: list[C], usage_: oai.Usage | None = None) -> bytes:
        data = self._envelope(choices, usage_)
        data["choices"] = [_with_nulls(choice) for choice in data["choices"]]
        if self.include_usage and usage_ is None:
            data["usage"] = None
        return sse_frame(sse_json(data))

    def text(self, index: int, text: str) -> bytes:
        frame = self._text.get(index)
        if frame is None:
            frame = self._text[index] = TextFrame(lambda t: self.event([self._text_choice(index, t)]))
        return frame(text)


async def chunk_events(
    merged: AsyncIterator[tuple[int, StreamItem]],
    *,
    n: int,
    streams: int,
    frames: ChunkFrames[C],
    choices: Callable[[int, StreamItem], Iterable[C | bytes]],
    opening: Iterable[C] = (),
) -> AsyncIterator[bytes]:
    """The frame of every OpenAI stream (completions and chat): one chunk per choice object,
    `opening`'s first, then those `choices(index, item)` makes of each item of the merged choice
    streams (`streams` of them), in arrival order (a choice object, or its chunk already written
    by `frames.text`); with `frames.include_usage` a last chunk with no choices and the usage (each
    prompt counted once: the `n` choices of a prompt share it); then `[DONE]`. The chunks of the
    last choice's result, the usage and `[DONE]` are ready together and go out as one write (the
    same bytes). A failure raises out of here, for `openai_sse` to send as the last event;
    closing this cancels the choices still running."""
    prompt_tokens = completion_tokens = 0
    ended = 0
    tail: list[bytes] = []  # the last result's chunks, sent with the usage and [DONE]
    event = frames.event
    async with aclosing(merged):  # type: ignore[type-var]  # an async generator: closing cancels the choices
        for first in opening:
            yield event([first])
        async for index, item in merged:
            if isinstance(item, Completion):
                if index % n == 0:  # a prompt shared by n choices counts once
                    prompt_tokens += item.prompt_tokens
                completion_tokens += item.completion_tokens
                ended += 1
                if ended == streams:  # the last item of all: nothing comes between it and the end
                    tail = [c if isinstance(c, bytes) else event([c]) for c in choices(index, item)]
                    continue
            for choice in choices(index, item):
                yield choice if isinstance(choice, bytes) else event([choice])
    if frames.include_usage:
        tail.append(event([], usage(prompt_tokens, completion_tokens)))
    tail.append(_DONE)
    yield b"".join(tail)


_DONE = sse_frame("[DONE]")


def _with_nulls(choice: dict[str, Any]) -> dict[str, Any]:
    """A chunk's choice with `logprobs` and `finish_reason` last, null or not (OpenAI's order)."""
    rest = {k: v for k, v in choice.items() if k not in ("logprobs", "finish_reason")}
    return {**rest, "logprobs": choice.get("logprobs"), "finish_reason": choice.get("finish_reason")}


# ------------------------------------------------------------------------------------ models
def list_models(service: GenerationService) -> oai.ModelList:
    model = service.model
    return oai.ModelList(data=[oai.Model(id=model.name, created=model.created)])


def get_model(service: GenerationService, model_id: str) -> oai.Model:
    service.check_model(model_id, param="model")
    return oai.Model(id=service.model.name, created=service.model.created)


# ------------------------------------------------------------------------------- completions
@dataclass(frozen=True)
class PlannedChoice:
    index: int  # prompt index * n + j
    echo: str  # the prompt text when `echo`, else ""
    request: GenerationRequest


def _prompts(body: oai.CompletionRequest) -> list[str | list[int]]:
    p = body.prompt
    if isinstance(p, str):
        return [p]
    if not p:
        raise errors.InvalidRequest("prompt must not be empty", param="prompt")
    if all(isinstance(x, int) for x in p):
        return [list(p)]  # type: ignore[arg-type]
    return list(p)  # type: ignore[arg-type]


def plan_completion(
    body: oai.CompletionRequest, service: GenerationService, timeout_s: float | None = None
) -> list[PlannedChoice]:
    """A choice for every prompt x n; choice j of a prompt samples with seed + j."""
    prompts = _prompts(body)
    limit = service.settings.max_batch_requests
    if len(prompts) * body.n > limit:
        raise errors.InvalidRequest(
            f"{len(prompts)} prompts x n={body.n} asks for more than {limit} completions in one request", param="prompt"
        )
    params = body.to_generation_params(timeout_s=timeout_s)
    plan = []
    for p_index, prompt in enumerate(prompts):
        param = "prompt" if isinstance(body.prompt, str) else f"prompt[{p_index}]"
        names = FieldNames(prompt=param, max_new_tokens="max_tokens")
        ids = service.tokenize(prompt, param=param)
        echo = (prompt if isinstance(prompt, str) else service.detokenize(ids, param=param)) if body.echo else ""
        for j in range(body.n):
            plan.append(PlannedChoice(p_index * body.n + j, echo, service.prepare(ids, params.for_choice(j), names)))
    return plan


def completion_logprobs(
    service: GenerationService, chunks: Sequence[TextChunk], offset: int
) -> tuple[oai.LogProbs, int]:
    """OpenAI's logprobs for `chunks`, the first token at text offset `offset`; returns the offset
    after the last token. Offsets advance by each token's own text (not by the text released with
    it, which a pending stop string can delay)."""
    decode = service.tokenizer.decode
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


def echo_logprobs(
    service: GenerationService, prompt_ids: Sequence[int], result: Completion | PromptLogprobs
) -> oai.LogProbs:
    """OpenAI's logprobs of the echoed prompt: its tokens from offset 0, the first without a
    logprob (nothing precedes it), the others with the logprob the model gives them after the
    tokens before (computed by the step model during the prefill) and their top alternatives."""
    decode = service.tokenizer.decode
    if isinstance(result, PromptLogprobs):
        values, top_logprobs = result.logprobs, result.top_logprobs
    else:
        assert result.prompt_logprobs is not None and result.prompt_top_logprobs is not None
        values, top_logprobs = result.prompt_logprobs, result.prompt_top_logprobs
    tokens = [decode([t]) for t in prompt_ids]
    offsets, at = [], 0
    for token in tokens:
        offsets.append(at)
        at += len(token)
    tops: list[dict[str, float] | None] = [
        {decode([t]): lp for t, lp in top} if i else None for i, top in enumerate(top_logprobs)
    ]
    return oai.LogProbs(tokens=tokens, token_logprobs=list(values), top_logprobs=tops, text_offset=offsets)


async def _prompt_alone(request: GenerationRequest) -> AsyncIterator[StreamItem]:
    """`echo` with `max_tokens` 0 and no `logprobs`: the echoed prompt is the whole answer (as vLLM
    answers it), so the engine is not asked; the engine would sample one token for a 0-token
    generation that asks no prompt logprobs."""
    prompt_tokens = len(request.prompt_ids)
    record = current_request()
    if record is not None:
        record.add_generation(prompt_tokens=prompt_tokens, generated_tokens=0)
    yield Completion(
        text="", token_ids=[], finish_reason="length", prompt_tokens=prompt_tokens, completion_tokens=0, cached=False
    )


async def create_completion(
    body: oai.CompletionRequest, service: GenerationService, settings: Settings, *, timeout_s: float | None
) -> oai.Completion | EventSourceResponse:
    check_request(body, service, settings)
    plan = plan_completion(body, service, timeout_s)
    completion_id = f"cmpl-{secrets.token_hex(12)}"
    created = int(time.time())
    if body.echo and body.max_tokens == 0 and body.logprobs is None:
        streams = [_prompt_alone(c.request) for c in plan]  # nothing to compute: no step, no KV slot
    else:
        streams = [service.stream(c.request) for c in plan]
    if body.stream:
        # Raises here, before any byte, when no choice could start: a plain JSON error.
        merged = await merge_streams(streams)
        return openai_sse(_completion_events(body, service, plan, merged, completion_id, created), service)
    items = await collect(streams)
    choices = []
    prompt_tokens = completion_tokens = 0
    for choice in plan:
        result = items[choice.index][-1]
        assert isinstance(result, Completion)
        logprobs = (
            completion_logprobs(service, result.chunks, len(choice.echo))[0] if body.logprobs is not None else None
        )
        if logprobs is not None and body.echo:
            logprobs = echo_logprobs(service, choice.request.prompt_ids, result) + logprobs
        choices.append(
            oai.Choice(
                text=choice.echo + result.text,
                index=choice.index,
                logprobs=logprobs,
                finish_reason=result.finish_reason,  # type: ignore[arg-type]
            )
        )
        if choice.index % body.n == 0:  # a prompt shared by n choices counts once
            prompt_tokens += len(choice.request.prompt_ids)
        completion_tokens += result.completion_tokens
    return oai.Completion(
        id=completion_id,
        created=created,
        model=service.model_name,
        choices=choices,
        usage=usage(prompt_tokens, completion_tokens),
    )


def _completion_events(
    body: oai.CompletionRequest,
    service: GenerationService,
    plan: list[PlannedChoice],
    merged: AsyncIterator[tuple[int, StreamItem]],
    completion_id: str,
    created: int,
) -> AsyncIterator[bytes]:
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    model = service.model_name

    def envelope(choices: list[oai.Choice], usage_: oai.Usage | None) -> dict[str, Any]:
        # Every null left out, but with include_usage every field there (null or not).
        body_ = oai.Completion(id=completion_id, created=created, model=model, choices=choices, usage=usage_)
        return body_.model_dump(exclude_none=not include_usage)

    frames = ChunkFrames(
        envelope, include_usage=include_usage, text_choice=lambda index, text: oai.Choice(text=text, index=index)
    )
    choices = {c.index: _StreamedChoice(service, c, body, frames) for c in plan}
    return chunk_events(
        merged,
        n=body.n,
        streams=len(plan),
        frames=frames,
        choices=lambda index, item: choices[index].chunks(item),
    )


class _StreamedChoice:
    """One streamed completion choice: its items as the choices of its chunks.

    With `echo`, the first chunk opens with the prompt's text, and with `logprobs` too its logprobs
    open with the prompt's (vLLM's order: the prompt, then the first token's); the text offsets of
    the generated tokens continue after the prompt's text, as in the response that is not streamed.
    With echo and logprobs, the choice's chunks wait for the prompt's logprobs (`PromptLogprobs`,
    which the service yields before the first token)."""

    def __init__(
        self,
        service: GenerationService,
        planned: PlannedChoice,
        body: oai.CompletionRequest,
        frames: ChunkFrames[oai.Choice],
    ) -> None:
        self._service = service
        self._frames = frames
        self._planned = planned
        self._prefix = planned.echo  # sent before the choice's first text
        self._offset = len(planned.echo)  # the text offset of the next token
        self._logprobs = body.logprobs is not None
        self._held: list[TextChunk] | None = [] if body.echo and self._logprobs else None
        self._prompt_logprobs: oai.LogProbs | None = None  # sent in the choice's first chunk

    def chunks(self, item: StreamItem) -> list[oai.Choice | bytes]:
        if isinstance(item, PromptLogprobs):
            self._prompt_logprobs = echo_logprobs(self._service, self._planned.request.prompt_ids, item)
            held, self._held = self._held or [], None
            return [self._text(held)] if held else []
        if isinstance(item, TextChunk | MergedChunk):
            if self._held is not None:
                self._held.extend(token_chunks(item))
                return []
            return [self._text(token_chunks(item))]
        out: list[oai.Choice | bytes] = []
        if self._held is not None:
            self._prompt_logprobs = echo_logprobs(self._service, self._planned.request.prompt_ids, item)
            if self._held:
                out.append(self._text(self._held))
            self._held = None
        prefix, self._prefix = self._prefix, ""
        logprobs, self._prompt_logprobs = self._prompt_logprobs, None  # max_tokens 0: the prompt's alone
        finish = item.finish_reason
        out.append(oai.Choice(text=prefix, index=self._planned.index, logprobs=logprobs, finish_reason=finish))  # type: ignore[arg-type]
        return out

    def _text(self, chunks: Sequence[TextChunk]) -> oai.Choice | bytes:
        """One chunk for these tokens' text (several when the reader or the process fell behind:
        their logprobs entries in order, as in a response that is not streamed). Text alone (no
        logprobs, no echo to open with) is written at once from the choice's `TextFrame`."""
        text = chunks[0].text if len(chunks) == 1 else "".join(c.text for c in chunks)
        if not self._logprobs and not self._prefix:
            return self._frames.text(self._planned.index, text)
        prefix, self._prefix = self._prefix, ""
        logprobs = None
        if self._logprobs:
            logprobs, self._offset = completion_logprobs(self._service, chunks, self._offset)
            if self._prompt_logprobs is not None:
                logprobs, self._prompt_logprobs = self._prompt_logprobs + logprobs, None
        return oai.Choice(text=prefix + text, index=self._planned.index, logprobs=logprobs)
