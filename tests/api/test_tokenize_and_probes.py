"""The small endpoints clients probe: POST /tokenize and /detokenize (vLLM's shapes), GET /health
(vLLM's), GET /version, GET /v1/models/{id}; and the error responses /docs declares."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest

from frontend.engine.model import ServedModel
from frontend.settings import Settings
from tests.api.conftest import MAX_CONTEXT, MODEL, VOCAB, assert_error_envelope
from tests.api.fake_engine import FakeEngine

pytestmark = [pytest.mark.api, pytest.mark.asyncio]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "chat_template.jinja"


async def test_tokenize_prompt(client: httpx.AsyncClient, served_model: ServedModel) -> None:
    r = await client.post("/tokenize", json={"model": MODEL, "prompt": "The cat runs こんにちは"})
    assert r.status_code == 200
    ids = served_model.tokenizer("The cat runs こんにちは")["input_ids"]
    assert r.json() == {"count": len(ids), "max_model_len": MAX_CONTEXT, "tokens": ids, "token_strs": None}
    r = await client.post("/tokenize", json={"prompt": "The cat", "return_token_strs": True})
    body = r.json()
    assert body["token_strs"] == served_model.tokenizer.convert_ids_to_tokens(body["tokens"])
    r = await client.post("/tokenize", json={"prompt": ""})
    assert r.json()["count"] == 0 and r.json()["tokens"] == []


async def test_detokenize_round_trip(client: httpx.AsyncClient, served_model: ServedModel) -> None:
    text = "A small dog jumps 🐕"
    tokens = (await client.post("/tokenize", json={"prompt": text})).json()["tokens"]
    r = await client.post("/detokenize", json={"model": MODEL, "tokens": tokens})
    assert r.status_code == 200 and r.json() == {"prompt": text}
    r = await client.post("/detokenize", json={"tokens": [VOCAB - 1]})
    assert r.json() == {"prompt": "<|endoftext|>"}


async def test_tokenize_chat_needs_a_template(client: httpx.AsyncClient) -> None:
    r = await client.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400
    err = assert_error_envelope(r)
    assert err["code"] == "chat_template_missing" and "GATEWAY_CHAT_TEMPLATE" in err["message"]


class TestWithTemplate:
    @pytest.fixture
    def settings(self) -> Settings:
        return Settings(environment="test", model=MODEL, chat_template=EXAMPLE)

    async def test_tokenize_chat(self, client: httpx.AsyncClient, served_model: ServedModel) -> None:
        messages = [{"role": "user", "content": "hi"}]
        r = await client.post("/tokenize", json={"messages": messages})
        assert r.status_code == 200
        expected = served_model.tokenizer("User: hi\n\nAssistant:", add_special_tokens=False)["input_ids"]
        assert r.json()["tokens"] == expected and r.json()["count"] == len(expected)
        r = await client.post("/tokenize", json={"messages": messages, "add_generation_prompt": False})
        assert r.json()["tokens"] == served_model.tokenizer("User: hi\n", add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/tokenize", {"model": "other", "prompt": "hi"}, 404, "model"),
        ("/tokenize", {"prompt": "hi", "extra": 1}, 400, "extra"),
        ("/tokenize", {"prompt": 5}, 400, "prompt"),
        ("/tokenize", {}, 400, "prompt"),
        ("/detokenize", {"tokens": [VOCAB]}, 400, "tokens"),
        ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
        ("/detokenize", {"tokens": "abc"}, 400, "tokens"),
        ("/detokenize", {"model": "other", "tokens": [1]}, 404, "model"),
    ],
)
async def test_tokenization_errors(
    client: httpx.AsyncClient, path: str, body: dict[str, object], status: int, param: str
) -> None:
    r = await client.post(path, json=body)
    assert r.status_code == status, r.text
    assert assert_error_envelope(r)["param"] == param


async def test_health_follows_readiness(client: httpx.AsyncClient, fake: FakeEngine) -> None:
    r = await client.get("/health")
    assert r.status_code == 200 and r.content == b""
    fake.is_ready = False
    r = await client.get("/health")
    assert r.status_code == 503
    assert assert_error_envelope(r)["code"] == "not_ready"
    assert (await client.get("/health/ready")).status_code == 503


async def test_version(client: httpx.AsyncClient) -> None:
    r = await client.get("/version")
    assert r.status_code == 200 and r.json() == {"version": client._transport.app.version}  # type: ignore[attr-defined]


async def test_model_by_id(oai: openai.AsyncOpenAI, served_model: ServedModel, client: httpx.AsyncClient) -> None:
    m = await oai.models.retrieve(MODEL)
    assert (m.id, m.object, m.created, m.owned_by) == (MODEL, "model", served_model.created, "gpt2-serving")
    with pytest.raises(openai.NotFoundError) as info:
        await oai.models.retrieve("gpt-4o")
    assert info.value.code == "model_not_found" and "gpt-4o" in info.value.message
    r = await client.get("/v1/models/org/name")  # ids with a slash reach the route, not a 404 of routing
    err = assert_error_envelope(r)
    assert r.status_code == 404 and err["code"] == "model_not_found"


async def test_openapi_declares_the_error_envelope(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()
    ref = {"$ref": "#/components/schemas/ErrorResponse"}
    chat = schema["paths"]["/v1/chat/completions"]["post"]["responses"]
    for status in ("400", "404", "429", "503", "504"):
        assert chat[status]["content"]["application/json"]["schema"] == ref, status
    assert "422" not in chat
    for path, method in (("/tokenize", "post"), ("/v1/models/{model_id}", "get"), ("/generate", "post")):
        responses = schema["paths"][path][method]["responses"]
        assert responses["400"]["content"]["application/json"]["schema"] == ref
        assert "422" not in responses
    assert schema["paths"]["/health"]["get"]["responses"]["503"]["content"]["application/json"]["schema"] == ref
    assert set(schema["components"]["schemas"]["ErrorResponse"]["properties"]) == {"error"}
