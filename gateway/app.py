"""The gateway at run time: the request flow, config generations, and the admin app.

A :class:`Runtime` is everything built from one config generation (routes, pipelines,
upstream pools). :class:`Gateway` owns the current runtime and the long-lived collaborators (the
store, the access log) and serves every public request from one handler, with no router or
middleware between the socket and the pipeline:

    request id → normalise path → route match → request policies → upstream → response policies

A reload builds a new runtime beside the old one, swaps it in, and retires the old one once its
in-flight requests are done (or after listen.limits.drain_timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import os
import re
import time
from datetime import datetime, timezone
from typing import Any, Callable

from aiohttp import web
from aiohttp.http import HttpVersion10, HttpVersion11

from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from gateway import __version__, error_tracking
from gateway.access_log import AccessLog, setup_logging
from gateway.body import forwarded_body
from gateway.config import METHODS, GatewayConfig, effective_blocks, load_config
from gateway.errors import ConfigError, DependencyUnavailable, NoHealthyTarget, UpstreamError, problem_body, problem_headers
from gateway.forwarded import Forwarding, traceparent
from gateway.ids import new_request_id
from gateway.metrics import UNMATCHED, Metrics
from gateway.pipeline import Exchange, Pipeline, Policy, PolicyContext, Reply, problem
from gateway.policies.cache import CachePolicy, Purge
from gateway.proxy import (
    ClientBodyError,
    HandshakeRefused,
    RequestBody,
    Upstream,
    is_websocket,
    response_headers,
    send,
    tunnel_websocket,
)
from gateway.routing import (
    BadPath,
    Route,
    Router,
    decoded_path,
    host_pattern,
    is_preflight,
    normalise_path,
    request_host,
    route_methods,
    valid_host,
)
from gateway.stores import MemoryStore, Store, make_store

log = logging.getLogger("gateway")

REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")  # CONFIG.md, "Request id"
SUPPORTED_VERSIONS = (HttpVersion10, HttpVersion11)
GATEWAY_KEY = web.AppKey("gateway", "Gateway")


def _is_utf8(value: bytes) -> bool:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class Runtime:
    """One config generation, ready to serve."""

    def __init__(self, config: GatewayConfig, generation: int, store: Store, policies: tuple[type[Policy], ...], metrics: Metrics) -> None:
        self.config = config
        self.generation = generation
        self.loaded_at = time.time()
        reserved = [name for policy in policies for name in policy.reserved_request_headers(config)]
        self.forwarding = Forwarding(config.listen.trusted_proxies, reserved)
        self.keep_escaped_slashes = config.listen.escaped_slashes == "keep"
        self.max_header_size = config.listen.limits.max_header_size
        self.body_timeout = config.listen.limits.body_timeout
        self.upstreams = {name: Upstream(name, settings) for name, settings in config.upstreams.items()}
        self.context = context = PolicyContext(config=config, store=store, metrics=metrics)
        by_name = {policy.name: policy for policy in policies}

        def pipeline(blocks: dict[str, Any], route: str | None) -> Pipeline:
            own = dataclasses.replace(context, route=route)  # the same shared resources
            return Pipeline([by_name[name](settings, own) for name, settings in blocks.items()])

        routes = []
        for settings in config.routes:
            match = settings.match
            routes.append(
                Route(
                    name=settings.name,
                    upstream=self.upstreams[settings.upstream],
                    pipeline=pipeline(effective_blocks(config, settings), settings.name),
                    prefix=match.path,
                    regex=match.path_regex,
                    methods=route_methods(match.methods),
                    host=host_pattern(match.host),
                    settings=settings,
                )
            )
        self.router = Router(routes, METHODS)
        # Requests no route takes still get the defaults' response policies (headers on a 404).
        self.unrouted = pipeline(effective_blocks(config, config.defaults), None)
        global_headers = getattr(config, "security_headers", None)
        self.server_header: str | None = (global_headers.server or None) if global_headers is not None else None
        self.in_flight = 0
        self.retired: asyncio.Event | None = None

    async def start(self) -> None:
        for upstream in self.upstreams.values():
            await upstream.start()
        for resource in self.context.resources.values():
            await resource.start()

    async def close(self) -> None:
        for route in self.router.routes:
            await route.pipeline.close()
        await self.unrouted.close()
        for resource in self.context.resources.values():
            await resource.close()
        for upstream in self.upstreams.values():
            await upstream.close()

    def enter(self) -> None:
        self.in_flight += 1

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0 and self.retired is not None:
            self.retired.set()


class Gateway:
    """Serves public requests with the current runtime; reloads; answers the admin listener."""

    def __init__(
        self,
        config: GatewayConfig,
        config_path: str | os.PathLike[str] | None = None,
        *,
        store: Store | None = None,
        access_log: AccessLog | None = None,
        policies: tuple[type[Policy], ...] | None = None,
        clock: Callable[[], float] = time.monotonic,
        metrics: Metrics | None = None,
    ) -> None:
        if policies is None:
            from gateway.policies import POLICIES

            policies = POLICIES
        self.policies = policies
        self.config_path = config_path
        self.store = store or (make_store(config) if config.redis is not None else MemoryStore(clock=clock))
        self.access_log = access_log or AccessLog(config.logging.access_log, config.logging.format == "json")
        self.metrics = metrics or Metrics(__version__)
        for result in ("applied", "refused"):
            self.metrics.config_reloads.labels(result=result)
        self._watch_store()
        self.runtime = Runtime(config, 1, self.store, policies, self.metrics)
        reserved = frozenset(name.lower() for name in self.runtime.forwarding.reserved)
        self.error_tracker = error_tracking.setup(config.error_tracking, reserved)
        self.draining = False
        self._retiring: set[asyncio.Task[None]] = set()

    @property
    def config(self) -> GatewayConfig:
        return self.runtime.config

    def _watch_store(self) -> None:
        """Redis call times and breaker transitions become metrics (the store knows no metrics)."""
        store: Any = self.store
        metrics = self.metrics
        if not hasattr(store, "breaker"):
            # No Redis: no redis_up series at all, so "no Redis" never reads as "Redis down".
            metrics.registry.unregister(metrics.redis_up)
            return
        metrics.redis_up.set(1)
        for state in ("open", "half_open", "closed"):  # series from the start: rate() sees the first
            metrics.redis_circuit_transitions.labels(state=state)
        store.on_call = metrics.redis_called

        def transition(state: str) -> None:
            metrics.redis_circuit_transitions.labels(state=state).inc()
            metrics.redis_up.set(1 if state == "closed" else 0)

        store.breaker.on_transition = transition

    @property
    def server_header(self) -> str | None:
        """The Server header for responses that carry none (None: send no Server header)."""
        return self.runtime.server_header

    async def __aenter__(self) -> "Gateway":
        await self.runtime.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        for task in list(self._retiring):
            task.cancel()
        await self.runtime.close()
        await self.store.close()
        self.access_log.close()
        if self.error_tracker is not None:
            self.error_tracker.close()

    # -- reload ------------------------------------------------------------------------------

    async def reload(self) -> bool:
        """Re-read the config file; a bad file is refused and the running config stays."""
        assert self.config_path is not None
        loop = asyncio.get_running_loop()
        try:
            config = await loop.run_in_executor(None, load_config, self.config_path, None, self.policies)
        except ConfigError as exc:
            log.error("config reload refused; the running config stays", extra={"error": str(exc)})
            self.metrics.config_reloads.labels(result="refused").inc()
            return False
        old = self.runtime
        for key in ("listen", "workers", "admin", "redis", "error_tracking"):
            if getattr(config, key) != getattr(old.config, key):
                log.warning("config reload: a change to %r takes effect at the next restart", key)
        runtime = Runtime(config, old.generation + 1, self.store, self.policies, self.metrics)
        await runtime.start()
        self.runtime = runtime
        setup_logging(config.logging)
        self.access_log.enabled = config.logging.access_log
        task = asyncio.create_task(self._retire(old))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        log.info("config reloaded", extra={"generation": runtime.generation, "file": str(self.config_path), "pid": os.getpid()})
        self.metrics.config_reloads.labels(result="applied").inc()
        return True

    async def _retire(self, runtime: Runtime) -> None:
        runtime.retired = asyncio.Event()
        if runtime.in_flight:
            try:
                await asyncio.wait_for(runtime.retired.wait(), runtime.config.listen.limits.drain_timeout)
            except asyncio.TimeoutError:
                log.warning("retiring config generation %d with requests still in flight", runtime.generation)
        await runtime.close()

    # -- the public handler ------------------------------------------------------------------

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """Every public request, end to end; the error boundary: no exception text leaves."""
        started = time.perf_counter()
        runtime = self.runtime
        runtime.enter()
        incoming_id = request.headers.get("X-Request-ID")
        request_id = incoming_id if incoming_id and REQUEST_ID.fullmatch(incoming_id) else new_request_id()
        forwarded_for = ", ".join(request.headers.getall("X-Forwarded-For", ())) or None
        exchange = Exchange(request, request_id, runtime.forwarding.client_ip(request.remote, forwarded_for), started)
        status = 499  # the client went away before an answer (nginx's convention)
        self.metrics.in_flight.inc()
        try:
            response = await self._serve(runtime, exchange)
            status = response.status
            return response
        except ConnectionResetError:
            # The client left while its answer was being written (before the cancellation that
            # handler_cancellation sends arrived): nginx's 499, not a gateway error. aiohttp
            # drops this placeholder on the closed transport.
            exchange.notes["aborted"] = "client"
            return web.Response(status=500)
        except Exception as error:
            log.exception("unexpected error", extra={"request_id": request_id, "path": request.path})
            if self.error_tracker is not None:
                self.error_tracker.capture(error, exchange)
            status = 500
            reply = problem(exchange, 500, "the gateway failed to handle the request")
            pipeline = exchange.route.pipeline if exchange.route is not None else runtime.unrouted
            with contextlib.suppress(Exception):  # the failure may have come from these very hooks
                pipeline.on_response(exchange, reply)
            reply.headers["X-Request-ID"] = request_id
            return await send(request, reply, exchange)
        finally:
            runtime.leave()
            self.metrics.in_flight.dec()
            self._observe(exchange, status)
            self.access_log.record(exchange, status)

    def _observe(self, exchange: Exchange, status: int) -> None:
        metrics = self.metrics
        route = exchange.route.name if exchange.route is not None else UNMATCHED
        elapsed = time.perf_counter() - exchange.started
        metrics.answered(exchange.method, route, status, elapsed, exchange.bytes_in, exchange.bytes_out)

    def local_response(self, request: web.BaseRequest, status: int, detail: str) -> web.Response:
        """A problem response for a request that never reached the pipeline (a malformed head),
        with the defaults' response policies applied, so it carries the security headers too."""
        exchange = Exchange(request, new_request_id(), request.remote or "", time.perf_counter())
        reply = problem(exchange, status, detail)
        self.runtime.unrouted.on_response(exchange, reply)
        reply.headers["X-Request-ID"] = exchange.request_id
        self._observe(exchange, status)  # counted like every other answer
        return web.Response(status=reply.status, headers=reply.headers, body=reply.body)

    async def _serve(self, runtime: Runtime, exchange: Exchange) -> web.StreamResponse:
        request = exchange.request
        reply, pipeline = self._route(runtime, exchange)
        route = exchange.route
        if reply is None and route is not None:
            pipeline = route.pipeline
            exchange.forwarding = runtime.forwarding
            exchange.traceparent, exchange.trace_id = traceparent(request.headers.get("traceparent"))
            reply = await pipeline.on_request(exchange)
            if reply is None:
                body = forwarded_body(exchange)  # read (and maybe rewritten) by a policy
                if is_websocket(request):
                    upgraded = await self._websocket(request, exchange, route)
                    if upgraded is not None:
                        return upgraded
                    # The upstream answered the handshake as an ordinary GET (RFC 9110 §7.8: a
                    # server may ignore Upgrade): forward it as one. What follows its head is the
                    # upgraded stream, not a body.
                elif body is None and request.body_exists:
                    body = RequestBody(request, exchange, runtime.body_timeout)
                sent = time.perf_counter()
                try:
                    async with route.upstream.forward(exchange, body) as upstream:
                        self._observe_upstream(route, exchange, str(upstream.status), sent)
                        reply = Reply(upstream.status, response_headers(upstream), upstream=upstream)
                        await pipeline.on_upstream(exchange, reply)
                        pipeline.on_response(exchange, reply)
                        reply.headers["X-Request-ID"] = exchange.request_id
                        return await send(request, reply, exchange)
                except UpstreamError as exc:
                    self._observe_upstream(route, exchange, type(exc).__name__, sent)
                    retry = {"Retry-After": str(exc.retry_after)} if isinstance(exc, NoHealthyTarget) else None
                    reply = await pipeline.on_upstream_error(exchange, exc) or problem(exchange, exc.status, exc.detail, retry)
                except ClientBodyError as exc:
                    reply = problem(exchange, exc.status, exc.detail)
        assert reply is not None
        pipeline.on_response(exchange, reply)
        reply.headers["X-Request-ID"] = exchange.request_id
        response = await send(request, reply, exchange)
        if request.body_exists and not request.content.at_eof() or request.method == "CONNECT":
            # The body was not read: closing is cheaper and safer than draining it. (After a
            # CONNECT head, aiohttp reads whatever follows as tunnel bytes: close too.)
            response.force_close()
        return response

    def _observe_upstream(self, route: Route, exchange: Exchange, outcome: str, sent: float) -> None:
        target = exchange.target or "none"
        elapsed = time.perf_counter() - sent
        exchange.upstream_ms = round(elapsed * 1000, 3)
        self.metrics.upstream_answered(route.upstream.name, target, outcome, elapsed)

    def _route(self, runtime: Runtime, exchange: Exchange) -> tuple[Reply | None, Pipeline]:
        """Check the head, normalise the path, find the route; a Reply when there is none."""
        request = exchange.request
        if getattr(request, "line_version", request.version) not in SUPPORTED_VERSIONS:
            # HTTP/0.9 or a 2.x/3.x request line over HTTP/1 framing: nothing to forward faithfully.
            return problem(exchange, 505, "only HTTP/1.0 and HTTP/1.1 are served here"), runtime.unrouted
        head_size = len(request.method) + len(request.raw_path) + 12
        undecodable = False
        for name, value in request.raw_headers:
            head_size += len(name) + len(value) + 4
            if not value.isascii():
                undecodable = undecodable or not _is_utf8(value)
        if head_size > runtime.max_header_size:
            return problem(exchange, 431, "the request headers are too large"), runtime.unrouted
        if undecodable:
            # obs-text that is not UTF-8 (``X-A: caf\xe9``): aiohttp hands the policies a str
            # holding surrogate escapes, which no check, log line or claim comparison reads as
            # the client's bytes; refused rather than judged on a value nobody sent.
            exchange.path = ""
            return problem(exchange, 400, "a header value is not valid UTF-8"), runtime.unrouted
        if request.method == "CONNECT":
            # A reverse proxy is no tunnel. Left to the route table, `CONNECT /x` was forwarded,
            # and since aiohttp treats what follows a CONNECT head as tunnel bytes its client
            # sent them on as a chunked body the upstream then read as a second request.
            # (_serve closes the connection after this answer.)
            exchange.path = ""
            return problem(exchange, 405, "CONNECT is not supported", {"Allow": ", ".join(runtime.router.methods)}), runtime.unrouted
        if not valid_host(request.headers.get("Host", "")):
            # RFC 9112 §3.2: a Host that is not uri-host[:port] is a 400 (it was forwarded as is).
            exchange.path = ""
            return problem(exchange, 400, "invalid Host header"), runtime.unrouted
        raw_path, _, exchange.query = request.raw_path.partition("?")
        try:
            exchange.path = normalise_path(raw_path, runtime.keep_escaped_slashes)
        except BadPath as exc:
            exchange.path = ""
            return problem(exchange, 400, f"invalid path: {exc}"), runtime.unrouted
        exchange.match_path = decoded_path(exchange.path, runtime.keep_escaped_slashes)
        host = request_host(request.headers.get("Host", ""))
        route, allowed = runtime.router.match(request.method, host, exchange.match_path)
        if route is None and allowed and is_preflight(request):
            # A CORS preflight asks about the method it names (Fetch §3.2.2): a route that allows
            # that method and has CORS on answers it, even when OPTIONS is not among its methods.
            wanted, _ = runtime.router.match(request.headers["Access-Control-Request-Method"], host, exchange.match_path)
            if wanted is not None and wanted.pipeline.answers_preflight:
                route = wanted
        if route is not None:
            exchange.route = route
            return None, route.pipeline
        if allowed:
            detail = f"{request.method} is not allowed here"
            return problem(exchange, 405, detail, {"Allow": ", ".join(allowed)}), runtime.unrouted
        return problem(exchange, 404, "no route matches this path"), runtime.unrouted

    async def _websocket(self, request: web.BaseRequest, exchange: Exchange, route: Route) -> web.StreamResponse | None:
        """The WebSocket relayed, or a problem; None when the upstream ignored the Upgrade."""
        if request.method != "GET" or not web.WebSocketResponse().can_prepare(request).ok:
            # RFC 6455 §4.1/§4.2.1: a GET with a valid Sec-WebSocket-Key and version 13. Checked
            # before an upstream is dialled (aiohttp raised it after, a 500).
            reply = problem(exchange, 400, "the WebSocket handshake is malformed", {"Sec-WebSocket-Version": "13"})
        else:
            try:
                return await tunnel_websocket(request, exchange, route.upstream)
            except UpstreamError as exc:
                reply = problem(exchange, exc.status, exc.detail)
            except HandshakeRefused as exc:
                if exc.status < 400:
                    return None
                reply = problem(exchange, exc.status, "the upstream refused the WebSocket handshake")
        route.pipeline.on_response(exchange, reply)
        reply.headers["X-Request-ID"] = exchange.request_id
        response = await send(request, reply, exchange)
        response.force_close()  # what follows the head is an upgraded stream: nothing to read on
        return response

    # -- admin -------------------------------------------------------------------------------

    def admin_app(self) -> web.Application:
        app = web.Application()
        app[GATEWAY_KEY] = self
        app.router.add_get("/healthz", _healthz)
        app.router.add_get("/readyz", _readyz)
        app.router.add_get("/metrics", _metrics)
        app.router.add_post("/cache/purge", _purge)
        return app

    async def purge(self, purge: Purge) -> int:
        """Remove what a purge names from every cached route; how many entries existed."""
        policies = [p for route in self.runtime.router.routes for p in route.pipeline.policies if isinstance(p, CachePolicy)]
        purged = sum([await policy.purge(purge) for policy in policies])
        log.info("cache purge", extra={"purge": purge.kind, "value": purge.value, "purged": purged})
        return purged

    async def readiness(self) -> tuple[int, dict[str, Any]]:
        runtime = self.runtime
        now = datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        upstreams: dict[str, Any] = {}
        degraded = False
        strict = frozenset(self.config.admin.unready_when_degraded) if self.config.admin is not None else frozenset()
        clock = time.monotonic()
        for name, upstream in runtime.upstreams.items():
            targets = {}
            for target in upstream.targets:
                state = "up" if target.available(clock) else ("down" if not target.up else "ejected")
                targets[target.origin] = {"status": state, "in_flight": target.in_flight}
            up = sum(1 for t in targets.values() if t["status"] == "up")
            state = "up" if up == len(targets) else ("degraded" if up else "down")
            degraded |= state != "up"
            upstreams[name] = {"status": state, "targets": targets}
        checks: dict[str, Any] = {"upstreams": upstreams}
        unready = self.draining or (degraded and "upstreams" in strict)
        levels: list[tuple[str, str]] = []
        if self.store.shared:
            checks["redis"], level = await self._store_check(now)
            levels.append(("redis", level))
        for resource in runtime.context.resources.values():
            if hasattr(resource, "readiness"):
                name, check, level = resource.readiness()
                checks[name] = check
                levels.append((name, level))
        for name, level in levels:  # admin.unready_when_degraded turns a degraded check into 503
            degraded |= level == "degraded"
            unready |= level == "unready" or (level == "degraded" and name in strict)
        checks["config"] = {"generation": runtime.generation, "file": str(self.config_path or ""), "loaded_at": runtime.loaded_at}
        status = "unready" if unready else ("degraded" if degraded else "ready")
        body = {"status": status, "timestamp": now, "checks": checks}
        return (503 if status == "unready" else 200), body


    async def _store_check(self, now: str) -> tuple[dict[str, Any], str]:
        """Redis: a ping with its response time. Down is degraded while requests still get
        answers (on_failure memory or allow), unready under deny (CONFIG.md, admin listener)."""
        store: Any = self.store
        check: dict[str, Any] = {"timestamp": now}
        try:
            seconds = await store.ping()
        except DependencyUnavailable as exc:
            check.update(status="down", error=str(exc))
            on_failure = self.config.redis.on_failure if self.config.redis is not None else "memory"
            level = "unready" if on_failure == "deny" else "degraded"
        else:
            check.update(status="up", response_time_ms=round(seconds * 1000, 3))
            level = "ready"
        if hasattr(store, "breaker"):
            check["circuit"] = store.breaker.state
        return check, level


