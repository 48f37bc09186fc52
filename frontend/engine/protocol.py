"""What the API layer needs from an engine. The Triton engine implements it; API tests use a fake."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Protocol

from frontend.engine.model import ServedModel
from frontend.engine.scheduler import Event, EventSink
from frontend.sampling import SamplingParams


class GenerationHandle(Protocol):
    """One submitted generation: events arrive on `events` until a Finish or Error event."""

    events: asyncio.Queue[Event]


class Engine(Protocol):
    @property
    def model(self) -> ServedModel: ...

    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def ready(self) -> bool: ...
    def submit(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        max_new_tokens: int,
        seed: int | None,
        events: EventSink | None = None,
        *,
        ignore_eos: bool = False,
        min_tokens: int = 0,
        stop_token_ids: Sequence[int] = (),
        request_id: str | None = None,
        prompt_logprobs: int = -1,
    ) -> GenerationHandle:
        """Start a generation. Its events go to `events` when given (the engine core passes a sink
        that batches them per worker), else to the returned handle's `events` queue.

        vLLM's stop controls: `ignore_eos` (the end-of-text token is emitted like any other and
        does not finish the generation), `stop_token_ids` (emitting one finishes it with
        FinishEvent("stop") right after its TokenEvent), `min_tokens` (while fewer were generated,
        end-of-text and the stop ids have probability 0, the distribution renormalised).
        `request_id` (the HTTP request's X-Request-Id) travels with the generation's step rows
        to Triton (`step_model.contract.PARAM_REQUEST_IDS`). `prompt_logprobs` >= 0: a
        PromptLogprobsEvent with that many alternatives per position comes before the first
        token (OpenAI `echo`); with `max_new_tokens` 0 the generation ends after it."""
        ...

    def cancel(self, handle: GenerationHandle) -> None: ...
    def load(self) -> tuple[int, int]:
        """(running, waiting) generations, for metrics and readiness."""
        ...
