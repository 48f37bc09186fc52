"""What an engine reports about one generation, in order: a `PromptLogprobsEvent` first when the
prompt's logprobs were asked for, a `TokenEvent` per generated token, then exactly one
`FinishEvent` or `ErrorEvent`. Events go to an `EventSink` (an asyncio.Queue, or the engine
core's per-worker outbox). Pure: no engine, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Protocol

__all__ = ["ErrorEvent", "Event", "EventSink", "FinishEvent", "PromptLogprobsEvent", "TokenEvent"]


class TokenEvent(NamedTuple):
    """One generated token (a NamedTuple: one is made per token, ~4x cheaper than a dataclass)."""

    token_id: int
    logprob: float
    top_logprobs: tuple[tuple[int, float], ...]


@dataclass(frozen=True, slots=True)
class PromptLogprobsEvent:
    """The prompt's own logprobs (OpenAI `echo` with `logprobs`), before the first token: entry t
    is log p(prompt[t] | prompt[:t]) and its top alternatives; entry 0 is None (nothing precedes)."""

    logprobs: tuple[float | None, ...]
    top_logprobs: tuple[tuple[tuple[int, float], ...], ...]


@dataclass(frozen=True, slots=True)
class FinishEvent:
    reason: str  # "stop" (end-of-sequence token) or "length" (max_new_tokens reached)


@dataclass(frozen=True, slots=True)
class ErrorEvent:
    error: Exception


Event = TokenEvent | PromptLogprobsEvent | FinishEvent | ErrorEvent


class EventSink(Protocol):
    """Where a generation's events go: an asyncio.Queue, or anything with put_nowait (the engine
    core process batches the events of one step into one message per HTTP worker)."""

    def put_nowait(self, item: Event, /) -> None: ...
