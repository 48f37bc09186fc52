"""The gateway's front door: who is calling (API keys) and how much they may do (limits).

`Security.admit(request, scope)` runs as a FastAPI dependency (`frontend.api.deps.AuthDep`):

1. a key in the query string (`?api_key=`, `?key=`, a `gsk_` value...) is refused with 401;
2. auth off (no key store; development only): a per-IP request limit, then anonymous;
3. auth on: an IP that failed authentication `auth_failures_per_ip` times in the last minute gets
   429 whatever it sends; otherwise `Authorization: Bearer <key>` is parsed, looked up and compared
   in constant time. Missing, malformed, unknown, revoked and expired keys all get one 401 body
   (and count as a failure of that IP); a valid key without the route's scope gets 403;
4. the key's requests-per-minute window takes one request (429 with x-ratelimit-*-requests);
5. the key's token account is published for the generation service (frontend.security.accounting).

Every response to an admitted request carries OpenAI's `x-ratelimit-*` headers of the windows it
was counted in (requests) and of its token reservation (tokens), not only 429s: `admit` and the
reservation record them in the request's state and `RateLimitHeadersMiddleware` adds them to the
response head.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from frontend import docs_pages, errors
from frontend.observability.requests import note_api_key
from frontend.security import accounting
from frontend.security.clientip import client_ip, parse_networks
from frontend.security.core_storage import EngineCoreStorage
from frontend.security.keys import KeyRecord, KeyStore, build_key_store, parse_key, verify
from frontend.security.ratelimit import Decision, RateLimiter, build_storage
from frontend.settings import Settings

log = logging.getLogger(__name__)

OPERATIONS = frozenset({"health", "metrics", "docs"})
_QUERY_KEY_NAMES = frozenset({"api_key", "apikey", "api-key", "key", "access_token", "token", "authorization"})
RATELIMIT_STATE = "ratelimit_headers"  # request.state attribute: headers for the response
UNAUTHORIZED_MESSAGE = (
    "Incorrect or missing API key. Send it in the Authorization header: `Authorization: Bearer <key>`."
)


@dataclass(frozen=True)
class Principal:
    """Who is calling: a key (id and name, never the key itself) or anonymous (auth off)."""

    key_id: str | None
    name: str = "anonymous"
    scopes: frozenset[str] = field(default_factory=frozenset)


ANONYMOUS = Principal(None)


def _unauthorized() -> errors.Unauthorized:
    return errors.Unauthorized(UNAUTHORIZED_MESSAGE, headers={"WWW-Authenticate": "Bearer"})


def parse_protected(spec: str) -> frozenset[str]:
    items = frozenset(s.strip().lower() for s in spec.split(",") if s.strip())
    unknown = items - OPERATIONS
    if unknown:
        raise ValueError(f"GATEWAY_AUTH_PROTECT: unknown {sorted(unknown)}; choose from {sorted(OPERATIONS)}")
    return items


class _Account:
    """A key's token quota for one request (accounting.TokenAccount)."""

    def __init__(self, limiter: RateLimiter, key_id: str, limit: int, headers: dict[str, str]) -> None:
        self.limiter = limiter
        self.key_id = key_id
        self.limit = limit
        self.headers = headers  # the request's x-ratelimit-* headers (the last reservation's tokens)

    def metered(self, items: AsyncIterator[Any], *, prompt_tokens: int, max_new_tokens: int) -> AsyncIterator[Any]:
        return accounting.metered(self, items, prompt_tokens=prompt_tokens, max_new_tokens=max_new_tokens)

    async def reserve(self, amount: int) -> _Reservation:
        decision, counter = await self.limiter.reserve_tokens(self.limit, self.key_id, amount)
        _record(self.headers, decision, "tokens")
        if not decision.allowed:
            raise decision.refusal(
                "tokens",
                f"This request needs {amount} tokens (prompt + max tokens) and this key has "
                f"{decision.remaining} of its {decision.limit} tokens per day left.",
            )
        return _Reservation(self.limiter, counter, amount)


class _Reservation:
    def __init__(self, limiter: RateLimiter, counter: str | None, amount: int) -> None:
        self.limiter = limiter
        self.counter = counter
        self.amount = amount

    async def settle(self, used: int) -> None:
        if self.counter is not None:
            await self.limiter.adjust_tokens(self.counter, used - self.amount)


