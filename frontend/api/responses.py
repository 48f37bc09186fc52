"""Error responses declared on routes (`responses=error_responses(...)`), so /docs shows each
status with the one envelope. 400 and 413 are documented for every operation that takes input by
frontend.api.openapi (validation errors are 400 there, never 422); the rest are declared here."""

from __future__ import annotations

from typing import Any

from frontend.errors import ErrorResponse

_DESCRIPTIONS = {
    401: "Missing or invalid API key",
    403: "The API key lacks the route's scope",
    404: "The model (or resource) does not exist on this server",
    429: "Rate limit, token quota or the waiting queue is full (Retry-After)",
    502: "The model server refused the step",
    503: "The gateway is starting, draining or overloaded, or the model server is unavailable (Retry-After)",
    504: "The generation did not finish within its deadline",
}

#: What any generation route can answer besides 200, 400 and 413.
GENERATION_ERRORS = (401, 403, 404, 429, 502, 503, 504)


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorResponse, "description": _DESCRIPTIONS[status]} for status in statuses}
