"""`python -m benchmarks.single_process_bench --code A --code B`: ONE gateway process (no
`--workers`) serving many concurrent `/v1/completions` SSE streams, for each code tree in turn, on
this CPU, loaded by the repo's own closed-loop client (`python -m benchmarks.load --endpoint
completions --ignore-eos`, the GPU suite's client).

The server is the real app (middleware, routes, service, detokenizer, SSE) in one uvicorn process
over a stand-in engine, so the figure is what the single process can push when the GPU is not the
limit:

* `--engine step` (default): `StepEngine`, a batch-step fake. Every `--step-ms` (the GPU's time,
  a timer on the event loop, so the gateway's own work overlaps it as it overlaps a real step) it
  emits ONE token event for every live stream, the whole step's events in one synchronous pass,
  as the scheduler does; a stream ends with `FinishEvent("length")` after its `max_tokens`.
* `--engine scheduler`: the real continuous-batching scheduler and sampler over a stand-in Triton
  that answers every step after `--step-ms` (the scheduler's own per-token work counts too).

Each code tree is a directory holding the packages the app imports (`frontend/`, `export/`,
`step_model/`, e.g. `git archive <rev> frontend export step_model embedded_triton examples | tar -x
-C /tmp/base`); the trees are run alternately, `--rounds` times, each on a fresh server. The
client runs from THIS tree in another process. `--profile DIR` writes each server's cProfile stats
to DIR/<tree>-<round>.prof and prints the top `--top` functions by own time; `--per-round N` sets
the pacer's slice (`frontend.generation.pacing.PER_ROUND`) in trees that have one. Reported per
run: delivered tokens/s (whole run, and steady state when users send 2+ requests), SSE text chunks
per token (1.0 = no coalescing), the server's CPU share and CPU microseconds per token (the
capacity figure, steadier than tok/s on a shared machine), the share of the run the server waited
for a CPU (schedstat: other load on the machine), and the client's CPU share (near 100%: the
client is the limit, not the server).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import json
import os
import pstats
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODEL = "gpt2"  # the load client's default model name


# ------------------------------------------------------------------------------------ engines
def _model(vocab: int = 8192) -> Any:
    from export.tokenizer_builder import build_tokenizer
    from frontend.engine.model import ServedModel

    tokenizer = build_tokenizer(Path(tempfile.mkdtemp()), vocab)
    return ServedModel(
        name=MODEL,
        version="1",
        tokenizer=tokenizer,
        vocab_size=vocab,
        max_context=2048,
        eos_token_id=vocab - 1,
        dtype="float32",
        source="bench",
        created=1_700_000_000,
    )


@dataclass(eq=False)
class _Handle:
    left: int
    logprobs: int
    sink: Any
    events: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    done: bool = False


class StepEngine:
    """A batch-step fake engine (the `Engine` protocol): one token for every live stream per step."""

    def __init__(self, model: Any, step_ms: float, max_running: int) -> None:
        from frontend.engine.protocol import FinishEvent, TokenEvent

        self.model = model
        self.step_s = step_ms / 1000
        self.max_running = max_running
        self._token, self._finish = TokenEvent, FinishEvent
        tok = model.tokenizer
        # Printable ASCII tokens: every one is whole text (a GPT-2-like mix of short words).
        self.pool = [
            i for i in range(256, model.vocab_size - 1) if (s := tok.decode([i])).isascii() and s.isprintable()
        ]
        self._live: dict[_Handle, None] = {}
        self._waiting: deque[_Handle] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._at = 0
        self.steps = 0

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="step-engine")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def ready(self) -> bool:
        return True

    def load(self) -> tuple[int, int]:
        return len(self._live), len(self._waiting)

    def submit(self, request: Any, events: Any = None) -> _Handle:
        handle = _Handle(request.max_new_tokens, request.params.logprobs, events)
        self._waiting.append(handle)
        self._wake.set()
        return handle

    def cancel(self, handle: Any) -> None:
        handle.done = True
        self._live.pop(handle, None)
        with contextlib.suppress(ValueError):
            self._waiting.remove(handle)

    async def _loop(self) -> None:
        token, finish, pool = self._token, self._finish, self.pool
        while True:
            if not (self._live or self._waiting):
                self._wake.clear()
                await self._wake.wait()
            await asyncio.sleep(self.step_s)  # the GPU's time; the gateway's work overlaps it
            while self._waiting and len(self._live) < self.max_running:
                handle = self._waiting.popleft()
                if not handle.done:
                    self._live[handle] = None
            self.steps += 1
            at = self._at
            ended = []
            for handle in self._live:  # the whole step's events in one synchronous pass
                out = handle.sink if handle.sink is not None else handle.events
                at = (at + 7) % len(pool)
                tid = pool[at]
                top = tuple((pool[(at + j) % len(pool)], -1.0 - j) for j in range(handle.logprobs))
                out.put_nowait(token(tid, -1.0, top))
                handle.left -= 1
                if handle.left <= 0:
                    out.put_nowait(finish("length"))
                    ended.append(handle)
            self._at = at
            for handle in ended:
                handle.done = True
                del self._live[handle]


def _scheduler_engine(model: Any, step_ms: float, max_running: int, metrics: Any) -> Any:
    """The real scheduler and sampler over a Triton that answers every step after `step_ms`."""
    import numpy as np

    from frontend.engine.scheduler import Scheduler, SchedulerConfig
    from frontend.engine.step_rows import StepRequest, StepResult

    vocab = model.vocab_size

    class SlowTriton:
        def __init__(self) -> None:
            self.rng = np.random.default_rng(0)

        async def step(self, rows: StepRequest, *, window: int, want_logits: bool = False) -> StepResult:
            await asyncio.sleep(step_ms / 1000)
            n = int(rows.sequence_ids.shape[0])
            values = np.sort(self.rng.normal(0, 3, (n, window)).astype(np.float32), axis=1)[:, ::-1].copy()
            ids = self.rng.integers(256, vocab - 1, (n, window)).astype(np.int64)
            return StepResult(np.zeros(n, dtype=np.int32), values, ids, (values[:, 0] + 2.0).astype(np.float32), None)

    class Engine:
        def __init__(self) -> None:
            self.model = model
            self.scheduler = Scheduler(
                SlowTriton(),  # type: ignore[arg-type]
                SchedulerConfig(max_running=max_running, max_waiting=4 * max_running),
                eos_token_id=model.eos_token_id,
                vocab_size=vocab,
                observer=metrics,
            )

        async def start(self) -> None:
            self.scheduler.start()

        async def close(self) -> None:
            await self.scheduler.close()

        async def ready(self) -> bool:
            return True

        def submit(self, request: Any, events: Any = None) -> Any:
            return self.scheduler.submit(request, events)

        def cancel(self, handle: Any) -> None:
            self.scheduler.cancel(handle)

        def load(self) -> tuple[int, int]:
            return self.scheduler.running, self.scheduler.waiting

    return Engine()


# ------------------------------------------------------------------------------------ server
def serve(
    port: int, engine: str, step_ms: float, streams: int, profile_to: str | None, per_round: int | None = None
) -> None:

    from frontend.app import create_app
    from frontend.cache import MemoryResultCache
    from frontend.settings import Settings

    if per_round is not None:  # an experiment on the pacer's slice (frontend.generation.pacing)
        from frontend.generation import pacing

        pacing.PER_ROUND = per_round
    model = _model()
    settings = Settings(
        environment="test",
        model=MODEL,
        max_running=streams,
        max_waiting=4 * streams,
        access_log=False,
        max_new_tokens_limit=2048,
        request_timeout_s=600.0,
        ip_rpm=0,  # no per-IP limit: every stream comes from this one address
    )

    def factory(_settings: Any, metrics: Any) -> Any:
        if engine == "scheduler":
            return _scheduler_engine(model, step_ms, streams, metrics)
        return StepEngine(model, step_ms, streams)

    app = create_app(settings, engine_factory=factory, cache=MemoryResultCache(16, 60.0))
    run_uvicorn(app, port, profile_to=profile_to, backlog=4096)


def run_uvicorn(app: Any, port: int, *, profile_to: str | None = None, backlog: int = 2048) -> None:
    """Serve `app` on 127.0.0.1:`port` until SIGTERM, under cProfile (stats to `profile_to`) when given."""
    import uvicorn

    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False, backlog=backlog)
    server = uvicorn.Server(config)
    server.capture_signals = contextlib.nullcontext  # type: ignore[assignment,method-assign]  # ours, below
    signal.signal(signal.SIGTERM, lambda *_: setattr(server, "should_exit", True))
    if profile_to:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    server.run()
    if profile_to:
        profiler.disable()
        profiler.dump_stats(profile_to)


# ------------------------------------------------------------------------------------ driver
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


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_wait_s(pid: int) -> float:
    """Seconds the process's threads spent runnable but waiting for a CPU (Linux schedstat): how
    much the machine's other load held it back."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            total += int((task / "schedstat").read_text().split()[1])
    return total / 1e9


