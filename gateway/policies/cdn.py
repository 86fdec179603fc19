"""The ``cdn`` policy: what downstream caches (CDNs, proxies, browsers) are told about a response.

It sets ``Cache-Control`` (RFC 9111 §5.2), ``CDN-Cache-Control`` (RFC 9213, for CDNs only),
``Surrogate-Control`` and ``Surrogate-Key`` (Fastly/Akamai edge conventions), and merges the
route's ``vary`` into ``Vary`` (RFC 9110 §12.5.5). It caches nothing itself: the gateway's own
response cache is the separate ``cache`` policy.

Decisions:
- Only GET and HEAD requests answered 2xx or 3xx are touched (RFC 9111 §3 leaves other methods'
  responses uncacheable by default; 304 must carry the caching fields a 200 would, RFC 9110
  §15.4.5). Error responses, the gateway's own problem responses (``Cache-Control: no-store``)
  included, are never touched, not even their Vary.
- Never makes public what must stay private, in this order:
  1. The upstream's ``Cache-Control`` has ``private`` or ``no-store`` (RFC 9111 §5.2.2.7,
     §5.2.2.5): it is left as sent, and no CDN or surrogate header is added. The upstream knows
     the response is personal; anything the gateway wrote over it could only loosen it.
  2. The response has ``Set-Cookie``, or the request was authenticated (an ``Authorization``
     header, RFC 9111 §3.5, or ``exchange.subject`` set by an auth policy): ``Cache-Control``
     becomes ``private`` plus the non-shared directives of the Cache-Control the gateway would
     otherwise send (``public``, ``s-maxage`` and ``proxy-revalidate`` are dropped, as they
     speak to shared caches only), and every shared-cache header (``CDN-Cache-Control``, the
     vendor-targeted ones of RFC 9213 §2, ``Surrogate-Control``, ``Surrogate-Key``) is removed,
     the upstream's too: under RFC 9213 a CDN obeys CDN-Cache-Control over Cache-Control, so
     leaving one would let a shared cache store the response. In case 1 with Set-Cookie or an
     authenticated request, those shared-cache headers are removed as well.
  3. Otherwise the configured headers are set, replacing the upstream's (``keep_upstream: true``:
     header by header, an upstream value is kept and only missing ones are added).
- ``vary`` is merged into the upstream's Vary (case-insensitive, no duplicates, the upstream's
  order first; ``*`` absorbs everything) on every touched response, the private ones too, since
  browsers keep variants as well.
- Directives are validated at load: known names only (a did-you-mean for typos), delta-seconds
  (RFC 9111 §1.2.2) as plain digits, ``public`` contradicting ``private``/``no-store`` refused,
  and the canonical form ("public, max-age=3600") is what is sent.
- A header is never sent twice: values are set with ``headers[name] = value``, which replaces
  every earlier line of that name.

Per response the work is a few dict operations; the only parsing of upstream values (their
Cache-Control when deciding, their Vary when merging) goes through small memoised functions,
since upstreams send the same few values over and over.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

from pydantic import Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from gateway.pipeline import Exchange, Policy, PolicyContext, Reply
from gateway.settings import FIELD_VALUE, TOKEN, Settings, did_you_mean, parse_duration

# RFC 9111 §5.2.2 response directives, RFC 8246 immutable, RFC 5861 stale-* (also used by
# CDN-Cache-Control, RFC 9213 §2.1, and by Surrogate-Control).
SECONDS_DIRECTIVES = frozenset({"max-age", "s-maxage", "stale-while-revalidate", "stale-if-error"})
FIELD_LIST_DIRECTIVES = frozenset({"private", "no-cache"})  # may name fields: private="Set-Cookie"
FLAG_DIRECTIVES = frozenset(
    {"public", "no-store", "must-revalidate", "proxy-revalidate", "must-understand", "immutable", "no-transform"}
)
DIRECTIVES = SECONDS_DIRECTIVES | FIELD_LIST_DIRECTIVES | FLAG_DIRECTIVES
# What speaks to shared caches only (RFC 9111 §5.2.2.6, §5.2.2.9, §5.2.2.10): dropped when a
# response is made private.
SHARED_ONLY = frozenset({"public", "s-maxage", "proxy-revalidate", "private"})
# An upstream Cache-Control with one of these is left as sent.
KEEP_PRIVATE = frozenset({"private", "no-store"})
# Headers that tell a shared cache to store: removed from responses that must stay private.
SHARED_CACHE_HEADERS = (
    "CDN-Cache-Control",
    "Cloudflare-CDN-Cache-Control",  # RFC 9213 §2 targeted fields of two large CDNs
    "Akamai-Cache-Control",
    "Surrogate-Control",
    "Surrogate-Key",
)
CACHEABLE_METHODS = frozenset({"GET", "HEAD"})

SURROGATE_KEY = re.compile(r"^[\x21-\x7e]+$")  # keys are sent space-separated

Directive = tuple[str, str | None]  # (lower-case name, argument as written or None)

# ---------------------------------------------------------------------------------------------
# Directives
# ---------------------------------------------------------------------------------------------


def _split_list(value: str) -> list[str]:
    """Split a comma-separated list, leaving commas inside quoted strings alone (RFC 9110 §5.6.1)."""
    parts: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for char in value:
        if escaped:
            escaped = False
        elif quoted and char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == "," and not quoted:
            parts.append("".join(current).strip())
            current = []
            continue
        current.append(char)
    parts.append("".join(current).strip())
    return parts


def _error(message: str, **context: Any) -> PydanticCustomError:
    return PydanticCustomError("cache_directives", message, context)


def _seconds_hint(name: str, argument: str) -> str:
    """'1h' → "write max-age=3600"; the header takes seconds only (RFC 9111 §1.2.2)."""
    try:
        seconds = parse_duration(argument.strip('"'))
    except PydanticCustomError:
        return f"write seconds, such as {name}=3600 for an hour"
    if seconds == int(seconds):
        return f"write seconds: {name}={int(seconds)}"
    return f"write a whole number of seconds, such as {name}={max(1, round(seconds))}"


def parse_directives(value: str, header: str = "Cache-Control") -> tuple[Directive, ...]:
    """Validate a configured Cache-Control-style value; raises PydanticCustomError for the user."""
    if not FIELD_VALUE.match(value):
        raise _error("expected {header} directives on one line, without CR, LF or other control characters, got {got}", header=header, got=repr(value))
    if not value.strip():
        raise _error("expected {header} directives such as 'public, max-age=3600', got {got}", header=header, got=repr(value))
    directives: list[Directive] = []
    seen: set[str] = set()
    for part in _split_list(value):
        if not part:
            raise _error("expected directives separated by single commas, got an empty one in {got}", got=repr(value))
        name, equals, argument = part.partition("=")
        name, argument = name.strip().lower(), argument.strip()
        if not TOKEN.match(name):
            if name and all(TOKEN.match(word) for word in name.split()):
                raise _error("expected directives separated by commas, got {got} (write {fixed})", got=repr(part), fixed=repr(", ".join(part.split())))
            raise _error("expected a directive name such as 'max-age', got {got}", got=repr(part))
        if name not in DIRECTIVES:
            hint = did_you_mean(name, DIRECTIVES)
            raise _error("unknown directive {name}{hint} (known: {known})", name=repr(name), hint=hint, known=", ".join(sorted(DIRECTIVES)))
        if name in seen:
            raise _error("{name} is given twice in {got}", name=name, got=repr(value))
        seen.add(name)
        if name in SECONDS_DIRECTIVES:
            if not equals or not argument:
                raise _error("{name} needs a number of seconds, such as {name}=3600", name=name)
            if not argument.isascii() or not argument.isdigit():
                raise _error("{name} takes a number of seconds, got {got}: {hint}", name=name, got=repr(argument), hint=_seconds_hint(name, argument))
            directives.append((name, str(int(argument))))
        elif name in FIELD_LIST_DIRECTIVES and equals:
            fields = argument[1:-1] if len(argument) >= 2 and argument[0] == argument[-1] == '"' else None
            names = [field.strip() for field in fields.split(",")] if fields is not None else []
            if not names or not all(TOKEN.match(field) for field in names):
                raise _error("{name} takes no value, or a quoted list of header names such as {name}=\"Set-Cookie\", got {got}", name=name, got=repr(argument))
            directives.append((name, '"' + ", ".join(names) + '"'))
        elif equals:
            raise _error("{name} takes no value, got {got}", name=name, got=repr(part))
        else:
            directives.append((name, None))
    for other in ("private", "no-store"):
        if "public" in seen and other in seen:
            raise _error("public contradicts {other}: a response is either for shared caches or not; keep one", other=other)
    return tuple(directives)


def render(directives: tuple[Directive, ...] | list[Directive]) -> str:
    """The canonical header value: directives joined with ', '."""
    return ", ".join(name if argument is None else f"{name}={argument}" for name, argument in directives)


def privatise(directives: tuple[Directive, ...] | list[Directive]) -> str:
    """``private`` plus the directives that do not speak to shared caches only."""
    return render([("private", None), *((name, argument) for name, argument in directives if name not in SHARED_ONLY)])


def _lenient(value: str) -> list[Directive]:
    """An upstream's directives: parsed without judging (the upstream may send anything)."""
    directives: list[Directive] = []
    for part in _split_list(value):
        name, equals, argument = part.partition("=")
        name = name.strip().lower()
        if name:
            directives.append((name, argument.strip() if equals else None))
    return directives


