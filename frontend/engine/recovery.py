"""The scheduler's recovery: sequences the model server lost, and the loop while the breaker is open.

A sequence the server lost (a step that failed in transit, a decode row answered NOT_FOUND after a
restart) is *parked*: its id is released, it gets a new one, and it starts again with its prompt
plus the tokens generated so far on the next step that succeeds (`_park`, `_unpark`); one parked
longer than `resume_timeout_s` fails with the error that parked it (`_expire_parked`). While the
circuit breaker is open the loop sends nothing but one probe step per reset timeout
(`_while_open`).

Several instances of one model (`frontend.engine.placement`): when an instance's breaker opens,
its loop first calls `on_breaker_open`, where the placement layer takes the instance's sequences
(`take_sequences`) and hands them to a healthy instance (`adopt`): there they start again in the
same way, from prompt plus generated tokens.

A mixin of `frontend.engine.scheduler.Scheduler`, not an object of its own: these methods read
and change the scheduler's queues, releases and parked list in the same synchronous passes as
the step loop, and keeping them methods keeps their bodies as they were in the scheduler.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from frontend.engine.errors import Overloaded, StepError, StepRejected, UpstreamTimeout, UpstreamUnavailable
from frontend.engine.events import ErrorEvent, Event
from frontend.engine.lanes import fewest, sendable
from frontend.engine.step_rows import Row

if TYPE_CHECKING:
    from collections import deque
    from collections.abc import Iterable

    from frontend.engine.breaker import CircuitBreaker
    from frontend.engine.lanes import Lane
    from frontend.engine.scheduler import ActiveSequence, StepBackend, StepObserver

log = logging.getLogger("frontend.engine.scheduler")


class Recovery:
    """Parking, resuming and the breaker-open loop (mixed into `Scheduler`)."""

    client: StepBackend
    observer: StepObserver
    resume_timeout_s: float
    _waiting: deque[ActiveSequence]
    _lanes: list[Lane]
    _releases: set[int]
    _deferred_releases: set[int]
    _sends: int  # requests the lanes and probes sent so far
    _deferred_after: int  # the deferred ids go after a success of a request sent later than this
    _parked: list[ActiveSequence]
    # Called by the loop each time it finds the breaker open, before it fails what is queued: a
    # placement layer over several instances takes this instance's sequences to a healthy one.
    on_breaker_open: Callable[[], None] | None = None

    def _finish(self, seq: ActiveSequence, event: Event) -> None:
        raise NotImplementedError  # the scheduler's

    def _wake_all(self) -> None:
        raise NotImplementedError  # the scheduler's

    async def _while_open(self, breaker: CircuitBreaker) -> None:
        """The breaker is open: fail what is queued (no Triton call), and once per reset timeout
        send one probe step (a one-token sequence that starts and ends at once, plus the pending
        releases); its outcome closes or re-opens the breaker."""
        if self.on_breaker_open is not None:
            try:
                self.on_breaker_open()
            except Exception:  # the loop must go on: what was not handed over is handled below
                log.exception("handing this instance's sequences over failed")
        # New work is refused at once; streams the server lost wait (parked) for it to return. A
        # generation that has produced nothing yet is new work: it fails now, not after the outage.
        running = [s for lane in self._lanes for s in lane.running]
        pending = [*self._waiting, *(s for s in running if s.parked_at is None or not s.generated)]
        self._waiting.clear()
        self._expire_parked()
        if pending:
            try:
                breaker.check()
            except StepError as err:
                for seq in pending:
                    self._finish(seq, ErrorEvent(err))
        self.observer.queue_changed(len(self._waiting), sum(len(lane.running) for lane in self._lanes))
        if not breaker.probe_due():
            await asyncio.sleep(min(breaker.retry_after_s(), 0.05))
            return
        releases = sendable(self._releases, self._lanes, None)  # a lane's step may still be in flight
        self._releases.difference_update(releases)
        rows = [Row(secrets.randbits(63), [0], start=True, end=True), *(Row(s, [], end=True) for s in releases)]
        self._sends += 1
        sent = self._sends
        try:
            await self.client.step(rows, window=1)
        except StepError as err:
            log.warning("circuit breaker probe failed: %s", err)
            breaker.record_failure(err)
            # Releases are idempotent: sent again by the next probe (a timed-out one's, once one succeeded).
            if isinstance(err, UpstreamTimeout):
                self._defer_releases(releases)
            else:
                self._releases.update(releases)
            return
        log.info("circuit breaker probe succeeded; closing")
        breaker.record_success()
        self._release_deferred(sent)

    def _resumes(self, seq: ActiveSequence, error: StepError) -> bool:
        """Whether `seq`, whose step failed as a whole with `error`, starts again (else it fails).

        The server away (unreachable, timed out, failing inside): yes, until `resume_timeout_s`.
        The request refused as malformed (nothing ran): once. A timed-out step still queued on the
        server may have joined it in one execution ("a sequence appears twice in one step"); a
        request the model refuses again is the gateway's bug, and fails."""
        if seq.done or self.resume_timeout_s <= 0:
            return False
        if isinstance(error, UpstreamUnavailable | UpstreamTimeout):
            return True
        return isinstance(error, StepRejected) and not isinstance(seq.parked_by, StepRejected)

    def _defer_releases(self, ids: Iterable[int]) -> None:
        """Ids a timed-out step named: released with the first step sent after one sent from now on
        has succeeded (`_release_deferred`)."""
        self._deferred_releases.update(ids)
        self._deferred_after = self._sends

    def _release_deferred(self, sent: int) -> None:
        """The `sent`-th request succeeded. When it was sent after the last timed-out one had been
        given up on, anything queued before it on the server has run (Triton's batcher takes
        requests in order), so the timed-out steps' ids can be released without meeting them. A
        request sent earlier (another lane's, in flight meanwhile) proves nothing."""
        if self._deferred_releases and sent > self._deferred_after:
            self._releases |= self._deferred_releases
            self._deferred_releases.clear()

    def _park(self, seq: ActiveSequence, error: Exception, *, in_doubt: bool = False) -> None:
        """The server lost `seq` (or may have): release its id, and start it again under a new one.
        `in_doubt`: its step timed out and may still run; its id is released later (`_defer_releases`)."""
        (self._deferred_releases if in_doubt else self._releases).add(seq.sequence_id)
        seq.sequence_id = secrets.randbits(63)
        seq.on_server = False
        if seq.parked_at is None:
            seq.parked_at, seq.parked_by = time.monotonic(), error
            self._parked.append(seq)
            log.info("sequence lost by the model server (%s); it starts again on the next step", error)

    def _unpark(self, started: list[ActiveSequence]) -> None:
        for seq in started:
            if seq.parked_at is not None:
                seq.parked_at = seq.parked_by = None
        self._parked = [s for s in self._parked if s.parked_at is not None and not s.done]

    def _expire_parked(self) -> None:
        now = time.monotonic()
        for seq in [s for s in self._parked if s.parked_at is not None and now - s.parked_at > self.resume_timeout_s]:
            self._finish(seq, ErrorEvent(seq.parked_by or Overloaded("the model server did not come back")))
        self._parked = [s for s in self._parked if not s.done]

    def take_sequences(self) -> list[ActiveSequence]:
        """Remove every live sequence (queued, running, parked) that no step on the wire names, and
        return them, for another instance of the model to `adopt`; the slots this server holds
        for them are released with its next step. A sequence in a lane's step under way stays until
        that step's outcome is known: the loops call `on_breaker_open` again while the breaker is
        open, and take it then."""
        busy = {id(s) for lane in self._lanes if lane.in_flight for s in lane.stepping}
        taken = [s for s in self._waiting if not s.done]
        for lane in self._lanes:
            taken += [s for s in lane.running if not s.done and id(s) not in busy]
            lane.running[:] = [s for s in lane.running if id(s) in busy]
        for seq in taken:
            if seq.on_server:
                self._releases.add(seq.sequence_id)
                seq.on_server = False
                seq.sequence_id = secrets.randbits(63)
        self._waiting.clear()
        self._parked = [s for s in self._parked if id(s) in busy]
        self.observer.queue_changed(0, sum(len(lane.running) for lane in self._lanes))
        return taken

    def adopt(self, sequences: Iterable[ActiveSequence], error: Exception) -> None:
        """Take sequences another instance of the model lost (`take_sequences`). One that has
        generated tokens starts again here at once with its prompt plus those tokens, as a
        sequence this server lost does (parked since it was lost, or since now with `error`); one
        that has not queues here in submission order (its queue timeout counts from its
        submission). Neither limit (max_running, max_waiting) refuses them: they were admitted."""
        now = time.monotonic()
        queued = []
        for seq in sequences:
            if seq.done:
                continue
            if seq.generated:
                if seq.parked_at is None:
                    seq.parked_at, seq.parked_by = now, error
                lane = fewest(self._lanes)
                seq.lane = lane.index
                lane.running.append(seq)
                lane.wake.set()
                self._parked.append(seq)
            else:
                seq.parked_at = seq.parked_by = None
                queued.append(seq)
        if queued:
            merged = sorted([*self._waiting, *queued], key=lambda s: s.submitted_at)
            self._waiting.clear()
            self._waiting.extend(merged)
        self.observer.queue_changed(len(self._waiting), sum(len(lane.running) for lane in self._lanes))
        self._wake_all()
