"""Listeners and processes: sockets, limits on what clients send, signals, workers.

One process serves with ``workers: 1``. With more, a small supervisor forks the workers (each
binds the same port with SO_REUSEPORT, so the kernel spreads connections), forwards SIGTERM and
SIGHUP to them and replaces a worker that dies. Signals:

- SIGTERM/SIGINT: stop accepting, let in-flight requests finish for up to
  ``listen.limits.drain_timeout``, close the pools, exit 0.
- SIGHUP: reload the config file; a bad file is logged and the running config stays.

A worker starts with these signals blocked and unblocks them once its event loop handles them,
so a signal sent while it starts waits instead of ending it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import uvloop
from prometheus_client.multiprocess import mark_process_dead
from aiohttp import hdrs, web
from aiohttp.http import SERVER_SOFTWARE, HttpVersion, HttpVersion10, HttpVersion11
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from yarl import URL

from gateway.access_log import setup_logging
from gateway.app import Gateway
from gateway.config import GatewayConfig, ListenLimits, load_config
from gateway.errors import ConfigError, problem_body
from gateway.ids import new_request_id
from gateway.metrics import MULTIPROC_ENV
from gateway.policies.warm import warm_forever
from gateway.tls import Certificates, redirect_app

log = logging.getLogger("gateway")

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)
RESPAWN_BACKOFF = (0.5, 1.0, 2.0, 5.0, 10.0)  # seconds before replacing a worker that keeps dying


def _raw_problem(status: int, reason: str) -> bytes:
    body = problem_body(status, reason, new_request_id())
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/problem+json\r\n"
        f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


class GatewayProtocol(web.RequestHandler):
    """aiohttp's connection handler with the gateway's answers to malformed heads.

    - a request line over max_request_line → 414, a header field or a head over
      max_header_size, or more than max_headers fields → 431 (aiohttp says 400 for all);
    - a request head not complete within header_timeout → 408 and close (slow-header clients);
    - every such answer is a problem+json body, never aiohttp's text with parser details.
    """

    def __init__(self, manager: "GatewayServer", **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._limits = manager.limits
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_deadline: float | None = None  # while a request head is awaited

    # The head timer is moved lazily: each request only notes when its head started (a timer
    # cancelled and made again per request cost more than the rest of the bookkeeping here).

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._await_head()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._head_deadline = None
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._head_deadline is None and not self._request_in_progress:
            self._await_head()  # the first bytes of the next request on this connection
        queued = len(self._messages)
        super().data_received(data)
        if len(self._messages) > queued or self._request_in_progress:
            self._head_deadline = None

    def _await_head(self) -> None:
        loop = asyncio.get_running_loop()
        self._head_deadline = loop.time() + self._limits.header_timeout
        if self._head_timer is None:
            self._head_timer = loop.call_at(self._head_deadline, self._check_head)

    def _check_head(self) -> None:
        self._head_timer = None
        deadline = self._head_deadline
        if deadline is None:
            return  # no head awaited now: the next one starts the timer again
        loop = asyncio.get_running_loop()
        if loop.time() + 0.001 < deadline:
            self._head_timer = loop.call_at(deadline, self._check_head)
            return
        if self._request_in_progress or self.transport is None:
            return
        self.transport.write(_raw_problem(408, "Request Timeout"))
        self.force_close()

    def handle_error(
        self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        if isinstance(exc, LineTooLong):
            status = 414 if exc.args[1] == self._limits.max_request_line else 431
        elif isinstance(exc, BadHttpMessage) and "Too many headers" in str(exc):
            status = 431
        if status >= 500:
            log.error("error while handling a request", exc_info=exc)
        else:
            log.info("malformed request refused", extra={"status": status, "error": type(exc).__name__, "client_ip": request.remote})
        detail = {400: "the request is malformed", 414: "the request line is too long", 431: "the request headers are too large"}
        response = self._manager.gateway.local_response(request, status, detail.get(status, "the gateway failed to handle the request"))
        response.force_close()
        return response


class GatewayRequest(web.BaseRequest):
    """aiohttp's request, with the gateway's say over the Server header of its response."""

    ATTRS = web.BaseRequest.ATTRS | frozenset({"gateway", "line_version"})
    gateway: Gateway
    line_version: HttpVersion  # as the request line said; `version` is what the answer is written in

    async def _prepare_hook(self, response: web.StreamResponse) -> None:
        # aiohttp fills a missing Server header with its SERVER_SOFTWARE constant (that very
        # object: `headers.setdefault(SERVER, SERVER_SOFTWARE)`), which names Python and aiohttp
        # with their versions. The gateway sends its configured value instead, or none.
        headers = response.headers
        if headers.get(hdrs.SERVER) is SERVER_SOFTWARE:
            server = self.gateway.server_header
            if server:
                headers[hdrs.SERVER] = server
            else:
                del headers[hdrs.SERVER]


class GatewayServer(web.Server):
    def __init__(self, gateway: Gateway, **kwargs: Any) -> None:
        super().__init__(gateway.handle, **kwargs)
        self.gateway = gateway
        self.limits = gateway.config.listen.limits

    def __call__(self) -> GatewayProtocol:
        return GatewayProtocol(self, loop=self._loop, **self._kwargs)

    def connection_made(self, handler: web.RequestHandler, transport: asyncio.Transport) -> None:
        """listen.limits.max_connections: a new connection over the limit first closes the
        longest-idle keep-alive connection (a client can reopen it), and is itself refused when
        every connection is busy, so idle or slow clients cannot exhaust the process's sockets."""
        super().connection_made(handler, transport)
        if len(self._connections) <= self.limits.max_connections:
            return
        idle = next((h for h in self._connections if h is not handler and not h._request_in_progress), None)
        if idle is not None:
            idle.close()  # graceful: an idle keep-alive connection has nothing in flight
            idle.force_close()
            idle_transport = self._connections.get(idle)
            if idle_transport is not None:
                idle_transport.close()
        else:
            log.warning("connection refused: listen.limits.max_connections reached", extra={"max_connections": self.limits.max_connections})
            transport.close()

    def _make_request(self, message: Any, payload: Any, protocol: Any, writer: Any, task: Any) -> GatewayRequest:  # type: ignore[override]
        if message.url is None:
            # "CONNECT \r\n": the parser gives no target at all, and aiohttp's request, made outside
            # its error handling, raised; the connection then hung without an answer. An empty
            # target is refused like any that does not start with "/" (Gateway._route).
            message = message._replace(path="", url=URL(""))
        line_version = message.version
        if line_version not in (HttpVersion10, HttpVersion11):
            # 0.9, or 2.0 framed as HTTP/1: answered 505 (Gateway._route) in HTTP/1.1, since a
            # status line names a version the server speaks (RFC 9110 §6.2), and then closed.
            message = message._replace(version=HttpVersion11, should_close=True)
        request = GatewayRequest(message, payload, protocol, writer, task, self._loop)
        request.gateway = self.gateway
        request.line_version = line_version
        return request


