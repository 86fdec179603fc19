"""Upstreams: one connection pool each, balancing, retries, health, streaming both ways.

Bodies are never held whole: the client's body is read chunk by chunk as the upstream connection
takes it, and the upstream's body is written to the client as it arrives, so memory stays flat
whatever the size. A client that disconnects cancels its upstream request (the server runs with
handler cancellation on), as nginx does with proxy_ignore_client_abort off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from typing import TYPE_CHECKING, AsyncIterator, Callable

import aiohttp
from aiohttp import web
from yarl import URL

from gateway.errors import NoHealthyTarget, UpstreamConnectError, UpstreamTimeout
from gateway.forwarded import HOP_BY_HOP, connection_listed, strip_hop_by_hop
from gateway.tls import client_context
from gateway.upstream_http import IDEMPOTENT, Pool, ReadTimeout, Response

if TYPE_CHECKING:
    from gateway.config import Upstream as UpstreamSettings
    from gateway.pipeline import Exchange, Reply

log = logging.getLogger("gateway.upstream")

# Only idempotent requests (RFC 9110 §9.2.2) are retried, and only while their body has not been sent.
RETRY_STATUSES = frozenset((502, 503))
FAILURE_STATUSES = frozenset((502, 503, 504))  # count against passive health (CONFIG.md)
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# The client side of a WebSocket handshake is made by aiohttp itself.
WEBSOCKET_HANDSHAKE = frozenset(("sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions", "sec-websocket-protocol"))


class ClientBodyError(Exception):
    """The client's request body could not be read: too slow (408) or malformed (400)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class RequestBody:
    """The client's body as an async iterable the upstream request reads from.

    Each read waits at most `timeout` (listen.limits.body_timeout). ``Expect: 100-continue`` is
    answered when the upstream is ready for the body, i.e. after every policy has passed.
    """

    __slots__ = ("request", "exchange", "timeout", "started", "error")

    def __init__(self, request: web.BaseRequest, exchange: "Exchange", timeout: float) -> None:
        self.request = request
        self.exchange = exchange
        self.timeout = timeout
        self.started = False
        self.error: ClientBodyError | None = None

    async def __aiter__(self) -> AsyncIterator[bytes]:
        self.started = True
        request = self.request
        if request.headers.get("Expect", "").lower() == "100-continue":
            await request.writer.write(CONTINUE)
        while True:
            try:
                chunk = await next_chunk(request.content, self.timeout)
            except ClientBodyError as exc:
                self.error = exc
                raise
            if not chunk:
                return
            self.exchange.bytes_in += len(chunk)
            yield chunk


async def next_chunk(content: aiohttp.StreamReader, timeout: float) -> bytes:
    """The next part of the client's body, b"" at its end. What already arrived (usually all of a
    small body, with the head) is taken without a timer; otherwise the wait is bounded by
    ``timeout`` (listen.limits.body_timeout). ClientBodyError when too slow (408) or malformed (400)."""
    try:
        chunk = content.read_nowait()
        if chunk or content.at_eof():
            return chunk
        async with asyncio.timeout(timeout):
            return await content.readany()
    except TimeoutError:
        raise ClientBodyError(408, "the request body was not received in time") from None
    except (aiohttp.http_exceptions.HttpProcessingError, aiohttp.web_protocol.RequestPayloadError):
        raise ClientBodyError(400, "the request body is malformed") from None


class Target:
    """One address of an upstream, with its passive and active health."""

    __slots__ = ("origin", "host_header", "failures", "ejected_until", "in_flight", "up", "streak")

    def __init__(self, origin: str) -> None:
        url = URL(origin)
        self.origin = origin  # "http://10.0.0.5:8080"
        self.host_header = url.raw_authority if not url.is_default_port() else url.raw_host or ""
        self.failures = 0  # consecutive failures (passive health)
        self.ejected_until = 0.0
        self.in_flight = 0
        self.up = True  # active health verdict
        self.streak = 0  # consecutive active-check results against the verdict

    def available(self, now: float) -> bool:
        return self.up and self.ejected_until <= now


