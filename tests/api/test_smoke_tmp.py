import asyncio
import pytest
from frontend.engine.triton_client import UpstreamUnavailable
pytestmark = [pytest.mark.api, pytest.mark.asyncio]

async def test_smoke(client, fake, oai):
    r = await client.post("/generate", content=b"{bad json", headers={"content-type": "application/json"})
    print(r.status_code, r.json())
    r = await client.post("/v1/completions", json={"model": "tiny", "prompt": ["Hello", "World"], "n": 2, "max_tokens": 3, "logprobs": 2, "temperature": 0})
    print(r.status_code, r.json())
    r = await client.post("/v1/completions", json={"model": "tiny", "prompt": "Hello", "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}, "echo": True})
    print(r.status_code, r.text)
    r = await client.post("/v1/completions", json={"model": "tiny", "prompt": "Hello", "max_tokens": 3, "stream": True, "logprobs": 1})
    print(r.status_code, r.text)
    fake.fail_after = 2
    r = await client.post("/v1/completions", json={"model": "tiny", "prompt": "Hello", "max_tokens": 5, "stream": True})
    print(r.status_code, r.text)
    r = await client.post("/generate/stream", json={"prompt": "Hello", "max_new_tokens": 5})
    print(r.status_code, r.text)
    fake.fail_after = 0
    r = await client.post("/generate/stream", json={"prompt": "Hello", "max_new_tokens": 5})
    print(r.status_code, r.headers, r.text)
    r = await client.post("/generate", json={"prompt": "Hello", "max_new_tokens": 5})
    print(r.status_code, r.headers, r.text)
    fake.fail_after = None
    fake.submit_error = UpstreamUnavailable("not started")
    r = await client.post("/generate", json={"prompt": "Hello", "max_new_tokens": 5})
    print(r.status_code, r.headers, r.text)
    try:
        r = await asyncio.wait_for(client.post("/v1/completions", json={"model": "tiny", "prompt": "Hello", "max_tokens": 5, "stream": True}), 1)
        print(r.status_code, r.headers, r.text)
    except TimeoutError:
        print("HANG")
    print(fake.live)
