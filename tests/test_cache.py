"""cache: the shared HTTP cache (RFC 9111) over real sockets, with the memory store and Redis.

Every test talks to a real gateway (in-process, or ``python -m gateway run`` processes) in front
of a real recording upstream; ``upstream.requests`` counts what got past the cache. Entries are
made stale without sleeping where possible: an upstream ``Date`` in the past is part of the age
(RFC 9111 §4.2.3), so ``max-age=60`` with a Date two minutes old is stale on arrival.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import signal
import time
from email.utils import formatdate
from typing import Any, Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import RedisServer, Upstream, base_config, free_port, parse_raw_response, raw_request

ISSUER = "https://issuer.example"
AUDIENCE = "marketplace-api"
HS_SECRET = "cache-tests-secret-at-least-32-bytes-long"


# -- helpers ----------------------------------------------------------------------------------------


def cached(upstream_url: str, **cache: Any) -> dict[str, Any]:
    """The catch-all route with a cache block."""
    config = base_config(upstream_url)
    config["routes"][0]["cache"] = cache
    return config


def http_date(at: float) -> str:
    return formatdate(at, usegmt=True)


def numbered(upstream: Upstream, headers: dict[str, str] | Callable[[web.Request], dict[str, str]] | None = None, status: int = 200) -> None:
    """The upstream answers ``response N`` (N: its request count), with these headers."""

    async def handler(request: web.Request) -> web.Response:
        extra = headers(request) if callable(headers) else dict(headers or {})
        return web.Response(status=status, text=f"response {len(upstream.requests)}", headers=extra)

    upstream.handler = handler


class Answer:
    def __init__(self, status: int, headers: Any, body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    @property
    def cache_status(self) -> str:
        return self.headers.get("Cache-Status", "")

    @property
    def params(self) -> list[str]:
        return [part.strip() for part in self.cache_status.split(";")][1:]

    @property
    def ttl(self) -> int:
        return next(int(p.removeprefix("ttl=")) for p in self.params if p.startswith("ttl="))

    @property
    def hit(self) -> bool:
        return "hit" in self.params


async def fetch(client: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None, method: str = "GET", data: bytes | None = None) -> Answer:
    async with client.request(method, url, headers=headers, data=data) as response:
        return Answer(response.status, response.headers, await response.read())


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def token(subject: str) -> str:
    now = int(time.time())
    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = b64url(json.dumps({"iss": ISSUER, "aud": AUDIENCE, "sub": subject, "iat": now, "exp": now + 300}).encode())
    signature = hmac.new(HS_SECRET.encode(), f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{b64url(signature)}"


def bearer(subject: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(subject)}"}


async def eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def eventually_async(check: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def stale_on_arrival(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Fresh for 60 s, but generated two minutes ago: stale as soon as it is stored."""
    return {"Cache-Control": "max-age=60", "Date": http_date(time.time() - 120), **(extra or {})}


async def stale_v1_answering_304(request: web.Request) -> web.Response:
    """An upstream whose "body v1" (ETag "v1") is stale on arrival; a revalidation gets a 304."""
    if request.headers.get("If-None-Match") == '"v1"':
        return web.Response(status=304, headers={"ETag": '"v1"', "Cache-Control": "max-age=60"})
    return web.Response(text="body v1", headers=stale_on_arrival({"ETag": '"v1"'}))


def redis_keys(server: RedisServer, pattern: str) -> list[str]:
    lines = server.command("KEYS", pattern).decode().split("\r\n")
    return [line for line in lines[1:] if line and not line.startswith("$")]


def entry_keys(server: RedisServer) -> list[str]:
    """Keys of stored responses (not the Vary indexes, purge's index or locks)."""
    return [key for key in redis_keys(server, "gw:c:*") if not key.endswith((":vary", ":index", ":index:exp", ":lock"))]


def redis_strlen(server: RedisServer, key: str) -> int:
    return int(server.command("STRLEN", key).decode().strip().lstrip(":"))


# -- hit, miss, Age, ttl ----------------------------------------------------------------------------


async def test_a_first_get_is_a_stored_miss_and_the_second_a_hit_with_age_that_never_reaches_the_upstream(upstream, start_gateway, client) -> None:
    numbered(upstream)
    gateway = await start_gateway(cached(upstream.url, ttl="1m"))
    first = await fetch(client, gateway.url + "/products")
    assert first.status == 200 and first.body == b"response 1"
    assert first.cache_status == "gateway; fwd=miss; stored"
    second = await fetch(client, gateway.url + "/products")
    assert second.status == 200 and second.body == b"response 1"
    assert second.cache_status.startswith("gateway; hit; ttl=")
    assert 58 <= second.ttl <= 60
    assert second.headers["Age"].isdigit() and int(second.headers["Age"]) <= 2
    assert len(upstream.requests) == 1


async def test_the_age_of_a_hit_counts_the_time_spent_in_the_cache(upstream, start_gateway, client) -> None:
    numbered(upstream, {"Date": http_date(time.time() - 30)})  # already 30 s old when stored
    gateway = await start_gateway(cached(upstream.url, ttl="1m"))
    await fetch(client, gateway.url + "/")
    hit = await fetch(client, gateway.url + "/")
    assert hit.hit and 29 <= int(hit.headers["Age"]) <= 32
    assert 28 <= hit.ttl <= 31


