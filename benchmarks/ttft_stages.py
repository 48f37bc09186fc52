"""`python -m benchmarks.ttft_stages --mode inproc|split`: where a first token's time goes, stage
by stage, for ONE stream at a time on `/v1/completions` with `stream: true` (issue 16, target 3).

The server is the real app (middleware, routes, service, SSE) in uvicorn over the real scheduler
and sampler, whose Triton is a stand-in that answers every step after `--step-ms`:

* `inproc`: one gateway process, the scheduler inside it;
* `split`: the `--workers N` layout: an engine-core process (`EngineCore` around the scheduler)
  and one HTTP worker (`RemoteEngine`) talking over ZeroMQ ipc, as the 8-worker deployment does
  (a single stream uses one worker).

A closed-loop client sends `--requests` requests one after another (a 32-token text prompt,
`max_tokens` `--max-tokens`, sampled, so never a cache hit) over one keep-alive connection and reads each to `[DONE]`.
The server processes record monotonic timestamps (CLOCK_MONOTONIC: the same clock in every
process) at fixed points of the path; for each request the first timestamp of each point inside
the request's window is taken, and the report gives the median of each stage (the gap between
consecutive points) with the client's own TTFT. Points not reached (e.g. the core's in inproc)
are skipped. The timestamps cost ~1 us each.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import itertools
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.single_process_bench import _free_port, _model, _scheduler_engine, _wait_up, run_uvicorn

_MARKS: list[tuple[str, int]] = []
_now = time.monotonic_ns


def mark(name: str) -> None:
    _MARKS.append((name, _now()))


def _dump_at_exit(path: str) -> None:
    def dump() -> None:
        Path(path).write_text(json.dumps(_MARKS))

    atexit.register(dump)


# ------------------------------------------------------------------------------------ hooks
def _hook_worker(app: Any) -> Any:
    """Marks on the HTTP side; returns the ASGI app wrapped with the entry and first-body marks."""
    from frontend.api.openai import serving
    from frontend.generation import service as service_mod
    from frontend.generation import stream as stream_mod
    from frontend.generation.pacing import StreamSink
    from frontend.generation.service import GenerationService

    create = serving.create_completion

    async def create_completion(*args: Any, **kwargs: Any) -> Any:
        mark("handler")  # body parsed and validated, dependencies (auth) resolved
        out = await create(*args, **kwargs)
        mark("response_made")
        return out

    serving.create_completion = create_completion  # type: ignore[assignment]
    openai_sse = serving.openai_sse

    def openai_sse_(events: Any, service: Any) -> Any:
        async def marked() -> Any:
            first = True
            async for frame in events:
                if first:
                    mark("first_frame")
                    first = False
                yield frame

        return openai_sse(marked(), service)

    serving.openai_sse = openai_sse_  # type: ignore[assignment]

    _mark_around(GenerationService, "tokenize", before="tokenize", after="tokenized")
    _mark_around(GenerationService, "prepare", after="prepared")
    generate = stream_mod.generate

    async def generate_(engine: Any, *args: Any, **kwargs: Any) -> Any:
        mark("generate")
        first = True
        async for item in generate(_SubmitMark(engine), *args, **kwargs):
            if first:
                mark("first_item")
                first = False
            yield item

    service_mod.generate = generate_  # type: ignore[assignment]
    _mark_around(StreamSink, "put_nowait", before="sink_event")
    from frontend.engine.remote import RemoteEngine

    _mark_around(RemoteEngine, "_dispatch", before="worker_received")

    if os.environ.get("TTFT_LAYERS"):  # a mark as each ASGI layer is entered (diagnostics)
        _mark_layers(app)

    async def wrapped(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != "/v1/completions":
            await app(scope, receive, send)
            return
        mark("asgi")
        state = {"first": True}

        async def send_(message: Any) -> None:
            if message["type"] == "http.response.start":
                mark("response_start")
            if state["first"] and message["type"] == "http.response.body" and message.get("body"):
                state["first"] = False
                mark("first_body_sent")
            await send(message)

        await app(scope, receive, send_)

    return wrapped


def _mark_layers(app: Any) -> None:
    from fastapi import routing

    layer = app.middleware_stack = app.build_middleware_stack()
    while callable(child := getattr(layer, "app", None)):
        name = f"layer:{type(child).__name__}"

        async def marked(scope: Any, receive: Any, send: Any, _child: Any = child, _name: str = name) -> None:
            if scope["type"] == "http":
                mark(_name)
            await _child(scope, receive, send)

        layer.app = marked
        layer = child
    solve = routing.solve_dependencies

    async def solve_(*args: Any, **kwargs: Any) -> Any:
        mark("layer:solve_dependencies")
        out = await solve(*args, **kwargs)
        mark("layer:solved")
        return out

    routing.solve_dependencies = solve_  # type: ignore[assignment]


def _mark_around(owner: Any, name: str, *, before: str | None = None, after: str | None = None) -> None:
    """Replace the (synchronous) method `owner.name` by one that marks `before` and `after` its call."""
    method = getattr(owner, name)

    def marked(*args: Any, **kwargs: Any) -> Any:
        if before:
            mark(before)
        out = method(*args, **kwargs)
        if after:
            mark(after)
        return out

    setattr(owner, name, marked)


class _SubmitMark:
    """The engine, with marks around `submit`."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def submit(self, *args: Any, **kwargs: Any) -> Any:
        mark("submit")
        out = self._engine.submit(*args, **kwargs)
        mark("submitted")
        return out


