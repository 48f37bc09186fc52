"""`python benchmarks/sse_streams_bench.py --code A --code B`: many concurrent SSE streams against ONE
gateway process (no `--workers`), for each code tree in turn, alternating, on this CPU.

The server is the real app (routes, service, scheduler, sampler, detokenizer, metrics, SSE) over a
stand-in Triton that answers every step after `--step-ms` (the GPU's time) with a random window;
the client is another process holding `--streams` streams (`/v1/completions`, `stream: true`,
`include_usage`) open at once, each user sending `--requests` in a row, and reading either as fast
as it can or slowly (`--slow-ms` between reads, a small receive buffer, so the server's writes
back up). It reports tokens/s delivered and SSE events written per token.

A measuring tool beside the other benchmarks. Each code tree is a directory holding
`frontend/` and `export/` (e.g. `git archive main | tar -x -C /tmp/base`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


# ------------------------------------------------------------------------------------ server
def _small_send_buffers() -> None:
    """A slow network: the server's writes back up after 4 KiB, not after megabytes."""
    from uvicorn.protocols.http import h11_impl, httptools_impl

    for protocol in (h11_impl.H11Protocol, httptools_impl.HttpToolsProtocol):
        made = protocol.connection_made

        def connection_made(self: object, transport: asyncio.Transport, _made: object = made) -> None:
            _made(self, transport)  # type: ignore[operator]
            transport.set_write_buffer_limits(high=4096)
            transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)

        protocol.connection_made = connection_made  # type: ignore[method-assign]


def _engine_factory(step_ms: float, streams: int) -> Any:
    """`create_app`'s engine factory: the real scheduler over a stand-in Triton."""
    import numpy as np

    from export.tokenizer_builder import build_tokenizer
    from frontend.engine.model import ServedModel
    from frontend.engine.scheduler import Scheduler, SchedulerConfig
    from frontend.engine.step_rows import StepRequest, StepResult

    vocab = 8192
    tokenizer = build_tokenizer(Path(tempfile.mkdtemp()), vocab)
    model = ServedModel(
        name="bench",
        version="1",
        tokenizer=tokenizer,
        vocab_size=vocab,
        max_context=1024,
        eos_token_id=vocab - 1,
        dtype="float32",
        source="bench",
        created=1_700_000_000,
    )

    class SlowTriton:
        """Every step answered after `step_ms` with a descending random window (never eos)."""

        def __init__(self) -> None:
            self.rng = np.random.default_rng(0)

        async def step(self, rows: StepRequest, *, window: int, want_logits: bool = False) -> StepResult:
            await asyncio.sleep(step_ms / 1000)
            n = int(rows.sequence_ids.shape[0])
            values = np.sort(self.rng.normal(0, 3, (n, window)).astype(np.float32), axis=1)[:, ::-1].copy()
            ids = self.rng.integers(0, vocab - 1, (n, window)).astype(np.int64)
            return StepResult(np.zeros(n, dtype=np.int32), values, ids, (values[:, 0] + 2.0).astype(np.float32), None)

    class Engine:
        def __init__(self, metrics: object) -> None:
            self.model = model
            self.scheduler = Scheduler(
                SlowTriton(),  # type: ignore[arg-type]
                SchedulerConfig(max_running=streams, max_waiting=4 * streams),
                eos_token_id=model.eos_token_id,
                vocab_size=vocab,
                observer=metrics,  # type: ignore[arg-type]
            )

        async def start(self) -> None:
            self.scheduler.start()

        async def close(self) -> None:
            await self.scheduler.close()

        async def ready(self) -> bool:
            return True

        def submit(self, request: object, events: object = None) -> object:
            return self.scheduler.submit(request, events)  # type: ignore[arg-type]

        def cancel(self, handle: object) -> None:
            self.scheduler.cancel(handle)  # type: ignore[arg-type]

        def load(self) -> tuple[int, int]:
            return self.scheduler.running, self.scheduler.waiting

    return lambda _s, m: Engine(m)


