"""Dependency faults under a steady load: what clients and operators see while Redis or an
upstream misbehaves, and once it is back.

- Redis killed and restarted under two gateway processes whose route has a rate limit and a
  cache (``on_failure: memory``): no 5xx, and both processes share limits and entries again soon
  after Redis returns; and a burst right after Redis returns is decided by Redis, not failed on
  the pooled connections the crash closed.
- Redis made slow with ``DEBUG SLEEP``: the breaker opens, every request stays far quicker than
  the stall, and decisions go back to Redis when it wakes.
- One of two upstream targets SIGKILLed: retries and ejection keep every GET a 200; a POST may
  be a 502, nothing else.
- A target that accepts and never answers: 504 after the read timeout, and neither the gateway's
  file descriptors nor the target's open connections pile up, also when clients leave early.
- SIGHUP reloads, one after another, with requests in flight: not one request fails.

Everything is real: ``python -m gateway run`` processes, redis-server, upstream servers (in this
process, or in a process of their own where one is killed) and aiohttp clients on 127.0.0.1.
Bounds on time are generous (shared, noisy machines): the tests assert what must hold, not how
fast.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Iterator

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import GatewayProcess, RedisServer, assert_problem, base_config, free_port

LONG_WINDOW = "1h"  # no window ends while a test runs
QUOTA = 5  # the per-client limit the sharing checks use up
# A tiny upstream in a process of its own, so that it can be SIGKILLed like a crashed service.
UPSTREAM_PROCESS = """
import sys
from aiohttp import web

port = int(sys.argv[1])

async def handle(request):
    await request.read()
    return web.json_response({"upstream": port})

app = web.Application()
app.router.add_route("*", "/{tail:.*}", handle)
web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)
"""


# -- load ---------------------------------------------------------------------------------------


@dataclass
class Sample:
    method: str
    started: float  # time.monotonic() when the request was sent
    seconds: float
    status: int | str  # the status, or the name of the client's exception
    body: bytes = b""


Request = tuple[str, str, dict[str, str]]  # method, url, headers


@dataclass
class Load:
    """``workers`` loops, each sending ``next_request(worker, n)`` until stopped; every answer is
    kept with its start time, so that before, during and after a fault can be told apart."""

    next_request: Callable[[int, int], Request]
    workers: int = 4
    fresh_connections: bool = False  # a new connection per request instead of keep-alive
    samples: list[Sample] = field(default_factory=list)

    async def run(self, stop: asyncio.Event) -> None:
        connector = aiohttp.TCPConnector(limit=self.workers, force_close=self.fresh_connections)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=15)) as session:
            await asyncio.gather(*(self._worker(session, stop, worker) for worker in range(self.workers)))

    async def _worker(self, session: aiohttp.ClientSession, stop: asyncio.Event, worker: int) -> None:
        for n in itertools.count():
            if stop.is_set():
                return
            method, url, headers = self.next_request(worker, n)
            started = time.monotonic()
            try:
                async with session.request(method, url, headers=headers, data=b"order" if method == "POST" else None) as response:
                    body = await response.read()
                    status: int | str = response.status
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                status, body = type(exc).__name__, b""
            self.samples.append(Sample(method, started, time.monotonic() - started, status, body))

    def statuses(self, method: str | None = None, since: float = 0.0) -> collections.Counter[int | str]:
        return collections.Counter(s.status for s in self.samples if s.started >= since and method in (None, s.method))

    def server_errors(self) -> list[Sample]:
        return [s for s in self.samples if not isinstance(s.status, int) or s.status >= 500]


@contextlib.asynccontextmanager
async def running(load: Load) -> AsyncIterator[Load]:
    """The load runs while the block does; it is stopped (and every worker awaited) on the way out."""
    stop = asyncio.Event()
    task = asyncio.create_task(load.run(stop))
    try:
        yield load
    finally:
        stop.set()
        await task


async def eventually(check: Callable[[], Any], timeout: float, message: str, every: float = 0.05) -> float:
    """Waits until ``check()`` (sync or async) is truthy; returns how long that took."""
    started = time.monotonic()
    while True:
        found = check()
        if asyncio.iscoroutine(found):
            found = await found
        if found:
            return time.monotonic() - started
        assert time.monotonic() - started < timeout, message
        await asyncio.sleep(every)


# -- what the gateway and Redis say about themselves ----------------------------------------------


async def admin_json(session: aiohttp.ClientSession, process: GatewayProcess, path: str) -> dict[str, Any]:
    async with session.get(process.admin_url + path) as response:
        return await response.json()


async def metric(session: aiohttp.ClientSession, process: GatewayProcess, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include ``labels``, from /metrics."""
    async with session.get(process.admin_url + "/metrics") as response:
        text = await response.text()
    total = 0.0
    for line in text.splitlines():
        found = re.fullmatch(rf"{re.escape(name)}(?:\{{(.*)\}})? (\S+)", line)
        if found and all(f'{key}="{value}"' in (found.group(1) or "") for key, value in labels.items()):
            total += float(found.group(2))
    return total


