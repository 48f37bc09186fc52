"""Lanes against the real tritonserver: the tiny model exported with 2 KV partitions (TINY_LANES,
served by the session tritonserver from a second repository), the gateway's engine with one lane
per partition (its default) keeps two steps in flight, and concurrent greedy generations come out
token for token as with one lane and as transformers' own. The outputs must not depend on whether
the model honours `kv_partition` (only the speed does)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from transformers import GPT2LMHeadModel

from embedded_triton import TritonServer
from frontend.engine.protocol import EngineRequest, Event, FinishEvent, TokenEvent
from frontend.engine.scheduler import ActiveSequence
from frontend.engine.step_rows import StepRequest
from frontend.engine.triton_engine import TritonEngine
from frontend.sampling import SamplingParams
from frontend.settings import Settings
from step_model import contract
from step_model.contract import model_config
from tests.conftest import TINY_LANES, hf_greedy

pytestmark = pytest.mark.integration

PROMPTS = [[464, 268, 758], [154, 11, 314], [40, 588], [121, 318, 257, 133], [818], [366, 110, 318]]  # vocab 1024
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def partitioned(triton: TritonServer, lanes_repository: Path) -> tuple[TritonServer, Path]:
    """The tiny checkpoint exported with `--kv-partitions 2` (TINY_LANES), served by the session
    tritonserver from its second repository."""
    config = lanes_repository / TINY_LANES / "config.pbtxt"
    assert model_config.read_parameters(config)[contract.CONFIG_KV_PARTITIONS] == "2"
    return triton, lanes_repository


async def generate(triton: TritonServer, repo: Path, engine_lanes: int) -> tuple[list[list[int]], int, set[Any]]:
    """Every prompt at once, greedy: (their tokens, the most steps in flight together, the
    partitions the steps named)."""
    settings = Settings(
        environment="test",
        triton_url=triton.grpc_url,
        model=TINY_LANES,
        model_version="1",
        repository=repo,
        engine_lanes=engine_lanes,
        prefill_hold_ms=0,
    )
    engine = TritonEngine.from_settings(settings)
    await engine.start()
    client = engine._client
    assert client is not None
    watch = {"now": 0, "most": 0, "partitions": set()}
    step = client.step

    async def watched(rows: Any, **kwargs: Any) -> Any:
        if isinstance(rows, StepRequest):
            watch["partitions"].add(rows.kv_partition)
        watch["now"] += 1
        watch["most"] = max(watch["most"], watch["now"])
        try:
            return await step(rows, **kwargs)
        finally:
            watch["now"] -= 1

    client.step = watched  # type: ignore[method-assign]
    try:
        handles = [engine.submit(EngineRequest(p, SamplingParams(temperature=0.0), NEW_TOKENS)) for p in PROMPTS]
        results = await asyncio.gather(*(drain(h) for h in handles))  # type: ignore[arg-type]
    finally:
        await engine.close()
    return results, int(watch["most"]), set(watch["partitions"])


async def drain(seq: ActiveSequence) -> list[int]:
    tokens = []
    while True:
        event: Event = await asyncio.wait_for(seq.events.get(), 60)
        if isinstance(event, TokenEvent):
            tokens.append(event.token_id)
        else:
            assert isinstance(event, FinishEvent), event
            return tokens


def test_two_lanes_keep_two_steps_in_flight_and_generate_as_one_lane(
    partitioned: tuple[TritonServer, Path], tiny_checkpoint: Path
) -> None:
    triton, repo = partitioned
    two, most, partitions = asyncio.run(generate(triton, repo, engine_lanes=0))  # 0: the model's 2 partitions
    assert most == 2 and partitions == {0, 1}
    one, most, partitions = asyncio.run(generate(triton, repo, engine_lanes=1))
    assert most == 1 and partitions == {None}  # one lane names no partition
    assert two == one
    model = GPT2LMHeadModel.from_pretrained(tiny_checkpoint).eval()
    eos = int(model.config.eos_token_id)
    assert one == [hf_greedy(model, p, NEW_TOKENS, eos) for p in PROMPTS]
