"""Where a generation's events wait for its stream (`StreamSink`), and when the stream is woken to
read them (`StreamPacer`): vLLM's stream interval, chosen by the process's own load.

The engine delivers a whole step's events in one synchronous pass (the scheduler, one token per
running sequence; the engine-core client, one message per step). Woken at once, every stream would
run in the next event-loop round, all of them before the loop looks at its sockets and timers
again: one chunk per token per stream, and the engine's next step waits for every stream to have
written. The pacer wakes at most `per_round` streams per round and leaves the rest in a FIFO
backlog, so I/O and timers (the engine's next step, new requests) run between slices. While the
process keeps up, the backlog empties before the next step and every stream gets each token alone
(one chunk per token, as soon as it is there). When it falls behind, the engine steps again
before every stream has been served, and a stream woken late finds the tokens of several steps
waiting: its reader takes them all as ONE item (`TextAssembler.take`), so one chunk, one JSON,
one write carries k tokens. k grows with the backlog and shrinks with it; no token is dropped or
reordered (each sink is a FIFO list), none is held back to make a batch.

A stream's deadline is one timer for the whole generation (`expire`), not one per wait.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

from frontend.engine.events import Event

__all__ = ["StreamPacer", "StreamSink"]

#: Streams woken per event-loop round. A stream's turn costs ~0.05-0.5 ms of Python (detokenize,
#: JSON, the ASGI send chain, the socket write): 8 keep a round around a millisecond, so the
#: engine's next step (a timer, a socket) waits at most that long for the loop, which keeps the
#: engine stepping at its own pace while the streams share what is left of the CPU. The cost is
#: one more loop round (one poll for I/O) per 8 streams. Measured on 512 streams over a 10 ms
#: step (benchmarks/single_process_bench.py, docs/results/2026-12-07-cpu/single_process.md):
#: 8 gave the fewest CPU microseconds per token, 128 three times as many.
PER_ROUND = 8


class StreamPacer:
    """Wakes waiting `StreamSink`s, at most `per_round` per event-loop round (module docstring).
    One per process (the `GenerationService` owns it); every stream shares it, so the rounds are
    shared fairly, in the order the streams became ready."""

    __slots__ = ("_backlog", "_budget", "_loop", "_ticking", "per_round")

    def __init__(self, per_round: int | None = None) -> None:
        per_round = PER_ROUND if per_round is None else per_round
        if per_round < 1:
            raise ValueError("per_round must be at least 1")
        self.per_round = per_round
        self._budget = per_round  # wakes left in this round
        self._backlog: deque[StreamSink] = deque()
        self._ticking = False  # a _tick is scheduled for the next round
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def backlog(self) -> int:
        """Streams with events waiting to be woken (0 while the process keeps up)."""
        return len(self._backlog)

    def wake(self, sink: StreamSink) -> None:
        if self._budget > 0:
            self._budget -= 1
            sink.notify()
        else:
            self._backlog.append(sink)
        if not self._ticking:  # the budget refills next round
            self._ticking = True
            self._loop = loop = asyncio.get_running_loop()
            loop.call_soon(self._tick)

    def _tick(self) -> None:
        """A new round: refill the budget, wake the backlog's oldest with it; tick again next
        round while any wake was spent (the budget must refill) or a backlog remains."""
        budget = self.per_round
        backlog = self._backlog
        while backlog and budget:
            budget -= 1
            backlog.popleft().notify()
        self._budget = budget
        if budget < self.per_round:
            assert self._loop is not None
            self._loop.call_soon(self._tick)
        else:
            self._ticking = False


class StreamSink:
    """One generation's events (the `EventSink` given to `Engine.submit`), in order, until its
    stream takes them; its stream waits on it with `wait`."""

    __slots__ = ("_events", "_expired", "_pacer", "_queued", "_waiter")

    def __init__(self, pacer: StreamPacer) -> None:
        self._pacer = pacer
        self._events: list[Event] = []
        self._waiter: asyncio.Future[None] | None = None
        self._queued = False  # handed to the pacer since the stream began waiting
        self._expired = False

    def put_nowait(self, event: Event, /) -> None:
        self._events.append(event)
        if self._waiter is not None and not self._queued:
            self._queued = True
            self._pacer.wake(self)

    def empty(self) -> bool:
        return not self._events

    def qsize(self) -> int:
        return len(self._events)

    def notify(self) -> None:
        """Wake the stream (the pacer's call): it reads what is waiting in its next round."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def expire(self) -> None:
        """The generation's deadline passed: a stream waiting with nothing to read gives up."""
        self._expired = True
        waiter = self._waiter
        if waiter is not None and not waiter.done() and not self._events:
            waiter.set_result(None)

    def take(self) -> list[Event]:
        """Every event waiting (maybe none), in order."""
        events, self._events = self._events, []
        return events

    async def wait(self) -> list[Event]:
        """Every event waiting, in order, waiting for one when there is none. Raises TimeoutError
        when the deadline passed (`expire`) with nothing to read."""
        while not self._events:  # a loop: a wake with nothing to read (none is expected) waits again
            if self._expired:
                raise TimeoutError
            waiter: Any = asyncio.get_running_loop().create_future()
            self._waiter = waiter
            try:
                await waiter
            finally:
                self._waiter = None
                self._queued = False
        events, self._events = self._events, []
        return events