async def test_an_entry_is_a_miss_again_once_the_routes_ttl_has_passed(upstream, start_gateway, client) -> None:
    numbered(upstream)
    # Age counts from the response's Date, which has whole seconds: a ttl of 2 s keeps the
    # second request a hit however late in its second the first one was answered.
    gateway = await start_gateway(cached(upstream.url, ttl="2s"))
    await fetch(client, gateway.url + "/")
    assert (await fetch(client, gateway.url + "/")).hit
    await asyncio.sleep(2.1)
    after = await fetch(client, gateway.url + "/")
    assert not after.hit and after.body == b"response 2"
    assert len(upstream.requests) == 2


# -- the upstream's directives ----------------------------------------------------------------------


@pytest.mark.parametrize("cache_control", ["no-store", "private", "private, max-age=60", "no-store, max-age=60", "s-maxage=60, no-store"])
async def test_a_response_marked_no_store_or_private_is_never_stored(cache_control: str, upstream, start_gateway, client) -> None:
    numbered(upstream, {"Cache-Control": cache_control})
    gateway = await start_gateway(cached(upstream.url, ttl="1m"))
    first = await fetch(client, gateway.url + "/")
    assert "stored" not in first.params
    second = await fetch(client, gateway.url + "/")
    assert not second.hit and second.body == b"response 2"


@pytest.mark.parametrize(
    "headers, low, high",
    [
        pytest.param({"Cache-Control": "max-age=90"}, 88, 90, id="max-age-over-ttl"),
        pytest.param({"Cache-Control": "max-age=90, s-maxage=200"}, 198, 200, id="s-maxage-over-max-age"),
        pytest.param({"Expires": "+150"}, 148, 150, id="expires-minus-date"),
        pytest.param({"Cache-Control": "max-age=90", "Expires": "+500"}, 88, 90, id="max-age-over-expires"),
    ],
)
async def test_the_upstreams_freshness_wins_over_the_routes_ttl(headers: dict[str, str], low: int, high: int, upstream, start_gateway, client) -> None:
    def answer(request: web.Request) -> dict[str, str]:
        now = time.time()
        made = dict(headers)
        if "Expires" in made:
            made["Expires"] = http_date(now + int(made["Expires"]))
            made["Date"] = http_date(now)
        return made

    numbered(upstream, answer)
    gateway = await start_gateway(cached(upstream.url, ttl="10s"))
    await fetch(client, gateway.url + "/")
    hit = await fetch(client, gateway.url + "/")
    assert hit.hit and low <= hit.ttl <= high, hit.cache_status


async def test_an_expires_in_the_past_is_not_fresh(upstream, start_gateway, client) -> None:
    numbered(upstream, lambda request: {"Expires": http_date(time.time() - 10), "Date": http_date(time.time())})
    gateway = await start_gateway(cached(upstream.url, ttl="1m"))
    await fetch(client, gateway.url + "/")
    assert not (await fetch(client, gateway.url + "/")).hit
    assert len(upstream.requests) == 2


async def test_override_makes_the_ttl_win_and_stores_private_responses(upstream, start_gateway, client) -> None:
    numbered(upstream, {"Cache-Control": "private, max-age=5"})
    gateway = await start_gateway(cached(upstream.url, ttl="200s", override=True))
    assert "stored" in (await fetch(client, gateway.url + "/")).params
    hit = await fetch(client, gateway.url + "/")
    assert hit.hit and 198 <= hit.ttl <= 200
    assert len(upstream.requests) == 1


async def test_an_upstream_age_header_counts_toward_the_entrys_age(upstream, start_gateway, client) -> None:
    # Another cache in front of the upstream already held this response for 100 of its 60 s.
    numbered(upstream, {"Cache-Control": "max-age=60", "Age": "100"})
    gateway = await start_gateway(cached(upstream.url, ttl="1m"))
    await fetch(client, gateway.url + "/")
    second = await fetch(client, gateway.url + "/")
    assert not second.hit or "fwd=stale" in second.params, second.cache_status
    assert len(upstream.requests) == 2


async def test_a_request_with_no_cache_revalidates_with_the_stored_etag(upstream, start_gateway, client) -> None:
    async def handler(request: web.Request) -> web.Response:
        if request.headers.get("If-None-Match") == '"v1"':
            return web.Response(status=304, headers={"ETag": '"v1"', "Cache-Control": "max-age=60"})
        return web.Response(text="body v1", headers={"ETag": '"v1"', "Cache-Control": "max-age=60"})

    upstream.handler = handler
    gateway = await start_gateway(cached(upstream.url))
    await fetch(client, gateway.url + "/")
    revalidated = await fetch(client, gateway.url + "/", {"Cache-Control": "no-cache"})
    assert revalidated.status == 200 and revalidated.body == b"body v1"
    assert len(upstream.requests) == 2
    assert upstream.requests[1].headers.get("If-None-Match") == '"v1"'
    assert "fwd-status=304" in revalidated.params


