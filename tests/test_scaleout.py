"""Scale-out: several gateway processes on one Redis Cluster or behind Sentinel.

- A Redis Cluster of three masters under three gateway processes: one rate limit admitted
  exactly once in total, cache entries stored through one process answered by the others, a
  purge through one admin listener reaching all, one upstream request for a cold key, and keys
  spread over every master. A cluster that asks for a password is reached with the one in
  ``cluster_nodes``.
- Sentinel (a master, a replica, one sentinel): two processes share limits and entries; a
  `SENTINEL FAILOVER` under load answers no 5xx, the processes leave the old master within a
  moment of the switch (not when Sentinel demotes it, ~10 s later), and limits are exact again.
- A Redis Cluster changing under a steady load through two processes (`on_failure: memory`): a
  `CLUSTER FAILOVER` of one master to its replica, and a `redis-cli --cluster reshard` of a slot
  range: no 5xx, Redis keeps every count but those of requests in flight, and afterwards limits
  are exact again, for a client counted before the change and for a new one.

Everything is real: ``python -m gateway run`` processes, redis-server processes (cluster nodes,
replicas, a sentinel) on free loopback ports, recording upstreams and aiohttp clients.
"""

from __future__ import annotations

import asyncio
import collections
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import aiohttp
import pytest
from aiohttp import web
from redis.crc import key_slot

from tests.conftest import GatewayProcess, RedisServer, Upstream, base_config, cluster_port, create_cluster, free_port, start_cluster_node
from tests.test_cache import fetch
from tests.test_ratelimit_shared import access_records, burst, fallbacks, keys

LONG_WINDOW = "1h"  # no window ends while a test runs
QUOTA = 40
CONCURRENT = 120  # a multiple of 2 and 3: each process takes an equal share of a burst
STEADY_LIMIT = 1_000_000  # the steady load's clients never reach it
# Cached routes whose hash tags ({products}, {artisans}, {reviews}) fall in the slot ranges of
# the three masters redis-cli makes (0-5460, 5461-10922, 10923-16383).
CACHED = ("products", "artisans", "reviews")
SLOW = 0.4  # seconds the upstream takes for a cold key
WORKERS = 6  # the steady load's requests in flight at any time
MASTER_NAME = "mymaster"
SWITCH_WINDOW = 2.0  # seconds the old master may still take decisions after a Sentinel switch


# -- helpers ----------------------------------------------------------------------------------


def scaleout_config(upstream_url: str, redis: dict[str, Any]) -> dict[str, Any]:
    """`/limited` (QUOTA per X-Client), `/steady` (a limit the load never reaches) and one cached
    route per name in CACHED; Redis with a generous timeout and `on_failure: memory`."""
    config = base_config(upstream_url)
    limit = {"key": "header:X-Client", "window": LONG_WINDOW}
    config["routes"] = [
        {"name": "limited", "match": {"path": "/limited"}, "upstream": "api", "rate_limit": [{**limit, "limit": QUOTA}]},
        {"name": "steady", "match": {"path": "/steady"}, "upstream": "api", "rate_limit": [{**limit, "limit": STEADY_LIMIT}]},
        *({"name": name, "match": {"path": f"/{name}"}, "upstream": "api", "cache": {"tags": [name]}} for name in CACHED),
    ]
    # A loaded machine must not trip the 50ms default: a fallback here should mean a topology change.
    config["redis"] = {"timeout": "1s", "on_failure": "memory", "pool_size": 8, **redis}
    config["logging"] = {"level": "info", "access_log": True}
    return config


def answering(upstream: Upstream) -> None:
    """The upstream answers `response N` (its request count), storable for five minutes; a path
    ending in /cold takes SLOW seconds."""

    async def handler(request: web.Request) -> web.Response:
        if request.path.endswith("/cold"):
            await asyncio.sleep(SLOW)
        return web.Response(text=f"response {len(upstream.requests)}", headers={"Cache-Control": "max-age=300"})

    upstream.handler = handler


