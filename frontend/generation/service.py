"""Generation as the API layer uses it: validate, tokenize, consult the result cache, run the
engine, turn tokens into text (never splitting a character, cutting at stop strings), and store
complete deterministic results.

`stream()` yields `TextChunk`s (a `MergedChunk` of the tokens waiting when a slow reader, or a
reader in a process behind its engine (`pacing`), pulls again) then one final `Completion` (with
`prompt_logprobs`, a `PromptLogprobs` before them); `complete()` collects a stream. A stream that
is closed early (the client went away) cancels its generation, which frees the server's KV slot at
the next step boundary; a failed or cancelled generation is never cached.

`GenerationService` composes the pieces, one module per concern: `types` (the request and what a
stream yields), `preparation` (checks against the model and the server's limits), `stream` (the
engine's events turned into text) and `caching` (the result cache's keys, replay and storing).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import aclosing
from typing import Any

from frontend import errors
from frontend.cache import ResultCache
from frontend.chat import load_chat_template
from frontend.engine.model import ServedModel
from frontend.engine.protocol import Engine
from frontend.generation import caching, preparation
from frontend.generation.pacing import StreamPacer
from frontend.generation.params import FieldNames, GenerationParams
from frontend.generation.stream import generate
from frontend.generation.types import Completion, GenerationRequest, MergedChunk, PromptLogprobs, StreamItem, TextChunk
from frontend.observability import GatewayMetrics
from frontend.security.accounting import current_account
from frontend.settings import Settings

__all__ = [
    "Completion",
    "FieldNames",
    "GenerationParams",
    "GenerationRequest",
    "GenerationService",
    "MergedChunk",
    "PromptLogprobs",
    "StreamItem",
    "TextChunk",
]


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
        # Wakes every stream of this process when its events arrive, a slice per event-loop round
        # (frontend.generation.pacing): a process that falls behind coalesces tokens per stream.
        self.pacer = StreamPacer()
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
        return preparation.chat_template(self.engine, self._chat_template)

    def check_model(self, name: str | None, *, param: str = "model") -> None:
        """404 (model_not_found) unless `name` is the served model (None: any)."""
        preparation.check_model(self.engine, name, param=param)

    # ------------------------------------------------------------------ preparation
    def chat_prompt(
        self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True, param: str = "messages"
    ) -> str:
        """The conversation rendered by the chat template (400 with how to configure one when there is none)."""
        return preparation.chat_prompt(
            self.engine, self._chat_template, messages, add_generation_prompt=add_generation_prompt, param=param
        )

    def detokenize(self, token_ids: Sequence[int], *, param: str = "tokens", skip_special_tokens: bool = False) -> str:
        return preparation.detokenize(self.engine, token_ids, param=param, skip_special_tokens=skip_special_tokens)

    def tokenize(
        self, prompt: str | Sequence[int], *, param: str = "prompt", add_special_tokens: bool = True
    ) -> tuple[int, ...]:
        return preparation.tokenize(
            self.engine, self.settings, prompt, param=param, add_special_tokens=add_special_tokens
        )

    def prepare(
        self, prompt_ids: tuple[int, ...], params: GenerationParams, names: FieldNames = preparation.FIELD_NAMES
    ) -> GenerationRequest:
        """Check what needs the model or the server's limits (field ranges are the schema's job) and
        build the request. `names` are the client's field names, for error messages."""
        return preparation.prepare(self.engine, self.settings, prompt_ids, params, names)

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

    # ------------------------------------------------------------------ running
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
        key = caching.key(self.engine, req)
        if key is not None:
            hit = await caching.lookup(self.cache, self.metrics, key)
            if hit is not None:
                async for item in caching.replay(hit, started):
                    yield item
                return
        # Closed explicitly when this stream is (the client went away): its `finally` cancels the
        # generation on the engine at once, not whenever the garbage collector gets to it.
        generation = generate(
            self.engine,
            self.metrics,
            req,
            started=started,
            request_timeout_s=self.request_timeout_s,
            pacer=self.pacer,
            per_token_text=key is not None,  # a result to cache keeps every token's own text
        )
        async with aclosing(generation) as items:  # type: ignore[type-var]  # an async generator
            async for item in items:
                if key is not None and isinstance(item, Completion):  # the last item: only complete results
                    await caching.store(self.cache, key, item)
                yield item

    async def complete(self, req: GenerationRequest) -> Completion:
        async for item in self.stream(req):
            if isinstance(item, Completion):
                return item
        raise errors.APIError("generation ended without a result")