def _chunks_per_token(out: Path) -> float | None:
    """Text chunks the client counted (its ITL gaps + one per request) over completion tokens."""
    with next(out.glob("*.csv")).open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["ok"] == "1"]
    tokens = sum(int(r["completion_tokens"] or 0) for r in rows)
    chunks = sum(int(r["n_itl"] or 0) + 1 for r in rows)
    return chunks / tokens if tokens else None


def run_one(args: argparse.Namespace, code: str, tag: str) -> dict[str, Any]:
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(code).resolve())}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--code", code, "--serve", str(port)]
    cmd += ["--engine", args.engine, "--step-ms", str(args.step_ms), "--streams", str(args.streams)]
    cmd += ["--per-round", str(args.per_round)] if args.per_round else []
    prof = None
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
        prof = str(Path(args.profile).resolve() / f"{tag}.prof")
        cmd += ["--profile-to", prof]
    server = subprocess.Popen(cmd, env=env, cwd=code, stderr=subprocess.DEVNULL)
    out = Path(tempfile.mkdtemp(prefix="single-bench-"))
    try:
        _wait_up(port)
        load = [sys.executable, "-m", "benchmarks.load", "--base-url", f"http://127.0.0.1:{port}"]
        load += ["--endpoint", "completions", "--ignore-eos", "--concurrency", str(args.streams)]
        load += ["--requests", str(args.requests), "--max-new-tokens", str(args.tokens), "--prompt-tokens", "32"]
        load += ["--temperature", "0.8", "--top-k", "50", "--warmup", "0", "--think-time-s", "0"]
        load += ["--processes", str(args.client_processes), "--out", str(out), "--timeout-s", "600"]
        cpu0, wait0, t0 = _cpu_s(server.pid), _cpu_wait_s(server.pid), time.monotonic()
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        subprocess.run(load, check=True, cwd=Path(__file__).parents[1], **quiet)  # type: ignore[call-overload]
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        client_s = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
        cpu_s, wall = _cpu_s(server.pid) - cpu0, time.monotonic() - t0
        waited_s = _cpu_wait_s(server.pid) - wait0
        (summary,) = [json.loads(p.read_text()) for p in out.glob("*.json")]
        s = summary["summary"]
        steady = s.get("steady") or {}
        return {
            "tok_s": s["tokens_per_s"],
            "steady_tok_s": steady.get("tokens_per_s"),
            "ok": f"{s['ok']}/{s['requests']}",
            "chunks_per_token": _chunks_per_token(out),
            "server_cpu": cpu_s / wall,
            "client_cpu": client_s / wall,
            "server_waited": waited_s / wall,
            "cpu_us_per_token": 1e6 * cpu_s / max(1, s["generated_tokens"]),
            "wall_s": s["wall_s"],
            "prof": prof,
        }
    finally:
        server.terminate()
        server.wait(60)


