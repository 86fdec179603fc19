"""The Redis store: one server (``redis.url``), Redis Cluster (``cluster_nodes``) or Sentinel.

redis-py's asyncio client with hiredis. Every call is bounded by ``redis.timeout`` and goes
through a circuit breaker, so a dead or slow Redis costs one timeout per probe, not one per
request. Errors are wrapped once, here, as DependencyUnavailable: policies never import redis.

Rate-limit decisions are one Lua script (the algorithms in ``lua/*.lua`` and ``lua/decide.lua``,
joined), registered once and called with EVALSHA; redis-py reloads it on NOSCRIPT (after a
restart or SCRIPT FLUSH). Every key the script touches is passed in KEYS, and the keys of one
decision share a ``{hash tag}``, so the same script runs on Redis Cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Sequence, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError

from gateway.errors import DependencyUnavailable
from gateway.stores.base import Hit, Outcome, Store
from gateway.stores.breaker import CircuitBreaker

LUA = Path(__file__).with_name("lua")
DECIDE_SCRIPT = "local ALGORITHMS = {}\n" + "\n".join(
    (LUA / name).read_text() for name in ("fixed_window.lua", "sliding_window.lua", "token_bucket.lua", "decide.lua")
)
# INCRBY that gives a new counter its TTL (and only a new one), in one step.
INCR_SCRIPT = """
local value = redis.call("INCRBY", KEYS[1], ARGV[1])
if redis.call("PTTL", KEYS[1]) == -1 then redis.call("PEXPIRE", KEYS[1], ARGV[2]) end
return value
"""
LISTEN_PING = 5.0  # seconds without a message before the subscriber's connection is checked
RESUBSCRIBE_PAUSE = 1.0
INDEX_EXPIRY = ":exp"  # an index's companion sorted set: its members by expiry time
PRUNE_PER_ADD = 64
CONNECT_TIMEOUT = 1.0  # a new connection may take longer than one command
SENTINEL_CHECK = 0.5  # seconds between two asks of Sentinel for the master (RedisStore._follow_master)

T = TypeVar("T")


def _host_port(url: str) -> tuple[str, int]:
    parsed = aioredis.connection.parse_url(url)
    return parsed.get("host", "127.0.0.1"), int(parsed.get("port", 6379))


def _command(*args: Any) -> bytes:
    """One command in RESP, as redis-py writes it: strings as UTF-8, numbers in decimal."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def make_client(settings: Any) -> tuple[Any, list[Any]]:
    """A redis-py asyncio client for the configured topology, and the clients it leans on
    (Sentinel's connections to the sentinels) that must be closed with it."""
    # No retries inside redis-py: a command that ran but whose reply was lost would be counted
    # twice, and a dead Redis would cost several timeouts per call; the breaker decides instead.
    timeouts = {
        "socket_timeout": settings.timeout,
        "socket_connect_timeout": max(settings.timeout, CONNECT_TIMEOUT),
        "retry": Retry(NoBackoff(), 0),
    }
    if settings.cluster_nodes:
        nodes = [ClusterNode(*_host_port(url)) for url in settings.cluster_nodes]
        # Credentials and TLS come from the first URL (a cluster's nodes share them); RedisCluster
        # takes them once, for every node it learns of. They were dropped: every call failed.
        first = aioredis.connection.parse_url(settings.cluster_nodes[0])
        auth: dict[str, Any] = {key: first[key] for key in ("username", "password") if first.get(key)}
        if first.get("connection_class") is aioredis.SSLConnection:
            auth["ssl"] = True
        # reinitialize_steps=0: a MOVED updates that slot and the command follows it. By default
        # every fifth MOVED closes all connections, in use or not: after a failover or a reshard
        # the first burst to the moved slots broke commands mid-flight, tripped the breaker and
        # let the fallback decide (tests/test_scaleout.py). Errors still re-read the topology.
        return RedisCluster(startup_nodes=nodes, max_connections=settings.pool_size, reinitialize_steps=0, **auth, **timeouts), []
    if settings.sentinel is not None:
        sentinel = Sentinel([_host_port(url) for url in settings.sentinel.nodes], **timeouts)
        return sentinel.master_for(settings.sentinel.master, **timeouts), list(sentinel.sentinels)
    # A blocking pool waits (up to the command timeout) for a free connection instead of failing
    # at once when more commands are in flight than pool_size (redis-py's default pool does).
    pool = aioredis.BlockingConnectionPool.from_url(settings.url, max_connections=settings.pool_size, timeout=settings.timeout, **timeouts)
    return aioredis.Redis(connection_pool=pool), []


