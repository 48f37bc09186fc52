"""A real tritonserver that dies, freezes or restarts under a live stream, and a gateway that is
told to stop while streams are open.

* frozen (SIGSTOP of Triton's whole process group, as a frozen VM or cgroup freezes it):
  readiness is 503 within a second, the breaker opens (refusals in under 50 ms, no Triton call)
  and closes after SIGCONT;
* killed (SIGKILL of the group) mid-stream: readiness 503, the breaker opens; after a restart the
  gateway is ready again within the reconnect bound, and the time is reported;
* the gateway listens while Triton is down; SIGTERM (one process, and `--workers 2`) ends open
  streams with an error event and `[DONE]`, releases every KV slot and exits cleanly;
* `python -m embedded_triton` cleans up its process group and shared memory when tritonserver dies.

In both, the live stream does not fail: the scheduler parks it, and once Triton answers again
it starts again there (its prompt plus the tokens so far prefilled again, `frontend.engine.recovery`)
and finishes token for token as an undisturbed run does.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from embedded_triton import TritonPorts, TritonServer
from tests.conftest import TINY
from tests.resilience.conftest import (
    GatewayProcess,
    ThreadGateway,
    assert_kv_released,
    free_port,
    gateway_env,
    gateway_settings,
    report,
    wait_for,
)

pytestmark = [pytest.mark.resilience, pytest.mark.slow]

PROMPT = {"prompt": "Hello there", "max_new_tokens": 4, "temperature": 1.0}  # no seed: never cached
LONG_STREAM = {"prompt": "Once upon a time", "max_new_tokens": 240, "temperature": 0}


def _breaker_state(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    match = re.search(r"^gateway_circuit_breaker_state (\S+)$", text, re.M)
    assert match, "gateway_circuit_breaker_state missing"
    return float(match.group(1))


class StreamReader:
    """Reads a native SSE stream in a thread; `events` fills as they arrive."""

    def __init__(self, url: str, body: dict) -> None:
        self.events: list[tuple[str, str]] = []
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(url, body), daemon=True)
        self.thread.start()

    def _run(self, url: str, body: dict) -> None:
        try:
            with httpx.stream("POST", f"{url}/generate/stream", json=body, timeout=30) as r:
                assert r.status_code == 200
                event = "message"
                for line in r.iter_lines():
                    if line.startswith("event:"):
                        event = line[6:].strip()
                    elif line.startswith("data:"):
                        self.events.append((event, line[5:].strip()))
                        event = "message"
        except BaseException as err:
            self.error = err
        finally:
            self.done.set()

    def tokens(self) -> int:
        return sum(1 for e, _ in self.events if e == "token")

    def token_ids(self) -> list[int]:
        return [json.loads(data)["token_id"] for e, data in self.events if e == "token"]


def undisturbed_token_ids(url: str, body: dict) -> list[int]:
    """The same request on a server nobody disturbs: what a resumed stream must equal."""
    stream = StreamReader(url, body)
    assert stream.done.wait(30) and stream.error is None and stream.events[-1][0] == "done", stream.events[-2:]
    return stream.token_ids()


def _ready_status(url: str) -> tuple[int, float]:
    started = time.monotonic()
    status = httpx.get(f"{url}/health/ready", timeout=5).status_code
    return status, time.monotonic() - started


@pytest.fixture
def gateway(fault_triton: TritonServer, model_repository: Path):  # type: ignore[no-untyped-def]
    gw = ThreadGateway(gateway_settings(fault_triton.grpc_url, model_repository))
    try:
        gw.wait_ready(30)
        yield gw
    finally:
        gw.stop()


def test_the_gateway_listens_while_triton_is_down(model_repository: Path) -> None:
    gateway = ThreadGateway(gateway_settings(f"127.0.0.1:{free_port()}", model_repository))
    try:
        assert httpx.get(f"{gateway.url}/health/live", timeout=2).status_code == 200
        r = httpx.get(f"{gateway.url}/health/ready", timeout=2)
        assert r.status_code == 503 and r.json()["error"]["code"] == "starting"
        r = httpx.post(f"{gateway.url}/generate", json=PROMPT, timeout=2)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
    finally:
        gateway.stop()


def test_a_triton_frozen_mid_stream_opens_the_breaker_and_sigcont_closes_it_and_the_stream_resumes(
    gateway: ThreadGateway, fault_triton: TritonServer
) -> None:
    assert fault_triton.process is not None
    group = fault_triton.process.pid  # its own session: the group is the server and its stubs
    with httpx.Client(base_url=gateway.url, timeout=10) as client:
        assert client.post("/generate", json=PROMPT).status_code == 200
        stream = StreamReader(gateway.url, LONG_STREAM)
        assert wait_for(lambda: stream.tokens() >= 3 or stream.done.is_set(), 10)
        # The whole group: SIGSTOP of the server alone left its Python-backend stubs running, and
        # tritonserver 2.51 sometimes segfaulted after SIGCONT (its stub health checks had failed).
        os.killpg(group, signal.SIGSTOP)
        try:
            status, elapsed = _ready_status(gateway.url)
            assert status == 503 and elapsed < 1.0, (status, elapsed)  # readiness has a deadline
            # The step in flight times out (1 s): the breaker opens; the live stream waits (its
            # sequence parked), neither ended nor failed.
            assert wait_for(lambda: _breaker_state(gateway.url) == 2, 5, 0.05), "the breaker did not open"
            paused_at = stream.tokens()
            assert not stream.done.is_set() and stream.events[-1][0] == "token", stream.events[-2:]
            for _ in range(3):
                started = time.monotonic()
                r = client.post("/generate", json=PROMPT)
                elapsed = time.monotonic() - started
                assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
                assert elapsed < 0.05, elapsed  # refused without a Triton call
            status, elapsed = _ready_status(gateway.url)
            assert status == 503 and elapsed < 1.0
        finally:
            os.killpg(group, signal.SIGCONT)
        resumed = time.monotonic()

        # tritonserver 2.51 itself does not always survive SIGSTOP/SIGCONT: on the 2-core machine it
        # died with SIGSEGV or SIGABRT in 2 of 3 runs (2026-12-01), its log ending mid-run. The
        # gateway's part is the same either way: readiness follows Triton, the breaker closes once
        # a probe succeeds. A crashed server is restarted, as a supervisor would.
        def settled() -> bool:  # ready again, or tritonserver died
            assert fault_triton.process is not None
            return fault_triton.process.poll() is not None or _ready_status(gateway.url)[0] == 200

        wedged = False
        if not wait_for(settled, 10, 0.02):
            # A third way tritonserver 2.51 takes SIGCONT (a fresh-clone run, 2026-12-01): alive but
            # never ready again. Only Triton's own readiness decides that it is wedged (a gateway that
            # failed to follow a ready Triton still fails here); a supervisor's liveness probe would
            # kill it, and the test does, then asserts the same recovery as after a crash.
            # Or ready, with a dead Python stub (the stub's health checks failed while it was frozen):
            # the model cannot step, and the gateway's readiness, which runs a step, says so.
            steps = fault_triton.is_ready() and fault_triton.model_steps(TINY)
            assert not steps, "Triton is ready again and steps, but the gateway is not, 10 s after SIGCONT"
            os.killpg(fault_triton.process.pid, signal.SIGKILL)
            fault_triton.process.wait(10)
            wedged = True
        recovery_s = time.monotonic() - resumed
        code = fault_triton.process.poll()
        crashed = code is not None
        if crashed:
            assert _ready_status(gateway.url)[0] == 503
            fault_triton.stop()
            fault_triton.start(120)
            recovery_s = gateway.wait_ready(10)  # from the restarted server's readiness
        what = f"tritonserver crashed after SIGCONT (exit {code}); restarted" if crashed else "it survived SIGCONT"
        what = "tritonserver wedged after SIGCONT (not ready, or its model cannot step); restarted" if wedged else what
        report(f"frozen Triton: {what}; gateway ready again {recovery_s:.2f} s later")
        assert fault_triton.process is not None and fault_triton.process.poll() is None, fault_triton.log_tail()
        assert recovery_s < 3.0, recovery_s  # the next probe (every 0.5 s, 1 s deadline) closes it
        assert _breaker_state(gateway.url) == 0
        assert client.post("/generate", json=PROMPT).status_code == 200
        # The stream continued on the server that came back (prompt + its tokens prefilled again),
        # token for token what an undisturbed run gives.
        assert stream.done.wait(30) and stream.error is None, stream.error
        assert stream.events[-1][0] == "done", stream.events[-2:]
        resumed_ids = stream.token_ids()
        report(f"frozen Triton: the stream paused after {paused_at} tokens and finished ({len(resumed_ids)} tokens)")
    assert resumed_ids == undisturbed_token_ids(gateway.url, LONG_STREAM)
    assert_kv_released(fault_triton)


def test_a_triton_killed_mid_stream_then_restarted(gateway: ThreadGateway, fault_triton: TritonServer) -> None:
    assert fault_triton.process is not None
    stream = StreamReader(gateway.url, LONG_STREAM)
    assert wait_for(lambda: stream.tokens() >= 3 or stream.done.is_set(), 10)
    os.killpg(fault_triton.process.pid, signal.SIGKILL)  # a crash: server and stubs
    fault_triton.stop()  # reaps it, removes its shared memory, closes its log
    assert wait_for(lambda: _ready_status(gateway.url)[0] == 503, 2), "readiness did not notice Triton's death"
    r = httpx.post(f"{gateway.url}/generate", json=PROMPT, timeout=10)
    assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
    assert wait_for(lambda: _breaker_state(gateway.url) == 2, 5, 0.05), "the breaker did not open"
    time.sleep(2.0)  # let gRPC's reconnect backoff grow: bounded by reconnect_backoff_ms
    fault_triton.start(120)
    recovery_s = gateway.wait_ready(10)
    report(f"restarted Triton: gateway ready {recovery_s:.2f} s after Triton was (reconnect bound 0.3 s)")
    # The bound: recovery follows Triton's return within a second (+0.5 s: the breaker's
    # probe runs every breaker_reset_s).
    assert recovery_s < 1.5, recovery_s
    assert _breaker_state(gateway.url) == 0
    r = httpx.post(f"{gateway.url}/generate", json=PROMPT, timeout=10)
    assert r.status_code == 200, r.text
    # The stream waited out the outage and continued on the new server, token for token.
    assert stream.done.wait(30) and stream.error is None, stream.error
    assert stream.events[-1][0] == "done", stream.events[-2:]
    assert stream.token_ids() == undisturbed_token_ids(gateway.url, LONG_STREAM)
    report(f"killed Triton: the live stream resumed on the restarted server ({stream.tokens()} tokens, as undisturbed)")
    assert_kv_released(fault_triton)


def _stream_openai(url: str, lines: list[str], body: dict, started: threading.Event) -> None:
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data:"):
                lines.append(line[5:].strip())
                started.set()


def _sigterm_with_live_streams(gw: GatewayProcess, streams: int, fault_triton: TritonServer) -> None:
    body = {"model": TINY, "prompt": "Once upon a time", "max_tokens": 240, "stream": True, "temperature": 0}
    outputs: list[list[str]] = [[] for _ in range(streams)]
    started = [threading.Event() for _ in range(streams)]
    threads = [
        threading.Thread(target=_stream_openai, args=(gw.url, outputs[i], body, started[i]), daemon=True)
        for i in range(streams)
    ]
    for t in threads:
        t.start()
    assert all(e.wait(20) for e in started), "the streams did not start"
    gw.signal_group(signal.SIGTERM)  # what a supervisor (or `kill -TERM -<pgid>`) does
    time.sleep(0.05)
    with httpx.Client(base_url=gw.url, timeout=2) as client:  # one connection: one worker answers both
        ready = client.get("/health/ready")
        assert ready.status_code == 503 and ready.json()["error"]["code"] == "draining"
        refused = client.post("/generate", json=PROMPT)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
    for t in threads:
        t.join(20)
        assert not t.is_alive(), "a stream did not end"
    for lines in outputs:
        assert lines[-1] == "[DONE]", lines[-3:]
        assert json.loads(lines[-2])["error"]["message"] == "the gateway is shutting down", lines[-2]
        assert 1 < len(lines) < 240
    assert gw.wait(30) in (0, -signal.SIGTERM), gw.text()[-3000:]
    assert "ASGI callable returned without completing response" not in gw.text()
    assert "Traceback" not in gw.text(), gw.text()[-3000:]
    assert_kv_released(fault_triton)


def test_sigterm_drains_live_streams_into_an_error_event_and_done(
    fault_triton: TritonServer, model_repository: Path, tmp_path: Path
) -> None:
    env = gateway_env(fault_triton, model_repository, GATEWAY_DRAIN_TIMEOUT_S="0.3")
    gw = GatewayProcess(env, tmp_path / "gateway.log")
    try:
        gw.wait_ready()
        _sigterm_with_live_streams(gw, 2, fault_triton)
    finally:
        gw.kill()


def test_sigterm_drains_every_worker_of_a_multi_worker_gateway(
    fault_triton: TritonServer, model_repository: Path, tmp_path: Path
) -> None:
    env = gateway_env(fault_triton, model_repository, GATEWAY_DRAIN_TIMEOUT_S="0.3")
    gw = GatewayProcess(env, tmp_path / "gateway.log", workers=2)
    try:
        gw.wait_ready()
        gw.wait_workers(2)
        _sigterm_with_live_streams(gw, 4, fault_triton)
        assert "engine core stopped" in gw.text()
        assert gw.text().count("draining:") == 2, gw.text()[-3000:]  # each worker drained its own
        assert wait_for(lambda: not _group_alive(gw.proc.pid), 5, 0.1), "a process of the gateway outlived it"
    finally:
        gw.kill()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_embedded_triton_cleans_up_its_group_and_shared_memory_when_tritonserver_dies(
    model_repository: Path, tmp_path: Path
) -> None:
    ports = TritonPorts.free()
    log = tmp_path / "embedded.log"
    with log.open("wb") as out:  # a file, not a pipe: tritonserver and its stubs write to it too
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "embedded_triton",
                "--repository",
                str(model_repository),
                "--http-port",
                str(ports.http),
                "--grpc-port",
                str(ports.grpc),
                "--metrics-port",
                str(ports.metrics),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while "triton ready" not in log.read_text(errors="replace"):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-2000:]
            time.sleep(0.1)
        regions = list(Path("/dev/shm").glob(f"triton_gpt2_{proc.pid}_*"))
        assert regions, "the Python backend's regions carry this server's prefix"
        server_pid = next(
            int(p.name)
            for p in Path("/proc").iterdir()
            if p.name.isdigit() and _ppid(p) == proc.pid and "tritonserver" in _cmdline(p)
        )
        stubs = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _pgid(p) == server_pid]
        assert len(stubs) > 1  # the server and its Python-backend stubs
        os.kill(server_pid, signal.SIGKILL)  # the server alone: its stubs would outlive it
        assert proc.wait(15) == 1, log.read_text(errors="replace")[-2000:]
        # Nothing of its group runs any more (zombies aside: their reaper is PID 1's business).
        assert not [p.name for p in Path("/proc").iterdir() if p.name.isdigit() and _live_in_group(p, server_pid)]
        assert not list(Path("/dev/shm").glob(f"triton_gpt2_{proc.pid}_*"))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _stat(p: Path) -> list[str]:
    try:
        return p.joinpath("stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return []


def _ppid(p: Path) -> int:
    fields = _stat(p)
    return int(fields[1]) if fields else -1


def _pgid(p: Path) -> int:
    fields = _stat(p)
    return int(fields[2]) if fields else -1


def _live_in_group(p: Path, pgid: int) -> bool:
    fields = _stat(p)
    return bool(fields) and int(fields[2]) == pgid and fields[0] != "Z"


def _cmdline(p: Path) -> str:
    try:
        return p.joinpath("cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""
