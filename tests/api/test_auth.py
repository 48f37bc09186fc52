"""API keys (frontend.security): the 401 that tells nothing, scopes, brute force, the CLI, production."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pydantic
import pytest
import pytest_asyncio
from fastapi import FastAPI

from frontend.app import create_app
from frontend.security import cli
from frontend.security.keys import SQLiteKeyStore, hash_key, make_record, parse_key, verify
from frontend.settings import Settings
from tests.api.conftest import MODEL, assert_error_envelope
from tests.api.fake_engine import FakeEngine

pytestmark = pytest.mark.api

GEN = {"prompt": "Once upon a time", "max_new_tokens": 3, "temperature": 0}


@pytest.fixture
def keys_path(tmp_path: Path) -> Path:
    return tmp_path / "keys.sqlite3"


@pytest.fixture
def settings(keys_path: Path) -> Settings:
    return Settings(
        environment="test",
        model=MODEL,
        max_batch_requests=4,
        max_n=3,
        max_new_tokens_limit=48,
        request_timeout_s=5.0,
        keys_path=keys_path,
        auth_failures_per_ip=1000,
    )


async def add_key(path: Path, **kw: Any) -> tuple[str, str]:
    """(id, key) of a new key in the SQLite store at `path`."""
    expired = kw.pop("expired", False)
    record, key = make_record(kw.pop("name", "test"), **kw)
    if expired:
        record = replace(record, expires_at=time.time() - 1)
    store = SQLiteKeyStore(path)
    await store.add(record)
    await store.close()
    return record.id, key


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest_asyncio.fixture
async def key(keys_path: Path) -> str:
    return (await add_key(keys_path, scopes=["generate"]))[1]


# ------------------------------------------------------------------------------ the key itself
def test_key_format_hash_and_constant_time_verify() -> None:
    record, key = make_record("x", scopes=["generate", "admin"])
    assert key.startswith("gsk_") and len(key) == 60
    assert parse_key(key) == record.id
    assert record.key_hash == hashlib.sha256(key.encode()).hexdigest() == hash_key(key)
    assert key not in repr(record) and record.key_hash not in repr(record)
    assert verify(record, key)
    assert not verify(record, key[:-1] + ("A" if key[-1] != "A" else "B"))
    assert not verify(None, key)
    for bad in ["", "gsk_", "sk-abc", key + "x", key.upper(), "gsk_" + "g" * 12 + key[16:], key.replace("_", "-", 1)]:
        assert parse_key(bad) is None, bad
    with pytest.raises(ValueError):
        make_record("x", scopes=["root"])
    assert make_record("x")[1] != make_record("x")[1]


@pytest.mark.asyncio
async def test_the_store_holds_only_the_hash(keys_path: Path) -> None:
    _, key = await add_key(keys_path)
    raw = keys_path.read_bytes() + b"".join(p.read_bytes() for p in keys_path.parent.glob("keys.sqlite3-*"))
    assert key.encode() not in raw
    assert key.split("_", 2)[2].encode() not in raw  # not even the secret part
    assert hash_key(key).encode() in raw
    assert keys_path.stat().st_mode & 0o077 == 0


# ------------------------------------------------------------------------------ one 401 for all
@pytest.mark.asyncio
async def test_missing_malformed_unknown_revoked_expired_all_get_the_same_401(
    client: httpx.AsyncClient, keys_path: Path
) -> None:
    revoked_id, revoked = await add_key(keys_path)
    store = SQLiteKeyStore(keys_path)
    assert await store.revoke(revoked_id)
    await store.close()
    _, expired = await add_key(keys_path, expired=True)
    _, good = await add_key(keys_path)
    unknown = make_record("never stored")[1]
    cases: dict[str, dict[str, str]] = {
        "missing": {},
        "empty bearer": {"Authorization": "Bearer "},
        "basic scheme": {"Authorization": f"Basic {good}"},
        "no scheme": {"Authorization": good},
        "malformed": bearer("gsk_nothex_short"),
        "huge": bearer("gsk_" + "a" * 10_000),
        "wrong secret": bearer(good[:-2] + ("xx" if not good.endswith("xx") else "yy")),
        "unknown": bearer(unknown),
        "revoked": bearer(revoked),
        "expired": bearer(expired),
    }
    bodies = []
    for name, headers in cases.items():
        r = await client.post("/generate", json=GEN, headers=headers)
        assert r.status_code == 401, (name, r.text)
        assert r.headers["www-authenticate"] == "Bearer", name
        err = assert_error_envelope(r)
        assert err["type"] == "authentication_error" and err["code"] == "invalid_api_key"
        bodies.append(r.content.replace(r.headers["x-request-id"].encode(), b""))  # ids differ by design
    assert len(set(bodies)) == 1, "every failed authentication must look the same"
    r = await client.post("/generate", json=GEN, headers=bearer(good))
    assert r.status_code == 200, r.text


@pytest.mark.asyncio
async def test_a_valid_key_opens_every_generation_route(client: httpx.AsyncClient, key: str) -> None:
    h = bearer(key)
    assert (await client.get("/v1/models", headers=h)).status_code == 200
    assert (await client.get("/v1/models")).status_code == 401
    for path, body in [
        ("/generate", GEN),
        ("/generate/stream", GEN),
        ("/generate/batch", {"requests": [GEN, GEN]}),
        ("/v1/completions", {"model": MODEL, "prompt": "Hi there", "max_tokens": 3}),
        ("/v1/completions", {"model": MODEL, "prompt": "Hi there", "max_tokens": 3, "stream": True}),
    ]:
        assert (await client.post(path, json=body)).status_code == 401, path
        r = await client.post(path, json=body, headers=h)
        assert r.status_code == 200, (path, r.text)
    # lowercase scheme is fine (RFC 7235: the scheme is case-insensitive)
    assert (await client.post("/generate", json=GEN, headers={"Authorization": f"bearer {key}"})).status_code == 200


@pytest.mark.asyncio
async def test_the_openai_sdk_authenticates_with_its_api_key(app: FastAPI, key: str) -> None:
    import openai

    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
    async with openai.AsyncOpenAI(base_url="http://test/v1", api_key=key, http_client=http, max_retries=0) as sdk:  # type: ignore[arg-type]
        out = await sdk.completions.create(model=MODEL, prompt="Hello", max_tokens=2)
        assert out.usage is not None and out.usage.completion_tokens == 2
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
    async with openai.AsyncOpenAI(
        base_url="http://test/v1", api_key="sk-wrong", http_client=http, max_retries=0
    ) as sdk:  # type: ignore[arg-type]
        with pytest.raises(openai.AuthenticationError):
            await sdk.completions.create(model=MODEL, prompt="Hello", max_tokens=2)


@pytest.mark.asyncio
async def test_a_key_in_the_query_string_is_refused(client: httpx.AsyncClient, key: str) -> None:
    for params in [{"api_key": key}, {"key": key}, {"access_token": key}, {"x": key}]:
        r = await client.post("/generate", json=GEN, params=params)
        assert r.status_code == 401, params
        # even together with a valid header: the key has leaked into a URL, refuse it loudly
        r = await client.post("/generate", json=GEN, params=params, headers=bearer(key))
        assert r.status_code == 401, params


@pytest.mark.asyncio
async def test_scopes(client: httpx.AsyncClient, keys_path: Path) -> None:
    _, admin_only = await add_key(keys_path, scopes=["admin"])
    r = await client.post("/generate", json=GEN, headers=bearer(admin_only))
    assert r.status_code == 403
    err = assert_error_envelope(r)
    assert err["type"] == "permission_error" and err["code"] == "insufficient_scope"


@pytest.mark.asyncio
async def test_keys_are_never_logged(client: httpx.AsyncClient, key: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    await client.post("/generate", json=GEN, headers=bearer(key))
    await client.post("/generate", json=GEN, headers=bearer(key[:-1] + "!"))
    await client.post("/generate", json=GEN, params={"api_key": key})
    gateway_logs = "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith(("httpx", "httpcore")))
    assert key[16:] not in gateway_logs and key[16:-1] not in gateway_logs


# ------------------------------------------------------------------------------ brute force
@asynccontextmanager
async def brute_force_app(settings: Settings, fake: FakeEngine) -> AsyncIterator[FastAPI]:
    app = create_app(settings.model_copy(update={"auth_failures_per_ip": 5}), engine_factory=lambda _s, _m: fake)
    async with app.router.lifespan_context(app):
        yield app


@pytest.mark.asyncio
async def test_failed_authentications_per_ip_end_in_429(settings: Settings, fake: FakeEngine, key: str) -> None:
    async with brute_force_app(settings, fake) as app:
        attacker = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app, client=("203.0.113.9", 4000)), base_url="http://t"
        )
        other = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app, client=("198.51.100.7", 4000)), base_url="http://t"
        )
        async with attacker, other:
            statuses = [
                (await attacker.post("/generate", json=GEN, headers=bearer(make_record("g")[1]))).status_code
                for _ in range(8)
            ]
            assert statuses == [401] * 5 + [429] * 3, statuses
            r = await attacker.post("/generate", json=GEN, headers=bearer(key))
            assert r.status_code == 429, "a blocked address stays blocked for the window, valid key or not"
            assert int(r.headers["retry-after"]) >= 1
            assert r.headers["x-ratelimit-limit-requests"] == "5"
            assert assert_error_envelope(r)["type"] == "rate_limit_error"
            # other addresses are not affected
            assert (await other.post("/generate", json=GEN, headers=bearer(key))).status_code == 200


@pytest.mark.asyncio
async def test_brute_force_in_parallel_is_still_bounded(settings: Settings, fake: FakeEngine) -> None:
    async with brute_force_app(settings, fake) as app:
        transport = httpx.ASGITransport(app=app, client=("203.0.113.10", 4000))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            rs = await asyncio.gather(
                *(c.post("/generate", json=GEN, headers=bearer(make_record("g")[1])) for _ in range(50))
            )
        codes = [r.status_code for r in rs]
        assert codes.count(401) <= 5 + 1 and codes.count(429) >= 44, codes  # test-then-hit: at most one extra


# ------------------------------------------------------------------------------ operations routes
@pytest.mark.asyncio
async def test_operations_routes_are_open_by_default(client: httpx.AsyncClient) -> None:
    for path in ["/health/live", "/metrics", "/openapi.json", "/docs"]:
        assert (await client.get(path)).status_code == 200, path


@pytest.mark.asyncio
@pytest.mark.parametrize("protect", ["health,metrics,docs"])
async def test_operations_routes_can_require_an_admin_key(
    protect: str, settings: Settings, fake: FakeEngine, keys_path: Path
) -> None:
    _, admin = await add_key(keys_path, scopes=["admin"])
    _, user = await add_key(keys_path, scopes=["generate"])
    app = create_app(settings.model_copy(update={"auth_protect": protect}), engine_factory=lambda _s, _m: fake)
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        for path in ["/health/live", "/metrics", "/openapi.json", "/docs", "/redoc"]:
            assert (await c.get(path)).status_code == 401, path
            assert (await c.get(path, headers=bearer(user))).status_code == 403, path
            r = await c.get(path, headers=bearer(admin))
            assert r.status_code == 200, (path, r.text)
        assert "/generate" in (await c.get("/openapi.json", headers=bearer(admin))).json()["paths"]
        # Protected pages load their assets from the gateway too, never from a CDN.
        page = (await c.get("/docs", headers=bearer(admin))).text
        assert "/docs/static/swagger-ui-bundle.js" in page and "cdn" not in page.lower()
        assert (await c.get("/docs/static/swagger-ui-bundle.js")).status_code == 200


# ------------------------------------------------------------------------------ environments
def test_production_refuses_to_start_without_a_key_store(tmp_path: Path) -> None:
    with pytest.raises(pydantic.ValidationError, match="requires API keys"):
        Settings(environment="production")
    assert Settings(environment="production", keys_path=tmp_path / "k.db").keys_path is not None
    assert Settings(environment="production", keys_url="redis://127.0.0.1:1/0").keys_url


@pytest.mark.asyncio
async def test_development_without_keys_warns_loudly(fake: FakeEngine, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    app = create_app(Settings(environment="development", model=MODEL), engine_factory=lambda _s, _m: fake)
    assert "AUTHENTICATION IS OFF" in caplog.text
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        assert (await c.post("/generate", json=GEN)).status_code == 200


# ------------------------------------------------------------------------------ the CLI
@pytest.mark.asyncio
async def test_cli_create_list_revoke(
    client: httpx.AsyncClient, keys_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def run(*argv: str) -> tuple[int, str]:
        code = cli.main(["--path", str(keys_path), *argv])
        return code, capsys.readouterr().out

    args = ["create", "--name", "ci bot", "--scopes", "generate,admin", "--rpm", "7"]
    code, out = await asyncio.to_thread(run, *args, "--tokens-per-day", "900", "--expires-days", "30")
    assert code == 0
    key = next(line.split()[1] for line in out.splitlines() if line.startswith("key "))
    key_id = parse_key(key)
    assert key_id and f"id       {key_id}" in out
    assert (await client.post("/generate", json=GEN, headers=bearer(key))).status_code == 200

    code, out = await asyncio.to_thread(run, "list")
    assert code == 0 and key_id in out and "ci bot" in out and "active" in out and " 7 " in out
    assert key not in out and key[16:] not in out
    code, out = await asyncio.to_thread(run, "list", "--json")
    assert key[16:] not in out and '"tokens_per_day": 900' in out

    code, out = await asyncio.to_thread(run, "revoke", key_id)
    assert code == 0 and f"revoked {key_id}" in out
    assert (await client.post("/generate", json=GEN, headers=bearer(key))).status_code == 401  # at once
    assert (await asyncio.to_thread(run, "revoke", "000000000000"))[0] == 1
    assert (await asyncio.to_thread(run, "create", "--name", "x", "--scopes", "root"))[0] == 2


def test_cli_without_a_store_says_how_to_configure_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GATEWAY_KEYS_PATH", raising=False)
    monkeypatch.delenv("GATEWAY_KEYS_URL", raising=False)
    monkeypatch.setenv("GATEWAY_ENVIRONMENT", "development")
    with pytest.raises(SystemExit, match="GATEWAY_KEYS_PATH"):
        cli.main(["list"])
