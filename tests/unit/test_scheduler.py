"""The continuous-batching scheduler against a scripted step backend (no Triton).

The backend plays the step model's contract (`step_model.contract`): a KV cache of a few slots,
per-row statuses, release rows, and a window whose top entry is a token chosen per sequence, so
greedy generations are predictable. Tests steer it to refuse rows, fail whole steps or hold a
step in flight.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from frontend.engine.protocol import (
    EngineRequest,
    ErrorEvent,
    Event,
    FinishEvent,
    Overloaded,
    StepRejected,
    TokenEvent,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from frontend.engine.scheduler import Scheduler, SchedulerConfig
from frontend.engine.step_rows import Row, StepRequest, StepResult, compose, from_rows
from frontend.sampling import SamplingParams, StepLogits, sample
from frontend.sampling.uniform import step_uniforms
from step_model.contract import RowStatus
from step_model.draw import draw_rows, needs_draw

pytestmark = [pytest.mark.unit, pytest.mark.asyncio]

VOCAB, EOS, K = 100, 99, 8
GREEDY = SamplingParams(temperature=0.0)


class ScriptedBackend:
    def __init__(self, capacity: int = 4) -> None:
        self.capacity = capacity
        self.live: set[int] = set()
        self.poisoned: set[int] = set()  # decode rows of these sequences are refused as INVALID
        self.fail_at: tuple[int, Exception] | None = None  # (step number, error)
        self.hold: asyncio.Event | None = None  # when set: steps wait for it
        self.delay_s = 0.0  # a step's duration (0: the scheduler's loop never yields between steps)
        self.top_token: dict[int, int] = {}  # sequence id -> its window's top token (default sid % 50 + 1)
        # by_content: the top token is a function of the sequence's tokens so far (as a real model's
        # is), so a sequence started again under a new id continues as it would have.
        self.by_content = False
        self.history: dict[int, list[int]] = {}
        self.batches: list[StepRequest] = []
        self.wanted_logits: list[bool] = []
        self.max_live = 0
        self.refused_full = 0
        self.answer_extras = False  # answer EXTRA_IDS (a model exported with them) or ignore them
        self.answer_draws = False  # draw DRAW rows as the step model does (step_model.draw) or ignore them

    async def step(self, rows: StepRequest | Sequence[Row], *, window: int, want_logits: bool = False) -> StepResult:
        batch = rows if isinstance(rows, StepRequest) else from_rows(rows)
        self.batches.append(batch)
        self.wanted_logits.append(want_logits)
        if self.hold is not None:
            await self.hold.wait()
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.fail_at is not None and self.fail_at[0] == len(self.batches):
            raise self.fail_at[1]
        n = int(batch.sequence_ids.shape[0])
        status = np.zeros(n, dtype=np.int32)
        for i in range(n):
            sid = int(batch.sequence_ids[i])
            if batch.start[i]:
                if sid in self.live:
                    status[i] = RowStatus.ALREADY_EXISTS
                elif len(self.live) >= self.capacity:
                    status[i] = RowStatus.CACHE_FULL
                    self.refused_full += 1
                else:
                    self.live.add(sid)
            elif sid not in self.live:
                if not (batch.end[i] and batch.lengths[i] == 0):
                    status[i] = RowStatus.NOT_FOUND
            elif sid in self.poisoned and batch.lengths[i]:
                status[i] = RowStatus.INVALID
            if batch.end[i] and status[i] == RowStatus.OK:
                self.live.discard(sid)
        self.max_live = max(self.max_live, len(self.live))
        # Window: descending distinct logits; the top token is (sid % 50) + 1.
        values = np.tile(np.arange(window, 0, -1, dtype=np.float32), (n, 1))
        top = (batch.sequence_ids % 50).astype(np.int64) + 1
        if self.by_content:
            for i, sid in enumerate(batch.sequence_ids.tolist()):
                if status[i] == RowStatus.OK and batch.lengths[i]:
                    seen = self.history.setdefault(sid, []) if not batch.start[i] else []
                    seen += batch.input_ids[i, : batch.lengths[i]].tolist()
                    self.history[sid] = seen
                    top[i] = (sum(seen) * 31 + len(seen)) % 50 + 1
        for i, sid in enumerate(batch.sequence_ids.tolist()):
            top[i] = self.top_token.get(sid, top[i])
        ids = (top[:, None] + np.arange(window)[None, :]) % VOCAB
        lse = np.full(n, float(window) + 1.0, dtype=np.float32)
        logits = None
        row = np.full((n, VOCAB), -30.0, dtype=np.float32)
        row[np.arange(n)[:, None], ids] = values
        extra_logits = rest = None
        if self.answer_extras and batch.extra_ids is not None:
            named = np.maximum(batch.extra_ids, 0)
            extra_logits = np.where(batch.extra_ids >= 0, np.take_along_axis(row, named, axis=1), 0.0)
            masked = row.astype(np.float64)
            for i in range(n):
                masked[i, batch.extra_ids[i][batch.extra_ids[i] >= 0]] = -np.inf
            top = masked.max(axis=1, keepdims=True)
            rest = (top[:, 0] + np.log(np.exp(masked - top).sum(axis=1))).astype(np.float32)
        logits = row if want_logits else None
        drawn_ids = drawn_logits = None
        if self.answer_draws and batch.draw is not None:  # the step model's own code, on this row
            drawn_ids, drawn_logits = np.full(n, -1, dtype=np.int64), np.zeros(n, dtype=np.float32)
            want = np.flatnonzero(needs_draw(batch.draw, values, lse) & (status == RowStatus.OK))
            if want.size:
                got = draw_rows(
                    torch.from_numpy(row[want]), torch.from_numpy(lse[want]), torch.from_numpy(batch.draw[want])
                )
                drawn_ids[want], drawn_logits[want] = got[0].numpy(), got[1].numpy()
        return StepResult(
            status,
            values,
            ids,
            lse,
            logits,
            extra_logits=extra_logits,
            rest_logsumexp=rest,
            drawn_ids=drawn_ids,
            drawn_logits=drawn_logits,
        )


def scheduler(backend: ScriptedBackend, *, observer: Any = None, breaker: Any = None, **config: Any) -> Scheduler:
    """A scheduler on `backend`; `config` overrides SchedulerConfig's fields."""
    knobs = SchedulerConfig(default_window=K, cache_full_backoff_s=0.001)
    return Scheduler(
        backend, replace(knobs, **config), eos_token_id=EOS, vocab_size=VOCAB, observer=observer, breaker=breaker
    )


