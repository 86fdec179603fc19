"""The profiles ``python -m benchmarks`` measures, and what each target runs for them.

A profile is one kind of traffic (method, path, requests in rotation) and, for every target, the
work that target does for it:

    passthrough  GET 1 KB JSON, no policies
    api          GET 1 KB JSON with what a real API route has: helmet's headers, CDN headers, an
                 RS256 JWT checked against a JWKS (100 users, each repeating its token), two
                 Redis-backed limits (per user, per ip) set so high nothing is denied, metrics and
                 a JSON access log
    post         POST 4 KB JSON product bodies (9 clean : 1 with markup) through sanitize (nh3) and
                 validate (field rules)
    flood        GET from one client over its limit of 10 per minute
    cache        GET 1 KB answered from a cache (ttl 1h) after one miss; the upstream never sees
                 the measured requests

Targets: ``direct`` (the upstream itself), ``gateway`` (one ``python -m gateway run`` per
profile), ``nginx`` (proxy_pass with keep-alive; headers, ``limit_req``, ``proxy_cache`` and an
access log where the profile has them; no JWT, no body checks) and ``node``
(benchmarks/node/server.js: express, helmet, express-rate-limit + rate-limit-redis,
http-proxy-middleware, jose, sanitize-html, validator, prom-client; it has no cache, so it sits
the cache profile out).

A profile may add gateway rows: variants of its route, each its own gateway process, measured
in the same rounds. The cache profile has ``gateway`` (the Redis store), ``gateway-memory`` (the
embedded memory store: how much of a hit is Redis) and ``gateway-proxied`` (the same route
without the cache: every request goes upstream).

Helpers run as their own processes: ``python -m benchmarks.profiles upstream PORT FILE`` (the
cheap upstream when nginx is missing: a bare asyncio HTTP/1.1 server answering GET with FILE and
POST with the length it received) and ``python -m benchmarks.profiles jwks PORT FILE`` (serves
the JWKS the gateway and the Node stack fetch). Either upstream answers ``GET /upstream-status``
with nginx's stub_status text, whose request count (that request included) tells how many
requests reached it.
"""

from __future__ import annotations

import asyncio
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TARGETS = ("direct", "gateway", "nginx", "node")
HIGH = 10_000_000  # a limit nothing reaches in a run
FLOOD_LIMIT = 10
FLOOD_WINDOW = "1m"
ISSUER = "https://id.bench.example"
AUDIENCE = "bench-api"
USERS = 100  # distinct tokens in the api rotation
KID = "bench-rs256"
POST_ECHO = '{"ok":true,"len":"$content_length"}'  # nginx's answer to a POST: what length arrived
UPSTREAM_STATUS = "/upstream-status"  # the upstream's request counter (nginx: stub_status)
CACHE_TTL = "1h"
RATIOS = (("gateway", "direct"), ("gateway", "nginx"), ("gateway", "node"))  # (row, over row), per round
# The benchmarks issue states its targets in one unit: the gateway's CPU per request over nginx
# proxy_pass's (the passthrough profile's nginx row) in the same round, whatever the profile.
PROXY_PASS = "nginx proxy_pass"


@dataclass(frozen=True)
class Profile:
    key: str
    title: str
    method: str
    path: str
    expected: frozenset[str]  # statuses every target should answer under load
    does: dict[str, str] = field(default_factory=dict)  # row → what it runs for this profile
    gateway_rows: tuple[str, ...] = ()  # gateway variants besides "gateway" (see gateway_config)
    left_out: dict[str, str] = field(default_factory=dict)  # target → why it has no row here
    cached: frozenset[str] = frozenset()  # rows whose measured requests must never reach the upstream
    ratios: tuple[tuple[str, str], ...] = RATIOS
    cpu_bounds: dict[str, float] = field(default_factory=dict)  # "row/other" → the most its CPU µs/req ratio may be
    proxy_pass_bound: float | None = None  # the issue's target for "gateway/nginx proxy_pass" (CPU µs/req)