async def test_a_request_with_no_store_bypasses_the_cache(upstream, start_gateway, client) -> None:
    numbered(upstream, {"Cache-Control": "max-age=60"})
    gateway = await start_gateway(cached(upstream.url))
    await fetch(client, gateway.url + "/")
    bypassed = await fetch(client, gateway.url + "/", {"Cache-Control": "no-store"})
    assert bypassed.body == b"response 2" and bypassed.cache_status == "gateway; fwd=bypass"


# -- Set-Cookie and Authorization -------------------------------------------------------------------


async def test_a_response_with_set_cookie_is_not_stored(upstream, start_gateway, client) -> None:
    numbered(upstream, {"Cache-Control": "max-age=60", "Set-Cookie": "session=secret"})
    gateway = await start_gateway(cached(upstream.url))
    await fetch(client, gateway.url + "/")
    second = await fetch(client, gateway.url + "/")
    assert not second.hit and second.body == b"response 2"


async def test_allow_set_cookie_stores_the_response_but_never_the_cookie(upstream, start_gateway, client) -> None:
    numbered(upstream, {"Cache-Control": "max-age=60", "Set-Cookie": "session=secret"})
    gateway = await start_gateway(cached(upstream.url, allow_set_cookie=True))
    first = await fetch(client, gateway.url + "/")
    assert first.headers.get("Set-Cookie") == "session=secret"  # the one who caused it gets it
    hit = await fetch(client, gateway.url + "/")
    assert hit.hit and hit.body == b"response 1"
    assert "Set-Cookie" not in hit.headers
    assert len(upstream.requests) == 1


async def test_a_request_with_authorization_is_not_answered_from_a_non_public_entry(upstream, start_gateway, client) -> None:
    numbered(upstream, {"Cache-Control": "max-age=60"})
    gateway = await start_gateway(cached(upstream.url))
    await fetch(client, gateway.url + "/")
    authorized = await fetch(client, gateway.url + "/", {"Authorization": "Bearer abc"})
    assert not authorized.hit and authorized.body == b"response 2"
    assert "stored" not in authorized.params  # nor is its own answer stored
    assert (await fetch(client, gateway.url + "/")).body == b"response 1"


@pytest.mark.parametrize("cache_control", ["public, max-age=60", "s-maxage=60"])
async def test_a_request_with_authorization_is_answered_from_a_public_or_s_maxage_entry(cache_control: str, upstream, start_gateway, client) -> None:
    numbered(upstream, {"Cache-Control": cache_control})
    gateway = await start_gateway(cached(upstream.url))
    await fetch(client, gateway.url + "/")
    authorized = await fetch(client, gateway.url + "/", {"Authorization": "Bearer abc"})
    assert authorized.hit and authorized.body == b"response 1"
    assert len(upstream.requests) == 1


async def test_key_user_gives_each_authenticated_user_an_entry_of_their_own(upstream, start_gateway, client) -> None:
    numbered(upstream, {"Cache-Control": "max-age=60"})
    config = cached(upstream.url, key=["user"])
    config["routes"][0]["auth"] = {"required": True}
    config["auth"] = {"jwt": {"issuer": ISSUER, "audience": AUDIENCE, "algorithms": ["HS256"], "secret": HS_SECRET}}
    gateway = await start_gateway(config)
    alice = await fetch(client, gateway.url + "/me", bearer("alice"))
    bob = await fetch(client, gateway.url + "/me", bearer("bob"))
    assert (alice.body, bob.body) == (b"response 1", b"response 2")
    assert not bob.hit
    alice_again = await fetch(client, gateway.url + "/me", bearer("alice"))
    bob_again = await fetch(client, gateway.url + "/me", bearer("bob"))
    assert alice_again.hit and alice_again.body == b"response 1"
    assert bob_again.hit and bob_again.body == b"response 2"
    assert len(upstream.requests) == 2
    assert (await fetch(client, gateway.url + "/me")).status == 401  # no token: auth answers first


# -- Vary ---------------------------------------------------------------------------------------------


async def test_vary_keeps_one_entry_per_variant(upstream, start_gateway, client) -> None:
    numbered(upstream, {"Cache-Control": "max-age=60", "Vary": "Accept-Language"})
    gateway = await start_gateway(cached(upstream.url))
    fr = await fetch(client, gateway.url + "/", {"Accept-Language": "fr"})
    en = await fetch(client, gateway.url + "/", {"Accept-Language": "en"})
    assert (fr.body, en.body) == (b"response 1", b"response 2") and not en.hit
    fr_hit = await fetch(client, gateway.url + "/", {"Accept-Language": "fr"})
    en_hit = await fetch(client, gateway.url + "/", {"Accept-Language": "en"})
    assert fr_hit.hit and fr_hit.body == b"response 1"
    assert en_hit.hit and en_hit.body == b"response 2"
    assert len(upstream.requests) == 2


@pytest.mark.parametrize("vary", ["*", "Accept-Language, *"])
async def test_a_response_with_vary_star_is_never_stored(vary: str, upstream, start_gateway, client) -> None:
    numbered(upstream, {"Cache-Control": "max-age=60", "Vary": vary})
    gateway = await start_gateway(cached(upstream.url))
    await fetch(client, gateway.url + "/")
    second = await fetch(client, gateway.url + "/")
    assert not second.hit and second.body == b"response 2"