def limit_slot(route: str, client: str) -> int:
    """The cluster slot of a `header:X-Client` limit's keys: their hash tag is `{route|h:client}`."""
    return key_slot(f"{route}|h:{client}".encode())


def text(node: RedisServer, *args: str) -> str:
    """A simple, integer or bulk-string reply, as text (an error reply keeps its leading '-')."""
    raw = node.command(*args)
    line, _, body = raw[1:].partition(b"\r\n")
    if raw[:1] == b"$":
        return body[: int(line)].decode()
    return ("-" if raw[:1] == b"-" else "") + line.decode()


def value(node: RedisServer, key: str) -> int:
    return int(text(node, "GET", key) or 0)


def command_calls(server: RedisServer, command: str) -> int:
    for line in text(server, "INFO", "commandstats").splitlines():
        if line.startswith(f"cmdstat_{command}:"):
            return int(line.split("calls=")[1].split(",")[0])
    return 0


@dataclass(frozen=True)
class Member:
    """One line of CLUSTER NODES."""

    id: str
    port: int
    master: bool
    master_id: str | None
    slots: tuple[range, ...]

    def owns(self, slot: int) -> bool:
        return any(slot in r for r in self.slots)


def members(node: RedisServer) -> list[Member]:
    found = []
    for line in text(node, "CLUSTER", "NODES").splitlines():
        fields = line.split()
        ranges = []
        for part in fields[8:]:
            if not part.startswith("["):  # [slot->-id]: a migration in progress
                first, _, last = part.partition("-")
                ranges.append(range(int(first), int(last or first) + 1))
        port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
        found.append(Member(fields[0], port, "master" in fields[2].split(","), None if fields[3] == "-" else fields[3], tuple(ranges)))
    return found


def owner(nodes: list[RedisServer], slot: int) -> RedisServer:
    """The master that serves a slot, as the first node sees it."""
    by_port = {node.port: node for node in nodes}
    (serving,) = [m for m in members(nodes[0]) if m.master and m.owns(slot)]
    return by_port[serving.port]


def masters(nodes: list[RedisServer]) -> list[RedisServer]:
    by_port = {node.port: node for node in nodes}
    return [by_port[m.port] for m in members(nodes[0]) if m.master and m.slots]


def cluster_agrees(nodes: list[RedisServer], slot: int, port: int) -> bool:
    """Every node is in cluster_state:ok and names `port` as the master of `slot`."""
    for node in nodes:
        if "cluster_state:ok" not in text(node, "CLUSTER", "INFO"):
            return False
        if [m.port for m in members(node) if m.master and m.owns(slot)] != [port]:
            return False
    return True


async def eventually(check: Callable[[], Any], timeout: float, message: str) -> float:
    """Poll `check` until it is true; how long that took. The load keeps running meanwhile."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < timeout, f"{message} (not within {timeout:.0f}s)"
        await asyncio.sleep(0.05)
    return time.monotonic() - started


def names(prefix: str, count: int, wanted: Callable[[str], bool]) -> list[str]:
    """The first `count` names `prefix-N` for which `wanted` holds."""
    found: list[str] = []
    index = 0
    while len(found) < count:
        name = f"{prefix}-{index}"
        if wanted(name):
            found.append(name)
        index += 1
    return found


async def statuses(urls: list[str], count: int, client: str) -> list[int]:
    """`count` requests one after another, alternating over `urls`."""
    found = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        for i in range(count):
            async with session.get(urls[i % len(urls)], headers={"X-Client": client}) as response:
                await response.read()
                found.append(response.status)
    return found


@dataclass
class SteadyLoad:
    """WORKERS clients sending `/steady` requests without pause, round robin over the processes
    and over `clients` (the X-Client values), until the block ends."""

    processes: list[GatewayProcess]
    clients: list[str]
    statuses: collections.Counter[int] = field(default_factory=collections.Counter)
    sent: collections.Counter[int] = field(default_factory=collections.Counter)  # per process index
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def _worker(self, session: aiohttp.ClientSession, worker: int) -> None:
        turn = worker
        while not self._stop.is_set():
            index = turn % len(self.processes)
            url = self.processes[index].url + "/steady"
            async with session.get(url, headers={"X-Client": self.clients[turn % len(self.clients)]}) as response:
                await response.read()
                self.statuses[response.status] += 1
                self.sent[index] += 1
            turn += WORKERS

    async def __aenter__(self) -> "SteadyLoad":
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        self._tasks = [asyncio.create_task(self._worker(self._session, w)) for w in range(WORKERS)]
        await asyncio.sleep(0.3)
        assert self.statuses, "the load did not start"
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self._stop.set()
        try:
            await asyncio.gather(*self._tasks)
        finally:
            await self._session.close()

    @property
    def total(self) -> int:
        return sum(self.statuses.values())


def records_of(process: GatewayProcess, path: str, count: int) -> list[dict[str, Any]]:
    """The process's access-log lines for `path`, once `count` are written (a thread writes them)."""
    deadline = time.monotonic() + 20
    while True:
        records = [r for r in process.log_records() if r.get("path") == path and "status" in r]
        if len(records) >= count or time.monotonic() > deadline:
            return records
        time.sleep(0.05)


