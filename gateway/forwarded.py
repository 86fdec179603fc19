"""The client's address behind trusted proxies, and the headers sent to the upstream.

Only peers in ``listen.trusted_proxies`` are believed about the client: their X-Forwarded-For,
-Proto and -Host are extended, while the same headers from anyone else are replaced, so an
untrusted client cannot make the upstream believe another address or scheme. ``Forwarded``
(RFC 7239) from untrusted peers is dropped for the same reason.
"""

from __future__ import annotations

import ipaddress
import re
from typing import TYPE_CHECKING, Iterable

from multidict import CIMultiDict, CIMultiDictProxy

from gateway.ids import random_hex

if TYPE_CHECKING:
    from aiohttp import web

# RFC 9110 §7.6.1 connection-specific fields, the obsolete Proxy-Connection, and the
# proxy credentials that are meant for the first proxy only (RFC 9110 §11.7).
HOP_BY_HOP = frozenset(
    (
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authenticate",
        "proxy-authorization",
    )
)
VIA = "1.1 gateway"

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def connection_listed(headers: "CIMultiDict[str] | web.BaseRequest") -> set[str]:
    """Header names a message's Connection field lists (they are hop-by-hop too)."""
    names: set[str] = set()
    for value in headers.getall("Connection", ()):  # type: ignore[union-attr]
        names.update(token.strip().lower() for token in value.split(","))
    return names


def strip_hop_by_hop(headers: "CIMultiDict[str] | CIMultiDictProxy[str]", listed: set[str]) -> CIMultiDict[str]:
    """A copy of the headers without hop-by-hop ones (copied in C, then the few names removed)."""
    kept = CIMultiDict(headers)
    for name in HOP_BY_HOP | listed if listed else HOP_BY_HOP:
        if name in kept:
            del kept[name]
    return kept


def in_networks(address: str | None, networks: Iterable[IPNetwork]) -> bool:
    """Whether an address (as the socket or X-Forwarded-For gives it) lies in any of the networks."""
    if not networks or not address:
        return False
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


class Forwarding:
    """Built once per config from listen.trusted_proxies."""

    def __init__(self, trusted: Iterable[IPNetwork], reserved: Iterable[str] = ()) -> None:
        self.trusted = tuple(trusted)
        self.reserved = tuple(reserved)  # headers only the gateway sets: client copies dropped

    def is_trusted(self, address: str | None) -> bool:
        return in_networks(address, self.trusted)

    def client_ip(self, peer: str | None, forwarded_for: str | None) -> str:
        """The peer, or, when the peer is trusted, the right-most untrusted X-Forwarded-For entry."""
        peer = peer or "unknown"
        if not forwarded_for or not self.is_trusted(peer):
            return peer
        hops = [hop.strip() for hop in forwarded_for.split(",") if hop.strip()]
        for hop in reversed(hops):
            if not self.is_trusted(hop):
                return hop if _is_ip(hop) else peer
        return hops[0] if hops and _is_ip(hops[0]) else peer

    def upstream_headers(
        self,
        request: "web.BaseRequest",
        peer: str | None,
        request_id: str,
    ) -> CIMultiDict[str]:
        """The client's headers as the upstream gets them (the Host header is set by the proxy)."""
        incoming = request.headers
        headers = strip_hop_by_hop(incoming, connection_listed(incoming) if "Connection" in incoming else set())
        headers.popall("Host", None)
        headers.popall("Expect", None)  # the gateway answers 100-continue itself
        for name in self.reserved:
            headers.popall(name, None)
        trusted = self.is_trusted(peer)
        host = incoming.get("Host", "")
        address = peer or "unknown"
        prior = ", ".join(incoming.getall("X-Forwarded-For", ())) if trusted else None
        headers["X-Forwarded-For"] = f"{prior}, {address}" if prior else address
        if not (trusted and "X-Forwarded-Proto" in incoming):
            headers["X-Forwarded-Proto"] = request.scheme
        if not (trusted and "X-Forwarded-Host" in incoming) and host:
            headers["X-Forwarded-Host"] = host
        if not trusted:
            headers.popall("Forwarded", None)
        via = incoming.get("Via")
        headers["Via"] = f"{via}, {VIA}" if via else VIA
        headers["X-Request-ID"] = request_id
        return headers


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


# W3C Trace Context (https://www.w3.org/TR/trace-context/#traceparent-header): version 00.
_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


def traceparent(incoming: str | None) -> tuple[str, str]:
    """The traceparent to send upstream and its trace id: the client's when well formed (so the
    gateway's logs join the client's trace), else a new trace (§4.3: an invalid one restarts)."""
    if incoming is not None:
        match = _TRACEPARENT.match(incoming.strip())
        if match and match.group(1) != "0" * 32 and match.group(2) != "0" * 16:
            return incoming.strip(), match.group(1)
    trace_id = random_hex(16)
    return f"00-{trace_id}-{random_hex(8)}-00", trace_id