def _hook_engine() -> None:
    """Marks on the scheduler's side (and the engine core's, when there is one)."""
    from frontend.engine import scheduler as sched_mod
    from frontend.engine.core import EngineCore, _Sink

    send = sched_mod.Scheduler._send

    async def send_(self: Any, lane: Any, seqs: Any, rows: Any, *args: Any) -> Any:
        mark("step_sent" if bool(rows.start.any()) else "other_step_sent")
        return await send(self, lane, seqs, rows, *args)

    sched_mod.Scheduler._send = send_  # type: ignore[method-assign,assignment]
    handle = EngineCore._handle

    def handle_(self: Any, identity: Any, msg: Any) -> None:
        if msg[0] == "submit":
            mark("core_received")
        handle(self, identity, msg)

    EngineCore._handle = handle_  # type: ignore[method-assign]
    _mark_around(_Sink, "put_nowait", before="core_event")
    flush = EngineCore._flush

    def flush_(self: Any, worker: Any) -> None:
        if worker.outbox:
            mark("core_flush")
        flush(self, worker)

    EngineCore._flush = flush_  # type: ignore[method-assign]


def _slow_triton_hook(engine: Any) -> None:
    client = engine.scheduler.client
    step = client.step

    async def step_(rows: Any, *args: Any, **kwargs: Any) -> Any:
        out = await step(rows, *args, **kwargs)
        mark("step_done" if bool(rows.start.any()) else "other_step_done")
        return out

    client.step = step_


# ------------------------------------------------------------------------------------ servers
def _settings(**extra: Any) -> Any:
    from frontend.settings import Settings

    return Settings(
        environment="test",
        model="gpt2",
        access_log=False,
        max_new_tokens_limit=2048,
        request_timeout_s=600.0,
        ip_rpm=0,
        **extra,
    )


def _run_uvicorn(app: Any, port: int) -> None:
    run_uvicorn(app, port, profile_to=os.environ.get("TTFT_PROFILE"))


def serve_inproc(port: int, step_ms: float, marks: str) -> None:
    from frontend.app import create_app
    from frontend.cache import MemoryResultCache

    _dump_at_exit(marks)
    _hook_engine()
    model = _model()

    def factory(_settings: Any, metrics: Any) -> Any:
        engine = _scheduler_engine(model, step_ms, 256, metrics)
        _slow_triton_hook(engine)
        return engine

    app = create_app(_settings(), engine_factory=factory, cache=MemoryResultCache(16, 60.0))
    _run_uvicorn(_hook_worker(app), port)


def serve_core(address: str, step_ms: float, marks: str) -> None:
    from frontend.engine.core import EngineCore
    from frontend.observability import GatewayMetrics

    _dump_at_exit(marks)
    _hook_engine()
    model = _model()

    from frontend.engine import core as core_mod

    if hasattr(core_mod, "core_scheduling"):  # as the engine-core process does (absent in older trees)
        core_mod.core_scheduling()

    async def main() -> None:
        metrics = GatewayMetrics()
        engine = _scheduler_engine(model, step_ms, 256, metrics)
        _slow_triton_hook(engine)
        core = EngineCore(engine, address, metrics_text=metrics.engine_text)
        await core.start()
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await core.close()

    asyncio.run(main())


def serve_worker(port: int, address: str, marks: str) -> None:
    from frontend.app import create_app, remote_engine
    from frontend.cache import MemoryResultCache

    _dump_at_exit(marks)
    model = _model()

    def factory(settings: Any, metrics: Any) -> Any:
        return remote_engine(settings, metrics, model_loader=lambda _n, _v: model)

    app = create_app(_settings(engine_core_url=address), engine_factory=factory, cache=MemoryResultCache(16, 60.0))
    _run_uvicorn(_hook_worker(app), port)