def server_options(limits: ListenLimits) -> dict[str, Any]:
    """aiohttp's parser limits for the configured ones.

    aiohttp checks each header field against max_field_size; the head as a whole is checked
    against max_header_size in the handler. The field limit is kept one byte off the request-line
    limit so that handle_error can tell a 414 from a 431 by the limit that was hit.
    """
    field = limits.max_header_size + 1
    if field == limits.max_request_line:
        field += 1
    return {
        "max_line_size": limits.max_request_line,
        "max_field_size": field,
        "max_headers": limits.max_headers,
        "keepalive_timeout": limits.keepalive_timeout,
        "handler_cancellation": True,  # a client that leaves cancels its upstream request
        # After answering without reading a body, aiohttp reads on for a while before closing
        # (so the client sees the answer, not a reset); 10 s by default, nginx's lingering_timeout
        # is 5 s. A slow client holds its socket no longer than that.
        "lingering_time": min(5.0, limits.body_timeout),
        "access_log": None,  # the gateway writes its own (gateway.access_log)
        # A request body is forwarded as sent: aiohttp would inflate a Content-Encoding: gzip
        # body, which then went upstream still labelled gzip (and a body that was no gzip at all
        # raised mid-stream, a 502 counted against a healthy target).
        "auto_decompress": False,
    }


@dataclass
class Listeners:
    public: web.BaseRunner
    admin: web.BaseRunner | None
    addresses: dict[str, tuple[str, int]]  # public, admin, redirect
    certificates: Certificates | None = None  # the public listener's, with listen.tls
    redirect: web.BaseRunner | None = None  # listen.tls.redirect_http

    @property
    def public_url(self) -> str:
        host, port = self.addresses["public"]
        local = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        return f"{'https' if self.certificates is not None else 'http'}://{local}:{port}"

    async def close(self) -> None:
        if self.redirect is not None:
            await self.redirect.cleanup()
        await self.public.cleanup()  # stops accepting, then waits for in-flight requests
        if self.admin is not None:
            await self.admin.cleanup()


