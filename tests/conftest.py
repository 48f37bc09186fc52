"""Shared fixtures. Real servers (tritonserver, redis-server) are started here, never assumed."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from embedded_triton import TritonPorts, TritonServer
from export.checkpoint import build_random
from export.cli import main as export_main
from export.parity import TOLERANCES
from tests.integration.redis_server import REDIS_SERVER, RedisServer

TINY = "tiny"
IDLE_TIMEOUT_S = 3.0
KV_CAPACITY = 8
TRACE_FILE = "trace.json"  # in the session tritonserver's work directory

# The same suite runs on the GPU machine with GPT2_TEST_DTYPE=fp16 GPT2_TEST_DEVICE=cuda
# GPT2_TEST_STRICT=1 (every node on the GPU); tolerances follow the dtype (export.parity).
DTYPE = os.environ.get("GPT2_TEST_DTYPE", "fp32")
DEVICE = os.environ.get("GPT2_TEST_DEVICE", "auto")
STRICT = os.environ.get("GPT2_TEST_STRICT", "0") == "1"
ATOL, RTOL = TOLERANCES[DTYPE]


def hf_greedy(
    model: Any,
    prompt_ids: list[int],
    new_tokens: int,
    eos_token_id: int,
    *,
    exact: bool = False,
    repetition_penalty: float = 1.0,
) -> list[int]:
    """transformers' own greedy continuation (the reference); `exact` forbids stopping at eos."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens if exact else 0,
            pad_token_id=eos_token_id,
            repetition_penalty=repetition_penalty,
        )
    return [int(t) for t in out[0, len(prompt_ids) :].tolist()]


def assert_logits_close(got: np.ndarray, ref: np.ndarray) -> float:
    """|got - ref| <= atol + rtol * max|ref| (the exporter's criterion); returns the max error."""
    err = float(np.abs(got - ref).max())
    bound = ATOL + RTOL * float(np.abs(ref).max())
    assert err <= bound, f"max abs logit error {err:.3g} > {bound:.3g} ({DTYPE})"
    return err


@contextlib.contextmanager
def killed_at_exit(server: TritonServer) -> Iterator[TritonServer]:
    """`server` started, and at the end killed: SIGKILL to its process group (server and stubs),
    its /dev/shm regions removed (`cleanup`). A graceful stop costs 2.5-3 s a server (Triton polls
    its unloading models once a second; the stubs finalize) and no test of these fixtures' users
    checks how their server stops: test_stack_ctrl_c and the fault tier check Triton's own stop."""
    server.start()
    try:
        yield server
    finally:
        server.cleanup()
        server.stop()  # nothing left running: closes the log file


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny GPT-2 saved as an ordinary Hugging Face checkpoint directory."""
    work = tmp_path_factory.mktemp("ckpt")
    ckpt = build_random("tiny", seed=0, workdir=work)
    out = work / "hf"
    ckpt.model.save_pretrained(out)
    ckpt.tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def model_repository(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Path:
    """A repository with two versions of `tiny`: v1 from the checkpoint, v2 other random weights."""
    repo = tmp_path_factory.mktemp("repo")
    common = ["--name", TINY, "--repository", str(repo), "--kv-capacity", str(KV_CAPACITY)]
    common += ["--idle-timeout-s", str(IDLE_TIMEOUT_S), "--serve-versions", "2", "--default-window", "16"]
    common += ["--dtype", DTYPE, "--device", DEVICE] + (["--strict-device"] if STRICT else [])
    assert export_main(["--model", str(tiny_checkpoint), *common]) == 0
    assert export_main(["--random-config", "tiny", "--seed", "1", *common]) == 0
    return repo


# The GPT-2 124M shape (12 layers, 768 wide, vocabulary 50,257; random weights) for the batch-
# invariance tests: its kernels reduce over widths where the tiny model's do not differ. Context
# capped to keep the KV pool small.
GPT2_SHAPE = "gpt2"
GPT2_CONTEXT = 128
GPT2_CAPACITY = 40


@pytest.fixture(scope="session")
def gpt2_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository with one version of `gpt2` (the GPT-2 124M shape, random weights, seed 0).
    Exported without the parity check (50 s of this tier on 2 cores): the graph builder's parity
    is the tiny model's tests' and every `make export`'s."""
    repo = tmp_path_factory.mktemp("gpt2repo")
    args = ["--random-config", "gpt2", "--seed", "0", "--name", GPT2_SHAPE, "--repository", str(repo)]
    args += ["--kv-capacity", str(GPT2_CAPACITY), "--max-context", str(GPT2_CONTEXT), "--default-window", "16"]
    args += ["--dtype", DTYPE, "--device", DEVICE, "--skip-parity"] + (["--strict-device"] if STRICT else [])
    assert export_main(args) == 0
    return repo


# The tiny checkpoint exported with `--kv-partitions 2` (test_lanes), under a name of its own.
TINY_LANES = "tiny_lanes"


@pytest.fixture(scope="session")
def lanes_repository(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository of its own (servers started on `model_repository` do not load it) with
    TINY_LANES: the tiny checkpoint with its KV pool in 2 partitions."""
    repo = tmp_path_factory.mktemp("repo_lanes")
    args = ["--model", str(tiny_checkpoint), "--name", TINY_LANES, "--repository", str(repo), "--kv-partitions", "2"]
    args += ["--kv-capacity", str(KV_CAPACITY), "--idle-timeout-s", str(IDLE_TIMEOUT_S), "--default-window", "16"]
    args += ["--dtype", DTYPE, "--device", DEVICE] + (["--strict-device"] if STRICT else [])
    assert export_main(args) == 0
    return repo


@pytest.fixture(scope="session")
def triton(
    model_repository: Path, lanes_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TritonServer]:
    """tiny (versions 1 and 2) and, from a second repository, TINY_LANES: one tritonserver for the
    integration tier (each of its own cost ~9 s to start and stop on 2 cores)."""
    work = tmp_path_factory.mktemp("triton")
    extra = [f"--model-repository={lanes_repository}"]
    # Tracing set up but off (Triton's default level): test_request_id turns it on for `tiny` alone
    # through Triton's trace API and off again, instead of a tracing server of its own (~10 s).
    extra += [f"--trace-config=triton,file={work / TRACE_FILE}", "--trace-config=level=OFF"]
    server = TritonServer(
        model_repository, ports=TritonPorts.free(), work_dir=work, log_path=work / "triton.log", extra_args=extra
    )
    with killed_at_exit(server):
        yield server


# A throw-away redis-server for the integration and fault-and-abuse tiers.
@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    if REDIS_SERVER is None:  # `make test` and .ci/run install it: a missing binary is a broken setup
        pytest.fail("redis-server is not installed (make redis-server installs Debian's package)")
    server = RedisServer(REDIS_SERVER, tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()