async def drain(events: asyncio.Queue[Event], timeout_s: float = 5.0) -> list[Event]:
    out: list[Event] = []
    while True:
        event = await asyncio.wait_for(events.get(), timeout_s)
        out.append(event)
        if isinstance(event, FinishEvent | ErrorEvent):
            return out


async def test_a_full_cache_queues_new_sequences_and_offers_only_freed_slots() -> None:
    backend = ScriptedBackend(capacity=2)
    sched = scheduler(backend)
    sched.start()
    seqs = [sched.submit(EngineRequest([1, 2, 3], GREEDY, 3, seed=None)) for _ in range(6)]
    results = await asyncio.gather(*(drain(s.events) for s in seqs))  # type: ignore[arg-type]
    for seq, events in zip(seqs, results, strict=True):
        assert [type(e) for e in events] == [TokenEvent] * 3 + [FinishEvent]
        assert all(isinstance(e, TokenEvent) and e.token_id == seq.sequence_id % 50 + 1 for e in events[:3])
    await sched.close()
    assert backend.max_live == 2 and not backend.live
    starts_offered = sum(int(b.start.sum()) for b in backend.batches)
    assert starts_offered == 6 + backend.refused_full  # each sequence started exactly once
    # The first step offered all 6 (4 refused); after that, while the cache stayed full, only as
    # many as slots were freed (at least one) were offered: at most one refusal per later step.
    assert backend.refused_full <= 4 + len(backend.batches) - 1


async def test_a_refused_row_fails_its_own_sequence_only() -> None:
    backend = ScriptedBackend(capacity=4)
    sched = scheduler(backend)
    sched.start()
    good = sched.submit(EngineRequest([1], GREEDY, 4, seed=None))
    bad = sched.submit(EngineRequest([2], GREEDY, 4, seed=None))
    backend.poisoned.add(bad.sequence_id)
    good_events, bad_events = await asyncio.gather(drain(good.events), drain(bad.events))  # type: ignore[arg-type]
    assert isinstance(good_events[-1], FinishEvent) and len(good_events) == 5
    assert isinstance(bad_events[-1], ErrorEvent) and isinstance(bad_events[-1].error, StepRejected)
    assert len(bad_events) == 2  # its first token (from the prefill), then the refusal
    await sched.close()
    assert not backend.live  # the refused sequence was released too


