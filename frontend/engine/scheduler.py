"""Continuous batching: a loop per lane steps the lane's active sequences of a model together.

The running sequences are split into lanes (`frontend.engine.lanes`: several steps in flight at
once, one lane per KV partition of the model by default). Each iteration of a lane's loop is ONE
request to the step backend (Triton) carrying every row of the lane's step: the prefill of each
newly admitted sequence, one decode row per running sequence, and a release row for each sequence
that finished or was cancelled (a lane with no sequence left sends its releases in a request apart,
which a sequence admitted meanwhile does not wait for). The model answers each row with a status: a
start row refused for lack of a KV slot stays queued and is retried at a later step (while the
cache is full only as many new sequences are offered as slots were freed), a row the model
refuses otherwise fails its own sequence only. (Hand-written: no library does continuous
batching against a stateful Triton step model; vLLM's and TGI's schedulers are tied to their own
engines.)

Two parts live in modules of their own beside this one, mixed into `Scheduler`: the sampling of
a step's rows, batched and exact (`frontend.engine.step_sampling`), and the recovery of sequences
the server lost plus the loop while the circuit breaker is open (`frontend.engine.recovery`).
Results reach the consumer as events on the sequence's sink: TokenEvent per token, then
FinishEvent or ErrorEvent. The consumer decides text-level stops (stop strings) and calls
`cancel`, which releases the server's KV slot at the next step.
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
from typing import TYPE_CHECKING, Protocol

import numpy as np

from frontend.engine.breaker import CircuitBreaker
from frontend.engine.errors import Overloaded, QueueFull, StepError, StepRejected, UpstreamTimeout, UpstreamUnavailable
from frontend.engine.events import ErrorEvent, Event, EventSink
from frontend.engine.lanes import Lane, fewest, make_lanes, sendable
from frontend.engine.recovery import Recovery
from frontend.engine.request import EngineRequest
from frontend.engine.step_rows import ROW_REFUSALS, Row, StepRequest, StepResult, compose
from frontend.engine.step_sampling import StepSampling
from frontend.sampling import (
    AdjustmentTracker,
    LogitAdjustment,
    SamplingParams,
    window_size,
)
from frontend.sampling.uniform import sequence_key, step_uniforms
from step_model.contract import RowStatus

if TYPE_CHECKING:
    from frontend.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class ActiveSequence:
    """One generation's state inside the scheduler; the consumer reads `events`."""

    prompt_ids: list[int]
    params: SamplingParams
    max_new_tokens: int
    rng_key: int  # the sequence's stream of uniforms (frontend.sampling.uniform)
    window: int
    # Its logits are adjusted (logit_bias, penalties, min_tokens) when `adjuster` is set: each step
    # names the adjusted ids to the server for their logits (EXTRA_IDS), or, from a server without
    # that output, asks for full rows (`full_rows`).
    full_rows: bool
    submitted_at: float
    sequence_id: int = field(default_factory=lambda: secrets.randbits(63))
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    generated: list[int] = field(default_factory=list)
    on_server: bool = False
    done: bool = False
    needed_full_row: bool = False  # its last step's window did not decide: ask for the row up front
    # vLLM's stop controls: the end-of-text token does not finish it (ignore_eos); these ids do
    # (stop_ids); and while fewer than min_tokens were generated, `banned` (end-of-text and the stop
    # ids) have probability 0 (the row renormalised without them: a logit adjustment).
    ignore_eos: bool = False
    stop_ids: frozenset[int] = frozenset()
    min_tokens: int = 0
    banned: tuple[int, ...] = ()
    # Lost by the model server (a failed step, a restart): waiting since `parked_at` to start again
    # under a new id with prompt + generated tokens (see Scheduler.resume_timeout_s).
    parked_at: float | None = None
    parked_by: Exception | None = None
    request_id: str = ""  # the HTTP request's id (X-Request-Id): sent with the sequence's rows
    prompt_logprobs: int = -1  # >= 0: send the prompt's logprobs with this many alternatives first
    adjuster: AdjustmentTracker | None = None  # the adjustment of its next token, kept up to date
    # Its tokens must not depend on the rest of its steps (a greedy or seeded generation, per
    # SchedulerConfig.batch_invariant): its start rows are flagged to the model
    # (contract.PARAM_INVARIANT_ROWS), and when it starts again it replays its tokens
    # (contract.PARAM_REPLAY_FROM) instead of prefilling them, so the rebuilt cache is the lost one.
    invariant: bool = False
    # (top_p, top_k, min_p) for the step model's device draw (contract.DRAW) when a step's window
    # cannot hold the cut: sampled sequences without an adjustment; None for the others.
    draw_cuts: tuple[float, float, float] | None = None
    lane: int = 0  # the index of the lane it steps in, from its admission on
    # Cached tokens its next decode row drops first (contract.PARAM_REWIND): those fed after a
    # proposal of its last step that its sampler refused (step_sampling._accept_ahead).
    rewind: int = 0

    def context(self) -> list[int]:
        """The tokens a start row carries: the prompt, plus what was generated when resuming."""
        return self.prompt_ids + self.generated if self.generated else self.prompt_ids

    temperature: float = field(init=False)
    sink: EventSink = field(init=False)  # where events go: `events`, or the engine core's outbox

    def __post_init__(self) -> None:
        self.temperature = self.params.temperature or 1.0  # greedy: the server scales by 1
        self.sink = self.events