def serve(port: int, step_ms: float, streams: int, small_buffers: bool) -> None:
    import uvicorn

    from frontend.app import create_app
    from frontend.cache import MemoryResultCache
    from frontend.settings import Settings

    if small_buffers:
        _small_send_buffers()
    settings = Settings(
        environment="test",
        model="bench",
        max_running=streams,
        max_waiting=4 * streams,
        access_log=False,
        max_new_tokens_limit=1024,
        ip_rpm=0,  # no per-IP limit: every stream comes from this one address
    )
    app = create_app(settings, engine_factory=_engine_factory(step_ms, streams), cache=MemoryResultCache(16, 60.0))
    profile_to = os.environ.get("SSE_BENCH_PROFILE")  # where the server's cProfile stats go, if set
    if profile_to:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False, backlog=4096)
    server = uvicorn.Server(config)
    server.capture_signals = contextlib.nullcontext  # type: ignore[assignment,method-assign]  # ours, below
    signal.signal(signal.SIGTERM, lambda *_: setattr(server, "should_exit", True))
    server.run()
    if profile_to:
        profiler.disable()
        profiler.dump_stats(profile_to)


# ------------------------------------------------------------------------------------ client
async def _one(port: int, body: bytes, slow_ms: float, rcvbuf: int | None) -> tuple[int, int]:
    # A slow reader takes 512 bytes every `slow_ms` through a 4 KiB receive buffer.
    """(completion tokens, SSE data events) of one streamed request."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    # A slow reader's stream buffer is small too (asyncio reads ahead up to twice `limit`).
    reader, writer = await asyncio.open_connection(sock=sock, limit=1024 if rcvbuf else 1 << 16)
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: b\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    writer.write(head + body)
    parts = []
    while True:
        data = await reader.read(512 if rcvbuf else 1 << 16)
        if not data:
            break
        parts.append(data)
        if slow_ms:
            await asyncio.sleep(slow_ms / 1000)
    writer.close()
    raw = b"".join(parts)
    assert raw.startswith(b"HTTP/1.1 200"), raw[:300]
    events = raw.count(b"data: ")
    usage = raw[raw.rindex(b'"usage":') :]
    tokens = json.loads(b"{" + usage[: usage.index(b"}") + 1] + b"}")["usage"]["completion_tokens"]
    return tokens, events - 2  # less the usage chunk and [DONE]


async def load(port: int, streams: int, requests: int, tokens: int, slow_ms: float, rcvbuf: int | None) -> dict:
    body = json.dumps(
        {
            "model": "bench",
            "prompt": "Hello there, a prompt of some thirty-two tokens for each of the many streams " * 1,
            "max_tokens": tokens,
            "temperature": 0.8,
            "top_k": 50,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()

    async def user() -> tuple[int, int]:
        got = events = 0
        for _ in range(requests):
            t, e = await _one(port, body, slow_ms, rcvbuf)
            got, events = got + t, events + e
        return got, events

    started = time.perf_counter()
    results = await asyncio.gather(*(user() for _ in range(streams)))
    elapsed = time.perf_counter() - started
    got = sum(t for t, _ in results)
    events = sum(e for _, e in results)
    return {"tokens_per_s": got / elapsed, "events_per_token": events / got, "s": elapsed}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_up(port: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"GET /health/ready HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")
                if b" 200 " in s.recv(200):
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError("the gateway did not come up")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--code", action="append", required=True, help="a code tree (repeat: alternated)")
    p.add_argument("--streams", type=int, default=256)
    p.add_argument("--requests", type=int, default=2, help="requests per user, one after the other")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--step-ms", type=float, default=2.0)
    p.add_argument("--slow-ms", type=float, default=20.0, help="a slow reader's pause between 512-byte reads")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    p.add_argument("--small-buffers", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--readers", default="fast,slow")
    args = p.parse_args()
    if args.serve:
        serve(args.serve, args.step_ms, args.streams, args.small_buffers)
        return 0
    for rnd in range(args.rounds):
        for reader in args.readers.split(","):
            slow_ms, rcvbuf = (0.0, None) if reader == "fast" else (args.slow_ms, 4096)
            for code in args.code:
                port = _free_port()
                env = {**os.environ, "PYTHONPATH": str(Path(code).resolve())}
                cmd = [sys.executable, str(Path(__file__).resolve()), "--code", code, "--serve", str(port)]
                cmd += ["--step-ms", str(args.step_ms), "--streams", str(args.streams)]
                cmd += ["--small-buffers"] if reader == "slow" else []
                server = subprocess.Popen(cmd, env=env, cwd=code, stderr=subprocess.DEVNULL)
                try:
                    _wait_up(port)
                    r = asyncio.run(load(port, args.streams, args.requests, args.tokens, slow_ms, rcvbuf))
                    print(
                        f"round {rnd} {code:>24} {reader}: {r['tokens_per_s']:8,.0f} tok/s, "
                        f"{r['events_per_token']:.2f} SSE events per token ({r['s']:.1f} s)",
                        flush=True,
                    )
                finally:
                    server.terminate()
                    server.wait(30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