async def test_cancel_while_the_start_row_is_in_flight_releases_the_slot() -> None:
    backend = ScriptedBackend(capacity=4)
    backend.hold = asyncio.Event()
    sched = scheduler(backend)
    sched.start()
    seq = sched.submit(EngineRequest([1, 2], GREEDY, 10, seed=None))
    while not backend.batches:
        await asyncio.sleep(0.001)
    sched.cancel(seq)  # the start row is on its way; the server will create the sequence
    backend.hold.set()
    for _ in range(200):
        if not backend.live and len(backend.batches) >= 2:
            break
        await asyncio.sleep(0.005)
    assert not backend.live
    assert any(b.end.any() and seq.sequence_id in b.sequence_ids[b.end].tolist() for b in backend.batches[1:])
    await sched.close()


async def test_a_sequence_that_never_gets_a_slot_times_out_with_overloaded() -> None:
    backend = ScriptedBackend(capacity=0)
    sched = scheduler(backend, queue_timeout_s=0.05)
    sched.start()
    seq = sched.submit(EngineRequest([1], GREEDY, 2, seed=None))
    events = await drain(seq.events)  # type: ignore[arg-type]
    assert len(events) == 1 and isinstance(events[0], ErrorEvent) and isinstance(events[0].error, Overloaded)
    await sched.close()


async def test_a_failed_step_fails_its_sequences_and_releases_their_ids() -> None:
    backend = ScriptedBackend(capacity=4)
    sched = scheduler(backend, resume_timeout_s=0.0)  # resuming off (tested below)
    sched.start()
    backend.fail_at = (2, UpstreamUnavailable("triton went away"))  # the first decode step
    first = sched.submit(EngineRequest([1], GREEDY, 5, seed=None))
    events = await drain(first.events)  # type: ignore[arg-type]
    assert isinstance(events[0], TokenEvent)
    assert isinstance(events[-1], ErrorEvent) and isinstance(events[-1].error, UpstreamUnavailable)
    later = sched.submit(EngineRequest([2], GREEDY, 2, seed=None))
    assert isinstance((await drain(later.events))[-1], FinishEvent)  # type: ignore[arg-type]
    await sched.close()
    assert not backend.live


async def test_seeded_sampling_is_independent_of_batch_company() -> None:
    params = SamplingParams(temperature=0.8, top_k=5)

    async def run(company: int) -> list[int]:
        backend = ScriptedBackend(capacity=16)
        sched = scheduler(backend)
        sched.start()
        seq = sched.submit(EngineRequest([3, 4], params, 12, seed=1234))
        seq.sequence_id = 7  # the scripted windows depend on the id: keep it fixed
        others = [sched.submit(EngineRequest([5], params, 12, seed=i)) for i in range(company)]
        events = await drain(seq.events)  # type: ignore[arg-type]
        await asyncio.gather(*(drain(o.events) for o in others))  # type: ignore[arg-type]
        await sched.close()
        return [e.token_id for e in events if isinstance(e, TokenEvent)]

    alone = await run(0)
    assert alone == await run(9)
    assert len(set(alone)) > 1  # it really sampled


async def test_rows_whose_window_never_decides_get_their_full_row_in_the_step_itself() -> None:
    # A wide top-p nucleus: the scripted window holds ~58% of the mass, so it decides top-p 0.95
    # only when the draw lands early (the exact bounds). A step whose window did not decide
    # needs a second request for the full row; the next step then asks for the rows itself.
    params = SamplingParams(temperature=0.8, top_p=0.95)

    async def run() -> tuple[list[int], ScriptedBackend]:
        backend = ScriptedBackend(capacity=4)
        sched = scheduler(backend)
        sched.start()
        seq = sched.submit(EngineRequest([1, 2], params, 6, seed=11))
        seq.sequence_id = 5
        events = await drain(seq.events)  # type: ignore[arg-type]
        await sched.close()
        return [e.token_id for e in events if isinstance(e, TokenEvent)], backend

    tokens, backend = await run()
    assert len(tokens) == 6
    calls = list(zip(backend.batches, backend.wanted_logits, strict=True))
    fetches = [i for i, (b, _) in enumerate(calls) if not b.lengths.any() and not b.end.any()]
    carried = [i for i, (b, want) in enumerate(calls) if want and b.lengths.any()]
    assert fetches and carried  # the first undecided step fetched; later ones carried their rows
    assert all(not calls[i - 1][1] for i in fetches)  # never a fetch after a step that had the rows
    assert tokens == (await run())[0]  # deterministic for a seed