# -- conditional requests and revalidation -----------------------------------------------------------


async def test_if_none_match_with_the_stored_etag_is_answered_304_from_the_cache(upstream, start_gateway, client) -> None:
    numbered(upstream, {"Cache-Control": "max-age=60", "ETag": '"abc"'})
    gateway = await start_gateway(cached(upstream.url))
    await fetch(client, gateway.url + "/")
    matching = await fetch(client, gateway.url + "/", {"If-None-Match": '"zzz", "abc"'})
    assert matching.status == 304 and matching.body == b""
    assert matching.headers["ETag"] == '"abc"' and matching.hit
    other = await fetch(client, gateway.url + "/", {"If-None-Match": '"zzz"'})
    assert other.status == 200 and other.body == b"response 1"
    assert len(upstream.requests) == 1


async def test_if_modified_since_is_answered_304_from_the_cache_when_not_modified_since(upstream, start_gateway, client) -> None:
    modified = time.time() - 3600
    numbered(upstream, {"Cache-Control": "max-age=60", "Last-Modified": http_date(modified)})
    gateway = await start_gateway(cached(upstream.url))
    await fetch(client, gateway.url + "/")
    unchanged = await fetch(client, gateway.url + "/", {"If-Modified-Since": http_date(modified)})
    assert unchanged.status == 304 and unchanged.body == b""
    changed = await fetch(client, gateway.url + "/", {"If-Modified-Since": http_date(modified - 60)})
    assert changed.status == 200 and changed.body == b"response 1"
    assert len(upstream.requests) == 1


async def test_a_stale_entry_is_revalidated_with_its_etag_and_a_304_makes_it_fresh_again(upstream, start_gateway, client) -> None:
    async def handler(request: web.Request) -> web.Response:
        if request.headers.get("If-None-Match") == '"v1"':
            return web.Response(status=304, headers={"ETag": '"v1"', "Cache-Control": "max-age=60", "X-Checked": "yes"})
        return web.Response(text="body v1", headers=stale_on_arrival({"ETag": '"v1"'}))

    upstream.handler = handler
    gateway = await start_gateway(cached(upstream.url))
    await fetch(client, gateway.url + "/")
    revalidated = await fetch(client, gateway.url + "/")
    assert len(upstream.requests) == 2
    assert upstream.requests[1].headers.get("If-None-Match") == '"v1"'
    assert revalidated.status == 200 and revalidated.body == b"body v1"
    assert revalidated.cache_status == "gateway; hit; fwd=stale; fwd-status=304; stored"
    fresh = await fetch(client, gateway.url + "/")
    assert fresh.hit and "fwd=stale" not in fresh.params and fresh.body == b"body v1"
    assert fresh.headers["X-Checked"] == "yes"  # the 304's headers updated the entry
    assert 58 <= fresh.ttl <= 60
    assert len(upstream.requests) == 2


async def test_a_stale_entry_is_revalidated_with_if_modified_since_from_its_last_modified(upstream, start_gateway, client) -> None:
    modified = http_date(time.time() - 3600)

    async def handler(request: web.Request) -> web.Response:
        if request.headers.get("If-Modified-Since") == modified:
            return web.Response(status=304, headers={"Cache-Control": "max-age=60"})
        return web.Response(text="body", headers=stale_on_arrival({"Last-Modified": modified}))

    upstream.handler = handler
    gateway = await start_gateway(cached(upstream.url))
    await fetch(client, gateway.url + "/")
    again = await fetch(client, gateway.url + "/")
    assert again.status == 200 and again.body == b"body" and "fwd-status=304" in again.params
    assert (await fetch(client, gateway.url + "/")).hit
    assert len(upstream.requests) == 2


async def test_a_304_for_the_clients_own_etag_does_not_freshen_a_different_stored_entry(upstream, start_gateway, client) -> None:
    # The cache holds a stale v1; the upstream moved on to v2, which the client already has.
    version = {"etag": '"v1"'}

    async def handler(request: web.Request) -> web.Response:
        etag = version["etag"]
        if request.headers.get("If-None-Match") == etag:
            return web.Response(status=304, headers={"ETag": etag, "Cache-Control": "max-age=60"})
        return web.Response(text=f"body {etag}", headers=stale_on_arrival({"ETag": etag}) if etag == '"v1"' else {"ETag": etag, "Cache-Control": "max-age=60"})

    upstream.handler = handler
    gateway = await start_gateway(cached(upstream.url))
    await fetch(client, gateway.url + "/")
    version["etag"] = '"v2"'
    mine = await fetch(client, gateway.url + "/", {"If-None-Match": '"v2"'})
    assert mine.status in (200, 304)
    if mine.status == 200:
        assert mine.body == b'body "v2"'
    plain = await fetch(client, gateway.url + "/")
    assert plain.status == 200 and plain.body == b'body "v2"', (plain.headers.get("ETag"), plain.body)