async def open_listeners(gateway: Gateway, reuse_port: bool = False) -> Listeners:
    config = gateway.config
    limits = config.listen.limits
    server = GatewayServer(gateway, **server_options(limits))
    public = web.ServerRunner(server, handle_signals=False, shutdown_timeout=limits.drain_timeout)
    await public.setup()
    tls = config.listen.tls
    certificates = Certificates(tls) if tls is not None else None
    context = certificates.context if certificates is not None else None
    site = web.TCPSite(public, config.listen.host, config.listen.port, reuse_port=reuse_port or None, backlog=1024, ssl_context=context)
    await site.start()
    addresses = {"public": _bound(site)}
    redirect = None
    if tls is not None and tls.redirect_http is not None:
        plain = tls.redirect_http
        redirect = web.ServerRunner(redirect_app(plain.https_port or addresses["public"][1]), handle_signals=False, shutdown_timeout=1.0)
        await redirect.setup()
        redirect_site = web.TCPSite(redirect, plain.host or config.listen.host, plain.port, reuse_port=reuse_port or None)
        await redirect_site.start()
        addresses["redirect"] = _bound(redirect_site)
    admin = None
    if config.admin is not None:
        admin = web.AppRunner(gateway.admin_app(), handle_signals=False, access_log=None, shutdown_timeout=1.0)
        await admin.setup()
        admin_site = web.TCPSite(admin, config.admin.host, config.admin.port, reuse_port=reuse_port or None)
        await admin_site.start()
        addresses["admin"] = _bound(admin_site)
    return Listeners(public, admin, addresses, certificates, redirect)


def _bound(site: web.TCPSite) -> tuple[str, int]:
    server = site._server  # aiohttp keeps the asyncio server here; its sockets tell the real port
    assert server is not None
    host, port = server.sockets[0].getsockname()[:2]  # type: ignore[union-attr]
    return host, port


async def serve(path: str, config: GatewayConfig, reuse_port: bool = False) -> None:
    """Serve until SIGTERM/SIGINT; reload on SIGHUP."""
    setup_logging(config.logging)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    async with Gateway(config, path) as gateway:
        listeners = await open_listeners(gateway, reuse_port)
        reloads: set[asyncio.Task[bool]] = set()

        def reload() -> None:
            if listeners.certificates is not None:
                listeners.certificates.reload()  # renewed files, same paths (listen is restart-only)
            task = loop.create_task(gateway.reload())
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGHUP, reload)
        # A forked worker starts with these signals blocked (see Supervisor._spawn): one sent
        # while it was starting waited, and is handled now, instead of ending the worker.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
        log.info(
            "gateway listening",
            extra={name: f"{host}:{port}" for name, (host, port) in listeners.addresses.items()} | {"pid": os.getpid()},
        )
        warming = loop.create_task(warm_forever(listeners.public_url, lambda: gateway.config))
        await stop.wait()
        warming.cancel()
        log.info("draining", extra={"drain_timeout_s": config.listen.limits.drain_timeout, "pid": os.getpid()})
        gateway.draining = True
        await listeners.close()
    log.info("stopped", extra={"pid": os.getpid()})


def worker_count(config: GatewayConfig) -> int:
    """``workers: auto`` is one per core this process may run on (taskset, cpusets), not per
    core of the machine."""
    return len(os.sched_getaffinity(0)) if config.workers == "auto" else int(config.workers)


def run(path: str, config: GatewayConfig) -> int:
    """`gateway run`: serve in this process, or supervise forked workers."""
    workers = worker_count(config)
    if workers == 1:
        uvloop.run(serve(path, config))
        return 0
    return Supervisor(path, config, workers).run()