async def test_a_full_row_fetch_that_times_out_starts_its_sequence_again() -> None:
    """The fetch of an undecided row's full row is a step like any: when it times out (Triton
    frozen), the sequence starts again as after a timed-out step and finishes; before, it failed with
    the timeout (seen in the fault tier's stall test)."""
    params = SamplingParams(temperature=0.8, top_p=0.95)

    class TimeoutOnFirstFetch(ScriptedBackend):
        failed = False

        async def step(self, rows: Any, *, window: int, want_logits: bool = False) -> StepResult:
            batch = rows if isinstance(rows, StepRequest) else from_rows(rows)
            fetch = not batch.lengths.any() and not batch.end.any()
            if fetch and not self.failed:
                self.failed = True
                self.batches.append(batch)
                self.wanted_logits.append(want_logits)
                raise UpstreamTimeout("Deadline Exceeded")
            return await super().step(rows, window=window, want_logits=want_logits)

    async def run(backend: ScriptedBackend) -> list[int]:
        backend.by_content = True  # a sequence started again under a new id continues as before
        sched = scheduler(backend)
        sched.start()
        seq = sched.submit(EngineRequest([1, 2], params, 6, seed=11))
        events = await drain(seq.events)  # type: ignore[arg-type]
        await sched.close()
        assert isinstance(events[-1], FinishEvent), events[-1]
        return [e.token_id for e in events if isinstance(e, TokenEvent)]

    failing = TimeoutOnFirstFetch(capacity=4)
    # (the scripted full rows follow the sequence id, which a restart changes, so the tokens after
    # it are not compared here; test_scheduler_ahead's restart test compares them on the real engine)
    assert len(await run(failing)) == 6
    assert failing.failed and sum(int(b.start.sum()) for b in failing.batches) == 2  # started again once


async def test_rows_the_model_draws_on_the_device_fetch_no_full_row_and_get_the_full_rows_tokens() -> None:
    """The same wide nucleus against a model that draws on the device (contract.DRAW): every step
    carries the sampled row's uniform and cuts (greedy rows never ask), no full row is ever
    fetched or carried, and each token is the one the gateway's full-row sampler picks from that
    row with that step's uniform."""
    params = SamplingParams(temperature=0.8, top_p=0.95)
    backend = ScriptedBackend(capacity=4)
    backend.answer_draws = True
    sched = scheduler(backend)
    sched.start()
    seq = sched.submit(EngineRequest([1, 2], params, 6, seed=11))
    seq.sequence_id = 5
    greedy = sched.submit(EngineRequest([3], GREEDY, 6, seed=None))
    events = await drain(seq.events)  # type: ignore[arg-type]
    await drain(greedy.events)  # type: ignore[arg-type]
    await sched.close()
    tokens = [e.token_id for e in events if isinstance(e, TokenEvent)]
    assert len(tokens) == 6 and not any(backend.wanted_logits)
    stepping = [b for b in backend.batches if b.lengths.any()]
    for batch in stepping:
        assert batch.draw is not None
        rows = np.flatnonzero(batch.lengths > 0)
        assert ((batch.draw[rows, 0] >= 0) == (batch.sequence_ids[rows] == 5)).all()  # not the greedy row
    # The scripted row of sequence 5 (see ScriptedBackend.step), the same every step.
    window = 64
    row = np.full(VOCAB, -30.0, dtype=np.float32)
    row[(6 + np.arange(window)) % VOCAB] = np.arange(window, 0, -1)
    u = step_uniforms(np.full(6, seq.rng_key, dtype=np.uint64), np.arange(6, dtype=np.uint64))
    full = StepLogits(np.zeros(1, np.float32), np.zeros(1, np.int64), float(window) + 1.0, full_logits=row)
    assert tokens == [sample(full, params, float(u[k])).token_id for k in range(6)]


async def test_new_sequences_wait_to_start_together_while_others_decode() -> None:
    backend = ScriptedBackend(capacity=16)
    backend.delay_s = 0.001
    sched = scheduler(backend, prefill_batch=3, prefill_hold_s=60.0)  # only the batch size releases them
    sched.start()
    first = sched.submit(EngineRequest([1], GREEDY, 50, seed=None))
    await first.events.get()  # it started alone at once: nothing was decoding
    late = [sched.submit(EngineRequest([2], GREEDY, 2, seed=None)) for _ in range(2)]
    for _ in range(5):  # two waiting (< 3): the steps carry the decode only
        await first.events.get()
    assert not first.done and not any(s.on_server for s in late)
    third = sched.submit(EngineRequest([3], GREEDY, 2, seed=None))
    await asyncio.gather(*(drain(s.events) for s in [*late, third]))  # type: ignore[arg-type]
    starts = [int(b.start.sum()) for b in backend.batches]
    assert starts[0] == 1 and 3 in starts and set(starts) <= {0, 1, 3}  # the three started in one step
    sched.cancel(first)
    await sched.close()


