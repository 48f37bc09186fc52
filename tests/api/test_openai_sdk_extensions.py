"""vLLM's sampling extensions on /v1/completions, through the official `openai` SDK (`extra_body`),
streaming and not; and the service's refusal of the stop controls an engine does not honour."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import openai
import pytest

from frontend.engine.model import ServedModel
from frontend.sampling import SamplingParams
from tests.api.conftest import MODEL
from tests.api.fake_engine import EOS_STEP, EOS_TRIGGER, FakeEngine

pytestmark = [pytest.mark.api, pytest.mark.asyncio]

GREEDY = SamplingParams(temperature=0.0)
EOS_PROMPT = f"{EOS_TRIGGER}!"


def _ids(model: ServedModel, text: str) -> list[int]:
    return list(model.tokenizer(text)["input_ids"])


def _text(model: ServedModel, ids: Sequence[int]) -> str:
    return "".join(model.tokenizer.decode([t]) for t in ids)


async def _stream_text(oai: openai.AsyncOpenAI, **args: Any) -> tuple[str, str | None]:
    stream = await oai.completions.create(stream=True, **args)
    text, finish = "", None
    async for chunk in stream:
        for choice in chunk.choices:
            text += choice.text
            finish = choice.finish_reason or finish
    return text, finish


@pytest.mark.parametrize("stream", [False, True])
async def test_ignore_eos_runs_to_max_tokens(
    oai: openai.AsyncOpenAI, fake: FakeEngine, served_model: ServedModel, stream: bool
) -> None:
    args: dict[str, Any] = {"model": MODEL, "prompt": EOS_PROMPT, "max_tokens": 6, "temperature": 0}
    expected = fake.expected_tokens(_ids(served_model, EOS_PROMPT), GREEDY, 6, None, ignore_eos=True)
    assert len(expected) == 6 and expected[EOS_STEP] == served_model.eos_token_id  # eos inside, not the end
    shown = [t for t in expected if t != served_model.eos_token_id]  # skip_special_tokens (default)
    if stream:
        text, finish = await _stream_text(oai, extra_body={"ignore_eos": True}, **args)
    else:
        c = await oai.completions.create(extra_body={"ignore_eos": True}, **args)
        text, finish = c.choices[0].text, c.choices[0].finish_reason
        assert c.usage is not None and c.usage.completion_tokens == 6
    assert (text, finish) == (_text(served_model, shown), "length")
    assert fake.submitted[-1].ignore_eos is True


async def test_ignore_eos_with_special_tokens_shown(
    oai: openai.AsyncOpenAI, fake: FakeEngine, served_model: ServedModel
) -> None:
    c = await oai.completions.create(
        model=MODEL,
        prompt=EOS_PROMPT,
        max_tokens=5,
        temperature=0,
        extra_body={"ignore_eos": True, "skip_special_tokens": False},
    )
    expected = fake.expected_tokens(_ids(served_model, EOS_PROMPT), GREEDY, 5, None, ignore_eos=True)
    assert c.choices[0].text == served_model.tokenizer.decode(expected)
    assert "<|endoftext|>" in c.choices[0].text


@pytest.mark.parametrize("stream", [False, True])
async def test_min_tokens_masks_eos(
    oai: openai.AsyncOpenAI, fake: FakeEngine, served_model: ServedModel, stream: bool
) -> None:
    args: dict[str, Any] = {"model": MODEL, "prompt": EOS_PROMPT, "max_tokens": 8, "temperature": 0}
    without = await oai.completions.create(**args)
    assert without.choices[0].finish_reason == "stop" and without.usage is not None
    assert without.usage.completion_tokens == EOS_STEP + 1
    expected = fake.expected_tokens(_ids(served_model, EOS_PROMPT), GREEDY, 8, None, min_tokens=EOS_STEP + 2)
    assert served_model.eos_token_id not in expected  # masked at its step, never drawn again
    if stream:
        text, finish = await _stream_text(oai, extra_body={"min_tokens": EOS_STEP + 2}, **args)
    else:
        c = await oai.completions.create(extra_body={"min_tokens": EOS_STEP + 2}, **args)
        text, finish = c.choices[0].text, c.choices[0].finish_reason
    assert (text, finish) == (_text(served_model, expected), "length")
    assert fake.submitted[-1].min_tokens == EOS_STEP + 2


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("include", [False, True])
async def test_stop_token_ids(
    oai: openai.AsyncOpenAI, fake: FakeEngine, served_model: ServedModel, stream: bool, include: bool
) -> None:
    prompt = "Hello world"
    tokens = fake.expected_tokens(_ids(served_model, prompt), GREEDY, 8, None)
    stop_id = tokens[3]
    first = tokens.index(stop_id)  # the first time it is drawn ends the generation
    extra = {"stop_token_ids": [stop_id], "include_stop_str_in_output": include}
    args: dict[str, Any] = {"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0, "extra_body": extra}
    if stream:
        text, finish = await _stream_text(oai, **args)
    else:
        c = await oai.completions.create(**args)
        text, finish = c.choices[0].text, c.choices[0].finish_reason
        assert c.usage is not None and c.usage.completion_tokens == first + 1
    assert finish == "stop"
    assert text == _text(served_model, tokens[: first + 1] if include else tokens[:first])
    assert fake.submitted[-1].stop_token_ids == (stop_id,)


async def test_min_tokens_defers_stop_token_ids_and_stop_strings(
    oai: openai.AsyncOpenAI, fake: FakeEngine, served_model: ServedModel
) -> None:
    prompt = "Hello world"
    plain = fake.expected_tokens(_ids(served_model, prompt), GREEDY, 10, None)
    stop_id = plain[0]
    masked = fake.expected_tokens(_ids(served_model, prompt), GREEDY, 10, None, min_tokens=3, stop_token_ids=[stop_id])
    c = await oai.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=10,
        temperature=0,
        stop=[served_model.tokenizer.decode([masked[1]])],  # completes before min_tokens: not a stop yet
        extra_body={"min_tokens": 3, "stop_token_ids": [stop_id]},
    )
    assert stop_id not in masked[:3]
    assert c.choices[0].text.startswith(_text(served_model, masked[:3]))


@pytest.mark.parametrize("stream", [False, True])
async def test_include_stop_str_in_output(
    oai: openai.AsyncOpenAI, fake: FakeEngine, served_model: ServedModel, stream: bool
) -> None:
    tokens = fake.expected_tokens(_ids(served_model, "Hello world"), GREEDY, 8, None)
    pieces = [served_model.tokenizer.decode([t]) for t in tokens]
    args: dict[str, Any] = {
        "model": MODEL,
        "prompt": "Hello world",
        "max_tokens": 8,
        "temperature": 0,
        "stop": [pieces[3]],
        "extra_body": {"include_stop_str_in_output": True},
    }
    if stream:
        text, finish = await _stream_text(oai, **args)
    else:
        c = await oai.completions.create(**args)
        text, finish = c.choices[0].text, c.choices[0].finish_reason
    assert (text, finish) == ("".join(pieces[:4]), "stop")


async def test_sampling_extensions_reach_the_engine(oai: openai.AsyncOpenAI, fake: FakeEngine) -> None:
    await oai.completions.create(
        model=MODEL,
        prompt="Hi",
        max_tokens=3,
        extra_body={"top_k": -1, "min_p": 0.05, "repetition_penalty": 1.2},
    )
    await oai.completions.create(model=MODEL, prompt="Hi", max_tokens=3, extra_body={"top_k": 5})
    off, five = fake.submitted
    assert off.params == SamplingParams(top_k=0, min_p=0.05, repetition_penalty=1.2)  # -1 is vLLM's "off"
    assert five.params.top_k == 5
    assert (off.ignore_eos, off.min_tokens, off.stop_token_ids) == (False, 0, ())


async def test_options_are_part_of_the_cache_key(oai: openai.AsyncOpenAI, fake: FakeEngine) -> None:
    args: dict[str, Any] = {"model": MODEL, "prompt": EOS_PROMPT, "max_tokens": 6, "temperature": 0}
    a = await oai.completions.create(**args)
    b = await oai.completions.create(extra_body={"ignore_eos": True}, **args)
    assert len(fake.submitted) == 2  # not served from the first one's cache entry
    assert a.choices[0].finish_reason == "stop" and b.choices[0].finish_reason == "length"


@pytest.mark.parametrize(
    ("extra", "param", "fragment"),
    [
        ({"min_tokens": -1}, "min_tokens", "greater than or equal"),
        ({"min_tokens": 5}, "min_tokens", "must not exceed max_tokens"),
        ({"stop_token_ids": [-1]}, "stop_token_ids[0]", "greater than or equal"),
        ({"stop_token_ids": [512]}, "stop_token_ids", "[0, 512)"),
        ({"stop_token_ids": list(range(65))}, "stop_token_ids", "at most 64"),
        ({"top_k": -2}, "top_k", "greater than or equal"),
        ({"ignore_eos": "maybe"}, "ignore_eos", "boolean"),
        ({"skip_special_tokens": []}, "skip_special_tokens", "boolean"),
        ({"frequency_penalty": 2.5}, "frequency_penalty", "less than or equal"),
        ({"logit_bias": {"512": 1.0}}, "logit_bias", "[0, 512)"),
        ({"logit_bias": {"5": -100.5}}, "logit_bias", "[-100, 100]"),
        ({"ignore_eos_please": True}, "ignore_eos_please", "Extra inputs"),
    ],
)
async def test_bad_extension_values(oai: openai.AsyncOpenAI, extra: dict[str, Any], param: str, fragment: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await oai.completions.create(model=MODEL, prompt="Hi", max_tokens=4, extra_body=extra)
    assert info.value.status_code == 400
    assert info.value.type == "invalid_request_error"
    assert info.value.param == param
    assert fragment in info.value.message


@pytest.mark.parametrize("stream", [False, True])
async def test_penalties_and_logit_bias_reach_the_sampler(
    oai: openai.AsyncOpenAI, fake: FakeEngine, stream: bool
) -> None:
    """OpenAI's presence_penalty, frequency_penalty and logit_bias, as the SDK sends them, become
    the generation's sampling settings (their exactness: tests/unit/test_sampling.py, and through a
    real Triton: tests/integration/test_gateway.py; chat: tests/api/test_chat.py)."""
    args: dict[str, Any] = {
        "model": MODEL,
        "prompt": "Hi",
        "max_tokens": 3,
        "temperature": 0.7,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.25,
        "logit_bias": {"50": -100, "7": 2.5},
    }
    if stream:
        async for _ in await oai.completions.create(stream=True, **args):
            pass
    else:
        await oai.completions.create(**args)
    params = fake.submitted[-1].params
    assert (params.presence_penalty, params.frequency_penalty) == (0.5, -0.25)
    assert params.logit_bias == ((7, 2.5), (50, -100.0))
