"""A circuit breaker for the step calls to Triton.

closed ──(N consecutive whole-step failures)──▶ open ──(reset timeout)──▶ half_open
  ▲                                               ▲                          │
  └──────────────(the probe step succeeds)────────┴──(the probe step fails)──┘

While it is not closed the scheduler refuses new generations at once (`BreakerOpen`: 503 with
Retry-After, no Triton call) and sends nothing to Triton except ONE probe step per reset timeout
(a one-token sequence that starts and ends in the same step, like the warm-up).

Hand-written on purpose: admission needs the state synchronously without making a call, the probe is
a synthetic step the scheduler sends itself, and the clock must be monotonic; `purgatory` gates only
the calls it wraps, lets every concurrent call through while half-open and reads wall time, and
`aiobreaker` has had no release since 2021.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import StrEnum

from frontend.engine.errors import BreakerOpen

__all__ = ["BreakerOpen", "BreakerState", "CircuitBreaker"]


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    def __init__(
        self,
        *,
        failure_threshold: int = 3,
        reset_timeout_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[BreakerState], None] | None = None,
    ) -> None:
        if failure_threshold < 1 or reset_timeout_s <= 0:
            raise ValueError("failure_threshold >= 1 and reset_timeout_s > 0")
        self.failure_threshold = failure_threshold
        self.reset_timeout_s = reset_timeout_s
        self._clock = clock
        self._on_change = on_change
        self.state = BreakerState.CLOSED
        self.failures = 0  # consecutive, while closed
        self.opened_at = 0.0
        self.last_error = ""

    @property
    def closed(self) -> bool:
        return self.state is BreakerState.CLOSED

    def retry_after_s(self) -> float:
        """Seconds until the next probe (at least the reset timeout's remainder, never < 0.1)."""
        if self.closed:
            return 0.0
        return max(0.1, self.opened_at + self.reset_timeout_s - self._clock())

    def check(self) -> None:
        """Raise BreakerOpen unless closed (admission: no Triton call is made for a refusal)."""
        if not self.closed:
            raise BreakerOpen(
                f"the model server is failing ({self.last_error or 'repeated step errors'}); circuit breaker open",
                self.retry_after_s(),
            )

    def probe_due(self) -> bool:
        """Open and its reset timeout has passed: move to half-open; the caller sends ONE probe."""
        if self.state is BreakerState.OPEN and self._clock() >= self.opened_at + self.reset_timeout_s:
            self._set(BreakerState.HALF_OPEN)
            return True
        return False

    def record_success(self) -> None:
        self.failures = 0
        if not self.closed:
            self.last_error = ""
            self._set(BreakerState.CLOSED)

    def record_failure(self, error: BaseException | str = "") -> None:
        self.last_error = str(error)[:200]
        if self.state is BreakerState.HALF_OPEN:
            self._open()
        elif self.closed:
            self.failures += 1
            if self.failures >= self.failure_threshold:
                self._open()

    def _open(self) -> None:
        self.failures = 0
        self.opened_at = self._clock()
        self._set(BreakerState.OPEN)

    def _set(self, state: BreakerState) -> None:
        if state is not self.state:
            self.state = state
            if self._on_change is not None:
                self._on_change(state)
