"""Request ids, the access log, JSON logs, vLLM-named metrics, local /docs assets, tracing.
The app over the FakeEngine (tests/api/conftest.py)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from frontend.app import create_app
from frontend.cache import MemoryResultCache
from frontend.generation.types import GenerationRequest
from frontend.observability.logs import configure_logging, json_formatter
from frontend.observability.requests import RequestIdFilter, accept_request_id
from frontend.observability.tracing import REQUEST_ID_ATTRIBUTE, install_tracing
from frontend.settings import Settings
from tests.api.conftest import MODEL, assert_error_envelope
from tests.api.fake_engine import FakeEngine
from tests.api.test_auth import add_key, bearer

pytestmark = [pytest.mark.api, pytest.mark.asyncio]

GEN = {"prompt": "Once upon a time", "max_new_tokens": 3, "temperature": 0}
ACCESS_FIELDS = {
    "request_id",
    "method",
    "path",
    "route",
    "status",
    "duration_ms",
    "prompt_tokens",
    "generated_tokens",
    "cache_hit",
    "api_key_name",
}


def access_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "gateway.access"]


# ------------------------------------------------------------------------------ request ids
@pytest.mark.parametrize(
    ("incoming", "kept"),
    [
        ("abc-123", True),
        ("trace:1.2_3", True),
        ("x" * 128, True),
        ("x" * 129, False),
        ("", False),
        ("has space", False),
        ("semi;colon", False),
        ("é", False),
        (None, False),
    ],
)
async def test_an_incoming_id_is_kept_only_when_short_and_safe(incoming: str | None, kept: bool) -> None:
    out = accept_request_id(incoming)
    if kept:
        assert out == incoming
    else:
        assert re.fullmatch(r"[0-9a-f]{32}", out), out


async def test_the_client_id_comes_back_in_the_header(client: httpx.AsyncClient) -> None:
    r = await client.post("/generate", json=GEN, headers={"X-Request-Id": "client-id-1"})
    assert r.status_code == 200
    assert r.headers["x-request-id"] == "client-id-1"
    r = await client.get("/health/live")
    assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])


async def test_an_unsafe_id_is_replaced(client: httpx.AsyncClient) -> None:
    r = await client.post("/generate", json=GEN, headers={"X-Request-Id": "evil\tid" + "x" * 300})
    assert r.status_code == 200
    assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])


async def test_error_bodies_carry_the_request_id(client: httpx.AsyncClient) -> None:
    r = await client.post("/generate", json={"prompt": ""}, headers={"X-Request-Id": "bad-prompt-7"})
    assert r.status_code == 400
    err = assert_error_envelope(r)  # the four keys plus request_id, equal to the header
    assert err["request_id"] == "bad-prompt-7"
    r = await client.get("/no/such/route")
    assert r.status_code == 404
    assert assert_error_envelope(r)["request_id"] == r.headers["x-request-id"]


async def test_the_generation_layer_sees_the_id(client: httpx.AsyncClient, app: FastAPI) -> None:
    service = app.state.service
    seen: list[str | None] = []
    original = service.complete

    async def spy(req: GenerationRequest) -> object:
        seen.append(req.request_id)
        return await original(req)

    service.complete = spy
    r = await client.post("/generate", json=GEN, headers={"X-Request-Id": "for-the-engine"})
    assert r.status_code == 200
    assert seen == ["for-the-engine"]


# ------------------------------------------------------------------------------ access log
async def test_one_access_line_per_request_with_its_counts(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    await client.post("/generate?debug=1", json=GEN, headers={"X-Request-Id": "first"})
    await client.post("/generate", json=GEN, headers={"X-Request-Id": "second"})  # greedy: a cache hit
    await client.get("/v1/models")
    records = access_records(caplog)
    assert len(records) == 3
    first, second, models = (vars(r) for r in records)
    assert set(first) >= ACCESS_FIELDS
    assert first["request_id"] == "first" and first["method"] == "POST" and first["path"] == "/generate"
    assert first["route"] == "/generate" and first["status"] == 200 and first["duration_ms"] >= 0
    assert first["generated_tokens"] == 3 and first["prompt_tokens"] > 0 and first["cache_hit"] is False
    assert second["cache_hit"] is True and second["generated_tokens"] == 3  # what the response carried
    assert second["prompt_tokens"] == first["prompt_tokens"]
    assert models["cache_hit"] is None and models["generated_tokens"] == 0 and models["api_key_name"] is None
    assert "debug" not in records[0].getMessage()  # never the query string
    assert "status=200" in records[0].getMessage() and "generated_tokens=3" in records[0].getMessage()


async def test_access_lines_of_failures(client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    await client.post("/generate", json={"prompt": ""})
    await client.get("/no/such/route")
    bad, missing = (vars(r) for r in access_records(caplog))
    assert bad["status"] == 400 and bad["generated_tokens"] == 0
    assert missing["status"] == 404 and missing["route"] == "unmatched" and missing["path"] == "/no/such/route"


@pytest_asyncio.fixture
async def auth_client(tmp_path: Path, fake: FakeEngine) -> AsyncIterator[tuple[httpx.AsyncClient, str]]:
    keys_path = tmp_path / "keys.sqlite3"
    settings = Settings(environment="test", model=MODEL, max_new_tokens_limit=48, keys_path=keys_path)
    _, key = await add_key(keys_path, name="ci-bot", scopes=["generate"])
    app = create_app(settings, engine_factory=lambda _s, _m: fake, cache=MemoryResultCache(16, 60.0))
    async with app.router.lifespan_context(app):
        assert await app.state.lifecycle.wait_started(5)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            yield c, key
        await fake.drain()


async def test_the_access_log_names_the_key_never_the_key_or_the_text(
    auth_client: tuple[httpx.AsyncClient, str], caplog: pytest.LogCaptureFixture
) -> None:
    client, key = auth_client
    caplog.set_level(logging.DEBUG)
    prompt = "A very secret prompt about zebras"
    r = await client.post("/generate", json={**GEN, "prompt": prompt}, headers=bearer(key))
    assert r.status_code == 200
    generated = r.json()["generated_text"]
    r = await client.post("/generate", json=GEN, headers=bearer(key + "x"))
    assert r.status_code == 401
    ok, refused = (vars(r) for r in access_records(caplog))
    assert ok["api_key_name"] == "ci-bot" and ok["status"] == 200
    assert refused["api_key_name"] is None and refused["status"] == 401
    everything = "\n".join(f"{r.getMessage()} {vars(r)}" for r in caplog.records)
    assert key not in everything and key[-20:] not in everything
    assert prompt not in everything and "zebras" not in everything
    assert not generated.strip() or generated not in everything


async def test_json_access_lines(client: httpx.AsyncClient) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(json_formatter())
    handler.addFilter(RequestIdFilter())
    access = logging.getLogger("gateway.access")
    access.addHandler(handler)
    previous = access.level
    access.setLevel(logging.INFO)
    try:
        await client.post("/generate", json=GEN, headers={"X-Request-Id": "json-1"})
    finally:
        access.removeHandler(handler)
        access.setLevel(previous)
    line = json.loads(stream.getvalue().strip().splitlines()[-1])
    assert set(line) >= ACCESS_FIELDS
    assert line["request_id"] == "json-1" and line["status"] == 200 and line["logger"] == "gateway.access"
    assert line["level"] == "INFO" and line["generated_tokens"] == 3


async def test_configure_logging_json_then_text() -> None:
    root = logging.getLogger()
    before = list(root.handlers)
    level = root.level
    try:
        for handler in before:
            root.removeHandler(handler)
        configure_logging("json")
        (handler,) = root.handlers
        stream = io.StringIO()
        handler.stream = stream  # type: ignore[attr-defined]
        logging.getLogger("frontend.test").warning("hello %s", "there")
        assert json.loads(stream.getvalue())["message"] == "hello there"
        configure_logging("text")
        (handler,) = root.handlers
        handler.stream = stream  # type: ignore[attr-defined]
        logging.getLogger("frontend.test").warning("plain")
        assert stream.getvalue().splitlines()[-1].endswith("WARNING frontend.test: plain")
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in before:
            root.addHandler(handler)
        root.setLevel(level)


# ------------------------------------------------------------------------------ metrics
async def _samples(client: httpx.AsyncClient) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    r = await client.get("/metrics")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


async def test_vllm_names_next_to_the_gateway_ones(client: httpx.AsyncClient) -> None:
    await client.post("/generate", json={**GEN, "max_new_tokens": 4})
    await client.post("/generate/stream", json={**GEN, "prompt": "Hey", "max_new_tokens": 2})
    s = await _samples(client)
    model = ("model_name", MODEL)
    assert s[("vllm:time_to_first_token_seconds_count", frozenset({model}))] == 2
    assert s[("vllm:inter_token_latency_seconds_count", frozenset({model}))] == 3 + 1
    assert s[("vllm:e2e_request_latency_seconds_count", frozenset({model}))] == 2
    assert s[("vllm:generation_tokens_total", frozenset({model}))] == 6
    assert s[("vllm:generation_tokens_total", frozenset({model}))] == s[("gateway_generated_tokens_total", frozenset())]
    assert s[("vllm:prompt_tokens_total", frozenset({model}))] == s[("gateway_prompt_tokens_total", frozenset())] > 0
    assert s[("vllm:request_success_total", frozenset({model, ("finished_reason", "length")}))] == 2
    for gauge in ("vllm:num_requests_running", "vllm:num_requests_waiting"):
        assert (gauge, frozenset({model})) in s
    assert ("vllm:request_queue_time_seconds_count", frozenset({model})) in s


async def test_docs_and_openapi_have_their_own_route_label(client: httpx.AsyncClient) -> None:
    assert (await client.get("/docs")).status_code == 200
    assert (await client.get("/openapi.json")).status_code == 200
    assert (await client.get("/redoc")).status_code == 200
    s = await _samples(client)
    routes = {dict(labels)["route"] for (name, labels) in s if name == "gateway_requests_total"}
    assert {"/docs", "/openapi.json", "/redoc"} <= routes
    assert "unmatched" not in routes


async def test_docs_assets_are_served_locally(client: httpx.AsyncClient) -> None:
    page = (await client.get("/docs")).text
    assets = re.findall(r"""(?:src|href)=["']([^"']+)["']""", page)
    assert assets and all(a.startswith("/docs/static/") for a in assets if a.endswith((".js", ".css"))), assets
    assert "cdn" not in page.lower() and "https://" not in page
    for asset in ("/docs/static/swagger-ui-bundle.js", "/docs/static/swagger-ui.css"):
        r = await client.get(asset)
        assert r.status_code == 200 and len(r.content) > 10_000
    redoc = (await client.get("/redoc")).text
    assert "/docs/static/redoc.standalone.js" in redoc and "https://" not in redoc


# ------------------------------------------------------------------------------ tracing
async def test_tracing_is_off_by_default(app: FastAPI) -> None:
    assert install_tracing(app, None) is None


async def test_spans_carry_the_request_id(settings: Settings, fake: FakeEngine, cache: MemoryResultCache) -> None:
    exporter = InMemorySpanExporter()
    app = create_app(settings, engine_factory=lambda _s, _m: fake, cache=cache)
    provider = install_tracing(app, None, service_name="test-gateway", exporter=exporter)
    assert provider is not None
    async with app.router.lifespan_context(app):
        assert await app.state.lifecycle.wait_started(5)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            r = await c.post("/generate", json=GEN, headers={"X-Request-Id": "traced-1"})
        assert r.status_code == 200
        await fake.drain()
    provider.force_flush()
    spans = exporter.get_finished_spans()
    server = [s for s in spans if s.attributes and s.attributes.get(REQUEST_ID_ATTRIBUTE) == "traced-1"]
    assert server, [(s.name, dict(s.attributes or {})) for s in spans]
    assert "/generate" in server[0].name
    assert server[0].resource.attributes["service.name"] == "test-gateway"


async def test_the_request_id_is_handed_to_the_engine(client: httpx.AsyncClient, fake: FakeEngine) -> None:
    r = await client.post("/generate", json=GEN, headers={"X-Request-Id": "to-the-engine-7"})
    assert r.status_code == 200
    assert fake.request_ids[-1] == "to-the-engine-7"  # the scheduler sends it with the rows to Triton


# ------------------------------------------------------------------------------ a client that leaves
async def _post_and_leave(app: FastAPI, fake: FakeEngine, path: str, payload: dict) -> list[dict]:
    """POST through ASGI; the client disconnects once its generation was submitted, before any
    response. Returns what the app sent (to a client that is gone)."""
    body = json.dumps(payload).encode()
    sent_request = False
    messages: list[dict] = []

    async def receive() -> dict:
        nonlocal sent_request
        if not sent_request:
            sent_request = True
            return {"type": "http.request", "body": body, "more_body": False}
        while not fake.submitted:
            await asyncio.sleep(0.01)
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        messages.append(message)

    headers = [(b"host", b"test"), (b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 1234),
        "server": ("test", 80),
        "state": {},
    }
    await asyncio.wait_for(app(scope, receive, send), timeout=5)
    return messages


@pytest.mark.parametrize(
    ("path", "payload"),
    [
        ("/generate", {"prompt": "Hello", "max_new_tokens": 40}),
        ("/v1/completions", {"model": MODEL, "prompt": "Hello", "max_tokens": 40}),
    ],
)
async def test_a_client_that_left_before_its_answer_is_499_not_500(
    client: httpx.AsyncClient,
    app: FastAPI,
    fake: FakeEngine,
    caplog: pytest.LogCaptureFixture,
    path: str,
    payload: dict,
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    fake.delay_s = 0.1  # 40 tokens: 4 s unless cancelled
    sent = await _post_and_leave(app, fake, path, payload)
    assert not [m for m in sent if m["type"] == "http.response.start"], "nothing is answered to a gone client"
    (line,) = [vars(r) for r in access_records(caplog) if r.path == path]  # type: ignore[attr-defined]
    assert line["status"] == 499
    r = await client.get("/metrics")
    counted = {
        s.labels["status"]: s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
        if s.name == "gateway_requests_total" and s.labels["route"] == path
    }
    assert counted == {"499": 1.0}
