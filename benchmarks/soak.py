"""A soak: one gateway with every policy on, at a steady rate for minutes, Redis restarted once.

    python -m benchmarks.soak [--minutes 10] [--rate 300] [--workers 1] [--interval 10]
                              [--redis-down 10] [--connections 64] [--seed 1] [--keep] [--trace-memory]

Everything runs on loopback and is started (and stopped, also on Ctrl-C, SIGTERM or an error)
here: a redis-server on a free port, the upstream of ``python -m benchmarks`` (nginx serving a
1 KB JSON and echoing POST /api/users when installed, else the bundled asyncio server), a JWKS
endpoint for RS256 tokens minted at start, and one ``python -m gateway run`` whose config turns
every policy on across four routes:

    users    POST /api/users   auth (RS256 via JWKS), a per-user limit, sanitize (nh3), validate
    api      GET /api/...      CDN headers, auth, two limits (per user sliding window, per ip
                               token bucket), so high that nothing is denied
    catalog  GET /catalog/...  CDN headers, the response cache on Redis with an in-process LRU
                               of 256 KB (fewer than 200 entries; far fewer than the distinct
                               URLs of a run, so it evicts all along), a per-ip limit
    flood    GET /flood/...    60 per minute per X-Client-Id: one client is over it (429s)

with helmet's headers and CORS on every route (``defaults``), metrics on the admin listener and
the JSON access log in the gateway's log file. The auth memory holds 1,000 verified tokens and
3,000 users take turns, so it evicts too; clients come from 2,000 addresses (X-Forwarded-For
from a trusted 127.0.0.1), so the limits keep many keys.

Traffic is open loop: requests leave at a fixed rate whatever the answers take (aiohttp, up to
``--connections`` keep-alive connections, 2% of requests with ``Connection: close``), in a fixed
mix: GETs of the api route over many paths and queries; tokens that fail (garbage, a tampered
signature, an unknown kid, none) → 401; catalog GETs and HEADs, half over 100 hot URLs and half
over 100,000; POSTs of 4 KB JSON (9 clean : 1 with markup; some invalid → 422, some malformed →
400); junk paths → 404 (the ``(unmatched)`` route label), dot-segment tricks → 404 or 400, wrong
methods → 405; the flood route; CORS preflights (allowed → 204, a foreign origin → 403).

Redis is stopped once before the middle (SIGTERM; ``--redis-down`` seconds, restarted empty on
the same port), at max(25%, the half-way mark less the outage and 25 s), so that in runs of
three minutes or more it is back, and the breaker closed, before the half-way mark. Every
``--interval`` seconds a sample: the resident memory (VmRSS) and open descriptors of every
gateway process, its TCP connections by peer, the window's requests, statuses, p50/p99
(from send to the last body byte), the gateway's CPU and what other processes took of its core
(the machine may be shared: that tells a slow gateway from a crowded core), the rate-limit
decisions made without Redis, the size and series of the /metrics exposition, /readyz's Redis
check and Redis's key count. After the load the client closes its connections and the gateway
idles 35 s (the upstream pool closes connections idle for 15 s, looking every 15 s) before a
last sample (repeated every 5 s for up to a minute while the descriptors are not back: a
backlog may still be draining). Decisions made without Redis while it was up, and breaker
openings then, are listed as findings.

The verdict (exit 1 when any part fails):

- memory flat: the gateway's RSS at the end of the load (median of the last 3 samples) is at
  most max(5 MB, 5%) above the RSS at the half-way mark (median of the 3 samples around it). By
  then every bounded structure is full (the cache LRU fills in seconds, the token memory within
  the first minute at 300 req/s) and Redis is back. What still moves is the allocator: pymalloc
  arenas and glibc's heap go up and down by a few MB between samples. 5 MB over the second half
  of a 10-minute run at 300 req/s (90,000 requests) is 58 bytes per request: a leak of one small
  object per request shows, noise does not. The slope over the second half is reported too.
- descriptors back: 35 s after the load, no client connection is left, no socket sits in
  CLOSE_WAIT, the upstream pool has closed its idle connections, Redis's pool holds at most
  ``redis.pool_size`` (redis-py keeps idle connections open), and the descriptors that are not
  connections (listeners, files, pipes, event fds) are the baseline's ± 3.
- no 5xx and no failed request, anywhere, the Redis outage included: with ``on_failure:
  memory`` limits fall back to the process and the cache to its local copy or the upstream.
  Every 5xx is listed with its route, time and body; those in the outage window (from the stop
  until 25 s after the start, the breaker's longest cooldown included) are counted apart.
- bounded metrics: route labels are route names or ``(unmatched)``, and at most 5 label sets
  appear in the second half.

``--trace-memory`` runs the gateway under tracemalloc (a request costs several times the CPU, so
the rate defaults to 50/s; the RSS carries the tracer's tables, so the memory verdict judges the
traced Python heap instead). At the half-way mark and at the end of the load each
gateway process writes a snapshot, its gc object counts and the length of every dict, list and
set held by an object of the gateway's own classes (the token memory, the cache LRU, the denial
tables, the memory stores); the report lists what grew between the two. Every run goes to
benchmarks/results/soak-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import signal
import statistics
import string
import subprocess
import sys
import tempfile
import time
from array import array
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from benchmarks import profiles as P
from benchmarks.common import (
    NGINX,
    ROOT,
    Processes,
    core_times,
    cpu_plan,
    elapsed,
    free_port,
    interrupt,
    memory,
    new_report,
    process_tree,
    save_report,
    say,
    tear_down,
    tree_cpu_seconds,
    version,
    wait_for_port,
)

INTERVAL = 10.0  # seconds between samples
REDIS_DOWN = 10.0  # seconds Redis stays stopped
RECOVERY_ALLOWANCE = 25.0  # after Redis starts again: the breaker's longest cooldown (15 s) and slack
IDLE_AFTER = 35.0  # after the load: twice the upstream pool's keepalive_timeout (aiohttp looks for idle connections every 15 s) and slack
REDIS_OWN_CONNECTIONS = 2  # besides the pool: the cache's pub/sub listener, and one being replaced
MEMORY_FLOOR_MB = 5.0
MEMORY_SHARE = 0.05
FD_SLACK = 3
LABEL_SET_SLACK = 5
USERS = 3000  # distinct tokens, three times the auth memory
AUTH_CACHE = 1000
CACHE_LOCAL = "256kb"
CACHE_TTL = "2m"
HOT_URLS = 100
COLD_URLS = 100_000
CLIENT_ADDRESSES = 2000
FLOOD_LIMIT = 60  # per minute and X-Client-Id
HIGH = 100_000
REDIS_TIMEOUT = "250ms"
REDIS_POOL = 50
MAX_IN_FLIGHT = 1024  # requests the client keeps open at once; beyond, a due request is skipped and counted
REQUEST_TIMEOUT = 10.0
CLOSE_SHARE = 0.02  # requests sent with Connection: close
ORIGIN = "https://shop.example"
FOREIGN_ORIGIN = "https://evil.example"
MAX_MINUTES = 50.0  # the minted tokens live one hour
EXAMPLES = 50  # 5xx and unexpected answers kept with their details
TRACE_ENV = "SOAK_TRACE_DIR"
TRACE_FRAMES = 3  # frames per traced allocation: enough to name the caller; each one costs CPU
TRACE_RATE = 50.0  # the default rate under tracemalloc, which makes a request several times dearer
SETTLE = 60.0  # when the descriptors are not back after IDLE_AFTER, how much longer to look (a backlog may still drain)
# The mix, in percent of requests.
MIX = (("api", 30), ("bad_token", 6), ("catalog", 25), ("post", 15), ("junk", 10), ("flood", 6), ("preflight", 5), ("wrong_method", 3))
ROUTE_OF = {"api": "api", "bad_token": "api", "preflight": "api", "catalog": "catalog", "wrong_method": "catalog", "post": "users", "junk": "(unmatched)", "flood": "flood"}
JUNK_WORDS = ("wp-admin", ".env", "phpmyadmin", "static", "images", "v2", "admin", "login", "xmlrpc.php", "cgi-bin", "catalogue", "api-v2", "floods")
TCP_STATES = {"01": "ESTABLISHED", "02": "SYN_SENT", "03": "SYN_RECV", "04": "FIN_WAIT1", "05": "FIN_WAIT2", "06": "TIME_WAIT", "07": "CLOSE", "08": "CLOSE_WAIT", "09": "LAST_ACK", "0A": "LISTEN", "0B": "CLOSING"}


# ---------------------------------------------------------------------------------------------
# The gateway's config
# ---------------------------------------------------------------------------------------------


def gateway_config(port: int, admin_port: int, upstream_port: int, redis_port: int, jwks_url: str, workers: int) -> dict[str, Any]:
    cdn = {"cache_control": "public, max-age=60", "cdn_cache_control": "public, max-age=600", "surrogate_key": ["items"], "vary": ["Accept-Encoding"]}
    return {
        "listen": {"host": "127.0.0.1", "port": port, "trusted_proxies": ["127.0.0.1/32"], "limits": {"drain_timeout": "2s"}},
        "workers": workers,
        "admin": {"host": "127.0.0.1", "port": admin_port},
        "redis": {"url": f"redis://127.0.0.1:{redis_port}/0", "timeout": REDIS_TIMEOUT, "pool_size": REDIS_POOL, "on_failure": "memory"},
        "upstreams": {"origin": {"targets": [f"http://127.0.0.1:{upstream_port}"]}},
        "auth": {
            "jwt": {
                "issuer": P.ISSUER, "algorithms": ["RS256"], "jwks_url": jwks_url, "audience": P.AUDIENCE,
                "required_claims": ["exp", "sub"], "roles_claim": "roles", "scopes_claim": "scope",
                "forward_claims": {"sub": "X-User-Id"},
            },
            "cache_size": AUTH_CACHE,
        },
        "defaults": {
            "security_headers": {"preset": "helmet"},
            "cors": {"origins": [ORIGIN, "https://*.shop.example"], "headers": ["Authorization", "Content-Type"], "expose_headers": ["RateLimit"], "max_age": "10m"},
        },
        "routes": [
            {
                "name": "users", "match": {"path": "/api/users", "methods": ["POST"]}, "upstream": "origin",
                "auth": {"required": True, "roles": ["user"]},
                "rate_limit": [{"key": "user", "limit": HIGH, "window": "1m", "algorithm": "sliding_window"}],
                "sanitize": {"mode": "strip", "engine": "nh3"},
                "validate": {"max_body": "1mb", "content_types": ["application/json"], "fields": P.validate_fields()},
            },
            {
                "name": "api", "match": {"path": "/api", "methods": ["GET"]}, "upstream": "origin",
                "cdn": cdn,
                "auth": {"required": True, "roles": ["user"], "scopes": ["profile:read"]},
                "rate_limit": [
                    {"key": "user", "limit": HIGH, "window": "1m", "algorithm": "sliding_window"},
                    {"key": "ip", "limit": HIGH, "window": "1s", "algorithm": "token_bucket", "burst": HIGH},
                ],
            },
            {
                "name": "catalog", "match": {"path": "/catalog", "methods": ["GET"]}, "upstream": "origin",
                "cdn": cdn,
                "cache": {"ttl": CACHE_TTL, "local_size": CACHE_LOCAL},
                "rate_limit": [{"key": "ip", "limit": HIGH, "window": "1m"}],
            },
            {
                "name": "flood", "match": {"path": "/flood", "methods": ["GET"]}, "upstream": "origin",
                "rate_limit": [{"key": "header:X-Client-Id", "limit": FLOOD_LIMIT, "window": "1m"}],
            },
        ],
        "logging": {"level": "info", "format": "json", "access_log": True},
    }


# ---------------------------------------------------------------------------------------------
# Traffic
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Planned:
    kind: str
    method: str
    target: str  # path and query, sent as written (no client-side normalisation)
    headers: dict[str, str]
    body: bytes | None
    expected: frozenset[int]


class Traffic:
    """The mix, drawn from a seeded generator: one :class:`Planned` request per call."""

    def __init__(self, rng: random.Random, tokens: list[str], foreign_tokens: list[str], rate: float) -> None:
        self.rng = rng
        self.tokens = tokens
        self.foreign_tokens = foreign_tokens
        bodies, rotation = P.post_bodies()
        clean = json.loads(bodies["clean"])
        clean["seller"]["email"] = "not-an-email"
        self.bodies = {"clean": bodies["clean"], "markup": bodies["markup"], "invalid": json.dumps(clean).encode(), "malformed": bodies["clean"][: len(bodies["clean"]) // 2]}
        self.rotation = rotation
        self.kinds = [kind for kind, _ in MIX]
        self.weights = [weight for _, weight in MIX]
        self.addresses = [f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}" for _ in range(CLIENT_ADDRESSES)]
        # Clients under the flood limit: each at most half of it (the flood kind is 6% of the
        # rate, half of it from these clients).
        per_minute = rate * 0.03 * 60
        self.flood_clients = max(20, math.ceil(per_minute / (FLOOD_LIMIT / 2)))
        self.users_seen: set[int] = set()
        self.catalog_seen: set[int] = set()

    def _common(self) -> dict[str, str]:
        headers = {"X-Forwarded-For": self.rng.choice(self.addresses), "Accept": "application/json"}
        if self.rng.random() < CLOSE_SHARE:
            headers["Connection"] = "close"
        return headers

    def _token(self) -> str:
        user = self.rng.randrange(len(self.tokens))
        self.users_seen.add(user)
        return self.tokens[user]

    def _api_target(self) -> str:
        rng = self.rng
        path = rng.choice(("/api/items/{n}", "/api/items/{n}/reviews", "/api/artisans/{n}", "/api/orders/{n}")).format(n=rng.randrange(50_000))
        if rng.random() < 0.5:
            path += f"?page={rng.randrange(20)}&sort={rng.choice(('price', 'new', 'rating'))}"
        return path

    def next(self) -> Planned:
        rng = self.rng
        kind = rng.choices(self.kinds, self.weights)[0]
        headers = self._common()
        if kind == "api":
            headers["Authorization"] = f"Bearer {self._token()}"
            if rng.random() < 0.3:
                headers["Origin"] = ORIGIN
            return Planned(kind, "GET", self._api_target(), headers, None, frozenset({200}))
        if kind == "bad_token":
            shape = rng.randrange(4)
            if shape == 0:
                headers["Authorization"] = "Bearer " + "".join(rng.choices(string.ascii_letters + string.digits + ".-_", k=rng.randrange(20, 300)))
            elif shape == 1:
                token = self.tokens[rng.randrange(len(self.tokens))]
                headers["Authorization"] = "Bearer " + token[:-8] + "".join(rng.choices(string.ascii_letters + string.digits, k=8))
            elif shape == 2:
                headers["Authorization"] = f"Bearer {rng.choice(self.foreign_tokens)}"
            return Planned(kind, "GET", self._api_target(), headers, None, frozenset({401}))
        if kind == "catalog":
            n = rng.randrange(HOT_URLS) if rng.random() < 0.5 else HOT_URLS + rng.randrange(COLD_URLS)
            self.catalog_seen.add(n)
            target = f"/catalog/items/{n}" + (f"?lang={rng.choice(('en', 'de', 'fr'))}" if n % 3 == 0 else "")
            return Planned(kind, "HEAD" if rng.random() < 0.1 else "GET", target, headers, None, frozenset({200}))
        if kind == "post":
            headers["Authorization"] = f"Bearer {self._token()}"
            headers["Content-Type"] = "application/json"
            roll = rng.random()
            if roll < 0.05:
                return Planned(kind, "POST", "/api/users", headers, self.bodies["invalid"], frozenset({422}))
            if roll < 0.07:
                return Planned(kind, "POST", "/api/users", headers, self.bodies["malformed"], frozenset({400}))
            return Planned(kind, "POST", "/api/users", headers, self.bodies[rng.choice(self.rotation)], frozenset({200}))
        if kind == "junk":
            word, tail = rng.choice(JUNK_WORDS), f"{rng.getrandbits(40):010x}"
            shape = rng.randrange(10)
            if shape < 6:
                return Planned(kind, "GET", f"/{word}/{tail}", headers, None, frozenset({404}))
            if shape < 8:
                return Planned(kind, "GET", f"/api/../{word}/{tail}", headers, None, frozenset({404}))
            if shape < 9:
                return Planned(kind, "GET", f"/%2e%2e/{word}/{tail}", headers, None, frozenset({404}))
            return Planned(kind, "GET", f"/static/..;/{tail}", headers, None, frozenset({400}))
        if kind == "flood":
            if rng.random() < 0.5:
                headers["X-Client-Id"] = "flooder"
                return Planned(kind, "GET", f"/flood/{rng.randrange(1000)}", headers, None, frozenset({200, 429}))
            headers["X-Client-Id"] = f"client-{rng.randrange(self.flood_clients)}"
            return Planned(kind, "GET", f"/flood/{rng.randrange(1000)}", headers, None, frozenset({200}))
        if kind == "preflight":
            foreign = rng.random() < 0.2
            headers.update({"Origin": FOREIGN_ORIGIN if foreign else ORIGIN, "Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": "authorization"})
            return Planned(kind, "OPTIONS", self._api_target(), headers, None, frozenset({403} if foreign else {204}))
        method = rng.choice(("DELETE", "PUT", "PATCH"))
        return Planned("wrong_method", method, f"/catalog/items/{rng.randrange(HOT_URLS)}", headers, None, frozenset({405}))


def foreign_tokens(count: int = 20) -> list[str]:
    """Tokens for the right issuer and audience, signed by a key the JWKS does not hold (unknown kid)."""
    import jwt
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = int(time.time())
    claims = {"iss": P.ISSUER, "aud": P.AUDIENCE, "iat": now, "exp": now + 3600, "roles": ["user"], "scope": "profile:read"}
    return [jwt.encode({**claims, "sub": f"intruder-{i}"}, key, algorithm="RS256", headers={"kid": f"rotated-{i % 4}"}) for i in range(count)]


# ---------------------------------------------------------------------------------------------
# What the client saw
# ---------------------------------------------------------------------------------------------


@dataclass
class Window:
    requests: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    failed: int = 0  # 5xx and requests without an answer
    late: int = 0  # requests sent over 50 ms after their due time (the client fell behind)
    skipped: int = 0  # due requests not sent: MAX_IN_FLIGHT were open


class Tally:
    def __init__(self) -> None:
        self.window = Window()
        self.statuses: Counter[str] = Counter()
        self.by_kind: dict[str, Counter[str]] = {kind: Counter() for kind, _ in MIX}
        self.latencies = array("f")
        self.failures: list[dict[str, Any]] = []
        self.failure_counts: Counter[str] = Counter()  # "route kind status" → n
        self.unexpected: Counter[str] = Counter()
        self.unexpected_examples: list[dict[str, Any]] = []
        self.cache_status: Counter[str] = Counter()
        self.sent = 0
        self.skipped = 0
        self.late = 0

    def take_window(self) -> Window:
        window, self.window = self.window, Window()
        return window

    def record(self, planned: Planned, status: int | None, error: str | None, seconds: float, when: float, cache_status: str | None, body: bytes) -> None:
        label = str(status) if status is not None else f"error:{error}"
        self.window.requests += 1
        self.window.statuses[label] += 1
        self.statuses[label] += 1
        self.by_kind[planned.kind][label] += 1
        if status is not None:
            self.window.latencies.append(seconds)
            self.latencies.append(seconds)
        if cache_status is not None:
            self.cache_status["hit" if "; hit" in cache_status else next((part.strip() for part in cache_status.split(";") if part.strip().startswith("fwd=")), "other")] += 1
        route = ROUTE_OF[planned.kind]
        if status is None or status >= 500:
            self.window.failed += 1
            self.failure_counts[f"{route} {planned.kind} {label}"] += 1
            if len(self.failures) < EXAMPLES:
                self.failures.append({
                    "t": round(when, 3), "route": route, "kind": planned.kind, "method": planned.method, "target": planned.target,
                    "status": status, "error": error, "body": body[:300].decode("utf-8", "replace"),
                })
        elif status not in planned.expected:
            self.unexpected[f"{route} {planned.kind} {planned.method} {status}"] += 1
            if len(self.unexpected_examples) < EXAMPLES:
                self.unexpected_examples.append({"t": round(when, 3), "kind": planned.kind, "method": planned.method, "target": planned.target, "status": status, "expected": sorted(planned.expected), "body": body[:300].decode("utf-8", "replace")})


def percentile(values: list[float] | array, p: float) -> float | None:
    if not len(values):
        return None
    ordered = sorted(values)
    return ordered[min(int(len(ordered) * p / 100), len(ordered) - 1)]


async def send(session: Any, base: str, planned: Planned, tally: Tally, load_started: float) -> None:
    import aiohttp
    from yarl import URL

    sent = time.monotonic()
    status = error = cache_status = None
    body = b""
    try:
        async with session.request(planned.method, URL(base + planned.target, encoded=True), headers=planned.headers, data=planned.body, allow_redirects=False) as response:
            body = await response.read()
            status = response.status
            cache_status = response.headers.get("Cache-Status") if planned.kind == "catalog" else None
    except TimeoutError:
        error = "timeout"
    except aiohttp.ClientError as exc:
        error = type(exc).__name__
    tally.record(planned, status, error, time.monotonic() - sent, sent - load_started, cache_status, body)


async def open_loop(session: Any, base: str, traffic: Traffic, tally: Tally, rate: float, seconds: float, load_started: float) -> None:
    """Sends ``rate`` requests per second for ``seconds``, each at its due time, whatever the
    answers take (up to MAX_IN_FLIGHT open at once); waits for the last ones to finish."""
    in_flight: set[asyncio.Task[None]] = set()
    n = 0
    total = int(rate * seconds)
    try:
        while n < total:
            now = time.monotonic()
            due = load_started + n / rate
            if due > now:
                await asyncio.sleep(due - now)
                continue
            while n < total and load_started + n / rate <= now:
                if now - (load_started + n / rate) > 0.05:
                    tally.window.late += 1
                    tally.late += 1
                if len(in_flight) >= MAX_IN_FLIGHT:
                    tally.window.skipped += 1
                    tally.skipped += 1
                else:
                    task = asyncio.create_task(send(session, base, traffic.next(), tally, load_started))
                    in_flight.add(task)
                    task.add_done_callback(in_flight.discard)
                    tally.sent += 1
                n += 1
        if in_flight:
            await asyncio.wait(in_flight, timeout=REQUEST_TIMEOUT + 5)
    finally:
        for task in in_flight:  # cancelled (Ctrl-C, SIGTERM, a failed sample), or overdue
            task.cancel()
        await asyncio.gather(*in_flight, return_exceptions=True)


# ---------------------------------------------------------------------------------------------
# What the gateway holds: memory, descriptors, connections
# ---------------------------------------------------------------------------------------------


def other_sockets() -> dict[str, str]:
    """Socket inode → "unix" or "udp", from /proc/net."""
    found = {}
    for name, kind, column in (("/proc/net/unix", "unix", 6), ("/proc/net/udp", "udp", 9), ("/proc/net/udp6", "udp", 9)):
        try:
            lines = Path(name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > column:
                found[fields[column]] = kind
    return found


def tcp_table() -> dict[str, tuple[int, int, str]]:
    """Socket inode → (local port, remote port, state), for IPv4 and IPv6 TCP sockets."""
    table = {}
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10:
                continue
            local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
            table[inode] = (int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16), TCP_STATES.get(state, state))
    return table


def descriptors(pids: list[int], ports: dict[str, int]) -> dict[str, Any]:
    """Open descriptors of ``pids`` by kind: sockets by peer (clients, admin, redis, upstream,
    jwks, listening, other), unix and udp sockets, other descriptors (files, pipes, event fds);
    CLOSE_WAIT sockets. A socket in none of /proc/net's tables is a TCP socket the kernel has
    closed (a reset, or both sides done) that the process still holds: "closed, still open"."""
    table = tcp_table()
    others = other_sockets()
    kinds: Counter[str] = Counter()
    close_wait = 0
    total = 0
    for pid in pids:
        try:
            names = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for name in names:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{name}")
            except OSError:
                continue
            total += 1
            if not link.startswith("socket:["):
                kinds["files"] += 1
                continue
            inode = link[8:-1]
            entry = table.get(inode)
            if entry is None:
                kinds[others.get(inode, "closed, still open")] += 1
                continue
            local, remote, state = entry
            close_wait += state == "CLOSE_WAIT"
            if state == "LISTEN":
                kinds["listening"] += 1
            elif local == ports["gateway"]:
                kinds["clients"] += 1
            elif local == ports["admin"]:
                kinds["admin"] += 1
            elif remote == ports["redis"]:
                kinds["redis"] += 1
            elif remote == ports["upstream"]:
                kinds["upstream"] += 1
            elif remote == ports["jwks"]:
                kinds["jwks"] += 1
            else:
                kinds["other tcp"] += 1
    pooled = kinds["redis"] + kinds["upstream"] + kinds["jwks"]
    return {
        "total": total, "kinds": dict(sorted(kinds.items())), "close_wait": close_wait,
        "not_pooled": total - pooled - kinds["clients"] - kinds["admin"], "closed_still_open": kinds["closed, still open"],
    }


def process_stats(pid: int, ports: dict[str, int]) -> dict[str, Any]:
    pids = process_tree(pid)
    mem = memory(pid)
    per_process = {}
    for each in pids:
        try:
            status = Path(f"/proc/{each}/status").read_text()
        except OSError:
            continue
        rss = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
        per_process[str(each)] = round(rss / 1024, 1)
    return {
        "rss_mb": round(mem["rss_bytes"] / 2**20, 2), "peak_rss_mb": round(mem["peak_rss_bytes"] / 2**20, 2), "processes": mem["processes"],
        "rss_mb_per_process": per_process, "fds": descriptors(pids, ports), "cpu_s": tree_cpu_seconds(pid),
    }


def redis_info(client: Any) -> dict[str, Any]:
    try:
        info = client.info("memory")
        return {"up": True, "keys": client.dbsize(), "used_memory_mb": round(info["used_memory"] / 2**20, 2)}
    except Exception as exc:  # noqa: BLE001 - down during the outage: any error is "down"
        return {"up": False, "error": type(exc).__name__}


def series_of(exposition: str) -> list[str]:
    return [line.rsplit(" ", 1)[0] for line in exposition.splitlines() if line and not line.startswith("#")]


def counter_sum(exposition: str, name: str) -> float:
    """The sum of a counter over its label sets."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in exposition.splitlines() if line.startswith((name + "{", name + " ")))


def label_sets(series: list[str]) -> set[str]:
    """One entry per metric and label set: histogram buckets, _sum, _count and _created folded."""
    out = set()
    for one in series:
        name, _, labels = one.partition("{")
        for suffix in ("_bucket", "_sum", "_count", "_created", "_total"):
            if name.endswith(suffix):
                name = name[: -len(suffix)]
                break
        kept = ",".join(part for part in labels.rstrip("}").split(",") if part and not part.startswith("le="))
        out.add(f"{name}{{{kept}}}")
    return out


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


@dataclass
class Setup:
    processes: Processes
    scratch: Path
    gateway: subprocess.Popen[bytes]
    redis: subprocess.Popen[bytes]
    redis_command: list[str]
    load_cores: list[int] | None
    gateway_cores: list[int] | None
    ports: dict[str, int]
    tokens: list[str]
    foreign: list[str]
    trace_dir: Path | None


def start(args: argparse.Namespace, scratch: Path, processes: Processes, report: dict[str, Any]) -> Setup:
    load_cores, server_cores = cpu_plan()
    report["environment"].update(load_cores=load_cores, gateway_cores=server_cores)
    ports = {"redis": free_port()}
    redis_command = ["redis-server", "--port", str(ports["redis"]), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(scratch)]
    redis_server = processes.start("redis", redis_command, load_cores)
    wait_for_port(ports["redis"], redis_server, processes, "redis")

    upstream, ports["upstream"], _ = P.start_upstream(processes, scratch, load_cores, report)

    say(f"minting {USERS} RS256 tokens…")
    jwks, tokens = P.mint(USERS)
    foreign = foreign_tokens()
    jwks_file = scratch / "jwks.json"
    jwks_file.write_text(json.dumps(jwks))
    ports["jwks"] = free_port()
    jwks_server = processes.start("jwks", [sys.executable, "-m", "benchmarks.profiles", "jwks", str(ports["jwks"]), str(jwks_file)], load_cores, cwd=ROOT)
    wait_for_port(ports["jwks"], jwks_server, processes, "jwks")

    ports["gateway"], ports["admin"] = free_port(), free_port()
    config = gateway_config(ports["gateway"], ports["admin"], ports["upstream"], ports["redis"], f"http://127.0.0.1:{ports['jwks']}/jwks.json", args.workers)
    config_path = scratch / "gateway.yaml"
    config_path.write_text(json.dumps(config, indent=2))  # JSON is YAML
    report["config"] = config
    env = dict(os.environ)
    trace_dir = None
    if args.trace_memory:
        trace_dir = scratch / "trace"
        trace_dir.mkdir()
        env[TRACE_ENV] = str(trace_dir)
        command = [sys.executable, "-m", "benchmarks.soak", "gateway", "-c", str(config_path)]
    else:
        command = [sys.executable, "-m", "gateway", "run", "-c", str(config_path)]
    gateway = processes.start("gateway", command, server_cores, cwd=ROOT, env=env)
    wait_for_port(ports["gateway"], gateway, processes, "gateway", timeout=30)
    wait_for_port(ports["admin"], gateway, processes, "gateway", timeout=30)
    say(f"redis :{ports['redis']}, upstream ({report['environment']['upstream']}) :{ports['upstream']}, jwks :{ports['jwks']}, "
        f"gateway :{ports['gateway']} (admin :{ports['admin']}, {args.workers} worker(s){', tracemalloc' if trace_dir else ''}); "
        f"cores: gateway {server_cores or 'any'}, the rest {load_cores or 'any'}")
    return Setup(processes, scratch, gateway, redis_server, redis_command, load_cores, server_cores, ports, tokens, foreign, trace_dir)


async def check(session: Any, base: str, setup: Setup) -> dict[str, Any]:
    """One request of every kind before the load, with what it must get; a RuntimeError otherwise."""
    from yarl import URL

    traffic = Traffic(random.Random(0), setup.tokens, setup.foreign, 1.0)
    seen: dict[str, Any] = {}
    for kind, _ in MIX:
        for _ in range(200):  # draw until the kind comes up
            planned = traffic.next()
            if planned.kind == kind:
                break
        headers = {k: v for k, v in planned.headers.items() if k != "Connection"}
        async with session.request(planned.method, URL(base + planned.target, encoded=True), headers=headers, data=planned.body) as response:
            body = await response.read()
            seen[kind] = {"method": planned.method, "target": planned.target, "status": response.status, "headers": dict(response.headers)}
            if response.status not in planned.expected:
                raise RuntimeError(f"check {kind}: {planned.method} {planned.target} answered {response.status}, expected {sorted(planned.expected)}: {body[:400]!r}")
            if kind == "api":
                for name in ("Content-Security-Policy", "Cache-Control", "RateLimit", "X-Request-ID"):
                    if name not in response.headers:
                        raise RuntimeError(f"check api: no {name} header in {dict(response.headers)}")
            if kind == "catalog" and "Cache-Status" not in response.headers:
                raise RuntimeError(f"check catalog: no Cache-Status header in {dict(response.headers)}")
    return seen


async def scrape(session: Any, admin: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    try:
        async with session.get(f"{admin}/metrics") as response:
            text = await response.text()
        series = series_of(text)
        out.update(metrics_bytes=len(text.encode()), series=len(series), _label_sets=label_sets(series), _fallbacks=counter_sum(text, "store_fallback_decisions_total"))
    except Exception as exc:  # noqa: BLE001 - a failed scrape is a finding, not the end of the run
        out.update(metrics_error=type(exc).__name__)
    try:
        async with session.get(f"{admin}/readyz") as response:
            ready = await response.json()
        out["ready"] = ready.get("status")
        out["redis_check"] = {k: v for k, v in ready.get("checks", {}).get("redis", {}).items() if k in ("status", "circuit")}
    except Exception as exc:  # noqa: BLE001
        out["ready"] = f"error:{type(exc).__name__}"
    return out


def ask_trace(setup: Setup, label: str, timeout: float = 90.0) -> None:
    """Asks every gateway process for a tracemalloc snapshot and its tables; waits for them."""
    assert setup.trace_dir is not None
    want = setup.trace_dir / f"want-{label}"
    want.write_text("")
    pids = [pid for pid in process_tree(setup.gateway.pid)]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all((setup.trace_dir / f"{label}-{pid}.json").exists() for pid in pids):
            break
        time.sleep(0.5)
    want.unlink(missing_ok=True)


async def drive(args: argparse.Namespace, setup: Setup, report: dict[str, Any]) -> None:
    import aiohttp
    import redis

    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    assert main_task is not None
    loop.add_signal_handler(signal.SIGTERM, main_task.cancel)
    ports = setup.ports
    base = f"http://127.0.0.1:{ports['gateway']}"
    admin = f"http://127.0.0.1:{ports['admin']}"
    redis_client = redis.Redis(port=ports["redis"], socket_timeout=1, socket_connect_timeout=1)
    seconds = args.minutes * 60
    stop_at = max(0.25 * seconds, 0.5 * seconds - args.redis_down - RECOVERY_ALLOWANCE)
    outage: dict[str, Any] = {"planned_stop_s": round(stop_at, 1), "down_s": args.redis_down}
    report["outage"] = outage
    samples: list[dict[str, Any]] = report["samples"]
    tally = Tally()
    traffic = Traffic(random.Random(args.seed), setup.tokens, setup.foreign, args.rate)
    label_sets_at: dict[str, set[str]] = {}

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as side:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as checker:
            report["checks"] = await check(checker, base, setup)
        say("checks passed: every kind of request got what it should")
        await asyncio.sleep(1.0)

        previous: dict[str, Any] = {}

        async def sample(phase: str, t: float, window: Window | None, cpu_before: float | None, span: float) -> dict[str, Any]:
            stats = await asyncio.to_thread(process_stats, setup.gateway.pid, ports)
            core = core_times(setup.gateway_cores)
            scraped = await scrape(side, admin)
            row: dict[str, Any] = {
                "phase": phase, "t": round(t, 1), **stats, **{k: v for k, v in scraped.items() if not k.startswith("_")},
                "redis": await asyncio.to_thread(redis_info, redis_client),
                "loadavg": Path("/proc/loadavg").read_text().split()[0],
            }
            if "_label_sets" in scraped:
                row["label_sets"] = len(scraped["_label_sets"])
                label_sets_at["last"] = scraped["_label_sets"]
            if cpu_before is not None and span > 0:
                row["gateway_cpu"] = round((stats["cpu_s"] - cpu_before) / span, 3)
                if "core" in previous:
                    # What else ran on the gateway's core(s): anything but the gateway and softirq
                    # (loopback networking); the machine is shared, so this tells noise apart.
                    cores = len(setup.gateway_cores) if setup.gateway_cores else os.cpu_count() or 1
                    busy = core["busy"] - previous["core"]["busy"] - (core["softirq"] - previous["core"]["softirq"])
                    row["others_on_gateway_core"] = round(max(busy - (stats["cpu_s"] - cpu_before), 0.0) / span / cores, 3)
            if "_fallbacks" in scraped:
                row["fallbacks_total"] = scraped["_fallbacks"]
                if "fallbacks" in previous:
                    row["fallbacks"] = int(scraped["_fallbacks"] - previous["fallbacks"])
                previous["fallbacks"] = scraped["_fallbacks"]
            previous["core"] = core
            if window is not None:
                lat = window.latencies
                row.update(
                    requests=window.requests, rps=round(window.requests / span, 1) if span else None, statuses=dict(sorted(window.statuses.items())),
                    failed=window.failed, late=window.late, skipped=window.skipped,
                    p50_ms=round(percentile(lat, 50) * 1000, 2) if lat else None, p99_ms=round(percentile(lat, 99) * 1000, 2) if lat else None,
                    statuses_so_far=dict(sorted(tally.statuses.items())),
                )
            samples.append(row)
            say(line(row))
            return row

        baseline = await sample("baseline", 0.0, None, None, 0.0)
        report["baseline"] = baseline
        if baseline.get("metrics_error"):
            raise RuntimeError(f"the admin listener's /metrics failed: {baseline['metrics_error']}")

        connector = aiohttp.TCPConnector(limit=args.connections, limit_per_host=args.connections, keepalive_timeout=30)
        session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT), skip_auto_headers=("User-Agent",))
        load_started = time.monotonic()
        report["load_started"] = datetime.now().isoformat(timespec="seconds")
        report["load_started_epoch"] = time.time()
        say(f"load: {args.rate:g} req/s for {args.minutes:g} min; Redis stops at {stop_at:.0f}s for {args.redis_down:g}s; a sample every {args.interval:g}s")

        async def sampler() -> None:
            k = 1
            cpu_before = baseline["cpu_s"]
            last = load_started
            while True:
                due = load_started + k * args.interval
                if due > load_started + seconds + 0.5:
                    return
                await asyncio.sleep(max(due - time.monotonic(), 0))
                if setup.gateway.poll() is not None:
                    raise RuntimeError(f"the gateway exited with {setup.gateway.returncode} at {time.monotonic() - load_started:.0f}s:\n{setup.processes.log_text('gateway')[-3000:]}")
                now = time.monotonic()
                row = await sample("load", now - load_started, tally.take_window(), cpu_before, now - last)
                cpu_before, last = row["cpu_s"], now
                if setup.trace_dir is not None and "half" not in label_sets_at and now - load_started >= seconds / 2:
                    await asyncio.to_thread(ask_trace, setup, "half")
                if "half" not in label_sets_at and now - load_started >= seconds / 2 and "last" in label_sets_at:
                    label_sets_at["half"] = label_sets_at["last"]
                k = max(k + 1, math.floor((time.monotonic() - load_started) / args.interval) + 1)  # after a stall, no burst of samples

        async def redis_outage() -> None:
            await asyncio.sleep(max(load_started + stop_at - time.monotonic(), 0))
            outage["stopped_s"] = round(time.monotonic() - load_started, 1)
            say("redis: stopping (SIGTERM)")
            await asyncio.to_thread(setup.processes.stop, setup.redis)
            await asyncio.sleep(args.redis_down)
            say("redis: starting again, empty, on the same port")
            setup.redis = setup.processes.start("redis-restarted", setup.redis_command, setup.load_cores)
            await asyncio.to_thread(wait_for_port, ports["redis"], setup.redis, setup.processes, "redis-restarted")
            outage["started_s"] = round(time.monotonic() - load_started, 1)
            while time.monotonic() - load_started < seconds:
                try:
                    async with side.get(f"{admin}/readyz") as response:
                        ready = await response.json()
                    if ready.get("checks", {}).get("redis", {}).get("status") == "up":
                        outage["recovered_s"] = round(time.monotonic() - load_started, 1)
                        say(f"redis: the gateway uses it again ({outage['recovered_s'] - outage['started_s']:.1f}s after the start)")
                        return
                except Exception as exc:  # noqa: BLE001 - keep asking until the end of the load
                    outage["last_readyz_error"] = type(exc).__name__
                await asyncio.sleep(0.5)

        load = asyncio.create_task(open_loop(session, base, traffic, tally, args.rate, seconds, load_started))
        tasks = [asyncio.create_task(sampler()), asyncio.create_task(redis_outage())]
        try:
            done, _ = await asyncio.wait([load, *tasks], return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                if task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
            await load
            await tasks[0]
        finally:
            for task in (load, *tasks):
                task.cancel()
            await asyncio.gather(load, *tasks, return_exceptions=True)
            await session.close()
        load_seconds = time.monotonic() - load_started
        if setup.trace_dir is not None:
            await asyncio.to_thread(ask_trace, setup, "end")
        label_sets_at["end"] = label_sets_at.get("last", set())
        say(f"load done ({load_seconds:.0f}s); the client closed its connections; idling {IDLE_AFTER:g}s")
        await asyncio.sleep(IDLE_AFTER)
        after = await sample("after", time.monotonic() - load_started, None, None, 0.0)
        settle_until = time.monotonic() + SETTLE
        while fd_problems(baseline["fds"], after["fds"], args.workers) and time.monotonic() < settle_until:
            await asyncio.sleep(5.0)
            after = await sample("after", time.monotonic() - load_started, None, None, 0.0)
        report["after"] = after
    redis_client.close()

    report["client"] = {
        "sent": tally.sent, "skipped": tally.skipped, "late": tally.late, "statuses": dict(sorted(tally.statuses.items())),
        "by_kind": {kind: dict(sorted(c.items())) for kind, c in tally.by_kind.items()},
        "p50_ms": round((percentile(tally.latencies, 50) or 0) * 1000, 2), "p99_ms": round((percentile(tally.latencies, 99) or 0) * 1000, 2),
        "p999_ms": round((percentile(tally.latencies, 99.9) or 0) * 1000, 2), "max_ms": round(max(tally.latencies, default=0) * 1000, 2),
        "failures": tally.failures, "failure_counts": dict(tally.failure_counts), "unexpected": dict(tally.unexpected), "unexpected_examples": tally.unexpected_examples,
        "cache_status": dict(tally.cache_status), "distinct_users": len(traffic.users_seen), "distinct_catalog_urls": len(traffic.catalog_seen),
        "flood_clients": traffic.flood_clients, "load_seconds": round(load_seconds, 1),
    }
    half, end = label_sets_at.get("half", set()), label_sets_at.get("end", set())
    report["metrics_labels"] = {
        "new_in_second_half": sorted(end - half)[:50], "gone_in_second_half": sorted(half - end)[:50],
        "route_values": sorted({part.split('"')[1] for one in end for part in one.split(",") if part.lstrip("{").startswith("route=")}),
    }


def line(row: dict[str, Any]) -> str:
    fds = row["fds"]
    text = f"{row['phase']:<8} t={row['t']:>6.0f}s RSS {row['rss_mb']:6.1f} MB, fds {fds['total']:>4} ({' '.join(f'{k} {v}' for k, v in fds['kinds'].items())})"
    if "rps" in row:
        p50 = "-" if row["p50_ms"] is None else f"{row['p50_ms']:.1f}"
        p99 = "-" if row["p99_ms"] is None else f"{row['p99_ms']:.1f}"
        text += f", {row['rps']:>6.1f} req/s, failed {row['failed']}, p50 {p50} ms, p99 {p99} ms, cpu {row.get('gateway_cpu', 0):.0%} (others on its core {row.get('others_on_gateway_core', 0):.0%})"
        if row.get("fallbacks"):
            text += f", {row['fallbacks']} store fallbacks"
        if row["late"] or row["skipped"]:
            text += f", client late {row['late']} skipped {row['skipped']}"
    redis_state = row.get("redis_check", {})
    text += f", series {row.get('series', '?')}, ready {row.get('ready')} (redis {redis_state.get('status', '?')}/{redis_state.get('circuit', '?')}, keys {row['redis'].get('keys', '-')}), load avg {row['loadavg']}"
    return text


# ---------------------------------------------------------------------------------------------
# The gateway's log, the verdict, the table
# ---------------------------------------------------------------------------------------------


def scan_log(path: Path) -> dict[str, Any]:
    """The gateway's log: access lines counted by route and status (5xx kept), other records
    at warning and above (and circuit/Redis notes) grouped by level and message."""
    access: Counter[str] = Counter()
    five: list[dict[str, Any]] = []
    groups: Counter[str] = Counter()
    circuit: list[dict[str, Any]] = []
    lines = 0
    try:
        handle = path.open(encoding="utf-8", errors="replace")
    except OSError:
        return {}
    with handle:
        for raw in handle:
            lines += 1
            try:
                record = json.loads(raw)
            except ValueError:
                groups[f"? {raw.strip()[:200]}"] += 1
                continue
            if not isinstance(record, dict):
                continue
            if "status" in record and "route" in record and "level" not in record:
                status = record.get("status")
                access[f"{record.get('route') or '(unmatched)'} {status}"] += 1
                if isinstance(status, int) and status >= 500 and len(five) < EXAMPLES:
                    five.append(record)
                continue
            level = str(record.get("level", "?"))
            message = str(record.get("message", ""))
            if message.startswith("circuit breaker") and len(circuit) < 200:
                circuit.append({"time": record.get("time"), "state": record.get("state"), "error": record.get("error")})
            if level in ("warning", "error", "critical") or any(word in message.lower() for word in ("circuit", "redis", "fallback")):
                trace = str(record.get("traceback", "")).strip().splitlines()
                groups[f"{level} {message[:200]}" + (f" ({trace[-1][:200]})" if trace else "")] += 1
    return {"lines": lines, "bytes": path.stat().st_size, "access": dict(sorted(access.items())), "access_5xx": five, "records": dict(groups.most_common(40)), "circuit": circuit}


def outage_findings(report: dict[str, Any]) -> list[str]:
    """Store fallbacks and breaker openings outside the outage window: Redis was up, yet decisions
    were made without it (limits per process, the cache bypassed)."""
    outage = report["outage"]
    if "started_s" not in outage:
        return []
    stop, back = outage["stopped_s"], outage["started_s"] + RECOVERY_ALLOWANCE
    interval = report["args"]["interval"]
    out = []
    # A window (t - interval, t] lies outside when it ends before the stop or starts after the allowance.
    outside = [(row["t"], row["fallbacks"]) for row in report["samples"] if row["phase"] == "load" and row.get("fallbacks") and (row["t"] < stop - 0.5 or row["t"] - interval > back)]
    if outside:
        out.append(
            f"{sum(n for _, n in outside)} rate-limit decisions fell back to the process while Redis was up "
            f"(outside the outage window {stop:.0f}–{back:.0f}s), in the windows ending at " + ", ".join(f"{t:.0f}s ({n})" for t, n in outside)
        )
    epoch = report.get("load_started_epoch")
    opened = []
    for event in report.get("gateway_log", {}).get("circuit", []):
        try:
            t = datetime.fromisoformat(str(event["time"])).timestamp() - epoch
        except (TypeError, ValueError):
            continue
        event["t"] = round(t, 1)
        if event["state"] == "open" and (t < stop or t > outage["started_s"]):
            opened.append(f"{t:.1f}s ({event.get('error')})")
    if opened:
        out.append(f"the Redis breaker opened {len(opened)} time(s) while Redis was running: at " + ", ".join(opened[:10]))
    return out


def fd_problems(base: dict[str, Any], after: dict[str, Any], workers: int) -> list[str]:
    """What keeps the descriptors from being back at the baseline (none: back)."""
    kinds = after["kinds"]
    problems = []
    if kinds.get("clients", 0):
        problems.append(f"{kinds['clients']} client connections still open")
    if after["close_wait"]:
        problems.append(f"{after['close_wait']} sockets in CLOSE_WAIT")
    if after["closed_still_open"]:
        problems.append(f"{after['closed_still_open']} sockets the kernel closed still held")
    if kinds.get("upstream", 0):
        problems.append(f"{kinds['upstream']} upstream connections still pooled")
    if kinds.get("redis", 0) > (REDIS_POOL + REDIS_OWN_CONNECTIONS) * workers:
        problems.append(f"{kinds['redis']} Redis connections, over the pool size {REDIS_POOL} (+{REDIS_OWN_CONNECTIONS}) per worker")
    if abs(after["not_pooled"] - base["not_pooled"]) > FD_SLACK:
        problems.append(f"{after['not_pooled']} descriptors that are not connections, against {base['not_pooled']} at the start")
    return problems


def median_rss(rows: list[dict[str, Any]]) -> float | None:
    return statistics.median(row["rss_mb"] for row in rows) if rows else None


def verdict(report: dict[str, Any]) -> dict[str, Any]:
    load = [row for row in report["samples"] if row["phase"] == "load"]
    seconds = report["args"]["minutes"] * 60
    out: dict[str, Any] = {}

    # Memory: the half-way mark against the end of the load.
    around = sorted(load, key=lambda row: abs(row["t"] - seconds / 2))[:3]
    tail = load[-3:]
    half_rss, end_rss = median_rss(around), median_rss(tail)
    second = [row for row in load if row["t"] >= seconds / 2]
    slope = None
    if len(second) >= 2:
        ts = [row["t"] for row in second]
        mean_t, mean_r = statistics.fmean(ts), statistics.fmean(row["rss_mb"] for row in second)
        var = sum((t - mean_t) ** 2 for t in ts)
        slope = sum((t - mean_t) * (row["rss_mb"] - mean_r) for t, row in zip(ts, second)) / var * 60 if var else None
    if half_rss is not None and end_rss is not None:
        limit = max(MEMORY_FLOOR_MB, MEMORY_SHARE * half_rss)
        growth = end_rss - half_rss
        requests = sum(row["requests"] for row in second)
        before_outage = [row for row in load if row["t"] <= report["outage"].get("stopped_s", 0)]
        out["memory"] = {
            "ok": growth <= limit, "rss_half_mb": round(half_rss, 1), "rss_end_mb": round(end_rss, 1), "growth_mb": round(growth, 2),
            "limit_mb": round(limit, 2), "slope_mb_per_min": None if slope is None else round(slope, 3),
            "bytes_per_request": round(growth * 2**20 / requests, 1) if requests else None,
            "rss_baseline_mb": report["baseline"]["rss_mb"], "rss_max_mb": max(row["rss_mb"] for row in load),
            "rss_before_outage_mb": before_outage[-1]["rss_mb"] if before_outage else None,
            "rss_after_idle_mb": report["after"]["rss_mb"],
        }
    else:
        out["memory"] = {"ok": False, "why": "not enough samples"}
    traced = [grown["traced_mb"] for grown in report.get("trace", {}).values() if "traced_mb" in grown]
    if traced and "growth_mb" in out["memory"]:
        # Under tracemalloc the RSS carries the tracer's own tables and the snapshots taken at the
        # half-way mark: the Python heap the tracer counts is what is judged instead.
        growth = sum(end - half for half, end in traced)
        out["memory"].update(ok=growth <= out["memory"]["limit_mb"], judged="traced Python memory (tracemalloc)", traced_growth_mb=round(growth, 2), rss_ok=out["memory"]["ok"])

    # Descriptors: back to the baseline once the load is over.
    base, after = report["baseline"]["fds"], report["after"]["fds"]
    peak = max((row["fds"]["total"] for row in load), default=0)
    problems = fd_problems(base, after, report["args"]["workers"])
    out["fds"] = {
        "ok": not problems, "problems": problems, "settled_at_s": report["after"]["t"], "baseline": base["total"], "after": after["total"], "peak": peak, "not_pooled_baseline": base["not_pooled"], "not_pooled_after": after["not_pooled"],
        "slack": FD_SLACK, "after_kinds": after["kinds"], "baseline_kinds": base["kinds"], "close_wait_after": after["close_wait"],
    }

    # 5xx and failed requests, with the outage window apart.
    client = report["client"]
    outage = report["outage"]
    window = (outage.get("stopped_s", math.inf), outage.get("started_s", outage.get("stopped_s", math.inf)) + RECOVERY_ALLOWANCE)
    failures = [f for f in client["failures"]]
    failed = sum(client["failure_counts"].values())
    in_outage = sum(1 for f in failures if window[0] <= f["t"] <= window[1])
    logged_5xx = {k: v for k, v in report.get("gateway_log", {}).get("access", {}).items() if k.rsplit(" ", 1)[1].startswith("5")}
    out["errors"] = {
        "ok": failed == 0 and not logged_5xx, "failed": failed, "by_route": client["failure_counts"], "in_outage_window_of_examples": in_outage,
        "outage_window_s": [round(window[0], 1), round(window[1], 1)] if window[0] != math.inf else None, "gateway_logged_5xx": logged_5xx,
    }

    # Metrics cardinality.
    labels = report["metrics_labels"]
    bad_routes = [r for r in labels["route_values"] if r not in {route["name"] for route in report["config"]["routes"]} | {"(unmatched)"}]
    out["metrics"] = {"ok": not bad_routes and len(labels["new_in_second_half"]) <= LABEL_SET_SLACK, "route_values": labels["route_values"], "unexpected_routes": bad_routes,
                      "new_label_sets_in_second_half": len(labels["new_in_second_half"]), "series_end": load[-1].get("series") if load else None,
                      "series_half": around[0].get("series") if around else None}
    out["ok"] = all(part["ok"] for part in out.values() if isinstance(part, dict))
    return out


def fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(report: dict[str, Any]) -> str:
    outage = report["outage"]
    lines = [f"{'time':>6} {'RSS MB':>7} {'fds':>5} {'conns':>5} {'req/s':>7} {'5xx+err':>7} {'p50 ms':>7} {'p99 ms':>7} {'series':>6} {'cpu':>5} {'others':>6} {'fallbk':>6}  redis"]
    for row in report["samples"]:
        fds = row["fds"]
        t = row["t"]
        if row["phase"] == "baseline":
            stamp = "start"
        elif row["phase"] == "after":
            stamp = "idle"
        else:
            stamp = f"{t:.0f}s"
        redis_state = row.get("redis_check", {}).get("status", "?")
        if not row["redis"].get("up"):
            redis_state = "STOPPED"
        lines.append(
            f"{stamp:>6} {row['rss_mb']:>7.1f} {fds['total']:>5} {fds['kinds'].get('clients', 0):>5} {fmt(row.get('rps'), '7.1f'):>7} {fmt(row.get('failed'), 'd'):>7} "
            f"{fmt(row.get('p50_ms'), '7.1f'):>7} {fmt(row.get('p99_ms'), '7.1f'):>7} {fmt(row.get('series'), 'd'):>6} {fmt(row.get('gateway_cpu'), '5.0%'):>5} "
            f"{fmt(row.get('others_on_gateway_core'), '6.0%'):>6} {fmt(row.get('fallbacks'), 'd'):>6}  {redis_state}"
        )
    v = report["verdict"]
    c = report["client"]
    m, f, e, x = v["memory"], v["fds"], v["errors"], v["metrics"]
    lines += [
        "",
        (
            f"requests: {c['sent']:,} sent ({c['skipped']} skipped, {c['late']} late), statuses {' '.join(f'{k}:{n}' for k, n in c['statuses'].items())}; "
            f"p50 {c['p50_ms']} ms, p99 {c['p99_ms']} ms, p99.9 {c['p999_ms']} ms, max {c['max_ms']} ms"
        ),
        f"coverage: {c['distinct_users']} users (auth memory {AUTH_CACHE}), {c['distinct_catalog_urls']} catalog URLs (local LRU {CACHE_LOCAL}), cache {c['cache_status']}",
        (
            f"redis: stopped at {outage.get('stopped_s')}s, started at {outage.get('started_s')}s, used again at {outage.get('recovered_s')}s; "
            "cpu = the gateway's share of a core, others = what other processes used of its core, fallbk = rate-limit decisions made without Redis"
        ),
        "",
        "verdict:",
    ]
    if "traced_growth_mb" in m:
        lines.append(f"  memory  {'PASS' if m['ok'] else 'FAIL'}: traced Python memory {m['traced_growth_mb']:+.2f} MB from the half-way mark to the end (limit {m['limit_mb']} MB); RSS, which also holds the tracer's tables: {m['growth_mb']:+.2f} MB")
    elif "growth_mb" in m:
        lines.append(
            f"  memory  {'PASS' if m['ok'] else 'FAIL'}: RSS {m['rss_half_mb']} MB at the half-way mark → {m['rss_end_mb']} MB at the end "
            f"({m['growth_mb']:+.2f} MB, limit {m['limit_mb']} MB; slope {m['slope_mb_per_min']} MB/min; {m['bytes_per_request']} B/request); "
            f"start {m['rss_baseline_mb']} MB, before the outage {m['rss_before_outage_mb']} MB, max {m['rss_max_mb']} MB, idle after {m['rss_after_idle_mb']} MB"
        )
    else:
        lines.append(f"  memory  FAIL: {m.get('why')}")
    lines.append(
        f"  fds     {'PASS' if f['ok'] else 'FAIL'}: {f['baseline']} at the start, peak {f['peak']}, {f['after']} at {f['settled_at_s']:.0f}s, after the load and {IDLE_AFTER:g}s+ idle "
        f"(not connections {f['not_pooled_baseline']} → {f['not_pooled_after']}, ±{f['slack']}; CLOSE_WAIT {f['close_wait_after']}; after: {f['after_kinds']})"
        + (f"; {'; '.join(f['problems'])}" if f["problems"] else "")
    )
    lines.append(
        f"  errors  {'PASS' if e['ok'] else 'FAIL'}: {e['failed']} 5xx or failed requests"
        + (f" ({e['by_route']}; {e['in_outage_window_of_examples']} of the listed ones in the outage window {e['outage_window_s']} s)" if e["failed"] else "")
        + (f"; the gateway's access log has 5xx: {e['gateway_logged_5xx']}" if e["gateway_logged_5xx"] else "")
    )
    lines.append(
        f"  metrics {'PASS' if x['ok'] else 'FAIL'}: {x['series_half']} → {x['series_end']} series; route labels {x['route_values']}; "
        f"{x['new_label_sets_in_second_half']} new label sets in the second half"
    )
    lines.append(f"  overall {'PASS' if v['ok'] else 'FAIL'}")
    return "\n".join(lines)


def trace_growth(trace_dir: Path) -> dict[str, Any]:
    """What grew between the half-way and the end snapshots, per gateway process."""
    import tracemalloc

    out: dict[str, Any] = {}
    for half in sorted(trace_dir.glob("half-*.tracemalloc")):
        pid = half.stem.split("-", 1)[1]
        end = trace_dir / f"end-{pid}.tracemalloc"
        if not end.exists():
            continue
        before, after = tracemalloc.Snapshot.load(str(half)), tracemalloc.Snapshot.load(str(end))
        stats = after.compare_to(before, "traceback")
        top = [
            {"size_diff_kb": round(s.size_diff / 1024, 1), "count_diff": s.count_diff, "size_kb": round(s.size / 1024, 1), "where": [f"{frame.filename}:{frame.lineno}" for frame in s.traceback][-TRACE_FRAMES:]}
            for s in stats[:15]
        ]
        first, last = (json.loads((trace_dir / f"{label}-{pid}.json").read_text()) for label in ("half", "end"))
        if "error" in first or "error" in last:
            out[pid] = {"error": first.get("error") or last.get("error")}
            continue
        types = Counter(last["types"])
        types.subtract(first["types"])
        tables = {name: [first["tables"].get(name), size] for name, size in last["tables"].items() if size != first["tables"].get(name)}
        out[pid] = {
            "traced_mb": [round(first["traced"] / 2**20, 2), round(last["traced"] / 2**20, 2)],
            "top_growth": top, "types_grown": dict(Counter({k: v for k, v in types.items() if v > 0}).most_common(20)),
            "tables_changed": dict(sorted(tables.items(), key=lambda kv: -abs((kv[1][1] or 0) - (kv[1][0] or 0)))[:40]),
            "tables_end": dict(sorted(last["tables"].items(), key=lambda kv: -kv[1])[:40]),
        }
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    scratch = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    scratch.chmod(0o755)  # nginx's workers (nobody, when started as root) read files in here
    processes = Processes(scratch)
    environment = {"loadavg_start": Path("/proc/loadavg").read_text().strip(), "redis_server": version(["redis-server", "--version"]), "nginx": os.path.exists(NGINX)}
    thresholds = {"memory_floor_mb": MEMORY_FLOOR_MB, "memory_share": MEMORY_SHARE, "fd_slack": FD_SLACK, "label_set_slack": LABEL_SET_SLACK, "idle_after_s": IDLE_AFTER, "recovery_allowance_s": RECOVERY_ALLOWANCE}
    report = new_report("soak", args, environment, thresholds=thresholds, samples=[])
    previous_term = signal.signal(signal.SIGTERM, interrupt)
    setup = None
    try:
        say(f"scratch {scratch}")
        setup = start(args, scratch, processes, report)
        if setup.load_cores:
            os.sched_setaffinity(0, setup.load_cores)  # the load generator beside Redis and the upstream
        try:
            import uvloop

            uvloop.run(drive(args, setup, report))
        except ImportError:
            asyncio.run(drive(args, setup, report))
    except (KeyboardInterrupt, asyncio.CancelledError):
        report["interrupted"] = True
    finally:
        processes.close()  # the gateway's log is complete once it has stopped
        report["environment"]["loadavg_end"] = Path("/proc/loadavg").read_text().strip()
        report["gateway_log"] = scan_log(processes.log_path("gateway"))
        if setup is not None and setup.trace_dir is not None and not report.get("interrupted"):
            report["trace"] = trace_growth(setup.trace_dir)
        tear_down(previous_term, processes, scratch, args.keep, report["findings"])
    if not report.get("interrupted"):
        report["verdict"] = verdict(report)
        client = report["client"]
        if client["unexpected"]:
            report["findings"].append(f"answers other than expected (not 5xx): {client['unexpected']}")
        if client["skipped"] or client["late"] > 0.01 * client["sent"]:
            report["findings"].append(f"the client fell behind: {client['late']} requests late by over 50 ms, {client['skipped']} skipped (figures include client delay)")
        report["findings"] += outage_findings(report)
        records = report["gateway_log"].get("records", {})
        if records:
            report["findings"] += [f"gateway log: {n}x {what}" for what, n in records.items()]
    return report


# ---------------------------------------------------------------------------------------------
# The gateway under tracemalloc (--trace-memory)
# ---------------------------------------------------------------------------------------------


def traced_gateway(argv: list[str]) -> int:
    """``gateway run`` under tracemalloc; on request (a ``want-LABEL`` file in $SOAK_TRACE_DIR),
    each process writes ``LABEL-PID.tracemalloc`` and ``LABEL-PID.json`` (traced bytes, gc object
    counts by type, the length of every container attribute of the gateway's own objects)."""
    import gc
    import threading
    import tracemalloc

    # Imported before tracing starts: imports under tracemalloc are ten times slower.
    import gateway.app
    import gateway.server  # noqa: F401 - loaded now, before tracing
    from gateway.cli import main as gateway_main

    folder = Path(os.environ[TRACE_ENV])
    tracemalloc.start(TRACE_FRAMES)

    def tables() -> dict[str, int]:
        sizes: dict[str, int] = {}
        for obj in gc.get_objects():
            cls = type(obj)
            module = getattr(cls, "__module__", None)
            if not isinstance(module, str) or not module.startswith("gateway."):
                continue
            try:
                attributes = vars(obj)
            except TypeError:
                continue
            for name, value in attributes.items():
                if isinstance(value, (dict, list, set, frozenset, tuple)) and not isinstance(value, str):
                    key = f"{module}.{cls.__qualname__}.{name}"
                    sizes[key] = max(sizes.get(key, 0), len(value))
            if hasattr(obj, "used") and isinstance(getattr(obj, "used", None), int):
                key = f"{module}.{cls.__qualname__}.used"
                sizes[key] = max(sizes.get(key, 0), obj.used)
        return sizes

    def watch() -> None:
        while True:
            time.sleep(0.5)
            for want in folder.glob("want-*"):
                label = want.name[len("want-"):]
                done = folder / f"{label}-{os.getpid()}.json"
                if done.exists():
                    continue
                try:
                    gc.collect()
                    snapshot = tracemalloc.take_snapshot().filter_traces((tracemalloc.Filter(False, tracemalloc.__file__),))
                    snapshot.dump(str(folder / f"{label}-{os.getpid()}.tracemalloc"))
                    types = Counter(type(o).__qualname__ for o in gc.get_objects())
                    document: dict[str, Any] = {"traced": tracemalloc.get_traced_memory()[0], "types": dict(types), "tables": tables()}
                except Exception as exc:  # noqa: BLE001 - the driver must hear back, whatever happened
                    document = {"error": f"{type(exc).__name__}: {exc}"}
                temporary = done.with_suffix(".tmp")
                temporary.write_text(json.dumps(document))
                temporary.rename(done)

    def start_watch() -> None:
        threading.Thread(target=watch, name="soak-trace", daemon=True).start()

    start_watch()
    os.register_at_fork(after_in_child=start_watch)  # workers > 1: each worker answers too
    return gateway_main(["run", *argv])


def main() -> None:
    if sys.argv[1:2] == ["gateway"]:
        sys.exit(traced_gateway(sys.argv[2:]))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the load")
    parser.add_argument("--rate", type=float, default=None, help=f"requests per second, sent open loop (default 300; {TRACE_RATE:g} with --trace-memory)")
    parser.add_argument("--workers", type=int, default=1, help="gateway worker processes")
    parser.add_argument("--interval", type=float, default=INTERVAL, help="seconds between samples")
    parser.add_argument("--redis-down", type=float, default=REDIS_DOWN, help="seconds Redis stays stopped")
    parser.add_argument("--connections", type=int, default=64, help="the client's keep-alive connections at most")
    parser.add_argument("--seed", type=int, default=1, help="seed of the request mix")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (config, logs, the access log)")
    parser.add_argument("--trace-memory", action="store_true", help="run the gateway under tracemalloc and report what grew in the second half")
    args = parser.parse_args()
    if args.rate is None:
        args.rate = TRACE_RATE if args.trace_memory else 300.0
    seconds = args.minutes * 60
    if not 1 <= args.minutes <= MAX_MINUTES:
        parser.error(f"--minutes must be between 1 and {MAX_MINUTES:g} (the tokens live one hour)")
    if args.rate <= 0 or args.workers < 1 or args.connections < 1 or args.redis_down <= 0:
        parser.error("--rate, --workers, --connections and --redis-down must be positive")
    if args.interval < 1 or seconds / args.interval < 6:
        parser.error("--interval must be at least 1 s and leave at least 6 samples")
    try:
        report = run(args)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    out = save_report("soak", report)
    if report.get("interrupted"):
        print(f"\ninterrupted; everything started was stopped; partial samples in {out.relative_to(ROOT)}", file=sys.stderr)
        sys.exit(130)
    print()
    print(table(report))
    for finding in report["findings"]:
        print(f"  - {finding}")
    for pid, grown in report.get("trace", {}).items():
        if "error" in grown:
            print(f"\ntracemalloc, process {pid}: {grown['error']}")
            continue
        print(f"\ntracemalloc, process {pid}: traced {grown['traced_mb'][0]} → {grown['traced_mb'][1]} MB")
        for entry in grown["top_growth"][:8]:
            print(f"  {entry['size_diff_kb']:+.1f} KB ({entry['count_diff']:+d} blocks) at {entry['where'][-1]}")
        for name, (before, after) in list(grown["tables_changed"].items())[:12]:
            print(f"  {name}: {before} → {after}")
    print(f"\nevery sample: {out.relative_to(ROOT)}  (total {elapsed():.0f}s)")
    sys.exit(0 if report["verdict"]["ok"] else 1)


if __name__ == "__main__":
    main()
