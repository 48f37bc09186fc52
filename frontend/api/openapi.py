"""The OpenAPI document says what the server does.

* Validation errors are 400 in the error envelope (OpenAI's status), never FastAPI's 422: every
  operation that takes input documents 400 (and 413 when it takes a body) with `ErrorResponse`,
  and FastAPI's 422 and its `HTTPValidationError` schemas are removed.
* Limits that come from settings (prompt length, tokens, n, batch size, stop strings) are written
  into the request schemas, so a client (or schemathesis) reads the limits the server enforces.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

from frontend.errors import ErrorResponse
from frontend.settings import Settings

_ENVELOPE = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
_ERRORS = {
    "400": "Invalid request: a field is missing, malformed, out of range or over a server limit",
    "413": "The request body is larger than the server's limit",
}
_METHODS = {"get", "put", "post", "delete", "patch", "head", "options"}


def install_openapi(app: FastAPI, settings: Settings) -> None:
    generate: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()  # FastAPI caches it in app.openapi_schema; patched in place, once
            _document_errors(schema)
            _write_limits(schema, settings)
            _headers_are_never_null(schema)
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]


def _document_errors(schema: dict[str, Any]) -> None:
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    error_schema = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(error_schema.pop("$defs", {}))
    components["ErrorResponse"] = error_schema
    for path in schema.get("paths", {}).values():
        for method, operation in path.items():
            if method not in _METHODS:
                continue
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            takes_body = "requestBody" in operation
            if takes_body or operation.get("parameters"):
                responses["400"] = {"description": _ERRORS["400"], "content": _ENVELOPE}
            if takes_body:
                responses["413"] = {"description": _ERRORS["413"], "content": _ENVELOPE}
    text = repr(schema.get("paths", {}))
    for name in ("HTTPValidationError", "ValidationError"):
        if f"#/components/schemas/{name}'" not in text:
            components.pop(name, None)


def _headers_are_never_null(schema: dict[str, Any]) -> None:
    """A header cannot carry JSON null (an absent header is the None of `X-Request-Timeout`): drop
    the `null` alternative pydantic writes for optional header parameters (schemathesis sent the
    literal text `null` as the schema allowed, and got the 400 the server rightly answers)."""
    for path in schema.get("paths", {}).values():
        for operation in path.values():
            for param in operation.get("parameters", []) if isinstance(operation, dict) else []:
                node = param.get("schema", {})
                if param.get("in") == "header" and "anyOf" in node:
                    members = [m for m in node["anyOf"] if m.get("type") != "null"]
                    if len(members) == 1:
                        node.pop("anyOf")
                        node.update(members[0])
                    else:
                        node["anyOf"] = members


def _members(node: dict[str, Any]) -> list[dict[str, Any]]:
    return list(node.get("anyOf", [])) or [node]


def _limit_strings(node: dict[str, Any] | None, max_chars: int, max_items: int | None = None) -> None:
    """maxLength on the string members of `node`; maxItems and the items' maxLength on its
    arrays of strings."""
    if node is None:
        return
    for member in _members(node):
        if member.get("type") == "string":
            member["maxLength"] = max_chars
        elif member.get("type") == "array" and member.get("items", {}).get("type") == "string":
            member["items"]["maxLength"] = max_chars
            if max_items is not None:
                member["maxItems"] = max_items


def _limit_integer(node: dict[str, Any] | None, maximum: int) -> None:
    for member in _members(node or {}):
        if member.get("type") == "integer":
            member["maximum"] = maximum


def _write_limits(schema: dict[str, Any], s: Settings) -> None:
    components = schema.get("components", {}).get("schemas", {})

    def props(name: str) -> dict[str, Any]:
        return components.get(name, {}).get("properties", {})  # type: ignore[no-any-return]

    native = props("GenerateRequest")
    _limit_strings(native.get("prompt"), s.max_prompt_chars)
    _limit_strings(native.get("stop"), s.max_stop_chars, s.max_stop_sequences)
    _limit_integer(native.get("max_new_tokens"), s.max_new_tokens_limit)
    if "requests" in props("BatchRequest"):
        props("BatchRequest")["requests"]["maxItems"] = s.max_batch_requests

    oai = props("CompletionRequest")
    _limit_strings(oai.get("prompt"), s.max_prompt_chars, s.max_batch_requests)
    _limit_strings(oai.get("stop"), s.max_stop_chars, s.max_stop_sequences)
    _limit_integer(oai.get("max_tokens"), s.max_new_tokens_limit)
    _limit_integer(oai.get("n"), s.max_n)