def steady_records(processes: list[GatewayProcess], load: SteadyLoad) -> list[dict[str, Any]]:
    found = [r for index, process in enumerate(processes) for r in records_of(process, "/steady", load.sent[index])]
    assert len(found) == load.total, (len(found), load.total)
    return found


def decided_by_redis(processes: list[GatewayProcess], load: SteadyLoad) -> int:
    """Requests of the load that Redis decided (the others were the fallback's), after checking
    that none was answered with a 5xx."""
    assert set(load.statuses) == {200}, load.statuses
    return load.total - len(fallbacks(steady_records(processes, load)))


def steady_counters(nodes: list[RedisServer]) -> int:
    """The sum of the load's counters, read from the masters."""
    return sum(value(node, key) for node in masters(nodes) for key in keys(node, "gw:rl:{steady|*"))


def assert_counted(nodes: list[RedisServer], processes: list[GatewayProcess], load: SteadyLoad) -> None:
    """No 5xx, and the cluster kept the count of every request it decided but those in flight
    during the change (a request whose answer was lost is counted by the fallback too)."""
    decided = decided_by_redis(processes, load)
    stored = steady_counters(nodes)
    print(f"{load.total} requests under load, {load.total - decided} decided by the fallback, {stored} counted in Redis")
    assert decided - WORKERS <= stored <= load.total
    assert decided > load.total // 2  # Redis decided most of the load: the change was brief


async def exact_again(processes: list[GatewayProcess], client: str) -> None:
    """A fresh key admits exactly QUOTA through all processes at once, every decision Redis's."""
    path = f"/limited/{client}"
    assert await burst([p.url + path for p in processes], CONCURRENT, {"X-Client": client}) == {200: QUOTA, 429: CONCURRENT - QUOTA}
    for process in processes:
        records = records_of(process, path, CONCURRENT // len(processes))
        assert len(records) == CONCURRENT // len(processes)
        assert fallbacks(records) == [], "a decision after the change was the fallback's"


async def purge(admin_url: str, document: dict[str, str]) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session:
        async with session.post(admin_url + "/cache/purge", json=document) as response:
            return response.status, await response.json(content_type=None)


async def fetch_all(urls: list[str]) -> list[Any]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=len(urls))) as session:
        return list(await asyncio.gather(*(fetch(session, url) for url in urls)))


def cache_entries(node: RedisServer) -> list[str]:
    """Keys of stored responses (not the Vary indexes, purge's indexes or locks)."""
    return [k for k in keys(node, "gw:c:*") if not k.endswith((":vary", ":index", ":index:exp", ":lock"))]


