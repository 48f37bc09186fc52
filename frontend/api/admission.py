"""Load shedding at the door: while the gateway drains, a generation request gets its 503
(draining); while the engine's waiting queue is at its cap, its 429 (queue_full, Retry-After); both
before routing, authentication, body parsing and
tokenization, which it would otherwise pay only to be refused by `Scheduler.submit` anyway.

At 10x overload on the 2-core machine a burst of 144 requests against a full queue was refused
with p99 181 ms through the whole stack (each refusal ~1 ms of event-loop time, served one after
another) and well under the 100 ms of docs/security.md with this gate in front. The exact check
stays in `Scheduler.submit`; this one reads the engine's (running, waiting) without a lock, so it
can only refuse a request the scheduler would refuse an instant later or let one through that
the scheduler then refuses. (Hand-written: a few lines of pure ASGI; no library sheds on a
queue that lives in the application.)
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from frontend import errors

# The routes that submit generations (the batch route submits several; it is shed alike).
GENERATION_PATHS = frozenset(
    {"/generate", "/generate/stream", "/generate/batch", "/v1/completions", "/v1/chat/completions"}
)


class AdmissionGateMiddleware:
    def __init__(self, app: ASGIApp, *, max_waiting: int) -> None:
        self.app = app
        self.max_waiting = max_waiting

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in GENERATION_PATHS:
            # A draining gateway refuses at the door too: before authentication, whose backend (the
            # engine core's limit storage) may already be gone when a whole process group stops.
            lifecycle = getattr(scope["app"].state, "lifecycle", None)
            if lifecycle is not None and lifecycle.draining:
                try:
                    lifecycle.check()
                except errors.APIError as err:
                    await errors.render(err)(scope, receive, send)
                    return
            service = getattr(scope["app"].state, "service", None)
            if service is not None:
                _, waiting = service.engine.load()
                if waiting >= self.max_waiting:
                    refusal = errors.RateLimited(
                        f"{waiting} generations already waiting", code="queue_full", retry_after_s=1
                    )
                    await errors.render(refusal)(scope, receive, send)
                    return
        await self.app(scope, receive, send)
