"""The ``cors`` policy: the gateway answers CORS preflights and labels cross-origin responses.

The protocol is the Fetch standard's CORS protocol (https://fetch.spec.whatwg.org/#http-cors-protocol,
§3.2). Before a request that is not "simple", a browser sends a preflight (§3.2.2: ``OPTIONS``
with ``Origin``, ``Access-Control-Request-Method`` and, for CORS-unsafe request headers,
``Access-Control-Request-Headers``); it hands any response to the page only when the
``Access-Control-*`` headers of §3.2.3 allow the page's origin. CORS is a rule browsers apply,
not access control: an actual request from an origin that is not allowed is still forwarded and
answered, only without the headers that would let the page read the answer.

Everything is resolved when the config loads: exact origins as a frozenset, ``*.`` patterns as
one compiled regular expression, header values joined. Per request the policy does one set
lookup (and at most one regex match), copies a few precomputed header pairs and merges Vary.

Decisions:

- A refused preflight is a 403 problem response (express ``cors`` answers 204 and leaves the
  headers out). The browser fails either way, since a preflight must have an ok status *and*
  the headers (Fetch "CORS-preflight fetch"); a 403 names the check that failed in the browser's
  network panel and counts as a denial in logs. It carries no ``Access-Control-*`` header, so
  nothing in it reads as a grant, and its detail names the check, never the untrusted value.
- The preflight answer is 204 without Content-Length: RFC 9110 §8.6 forbids Content-Length in
  a 204 (aiohttp drops it anyway). Preflights are never forwarded.
- ``Origin: null`` is the serialisation of an opaque origin: sandboxed iframes, ``data:`` and
  ``file:`` documents, some cross-origin redirects (Fetch §3.1, RFC 6454 §7). Any attacker can
  produce it (``<iframe sandbox="allow-scripts" srcdoc=...>``), so allowing "null" allows every
  site, and with credentials hands them the user's session. No pattern matches it and the
  origin is never reflected; it is allowed only when listed by itself (docs/cors.md: unwise).
- ``origins: ["*"]`` without credentials sends ``Access-Control-Allow-Origin: *`` on every
  response of the route, with or without an Origin header, and no ``Vary: Origin``: a static
  value is to be sent on every response and not varied on (Fetch, "CORS protocol and HTTP
  caches"). ``*`` with credentials is a config error: §3.2.5 makes ``*`` a literal, not a
  wildcard, for credentialed requests, so browsers would refuse every answer.
- Any other origin list echoes the request's Origin when it is allowed, so every response of
  the route (allowed, refused, or without Origin) carries ``Vary: Origin``; without it a shared
  cache could serve one origin's grant, or a copy without any grant, to another origin.
- The upstream's own ``Access-Control-*`` response headers are removed first: the route's block
  is the only source of CORS grants, so an upstream (or a framework's ``ACAO: *`` default)
  cannot widen it, and no header is sent twice.
- ``methods`` and ``headers`` are checked on preflights only. GET, HEAD and POST are
  CORS-safelisted (§2.2.1): browsers send them without asking, so ``methods`` cannot forbid
  them, and a preflight asking for one of them is answered when its headers are allowed.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from multidict import CIMultiDict
from pydantic import BeforeValidator, Field, WithJsonSchema, field_validator, model_validator
from pydantic_core import PydanticCustomError

from gateway.pipeline import Exchange, Policy, PolicyContext, Reply, problem
from gateway.routing import is_preflight
from gateway.settings import TOKEN, Duration, Settings

# Fetch §2.2.1: browsers send these without a preflight; CONNECT, TRACE and TRACK never at all.
SAFELISTED_METHODS = frozenset({"GET", "HEAD", "POST"})
FORBIDDEN_METHODS = frozenset({"CONNECT", "TRACE", "TRACK"})
# The default allows nothing beyond what browsers send unasked. express `cors` defaults to
# GET, HEAD, PUT, PATCH, POST, DELETE; a cross-origin PUT, PATCH or DELETE changes state, so a
# route opts into it by listing it.
DEFAULT_METHODS = ("GET", "HEAD", "POST")
DEFAULT_PORTS = {"http": 80, "https": 443}

# scheme://host[:port], with `*.` allowed as the leftmost label (a pattern). The host is a DNS
# name or IPv4 address (labels), or a bracketed IPv6 address.
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_ORIGIN = re.compile(
    rf"^(?P<scheme>https?)://(?P<wildcard>\*\.)?(?P<host>{_LABEL}(?:\.{_LABEL})*|\[[0-9a-f:.]+\])(?::(?P<port>\d{{1,5}}))?$"
)
ORIGIN_EXPECTED = (
    "expected an origin such as 'https://shop.example' (scheme://host[:port], no path, query or trailing slash), "
    "a pattern such as 'https://*.example.com', or '*'"
)

# Response headers only this policy may set (Fetch §3.2.3, and Private Network Access).
CORS_RESPONSE_HEADERS = (
    "Access-Control-Allow-Origin",
    "Access-Control-Allow-Credentials",
    "Access-Control-Allow-Methods",
    "Access-Control-Allow-Headers",
    "Access-Control-Allow-Private-Network",
    "Access-Control-Expose-Headers",
    "Access-Control-Max-Age",
)
ACTUAL_VARY = ("Origin",)
PREFLIGHT_VARY = ("Origin", "Access-Control-Request-Method", "Access-Control-Request-Headers")

# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------


def _origin_hint(value: str) -> str:
    """What is most likely wrong with an origin that does not parse."""
    scheme, _, rest = value.partition("://")
    if scheme.lower() not in DEFAULT_PORTS:
        return "; only http:// and https:// origins are accepted"
    if "*" in value:
        return "; '*' stands alone, or as the whole leftmost label of a pattern"
    if any(char in rest for char in "/?#"):
        return "; an origin has no path, query or trailing slash"
    return ""


def _bad_origin(value: Any) -> PydanticCustomError:
    hint = _origin_hint(value) if isinstance(value, str) else ""
    context = {"expected": ORIGIN_EXPECTED, "got": repr(value), "hint": hint}
    return PydanticCustomError("origin", "{expected}, got {got}{hint}", context)


def parse_origin(value: Any) -> str:
    """An allowed origin in the form browsers send it: lower-case, default port left out."""
    if not isinstance(value, str):
        raise _bad_origin(value)
    if value in ("*", "null"):
        return value
    match = _ORIGIN.match(value.lower())
    if match is None:
        raise _bad_origin(value)
    scheme, wildcard, host, port = match.group("scheme", "wildcard", "host", "port")
    if port is not None and not 0 < int(port) < 65536:
        raise PydanticCustomError("origin", "the port must be 1-65535, got {got}", {"got": repr(value)})
    if wildcard and (host.startswith("[") or host.count(".") < 1):
        # `https://*.com` would allow every .com site.
        raise PydanticCustomError(
            "origin", "a pattern needs a domain of two or more labels after '*.', such as 'https://*.example.com', got {got}", {"got": repr(value)}
        )
    keep_port = port is not None and int(port) != DEFAULT_PORTS[scheme]
    return f"{scheme}://{wildcard or ''}{host}{f':{int(port)}' if keep_port else ''}"


def parse_method(value: Any) -> str:
    if not isinstance(value, str) or not TOKEN.match(value) or "*" in value:
        raise PydanticCustomError(
            "method", "expected a method such as 'GET' or 'DELETE' (list them; '*' is not accepted), got {got}", {"got": repr(value)}
        )
    if value != value.upper():
        # RFC 9110 §9.1: methods are case-sensitive; browsers upper-case only the common six.
        raise PydanticCustomError(
            "method",
            "expected an upper-case method such as {upper} (methods are case-sensitive), got {got}",
            {"upper": repr(value.upper()), "got": repr(value)},
        )
    if value in FORBIDDEN_METHODS:
        raise PydanticCustomError("method", "{got} is a forbidden method: browsers never send it (Fetch §2.2.1)", {"got": value})
    return value


def parse_header_name(value: Any) -> str:
    if not isinstance(value, str) or not TOKEN.match(value) or "*" in value:
        raise PydanticCustomError(
            "header", "expected a header name such as 'Authorization' (list them; '*' is not accepted), got {got}", {"got": repr(value)}
        )
    return value


Origin = Annotated[
    str,
    BeforeValidator(parse_origin),
    WithJsonSchema({"type": "string", "description": "an origin such as https://shop.example, a pattern such as https://*.example.com, or *"}),
]
Method = Annotated[str, BeforeValidator(parse_method), WithJsonSchema({"type": "string", "pattern": r"^[!#$%&'+.^_`|~0-9A-Z-]+$"})]
HeaderName = Annotated[str, BeforeValidator(parse_header_name), WithJsonSchema({"type": "string", "pattern": r"^[!#$%&'+.^_`|~0-9A-Za-z-]+$"})]


class CorsSettings(Settings):
    """A route's ``cors`` block (docs/cors.md)."""

    origins: tuple[Origin, ...] = Field(
        min_length=1, description="exact origins, https://*.example.com patterns, or ['*'] alone; 'null' only if listed"
    )
    methods: tuple[Method, ...] = Field(DEFAULT_METHODS, min_length=1, description="methods a preflight may ask for")
    headers: tuple[HeaderName, ...] = Field((), description="request headers a preflight may ask for; [] allows CORS-safelisted ones only")
    expose_headers: tuple[HeaderName, ...] = Field((), description="response headers a page may read beyond the CORS-safelisted ones")
    credentials: bool = Field(False, description="send Access-Control-Allow-Credentials: true (cookies, Authorization)")
    max_age: Duration | None = Field(None, description="how long browsers may cache a preflight answer; unset: header not sent")

    @field_validator("origins")
    @classmethod
    def _star_alone(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if "*" in value and len(value) > 1:
            raise PydanticCustomError("origin", "'*' allows every origin: list it alone, or list origins without it")
        return tuple(dict.fromkeys(value))

    @field_validator("methods", "headers", "expose_headers")
    @classmethod
    def _once_each(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(dict.fromkeys(value))

    @model_validator(mode="after")
    def _no_star_with_credentials(self) -> "CorsSettings":
        if self.credentials and self.origins == ("*",):
            raise PydanticCustomError(
                "cors",
                "origins ['*'] cannot be used with credentials: true (the Fetch standard forbids it and browsers refuse the "
                "answer); list the origins that may send credentials",
            )
        return self


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def compile_patterns(patterns: list[str]) -> re.Pattern[str] | None:
    """One regex for every ``scheme://*.domain[:port]`` pattern: one or more labels, then the domain."""
    if not patterns:
        return None
    parts = []
    for pattern in patterns:
        scheme, rest = pattern.split("://*.", 1)
        parts.append(f"{re.escape(scheme)}://(?:{_LABEL}\\.)+{re.escape(rest)}")
    return re.compile("(?:" + "|".join(parts) + ")")


def requested_headers(value: str) -> list[str]:
    """Access-Control-Request-Headers: a comma-separated list of names, compared lower-case."""
    return [name for name in (part.strip().lower() for part in value.split(",")) if name]


def merge_vary(headers: CIMultiDict[str], tokens: tuple[str, ...], joined: str) -> None:
    """Add tokens to Vary once each, case-insensitively, in one field; ``Vary: *`` stays as is."""
    present = headers.getall("Vary", ())
    if not present:
        headers["Vary"] = joined
        return
    seen: dict[str, str] = {}
    for value in present:
        for token in value.split(","):
            token = token.strip()
            if token == "*":
                return
            if token:
                seen.setdefault(token.lower(), token)
    for token in tokens:
        seen.setdefault(token.lower(), token)
    headers["Vary"] = ", ".join(seen.values())


def strip_cors_headers(headers: CIMultiDict[str]) -> None:
    for name in CORS_RESPONSE_HEADERS:
        if name in headers:
            del headers[name]


# ---------------------------------------------------------------------------------------------
# The policy
# ---------------------------------------------------------------------------------------------


class CorsPolicy(Policy):
    """Answers preflights locally; adds the grant to responses for allowed origins."""

    name = "cors"
    settings_type = CorsSettings
    answers_preflight = True

    def __init__(self, settings: CorsSettings, context: PolicyContext) -> None:
        super().__init__(settings, context)
        origins = settings.origins
        # `*` without credentials (credentials with `*` do not validate): a static answer.
        self.any_origin = origins == ("*",)
        self.exact = frozenset(o for o in origins if "://*." not in o)
        self.patterns = compile_patterns([o for o in origins if "://*." in o])
        self.methods = frozenset(settings.methods)
        self.headers = frozenset(name.lower() for name in settings.headers)
        # What every answer to an allowed origin carries besides Access-Control-Allow-Origin.
        grant: list[tuple[str, str]] = []
        if settings.credentials:
            grant.append(("Access-Control-Allow-Credentials", "true"))
        self.actual_grant = (*grant, *self._expose(settings))
        preflight = [*grant, ("Access-Control-Allow-Methods", ", ".join(settings.methods))]
        if settings.max_age is not None:
            preflight.append(("Access-Control-Max-Age", str(int(settings.max_age))))
        self.preflight_grant = tuple(preflight)
        self.allow_headers = ", ".join(settings.headers)
        self.actual_vary = () if self.any_origin else ACTUAL_VARY
        self.preflight_vary = PREFLIGHT_VARY[1:] if self.any_origin else PREFLIGHT_VARY
        self.actual_vary_value = ", ".join(self.actual_vary)
        self.preflight_vary_value = ", ".join(self.preflight_vary)
        allowed_methods = ", ".join(settings.methods)
        allowed_headers = self.allow_headers or "only CORS-safelisted ones"
        self.refusals = {
            "origin": "CORS preflight refused: origin not allowed",
            "method": f"CORS preflight refused: method not allowed (allowed: {allowed_methods})",
            "header": f"CORS preflight refused: a request header is not allowed (allowed: {allowed_headers})",
        }

    @staticmethod
    def _expose(settings: CorsSettings) -> tuple[tuple[str, str], ...]:
        if not settings.expose_headers:
            return ()
        return (("Access-Control-Expose-Headers", ", ".join(settings.expose_headers)),)

    def allows(self, origin: str) -> bool:
        """An exact origin (``null`` only when listed), or a pattern match; never ``*`` here."""
        return origin in self.exact or (self.patterns is not None and self.patterns.fullmatch(origin) is not None)

    def allow_origin(self, origin: str | None) -> str | None:
        """The Access-Control-Allow-Origin value for a request's Origin; None: no grant."""
        if self.any_origin:
            return "*"
        if origin is not None and self.allows(origin):
            return origin
        return None

    async def on_request(self, exchange: Exchange) -> Reply | None:
        """A preflight is always answered here (204, or a 403 problem); anything else goes on."""
        if not is_preflight(exchange.request):
            return None
        headers = exchange.request.headers
        allow_origin = self.allow_origin(headers["Origin"])
        if allow_origin is None:
            return problem(exchange, 403, self.refusals["origin"])
        method = headers["Access-Control-Request-Method"]
        if method not in self.methods and method not in SAFELISTED_METHODS:
            return problem(exchange, 403, self.refusals["method"])
        asked = requested_headers(headers.get("Access-Control-Request-Headers", ""))
        if not self.headers.issuperset(asked):
            return problem(exchange, 403, self.refusals["header"])
        reply_headers: CIMultiDict[str] = CIMultiDict(self.preflight_grant)
        reply_headers["Access-Control-Allow-Origin"] = allow_origin
        if asked:
            reply_headers["Access-Control-Allow-Headers"] = self.allow_headers
        return Reply(204, reply_headers)

    def on_response(self, exchange: Exchange, reply: Reply) -> None:
        """Preflight answers were made complete in on_request: only Vary is merged into them.
        Every other response loses the upstream's CORS headers and gets the route's grant."""
        headers = reply.headers
        if is_preflight(exchange.request):
            # The only Access-Control-* headers a preflight reply can have are this policy's own.
            merge_vary(headers, self.preflight_vary, self.preflight_vary_value)
            return
        strip_cors_headers(headers)
        allow_origin = self.allow_origin(exchange.request.headers.get("Origin"))
        if allow_origin is not None:
            headers["Access-Control-Allow-Origin"] = allow_origin
            headers.extend(self.actual_grant)
        if self.actual_vary:
            merge_vary(headers, self.actual_vary, self.actual_vary_value)
