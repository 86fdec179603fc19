"""cache: the finer points of RFC 9111 over real sockets.

Fields split over several lines and lists, statuses stored only with explicit freshness,
must-understand, Surrogate-Control, heuristic freshness, invalidation by Location and
Content-Location, how a 304 updates an entry, entries that are never served stale, and
If-Modified-Since against an entry's Date. As in tests/test_cache.py, a real gateway stands in
front of a real recording upstream, and entries are made stale by an upstream Date in the past
(part of the age, §4.2.3) rather than by sleeping.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import time
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict

from tests.conftest import Upstream
from tests.test_cache import Answer, cached, fetch, http_date, numbered, on_redis, stale_on_arrival

# A field spec: (name, value) in order, a repeated name being another line; an int value is an
# HTTP-date that many seconds from the moment the upstream answers.
Fields = tuple[tuple[str, str | int], ...]
TEN_HOURS = 36000


def fields(spec: Fields) -> CIMultiDict[str]:
    now = time.time()
    return CIMultiDict((name, http_date(now + value) if isinstance(value, int) else value) for name, value in spec)


# -- what is stored, and whether it is fresh ----------------------------------------------------------


def case(outcome: str, status: int, spec: Fields, sentence: str, **settings: Any) -> Any:
    """outcome: ``hit`` (stored and fresh), ``stale`` (stored, stale on the next request) or
    ``miss`` (not stored). The route's ttl is 0: only the upstream's fields make a response fresh."""
    return pytest.param(outcome, status, spec, settings, id=sentence)


@pytest.mark.parametrize(
    "outcome, status, spec, settings",
    [
        # RFC 9110 §5.3: a field split over several lines is one list.
        case("stale", 200, (("Cache-Control", "max-age=60"), ("Cache-Control", "s-maxage=1"), ("Date", -30)), "an s-maxage on a second Cache-Control line wins over the max-age on the first"),
        case("hit", 200, (("Cache-Control", "max-age=60"), ("Date", -30)), "the same max-age on its own keeps the response fresh"),
        case("miss", 200, (("Cache-Control", "max-age=60"), ("Cache-Control", "no-store")), "a no-store on a second Cache-Control line is obeyed"),
        # §5.1: an Age that is a list counts its first member.
        case("stale", 200, (("Cache-Control", "max-age=3600"), ("Age", "7200, 0")), "an Age list of 7200, 0 makes a max-age=3600 response stale on arrival"),
        # §3.3: a cache that does not combine partial content stores no 206.
        case("miss", 206, (("Cache-Control", "max-age=60"), ("Content-Range", "bytes 0-9/100")), "a 206 partial content is never stored"),
        case("hit", 204, (("Cache-Control", "max-age=60"),), "a 204 with max-age is stored though it has no Content-Length"),
        # §3: any status with explicit freshness is storable, not only the heuristically cacheable ones.
        case("hit", 302, (("Expires", 60),), "a 302 with only a future Expires is stored"),
        case("hit", 500, (("Expires", 60),), "a 500 with only a future Expires is stored"),
        case("miss", 302, (), "a 302 without freshness is not stored"),
        # §5.2.2.3: must-understand stores what the cache understands, whatever no-store says.
        case("hit", 200, (("Cache-Control", "max-age=60, no-store, must-understand"),), "must-understand with no-store stores a 200, whose status is understood"),
        case("miss", 599, (("Cache-Control", "max-age=60, no-store, must-understand"),), "must-understand with no-store does not store a 599, whose status is not understood"),
        # Surrogate-Control (W3C Edge Architecture): this gateway is the surrogate it speaks to.
        case("hit", 200, (("Surrogate-Control", "max-age=60"), ("Cache-Control", "no-store")), "a Surrogate-Control max-age wins over a Cache-Control no-store"),
        case("miss", 200, (("Surrogate-Control", "no-store"), ("Cache-Control", "max-age=60")), "a Surrogate-Control no-store wins over a Cache-Control max-age"),
        case("miss", 200, (("Surrogate-Control", "max-age=60"), ("Cache-Control", "no-store")), "without surrogate_control the Cache-Control no-store decides", surrogate_control=False),
        case("hit", 200, (("Surrogate-Control", "no-store"), ("Cache-Control", "max-age=60")), "without surrogate_control the Cache-Control max-age decides", surrogate_control=False),
        case("miss", 200, (("Surrogate-Control", "max-age=60;other-device"),), "a Surrogate-Control max-age targeted at another device is ignored"),
        case("hit", 200, (("Surrogate-Control", "no-store;other-device, max-age=60"),), "a Surrogate-Control no-store targeted at another device is ignored"),
        case("hit", 200, (("Surrogate-Control", "max-age=60;other-device, max-age=30"),), "an untargeted Surrogate-Control max-age after one targeted at another device counts"),
        case("hit", 200, (("Surrogate-Control", "max-age=60+600"),), "a Surrogate-Control max-age counts without its stale part"),
        case("miss", 200, (("Surrogate-Control", "max-age=60;other-cdn"), ("Cache-Control", "private")), "a Surrogate-Control aimed only at others leaves a private Cache-Control in charge", ttl="5m"),
        # §4.2.2: heuristic freshness, 10% of the time since Last-Modified, only when asked for.
        case("hit", 200, (("Last-Modified", -TEN_HOURS),), "with heuristic a 200 modified ten hours ago is fresh", heuristic=True),
        case("stale", 200, (("Last-Modified", -TEN_HOURS),), "without heuristic a 200 modified ten hours ago is stored but not fresh"),
        case("hit", 599, (("Cache-Control", "public"), ("Last-Modified", -TEN_HOURS)), "with heuristic a public 599 modified ten hours ago is fresh", heuristic=True),
        case("stale", 599, (("Cache-Control", "public"), ("Last-Modified", -TEN_HOURS)), "without heuristic a public 599 modified ten hours ago is stored but not fresh"),
    ],
)
async def test_what_is_stored_and_whether_it_is_fresh(outcome: str, status: int, spec: Fields, settings: dict[str, Any], upstream, start_gateway, client) -> None:
    numbered(upstream, lambda request: fields(spec), status)
    gateway = await start_gateway(cached(upstream.url, **{"ttl": 0, **settings}))
    first = await fetch(client, gateway.url + "/")
    assert first.status == status
    assert ("stored" in first.params) is (outcome != "miss"), first.cache_status
    second = await fetch(client, gateway.url + "/")
    assert second.status == status
    assert (second.hit, "fwd=stale" in second.params) == (outcome == "hit", outcome == "stale"), second.cache_status
    assert len(upstream.requests) == (1 if outcome == "hit" else 2)
    if outcome == "hit":
        assert second.body == first.body


# -- revalidation ----------------------------------------------------------------------------------


async def test_a_response_with_no_cache_is_stored_but_revalidated_before_every_use(upstream, start_gateway, client) -> None:
    validators = {"ETag": '"v1"', "Cache-Control": "max-age=60, no-cache"}

    async def handler(request: web.Request) -> web.Response:
        if request.headers.get("If-None-Match") == '"v1"':
            return web.Response(status=304, headers=validators)
        return web.Response(text="body v1", headers=validators)

    upstream.handler = handler
    gateway = await start_gateway(cached(upstream.url))
    assert "stored" in (await fetch(client, gateway.url + "/")).params
    for count in (2, 3):
        again = await fetch(client, gateway.url + "/")
        assert again.status == 200 and again.body == b"body v1"
        assert "fwd-status=304" in again.params, again.cache_status
        assert len(upstream.requests) == count
        assert upstream.requests[-1].headers.get("If-None-Match") == '"v1"'


def raw_answer(request: web.Request, head: str) -> web.Response:
    """Write an answer to the socket as it is and close the connection: aiohttp drops the
    Content-Length of a 304 it sends itself (RFC 9110 §8.6 lets a server send one)."""
    assert request.transport is not None
    request.transport.write(f"{head}Date: {http_date(time.time())}\r\nConnection: close\r\n\r\n".encode())
    request.transport.close()
    return web.Response()  # never sent: the connection is closed


async def test_a_304_replaces_the_stored_fields_but_not_those_that_describe_the_stored_bytes(upstream, start_gateway, client) -> None:
    body = gzip.compress(b"the catalogue, compressed")
    digest = base64.b64encode(hashlib.md5(body, usedforsecurity=False).digest()).decode()
    stored = {"ETag": '"v1"', "Content-Encoding": "gzip", "Content-Range": f"bytes 0-{len(body) - 1}/{len(body)}", "Content-MD5": digest}

    async def handler(request: web.Request) -> web.Response:
        if request.headers.get("If-None-Match") == '"v1"':
            return raw_answer(
                request,
                'HTTP/1.1 304 Not Modified\r\nETag: W/"v1"\r\nContent-Length: 999\r\nContent-Encoding: br\r\n'
                "Content-Range: bytes 0-0/1\r\nContent-MD5: AAAAAAAAAAAAAAAAAAAAAA==\r\nCache-Control: max-age=60\r\n"
                "X-Version: 2\r\nLink: </b>; rel=next\r\nLink: </c>; rel=last\r\n",
            )
        first = CIMultiDict(stale_on_arrival({**stored, "X-Version": "1", "X-Kept": "yes"}))
        first.add("Link", "</a>; rel=prev")
        return web.Response(body=body, headers=first)

    upstream.handler = handler
    gateway = await start_gateway(cached(upstream.url))
    await fetch(client, gateway.url + "/")
    revalidated = await fetch(client, gateway.url + "/")
    assert "fwd-status=304" in revalidated.params, revalidated.cache_status
    hit = await fetch(client, gateway.url + "/")
    assert hit.hit and "fwd=stale" not in hit.params, hit.cache_status
    for answer in (revalidated, hit):  # what answered the client, then what was stored
        assert answer.status == 200 and answer.body == body
        assert {name: answer.headers[name] for name in stored} == stored
        assert answer.headers["Content-Length"] == str(len(body))
        assert answer.headers["X-Version"] == "2" and answer.headers["X-Kept"] == "yes"
        assert answer.headers.getall("Link") == ["</b>; rel=next", "</c>; rel=last"]
    assert len(upstream.requests) == 2


# -- never served stale ----------------------------------------------------------------------------

# How the stale entry could be served: (route settings, how the upstream fails, the status a
# client gets when it is not served).
STALE_WAYS = {
    "while it is revalidated": ({"stale_while_revalidate": "10m"}, None, 200),
    "when the upstream is down": ({"stale_if_error": "10m"}, "down", 502),
    "when the upstream answers 503": ({"stale_if_error": "10m"}, 503, 503),
}
# §4.2.4, §5.2.2.2, §5.2.2.8, §5.2.2.10, §5.2.2.4: what the upstream sent that forbids serving stale.
FORBID_STALE = ["must-revalidate", "proxy-revalidate", "s-maxage=60", "no-cache"]


@pytest.mark.parametrize(
    "directive, way, override",
    [
        *(pytest.param(d, w, False, id=f"an entry with {d} is not served stale {w}") for d in FORBID_STALE for w in STALE_WAYS),
        *(pytest.param(d, w, True, id=f"with override an entry with {d} is served stale {w}") for d in FORBID_STALE for w in STALE_WAYS),
        *(pytest.param(None, w, False, id=f"a plain max-age entry is served stale {w}") for w in STALE_WAYS),
    ],
)
async def test_entries_whose_upstream_forbids_it_are_never_served_stale(directive: str | None, way: str, override: bool, upstream, start_gateway, client) -> None:
    settings, failure, refused_status = STALE_WAYS[way]
    cache_control = "max-age=60" + (f", {directive}" if directive else "")

    async def handler(request: web.Request) -> web.Response:
        count = len(upstream.requests)
        if count == 1:
            return web.Response(text="response 1", headers=stale_on_arrival({"Cache-Control": cache_control}))
        return web.Response(status=failure if isinstance(failure, int) else 200, text=f"response {count}")

    upstream.handler = handler
    # With override the route's ttl is the entry's lifetime: 60 s, stale as the Date is 120 s old.
    gateway = await start_gateway(cached(upstream.url, ttl="60s", override=override, **settings))
    assert "stored" in (await fetch(client, gateway.url + "/")).params
    if failure == "down":
        await upstream.stop()
    answer = await fetch(client, gateway.url + "/")
    if directive is None or override:
        assert answer.status == 200 and answer.body == b"response 1", answer.cache_status
        assert answer.hit and "fwd=stale" in answer.params
    else:
        assert answer.status == refused_status and answer.body != b"response 1", answer.cache_status
        assert not answer.hit


# -- conditional requests --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "since, status",
    [
        pytest.param(0, 304, id="the entry's own Date is not modified since"),
        pytest.param(60, 304, id="a later date is not modified since"),
        pytest.param(-60, 200, id="an earlier date gets the whole response"),
    ],
)
async def test_if_modified_since_against_a_fresh_entry_without_last_modified_compares_its_date(since: int, status: int, upstream, start_gateway, client) -> None:
    generated = time.time() - 3600  # §4.3.2: the Date stands in for a missing Last-Modified
    numbered(upstream, {"Cache-Control": "max-age=7200", "Date": http_date(generated)})
    gateway = await start_gateway(cached(upstream.url))
    await fetch(client, gateway.url + "/")
    answer = await fetch(client, gateway.url + "/", {"If-Modified-Since": http_date(generated + since)})
    assert answer.hit and answer.status == status, answer.cache_status
    assert answer.body == (b"" if status == 304 else b"response 1")
    assert len(upstream.requests) == 1


# -- invalidation ----------------------------------------------------------------------------------

HOST = {"Host": "shop.example"}
WRITE = "/dir/sub/post"
MARKER = "/marker"
# The memory store: one gateway reads and writes. Redis: the writes go through another gateway,
# and the reader's own copy hears of them over pub/sub.
STORES = [pytest.param("memory", id="on one gateway"), pytest.param("redis", id="through another gateway on Redis")]


async def reader_and_writer(store: str, upstream: Upstream, start_gateway: Any, client: aiohttp.ClientSession, request: pytest.FixtureRequest) -> tuple[Any, Any]:
    """The gateway that reads (with MARKER cached) and the one that writes."""
    if store == "memory":
        reader = writer = await start_gateway(cached(upstream.url))
    else:
        config = on_redis(cached(upstream.url), request.getfixturevalue("redis_server"))
        reader, writer = await start_gateway(config), await start_gateway(config)
    await fetch(client, reader.url + MARKER, HOST)
    return reader, writer


async def write(client: aiohttp.ClientSession, reader: Any, writer: Any, method: str, path: str) -> Answer:
    """A write through the writer, returned once the reader has heard of the removals it made:
    they reach the reader over one pub/sub channel, in order, so once the removal of MARKER
    written after them has, so have they."""
    answer = await fetch(client, writer.url + path, HOST, method=method, data=b"x")
    assert (await fetch(client, writer.url + MARKER, HOST, method="DELETE")).status == 200
    deadline = time.monotonic() + 5
    while (await fetch(client, reader.url + MARKER, HOST)).hit:
        assert time.monotonic() < deadline, "the removal of the marker never reached the reader"
        await asyncio.sleep(0.01)
    return answer


async def invalidated(client: aiohttp.ClientSession, reader: Any, upstream: Upstream, path: str, expected: bool) -> None:
    """Whether the reader's entry for path is gone (an entry cached, as a hit showed, before the write)."""
    after = await fetch(client, reader.url + path, HOST)
    assert after.hit is not expected, after.cache_status
    if expected:
        assert after.body == f"response {len(upstream.requests)}".encode()


