"""cache: purge on the admin listener, and one upstream request for a cold key across gateways.

Real gateways (in-process, each with its own single flight, as separate processes have) in front
of a real recording upstream, on the embedded memory store and on a real redis-server.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import RedisServer, Upstream, assert_problem
from tests.test_cache import Answer, cached, eventually_async, fetch, numbered, on_redis

STORES = ["memory", "redis"]


def on_store(config: dict[str, Any], store: str, request: pytest.FixtureRequest) -> dict[str, Any]:
    return on_redis(config, request.getfixturevalue("redis_server")) if store == "redis" else config


async def purge(client: aiohttp.ClientSession, admin_url: str, document: Any, token: str | None = None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with client.post(admin_url + "/cache/purge", json=document, headers=headers) as response:
        return response.status, await response.json(content_type=None)


async def warm(client: aiohttp.ClientSession, url: str, *paths: str, headers: dict[str, str] | None = None) -> None:
    for path in paths:
        answer = await fetch(client, url + path, headers)
        assert "stored" in answer.params, (path, answer.cache_status)


async def hits(client: aiohttp.ClientSession, url: str, *paths: str, headers: dict[str, str] | None = None) -> list[bool]:
    return [(await fetch(client, url + path, headers)).hit for path in paths]


# -- purge ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("store", STORES)
async def test_purging_a_url_removes_every_query_and_vary_variant_of_its_path_and_nothing_else(store: str, request, upstream, start_gateway, client) -> None:
    numbered(upstream, {"Cache-Control": "max-age=60", "Vary": "Accept-Language"})
    gateway = await start_gateway(on_store(cached(upstream.url), store, request))
    await warm(client, gateway.url, "/p/7", "/p/7?x=1", "/p/8", headers={"Accept-Language": "en"})
    await warm(client, gateway.url, "/p/7", headers={"Accept-Language": "fr"})
    assert await purge(client, gateway.admin_url, {"url": "/p/7"}) == (200, {"purged": 3})
    assert await hits(client, gateway.url, "/p/7", "/p/7?x=1", "/p/8", headers={"Accept-Language": "en"}) == [False, False, True]
    assert await hits(client, gateway.url, "/p/7", headers={"Accept-Language": "fr"}) == [False]


@pytest.mark.parametrize("store", STORES)
async def test_purging_a_url_with_a_query_removes_that_query_in_any_order_only(store: str, request, upstream, start_gateway, client) -> None:
    numbered(upstream, {"Cache-Control": "max-age=60"})
    gateway = await start_gateway(on_store(cached(upstream.url), store, request))
    await warm(client, gateway.url, "/list?a=1&b=2", "/list?a=1", "/list")
    assert await purge(client, gateway.admin_url, {"url": "/list?b=2&a=1"}) == (200, {"purged": 1})
    assert await hits(client, gateway.url, "/list?a=1&b=2", "/list?a=1", "/list") == [False, True, True]


@pytest.mark.parametrize("store", STORES)
async def test_purging_a_prefix_removes_every_path_under_it(store: str, request, upstream, start_gateway, client) -> None:
    numbered(upstream, {"Cache-Control": "max-age=60"})
    gateway = await start_gateway(on_store(cached(upstream.url), store, request))
    await warm(client, gateway.url, "/api/products/1", "/api/products/2?page=3", "/api/users/1")
    assert await purge(client, gateway.admin_url, {"prefix": "/api/products/"}) == (200, {"purged": 2})
    assert await hits(client, gateway.url, "/api/products/1", "/api/products/2?page=3", "/api/users/1") == [False, False, True]


@pytest.mark.parametrize("store", STORES)
async def test_purging_a_tag_removes_the_entries_the_upstream_or_the_route_tagged(store: str, request, upstream, start_gateway, client) -> None:
    def tagged(req: web.Request) -> dict[str, str]:
        keys = {"/products/1": "products p-1", "/products/2": "products  p-2", "/users/1": "users"}
        return {"Cache-Control": "max-age=60", "Surrogate-Key": keys.get(req.path, "")}

    numbered(upstream, tagged)
    config = cached(upstream.url)
    config["routes"].insert(0, {"name": "catalog", "match": {"path": "/catalog"}, "upstream": "api", "cache": {"tags": ["catalog"]}})
    gateway = await start_gateway(on_store(config, store, request))
    await warm(client, gateway.url, "/products/1", "/products/2", "/users/1", "/catalog/a", "/catalog/b")
    assert await purge(client, gateway.admin_url, {"tag": "p-1"}) == (200, {"purged": 1})
    assert await purge(client, gateway.admin_url, {"tag": "products"}) == (200, {"purged": 1})  # p-1's is gone already
    assert await purge(client, gateway.admin_url, {"tag": "catalog"}) == (200, {"purged": 2})
    assert await hits(client, gateway.url, "/products/1", "/products/2", "/users/1", "/catalog/a") == [False, False, True, False]


async def test_an_absolute_url_purges_its_path_and_query(upstream, start_gateway, client) -> None:
    numbered(upstream, {"Cache-Control": "max-age=60"})
    gateway = await start_gateway(cached(upstream.url))
    await warm(client, gateway.url, "/p?q=1")
    assert await purge(client, gateway.admin_url, {"url": "https://api.example.com/p?q=1"}) == (200, {"purged": 1})
    assert await hits(client, gateway.url, "/p?q=1") == [False]


async def test_with_an_admin_token_a_purge_without_it_is_refused_and_purges_nothing(upstream, start_gateway, client) -> None:
    numbered(upstream, {"Cache-Control": "max-age=60"})
    config = cached(upstream.url)
    config["admin"]["token"] = "s3cret-admin-token"
    gateway = await start_gateway(config)
    await warm(client, gateway.url, "/doc")
    for authorization in (None, "Bearer wrong-token", "s3cret-admin-token", "Basic czNjcmV0"):
        headers = {"Authorization": authorization} if authorization else {}
        async with client.post(gateway.admin_url + "/cache/purge", json={"url": "/doc"}, headers=headers) as response:
            assert_problem(response.status, response.headers, await response.read(), 401)
            assert response.headers["WWW-Authenticate"] == 'Bearer realm="admin"'
    assert await hits(client, gateway.url, "/doc") == [True]
    assert await purge(client, gateway.admin_url, {"url": "/doc"}, token="s3cret-admin-token") == (200, {"purged": 1})
    assert await hits(client, gateway.url, "/doc") == [False]


@pytest.mark.parametrize(
    "body, detail",
    [
        (b"not json", "the body is not JSON"),
        (b"{}", 'expected a JSON object with one of "url", "prefix" or "tag"'),
        (b'["/doc"]', 'expected a JSON object with one of "url", "prefix" or "tag"'),
        (b'{"url": "/doc", "tag": "x"}', 'expected a JSON object with one of "url", "prefix" or "tag"'),
        (b'{"path": "/doc"}', 'expected a JSON object with one of "url", "prefix" or "tag"'),
        (b'{"url": 7}', "url: expected a non-empty string"),
        (b'{"tag": ""}', "tag: expected a non-empty string"),
        (b'{"tag": "two words"}', "tag: a tag has no spaces"),
        (b'{"prefix": "/doc?x=1"}', "prefix: a path prefix has no query"),
        (b'{"url": "doc"}', "url: the path must start with '/'"),
        (b'{"url": "/a/%zz"}', "url: malformed percent-encoding"),
    ],
)
async def test_a_malformed_purge_is_a_400_problem_and_purges_nothing(body: bytes, detail: str, upstream, start_gateway, client) -> None:
    numbered(upstream, {"Cache-Control": "max-age=60"})
    gateway = await start_gateway(cached(upstream.url))
    await warm(client, gateway.url, "/doc")
    async with client.post(gateway.admin_url + "/cache/purge", data=body, headers={"Content-Type": "application/json"}) as response:
        problem = assert_problem(response.status, response.headers, await response.read(), 400)
    assert problem["detail"] == detail
    assert await hits(client, gateway.url, "/doc") == [True]


async def test_purge_is_on_the_admin_listener_only(upstream, start_gateway, client) -> None:
    numbered(upstream, {"Cache-Control": "max-age=60"})
    gateway = await start_gateway(cached(upstream.url))
    await warm(client, gateway.url, "/doc")
    async with client.post(gateway.url + "/cache/purge", json={"url": "/doc"}) as response:
        assert response.status == 200 and await response.read() == b"response 2"  # the upstream's answer
    assert await hits(client, gateway.url, "/doc") == [True]


async def test_a_purge_through_one_gateway_reaches_another_sharing_redis(upstream, start_gateway, client, redis_server) -> None:
    numbered(upstream, {"Cache-Control": "max-age=60"})
    config = on_redis(cached(upstream.url), redis_server)
    one, two = await start_gateway(config), await start_gateway(config)
    await warm(client, one.url, "/doc")
    assert await hits(client, two.url, "/doc") == [True]
    assert await purge(client, one.admin_url, {"url": "/doc"}) == (200, {"purged": 1})
    after = await fetch(client, two.url + "/doc")
    assert not after.hit and after.body == b"response 2"


async def test_a_purge_while_redis_is_down_is_a_503_problem(upstream, start_gateway, client, redis_server) -> None:
    numbered(upstream, {"Cache-Control": "max-age=60"})
    gateway = await start_gateway(on_redis(cached(upstream.url), redis_server))
    await warm(client, gateway.url, "/doc")
    redis_server.stop()
    async with client.post(gateway.admin_url + "/cache/purge", json={"url": "/doc"}) as response:
        problem = assert_problem(response.status, response.headers, await response.read(), 503)
    assert "nothing was purged for certain" in problem["detail"]
    redis_server.start()


async def test_the_index_forgets_entries_that_expired_as_new_ones_are_stored(upstream, start_gateway, client, redis_server) -> None:
    numbered(upstream, {"Cache-Control": "max-age=60"})
    gateway = await start_gateway(on_redis(cached(upstream.url), redis_server))
    await warm(client, gateway.url, *(f"/old/{i}" for i in range(5)))
    assert zcard(redis_server, "gw:c:{all}:index") == 5
    # Members last as long as their entries (max-age + 60 s): make that time pass for them.
    redis_server.command("EVAL", "for _, m in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do redis.call('ZADD', KEYS[1], 1, m) end", "1", "gw:c:{all}:index:exp")
    await warm(client, gateway.url, "/new")
    assert zcard(redis_server, "gw:c:{all}:index") == 1


def zcard(server: RedisServer, key: str) -> int:
    return int(server.command("ZCARD", key).decode().strip().lstrip(":"))


# -- one upstream request across gateways ------------------------------------------------------------


def slow(upstream: Upstream, cache_control: str, delay: float = 0.3) -> None:
    async def handler(request: web.Request) -> web.Response:
        await asyncio.sleep(delay)
        return web.Response(text=f"fetch {len(upstream.requests)}", headers={"Cache-Control": cache_control})

    upstream.handler = handler


async def burst(url: str, count: int) -> list[Answer]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=count)) as session:
        return list(await asyncio.gather(*(fetch(session, url) for _ in range(count))))


async def test_cold_misses_through_two_gateways_sharing_redis_make_one_upstream_request(upstream, start_gateway, redis_server) -> None:
    slow(upstream, "max-age=60")
    config = on_redis(cached(upstream.url), redis_server)
    one, two = await start_gateway(config), await start_gateway(config)
    answers = [a for group in await asyncio.gather(burst(one.url + "/cold", 25), burst(two.url + "/cold", 25)) for a in group]
    assert {a.status for a in answers} == {200} and {a.body for a in answers} == {b"fetch 1"}
    assert len(upstream.requests) == 1
    assert sum(a.hit for a in answers) == 49


async def test_a_response_that_is_not_stored_releases_the_other_gateways_at_once(upstream, start_gateway, redis_server) -> None:
    slow(upstream, "private")
    config = on_redis(cached(upstream.url, lock_timeout="20s"), redis_server)
    one, two = await start_gateway(config), await start_gateway(config)
    started = time.monotonic()
    answers = [a for group in await asyncio.gather(burst(one.url + "/mine", 5), burst(two.url + "/mine", 5)) for a in group]
    assert {a.status for a in answers} == {200}
    assert time.monotonic() - started < 10  # nobody waited out the 20 s lock
    assert len(upstream.requests) >= 2  # a private answer is nobody else's


async def test_a_gateway_fetches_itself_when_redis_is_down(upstream, start_gateway, client, redis_server) -> None:
    slow(upstream, "max-age=60", delay=0.05)
    gateway = await start_gateway(on_redis(cached(upstream.url), redis_server))
    redis_server.stop()
    answers = await burst(gateway.url + "/cold", 10)
    assert {a.status for a in answers} == {200}
    assert len(upstream.requests) == 1  # the process's own single flight still holds
    redis_server.start()


# -- hits from the process's own copy, removals over pub/sub ---------------------------------------


def command_calls(server: RedisServer, *commands: str) -> int:
    stats = server.command("INFO", "commandstats").decode()
    return sum(int(line.split("calls=")[1].split(",")[0]) for line in stats.splitlines() if line.startswith(tuple(f"cmdstat_{c}:" for c in commands)))


async def subscribed(gateway: Any, live: bool = True) -> None:
    """Until the gateway's pub/sub subscription is up (or, live=False, seen lost)."""
    news = gateway.gateway.runtime.context.resources["cache_news"]

    async def reached() -> bool:
        return news.live is live

    await eventually_async(reached)