# -- invalidation -------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
async def test_a_successful_unsafe_request_makes_the_next_get_of_its_uri_a_miss(method: str, upstream, start_gateway, client) -> None:
    numbered(upstream, {"Cache-Control": "max-age=60"})
    gateway = await start_gateway(cached(upstream.url))
    await fetch(client, gateway.url + "/item?id=1")
    await fetch(client, gateway.url + "/item?id=2")
    assert (await fetch(client, gateway.url + "/item?id=1", method=method, data=b"x")).status == 200
    after = await fetch(client, gateway.url + "/item?id=1")
    assert not after.hit and after.body == b"response 4"
    assert (await fetch(client, gateway.url + "/item?id=2")).hit  # another URI is kept


@pytest.mark.parametrize("status", [400, 404, 500, 503])
async def test_a_failed_post_leaves_the_entry_in_place(status: int, upstream, start_gateway, client) -> None:
    async def handler(request: web.Request) -> web.Response:
        if request.method == "POST":
            return web.Response(status=status, text="no")
        return web.Response(text=f"response {len(upstream.requests)}", headers={"Cache-Control": "max-age=60"})

    upstream.handler = handler
    gateway = await start_gateway(cached(upstream.url))
    await fetch(client, gateway.url + "/item")
    assert (await fetch(client, gateway.url + "/item", method="POST", data=b"x")).status == status
    after = await fetch(client, gateway.url + "/item")
    assert after.hit and after.body == b"response 1"


async def test_a_post_removes_every_vary_variant_of_its_uri(upstream, start_gateway, client) -> None:
    numbered(upstream, {"Cache-Control": "max-age=60", "Vary": "Accept-Language"})
    gateway = await start_gateway(cached(upstream.url))
    await fetch(client, gateway.url + "/", {"Accept-Language": "fr"})  # response 1
    await fetch(client, gateway.url + "/", {"Accept-Language": "en"})  # response 2
    await fetch(client, gateway.url + "/", method="POST", data=b"x")  # response 3
    fr = await fetch(client, gateway.url + "/", {"Accept-Language": "fr"})
    assert not fr.hit and fr.body == b"response 4"
    en = await fetch(client, gateway.url + "/", {"Accept-Language": "en"})
    assert not en.hit and en.body == b"response 5", en.cache_status


# -- single flight -------------------------------------------------------------------------------------


async def test_fifty_concurrent_cold_misses_make_exactly_one_upstream_request(upstream, start_gateway, client) -> None:
    async def handler(request: web.Request) -> web.Response:
        await asyncio.sleep(0.2)
        return web.Response(text="only once", headers={"Cache-Control": "max-age=60"})

    upstream.handler = handler
    gateway = await start_gateway(cached(upstream.url))
    connector = aiohttp.TCPConnector(limit=100)
    async with aiohttp.ClientSession(connector=connector) as session:
        answers = await asyncio.gather(*(fetch(session, gateway.url + "/cold") for _ in range(50)))
    assert {a.status for a in answers} == {200} and {a.body for a in answers} == {b"only once"}
    assert len(upstream.requests) == 1
    assert sum(a.hit for a in answers) == 49


async def test_a_client_that_leaves_during_a_miss_does_not_hold_up_the_next_requests(upstream, start_gateway, client) -> None:
    slow = {"delay": 1.0}

    async def handler(request: web.Request) -> web.Response:
        await asyncio.sleep(slow["delay"])
        return web.Response(text="ok", headers={"Cache-Control": "max-age=60"})

    upstream.handler = handler
    gateway = await start_gateway(cached(upstream.url))  # lock_timeout: 5s
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(fetch(client, gateway.url + "/"), 0.2)
    await asyncio.sleep(0.1)
    slow["delay"] = 0
    started = time.monotonic()
    answer = await fetch(client, gateway.url + "/")
    assert answer.status == 200
    assert time.monotonic() - started < 2.5, "waited for a request whose client had left"


# -- stale-while-revalidate and stale-if-error ---------------------------------------------------------


async def test_stale_while_revalidate_serves_the_stale_entry_at_once_and_refreshes_it_once_in_the_background(upstream, start_gateway, client) -> None:
    async def handler(request: web.Request) -> web.Response:
        count = len(upstream.requests)
        if count == 1:
            return web.Response(text="old", headers=stale_on_arrival())
        await asyncio.sleep(2.0)
        return web.Response(text="new", headers={"Cache-Control": "max-age=60"})

    upstream.handler = handler
    gateway = await start_gateway(cached(upstream.url, stale_while_revalidate="10m"))
    await fetch(client, gateway.url + "/")
    started = time.monotonic()
    stale = await asyncio.gather(*(fetch(client, gateway.url + "/") for _ in range(5)))
    assert time.monotonic() - started < 1.5, "the stale answers waited for the refresh (it takes 2 s)"
    assert all(a.status == 200 and a.body == b"old" and "fwd=stale" in a.params and a.hit for a in stale)
    await eventually(lambda: len(upstream.requests) == 2)
    for _ in range(100):  # the refresh answers after 2 s and is stored
        fresh = await fetch(client, gateway.url + "/")
        if fresh.body == b"new":
            break
        await asyncio.sleep(0.1)
    assert fresh.hit and fresh.body == b"new" and "fwd=stale" not in fresh.params
    assert len(upstream.requests) == 2


