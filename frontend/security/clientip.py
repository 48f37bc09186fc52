"""The client's address: the TCP peer, or `X-Forwarded-For` only when the peer is a trusted proxy.

Walking `X-Forwarded-For` from the right, every hop that is itself a trusted proxy is skipped; the
first other address is the client. Entries left of it were written by the client and are ignored,
so an untrusted peer cannot choose its own identity (and dodge per-IP limits) with a spoofed header.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from starlette.requests import Request

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(spec: str | Iterable[str]) -> tuple[Network, ...]:
    """ "10.0.0.1, 192.168.0.0/16, ::1" -> networks (a bare address is a /32 or /128)."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    return tuple(ipaddress.ip_network(item.strip(), strict=False) for item in items if item.strip())


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.strip())
    except ValueError:
        return None


def _trusted(addr: ipaddress.IPv4Address | ipaddress.IPv6Address | None, networks: tuple[Network, ...]) -> bool:
    return addr is not None and any(addr in net for net in networks)


def client_ip(request: Request, trusted: tuple[Network, ...]) -> str:
    peer = request.client.host if request.client else "unknown"
    if not trusted or not _trusted(_ip(peer), trusted):
        return peer
    hops = [h.strip() for value in request.headers.getlist("x-forwarded-for") for h in value.split(",")]
    current = peer
    for hop in reversed(hops):
        addr = _ip(hop)
        if addr is None:  # garbage left of a trusted hop: keep the last address a proxy vouched for
            return current
        current = str(addr)
        if not _trusted(addr, trusted):
            return current
    return current
