"""Seeded sampling on the GPT-2 124M shape (random weights, CPU fp32) through the real tritonserver
and the gateway: a seeded request's tokens and logprobs are the same alone and under concurrent
traffic (issue 15). Before, the logprobs were not: the model's log-sum-exp of a row moved by up to
2e-6 with the row count (step_model.kernels). The tiny model's test of the same promise
(test_gateway.py) compares text only."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from embedded_triton import TritonPorts, TritonServer
from tests.conftest import GPT2_SHAPE, killed_at_exit
from tests.integration.conftest import serve_gateway

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NEW_TOKENS = 16


@pytest.fixture(scope="module")
def gpt2_triton(gpt2_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    work = tmp_path_factory.mktemp("gpt2_triton")
    server = TritonServer(gpt2_repository, ports=TritonPorts.free(), work_dir=work, log_path=work / "triton.log")
    with killed_at_exit(server):
        yield server


@pytest.fixture(scope="module")
def gpt2_gateway(gpt2_triton: TritonServer, gpt2_repository: Path) -> Iterator[str]:
    yield from serve_gateway(gpt2_triton, gpt2_repository, model=GPT2_SHAPE, default_window=16)


def completion(url: str, body: dict) -> tuple[list[str], list[float]]:
    """(tokens, their logprobs) of an OpenAI completion with `logprobs`."""
    r = httpx.post(f"{url}/v1/completions", json={"model": GPT2_SHAPE, "logprobs": 2, **body}, timeout=120)
    assert r.status_code == 200, r.text
    logprobs = r.json()["choices"][0]["logprobs"]
    return logprobs["tokens"], logprobs["token_logprobs"]


SEEDED = [
    {"prompt": f"Seed number {i} says", "max_tokens": NEW_TOKENS, "seed": 100 + i, **cut}
    for i, cut in enumerate(
        [{"temperature": 0.7, "top_p": 0.9}] * 5
        + [{"temperature": 1.0}, {"temperature": 0.8, "top_k": 40}, {"temperature": 0.0}]  # plain, top-k, greedy
    )
]
# Other traffic: unseeded, other prompt lengths, more tokens (it outlives the seeded ones' steps).
OTHERS = [
    {"prompt": "x " * (3 + 7 * i), "max_tokens": NEW_TOKENS + 8, "temperature": 0.9, "top_p": 0.95} for i in range(8)
]


def test_seeded_requests_give_the_same_tokens_alone_and_under_concurrent_traffic(gpt2_gateway: str) -> None:
    # Distinct stop strings (never met) give distinct result-cache keys: nothing is replayed from it.
    alone = [completion(gpt2_gateway, {**body, "stop": ["never-alone"]}) for body in SEEDED]
    loaded: list[tuple[list[str], list[float]] | None] = [None] * len(SEEDED)
    errors: list[BaseException] = []

    def run(i: int, body: dict) -> None:
        try:
            out = completion(gpt2_gateway, body)
            if i < len(SEEDED):
                loaded[i] = out
        except BaseException as err:
            errors.append(err)

    bodies = [{**b, "stop": ["never-loaded"]} for b in SEEDED] + OTHERS
    # Interleaved starts: the seeded requests join steps already carrying other rows, in other slots.
    threads = [threading.Thread(target=run, args=(i, b), daemon=True) for i, b in enumerate(bodies)]
    for t in threads[len(SEEDED) :] + threads[: len(SEEDED)]:
        t.start()
    for t in threads:
        t.join(180)
    assert not errors, errors
    assert all(len(tokens) > 0 for tokens, _ in alone)
    same_tokens = sum(a[0] == b[0] for a, b in zip(alone, loaded, strict=True) if b is not None)
    same = sum(a == b for a, b in zip(alone, loaded, strict=True))
    assert same == len(SEEDED), (
        f"under load {same_tokens} of {len(SEEDED)} seeded requests gave the same tokens, {same} the same logprobs too"
    )
