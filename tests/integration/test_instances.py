"""Two instances of the tiny model on one embedded tritonserver, behind one gateway
(GATEWAY_MODEL_INSTANCES=2): issue 18's "several GPUs on one host", proved with two instances on
the CPU (the same code places them on two GPUs: `--gpus`).

* placement and stickiness: new generations spread over both instances, and every step of each
  goes to the instance that started it (a decode row sent to the other one would be refused as an
  unknown sequence and the sequence prefilled again: the prefill counters say none was);
* failover: the Python stub of one instance is killed mid-generation (its process crashes, Triton
  stays up and the other instance with it): its streams finish on the other instance, token for
  token what transformers' greedy search gives; new requests go to the healthy instance; reloaded
  (explicit model control), the instance takes new work again.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from transformers import AutoTokenizer, GPT2LMHeadModel

from embedded_triton import TritonPorts, TritonServer
from embedded_triton.instances import write_instances
from step_model.contract import model_config
from tests.conftest import TINY, hf_greedy, killed_at_exit
from tests.integration.conftest import serve_gateway, serve_workers

pytestmark = pytest.mark.integration

NAMES = model_config.instance_names(TINY, 2)  # tiny, tiny_1


@pytest.fixture(scope="module")
def instances_repository(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny's version 1 served as two Triton models (the second links the first's version)."""
    repo = tmp_path_factory.mktemp("instances-repo")
    shutil.copytree(model_repository / TINY / "1", repo / TINY / "1")
    shutil.copy2(model_repository / TINY / "config.pbtxt", repo / TINY / "config.pbtxt")
    assert write_instances(repo, TINY, 2) == NAMES
    assert (repo / NAMES[1] / "1").is_symlink()
    return repo


