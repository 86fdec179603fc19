"""The gateway as a process: graceful shutdown, reload, workers, and constant memory while streaming."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import base_config


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found += [int(child) for child in text]
    return found


async def test_sigterm_lets_the_request_in_flight_finish_then_exits_0(gateway_process, upstream, client):
    async def slow(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(1.0)
        return web.Response(text="finished")

    upstream.handler = slow
    gw = gateway_process(base_config(upstream.url))
    in_flight = asyncio.ensure_future(client.get(gw.url + "/slow"))
    while not upstream.requests:
        await asyncio.sleep(0.01)
    gw.signal(signal.SIGTERM)
    await asyncio.sleep(0.3)
    # Readiness says "unready" while draining, so a load balancer stops sending traffic.
    async with aiohttp.ClientSession() as admin:
        async with admin.get(gw.admin_url + "/readyz") as ready:
            assert ready.status == 503 and (await ready.json())["status"] == "unready"
    # No new connections once draining has begun.
    with pytest.raises(aiohttp.ClientConnectionError):
        async with aiohttp.ClientSession() as fresh:
            await fresh.get(gw.url + "/new")
    response = await in_flight
    assert response.status == 200 and await response.text() == "finished"
    assert await asyncio.to_thread(gw.wait, 15) == 0


async def test_sigterm_stops_waiting_after_the_drain_timeout(gateway_process, upstream, client):
    async def hang(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(30)
        return web.Response(text="never")

    upstream.handler = hang
    config = base_config(upstream.url)
    config["listen"]["limits"] = {"drain_timeout": "500ms"}
    gw = gateway_process(config)
    in_flight = asyncio.ensure_future(client.get(gw.url + "/hang"))
    while not upstream.requests:
        await asyncio.sleep(0.01)
    started = time.monotonic()
    gw.signal(signal.SIGTERM)
    assert await asyncio.to_thread(gw.wait, 15) == 0
    assert time.monotonic() - started < 10
    with pytest.raises(aiohttp.ClientError):
        await in_flight


async def test_sighup_reloads_a_good_file_and_refuses_a_bad_one(gateway_process, upstream_factory, client):
    first, second = await upstream_factory(), await upstream_factory()
    config = base_config(first.url)
    gw = gateway_process(config)
    async with client.get(gw.url + "/x") as resp:
        assert (await resp.json())["upstream"] == first.port

    config["upstreams"]["api"]["targets"] = [second.url]
    gw.write_config(config)
    gw.signal(signal.SIGHUP)
    await _until(lambda: _generation(gw) == 2)
    async with client.get(gw.url + "/x") as resp:
        assert (await resp.json())["upstream"] == second.port

    gw.config_path.write_text("routes: [unclosed\n")
    gw.signal(signal.SIGHUP)
    await _until(lambda: "reload refused" in gw.log())
    async with client.get(gw.url + "/x") as resp:
        assert (await resp.json())["upstream"] == second.port
    assert _generation(gw) == 2
    refused = [r for r in gw.log_records() if "refused" in r.get("message", "")]
    assert "invalid YAML" in refused[-1]["error"] and str(gw.config_path) in refused[-1]["error"]


async def test_a_reload_waits_for_requests_on_the_old_config(gateway_process, upstream_factory, client):
    first, second = await upstream_factory(), await upstream_factory()

    async def slow(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(1.0)
        return web.Response(text="old pool still open")

    first.handler = slow
    config = base_config(first.url)
    gw = gateway_process(config)
    in_flight = asyncio.ensure_future(client.get(gw.url + "/slow"))
    while not first.requests:
        await asyncio.sleep(0.01)
    config["upstreams"]["api"]["targets"] = [second.url]
    gw.write_config(config)
    gw.signal(signal.SIGHUP)
    await _until(lambda: _generation(gw) == 2)
    response = await in_flight
    assert response.status == 200 and await response.text() == "old pool still open"


async def _two_workers_then_a_new_upstream_in_the_file(gateway_process, upstream_factory):
    """A gateway with workers: 2 whose config file then names another upstream (not reloaded
    yet): (gateway, its workers' pids, the new upstream)."""
    first, second = await upstream_factory(), await upstream_factory()
    config = base_config(first.url)
    config["workers"] = 2
    gw = gateway_process(config)
    await _until(lambda: len(children(gw.process.pid)) == 2)
    workers = children(gw.process.pid)
    config["upstreams"]["api"]["targets"] = [second.url]
    gw.write_config(config)
    return gw, workers, second


def _reloaded_pids(gw) -> set[int]:
    return {r.get("pid") for r in gw.log_records() if "config reloaded" in r.get("message", "")}


async def test_workers_share_the_port_and_all_reload(gateway_process, upstream_factory, client):
    gw, workers, second = await _two_workers_then_a_new_upstream_in_the_file(gateway_process, upstream_factory)
    gw.signal(signal.SIGHUP)
    # Each worker logs its reload; wait for both (a worker that also got the SIGHUP from its
    # process group may log twice).
    await _until(lambda: _reloaded_pids(gw) >= set(workers))
    for _ in range(20):
        async with aiohttp.ClientSession() as fresh:  # new connections, spread over both workers
            async with fresh.get(gw.url + "/x") as resp:
                assert (await resp.json())["upstream"] == second.port, gw.log()[-3000:]
    pids = {r["pid"] for r in gw.log_records() if r.get("message") == "gateway listening"}
    assert pids == set(workers), gw.log()[-3000:]

    os.kill(workers[0], signal.SIGKILL)  # a worker that dies is replaced
    await _until(lambda: len(children(gw.process.pid)) == 2 and workers[0] not in children(gw.process.pid))
    gw.signal(signal.SIGTERM)
    assert await asyncio.to_thread(gw.wait, 20) == 0


async def test_a_worker_signalled_while_it_starts_keeps_running_and_handles_the_signal(gateway_process, upstream_factory):
    # A SIGHUP that reached a worker before its event loop handled signals (a reload just after
    # a start or a respawn) ended it (the default action), and the supervisor replaced it.
    gw, workers, _ = await _two_workers_then_a_new_upstream_in_the_file(gateway_process, upstream_factory)

    def signal_the_replacement_as_soon_as_it_exists() -> int:
        os.kill(workers[0], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            new = [pid for pid in children(gw.process.pid) if pid not in workers]
            if new:
                os.kill(new[0], signal.SIGHUP)  # it has only just been forked
                return new[0]
        raise AssertionError("no worker replaced the killed one")

    replacement = await asyncio.to_thread(signal_the_replacement_as_soon_as_it_exists)
    await _until(lambda: replacement in _reloaded_pids(gw))
    assert sorted(children(gw.process.pid)) == sorted([replacement, workers[1]]), gw.log()[-3000:]
    exits = [r for r in gw.log_records() if r.get("message") == "worker exited; starting another"]
    assert [r["pid"] for r in exits] == [workers[0]], gw.log()[-3000:]
    gw.signal(signal.SIGTERM)
    assert await asyncio.to_thread(gw.wait, 20) == 0


async def test_a_large_upload_and_download_stream_with_constant_memory(gateway_process, upstream, client):
    size = 1024**3  # 1 GiB each way
    chunk = b"x" * (256 * 1024)
    received = {"bytes": 0}

    async def sink_or_source(request: web.Request) -> web.StreamResponse:
        if request.method == "PUT":
            async for data in request.content.iter_any():
                received["bytes"] += len(data)
            return web.json_response({"received": received["bytes"]})
        response = web.StreamResponse(headers={"Content-Length": str(size)})
        await response.prepare(request)
        for _ in range(size // len(chunk)):
            await response.write(chunk)
        return response

    upstream.read_body = False
    upstream.handler = sink_or_source
    gw = gateway_process(base_config(upstream.url))
    async with client.get(gw.url + "/warm") as resp:  # warm the pools before measuring
        await resp.read()
    baseline = rss_kb(gw.process.pid)
    peak = baseline

    async def body():
        nonlocal peak
        for i in range(size // len(chunk)):
            if i % 256 == 0:
                peak = max(peak, rss_kb(gw.process.pid))
            yield chunk

    timeout = aiohttp.ClientTimeout(total=300)
    async with client.put(gw.url + "/upload", data=body(), headers={"Content-Length": str(size)}, timeout=timeout) as resp:
        assert (await resp.json())["received"] == size
    downloaded = 0
    async with client.get(gw.url + "/download", timeout=timeout) as resp:
        async for data in resp.content.iter_chunked(1024 * 1024):
            downloaded += len(data)
            if downloaded % (64 * 1024 * 1024) < len(data):
                peak = max(peak, rss_kb(gw.process.pid))
    assert downloaded == size
    growth_mb = (peak - baseline) / 1024
    assert growth_mb < 16, f"gateway memory grew by {growth_mb:.1f} MB while streaming 2 GiB"


def _generation(gw) -> int:
    import json
    import urllib.request

    with urllib.request.urlopen(gw.admin_url + "/readyz", timeout=2) as resp:
        return json.load(resp)["checks"]["config"]["generation"]


async def _until(condition, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if await asyncio.to_thread(condition):
                return
        except OSError:
            pass
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met in time")


def test_workers_auto_counts_the_cores_the_process_may_run_on() -> None:
    """workers: auto under taskset (or a cpuset) starts one worker per allowed core, not per core of the machine."""
    probe = (
        "import os, sys; from types import SimpleNamespace; from gateway.server import worker_count; "
        "os.sched_setaffinity(0, set(map(int, sys.argv[1].split(',')))); print(worker_count(SimpleNamespace(workers='auto')))"
    )
    cores = sorted(os.sched_getaffinity(0))
    for allowed in (cores[:1], cores):
        out = subprocess.run([sys.executable, "-c", probe, ",".join(map(str, allowed))], capture_output=True, text=True, check=True)
        assert int(out.stdout) == len(allowed)
