"""One generation run on the engine, its events turned into stream items: tokens detokenized
incrementally (never splitting a character) and cut at stop strings and stop token ids, the
prompt's logprobs passed on, the deadline kept, timing and counts recorded.

`generate` yields `TextChunk`s (a `PromptLogprobs` first when asked for) then one `Completion`;
however it ends (finished, failed, timed out or closed early) it cancels the generation, which
frees the server's KV slot at the next step boundary.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from frontend import errors
from frontend.engine.protocol import (
    Engine,
    ErrorEvent,
    FinishEvent,
    Overloaded,
    PromptLogprobsEvent,
    StepError,
    TokenEvent,
)
from frontend.generation.types import Completion, GenerationRequest, PromptLogprobs, StreamItem, TextChunk
from frontend.metrics import GatewayMetrics
from frontend.observability.requests import current_request
from frontend.text import IncrementalDecoder, StopMatcher


async def generate(
    engine: Engine,
    metrics: GatewayMetrics,
    req: GenerationRequest,
    *,
    started: float,
    request_timeout_s: float,
) -> AsyncIterator[StreamItem]:
    """Run `req` on `engine`; `started` is when the request began (the time-to-first-token and the
    deadline count from it), `request_timeout_s` caps the client's own deadline."""
    model = engine.model
    try:
        handle = engine.submit(req.engine_request())
    except (Overloaded, StepError) as err:
        raise errors.from_engine_error(err) from err
    decoder = IncrementalDecoder(model.tokenizer, req.prompt_ids, skip_special_tokens=req.skip_special_tokens)
    matcher = StopMatcher(req.stop, include_stop=req.include_stop_str_in_output)
    stop_token_ids = frozenset(req.stop_token_ids)
    chunks: list[TextChunk] = []
    token_ids: list[int] = []
    generated = 0
    first_token_at: float | None = None
    prompt_event: PromptLogprobsEvent | None = None
    last_token_at = started
    finish_reason = "length"
    timeout_s = min(req.timeout_s or request_timeout_s, request_timeout_s)
    deadline = started + timeout_s
    try:
        while True:
            try:
                event = handle.events.get_nowait()  # a step delivers many: no timer while they last
            except asyncio.QueueEmpty:
                try:
                    # asyncio.timeout arms one timer handle; wait_for would create a task per token.
                    async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                        event = await handle.events.get()
                except TimeoutError as err:
                    raise errors.UpstreamTimeout(
                        f"generation did not finish within its deadline of {timeout_s:g} s"
                    ) from err
            if isinstance(event, ErrorEvent):
                raise errors.from_engine_error(event.error)
            if isinstance(event, PromptLogprobsEvent):
                prompt_event = event
                yield PromptLogprobs(event.logprobs, event.top_logprobs)
                continue
            if isinstance(event, FinishEvent):
                finish_reason = event.reason
                tail, stopped = matcher.push(decoder.flush())
                if stopped:
                    finish_reason = "stop"
                else:
                    tail += matcher.flush()
                if tail:
                    chunk = TextChunk(tail, None, None)
                    chunks.append(chunk)
                    yield chunk
                break
            assert isinstance(event, TokenEvent)
            now = time.monotonic()
            if first_token_at is None:
                first_token_at = now
                metrics.first_token(now - started)
            else:
                metrics.token_gap(now - last_token_at)
            last_token_at = now
            generated += 1
            # Stop conditions count only once min_tokens were generated (vLLM's order).
            checking = generated >= req.min_tokens
            if checking and event.token_id in stop_token_ids:
                # Ends here whatever the engine does next; its text only when asked for.
                tail = decoder.push(event.token_id) if req.include_stop_str_in_output else ""
                tail, _ = matcher.push(tail + decoder.flush())
                tail += matcher.flush()
                chunk = TextChunk(tail, event.token_id, generated - 1, event.logprob, event.top_logprobs)
                token_ids.append(event.token_id)
                chunks.append(chunk)
                yield chunk
                finish_reason = "stop"
                break
            if event.token_id == model.eos_token_id and not req.ignore_eos:
                continue  # counted as a completion token, never shown as text
            text = decoder.push(event.token_id)
            text, stopped = matcher.push(text) if checking else (text, False)
            chunk = TextChunk(text, event.token_id, generated - 1, event.logprob, event.top_logprobs)
            token_ids.append(event.token_id)
            chunks.append(chunk)
            yield chunk
            if stopped:
                finish_reason = "stop"
                break
    finally:
        engine.cancel(handle)  # no-op when finished; frees the slot on disconnect or error
    total_s = time.monotonic() - started
    completion = Completion(
        text="".join(c.text for c in chunks),
        token_ids=token_ids,
        finish_reason=finish_reason,
        prompt_tokens=len(req.prompt_ids),
        completion_tokens=generated,
        cached=False,
        chunks=chunks,
        time_to_first_token_s=None if first_token_at is None else first_token_at - started,
        total_s=total_s,
        prompt_logprobs=None if prompt_event is None else prompt_event.logprobs,
        prompt_top_logprobs=None if prompt_event is None else prompt_event.top_logprobs,
    )
    metrics.generation_finished(
        prompt_tokens=len(req.prompt_ids), generated_tokens=generated, total_s=total_s, reason=finish_reason
    )
    if (record := current_request()) is not None:
        record.add_generation(prompt_tokens=len(req.prompt_ids), generated_tokens=generated)
    yield completion
