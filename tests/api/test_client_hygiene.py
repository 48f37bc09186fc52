"""Client hygiene against a real uvicorn on a free loopback port (the app over a FakeEngine):
body limits (declared and chunked, memory bounded), slowloris and idle connections cut by the
header and keep-alive deadlines, a stalled SSE reader dropped with its generation cancelled,
and non-streaming requests cancelled when their client disconnects."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import socket
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import uvicorn

from frontend.api.client_hygiene import guarded_h11, json_values
from frontend.app import create_app
from frontend.cache import MemoryResultCache
from frontend.engine.model import ServedModel
from frontend.settings import Settings
from tests.api.fake_engine import FakeEngine
from tests.rawhttp import (
    body_pieces,
    closed_by_peer,
    connect,
    framing_header,
    read_response,
    request,
    send_in_background,
    send_json,
    slowloris,
)

pytestmark = pytest.mark.api

TIMEOUT = 0.5  # header, keep-alive and SSE send deadlines of the server under test
LONG = 20_000  # tokens: a generation that would run for many seconds unless cancelled


@dataclass
class Server:
    port: int
    fake: FakeEngine
    settings: Settings

    def connect(self, rcvbuf: int | None = None) -> socket.socket:
        return connect(self.port, rcvbuf)


@pytest.fixture
def server(served_model: ServedModel) -> Iterator[Server]:
    with _server(served_model, sndbuf=8192) as srv:
        yield srv


@pytest.fixture
def kernel_buffers_server(served_model: ServedModel) -> Iterator[Server]:
    """The same server, but its sockets' buffers are the product's own (no test-sized SO_SNDBUF)."""
    with _server(served_model, sndbuf=None) as srv:
        yield srv


@contextlib.contextmanager
def _server(served_model: ServedModel, sndbuf: int | None) -> Iterator[Server]:
    model = dataclasses.replace(served_model, max_context=LONG + 64)
    fake = FakeEngine(model)
    settings = Settings(
        environment="test",
        model=model.name,
        max_batch_requests=4,
        max_new_tokens_limit=LONG,
        request_timeout_s=30.0,
        header_timeout_s=TIMEOUT,
        keep_alive_timeout_s=TIMEOUT,
        sse_send_timeout_s=TIMEOUT,
        body_timeout_s=1.0,
    )
    app = create_app(settings, engine_factory=lambda _s, _m: fake, cache=MemoryResultCache(64, 60.0, max_bytes=1 << 20))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if sndbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)  # inherited by accepted sockets
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(
        app,
        log_level="warning",
        http=guarded_h11(settings.header_timeout_s),
        timeout_keep_alive=settings.keep_alive_timeout_s,  # type: ignore[arg-type]
    )
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=lambda: asyncio.run(uv.serve(sockets=[sock])), daemon=True)
    thread.start()
    srv = Server(sock.getsockname()[1], fake, settings)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # started and the engine is up
        with contextlib.suppress(OSError):
            if uv.started and request(srv.port, "GET", "/health/ready")[0] == 200:
                break
        time.sleep(0.02)
    else:
        raise AssertionError("the server did not become ready")
    try:
        yield srv
    finally:
        uv.should_exit = True
        thread.join(10)
        sock.close()


def _wait(condition: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def _assert_413(status: int, headers: dict[str, str], body: bytes) -> None:
    assert status == 413, body
    assert headers["content-type"].startswith("application/json")
    assert headers.get("connection") == "close"
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code", "request_id"}
    assert err["request_id"] == headers["x-request-id"]
    assert err["code"] == "request_too_large"


# --------------------------------------------------------------------------- body limit
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_10_mb_body_gets_413_and_costs_no_memory(server: Server, framing: str) -> None:
    total = 10_000_000
    pieces = body_pieces(framing, total)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        with server.connect() as s:
            s.sendall(
                f"POST /generate HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                f"{framing_header(framing, total)}\r\n\r\n".encode()
            )
            sender = send_in_background(s, pieces)
            status, headers, body = read_response(s)
            assert closed_by_peer(s, 3.0) is not None, "the connection must be closed after the 413"
            sender.join(5)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    _assert_413(status, headers, body)
    assert peak - before < 5 * 1024 * 1024, f"memory grew by {(peak - before) / 1e6:.1f} MB"
    assert server.fake.submitted == []


def test_a_declared_10_gb_body_is_refused_before_it_is_sent(server: Server) -> None:
    with server.connect() as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Length: 10000000000\r\n\r\n")
        started = time.monotonic()
        status, headers, body = read_response(s)
        assert time.monotonic() - started < 1.0
        _assert_413(status, headers, body)
        assert closed_by_peer(s, 2.0) is not None


def test_a_body_at_the_limit_is_parsed(server: Server) -> None:
    limit = server.settings.body_limit
    payload = {"prompt": "hi", "max_new_tokens": 2, "stop": ["x"]}
    # pad with JSON whitespace: the body is exactly `limit` bytes and still a valid request
    body = json.dumps(payload).encode()
    body = body[:-1] + b" " * (limit - len(body)) + b"}"
    assert len(body) == limit
    with server.connect() as s:
        s.sendall(
            f"POST /generate HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {limit}\r\n"
            "Connection: close\r\n\r\n".encode()
            + body
        )
        status, _, text = read_response(s)
    assert status == 200, text


def _post(server: Server, path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
    with server.connect() as s:
        s.sendall(
            f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n".encode()
            + body
        )
        return read_response(s)


@pytest.mark.parametrize("path", ["/v1/completions", "/detokenize"])
def test_a_list_of_token_ids_under_the_byte_limit_but_past_any_context_is_refused_unparsed(
    server: Server, path: str
) -> None:
    # Under the byte limit, over a million values: before, parsing and validating them cost +753 MiB
    # and blocked the event loop 1.7 s (6 MB), and /detokenize answered them all.
    ids = ",".join(["1"] * ((server.settings.body_limit - 64) // 2))
    field = '"prompt"' if path == "/v1/completions" else '"tokens"'
    body = f'{{"model":"{server.fake.model.name}",{field}:[{ids}]}}'.encode()
    assert len(body) <= server.settings.body_limit
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        started = time.monotonic()
        status, headers, text = _post(server, path, body)
        elapsed = time.monotonic() - started
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    _assert_413(status, headers, text)
    assert "JSON values" in json.loads(text)["error"]["message"]
    assert peak - before < 8 * len(body), f"memory grew by {(peak - before) / 1e6:.1f} MB"  # the bytes, not objects
    assert elapsed < 1.0, elapsed
    assert server.fake.submitted == []


def test_a_large_text_full_of_commas_is_not_counted_as_values(server: Server) -> None:
    text = (',,,,,,,\\"' * server.settings.max_prompt_chars)[: server.settings.max_prompt_chars]  # commas, quotes
    payload = {"model": server.fake.model.name, "prompt": [text] * 4, "max_tokens": 1}
    body = json.dumps(payload).encode()
    assert body.count(b",") > 96_000  # more commas than values allowed: the strings are looked into
    status, _, answer = _post(server, "/v1/completions", body)
    assert status != 413, answer


def test_json_values_counts_values_outside_strings() -> None:
    # `at_most` below the body's commas: the strings are looked into.
    assert json_values(b'{"a": [1, 2, 3], "b": "x,y,z,w,v,u"}', at_most=5) == 4
    assert json_values(b'{"s": "q\\\\", "t": [1,2], "u": ",,,,,,"}', at_most=5) == 4  # an escaped backslash
    assert json_values(b'{"s": "a\\",\\"", "t": [1,2], "u": ",,,,,,"}', at_most=5) == 4  # an escaped quote
    assert json_values(b'["a","b","c","d"]', at_most=1) > 1  # strings are values too
    assert json_values(b"[1,2]", at_most=10) == 2


def test_a_body_that_trickles_in_gets_408(server: Server) -> None:
    with server.connect() as s:
        s.sendall(
            b"POST /generate HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
        )
        started = time.monotonic()
        status, headers, body = read_response(s)
        assert status == 408, body
        assert json.loads(body)["error"]["code"] == "timeout"
        assert time.monotonic() - started < server.settings.body_timeout_s + 1.0
        assert headers.get("connection") == "close"


# --------------------------------------------------------------------------- slow clients
def test_slowloris_connections_are_closed_within_the_header_deadline(server: Server) -> None:
    conns = [server.connect() for _ in range(20)]
    try:
        open_, started = slowloris(conns, TIMEOUT + 2.0)  # a header line every 100 ms: never complete
        for s in list(open_):  # a write can succeed after the close; a read cannot
            if closed_by_peer(s, 0.2) is not None:
                open_.remove(s)
        assert not open_, f"{len(open_)} of {len(conns)} slowloris connections still open"
        assert time.monotonic() - started < TIMEOUT + 2.0
    finally:
        for s in conns:
            s.close()


def test_an_idle_connection_is_closed(server: Server) -> None:
    with server.connect() as s:
        took = closed_by_peer(s, TIMEOUT + 2.0)
    assert took is not None and took < TIMEOUT + 1.0


def test_keep_alive_serves_requests_then_closes_when_idle(server: Server) -> None:
    with server.connect() as s:
        for _ in range(2):
            s.sendall(b"GET /health/live HTTP/1.1\r\nHost: t\r\n\r\n")
            status, _, _ = read_response(s)
            assert status == 200
        took = closed_by_peer(s, TIMEOUT + 2.0)
    assert took is not None and took < TIMEOUT + 1.0


def test_a_slow_but_steady_request_is_served(server: Server) -> None:
    """The header deadline is for the whole head; a client that finishes in time is served."""
    with server.connect() as s:
        for line in (b"GET /health/live HTTP/1.1\r\n", b"Host: t\r\n", b"\r\n"):
            s.sendall(line)
            time.sleep(TIMEOUT / 5)
        status, _, _ = read_response(s)
    assert status == 200


# --------------------------------------------------------------------------- stalled and vanished clients
@pytest.mark.parametrize(
    ("path", "payload"),
    [
        ("/generate/stream", {"prompt": "Hello", "max_new_tokens": LONG}),
        ("/v1/completions", {"model": "tiny", "prompt": "Hello", "max_tokens": LONG, "stream": True, "logprobs": 5}),
    ],
)
def test_a_stalled_sse_reader_is_dropped_and_its_generation_cancelled(
    server: Server, path: str, payload: dict[str, Any]
) -> None:
    server.fake.delay_s = 0.0002
    with server.connect(rcvbuf=4096) as s:
        send_json(s, path, payload)  # and never read
        assert _wait(lambda: bool(server.fake.submitted), 2.0)
        handle = server.fake.submitted[0]
        assert _wait(lambda: handle.cancelled, 15.0), f"not cancelled after {len(handle.emitted)} tokens"
        assert len(handle.emitted) < LONG


def test_a_reader_that_never_reads_is_dropped_with_the_kernels_own_buffers(kernel_buffers_server: Server) -> None:
    # Before, the kernel grew the send buffer (to 4 MiB) and the client's receive buffer absorbed
    # the rest: a 20,000-token stream (~2 MB of events) went out unread, the send timeout never
    # fired, and the generation ran to its end.
    server = kernel_buffers_server
    server.fake.delay_s = 0.0002
    with server.connect() as s:
        send_json(s, "/generate/stream", {"prompt": "Hello", "max_new_tokens": LONG})  # and never read
        assert _wait(lambda: bool(server.fake.submitted), 2.0)
        handle = server.fake.submitted[0]
        assert _wait(lambda: handle.cancelled or len(handle.emitted) >= LONG, 20.0)
        assert handle.cancelled and len(handle.emitted) < LONG, f"ran to {len(handle.emitted)} tokens unread"
        assert closed_by_peer(s, 5.0) is not None, "the stalled connection must be closed"
    assert _wait(lambda: server.fake.live == 0, 2.0)


@pytest.mark.parametrize(
    ("path", "payload", "generations"),
    [
        ("/generate", {"prompt": "Hello", "max_new_tokens": LONG}, 1),
        ("/v1/completions", {"model": "tiny", "prompt": ["Hello", "World"], "max_tokens": LONG}, 2),
        ("/generate/batch", {"requests": [{"prompt": "a", "max_new_tokens": LONG}] * 3}, 3),
        ("/generate/stream", {"prompt": "Hello", "max_new_tokens": LONG}, 1),  # before its first token
    ],
)
def test_a_client_that_disconnects_cancels_its_generations(
    server: Server, path: str, payload: dict[str, Any], generations: int
) -> None:
    server.fake.delay_s = 0.05 if path != "/generate/stream" else 30.0
    s = server.connect()
    send_json(s, path, payload)
    assert _wait(lambda: len(server.fake.submitted) == generations, 2.0)
    s.close()
    closed_at = time.monotonic()
    assert _wait(lambda: all(h.cancelled for h in server.fake.submitted), 2.0)
    assert time.monotonic() - closed_at < 1.0
    assert all(len(h.emitted) < 100 for h in server.fake.submitted)
    assert server.fake.live == 0
