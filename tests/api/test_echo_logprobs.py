"""OpenAI `echo` with `logprobs`: the prompt's own logprobs come back before the completion's
(what lm-evaluation-harness's loglikelihood requests read), through the official SDK. The values
here are the fake engine's; their exactness against transformers is tested on the step engine
(tests/unit/test_step_engine.py) and through a real Triton (tests/integration)."""

from __future__ import annotations

import httpx
import openai
import pytest

from frontend.engine.model import ServedModel
from tests.api.conftest import MODEL
from tests.api.fake_engine import FakeEngine

pytestmark = [pytest.mark.api, pytest.mark.asyncio]


@pytest.mark.parametrize("max_tokens", [0, 2])
async def test_echo_returns_the_prompts_logprobs_first(
    oai: openai.AsyncOpenAI, fake: FakeEngine, served_model: ServedModel, max_tokens: int
) -> None:
    ids = served_model.tokenizer("Hello there, world")["input_ids"]
    c = await oai.completions.create(
        model=MODEL, prompt=ids, max_tokens=max_tokens, temperature=0, logprobs=2, echo=True
    )
    choice = c.choices[0]
    decode = served_model.tokenizer.decode
    assert choice.text.startswith(decode(ids))
    lp = choice.logprobs
    assert lp is not None and lp.tokens is not None and lp.token_logprobs is not None and lp.top_logprobs is not None
    assert lp.tokens[: len(ids)] == [decode([t]) for t in ids]
    expected = fake.prompt_logprobs_event(ids, 2)
    assert lp.token_logprobs[: len(ids)] == pytest.approx(list(expected.logprobs))
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.top_logprobs[1] == {decode([t]): v for t, v in expected.top_logprobs[1]}
    assert lp.text_offset is not None and lp.text_offset[0] == 0
    assert len(lp.tokens) == len(ids) + max_tokens  # then the completion's own tokens
    assert c.usage is not None and c.usage.completion_tokens == max_tokens
    assert choice.finish_reason == "length"
    await fake.drain()
    assert fake.live == 0


async def test_max_tokens_zero_needs_echo_and_echo_logprobs_do_not_stream(oai: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await oai.completions.create(model=MODEL, prompt="Hi", max_tokens=0)
    assert info.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError) as info:
        await oai.completions.create(model=MODEL, prompt="Hi", max_tokens=1, echo=True, logprobs=1, stream=True)
    assert info.value.param == "echo"


async def test_echo_without_logprobs_asks_no_prompt_logprobs(oai: openai.AsyncOpenAI, fake: FakeEngine) -> None:
    c = await oai.completions.create(model=MODEL, prompt="Hi", max_tokens=2, temperature=0, echo=True)
    assert c.choices[0].text.startswith("Hi") and c.choices[0].logprobs is None
    assert fake.submitted[-1].prompt_logprobs == -1


async def test_the_native_route_returns_prompt_logprobs(client: httpx.AsyncClient, served_model: ServedModel) -> None:
    r = await client.post(
        "/generate", json={"prompt": "Hello there", "max_new_tokens": 2, "temperature": 0, "prompt_logprobs": 2}
    )
    assert r.status_code == 200, r.text
    ids = served_model.tokenizer("Hello there")["input_ids"]
    entries = r.json()["prompt_logprobs"]
    expected = FakeEngine.prompt_logprobs_event(ids, 2)
    assert [e["token_id"] for e in entries] == ids
    assert [e["logprob"] for e in entries] == pytest.approx(list(expected.logprobs))
    assert entries[0]["top_logprobs"] == [] and len(entries[1]["top_logprobs"]) == 2
    for path in ("/generate/stream", "/generate/batch"):
        body = {"prompt": "Hi", "prompt_logprobs": 1}
        r = await client.post(path, json={"requests": [body]} if path.endswith("batch") else body)
        assert r.status_code == 400 and "prompt_logprobs" in r.json()["error"]["param"]
