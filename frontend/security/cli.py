"""`python -m frontend.keys create|list|revoke`: manage API keys in the configured store.

The store comes from GATEWAY_KEYS_URL (Redis) or GATEWAY_KEYS_PATH (SQLite file), or --url/--path.
`create` prints the key once; it is stored only as a hash and cannot be shown again.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import sys
from pathlib import Path

from frontend.security.keys import SCOPES, KeyStore, build_key_store, make_record


def _when(ts: float | None) -> str:
    return "-" if ts is None else dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m frontend.keys", description=__doc__.split("\n")[0])
    p.add_argument("--path", type=Path, help="SQLite key store (default: GATEWAY_KEYS_PATH)")
    p.add_argument("--url", help="Redis key store (default: GATEWAY_KEYS_URL)")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("create", help="create a key and print it once")
    c.add_argument("--name", required=True)
    c.add_argument("--scopes", default="generate", help=f"comma list of {', '.join(sorted(SCOPES))}")
    c.add_argument("--rpm", type=int, help="requests per minute (0 = unlimited; default: the gateway's)")
    c.add_argument("--tokens-per-day", type=int, help="tokens per UTC day (0 = unlimited; default: the gateway's)")
    c.add_argument("--expires-days", type=float, help="expire after this many days (default: never)")
    ls = sub.add_parser("list", help="list keys (never the keys themselves)")
    ls.add_argument("--json", action="store_true")
    r = sub.add_parser("revoke", help="revoke a key by id (every gateway refuses it at its next request)")
    r.add_argument("id")
    return p


def _store(args: argparse.Namespace) -> KeyStore:
    url, path = args.url, args.path
    if url is None and path is None:
        from frontend.settings import Settings

        settings = Settings()
        url, path = settings.keys_url, settings.keys_path
    store = build_key_store(url=url, path=path, timeout_s=2.0)
    if store is None:
        raise SystemExit(
            "no key store configured: set GATEWAY_KEYS_PATH (SQLite file) or GATEWAY_KEYS_URL (Redis), "
            "or pass --path / --url"
        )
    return store


async def _run(args: argparse.Namespace) -> int:
    store = _store(args)
    try:
        if args.command == "create":
            try:
                record, key = make_record(
                    args.name,
                    scopes=args.scopes.split(","),
                    rpm=args.rpm,
                    tokens_per_day=args.tokens_per_day,
                    expires_days=args.expires_days,
                )
            except ValueError as err:
                print(f"error: {err}", file=sys.stderr)
                return 2
            await store.add(record)
            print(f"id       {record.id}")
            print(f"name     {record.name}")
            print(f"scopes   {','.join(sorted(record.scopes))}")
            print(f"expires  {_when(record.expires_at)}")
            print(f"key      {key}")
            print("The key is shown only now; it is stored as a hash. Send it as `Authorization: Bearer <key>`.")
            return 0
        if args.command == "list":
            records = await store.list()
            if args.json:
                print(json.dumps([r.public() for r in records], indent=2))
                return 0
            print(f"{'id':<13} {'name':<20} {'scopes':<15} {'rpm':>6} {'tokens/day':>11} {'expires':<21} status")
            for r in records:
                status = "revoked" if r.revoked else ("expired" if not r.usable() else "active")
                rpm = "default" if r.rpm is None else str(r.rpm)
                tpd = "default" if r.tokens_per_day is None else str(r.tokens_per_day)
                scopes = ",".join(sorted(r.scopes))
                print(
                    f"{r.id:<13} {r.name[:20]:<20} {scopes:<15} {rpm:>6} {tpd:>11} {_when(r.expires_at):<21} {status}"
                )
            return 0
        if args.command == "revoke":
            if await store.revoke(args.id):
                print(f"revoked {args.id}")
                return 0
            print(f"no key with id {args.id}", file=sys.stderr)
            return 1
        return 2
    finally:
        await store.close()


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(_run(_parser().parse_args(argv)))