@pytest.mark.parametrize("store", STORES)
@pytest.mark.parametrize(
    "name, value, target, expected",
    [
        pytest.param("Location", "http://shop.example/target", "/target", True, id="an absolute Location on the same host"),
        pytest.param("Location", "http://Shop.Example:8080/target", "/target", True, id="an absolute Location on the same host at another port"),
        pytest.param("Content-Location", "/target", "/target", True, id="a Content-Location path"),
        pytest.param("Location", "../target", "/dir/target", True, id="a relative Location reference"),
        pytest.param("Content-Location", "target?page=2", "/dir/sub/target?page=2", True, id="a relative Content-Location with a query"),
        pytest.param("Location", "http://elsewhere.example/target", "/target", False, id="an absolute Location on another host is left alone"),
        pytest.param("Content-Location", "//elsewhere.example/target", "/target", False, id="a scheme-relative Content-Location on another host is left alone"),
    ],
)
async def test_a_successful_write_invalidates_the_same_host_uris_its_location_and_content_location_name(
    name: str, value: str, target: str, expected: bool, store: str, upstream, start_gateway, client, request
) -> None:
    async def handler(request: web.Request) -> web.Response:
        if request.method == "POST":
            return web.Response(status=201, text="created", headers={name: value})
        return web.Response(text=f"response {len(upstream.requests)}", headers={"Cache-Control": "max-age=60"})

    upstream.handler = handler
    reader, writer = await reader_and_writer(store, upstream, start_gateway, client, request)
    await fetch(client, reader.url + target, HOST)
    assert (await fetch(client, reader.url + target, HOST)).hit
    assert (await write(client, reader, writer, "POST", WRITE)).status == 201
    await invalidated(client, reader, upstream, target, expected)


@pytest.mark.parametrize("store", STORES)
@pytest.mark.parametrize(
    "method, expected",
    [
        pytest.param("PURGE", True, id="a custom PURGE invalidates"),
        pytest.param("M-SEARCH", True, id="a custom M-SEARCH invalidates"),
        pytest.param("OPTIONS", False, id="a safe OPTIONS leaves the entry"),
    ],
)
async def test_any_method_that_is_not_safe_invalidates_the_entry_of_its_uri(method: str, expected: bool, store: str, upstream, start_gateway, client, request) -> None:
    numbered(upstream, {"Cache-Control": "max-age=60"})
    reader, writer = await reader_and_writer(store, upstream, start_gateway, client, request)
    await fetch(client, reader.url + "/item", HOST)
    assert (await fetch(client, reader.url + "/item", HOST)).hit
    answer = await write(client, reader, writer, method, "/item")  # a route without `methods` serves any
    assert answer.status == 200 and any(received.method == method for received in upstream.requests)
    await invalidated(client, reader, upstream, "/item", expected)
