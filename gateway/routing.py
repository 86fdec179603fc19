"""The route table: the normal form of a request path, and path/method/host matching.

The path is normalised once, before matching, and the normal form is both what routes see and
what is forwarded, so no path can reach a route in a form that the route's policies did not see
(``/api/../admin``, ``/%2e%2e/admin``, ``//admin`` all become ``/admin``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote

if TYPE_CHECKING:
    from aiohttp import web

    from gateway.pipeline import Pipeline
    from gateway.proxy import Upstream

# RFC 3986 §2.3: percent-encoded unreserved characters are equivalent to the characters.
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = frozenset("0123456789abcdefABCDEF")
# Anything that might make the raw path differ from its normal form; most paths have none.
_NEEDS_WORK = re.compile(r"%|//|/\.|\\|#|[^\x21-\x7e]")
# Characters kept as they are in a normal path (RFC 3986 pchar, '/' and '%' of kept escapes).
_PATH_SAFE = "/:@!$&'()*+,;=-._~%"


class BadPath(ValueError):
    """A request path that is refused with 400; the message says why."""


def normalise_path(raw: str, keep_escaped_slashes: bool = False) -> str:
    """Return the normal form of a request path (without its query).

    Percent-decodes unreserved characters (RFC 3986 §6.2.2.2) and upper-cases the other escapes,
    removes dot segments (§5.2.4) and merges repeated slashes; a trailing slash is kept.

    Raises BadPath for a path that no route should see: not starting with '/', NUL or control
    characters, a raw backslash, malformed escapes, ``%2F``/``%5C`` (unless kept, then they stay
    encoded inside their segment) and dot segments with path parameters (``..;/``, which
    servlet containers treat as ``..``).
    """
    if not raw.startswith("/"):
        raise BadPath("the path must start with '/'")
    if _NEEDS_WORK.search(raw) is None:
        return raw
    out: list[str] = []
    i, n = 0, len(raw)
    while i < n:
        char = raw[i]
        if char == "%":
            code = raw[i + 1 : i + 3]
            if len(code) != 2 or not _HEX.issuperset(code):
                raise BadPath("malformed percent-encoding")
            decoded = chr(int(code, 16))
            if decoded in _UNRESERVED:
                out.append(decoded)
            elif decoded == "\x00":
                raise BadPath("NUL in path")
            elif decoded in "/\\" and not keep_escaped_slashes:
                raise BadPath("encoded slash or backslash in path")
            else:
                out.append("%" + code.upper())
            i += 3
            continue
        if char == "\\":
            raise BadPath("backslash in path")
        if char == "#":
            raise BadPath("a fragment is not part of a request target")  # RFC 9112 §3.2
        if char < "\x21" or char == "\x7f":
            raise BadPath("control character or space in path")
        out.append(char if char.isascii() else quote(char, safe=""))
        i += 1
    segments = "".join(out).split("/")
    trailing = segments[-1] in ("", ".", "..")
    stack: list[str] = []
    for segment in segments[1:]:
        if segment in ("", "."):
            continue
        if segment == "..":
            if stack:
                stack.pop()
            continue
        if segment.startswith((".;", "..;")):
            raise BadPath("dot segment with parameters in path")
        stack.append(segment)
    path = "/" + "/".join(stack)
    return path + "/" if trailing and stack else path


def decoded_path(normal: str, keep_escaped_slashes: bool = False) -> str:
    """The percent-decoded form routes match on; kept %2F/%5C stay encoded (they are not separators)."""
    if "%" not in normal:
        return normal
    if keep_escaped_slashes:
        normal = normal.replace("%2F", "%252F").replace("%5C", "%255C")
    return unquote(normal, errors="replace")


@dataclass(frozen=True, slots=True, eq=False)
class Route:
    """A configured route, ready to serve: how it matches, its pipeline and its upstream."""

    name: str
    upstream: "Upstream"
    pipeline: "Pipeline"
    prefix: str | None = None
    regex: re.Pattern[str] | None = None
    methods: frozenset[str] | None = None
    host: str | None = None  # "api.example.com", or ".example.com" for "*.example.com"
    settings: Any = None

    def matches(self, host: str, path: str) -> bool:
        if self.host is not None:
            if self.host[0] == ".":
                if not host.endswith(self.host):
                    return False
            elif host != self.host:
                return False
        prefix = self.prefix
        if prefix is not None:
            return prefix == "/" or path == prefix or path.startswith(prefix) and path[len(prefix)] == "/"
        assert self.regex is not None
        return self.regex.search(path) is not None


def is_preflight(request: "web.BaseRequest") -> bool:
    """A CORS preflight: OPTIONS with Origin and Access-Control-Request-Method (Fetch §3.2.2)."""
    headers = request.headers
    return request.method == "OPTIONS" and "Origin" in headers and "Access-Control-Request-Method" in headers


def route_methods(methods: tuple[str, ...] | None) -> frozenset[str] | None:
    """The methods a route allows; GET implies HEAD (RFC 9110 §9.3.2)."""
    if methods is None:
        return None
    allowed = set(methods)
    if "GET" in allowed:
        allowed.add("HEAD")
    return frozenset(allowed)


def host_pattern(host: str | None) -> str | None:
    if host is None:
        return None
    return host[1:] if host.startswith("*.") else host


# RFC 9112 §3.2 / RFC 3986 §3.2.2: uri-host [":" port], where uri-host is an IP-literal or a
# reg-name (unreserved, pct-encoded, sub-delims; may be empty). No userinfo, no spaces, no '/'.
_HOST = re.compile(r"(?:\[[0-9A-Za-z:._~!$&'()*+,;=-]+\]|(?:[A-Za-z0-9._~!$&'()*+,;=-]+|%[0-9A-Fa-f]{2})*)(?::[0-9]*)?")


def valid_host(header: str) -> bool:
    """Whether a Host field value is well formed: RFC 9112 §3.2 says a server MUST answer 400 to
    one that is not (``Host: a b`` would otherwise reach host matching, X-Forwarded-Host and,
    with preserve_host, the upstream's Host)."""
    return _HOST.fullmatch(header) is not None


def request_host(header: str) -> str:
    """The host of a Host header, lower-cased and without its port."""
    host = header.lower()
    if host.startswith("["):
        return host[: host.find("]") + 1]
    colon = host.rfind(":")
    return host[:colon] if colon != -1 else host


class Router:
    """First match wins; a path some route matches with a method none allows is a 405."""

    def __init__(self, routes: list[Route], any_method: tuple[str, ...] = ()) -> None:
        self.routes = tuple(routes)
        self.any_method = any_method
        # Every method some route serves (a route without `methods` serves `any_method`): the
        # Allow header of a refused CONNECT, worked out once here rather than per request.
        served: set[str] = set()
        for route in self.routes:
            served |= route.methods if route.methods is not None else set(any_method)
        self.methods = tuple(sorted(served - {"CONNECT"}))

    def match(self, method: str, host: str, path: str) -> tuple[Route | None, tuple[str, ...]]:
        """(route, ()) on a match; (None, allowed methods) for a 405; (None, ()) for a 404."""
        allowed: set[str] = set()
        for route in self.routes:
            if not route.matches(host, path):
                continue
            if route.methods is None:
                # A route without `methods` serves every method but TRACE, which echoes the
                # request (cookies, tokens) back to the client: cross-site tracing. A route
                # that wants it lists it (nginx refuses TRACE the same way).
                if method != "TRACE":
                    return route, ()
                allowed |= set(self.any_method) - {"TRACE", "CONNECT"}
                continue
            if method in route.methods:
                return route, ()
            allowed |= route.methods
        return None, tuple(sorted(allowed))
