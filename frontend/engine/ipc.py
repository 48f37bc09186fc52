"""The wire between HTTP workers (`RemoteEngine`, DEALER sockets) and the engine core (`EngineCore`,
one ROUTER socket on an ``ipc://`` address). Every message is ONE frame: a pickled tuple whose
first element names it (the ROUTER adds and strips the worker's identity frame).

Worker -> core:

    ("hello", corr)                                           -> ("reply", corr, (model, version))
    ("submit", rid, EngineRequest)                            no reply; failures come as events
    ("cancel", rid)
    ("heartbeat",)                                            -> ("load", running, waiting)
    ("ready", corr)                                           -> ("reply", corr, bool)
    ("metrics", corr)                                         -> ("reply", corr, exposition bytes)
    ("goodbye",)                                                 the core cancels the worker's generations
    ("limits", corr, method, args)                            -> ("reply", corr, value): one rate-limit
                              storage operation on the core's `limits` MemoryStorage, so every
                              worker shares the same windows and quotas (frontend.security.core_storage)

Core -> worker:

    ("events", [item, ...])   every event the scheduler emitted for this worker in one synchronous
                              pass (one step): item = (rid, token_id, logprob, top_logprobs) for a
                              token, (rid, PromptLogprobsEvent, None) for a prompt's logprobs,
                              (rid, FinishEvent | ErrorEvent) for the end of a generation
    ("reply", corr, value)    value may be an exception, raised by the asking worker
    ("load", running, waiting)

`rid` is the worker's own request id, `corr` its id for a question. One DEALER socket per
worker carries everything in order, so a cancel never overtakes its submit.

Serialization is pickle: the payloads are a few small Python objects (the request, events,
exceptions whose TYPE must survive the trip), pickle round-trips all of them without a schema,
and tokens travel as plain tuples (pickling a tuple costs ~0.2 µs, a slotted frozen dataclass
~6 µs; `EngineRequest` pickles itself as plain tuples for the same reason). Everything a message
can carry is defined beside the `Engine` protocol (`frontend.engine.events`, `.errors`,
`.request`), so unpickling it in an HTTP worker imports neither the scheduler nor gRPC. The
socket lives in a private temporary directory (mode 0700): only processes of the same user can
connect, which is what makes unpickling its messages acceptable.
"""

from __future__ import annotations

import asyncio
import pickle
from typing import Any, cast

import zmq

from frontend.engine.events import ErrorEvent, Event, PromptLogprobsEvent, TokenEvent

HELLO = "hello"
SUBMIT = "submit"
CANCEL = "cancel"
HEARTBEAT = "heartbeat"
READY = "ready"
METRICS = "metrics"
GOODBYE = "goodbye"
LIMITS = "limits"
EVENTS = "events"
REPLY = "reply"
LOAD = "load"

EventItem = tuple[Any, ...]


def dumps(message: tuple[Any, ...]) -> bytes:
    return pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)


def loads(frame: bytes) -> tuple[Any, ...]:
    message = pickle.loads(frame)
    if not isinstance(message, tuple) or not message:
        raise ValueError(f"malformed message: {message!r:.80}")
    return message


def encode_event(rid: int, event: Event) -> EventItem:
    if type(event) is TokenEvent:
        return (rid, event.token_id, event.logprob, event.top_logprobs)
    if isinstance(event, ErrorEvent):
        return (rid, ErrorEvent(portable_error(event.error)))
    if isinstance(event, PromptLogprobsEvent):
        return (rid, event, None)  # three items: not a token, not the end
    return (rid, event)


def decode_event(item: EventItem) -> Event:
    """The event of one item (the caller reads the rid, item[0])."""
    if len(item) == 4:
        return TokenEvent(item[1], item[2], item[3])
    event: Event = item[1]
    return event


def is_terminal(item: EventItem) -> bool:
    return len(item) == 2


def portable_error(error: BaseException) -> Exception:
    """`error` itself when it survives pickling with its type, else a RuntimeError saying what it was."""
    try:
        copy = pickle.loads(pickle.dumps(error, protocol=pickle.HIGHEST_PROTOCOL))
        if type(copy) is type(error) and isinstance(error, Exception):
            return error
    except Exception:
        pass
    return RuntimeError(f"{type(error).__name__}: {error}")


def send(sock: Any, frames: list[bytes]) -> asyncio.Future[Any]:
    """Send without awaiting on a zmq.asyncio socket: pyzmq tries a NOBLOCK send at once and
    otherwise queues the message behind earlier ones (order kept); the future reports failure."""
    return cast("asyncio.Future[Any]", sock.send_multipart(frames))


def configure(sock: zmq.Socket[Any]) -> None:
    """No high-water marks: a ROUTER silently DROPS messages for a peer over its mark, and a
    token stream must never lose an event. Memory is bounded by max_running + max_waiting."""
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.LINGER, 0)