class Supervisor:
    """Forks the workers, forwards signals to them and replaces those that die."""

    def __init__(self, path: str, config: GatewayConfig, workers: int, fork: Callable[[], int] = os.fork) -> None:
        self.path = path
        self.config = config
        self.workers = workers
        self.fork = fork
        self.children: dict[int, float] = {}  # pid → start time
        self.deaths = 0
        self.stopping = False

    def run(self) -> int:
        setup_logging(self.config.logging)
        metrics_dir = self._metrics_dir()
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
        try:
            return self._supervise()
        finally:
            if metrics_dir is not None:
                shutil.rmtree(metrics_dir, ignore_errors=True)

    @staticmethod
    def _metrics_dir() -> str | None:
        """Workers write their metrics to files here, so that any one of them can answer a scrape
        for all (prometheus-client multiprocess mode). Made empty at start; removed at exit
        unless the operator chose it."""
        chosen = os.environ.get(MULTIPROC_ENV)
        if chosen:
            for stale in Path(chosen).glob("*.db"):
                stale.unlink()
            return None
        made = tempfile.mkdtemp(prefix="gateway-metrics-")
        os.environ[MULTIPROC_ENV] = made
        return made

    def _supervise(self) -> int:
        for _ in range(self.workers):
            self._spawn()
        log.info("supervisor started", extra={"workers": self.workers, "pid": os.getpid()})
        deadline: float | None = None
        while self.children:
            timeout = 1.0 if deadline is None else max(0.05, min(1.0, deadline - time.monotonic()))
            info = signal.sigtimedwait(HANDLED_SIGNALS, timeout)
            self._reap()
            if info is None:
                if deadline is not None and time.monotonic() >= deadline:
                    log.warning("workers did not stop in time; killing them")
                    self._signal_all(signal.SIGKILL)
                continue
            if info.si_signo in (signal.SIGTERM, signal.SIGINT) and not self.stopping:
                self.stopping = True
                deadline = time.monotonic() + self.config.listen.limits.drain_timeout + 5
                self._signal_all(signal.SIGTERM)
            elif info.si_signo == signal.SIGHUP:
                self._reload()
        log.info("supervisor stopped")
        return 0

    def _spawn(self) -> None:
        pid = self.fork()
        if pid == 0:  # the worker: the supervisor's signals stay blocked until serve() handles them
            code = 0
            try:
                uvloop.run(serve(self.path, self.config, reuse_port=True))
            except BaseException:
                logging.getLogger("gateway").exception("worker failed")
                code = 1
            finally:
                sys.stdout.flush()
                os._exit(code)
        self.children[pid] = time.monotonic()

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if pid == 0:
                return
            started = self.children.pop(pid, None)
            mark_process_dead(pid)  # its live gauges (in flight, target up) leave the sums
            if self.stopping or started is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            self.deaths = self.deaths + 1 if time.monotonic() - started < 10 else 0
            pause = RESPAWN_BACKOFF[min(self.deaths, len(RESPAWN_BACKOFF)) - 1] if self.deaths else 0
            log.error("worker exited; starting another", extra={"pid": pid, "exit_code": code, "after_s": pause})
            time.sleep(pause)
            self._spawn()

    def _reload(self) -> None:
        try:
            self.config = load_config(self.path)
        except ConfigError as exc:
            log.error("config reload refused; the running config stays", extra={"error": str(exc)})
            return
        self._signal_all(signal.SIGHUP)

    def _signal_all(self, signum: int) -> None:
        for pid in list(self.children):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                self.children.pop(pid, None)


async def warm_command(path: str, config: GatewayConfig, out: Any) -> int:
    """`gateway warm`: one round over every route's warm list, through an in-process gateway on
    a free loopback port, into the configured store."""
    from gateway.access_log import AccessLog
    from gateway.policies.warm import warm_list, warm_once

    targets = warm_list(config)
    if not targets:
        out.write("no route has a warm list: nothing to do\n")
        return 0
    tls = config.listen.tls.model_copy(update={"redirect_http": None}) if config.listen.tls is not None else None
    local = config.model_copy(update={"listen": config.listen.model_copy(update={"host": "127.0.0.1", "port": 0, "tls": tls}), "admin": None})
    async with Gateway(local, path, access_log=AccessLog(False)) as gateway:
        listeners = await open_listeners(gateway)

        def progress(done: int, total: int, route: str, target: str, outcome: str) -> None:
            out.write(f"[{done}/{total}] {route} GET {target} -> {outcome}\n")
            out.flush()

        try:
            ok, failed = await warm_once(listeners.public_url, targets, config.warm, progress)
        finally:
            await listeners.close()
    out.write(f"warmed {ok} of {len(targets)}" + (f", {failed} failed" if failed else "") + "\n")
    if config.redis is None:
        out.write("note: with the embedded memory store this warmth dies with this command; configure redis: to keep it for the gateway\n")
    return 0 if not failed else 1
