"""The ``cache`` policy: a shared HTTP cache in front of the upstream (RFC 9111).

``cache: {ttl: 5m, stale_while_revalidate: 30s, stale_if_error: 10m}``. What it does:

- GET and HEAD only (HEAD is answered from a stored GET). The key is built from the host (when
  the route matches on it or forwards it: preserve_host), the normalised path, the query (sorted; ``ignore_query`` or ``key_query`` narrow it), configured
  request headers and, with ``key: [user]``, the authenticated user.
- Storable responses (gateway.freshness.storable): heuristically cacheable statuses or explicit
  freshness; never ``no-store``/``private`` (unless ``override``), never Set-Cookie (unless
  ``allow_set_cookie``), never Vary: *. Requests with Authorization are answered only from
  entries the upstream marked public/s-maxage, or when the route keys by user.
- Freshness: s-maxage, max-age, Expires, else the route's ``ttl`` (``override: true`` makes ttl
  win); Age is set on hits. Vary gives one entry per variant.
- Every response on the route says what the cache did in an RFC 9211 ``Cache-Status`` header
  (writes and answers made before the cache, such as a 401, say ``fwd=bypass``).
- A fresh entry answers conditional requests (If-None-Match, If-Modified-Since) with 304. A stale
  one is revalidated with the upstream (If-None-Match / If-Modified-Since from its ETag and
  Last-Modified); a 304 refreshes it. Within ``stale_while_revalidate`` the stale copy is served
  and refreshed in the background; within ``stale_if_error`` it answers when the upstream fails.
- Concurrent misses for one key make one upstream request: the others wait for it (single
  flight in the process, bounded by ``lock_timeout``).
- A successful request of a method that is not safe removes the entries of its URI and of the
  same-host URIs its Location and Content-Location name (§4.4).
- Storage: the gateway's store (Redis when configured, shared by every gateway process and kept
  across restarts; else the embedded memory store). With a shared store each process also keeps
  an LRU copy bounded in bytes, which answers fresh hits without a store read while removals
  reach it over pub/sub (:class:`CacheNews`), and answers when the store fails. Bodies over 1 KiB are compressed;
  entries over ``max_entry_size`` (and responses without Content-Length) are not stored. When
  the store fails, the local copy answers or the request goes upstream: never a 5xx.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import os
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urljoin, urlsplit

from multidict import CIMultiDict
from pydantic import Field

from gateway.errors import DependencyUnavailable
from gateway.freshness import NO_STALE, corrected_initial_age, directives, freshness, storable, surrogate_directives
from gateway.metrics import UNMATCHED
from gateway.pipeline import Exchange, Policy, PolicyContext, Reply
from gateway.routing import BadPath, normalise_path, request_host
from gateway.settings import Duration, Settings, Size

log = logging.getLogger("gateway")

CACHEABLE = frozenset({"GET", "HEAD"})
SAFE = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})  # RFC 9110 §9.2.1; any other method invalidates (RFC 9111 §4.4)
COMPRESS_OVER = 1024
NOT_STORED_HEADERS = frozenset({"set-cookie", "age", "cache-status", "x-request-id", "connection", "keep-alive", "transfer-encoding"})
# A 304 does not change what describes the stored bytes (RFC 9111 §3.2; the ETag it matched).
KEEP_ON_UPDATE = frozenset({"content-length", "content-encoding", "content-range", "content-md5", "etag"})
CACHE_NAME = "gateway"  # the cache's name in Cache-Status (RFC 9211 §2)
RESULTS = ("hit", "stale", "miss", "bypass")  # cache_requests' result label
CONDITIONALS = ("If-None-Match", "If-Modified-Since", "If-Match", "If-Unmodified-Since", "If-Range")
ERROR_STATUSES = frozenset({500, 502, 503, 504})  # RFC 5861 §4: errors stale-if-error covers
SEP = "\x00"  # between the parts of an index member (never in a normalised path, a query or a tag)
PURGE_BATCH = 500
LOCK_POLL = (0.01, 0.1)  # first and longest wait between looks for another gateway's entry


def cache_control(headers: Any) -> dict[str, str | None]:
    """Every Cache-Control line's directives (a list may be split over several lines)."""
    return directives(", ".join(headers.getall("Cache-Control", [])))


def _vary(headers: Any) -> list[str]:
    """The Vary field's names, over every Vary line."""
    return [name.strip() for line in headers.getall("Vary", []) for name in line.split(",") if name.strip()]