def cluster_urls(nodes: list[RedisServer]) -> list[str]:
    return [f"redis://127.0.0.1:{node.port}" for node in nodes]


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture
def redis_cluster_with_replicas(tmp_path: Path) -> Iterator[list[RedisServer]]:
    """Three masters with one replica each (`--cluster-replicas 1`), every node knowing every
    role and every replica in sync; killed at the end."""
    nodes: list[RedisServer] = []
    try:
        taken: set[int] = set()
        for index in range(6):
            port = cluster_port(taken)
            taken |= {port, port + 10000}
            directory = tmp_path / f"node-{index}"  # a replica writes its master's snapshot here
            directory.mkdir()
            node = start_cluster_node(port, directory)
            nodes.append(node)
            # Full syncs start at once (Redis waits 5 s for more replicas by default), and nodes
            # gossip often enough that every one learns the replicas within a second (a master
            # votes for a replica's failover only when it knows it as a replica).
            assert text(node, "CONFIG", "SET", "repl-diskless-sync-delay", "0", "cluster-node-timeout", "2000") == "OK"
        create_cluster(nodes, replicas=1)
        deadline = time.monotonic() + 30
        while not all(_cluster_settled(node) for node in nodes):
            assert time.monotonic() < deadline, "the cluster with replicas did not settle"
            time.sleep(0.05)
        for node in nodes:  # no failure detection on a busy machine while the test runs
            assert text(node, "CONFIG", "SET", "cluster-node-timeout", "15000") == "OK"
        yield nodes
    finally:
        for node in nodes:
            node.stop()


def _cluster_settled(node: RedisServer) -> bool:
    """cluster_state:ok, three masters and three replicas known, and a replica's link up."""
    if "cluster_state:ok" not in text(node, "CLUSTER", "INFO"):
        return False
    if sorted(m.master for m in members(node)) != [False, False, False, True, True, True]:
        return False
    replication = text(node, "INFO", "replication")
    return "role:master" in replication or "master_link_status:up" in replication


@dataclass
class SentinelSetup:
    master: RedisServer
    replica: RedisServer
    sentinel: RedisServer

    @property
    def master_port(self) -> int:
        reply = self.sentinel.command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME).decode().split("\r\n")
        return int(reply[4])