@lru_cache(maxsize=1024)
def upstream_keeps_private(value: str) -> bool:
    """Whether an upstream Cache-Control says ``private`` or ``no-store``."""
    return any(name in KEEP_PRIVATE for name, _ in _lenient(value))


@lru_cache(maxsize=1024)
def privatise_upstream(value: str) -> str:
    """An upstream Cache-Control (neither private nor no-store), made private."""
    return privatise(_lenient(value))


@lru_cache(maxsize=1024)
def merge_vary(upstream: str, configured: tuple[str, ...]) -> str:
    """The upstream's Vary members, then the configured ones it lacks; ``*`` absorbs all."""
    merged: list[str] = []
    seen: set[str] = set()
    for member in (*upstream.split(","), *configured):
        member = member.strip()
        lower = member.lower()
        if lower == "*":
            return "*"
        if member and lower not in seen:
            seen.add(lower)
            merged.append(member)
    return ", ".join(merged)


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------


class CdnSettings(Settings):
    """A route's ``cdn`` block: the caching headers downstream caches are told."""

    cache_control: str | None = Field(
        None, description="Cache-Control for everyone (browsers, proxies, CDNs), e.g. 'public, max-age=3600'; unset: the upstream's is left"
    )
    cdn_cache_control: str | None = Field(None, description="CDN-Cache-Control (RFC 9213): for CDNs only, they obey it over Cache-Control")
    surrogate_control: str | None = Field(None, description="Surrogate-Control: for surrogates (Fastly, Akamai); removed by them before the client")
    surrogate_key: tuple[str, ...] = Field((), description="keys sent space-separated as Surrogate-Key, to purge by tag at the CDN")
    vary: tuple[str, ...] = Field((), description="request headers merged into the response's Vary, e.g. [Accept-Encoding]")
    keep_upstream: bool = Field(False, description="true: a Cache-Control / CDN-Cache-Control / Surrogate-Control / Surrogate-Key the upstream sent is kept; missing ones are added")

    @field_validator("cache_control", "cdn_cache_control", "surrogate_control")
    @classmethod
    def _canonical(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        header = {"cache_control": "Cache-Control", "cdn_cache_control": "CDN-Cache-Control"}.get(info.field_name, "Surrogate-Control")
        return render(parse_directives(value, header))

    @field_validator("surrogate_key")
    @classmethod
    def _check_keys(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        seen: set[str] = set()
        for key in value:
            if not SURROGATE_KEY.match(key):
                raise _error("expected keys of visible ASCII without spaces (they are sent space-separated), got {got}", got=repr(key))
            if key in seen:
                raise _error("the key {key} is given twice", key=repr(key))
            seen.add(key)
        return value

    @field_validator("vary")
    @classmethod
    def _check_vary(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        seen: set[str] = set()
        for name in value:
            if name != "*" and not TOKEN.match(name):
                raise _error("expected request header names such as 'Accept-Encoding', got {got}", got=repr(name))
            if name.lower() in seen:
                raise _error("{name} is given twice (header names are case-insensitive)", name=repr(name))
            seen.add(name.lower())
        if "*" in seen and len(value) > 1:
            raise _error("'*' already varies on everything: give it alone, or list header names")
        return value


# ---------------------------------------------------------------------------------------------
# The policy
# ---------------------------------------------------------------------------------------------


class CdnPolicy(Policy):
    """Sets the route's caching headers on cacheable GET/HEAD responses (see the module doc)."""

    name = "cdn"
    settings_type = CdnSettings

    def __init__(self, settings: CdnSettings, context: PolicyContext) -> None:
        super().__init__(settings, context)
        self.keep_upstream = settings.keep_upstream
        self.cache_control = settings.cache_control
        configured = {
            "CDN-Cache-Control": settings.cdn_cache_control,
            "Surrogate-Control": settings.surrogate_control,
            "Surrogate-Key": " ".join(settings.surrogate_key) or None,
        }
        # Headers for shared caches, set in case 3 (Cache-Control is handled on its own).
        self.shared = tuple((name, value) for name, value in configured.items() if value is not None)
        # Case 2: what Cache-Control becomes when the response must stay private.
        self.private_cache_control = privatise(parse_directives(settings.cache_control)) if settings.cache_control else "private"
        self.vary = settings.vary
        self.vary_value = ", ".join(settings.vary)

    def on_response(self, exchange: Exchange, reply: Reply) -> None:
        if exchange.method not in CACHEABLE_METHODS or not 200 <= reply.status < 400:
            return  # errors, the gateway's own problem responses included, are never touched
        headers = reply.headers
        if self.vary:
            varies = headers.getall("Vary", None)
            headers["Vary"] = merge_vary(", ".join(varies), self.vary) if varies else self.vary_value
        lines = headers.getall("Cache-Control", None)
        upstream = (lines[0] if len(lines) == 1 else ", ".join(lines)) if lines else None
        personal = "Set-Cookie" in headers or exchange.subject is not None or "Authorization" in exchange.request.headers
        if upstream is not None and upstream_keeps_private(upstream):
            if personal:  # case 1 with a personal response: no shared cache may store it
                self._drop_shared(headers)
            return
        if personal:  # case 2
            if upstream is not None and (self.keep_upstream or self.cache_control is None):
                headers["Cache-Control"] = privatise_upstream(upstream)
            else:
                headers["Cache-Control"] = self.private_cache_control
            self._drop_shared(headers)
            return
        # case 3
        if self.cache_control is not None and not (self.keep_upstream and upstream is not None):
            headers["Cache-Control"] = self.cache_control
        if self.keep_upstream:
            for name, value in self.shared:
                if name not in headers:
                    headers[name] = value
        else:
            for name, value in self.shared:
                headers[name] = value

    @staticmethod
    def _drop_shared(headers: Any) -> None:
        for name in SHARED_CACHE_HEADERS:
            if name in headers:
                headers.popall(name)
