"""rate_limit shared through Redis: several gateway processes, a Redis that dies and comes back,
Redis Cluster, and limits keyed by the authenticated user.

Everything here is real: ``python -m gateway run`` processes, redis-server (and a three-master
Redis Cluster made with redis-cli), aiohttp clients and upstreams on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import signal
import time
from typing import Any

import aiohttp
import pytest
from jwcrypto import jwk
from jwcrypto import jwt as jwc_jwt

from tests.conftest import GatewayProcess, RedisServer, assert_problem, base_config

LONG_WINDOW = "1h"  # no window ends, no token comes back, while a test runs
QUOTA = 50
CONCURRENT = 200


def shared_config(upstream_url: str, redis: dict[str, Any], routes: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """One route per entry of ``routes`` (name → its rate_limit list), with the access log on."""
    config = base_config(upstream_url)
    config["routes"] = [{"name": name, "match": {"path": f"/{name}"}, "upstream": "api", "rate_limit": limits} for name, limits in routes.items()]
    # A loaded machine must not trip the 50ms default: every decision here should be Redis's.
    config["redis"] = {"timeout": "1s", "on_failure": "memory", **redis}
    config["logging"] = {"level": "info", "access_log": True}
    return config


async def burst(urls: list[str], count: int, headers: dict[str, str] | None = None) -> collections.Counter[int]:
    """``count`` requests at once, spread round robin over ``urls``; how many got each status."""
    connector = aiohttp.TCPConnector(limit=count, force_close=True)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(url: str) -> int:
            async with session.get(url, headers=headers) as response:
                await response.read()
                return response.status

        found = await asyncio.gather(*(one(urls[i % len(urls)]) for i in range(count)))
    return collections.Counter(found)


def access_records(process: GatewayProcess, expected: int, timeout: float = 10) -> list[dict[str, Any]]:
    """The process's access log lines, once ``expected`` of them are written (a thread writes them)."""
    deadline = time.monotonic() + timeout
    while True:
        records = [r for r in process.log_records() if "status" in r and "method" in r and "level" not in r]
        if len(records) >= expected or time.monotonic() > deadline:
            return records
        time.sleep(0.05)


def fallbacks(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if "rate_limit_store" in r]


def command_stat(server: RedisServer, command: str) -> int:
    for line in server.command("INFO", "commandstats").decode().splitlines():
        if line.startswith(f"cmdstat_{command}:"):
            return int(line.split("calls=")[1].split(",")[0])
    return 0


def keys(server: RedisServer, pattern: str = "gw:rl:*") -> list[str]:
    """KEYS over RESP, decoded (a test server holds a handful of keys)."""
    lines = server.command("KEYS", pattern).decode().split("\r\n")
    return [line for line in lines[1:] if line and not line.startswith("$")]


# -- 1. two processes, one Redis --------------------------------------------------------------


