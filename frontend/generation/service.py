"""Generation as the API layer uses it: validate, tokenize, consult the result cache, run the
engine, turn tokens into text (never splitting a character, cutting at stop strings), and store
complete deterministic results.

`stream()` yields `TextChunk`s then one final `Completion`; `complete()` collects a stream. A
stream that is closed early (the client went away) cancels its generation, which frees the
server's KV slot at the next step boundary; a failed or cancelled generation is never cached.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import asdict, dataclass, field
from typing import Any

from frontend import errors
from frontend.cache import CachedResult, ResultCache, cache_key, is_cacheable
from frontend.engine.protocol import Engine
from frontend.engine.scheduler import ErrorEvent, FinishEvent, Overloaded, QueueFull, TokenEvent
from frontend.engine.triton_client import StepError, StepRejected
from frontend.engine.triton_client import UpstreamTimeout as StepTimeout
from frontend.engine.triton_client import UpstreamUnavailable as StepUnavailable
from frontend.metrics import GatewayMetrics
from frontend.sampling import SamplingParams
from frontend.security.accounting import current_account
from frontend.settings import Settings
from frontend.text import IncrementalDecoder, StopMatcher


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    sampling: SamplingParams
    stop: tuple[str, ...] = ()
    seed: int | None = None
    timeout_s: float | None = None  # the client's deadline (capped by settings.request_timeout_s)

    def cache_params(self) -> dict[str, Any]:
        return {
            **asdict(self.sampling),
            "max_new_tokens": self.max_new_tokens,
            "stop": list(self.stop),
            "seed": self.seed,
        }


@dataclass(frozen=True)
class TextChunk:
    """New text. `token_id`/`position` name the token that produced it; both are None for text
    held back (a possible stop-string prefix) and released when the generation ends."""

    text: str
    token_id: int | None
    position: int | None
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached: bool
    chunks: list[TextChunk] = field(default_factory=list)
    time_to_first_token_s: float | None = None
    total_s: float = 0.0

    @property
    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


class GenerationService:
    def __init__(
        self,
        engine: Engine,
        cache: ResultCache,
        metrics: GatewayMetrics,
        settings: Settings,
    ) -> None:
        self.engine = engine
        self.cache = cache
        self.metrics = metrics
        self.settings = settings  # limits are read per request
        self.request_timeout_s = settings.request_timeout_s

    # ------------------------------------------------------------------ preparation
    def tokenize(self, prompt: str | Sequence[int], *, param: str = "prompt") -> tuple[int, ...]:
        model = self.engine.model
        if isinstance(prompt, str):
            if not prompt:
                raise errors.InvalidRequest("prompt must not be empty", param=param)
            limit = self.settings.max_prompt_chars
            if len(prompt) > limit:
                raise errors.InvalidRequest(
                    f"prompt has {len(prompt)} characters; this server accepts at most {limit}", param=param
                )
            ids = tuple(model.tokenizer(prompt)["input_ids"])
        else:
            ids = tuple(int(t) for t in prompt)
            if any(t < 0 or t >= model.vocab_size for t in ids):
                raise errors.InvalidRequest(f"token ids must be in [0, {model.vocab_size})", param=param)
        if not ids:
            raise errors.InvalidRequest("prompt must not be empty", param=param)
        return ids

    def request(
        self,
        prompt_ids: tuple[int, ...],
        *,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        top_k: int,
        min_p: float,
        repetition_penalty: float,
        stop: Sequence[str],
        seed: int | None,
        logprobs: int = 0,
        prompt_param: str = "prompt",
        max_tokens_param: str = "max_new_tokens",
        stop_param: str = "stop",
        timeout_s: float | None = None,
    ) -> GenerationRequest:
        """Check limits that need the model (context length); field ranges are the schema's job.
        `prompt_param` / `max_tokens_param` name the client's fields in error messages."""
        self._check_stops(stop, stop_param)
        model = self.engine.model
        limit = self.settings.max_new_tokens_limit
        if max_new_tokens > limit:
            raise errors.InvalidRequest(
                f"{max_tokens_param} {max_new_tokens} exceeds this server's limit of {limit}", param=max_tokens_param
            )
        total = len(prompt_ids) + max_new_tokens
        if total > model.max_context:
            raise errors.ContextLengthExceeded(
                f"This model's maximum context length is {model.max_context} tokens, however you requested "
                f"{total} tokens ({len(prompt_ids)} in your prompt; {max_new_tokens} for the completion).",
                param=prompt_param,
            )
        sampling = SamplingParams(
            temperature=float(temperature),
            top_k=0 if top_k >= model.vocab_size else int(top_k),
            top_p=float(top_p),
            min_p=float(min_p),
            repetition_penalty=float(repetition_penalty),
            logprobs=int(logprobs),
        )
        return GenerationRequest(prompt_ids, max_new_tokens, sampling, tuple(stop), seed, timeout_s)

    def _check_stops(self, stop: Sequence[str], param: str) -> None:
        most, longest = self.settings.max_stop_sequences, self.settings.max_stop_chars
        if len(stop) > most:
            raise errors.InvalidRequest(f"at most {most} stop sequences are allowed, got {len(stop)}", param=param)
        for s in stop:
            if len(s) > longest:
                raise errors.InvalidRequest(
                    f"a stop sequence has {len(s)} characters; this server accepts at most {longest}", param=param
                )

    # ------------------------------------------------------------------ running
    def _key(self, req: GenerationRequest) -> str | None:
        if not is_cacheable(req.sampling.temperature, req.seed):
            return None
        model = self.engine.model
        return cache_key(
            model=model.name, model_version=model.version, prompt_ids=req.prompt_ids, params=req.cache_params()
        )

    async def stream(self, req: GenerationRequest) -> AsyncIterator[TextChunk | Completion]:
        # The caller's token quota (frontend.security.accounting): reserve, then settle or refund.
        account = current_account.get()
        if account is None:
            items = self._stream(req)
        else:
            items = account.metered(
                self._stream(req), prompt_tokens=len(req.prompt_ids), max_new_tokens=req.max_new_tokens
            )
        async with aclosing(items):  # type: ignore[type-var]  # an async generator, typed as an iterator
            async for item in items:
                yield item

    async def _stream(self, req: GenerationRequest) -> AsyncIterator[TextChunk | Completion]:
        started = time.monotonic()
        key = self._key(req)
        if key is not None:
            hit = await self.cache.get(key)
            self.metrics.cache_lookups.labels("hit" if hit else "miss").inc()
            if hit is not None:
                async for item in self._replay(hit, started):
                    yield item
                return
        async for item in self._generate(req, key, started):
            yield item

    async def _replay(self, hit: CachedResult, started: float) -> AsyncIterator[TextChunk | Completion]:
        chunks = []
        for record in hit.logprobs or []:
            chunk = TextChunk(
                record["text"],
                record["token_id"],
                record["position"],
                record["logprob"],
                tuple((int(t), float(lp)) for t, lp in record["top_logprobs"]),
            )
            chunks.append(chunk)
            yield chunk
        yield Completion(
            hit.text,
            list(hit.token_ids),
            hit.finish_reason,
            hit.prompt_tokens,
            hit.completion_tokens,
            cached=True,
            chunks=chunks,
            time_to_first_token_s=time.monotonic() - started,
            total_s=time.monotonic() - started,
        )

    async def _generate(
        self, req: GenerationRequest, key: str | None, started: float
    ) -> AsyncIterator[TextChunk | Completion]:
        model = self.engine.model
        try:
            handle = self.engine.submit(req.prompt_ids, req.sampling, req.max_new_tokens, req.seed)
        except (Overloaded, StepError) as err:
            raise _api_error(err) from err
        decoder = IncrementalDecoder(model.tokenizer, req.prompt_ids)
        matcher = StopMatcher(req.stop)
        chunks: list[TextChunk] = []
        token_ids: list[int] = []
        generated = 0
        first_token_at: float | None = None
        last_token_at = started
        finish_reason = "length"
        timeout_s = min(req.timeout_s or self.request_timeout_s, self.request_timeout_s)
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
                    raise _api_error(event.error)
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
                    self.metrics.time_to_first_token.observe(now - started)
                else:
                    self.metrics.inter_token_latency.observe(now - last_token_at)
                last_token_at = now
                generated += 1
                if event.token_id == model.eos_token_id:
                    continue  # counted as a completion token, never shown as text
                text, stopped = matcher.push(decoder.push(event.token_id))
                chunk = TextChunk(text, event.token_id, generated - 1, event.logprob, event.top_logprobs)
                token_ids.append(event.token_id)
                chunks.append(chunk)
                yield chunk
                if stopped:
                    finish_reason = "stop"
                    break
        finally:
            self.engine.cancel(handle)  # no-op when finished; frees the slot on disconnect or error
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
        )
        self.metrics.prompt_tokens.inc(len(req.prompt_ids))
        self.metrics.generated_tokens.inc(generated)
        self.metrics.generation_duration.observe(total_s)
        self.metrics.finish_reasons.labels(finish_reason).inc()
        if key is not None:
            await self.cache.put(key, _to_cached(completion))
        yield completion

    async def complete(self, req: GenerationRequest) -> Completion:
        async for item in self.stream(req):
            if isinstance(item, Completion):
                return item
        raise errors.APIError("generation ended without a result")


