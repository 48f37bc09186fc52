"""The one error envelope every client sees, and the domain exceptions that map to it.

    APIError                         {"error": {"message", "type", "param", "code"}}
    ├── InvalidRequest          400  invalid_request_error (bad field, empty prompt, ...)
    │   └── ContextLengthExceeded 400 code=context_length_exceeded
    ├── ModelNotFound           404  not_found_error, code=model_not_found
    ├── Unauthorized            401  authentication_error
    ├── Forbidden               403  permission_error (an API key without the route's scope)
    ├── RateLimited             429  rate_limit_error, Retry-After
    ├── Overloaded              503  overloaded_error, Retry-After (backpressure)
    ├── UpstreamUnavailable     503  upstream_unavailable (Triton down / not ready)
    ├── SecurityBackendUnavailable 503 service_unavailable (key store / rate-limit storage down)
    ├── UpstreamError           502  upstream_error (Triton refused a step)
    └── UpstreamTimeout         504  upstream_timeout

Every error body also carries the request's id (`"request_id"` inside `"error"`, next to the four
keys above; the same id as the `X-Request-Id` response header, frontend.observability.requests).

An engine's own errors (`frontend.engine.errors`) become one of these in one place,
`from_engine_error`. Routes raise these and hold no try/except ladders; `install_error_handlers`
renders them, plus FastAPI's validation errors (400, with the offending field as `param`) and anything unexpected
(500, no traceback to the client; logged with one).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from frontend.engine import errors as engine
from frontend.observability.requests import HEADER as REQUEST_ID_HEADER
from frontend.observability.requests import current_request_id

log = logging.getLogger(__name__)


class APIError(Exception):
    status_code = 500
    error_type = "internal_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after_s: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.code
        self.retry_after_s = retry_after_s
        self.headers = dict(headers or {})  # extra response headers (x-ratelimit-*, WWW-Authenticate)

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.error_type, self.param, self.code)


class InvalidRequest(APIError):
    status_code = 400
    error_type = "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class ModelNotFound(APIError):
    status_code = 404
    error_type = "not_found_error"
    code = "model_not_found"


class Unauthorized(APIError):
    status_code = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(APIError):
    status_code = 403
    error_type = "permission_error"
    code = "insufficient_scope"


class RateLimited(APIError):
    status_code = 429
    error_type = "rate_limit_error"
    code = "rate_limit_exceeded"


class Overloaded(APIError):
    status_code = 503
    error_type = "overloaded_error"
    code = "overloaded"


class SecurityBackendUnavailable(APIError):
    status_code = 503
    error_type = "service_unavailable"
    code = "security_backend_unavailable"


class UpstreamUnavailable(APIError):
    status_code = 503
    error_type = "upstream_unavailable"
    code = "triton_unavailable"


class UpstreamError(APIError):
    status_code = 502
    error_type = "upstream_error"
    code = "triton_error"


class UpstreamTimeout(APIError):
    status_code = 504
    error_type = "upstream_timeout"
    code = "triton_timeout"


def from_engine_error(err: Exception) -> APIError:
    """The API error for what an engine raised or reported (an `APIError` stays itself)."""
    if isinstance(err, APIError):
        return err
    if isinstance(err, engine.QueueFull):  # the waiting cap: refused at once, try again shortly
        return RateLimited(str(err), code="queue_full", retry_after_s=1)
    if isinstance(err, engine.Overloaded):
        return Overloaded(str(err), retry_after_s=1)
    if isinstance(err, engine.UpstreamTimeout):
        return UpstreamTimeout(str(err))
    if isinstance(err, engine.UpstreamUnavailable):  # BreakerOpen carries when its next probe is due
        return UpstreamUnavailable(str(err), retry_after_s=max(1.0, getattr(err, "retry_after_s", 1.0)))
    if isinstance(err, engine.StepRejected):
        return UpstreamError(str(err))
    if isinstance(err, engine.SamplingFailed):  # the request's own parameters: it alone failed
        return InvalidRequest(str(err), code="sampling_failed")
    return APIError("internal error during generation")


class ErrorJSONResponse(JSONResponse):
    """JSON with every non-ASCII character escaped: an error may quote client text, and text with
    a lone surrogate (valid JSON, `"\\ud800"`) cannot be encoded as UTF-8. ASCII always can."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None
    request_id: str | None = None  # the X-Request-Id of the request (absent outside one)


class ErrorResponse(BaseModel):
    """The one error envelope (OpenAPI: every route's error responses)."""

    error: ErrorDetail


def error_body(message: str, error_type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"message": message, "type": error_type, "param": param, "code": code}
    request_id = current_request_id()
    if request_id is not None:
        error["request_id"] = request_id
    return {"error": error}


def render(err: APIError) -> JSONResponse:
    headers = {"Retry-After": str(max(1, round(err.retry_after_s)))} if err.retry_after_s else {}
    headers.update(getattr(err, "headers", None) or {})
    return ErrorJSONResponse(err.body(), status_code=err.status_code, headers=headers or None)


# pydantic names the member of a union it tried ("str", "list[int]", "function-after[...]"); a
# client needs the field, so the location is cut at the first such tag.
_UNION_TAG = re.compile(r"^(str|int|float|bool|none|.*\[.*\])$")


def _validation_param(error: Mapping[str, Any]) -> str:
    if error.get("type") == "json_invalid":
        return ""  # the location is a character offset in the body, not a field
    out = ""
    for part in error.get("loc", ()):
        if part in ("body", "query", "path"):
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        elif _UNION_TAG.match(str(part)):
            continue  # the member of a union pydantic tried: not a field name
        else:
            out += f".{part}" if out else str(part)
    return out


def _most_relevant(errors: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    """For a union (`prompt: str | list[str] | ...`) pydantic reports every member's failure; the
    member whose type matched fails on a constraint or a value, the others on their type. Prefer
    the first of those, so `["ok", ""]` reports `prompt[1]` is too short, not "not a string"."""
    if not errors:
        return {"loc": (), "msg": "invalid request"}
    for error in errors:
        if not str(error.get("type", "")).endswith(("_type", "_parsing")):
            return error
    return errors[0]


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, err: APIError) -> JSONResponse:
        return render(err)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, err: RequestValidationError) -> JSONResponse:
        first = _most_relevant(err.errors())
        param = _validation_param(first)
        msg = first.get("msg")
        if first.get("type") in ("string_too_short", "too_short") and (first.get("ctx") or {}).get("min_length") == 1:
            msg = "must not be empty"
        message = f"{param}: {msg}" if param else str(msg)
        return render(InvalidRequest(message, param=param or None))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, err: StarletteHTTPException) -> JSONResponse:
        error_type = {404: "not_found_error", 405: "invalid_request_error"}.get(
            err.status_code, "invalid_request_error"
        )
        return ErrorJSONResponse(
            error_body(str(err.detail), error_type), status_code=err.status_code, headers=err.headers
        )

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, err: Exception) -> JSONResponse:
        log.exception("unhandled error")
        # Rendered outside the request-id middleware (Starlette's outermost layer): set its header here.
        request_id = current_request_id()
        headers = {REQUEST_ID_HEADER: request_id} if request_id else None
        return ErrorJSONResponse(
            error_body("internal server error", "internal_error"), status_code=500, headers=headers
        )