PROFILES: dict[str, Profile] = {
    p.key: p
    for p in (
        Profile(
            "passthrough", "GET 1 KB passthrough (no policies)", "GET", "/pass", frozenset({"200"}),
            {
                "direct": "upstream alone",
                "gateway": "route, no policies",
                "nginx": "proxy_pass, keepalive",
                "node": "http-proxy-middleware",
            },
            proxy_pass_bound=6.0,
        ),
        Profile(
            "api", "GET 1 KB with a real API route's policies", "GET", "/api/items", frozenset({"200"}),
            {
                "direct": "upstream alone",
                "gateway": "helmet+CDN hdrs, RS256 JWKS, 2 redis limits, metrics, access log",
                "nginx": "helmet+CDN hdrs, 2 limit_req (shm), access log; NO JWT",
                "node": "helmet, jose RS256 JWKS (no token cache), 2 RedisStore limits, prom-client, log",
            },
            proxy_pass_bound=10.0,
        ),
        Profile(
            "post", "POST 4 KB JSON, sanitize + validate", "POST", "/api/users", frozenset({"200"}),
            {
                "direct": "upstream alone",
                "gateway": "sanitize nh3 + validate 6 fields",
                "nginx": "proxy_pass only: NO body checks",
                "node": "express.json, sanitize-html, validator",
            },
            proxy_pass_bound=12.0,
        ),
        Profile(
            "flood", f"GET flood, one client over {FLOOD_LIMIT}/min", "GET", "/api/flood", frozenset({"200", "429"}),
            {
                "direct": "upstream alone (no limit)",
                "gateway": f"{FLOOD_LIMIT}/min per ip, redis",
                "nginx": f"limit_req {FLOOD_LIMIT}r/m burst={FLOOD_LIMIT - 1} (shm)",
                "node": f"express-rate-limit {FLOOD_LIMIT}/min, RedisStore",
            },
            proxy_pass_bound=3.0,
        ),
        Profile(
            "cache", "GET 1 KB cache hit", "GET", "/cached", frozenset({"200"}),
            {
                "direct": "upstream alone",
                "gateway": f"cache ttl {CACHE_TTL}, redis store: a hit",
                "gateway-memory": f"cache ttl {CACHE_TTL}, embedded memory store: a hit",
                "gateway-proxied": "the same route without cache: proxied",
                "nginx": f"proxy_cache (key $request_uri, valid 200 {CACHE_TTL}): a hit",
            },
            gateway_rows=("gateway-memory", "gateway-proxied"),
            left_out={"node": "the Node stack has no cache"},
            cached=frozenset({"gateway", "gateway-memory", "nginx"}),
            ratios=(
                ("gateway", "nginx"), ("gateway", "gateway-proxied"), ("gateway", "direct"),
                ("gateway-memory", "nginx"), ("gateway-memory", "gateway-proxied"),
            ),
            # The benchmarks issue: a hit costs at most 3x nginx proxy_pass's CPU; a hit should cost
            # less than proxying; nginx's own hit (proxy_cache) is shown beside, a stricter measure.
            cpu_bounds={"gateway/gateway-proxied": 1.0, "gateway-memory/gateway-proxied": 1.0},
            proxy_pass_bound=3.0,
        ),
    )
}


# ---------------------------------------------------------------------------------------------
# Tokens and bodies
# ---------------------------------------------------------------------------------------------


def mint(users: int = USERS) -> tuple[dict[str, Any], list[str]]:
    """A fresh RS256 key: its JWKS, and one token per user (sub, roles, scope, 1 hour)."""
    import jwt
    from cryptography.hazmat.primitives.asymmetric import rsa
    from jwt.algorithms import RSAAlgorithm

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    jwks = {"keys": [{**public, "kid": KID, "use": "sig", "alg": "RS256"}]}
    now = int(time.time())
    tokens = [
        jwt.encode(
            {"iss": ISSUER, "aud": AUDIENCE, "sub": f"user-{i:04d}", "iat": now, "exp": now + 3600, "roles": ["user"], "scope": "profile:read orders:read"},
            key, algorithm="RS256", headers={"kid": KID},
        )
        for i in range(users)
    ]
    return jwks, tokens


def post_bodies() -> tuple[dict[str, bytes], list[str]]:
    """The 4 KB product bodies of benchmarks.sanitize (clean, markup) and the 9:1 rotation."""
    from benchmarks.sanitize import MIXED, bodies

    return bodies(), list(MIXED)


def validate_fields() -> dict[str, Any]:
    from benchmarks.sanitize import VALIDATE_FIELDS

    return dict(VALIDATE_FIELDS)


# ---------------------------------------------------------------------------------------------
# The gateway
# ---------------------------------------------------------------------------------------------