def command_stat(server: RedisServer, command: str) -> int:
    for line in server.command("INFO", "commandstats").decode().splitlines():
        if line.startswith(f"cmdstat_{command}:"):
            return int(line.split("calls=")[1].split(",")[0])
    return 0


def redis_keys(server: RedisServer, pattern: str) -> list[str]:
    lines = server.command("KEYS", pattern).decode().split("\r\n")
    return [line for line in lines[1:] if line and not line.startswith("$")]


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# -- fixtures of this file ----------------------------------------------------------------------------


@pytest.fixture
def upstream_processes() -> Iterator[Callable[[], tuple[str, subprocess.Popen[bytes]]]]:
    """Starts upstreams in processes of their own: (url, process); all are killed at the end."""
    started: list[subprocess.Popen[bytes]] = []

    def start() -> tuple[str, subprocess.Popen[bytes]]:
        port = free_port()
        process = subprocess.Popen([sys.executable, "-c", UPSTREAM_PROCESS, str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started.append(process)
        deadline = time.monotonic() + 15
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    return f"http://127.0.0.1:{port}", process
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline, "the upstream process did not start"
                time.sleep(0.05)

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait(10)


def limited_and_cached(upstream_url: str, redis_url: str, timeout: str) -> dict[str, Any]:
    """One route, /shop, with a per-client limit and a cache, on Redis with the memory fallback."""
    config = base_config(upstream_url)
    config["routes"] = [{
        "name": "shop", "match": {"path": "/shop"}, "upstream": "api",
        "rate_limit": [{"key": "header:X-Client", "limit": QUOTA, "window": LONG_WINDOW}],
        "cache": {"ttl": "1m"},
    }]  # fmt: skip
    config["redis"] = {"url": redis_url, "timeout": timeout, "on_failure": "memory"}
    return config


def shop_load(urls: list[str], workers: int) -> Load:
    """GETs of 20 products spread over ``urls``, each from a new client (never over its limit)."""

    def next_request(worker: int, n: int) -> Request:
        return "GET", f"{urls[(worker + n) % len(urls)]}/shop/item-{n % 20}", {"X-Client": f"load-{worker}-{n}"}

    return Load(next_request, workers)


# -- 1. Redis killed and restarted under load ----------------------------------------------------------


async def test_redis_killed_and_restarted_under_load_gives_no_5xx_and_two_processes_share_limits_and_cache_again(upstream, gateway_process, redis_server) -> None:
    # A timeout no loaded machine trips: the fault here is a dead Redis, not a slow one.
    config = limited_and_cached(upstream.url, redis_server.url, timeout="1s")
    one, two = gateway_process(config), gateway_process(config)
    probes = itertools.count()

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session:

        async def get(process: GatewayProcess, path: str, client: str) -> tuple[int, str]:
            async with session.get(process.url + path, headers={"X-Client": client}) as response:
                await response.read()
                return response.status, response.headers.get("Cache-Status", "")

        async def limits_shared() -> bool:
            """A new client over both processes gets the quota once, not once per process."""
            client = f"limit-probe-{next(probes)}"
            found = [(await get((one, two)[i % 2], "/shop/limit-probe", client))[0] for i in range(QUOTA + 2)]
            assert set(found) <= {200, 429}, found
            return found == [200] * QUOTA + [429] * 2

        async def cache_shared() -> bool:
            """An entry stored through one process is a hit through the other."""
            path, client = f"/shop/cache-probe-{next(probes)}", f"cache-probe-{next(probes)}"
            first, stored = await get(one, path, client)
            second, answered = await get(two, path, client)
            assert first == second == 200, (first, second)
            return "stored" in stored and "hit" in answered

        assert await limits_shared() and await cache_shared()  # sharing before the fault
        load = shop_load([one.url, two.url], workers=3)
        async with running(load):
            await asyncio.sleep(0.5)
            assert command_stat(redis_server, "evalsha") > 0 and redis_keys(redis_server, "gw:c:*")

            redis_server.stop()  # with requests in flight
            down = time.monotonic()
            await asyncio.sleep(1.5)
            ready = await admin_json(session, one, "/readyz")
            assert ready["status"] == "degraded" and ready["checks"]["redis"]["status"] == "down", ready
            assert not await limits_shared()  # each process enforces the limit alone meanwhile
            served_while_down = len([s for s in load.samples if s.started > down + 0.2])

            redis_server.start()  # empty, on the same port
            restarted = time.monotonic()
            resumed_after = await eventually(
                lambda: _both(limits_shared, cache_shared), timeout=20,
                message="limits and cache were not shared again within 20 s of Redis coming back", every=0.1,
            )  # fmt: skip
            await asyncio.sleep(0.5)  # the load goes on, on Redis
        assert await limits_shared() and await cache_shared()  # and it stays shared
        ready = await admin_json(session, one, "/readyz")

    assert load.server_errors() == [], collections.Counter(s.status for s in load.server_errors())
    assert set(load.statuses()) == {200}
    assert served_while_down > 20  # the load went on while Redis was dead
    assert len([s for s in load.samples if s.started > restarted]) > 20
    assert ready["status"] == "ready" and ready["checks"]["redis"]["circuit"] == "closed", ready
    assert resumed_after < 10, resumed_after  # the breaker probes at least every 4 s
    print(f"limits and cache shared again {resumed_after:.2f}s after Redis restarted; {len(load.samples)} requests")


async def _both(*checks: Callable[[], Any]) -> bool:
    for check in checks:
        if not await check():
            return False
    return True


async def test_a_burst_right_after_redis_came_back_is_decided_by_redis_not_failed_on_connections_the_crash_closed(upstream, gateway_process, redis_server) -> None:
    config = limited_and_cached(upstream.url, redis_server.url, timeout="1s")
    process = gateway_process(config)

    async def burst() -> Load:
        load = shop_load([process.url], workers=40)
        async with running(load):
            await asyncio.sleep(0.5)
        return load

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as admin:
        # A burst leaves the pool with many idle connections, as any busy minute does; Redis then
        # crashes while they are idle, and a light load runs through the outage and the restart.
        first = await burst()
        redis_server.stop()
        light = shop_load([process.url], workers=2)
        async with running(light):
            await eventually(lambda: _redis_up(admin, process, 0), timeout=10, message="the breaker did not open while Redis was dead")
            redis_server.start()
            await eventually(lambda: _redis_up(admin, process, 1), timeout=30, message="the breaker did not close within 30 s of Redis coming back")
        opened = await metric(admin, process, "redis_circuit_transitions_total", state="open")
        fallbacks = await metric(admin, process, "store_fallback_decisions_total", mode="memory")
        second = await burst()  # Redis is back and the breaker closed: this one is Redis's
        reopened = await metric(admin, process, "redis_circuit_transitions_total", state="open") - opened
        fell_back = await metric(admin, process, "store_fallback_decisions_total", mode="memory") - fallbacks

    assert all(load.server_errors() == [] for load in (first, light, second))
    trips = [r.get("error") for r in process.log_records() if r.get("message") == "circuit breaker redis: open"]
    # From its restart on, Redis answers every command: a command sent on a connection the crash
    # closed is the gateway's own failure, and must not take decisions away from Redis again.
    assert (reopened, fell_back) == (0, 0), f"after Redis was back: the breaker opened {reopened:g} more time(s), {fell_back:g} decisions fell back to memory; {trips}"


async def _redis_up(session: aiohttp.ClientSession, process: GatewayProcess, value: int) -> bool:
    return await metric(session, process, "redis_up") == value


# -- 2. Redis made slow ----------------------------------------------------------------------------------


async def test_a_redis_slower_than_its_timeout_opens_the_breaker_keeps_every_request_quick_and_redis_decides_again_after(upstream, gateway_process, redis_server) -> None:
    stall = 3.0
    config = limited_and_cached(upstream.url, redis_server.url, timeout="200ms")
    process = gateway_process(config)
    load = shop_load([process.url], workers=4)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as admin:
        async with running(load):
            await asyncio.sleep(0.5)
            assert command_stat(redis_server, "evalsha") > 0
            opened_before = await metric(admin, process, "redis_circuit_transitions_total", state="open")

            sleeper = await asyncio.create_subprocess_exec(
                "redis-cli", "-p", str(redis_server.port), "DEBUG", "SLEEP", str(stall),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
            stalled = time.monotonic()
            await asyncio.sleep(1.0)
            during = await admin_json(admin, process, "/readyz")  # Redis still asleep
            assert await metric(admin, process, "redis_up") == 0
            output, _ = await sleeper.communicate()
            assert sleeper.returncode == 0 and b"OK" in output, output
            awake = time.monotonic()
            assert awake - stalled >= stall - 0.5  # Redis really was asleep that long

            async def on_redis_again() -> bool:
                """Redis up, and half a second of load without one fallback decision."""
                if await metric(admin, process, "redis_up") != 1:
                    return False
                fallbacks = await metric(admin, process, "store_fallback_decisions_total", mode="memory")
                calls = command_stat(redis_server, "evalsha")
                await asyncio.sleep(0.5)
                return await metric(admin, process, "store_fallback_decisions_total", mode="memory") == fallbacks and command_stat(redis_server, "evalsha") > calls

            back_after = await eventually(on_redis_again, timeout=20, message="decisions did not go back to Redis within 20 s", every=0.1)
        opened = await metric(admin, process, "redis_circuit_transitions_total", state="open") - opened_before
        fallbacks = await metric(admin, process, "store_fallback_decisions_total", mode="memory")

    assert load.server_errors() == [], collections.Counter(s.status for s in load.server_errors())
    assert set(load.statuses()) == {200}
    assert during["status"] == "degraded" and during["checks"]["redis"]["circuit"] in ("open", "half_open"), during
    assert opened >= 1 and fallbacks > 0
    in_stall = [s for s in load.samples if stalled <= s.started < awake]
    assert len(in_stall) > 20, len(in_stall)  # requests went on while Redis slept
    slowest = max(s.seconds for s in load.samples)
    assert slowest < stall / 2, f"a request took {slowest:.2f}s while Redis slept {stall}s"
    print(f"{len(in_stall)} requests during the {stall:g}s stall, slowest {slowest * 1000:.0f} ms; back on Redis {back_after:.2f}s after it woke")


# -- 3. an upstream target killed --------------------------------------------------------------------


async def test_one_of_two_targets_killed_under_load_leaves_every_get_a_200_and_posts_200_or_502(upstream_processes, gateway_process) -> None:
    (doomed_url, doomed), (survivor_url, _) = upstream_processes(), upstream_processes()
    config = base_config(doomed_url, survivor_url)
    config["upstreams"]["api"].update(retries=1, health={"passive": {"failures": 2, "eject_for": "30s"}})
    process = gateway_process(config)

    def next_request(worker: int, n: int) -> Request:
        return ("POST" if worker == 0 else "GET"), f"{process.url}/orders/{n}", {}

    load = Load(next_request, workers=5)
    async with running(load):
        await asyncio.sleep(0.5)
        doomed.send_signal(signal.SIGKILL)  # a crash: in-flight and pooled connections drop
        killed = time.monotonic()
        await asyncio.sleep(1.5)
    async with aiohttp.ClientSession() as admin:
        ready = await admin_json(admin, process, "/readyz")

    assert load.statuses("GET", since=killed) and set(load.statuses("GET")) == {200}, load.statuses("GET")
    assert set(load.statuses("POST")) <= {200, 502}, load.statuses("POST")
    ports = collections.Counter(json.loads(s.body)["upstream"] for s in load.samples if s.status == 200 and s.started > killed + 0.5)
    assert set(ports) == {int(survivor_url.rsplit(":", 1)[1])}, ports  # the dead target left the rotation
    assert ready["checks"]["upstreams"]["api"]["targets"][doomed_url]["status"] == "ejected", ready
    records = process.log_records()
    # The fault was met, not dodged: attempts on the dead target failed (and GETs went on elsewhere).
    assert [r for r in records if r.get("message") == "upstream attempt failed" and r.get("target") == doomed_url]
    assert [r for r in records if r.get("message") == "target ejected" and r.get("target") == doomed_url]
    print(f"after the kill: GET {dict(load.statuses('GET', since=killed))}, POST {dict(load.statuses('POST', since=killed))}")


# -- 4. an upstream that hangs -----------------------------------------------------------------------


@dataclass
class Hanging:
    """A TCP server that reads what it is sent and never answers; it counts its connections."""

    accepted: int = 0
    connections: set[asyncio.StreamWriter] = field(default_factory=set)
    server: Any = None

    @property
    def open(self) -> int:
        return len(self.connections)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.connections.add(writer)
        try:
            while await reader.read(65536):  # until the gateway closes its side
                pass
        except ConnectionError:
            pass
        finally:
            self.connections.discard(writer)
            writer.close()

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in list(self.connections):
            writer.close()
        await self.server.wait_closed()


async def test_a_hanging_upstream_is_a_504_after_the_read_timeout_and_its_connections_do_not_pile_up(gateway_process) -> None:
    hanging = Hanging()
    config = base_config(await hanging.start())
    # Health off: the point is what each request gets, not the ejection after a few timeouts.
    config["upstreams"]["api"].update(timeouts={"connect": "1s", "read": "300ms"}, health={"passive": False})
    process = gateway_process(config)
    rounds, waiting, leaving = 5, 6, 4
    answers: list[tuple[int, float]] = []
    fds: list[int] = []

    async def wait_for_answer(session: aiohttp.ClientSession, n: int) -> None:
        started = time.monotonic()
        async with session.get(f"{process.url}/hang/{n}") as response:
            assert_problem(response.status, response.headers, await response.read(), 504)
            answers.append((response.status, time.monotonic() - started))

    async def leave_early(session: aiohttp.ClientSession, n: int) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            async with session.get(f"{process.url}/leave/{n}", timeout=aiohttp.ClientTimeout(total=0.1)) as response:
                await response.read()

    async def one_round(round_: int) -> None:
        # A new client session per round: the connections of the clients that left are gone.
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            await asyncio.gather(
                *(wait_for_answer(session, round_ * 100 + n) for n in range(waiting)),
                *(leave_early(session, round_ * 100 + n) for n in range(leaving)),
            )  # fmt: skip
        await eventually(lambda: hanging.open == 0, timeout=5, message=f"round {round_}: {hanging.open} upstream connections left open")

    pid = process.process.pid
    try:
        await one_round(0)  # a first round makes whatever the gateway opens once (threads, pools)
        await asyncio.sleep(0.3)
        baseline = fd_count(pid)
        for round_ in range(1, rounds + 1):
            await one_round(round_)
            # The clients' sockets close a moment after they leave; what stays is a leak.
            await eventually(lambda: fd_count(pid) <= baseline + 1, timeout=5, message=f"round {round_}: the gateway holds {fd_count(pid)} fds, {baseline} before")
            fds.append(fd_count(pid))
    finally:
        await hanging.stop()

    assert len(answers) == (rounds + 1) * waiting
    assert all(status == 504 for status, _ in answers)
    assert all(0.25 <= seconds < 5 for _, seconds in answers), sorted(seconds for _, seconds in answers)  # after the read timeout
    # Every request reached the target once: a read timeout is not retried.
    assert (rounds + 1) * waiting <= hanging.accepted <= (rounds + 1) * (waiting + leaving)
    print(f"upstream connections accepted {hanging.accepted}, gateway fds {baseline} before, per round {fds}")


# -- 5. reloads under load -----------------------------------------------------------------------------


async def test_sighup_reloads_one_after_another_under_load_fail_no_request(upstream_factory, gateway_process) -> None:
    first, second = await upstream_factory(), await upstream_factory()

    async def a_little_slow(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(0.02)  # requests are in flight whenever a reload lands
        return web.json_response({"upstream": request.url.port})

    for each in (first, second):
        each.handler = a_little_slow
    config = base_config(first.url)
    config["listen"]["limits"] = {"drain_timeout": "5s"}
    process = gateway_process(config)
    reloads = 8

    def next_request(worker: int, n: int) -> Request:
        return "GET", f"{process.url}/items/{n}", {"X-Client": f"reload-{worker}-{n}"}

    kept_alive, fresh = Load(next_request, workers=4), Load(next_request, workers=2, fresh_connections=True)
    async with aiohttp.ClientSession() as admin:
        async with running(kept_alive), running(fresh):
            await asyncio.sleep(0.3)
            for generation in range(2, reloads + 2):
                config["upstreams"]["api"]["targets"] = [(first, second)[generation % 2].url]
                # Every other generation adds policies too: a new chain, not only a new pool.
                if generation % 2:
                    config["routes"][0]["rate_limit"] = [{"key": "header:X-Client", "limit": 1000, "window": "1m"}]
                    config["routes"][0]["security_headers"] = {"preset": "strict"}
                else:
                    config["routes"][0].pop("rate_limit", None)
                    config["routes"][0].pop("security_headers", None)
                process.write_config(config)
                process.signal(signal.SIGHUP)
                await eventually(
                    lambda g=generation: _generation(admin, process, g), timeout=10, message=f"generation {generation} was not applied",
                )  # fmt: skip
                await asyncio.sleep(0.15)
        last = (first, second)[(reloads + 1) % 2]
        async with admin.get(f"{process.url}/after") as response:
            assert response.status == 200 and (await response.json())["upstream"] == last.port

    samples = kept_alive.samples + fresh.samples
    assert len(samples) > 100
    assert collections.Counter(s.status for s in samples) == {200: len(samples)}
    assert len(first.requests) > 20 and len(second.requests) > 20  # both configs served
    assert "Traceback" not in process.log()
    print(f"{len(samples)} requests over {reloads} reloads, all 200")


async def _generation(session: aiohttp.ClientSession, process: GatewayProcess, wanted: int) -> bool:
    return (await admin_json(session, process, "/readyz"))["checks"]["config"]["generation"] >= wanted
