"""Shared fixtures. Real servers (tritonserver, redis-server) are started here, never assumed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from embedded_triton import TritonPorts, TritonServer
from export.checkpoint import build_random
from export.cli import main as export_main

TINY = "tiny"
IDLE_TIMEOUT_S = 3.0
KV_CAPACITY = 8


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
    assert export_main(["--model", str(tiny_checkpoint), *common]) == 0
    assert export_main(["--random-config", "tiny", "--seed", "1", *common]) == 0
    return repo


@pytest.fixture(scope="session")
def triton(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    work = tmp_path_factory.mktemp("triton")
    server = TritonServer(model_repository, ports=TritonPorts.free(), work_dir=work, log_path=work / "triton.log")
    with server:
        yield server