async def test_a_held_sequence_starts_once_it_has_waited_prefill_hold_s() -> None:
    backend = ScriptedBackend(capacity=16)
    backend.delay_s = 0.001
    sched = scheduler(backend, prefill_batch=100, prefill_hold_s=0.05)
    sched.start()
    first = sched.submit(EngineRequest([1], GREEDY, 10_000, seed=None))
    await first.events.get()
    late = sched.submit(EngineRequest([2], GREEDY, 2, seed=None))
    await late.events.get()  # its first token: it started
    assert time.monotonic() - late.submitted_at >= 0.05  # not before it had waited prefill_hold_s
    events = await drain(late.events)  # type: ignore[arg-type]
    assert [type(e) for e in events] == [TokenEvent, FinishEvent]
    held_steps = next(i for i, b in enumerate(backend.batches) if b.start.any() and i > 0) - 1
    assert held_steps > 5  # decode-only steps ran while it was held
    sched.cancel(first)
    await sched.close()


async def test_stop_controls_ignore_eos_stop_token_ids_and_min_tokens() -> None:
    backend = ScriptedBackend(capacity=8)
    sched = scheduler(backend)
    sched.start()
    plain = sched.submit(EngineRequest([1], GREEDY, 6, seed=None))
    ignoring = sched.submit(EngineRequest([1], GREEDY, 4, seed=None, ignore_eos=True))
    stopping = sched.submit(EngineRequest([1], GREEDY, 6, seed=None, stop_token_ids=[7]))
    held = sched.submit(EngineRequest([1], GREEDY, 6, seed=None, min_tokens=3))
    for seq in (plain, ignoring, held):
        backend.top_token[seq.sequence_id] = EOS  # greedy would end them at once
    backend.top_token[stopping.sequence_id] = 7
    got = {}
    for name, seq in (("plain", plain), ("ignoring", ignoring), ("stopping", stopping), ("held", held)):
        events = await drain(seq.events)  # type: ignore[arg-type]
        tokens = [e.token_id for e in events if isinstance(e, TokenEvent)]
        assert isinstance(events[-1], FinishEvent)
        got[name] = (tokens, events[-1].reason)
    assert got["plain"] == ([EOS], "stop")
    assert got["ignoring"] == ([EOS] * 4, "length")  # emitted like any token, only the length ends it
    assert got["stopping"] == ([7], "stop")
    # While fewer than 3 tokens exist, EOS has probability 0: greedy takes the next best (EOS + 1),
    # from the full row (the window cannot renormalise without EOS's share); then EOS ends it.
    assert got["held"] == ([(EOS + 1) % VOCAB] * 3 + [EOS], "stop")
    assert any(backend.wanted_logits)
    await sched.close()
    assert not backend.live


async def test_each_admission_reports_its_queue_time() -> None:
    class Recorder:
        def __init__(self) -> None:
            self.queued: list[float] = []

        def step_finished(self, rows: int, duration_s: float) -> None: ...
        def full_row_fetched(self, reason: str) -> None: ...
        def ahead_judged(self, accepted: int, refused: int) -> None: ...
        def queue_changed(self, waiting: int, running: int) -> None: ...
        def sequence_admitted(self, queue_s: float) -> None:
            self.queued.append(queue_s)

    recorder = Recorder()
    backend = ScriptedBackend(capacity=8)
    sched = scheduler(backend, max_running=1, observer=recorder)  # one at a time: the others queue
    sched.start()
    seqs = [sched.submit(EngineRequest([1], GREEDY, 3, seed=None)) for _ in range(3)]
    await asyncio.gather(*(drain(s.events) for s in seqs))  # type: ignore[arg-type]
    await sched.close()
    assert len(recorder.queued) == 3 and all(q >= 0 for q in recorder.queued)
    assert recorder.queued[2] > recorder.queued[0]  # the last one waited for two generations


def restart(backend: ScriptedBackend) -> None:
    """The model server restarted: it knows no sequence any more."""
    backend.live.clear()
    backend.history.clear()