class CacheSettings(Settings):
    ttl: Duration = Field(300.0, ge=0, description="freshness when the upstream gives none (or always, with override)")
    override: bool = Field(False, description="ttl wins over the upstream's Cache-Control and Expires; private/no-store responses are stored too")
    heuristic: bool = Field(False, description="a response with Last-Modified and no freshness of its own is fresh for 10% of its age (at most 1 day) instead of ttl (RFC 9111 §4.2.2)")
    stale_while_revalidate: Duration = Field(0.0, ge=0, description="serve a stale entry this long after it expired while refreshing it in the background")
    stale_if_error: Duration = Field(0.0, ge=0, description="serve a stale entry this long after it expired when the upstream fails")
    key: tuple[Literal["user"], ...] = Field((), description="[user]: one entry per authenticated user")
    key_headers: tuple[str, ...] = Field((), description="request headers that are part of the key")
    ignore_query: bool = Field(False, description="the query is not part of the key")
    key_query: tuple[str, ...] | None = Field(None, description="only these query parameters are part of the key")
    allow_set_cookie: bool = Field(False, description="store responses with Set-Cookie (the cookie is never stored)")
    surrogate_control: bool = Field(True, description="an upstream's Surrogate-Control decides storage and freshness here instead of its Cache-Control")
    max_entry_size: Size = Field(1024 * 1024, gt=0, description="larger bodies are not stored")
    local_size: Size = Field(64 * 1024 * 1024, ge=0, description="bytes of entries kept in the process in front of a shared store")
    lock_timeout: Duration = Field(5.0, gt=0, description="how long concurrent misses wait for the one upstream request")
    tags: tuple[str, ...] = Field((), description="purge tags of every entry of the route (besides the upstream's Surrogate-Key)")


@dataclass
class Entry:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    request_time: float
    response_time: float
    lifetime: float
    public: bool
    revalidate: bool = False  # §4.2.4: never served stale (must-revalidate, proxy-revalidate, s-maxage, no-cache)
    _initial_age: float | None = field(default=None, init=False, repr=False, compare=False)

    def encode(self) -> bytes:
        body, compressed = self.body, False
        if len(body) > COMPRESS_OVER:
            packed = zlib.compress(body, 1)
            if len(packed) < len(body):
                body, compressed = packed, True
        meta = {
            "s": self.status, "h": self.headers, "q": self.request_time, "r": self.response_time,
            "l": self.lifetime, "p": self.public, "m": self.revalidate, "z": compressed,
        }  # fmt: skip
        return json.dumps(meta, separators=(",", ":")).encode() + b"\n" + body

    @classmethod
    def decode(cls, raw: bytes) -> "Entry":
        head, _, body = raw.partition(b"\n")
        meta = json.loads(head)
        if meta["z"]:
            body = zlib.decompress(body)
        return cls(meta["s"], [tuple(h) for h in meta["h"]], body, meta["q"], meta["r"], meta["l"], meta["p"], meta.get("m", False))  # type: ignore[misc]

    def age(self, now: float) -> float:
        """RFC 9111 §4.2.3's current_age. Its initial part is worked out once per decoded entry
        (the local layer keeps decoded entries: parsing Date on every hit was a tenth of one)."""
        if self._initial_age is None:
            self._initial_age = corrected_initial_age(dict(self.headers), self.request_time, self.response_time)
        return self._initial_age + (now - self.response_time)

    def header(self, name: str) -> str | None:
        lower = name.lower()
        return next((value for key, value in self.headers if key.lower() == lower), None)


@dataclass
class Lookup:
    """What on_request found, for the upstream hooks."""

    key: str  # the variant-independent key
    url: str  # path and keyed query, as purge by URL and prefix finds them
    variant: str | None  # the key of the entry found (None: not known yet)
    entry: Entry | None = None  # a stale entry being revalidated or kept for stale_if_error
    flight: asyncio.Future[None] | None = None  # set when this request leads the single flight
    locked: bool = False  # holds the shared store's lock for the key (other gateways wait)
    revalidating: bool = False  # the entry's own validators were sent upstream
    status: list[str] = field(default_factory=list)  # Cache-Status parameters


