"""Prometheus metrics and the health probes."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.api.conftest import MODEL, assert_error_envelope
from tests.api.fake_engine import FakeEngine

pytestmark = [pytest.mark.api, pytest.mark.asyncio]


async def _samples(client: httpx.AsyncClient) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    r = await client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def _value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def test_requests_counted_by_route_template(client: httpx.AsyncClient) -> None:
    await client.post("/generate", json={"prompt": "Hi", "max_new_tokens": 2})
    await client.post("/generate?debug=1", json={"prompt": "Hi", "max_new_tokens": 2})
    await client.post("/generate", json={"prompt": ""})
    await client.post("/generate/stream", json={"prompt": "Hi", "max_new_tokens": 2})
    await client.get("/v1/models")
    await client.get("/no/such/route/12345")
    await client.get("/generate")
    s = await _samples(client)
    assert _value(s, "gateway_requests_total", route="/generate", method="POST", status="200") == 2
    assert _value(s, "gateway_requests_total", route="/generate", method="POST", status="400") == 1
    assert _value(s, "gateway_requests_total", route="/generate/stream", method="POST", status="200") == 1
    assert _value(s, "gateway_requests_total", route="/v1/models", method="GET", status="200") == 1
    assert _value(s, "gateway_requests_total", route="/generate", method="GET", status="405") == 1
    routes = {dict(labels)["route"] for (name, labels) in s if name == "gateway_requests_total"}
    assert not any("12345" in r or "?" in r for r in routes)  # never a raw path
    assert "unmatched" in routes
    assert _value(s, "gateway_request_duration_seconds_count", route="/generate") == 4


async def test_time_to_first_token_after_generation(client: httpx.AsyncClient) -> None:
    before = await _samples(client)
    assert _value(before, "gateway_time_to_first_token_seconds_count") == 0
    payload = {"prompt": "Hi", "max_new_tokens": 3, "temperature": 0}
    await client.post("/generate", json=payload)
    await client.post("/generate/stream", json={**payload, "prompt": "Hey"})
    s = await _samples(client)
    assert _value(s, "gateway_time_to_first_token_seconds_count") == 2
    assert _value(s, "gateway_time_to_first_token_seconds_bucket", le="+Inf") == 2
    assert _value(s, "gateway_inter_token_latency_seconds_count") == 4  # 2 gaps per 3-token generation
    assert _value(s, "gateway_generated_tokens_total") == 6
    assert _value(s, "gateway_generations_total", reason="length") == 2
    assert _value(s, "gateway_cache_lookups_total", result="miss") == 2
    await client.post("/generate", json=payload)  # a cache replay generates nothing
    s = await _samples(client)
    assert _value(s, "gateway_time_to_first_token_seconds_count") == 2
    assert _value(s, "gateway_generated_tokens_total") == 6
    assert _value(s, "gateway_cache_lookups_total", result="hit") == 1


async def test_health_live(client: httpx.AsyncClient, fake: FakeEngine) -> None:
    fake.is_ready = False
    r = await client.get("/health/live")
    assert r.status_code == 200
    assert r.json() == {"status": "ok"}


async def test_health_ready_follows_the_engine(client: httpx.AsyncClient, fake: FakeEngine) -> None:
    fake.is_ready = False
    r = await client.get("/health/ready")
    assert r.status_code == 503
    err = assert_error_envelope(r)
    assert err["code"] == "not_ready"
    fake.is_ready = True
    r = await client.get("/health/ready")
    assert r.status_code == 200
    assert r.json() == {"status": "ready", "model": MODEL, "version": "1", "running": 0, "waiting": 0}


@pytest.mark.parametrize("is_ready", [True, False])
async def test_every_probe_answers_head_as_its_get(client: httpx.AsyncClient, fake: FakeEngine, is_ready: bool) -> None:
    """Load balancers and uptime checkers probe with HEAD: the GET's status, never a 405."""
    fake.is_ready = is_ready
    for path in ("/health", "/health/live", "/health/ready", "/version"):
        got, head = await client.get(path), await client.head(path)
        assert head.status_code == got.status_code, path
        assert head.headers.get("content-type") == got.headers.get("content-type"), path
    assert (await client.head("/health")).status_code == (200 if is_ready else 503)
    paths = (await client.get("/openapi.json")).json()["paths"]
    assert all("head" not in paths[p] for p in ("/health", "/health/live", "/health/ready", "/version"))