@pytest.mark.parametrize(
    "limit",
    [
        {"algorithm": "fixed_window"},
        {"algorithm": "sliding_window"},
        {"algorithm": "token_bucket", "burst": QUOTA},
    ],
    ids=lambda limit: limit["algorithm"],
)
async def test_two_gateway_processes_sharing_one_redis_admit_exactly_the_limit_under_concurrency(limit: dict[str, Any], upstream, gateway_process, redis_server) -> None:
    config = shared_config(upstream.url, {"url": redis_server.url}, {"shared": [{"key": "ip", "limit": QUOTA, "window": LONG_WINDOW, **limit}]})
    processes = [gateway_process(config), gateway_process(config)]

    statuses = await burst([p.url + "/shared" for p in processes], CONCURRENT)

    assert statuses == {200: QUOTA, 429: CONCURRENT - QUOTA}
    assert len(upstream.requests) == QUOTA  # refused requests never reach the upstream
    for process in processes:
        records = access_records(process, CONCURRENT // 2)
        assert len(records) == CONCURRENT // 2  # both processes took their half of the load
        assert fallbacks(records) == []  # every decision was Redis's, none a local fallback
    assert keys(redis_server)  # the counters live in Redis


# -- 2. Redis dies under load and comes back ---------------------------------------------------


async def test_when_redis_dies_under_load_local_limits_apply_without_a_5xx_and_redis_decides_again_after_restart(upstream, gateway_process, redis_server) -> None:
    victim_quota = 20
    config = shared_config(upstream.url, {"url": redis_server.url}, {"limited": [{"key": "header:X-Client", "limit": victim_quota, "window": LONG_WINDOW}]})
    process = gateway_process(config)
    url = process.url + "/limited"
    load: list[int] = []
    stop = asyncio.Event()

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:

        async def get(client: str) -> int:
            async with session.get(url, headers={"X-Client": client}) as response:
                await response.read()
                return response.status

        async def stream(worker: int) -> None:
            sent = 0
            while not stop.is_set():
                load.append(await get(f"load-{worker}-{sent}"))  # a new client each time: never over its limit
                sent += 1

        workers = [asyncio.create_task(stream(worker)) for worker in range(4)]
        try:
            await asyncio.sleep(0.3)
            assert load and command_stat(redis_server, "evalsha") > 0  # decided by Redis so far

            redis_server.stop()  # with requests in flight
            await asyncio.sleep(0.5)
            # The same limit, enforced by this process alone: a client over it gets 429s.
            victim = [await get("victim") for _ in range(victim_quota + 10)]
            assert victim == [200] * victim_quota + [429] * 10

            redis_server.start()  # empty, on the same port
            restarted = time.monotonic()
            # Back to Redis once the breaker's probe gets through: the stream's counters appear there.
            while not keys(redis_server) and time.monotonic() - restarted < 15:
                await asyncio.sleep(0.05)
            resumed_after = time.monotonic() - restarted
            assert keys(redis_server), "decisions did not go back to Redis within 15 s of its restart"
            assert command_stat(redis_server, "evalsha") > 0
            await asyncio.sleep(0.2)  # the stream goes on, on Redis
        finally:
            stop.set()
            await asyncio.gather(*workers)

        # Back on Redis: a new client's counter lives there again.
        assert [await get("after") for _ in range(3)] == [200] * 3
        assert [k for k in keys(redis_server) if k.endswith(":h:after")]

    assert all(status < 500 for status in load + victim), collections.Counter(load)
    assert set(load) == {200}
    records = access_records(process, len(load) + len(victim) + 3)
    fell_back = fallbacks(records)
    assert {r["rate_limit_store"] for r in fell_back} == {"memory"}
    assert len(fell_back) > victim_quota + 1  # the stream, too, was served by the fallback meanwhile
    # The victim's 429 came from the fallback store (later ones from the remembered denial).
    victim_records = [r for r in records if r.get("rate_limit") == "denied:header-X-Client-20-in-1hr"]
    assert victim_records and victim_records[0].get("rate_limit_store") == "memory"
    print(f"decisions went back to Redis {resumed_after:.2f}s after it restarted")


# -- 3. Redis Cluster -------------------------------------------------------------------------


def dbsize(node: RedisServer) -> int:
    return int(node.command("DBSIZE").decode().strip().lstrip(":"))


async def test_a_redis_cluster_admits_exactly_the_limit_with_keys_spread_over_its_nodes(upstream, gateway_process, redis_cluster) -> None:
    routes = {
        # Three key kinds in one decision: their keys share the {global} hash tag, so one EVALSHA.
        "mixed": [
            {"key": "ip", "limit": QUOTA, "window": LONG_WINDOW},
            {"key": "route", "limit": 10 * QUOTA, "window": LONG_WINDOW, "algorithm": "sliding_window"},
            {"key": "global", "limit": 10 * QUOTA, "window": LONG_WINDOW, "algorithm": "token_bucket"},
        ],
        "alone": [{"key": "route", "limit": QUOTA, "window": LONG_WINDOW, "algorithm": "sliding_window"}],
    }
    nodes = [f"redis://127.0.0.1:{n.port}" for n in redis_cluster]
    # Far fewer connections than requests in flight: commands must wait for one, not fail.
    config = shared_config(upstream.url, {"cluster_nodes": nodes, "pool_size": 8}, routes)
    process = gateway_process(config)

    assert await burst([process.url + "/mixed"], CONCURRENT) == {200: QUOTA, 429: CONCURRENT - QUOTA}
    assert await burst([process.url + "/alone"], CONCURRENT) == {200: QUOTA, 429: CONCURRENT - QUOTA}

    assert fallbacks(access_records(process, 2 * CONCURRENT)) == []
    assert sum(dbsize(node) for node in redis_cluster) > 0
    stored = {key: node for node in redis_cluster for key in keys(node)}
    assert {stored[k].port for k in stored if "{global}" in k} != {stored[k].port for k in stored if "{alone}" in k}  # two slots, two masters
    # A denied request consumes none of its limits: the route's counter stopped at the ip's quota.
    (route_counter,) = [k for k in stored if "{global}" in k and ":mixed:route-" in k]
    assert stored[route_counter].command("GET", route_counter).split(b"\r\n")[1] == str(QUOTA).encode()


# -- 4. limits keyed by the user ------------------------------------------------------------------

SECRET = "a-test-secret-of-more-than-32-bytes-for-hs256"
ISSUER, AUDIENCE = "https://issuer.test", "rate-limit-tests"


def token_for(subject: str) -> str:
    key = jwk.JWK(kty="oct", k=base64.urlsafe_b64encode(SECRET.encode()).rstrip(b"=").decode())
    now = int(time.time())
    token = jwc_jwt.JWT(header={"alg": "HS256"}, claims={"iss": ISSUER, "aud": AUDIENCE, "sub": subject, "iat": now, "exp": now + 300})
    token.make_signed_token(key)
    return token.serialize()


async def test_user_limits_give_each_user_their_own_quota_and_anonymous_requests_count_by_ip(upstream, start_gateway, client, redis_server) -> None:
    config = shared_config(upstream.url, {"url": redis_server.url}, {"me": [{"key": "user", "limit": 3, "window": LONG_WINDOW}]})
    config["routes"][0]["auth"] = {"required": False}
    config["auth"] = {"jwt": {"secret": SECRET, "algorithms": ["HS256"], "issuer": ISSUER, "audience": AUDIENCE}}
    config["logging"]["access_log"] = False
    gateway = await start_gateway(config)

    async def statuses(count: int, token: str | None = None) -> list[int]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        found = []
        for _ in range(count):
            async with client.get(gateway.url + "/me", headers=headers) as response:
                body = await response.read()
                if response.status == 429:
                    assert_problem(response.status, response.headers, body, 429)
                found.append(response.status)
        return found

    alice, bob = token_for("alice"), token_for("bob")
    assert await statuses(4, alice) == [200, 200, 200, 429]
    assert await statuses(4, bob) == [200, 200, 200, 429]  # alice's use is not bob's
    assert await statuses(4) == [200, 200, 200, 429]  # anonymous: by the client address
    assert await statuses(1, token_for("carol")) == [200]  # the ip's quota is not carol's
    assert await statuses(1, alice) == [429]
    assert sorted(k.rsplit(":", 2)[-2] + ":" + k.rsplit(":", 1)[-1] for k in keys(redis_server)) == ["ip:127.0.0.1", "user:alice", "user:bob", "user:carol"]
    assert len(upstream.requests) == 10  # the 429s were not forwarded


# -- 5. a breaker probe whose client leaves -----------------------------------------------------


async def test_a_breaker_probe_cancelled_by_a_leaving_client_does_not_keep_redis_out_of_decisions(upstream, start_gateway, client, redis_server) -> None:
    config = shared_config(upstream.url, {"url": redis_server.url, "timeout": "300ms"}, {"limited": [{"key": "header:X-Client", "limit": 1000, "window": LONG_WINDOW}]})
    config["logging"]["access_log"] = False
    gateway = await start_gateway(config)
    breaker = gateway.gateway.store.breaker
    url = gateway.url + "/limited"

    async def get(client_id: str, timeout: float = 10) -> int:
        async with client.get(url, headers={"X-Client": client_id}, timeout=aiohttp.ClientTimeout(total=timeout)) as response:
            await response.read()
            return response.status

    assert await get("warm") == 200
    redis_server.process.send_signal(signal.SIGSTOP)  # hung, not dead: commands wait for the timeout
    try:
        assert [await get(f"slow-{i}") for i in range(3)] == [200] * 3  # each after a timeout, from the fallback
        assert breaker.state == "open"
        await asyncio.sleep(breaker.cooldown + 0.1)
        # This request carries the half-open probe; its client gives up before Redis answers.
        with pytest.raises(asyncio.TimeoutError):
            await get("leaves", timeout=0.15)
        await asyncio.sleep(0.05)
        assert breaker.state == "half_open"  # the probe went out with the request that left
    finally:
        redis_server.process.send_signal(signal.SIGCONT)

    deadline = time.monotonic() + 15
    while breaker.state != "closed" and time.monotonic() < deadline:
        assert await get(f"after-{time.monotonic()}") == 200
        await asyncio.sleep(0.1)
    assert breaker.state == "closed", f"the breaker stayed {breaker.state} (probing={breaker.probing})"
    assert await get("back") == 200
    assert [k for k in keys(redis_server) if k.endswith(":h:back")]  # decided by Redis again
