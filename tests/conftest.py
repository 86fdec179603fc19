"""Fixtures: real upstream servers, the gateway in-process or as a process, all on free ports.

- ``upstream`` / ``upstreams``: aiohttp servers on 127.0.0.1 that record what they receive and
  answer through a handler a test may replace.
- ``start_gateway``: builds a Gateway from a config dict and serves it on real sockets.
- ``gateway_process``: runs ``python -m gateway run`` with a config file, for signals and workers.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator

import aiohttp
import pytest
import yaml
from aiohttp import web

from gateway.access_log import AccessLog
from gateway.app import Gateway
from gateway.config import parse_config
from gateway.server import Listeners, open_listeners

ROOT = Path(__file__).resolve().parent.parent
# Debian's chromium, driven by the playwright package (`playwright install` is never run).
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Received:
    method: str
    path: str  # raw path with query, as the upstream saw it
    headers: dict[str, str]
    header_items: list[tuple[str, str]]
    body: bytes


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Upstream:
    """A real HTTP server that records requests; set ``handler`` to change its answers."""

    port: int
    requests: list[Received] = field(default_factory=list)
    handler: Handler | None = None
    runner: web.AppRunner | None = None
    read_body: bool = True

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if self.handler is not None and not self.read_body:
            self.requests.append(Received(request.method, request.raw_path, dict(request.headers), list(request.headers.items()), b""))
            return await self.handler(request)
        body = await request.read()
        self.requests.append(Received(request.method, request.raw_path, dict(request.headers), list(request.headers.items()), body))
        if self.handler is not None:
            return await self.handler(request)
        return web.json_response({"upstream": self.port, "path": request.raw_path, "method": request.method})

    async def start(self) -> None:
        app = web.Application(client_max_size=1024**3)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


@pytest.fixture
async def upstream_factory() -> AsyncIterator[Callable[[], Awaitable[Upstream]]]:
    started: list[Upstream] = []

    async def make() -> Upstream:
        server = Upstream(free_port())
        await server.start()
        started.append(server)
        return server

    yield make
    for server in started:
        await server.stop()


@pytest.fixture
async def upstream(upstream_factory: Callable[[], Awaitable[Upstream]]) -> Upstream:
    return await upstream_factory()


def base_config(*targets: str, **overrides: Any) -> dict[str, Any]:
    """A config dict with one upstream `api` and one catch-all route `all`, on free ports."""
    config: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "admin": {"host": "127.0.0.1", "port": 0},
        "logging": {"level": "warning", "access_log": False},
        "upstreams": {"api": {"targets": list(targets), "timeouts": {"connect": "1s", "read": "5s"}}},
        "routes": [{"name": "all", "match": {"path": "/"}, "upstream": "api"}],
    }
    config.update(overrides)
    return config


@dataclass
class RunningGateway:
    gateway: Gateway
    listeners: Listeners

    @property
    def url(self) -> str:
        host, port = self.listeners.addresses["public"]
        return f"http://{host}:{port}"

    @property
    def port(self) -> int:
        return self.listeners.addresses["public"][1]

    @property
    def admin_url(self) -> str:
        host, port = self.listeners.addresses["admin"]
        return f"http://{host}:{port}"


@pytest.fixture
async def start_gateway(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[RunningGateway]]]:
    running: list[RunningGateway] = []

    async def start(config: dict[str, Any], policies: tuple[type, ...] | None = None, **kwargs: Any) -> RunningGateway:
        path = tmp_path / f"gateway-{len(running)}.yaml"
        path.write_text(yaml.safe_dump(config))
        parsed = parse_config(config, str(path), tmp_path, policies=policies)
        kwargs.setdefault("access_log", AccessLog(False))
        gateway = Gateway(parsed, path, policies=policies, **kwargs)
        await gateway.__aenter__()
        listeners = await open_listeners(gateway)
        handle = RunningGateway(gateway, listeners)
        running.append(handle)
        return handle

    yield start
    for handle in reversed(running):
        await handle.listeners.close()
        await handle.gateway.__aexit__(None, None, None)


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


async def raw_request(port: int, data: bytes, read_timeout: float = 5.0) -> bytes:
    """Send raw bytes on a new connection; return all the server sends until it closes or goes quiet."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    chunks = []
    try:
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), read_timeout)
            if not chunk:
                break
            chunks.append(chunk)
    except asyncio.TimeoutError:
        pass
    finally:
        writer.close()
    return b"".join(chunks)