# ------------------------------------------------------------------------------------ client
def _prompt(n_tokens: int) -> str:
    tok = _model().tokenizer
    words = [f" w{i}" for i in range(400)]
    for k in range(1, 400):
        text = "Hello" + "".join(words[:k])
        if len(tok.encode(text)) >= n_tokens:
            while len(tok.encode(text)) > n_tokens:
                text = text[:-1]
            if len(tok.encode(text)) == n_tokens:
                return text
    raise RuntimeError("no prompt of that length")


def client(port: int, requests: int, warmup: int, max_tokens: int, prompt: str, gap_ms: float) -> list[tuple[int, int]]:
    body = json.dumps(
        {"model": "gpt2", "prompt": prompt, "max_tokens": max_tokens, "temperature": 1.0, "top_k": 20, "stream": True}
    ).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    windows = []
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(warmup + requests):
            t0 = _now()
            s.sendall(head + body)
            buf = b""
            first = None
            while b"data: [DONE]" not in buf:
                chunk = s.recv(65536)
                if not chunk:
                    raise RuntimeError(f"connection closed: {buf[:300]!r}")
                if first is None and b'"text"' in chunk:
                    first = _now()
                buf += chunk
            # the chunked body's terminator may follow; drain it
            while not buf.endswith(b"0\r\n\r\n"):
                buf += s.recv(65536)
            if first is None:
                raise RuntimeError(f"no text: {buf[:300]!r}")
            if i >= warmup:
                windows.append((t0, first))
            if gap_ms:
                time.sleep(gap_ms / 1000)
    return windows


# The chain of points a first token passes, in order; each is the first mark of its name after the
# previous point (so a step of the previous request, still in flight, is not taken for this one's).
STAGES = [
    "asgi",  # the request reached the app (uvicorn parsed the head)
    "handler",  # the route's function runs: middleware, body, validation and auth done
    "tokenize",
    "tokenized",
    "prepared",  # the request checked and built
    "generate",  # the service's stream runs (result-cache lookup done)
    "submit",  # Engine.submit called
    "core_received",  # (split) the engine core has the submission
    "step_sent",  # the step with its start row goes to Triton
    "step_done",
    "core_event",  # (split) the first token's event in the core's outbox
    "core_flush",  # (split) the outbox leaves for the worker
    "worker_received",  # (split)
    "sink_event",  # the event in the stream's sink
    "first_item",  # the service yields the first text
    "response_made",  # the route returned its EventSourceResponse
    "response_start",  # the response's head is sent
    "first_frame",  # the first SSE frame is made
    "first_body_sent",  # ... and handed to uvicorn
]


def report(windows: list[tuple[int, int]], marks: list[tuple[str, int]]) -> dict[str, Any]:
    """Per stage (consecutive points of STAGES that were reached), the medians over the requests;
    also how often another step was answered between the submission reaching the scheduler and its
    start row being sent, and how long after the submission (with one lane and no request of
    releases apart, the start waited for that answer)."""
    marks.sort(key=lambda m: m[1])
    per_stage: dict[str, list[float]] = {}
    blocked: list[float] = []
    submit_side: dict[str, list[float]] = {}
    other_steps = 0
    for t0, t1 in windows:
        inside = [(name, t) for name, t in marks if t0 <= t <= t1]
        other_steps += sum(1 for name, _ in inside if name == "other_step_sent")
        chain = [("client_send", t0)]
        for stage in STAGES:
            at = next((t for name, t in inside if name == stage and t >= chain[-1][1]), None)
            if at is not None:
                chain.append((stage, at))
        chain.append(("client_first", t1))
        for (a, ta), (b, tb) in itertools.pairwise(chain):
            per_stage.setdefault(f"{a} -> {b}", []).append((tb - ta) / 1e6)
        points = dict(chain)
        admitted = points.get("core_received", points.get("submit"))
        sent = points.get("step_sent")
        if admitted is not None and sent is not None:
            ended = [t for name, t in inside if name in ("step_done", "other_step_done") and admitted <= t <= sent]
            if ended:
                blocked.append((ended[0] - admitted) / 1e6)
        sub = [t for name, t in inside if name in ("submit", "submitted")]
        if len(sub) == 2:
            submit_side.setdefault("Engine.submit call", []).append((sub[1] - sub[0]) / 1e6)
    for name, values in submit_side.items():
        per_stage[f"(aside) {name}"] = values
    if blocked:
        per_stage["(aside) submission -> a step in flight answered"] = blocked
    n = len(windows)
    rows = {k: (statistics.median(v), statistics.mean(v), len(v)) for k, v in per_stage.items()}
    ttft = sorted((t1 - t0) / 1e6 for t0, t1 in windows)
    return {
        "n": n,
        "ttft_p50_ms": statistics.median(ttft),
        "ttft_mean_ms": statistics.mean(ttft),
        "ttft_p90_ms": ttft[int(0.9 * (n - 1))],
        "release_steps_in_ttft": other_steps,
        "blocked_by_step_in_flight": len(blocked),
        "stages": rows,
    }


