"""The native routes: /generate, /generate/stream (SSE framing) and /generate/batch."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from frontend.engine.model import ServedModel
from frontend.sampling import SamplingParams
from tests.api.conftest import MODEL, assert_error_envelope, parse_sse
from tests.api.fake_engine import EOS_TRIGGER, FakeEngine

pytestmark = [pytest.mark.api, pytest.mark.asyncio]

GREEDY = SamplingParams(temperature=0.0)


def _ids(model: ServedModel, text: str) -> list[int]:
    return list(model.tokenizer(text)["input_ids"])


async def test_generate_response_fields(client: httpx.AsyncClient, fake: FakeEngine, served_model: ServedModel) -> None:
    prompt = "Hello world"
    r = await client.post("/generate", json={"prompt": prompt, "max_new_tokens": 5, "temperature": 0})
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"generated_text", "model", "finish_reason", "completion_tokens", "usage", "cached", "timings"}
    ids = _ids(served_model, prompt)
    expected = fake.expected_tokens(ids, GREEDY, 5, None)
    assert body["generated_text"] == served_model.tokenizer.decode(expected)
    assert body["model"] == MODEL
    assert body["finish_reason"] == "length"
    assert body["completion_tokens"] == 5
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 5, "total_tokens": len(ids) + 5}
    assert body["cached"] is False
    assert set(body["timings"]) == {"time_to_first_token_s", "total_s"}
    assert 0 <= body["timings"]["time_to_first_token_s"] <= body["timings"]["total_s"]
    # the engine got exactly what was asked
    (handle,) = fake.submitted
    assert handle.prompt_ids == ids and handle.max_new_tokens == 5 and handle.seed is None
    assert handle.params.temperature == 0.0
    assert fake.live == 0


async def test_generate_passes_sampling_parameters(client: httpx.AsyncClient, fake: FakeEngine) -> None:
    payload = {
        "prompt": "Hi",
        "max_new_tokens": 3,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 40,
        "min_p": 0.05,
        "repetition_penalty": 1.2,
        "seed": 7,
    }
    r = await client.post("/generate", json=payload)
    assert r.status_code == 200
    (handle,) = fake.submitted
    assert handle.params == SamplingParams(temperature=0.7, top_k=40, top_p=0.9, min_p=0.05, repetition_penalty=1.2)
    assert handle.seed == 7


async def test_top_k_at_or_above_vocab_means_off(client: httpx.AsyncClient, fake: FakeEngine) -> None:
    r = await client.post("/generate", json={"prompt": "Hi", "max_new_tokens": 2, "top_k": 10_000})
    assert r.status_code == 200
    assert fake.submitted[0].params.top_k == 0


async def test_eos_finishes_with_stop(client: httpx.AsyncClient, served_model: ServedModel, fake: FakeEngine) -> None:
    r = await client.post("/generate", json={"prompt": f"say {EOS_TRIGGER}", "max_new_tokens": 10, "temperature": 0})
    body = r.json()
    assert body["finish_reason"] == "stop"
    assert body["completion_tokens"] == 3  # two text tokens, then eos (counted, never shown)
    expected = fake.expected_tokens(_ids(served_model, f"say {EOS_TRIGGER}"), GREEDY, 10, None)
    assert expected[-1] == served_model.eos_token_id
    assert body["generated_text"] == served_model.tokenizer.decode(expected[:-1])
    assert "<|endoftext|>" not in body["generated_text"]


async def test_stop_string_cuts_the_text(
    client: httpx.AsyncClient, served_model: ServedModel, fake: FakeEngine
) -> None:
    ids = _ids(served_model, "Hello world")
    tokens = fake.expected_tokens(ids, GREEDY, 8, None)
    pieces = [served_model.tokenizer.decode([t]) for t in tokens]
    stop = pieces[3]
    before = "".join(pieces[:3])
    assert (before + stop).find(stop) == len(before)  # the first hit is the 4th token
    r = await client.post(
        "/generate", json={"prompt": "Hello world", "max_new_tokens": 8, "temperature": 0, "stop": stop}
    )
    body = r.json()
    assert body["generated_text"] == before
    assert body["finish_reason"] == "stop"
    assert body["completion_tokens"] == 4
    assert fake.live == 0


# --------------------------------------------------------------------------- streaming
async def test_stream_sse_framing(client: httpx.AsyncClient, served_model: ServedModel, fake: FakeEngine) -> None:
    prompt = "Hello world"
    r = await client.post("/generate/stream", json={"prompt": prompt, "max_new_tokens": 6, "temperature": 0})
    assert r.status_code == 200
    assert r.headers["content-type"].split(";")[0] == "text/event-stream"
    events = parse_sse(r.text)
    tokens, done = events[:-1], events[-1]
    assert [e.event for e in tokens] == ["token"] * 6
    expected = fake.expected_tokens(_ids(served_model, prompt), GREEDY, 6, None)
    datas = [e.json() for e in tokens]
    for position, (data, token_id) in enumerate(zip(datas, expected, strict=True)):
        assert set(data) == {"text", "position", "token_id"}
        assert data["position"] == position
        assert data["token_id"] == token_id
        assert data["text"] == served_model.tokenizer.decode([token_id])
    assert done.event == "done"
    final = done.json()
    assert set(final) == {"finish_reason", "usage", "cached", "generated_text"}
    assert final["finish_reason"] == "length"
    n = len(_ids(served_model, prompt))
    assert final["usage"] == {"prompt_tokens": n, "completion_tokens": 6, "total_tokens": n + 6}
    assert final["cached"] is False
    assert final["generated_text"] == "".join(d["text"] for d in datas)
    assert fake.live == 0


async def test_stream_matches_non_stream(client: httpx.AsyncClient) -> None:
    payload = {"prompt": "The river", "max_new_tokens": 7, "temperature": 0.8, "seed": 3}
    streamed = parse_sse((await client.post("/generate/stream", json=payload)).text)
    plain = (await client.post("/generate", json=payload)).json()
    assert plain["cached"] is True  # the stream's result was stored, and the routes share it
    assert streamed[-1].json()["generated_text"] == plain["generated_text"]
    assert streamed[-1].json()["usage"] == plain["usage"]


async def test_stream_eos(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/generate/stream", json={"prompt": f"{EOS_TRIGGER} now", "max_new_tokens": 10, "temperature": 0}
    )
    events = parse_sse(r.text)
    assert [e.event for e in events] == ["token", "token", "done"]
    assert [e.json()["position"] for e in events[:2]] == [0, 1]
    done = events[-1].json()
    assert done["finish_reason"] == "stop"
    assert done["usage"]["completion_tokens"] == 3


async def test_stream_with_stop_string(client: httpx.AsyncClient, served_model: ServedModel, fake: FakeEngine) -> None:
    tokens = fake.expected_tokens(_ids(served_model, "Hello world"), GREEDY, 8, None)
    pieces = [served_model.tokenizer.decode([t]) for t in tokens]
    r = await client.post(
        "/generate/stream", json={"prompt": "Hello world", "max_new_tokens": 8, "temperature": 0, "stop": [pieces[3]]}
    )
    events = parse_sse(r.text)
    done = events[-1].json()
    assert done["finish_reason"] == "stop"
    assert done["generated_text"] == "".join(pieces[:3])
    assert "".join(e.json()["text"] for e in events[:-1]) == "".join(pieces[:3])


# --------------------------------------------------------------------------- batch
async def test_batch_in_order_with_per_item_parameters(
    client: httpx.AsyncClient, fake: FakeEngine, served_model: ServedModel
) -> None:
    items: list[dict[str, Any]] = [
        {"prompt": "first", "max_new_tokens": 2, "temperature": 0},
        {"prompt": "second", "max_new_tokens": 7, "temperature": 0},
        {"prompt": f"third {EOS_TRIGGER}", "max_new_tokens": 9, "temperature": 0},
        {"prompt": "fourth", "max_new_tokens": 4, "temperature": 1.0, "seed": 11, "top_k": 5},
    ]
    fake.delay_s = 0.001  # items interleave; order must still be the request's
    r = await client.post("/generate/batch", json={"requests": items})
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"results", "cache_hits"}
    results = body["results"]
    assert [x["completion_tokens"] for x in results] == [2, 7, 3, 4]
    assert [x["finish_reason"] for x in results] == ["length", "length", "stop", "length"]
    for item, result in zip(items, results, strict=True):
        params = SamplingParams(temperature=item["temperature"], top_k=item.get("top_k", 0))
        expected = fake.expected_tokens(
            _ids(served_model, item["prompt"]), params, item["max_new_tokens"], item.get("seed")
        )
        text_ids = [t for t in expected if t != served_model.eos_token_id]
        assert result["generated_text"] == served_model.tokenizer.decode(text_ids)
        assert result["usage"]["prompt_tokens"] == len(_ids(served_model, item["prompt"]))
        assert result["cached"] is False
        assert result["error"] is None
    assert body["cache_hits"] == 0
    by_prompt = {served_model.tokenizer.decode(h.prompt_ids): h for h in fake.submitted}
    assert by_prompt["fourth"].seed == 11 and by_prompt["fourth"].params.top_k == 5
    assert fake.live == 0


async def test_batch_cache_hits(client: httpx.AsyncClient, fake: FakeEngine) -> None:
    cached_item = {"prompt": "warm me", "max_new_tokens": 3, "temperature": 0}
    assert (await client.post("/generate", json=cached_item)).json()["cached"] is False
    items = [
        {"prompt": "cold", "max_new_tokens": 3, "temperature": 0},
        cached_item,
        {"prompt": "never", "max_new_tokens": 3, "temperature": 0.9},  # no seed: never cached
        {**cached_item, "max_new_tokens": 4},  # other parameters: another key
    ]
    body = (await client.post("/generate/batch", json={"requests": items})).json()
    assert [x["cached"] for x in body["results"]] == [False, True, False, False]
    assert body["cache_hits"] == 1
    body = (await client.post("/generate/batch", json={"requests": items})).json()
    assert [x["cached"] for x in body["results"]] == [True, True, False, True]
    assert body["cache_hits"] == 3
    assert len(fake.submitted) == 1 + 3 + 1


async def test_batch_item_failure_is_reported_per_item(client: httpx.AsyncClient, fake: FakeEngine) -> None:
    fake.fail_after = 1
    items = [{"prompt": "a b", "max_new_tokens": 1, "temperature": 0}, {"prompt": "c d", "max_new_tokens": 3}]
    r = await client.post("/generate/batch", json={"requests": items})
    assert r.status_code == 200
    ok, failed = r.json()["results"]
    assert ok["error"] is None and ok["completion_tokens"] == 1
    assert failed["generated_text"] is None
    assert set(failed["error"]) == {"message", "type", "param", "code", "request_id"}
    assert failed["error"]["code"] == "triton_unavailable"
    assert fake.live == 0


async def test_batch_over_limit_names_requests(client: httpx.AsyncClient) -> None:
    r = await client.post("/generate/batch", json={"requests": [{"prompt": "x"}] * 5})
    assert r.status_code == 400
    err = assert_error_envelope(r)
    assert err["param"] == "requests" and "4" in err["message"]


async def test_stream_releases_held_back_text_at_the_end(
    client: httpx.AsyncClient, served_model: ServedModel, fake: FakeEngine
) -> None:
    """Text that might start a stop string is held back, and released when the generation ends:
    the fake engine queues the last token and its finish together, so the release joins the last
    token's event (everything waiting is one event); alone it is a `token` event without
    position/token_id (TextChunk's documented contract, tests/unit/test_text_assembler.py)."""
    tokens = fake.expected_tokens(_ids(served_model, "Hello world"), GREEDY, 4, None)
    pieces = [served_model.tokenizer.decode([t]) for t in tokens]
    stop = pieces[-1] + "\x07never"
    r = await client.post(
        "/generate/stream", json={"prompt": "Hello world", "max_new_tokens": 4, "temperature": 0, "stop": [stop]}
    )
    events = parse_sse(r.text)
    datas = [e.json() for e in events if e.event == "token"]
    assert [d["position"] for d in datas] == [0, 1, 2, 3]
    assert datas[3] == {"text": pieces[-1], "position": 3, "token_id": tokens[-1]}
    assert "".join(d["text"] for d in datas) == events[-1].json()["generated_text"] == "".join(pieces)
