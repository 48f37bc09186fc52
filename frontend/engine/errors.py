"""The errors an engine raises from `submit` or reports in an `ErrorEvent`, whichever engine it
is (in-process, across the engine core's wire, or a test's fake):

    Overloaded                     no room for another generation now (queue full or waited too long)
    └── QueueFull                  the waiting queue is at its cap: refused at once
    SamplingFailed                 this generation's own numbers could not be sampled (it alone fails)
    StepError                      a step of the model server failed
    ├── StepRejected               the model refused a request or a row (nothing changed on it)
    ├── UpstreamUnavailable        the model server unreachable, not ready, or failing inside
    │   ├── ConnectFailed          no connection: the request was not served
    │   └── BreakerOpen            refused without a call: recent steps failed (retry_after_s)
    └── UpstreamTimeout            the step outlived its deadline

Defined here, beside the `Engine` protocol, and not in the gRPC adapter: an HTTP worker that
speaks only ZeroMQ unpickles them without importing tritonclient or grpc. Pure Python. The API's
envelope for each is chosen in one place (`frontend.errors.from_engine_error`).
"""

from __future__ import annotations

__all__ = [
    "BreakerOpen",
    "ConnectFailed",
    "Overloaded",
    "QueueFull",
    "SamplingFailed",
    "StepError",
    "StepRejected",
    "UpstreamTimeout",
    "UpstreamUnavailable",
]


class Overloaded(Exception):
    """The gateway has no room for another sequence now (queue full or wait too long)."""


class QueueFull(Overloaded):
    """The waiting queue is at its cap: refused at once (429 with Retry-After)."""


class SamplingFailed(Exception):
    """This generation's own numbers could not be sampled (its parameters made its row non-finite,
    say): it fails alone and leaves the step; the other rows go on."""


class StepError(Exception):
    """A step call failed."""


class StepRejected(StepError):
    """The model refused a request or a row; no sequence state changed on the server."""


class UpstreamUnavailable(StepError):
    """Triton cannot be reached or the model is not ready."""


class ConnectFailed(UpstreamUnavailable):
    """gRPC UNAVAILABLE: Triton could not be reached; the request was not served."""


class UpstreamTimeout(StepError):
    """The step call did not finish within its deadline."""


class IncompleteAnswer(UpstreamTimeout):
    """Triton answered a step without some of the outputs it asked for (seen in the fault tier right
    after a frozen server resumed and answered its timed-out steps): what the step did to its
    sequences is unknown, as after a timeout, and it is handled as one (its sequences start again)."""


class BreakerOpen(UpstreamUnavailable):
    """Refused without calling Triton: its recent steps failed (retry after `retry_after_s`)."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def __reduce__(self) -> tuple[type[BreakerOpen], tuple[str, float]]:  # survives the engine core's IPC
        return (type(self), (str(self), self.retry_after_s))
