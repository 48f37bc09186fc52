"""Continuous batching: one loop per gateway process steps every active sequence together.

Each iteration is one decoding step for all running sequences: a single Triton request carries
every decode row (plus release rows for sequences that finished or were cancelled), and each new
sequence's prefill is a request of its own so a full KV cache refuses only that sequence. Triton's
dynamic batcher merges these requests, and those of other gateway workers, into one execution.
Sequences join and leave at step boundaries. (Hand-written: no library does continuous batching
against a stateful Triton step model; vLLM's and TGI's schedulers are tied to their own engines.)

Per row the loop draws ONE uniform number from the sequence's own generator and samples with it
(`frontend.sampling`); when the top-K window does not decide the step, it fetches the full row and
samples again with the same draw, so a seeded sequence gets the same tokens whatever shares its
batch. Results reach the consumer as events on the sequence's queue: TokenEvent per token, then
FinishEvent or ErrorEvent. The consumer decides text-level stops (stop strings) and calls
`cancel`, which releases the server's KV slot at the next step boundary.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from frontend.engine.triton_client import (
    CacheFull,
    Row,
    StepClient,
    StepError,
    StepOutput,
    StepRejected,
)
from frontend.sampling import NeedFullRow, Sampled, SamplingParams, StepLogits, needs_full_row, sample, window_size

log = logging.getLogger(__name__)


class Overloaded(Exception):
    """The gateway has no room for another sequence now (queue full or wait too long)."""


@dataclass(frozen=True, slots=True)
class TokenEvent:
    token_id: int
    logprob: float
    top_logprobs: tuple[tuple[int, float], ...]


@dataclass(frozen=True, slots=True)
class FinishEvent:
    reason: str  # "stop" (end-of-sequence token) or "length" (max_new_tokens reached)


@dataclass(frozen=True, slots=True)
class ErrorEvent:
    error: Exception


Event = TokenEvent | FinishEvent | ErrorEvent


@dataclass
class ActiveSequence:
    """One generation's state inside the scheduler; the consumer reads `events`."""

    prompt_ids: list[int]
    params: SamplingParams
    max_new_tokens: int
    rng: np.random.Generator
    window: int
    full_rows: bool
    submitted_at: float
    sequence_id: int = field(default_factory=lambda: secrets.randbits(63))
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    generated: list[int] = field(default_factory=list)
    on_server: bool = False
    done: bool = False

    @property
    def temperature(self) -> float:
        return self.params.temperature or 1.0  # greedy: the server scales by 1


class StepObserver(Protocol):
    """Metrics hook (frontend.metrics implements it)."""

    def step_finished(self, rows: int, duration_s: float) -> None: ...
    def full_row_fetched(self, reason: str) -> None: ...
    def queue_changed(self, waiting: int, running: int) -> None: ...


class _NullObserver:
    def step_finished(self, rows: int, duration_s: float) -> None:
        pass

    def full_row_fetched(self, reason: str) -> None:
        pass

    def queue_changed(self, waiting: int, running: int) -> None:
        pass


@dataclass
class _Call:
    seqs: list[ActiveSequence]
    rows: list[Row]
    window: int
    want_logits: bool
    is_start: bool = False


