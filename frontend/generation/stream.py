"""One generation run on the engine: its events read against the deadline, turned into stream
items by a `TextAssembler` (detokenizing, stop strings and stop ids, prompt logprobs), timing
and counts recorded.

`generate` yields `TextChunk`s (a `PromptLogprobs` first when asked for) then one `Completion`;
the tokens waiting when its reader pulls again come as one `MergedChunk` (coalescing by
backpressure: a reader slower than the engine, or a process slower than its engine, which the
pacer then wakes late (`frontend.generation.pacing`), gets fewer, larger items, never a dropped
token); its events wait in a `StreamSink` with one deadline timer; however it ends (finished,
failed, timed out or closed early) it cancels the generation, which frees the server's KV slot at
the next step boundary. The engine's errors become API errors in
`frontend.errors.from_engine_error`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from frontend import errors
from frontend.engine.protocol import Engine, ErrorEvent, Event, Overloaded, StepError
from frontend.generation.assembler import TextAssembler
from frontend.generation.pacing import StreamPacer, StreamSink
from frontend.generation.types import GenerationRequest, StreamItem
from frontend.observability import GatewayMetrics
from frontend.observability.requests import current_request


async def generate(
    engine: Engine,
    metrics: GatewayMetrics,
    req: GenerationRequest,
    *,
    started: float,
    request_timeout_s: float,
    pacer: StreamPacer | None = None,
    per_token_text: bool = True,
) -> AsyncIterator[StreamItem]:
    """Run `req` on `engine`; `started` is when the request began (the time-to-first-token and the
    deadline count from it), `request_timeout_s` caps the client's own deadline. `pacer` wakes
    this stream when its events arrive (the process's one, shared by every stream; default a
    pacer of its own). `per_token_text`: each token's chunk carries its own text (for the result
    cache); False lets the tokens read together share one decode (`TextAssembler`)."""
    model = engine.model
    sink = StreamSink(pacer if pacer is not None else StreamPacer())
    try:
        handle = engine.submit(req.engine_request(), sink)
    except (Overloaded, StepError) as err:
        raise errors.from_engine_error(err) from err
    text = TextAssembler(model.tokenizer, model.eos_token_id, req, per_token_text=per_token_text)
    first_token_at: float | None = None
    last_token_at = started
    timeout_s = min(req.timeout_s or request_timeout_s, request_timeout_s)
    # One timer for the whole generation, not one per wait.
    expiry = asyncio.get_running_loop().call_later(max(0.0, started + timeout_s - time.monotonic()), sink.expire)
    try:
        while not text.finished:
            # Every event already waiting, read at once: when the reader (the SSE writer) or the
            # process (frontend.generation.pacing) fell behind the engine, the tokens of several
            # steps become ONE item, so one event (one JSON, one write) carries them; a reader that
            # keeps up finds one token and gets it alone at once. Nothing is waited for to make a
            # batch.
            events = sink.take() or await _wait(sink, timeout_s)
            failure = _failure(events)  # the last event there is
            generated = text.generated
            items = text.take(events)  # type: ignore[arg-type]  # no ErrorEvent left
            if (tokens := text.generated - generated) > 0:
                now = time.monotonic()
                if first_token_at is None:
                    first_token_at = now
                    metrics.first_token(now - started)
                else:
                    metrics.token_gap(now - last_token_at)
                metrics.tokens_together(tokens - 1)  # read together: no gap between them
                last_token_at = now
            for item in items:
                yield item
            if failure is not None and not text.finished:  # a stop before it ended the generation
                assert isinstance(failure, ErrorEvent)
                raise errors.from_engine_error(failure.error)
    finally:
        expiry.cancel()
        engine.cancel(handle)  # no-op when finished; frees the slot on disconnect or error
    total_s = time.monotonic() - started
    completion = text.completion(
        time_to_first_token_s=None if first_token_at is None else first_token_at - started, total_s=total_s
    )
    prompt_tokens, generated = len(req.prompt_ids), text.generated
    metrics.generation_finished(
        prompt_tokens=prompt_tokens, generated_tokens=generated, total_s=total_s, reason=text.finish_reason
    )
    if (record := current_request()) is not None:
        record.add_generation(prompt_tokens=prompt_tokens, generated_tokens=generated)
    yield completion


async def _wait(sink: StreamSink, timeout_s: float) -> list[Event]:
    """The events that arrive next (504 once the deadline passed with none)."""
    try:
        return await sink.wait()
    except TimeoutError as err:
        raise errors.UpstreamTimeout(f"generation did not finish within its deadline of {timeout_s:g} s") from err


def _failure(events: list[Event]) -> ErrorEvent | None:
    """The ErrorEvent that ends `events`, taken out of them (nothing follows one: any event after
    it is dropped)."""
    if type(events[-1]) is ErrorEvent:
        return events.pop()  # type: ignore[return-value]
    for i, event in enumerate(events):
        if type(event) is ErrorEvent:
            del events[i:]
            return event
    return None
