"""Raw HTTP/1.1 over a loopback TCP socket, for the tests that must misbehave as a client: partial
heads (slowloris), bodies that never end, readers that stop reading. Shared by the API tier
(tests/api/test_client_hygiene.py, the app over a FakeEngine) and the resilience tier
(tests/resilience/test_abuse.py, the real stack)."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

SLOWLORIS_HEAD = b"GET /health/live HTTP/1.1\r\nHost: t\r\n"  # a request head that is never ended


def connect(port: int, rcvbuf: int | None = None, timeout_s: float = 5.0) -> socket.socket:
    """A TCP connection to 127.0.0.1:`port`; `rcvbuf` shrinks its receive buffer (set before connecting)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(timeout_s)
    s.connect(("127.0.0.1", port))
    return s


def read_response(s: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """(status, headers with lower-case names, body) of one response; the body is read up to its
    Content-Length (none: empty), or to EOF if the server closes first."""
    raw = b""
    while b"\r\n\r\n" not in raw:
        chunk = s.recv(65536)
        if not chunk:
            break
        raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = s.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, headers, body


def send_json(s: socket.socket, path: str, payload: Any) -> None:
    """POST `payload` as JSON on `s` (keep-alive: the connection stays open); the response is not read."""
    body = json.dumps(payload).encode()
    s.sendall(
        f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )


def request(port: int, method: str, path: str, payload: Any = None) -> tuple[int, dict[str, str], bytes]:
    """One request (JSON body when `payload` is given) on its own connection, closed after the response."""
    body = b"" if payload is None else json.dumps(payload).encode()
    with connect(port) as s:
        s.sendall(
            f"{method} {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        return read_response(s)


def closed_by_peer(s: socket.socket, within_s: float) -> float | None:
    """Seconds until the server closed `s` (EOF or reset), or None if it did not within `within_s`."""
    started = time.monotonic()
    s.settimeout(within_s)
    try:
        while True:
            if not s.recv(4096):
                return time.monotonic() - started
    except TimeoutError:
        return None
    except OSError:
        return time.monotonic() - started


def send_in_background(s: socket.socket, pieces: Callable[[], Iterator[bytes]]) -> threading.Thread:
    """Send every piece of `pieces()` on `s` from a daemon thread (stopping quietly when the server
    closes the connection mid-body), so the caller can read the response meanwhile."""

    def push() -> None:
        with contextlib.suppress(OSError):  # the server closes the connection mid-body
            for piece in pieces():
                s.sendall(piece)

    t = threading.Thread(target=push, daemon=True)
    t.start()
    return t


def framing_header(framing: str, total: int) -> str:
    """The header that frames a `total`-byte body: "chunked" or "content-length"."""
    return "Transfer-Encoding: chunked" if framing == "chunked" else f"Content-Length: {total}"


def body_pieces(framing: str, total: int) -> Callable[[], Iterator[bytes]]:
    """The pieces of a `total`-byte body of "x" (rounded up to 64 KiB blocks), chunk-framed when
    `framing` is "chunked": one buffer, sent again and again, so the client allocates nothing per send
    (a test that traces the memory of an in-process server sees the server's)."""
    block = b"x" * 65536
    chunk_head = f"{len(block):x}\r\n".encode()

    def pieces() -> Iterator[bytes]:
        sent = 0
        while sent < total:
            yield (chunk_head + block + b"\r\n") if framing == "chunked" else block
            sent += len(block)
        if framing == "chunked":
            yield b"0\r\n\r\n"

    return pieces


def slowloris(conns: list[socket.socket], within_s: float) -> tuple[list[socket.socket], float]:
    """Begin a request head on every connection, then add a header line to each every 100 ms (the head
    never completes) until a write fails on all of them or `within_s` has passed since the first line.
    Returns the connections still writable (a write can succeed after the server's close; a read cannot)
    and the monotonic time the trickle began."""
    for s in conns:
        s.sendall(SLOWLORIS_HEAD)
    started = time.monotonic()
    open_ = list(conns)
    while open_ and time.monotonic() - started < within_s:
        time.sleep(0.1)
        for s in list(open_):
            try:
                s.sendall(b"X-Slow: 1\r\n")
            except OSError:
                open_.remove(s)
    return open_, started
