"""The whole stack of docker-compose.yml, built from this checkout and run with a real Docker
engine: triton (the nvidia-pytriton wheel's tritonserver on a CPU), gateway, redis, prometheus.

One stack for the module, on free host ports (host networking) under its own compose project, on
a tiny random model exported into a directory both containers mount. `docker/compose.sh up`
builds every image (the base image and the layers cached from earlier runs are reused) and
returns once the gateway is ready; `docker/compose.sh down --volumes` removes it all afterwards.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import redis

from export.cli import main as export_main
from tests.integration.redis_server import free_port

pytestmark = pytest.mark.compose

ROOT = Path(__file__).resolve().parents[2]
MODEL = "tiny"
UP_TIMEOUT_S = 1500  # a first build on an empty engine: base image, pip installs (torch, Triton)


@dataclass(frozen=True)
class Stack:
    gateway: str
    prometheus: str
    redis_port: int
    env: dict[str, str]


def _compose(action: str, env: dict[str, str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["docker/compose.sh", action],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


@pytest.fixture(scope="module")
def model_repository() -> Iterator[Path]:
    """A tiny random model in a directory the containers' users (not root) can read."""
    repo = Path(tempfile.mkdtemp(prefix="gpt2-compose-repo-"))
    repo.chmod(0o755)
    args = ["--random-config", "tiny", "--seed", "0", "--name", MODEL, "--repository", str(repo)]
    assert export_main([*args, "--kv-capacity", "8", "--dtype", "fp32"]) == 0
    for path in repo.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    yield repo
    shutil.rmtree(repo, ignore_errors=True)


@pytest.fixture(scope="module")
def stack(model_repository: Path) -> Iterator[Stack]:
    if shutil.which("docker") is None or subprocess.run(["docker", "info"], capture_output=True).returncode:
        pytest.fail("no Docker engine answers (docker/engine.sh starts one; make test-compose runs it)")
    ports = {name: free_port() for name in ("gateway", "http", "grpc", "metrics", "redis", "prometheus")}
    env = {
        **os.environ,
        "COMPOSE_PROJECT_NAME": f"gpt2-serving-test-{os.getpid()}",
        "GPT2_MODEL_REPOSITORY": str(model_repository),
        "GPT2_MODEL": MODEL,
        "GPT2_GATEWAY_PORT": str(ports["gateway"]),
        "GPT2_TRITON_HTTP_PORT": str(ports["http"]),
        "GPT2_TRITON_GRPC_PORT": str(ports["grpc"]),
        "GPT2_TRITON_METRICS_PORT": str(ports["metrics"]),
        "GPT2_REDIS_PORT": str(ports["redis"]),
        "GPT2_PROMETHEUS_PORT": str(ports["prometheus"]),
        "GPT2_ENV_FILE": ".env.example",  # never a developer's .env
        "COMPOSE_DOWN_ARGS": "--volumes",
        "READY_TIMEOUT_S": "300",
    }
    start = time.monotonic()
    try:
        up = _compose("up", env, UP_TIMEOUT_S)
        took_s = time.monotonic() - start
        sys.stderr.write(f"\n[compose] up in {took_s:.0f} s\n{up.stdout[-3000:]}{up.stderr[-3000:]}\n")
        assert up.returncode == 0, f"docker/compose.sh up failed:\n{up.stdout[-4000:]}\n{up.stderr[-4000:]}"
        yield Stack(
            gateway=f"http://127.0.0.1:{ports['gateway']}",
            prometheus=f"http://127.0.0.1:{ports['prometheus']}",
            redis_port=ports["redis"],
            env=env,
        )
    finally:
        down = _compose("down", env, 180)
        sys.stderr.write(f"[compose] down: rc {down.returncode}\n{down.stderr[-2000:]}\n")


def _prometheus_series(prometheus: str, selector: str, timeout_s: float = 60.0) -> list[dict[str, object]]:
    """The series Prometheus holds for `selector`, waiting up to `timeout_s` for a first scrape."""
    deadline = time.monotonic() + timeout_s
    while True:
        body = httpx.get(f"{prometheus}/api/v1/query", params={"query": selector}, timeout=5).json()
        assert body["status"] == "success", body
        if body["data"]["result"] or time.monotonic() > deadline:
            return list(body["data"]["result"])
        time.sleep(1)


def test_an_openai_sdk_request_goes_through_the_stack(stack: Stack) -> None:
    client = openai.OpenAI(base_url=f"{stack.gateway}/v1", api_key="unused", max_retries=0, timeout=60)
    first = client.completions.create(model=MODEL, prompt="Hello", max_tokens=8, temperature=0)
    assert first.choices[0].finish_reason in {"length", "stop"}
    assert first.usage is not None and 1 <= first.usage.completion_tokens <= 8
    again = client.completions.create(model=MODEL, prompt="Hello", max_tokens=8, temperature=0)
    assert again.choices[0].text == first.choices[0].text
    # The greedy result was cached in the stack's Redis (GATEWAY_CACHE_URL), not in the gateway.
    assert redis.Redis(port=stack.redis_port).dbsize() >= 1
    metrics = httpx.get(f"{stack.gateway}/metrics", timeout=5).text
    assert 'gateway_cache_lookups_total{result="hit"} 1.0' in metrics


def test_prometheus_scrapes_the_gateway_and_triton(stack: Stack) -> None:
    httpx.post(f"{stack.gateway}/v1/completions", json={"model": MODEL, "prompt": "a", "max_tokens": 2}, timeout=60)
    vllm = _prometheus_series(stack.prometheus, '{__name__=~"vllm:.+", job="gateway"}')
    assert {"vllm:generation_tokens_total", "vllm:num_requests_waiting"} <= {s["metric"]["__name__"] for s in vllm}  # type: ignore[index]
    triton = _prometheus_series(stack.prometheus, '{__name__=~"nv_.+", job="triton"}')
    assert "nv_inference_request_success" in {s["metric"]["__name__"] for s in triton}  # type: ignore[index]
    up = _prometheus_series(stack.prometheus, "up == 1")
    assert {s["metric"]["job"] for s in up} == {"gateway", "triton"}  # type: ignore[index]
