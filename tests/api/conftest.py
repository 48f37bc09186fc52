"""Fixtures of the API tier: the real app (with its lifespan) over a FakeEngine and a memory cache."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import pytest_asyncio
from fastapi import FastAPI

from export.tokenizer_builder import build_tokenizer
from frontend.app import create_app
from frontend.cache import MemoryResultCache
from frontend.engine.model import ServedModel
from frontend.settings import Settings
from tests.api.fake_engine import FakeEngine

MODEL = "tiny"
VOCAB = 512
MAX_CONTEXT = 64


@pytest.fixture(scope="session")
def served_model(tmp_path_factory: pytest.TempPathFactory) -> ServedModel:
    out: Path = tmp_path_factory.mktemp("tokenizer")
    tokenizer = build_tokenizer(out, VOCAB)
    assert tokenizer.eos_token_id == VOCAB - 1
    return ServedModel(
        name=MODEL,
        version="1",
        tokenizer=tokenizer,
        vocab_size=VOCAB,
        max_context=MAX_CONTEXT,
        eos_token_id=VOCAB - 1,
        dtype="float32",
        source="fake",
        created=1_700_000_000,
    )


@pytest.fixture
def fake(served_model: ServedModel) -> FakeEngine:
    return FakeEngine(served_model)


@pytest.fixture
def settings() -> Settings:
    return Settings(
        environment="test",
        model=MODEL,
        max_batch_requests=4,
        max_n=3,
        max_new_tokens_limit=48,
        request_timeout_s=5.0,
    )


@pytest.fixture
def cache() -> MemoryResultCache:
    return MemoryResultCache(256, 600.0, max_bytes=1 << 20)


@pytest_asyncio.fixture
async def app(settings: Settings, fake: FakeEngine, cache: MemoryResultCache) -> AsyncIterator[FastAPI]:
    """The app with its lifespan running (httpx's ASGITransport does not run lifespans)."""
    application = create_app(settings, engine_factory=lambda _s, _m: fake, cache=cache)
    async with application.router.lifespan_context(application):
        assert await application.state.lifecycle.wait_started(5)  # the engine starts in the background
        assert fake.started
        yield application
        await fake.drain()
        leaked = fake.live  # every generation of every request must have been cancelled or finished
    assert fake.closed
    assert leaked == 0, f"{leaked} generation handle(s) leaked"


@pytest_asyncio.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
        yield c


@pytest_asyncio.fixture
async def oai(app: FastAPI) -> AsyncIterator[openai.AsyncOpenAI]:
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
    sdk = openai.AsyncOpenAI(  # the SDK accepts legacy httpx clients at run time; its stubs name httpx2
        base_url="http://test/v1",
        api_key="x",
        http_client=http,  # type: ignore[arg-type]
        max_retries=0,
    )
    async with sdk:
        yield sdk


# ------------------------------------------------------------------------------------ helpers
def assert_error_envelope(response: httpx.Response) -> dict[str, Any]:
    """The body is EXACTLY {"error": {"message": str, "type": str, "param": str|None, "code": str|None,
    "request_id": str}}, and `request_id` is the response's X-Request-Id."""
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code", "request_id"}, err
    assert err["request_id"] == response.headers["x-request-id"], (err, response.headers)
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    assert err["param"] is None or isinstance(err["param"], str)
    assert err["code"] is None or isinstance(err["code"], str)
    return err  # type: ignore[no-any-return]


@dataclass
class SSEEvent:
    event: str | None
    data: str
    id: str | None = None

    def json(self) -> Any:
        return json.loads(self.data)


def parse_sse(raw: str) -> list[SSEEvent]:
    """Parse a text/event-stream body strictly: blank-line separated blocks of `field: value` lines."""
    text = raw.replace("\r\n", "\n").replace("\r", "\n")
    assert text.endswith("\n\n"), f"the stream must end with a blank line: {raw[-40:]!r}"
    events = []
    for block in text.split("\n\n"):
        if not block:
            continue
        event: str | None = None
        ident: str | None = None
        data: list[str] = []
        for line in block.split("\n"):
            if line.startswith(":"):
                continue  # comment (ping)
            name, sep, value = line.partition(":")
            assert sep, f"malformed SSE line {line!r}"
            value = value.removeprefix(" ")
            if name == "event":
                event = value
            elif name == "data":
                data.append(value)
            elif name == "id":
                ident = value
            elif name != "retry":
                raise AssertionError(f"unknown SSE field {name!r}")
        if data or event:
            events.append(SSEEvent(event, "\n".join(data), ident))
    return events


@dataclass
class RawExchange:
    status: int
    headers: dict[str, str]
    body: str  # what the client read before it went away


async def asgi_post(
    app: FastAPI,
    path: str,
    payload: dict[str, Any],
    *,
    disconnect_when: Callable[[str], bool],
    timeout_s: float = 5.0,
) -> RawExchange:
    """POST straight through ASGI and report `http.disconnect` once `disconnect_when(body so far)`.

    httpx's ASGITransport buffers the whole response, so it cannot model a client that stops
    reading mid-stream; this driver can.
    """
    import asyncio

    body = json.dumps(payload).encode()
    gone = asyncio.Event()
    sent_request = False
    status = 0
    headers: dict[str, str] = {}
    chunks: list[bytes] = []
    late: list[bytes] = []  # sent after the client went away (never read)

    async def receive() -> MutableMapping[str, Any]:
        nonlocal sent_request
        if not sent_request:
            sent_request = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
            headers.update({k.decode().lower(): v.decode() for k, v in message.get("headers", [])})
        elif message["type"] == "http.response.body":
            if gone.is_set():
                late.append(message.get("body", b""))
                return
            chunks.append(message.get("body", b""))
            if disconnect_when(b"".join(chunks).decode()):
                gone.set()

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
        "headers": [
            (b"host", b"test"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 1234),
        "server": ("test", 80),
        "state": {},
    }
    await asyncio.wait_for(app(scope, receive, send), timeout=timeout_s)
    return RawExchange(status, headers, b"".join(chunks).decode())


@pytest_asyncio.fixture
async def lenient_client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """Like `client`, but an exception escaping the app becomes the 500 a real server would send."""
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield c


def prompt_of_tokens(model: ServedModel, at_least: int) -> tuple[str, int]:
    """A prompt of at least `at_least` tokens, and its exact token count."""
    text = "The cat runs"
    while len(model.tokenizer(text)["input_ids"]) < at_least:
        text += " and the dog jumps"
    return text, len(model.tokenizer(text)["input_ids"])