def _record(headers: dict[str, str], decision: Decision, kind: str) -> None:
    """Keep a successful decision's headers for the response (unknown under fail-open: none)."""
    if decision.allowed and decision.limit > 0 and decision.remaining >= 0:
        headers.update(decision.headers(kind))


def _response_headers(request: Request) -> dict[str, str]:
    headers: dict[str, str] | None = getattr(request.state, RATELIMIT_STATE, None)
    if headers is None:
        headers = {}
        setattr(request.state, RATELIMIT_STATE, headers)
    return headers


class RateLimitHeadersMiddleware:
    """Adds the request's `x-ratelimit-*` headers (recorded by `Security.admit`) to its response,
    whatever the route returns (JSON, a stream); a 429 already carries its own, which win."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                extra: dict[str, str] | None = scope.get("state", {}).get(RATELIMIT_STATE)
                if extra:
                    present = {name.lower() for name, _ in message.get("headers", [])}
                    added = [(k.encode(), v.encode()) for k, v in extra.items() if k.encode() not in present]
                    if added:
                        message = {**message, "headers": [*message.get("headers", []), *added]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class Security:
    def __init__(
        self, settings: Settings, *, store: KeyStore | None = None, limiter: RateLimiter | None = None
    ) -> None:
        self.settings = settings
        self.timeout_s = settings.security_timeout_s
        self.store = store
        self.limiter = limiter or RateLimiter(
            build_storage(
                settings.ratelimit_url, settings.security_timeout_s, engine_core=bool(settings.engine_core_url)
            ),
            timeout_s=settings.security_timeout_s,
            fail_open=settings.ratelimit_fail_open,
        )
        self.protected = parse_protected(settings.auth_protect)
        self.trusted = parse_networks(settings.trusted_proxies)

    @classmethod
    def from_settings(cls, settings: Settings) -> Security:
        store = build_key_store(url=settings.keys_url, path=settings.keys_path, timeout_s=settings.security_timeout_s)
        security = cls(settings, store=store)
        if store is None:
            log.warning(
                "\n%s\n  AUTHENTICATION IS OFF: no key store configured (GATEWAY_KEYS_PATH or GATEWAY_KEYS_URL).\n"
                "  Anyone who can reach this port can generate. Allowed only outside production.\n%s",
                "!" * 94,
                "!" * 94,
            )
        else:
            log.info("API keys required (%s store)", "redis" if settings.keys_url else "sqlite")
        return security

    @property
    def enabled(self) -> bool:
        return self.store is not None

    # ------------------------------------------------------------------ admission
    async def admit(self, request: Request, scope: str, *, count: bool = True) -> Principal:
        accounting.current_account.set(None)
        ip = client_ip(request, self.trusted)
        if self.store is None:
            if count:
                decision = await self.limiter.hit(self.settings.ip_rpm, "ip", ip)
                if not decision.allowed:
                    raise decision.refusal("requests", "Too many requests from this address; slow down.")
                _record(_response_headers(request), decision, "requests")
            return ANONYMOUS
        fails = self.settings.auth_failures_per_ip
        blocked = await self.limiter.exhausted(fails, "authfail", ip)
        if blocked is not None:
            raise blocked.refusal("requests", "Too many failed authentications from this address.")
        record = await self._lookup(request)
        if record is None:
            decision = await self.limiter.hit(fails, "authfail", ip)
            if not decision.allowed:
                raise decision.refusal("requests", "Too many failed authentications from this address.")
            raise _unauthorized()
        if scope not in record.scopes:
            raise errors.Forbidden(f"This API key lacks the `{scope}` scope.")
        if count:
            rpm = self.settings.default_key_rpm if record.rpm is None else record.rpm
            decision = await self.limiter.hit(rpm, "key", record.id)
            if not decision.allowed:
                raise decision.refusal("requests", f"Rate limit of {rpm} requests per minute reached for this key.")
            headers = _response_headers(request)
            _record(headers, decision, "requests")
            tpd = self.settings.default_key_tokens_per_day if record.tokens_per_day is None else record.tokens_per_day
            if tpd > 0:
                accounting.current_account.set(_Account(self.limiter, record.id, tpd, headers))
        return Principal(record.id, record.name, record.scopes)

    async def _lookup(self, request: Request) -> KeyRecord | None:
        """The usable record for the request's key, or None (every failure looks the same)."""
        assert self.store is not None
        if any(
            name.lower() in _QUERY_KEY_NAMES or "gsk_" in value for name, value in request.query_params.multi_items()
        ):
            return None  # a key in a URL ends up in logs and histories: refused even when valid
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return None
        key_id = parse_key(token)
        if key_id is None:
            verify(None, token[:64])  # same work as a lookup miss
            return None
        try:
            async with asyncio.timeout(self.timeout_s):
                record = await self.store.get(key_id)
        except Exception as err:
            log.warning("key store unavailable (%s): answering 503", type(err).__name__)
            raise errors.SecurityBackendUnavailable(
                "authentication is temporarily unavailable", retry_after_s=1
            ) from err
        if not verify(record, token) or record is None or not record.usable():
            return None
        return record

    # ------------------------------------------------------------------ operations routes
    def _operation(self, path: str) -> str | None:
        if path.startswith("/health"):
            return "health"
        if path == "/metrics":
            return "metrics"
        return None

    async def guard_operations(self, request: Request) -> None:
        """Dependency of the health/metrics router: an `admin` key when GATEWAY_AUTH_PROTECT names it."""
        op = self._operation(request.url.path)
        if op is not None and op in self.protected and self.enabled:
            await self.admit(request, "admin", count=False)

    def fastapi_kwargs(self) -> dict[str, Any]:
        """FastAPI(...) arguments: the built-in docs routes are replaced when docs are protected."""
        if "docs" in self.protected and self.enabled:
            return {"docs_url": None, "redoc_url": None, "openapi_url": None}
        return {}

    def install_docs(self, app: FastAPI) -> None:
        """Protected /docs, /redoc and /openapi.json (an `admin` key; the browser sends it only when
        a proxy or extension adds the header, so protected docs are for tooling)."""
        if not self.fastapi_kwargs():
            return

        async def guard(request: Request) -> None:
            await self.admit(request, "admin", count=False)

        @app.get("/openapi.json", include_in_schema=False)
        async def openapi(request: Request) -> JSONResponse:
            await guard(request)
            return JSONResponse(app.openapi())

        # The pages load their assets from the gateway (frontend.docs_pages), not from a CDN; the
        # assets are public files, the pages and the schema need the admin key.
        app.mount(docs_pages.STATIC_URL, StaticFiles(directory=docs_pages.assets_dir()), name="docs-static")

        @app.get("/docs", include_in_schema=False)
        async def docs(request: Request) -> HTMLResponse:
            await guard(request)
            return docs_pages.swagger_ui_page(request, "/openapi.json", app.title)

        @app.get("/redoc", include_in_schema=False)
        async def redoc(request: Request) -> HTMLResponse:
            await guard(request)
            return docs_pages.redoc_page(request, "/openapi.json", app.title)

    # ------------------------------------------------------------------ lifecycle
    def lifespan(
        self, inner: Callable[[FastAPI], AbstractAsyncContextManager[None]]
    ) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
        """Wrap the app's lifespan so the key store and limit storage close at shutdown."""

        @asynccontextmanager
        async def wrapped(app: FastAPI) -> AsyncIterator[None]:
            try:
                async with inner(app):
                    storage = self.limiter.storage
                    if isinstance(storage, EngineCoreStorage):  # `--workers N`: limits live in the core
                        storage.attach(app.state.lifecycle.engine)
                    yield
            finally:
                await self.close()

        return wrapped

    async def close(self) -> None:
        await self.limiter.close()
        if self.store is not None:
            await self.store.close()


def get_security(request: Request) -> Security:
    return request.app.state.security  # type: ignore[no-any-return]


async def require_generate(request: Request) -> Principal:
    principal = await get_security(request).admit(request, "generate")
    if principal.key_id is not None:
        note_api_key(principal.name)  # the access log names the key (never the key itself)
    return principal


async def guard_operations(request: Request) -> None:
    await get_security(request).guard_operations(request)
