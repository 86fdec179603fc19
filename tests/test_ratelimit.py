"""rate_limit: limits per route over the memory store and a real redis-server; headers, 429, failures."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from typing import Any

import aiohttp
import pytest

from gateway.policies.ratelimit import partition_key
from tests.conftest import RedisServer, assert_problem, base_config


def limited(upstream_url: str, *limits: dict[str, Any], redis: RedisServer | None = None, on_failure: str = "memory") -> dict[str, Any]:
    config = base_config(upstream_url)
    config["routes"][0]["rate_limit"] = list(limits)
    if redis is not None:
        config["redis"] = {"url": redis.url, "timeout": "500ms", "on_failure": on_failure}
    return config


async def statuses(client: aiohttp.ClientSession, url: str, count: int, headers: dict[str, str] | None = None) -> list[int]:
    found = []
    for _ in range(count):
        async with client.get(url, headers=headers) as response:
            await response.read()
            found.append(response.status)
    return found


@pytest.fixture(params=["memory", "redis"])
def store_kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def maybe_redis(store_kind: str, request: pytest.FixtureRequest) -> RedisServer | None:
    return request.getfixturevalue("redis_server") if store_kind == "redis" else None


async def test_a_limit_admits_its_quota_then_answers_429_with_retry_after(upstream, start_gateway, client, maybe_redis) -> None:
    gateway = await start_gateway(limited(upstream.url, {"key": "ip", "limit": 3, "window": "1m"}, redis=maybe_redis))
    assert await statuses(client, gateway.url + "/", 3) == [200, 200, 200]
    async with client.get(gateway.url + "/") as response:
        document = assert_problem(response.status, response.headers, await response.read(), 429)
        assert document["type"] == "https://gateway.dev/problems/rate-limited"
        assert document["detail"] == "limit of 3 per 1min for ip exceeded"
        assert 55 <= int(response.headers["Retry-After"]) <= 60
    assert len(upstream.requests) == 3  # the refused request was not forwarded


async def test_draft_8_headers_are_written_as_express_rate_limit_writes_them(upstream, start_gateway, client, maybe_redis) -> None:
    gateway = await start_gateway(limited(upstream.url, {"key": "ip", "limit": 5, "window": "15m"}, redis=maybe_redis))
    async with client.get(gateway.url + "/") as response:
        assert response.headers["RateLimit"] == '"ip-5-in-15min"; r=4; t=900'
        policy = response.headers["RateLimit-Policy"]
    # pk is express-rate-limit's partition key: a hash of the counter's key, never the address.
    assert re.fullmatch(r'"ip-5-in-15min"; q=5; w=900; pk=:[A-Za-z0-9+/]{16}:', policy)
    assert partition_key("a") != partition_key("b") and len(partition_key("a")) == 16


@pytest.mark.parametrize(
    ("draft", "expected"),
    [
        ("draft-6", {"RateLimit-Policy": "5;w=60", "RateLimit-Limit": "5", "RateLimit-Remaining": "4", "RateLimit-Reset": "60"}),
        ("draft-7", {"RateLimit-Policy": "5;w=60", "RateLimit": "limit=5, remaining=4, reset=60"}),
    ],
)
async def test_older_drafts_and_legacy_headers_are_available(draft: str, expected: dict[str, str], upstream, start_gateway, client) -> None:
    gateway = await start_gateway(limited(upstream.url, {"key": "ip", "limit": 5, "window": "1m", "standard_headers": draft, "legacy_headers": True}))
    async with client.get(gateway.url + "/") as response:
        for name, value in expected.items():
            assert response.headers.getall(name) == [value]
        assert response.headers["X-RateLimit-Limit"] == "5" and response.headers["X-RateLimit-Remaining"] == "4"
        assert int(response.headers["X-RateLimit-Reset"]) > 1_700_000_000  # epoch seconds


async def test_headers_can_be_switched_off(upstream, start_gateway, client) -> None:
    gateway = await start_gateway(limited(upstream.url, {"key": "ip", "limit": 5, "window": "1m", "standard_headers": False}))
    async with client.get(gateway.url + "/") as response:
        assert not [name for name in response.headers if "ratelimit" in name.lower()]


async def test_with_several_limits_the_headers_describe_the_one_closest_to_exhaustion(upstream, start_gateway, client, maybe_redis) -> None:
    config = limited(upstream.url, {"key": "ip", "limit": 100, "window": "1m"}, {"key": "route", "limit": 3, "window": "1s", "algorithm": "token_bucket"}, redis=maybe_redis)
    gateway = await start_gateway(config)
    async with client.get(gateway.url + "/") as response:
        assert response.headers["RateLimit"].startswith('"route-3-in-1sec"; r=2;')


async def test_each_key_kind_counts_separately(upstream, start_gateway, client, maybe_redis) -> None:
    config = limited(upstream.url, {"key": "header:X-Api-Key", "limit": 2, "window": "1m"}, redis=maybe_redis)
    gateway = await start_gateway(config)
    assert await statuses(client, gateway.url + "/", 3, {"X-Api-Key": "alpha"}) == [200, 200, 429]
    assert await statuses(client, gateway.url + "/", 2, {"X-Api-Key": "beta"}) == [200, 200]
    assert await statuses(client, gateway.url + "/", 3) == [200, 200, 429]  # no header: by ip


async def test_a_global_limit_is_shared_by_every_route_that_has_it(upstream, start_gateway, client, maybe_redis) -> None:
    config = base_config(upstream.url)
    shared = [{"key": "global", "limit": 3, "window": "1m", "name": "all-traffic"}]
    config["defaults"] = {"rate_limit": shared}
    config["routes"] = [
        {"name": "a", "match": {"path": "/a"}, "upstream": "api"},
        {"name": "b", "match": {"path": "/b"}, "upstream": "api"},
    ]
    if maybe_redis is not None:
        config["redis"] = {"url": maybe_redis.url, "timeout": "500ms"}
    gateway = await start_gateway(config)
    assert await statuses(client, gateway.url + "/a", 2) == [200, 200]
    assert await statuses(client, gateway.url + "/b", 2) == [200, 429]


async def test_allowed_networks_are_never_limited(upstream, start_gateway, client) -> None:
    gateway = await start_gateway(limited(upstream.url, {"key": "ip", "limit": 1, "window": "1m", "allow": ["127.0.0.0/8"]}))
    assert await statuses(client, gateway.url + "/", 5) == [200] * 5


async def test_a_custom_message_is_the_429_detail(upstream, start_gateway, client) -> None:
    gateway = await start_gateway(limited(upstream.url, {"key": "ip", "limit": 1, "window": "1m", "message": "slow down, please"}))
    await statuses(client, gateway.url + "/", 1)
    async with client.get(gateway.url + "/") as response:
        assert assert_problem(response.status, response.headers, await response.read(), 429)["detail"] == "slow down, please"


async def test_dry_run_lets_requests_through_with_headers_and_logs_the_would_be_denial(upstream, start_gateway, client) -> None:
    import io

    from gateway.access_log import AccessLog

    stream = io.StringIO()
    access_log = AccessLog(True, True, stream)
    gateway = await start_gateway(limited(upstream.url, {"key": "ip", "limit": 2, "window": "1m", "dry_run": True}), access_log=access_log)
    assert await statuses(client, gateway.url + "/", 4) == [200] * 4
    async with client.get(gateway.url + "/") as response:
        assert response.headers["RateLimit"].startswith('"ip-2-in-1min"; r=0;')
    access_log.close()
    notes = [json.loads(line).get("rate_limit") for line in stream.getvalue().splitlines()]
    assert notes == [None, None, "dry_run:ip-2-in-1min", "dry_run:ip-2-in-1min", "dry_run:ip-2-in-1min"]
    assert len(upstream.requests) == 5


async def test_a_flooding_key_costs_no_redis_round_trips_once_over_its_limit(upstream, start_gateway, client, redis_server) -> None:
    gateway = await start_gateway(limited(upstream.url, {"key": "ip", "limit": 5, "window": "1m"}, redis=redis_server))
    assert await statuses(client, gateway.url + "/", 6) == [200] * 5 + [429]
    before = _evalsha_calls(redis_server)
    assert await statuses(client, gateway.url + "/", 200) == [429] * 200
    assert _evalsha_calls(redis_server) == before  # 200 denials, 0 round trips


def _evalsha_calls(server: RedisServer) -> int:
    info = server.command("INFO", "commandstats").decode()
    for line in info.splitlines():
        if line.startswith("cmdstat_evalsha:"):
            return int(line.split("calls=")[1].split(",")[0])
    return 0


async def test_one_round_trip_decides_every_limit_of_a_route(upstream, start_gateway, client, redis_server) -> None:
    config = limited(upstream.url, {"key": "ip", "limit": 100, "window": "1m"}, {"key": "route", "limit": 100, "window": "1s", "algorithm": "sliding_window"}, {"key": "global", "limit": 100, "window": "1m", "algorithm": "token_bucket"}, redis=redis_server)
    gateway = await start_gateway(config)
    await statuses(client, gateway.url + "/", 1)  # the first call may load the script
    before = _evalsha_calls(redis_server)
    await statuses(client, gateway.url + "/", 10)
    assert _evalsha_calls(redis_server) - before == 10


async def test_with_redis_down_the_memory_fallback_keeps_limiting_without_a_5xx(upstream, start_gateway, client, redis_server) -> None:
    gateway = await start_gateway(limited(upstream.url, {"key": "ip", "limit": 3, "window": "1m"}, redis=redis_server))
    assert await statuses(client, gateway.url + "/", 1) == [200]
    redis_server.stop()
    found = await statuses(client, gateway.url + "/", 6)
    assert all(status < 500 for status in found)
    assert found == [200, 200, 200, 429, 429, 429]  # the same limit, per process


@pytest.mark.parametrize(("mode", "expected"), [("allow", 200), ("deny", 503)])
async def test_on_failure_allow_or_deny_decides_while_redis_is_down(mode: str, expected: int, upstream, start_gateway, client, redis_server) -> None:
    gateway = await start_gateway(limited(upstream.url, {"key": "ip", "limit": 1, "window": "1m"}, redis=redis_server, on_failure=mode))
    redis_server.stop()
    assert await statuses(client, gateway.url + "/", 3) == [expected] * 3


async def test_the_circuit_breaker_stops_calling_a_dead_redis_and_recovers(upstream, start_gateway, client, redis_server) -> None:
    gateway = await start_gateway(limited(upstream.url, {"key": "ip", "limit": 1000, "window": "1m"}, redis=redis_server))
    store = gateway.gateway.store
    lines: list[logging.LogRecord] = []
    recorder = logging.Handler()
    recorder.emit = lines.append  # type: ignore[method-assign]
    logging.getLogger("gateway").addHandler(recorder)
    redis_server.stop()
    try:
        await statuses(client, gateway.url + "/", 20)
    finally:
        logging.getLogger("gateway").removeHandler(recorder)
    assert store.breaker.state == "open" and store.breaker.transitions["open"] == 1  # one transition, not 20
    breaker_lines = [r for r in lines if r.getMessage().startswith("circuit breaker redis")]
    assert [r.getMessage() for r in breaker_lines] == ["circuit breaker redis: open"]  # one log line, not one per request
    redis_server.start()
    for _ in range(100):
        await statuses(client, gateway.url + "/", 1)
        if store.breaker.state == "closed":
            break
        await asyncio.sleep(0.1)
    assert store.breaker.state == "closed"
    assert _evalsha_calls(redis_server) > 0  # decisions are shared again


@pytest.mark.parametrize(("on_failure", "status", "state"), [("memory", 200, "degraded"), ("deny", 503, "unready")])
async def test_readiness_reports_redis_with_its_response_time_and_follows_on_failure(on_failure: str, status: int, state: str, upstream, start_gateway, client, redis_server) -> None:
    gateway = await start_gateway(limited(upstream.url, {"key": "ip", "limit": 5, "window": "1m"}, redis=redis_server, on_failure=on_failure))
    async with client.get(gateway.admin_url + "/readyz") as response:
        body = await response.json()
        assert response.status == 200 and body["status"] == "ready"
        assert body["checks"]["redis"]["status"] == "up" and body["checks"]["redis"]["response_time_ms"] >= 0
    redis_server.stop()
    async with client.get(gateway.admin_url + "/readyz") as response:
        body = await response.json()
        assert response.status == status and body["status"] == state
        assert body["checks"]["redis"]["status"] == "down"


async def test_scripts_flushed_from_redis_are_loaded_again(upstream, start_gateway, client, redis_server) -> None:
    gateway = await start_gateway(limited(upstream.url, {"key": "ip", "limit": 3, "window": "1m"}, redis=redis_server))
    assert await statuses(client, gateway.url + "/", 1) == [200]
    assert redis_server.command("SCRIPT", "FLUSH").startswith(b"+OK")  # as after a Redis restart
    assert await statuses(client, gateway.url + "/", 3) == [200, 200, 429]  # NOSCRIPT → loaded again, count kept


async def test_a_master_found_through_sentinel_keeps_the_limits(upstream, start_gateway, client, redis_server, tmp_path) -> None:
    import subprocess

    from tests.conftest import free_port

    port = free_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(f"port {port}\nbind 127.0.0.1\nsentinel monitor shop 127.0.0.1 {redis_server.port} 1\n")
    sentinel = subprocess.Popen(["redis-server", str(conf), "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        config = limited(upstream.url, {"key": "ip", "limit": 2, "window": "1m"})
        config["redis"] = {"sentinel": {"master": "shop", "nodes": [f"redis://127.0.0.1:{port}"]}, "timeout": "1s"}
        probe = RedisServer(port, tmp_path)  # only to ask the sentinel, never started or stopped
        for _ in range(100):
            try:
                if str(redis_server.port).encode() in probe.command("SENTINEL", "get-master-addr-by-name", "shop"):
                    break
            except OSError:
                pass
            await asyncio.sleep(0.05)
        gateway = await start_gateway(config)
        found = await statuses(client, gateway.url + "/", 3)
        assert found == [200, 200, 429]
        assert int(redis_server.command("DBSIZE").split(b":")[1]) >= 1  # the counters live on the master
        assert gateway.gateway.store.breaker.state == "closed"
    finally:
        sentinel.kill()
        sentinel.wait(10)


async def test_readiness_can_be_told_that_redis_down_means_unready(upstream, start_gateway, client, redis_server) -> None:
    config = limited(upstream.url, {"key": "ip", "limit": 5, "window": "1m"}, redis=redis_server)
    config["admin"] = {"host": "127.0.0.1", "port": 0, "unready_when_degraded": ["redis"]}
    gateway = await start_gateway(config)
    redis_server.stop()
    async with client.get(gateway.admin_url + "/readyz") as response:
        body = await response.json()
        assert response.status == 503 and body["status"] == "unready"
    async with client.get(gateway.url + "/") as response:
        assert response.status == 200  # requests are still answered (on_failure: memory)