@pytest.fixture(scope="module")
def instances_triton(instances_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    work = tmp_path_factory.mktemp("triton-instances")
    server = TritonServer(
        instances_repository,
        ports=TritonPorts.free(),
        work_dir=work,
        log_path=work / "triton.log",
        model_control=True,  # one instance can be loaded again alone
        extra_args=["--exit-timeout-secs=2"],  # at the end nothing runs that must finish (else 20 s)
    )
    with killed_at_exit(server):
        assert server.ready_models() == NAMES
        yield server


@pytest.fixture(scope="module")
def gateway(instances_triton: TritonServer, instances_repository: Path) -> Iterator[str]:
    yield from serve_gateway(
        instances_triton,
        instances_repository,
        model_instances=2,
        default_window=16,
        breaker_failures=2,
        breaker_reset_s=0.5,
    )


@pytest.fixture(scope="module")
def reference(tiny_checkpoint: Path) -> tuple[object, object]:
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    return tokenizer, GPT2LMHeadModel.from_pretrained(tiny_checkpoint).eval()


def model_metric(triton: TritonServer, name: str, model: str) -> float:
    text = urllib.request.urlopen(triton.metrics_url, timeout=5).read().decode()
    match = re.search(rf'^{re.escape(name)}{{model="{model}",version="1"}} (\S+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


def expected_tokens(reference: tuple[object, object], prompt: str, n: int) -> list[int]:
    tokenizer, model = reference
    eos = tokenizer.eos_token_id  # type: ignore[attr-defined]
    return [t for t in hf_greedy(model, tokenizer(prompt)["input_ids"], n, eos) if t != eos]  # type: ignore[operator]


def instances(url: str) -> dict[str, dict]:
    body = httpx.get(f"{url}/health/ready", timeout=5).json()
    return {i["name"]: i for i in body.get("instances", [])}


class Stream:
    """A native SSE stream read in a thread; `tokens` fills as they arrive."""

    def __init__(self, url: str, body: dict) -> None:
        self.tokens: list[int] = []
        self.last = ""
        self.error: BaseException | None = None
        self.done = threading.Event()
        threading.Thread(target=self._run, args=(url, body), daemon=True).start()

    def _run(self, url: str, body: dict) -> None:
        try:
            with httpx.stream("POST", f"{url}/generate/stream", json=body, timeout=60) as r:
                assert r.status_code == 200, r.read()
                event = "message"
                for line in r.iter_lines():
                    if line.startswith("event:"):
                        event = line[6:].strip()
                    elif line.startswith("data:"):
                        data = json.loads(line[5:])
                        if event == "token" and data.get("token_id") is not None:  # one, or merged ones
                            self.tokens.extend(int(t) for t in data.get("token_ids") or [data["token_id"]])
                        self.last = event
                        event = "message"
        except BaseException as err:
            self.error = err
        finally:
            self.done.set()


def wait_for(condition: object, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return bool(condition())  # type: ignore[operator]


def stub_of(server: TritonServer, model: str) -> int:
    """The pid of `model`'s Python-backend stub (its command line names the model's version path)."""
    assert server.process is not None
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = proc.joinpath("cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "triton_python_backend_stub" in cmdline and f"/{model}/1/model.py" in cmdline:
            return int(proc.name)
    raise AssertionError(f"no stub process for {model}")


def test_new_generations_spread_over_both_instances_and_each_stays_on_its_own(
    gateway: str, instances_triton: TritonServer, reference: tuple[object, object]
) -> None:
    prompts = ["Hello there", "Once upon a time", "The quick brown fox", "東京は日本の首都です。"]
    tokenizer = reference[0]
    prompt_tokens = sum(len(tokenizer(p)["input_ids"]) for p in prompts)  # type: ignore[operator]
    before = {m: model_metric(instances_triton, "gpt2_prefill_tokens_total", m) for m in NAMES}
    streams = [Stream(gateway, {"prompt": p, "max_new_tokens": 24, "temperature": 0}) for p in prompts]
    for prompt, stream in zip(prompts, streams, strict=True):
        assert stream.done.wait(30) and stream.error is None and stream.last == "done", stream.error
        assert stream.tokens == expected_tokens(reference, prompt, 24)
    time.sleep(0.3)  # the step model publishes its counters every 0.1 s
    prefilled = {m: model_metric(instances_triton, "gpt2_prefill_tokens_total", m) - before[m] for m in NAMES}
    # Both instances prefilled, and together exactly the prompts once: no sequence started again.
    assert all(tokens > 0 for tokens in prefilled.values()), prefilled
    assert sum(prefilled.values()) == prompt_tokens, prefilled
    assert all(model_metric(instances_triton, "gpt2_kv_live_sequences", m) == 0 for m in NAMES)
    ready = instances(gateway)
    assert set(ready) == set(NAMES) and all(i["serving"] and i["breaker"] == "closed" for i in ready.values())
    text = httpx.get(f"{gateway}/metrics", timeout=5).text
    assert f'gateway_instance_circuit_breaker_state{{instance="{NAMES[1]}"}} 0.0' in text


@pytest.mark.slow
def test_a_crashed_instance_hands_its_streams_to_the_other_and_new_work_avoids_it_until_reloaded(
    gateway: str, instances_triton: TritonServer, reference: tuple[object, object]
) -> None:
    prompts = ["One day", "A long time ago", "It was a dark night", "The end of"]
    bodies = [{"prompt": p, "max_new_tokens": 200, "temperature": 0} for p in prompts]
    streams = [Stream(gateway, body) for body in bodies]
    assert wait_for(lambda: min(len(s.tokens) for s in streams) >= 5 or any(s.done.is_set() for s in streams), 30)
    assert not any(s.done.is_set() for s in streams), "a stream ended before the fault"
    running = {name: i["running"] for name, i in instances(gateway).items()}
    assert running == {NAMES[0]: 2, NAMES[1]: 2}, running
    os.kill(stub_of(instances_triton, NAMES[1]), signal.SIGKILL)  # tiny_1 crashes; Triton and tiny go on
    for stream in streams:
        assert stream.done.wait(60) and stream.error is None, stream.error
        assert stream.last == "done"
    assert [s.tokens for s in streams] == [expected_tokens(reference, p, 200) for p in prompts]
    text = httpx.get(f"{gateway}/metrics", timeout=5).text
    moved = re.search(
        rf'^gateway_instance_moved_sequences_total{{from_instance="{NAMES[1]}",to_instance="{NAMES[0]}"}} (\S+)$',
        text,
        re.M,
    )
    assert moved and float(moved.group(1)) == 2.0, text
    # New work: only the healthy instance, at once (the crashed one's breaker is open).
    ready = instances(gateway)
    assert ready[NAMES[1]]["breaker"] != "closed" and ready[NAMES[0]]["breaker"] == "closed"
    assert httpx.get(f"{gateway}/health/ready", timeout=5).status_code == 200  # one instance serves
    served = model_metric(instances_triton, "nv_inference_request_success", NAMES[0])
    for _ in range(4):
        r = httpx.post(f"{gateway}/generate", json={"prompt": "Hi", "max_new_tokens": 4}, timeout=30)  # not cached
        assert r.status_code == 200, r.text
    assert model_metric(instances_triton, "nv_inference_request_success", NAMES[0]) >= served + 4
    # Loaded again (a new stub): its probe closes the breaker, and it takes new work again.
    instances_triton.reload([NAMES[1]])
    assert wait_for(lambda: instances(gateway)[NAMES[1]]["breaker"] == "closed", 10), instances(gateway)
    again = model_metric(instances_triton, "nv_inference_request_success", NAMES[1])
    with ThreadPoolExecutor(4) as pool:
        answers = list(
            pool.map(
                lambda i: httpx.post(
                    f"{gateway}/generate", json={"prompt": f"Hi {i}", "max_new_tokens": 8}, timeout=30
                ),
                range(4),
            )
        )
    assert all(a.status_code == 200 for a in answers)
    assert model_metric(instances_triton, "nv_inference_request_success", NAMES[1]) > again
    assert wait_for(lambda: all(model_metric(instances_triton, "gpt2_kv_live_sequences", m) == 0 for m in NAMES), 3)


@pytest.mark.slow
def test_the_engine_core_of_several_workers_places_over_the_instances_too(
    instances_triton: TritonServer,
    instances_repository: Path,
    reference: tuple[object, object],
    tmp_path: Path,
) -> None:
    """`python -m frontend --workers 2`: the engine core runs the placement (one scheduler per
    instance) for both workers; its scheduler series come with every scrape."""
    launched = serve_workers(
        instances_triton,
        instances_repository,
        tmp_path / "gateway.log",
        GATEWAY_MODEL_INSTANCES="2",
        GATEWAY_DEFAULT_WINDOW="16",
    )
    url, _, _ = next(launched)
    try:
        before = {m: model_metric(instances_triton, "gpt2_prefill_tokens_total", m) for m in NAMES}
        prompts = ["Two workers", "and one core", "place sequences", "on two instances"]
        streams = [Stream(url, {"prompt": p, "max_new_tokens": 16, "temperature": 0}) for p in prompts]
        for prompt, stream in zip(prompts, streams, strict=True):
            assert stream.done.wait(60) and stream.error is None and stream.last == "done", stream.error
            assert stream.tokens == expected_tokens(reference, prompt, 16)
        time.sleep(0.3)
        assert all(model_metric(instances_triton, "gpt2_prefill_tokens_total", m) > before[m] for m in NAMES)
        text = httpx.get(f"{url}/metrics", timeout=5).text
        assert f'gateway_instance_circuit_breaker_state{{instance="{NAMES[1]}"}} 0.0' in text
    finally:
        next(launched, None)  # the rest of serve_workers: kills the gateway's process group