def _encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")  # paths may carry bytes that are not UTF-8


class RedisStore(Store):
    name = "redis"
    shared = True

    def __init__(self, settings: Any, client: Any = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.prefix = settings.key_prefix
        self.timeout = settings.timeout
        self.client, self._also_close = (client, []) if client is not None else make_client(settings)
        self.breaker = CircuitBreaker("redis", clock=clock)
        # redis-py's cluster (and sentinel) pools raise MaxConnectionsError at once when more
        # commands are in flight than pool_size, instead of waiting: a burst would trip the
        # fallback. Commands wait here for a slot instead, within the same timeout.
        self._slots = asyncio.Semaphore(settings.pool_size)
        self.on_call: Callable[[str, float], None] | None = None  # (command, seconds), e.g. a metric
        self._decide = self.client.register_script(DECIDE_SCRIPT)
        self._incr = self.client.register_script(INCR_SCRIPT)
        self._index_add = self.client.register_script((LUA / "index_add.lua").read_text())
        self._index_take = self.client.register_script((LUA / "index_take.lua").read_text())
        # Pub/sub on one server (redis.url); a cluster's or Sentinel's clients do not subscribe here.
        self.broadcasts = client is None and bool(getattr(settings, "url", None)) and not settings.cluster_nodes and settings.sentinel is None
        self._follows_sentinel = client is None and settings.sentinel is not None
        self._follower: asyncio.Task[None] | None = None
        # Rate-limit decisions made in one event-loop turn go in one pipeline (one round trip,
        # a fraction of redis-py's per-command cost). Not on a cluster, whose keys of one batch
        # live on several nodes.
        self._batching = not isinstance(self.client, RedisCluster)
        self._pending: list[tuple[list[str], list[Any], asyncio.Future[Any]]] = []
        self._sending: set[asyncio.Task[None]] = set()

    async def _follow_master(self) -> None:
        """Sentinel: ask for the master every SENTINEL_CHECK seconds and leave the old one as soon
        as the answer changes. redis-py asks Sentinel only when it opens a connection and keeps
        its pooled ones, so after a switchover of a healthy master (SENTINEL FAILOVER) they went
        on writing to the old master until Sentinel demoted it, about 10 s later, and its resync
        from the new master dropped those counts (tests/test_scaleout.py)."""
        pool = self.client.connection_pool
        master = None
        while True:
            await asyncio.sleep(SENTINEL_CHECK)
            try:
                address = await pool.get_master_address()
                if master is not None and address != master:
                    # Connections opened before the switch: busy ones reconnect when released,
                    # idle ones close now.
                    await pool.update_active_connections_for_reconnect()
                    await pool.disconnect(inuse_connections=False)
                master = address
            except Exception:  # no sentinel answered, or a connection would not close: next time
                pass

    async def _call(self, command: str, call: Callable[[], Awaitable[T]]) -> T:
        if not self.breaker.allow():
            raise DependencyUnavailable("redis is unavailable (circuit open)")
        started = time.perf_counter()
        try:
            # asyncio.timeout, not wait_for: no task per call (a Redis call is on every request).
            async with asyncio.timeout(self.timeout):
                result = await self._bounded(call)
        except asyncio.CancelledError:
            # The request that made the call was cancelled (handler_cancellation: its client
            # left). That says nothing of Redis, but a half-open probe must be given back, or
            # the breaker would keep Redis out of every decision until a restart.
            self.breaker.abandoned()
            raise
        except Exception as exc:  # RedisError, OSError, timeouts, and redis-py's own
            # slips (an AttributeError on a connection its cluster client closed under a command):
            # each is a store failure that on_failure answers (never a 500), and the breaker
            # must hear of it.
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            self.breaker.failed(reason)
            if isinstance(exc, (RedisConnectionError, ConnectionError)) and isinstance(self.client, aioredis.Redis):
                # The server closed this connection (a crash or restart closes them all): the
                # pool's idle connections are as dead, and redis-py would hand each out once
                # more after Redis is back, failing a command and opening the breaker again.
                # Timeouts keep them: a slow Redis is not a reason to reconnect.
                await self.client.connection_pool.disconnect(inuse_connections=False)
            raise DependencyUnavailable(f"redis: {reason}") from exc
        finally:
            if self.on_call is not None:
                self.on_call(command, time.perf_counter() - started)
        self.breaker.succeeded()
        return result

    async def _bounded(self, call: Callable[[], Awaitable[T]]) -> T:
        if self._follows_sentinel and self._follower is None:
            self._follower = asyncio.get_running_loop().create_task(self._follow_master())
        async with self._slots:
            if isinstance(self.client, RedisCluster):
                # Until it knows the slots, redis-py sends a keyed command it has no routing
                # flags for (EVALSHA) to one default node and follows the MOVED; every fifth
                # MOVED (reinitialize_steps) it closes all connections, in use or not, so a
                # burst on a new client broke commands mid-flight (500s, double counts).
                # Learn the slots first: a no-op once known.
                await self.client.initialize()
            return await call()

    def _key(self, key: str) -> str:
        return self.prefix + key

    async def get(self, key: str) -> bytes | None:
        return await self._call("get", lambda: self.client.get(self._key(key)))

    async def get_many(self, *keys: str) -> list[bytes | None]:
        return await self._call("mget", lambda: self.client.mget([self._key(key) for key in keys]))

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        await self._call("set", lambda: self.client.set(self._key(key), value, px=max(int(ttl * 1000), 1)))

    async def delete(self, *keys: str) -> int:
        if not keys:
            return 0
        if isinstance(self.client, RedisCluster):
            # Keys of different slots cannot go in one DEL on a cluster.
            counts = [await self._call("del", lambda k=k: self.client.delete(self._key(k))) for k in keys]
            return sum(counts)
        return await self._call("del", lambda: self.client.delete(*(self._key(k) for k in keys)))

    async def add(self, key: str, value: bytes, ttl: float) -> bool:
        return bool(await self._call("set", lambda: self.client.set(self._key(key), value, px=max(int(ttl * 1000), 1), nx=True)))

    async def incr(self, key: str, amount: int, ttl: float) -> int:
        return int(await self._call("incr", lambda: self._incr(keys=[self._key(key)], args=[amount, max(int(ttl * 1000), 1)])))

    async def hit(self, hits: Sequence[Hit], now_ms: int) -> list[Outcome]:
        keys: list[str] = []
        args: list[Any] = [now_ms]
        for hit in hits:
            keys.extend(self._key(k) for k in hit.keys)
            args.extend((hit.algorithm, len(hit.keys), hit.limit, hit.window_ms, hit.burst, hit.cost))
        if self._batching:
            raw = await self._batched(keys, args)
        else:
            raw = await self._call("rate_limit", lambda: self._decide(keys=keys, args=args))
        return [Outcome(bool(raw[i]), int(raw[i + 1]), int(raw[i + 2]), int(raw[i + 3])) for i in range(0, len(raw), 4)]

    def _batched(self, keys: list[str], args: list[Any]) -> asyncio.Future[Any]:
        """A decision sent with the others of this event-loop turn (see __init__)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if not self._pending:
            loop.call_soon(self._flush)
        self._pending.append((keys, args, future))
        return future

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        task = asyncio.ensure_future(self._send(batch))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[tuple[list[str], list[Any], asyncio.Future[Any]]]) -> None:
        """One pipeline for the batch, through the breaker and the timeout like any call; each
        decision gets its answer, or the same DependencyUnavailable when the call failed."""
        answers: list[Any] = []
        try:
            answers = await self._call("rate_limit", lambda: self._pipeline(batch))
        except DependencyUnavailable as exc:
            answers = [exc] * len(batch)
        finally:  # (cancelled with the store: every decision still gets an answer)
            answers += [DependencyUnavailable("redis: the store is closing")] * (len(batch) - len(answers))
            for (_, _, future), answer in zip(batch, answers):
                if future.done():  # its request was cancelled (its client left)
                    continue
                if isinstance(answer, BaseException):
                    future.set_exception(answer)
                else:
                    future.set_result(answer)

    async def _pipeline(self, batch: list[tuple[list[str], list[Any], asyncio.Future[Any]]]) -> list[Any]:
        answers: list[Any] = [None] * len(batch)
        todo = list(range(len(batch)))
        for attempt in range(2):
            commands = [_command("EVALSHA", self._decide.sha, len(keys), *keys, *args) for keys, args, _ in (batch[i] for i in todo)]
            for i, answer in zip(todo, await self._send_commands(commands)):
                answers[i] = answer
            # After a restart or SCRIPT FLUSH: load it and send again only the decisions that did
            # not run (another client may load it between two commands of this pipeline, and a
            # decision that ran must not count twice).
            todo = [i for i in todo if isinstance(answers[i], NoScriptError)]
            if not todo or attempt:
                break
            await self.client.script_load(DECIDE_SCRIPT)
        return [DependencyUnavailable(f"redis: {a}") if isinstance(a, Exception) else a for a in answers]

    async def _send_commands(self, commands: list[bytes]) -> list[Any]:
        """Commands written to one pooled connection in one write; their replies in order, an
        error reply as its exception. redis-py's pipeline cost several times the round trip in
        Python (command objects, retries, observability hooks), and its scripts in a pipeline
        send SCRIPT EXISTS before each one. A send or read that fails or is cancelled (the timeout)
        disconnects the connection itself (redis-py's own rule), so no late reply is left on it
        for its next user."""
        pool = self.client.connection_pool
        connection = await pool.get_connection()
        try:
            await connection.send_packed_command(b"".join(commands), check_health=False)
            replies: list[Any] = []
            for _ in commands:
                try:
                    replies.append(await connection.read_response())
                except ResponseError as exc:
                    replies.append(exc)
        finally:
            await pool.release(connection)
        return replies

    async def index_add(self, index: str, members: Sequence[str], expires_ms: int, now_ms: int) -> None:
        keys = [self._key(index), self._key(index + INDEX_EXPIRY)]
        await self._call("index_add", lambda: self._index_add(keys=keys, args=[expires_ms, now_ms, PRUNE_PER_ADD, *map(_encode, members)]))

    async def index_take(self, index: str, prefix: str, count: int) -> list[str]:
        keys = [self._key(index), self._key(index + INDEX_EXPIRY)]
        found = await self._call("index_take", lambda: self._index_take(keys=keys, args=[_encode(prefix), count]))
        return [member.decode("utf-8", "surrogateescape") for member in found]

    async def publish(self, channel: str, message: bytes) -> None:
        await self._call("publish", lambda: self.client.publish(self._key(channel), message))

    async def listen(self, channel: str, on_message: Callable[[bytes], None], on_state: Callable[[bool], None]) -> None:
        # A connection of its own, without the command timeout: it waits for messages, and is
        # checked with a PING after LISTEN_PING quiet seconds instead.
        client = aioredis.Redis.from_url(self.settings.url, socket_connect_timeout=max(self.timeout, CONNECT_TIMEOUT), socket_keepalive=True)
        try:
            while True:
                pubsub = client.pubsub()
                try:
                    await pubsub.subscribe(self._key(channel))
                    while True:
                        message = await pubsub.get_message(timeout=LISTEN_PING)
                        if message is None:
                            await asyncio.wait_for(pubsub.ping(), LISTEN_PING)
                        elif message["type"] == "subscribe":
                            on_state(True)
                        elif message["type"] == "message":
                            on_message(message["data"])
                except (RedisError, OSError, asyncio.TimeoutError):
                    pass
                finally:
                    on_state(False)
                    with contextlib.suppress(Exception):
                        await pubsub.aclose()
                await asyncio.sleep(RESUBSCRIBE_PAUSE)
        finally:
            await client.aclose()

    async def ping(self) -> float:
        started = time.perf_counter()
        await self._call("ping", self.client.ping)
        return time.perf_counter() - started

    async def close(self) -> None:
        for task in list(self._sending):
            task.cancel()
        if self._follower is not None:
            self._follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follower
        if isinstance(self.client, aioredis.Redis):
            await self.client.aclose(close_connection_pool=True)  # the pool is ours, not the client's
        else:
            await self.client.aclose()
        for other in self._also_close:
            await other.aclose()
