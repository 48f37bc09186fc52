"""Error shape: every client error is a 4xx in exactly one envelope; server-side failures are 5xx in
the same envelope (or an error event / error chunk once a stream has started)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from frontend.engine.model import ServedModel
from frontend.engine.protocol import Overloaded, StepRejected, UpstreamTimeout, UpstreamUnavailable
from tests.api.conftest import MAX_CONTEXT, assert_error_envelope, parse_sse, prompt_of_tokens
from tests.api.fake_engine import FakeEngine

pytestmark = [pytest.mark.api, pytest.mark.asyncio]

NATIVE = {"prompt": "Hello world", "max_new_tokens": 4}
OPENAI = {"model": "tiny", "prompt": "Hello world", "max_tokens": 4}
DROP = object()


def _with(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    out = dict(base)
    for k, v in changes.items():
        if v is DROP:
            out.pop(k, None)
        else:
            out[k] = v
    return out


# --------------------------------------------------------------------------- native 4xx
NATIVE_CASES = [
    ("empty prompt", _with(NATIVE, prompt=""), "prompt"),
    ("missing prompt", _with(NATIVE, prompt=DROP), "prompt"),
    ("prompt wrong type", _with(NATIVE, prompt=123), "prompt"),
    ("temperature wrong type", _with(NATIVE, temperature="hot"), "temperature"),
    ("max_new_tokens float", _with(NATIVE, max_new_tokens=1.5), "max_new_tokens"),
    ("stop wrong type", _with(NATIVE, stop=5), "stop"),
    ("extra field", _with(NATIVE, n=2), "n"),
    ("temperature -1", _with(NATIVE, temperature=-1), "temperature"),
    ("temperature 6", _with(NATIVE, temperature=6), "temperature"),
    ("top_p 0", _with(NATIVE, top_p=0), "top_p"),
    ("top_p 1.5", _with(NATIVE, top_p=1.5), "top_p"),
    ("top_k -1", _with(NATIVE, top_k=-1), "top_k"),
    ("min_p 1.5", _with(NATIVE, min_p=1.5), "min_p"),
    ("repetition_penalty 0", _with(NATIVE, repetition_penalty=0), "repetition_penalty"),
    # 1e-300 overflowed float32 in the sampler (issue 17); under 0.01 a penalty only overflows.
    ("repetition_penalty 1e-300", _with(NATIVE, repetition_penalty=1e-300), "repetition_penalty"),
    ("repetition_penalty 0.009", _with(NATIVE, repetition_penalty=0.009), "repetition_penalty"),
    ("logit_bias 200", _with(NATIVE, logit_bias={"5": 200}), "logit_bias"),
    ("logit_bias id beyond the vocabulary", _with(NATIVE, logit_bias={"512": 1}), "logit_bias"),
    ("max_new_tokens 0", _with(NATIVE, max_new_tokens=0), "max_new_tokens"),
    ("max_new_tokens over the server limit", _with(NATIVE, max_new_tokens=49), "max_new_tokens"),
    ("stop list of 5", _with(NATIVE, stop=["a", "b", "c", "d", "e"]), "stop"),
    ("stop with empty string", _with(NATIVE, stop=["a", ""]), "stop"),
    ("stop empty string", _with(NATIVE, stop=""), "stop"),
    ("seed -1", _with(NATIVE, seed=-1), "seed"),
    ("seed 2**63", _with(NATIVE, seed=2**63), "seed"),
    ("temperature null", _with(NATIVE, temperature=None), "temperature"),
]


@pytest.mark.parametrize(("case", "payload", "param"), NATIVE_CASES, ids=[c[0] for c in NATIVE_CASES])
@pytest.mark.parametrize("route", ["/generate", "/generate/stream"])
async def test_native_client_errors(
    client: httpx.AsyncClient, fake: FakeEngine, route: str, case: str, payload: dict[str, Any], param: str
) -> None:
    r = await client.post(route, json=payload)
    assert r.status_code == 400, (case, r.text)
    err = assert_error_envelope(r)
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param
    assert fake.submitted == []  # rejected before any work


@pytest.mark.parametrize("route", ["/generate", "/generate/stream"])
async def test_context_length_exceeded(client: httpx.AsyncClient, served_model: ServedModel, route: str) -> None:
    prompt, n = prompt_of_tokens(served_model, 20)
    fits = MAX_CONTEXT - n
    ok = await client.post("/generate", json={"prompt": prompt, "max_new_tokens": fits, "temperature": 0})
    assert ok.status_code == 200, ok.text
    r = await client.post(route, json={"prompt": prompt, "max_new_tokens": fits + 1})
    assert r.status_code == 400
    err = assert_error_envelope(r)
    assert err["code"] == "context_length_exceeded"
    assert err["param"] == "prompt"
    assert str(MAX_CONTEXT) in err["message"]


async def test_body_not_an_object(client: httpx.AsyncClient) -> None:
    r = await client.post("/generate", json=["Hello"])
    assert r.status_code == 400
    assert assert_error_envelope(r)["param"] is None


async def test_invalid_json_has_no_param(client: httpx.AsyncClient) -> None:
    r = await client.post("/generate", content=b"{bad json", headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert assert_error_envelope(r)["param"] is None


async def test_invalid_json_is_a_400_envelope(client: httpx.AsyncClient) -> None:
    r = await client.post("/generate", content=b"{bad json", headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert assert_error_envelope(r)["type"] == "invalid_request_error"


async def test_max_prompt_chars_is_enforced(client: httpx.AsyncClient, app: Any) -> None:
    app.state.settings.max_prompt_chars = 10
    r = await client.post("/generate", json={"prompt": "Hello world, hello", "max_new_tokens": 2})
    assert r.status_code == 400
    assert assert_error_envelope(r)["param"] == "prompt"


# --------------------------------------------------------------------------- batch 4xx
BATCH_CASES = [
    ("over max_batch_requests", {"requests": [NATIVE] * 5}, "requests", None),
    ("empty batch", {"requests": []}, "requests", None),
    ("item empty prompt", {"requests": [NATIVE, _with(NATIVE, prompt="")]}, "requests[1].prompt", None),
    (
        "item bad temperature",
        {"requests": [NATIVE, NATIVE, _with(NATIVE, temperature=9)]},
        "requests[2].temperature",
        None,
    ),
    ("item extra field", {"requests": [_with(NATIVE, foo=1)]}, "requests[0].foo", None),
    (
        "item repetition_penalty 1e-300",
        {"requests": [NATIVE, _with(NATIVE, repetition_penalty=1e-300)]},
        "requests[1].repetition_penalty",
        None,
    ),
    (
        "item over the server limit",
        {"requests": [NATIVE, _with(NATIVE, max_new_tokens=49)]},
        "requests[1].max_new_tokens",
        None,
    ),
    ("extra top-level field", {"requests": [NATIVE], "parallel": True}, "parallel", None),
    ("missing requests", {}, "requests", None),
]


@pytest.mark.parametrize(("case", "payload", "param", "code"), BATCH_CASES, ids=[c[0] for c in BATCH_CASES])
async def test_batch_client_errors(
    client: httpx.AsyncClient, fake: FakeEngine, case: str, payload: dict[str, Any], param: str, code: str | None
) -> None:
    r = await client.post("/generate/batch", json=payload)
    assert r.status_code == 400, (case, r.text)
    err = assert_error_envelope(r)
    assert err["param"] == param
    assert err["code"] == code
    assert fake.submitted == []


async def test_batch_item_context_length(
    client: httpx.AsyncClient, fake: FakeEngine, served_model: ServedModel
) -> None:
    prompt, n = prompt_of_tokens(served_model, 20)
    payload = {"requests": [NATIVE, {"prompt": prompt, "max_new_tokens": MAX_CONTEXT - n + 1}]}
    r = await client.post("/generate/batch", json=payload)
    assert r.status_code == 400
    err = assert_error_envelope(r)
    assert err["param"] == "requests[1].prompt"
    assert err["code"] == "context_length_exceeded"
    assert fake.submitted == []


# --------------------------------------------------------------------------- OpenAI 4xx
OPENAI_CASES = [
    ("unknown model", _with(OPENAI, model="gpt-4"), 404, "model", "model_not_found"),
    ("missing model", _with(OPENAI, model=DROP), 400, "model", None),
    ("missing prompt", _with(OPENAI, prompt=DROP), 400, "prompt", None),
    ("empty prompt", _with(OPENAI, prompt=""), 400, "prompt", None),
    ("empty prompt list", _with(OPENAI, prompt=[]), 400, "prompt", None),
    ("empty item of a prompt list", _with(OPENAI, prompt=["Hello", ""]), 400, "prompt[1]", None),
    ("token id out of range", _with(OPENAI, prompt=[[1, 2], [600]]), 400, "prompt[1]", None),
    ("n over max_n", _with(OPENAI, n=4), 400, "n", None),
    ("n 0", _with(OPENAI, n=0), 400, "n", None),
    ("presence_penalty 2.5", _with(OPENAI, presence_penalty=2.5), 400, "presence_penalty", None),
    ("frequency_penalty -3", _with(OPENAI, frequency_penalty=-3), 400, "frequency_penalty", None),
    ("best_of != n", _with(OPENAI, best_of=3), 400, "best_of", None),
    ("logit_bias id beyond the vocabulary", _with(OPENAI, logit_bias={"50257": 5}), 400, "logit_bias", None),
    ("logit_bias 101", _with(OPENAI, logit_bias={"50": 101}), 400, "logit_bias", None),
    ("logit_bias key not an id", _with(OPENAI, logit_bias={"hello": 1}), 400, "logit_bias", None),
    ("logit_bias -5 as a key", _with(OPENAI, logit_bias={"-5": 1}), 400, "logit_bias", None),
    ("logit_bias over 300 entries", _with(OPENAI, logit_bias={str(i): 1 for i in range(301)}), 400, "logit_bias", None),
    ("suffix", _with(OPENAI, suffix="end"), 400, "suffix", None),
    ("max_tokens 0 without echo", _with(OPENAI, max_tokens=0), 400, "max_tokens", None),
    ("logprobs 6", _with(OPENAI, logprobs=6), 400, "logprobs", None),
    ("temperature 2.5", _with(OPENAI, temperature=2.5), 400, "temperature", None),
    ("top_p 0", _with(OPENAI, top_p=0), 400, "top_p", None),
    ("max_tokens 0", _with(OPENAI, max_tokens=0), 400, "max_tokens", None),
    ("stop list of 5", _with(OPENAI, stop=["a", "b", "c", "d", "e"]), 400, "stop", None),
    ("stop with empty string", _with(OPENAI, stop=["a", ""]), 400, "stop", None),
    ("seed -1", _with(OPENAI, seed=-1), 400, "seed", None),
    ("extra field", _with(OPENAI, max_new_tokens=4), 400, "max_new_tokens", None),
    ("stream wrong type", _with(OPENAI, stream="maybe"), 400, "stream", None),
    ("top_k extension -2", _with(OPENAI, top_k=-2), 400, "top_k", None),  # -1 is vLLM's "off"
    ("repetition_penalty 1e-300", _with(OPENAI, repetition_penalty=1e-300), 400, "repetition_penalty", None),
]


@pytest.mark.parametrize(("case", "payload", "status", "param", "code"), OPENAI_CASES, ids=[c[0] for c in OPENAI_CASES])
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_openai_client_errors(
    client: httpx.AsyncClient,
    fake: FakeEngine,
    case: str,
    payload: dict[str, Any],
    status: int,
    param: str,
    code: str | None,
    stream: bool,
) -> None:
    if stream and "stream" not in payload:
        payload = {**payload, "stream": True}
    r = await client.post("/v1/completions", json=payload)
    assert r.status_code == status, (case, r.text)
    err = assert_error_envelope(r)
    assert err["param"] == param
    assert err["code"] == code
    assert err["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    assert fake.submitted == []


async def test_openai_context_length(client: httpx.AsyncClient, served_model: ServedModel) -> None:
    prompt, n = prompt_of_tokens(served_model, 20)
    r = await client.post("/v1/completions", json=_with(OPENAI, prompt=prompt, max_tokens=MAX_CONTEXT - n + 1))
    assert r.status_code == 400
    err = assert_error_envelope(r)
    assert err["code"] == "context_length_exceeded"


@pytest.mark.parametrize(("field", "value"), [("prompt", 123), ("stop", 5), ("prompt", [["a"]])])
async def test_openai_union_field_param(client: httpx.AsyncClient, field: str, value: Any) -> None:
    r = await client.post("/v1/completions", json=_with(OPENAI, **{field: value}))
    assert r.status_code == 400
    assert assert_error_envelope(r)["param"] == field


async def test_openai_max_tokens_over_limit_names_max_tokens(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/completions", json=_with(OPENAI, max_tokens=49))
    assert r.status_code == 400
    assert assert_error_envelope(r)["param"] == "max_tokens"


async def test_openai_context_length_names_the_list_item(client: httpx.AsyncClient, served_model: ServedModel) -> None:
    prompt, n = prompt_of_tokens(served_model, 20)
    r = await client.post("/v1/completions", json=_with(OPENAI, prompt=["Hi", prompt], max_tokens=MAX_CONTEXT - n + 1))
    assert r.status_code == 400
    err = assert_error_envelope(r)
    assert err["code"] == "context_length_exceeded"
    assert err["param"] == "prompt[1]"


# --------------------------------------------------------------------------- routing 4xx
@pytest.mark.parametrize(("method", "path"), [("GET", "/nope"), ("POST", "/v1/embeddings"), ("GET", "/v1/models/x")])
async def test_unknown_route_404(client: httpx.AsyncClient, method: str, path: str) -> None:
    r = await client.request(method, path)
    assert r.status_code == 404
    assert assert_error_envelope(r)["type"] == "not_found_error"


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/generate"), ("DELETE", "/v1/completions"), ("POST", "/v1/models"), ("POST", "/health/live")],
)
async def test_wrong_method_405(client: httpx.AsyncClient, method: str, path: str) -> None:
    r = await client.request(method, path)
    assert r.status_code == 405
    assert_error_envelope(r)


async def test_405_keeps_allow_header(client: httpx.AsyncClient) -> None:
    r = await client.get("/generate")
    assert r.status_code == 405
    assert r.headers.get("allow") == "POST"


# --------------------------------------------------------------------------- 5xx
@pytest.mark.parametrize(
    ("route", "payload"),
    [
        ("/generate", NATIVE),
        ("/generate/stream", NATIVE),
        ("/v1/completions", OPENAI),
        ("/v1/completions", {**OPENAI, "stream": True}),
        ("/v1/completions", {**OPENAI, "stream": True, "n": 2}),
    ],
    ids=["generate", "generate-stream", "completions", "completions-stream", "completions-stream-n2"],
)
async def test_overloaded_is_503_with_retry_after(
    client: httpx.AsyncClient, fake: FakeEngine, route: str, payload: dict[str, Any]
) -> None:
    fake.submit_error = Overloaded("1024 generations already waiting")
    r = await client.post(route, json=payload)
    assert r.status_code == 503
    assert int(r.headers["retry-after"]) >= 1
    err = assert_error_envelope(r)
    assert err["type"] == "overloaded_error"
    assert err["code"] == "overloaded"
    await fake.drain()
    assert fake.live == 0


ERROR_MAP = [
    (UpstreamUnavailable("triton is down"), 503, "upstream_unavailable", "triton_unavailable", True),
    (StepRejected("bad row"), 502, "upstream_error", "triton_error", False),
    (UpstreamTimeout("deadline exceeded"), 504, "upstream_timeout", "triton_timeout", False),
    (Overloaded("waited too long"), 503, "overloaded_error", "overloaded", True),
    (RuntimeError("secret internals"), 500, "internal_error", None, False),
]


@pytest.mark.parametrize(
    ("error", "status", "type_", "code", "retry"), ERROR_MAP, ids=[type(e[0]).__name__ for e in ERROR_MAP]
)
@pytest.mark.parametrize(
    ("route", "payload"), [("/generate", NATIVE), ("/v1/completions", OPENAI)], ids=["native", "openai"]
)
async def test_upstream_failure_before_first_token(
    client: httpx.AsyncClient,
    fake: FakeEngine,
    route: str,
    payload: dict[str, Any],
    error: Exception,
    status: int,
    type_: str,
    code: str | None,
    retry: bool,
) -> None:
    fake.fail_after = 0
    fake.error = error
    r = await client.post(route, json=payload)
    assert r.status_code == status
    err = assert_error_envelope(r)
    assert (err["type"], err["code"]) == (type_, code)
    assert "secret" not in err["message"]  # unexpected errors never leak their text
    assert ("retry-after" in r.headers) is retry
    assert fake.live == 0


@pytest.mark.parametrize(
    ("route", "payload"),
    [("/generate/stream", NATIVE), ("/v1/completions", {**OPENAI, "stream": True})],
    ids=["native", "openai"],
)
async def test_stream_failure_before_first_token_is_a_plain_json_error(
    client: httpx.AsyncClient, fake: FakeEngine, route: str, payload: dict[str, Any]
) -> None:
    """Nothing was sent yet, so the failure is an ordinary 5xx response (frontend/api/streaming.py)."""
    fake.fail_after = 0
    r = await client.post(route, json=payload)
    assert r.status_code == 503
    assert assert_error_envelope(r)["code"] == "triton_unavailable"
    await fake.drain()
    assert fake.live == 0


async def test_native_stream_failure_mid_way_is_an_error_event(client: httpx.AsyncClient, fake: FakeEngine) -> None:
    fake.fail_after = 2
    r = await client.post("/generate/stream", json={**NATIVE, "max_new_tokens": 6})
    assert r.status_code == 200
    events = parse_sse(r.text)
    assert [e.event for e in events] == ["token", "token", "error"]
    err = events[-1].json()
    assert set(err) == {"error"} and set(err["error"]) == {"message", "type", "param", "code", "request_id"}
    assert err["error"]["request_id"] == r.headers["x-request-id"]
    assert err["error"]["code"] == "triton_unavailable"
    assert fake.live == 0


async def test_openai_stream_failure_mid_way_is_an_error_chunk(client: httpx.AsyncClient, fake: FakeEngine) -> None:
    fake.fail_after = 2
    r = await client.post("/v1/completions", json={**OPENAI, "max_tokens": 6, "stream": True})
    assert r.status_code == 200
    events = parse_sse(r.text)
    assert all(e.event is None for e in events)
    assert [e.data for e in events][-1] == "[DONE]"  # the error chunk, then [DONE] (clients stop cleanly)
    assert [e.data for e in events].count("[DONE]") == 1
    chunks = [e.json() for e in events[:-1]]
    assert all("choices" in c for c in chunks[:-1]) and len(chunks) == 3
    assert set(chunks[-1]) == {"error"}
    assert set(chunks[-1]["error"]) == {"message", "type", "param", "code", "request_id"}
    assert chunks[-1]["error"]["type"] == "upstream_unavailable"
    await fake.drain()
    assert fake.live == 0


async def test_request_timeout_is_504(client: httpx.AsyncClient, fake: FakeEngine, app: Any) -> None:
    app.state.service.request_timeout_s = 0.05
    fake.delay_s = 0.02
    r = await client.post("/generate", json={**NATIVE, "max_new_tokens": 20})
    assert r.status_code == 504
    assert assert_error_envelope(r)["code"] == "triton_timeout"
    assert fake.live == 0


async def test_submit_upstream_error_is_503(lenient_client: httpx.AsyncClient, fake: FakeEngine) -> None:
    fake.submit_error = UpstreamUnavailable("the engine is not started")
    r = await lenient_client.post("/generate", json=NATIVE)
    assert r.status_code == 503


async def test_openai_stream_submit_upstream_error_does_not_hang(
    lenient_client: httpx.AsyncClient, fake: FakeEngine
) -> None:
    import asyncio
    import gc

    fake.submit_error = UpstreamUnavailable("the engine is not started")
    loop = asyncio.get_running_loop()
    dropped: list[BaseException | None] = []  # the bug's trace: the choice task died unobserved
    loop.set_exception_handler(lambda _loop, ctx: dropped.append(ctx.get("exception")))
    hung = False
    try:
        r = await asyncio.wait_for(lenient_client.post("/v1/completions", json={**OPENAI, "stream": True}), timeout=0.5)
    except TimeoutError:
        hung = True
    for _ in range(3):
        await asyncio.sleep(0)
    gc.collect()
    loop.set_exception_handler(None)
    if hung:
        assert any(isinstance(e, UpstreamUnavailable) for e in dropped), dropped
        raise TimeoutError("no response: the failed choice task never reported to the stream")
    assert r.status_code == 503
    assert_error_envelope(r)


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("max_tokens", [0, 1])
async def test_echo_with_a_prompt_over_the_context(
    client: httpx.AsyncClient, fake: FakeEngine, served_model: ServedModel, stream: bool, max_tokens: int
) -> None:
    """lm-eval's loglikelihood request (echo, logprobs, max_tokens 0) with a prompt longer than the
    context: the one error shape, nothing submitted."""
    prompt, n = prompt_of_tokens(served_model, MAX_CONTEXT + 1)
    payload = {**OPENAI, "prompt": prompt, "echo": True, "logprobs": 1, "max_tokens": max_tokens, "stream": stream}
    r = await client.post("/v1/completions", json=payload)
    assert r.status_code == 400, r.text
    err = assert_error_envelope(r)
    assert (err["param"], err["code"]) == ("prompt", "context_length_exceeded")
    assert f"{n + max_tokens} tokens" in err["message"]
    assert fake.submitted == []


@pytest.mark.parametrize("temperature", [1e-300, 1e-40, 9e-6])
async def test_a_temperature_too_small_for_float32_is_greedy(
    client: httpx.AsyncClient, fake: FakeEngine, temperature: float
) -> None:
    """The server divides fp32 logits by the temperature: 1e-300 is 0 in fp32, 1e-40 makes them
    infinite. Below 1e-5 a temperature is greedy (vLLM's rule), on every route."""
    r = await client.post("/generate", json=_with(NATIVE, temperature=temperature))
    assert r.status_code == 200, r.text
    r = await client.post("/v1/completions", json=_with(OPENAI, prompt="Other words", temperature=temperature))
    assert r.status_code == 200, r.text  # (another prompt: greedy results are cached)
    assert [h.params.temperature for h in fake.submitted] == [0.0, 0.0]
