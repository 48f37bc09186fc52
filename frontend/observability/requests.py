"""Request ids and the access log.

Every HTTP request gets an id: the client's `X-Request-Id` when it is 1-128 characters of
`[A-Za-z0-9._:-]`, else a new one (32 hex digits). The id is returned in the `X-Request-Id`
response header, written into every error body (`frontend.errors`), attached to every log record
(`RequestIdFilter`) and readable by the generation layer through `current_request_id()` (and on
`GenerationRequest.request_id`), where the engine can pick it up.

`RequestContextMiddleware` writes ONE access-log line per request on the `gateway.access` logger:
method, path (without the query string) and route template, status, duration,
prompt and generated tokens, whether the result cache answered, and the API key's NAME when
auth is on. Never the key, never prompt or generated text.

Written here rather than taken from asgi-correlation-id: the access-log middleware already wraps
every request, and the id handling is a dozen lines of it.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from frontend.observability.metrics import route_template, unanswered_status
from frontend.observability.tracing import tag_current_span

HEADER = "X-Request-Id"
_HEADER_KEY = HEADER.lower().encode("latin-1")
_VALID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

access_log = logging.getLogger("gateway.access")


@dataclass
class RequestRecord:
    """What one request did, filled in while it runs (the access log reads it at the end)."""

    request_id: str
    prompt_tokens: int = 0
    generated_tokens: int = 0
    cache_lookups: int = 0
    cache_hits: int = 0
    api_key_name: str | None = None

    def add_generation(self, *, prompt_tokens: int, generated_tokens: int) -> None:
        self.prompt_tokens += prompt_tokens
        self.generated_tokens += generated_tokens

    def add_cache_lookup(self, hit: bool) -> None:
        self.cache_lookups += 1
        self.cache_hits += int(hit)

    @property
    def cache_hit(self) -> bool | None:
        """True when every result-cache lookup hit, False when one missed, None when none was made."""
        return None if not self.cache_lookups else self.cache_hits == self.cache_lookups


_current: ContextVar[RequestRecord | None] = ContextVar("gateway_request", default=None)


def current_request() -> RequestRecord | None:
    """The record of the HTTP request this code runs for (None outside a request)."""
    return _current.get()


def current_request_id() -> str | None:
    record = _current.get()
    return None if record is None else record.request_id


def note_api_key(name: str | None) -> None:
    """Called once the caller is authenticated: the access log shows the key's name."""
    record = _current.get()
    if record is not None and name:
        record.api_key_name = name


def new_request_id() -> str:
    return uuid.uuid4().hex


def accept_request_id(value: str | None) -> str:
    """The client's id when it is safe to echo and log, else a new one."""
    if value is not None and _VALID.fullmatch(value):
        return value
    return new_request_id()


def _incoming_id(scope: dict[str, Any]) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == _HEADER_KEY:
            try:
                return str(value.decode("ascii"))
            except UnicodeDecodeError:
                return None
    return None


class RequestIdFilter(logging.Filter):
    """Adds `request_id` (or None) to every record, so text and JSON formats can show it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = current_request_id()
        return True


class RequestContextMiddleware:
    """Gives each HTTP request its id and record, sets the response header, writes the access log.

    The context variable is set in the request's own task and deliberately not reset: the 500
    handler (Starlette's outermost middleware) runs after this one returns and still reads it."""

    def __init__(self, app: Callable[..., Awaitable[None]], *, access_log_enabled: bool = True) -> None:
        self.app = app
        self.access_log_enabled = access_log_enabled

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:  # type: ignore[type-arg]
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        record = RequestRecord(accept_request_id(_incoming_id(scope)))
        _current.set(record)
        tag_current_span(record.request_id)
        header = (_HEADER_KEY, record.request_id.encode("ascii"))
        status: int | None = None

        async def send_wrapper(message: dict) -> None:  # type: ignore[type-arg]
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != _HEADER_KEY]
                message = {**message, "headers": [*headers, header]}
            await send(message)

        started = time.perf_counter()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            if self.access_log_enabled:
                # No response started: the 500 sent outside us, or 499 when the client left first.
                final = unanswered_status(scope) if status is None else status
                self._log(scope, record, final, time.perf_counter() - started)

    @staticmethod
    def _log(scope: dict[str, Any], record: RequestRecord, status: int, duration_s: float) -> None:  # type: ignore[type-arg]
        fields = {
            "request_id": record.request_id,
            "method": scope.get("method", ""),
            "path": str(scope.get("path", ""))[:256],  # the query string is never logged
            "route": route_template(scope),
            "status": status,
            "duration_ms": round(duration_s * 1000, 3),
            "prompt_tokens": record.prompt_tokens,
            "generated_tokens": record.generated_tokens,
            "cache_hit": record.cache_hit,
            "api_key_name": record.api_key_name,
        }
        text = " ".join(f"{k}={_text_value(v)}" for k, v in fields.items() if k != "request_id")
        access_log.info(text, extra=fields)


def _text_value(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