async def greedy_tokens(backend: ScriptedBackend, n: int, **kwargs: object) -> tuple[list[Event], Scheduler]:
    sched = scheduler(backend, **kwargs)
    sched.start()
    seq = sched.submit(EngineRequest([5, 6, 7], GREEDY, n, seed=None))
    return await drain(seq.events), sched  # type: ignore[arg-type]


async def test_a_restarted_server_gets_the_sequence_again_and_it_continues_token_for_token() -> None:
    undisturbed = ScriptedBackend(capacity=4)
    undisturbed.by_content = True
    expected, sched = await greedy_tokens(undisturbed, 12)
    await sched.close()

    # 1. The step in flight fails (Triton went away); the server comes back empty.
    backend = ScriptedBackend(capacity=4)
    backend.by_content = True
    backend.fail_at = (6, UpstreamUnavailable("connection refused"))
    real_step = backend.step

    async def step_then_restart(rows, *, window, want_logits=False):  # type: ignore[no-untyped-def]
        if len(backend.batches) + 1 == backend.fail_at[0]:  # type: ignore[index]
            restart(backend)
        return await real_step(rows, window=window, want_logits=want_logits)

    backend.step = step_then_restart  # type: ignore[method-assign]
    got, sched = await greedy_tokens(backend, 12)
    await sched.close()
    assert got == expected and isinstance(got[-1], FinishEvent)
    resumed = [b for b in backend.batches[6:] if b.start.any()]
    assert resumed and int(resumed[0].lengths[resumed[0].start][0]) == 3 + 5  # prompt + the 5 tokens so far
    assert not backend.live

    # 2. The server restarted between two steps: the next decode row is NOT_FOUND.
    backend = ScriptedBackend(capacity=4)
    backend.by_content = True
    real_step2 = backend.step

    async def restart_before_step_5(rows, *, window, want_logits=False):  # type: ignore[no-untyped-def]
        if len(backend.batches) == 4:
            restart(backend)
        return await real_step2(rows, window=window, want_logits=want_logits)

    backend.step = restart_before_step_5  # type: ignore[method-assign]
    got, sched = await greedy_tokens(backend, 12)
    await sched.close()
    assert got == expected


@pytest.mark.parametrize(
    ("mode", "seed", "temperature", "invariant"),
    [("auto", None, 0.0, True), ("auto", 7, 0.8, True), ("auto", None, 0.8, False), ("off", 7, 0.8, False)],
)
async def test_batch_invariant_sequences_are_flagged_and_replay_their_tokens_when_resumed(
    mode: str, seed: int | None, temperature: float, invariant: bool
) -> None:
    """GATEWAY_BATCH_INVARIANT: greedy and seeded generations (auto) flag their start rows
    (contract.PARAM_INVARIANT_ROWS), and when the server lost them start again with prompt +
    tokens and replay_from = the prompt's length (the model replays the tokens one decode run
    each, step_model.engine); the others, and every one with "off", prefill prompt + tokens."""
    backend = ScriptedBackend(capacity=4)
    backend.by_content = True
    backend.answer_draws = True  # no full-row fetches: every step is a decode step
    real_step = backend.step

    async def restart_before_step_5(rows, *, window, want_logits=False):  # type: ignore[no-untyped-def]
        if len(backend.batches) == 4:
            restart(backend)
        return await real_step(rows, window=window, want_logits=want_logits)

    backend.step = restart_before_step_5  # type: ignore[method-assign]
    sched = scheduler(backend, batch_invariant=mode)
    sched.start()
    params = SamplingParams(temperature=temperature, top_p=0.9 if temperature else 1.0)
    request = EngineRequest([5, 6, 7], params, 8, seed=seed, ignore_eos=True)
    events = await drain(sched.submit(request).events)  # type: ignore[arg-type]
    await sched.close()
    assert isinstance(events[-1], FinishEvent)
    first, again = [b for b in backend.batches if b.start.any()][:2]
    flags = [b.invariant[b.start].tolist() if b.invariant is not None else [False] for b in (first, again)]
    assert flags == [[invariant], [invariant]]
    assert first.replay_from is None
    assert int(again.lengths[again.start][0]) > 3  # the prompt and the tokens generated before
    assert (again.replay_from[again.start].tolist() if again.replay_from is not None else None) == (
        [3] if invariant else None
    )


