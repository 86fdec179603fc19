"""Prometheus metrics on the admin listener: values move with traffic, labels stay bounded."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import uuid
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import base_config

PROMTOOL = shutil.which("promtool")


async def scrape(client: aiohttp.ClientSession, admin_url: str) -> tuple[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    async with client.get(admin_url + "/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = await response.text()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return text, samples


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_request_metrics_count_requests_by_method_route_and_status(upstream, start_gateway, client) -> None:
    gateway = await start_gateway(base_config(upstream.url))
    config = base_config(upstream.url)
    config["routes"][0]["match"] = {"path": "/api"}
    gateway = await start_gateway(config)
    for path in ("/api/a", "/api/b", "/api/c", "/nowhere"):
        async with client.get(gateway.url + path) as response:
            await response.read()
    _, samples = await scrape(client, gateway.admin_url)
    assert value(samples, "http_request_duration_seconds_count", method="GET", route="all", status_code="200") == 3
    assert value(samples, "http_request_duration_seconds_count", method="GET", route="(unmatched)", status_code="404") == 1
    assert value(samples, "http_requests_in_flight") == 0
    assert value(samples, "upstream_request_duration_seconds_count", upstream="api", target=upstream.url, status_code="200") == 3
    assert value(samples, "upstream_target_up", upstream="api", target=upstream.url) == 1
    assert value(samples, "gateway_build_info", version=__import__("gateway").__version__) == 1


async def test_labels_stay_bounded_whatever_paths_and_methods_clients_send(upstream, start_gateway, client) -> None:
    gateway = await start_gateway(base_config(upstream.url))
    for index in range(1000):
        method = "GET" if index % 2 else f"X{index}"
        async with client.request(method, f"{gateway.url}/{uuid.uuid4().hex}") as response:
            await response.read()
    text, samples = await scrape(client, gateway.admin_url)
    series = {labels for (name, labels) in samples if name == "http_request_duration_seconds_count"}
    assert len(series) <= 3  # GET and OTHER on route "all", whatever the 1,000 paths were
    assert {dict(labels)["method"] for labels in series} <= {"GET", "OTHER"}
    assert sum(value(samples, "http_request_duration_seconds_count", **dict(labels)) for labels in series) == 1000


async def test_the_public_port_does_not_serve_metrics(upstream, start_gateway, client) -> None:
    gateway = await start_gateway(base_config(upstream.url))
    async with client.get(gateway.url + "/metrics") as response:
        assert "http_request_duration_seconds" not in await response.text()
    assert [r.path for r in upstream.requests] == ["/metrics"]  # an ordinary request, proxied


async def test_policy_metrics_count_rate_limit_decisions_and_auth_failures(upstream, start_gateway, client) -> None:
    config = base_config(upstream.url)
    config["routes"][0]["rate_limit"] = [{"key": "ip", "limit": 2, "window": "1m"}]
    config["routes"][0]["auth"] = {"required": True}
    config["auth"] = {"jwt": {"secret": "s" * 32, "algorithms": ["HS256"]}}
    gateway = await start_gateway(config)
    for headers in ({}, {"Authorization": "Bearer junk"}, {}):
        async with client.get(gateway.url + "/", headers=headers) as response:
            await response.read()
    _, samples = await scrape(client, gateway.admin_url)
    assert value(samples, "rate_limit_decisions_total", route="all", limit="ip-2-in-1min", decision="allowed") == 2
    assert value(samples, "rate_limit_decisions_total", route="all", limit="ip-2-in-1min", decision="denied") == 1
    # Every decision's series is made with the policy, counted or not yet (rate() sees the first).
    assert ("rate_limit_decisions_total", (("decision", "dry_run"), ("limit", "ip-2-in-1min"), ("route", "all"))) in samples
    assert value(samples, "auth_failures_total", route="all", reason="missing") == 1
    assert value(samples, "auth_failures_total", route="all", reason="malformed") == 1


async def test_cache_metrics_count_hits_misses_and_bypasses_with_every_series_there_from_the_start(upstream, start_gateway, client) -> None:
    config = base_config(upstream.url)
    config["routes"][0]["cache"] = {"ttl": "1m"}
    gateway = await start_gateway(config)
    text, samples = await scrape(client, gateway.admin_url)
    for result in ("hit", "stale", "miss", "bypass"):  # the hit ratio is defined before the first request
        assert ("cache_requests_total", (("result", result), ("route", "all"))) in samples, text
    for headers in ({}, {}, {}, {"Cache-Control": "no-store"}):
        async with client.get(gateway.url + "/products", headers=headers) as response:
            await response.read()
    _, samples = await scrape(client, gateway.admin_url)
    counts = {result: value(samples, "cache_requests_total", route="all", result=result) for result in ("hit", "stale", "miss", "bypass")}
    assert counts == {"hit": 2, "stale": 0, "miss": 1, "bypass": 1}


async def test_redis_metrics_follow_redis_going_down(upstream, start_gateway, client, redis_server) -> None:
    config = base_config(upstream.url)
    config["routes"][0]["rate_limit"] = [{"key": "ip", "limit": 100, "window": "1m"}]
    config["redis"] = {"url": redis_server.url, "timeout": "500ms"}
    gateway = await start_gateway(config)
    async with client.get(gateway.url + "/") as response:
        await response.read()
    _, samples = await scrape(client, gateway.admin_url)
    assert value(samples, "redis_up") == 1
    assert value(samples, "redis_command_duration_seconds_count", command="rate_limit") >= 1
    redis_server.stop()
    for _ in range(5):
        async with client.get(gateway.url + "/") as response:
            assert response.status == 200
    _, samples = await scrape(client, gateway.admin_url)
    assert value(samples, "redis_up") == 0
    assert value(samples, "redis_circuit_transitions_total", state="open") == 1
    assert value(samples, "store_fallback_decisions_total", mode="memory") == 5


async def test_config_reloads_are_counted(upstream, start_gateway, client) -> None:
    gateway = await start_gateway(base_config(upstream.url))
    assert await gateway.gateway.reload()
    gateway.gateway.config_path.write_text("routes: [")  # type: ignore[union-attr]
    assert not await gateway.gateway.reload()
    _, samples = await scrape(client, gateway.admin_url)
    assert value(samples, "config_reloads_total", result="applied") == 1
    assert value(samples, "config_reloads_total", result="refused") == 1


async def test_the_exposition_passes_promtool_check_metrics(upstream, start_gateway, client) -> None:
    assert PROMTOOL is not None, "promtool comes with Debian's prometheus package: bash .ci/run installs it"
    config = base_config(upstream.url)
    config["routes"][0]["rate_limit"] = [{"key": "ip", "limit": 100, "window": "1m"}]
    gateway = await start_gateway(config)
    async with client.get(gateway.url + "/") as response:
        await response.read()
    text, _ = await scrape(client, gateway.admin_url)
    result = subprocess.run([PROMTOOL, "check", "metrics"], input=text.encode(), capture_output=True, timeout=30)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


async def test_with_two_workers_every_scrape_sees_all_requests(upstream, gateway_process, client) -> None:
    config = base_config(upstream.url)
    config["workers"] = 2
    process = gateway_process(config)
    total = 60
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as fresh:
        await asyncio.gather(*(fresh.get(process.url + "/") for _ in range(total)))
    seen = set()
    for _ in range(10):  # new connections land on either worker; each must report the sum
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as scraper:
            _, samples = await scrape(scraper, process.admin_url)
        seen.add(value(samples, "http_request_duration_seconds_count", method="GET", route="all", status_code="200"))
    assert seen == {total}


async def test_a_target_removed_by_a_reload_leaves_the_exposition(upstream_factory, start_gateway, client) -> None:
    import yaml

    first, second = await upstream_factory(), await upstream_factory()
    config = base_config(first.url)
    gateway = await start_gateway(config)
    _, samples = await scrape(client, gateway.admin_url)
    assert value(samples, "upstream_target_up", upstream="api", target=first.url) == 1
    config["upstreams"]["api"]["targets"] = [second.url]
    config["listen"]["port"] = gateway.port
    gateway.gateway.config_path.write_text(yaml.safe_dump(config))  # type: ignore[union-attr]
    assert await gateway.gateway.reload()
    _, samples = await scrape(client, gateway.admin_url)
    assert ("upstream_target_up", (("target", first.url), ("upstream", "api"))) not in samples
    assert value(samples, "upstream_target_up", upstream="api", target=second.url) == 1
