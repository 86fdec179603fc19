"""The gateway under a steady load while a dependency fails: what clients see before, during and
after each fault, and how long shared state takes to come back.

    python -m benchmarks.faults [--seconds 3] [--connections 16] [--scenarios redis-kill,redis-slow,...] [--keep]

Everything runs on loopback and is started (and stopped) here: a redis-server on a free port
(taking DEBUG from loopback), small aiohttp upstreams in processes of their own (this module's
``upstream`` command; SIGUSR1 makes one stop answering, SIGUSR2 answer again) and the gateway
(``python -m gateway run``). Each scenario runs the load for --seconds before the fault,
--seconds during it and --seconds after it:

    redis-kill     two gateways share one Redis; their route has a per-client limit and a cache
                   (on_failure: memory). Redis is SIGKILLed, then started again, empty. Measured
                   too: the time from the restart until both gateways share limits again (a new
                   client gets its quota once over both, not once per gateway) and an entry
                   stored through one is a hit through the other.
    redis-slow     the same route on one gateway; Redis stalls (DEBUG SLEEP) for the whole fault
                   phase, far beyond redis.timeout (200ms). Measured too: the time from Redis
                   waking until the gateway's breaker has closed again (redis_up = 1).
    upstream-kill  two targets; one is SIGKILLed, and started again on its port when the fault
                   phase ends. One request in eight is a POST (never retried). Measured too: the
                   time from the restart until the target answers again (passive ejection, 2s).
    upstream-hang  one target that stops answering (it accepts and reads, never responds) for
                   the fault phase; read timeout 1s, passive health off, so every request meets
                   the hang (those in flight as it begins too: a few 504s fall in "before").
                   Measured too: the gateway's and the target's open file descriptors
                   before, at the end of and after the hang (a leak would keep them up).
    reload         SIGHUP every 250ms through the fault phase, alternating the target and the
                   route's policies.

Load: an asyncio/aiohttp loop in this process with --connections keep-alive connections, each
request from a new client id (so the per-client limit never denies the load), every answer kept
with its start time and latency. With taskset, the load, Redis and the upstreams share half the
cores and the gateways get the other half. The table gives, per scenario and phase, the requests,
their statuses (2xx/4xx/5xx, and client errors such as a reset connection), p50/p99/max
latency and the measure above; findings list what broke a rule (a 5xx where on_failure: memory
promises none, a GET that failed while a target was left, a POST failing otherwise than 502,
descriptors that stayed up, a process left running). Every run goes to
benchmarks/results/faults-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Sequence

from benchmarks.common import (
    ROOT,
    Processes,
    cpu_plan,
    elapsed,
    findings_lines,
    free_port,
    interrupt,
    new_report,
    save_report,
    say,
    tear_down,
    version,
)

SCENARIOS = ("redis-kill", "redis-slow", "upstream-kill", "upstream-hang", "reload")
PHASES = ("before", "during", "after")
QUOTA = 5  # the per-client limit the sharing probes use up
REQUEST_TIMEOUT = 10.0  # the load's own bound on one request
RESUME_TIMEOUT = 30.0  # how long to wait for shared state or a target to come back
STALL_MS = 2000.0  # a request slower than this while Redis fails or returns is a finding




# -- the upstream ---------------------------------------------------------------------------------


def serve_upstream(port: int) -> None:
    """Answers every request with ``{"upstream": PORT}``; SIGUSR1: stop answering, SIGUSR2: answer again."""
    from aiohttp import web

    state: dict[str, Any] = {}

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        await state["answering"].wait()
        return web.json_response({"upstream": port})

    async def on_startup(app: web.Application) -> None:
        state["answering"] = asyncio.Event()
        state["answering"].set()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGUSR1, state["answering"].clear)
        loop.add_signal_handler(signal.SIGUSR2, state["answering"].set)

    app = web.Application()
    app.on_startup.append(on_startup)
    app.router.add_route("*", "/{tail:.*}", handle)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


# -- load -----------------------------------------------------------------------------------------


@dataclass
class Sample:
    method: str
    started: float  # time.monotonic()
    seconds: float
    status: int | str  # the status, or the client's exception
    body: bytes


Request = tuple[str, str, dict[str, str]]


@dataclass
class Load:
    """``connections`` loops sending ``next_request(worker, n)`` until stopped; every answer kept."""

    next_request: Callable[[int, int], Request]
    connections: int
    samples: list[Sample] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self._run())

    async def finish(self) -> None:
        self.stop.set()
        assert self.task is not None
        await self.task

    async def _run(self) -> None:
        import aiohttp

        connector = aiohttp.TCPConnector(limit=self.connections)
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout, skip_auto_headers=("User-Agent",)) as session:
            await asyncio.gather(*(self._worker(session, worker) for worker in range(self.connections)))

    async def _worker(self, session: Any, worker: int) -> None:
        import aiohttp

        for n in itertools.count():
            if self.stop.is_set():
                return
            method, url, headers = self.next_request(worker, n)
            started = time.monotonic()
            try:
                async with session.request(method, url, headers=headers, data=b'{"order": 1}' if method == "POST" else None) as response:
                    body = await response.read()
                    status: int | str = response.status
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                status, body = type(exc).__name__, b""
            self.samples.append(Sample(method, started, time.monotonic() - started, status, body))


def percentile(values: Sequence[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(round(share * (len(ordered) - 1))), len(ordered) - 1)] if ordered else 0.0


def phase_figures(samples: list[Sample]) -> dict[str, Any]:
    statuses = collections.Counter(str(s.status) for s in samples)
    seconds = [s.seconds for s in samples]
    by_class = collections.Counter(f"{s.status // 100}xx" if isinstance(s.status, int) else "errors" for s in samples)
    return {
        "requests": len(samples),
        "2xx": by_class["2xx"], "4xx": by_class["4xx"], "5xx": by_class["5xx"], "errors": by_class["errors"],
        "statuses": dict(sorted(statuses.items())),
        "p50_ms": percentile(seconds, 0.50) * 1000, "p99_ms": percentile(seconds, 0.99) * 1000, "max_ms": max(seconds, default=0.0) * 1000,
        "by_method": {m: dict(sorted(collections.Counter(str(s.status) for s in samples if s.method == m).items())) for m in sorted({s.method for s in samples})},
    }  # fmt: skip


# -- the processes ----------------------------------------------------------------------------------


@dataclass
class Bench:
    """What every scenario uses: the scratch folder, the processes, the cores, an HTTP session."""

    scratch: Path
    processes: Processes
    load_cores: list[int] | None
    server_cores: list[int] | None
    connections: int
    seconds: float
    session: Any = None
    names: collections.Counter[str] = field(default_factory=collections.Counter)

    def name(self, kind: str) -> str:
        self.names[kind] += 1
        return f"{kind}-{self.names[kind]}"

    async def wait_for_port(self, port: int, process: subprocess.Popen[bytes], name: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}:\n{self.processes.log_text(name)[-3000:]}")
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} is not listening on {port} after {timeout:g}s") from None
                await asyncio.sleep(0.05)

    async def redis(self, port: int | None = None) -> tuple[int, subprocess.Popen[bytes]]:
        port = port or free_port()
        name = self.name("redis")
        command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                   "--dir", str(self.scratch), "--protected-mode", "no", "--enable-debug-command", "local"]  # fmt: skip
        process = self.processes.start(name, command, self.load_cores)
        await self.wait_for_port(port, process, name)
        return port, process

    async def upstream(self, port: int | None = None) -> tuple[int, subprocess.Popen[bytes]]:
        port = port or free_port()
        name = self.name("upstream")
        process = self.processes.start(name, [sys.executable, "-m", "benchmarks.faults", "upstream", str(port)], self.load_cores, cwd=ROOT)
        await self.wait_for_port(port, process, name)
        return port, process

    async def gateway(self, config: dict[str, Any]) -> "Gateway":
        port, admin = free_port(), free_port()
        config = {
            "listen": {"host": "127.0.0.1", "port": port, "limits": {"drain_timeout": "2s"}},
            "admin": {"host": "127.0.0.1", "port": admin},
            "workers": 1,
            "logging": {"level": "warning", "format": "json", "access_log": False},
            **config,
        }
        name = self.name("gateway")
        path = self.scratch / f"{name}.yaml"
        path.write_text(json.dumps(config, indent=2))  # JSON is YAML
        process = self.processes.start(name, [sys.executable, "-m", "gateway", "run", "-c", str(path)], self.server_cores, cwd=self.scratch)
        await self.wait_for_port(admin, process, name)
        await self.wait_for_port(port, process, name)
        return Gateway(name, port, admin, path, process)

    def kill(self, process: subprocess.Popen[bytes]) -> None:
        """SIGKILL, like a crash; then forget the process."""
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(10)
        self.processes.stop(process)

    async def get(self, url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        async with self.session.get(url, headers=headers or {}) as response:
            return response.status, dict(response.headers), await response.read()

    async def metric(self, gateway: "Gateway", name: str, **labels: str) -> float:
        _, _, body = await self.get(f"http://127.0.0.1:{gateway.admin}/metrics")
        total = 0.0
        for line in body.decode().splitlines():
            found = re.fullmatch(rf"{re.escape(name)}(?:\{{(.*)\}})? (\S+)", line)
            if found and all(f'{key}="{value}"' in (found.group(1) or "") for key, value in labels.items()):
                total += float(found.group(2))
        return total


@dataclass
class Gateway:
    name: str
    port: int
    admin: int
    config_path: Path
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


# -- running a scenario -----------------------------------------------------------------------------


@dataclass
class Phases:
    """The fault's hooks: ``begin`` starts it, ``end`` undoes it, ``watch`` (optional) runs from the
    end of the fault and returns the measure reported with it (seconds until something resumed)."""

    begin: Callable[[], Awaitable[None]]
    end: Callable[[], Awaitable[None]]
    watch: Callable[[], Awaitable[float | None]] | None = None
    during: Callable[[], Awaitable[None]] | None = None  # runs through the fault phase (reloads)


async def run_phases(bench: Bench, load: Load, phases: Phases) -> dict[str, Any]:
    marks = {"before": time.monotonic()}
    load.start()
    resumed: float | None = None
    try:
        await asyncio.sleep(bench.seconds)
        marks["during"] = time.monotonic()
        await phases.begin()
        if phases.during is not None:
            await asyncio.wait_for(phases.during(), bench.seconds + 10)
        else:
            await asyncio.sleep(max(bench.seconds - (time.monotonic() - marks["during"]), 0))
        marks["after"] = time.monotonic()
        await phases.end()
        watcher = asyncio.create_task(phases.watch()) if phases.watch is not None else None
        await asyncio.sleep(bench.seconds)
        if watcher is not None:
            resumed = await asyncio.wait_for(watcher, RESUME_TIMEOUT)
    finally:
        marks["end"] = time.monotonic()
        await load.finish()
    bounds = [marks["before"], marks["during"], marks["after"], marks["end"]]
    return {
        "phases": {
            phase: phase_figures([s for s in load.samples if bounds[i] <= s.started < bounds[i + 1]])
            for i, phase in enumerate(PHASES)
        },
        "resumed_s": resumed,
    }


async def until(check: Callable[[], Awaitable[bool]], every: float = 0.05) -> float:
    """Seconds until ``check()`` is true (the caller bounds the wait)."""
    started = time.monotonic()
    while not await check():
        await asyncio.sleep(every)
    return time.monotonic() - started


def unique_clients(urls: list[str], path: str, post_every: int = 0) -> Callable[[int, int], Request]:
    """GETs of 50 items spread over ``urls``, each from a new client; a POST every ``post_every``th."""

    def next_request(worker: int, n: int) -> Request:
        url = urls[(worker + n) % len(urls)]
        if post_every and n % post_every == post_every - 1:
            return "POST", f"{url}{path}/orders", {"X-Client": f"w{worker}-{n}", "Content-Type": "application/json"}
        return "GET", f"{url}{path}/item-{n % 50}", {"X-Client": f"w{worker}-{n}"}

    return next_request


def shop_route(upstream: str, redis_port: int, timeout: str) -> dict[str, Any]:
    return {
        "redis": {"url": f"redis://127.0.0.1:{redis_port}/0", "timeout": timeout, "on_failure": "memory"},
        "upstreams": {"api": {"targets": [upstream], "timeouts": {"connect": "1s", "read": "5s"}}},
        "routes": [{
            "name": "shop", "match": {"path": "/shop"}, "upstream": "api",
            "rate_limit": [{"key": "header:X-Client", "limit": QUOTA, "window": "1h"}],
            "cache": {"ttl": "1m"},
        }],
    }  # fmt: skip


# -- the scenarios ----------------------------------------------------------------------------------


async def redis_kill(bench: Bench) -> dict[str, Any]:
    redis_port, redis = await bench.redis()
    upstream_port, _ = await bench.upstream()
    config = shop_route(f"http://127.0.0.1:{upstream_port}", redis_port, timeout="250ms")
    one, two = await bench.gateway(config), await bench.gateway(config)
    probes = itertools.count()
    state: dict[str, Any] = {"redis": redis}

    async def limits_shared() -> bool:
        client = f"limit-probe-{next(probes)}"
        found = [(await bench.get(f"{(one, two)[i % 2].url}/shop/probe", {"X-Client": client}))[0] for i in range(QUOTA + 2)]
        return found == [200] * QUOTA + [429] * 2

    async def cache_shared() -> bool:
        n = next(probes)
        path, headers = f"/shop/cache-probe-{n}", {"X-Client": f"cache-probe-{n}"}
        await bench.get(one.url + path, headers)
        _, answered, _ = await bench.get(two.url + path, headers)
        return "hit" in answered.get("Cache-Status", "")

    async def begin() -> None:
        await asyncio.to_thread(bench.kill, state["redis"])

    async def end() -> None:
        state["restarted"] = time.monotonic()
        state["redis"] = (await bench.redis(redis_port))[1]

    async def watch() -> float:
        await until(lambda: _all(limits_shared, cache_shared), every=0.1)
        return time.monotonic() - state["restarted"]

    if not (await limits_shared() and await cache_shared()):
        raise RuntimeError("the two gateways do not share limits and cache before the fault")
    load = Load(unique_clients([one.url, two.url], "/shop"), bench.connections)
    result = await run_phases(bench, load, Phases(begin, end, watch))
    result["measure"] = "limits and cache shared again"
    return result


async def _all(*checks: Callable[[], Awaitable[bool]]) -> bool:
    for check in checks:
        if not await check():
            return False
    return True


async def redis_slow(bench: Bench) -> dict[str, Any]:
    redis_port, _ = await bench.redis()
    upstream_port, _ = await bench.upstream()
    gateway = await bench.gateway(shop_route(f"http://127.0.0.1:{upstream_port}", redis_port, timeout="200ms"))
    state: dict[str, Any] = {}

    async def begin() -> None:
        state["opened"] = await bench.metric(gateway, "redis_circuit_transitions_total", state="open")
        state["sleeper"] = await asyncio.create_subprocess_exec(
            "redis-cli", "-p", str(redis_port), "DEBUG", "SLEEP", f"{bench.seconds:g}",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip

    async def end() -> None:
        output, _ = await state["sleeper"].communicate()  # returns when Redis wakes
        if b"OK" not in output:
            raise RuntimeError(f"DEBUG SLEEP failed: {output!r}")
        state["awake"] = time.monotonic()

    async def watch() -> float:
        async def closed() -> bool:
            return await bench.metric(gateway, "redis_up") == 1

        await until(closed)
        return time.monotonic() - state["awake"]

    load = Load(unique_clients([gateway.url], "/shop"), bench.connections)
    result = await run_phases(bench, load, Phases(begin, end, watch))
    result["measure"] = "breaker closed again"
    result["breaker_opened"] = await bench.metric(gateway, "redis_circuit_transitions_total", state="open") - state["opened"]
    result["fallback_decisions"] = await bench.metric(gateway, "store_fallback_decisions_total", mode="memory")
    return result


async def upstream_kill(bench: Bench) -> dict[str, Any]:
    (doomed_port, doomed), (survivor_port, _) = await bench.upstream(), await bench.upstream()
    config = {
        "upstreams": {"api": {
            "targets": [f"http://127.0.0.1:{doomed_port}", f"http://127.0.0.1:{survivor_port}"],
            "timeouts": {"connect": "1s", "read": "5s"}, "retries": 1,
            "health": {"passive": {"failures": 2, "eject_for": "2s"}},
        }},
        "routes": [{"name": "orders", "match": {"path": "/"}, "upstream": "api"}],
    }  # fmt: skip
    gateway = await bench.gateway(config)
    load = Load(unique_clients([gateway.url], "/api", post_every=8), bench.connections)
    state: dict[str, Any] = {}

    async def begin() -> None:
        await asyncio.to_thread(bench.kill, doomed)

    async def end() -> None:
        state["restarted"] = time.monotonic()
        await bench.upstream(doomed_port)

    async def watch() -> float:
        def answered() -> bool:
            return any(s.started > state["restarted"] and s.status == 200 and json.loads(s.body).get("upstream") == doomed_port for s in load.samples)

        async def check() -> bool:
            return answered()

        await until(check)
        return time.monotonic() - state["restarted"]

    result = await run_phases(bench, load, Phases(begin, end, watch))
    result["measure"] = "restarted target serving again"
    return result


async def upstream_hang(bench: Bench) -> dict[str, Any]:
    upstream_port, upstream = await bench.upstream()
    config = {
        "upstreams": {"api": {
            "targets": [f"http://127.0.0.1:{upstream_port}"], "timeouts": {"connect": "1s", "read": "1s"},
            "health": {"passive": False},
        }},
        "routes": [{"name": "all", "match": {"path": "/"}, "upstream": "api"}],
    }  # fmt: skip
    gateway = await bench.gateway(config)
    load = Load(unique_clients([gateway.url], "/api"), bench.connections)
    fds: dict[str, dict[str, int]] = {}
    state: dict[str, float] = {}

    def count(moment: str) -> None:
        fds[moment] = {"gateway": fd_count(gateway.process.pid), "upstream": fd_count(upstream.pid)}

    async def begin() -> None:
        count("before")
        upstream.send_signal(signal.SIGUSR1)

    async def end() -> None:
        count("during")
        upstream.send_signal(signal.SIGUSR2)
        state["released"] = time.monotonic()

    async def watch() -> float:
        async def answering() -> bool:
            return any(s.started > state["released"] and s.status == 200 for s in load.samples)

        waited = await until(answering)
        await asyncio.sleep(max(bench.seconds - waited - 0.5, 0))
        count("after")
        return waited

    result = await run_phases(bench, load, Phases(begin, end, watch))
    await asyncio.sleep(1.0)  # the load's own connections close
    count("idle")
    result["measure"] = "target answering again"
    result["fds"] = fds
    return result


async def reload(bench: Bench) -> dict[str, Any]:
    (first, _), (second, _) = await bench.upstream(), await bench.upstream()
    config: dict[str, Any] = {
        "upstreams": {"api": {"targets": [f"http://127.0.0.1:{first}"], "timeouts": {"connect": "1s", "read": "5s"}}},
        "routes": [{"name": "all", "match": {"path": "/"}, "upstream": "api"}],
    }
    gateway = await bench.gateway(config)
    written = json.loads(gateway.config_path.read_text())
    state = {"reloads": 0}

    async def during() -> None:
        deadline = time.monotonic() + bench.seconds
        while time.monotonic() < deadline:
            state["reloads"] += 1
            odd = state["reloads"] % 2
            written["upstreams"]["api"]["targets"] = [f"http://127.0.0.1:{(first, second)[odd]}"]
            route = written["routes"][0]
            if odd:
                route["rate_limit"] = [{"key": "header:X-Client", "limit": 1000, "window": "1m"}]
                route["security_headers"] = {"preset": "strict"}
            else:
                route.pop("rate_limit", None)
                route.pop("security_headers", None)
            gateway.config_path.write_text(json.dumps(written, indent=2))
            gateway.process.send_signal(signal.SIGHUP)
            await asyncio.sleep(0.25)

    async def nothing() -> None:
        pass

    load = Load(unique_clients([gateway.url], "/api"), bench.connections)
    result = await run_phases(bench, load, Phases(nothing, nothing, during=during))
    applied = await bench.metric(gateway, "config_reloads_total", result="applied")
    result["measure"] = None
    result["reloads"] = {"sent": state["reloads"], "applied": applied}
    return result


RUNNERS: dict[str, Callable[[Bench], Awaitable[dict[str, Any]]]] = {
    "redis-kill": redis_kill, "redis-slow": redis_slow, "upstream-kill": upstream_kill, "upstream-hang": upstream_hang, "reload": reload,
}  # fmt: skip


# -- the rules each scenario is held to ---------------------------------------------------------------


def check(name: str, result: dict[str, Any]) -> list[str]:
    found = []
    phases = result["phases"]
    for phase, figures in phases.items():
        if not figures["requests"]:
            found.append(f"{name} {phase}: no request completed")
        if name in ("redis-kill", "redis-slow", "reload") and (figures["5xx"] or figures["errors"] or figures["4xx"]):
            found.append(f"{name} {phase}: statuses {figures['statuses']} (every request should be a 2xx)")
        if name == "redis-kill" and figures["max_ms"] > STALL_MS:
            found.append(f"{name} {phase}: a request took {figures['max_ms']:.0f} ms (p99 {figures['p99_ms']:.0f} ms)")
        if name == "upstream-kill":
            gets = {code: n for code, n in figures["by_method"].get("GET", {}).items() if code != "200"}
            posts = {code: n for code, n in figures["by_method"].get("POST", {}).items() if code not in ("200", "502")}
            if gets:
                found.append(f"{name} {phase}: GETs failed with {gets} while a target was left")
            if posts:
                found.append(f"{name} {phase}: POSTs failed otherwise than 502: {posts}")
        if name == "upstream-hang":
            # 504s are the promise while the target hangs (and for requests sent as it woke up).
            others = {code: n for code, n in figures["statuses"].items() if code not in ("200", "504")}
            if others or (phase == "before" and figures["5xx"]):
                found.append(f"{name} {phase}: statuses {figures['statuses']}")
    if name == "upstream-hang":
        fds = result["fds"]
        for who in ("gateway", "upstream"):
            if fds["idle"][who] > fds["before"][who] + 2:
                found.append(f"{name}: {who} file descriptors {fds['before'][who]} before the hang, {fds['idle'][who]} once idle after it")
    if name == "redis-slow":
        if not result["breaker_opened"]:
            found.append(f"{name}: the breaker never opened while Redis slept")
        if phases["during"]["max_ms"] > 1000:
            found.append(f"{name}: a request took {phases['during']['max_ms']:.0f} ms while Redis slept (timeout 200ms)")
    if name == "reload" and result["reloads"]["applied"] < result["reloads"]["sent"]:
        found.append(f"{name}: {result['reloads']['applied']:g} of {result['reloads']['sent']} reloads applied")
    return found


# -- the run ------------------------------------------------------------------------------------------


async def run_all(args: argparse.Namespace, scratch: Path, report: dict[str, Any]) -> None:
    import aiohttp

    load_cores, server_cores = cpu_plan()
    if load_cores:
        os.sched_setaffinity(0, load_cores)  # this process is the load generator
    report["environment"].update(load_cores=load_cores, gateway_cores=server_cores)
    for name in args.scenarios:
        processes = Processes(scratch)
        bench = Bench(scratch, processes, load_cores, server_cores, args.connections, args.seconds)
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)) as session:
                bench.session = session
                say(f"{name}: {args.seconds:g}s before, {args.seconds:g}s during, {args.seconds:g}s after the fault")
                result = await RUNNERS[name](bench)
        except Exception as exc:  # one scenario's failure is a finding; the others still run
            report["findings"].append(f"{name}: the scenario failed: {type(exc).__name__}: {exc}")
            say(f"{name}: failed: {type(exc).__name__}: {exc}")
            continue
        finally:
            await asyncio.to_thread(processes.close)
            for kind in ("gateway",):
                for index in range(1, bench.names[kind] + 1):
                    text = processes.log_text(f"{kind}-{index}")
                    bad = [line for line in text.splitlines() if '"level":"error"' in line or "Traceback" in line]
                    report["findings"] += [f"{name} {kind}-{index} log: {line[:300]}" for line in bad[:5]]
        result["findings"] = check(name, result)
        report["findings"] += result["findings"]
        report["scenarios"][name] = result
        row = result["phases"]
        say(
            f"{name}: " + "; ".join(f"{phase} {row[phase]['requests']} req {row[phase]['statuses']} p99 {row[phase]['p99_ms']:.0f} ms" for phase in PHASES)
            + (f"; {result['measure']} after {result['resumed_s']:.2f}s" if result.get("resumed_s") is not None else "")
        )


def run(args: argparse.Namespace) -> dict[str, Any]:
    scratch = Path(tempfile.mkdtemp(prefix="bench-faults-"))
    report = new_report("faults", args, {"redis_server": version(["redis-server", "--version"])}, scenarios={})
    previous_term = signal.signal(signal.SIGTERM, interrupt)
    try:
        try:
            import uvloop

            uvloop.run(run_all(args, scratch, report))
        except ImportError:
            asyncio.run(run_all(args, scratch, report))
    finally:
        tear_down(previous_term, None, scratch, args.keep, report["findings"])
    return report


def table(report: dict[str, Any]) -> str:
    lines = [f"{'scenario':<14} {'phase':<7} {'requests':>8} {'2xx':>6} {'4xx':>5} {'5xx':>5} {'errors':>6} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7}  resumed after"]
    for name, result in report["scenarios"].items():
        for phase in PHASES:
            f = result["phases"][phase]
            resumed = ""
            if phase == "after" and result.get("measure"):
                resumed = f"{result['resumed_s']:.2f}s ({result['measure']})" if result.get("resumed_s") is not None else "not within the run"
            lines.append(
                f"{name if phase == 'before' else '':<14} {phase:<7} {f['requests']:>8,} {f['2xx']:>6,} {f['4xx']:>5,} {f['5xx']:>5,} {f['errors']:>6,} "
                f"{f['p50_ms']:>7.1f} {f['p99_ms']:>7.1f} {f['max_ms']:>7.1f}  {resumed}"
            )
    lines.append("")
    scenarios = report["scenarios"]
    if "redis-slow" in scenarios:
        s = scenarios["redis-slow"]
        lines.append(f"redis-slow: breaker opened {s['breaker_opened']:g} time(s); {s['fallback_decisions']:g} rate-limit decisions made in memory meanwhile")
    if "upstream-kill" in scenarios:
        by_method = {phase: scenarios["upstream-kill"]["phases"][phase]["by_method"] for phase in PHASES}
        lines.append("upstream-kill by method: " + "; ".join(f"{phase} {by_method[phase]}" for phase in PHASES))
    if "upstream-hang" in scenarios:
        fds = scenarios["upstream-hang"]["fds"]
        lines.append("upstream-hang open fds (gateway / target): " + ", ".join(f"{moment} {v['gateway']}/{v['upstream']}" for moment, v in fds.items()))
    if "reload" in scenarios:
        r = scenarios["reload"]["reloads"]
        lines.append(f"reload: {r['sent']} SIGHUPs, {r['applied']:g} reloads applied")
    env = report["environment"]
    lines.append(
        f"load: aiohttp, {report['args']['connections']} keep-alive connections, {report['args']['seconds']:g}s per phase; "
        f"cores: load+redis+upstreams {env.get('load_cores') or 'unpinned'}, gateways {env.get('gateway_cores') or 'unpinned'}"
    )
    lines += findings_lines(report, "no 5xx where none is promised, failures only where allowed, descriptors back down")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each phase: before, during and after the fault")
    parser.add_argument("--connections", type=int, default=16, help="concurrent keep-alive connections of the load")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated, from {', '.join(SCENARIOS)}")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (configs, logs)")
    args = parser.parse_args()
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in args.scenarios if s not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenarios {unknown}; known: {', '.join(SCENARIOS)}")
    if args.seconds < 1 or args.connections < 1:
        parser.error("--seconds and --connections must be at least 1")
    try:
        report = run(args)
    except KeyboardInterrupt:
        print("\ninterrupted; everything started was stopped", file=sys.stderr)
        sys.exit(130)
    out = save_report("faults", report)
    print()
    print(table(report))
    print(f"\nevery run: {out.relative_to(ROOT)}  (total {elapsed():.0f}s)")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "upstream":
        serve_upstream(int(sys.argv[2]))
    else:
        main()