async def test_a_server_that_does_not_come_back_fails_the_sequence_after_resume_timeout_s() -> None:
    backend = ScriptedBackend(capacity=4)
    backend.delay_s = 0.001
    sched = scheduler(backend, resume_timeout_s=0.2)
    sched.start()
    seq = sched.submit(EngineRequest([1], GREEDY, 10_000, seed=None))
    await seq.events.get()

    async def always_down(rows, *, window, want_logits=False):  # type: ignore[no-untyped-def]
        raise UpstreamUnavailable("down")

    backend.step = always_down  # type: ignore[method-assign]
    started = time.monotonic()
    events = await drain(seq.events)  # type: ignore[arg-type]
    assert isinstance(events[-1], ErrorEvent) and isinstance(events[-1].error, UpstreamUnavailable)
    assert time.monotonic() - started >= 0.2  # parked until resume_timeout_s, then failed
    await sched.close()


async def test_with_resume_off_a_failed_step_fails_its_sequences_at_once() -> None:
    backend = ScriptedBackend(capacity=4)
    backend.fail_at = (3, UpstreamUnavailable("down"))
    events, sched = await greedy_tokens(backend, 12, resume_timeout_s=0.0)
    await sched.close()
    assert isinstance(events[-1], ErrorEvent) and len(events) == 3  # two tokens, then the error


async def test_rows_carry_their_generations_request_ids() -> None:
    backend = ScriptedBackend(capacity=4)
    backend.delay_s = 0.001
    sched = scheduler(backend, prefill_hold_s=0.0)
    sched.start()
    named = sched.submit(EngineRequest([1], GREEDY, 3, seed=None, request_id="req-a"))
    anonymous = sched.submit(EngineRequest([2], GREEDY, 3, seed=None))
    await asyncio.gather(drain(named.events), drain(anonymous.events))  # type: ignore[arg-type]
    await sched.close()
    first = backend.batches[0]
    by_id = dict(zip(first.sequence_ids.tolist(), first.request_ids, strict=True))
    assert by_id == {named.sequence_id: "req-a", anonymous.sequence_id: ""}


async def test_adjusted_sequences_name_their_ids_and_need_no_full_rows() -> None:
    """A repetition penalty and min_tokens: every step names the row's adjusted ids (prompt and
    generated tokens; end-of-text and stop ids while under min_tokens), and with their logits
    returned no step asks for full rows."""
    backend = ScriptedBackend(capacity=4)
    backend.answer_extras = True
    sched = scheduler(backend)
    sched.start()
    penalty = SamplingParams(temperature=0.8, repetition_penalty=1.3)
    seq = sched.submit(EngineRequest([1, 2, 3], penalty, 4, seed=7, min_tokens=2, stop_token_ids=[42]))
    # Its window far from the stop id (by default it follows the random sequence id: one in ~50 runs
    # put 42 among the likely tokens and the sequence stopped there, after min_tokens).
    backend.top_token[seq.sequence_id] = 1
    plain = sched.submit(EngineRequest([5], GREEDY, 4, seed=None))
    events = await drain(seq.events)  # type: ignore[arg-type]
    await drain(plain.events)  # type: ignore[arg-type]
    await sched.close()
    tokens = [e.token_id for e in events if isinstance(e, TokenEvent)]
    assert len(tokens) == 4 and isinstance(events[-1], FinishEvent)
    assert not any(backend.wanted_logits)
    named = []
    for batch in backend.batches:
        rows = np.flatnonzero(batch.sequence_ids == seq.sequence_id)
        if rows.size and batch.lengths[rows[0]]:
            assert batch.extra_ids is not None
            named.append([int(t) for t in batch.extra_ids[rows[0]] if t >= 0])
    assert len(named) == 4  # the start row and three decode rows
    for step, ids in enumerate(named):
        seen = {1, 2, 3, *tokens[:step]}
        banned = {EOS, 42} if step < 2 else set()
        assert ids == sorted(seen | banned)