def parse_raw_response(data: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


def assert_problem(status: int, headers: Any, body: bytes, expected_status: int) -> dict[str, Any]:
    """The gateway's own answer: RFC 9457 problem+json with the request id."""
    assert status == expected_status, body
    content_type = headers.get("Content-Type") or headers.get("content-type")
    assert content_type.startswith("application/problem+json")
    document = json.loads(body)
    assert document["status"] == expected_status
    assert document["type"].startswith("https://gateway.dev/problems/")
    assert document["title"] and document["detail"] and document["request_id"]
    return document


# -- the gateway as a process ---------------------------------------------------------------


@dataclass
class GatewayProcess:
    process: subprocess.Popen[bytes]
    port: int
    admin_port: int
    config_path: Path
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def write_config(self, config: dict[str, Any]) -> None:
        """Replace the config file (for a reload), keeping the ports the process listens on."""
        self.config_path.write_text(yaml.safe_dump(_with_ports(config, self.port, self.admin_port)))

    def wait(self, timeout: float = 30) -> int:
        return self.process.wait(timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_records(self) -> list[dict[str, Any]]:
        records = []
        for line in self.log().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                pass
        return records


def wait_until_ready(url: str, process: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"gateway exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=0.5) as sock:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                if sock.recv(12).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError("gateway did not become ready")


def _with_ports(config: dict[str, Any], port: int, admin_port: int) -> dict[str, Any]:
    config = json.loads(json.dumps(config))
    config["listen"]["port"] = port
    config["admin"] = {"host": "127.0.0.1", "port": admin_port}
    config.setdefault("logging", {})["level"] = "info"  # tests read the lifecycle lines
    return config


@pytest.fixture
def gateway_process(tmp_path: Path) -> Any:
    processes: list[GatewayProcess] = []

    def start(config: dict[str, Any], env: dict[str, str] | None = None) -> GatewayProcess:
        for attempt in range(3):
            port, admin_port = free_port(), free_port()
            path = tmp_path / f"process-{len(processes)}.yaml"
            path.write_text(yaml.safe_dump(_with_ports(config, port, admin_port)))
            log_path = tmp_path / f"process-{len(processes)}.log"
            with open(log_path, "wb") as log_file:
                process = subprocess.Popen(
                    [sys.executable, "-m", "gateway", "run", "-c", str(path)],
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, **(env or {})},
                    cwd=tmp_path,
                    start_new_session=True,  # its own process group: cleanup reaches the workers too
                )
            handle = GatewayProcess(process, port, admin_port, path, log_path)
            processes.append(handle)
            try:
                wait_until_ready(handle.admin_url, process)
                return handle
            except RuntimeError:
                # A free port is free when picked: an outgoing connection of another test can take
                # it before the gateway binds it. Then (only then) pick new ones.
                if attempt == 2 or "address already in use" not in handle.log():
                    raise
        raise AssertionError("unreachable")

    yield start
    for handle in processes:
        try:
            os.killpg(handle.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        handle.process.wait(10)


# -- redis-server -----------------------------------------------------------------------------


@dataclass
class RedisServer:
    """A real redis-server of the test's own, on a free port, that the test may stop and start."""

    port: int
    directory: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.directory), "--protected-mode", "no", "--loglevel", "warning",
             "--enable-debug-command", "local"],  # DEBUG SLEEP makes a slow Redis (tests/test_faults.py)
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.wait_until_answering("redis-server")

    def wait_until_answering(self, what: str, timeout: float = 10) -> None:
        """Until the server answers PING (a redis-server, a cluster node, a sentinel)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.command("PING").startswith(b"+PONG"):
                    return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"{what} on {self.port} did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()  # like a crash: no shutdown work, connections drop at once
            self.process.wait(10)
            self.process = None

    def command(self, *args: str) -> bytes:
        """One command over a raw socket (RESP), for checks from outside the gateway."""
        payload = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock:
            sock.sendall(payload.encode())
            return sock.recv(1 << 20)


@pytest.fixture
def redis_server(tmp_path: Path) -> Any:
    server = RedisServer(free_port(), tmp_path)
    server.start()
    yield server
    server.stop()


# -- Redis Cluster --------------------------------------------------------------------------


def cluster_port(taken: set[int]) -> int:
    """A free port P whose cluster bus port P+10000 is free too."""
    for _ in range(200):
        port = free_port()
        if port + 10000 > 65535 or port in taken or port + 10000 in taken:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


def start_cluster_node(port: int, directory: Path) -> RedisServer:
    node = RedisServer(port, directory)
    node.process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
         "--cluster-config-file", f"nodes-{port}.conf", "--save", "", "--appendonly", "no",
         "--dir", str(directory), "--protected-mode", "no", "--loglevel", "warning"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    node.wait_until_answering("cluster node")
    return node


def create_cluster(nodes: list[RedisServer], replicas: int) -> None:
    """``redis-cli --cluster create`` over the nodes: the slots spread over the masters, each
    with this many replicas."""
    created = subprocess.run(
        ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in nodes), "--cluster-replicas", str(replicas), "--cluster-yes"],
        capture_output=True,
        timeout=60,
    )
    assert created.returncode == 0, created.stdout.decode() + created.stderr.decode()


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[list[RedisServer]]:
    """Three masters, all slots assigned, cluster_state:ok on every node; killed at the end."""
    nodes: list[RedisServer] = []
    try:
        taken: set[int] = set()
        for _ in range(3):
            port = cluster_port(taken)
            taken |= {port, port + 10000}
            nodes.append(start_cluster_node(port, tmp_path))
        create_cluster(nodes, replicas=0)
        deadline = time.monotonic() + 20
        while not all(b"cluster_state:ok" in n.command("CLUSTER", "INFO") for n in nodes):
            assert time.monotonic() < deadline, "the cluster did not reach cluster_state:ok"
            time.sleep(0.05)
        yield nodes
    finally:
        for node in nodes:
            node.stop()