class Scheduler:
    """Owns the step loop of one gateway process."""

    def __init__(
        self,
        client: StepClient,
        *,
        eos_token_id: int,
        vocab_size: int,
        default_window: int = 64,
        max_running: int = 256,
        max_waiting: int = 1024,
        queue_timeout_s: float = 30.0,
        cache_full_backoff_s: float = 0.02,
        observer: StepObserver | None = None,
    ) -> None:
        self.client = client
        self.eos_token_id = eos_token_id
        self.vocab_size = vocab_size
        self.default_window = default_window
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.queue_timeout_s = queue_timeout_s
        self.cache_full_backoff_s = cache_full_backoff_s
        self.observer: StepObserver = observer or _NullObserver()
        self._waiting: deque[ActiveSequence] = deque()
        self._running: list[ActiveSequence] = []
        self._releases: set[int] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    # ------------------------------------------------------------------ public
    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="step-scheduler")

    async def close(self) -> None:
        """Stop the loop; running sequences get an error, and their slots are released."""
        self._closed = True
        for seq in [*self._waiting, *self._running]:
            self._finish(seq, ErrorEvent(Overloaded("the gateway is shutting down")))
        self._waiting.clear()
        if self._releases:
            with contextlib.suppress(StepError):
                await self._send_releases()
        self._wake.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def submit(
        self, prompt_ids: Sequence[int], params: SamplingParams, max_new_tokens: int, seed: int | None
    ) -> ActiveSequence:
        """Queue a generation; raises Overloaded when the waiting queue is full."""
        if self._closed:
            raise Overloaded("the gateway is shutting down")
        if len(self._waiting) >= self.max_waiting:
            raise Overloaded(f"{len(self._waiting)} generations already waiting")
        seq = ActiveSequence(
            prompt_ids=list(prompt_ids),
            params=params,
            max_new_tokens=max_new_tokens,
            rng=np.random.default_rng(seed),
            window=window_size(params, default_window=self.default_window, vocab_size=self.vocab_size),
            full_rows=needs_full_row(params),
            submitted_at=time.monotonic(),
        )
        self._waiting.append(seq)
        self._wake.set()
        return seq

    def cancel(self, seq: ActiveSequence) -> None:
        """Stop a generation (client went away, stop string hit); frees its slot next step."""
        if seq.done:
            return
        seq.done = True
        if seq in self._waiting:
            self._waiting.remove(seq)
        if seq in self._running:
            self._running.remove(seq)
        if seq.on_server:
            self._releases.add(seq.sequence_id)
            seq.on_server = False
        self._wake.set()

    # ------------------------------------------------------------------ loop
    async def _loop(self) -> None:
        while not self._closed:
            if not (self._waiting or self._running or self._releases):
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                progressed = await self._step()
            except Exception:  # the loop must survive anything; the sequences in it got errors
                log.exception("step loop iteration failed")
                progressed = False
            if not progressed:
                await asyncio.sleep(self.cache_full_backoff_s)

    def _admit(self) -> None:
        now = time.monotonic()
        while self._waiting and len(self._running) < self.max_running:
            self._running.append(self._waiting.popleft())
        while self._waiting and now - self._waiting[0].submitted_at > self.queue_timeout_s:
            self._finish(self._waiting.popleft(), ErrorEvent(Overloaded("waited too long for a free slot")))
        self.observer.queue_changed(len(self._waiting), len(self._running))

    async def _step(self) -> bool:
        """One step for everything runnable; returns whether any token was produced or freed."""
        self._admit()
        calls: list[_Call] = []
        decode = [s for s in self._running if s.on_server]
        for full in (False, True):
            group = [s for s in decode if s.full_rows == full]
            releases = [] if full else sorted(self._releases)
            if not full:
                self._releases.clear()
            if group or releases:
                rows = [Row(s.sequence_id, [s.generated[-1]], temperature=s.temperature) for s in group]
                rows += [Row(sid, [], end=True) for sid in releases]
                window = max((s.window for s in group), default=1)
                calls.append(_Call(group, rows, window, want_logits=full))
        for s in self._running:
            if not s.on_server:
                row = Row(s.sequence_id, s.prompt_ids, start=True, temperature=s.temperature)
                calls.append(_Call([s], [row], s.window, want_logits=s.full_rows, is_start=True))
        if not calls:
            return False
        started = time.perf_counter()
        results = await asyncio.gather(*(self._send(c) for c in calls), return_exceptions=True)
        self.observer.step_finished(sum(len(c.rows) for c in calls), time.perf_counter() - started)
        progressed = False
        fetch: list[tuple[ActiveSequence, float, StepLogits]] = []
        for call, result in zip(calls, results, strict=True):
            if isinstance(result, BaseException):
                progressed |= await self._handle_failure(call, result, fetch)
            else:
                progressed = True
                self._sample_rows(call.seqs, result, fetch, started_now=call.is_start)
        if fetch:
            await self._fetch_full_rows(fetch)
        return progressed

    async def _send(self, call: _Call) -> StepOutput:
        return await self.client.step(call.rows, window=call.window, want_logits=call.want_logits)

    async def _handle_failure(
        self, call: _Call, error: BaseException, fetch: list[tuple[ActiveSequence, float, StepLogits]]
    ) -> bool:
        if isinstance(error, CacheFull) and call.is_start:
            seq = call.seqs[0]
            if time.monotonic() - seq.submitted_at > self.queue_timeout_s:
                self._finish(seq, ErrorEvent(Overloaded("the model server's KV cache stayed full")))
                return True
            return False  # stays running, not on the server: its prefill is retried next step
        if isinstance(error, StepRejected) and len(call.rows) > 1:
            # The server refuses a request as a whole and changes nothing: isolate the culprit.
            singles = [
                _Call([s], [r], call.window, call.want_logits) for s, r in zip(call.seqs, call.rows, strict=False)
            ]
            for r in call.rows[len(call.seqs) :]:  # release rows: retried at the next step
                self._releases.add(r.sequence_id)
            results = await asyncio.gather(*(self._send(c) for c in singles), return_exceptions=True)
            for single, result in zip(singles, results, strict=True):
                if isinstance(result, BaseException):
                    self._fail(single.seqs, result)
                else:
                    self._sample_rows(single.seqs, result, fetch, started_now=False)
            return True
        if call.seqs:
            self._fail(call.seqs, error)
        else:
            log.warning("releasing %d sequences failed: %s", len(call.rows), error)
        return True

    def _fail(self, seqs: list[ActiveSequence], error: BaseException) -> None:
        exc = error if isinstance(error, Exception) else RuntimeError(str(error))
        for seq in seqs:
            self._finish(seq, ErrorEvent(exc))

    def _sample_rows(
        self,
        seqs: list[ActiveSequence],
        out: StepOutput,
        fetch: list[tuple[ActiveSequence, float, StepLogits]],
        *,
        started_now: bool,
    ) -> None:
        for i, seq in enumerate(seqs):
            if started_now:
                seq.on_server = True
            if seq.done:  # cancelled while its step was in flight
                if seq.on_server:
                    self._releases.add(seq.sequence_id)
                    seq.on_server = False
                continue
            step = StepLogits(
                out.topk_logits[i],
                out.topk_ids[i],
                float(out.logsumexp[i]),
                out.logits[i] if out.logits is not None else None,
            )
            u = float(seq.rng.random())  # exactly one draw per step, whatever path follows
            try:
                chosen = sample(step, seq.params, u, self._seen(seq))
            except NeedFullRow as why:
                self.observer.full_row_fetched(why.reason)
                fetch.append((seq, u, step))
                continue
            self._emit(seq, chosen)

    async def _fetch_full_rows(self, fetch: list[tuple[ActiveSequence, float, StepLogits]]) -> None:
        rows = [Row(seq.sequence_id, [], temperature=seq.temperature) for seq, _, _ in fetch]
        try:
            out = await self.client.step(rows, window=1, want_logits=True)
        except StepError as err:
            self._fail([seq for seq, _, _ in fetch], err)
            return
        assert out.logits is not None
        for i, (seq, u, step) in enumerate(fetch):
            if seq.done:
                continue
            full = StepLogits(step.topk_logits, step.topk_ids, step.logsumexp, out.logits[i])
            self._emit(seq, sample(full, seq.params, u, self._seen(seq)))

    @staticmethod
    def _seen(seq: ActiveSequence) -> list[int]:
        return seq.prompt_ids + seq.generated if seq.params.repetition_penalty != 1.0 else []

    def _emit(self, seq: ActiveSequence, chosen: Sampled) -> None:
        seq.generated.append(chosen.token_id)
        seq.events.put_nowait(TokenEvent(chosen.token_id, chosen.logprob, chosen.top_logprobs))
        if chosen.token_id == self.eos_token_id:
            self._finish(seq, FinishEvent("stop"))
        elif len(seq.generated) >= seq.max_new_tokens:
            self._finish(seq, FinishEvent("length"))

    def _finish(self, seq: ActiveSequence, event: Event) -> None:
        if not seq.done:
            seq.events.put_nowait(event)
        self.cancel(seq)

    async def _send_releases(self) -> None:
        rows = [Row(sid, [], end=True) for sid in sorted(self._releases)]
        self._releases.clear()
        await self.client.step(rows, window=1)