async def test_close_lets_the_step_in_flight_finish_before_releasing() -> None:
    """A release sent beside the step in flight could share its Triton execution, where a sequence
    named twice fails the release request as a whole: close waits for the step, then releases."""
    backend = ScriptedBackend(capacity=4)
    backend.delay_s = 0.05
    calls = {"now": 0, "most": 0}
    step = backend.step

    async def counted(rows: StepRequest | Sequence[Row], *, window: int, want_logits: bool = False) -> StepResult:
        calls["now"] += 1
        calls["most"] = max(calls["most"], calls["now"])
        try:
            return await step(rows, window=window, want_logits=want_logits)
        finally:
            calls["now"] -= 1

    backend.step = counted  # type: ignore[method-assign]
    sched = scheduler(backend)
    sched.start()
    seqs = [sched.submit(EngineRequest([1, 2], GREEDY, 50, seed=None)) for _ in range(3)]
    while not backend.live:
        await asyncio.sleep(0.005)
    await asyncio.sleep(0.02)  # a decode step is in flight now
    await sched.close()
    assert calls["most"] == 1  # never two steps at once
    assert backend.live == set()  # every slot released
    for seq in seqs:
        events = await drain(seq.events)  # type: ignore[arg-type]
        assert isinstance(events[-1], ErrorEvent)


async def test_a_composed_step_is_the_step_models_own_request() -> None:
    """Decode rows, then start rows, then releases, as the columns `step_model.rows.StepRequest`
    has on both sides of gRPC; the optional columns only when some row uses them."""
    batch = compose(
        np.array([11], dtype=np.uint64),
        np.array([5]),
        np.array([0.7], dtype=np.float32),
        [(12, [1, 2, 3], 1.0)],
        [13],
        request_ids=["a", "b"],
        start_prompt_logprobs=[2],
        extra_ids=[np.array([4, 9]), None],
    )
    assert isinstance(batch, StepRequest)
    assert batch.sequence_ids.tolist() == [11, 12, 13] and batch.lengths.tolist() == [1, 3, 0]
    assert batch.input_ids.tolist() == [[5, 0, 0], [1, 2, 3], [0, 0, 0]]
    assert batch.start.tolist() == [False, True, False] and batch.end.tolist() == [False, False, True]
    assert batch.request_ids == ("a", "b", "")
    assert batch.prompt_logprobs is not None and batch.prompt_logprobs.tolist() == [-1, 2, -1]
    assert batch.extra_ids is not None and batch.extra_ids.tolist() == [[4, 9], [-1, -1], [-1, -1]]
    plain = compose(np.array([11], dtype=np.uint64), np.array([5]), np.array([1.0], dtype=np.float32), [], [])
    assert plain.request_ids == () and plain.prompt_logprobs is None and plain.extra_ids is None


async def test_the_scheduler_imports_neither_grpc_nor_the_model_runtime() -> None:
    code = (
        "import sys, frontend.engine.scheduler\n"
        "loaded = [m for m in ('tritonclient', 'grpc', 'torch', 'onnxruntime') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2], timeout=120)


class _FlushingSink:
    """An event sink that, like the engine core's, flushes what a step emitted in a callback the
    event loop runs next (`loop.call_soon`), and logs when."""

    def __init__(self, log: list[str]) -> None:
        self.log = log
        self.scheduled = False

    def put_nowait(self, event: Event, /) -> None:
        if not self.scheduled:
            self.scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self.scheduled = False
        self.log.append("flush")


class _LoggingBackend(ScriptedBackend):
    def __init__(self, log: list[str]) -> None:
        super().__init__()
        self.log = log

    async def step(self, rows: StepRequest | Sequence[Row], *, window: int, want_logits: bool = False) -> StepResult:
        self.log.append("step")
        return await super().step(rows, window=window, want_logits=want_logits)


@pytest.mark.parametrize("yields", [False, True])
async def test_in_the_engine_core_a_steps_events_leave_before_the_next_step_is_sent(
    yields: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`Scheduler.yield_between_steps` (set in the engine-core process): the loop lets the event
    loop run between the outcome of a step that started sequences and the next step, so the core's
    outbox flush (the first token) goes first; decode steps follow each other as before. Without
    it (a gateway process) the next step is sent first."""
    monkeypatch.setattr(Scheduler, "yield_between_steps", yields)
    log: list[str] = []
    sched = scheduler(_LoggingBackend(log))
    seq = sched.submit(EngineRequest([1, 2], GREEDY, 3, seed=None), _FlushingSink(log))
    sched.start()
    async with asyncio.timeout(5):
        while not seq.done:
            await asyncio.sleep(0.001)
    await asyncio.sleep(0.01)
    await sched.close()
    # three steps of one token each, then the release
    if yields:  # the first token leaves before the next step; the two decode steps go back to back
        assert log == ["step", "flush", "step", "step", "flush", "step"]
    else:  # nothing yields in between (the backend answers at once): one flush after them all, then
        # the release (a request apart: its task runs after the flush)
        assert log == ["step"] * 3 + ["flush", "step"]