async def _metrics(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY_KEY]
    clock = time.monotonic()
    if not gateway.metrics.multiprocess:  # (prometheus-client cannot clear labels across processes)
        gateway.metrics.target_up.clear()  # targets a reload removed leave the exposition
    for name, upstream in gateway.runtime.upstreams.items():
        for target in upstream.targets:
            gateway.metrics.target_up.labels(upstream=name, target=target.origin).set(1 if target.available(clock) else 0)
    body = await asyncio.get_running_loop().run_in_executor(None, gateway.metrics.exposition)
    # The 0.0.4 text format: what every Prometheus 2.x and 3.x scrapes (Debian 12 ships 2.42).
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4, "Cache-Control": "no-store"})


def _admin_problem(status: int, detail: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=problem_body(status, detail, new_request_id()), headers=problem_headers(headers))


async def _purge(request: web.Request) -> web.Response:
    """POST /cache/purge {"url" | "prefix" | "tag": ...} → {"purged": N} (CONFIG.md)."""
    gateway = request.app[GATEWAY_KEY]
    token = gateway.config.admin.token if gateway.config.admin is not None else ""
    given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
    if token and not hmac.compare_digest(given, f"Bearer {token}".encode()):
        return _admin_problem(401, "the admin token is missing or wrong", {"WWW-Authenticate": 'Bearer realm="admin"'})
    try:
        document = json.loads(await request.read())
    except ValueError:  # not JSON, or not UTF-8
        return _admin_problem(400, "the body is not JSON")
    try:
        purge = Purge.parse(document, gateway.runtime.keep_escaped_slashes)
    except ValueError as exc:
        return _admin_problem(400, str(exc))
    try:
        purged = await gateway.purge(purge)
    except DependencyUnavailable:
        return _admin_problem(503, "the cache store is unavailable; nothing was purged for certain", {"Retry-After": "1"})
    return web.json_response({"purged": purged}, headers={"Cache-Control": "no-store"})


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"}, headers={"Cache-Control": "no-store"})


async def _readyz(request: web.Request) -> web.Response:
    status, body = await request.app[GATEWAY_KEY].readiness()
    return web.json_response(body, status=status, headers={"Cache-Control": "no-store"})