def _top(prof: str, n: int) -> None:
    stats = pstats.Stats(prof)
    stats.sort_stats("tottime").print_stats(n)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--code", action="append", required=True, help="a code tree (repeat: alternated)")
    p.add_argument("--engine", choices=["step", "scheduler"], default="step")
    p.add_argument("--streams", type=int, default=512, help="concurrent streams (closed-loop users)")
    p.add_argument("--requests", type=int, default=2, help="requests per user, one after the other")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--step-ms", type=float, default=10.0, help="the GPU's time per batch step")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--client-processes", type=int, default=1)
    p.add_argument("--profile", metavar="DIR", help="cProfile each server; stats in DIR/<tree>-<round>.prof")
    p.add_argument("--top", type=int, default=25, help="functions shown per profile")
    p.add_argument("--per-round", type=int, help="streams the pacer wakes per event-loop round (trees that have one)")
    p.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    p.add_argument("--profile-to", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        serve(args.serve, args.engine, args.step_ms, args.streams, args.profile_to, args.per_round)
        return 0
    for rnd in range(args.rounds):
        for code in args.code:
            tag = f"{Path(code).resolve().name}-{rnd}"
            r = run_one(args, code, tag)
            steady = f"{r['steady_tok_s']:8,.0f}" if r["steady_tok_s"] else "       -"
            cpt = f"{r['chunks_per_token']:.2f}" if r["chunks_per_token"] is not None else "-"
            print(
                f"round {rnd} {code:>28} {args.engine} streams={args.streams} step={args.step_ms:g}ms: "
                f"{r['tok_s']:8,.0f} tok/s (steady {steady}), {r['ok']} ok, {cpt} chunks/token, "
                f"server CPU {r['server_cpu']:.0%} ({r['cpu_us_per_token']:.0f} us/token, waited for a CPU "
                f"{r['server_waited']:.0%}), "
                f"client CPU {r['client_cpu']:.0%}, {r['wall_s']:.1f} s",
                flush=True,
            )
            if r["prof"]:
                _top(r["prof"], args.top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