class StepObserver(Protocol):
    """Metrics hook (frontend.observability.GatewayMetrics implements it)."""

    def step_finished(self, rows: int, duration_s: float) -> None: ...
    def full_row_fetched(self, reason: str) -> None: ...
    def ahead_judged(self, accepted: int, refused: int) -> None: ...
    def queue_changed(self, waiting: int, running: int) -> None: ...
    def sequence_admitted(self, queue_s: float) -> None: ...


class _NullObserver:
    def step_finished(self, rows: int, duration_s: float) -> None:
        pass

    def full_row_fetched(self, reason: str) -> None:
        pass

    def ahead_judged(self, accepted: int, refused: int) -> None:
        pass

    def queue_changed(self, waiting: int, running: int) -> None:
        pass

    def sequence_admitted(self, queue_s: float) -> None:
        pass


class StepBackend(Protocol):
    """What the scheduler needs from the model server (StepClient implements it; tests script it)."""

    async def step(
        self, rows: StepRequest | Sequence[Row], *, window: int, want_logits: bool = False
    ) -> StepResult: ...


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """The scheduler's knobs (GATEWAY_* settings of the same names, `from_settings`)."""

    default_window: int = 64  # the top-K window a step asks for when sampling needs no wider one
    max_running: int = 256  # sequences stepping together (TritonEngine caps it at the KV slots)
    max_waiting: int = 1024  # generations queued beyond max_running; more are refused (QueueFull)
    queue_timeout_s: float = 30.0  # the longest a generation waits for a slot (Overloaded after)
    cache_full_backoff_s: float = 0.02  # the pause after a step that made no progress
    max_prefill_tokens: int = 16_384  # prompt tokens one step starts (a single longer prompt still goes)
    # A step with prefills costs the decode plus one eager (un-graphed) prompt pass, whose cost
    # barely depends on how many prompts it carries: while sequences are decoding, new ones wait
    # (at most `prefill_hold_s`) until `prefill_batch` of them can start together.
    prefill_batch: int = 16
    prefill_hold_s: float = 0.02
    # Sequences the model server lost (Triton restarted, a step failed in transit) start again on
    # it with their prompt plus the tokens generated so far, under a new id: the n-th token still
    # uses the n-th uniform, so greedy and seeded streams continue token for token. They wait at
    # most resume_timeout_s for a server that takes them (0: fail them at once instead).
    resume_timeout_s: float = 30.0
    # Steps in flight at once (frontend.engine.lanes), at most max_running: TritonEngine sets it
    # from GATEWAY_ENGINE_LANES, or from the model's kv_partitions when that is 0.
    lanes: int = 1
    kv_partitions: int = 1  # the model's: lane i's steps name partition i modulo this (1: none named)
    # Which generations are batch-invariant (ActiveSequence.invariant): "auto" greedy and seeded
    # ones, "on" all, "off" none.
    batch_invariant: str = "auto"
    # Decodes a row runs ahead of its answer per step (contract.PARAM_AHEAD; step_sampling judges
    # each proposal with the sequence's own sampler): 1 + this many tokens per step; 0 = one.
    decode_ahead: int = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> SchedulerConfig:
        return cls(
            default_window=settings.default_window,
            max_running=settings.max_running,
            max_waiting=settings.max_waiting,
            queue_timeout_s=settings.queue_timeout_s,
            prefill_batch=settings.prefill_batch,
            prefill_hold_s=settings.prefill_hold_ms / 1000,
            resume_timeout_s=settings.resume_timeout_s,
            lanes=settings.engine_lanes,
            batch_invariant=settings.batch_invariant,
            decode_ahead=settings.decode_ahead,
        )