def start_sentinel(port: int, directory: Path, master_port: int) -> RedisServer:
    conf = directory / "sentinel.conf"  # Sentinel rewrites its file: it must be its own, writable
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {directory}\nloglevel warning\n"
        f"sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} 1\n"
        f"sentinel down-after-milliseconds {MASTER_NAME} 2000\n"
        f"sentinel failover-timeout {MASTER_NAME} 10000\n"
    )
    node = RedisServer(port, directory)
    node.process = subprocess.Popen(["redis-server", str(conf), "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    node.wait_until_answering("sentinel")
    return node


@pytest.fixture
def redis_sentinel(tmp_path: Path) -> Iterator[SentinelSetup]:
    """A master, a replica in sync with it, and one sentinel (quorum 1) that knows both."""
    servers: list[RedisServer] = []
    try:
        for role in ("master", "replica", "sentinel"):
            (tmp_path / role).mkdir()
        master, replica = RedisServer(free_port(), tmp_path / "master"), RedisServer(free_port(), tmp_path / "replica")
        for server in (master, replica):
            server.start()
            servers.append(server)
            assert text(server, "CONFIG", "SET", "repl-diskless-sync-delay", "0") == "OK"
        assert text(replica, "REPLICAOF", "127.0.0.1", str(master.port)) == "OK"
        deadline = time.monotonic() + 20
        while "master_link_status:up" not in text(replica, "INFO", "replication"):
            assert time.monotonic() < deadline, "the replica did not sync"
            time.sleep(0.05)
        # Started after the replica synced: its first INFO of the master names the replica.
        sentinel = start_sentinel(free_port(), tmp_path / "sentinel", master.port)
        servers.append(sentinel)
        while f"127.0.0.1:{replica.port}".encode() not in sentinel.command("SENTINEL", "REPLICAS", MASTER_NAME):
            assert time.monotonic() < deadline, "the sentinel did not learn of the replica"
            time.sleep(0.05)
        yield SentinelSetup(master, replica, sentinel)
    finally:
        for server in servers:
            server.stop()


# -- 1. a Redis Cluster of three masters, three gateway processes ---------------------------------


async def test_three_gateway_processes_on_a_three_master_cluster_admit_one_limit_exactly_with_keys_on_every_master(upstream, gateway_process, redis_cluster) -> None:
    config = scaleout_config(upstream.url, {"cluster_nodes": cluster_urls(redis_cluster)})
    processes = [gateway_process(config) for _ in range(3)]
    urls = [p.url + "/limited" for p in processes]

    assert await burst(urls, CONCURRENT, {"X-Client": "shared"}) == {200: QUOTA, 429: CONCURRENT - QUOTA}
    clients = [f"client-{i}" for i in range(12)]
    for client in clients:  # one request through each process: all three count the same key
        assert await burst(urls, 3, {"X-Client": client}) == {200: 3}

    assert len(upstream.requests) == QUOTA + 3 * len(clients)  # refused requests never reach it
    for process in processes:
        records = access_records(process, CONCURRENT // 3 + len(clients))
        assert len(records) == CONCURRENT // 3 + len(clients)  # each process took its share
        assert fallbacks(records) == []  # every decision was the cluster's
    holding = {node.port: keys(node) for node in masters(redis_cluster)}
    assert all(holding.values()), {port: len(found) for port, found in holding.items()}  # every master holds counters
    for client in clients:
        (key,) = [k for found in holding.values() for k in found if k.endswith(f":h:{client}")]
        assert value(owner(redis_cluster, limit_slot("limited", client)), key) == 3


async def test_three_gateway_processes_on_a_three_master_cluster_share_entries_purges_and_one_upstream_request_per_cold_key(upstream, gateway_process, redis_cluster) -> None:
    answering(upstream)
    config = scaleout_config(upstream.url, {"cluster_nodes": cluster_urls(redis_cluster)})
    processes = [gateway_process(config) for _ in range(3)]
    one, two, three = processes

    for name in CACHED:  # stored through one process ...
        answer = await fetch_all([f"{one.url}/{name}/doc"])
        assert "stored" in answer[0].params, answer[0].cache_status
    for process in (two, three):  # ... hits through the others
        answers = await fetch_all([f"{process.url}/{name}/doc" for name in CACHED])
        assert [a.hit for a in answers] == [True] * len(CACHED), [a.cache_status for a in answers]
        assert [a.body for a in answers] == [b"response 1", b"response 2", b"response 3"]
    assert len(upstream.requests) == len(CACHED)
    holding = {node.port: cache_entries(node) for node in masters(redis_cluster)}
    assert all(holding.values()), holding  # one route's entries per master: spread over all three

    # A purge through one admin listener is seen by every process.
    assert await purge(two.admin_url, {"url": "/products/doc"}) == (200, {"purged": 1})
    assert await purge(three.admin_url, {"prefix": "/artisans/"}) == (200, {"purged": 1})
    assert await purge(one.admin_url, {"tag": "reviews"}) == (200, {"purged": 1})
    for process in (three, one, two):
        answers = await fetch_all([f"{process.url}/{name}/doc" for name in CACHED])
        assert [a.hit for a in answers] == ([False] * len(CACHED) if process is three else [True] * len(CACHED))
    assert len(upstream.requests) == 2 * len(CACHED)

    # Cold misses through the three processes at once: one upstream request in all.
    before = len(upstream.requests)
    answers = await fetch_all([f"{processes[i % 3].url}/reviews/cold" for i in range(CONCURRENT // 2)])
    assert {a.status for a in answers} == {200}
    assert {a.body for a in answers} == {f"response {before + 1}".encode()}
    assert len(upstream.requests) == before + 1
    assert sum(a.hit for a in answers) == CONCURRENT // 2 - 1


async def test_a_cluster_that_asks_for_a_password_is_reached_with_the_credentials_in_cluster_nodes(upstream, gateway_process, redis_cluster) -> None:
    for node in redis_cluster:
        assert text(node, "CONFIG", "SET", "requirepass", "cluster-secret") == "OK"
    urls = [f"redis://:cluster-secret@127.0.0.1:{node.port}" for node in redis_cluster]
    process = gateway_process(scaleout_config(upstream.url, {"cluster_nodes": urls}))

    assert await burst([process.url + "/limited"], CONCURRENT, {"X-Client": "authenticated"}) == {200: QUOTA, 429: CONCURRENT - QUOTA}
    assert fallbacks(records_of(process, "/limited", CONCURRENT)) == []  # decided by the cluster, not the fallback


# -- 2. Sentinel --------------------------------------------------------------------------------


async def test_two_gateway_processes_through_sentinel_share_limits_and_entries_and_follow_a_failover_under_load_without_a_5xx(upstream, gateway_process, redis_sentinel) -> None:
    answering(upstream)
    setup = redis_sentinel
    config = scaleout_config(upstream.url, {"sentinel": {"master": MASTER_NAME, "nodes": [f"redis://127.0.0.1:{setup.sentinel.port}"]}})
    processes = [gateway_process(config), gateway_process(config)]
    one, two = processes

    assert await burst([p.url + "/limited" for p in processes], CONCURRENT, {"X-Client": "shared"}) == {200: QUOTA, 429: CONCURRENT - QUOTA}
    (first,) = await fetch_all([f"{one.url}/products/doc"])
    assert "stored" in first.params
    assert [a.hit for a in await fetch_all([f"{two.url}/products/doc"])] == [True]
    assert keys(setup.master) and keys(setup.master, "gw:c:*")  # on the master Sentinel names

    clients = [f"steady-{i}" for i in range(12)]
    async with SteadyLoad(processes, clients) as load:
        assert text(setup.sentinel, "SENTINEL", "FAILOVER", MASTER_NAME) == "OK"
        took = await eventually(lambda: setup.master_port == setup.replica.port, 20, "Sentinel did not name the replica master")
        switched = time.monotonic()
        # Sentinel promotes the replica without pausing the old master, and demotes the old one
        # only at its next look at it, about 10 s later: until then the old master takes the
        # writes sent to it, and drops them when it resyncs from the new one.
        last_write = [command_calls(setup.master, "evalsha"), switched]  # calls, when they last grew

        def demoted() -> bool:
            try:
                calls = command_calls(setup.master, "evalsha")
                if "role:slave" in text(setup.master, "INFO", "replication"):
                    return True
            except ConnectionError:  # the old master drops its clients as it turns replica: look again
                return False
            if calls > last_write[0]:
                last_write[:] = [calls, time.monotonic()]
            return False

        waited = await eventually(demoted, 30, "Sentinel did not demote the old master")
        calls = command_calls(setup.replica, "evalsha")
        await eventually(lambda: command_calls(setup.replica, "evalsha") > calls + 50, 20, "decisions did not go to the new master")
        await asyncio.sleep(0.5)

    decided = decided_by_redis(processes, load)
    stored = sum(value(setup.replica, key) for key in keys(setup.replica, "gw:rl:{steady|*"))
    late = last_write[1] - switched
    print(
        f"Sentinel named the new master {took:.2f}s after SENTINEL FAILOVER and demoted the old one {waited:.2f}s later; "
        f"{load.total} requests under load, {load.total - decided} decided by the fallback, {decided - stored} counts lost; "
        f"the old master took decisions for {late:.2f}s after the switch"
    )
    # The gateways follow the switch within a moment, not when the old master is demoted.
    assert late <= SWITCH_WINDOW, f"decisions went to the old master for {late:.1f}s after Sentinel named the new one"
    await exact_again(processes, "after-failover")
    assert [k for k in keys(setup.replica) if k.endswith(":h:after-failover")]  # on the new master
    assert [a.hit for a in await fetch_all([f"{two.url}/products/doc"])] == [True]  # the entry was replicated


# -- 3. a cluster that changes under load -----------------------------------------------------------


async def test_a_cluster_failover_under_load_answers_no_5xx_keeps_the_counters_and_limits_are_exact_again(upstream, gateway_process, redis_cluster_with_replicas) -> None:
    nodes = redis_cluster_with_replicas
    config = scaleout_config(upstream.url, {"cluster_nodes": cluster_urls(nodes)})
    processes = [gateway_process(config), gateway_process(config)]
    urls = [p.url + "/limited" for p in processes]

    # A client that used part of its limit before the change, on the master about to fail over.
    slot = limit_slot("limited", "before")
    victim = owner(nodes, slot)
    (replica,) = [node for node in nodes if f"master_port:{victim.port}\r\n" in text(node, "INFO", "replication")]
    used = QUOTA // 2
    assert await statuses(urls, used, "before") == [200] * used
    assert [k for k in keys(victim) if k.endswith(":h:before")]

    # The load's clients on every master, some on the victim's slots.
    clients = names("steady", 12, lambda name: True)
    assert {owner(nodes, limit_slot("steady", c)).port for c in clients} == {m.port for m in masters(nodes)}
    async with SteadyLoad(processes, clients) as load:
        assert text(replica, "CLUSTER", "FAILOVER") == "OK"
        took = await eventually(lambda: cluster_agrees(nodes, slot, replica.port), 30, "the replica did not take over")
        await asyncio.sleep(1.0)  # the load goes on against the new master
    print(f"every node named the replica master {took:.2f}s after CLUSTER FAILOVER")

    assert_counted(nodes, processes, load)
    # The client's count survived on the replica that took over: the rest of its limit, no more.
    assert await burst(urls, CONCURRENT, {"X-Client": "before"}) == {200: QUOTA - used, 429: CONCURRENT - QUOTA + used}
    await exact_again(processes, "after-failover")


async def test_a_reshard_under_load_answers_no_5xx_keeps_the_counters_and_limits_are_exact_again(upstream, gateway_process, redis_cluster) -> None:
    nodes = redis_cluster
    config = scaleout_config(upstream.url, {"cluster_nodes": cluster_urls(nodes)})
    processes = [gateway_process(config), gateway_process(config)]
    urls = [p.url + "/limited" for p in processes]

    # redis-cli moves the source's lowest slots first: the load's clients and one client that
    # used part of its limit live there.
    moved = 600
    moving = range(moved)
    source = owner(nodes, 0)
    (source_member,) = [m for m in members(nodes[0]) if m.port == source.port]
    target = next(node for node in masters(nodes) if node.port != source.port)
    (target_member,) = [m for m in members(nodes[0]) if m.port == target.port]
    before = names("before", 1, lambda name: limit_slot("limited", name) in moving)[0]
    used = QUOTA // 2
    assert await statuses(urls, used, before) == [200] * used
    clients = names("steady", 8, lambda name: limit_slot("steady", name) in moving) + names("elsewhere", 4, lambda name: True)

    async with SteadyLoad(processes, clients) as load:
        await asyncio.sleep(0.3)
        assert [k for k in keys(source) if k.startswith("gw:rl:{steady|")]  # the load's counters are there
        reshard = await asyncio.create_subprocess_exec(
            "redis-cli", "--cluster", "reshard", f"127.0.0.1:{source.port}",
            "--cluster-from", source_member.id, "--cluster-to", target_member.id,
            "--cluster-slots", str(moved), "--cluster-yes",
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        output, _ = await asyncio.wait_for(reshard.communicate(), 60)
        assert reshard.returncode == 0, output.decode()[-2000:]
        took = await eventually(lambda: all(cluster_agrees(nodes, s, target.port) for s in (moving.start, moving.stop - 1)), 20, "the slots did not move")
        await asyncio.sleep(0.5)  # the load goes on against the new owner
    print(f"{moved} slots moved under load; every node agreed {took:.2f}s after redis-cli finished")

    assert not [k for k in keys(source) if k.startswith("gw:rl:{steady|") and limit_slot("steady", k.rsplit(":h:", 1)[1]) in moving]
    assert_counted(nodes, processes, load)
    assert await burst(urls, CONCURRENT, {"X-Client": before}) == {200: QUOTA - used, 429: CONCURRENT - QUOTA + used}
    assert [k for k in keys(target) if k.endswith(f":h:{before}")]  # the counter moved with its slot
    await exact_again(processes, "after-reshard")
