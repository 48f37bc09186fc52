"""Generation as the API layer uses it: validate, tokenize, consult the result cache, run the
engine, turn tokens into text (never splitting a character, cutting at stop strings), and store
complete deterministic results.

`stream()` yields `TextChunk`s then one final `Completion` (with `prompt_logprobs`, a
`PromptLogprobs` before them); `complete()` collects a stream. A stream that is closed early (the
client went away) cancels its generation, which frees the server's KV slot at the next step
boundary; a failed or cancelled generation is never cached.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import aclosing
from dataclasses import asdict, dataclass, field
from typing import Any

from frontend import errors
from frontend.cache import CachedResult, ResultCache, cache_key, is_cacheable
from frontend.chat import load_chat_template, render_chat
from frontend.engine.model import ServedModel
from frontend.engine.protocol import Engine, GenerationHandle
from frontend.engine.scheduler import (
    ErrorEvent,
    FinishEvent,
    Overloaded,
    PromptLogprobsEvent,
    QueueFull,
    TokenEvent,
)
from frontend.engine.triton_client import StepError, StepRejected
from frontend.engine.triton_client import UpstreamTimeout as StepTimeout
from frontend.engine.triton_client import UpstreamUnavailable as StepUnavailable
from frontend.generation.params import FieldNames, GenerationParams
from frontend.metrics import GatewayMetrics
from frontend.observability.requests import current_request, current_request_id
from frontend.sampling import SamplingParams
from frontend.security.accounting import current_account
from frontend.settings import Settings
from frontend.text import IncrementalDecoder, StopMatcher

__all__ = [
    "Completion",
    "FieldNames",
    "GenerationParams",
    "GenerationRequest",
    "GenerationService",
    "PromptLogprobs",
    "StreamItem",
    "TextChunk",
]


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    sampling: SamplingParams
    stop: tuple[str, ...] = ()
    seed: int | None = None
    timeout_s: float | None = None  # the client's deadline (capped by settings.request_timeout_s)
    # vLLM's stop controls (carried to the engine) and text options (applied here).
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    prompt_logprobs: int = -1  # >= 0: the prompt's logprobs come first (OpenAI echo); never cached
    # The HTTP request's id (X-Request-Id), for the engine to pass on; never part of the cache key.
    request_id: str | None = field(default_factory=current_request_id, compare=False)

    def cache_params(self) -> dict[str, Any]:
        sampling = asdict(self.sampling)
        for name, neutral in _NEUTRAL_SAMPLING.items():  # keys of plain requests stay as they were
            if sampling[name] == neutral:
                del sampling[name]
        params: dict[str, Any] = {
            **sampling,
            "max_new_tokens": self.max_new_tokens,
            "stop": list(self.stop),
            "seed": self.seed,
        }
        # Only options that differ from their neutral value: keys of plain requests stay as they were.
        for name, neutral in _NEUTRAL_OPTIONS.items():
            value = getattr(self, name)
            if value != neutral:
                params[name] = list(value) if isinstance(value, tuple) else value
        return params


_FIELD_NAMES = FieldNames()
_NEUTRAL_SAMPLING: dict[str, object] = {"presence_penalty": 0.0, "frequency_penalty": 0.0, "logit_bias": ()}
_NEUTRAL_OPTIONS: dict[str, object] = {
    "ignore_eos": False,
    "min_tokens": 0,
    "stop_token_ids": (),
    "include_stop_str_in_output": False,
    "skip_special_tokens": True,
    "prompt_logprobs": -1,
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
class PromptLogprobs:
    """The prompt's own logprobs (a request with `prompt_logprobs` >= 0), before its first
    `TextChunk`: entry t for prompt token t (None at t = 0) and its top alternatives."""

    logprobs: tuple[float | None, ...]
    top_logprobs: tuple[tuple[tuple[int, float], ...], ...]


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
    # The prompt's own logprobs when asked (echo): entry t for prompt token t (None at t = 0).
    prompt_logprobs: tuple[float | None, ...] | None = None
    prompt_top_logprobs: tuple[tuple[tuple[int, float], ...], ...] | None = None

    @property
    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


StreamItem = TextChunk | PromptLogprobs | Completion  # what `GenerationService.stream` yields


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
        # GATEWAY_CHAT_TEMPLATE: read now, so a bad file fails the start rather than a request.
        self._chat_template = load_chat_template(settings.chat_template)

    # ------------------------------------------------------------------ the served model
    @property
    def model(self) -> ServedModel:
        """The served model (raises UpstreamUnavailable until the engine has started)."""
        return self.engine.model

    @property
    def model_name(self) -> str:
        return self.engine.model.name

    @property
    def tokenizer(self) -> Any:
        return self.engine.model.tokenizer

    @property
    def chat_template(self) -> str | None:
        """GATEWAY_CHAT_TEMPLATE's template, else the checkpoint's own, else None."""
        return self._chat_template or getattr(self.engine.model.tokenizer, "chat_template", None)

    def check_model(self, name: str | None, *, param: str = "model") -> None:
        """404 (model_not_found) unless `name` is the served model (None: any)."""
        served = self.engine.model.name
        if name is not None and name != served:
            raise errors.ModelNotFound(
                f"The model `{name}` does not exist. This server serves `{served}`.", param=param
            )

    # ------------------------------------------------------------------ preparation
    def chat_prompt(
        self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True, param: str = "messages"
    ) -> str:
        """The conversation rendered by the chat template (400 with how to configure one when there is none)."""
        if not messages:
            raise errors.InvalidRequest("messages must not be empty", param=param)
        return render_chat(
            self.tokenizer, self.chat_template, messages, add_generation_prompt=add_generation_prompt, param=param
        )

    def detokenize(self, token_ids: Sequence[int], *, param: str = "tokens", skip_special_tokens: bool = False) -> str:
        self._check_token_ids(token_ids, param)
        return str(self.tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens))

    def _check_token_ids(self, token_ids: Sequence[int], param: str) -> None:
        vocab_size = self.engine.model.vocab_size
        if any(t < 0 or t >= vocab_size for t in token_ids):
            raise errors.InvalidRequest(f"token ids must be in [0, {vocab_size})", param=param)

    def tokenize(
        self, prompt: str | Sequence[int], *, param: str = "prompt", add_special_tokens: bool = True
    ) -> tuple[int, ...]:
        model = self.engine.model
        if isinstance(prompt, str):
            if not prompt:
                raise errors.InvalidRequest("prompt must not be empty", param=param)
            limit = self.settings.max_prompt_chars
            if len(prompt) > limit:
                raise errors.InvalidRequest(
                    f"prompt has {len(prompt)} characters; this server accepts at most {limit}", param=param
                )
            ids = tuple(model.tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"])
        else:
            ids = tuple(int(t) for t in prompt)
            self._check_token_ids(ids, param)
        if not ids:
            raise errors.InvalidRequest("prompt must not be empty", param=param)
        return ids

    def prepare(
        self, prompt_ids: tuple[int, ...], params: GenerationParams, names: FieldNames = _FIELD_NAMES
    ) -> GenerationRequest:
        """Check what needs the model or the server's limits (field ranges are the schema's job) and
        build the request. `names` are the client's field names, for error messages."""
        self._check_stops(params.stop, names.stop)
        model = self.engine.model
        max_new_tokens = params.max_new_tokens
        limit = self.settings.max_new_tokens_limit
        if max_new_tokens > limit:
            raise errors.InvalidRequest(
                f"{names.max_new_tokens} {max_new_tokens} exceeds this server's limit of {limit}",
                param=names.max_new_tokens,
            )
        total = len(prompt_ids) + max_new_tokens
        if total > model.max_context:
            raise errors.ContextLengthExceeded(
                f"This model's maximum context length is {model.max_context} tokens, however you requested "
                f"{total} tokens ({len(prompt_ids)} in your prompt; {max_new_tokens} for the completion).",
                param=names.prompt,
            )
        self._check_stop_controls(params, names)
        sampling = SamplingParams(
            temperature=float(params.temperature),
            top_k=0 if params.top_k >= model.vocab_size else int(params.top_k),
            top_p=float(params.top_p),
            min_p=float(params.min_p),
            repetition_penalty=float(params.repetition_penalty),
            logprobs=int(params.logprobs),
            presence_penalty=float(params.presence_penalty),
            frequency_penalty=float(params.frequency_penalty),
            logit_bias=params.logit_bias,
        )
        return GenerationRequest(
            prompt_ids,
            max_new_tokens,
            sampling,
            tuple(params.stop),
            params.seed,
            params.timeout_s,
            ignore_eos=params.ignore_eos,
            min_tokens=params.min_tokens,
            stop_token_ids=tuple(dict.fromkeys(params.stop_token_ids)),
            include_stop_str_in_output=params.include_stop_str_in_output,
            skip_special_tokens=params.skip_special_tokens,
            prompt_logprobs=params.prompt_logprobs,
        )

    def _check_stop_controls(self, params: GenerationParams, names: FieldNames) -> None:
        if params.min_tokens > params.max_new_tokens:
            raise errors.InvalidRequest(
                f"{names.min_tokens} ({params.min_tokens}) must not exceed {names.max_new_tokens} "
                f"({params.max_new_tokens})",
                param=names.min_tokens,
            )
        if len(params.stop_token_ids) > self.settings.max_stop_token_ids:
            raise errors.InvalidRequest(
                f"at most {self.settings.max_stop_token_ids} stop token ids are allowed, "
                f"got {len(params.stop_token_ids)}",
                param=names.stop_token_ids,
            )
        self._check_token_ids(params.stop_token_ids, names.stop_token_ids)
        self._check_token_ids([i for i, _ in params.logit_bias], names.logit_bias)

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
        """`prepare` with the parameters spelt out (kept for callers outside the API layer)."""
        params = GenerationParams(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
            stop=tuple(stop),
            seed=seed,
            logprobs=logprobs,
            timeout_s=timeout_s,
        )
        names = FieldNames(prompt=prompt_param, max_new_tokens=max_tokens_param, stop=stop_param)
        return self.prepare(prompt_ids, params, names)

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
        if not is_cacheable(req.sampling.temperature, req.seed) or req.prompt_logprobs >= 0:
            return None  # prompt logprobs are not kept in the cache
        model = self.engine.model
        return cache_key(
            model=model.name, model_version=model.version, prompt_ids=req.prompt_ids, params=req.cache_params()
        )

    async def stream(self, req: GenerationRequest) -> AsyncIterator[StreamItem]:
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

    async def _stream(self, req: GenerationRequest) -> AsyncIterator[StreamItem]:
        started = time.monotonic()
        key = self._key(req)
        if key is not None:
            hit = await self.cache.get(key)
            self.metrics.cache_lookup(hit is not None)
            record = current_request()  # the access log's counts (frontend.observability.requests)
            if record is not None:
                record.add_cache_lookup(hit is not None)
                if hit is not None:
                    record.add_generation(prompt_tokens=hit.prompt_tokens, generated_tokens=hit.completion_tokens)
            if hit is not None:
                async for item in self._replay(hit, started):
                    yield item
                return
        async for item in self._generate(req, key, started):
            yield item

    async def _replay(self, hit: CachedResult, started: float) -> AsyncIterator[StreamItem]:
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

    async def _generate(self, req: GenerationRequest, key: str | None, started: float) -> AsyncIterator[StreamItem]:
        model = self.engine.model
        try:
            handle = self._submit(req)
        except (Overloaded, StepError) as err:
            raise _api_error(err) from err
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
                    self.metrics.first_token(now - started)
                else:
                    self.metrics.token_gap(now - last_token_at)
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
            prompt_logprobs=None if prompt_event is None else prompt_event.logprobs,
            prompt_top_logprobs=None if prompt_event is None else prompt_event.top_logprobs,
        )
        self.metrics.generation_finished(
            prompt_tokens=len(req.prompt_ids), generated_tokens=generated, total_s=total_s, reason=finish_reason
        )
        if (record := current_request()) is not None:
            record.add_generation(prompt_tokens=len(req.prompt_ids), generated_tokens=generated)
        if key is not None:
            await self.cache.put(key, _to_cached(completion))
        yield completion

    def _submit(self, req: GenerationRequest) -> GenerationHandle:
        return self.engine.submit(
            req.prompt_ids,
            req.sampling,
            req.max_new_tokens,
            req.seed,
            ignore_eos=req.ignore_eos,
            min_tokens=req.min_tokens,
            stop_token_ids=req.stop_token_ids,
            request_id=req.request_id,
            prompt_logprobs=req.prompt_logprobs,
        )

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
