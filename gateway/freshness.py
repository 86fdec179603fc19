"""HTTP caching decisions of a shared cache (RFC 9111), as plain functions the cache policy uses.

- ``storable``: may a shared cache store this response at all (§3, §3.5, §5.2.2)?
- ``freshness_lifetime``: for how long is it fresh (§4.2.1): s-maxage, then max-age, then Expires
  minus Date, then the route's ttl (or, for heuristically cacheable statuses with Last-Modified,
  10% of its age, §4.2.2).
- ``current_age``: the Age a stored response has now (§4.2.3); ``corrected_initial_age``, its
  part fixed when the response was received.

Directives are parsed leniently (what upstreams send), case-insensitively, keeping arguments.
"""

from __future__ import annotations

from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Mapping

# RFC 9110 §15.1: statuses a cache may store without explicit freshness (heuristically).
HEURISTIC_STATUSES = frozenset({200, 203, 204, 206, 300, 301, 308, 404, 405, 410, 414, 501})
# RFC 9110 §15: the statuses this cache understands, for must-understand (RFC 9111 §5.2.2.3).
UNDERSTOOD_STATUSES = frozenset(
    [*range(200, 207), *range(300, 309), *range(400, 418), *range(421, 427), 428, 429, 431, 451, *range(500, 506), 511]
) - {305, 306}
# §4.2.4: directives that forbid serving the response stale (s-maxage implies proxy-revalidate).
NO_STALE = ("must-revalidate", "proxy-revalidate", "s-maxage", "no-cache")
HEURISTIC_FRACTION = 0.1  # §4.2.2: "typical setting of this fraction might be 10%"
HEURISTIC_MAX = 86400.0  # and never more than a day, as browsers and Varnish cap it


def directives(value: str | None) -> dict[str, str | None]:
    """Cache-Control as {directive: argument}; unknown directives are kept, quotes removed."""
    found: dict[str, str | None] = {}
    if not value:
        return found
    for part in value.split(","):
        name, equals, argument = part.strip().partition("=")
        name = name.strip().lower()
        if name and name not in found:  # §4.2.1: the first of duplicates
            found[name] = argument.strip().strip('"') if equals else None
    return found


def surrogate_directives(value: str) -> dict[str, str | None]:
    """Surrogate-Control (W3C Edge Architecture) as directives: the untargeted ones (``;name``
    targets another surrogate), max-age without its ``+stale`` part."""
    # Parts targeted at another surrogate go before the first of duplicates is taken.
    found = directives(", ".join(part for part in value.split(",") if ";" not in part))
    if found.get("max-age"):
        found["max-age"] = (found["max-age"] or "").partition("+")[0]
    return found


def _seconds(argument: str | None) -> float | None:
    if argument is None or not argument.isdigit():
        return None  # §1.2.2: an invalid delta-seconds is ignored
    return float(argument)


def _date(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        return None


@dataclass(frozen=True)
class Freshness:
    lifetime: float  # seconds the response is fresh for, from its generation
    explicit: bool  # from the upstream's headers (not the route's ttl or a heuristic)
    public: bool  # public, s-maxage or must-revalidate: may answer requests with Authorization


def storable(
    status: int,
    method: str,
    request_cc: Mapping[str, str | None],
    response_cc: Mapping[str, str | None],
    has_authorization: bool,
    has_set_cookie: bool,
    allow_set_cookie: bool,
    override: bool,
    has_expires: bool = False,
) -> bool:
    """Whether a shared cache may store the response (RFC 9111 §3)."""
    if method not in ("GET", "HEAD"):
        return False
    if status == 206:
        return False  # §3.3: a cache that does not combine partial content must not store it
    if "no-store" in request_cc:
        return False
    if has_set_cookie and not allow_set_cookie:
        return False
    if override:
        return status in HEURISTIC_STATUSES or 200 <= status < 300
    if "must-understand" in response_cc:
        if status not in UNDERSTOOD_STATUSES:
            return False  # §5.2.2.3
    elif "no-store" in response_cc:
        return False  # (with must-understand, no-store is for caches that do not understand the status)
    if "private" in response_cc:
        return False
    if has_authorization and not ("public" in response_cc or "s-maxage" in response_cc or "must-revalidate" in response_cc):
        return False  # §3.5
    return status in HEURISTIC_STATUSES or has_expires or "max-age" in response_cc or "s-maxage" in response_cc or "public" in response_cc


def freshness(headers: Mapping[str, str], response_cc: Mapping[str, str | None], status: int, now: float, ttl: float | None, override: bool) -> Freshness:
    """How long the response is fresh (RFC 9111 §4.2.1), with the route's ttl when none is given."""
    # §3.5: these let a shared cache answer requests that carry Authorization.
    public = "public" in response_cc or "s-maxage" in response_cc or "must-revalidate" in response_cc
    if override and ttl is not None:
        return Freshness(ttl, False, public)
    if "no-cache" in response_cc:
        return Freshness(0.0, True, public)  # §5.2.2.4: stored, but validated before every use
    for name in ("s-maxage", "max-age"):
        seconds = _seconds(response_cc.get(name)) if name in response_cc else None
        if seconds is not None:
            return Freshness(seconds, True, public)
    expires = headers.get("Expires")
    if expires is not None:
        at = _date(expires)
        generated = _date(headers.get("Date")) or now
        return Freshness(max((at or 0.0) - generated, 0.0), True, public)  # an invalid Expires is in the past
    if ttl is not None:
        return Freshness(ttl, False, public)
    modified = _date(headers.get("Last-Modified"))
    if modified is not None and (status in HEURISTIC_STATUSES or "public" in response_cc):
        generated = _date(headers.get("Date")) or now
        return Freshness(min(max(generated - modified, 0.0) * HEURISTIC_FRACTION, HEURISTIC_MAX), False, public)
    return Freshness(0.0, False, public)


def current_age(headers: Mapping[str, str], request_time: float, response_time: float, now: float) -> float:
    """RFC 9111 §4.2.3: the corrected initial age plus the time resident in the cache."""
    return corrected_initial_age(headers, request_time, response_time) + (now - response_time)


def corrected_initial_age(headers: Mapping[str, str], request_time: float, response_time: float) -> float:
    """RFC 9111 §4.2.3: the age a response had when it was received (fixed once stored)."""
    age_value = _seconds((headers.get("Age") or "").split(",")[0].strip()) or 0.0  # §5.1: the first of a list
    date_value = _date(headers.get("Date")) or response_time
    apparent_age = max(0.0, response_time - date_value)
    response_delay = response_time - request_time
    corrected_age_value = age_value + response_delay
    return max(apparent_age, corrected_age_value)