class LocalLayer:
    """An in-process LRU of encoded entries (and, once read, their decoded form), bounded in
    bytes: an entry counts its encoded bytes and its decoded body."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self.items: OrderedDict[str, tuple[bytes, Entry | None]] = OrderedDict()

    def get(self, key: str) -> bytes | None:
        item = self.items.get(key)
        if item is None:
            return None
        self.items.move_to_end(key)
        return item[0]

    def entry(self, key: str) -> Entry | None:
        """The decoded entry (decoded once, then kept)."""
        item = self.items.get(key)
        if item is None:
            return None
        self.items.move_to_end(key)
        raw, entry = item
        if entry is None:
            try:
                entry = Entry.decode(raw)
            except (ValueError, KeyError, zlib.error):
                return None
            self.items[key] = (raw, entry)
            self._grow(len(entry.body))
        return entry

    def put(self, key: str, raw: bytes) -> None:
        self.drop(key)
        if len(raw) > self.capacity:
            return
        self.items[key] = (raw, None)
        self._grow(len(raw))

    def drop(self, key: str) -> None:
        item = self.items.pop(key, None)
        if item is not None:
            self.used -= _size(item)

    def clear(self) -> None:
        self.items.clear()
        self.used = 0

    def _grow(self, size: int) -> None:
        self.used += size
        while self.used > self.capacity and self.items:
            _, old = self.items.popitem(last=False)
            self.used -= _size(old)


def _size(item: tuple[bytes, Entry | None]) -> int:
    raw, entry = item
    return len(raw) + (len(entry.body) if entry is not None else 0)


class CacheNews:
    """Invalidations between the gateway processes that share one Redis, over pub/sub: each
    removal (a write's invalidation, a purge) is published, and every process drops those keys
    from its local layers. While subscribed, a process answers fresh entries from its local
    layer without asking Redis; after a lost subscription (messages may have been missed) the
    layers are emptied, and until it is back lookups ask Redis first.

    One per config generation, shared by the routes' cache policies."""

    CHANNEL = "c:removed"

    def __init__(self, store: Any) -> None:
        self.store = store
        self.layers: list[LocalLayer] = []
        self.live = False
        self.epoch = 0  # moves on every removal and state change: a read that saw it move is not kept
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.task = asyncio.create_task(self.store.listen(self.CHANNEL, self._removed, self._state))

    async def publish(self, keys: tuple[str, ...]) -> None:
        try:
            await self.store.publish(self.CHANNEL, "\n".join(keys).encode())
        except DependencyUnavailable:
            pass  # the others' copies expire with their freshness

    def _removed(self, message: bytes) -> None:
        self.epoch += 1
        for key in message.decode().split("\n"):
            for layer in self.layers:
                layer.drop(key)

    def _state(self, live: bool) -> None:
        self.epoch += 1
        if live and not self.live:
            for layer in self.layers:  # what was published while not subscribed is unknown
                layer.clear()
        self.live = live

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


class CachePolicy(Policy):
    name = "cache"
    settings_type = CacheSettings
    failure_mode = "open"  # handled inside: the cache is bypassed when the store fails

    def __init__(self, settings: CacheSettings, context: PolicyContext) -> None:
        super().__init__(settings, context)
        self.store = context.store
        self.route = context.route or UNMATCHED
        self.local = LocalLayer(settings.local_size) if settings.local_size else None
        self.news: CacheNews | None = None
        if self.local is not None and context.store.broadcasts:
            self.news = context.shared("cache_news", lambda: CacheNews(context.store))
            self.news.layers.append(self.local)
        self.flights: dict[str, asyncio.Future[None]] = {}
        self.refreshing: set[asyncio.Task[None]] = set()
        self.key_headers = tuple(settings.key_headers)
        self.key_query = frozenset(settings.key_query) if settings.key_query is not None else None
        self.wall = time.time
        # result → its cache_requests child: looked up once here, every series there from the start.
        metrics = context.metrics
        self.counters = {result: metrics.cache_requests.labels(route=self.route, result=result) for result in RESULTS} if metrics else {}
        self.index = f"c:{{{self.route}}}:index"  # purge's index of the route's entries
        # The Host is part of the key only where the answer can depend on it: routes that match
        # on the host, or whose upstream receives the client's Host (preserve_host).
        route = next((r for r in context.config.routes if r.name == context.route), None)
        self.key_host = route is None or route.match.host is not None or context.config.upstreams[route.upstream].preserve_host

    # -- keys ----------------------------------------------------------------------------------

    def _query(self, query: str) -> str:
        """The query as the key has it: sorted, narrowed by ignore_query / key_query."""
        if self.settings.ignore_query or not query:
            return ""
        return "&".join(sorted(part for part in query.split("&") if part and (self.key_query is None or part.partition("=")[0] in self.key_query)))

    def _url(self, exchange: Exchange) -> str:
        return f"{exchange.path}{SEP}{self._query(exchange.query)}"

    def _key(self, exchange: Exchange, path: str | None = None, query: str | None = None) -> str:
        """The key of the exchange's URI, or of another path and query on the same host."""
        request = exchange.request
        path, query = (exchange.path, exchange.query) if path is None else (path, query or "")
        parts = [request_host(request.headers.get("Host", "")) if self.key_host else "", path, self._query(query)]
        parts += [request.headers.get(name, "") for name in self.key_headers]
        if "user" in self.settings.key:
            parts.append(exchange.subject or "")
        return _entry_key(self.route, "\n".join(parts))

    @staticmethod
    def _variant(key: str, vary: list[str], headers: Any, generation: str = "") -> str:
        if not vary:
            return key
        # The index's generation is part of the variant's key: once an invalidation deleted the
        # index, the variants stored before it are never found again (a new index, a new one).
        values = "\n".join([generation] + [f"{name}:{' '.join(headers.get(name, '').split())}" for name in vary])
        return f"{key}:v:{hashlib.sha256(values.encode('utf-8', 'surrogateescape')).hexdigest()[:16]}"

    @staticmethod
    def _index(raw: bytes | None) -> tuple[list[str], str]:
        """The Vary index: (names, generation)."""
        if not raw:
            return [], ""
        try:
            index = json.loads(raw)
        except ValueError:
            return [], ""
        if isinstance(index, list):
            return index, ""
        return list(index.get("vary", [])), str(index.get("gen", ""))

    # -- storage -------------------------------------------------------------------------------

    async def _get(self, *keys: str) -> list[bytes | None]:
        """Values in one store round trip (a route's keys share its hash tag), kept in the local
        layer. The local layer answers when the store fails."""
        epoch = self.news.epoch if self.news is not None else 0
        try:
            found = await self.store.get_many(*keys)
        except DependencyUnavailable:
            return [self.local.get(key) if self.local is not None else None for key in keys]
        if self.local is not None and (self.news is None or self.news.epoch == epoch):
            # (Not when a removal arrived meanwhile: what was read may be what it removed.)
            for key, raw in zip(keys, found):
                if raw is not None:
                    self.local.put(key, raw)
                else:
                    self.local.drop(key)
        return found

    async def _set(self, key: str, raw: bytes, ttl: float) -> None:
        if self.local is not None:
            self.local.put(key, raw)
        try:
            await self.store.set(key, raw, max(ttl, 1.0))
        except DependencyUnavailable:
            pass  # kept in the local layer only

    async def _delete(self, *keys: str) -> None:
        if self.local is not None:
            for key in keys:
                self.local.drop(key)
        try:
            await self.store.delete(*keys)
        except DependencyUnavailable:
            return
        if self.news is not None:
            await self.news.publish(keys)

    def _find_local(self, key: str, headers: Any) -> tuple[str, Entry] | None:
        """The entry this process holds, decoded, when it may answer without asking the store:
        always in front of the process's own memory store (every write and removal passes here),
        in front of Redis while the other processes' removals are heard (CacheNews)."""
        if self.local is None or (self.store.shared and (self.news is None or not self.news.live)):
            return None
        vary, generation = self._index(self.local.get(key + ":vary"))
        variant = self._variant(key, vary, headers, generation)
        entry = self.local.entry(variant)
        return (variant, entry) if entry is not None else None

    async def _find(self, key: str, headers: Any) -> tuple[str | None, Entry | None]:
        # The Vary index and the entry stored without Vary in one round trip; a variant takes a
        # second one.
        index, raw = await self._get(key + ":vary", key)
        vary, generation = self._index(index)
        variant = self._variant(key, vary, headers, generation)
        if variant != key:
            [raw] = await self._get(variant)
        if raw is None:
            return variant if index else None, None
        try:
            return variant, Entry.decode(raw)
        except (ValueError, KeyError, zlib.error):
            return variant, None

    # -- the request ---------------------------------------------------------------------------

    async def on_request(self, exchange: Exchange) -> Reply | None:
        method = exchange.method
        if method not in SAFE:
            exchange.state["cache_invalidate"] = self._key(exchange)
            return None
        if method not in CACHEABLE:
            return None
        request_cc = cache_control(exchange.request.headers)
        key = self._key(exchange)
        lookup = Lookup(key, self._url(exchange), None)
        exchange.state["cache"] = lookup
        if "no-store" in request_cc:
            lookup.status.append("fwd=bypass")
            return None
        authorized = "Authorization" in exchange.request.headers and "user" not in self.settings.key
        found = self._find_local(key, exchange.request.headers) if "no-cache" not in request_cc else None
        if found is not None and not (authorized and not found[1].public):
            lookup.variant, entry = found
            age = entry.age(self.wall())
            if age < entry.lifetime:  # a fresh copy in the process: no store round trip
                return self._hit(exchange, lookup, entry, age, entry.lifetime - age)
        for _ in range(2):  # a second look after waiting for another request's fetch
            variant, entry = await self._find(key, exchange.request.headers)
            lookup.variant = variant
            if entry is not None and not (authorized and not entry.public):
                now = self.wall()
                age = entry.age(now)
                if age < entry.lifetime and "no-cache" not in request_cc:
                    return self._hit(exchange, lookup, entry, age, entry.lifetime - age)
                stale_for = age - entry.lifetime
                lookup.entry = entry
                if stale_for < self.settings.stale_while_revalidate and not entry.revalidate and "no-cache" not in request_cc:
                    self._refresh_in_background(exchange, key, entry)
                    lookup.status.append("fwd=stale")
                    return self._hit(exchange, lookup, entry, age, entry.lifetime - age)
            flight = self.flights.get(key)
            if flight is None:
                lookup.flight = self.flights[key] = asyncio.get_running_loop().create_future()
                task = asyncio.current_task()
                if task is not None:  # a request cancelled (its client left) lands its flight too
                    task.add_done_callback(lambda _: self._land(lookup))
                break
            try:
                await asyncio.wait_for(asyncio.shield(flight), self.settings.lock_timeout)
            except asyncio.TimeoutError:
                break
        if lookup.flight is not None and self.store.shared and "no-cache" not in request_cc:
            answer = await self._wait_for_other_gateways(exchange, lookup, authorized)
            if answer is not None:
                return answer
        lookup.status.append("fwd=stale" if lookup.entry is not None else "fwd=miss")
        if lookup.entry is not None:  # revalidate what is stored
            etag, modified = lookup.entry.header("ETag"), lookup.entry.header("Last-Modified")
            if etag or modified:
                # The entry's validators replace the client's: a 304 must be about the stored
                # response (RFC 9111 §4.3.2); the client's own conditional is answered from it.
                for name in ("If-None-Match", "If-Modified-Since"):
                    exchange.upstream_headers.popall(name, None)
                if etag:
                    exchange.upstream_headers["If-None-Match"] = etag
                if modified:
                    exchange.upstream_headers["If-Modified-Since"] = modified
                lookup.revalidating = True
        return None

    async def _wait_for_other_gateways(self, exchange: Exchange, lookup: Lookup, authorized: bool) -> Reply | None:
        """The single flight across gateways sharing the store: the one that takes the key's
        lock fetches; the others look for its entry until it appears (a hit), the lock is gone
        (its response was not stored: each goes upstream), or lock_timeout passes."""
        lock = lookup.key + ":lock"
        try:
            if await self.store.add(lock, b"1", self.settings.lock_timeout):
                lookup.locked = True
                return None
            deadline = time.monotonic() + self.settings.lock_timeout
            pause = LOCK_POLL[0]
            while time.monotonic() < deadline:
                await asyncio.sleep(pause)
                pause = min(pause * 2, LOCK_POLL[1])
                lookup.variant, entry = await self._find(lookup.key, exchange.request.headers)
                if entry is not None and not (authorized and not entry.public):
                    age = entry.age(self.wall())
                    if age < entry.lifetime:
                        self._land(lookup)  # this process's waiters find it too
                        return self._hit(exchange, lookup, entry, age, entry.lifetime - age)
                if await self.store.get(lock) is None:
                    return None
        except DependencyUnavailable:
            pass  # no lock without the store: this gateway fetches
        return None

    async def _unlock(self, lookup: Lookup) -> None:
        if lookup.locked:
            lookup.locked = False
            try:
                await self.store.delete(lookup.key + ":lock")
            except DependencyUnavailable:
                pass  # it expires after lock_timeout

    def _hit(self, exchange: Exchange, lookup: Lookup, entry: Entry, age: float, ttl: float) -> Reply:
        self._count("hit" if "fwd=stale" not in lookup.status else "stale")
        headers = CIMultiDict(entry.headers)
        headers["Age"] = str(int(age))
        lookup.status[:0] = ["hit"]
        lookup.status.append(f"ttl={int(ttl)}")
        request = exchange.request
        if _not_modified(request.headers, entry):
            kept = CIMultiDict((k, v) for k, v in headers.items() if k.lower() in ("etag", "cache-control", "expires", "vary", "date", "last-modified", "age", "content-location"))
            return Reply(304, kept)
        return Reply(entry.status, headers, entry.body)  # for HEAD, aiohttp sends no body (and keeps its length)

    def _refresh_in_background(self, exchange: Exchange, key: str, entry: Entry) -> None:
        """stale_while_revalidate: one background fetch per key refreshes the entry."""
        route = exchange.route
        if key in self.flights or route is None:
            return
        future = self.flights[key] = asyncio.get_running_loop().create_future()
        upstream, headers = route.upstream, exchange.upstream_headers.copy()
        path, query, url = exchange.path, exchange.query, self._url(exchange)
        request_headers = CIMultiDict(exchange.request.headers)
        # The refresh asks about the stored response, never with the client's own conditionals
        # (whose 304 has no body to store).
        for name in CONDITIONALS:
            headers.popall(name, None)
        etag, modified = entry.header("ETag"), entry.header("Last-Modified")
        if etag:
            headers["If-None-Match"] = etag
        if modified:
            headers["If-Modified-Since"] = modified

        # Its own exchange, through the upstream's forward(): balancing, retries, passive health
        # and in-flight counts see the refresh like any request.
        background = Exchange(exchange.request, exchange.request_id, exchange.client_ip, time.perf_counter())
        background.method, background.path, background.query = "GET", path, query
        background.route, background.upstream_headers = route, headers

        async def refresh() -> None:
            try:
                started = self.wall()
                async with upstream.forward(background, None) as response:
                    if response.status == 304 and (etag or modified):
                        await self._store(key, url, request_headers, Reply(entry.status, self._updated(entry, response.headers), entry.body), started, "GET")
                    elif self._storable(request_headers, response.status, response.headers, _length(response.status, response)):
                        reply = Reply(response.status, CIMultiDict(response.headers), await response.read())
                        await self._store(key, url, request_headers, reply, started, "GET")
            except Exception as exc:  # a failed refresh leaves the stale entry; the next request retries
                log.info("cache refresh failed", extra={"route": self.route, "path": path, "query": query, "error": type(exc).__name__})
            finally:
                self.flights.pop(key, None)
                if not future.done():
                    future.set_result(None)

        task = asyncio.create_task(refresh())
        self.refreshing.add(task)
        task.add_done_callback(self.refreshing.discard)

    # -- the upstream's answer -----------------------------------------------------------------

    async def on_upstream(self, exchange: Exchange, reply: Reply) -> None:
        invalidate = exchange.state.get("cache_invalidate")
        if invalidate is not None:
            if 200 <= reply.status < 400:
                await self._invalidate(invalidate, *self._named_uris(exchange, reply))
            return
        lookup: Lookup | None = exchange.state.get("cache")
        if lookup is None:
            return
        try:
            if reply.status == 304 and lookup.entry is not None and lookup.revalidating:
                await self._revalidated(exchange, lookup, reply)  # a HEAD's too (RFC 9111 §4.3.5)
                return
            if exchange.method == "HEAD":
                return  # a HEAD's answer has no body to store
            if reply.status in ERROR_STATUSES and lookup.entry is not None and self._stale_on_error(lookup, reply.status, reply):
                return
            content_length = _length(reply.status, reply.upstream)
            if content_length is None or content_length > self.settings.max_entry_size:
                lookup.status.append("detail=not-stored")
                return
            if not self._storable(exchange.request.headers, reply.status, reply.headers, content_length):
                return
            assert reply.upstream is not None
            reply.body = await reply.upstream.read()
            reply.upstream = None
            if await self._store(lookup.key, lookup.url, exchange.request.headers, reply, self.wall(), exchange.method):
                lookup.status.append("stored")
        finally:
            self._land(lookup)
            await self._unlock(lookup)

    def _storable(self, request_headers: Any, status: int, headers: Any, content_length: int | None) -> bool:
        """Whether a GET's response may be stored (RFC 9111 §3), with the route's settings."""
        if content_length is None or content_length > self.settings.max_entry_size:
            return False
        request_cc = cache_control(request_headers)
        response_cc = self._response_cc(headers)
        has_authorization = "Authorization" in request_headers and "user" not in self.settings.key
        if "*" in _vary(headers):
            return False
        return storable(
            status, "GET", request_cc, response_cc, has_authorization, "Set-Cookie" in headers,
            self.settings.allow_set_cookie, self.settings.override, has_expires="Expires" in headers,
        )  # fmt: skip

    def _response_cc(self, headers: Any) -> dict[str, str | None]:
        """The directives this cache obeys: the upstream's Surrogate-Control when it sent one
        (this gateway is a surrogate), else its Cache-Control."""
        surrogate = headers.get("Surrogate-Control") if self.settings.surrogate_control else None
        found = surrogate_directives(surrogate) if surrogate else {}
        return found or cache_control(headers)  # directives all aimed at other surrogates: not for this one

    def _stale_on_error(self, lookup: Lookup, status: int, reply: Reply) -> bool:
        """stale_if_error for an upstream that answered 500/502/503/504: the stale entry instead."""
        entry = lookup.entry
        assert entry is not None
        age = entry.age(self.wall())
        if entry.revalidate or age - entry.lifetime >= self.settings.stale_if_error:
            return False
        if reply.upstream is not None:
            reply.upstream.release()
        reply.upstream = None
        headers = CIMultiDict(entry.headers)
        headers["Age"] = str(int(age))
        reply.status, reply.headers, reply.body = entry.status, headers, entry.body
        lookup.status = ["hit", "fwd=stale", f"fwd-status={status}", f"ttl={int(entry.lifetime - age)}"]
        self._count("stale")
        return True

    async def on_upstream_error(self, exchange: Exchange, error: Exception) -> Reply | None:
        lookup: Lookup | None = exchange.state.get("cache")
        if lookup is None:
            return None
        self._land(lookup)
        await self._unlock(lookup)
        entry = lookup.entry
        if entry is None:
            return None
        age = entry.age(self.wall())
        if not entry.revalidate and age - entry.lifetime < self.settings.stale_if_error:
            lookup.status = ["hit", "fwd=stale", f"fwd-status={getattr(error, 'status', 502)}", f"ttl={int(entry.lifetime - age)}"]
            self._count("stale")
            headers = CIMultiDict(entry.headers)
            headers["Age"] = str(int(age))
            return Reply(entry.status, headers, entry.body)
        return None

    async def _store(self, key: str, url: str, request_headers: Any, reply: Reply, request_time: float, method: str) -> bool:
        if method == "HEAD":
            return False  # a HEAD's answer has no body to store
        response_cc = self._response_cc(reply.headers)
        now = self.wall()
        ttl = None if self.settings.heuristic and "Last-Modified" in reply.headers else self.settings.ttl
        fresh = freshness(reply.headers, response_cc, reply.status, now, ttl, self.settings.override)
        keep_for = fresh.lifetime + max(self.settings.stale_while_revalidate, self.settings.stale_if_error)
        if keep_for <= 0 and not (reply.headers.get("ETag") or reply.headers.get("Last-Modified")):
            return False
        vary = _vary(reply.headers)
        headers = [(k, v) for k, v in reply.headers.items() if k.lower() not in NOT_STORED_HEADERS]
        age = reply.headers.get("Age")
        if age is not None:  # the upstream's Age is part of the entry's age (§4.2.3); hits replace it
            headers.append(("Age", age))
        revalidate = not self.settings.override and any(name in response_cc for name in NO_STALE)
        entry = Entry(reply.status, headers, reply.body, request_time, now, fresh.lifetime, fresh.public, revalidate)
        ttl = keep_for + 60.0  # kept a little past usefulness, for revalidation
        generation = ""
        if vary:
            [known_index] = await self._get(key + ":vary")
            known, generation = self._index(known_index)
            if known != vary or not generation:
                generation = os.urandom(8).hex()
            await self._set(key + ":vary", json.dumps({"vary": vary, "gen": generation}).encode(), ttl)
        else:
            await self._delete(key + ":vary")
        variant = self._variant(key, vary, request_headers, generation)
        await self._set(variant, entry.encode(), ttl)
        await self._index_entry(url, variant, reply.headers, ttl)
        return True

    async def _index_entry(self, url: str, variant: str, headers: Any, ttl: float) -> None:
        """Purge finds entries through the route's index: one member by URL, one per tag."""
        tags = sorted({*self.settings.tags, *" ".join(headers.getall("Surrogate-Key", [])).split()})
        members = [f"p{SEP}{url}{SEP}{variant}", *(f"t{SEP}{tag}{SEP}{variant}" for tag in tags)]
        now_ms = int(self.wall() * 1000)
        try:
            await self.store.index_add(self.index, members, now_ms + int(ttl * 1000), now_ms)
        except DependencyUnavailable:
            pass  # the entry lives on in the store; purges miss it until it expires

    async def purge(self, purge: "Purge") -> int:
        """Remove the route's entries a purge names; returns how many existed.
        DependencyUnavailable when the store cannot answer."""
        if purge.kind == "tag":
            prefix = f"t{SEP}{purge.value}{SEP}"
        elif purge.kind == "prefix":
            prefix = f"p{SEP}{purge.value}"
        else:  # every entry of the path (all queries, all variants), or of one query
            prefix = f"p{SEP}{purge.value}{SEP}" + ("" if purge.query is None else f"{self._query(purge.query)}{SEP}")
        purged = 0
        while True:
            members = await self.store.index_take(self.index, prefix, PURGE_BATCH)
            keys = [member.rpartition(SEP)[2] for member in members]
            if self.local is not None:
                for key in keys:
                    self.local.drop(key)
            if keys:
                purged += await self.store.delete(*keys)
                if self.news is not None:
                    await self.news.publish(tuple(keys))
            if len(members) < PURGE_BATCH:
                return purged

    @staticmethod
    def _updated(entry: Entry, headers: Any) -> CIMultiDict[str]:
        """§4.3.4: a 304's fields replace the stored ones of the same name (its Age replaces the
        stored one), except those that describe the stored bytes (§3.2)."""
        updated = CIMultiDict(entry.headers)
        updated.popall("Age", None)
        names = {name.lower(): name for name in headers}
        for lower, name in names.items():
            if lower not in NOT_STORED_HEADERS and lower not in KEEP_ON_UPDATE:
                updated.popall(name, None)
                updated.extend((name, value) for value in headers.getall(name))
        if "Age" in headers:
            updated["Age"] = headers["Age"]
        return updated

    async def _revalidated(self, exchange: Exchange, lookup: Lookup, reply: Reply) -> None:
        """A 304 from the upstream: the stored entry is fresh again and answers the client."""
        entry = lookup.entry
        assert entry is not None
        updated = self._updated(entry, reply.headers)
        reply.status = entry.status
        reply.headers = CIMultiDict(updated)
        reply.body = entry.body
        if reply.upstream is not None:
            reply.upstream.release()
        reply.upstream = None
        await self._store(lookup.key, lookup.url, exchange.request.headers, Reply(entry.status, reply.headers, entry.body), self.wall(), "GET")
        lookup.status = ["hit", "fwd=stale", "fwd-status=304", "stored"]
        if _not_modified(exchange.request.headers, Entry(entry.status, list(reply.headers.items()), b"", 0, 0, 0, False)):
            reply.status, reply.body = 304, b""

    def _named_uris(self, exchange: Exchange, reply: Reply) -> list[str]:
        """§4.4: the keys of the same-host URIs a write's Location and Content-Location name."""
        keys = []
        host = request_host(exchange.request.headers.get("Host", ""))
        for name in ("Location", "Content-Location"):
            value = reply.headers.get(name)
            if not value:
                continue
            target = urlsplit(urljoin(exchange.path, value))  # relative references too
            if target.netloc and request_host(target.netloc) != host:
                continue  # another origin's URI is not this cache's to invalidate
            try:
                keys.append(self._key(exchange, normalise_path(target.path or "/"), target.query))
            except BadPath:
                continue
        return keys

    async def _invalidate(self, *keys: str) -> None:
        # Variants are found through the Vary index only: without it, none is ever found again.
        await self._delete(*(name for key in keys for name in (key, key + ":vary")))

    def _land(self, lookup: Lookup) -> None:
        flight = lookup.flight
        if flight is not None:
            if self.flights.get(lookup.key) is flight:
                del self.flights[lookup.key]
            if not flight.done():
                flight.set_result(None)
            lookup.flight = None

    def _count(self, result: str) -> None:
        if self.counters:
            self.counters[result].inc()

    def on_response(self, exchange: Exchange, reply: Reply) -> None:
        lookup: Lookup | None = exchange.state.get("cache")
        if lookup is None:
            # A write, or an answer made before the cache (a 401, a 429): the cache did not
            # handle it, and says so (CONFIG.md: every response on a cached route has one).
            reply.headers["Cache-Status"] = f"{CACHE_NAME}; fwd=bypass"
            return
        if "hit" not in lookup.status:
            self._count("bypass" if "fwd=bypass" in lookup.status else "miss")
        reply.headers["Cache-Status"] = "; ".join([CACHE_NAME, *lookup.status])

    async def close(self) -> None:
        for task in list(self.refreshing):
            task.cancel()


@dataclass(frozen=True)
class Purge:
    """What ``POST /cache/purge`` on the admin listener names (CONFIG.md)."""

    kind: Literal["url", "prefix", "tag"]
    value: str  # a normalised path (url, prefix) or a tag
    query: str | None = None  # url: only the entries of this query (else every query)

    @classmethod
    def parse(cls, document: Any, keep_escaped_slashes: bool = False) -> "Purge":
        """{"url": "/p?q"} | {"prefix": "/p"} | {"tag": "t"}; ValueError says what is wrong."""
        if not isinstance(document, dict) or len(document) != 1 or next(iter(document)) not in ("url", "prefix", "tag"):
            raise ValueError('expected a JSON object with one of "url", "prefix" or "tag"')
        ((kind, value),) = document.items()
        if not isinstance(value, str) or not value:
            raise ValueError(f"{kind}: expected a non-empty string")
        if kind == "tag":
            if any(char.isspace() or char == SEP for char in value):
                raise ValueError("tag: a tag has no spaces")
            return cls("tag", value)
        target = urlsplit(value)  # an absolute URL counts by its path and query: entries of every host
        if kind == "prefix" and (target.query or value.endswith("?")):
            raise ValueError("prefix: a path prefix has no query")
        try:
            path = normalise_path(target.path or "/", keep_escaped_slashes)
        except BadPath as exc:
            raise ValueError(f"{kind}: {exc}") from None
        return cls(kind, path, target.query if "?" in value else None)  # type: ignore[arg-type]


def _length(status: int, response: Any) -> int | None:
    """The body's length when known before reading it (a 204 has none to read)."""
    if status == 204:
        return 0
    return response.content_length if response is not None else None


@functools.lru_cache(maxsize=8192)
def _entry_key(route: str, text: str) -> str:
    """The store key of a route's URI, host and keyed headers (the digest of the many hits of
    one URI is worked out once)."""
    digest = hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:32]
    return f"c:{{{route}}}:{digest}"


def _not_modified(request_headers: Any, entry: Entry) -> bool:
    """RFC 9110 §13.1.1/§13.1.3: whether a conditional GET is answered 304 by this entry."""
    if_none_match = request_headers.get("If-None-Match")
    if if_none_match is not None:
        etag = entry.header("ETag")
        if not etag:
            return False
        wanted = {tag.strip().removeprefix("W/") for tag in if_none_match.split(",")}
        return "*" in wanted or etag.removeprefix("W/") in wanted
    since = request_headers.get("If-Modified-Since")
    modified = entry.header("Last-Modified") or entry.header("Date")  # §4.3.2: Date stands in
    if since and modified:
        from email.utils import parsedate_to_datetime

        try:
            return parsedate_to_datetime(modified) <= parsedate_to_datetime(since)
        except (TypeError, ValueError):
            return False
    return False
