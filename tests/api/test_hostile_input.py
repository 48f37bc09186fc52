"""Input that cannot hurt: hostile text gets a 4xx in the error envelope (never a 500) on every
route, other scripts are accepted, stop strings are limited, SSE data escapes Unicode line
separators, and the OpenAPI document says 400 (not 422) and the limits the server enforces."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from frontend import errors
from frontend.api.streaming import sse_json
from frontend.settings import Settings
from tests.api.conftest import assert_error_envelope, parse_sse
from tests.api.fake_engine import FakeEngine

pytestmark = [pytest.mark.api, pytest.mark.asyncio]

SURROGATE = "abc\\ud800def"  # as written in the JSON text: a lone high surrogate
ROUTES = ["/v1/completions", "/v1/completions?stream", "/generate", "/generate/stream", "/generate/batch"]


def _body(route: str, field: str, raw: str) -> bytes:
    """A JSON request for `route` whose `field` is the raw JSON text `raw`."""
    if route.startswith("/v1/completions"):
        base = {"model": '"tiny"', "prompt": '"Hello"', "max_tokens": "4"}
        if route.endswith("?stream"):
            base["stream"] = "true"
    else:
        base = {"prompt": '"Hello"', "max_new_tokens": "4"}
    base[field] = raw
    item = "{" + ", ".join(f'"{k}": {v}' for k, v in base.items()) + "}"
    if route == "/generate/batch":
        return ('{"requests": [{"prompt": "fine", "max_new_tokens": 2}, ' + item + "]}").encode()
    return item.encode()


def _path(route: str) -> str:
    return route.split("?")[0]


def _param(route: str, param: str) -> str:
    return f"requests[1].{param}" if route == "/generate/batch" else param


async def _post(client: httpx.AsyncClient, route: str, content: bytes) -> httpx.Response:
    return await client.post(_path(route), content=content, headers={"content-type": "application/json"})


# --------------------------------------------------------------------------- lone surrogates
SURROGATE_CASES = [
    ("prompt", f'"{SURROGATE}"', "prompt"),
    ("prompt list", f'["fine", "{SURROGATE}"]', "prompt[1]"),
    ("stop", f'["{SURROGATE}"]', "stop[0]"),
    ("stop string", f'"{SURROGATE}"', "stop"),
    ("low surrogate", '"\\udc00"', "prompt"),
]


# Native prompts are one string, so the list case applies to the OpenAI route only.
SURROGATE_ROUTE_CASES = [
    (route, *case)
    for route in ROUTES
    for case in SURROGATE_CASES
    if route.startswith("/v1") or case[0] != "prompt list"
]


@pytest.mark.parametrize(
    ("route", "case", "raw", "param"), SURROGATE_ROUTE_CASES, ids=[f"{c[0]}-{c[1]}" for c in SURROGATE_ROUTE_CASES]
)
async def test_lone_surrogates_are_400(
    lenient_client: httpx.AsyncClient, fake: FakeEngine, route: str, case: str, raw: str, param: str
) -> None:
    field = param.split("[")[0].split(".")[0]
    if case == "stop string" and not route.startswith("/v1"):
        raw = f'"{SURROGATE}"'  # native stop also takes one string
        param = "stop[0]"
    r = await _post(lenient_client, route, _body(route, field, raw))
    assert r.status_code == 400, r.text
    err = assert_error_envelope(r)
    assert err["param"] == _param(route, param)
    assert "surrogate" in err["message"] or "unicode" in err["message"]
    assert fake.submitted == []


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/completions?stream"])
async def test_a_surrogate_model_name_is_400_and_the_error_encodes(
    lenient_client: httpx.AsyncClient, route: str
) -> None:
    r = await _post(lenient_client, route, _body(route, "model", '"\\ud800"'))
    assert r.status_code == 400, r.text
    assert assert_error_envelope(r)["param"] == "model"


async def test_an_unknown_model_with_any_text_gets_a_readable_404(lenient_client: httpx.AsyncClient) -> None:
    name = "模型\u202e\u2028\x00"
    r = await lenient_client.post("/v1/completions", json={"model": name, "prompt": "hi", "max_tokens": 2})
    assert r.status_code == 404
    assert name in assert_error_envelope(r)["message"]


async def test_any_error_message_renders_even_with_a_lone_surrogate() -> None:
    response = errors.render(errors.ModelNotFound("The model `\ud800` does not exist.", param="model"))
    body = json.loads(bytes(response.body))  # pure ASCII on the wire, the surrogate escaped
    assert body["error"]["message"] == "The model `\ud800` does not exist."
    assert bytes(response.body).isascii()


async def test_utf8_encoded_surrogates_in_the_body_are_400(lenient_client: httpx.AsyncClient) -> None:
    raw = b'{"prompt": "abc\xed\xa0\x80def", "max_new_tokens": 2}'  # CESU-style bytes of U+D800
    r = await _post(lenient_client, "/generate", raw)
    assert r.status_code == 400, r.text
    assert_error_envelope(r)


# --------------------------------------------------------------------------- bytes that are not UTF-8 or JSON
@pytest.mark.parametrize(
    "raw",
    [
        b'{"prompt": "abc\xff\xfedef", "max_new_tokens": 2}',
        b'{"prompt": "\xc3", "max_new_tokens": 2}',
        b"\xff\xfe\x00\x00",
        b'{"prompt": "abc',
        b"[1, 2, 3]",
        b"null",
        b'"just a string"',
    ],
    ids=["invalid utf-8", "truncated utf-8", "bom garbage", "truncated json", "array", "null", "string"],
)
@pytest.mark.parametrize("route", ROUTES)
async def test_malformed_bodies_are_400(lenient_client: httpx.AsyncClient, route: str, raw: bytes) -> None:
    r = await _post(lenient_client, route, raw)
    assert r.status_code == 400, r.text
    assert_error_envelope(r)


# --------------------------------------------------------------------------- text that is fine
FINE_TEXT = [
    "日本語のテキストです。こんにちは",
    "Ελληνικά, русский",
    "العربية, עברית",
    "हिन्दी, 한국어, ไทย",
    "emoji 👩‍👩‍👧 and flags 🇯🇵",
    "NUL \x00 inside",
    "bidi \u202eevil\u202c and \u2066isolates\u2069 and \u200f marks",
    "line separators \u2028 \u2029 \x85 and tabs\t",
    "combining e\u0301 and zero-width \u200b\ufeff",
]


@pytest.mark.parametrize("text", FINE_TEXT)
@pytest.mark.parametrize("route", ["/v1/completions", "/generate", "/generate/batch"])
async def test_other_scripts_and_odd_characters_are_accepted(client: httpx.AsyncClient, route: str, text: str) -> None:
    if route == "/v1/completions":
        r = await client.post(
            route, json={"model": "tiny", "prompt": text, "max_tokens": 2, "echo": True, "stop": text}
        )
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"].startswith(text)  # echoed exactly
    elif route == "/generate":
        r = await client.post(route, json={"prompt": text, "max_new_tokens": 2, "stop": [text]})
        assert r.status_code == 200, r.text
    else:
        r = await client.post(route, json={"requests": [{"prompt": text, "max_new_tokens": 2}]})
        assert r.status_code == 200, r.text
        assert r.json()["results"][0]["error"] is None


# --------------------------------------------------------------------------- stop strings
@pytest.mark.parametrize(
    ("route", "stop", "param"),
    [
        ("/generate", ["a", "b", "c", "d", "e"], "stop"),
        ("/generate", ["x" * 257], "stop"),
        ("/generate/batch", ["x" * 257], "requests[0].stop"),
        ("/v1/completions", ["a", "b", "c", "d", "e"], "stop"),
        ("/v1/completions", "x" * 257, "stop"),
    ],
)
async def test_stop_strings_are_limited(
    client: httpx.AsyncClient, fake: FakeEngine, settings: Settings, route: str, stop: Any, param: str
) -> None:
    assert settings.max_stop_sequences == 4 and settings.max_stop_chars == 256
    item = {"prompt": "Hello", "max_new_tokens": 2, "stop": stop}
    payload: dict[str, Any] = {
        "/generate": item,
        "/generate/batch": {"requests": [item]},
        "/v1/completions": {"model": "tiny", "prompt": "Hello", "max_tokens": 2, "stop": stop},
    }[route]
    r = await client.post(route, json=payload)
    assert r.status_code == 400, r.text
    err = assert_error_envelope(r)
    assert err["param"] == param
    assert fake.submitted == []
    ok = await client.post("/generate", json={"prompt": "Hello", "max_new_tokens": 2, "stop": ["x" * 256] * 4})
    assert ok.status_code == 200, ok.text


# --------------------------------------------------------------------------- SSE line separators
async def test_sse_json_escapes_unicode_line_separators() -> None:
    data = {"text": "a\u2028b\u2029c\x85d\nе"}
    out = sse_json(data)
    assert not any(ch in out for ch in "\u2028\u2029\x85\n")
    assert "\\u2028" in out and "\\u2029" in out and "\\u0085" in out
    assert "е" in out  # other text stays UTF-8
    assert json.loads(out) == data


@pytest.mark.parametrize("route", ["/v1/completions", "/generate/stream"])
async def test_streams_never_carry_raw_line_separators(client: httpx.AsyncClient, route: str) -> None:
    text = "one\u2028two\u2029three\x85four"
    if route == "/v1/completions":
        payload: dict[str, Any] = {"model": "tiny", "prompt": text, "max_tokens": 3, "stream": True, "echo": True}
    else:
        payload = {"prompt": text, "max_new_tokens": 3, "stop": [text]}  # no echo natively: errors and done only
    r = await client.post(route, json=payload)
    assert r.status_code == 200, r.text
    raw = r.content.decode("utf-8")
    assert not any(ch in raw for ch in "\u2028\u2029\x85")
    assert raw.splitlines() == raw.replace("\r\n", "\n").split("\n")[: len(raw.splitlines())]
    events = parse_sse(raw)
    if route == "/v1/completions":
        assert events[0].json()["choices"][0]["text"].startswith(text)


# --------------------------------------------------------------------------- validation status and OpenAPI
async def test_the_openapi_documents_400_with_the_envelope_and_never_422(app: FastAPI, settings: Settings) -> None:
    schema = app.openapi()
    assert "422" not in json.dumps(schema["paths"])
    components = schema["components"]["schemas"]
    assert "HTTPValidationError" not in components
    envelope = components["ErrorResponse"]
    assert envelope["required"] == ["error"]
    assert set(components["ErrorDetail"]["properties"]) == {"message", "type", "param", "code", "request_id"}
    with_input = 0
    for path, operations in schema["paths"].items():
        for method, op in operations.items():
            if "requestBody" not in op and not op.get("parameters"):
                continue
            with_input += 1
            for status in ("400", "413") if "requestBody" in op else ("400",):
                ref = op["responses"][status]["content"]["application/json"]["schema"]["$ref"]
                assert ref == "#/components/schemas/ErrorResponse", (method, path, status)
    assert with_input >= 4
    # the limits the server enforces are the schema's
    native = components["GenerateRequest"]["properties"]
    assert native["prompt"]["minLength"] == 1
    assert native["prompt"]["maxLength"] == settings.max_prompt_chars
    assert native["stop"]["maxItems"] == settings.max_stop_sequences
    assert native["stop"]["items"]["maxLength"] == settings.max_stop_chars
    assert native["max_new_tokens"]["maximum"] == settings.max_new_tokens_limit
    oai = components["CompletionRequest"]["properties"]
    string_prompt = next(m for m in oai["prompt"]["anyOf"] if m.get("type") == "string")
    assert string_prompt["minLength"] == 1
    assert all(m.get("minItems") == 1 for m in oai["prompt"]["anyOf"] if m.get("type") == "array")
    assert components["BatchRequest"]["properties"]["requests"]["maxItems"] == settings.max_batch_requests


@pytest.mark.parametrize(
    ("route", "payload"),
    [
        ("/generate", {"prompt": "", "max_new_tokens": 2}),
        ("/v1/completions", {"model": "tiny", "prompt": "", "max_tokens": 2}),
        ("/v1/completions", {"model": "tiny", "prompt": [], "max_tokens": 2}),
        ("/v1/completions", {"model": "tiny", "prompt": [[]], "max_tokens": 2}),
        ("/v1/completions", {"model": "tiny", "prompt": ["a", ""], "max_tokens": 2}),
    ],
)
async def test_empty_prompts_are_refused_as_the_schema_says(
    client: httpx.AsyncClient, route: str, payload: dict[str, Any]
) -> None:
    r = await client.post(route, json=payload)
    assert r.status_code == 400, r.text
    err = assert_error_envelope(r)
    assert err["param"] is not None and err["param"].startswith("prompt")
    assert "empty" in err["message"]
