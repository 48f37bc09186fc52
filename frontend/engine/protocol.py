"""What the API layer needs from an engine, and the whole vocabulary it speaks: the request
(`EngineRequest`), the events a generation reports (`frontend.engine.events`) and the errors an
engine raises (`frontend.engine.errors`). The Triton engine, the engine core's client and the API
tests' fake implement it; nothing here imports an implementation."""

from __future__ import annotations

import asyncio
from typing import Protocol

from frontend.engine.errors import (
    BreakerOpen,
    ConnectFailed,
    Overloaded,
    QueueFull,
    SamplingFailed,
    StepError,
    StepRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from frontend.engine.events import ErrorEvent, Event, EventSink, FinishEvent, PromptLogprobsEvent, TokenEvent
from frontend.engine.model import ServedModel
from frontend.engine.request import EngineRequest

__all__ = [
    "BreakerOpen",
    "ConnectFailed",
    "Engine",
    "EngineRequest",
    "ErrorEvent",
    "Event",
    "EventSink",
    "FinishEvent",
    "GenerationHandle",
    "Overloaded",
    "PromptLogprobsEvent",
    "QueueFull",
    "SamplingFailed",
    "StepError",
    "StepRejected",
    "TokenEvent",
    "UpstreamTimeout",
    "UpstreamUnavailable",
]


class GenerationHandle(Protocol):
    """One submitted generation: events arrive on `events` until a Finish or Error event."""

    events: asyncio.Queue[Event]


class Engine(Protocol):
    @property
    def model(self) -> ServedModel: ...

    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def ready(self) -> bool: ...
    def submit(self, request: EngineRequest, events: EventSink | None = None) -> GenerationHandle:
        """Start a generation (`EngineRequest` says what each field asks). Its events go to
        `events` when given (the engine core passes a sink that batches them per worker), else to
        the returned handle's `events` queue. Raises `Overloaded` or a `StepError` when it cannot
        start; whatever fails later arrives as an `ErrorEvent`."""
        ...

    def cancel(self, handle: GenerationHandle) -> None: ...
    def load(self) -> tuple[int, int]:
        """(running, waiting) generations, for metrics and readiness."""
        ...