def gateway_config(profile: str, port: int, upstream_port: int, redis_port: int, jwks_url: str, admin_port: int | None, row: str = "gateway") -> dict[str, Any]:
    """The gateway's config for one row of a profile: ``gateway``, or one of its ``gateway_rows``."""
    p = PROFILES[profile]
    route: dict[str, Any] = {"name": profile, "match": {"path": p.path, "methods": [p.method]}, "upstream": "origin"}
    config: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": port, "limits": {"drain_timeout": "1s"}},
        "workers": 1,
        "admin": False,
        "upstreams": {"origin": {"targets": [f"http://127.0.0.1:{upstream_port}"]}},
        "routes": [route],
        "logging": {"level": "info", "format": "json", "access_log": False},
    }
    if profile == "api":
        # HSTS on plain HTTP too, as helmet (and the nginx reference) sends it: the same work.
        route["security_headers"] = {"preset": "helmet", "hsts": {"over_http": True}}
        route["cdn"] = {
            "cache_control": "public, max-age=60",
            "cdn_cache_control": "public, max-age=600",
            "surrogate_key": ["items"],
            "vary": ["Accept-Encoding"],
        }
        route["auth"] = {"required": True, "roles": ["user"], "scopes": ["profile:read"]}
        route["rate_limit"] = [
            {"key": "user", "limit": HIGH, "window": "1m", "algorithm": "sliding_window"},
            {"key": "ip", "limit": HIGH, "window": "1s", "algorithm": "token_bucket", "burst": HIGH},
        ]
        config["auth"] = {
            "jwt": {
                "issuer": ISSUER, "algorithms": ["RS256"], "jwks_url": jwks_url, "audience": AUDIENCE,
                "required_claims": ["exp", "sub"], "roles_claim": "roles", "scopes_claim": "scope",
                "forward_claims": {"sub": "X-User-Id"},
            },
        }
        config["logging"]["access_log"] = True
        if admin_port:
            config["admin"] = {"host": "127.0.0.1", "port": admin_port}  # serves /metrics
    elif profile == "post":
        route["sanitize"] = {"mode": "strip", "engine": "nh3"}
        route["validate"] = {"max_body": "1mb", "content_types": ["application/json"], "fields": validate_fields()}
    elif profile == "flood":
        route["rate_limit"] = [{"key": "ip", "limit": FLOOD_LIMIT, "window": FLOOD_WINDOW}]
    elif profile == "cache" and row != "gateway-proxied":
        route["cache"] = {"ttl": CACHE_TTL}
    if uses_redis(profile, row):
        config["redis"] = {"url": f"redis://127.0.0.1:{redis_port}/0", "timeout": "1s"}
    return config


def uses_redis(profile: str, row: str = "gateway") -> bool:
    """Whether the gateway's config for this row has a ``redis:`` block (the others use none)."""
    return row == "gateway" and profile in ("api", "flood", "cache")


# ---------------------------------------------------------------------------------------------
# nginx: the upstream and the reference proxy
# ---------------------------------------------------------------------------------------------

def helmet_headers() -> dict[str, str]:
    """What the gateway's helmet preset sends, so the nginx reference adds exactly the same set."""
    from gateway.policies.headers import SecurityHeadersSettings, resolve

    return resolve(SecurityHeadersSettings(preset="helmet"), {}).header_values()


def _nginx_common(scratch: Path, name: str) -> str:
    temp = scratch / f"{name}-temp"
    temp.mkdir(exist_ok=True)
    return f"""
worker_processes 1;
pid {scratch}/{name}.pid;
error_log {scratch}/{name}-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 75s;
    server_tokens off;
"""


def nginx_upstream_config(scratch: Path, port: int, document: Path) -> Path:
    """nginx as the upstream: GET anything → the 1 KB JSON file; POST /api/users → a small JSON
    echoing the Content-Length it received (so a rewritten body shows); GET /upstream-status →
    stub_status (the requests it served)."""
    text = _nginx_common(scratch, "nginx-upstream") + f"""
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 1m;
        location = {PROFILES['post'].path} {{
            default_type application/json;
            return 200 '{POST_ECHO}';
        }}
        location = {UPSTREAM_STATUS} {{
            stub_status;
        }}
        location / {{
            root {document.parent};
            default_type application/json;
            try_files /{document.name} =404;
        }}
    }}
}}
"""
    path = scratch / "nginx-upstream.conf"
    path.write_text(text)
    return path


