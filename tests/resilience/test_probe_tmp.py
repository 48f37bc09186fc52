import json
from tests.resilience.test_abuse import *  # noqa
def test_probe(gateway):
    r = httpx.post(f"{gateway.url}/v1/completions", json={"model": TINY, "prompt": "Once upon a time", "max_tokens": 240, "n": 8, "stream": True, "logprobs": 5}, timeout=30)
    print("STATUS", r.status_code, r.text[:300], len(r.content))