class Scheduler(Recovery, StepSampling):
    """Owns the step loop of one model instance (per gateway process, or in the engine core)."""

    # Whether a lane's loop lets the event loop run once between the outcome of a step that started
    # sequences and its next plan: the engine core sets it (frontend.engine.core), whose outbox
    # flushes (`call_soon`) then send the first tokens to the workers before the next step is
    # planned and sent (~0.2 ms sooner on the CPU). Only after such steps: a decode step's successor
    # still goes at once (the steady cadence is unchanged). Not in a gateway process, where the
    # streams woken by the step would run first.
    yield_between_steps = False

    def __init__(
        self,
        client: StepBackend,
        config: SchedulerConfig | None = None,
        *,
        eos_token_id: int,
        vocab_size: int,
        observer: StepObserver | None = None,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        config = config or SchedulerConfig()
        self.client = client
        self.breaker = breaker  # optional: whole-step failures open it; while open nothing is sent but probes
        self.eos_token_id = eos_token_id
        self.vocab_size = vocab_size
        self.default_window = config.default_window
        self.max_running = config.max_running
        self.max_waiting = config.max_waiting
        self.queue_timeout_s = config.queue_timeout_s
        self.cache_full_backoff_s = config.cache_full_backoff_s
        self.max_prefill_tokens = config.max_prefill_tokens
        self.prefill_batch = config.prefill_batch
        self.prefill_hold_s = config.prefill_hold_s
        self.resume_timeout_s = config.resume_timeout_s
        self.batch_invariant = config.batch_invariant
        # The step model returns the logits of ids a row names (contract.EXTRA_IDS): adjusted
        # sequences then need no full rows. False for a model version exported before that input.
        self.extra_logits = True
        # The step model draws rows whose window falls short on the device (contract.DRAW): a wide
        # top-p nucleus then costs no full row. False for a model version exported before it.
        self.device_draws = True
        # Decodes a row may run ahead (SchedulerConfig.decode_ahead); TritonEngine sets 0 for a
        # model version exported before contract.AHEAD_OUTPUTS.
        self.decode_ahead = config.decode_ahead
        self._parked: list[ActiveSequence] = []
        self.observer: StepObserver = observer or _NullObserver()
        self._waiting: deque[ActiveSequence] = deque()
        self._lanes: list[Lane] = make_lanes(min(config.lanes, config.max_running), config.kv_partitions)
        self._releases: set[int] = set()
        # Ids named by a step that timed out: released only after a step sent later (the
        # `_sends`-th and beyond, numbered as sent) succeeded (recovery.py).
        self._deferred_releases: set[int] = set()
        self._sends = 0
        self._deferred_after = 0
        # After a start row was refused for a full cache: how many new sequences the next step
        # may offer (the slots freed since), so a full cache is not asked again and again.
        self._start_allowance: int | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._apart: set[asyncio.Task[None]] = set()  # requests of releases alone (_release_apart)
        self._closed = False

    # ------------------------------------------------------------------ public
    @property
    def running(self) -> int:
        return sum(len(lane.running) for lane in self._lanes)

    @property
    def lanes(self) -> int:
        return len(self._lanes)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def start(self) -> None:
        if not self._tasks:
            self._tasks = [
                asyncio.create_task(self._loop(lane), name=f"step-lane-{lane.index}") for lane in self._lanes
            ]

    async def close(self, settle_s: float = 2.0) -> None:
        """Stop the loops; running sequences get an error, and their slots are released.

        The steps in flight (if any) are let finish first, up to `settle_s`: their outcome says
        which sequences the server now holds, and a release sent beside them could share their
        execution on Triton, where a sequence named twice fails the release request as a whole (a
        KV slot left until the idle sweep)."""
        self._closed = True
        for seq in [*self._waiting, *(s for lane in self._lanes for s in lane.running)]:
            self._finish(seq, ErrorEvent(Overloaded("the gateway is shutting down")))
        self._waiting.clear()
        self._wake_all()
        tasks, self._tasks = [*self._tasks, *self._apart], []
        if tasks:
            _, hung = await asyncio.wait(tasks, timeout=settle_s)  # a hung step (frozen server)
            for task in hung:
                task.cancel()
            for task in tasks:  # a failed loop's error was logged by the loop
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        # Ids of a timed-out step go in a request of their own: if that step is still queued on the
        # server and joins it, only this request is refused (their slots then wait for the idle sweep).
        for ids in (self._releases, self._deferred_releases):
            if ids:
                rows = [Row(sid, [], end=True) for sid in sorted(ids)]
                ids.clear()
                with contextlib.suppress(StepError):
                    await self.client.step(rows, window=1)

    def submit(self, request: EngineRequest, events: EventSink | None = None) -> ActiveSequence:
        """Queue a generation; raises Overloaded when the waiting queue is full. Events go to
        `events` when given, else to a new asyncio.Queue on the returned sequence. The stop
        controls are vLLM's (see `EngineRequest`)."""
        if self._closed:
            raise Overloaded("the gateway is shutting down")
        if self.breaker is not None:
            self.breaker.check()  # raises BreakerOpen: refused at once, no Triton call
        if len(self._waiting) >= self.max_waiting:
            raise QueueFull(f"{len(self._waiting)} generations already waiting")
        params, min_tokens, stop_token_ids = request.params, request.min_tokens, request.stop_token_ids
        adjusted = bool(
            params.repetition_penalty != 1.0
            or params.presence_penalty
            or params.frequency_penalty
            or params.logit_bias
            or min_tokens > 0
        )
        seq = ActiveSequence(
            prompt_ids=list(request.prompt_ids),
            params=params,
            max_new_tokens=request.max_new_tokens,
            rng_key=sequence_key(request.seed, secrets.randbits(64)),
            window=window_size(params, default_window=self.default_window, vocab_size=self.vocab_size),
            full_rows=adjusted and not self.extra_logits,
            submitted_at=time.monotonic(),
            ignore_eos=request.ignore_eos,
            stop_ids=frozenset(stop_token_ids),
            min_tokens=min_tokens,
            banned=tuple(sorted({self.eos_token_id, *stop_token_ids})) if min_tokens > 0 else (),
            request_id=request.request_id or "",
            prompt_logprobs=request.prompt_logprobs,
            draw_cuts=(params.top_p, float(params.top_k), params.min_p)
            if params.temperature > 0.0 and not adjusted
            else None,
            invariant=self.batch_invariant == "on"
            or (self.batch_invariant == "auto" and (request.seed is not None or params.temperature == 0.0)),
        )
        if adjusted:
            seq.adjuster = AdjustmentTracker(
                params,
                seq.prompt_ids,
                banned_ids=seq.banned,
                min_tokens=min_tokens,
                vocab_size=self.vocab_size,
            )
        if events is not None:
            seq.sink = events
        self._waiting.append(seq)
        self._wake_all()
        return seq

    def cancel(self, seq: ActiveSequence) -> None:
        """Stop a generation (client went away, stop string hit); frees its slot next step."""
        if seq.done:
            return
        seq.done = True
        if seq in self._waiting:
            self._waiting.remove(seq)
        lane = self._lanes[seq.lane]
        if seq in lane.running:
            lane.running.remove(seq)
        if seq.on_server:  # a release, sent by the next lane that steps and may (lanes.sendable)
            self._releases.add(seq.sequence_id)
            seq.on_server = False
        self._wake_all()

    # ------------------------------------------------------------------ loop
    def _wake_all(self) -> None:
        for lane in self._lanes:
            lane.wake.set()

    async def _loop(self, lane: Lane) -> None:
        """One lane's cycle: admit, then step its sequences (and the releases it may carry)."""
        while not self._closed:
            if self.breaker is not None and not self.breaker.closed:
                await self._while_open(self.breaker)
                continue
            self._admit()
            if not lane.running:
                # Releases alone go in a request apart: a sequence submitted meanwhile starts at once
                # instead of waiting for that request's answer (its ids are disjoint from them).
                if not lane.releasing and sendable(self._releases, self._lanes, lane):
                    self._release_apart(lane)
                lane.wake.clear()
                await lane.wake.wait()
                continue
            try:
                progressed = await self._step(lane)
            except Exception as err:  # the loop must survive anything, and never retry it forever:
                log.exception("step loop iteration failed")  # what the step held fails, nothing else
                self._fail_stepping(lane, err)
                progressed = False
            if not progressed:
                await asyncio.sleep(self.cache_full_backoff_s)
            elif self.yield_between_steps and lane.prefilled:
                await asyncio.sleep(0)

    def _release_apart(self, lane: Lane) -> None:
        """Send the releases `lane` may carry in a request of their own (the step `_step` would
        send for a lane with no sequence), without holding the lane's loop until it is answered."""
        _, rows, _, uniforms = self._plan(lane)
        ids = rows.sequence_ids.tolist()
        self._releases.difference_update(ids)
        lane.releasing = set(ids)
        task = asyncio.create_task(self._send_releases(lane, rows, uniforms), name=f"release-lane-{lane.index}")
        self._apart.add(task)
        task.add_done_callback(self._apart.discard)

    async def _send_releases(self, lane: Lane, rows: StepRequest, uniforms: np.ndarray) -> None:
        try:
            await self._send(lane, [], rows, [], uniforms)
        except Exception:  # as the loop would: logged, never retried forever
            log.exception("sending releases failed")
        finally:
            lane.releasing = set()
            self._wake_all()  # releases that waited for these ids, and the lane's own next ones

    def _admit(self) -> None:
        """Waiting sequences join the lanes (each the one with the fewest) up to max_running."""
        now = time.monotonic()
        running = self.running
        while self._waiting and running < self.max_running:
            seq = self._waiting.popleft()
            lane = fewest(self._lanes)
            seq.lane = lane.index
            lane.running.append(seq)
            lane.wake.set()
            running += 1
            self.observer.sequence_admitted(now - seq.submitted_at)
        while self._waiting and now - self._waiting[0].submitted_at > self.queue_timeout_s:
            self._finish(self._waiting.popleft(), ErrorEvent(Overloaded("waited too long for a free slot")))
        if self._parked:
            self._expire_parked()
        self.observer.queue_changed(len(self._waiting), self.running)

    def _plan(self, lane: Lane) -> tuple[list[ActiveSequence], StepRequest, list[LogitAdjustment | None], np.ndarray]:
        """The rows of `lane`'s next step: its decodes, then its new sequences (within the prefill
        budget and the start allowance), then the releases it may carry. Returns the stepping sequences, the batch, each
        sequence's logit adjustment for this step (None for most) and the uniform each draws its
        token with (the n-th of its stream for its n-th token: the model's device draw and the
        gateway's sampling use the same one)."""
        seqs = [s for s in lane.running if s.on_server]
        n = len(seqs)
        decode_ids = np.fromiter((s.sequence_id for s in seqs), dtype=np.uint64, count=n)
        decode_tokens = np.fromiter((s.generated[-1] for s in seqs), dtype=np.int64, count=n)
        decode_temperature = np.fromiter((s.temperature for s in seqs), dtype=np.float32, count=n)
        starts: list[tuple[int, Sequence[int], float]] = []
        budget, allowance = self.max_prefill_tokens, self._start_allowance
        new = [s for s in lane.running if not s.on_server] if len(lane.running) > n else []
        if n and new and len(new) < self.prefill_batch:
            oldest = min(s.submitted_at for s in new)
            if time.monotonic() - oldest < self.prefill_hold_s:
                new = []  # held: the next steps decode without them (see prefill_batch)
        for s in new:
            if allowance is not None and allowance <= 0:
                break
            if len(s.prompt_ids) + len(s.generated) > budget and budget < self.max_prefill_tokens:
                break  # the rest waits for the next step; a single long prompt always goes
            context = s.context()
            budget -= len(context)
            allowance = None if allowance is None else allowance - 1
            seqs.append(s)
            starts.append((s.sequence_id, context, s.temperature))
        adjustments = [s.adjuster.current() if s.adjuster is not None else None for s in seqs]
        keys = np.fromiter((s.rng_key for s in seqs), dtype=np.uint64, count=len(seqs))
        counts = np.fromiter((len(s.generated) for s in seqs), dtype=np.uint64, count=len(seqs))
        ahead = self._ahead_counts(seqs[:n])
        ahead_u = None
        if ahead is not None:  # the ahead decodes' uniforms: the next of each stream, in order
            depth = int(ahead.max())
            ahead_u = np.column_stack([step_uniforms(keys[:n], counts[:n] + np.uint64(s)) for s in range(depth)])
            counts[:n] += ahead.astype(np.uint64)  # the answer's uniform comes after them
        uniforms = step_uniforms(keys, counts)
        rewind = np.fromiter((s.rewind for s in seqs[:n]), dtype=np.int32, count=n)
        for s in seqs:  # sent; a sequence starting (again) has no cache to rewind
            s.rewind = 0
        batch = compose(
            decode_ids,
            decode_tokens,
            decode_temperature,
            starts,
            sendable(self._releases, self._lanes, lane),
            [s.request_id for s in seqs],
            # Prompt logprobs: asked on a sequence's first start only (not when it is started again).
            [s.prompt_logprobs if not s.generated else -1 for s in seqs[n:]],
            [a.ids if a is not None else None for a in adjustments] if self.extra_logits else (),
            self._draw_columns(seqs, uniforms) if self.device_draws else None,
            lane.kv_partition,
            start_invariant=[s.invariant for s in seqs[n:]],
            # Started again: an invariant sequence replays the tokens it generated (one decode run
            # each on the model) after its prompt's prefill, as they were computed the first time.
            start_replay_from=[len(s.prompt_ids) if s.generated and s.invariant else -1 for s in seqs[n:]],
            decode_ahead=ahead,
            decode_ahead_u=ahead_u,
            decode_rewind=rewind,
        )
        return seqs, batch, adjustments, uniforms

    def _ahead_counts(self, seqs: list[ActiveSequence]) -> np.ndarray | None:
        """Decodes each decode row runs ahead (None when none does): `decode_ahead`, capped by the
        tokens the sequence still may generate; 0 for a sequence whose logits are adjusted (the
        adjustment changes with every token) or whose last window did not decide its token."""
        if not self.decode_ahead or not seqs:
            return None
        ahead = np.fromiter(
            (
                0
                if s.adjuster is not None or s.needed_full_row
                else max(0, min(self.decode_ahead, s.max_new_tokens - len(s.generated) - 1))
                for s in seqs
            ),
            dtype=np.int32,
            count=len(seqs),
        )
        return ahead if ahead.any() else None

    @staticmethod
    def _draw_columns(seqs: list[ActiveSequence], uniforms: np.ndarray) -> np.ndarray | None:
        """The rows' DRAW columns (u, top_p, top_k, min_p): each sampled sequence's uniform for
        this step and its cuts, so the model can draw it on the device when the window falls
        short; u = -1 for the rows that never ask (greedy, adjusted). None when no row asks."""
        asking = [i for i, s in enumerate(seqs) if s.draw_cuts is not None]
        if not asking:
            return None
        columns = np.full((len(seqs), 4), -1.0)
        columns[asking, 0] = uniforms[asking]
        columns[asking, 1:] = [seqs[i].draw_cuts for i in asking]
        return columns

    def _fail_stepping(self, lane: Lane, err: Exception) -> None:
        """An iteration of `lane` failed outside the per-row paths: fail the generations it held
        (else the next iteration fails the same way, and none of the lane's generations progress)."""
        failed = RuntimeError(f"internal error while stepping this generation ({type(err).__name__})")
        for seq in lane.stepping:
            if seq.on_server:
                self._releases.add(seq.sequence_id)
                seq.on_server = False
            self._finish(seq, ErrorEvent(failed))
        lane.stepping = []

    async def _step(self, lane: Lane) -> bool:
        """One step of `lane`; returns whether any token was produced or freed. While its request is
        on the wire, the ids it names are the lane's `in_flight` (no other request may name them)."""
        lane.stepping = list(lane.running)  # until the plan names the step's own
        seqs, rows, adjustments, uniforms = self._plan(lane)
        lane.stepping = seqs
        if not rows.sequence_ids.shape[0]:
            return False
        self._releases.difference_update(rows.sequence_ids[len(seqs) :].tolist())
        lane.in_flight = set(rows.sequence_ids.tolist())
        lane.prefilled = bool(rows.start.any())
        try:
            return await self._send(lane, seqs, rows, adjustments, uniforms)
        finally:
            lane.in_flight = set()

    async def _send(
        self,
        lane: Lane,
        seqs: list[ActiveSequence],
        rows: StepRequest,
        adjustments: list[LogitAdjustment | None],
        uniforms: np.ndarray,
    ) -> bool:
        """Send a planned step and apply its outcome (`_step`)."""
        n_rows = int(rows.sequence_ids.shape[0])
        released = n_rows - len(seqs)
        window = max((s.window for s in seqs), default=1)
        # When most rows will need their full row anyway (a repetition penalty, or a window that
        # did not decide their last step, e.g. a wide top-p nucleus), ask for the rows in this
        # request instead of a second round trip.
        wanting = sum(1 for s in seqs if s.full_rows or s.needed_full_row)
        want_logits = wanting > 0 and 2 * wanting >= len(seqs)
        self._sends += 1
        sent = self._sends
        started = time.perf_counter()
        try:
            out = await self.client.step(rows, window=window, want_logits=want_logits)
        except StepError as err:
            return self._step_failed(seqs, rows, err)
        if self.breaker is not None:
            self.breaker.record_success()
        self._release_deferred(sent)  # this step was sent after any timed-out one: their ids may go now
        self.observer.step_finished(n_rows, time.perf_counter() - started)
        status = out.status[: len(seqs)]
        self._note_cache_full(seqs, status, released)
        progressed = released > 0 or bool((status != RowStatus.CACHE_FULL).any())
        sampling = self._settle_rows(seqs, status, out)
        if out.prompt_logprobs is not None:
            sampling = self._emit_prompt_logprobs(seqs, sampling, out)
        if rows.ahead is not None and rows.ahead_u is not None and out.ahead_ids is not None:
            sampling = self._accept_ahead(seqs, sampling, out, rows.ahead, rows.ahead_u)
        fetch = self._sample_rows(seqs, sampling, out, adjustments, uniforms)
        if fetch:
            await self._fetch_full_rows(fetch, lane.kv_partition)
        if seqs:  # (none: releases alone, maybe sent apart while the lane steps again)
            lane.stepping = []
        return progressed

    def _step_failed(self, seqs: list[ActiveSequence], rows: StepRequest, err: StepError) -> bool:
        """The whole step failed: the server may or may not have run it. Its ids are released (a
        release of an unknown sequence is a no-op); its sequences start again under new ids once a
        step succeeds (an unreachable, timed-out or restarted server), else fail. Returns whether
        the next attempt may go at once (a refused step), not after a backoff (the server away)."""
        n_rows = int(rows.sequence_ids.shape[0])
        if self.breaker is not None:
            self.breaker.record_failure(err)
        # A timed-out step may still be queued on the server and run in one execution with the
        # next request: releasing its ids there would name them twice (the model refuses that
        # request as a whole). They are released once a later step has succeeded (recovery.py).
        in_doubt = isinstance(err, UpstreamTimeout)
        if in_doubt:
            self._defer_releases(rows.sequence_ids[len(seqs) :].tolist())
        for seq in seqs:
            if self._resumes(seq, err):
                self._park(seq, err, in_doubt=in_doubt)
            else:
                seq.on_server = False  # released here, by the rule above, not by cancel()
                self._finish(seq, ErrorEvent(err))
                (self._deferred_releases if in_doubt else self._releases).add(seq.sequence_id)
        if not seqs and not in_doubt:
            log.warning("releasing %d sequences failed: %s", n_rows, err)
            self._releases.clear()  # Triton's idle sweeper frees them
        return not (self.resume_timeout_s > 0 and isinstance(err, UpstreamUnavailable | UpstreamTimeout))

    def _note_cache_full(self, seqs: list[ActiveSequence], status: np.ndarray, released: int) -> None:
        full = status == RowStatus.CACHE_FULL
        # While the cache is full, offer as many new sequences as slots were freed, and at least
        # one (a slot may also be freed by another caller of the same model).
        self._start_allowance = max(1, released) if full.any() else None
        for i in np.flatnonzero(full).tolist():
            seq = seqs[i]
            if time.monotonic() - (seq.parked_at or seq.submitted_at) > self.queue_timeout_s:
                self._finish(seq, ErrorEvent(Overloaded("the model server's KV cache stayed full")))

    def _settle_rows(self, seqs: list[ActiveSequence], status: np.ndarray, out: StepResult) -> list[int]:
        """Apply each row's status; returns the indices of the rows to sample."""
        if self._parked:
            self._unpark([seqs[i] for i in np.flatnonzero(status == RowStatus.OK).tolist()])
        if not status.any():  # every row OK (the common case): no per-code dispatch
            sampling = []
            for i, seq in enumerate(seqs):
                seq.on_server = True
                if seq.done:
                    self._releases.add(seq.sequence_id)
                    seq.on_server = False
                else:
                    sampling.append(i)
            return sampling
        sampling = []
        for i, seq in enumerate(seqs):
            code = int(status[i])
            if code == RowStatus.OK:
                seq.on_server = True
                if seq.done:  # cancelled while its step was in flight
                    self._releases.add(seq.sequence_id)
                    seq.on_server = False
                else:
                    sampling.append(i)
            elif code == RowStatus.NOT_FOUND and seq.on_server and self.resume_timeout_s > 0 and not seq.done:
                # The server no longer knows it (restarted, or evicted it as idle): start it again.
                self._park(seq, StepRejected(ROW_REFUSALS[code]))
            elif code != RowStatus.CACHE_FULL:
                self._finish(seq, ErrorEvent(StepRejected(ROW_REFUSALS.get(code, f"row status {code}"))))
        return sampling

    def _fail(self, seqs: list[ActiveSequence], error: BaseException) -> None:
        exc = error if isinstance(error, Exception) else RuntimeError(str(error))
        for seq in seqs:
            self._finish(seq, ErrorEvent(exc))

    def _finish(self, seq: ActiveSequence, event: Event) -> None:
        if not seq.done:
            seq.sink.put_nowait(event)
        self.cancel(seq)