def nginx_reference_config(scratch: Path, port: int, upstream_port: int) -> Path:
    """nginx as the reference proxy, one location per profile (docs in PROFILES[...].does['nginx'])."""
    headers = "\n".join(f'            add_header {name} "{value}" always;' for name, value in helmet_headers().items())
    forwarded = """
            proxy_set_header Host $proxy_host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $host;
            proxy_set_header X-Request-ID $request_id;
            proxy_set_header Connection "";
            proxy_http_version 1.1;
            proxy_pass http://origin;"""
    text = _nginx_common(scratch, "nginx-proxy") + f"""
    log_format access escape=json '{{"time":"$time_iso8601","request_id":"$request_id","client_ip":"$remote_addr",'
        '"method":"$request_method","path":"$uri","status":$status,"duration_ms":"$request_time",'
        '"upstream_ms":"$upstream_response_time","bytes_in":$request_length,"bytes_out":$bytes_sent}}';
    limit_req_zone $binary_remote_addr zone=api_ip:10m rate=1000000r/s;
    limit_req_zone $server_port zone=api_route:1m rate=1000000r/s;
    limit_req_zone $binary_remote_addr zone=flood:10m rate={FLOOD_LIMIT}r/m;
    limit_req_status 429;
    limit_req_log_level info;  # error_log is at warn: a flood's refusals are not written one by one
    proxy_cache_path {scratch}/nginx-cache levels=1:2 keys_zone=hits:1m max_size=64m inactive=1h use_temp_path=off;
    upstream origin {{
        server 127.0.0.1:{upstream_port};
        keepalive 100;
        keepalive_timeout 15s;
    }}
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 1m;
        client_body_buffer_size 64k;
        location = {PROFILES['passthrough'].path} {{{forwarded}
        }}
        location = {PROFILES['api'].path} {{
            # nginx counts in milliseconds: without a burst, two requests in the same millisecond
            # would exceed even a huge rate, so the burst is as large as the rate.
            limit_req zone=api_ip burst=1000000 nodelay;
            limit_req zone=api_route burst=1000000 nodelay;
            access_log {scratch}/nginx-proxy-access.log access;
            proxy_hide_header Server;
            proxy_hide_header X-Powered-By;
            proxy_hide_header X-AspNet-Version;
            proxy_hide_header X-AspNetMvc-Version;
{headers}
            add_header Cache-Control "private, max-age=60" always;
            add_header Vary "Accept-Encoding" always;
            add_header X-Request-ID $request_id always;{forwarded}
        }}
        location = {PROFILES['post'].path} {{{forwarded}
        }}
        location = {PROFILES['flood'].path} {{
            limit_req zone=flood burst={FLOOD_LIMIT - 1} nodelay;{forwarded}
        }}
        location = {PROFILES['cache'].path} {{
            # The gateway's key is the path and the query (no Host unless the route needs it).
            proxy_cache hits;
            proxy_cache_key $request_uri;
            proxy_cache_valid 200 {CACHE_TTL};
            proxy_cache_lock on;
            add_header X-Cache-Status $upstream_cache_status always;{forwarded}
        }}
    }}
}}
"""
    path = scratch / "nginx-proxy.conf"
    path.write_text(text)
    return path


def start_upstream(processes: Any, scratch: Path, cores: list[int] | None, report: dict[str, Any], nginx: bool = True) -> tuple[Any, int, str]:
    """The upstream of every runner: nginx serving a 1 KB JSON document when installed (and
    ``nginx`` is wanted), else the asyncio server below. Records which in the report's
    environment (and nginx's config under configs). Returns (process, port, kind)."""
    from benchmarks.common import NGINX, ROOT, free_port, payload, wait_for_port

    www = scratch / "www"
    www.mkdir()
    document = www / "payload.json"
    document.write_bytes(payload(1024))
    # nginx started as root serves from workers running as nobody: they must be able to read it.
    for path in (scratch, www, document):
        path.chmod(0o755 if path.is_dir() else 0o644)
    port = free_port()
    if nginx and Path(NGINX).exists():
        config = nginx_upstream_config(scratch, port, document)
        name, kind = "nginx-upstream", "nginx static"
        command = [NGINX, "-c", str(config), "-p", str(scratch), "-e", str(scratch / "nginx-upstream-error.log"), "-g", "daemon off;"]
        upstream = processes.start(name, command, cores)
        report.setdefault("configs", {})["nginx_upstream"] = config.read_text()
    else:
        name, kind = "upstream", "asyncio server"
        upstream = processes.start(name, [sys.executable, "-m", "benchmarks.profiles", "upstream", str(port), str(document)], cores, cwd=ROOT)
    wait_for_port(port, upstream, processes, name)
    report["environment"]["upstream"] = kind
    return upstream, port, kind


