"""Cache warming: at start through the gateway itself, and `gateway warm` into Redis."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import ROOT, base_config, free_port


def warmed_config(upstream_url: str, paths: list[str], redis_url: str | None = None) -> dict[str, Any]:
    config = base_config(upstream_url)
    config["routes"][0]["cache"] = {"ttl": "10m"}
    config["routes"][0]["warm"] = paths
    config["warm"] = {"every": "1h", "concurrency": 2}
    if redis_url is not None:
        config["redis"] = {"url": redis_url, "timeout": "1s"}
    return config


async def _until(condition: Any, timeout: float = 15.0) -> None:
    for _ in range(int(timeout / 0.05)):
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met in time")


async def test_the_gateway_warms_each_route_s_list_at_start_so_the_first_client_gets_a_hit(upstream, gateway_process, client) -> None:
    process = gateway_process(warmed_config(upstream.url, ["/api/products/featured", "/api/artisans"]))
    await _until(lambda: len(upstream.requests) == 2)
    assert sorted(r.path for r in upstream.requests) == ["/api/artisans", "/api/products/featured"]
    async with client.get(process.url + "/api/products/featured") as response:
        assert response.status == 200
        assert response.headers["Cache-Status"].startswith("gateway; hit")
    assert len(upstream.requests) == 2


def run_warm(config: dict[str, Any], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    config = {**config, "listen": {"host": "127.0.0.1", "port": free_port()}}
    path = tmp_path / "warm.yaml"
    path.write_text(yaml.safe_dump(config))
    return subprocess.run([sys.executable, "-m", "gateway", "warm", "-c", str(path)], capture_output=True, text=True, timeout=60, cwd=ROOT, env=dict(os.environ))


async def test_gateway_warm_fills_redis_with_progress_and_a_gateway_started_later_hits(upstream, redis_server, gateway_process, client, tmp_path) -> None:
    config = warmed_config(upstream.url, ["/a", "/b", "/c"], redis_server.url)
    result = await asyncio.to_thread(run_warm, config, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert [line.split("]")[0] for line in lines[:3]] == ["[1/3", "[2/3", "[3/3"]
    assert all("200 gateway; fwd=miss; stored" in line for line in lines[:3])
    assert lines[3] == "warmed 3 of 3"
    assert len(upstream.requests) == 3
    process = gateway_process({**config, "warm": {"every": "1h"}, "routes": [{**config["routes"][0], "warm": ["/a"]}]})
    await _until(lambda: len(upstream.requests) >= 3)
    async with client.get(process.url + "/b") as response:  # not warmed by this process: from Redis
        assert response.headers["Cache-Status"].startswith("gateway; hit")
    assert len(upstream.requests) == 3  # neither the process's own warm nor the client reached it


async def test_gateway_warm_with_the_memory_store_says_the_warmth_dies_and_fails_on_errors(upstream, tmp_path) -> None:
    config = warmed_config(upstream.url, ["/ok"])
    config["upstreams"]["dead"] = {"targets": [f"http://127.0.0.1:{free_port()}"], "timeouts": {"connect": "1s"}, "retries": 0}
    config["routes"].insert(0, {"name": "dead", "match": {"path": "/dead"}, "upstream": "dead", "warm": ["/dead/x"]})
    result = await asyncio.to_thread(run_warm, config, tmp_path)
    assert result.returncode == 1
    assert "dead GET /dead/x -> 502" in result.stdout
    assert "warmed 1 of 2, 1 failed" in result.stdout
    assert "dies with this command" in result.stdout
