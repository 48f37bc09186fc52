"""API keys: format, hashing, records and the two stores (SQLite file, Redis).

Format: ``gsk_<id>_<secret>``: ``id`` is 12 hex characters (public: it names the key in the CLI and
in logs), ``secret`` is ``secrets.token_urlsafe(32)`` (256 random bits). Only SHA-256 of the whole key
is stored. A slow KDF (bcrypt, scrypt, argon2) protects *low-entropy* passwords against offline
guessing; a 256-bit random secret cannot be guessed at any hash speed, and a deliberately slow hash
on every request would only add latency and hand attackers a CPU-exhaustion lever.

Lookups go by ``id``; the stored hash is then compared with ``hmac.compare_digest`` (constant time).
An unknown id is compared against a dummy hash so it costs the same. Nothing here logs a key.
Every lookup reads the store (no cache), so a revocation holds on every gateway at the next request.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from redis.asyncio import Redis

PREFIX = "gsk_"
SCOPES = frozenset({"generate", "admin"})
_KEY_RE = re.compile(r"gsk_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")
_MAX_KEY_CHARS = 64  # gsk_ + 12 + _ + 43 = 60: anything longer is malformed before any regex runs
_DUMMY_HASH = hashlib.sha256(b"gsk_000000000000_dummy").hexdigest()


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> tuple[str, str]:
    """(key id, full key). The full key is shown once and never stored."""
    key_id = secrets.token_hex(6)
    return key_id, f"{PREFIX}{key_id}_{secrets.token_urlsafe(32)}"


def parse_key(key: str) -> str | None:
    """The key id of a well-formed key, else None."""
    if len(key) > _MAX_KEY_CHARS:
        return None
    m = _KEY_RE.fullmatch(key)
    return m.group(1) if m else None


@dataclass(frozen=True)
class KeyRecord:
    id: str
    name: str
    key_hash: str = field(repr=False)
    scopes: frozenset[str] = frozenset({"generate"})
    rpm: int | None = None  # requests per minute; None = the gateway's default, 0 = unlimited
    tokens_per_day: int | None = None  # None = the gateway's default, 0 = unlimited
    created_at: float = 0.0
    expires_at: float | None = None
    revoked: bool = False

    def usable(self, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        return not self.revoked and (self.expires_at is None or now < self.expires_at)

    def public(self) -> dict[str, object]:
        """What `list` shows: everything but the hash."""
        return {
            "id": self.id,
            "name": self.name,
            "scopes": sorted(self.scopes),
            "rpm": self.rpm,
            "tokens_per_day": self.tokens_per_day,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "revoked": self.revoked,
        }


def make_record(
    name: str,
    *,
    scopes: Iterable[str] = ("generate",),
    rpm: int | None = None,
    tokens_per_day: int | None = None,
    expires_days: float | None = None,
    now: float | None = None,
) -> tuple[KeyRecord, str]:
    """A new record and its key (show the key once, store the record)."""
    scope_set = frozenset(s.strip() for s in scopes if s.strip())
    if not scope_set or not scope_set <= SCOPES:
        raise ValueError(f"scopes must be a non-empty subset of {sorted(SCOPES)}")
    for label, value in (("rpm", rpm), ("tokens_per_day", tokens_per_day)):
        if value is not None and value < 0:
            raise ValueError(f"{label} must be >= 0")
    if expires_days is not None and expires_days <= 0:
        raise ValueError("expires_days must be > 0")
    now = time.time() if now is None else now
    key_id, key = new_key()
    record = KeyRecord(
        id=key_id,
        name=name,
        key_hash=hash_key(key),
        scopes=scope_set,
        rpm=rpm,
        tokens_per_day=tokens_per_day,
        created_at=now,
        expires_at=None if expires_days is None else now + expires_days * 86400,
    )
    return record, key


def verify(record: KeyRecord | None, key: str) -> bool:
    """Constant-time check of `key` against `record` (a dummy comparison when there is none)."""
    digest = hash_key(key)
    ok = hmac.compare_digest(digest, record.key_hash if record is not None else _DUMMY_HASH)
    return ok and record is not None


class KeyStore(Protocol):
    async def get(self, key_id: str) -> KeyRecord | None: ...
    async def add(self, record: KeyRecord) -> None: ...
    async def list(self) -> list[KeyRecord]: ...
    async def revoke(self, key_id: str) -> bool: ...
    async def close(self) -> None: ...


# ----------------------------------------------------------------------------------- SQLite
class SQLiteKeyStore:
    """An embedded SQLite file (WAL mode, so the CLI can write while gateways read).

    One connection guarded by a lock. Lookups run on the event loop (see `get`); writes, which
    may wait for the file lock, run in a worker thread."""

    def __init__(self, path: Path, *, busy_timeout_s: float = 1.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not self.path.exists()
        self._db = sqlite3.connect(self.path, timeout=busy_timeout_s, check_same_thread=False, isolation_level=None)
        if fresh:
            os.chmod(self.path, 0o600)  # hashes only, but nobody else needs to read them
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS api_keys ("
                " id TEXT PRIMARY KEY, name TEXT NOT NULL, key_hash TEXT NOT NULL, scopes TEXT NOT NULL,"
                " rpm INTEGER, tokens_per_day INTEGER, created_at REAL NOT NULL, expires_at REAL,"
                " revoked INTEGER NOT NULL DEFAULT 0)"
            )

    _COLUMNS = "id, name, key_hash, scopes, rpm, tokens_per_day, created_at, expires_at, revoked"

    @staticmethod
    def _row(row: tuple[object, ...]) -> KeyRecord:
        key_id, name, key_hash, scopes, rpm, tpd, created, expires, revoked = row
        return KeyRecord(
            id=str(key_id),
            name=str(name),
            key_hash=str(key_hash),
            scopes=frozenset(str(scopes).split(",")),
            rpm=None if rpm is None else int(rpm),  # type: ignore[call-overload]
            tokens_per_day=None if tpd is None else int(tpd),  # type: ignore[call-overload]
            created_at=float(created),  # type: ignore[arg-type]
            expires_at=None if expires is None else float(expires),  # type: ignore[arg-type]
            revoked=bool(revoked),
        )

    def _get(self, key_id: str) -> KeyRecord | None:
        with self._lock:
            row = self._db.execute(f"SELECT {self._COLUMNS} FROM api_keys WHERE id = ?", (key_id,)).fetchone()
        return None if row is None else self._row(row)

    def _add(self, r: KeyRecord) -> None:
        with self._lock:
            self._db.execute(
                f"INSERT INTO api_keys ({self._COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    r.id,
                    r.name,
                    r.key_hash,
                    ",".join(sorted(r.scopes)),
                    r.rpm,
                    r.tokens_per_day,
                    r.created_at,
                    r.expires_at,
                    int(r.revoked),
                ),
            )

    def _list(self) -> list[KeyRecord]:
        with self._lock:
            rows = self._db.execute(f"SELECT {self._COLUMNS} FROM api_keys ORDER BY created_at").fetchall()
        return [self._row(r) for r in rows]

    def _revoke(self, key_id: str) -> bool:
        with self._lock:
            return self._db.execute("UPDATE api_keys SET revoked = 1 WHERE id = ?", (key_id,)).rowcount > 0

    async def get(self, key_id: str) -> KeyRecord | None:
        # On the event loop itself: a primary-key read of a local WAL file takes microseconds and
        # never waits for writers, while a thread hop would queue behind a burst of requests.
        return self._get(key_id)

    async def add(self, record: KeyRecord) -> None:
        await asyncio.to_thread(self._add, record)

    async def list(self) -> list[KeyRecord]:
        return await asyncio.to_thread(self._list)

    async def revoke(self, key_id: str) -> bool:
        return await asyncio.to_thread(self._revoke, key_id)

    async def close(self) -> None:
        with self._lock:
            self._db.close()


# ----------------------------------------------------------------------------------- Redis
class RedisKeyStore:
    """One Redis string per key, ``<prefix>key:<id>`` -> record JSON, plus a set of ids for `list`.
    Several gateways share it; every request reads it, so revocation is seen at once."""

    def __init__(self, client: Redis, prefix: str = "gateway:apikeys:") -> None:
        self._client = client
        self._prefix = prefix

    def _k(self, key_id: str) -> str:
        return f"{self._prefix}key:{key_id}"

    @staticmethod
    def _encode(r: KeyRecord) -> str:
        data = {**r.public(), "key_hash": r.key_hash}
        return json.dumps(data)

    @staticmethod
    def _decode(raw: bytes | str) -> KeyRecord:
        d = json.loads(raw)
        return KeyRecord(
            id=d["id"],
            name=d["name"],
            key_hash=d["key_hash"],
            scopes=frozenset(d["scopes"]),
            rpm=d["rpm"],
            tokens_per_day=d["tokens_per_day"],
            created_at=d["created_at"],
            expires_at=d["expires_at"],
            revoked=bool(d["revoked"]),
        )

    async def get(self, key_id: str) -> KeyRecord | None:
        raw = await self._client.get(self._k(key_id))
        return None if raw is None else self._decode(raw)

    async def add(self, record: KeyRecord) -> None:
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.set(self._k(record.id), self._encode(record), nx=True)
            pipe.sadd(f"{self._prefix}ids", record.id)
            created, _ = await pipe.execute()
        if not created:
            raise ValueError(f"key id {record.id} exists")

    async def list(self) -> list[KeyRecord]:
        ids = sorted(
            m.decode() if isinstance(m, bytes) else str(m) for m in await self._client.smembers(f"{self._prefix}ids")
        )
        records = [await self.get(i) for i in ids]
        return sorted((r for r in records if r is not None), key=lambda r: r.created_at)

    async def revoke(self, key_id: str) -> bool:
        from redis.exceptions import WatchError

        # Read-modify-write under WATCH so a concurrent change is never lost.
        async with self._client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(self._k(key_id))
                    raw = await pipe.get(self._k(key_id))
                    if raw is None:
                        await pipe.reset()
                        return False
                    pipe.multi()
                    pipe.set(self._k(key_id), self._encode(replace(self._decode(raw), revoked=True)))
                    await pipe.execute()
                    return True
                except WatchError:
                    continue

    async def close(self) -> None:
        await self._client.aclose()
        await self._client.connection_pool.disconnect()


def redis_pool(url: str, timeout_s: float, max_connections: int = 32) -> Any:
    """A bounded, fail-fast redis.asyncio connection pool: short socket timeouts, no retries (the
    caller bounds every call with its own deadline and answers 503). Bounded so that a burst of
    requests reuses a few warm connections instead of opening one each."""
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    return aioredis.BlockingConnectionPool.from_url(
        url.strip(),
        max_connections=max_connections,
        timeout=timeout_s,  # waiting for a free connection
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
    )


def redis_client(url: str, timeout_s: float) -> Redis:
    import redis.asyncio as aioredis

    return aioredis.Redis(connection_pool=redis_pool(url, timeout_s))  # closed by the caller, pool too


def build_key_store(*, url: str | None, path: Path | None, timeout_s: float) -> KeyStore | None:
    """Redis when `url` is set, else SQLite when `path` is set, else None (no auth)."""
    if url and url.strip():
        return RedisKeyStore(redis_client(url, timeout_s))
    if path is not None and str(path).strip():
        return SQLiteKeyStore(Path(path))
    return None
