"""A seeded top-p stream on the GPT-2 124M shape (random weights, CPU fp32) survives a Triton kill and
restart token for token, logprobs included (issue 15). The gateway starts the lost sequence again
with its prompt plus the tokens so far and `replay_from` (frontend.engine.scheduler), and the model
prefills the prompt and replays the tokens one decode run each: the rebuilt cache is the lost one.
(Prefilled as one prompt, the cache came out of other shapes: such a stream diverged at token ~70.)"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from embedded_triton import TritonPorts, TritonServer
from tests.conftest import GPT2_SHAPE
from tests.resilience.conftest import ThreadGateway, gateway_settings, report, wait_for

pytestmark = [pytest.mark.resilience, pytest.mark.slow]

STREAM = {"model": GPT2_SHAPE, "prompt": "Once upon a time", "max_tokens": 96, "temperature": 0.7, "top_p": 0.9}
STREAM |= {"seed": 15, "logprobs": 1, "stream": True}
KILL_AFTER = 40  # tokens


class CompletionStream:
    """An OpenAI completion stream read in a thread: (token, logprob) pairs as they arrive."""

    def __init__(self, url: str, body: dict) -> None:
        self.items: list[tuple[str, float]] = []
        self.finished = False
        self.error: BaseException | None = None
        self.done = threading.Event()
        threading.Thread(target=self._run, args=(url, body), daemon=True).start()

    def _run(self, url: str, body: dict) -> None:
        try:
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
                assert r.status_code == 200, r.read()
                for line in r.iter_lines():
                    if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                        continue
                    choice = json.loads(line[5:])["choices"][0]
                    logprobs = choice.get("logprobs") or {"tokens": [], "token_logprobs": []}
                    self.items += list(zip(logprobs["tokens"], logprobs["token_logprobs"], strict=True))
                    self.finished |= choice.get("finish_reason") is not None
        except BaseException as err:
            self.error = err
        finally:
            self.done.set()


def metric(triton: TritonServer, name: str) -> float:
    text = urllib.request.urlopen(triton.metrics_url, timeout=5).read().decode()
    match = re.search(rf'{name}{{model="{GPT2_SHAPE}",version="1"}} (\S+)', text)
    assert match, f"{name} missing"
    return float(match.group(1))


@pytest.fixture
def gpt2_triton(gpt2_repository: Path, tmp_path: Path) -> Iterator[TritonServer]:
    server = TritonServer(gpt2_repository, ports=TritonPorts.free(), work_dir=tmp_path, log_path=tmp_path / "t.log")
    with server:
        yield server


def test_a_seeded_stream_continues_token_for_token_after_a_triton_restart(
    gpt2_triton: TritonServer, gpt2_repository: Path
) -> None:
    # A step replays up to ~KILL_AFTER tokens, one decode run each: more than the tier's 1 s.
    settings = gateway_settings(gpt2_triton.grpc_url, gpt2_repository, model=GPT2_SHAPE, step_timeout_s=20.0)
    gateway = ThreadGateway(settings)
    try:
        gateway.wait_ready(60)
        # Distinct stop strings (never met) give distinct result-cache keys: nothing is replayed from it.
        undisturbed = CompletionStream(gateway.url, {**STREAM, "stop": ["never-undisturbed"]})
        assert undisturbed.done.wait(120) and undisturbed.error is None and undisturbed.finished
        assert len(undisturbed.items) > KILL_AFTER + 8, "the undisturbed stream ended too early to test"
        stream = CompletionStream(gateway.url, {**STREAM, "stop": ["never-resumed"]})
        assert wait_for(lambda: len(stream.items) >= KILL_AFTER or stream.done.is_set(), 60)
        assert gpt2_triton.process is not None
        os.killpg(gpt2_triton.process.pid, signal.SIGKILL)  # a crash: server and stubs
        gpt2_triton.stop()
        killed_at = len(stream.items)
        assert not stream.done.is_set(), "the stream ended before Triton was killed"
        gpt2_triton.start(120)
        assert stream.done.wait(120) and stream.error is None, stream.error
        assert stream.finished
        replayed = metric(gpt2_triton, "gpt2_replayed_tokens_total")
        report(f"seeded GPT-2-shape stream: killed at token {killed_at}, {replayed:.0f} tokens replayed on restart")
        same = next((i for i, (a, b) in enumerate(zip(stream.items, undisturbed.items, strict=False)) if a != b), None)
        assert stream.items == undisturbed.items, f"resumed at {killed_at}: first difference at token {same}"
        assert replayed >= killed_at
        assert wait_for(lambda: metric(gpt2_triton, "gpt2_kv_live_sequences") == 0, 3, 0.05), "a KV slot was left"
    finally:
        gateway.stop()