async def test_a_background_refresh_never_stores_an_upstream_error(upstream, start_gateway, client) -> None:
    async def handler(request: web.Request) -> web.Response:
        if len(upstream.requests) == 1:
            return web.Response(text="good", headers=stale_on_arrival())
        return web.Response(status=500, text="broken")

    upstream.handler = handler
    gateway = await start_gateway(cached(upstream.url, stale_while_revalidate="10m"))
    await fetch(client, gateway.url + "/")
    assert (await fetch(client, gateway.url + "/")).body == b"good"
    await eventually(lambda: len(upstream.requests) == 2)
    await asyncio.sleep(0.2)
    after = await fetch(client, gateway.url + "/")
    assert not (after.hit and after.status == 500), "a 500 was served from the cache"


async def test_a_background_refresh_never_stores_the_304_of_the_clients_conditional_request(upstream, start_gateway, client) -> None:
    upstream.handler = stale_v1_answering_304
    gateway = await start_gateway(cached(upstream.url, stale_while_revalidate="10m"))
    await fetch(client, gateway.url + "/")
    conditional = await fetch(client, gateway.url + "/", {"If-None-Match": '"v1"'})
    assert conditional.status == 304
    await eventually(lambda: len(upstream.requests) == 2)
    await asyncio.sleep(0.2)
    plain = await fetch(client, gateway.url + "/")
    assert plain.status == 200 and plain.body == b"body v1"


async def test_stale_if_error_answers_with_the_stale_entry_when_the_upstream_is_down(upstream, start_gateway, client) -> None:
    numbered(upstream, stale_on_arrival())
    gateway = await start_gateway(cached(upstream.url, stale_if_error="10m"))
    await fetch(client, gateway.url + "/")
    await upstream.stop()
    answer = await fetch(client, gateway.url + "/")
    assert answer.status == 200 and answer.body == b"response 1"
    assert answer.hit and "fwd=stale" in answer.params
    assert any(p.startswith("fwd-status=") for p in answer.params)


async def test_without_stale_if_error_a_stale_entry_does_not_hide_a_dead_upstream(upstream, start_gateway, client) -> None:
    numbered(upstream, stale_on_arrival())
    gateway = await start_gateway(cached(upstream.url))
    await fetch(client, gateway.url + "/")
    await upstream.stop()
    assert (await fetch(client, gateway.url + "/")).status == 502


async def test_stale_if_error_answers_when_the_routes_upstream_is_a_dead_port(upstream, start_gateway, client, redis_server) -> None:
    numbered(upstream, stale_on_arrival())
    live = await start_gateway(on_redis(cached(upstream.url, stale_if_error="10m"), redis_server))
    await fetch(client, live.url + "/")  # stored in Redis, stale already
    dead = f"http://127.0.0.1:{free_port()}"
    config = on_redis(cached(dead, stale_if_error="10m"), redis_server)
    answer = await fetch(client, (await start_gateway(config)).url + "/")
    assert answer.status == 200 and answer.body == b"response 1" and "fwd=stale" in answer.params
    strict = await start_gateway(on_redis(cached(dead), redis_server))
    assert (await fetch(client, strict.url + "/")).status == 502


async def test_stale_if_error_answers_when_the_upstream_answers_503(upstream, start_gateway, client) -> None:
    async def handler(request: web.Request) -> web.Response:
        if len(upstream.requests) == 1:
            return web.Response(text="good", headers=stale_on_arrival())
        return web.Response(status=503, text="overloaded")

    upstream.handler = handler
    gateway = await start_gateway(cached(upstream.url, stale_if_error="10m"))
    await fetch(client, gateway.url + "/")
    answer = await fetch(client, gateway.url + "/")
    assert answer.status == 200 and answer.body == b"good" and "fwd=stale" in answer.params


# -- HEAD, sizes, chunked ------------------------------------------------------------------------------