class Upstream:
    """A named upstream: its targets, its pool and how it picks a target.

    Requests go through the pool (gateway.upstream_http); WebSocket handshakes and active
    health checks, which are rare, through aiohttp's client.
    """

    def __init__(self, name: str, settings: "UpstreamSettings", clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.settings = settings
        self.clock = clock
        self.targets = [Target(origin) for origin in settings.targets]
        self._next = 0
        self.pool: Pool | None = None
        self.session: aiohttp.ClientSession | None = None  # WebSocket handshakes
        self._health_task: asyncio.Task[None] | None = None
        self.ssl = client_context(settings.tls.verify, settings.tls.ca_file)  # for https targets

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        settings = self.settings
        # The connect timeout counts from the connect, not from the wait for a free slot: that
        # wait is not the target's failure and must not count against its health.
        self.pool = Pool(
            settings.max_connections,
            settings.keepalive_timeout,
            settings.timeouts.connect,
            settings.timeouts.read,
            self.ssl,
            settings.tls.server_name,
        )
        self.session = _proxy_session(
            aiohttp.TCPConnector(limit=0, force_close=True, ssl=self.ssl),
            aiohttp.ClientTimeout(total=None, connect=None, sock_connect=settings.timeouts.connect, sock_read=settings.timeouts.read),
        )
        if settings.health.active is not None:
            self._health_task = asyncio.create_task(self._active_checks(), name=f"health:{self.name}")

    async def close(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
        if self.pool is not None:
            await self.pool.close()
        if self.session is not None:
            await self.session.close()

    # -- choosing a target -------------------------------------------------------------------

    def pick(self, exclude: list[Target]) -> Target:
        """The next target by the balance setting; raises NoHealthyTarget when none is available."""
        now = self.clock()
        targets = self.targets
        candidates = [t for t in targets if t.available(now) and t not in exclude]
        if not candidates:
            raise NoHealthyTarget(self._retry_after(now))
        balance = self.settings.balance
        if balance == "random":
            return random.choice(candidates)
        if balance == "least_conn":
            fewest = min(t.in_flight for t in candidates)
            candidates = [t for t in candidates if t.in_flight == fewest]
        # round robin over the candidates, in the targets' order
        count = len(targets)
        for step in range(count):
            target = targets[(self._next + step) % count]
            if target in candidates:
                self._next = (self._next + step + 1) % count
                return target
        return candidates[0]  # pragma: no cover - candidates are always among the targets

    def _retry_after(self, now: float) -> float:
        ejected = [t.ejected_until - now for t in self.targets if t.up and t.ejected_until > now]
        if ejected:
            return min(ejected)
        active = self.settings.health.active
        return active.interval if active else 1.0

    def available_targets(self) -> int:
        now = self.clock()
        return sum(1 for t in self.targets if t.available(now))

    # -- passive health ----------------------------------------------------------------------

    def _failed(self, target: Target) -> None:
        passive = self.settings.health.passive
        target.failures += 1
        if passive is None or target.failures < passive.failures:
            return
        # After the ejection, one more failure ejects the target again (a half-open probe).
        target.failures = passive.failures - 1
        target.ejected_until = self.clock() + passive.eject_for
        log.warning(
            "target ejected",
            extra={"upstream": self.name, "target": target.origin, "eject_for_s": passive.eject_for},
        )

    def _succeeded(self, target: Target) -> None:
        if target.failures:
            if target.ejected_until:
                log.info("target back in rotation", extra={"upstream": self.name, "target": target.origin})
                target.ejected_until = 0.0
            target.failures = 0

    # -- forwarding --------------------------------------------------------------------------

    def host_header(self, target: Target, exchange: "Exchange") -> str:
        if self.settings.preserve_host:
            return exchange.request.headers.get("Host", target.host_header)
        return target.host_header

    def url(self, target: Target, exchange: "Exchange") -> URL:
        return URL(target.origin + _request_target(exchange), encoded=True)

    @contextlib.asynccontextmanager
    async def forward(self, exchange: "Exchange", body: RequestBody | bytes | None) -> AsyncIterator[Response]:
        """Send the exchange's request; yield the upstream response with its headers read.

        Idempotent requests are retried on another target after a connect error, a dropped
        connection or a 502/503, as long as no byte of their body was sent. Raises
        UpstreamConnectError (502), UpstreamTimeout (504), NoHealthyTarget (503) or
        ClientBodyError (408/400, the client's fault).
        """
        pool = self.pool
        assert pool is not None
        method = exchange.method
        attempts = 1 + (self.settings.retries if method in IDEMPOTENT else 0)
        headers = exchange.upstream_headers
        stream = body if isinstance(body, RequestBody) else None  # bytes (read by a policy) can be sent again
        tried: list[Target] = []
        request_target = _request_target(exchange)
        response: Response | None = None
        target: Target | None = None
        for attempt in range(attempts):
            try:
                target = self.pick(tried)
            except NoHealthyTarget:
                if not tried:
                    raise
                break
            tried.append(target)
            headers["Host"] = self.host_header(target, exchange)
            target.in_flight += 1
            try:
                response = await pool.request(target.origin, method, request_target, headers, body)
            except (ConnectionError, TimeoutError) as exc:
                target.in_flight -= 1
                if stream is not None and stream.error is not None:
                    raise stream.error from None
                self._failed(target)
                timed_out = isinstance(exc, ReadTimeout)
                log.info(
                    "upstream attempt failed",
                    extra={"upstream": self.name, "target": target.origin, "error": type(exc).__name__, "request_id": exchange.request_id},
                )
                if timed_out:
                    raise UpstreamTimeout() from None
                if stream is not None and stream.started:
                    break
                continue
            status = response.status
            if status in FAILURE_STATUSES:
                self._failed(target)
            else:
                self._succeeded(target)
            last = attempt == attempts - 1
            if status in RETRY_STATUSES and not last and not (stream is not None and stream.started) and self._has_untried(tried):
                response.release()
                target.in_flight -= 1
                response = None
                continue
            break
        if response is None or target is None:
            raise UpstreamConnectError()
        exchange.target = target.origin
        exchange.upstream_status = response.status
        try:
            yield response
        finally:
            target.in_flight -= 1
            response.release()

    def _has_untried(self, tried: list[Target]) -> bool:
        now = self.clock()
        return any(t.available(now) and t not in tried for t in self.targets)

    # -- active health -----------------------------------------------------------------------

    async def _active_checks(self) -> None:
        active = self.settings.health.active
        assert active is not None
        timeout = aiohttp.ClientTimeout(total=active.timeout)
        async with _proxy_session(aiohttp.TCPConnector(limit=len(self.targets), force_close=True, ssl=self.ssl), timeout) as session:
            while True:
                await asyncio.gather(*(self._check(session, target) for target in self.targets))
                await asyncio.sleep(active.interval)

    async def _check(self, session: aiohttp.ClientSession, target: Target) -> None:
        active = self.settings.health.active
        assert active is not None
        try:
            async with session.get(target.origin + active.path, allow_redirects=False, server_hostname=self.settings.tls.server_name) as response:
                await response.read()
                passed = 200 <= response.status < 400
        except (aiohttp.ClientError, asyncio.TimeoutError):
            passed = False
        if passed == target.up:
            target.streak = 0
            return
        target.streak += 1
        if target.streak >= (active.successes if passed else active.failures):
            target.up = passed
            target.streak = 0
            log.warning(
                "target is up" if passed else "target is down",
                extra={"upstream": self.name, "target": target.origin, "check": active.path},
            )


def _proxy_session(connector: aiohttp.BaseConnector, timeout: aiohttp.ClientTimeout) -> aiohttp.ClientSession:
    # A proxy passes messages on unchanged: no redirects followed (per request), no
    # decompression, no cookie jar, no default headers.
    return aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
    )


def _request_target(exchange: "Exchange") -> str:
    return exchange.path + "?" + exchange.query if exchange.query else exchange.path


def response_headers(upstream: Response):  # type: ignore[no-untyped-def]
    """The upstream's response headers minus hop-by-hop ones (RFC 9110 §7.6.1)."""
    headers = upstream.headers
    listed = connection_listed(headers) if "Connection" in headers else set()  # type: ignore[arg-type]
    return strip_hop_by_hop(headers, listed)


async def send(request: web.BaseRequest, reply: "Reply", exchange: "Exchange") -> web.StreamResponse:
    """Write a reply to the client, streaming the upstream's body when there is one."""
    upstream = reply.upstream
    if upstream is None:
        exchange.bytes_out = len(reply.body)
        return web.Response(status=reply.status, headers=reply.headers, body=reply.body)
    if upstream.complete:
        # The whole body came with the head (most small answers): it goes out with the head in
        # one write. (aiohttp keeps the Content-Length given, a HEAD's too, and writes no body
        # for HEAD, 204 or 304.)
        body = upstream.body()
        exchange.bytes_out = len(body)
        return web.Response(status=reply.status, reason=upstream.reason, headers=reply.headers, body=body)
    response = web.StreamResponse(status=reply.status, reason=upstream.reason, headers=reply.headers)
    await response.prepare(request)
    try:
        async for chunk in upstream.chunks():
            exchange.bytes_out += len(chunk)
            await response.write(chunk)
    except (aiohttp.ClientError, ConnectionError, TimeoutError) as exc:
        # The status line is gone: the only honest signal left is to cut the connection, so the
        # client sees a truncated body rather than a complete-looking one.
        side = "client" if isinstance(exc, ConnectionResetError) else "upstream"
        exchange.notes["aborted"] = f"{side}: {type(exc).__name__}"
        if request.transport is not None:
            request.transport.abort()
        return response
    await response.write_eof()
    return response


def is_websocket(request: web.BaseRequest) -> bool:
    headers = request.headers
    return headers.get("Upgrade", "").lower() == "websocket" and "upgrade" in connection_listed(headers)  # type: ignore[arg-type]


async def tunnel_websocket(request: web.BaseRequest, exchange: "Exchange", upstream: Upstream) -> web.StreamResponse:
    """Open the upstream WebSocket first, then accept the client's and relay frames both ways."""
    assert upstream.session is not None
    target = upstream.pick([])
    headers = exchange.upstream_headers
    for name in list(headers):
        if name.lower() in WEBSOCKET_HANDSHAKE or name.lower() in HOP_BY_HOP:
            headers.popall(name, None)
    headers["Host"] = upstream.host_header(target, exchange)
    protocols = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
    try:
        server_side = await upstream.session.ws_connect(
            upstream.url(target, exchange),
            headers=headers,
            protocols=protocols,
            autoping=False,
            max_msg_size=0,
            timeout=aiohttp.ClientWSTimeout(ws_close=upstream.settings.timeouts.read),
            server_hostname=upstream.settings.tls.server_name,
        )
    except aiohttp.WSServerHandshakeError as exc:
        upstream._succeeded(target)
        raise HandshakeRefused(exc.status) from None
    except (aiohttp.ClientError, asyncio.TimeoutError):
        upstream._failed(target)
        raise UpstreamConnectError() from None
    upstream._succeeded(target)
    exchange.target = target.origin
    exchange.upstream_status = 101
    client_side = web.WebSocketResponse(
        protocols=[server_side.protocol] if server_side.protocol else (), autoping=False, max_msg_size=0
    )
    await client_side.prepare(request)
    async with server_side:
        await asyncio.gather(_pump(client_side, server_side, exchange, "in"), _pump(server_side, client_side, exchange, "out"))
    return client_side


class HandshakeRefused(Exception):
    """The upstream answered the WebSocket handshake with a status other than 101."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


async def _pump(source, sink, exchange: "Exchange", direction: str) -> None:  # type: ignore[no-untyped-def]
    async for message in source:
        kind = message.type
        size = len(message.data) if isinstance(message.data, (bytes, str)) else 0
        if direction == "in":
            exchange.bytes_in += size
        else:
            exchange.bytes_out += size
        if kind == aiohttp.WSMsgType.TEXT:
            await sink.send_str(message.data)
        elif kind == aiohttp.WSMsgType.BINARY:
            await sink.send_bytes(message.data)
        elif kind == aiohttp.WSMsgType.PING:
            await sink.ping(message.data)
        elif kind == aiohttp.WSMsgType.PONG:
            await sink.pong(message.data)
        else:
            break
    if not sink.closed:
        await sink.close(code=source.close_code or aiohttp.WSCloseCode.OK)