def drive(args: argparse.Namespace) -> dict[str, Any]:
    port = _free_port()
    tmp = Path(tempfile.mkdtemp(prefix="ttft-"))
    me = [sys.executable, "-m", "benchmarks.ttft_stages"]
    cwd = None
    here = Path(__file__).parent
    if args.code and Path(args.code).resolve() != here.parent.resolve():  # another tree, this tree's benchmarks
        cwd = args.code
        shutil.copytree(here, Path(args.code) / "benchmarks", dirs_exist_ok=True)
    procs = []
    try:
        if args.mode == "inproc":
            procs.append(
                subprocess.Popen(
                    [
                        *me,
                        "--serve",
                        "inproc",
                        "--port",
                        str(port),
                        "--step-ms",
                        str(args.step_ms),
                        "--marks",
                        str(tmp / "w.json"),
                    ],
                    cwd=cwd,
                )
            )
        else:
            address = f"ipc://{tmp / 'core.sock'}"
            procs.append(
                subprocess.Popen(
                    [
                        *me,
                        "--serve",
                        "core",
                        "--address",
                        address,
                        "--step-ms",
                        str(args.step_ms),
                        "--marks",
                        str(tmp / "c.json"),
                    ],
                    cwd=cwd,
                )
            )
            time.sleep(1.0)
            procs.append(
                subprocess.Popen(
                    [
                        *me,
                        "--serve",
                        "worker",
                        "--port",
                        str(port),
                        "--address",
                        address,
                        "--marks",
                        str(tmp / "w.json"),
                    ],
                    cwd=cwd,
                )
            )
        _wait_up(port)
        windows = client(port, args.requests, args.warmup, args.max_tokens, _prompt(args.prompt_tokens), args.gap_ms)
    finally:
        for p in reversed(procs):
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
    marks: list[tuple[str, int]] = []
    for f in tmp.glob("*.json"):
        marks += [tuple(m) for m in json.loads(f.read_text())]  # type: ignore[misc]
    out = report(windows, marks)
    if args.dump_marks:
        Path(args.dump_marks).write_text(json.dumps({"windows": windows, "marks": marks}))
    if args.timeline:
        t0, t1 = windows[len(windows) // 2]
        out["timeline"] = [(n, round((t - t0) / 1e6, 3)) for n, t in marks if t0 - 8_000_000 <= t <= t1]
    out["mode"] = args.mode
    out["code"] = args.code or "."
    out["step_ms"] = args.step_ms
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=["inproc", "split"], default="inproc")
    p.add_argument("--step-ms", type=float, default=2.0)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--max-tokens", type=int, default=4)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--gap-ms", type=float, default=0.0, help="pause between requests")
    p.add_argument("--code", help="run the servers from this tree's packages (e.g. `git archive` of a base)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--dump-marks", help="write the client's windows and every mark to this JSON file")
    p.add_argument("--timeline", action="store_true", help="print every mark around one request (debugging)")
    p.add_argument("--serve", choices=["inproc", "core", "worker"], help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--address", help=argparse.SUPPRESS)
    p.add_argument("--marks", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve == "inproc":
        serve_inproc(args.port, args.step_ms, args.marks)
        return 0
    if args.serve == "core":
        serve_core(args.address, args.step_ms, args.marks)
        return 0
    if args.serve == "worker":
        serve_worker(args.port, args.address, args.marks)
        return 0
    out = drive(args)
    if args.json:
        print(json.dumps(out))
        return 0
    print(
        f"code={out['code']} mode={out['mode']} step_ms={out['step_ms']} n={out['n']} "
        f"client TTFT p50 {out['ttft_p50_ms']:.2f} ms "
        f"mean {out['ttft_mean_ms']:.2f} p90 {out['ttft_p90_ms']:.2f}; steps without starts sent inside a TTFT window: "
        f"{out['release_steps_in_ttft']}; another step answered before the start was sent: "
        f"{out['blocked_by_step_in_flight']}"
    )
    for name, at in out.get("timeline", []):
        print(f"  {at:8.3f} ms  {name}")
    for stage, (med, mean, count) in out["stages"].items():
        print(f"  {stage:42s} p50 {med:7.3f} ms  mean {mean:7.3f}  (n={count})")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