async def test_a_head_is_answered_from_a_stored_get_with_its_content_length_and_no_body(upstream, start_gateway, client) -> None:
    numbered(upstream, {"Cache-Control": "max-age=60"})
    gateway = await start_gateway(cached(upstream.url))
    await fetch(client, gateway.url + "/page")
    raw = await raw_request(gateway.port, b"HEAD /page HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 2)
    status, headers, body = parse_raw_response(raw)
    assert status == 200 and body == b""
    assert headers["content-length"] == str(len(b"response 1"))
    assert headers["cache-status"].startswith("gateway; hit")
    assert len(upstream.requests) == 1


async def test_an_unconditional_head_on_a_stale_entry_gets_a_200_and_refreshes_the_entry(upstream, start_gateway, client) -> None:
    upstream.handler = stale_v1_answering_304
    gateway = await start_gateway(cached(upstream.url))
    await fetch(client, gateway.url + "/")
    head = await fetch(client, gateway.url + "/", method="HEAD")
    assert head.status == 200 and head.headers["Content-Length"] == "7", head.cache_status  # not the upstream's 304
    assert upstream.requests[1].method == "HEAD" and upstream.requests[1].headers.get("If-None-Match") == '"v1"'
    after = await fetch(client, gateway.url + "/")
    assert after.hit and after.body == b"body v1" and len(upstream.requests) == 2


async def test_a_head_miss_does_not_store_an_empty_body_for_the_next_get(upstream, start_gateway, client) -> None:
    numbered(upstream, {"Cache-Control": "max-age=60"})
    gateway = await start_gateway(cached(upstream.url))
    assert (await fetch(client, gateway.url + "/", method="HEAD")).status == 200
    get = await fetch(client, gateway.url + "/")
    assert get.body == b"response 2"


async def test_a_response_without_content_length_is_not_stored(upstream, start_gateway, client) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Cache-Control": "max-age=60"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(b"chunk one ")
        await response.write(b"chunk two")
        await response.write_eof()
        return response

    upstream.handler = handler
    gateway = await start_gateway(cached(upstream.url))
    first = await fetch(client, gateway.url + "/")
    assert first.body == b"chunk one chunk two" and "stored" not in first.params
    second = await fetch(client, gateway.url + "/")
    assert not second.hit and second.body == b"chunk one chunk two"
    assert len(upstream.requests) == 2


async def test_a_body_over_max_entry_size_is_not_stored(upstream, start_gateway, client) -> None:
    async def handler(request: web.Request) -> web.Response:
        size = int(request.query["size"])
        return web.Response(body=b"x" * size, headers={"Cache-Control": "max-age=60"})

    upstream.handler = handler
    gateway = await start_gateway(cached(upstream.url, max_entry_size="1kb"))
    for _ in range(2):
        big = await fetch(client, gateway.url + "/?size=1025")
        assert len(big.body) == 1025 and not big.hit
    await fetch(client, gateway.url + "/?size=1024")
    assert (await fetch(client, gateway.url + "/?size=1024")).hit
    assert len(upstream.requests) == 3


# -- the key: query and headers ------------------------------------------------------------------------


async def test_the_query_is_part_of_the_key_in_any_order(upstream, start_gateway, client) -> None:
    numbered(upstream, {"Cache-Control": "max-age=60"})
    gateway = await start_gateway(cached(upstream.url))
    await fetch(client, gateway.url + "/s?a=1&b=2")
    assert (await fetch(client, gateway.url + "/s?b=2&a=1")).hit
    assert not (await fetch(client, gateway.url + "/s?a=1&b=3")).hit
    assert not (await fetch(client, gateway.url + "/s")).hit


async def test_ignore_query_shares_one_entry_for_every_query(upstream, start_gateway, client) -> None:
    numbered(upstream, {"Cache-Control": "max-age=60"})
    gateway = await start_gateway(cached(upstream.url, ignore_query=True))
    await fetch(client, gateway.url + "/s?a=1")
    for url in ("/s?a=2", "/s", "/s?utm=x&a=1"):
        answer = await fetch(client, gateway.url + url)
        assert answer.hit and answer.body == b"response 1", url
    assert not (await fetch(client, gateway.url + "/other?a=1")).hit


async def test_key_query_keeps_only_the_named_parameters_in_the_key(upstream, start_gateway, client) -> None:
    numbered(upstream, {"Cache-Control": "max-age=60"})
    gateway = await start_gateway(cached(upstream.url, key_query=["page", "sort"]))
    await fetch(client, gateway.url + "/list?page=1&sort=asc&utm_source=a")
    same = await fetch(client, gateway.url + "/list?utm_source=b&sort=asc&page=1")
    assert same.hit and same.body == b"response 1"
    assert not (await fetch(client, gateway.url + "/list?page=2&sort=asc")).hit
    assert not (await fetch(client, gateway.url + "/list?page=1")).hit


async def test_key_headers_give_each_header_value_its_own_entry(upstream, start_gateway, client) -> None:
    numbered(upstream, {"Cache-Control": "max-age=60"})
    gateway = await start_gateway(cached(upstream.url, key_headers=["X-Tenant"]))
    acme = await fetch(client, gateway.url + "/", {"X-Tenant": "acme"})
    globex = await fetch(client, gateway.url + "/", {"X-Tenant": "globex"})
    assert (acme.body, globex.body) == (b"response 1", b"response 2") and not globex.hit
    again = await fetch(client, gateway.url + "/", {"X-Tenant": "acme"})
    assert again.hit and again.body == b"response 1"
    assert not (await fetch(client, gateway.url + "/")).hit  # no header: another entry


async def test_a_post_with_the_same_key_header_invalidates_that_tenants_entry(upstream, start_gateway, client) -> None:
    numbered(upstream, {"Cache-Control": "max-age=60"})
    gateway = await start_gateway(cached(upstream.url, key_headers=["X-Tenant"]))
    await fetch(client, gateway.url + "/", {"X-Tenant": "acme"})
    await fetch(client, gateway.url + "/", {"X-Tenant": "acme"}, method="POST", data=b"x")
    assert not (await fetch(client, gateway.url + "/", {"X-Tenant": "acme"})).hit


# -- Redis ----------------------------------------------------------------------------------------------


def on_redis(config: dict[str, Any], redis_server: RedisServer) -> dict[str, Any]:
    config["redis"] = {"url": redis_server.url, "timeout": "1s"}
    return config


async def test_large_bodies_are_stored_compressed_in_redis_and_served_intact(upstream, start_gateway, client, redis_server) -> None:
    body = b"".join(b"line %06d of a compressible catalogue page\n" % i for i in range(5000))

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=body, headers={"Cache-Control": "max-age=60", "Content-Type": "text/plain"})

    upstream.handler = handler
    config = on_redis(cached(upstream.url, local_size=0), redis_server)  # every hit read from Redis
    gateway = await start_gateway(config)
    assert (await fetch(client, gateway.url + "/big")).body == body
    entries = entry_keys(redis_server)
    assert len(entries) == 1
    assert redis_strlen(redis_server, entries[0]) < len(body) // 4
    hit = await fetch(client, gateway.url + "/big")
    assert hit.hit and hit.body == body and hit.headers["Content-Length"] == str(len(body))
    assert len(upstream.requests) == 1