def served_requests(stub_status: bytes) -> int:
    """The request count in a stub_status answer (nginx's or the asyncio upstream's)."""
    found = re.search(rb"^server accepts handled requests\s*\n\s*\d+\s+\d+\s+(\d+)", stub_status, re.MULTILINE)
    if found is None:
        raise ValueError(f"not a stub_status answer: {stub_status[:200]!r}")
    return int(found.group(1))


# ---------------------------------------------------------------------------------------------
# Helper servers
# ---------------------------------------------------------------------------------------------


def _dechunk(buffer: bytearray, start: int) -> tuple[int, int] | None:
    """(body length, end offset) of a complete chunked body starting at ``start``, else None."""
    pos, length = start, 0
    while True:
        eol = buffer.find(b"\r\n", pos)
        if eol < 0:
            return None
        size = int(bytes(buffer[pos:eol]).split(b";")[0].strip() or b"0", 16)
        pos = eol + 2
        if size == 0:
            end = buffer.find(b"\r\n\r\n", pos - 2)  # no trailers: the last CRLF follows at once
            return (length, end + 4) if end >= 0 else None
        if len(buffer) < pos + size + 2:
            return None
        length += size
        pos += size + 2


@dataclass
class _Served:
    """What the asyncio upstream counted, shown as nginx's stub_status shows it."""

    connections: int = 0
    active: int = 0
    requests: int = 0

    def stub_status(self) -> bytes:
        return (
            f"Active connections: {self.active} \nserver accepts handled requests\n"
            f" {self.connections} {self.connections} {self.requests} \nReading: 0 Writing: 1 Waiting: 0 \n"
        ).encode()


class _Upstream(asyncio.Protocol):
    """HTTP/1.1 keep-alive: GET/HEAD → the document; other methods → {"ok":true,"len":"N"};
    GET /upstream-status → the stub_status text (requests counted, this one included)."""

    def __init__(self, document: bytes, served: _Served) -> None:
        self.document = document
        self.served = served
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.served.connections += 1
        self.served.active += 1

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while self.transport is not None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > 65536:
                    self.transport.close()
                return
            lines = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
            method, _, target = lines[0].partition(" ")
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            start = end + 4
            if "chunked" in headers.get("transfer-encoding", "").lower():
                found = _dechunk(self.buffer, start)
                if found is None:
                    return
                received, consumed = found
            else:
                received = int(headers.get("content-length") or 0)
                consumed = start + received
                if len(self.buffer) < consumed:
                    return
            del self.buffer[:consumed]
            self.served.requests += 1
            if method == "GET" and target.split(" ", 1)[0] == UPSTREAM_STATUS:
                body = self.served.stub_status()
            elif method in ("GET", "HEAD"):
                body = self.document
            else:
                body = b'{"ok":true,"len":"%d"}' % received
            head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
            self.transport.write(head if method == "HEAD" else head + body)
            if headers.get("connection", "").lower() == "close":
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.served.active -= 1


def serve_upstream(port: int, document: str) -> None:
    body = Path(document).read_bytes()
    served = _Served()

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(lambda: _Upstream(body, served), "127.0.0.1", port, backlog=1024)
        async with server:
            await server.serve_forever()

    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())


def serve_jwks(port: int, document: str) -> None:
    from aiohttp import web

    body = Path(document).read_bytes()

    async def handle(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json", headers={"Cache-Control": "public, max-age=3600"})

    app = web.Application()
    app.router.add_get("/jwks.json", handle)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "upstream":
        serve_upstream(int(sys.argv[2]), sys.argv[3])
    elif len(sys.argv) == 4 and sys.argv[1] == "jwks":
        serve_jwks(int(sys.argv[2]), sys.argv[3])
    else:
        sys.exit("usage: python -m benchmarks.profiles upstream PORT FILE | jwks PORT FILE")