def _to_cached(c: Completion) -> CachedResult:
    records = [
        {
            "text": ch.text,
            "token_id": ch.token_id,
            "position": ch.position,
            "logprob": ch.logprob if ch.logprob is None or math.isfinite(ch.logprob) else None,
            "top_logprobs": [[t, lp] for t, lp in ch.top_logprobs],
        }
        for ch in c.chunks
    ]
    return CachedResult(
        text=c.text,
        token_ids=c.token_ids,
        pieces=[ch.text for ch in c.chunks],
        finish_reason=c.finish_reason,
        prompt_tokens=c.prompt_tokens,
        completion_tokens=c.completion_tokens,
        logprobs=records,
    )


def _api_error(err: Exception) -> errors.APIError:
    if isinstance(err, errors.APIError):
        return err
    if isinstance(err, QueueFull):  # the waiting cap: refused at once, try again shortly
        return errors.RateLimited(str(err), code="queue_full", retry_after_s=1)
    if isinstance(err, Overloaded):
        return errors.Overloaded(str(err), retry_after_s=1)
    if isinstance(err, StepTimeout):
        return errors.UpstreamTimeout(str(err))
    if isinstance(err, StepUnavailable):  # BreakerOpen carries when its next probe is due
        return errors.UpstreamUnavailable(str(err), retry_after_s=max(1.0, getattr(err, "retry_after_s", 1.0)))
    if isinstance(err, StepRejected):
        return errors.UpstreamError(str(err))
    return errors.APIError("internal error during generation")