async def test_small_bodies_are_stored_as_they_are(upstream, start_gateway, client, redis_server) -> None:
    numbered(upstream, {"Cache-Control": "max-age=60"})
    gateway = await start_gateway(on_redis(cached(upstream.url), redis_server))
    await fetch(client, gateway.url + "/")
    [key] = entry_keys(redis_server)
    raw = redis_server.command("GET", key)
    head, _, body = raw.partition(b"\r\n")[2].partition(b"\n")
    assert json.loads(head)["z"] is False and body == b"response 1\r\n"


async def test_two_gateway_processes_on_one_redis_share_entries(upstream, gateway_process, client, redis_server) -> None:
    numbered(upstream, {"Cache-Control": "max-age=60"})
    config = on_redis(cached(upstream.url), redis_server)
    first = gateway_process(config)
    second = gateway_process(config)
    stored = await fetch(client, first.url + "/shared")
    assert stored.cache_status == "gateway; fwd=miss; stored"
    shared = await fetch(client, second.url + "/shared")
    assert shared.hit and shared.body == b"response 1"
    assert len(upstream.requests) == 1


async def test_entries_survive_a_gateway_restart_with_redis(upstream, gateway_process, client, redis_server) -> None:
    numbered(upstream, {"Cache-Control": "max-age=60"})
    config = on_redis(cached(upstream.url), redis_server)
    before = gateway_process(config)
    await fetch(client, before.url + "/kept")
    os.killpg(before.process.pid, signal.SIGKILL)
    before.wait(10)
    after = gateway_process(config)
    kept = await fetch(client, after.url + "/kept")
    assert kept.hit and kept.body == b"response 1"
    assert len(upstream.requests) == 1


async def test_a_post_through_one_gateway_invalidates_the_entry_for_the_others(upstream, start_gateway, client, redis_server) -> None:
    numbered(upstream, {"Cache-Control": "max-age=60"})
    config = on_redis(cached(upstream.url), redis_server)
    one, two = await start_gateway(config), await start_gateway(config)
    await fetch(client, one.url + "/doc")
    assert (await fetch(client, two.url + "/doc")).hit  # now in two's local layer too
    assert (await fetch(client, one.url + "/doc", method="POST", data=b"x")).status == 200
    # two's copy goes when the removal reaches it over pub/sub (milliseconds; polled, not raced)
    answers = []

    async def fetched_again() -> bool:
        answers.append(await fetch(client, two.url + "/doc"))
        return not answers[-1].hit

    await eventually_async(fetched_again)
    assert answers[-1].body == f"response {len(upstream.requests)}".encode()


@pytest.mark.parametrize("local_size", ["64mb", 0])
async def test_redis_stopped_mid_test_never_causes_a_5xx(local_size: Any, upstream, start_gateway, client, redis_server) -> None:
    numbered(upstream, {"Cache-Control": "max-age=60"})
    gateway = await start_gateway(on_redis(cached(upstream.url, local_size=local_size), redis_server))
    await fetch(client, gateway.url + "/a")
    redis_server.stop()
    known = await fetch(client, gateway.url + "/a")
    assert known.status == 200
    if local_size:
        assert known.hit and known.body == b"response 1"  # the process's own layer answers
    for _ in range(3):
        other = await fetch(client, gateway.url + "/b")
        assert other.status == 200
    assert (await fetch(client, gateway.url + "/b", method="POST", data=b"x")).status == 200
    redis_server.start()


async def test_every_response_on_a_cached_route_carries_cache_status_writes_and_refusals_too(upstream, start_gateway, client) -> None:
    config = base_config(upstream.url)
    config["routes"][0]["cache"] = {"ttl": "1m"}
    config["routes"][0]["rate_limit"] = [{"key": "ip", "limit": 2, "window": "1m"}]
    gateway = await start_gateway(config)
    async with client.post(gateway.url + "/p", data=b"x") as response:
        assert response.headers.getall("Cache-Status") == ["gateway; fwd=bypass"]
    async with client.get(gateway.url + "/p") as response:
        assert response.headers.getall("Cache-Status") == ["gateway; fwd=miss; stored"]
    async with client.get(gateway.url + "/p") as response:  # over the limit: refused before the cache
        assert response.status == 429
        assert response.headers.getall("Cache-Status") == ["gateway; fwd=bypass"]