async def test_with_redis_a_fresh_hit_is_answered_from_the_process_copy_without_a_redis_read(upstream, start_gateway, client, redis_server) -> None:
    numbered(upstream, {"Cache-Control": "max-age=60"})
    gateway = await start_gateway(on_redis(cached(upstream.url), redis_server))
    await subscribed(gateway)
    await warm(client, gateway.url, "/doc")
    reads = command_calls(redis_server, "get", "mget")
    assert await hits(client, gateway.url, *["/doc"] * 5) == [True] * 5
    assert command_calls(redis_server, "get", "mget") == reads
    assert len(upstream.requests) == 1


@pytest.mark.parametrize("how", ["write", "purge"])
async def test_a_removal_through_one_gateway_reaches_the_others_process_copies(how: str, upstream, start_gateway, client, redis_server) -> None:
    numbered(upstream, {"Cache-Control": "max-age=60"})
    config = on_redis(cached(upstream.url), redis_server)
    one, two = await start_gateway(config), await start_gateway(config)
    await subscribed(two)
    await warm(client, one.url, "/doc")
    assert await hits(client, two.url, "/doc", "/doc") == [True, True]  # the second from two's own copy
    if how == "write":
        assert (await fetch(client, one.url + "/doc", method="POST", data=b"x")).status == 200
    else:
        assert await purge(client, one.admin_url, {"url": "/doc"}) == (200, {"purged": 1})

    async def missed() -> bool:
        return not (await fetch(client, two.url + "/doc")).hit

    await eventually_async(missed)


async def test_after_redis_comes_back_the_process_copies_are_dropped_and_refilled(upstream, start_gateway, client, redis_server) -> None:
    numbered(upstream, {"Cache-Control": "max-age=60"})
    gateway = await start_gateway(on_redis(cached(upstream.url), redis_server))
    await subscribed(gateway)
    await warm(client, gateway.url, "/doc")
    redis_server.stop()
    await subscribed(gateway, live=False)
    assert await hits(client, gateway.url, "/doc") == [True]  # the process's copy while Redis is down
    redis_server.start()  # empty: removals made meanwhile would be unknown
    await subscribed(gateway)
    after = await fetch(client, gateway.url + "/doc")
    assert not after.hit and after.status == 200
