"""HTTP/1.1 to upstream targets: keep-alive connections parsed by httptools, pooled per upstream.

A proxied request needs little from an HTTP client: its head is ready (the policies built it),
its body is bytes or a stream, and the answer is passed on as it comes. aiohttp's client session
builds a request object, a response object, timer contexts and a connector round for each
request, which cost about as much CPU as the rest of a passthrough request together. Here one
asyncio protocol per connection feeds llhttp (through httptools), the head and a small body go
out in one write, and idle connections are reused newest first until ``keepalive_timeout``.

Failures are three exceptions: Unreachable (no connection: refused, unresolvable, connect
timeout), Dropped (the connection closed, or the answer was not HTTP, before the response was
complete) and ReadTimeout (nothing arrived for ``timeouts.read``).
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from typing import AsyncIterable, AsyncIterator

import httptools
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

# RFC 9110 §9.2.2: the only requests sent again by themselves.
IDEMPOTENT = frozenset(("GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"))
# aiohttp sends Content-Length: 0 for a body-less request of any other method (RFC 9110 §8.6).
NO_BODY_METHODS = frozenset(("GET", "HEAD", "OPTIONS", "TRACE", "CONNECT"))
MAX_HEAD = 64 * 1024  # an upstream's response head larger than this is refused (502)
HIGH_WATER = 256 * 1024  # buffered response body above which reading from the upstream pauses
LAST_CHUNK = b"0\r\n\r\n"


class Unreachable(ConnectionError):
    """No connection to the target could be made (refused, unresolvable, connect timeout)."""


class Dropped(ConnectionError):
    """The connection closed, or the answer was not HTTP/1.x, before the response was complete."""


class ReadTimeout(TimeoutError):
    """Nothing arrived from the upstream for ``timeouts.read``."""


class Response:
    """An upstream's answer whose head has arrived; its body is read with ``chunks()`` or ``read()``.

    ``release()`` must be called once done with it: the connection goes back to the pool when the
    body was read to its end, and is closed otherwise.
    """

    __slots__ = ("status", "reason", "headers", "content_length", "complete", "_connection", "_buffer", "_buffered", "_waiter", "_error")

    def __init__(self, connection: "Connection", status: int, reason: str, headers: CIMultiDictProxy[str]) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        length = headers.get("Content-Length")
        self.content_length = int(length) if length is not None and length.isdigit() else None
        self.complete = False  # the body has been received to its end
        self._connection: Connection | None = connection
        self._buffer: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body, as what has arrived each time the caller asks (joined)."""
        while True:
            if self._buffer:
                yield self._take()
            elif self._error is not None:
                raise self._error
            elif self.complete:
                return
            else:
                await self._wait()

    def body(self) -> bytes:
        """The whole body, once ``complete``."""
        assert self.complete and self._error is None
        return self._take() if self._buffer else b""

    async def read(self) -> bytes:
        parts = [chunk async for chunk in self.chunks()]
        return b"".join(parts)

    def release(self) -> None:
        """Done with the response: its connection is reused when the body is complete, else closed."""
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.finished(reusable=self.complete and not self._buffer)

    # -- fed by the connection ------------------------------------------------------------------

    def _take(self) -> bytes:
        buffer = self._buffer
        chunk = buffer.popleft() if len(buffer) == 1 else b"".join(buffer)
        buffer.clear()
        self._buffered = 0
        if self._connection is not None:
            self._connection.resume_reading()
        return chunk

    async def _wait(self) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _feed(self, chunk: bytes) -> None:
        self._buffer.append(chunk)
        self._buffered += len(chunk)
        if self._buffered > HIGH_WATER and self._connection is not None:
            self._connection.pause_reading()
        self._wake()

    def _end(self) -> None:
        self.complete = True
        self._wake()

    def _fail(self, error: BaseException) -> None:
        if not self.complete:
            self._error = error
            self._wake()


class Connection(asyncio.Protocol):
    """One keep-alive connection to a target; one request at a time."""

    def __init__(self, pool: "Pool", origin: str) -> None:
        self.pool = pool
        self.origin = origin
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.parser: httptools.HttpResponseParser | None = None
        self.head: asyncio.Future[Response] | None = None  # the current request's, until its head
        self.response: Response | None = None
        self.head_only = False  # a HEAD request: the answer has no body whatever it says
        self.reason = bytearray()
        self.raw_headers: list[tuple[str, str]] = []
        self.head_size = 0  # of the header lines parsed (several heads when some are interim)
        self.head_bytes = 0  # received before the final head was complete
        self.received = False  # any byte of the current answer arrived
        self.reused = False
        self.keep_alive = False
        self.lost = False
        self.reading_paused = False
        self.writing_paused: asyncio.Future[None] | None = None
        self.body_task: asyncio.Task[None] | None = None
        self.idle_handle: asyncio.TimerHandle | None = None
        self.last_read = 0.0
        self.timer: asyncio.TimerHandle | None = None

    # -- one exchange ---------------------------------------------------------------------------

    async def exchange(self, head: bytes, body: bytes | AsyncIterable[bytes] | None, chunked: bool, head_only: bool) -> Response:
        """Send a request; return its response once its head has arrived.

        On any failure (cancellation included) the connection is closed: it is out of step.
        """
        transport = self.transport
        assert transport is not None
        self.parser = httptools.HttpResponseParser(self)
        self.head = self.loop.create_future()
        self.response = None
        self.head_only = head_only
        self.head_size = self.head_bytes = 0
        self.received = False
        self.keep_alive = False
        if body is None:
            transport.write(head)
        elif isinstance(body, bytes):
            transport.writelines((head, body))
        else:
            transport.write(head)
            self.body_task = self.loop.create_task(self._send_body(body, chunked))
            self.body_task.add_done_callback(self._body_sent)
        self._arm_timer()
        try:
            return await self.head
        except BaseException:
            self.close()
            raise
        finally:
            self.head = None

    async def _send_body(self, body: AsyncIterable[bytes], chunked: bool) -> None:
        transport = self.transport
        assert transport is not None
        async for chunk in body:
            if transport.is_closing():
                return
            if chunked:
                transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
            else:
                transport.write(chunk)
            if self.writing_paused is not None:
                await self.writing_paused
        if chunked and not transport.is_closing():
            transport.write(LAST_CHUNK)

    def _body_sent(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            # The client's body failed (too slow, malformed): the upstream got part of a request.
            self._fail(Dropped("the request body could not be sent"))
            self.close()

    def finished(self, reusable: bool) -> None:
        """The caller is done with the response (Response.release)."""
        self.response = None
        body_task, self.body_task = self.body_task, None
        if body_task is not None and not body_task.done():
            body_task.cancel()  # the upstream answered before taking the whole body
            reusable = False
        reusable = reusable and self.keep_alive and not self.lost and not self.head_only
        self.parser = None
        if not reusable:
            self.close()
        self.pool.checked_in(self, reusable)

    def close(self) -> None:
        self._disarm()
        if self.body_task is not None and not self.body_task.done():
            self.body_task.cancel()
        if self.transport is not None and not self.lost:
            self.transport.close()

    # -- asyncio.Protocol -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.last_read = self.loop.time()
        self.received = True
        parser = self.parser
        if parser is None:  # bytes on an idle connection: the upstream is out of step
            self.close()
            return
        if self.response is None:
            self.head_bytes += len(data)  # an unfinished line is no on_header yet: count bytes too
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(Dropped("the upstream switched protocols"))
            self.close()
        except httptools.HttpParserError:
            if self.head_only and self.response is not None:
                return  # on_headers_complete stopped the parser after a HEAD's head, as meant
            self._fail(Dropped("the upstream's answer is not valid HTTP/1.1"))
            self.close()
            return
        if self.response is None and self.head_bytes > MAX_HEAD:
            self._fail(Dropped("the upstream's response head is too large"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._disarm()
        if self.writing_paused is not None and not self.writing_paused.done():
            self.writing_paused.set_result(None)
        response = self.response
        if response is not None and not response.complete and self._until_close(response):
            response._end()  # a body delimited by the connection's end (RFC 9112 §6.3)
        else:
            self._fail(Dropped("the upstream closed the connection"))
        self.pool.lost(self)

    def pause_writing(self) -> None:
        self.writing_paused = self.loop.create_future()

    def resume_writing(self) -> None:
        waiter, self.writing_paused = self.writing_paused, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None and not self.lost:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused and self.transport is not None and not self.lost:
            self.reading_paused = False
            self.last_read = self.loop.time()
            self.transport.resume_reading()

    # -- httptools callbacks --------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.reason.clear()
        self.raw_headers = []

    def on_status(self, reason: bytes) -> None:
        self.reason += reason
        if len(self.reason) > MAX_HEAD:
            raise Dropped("the upstream's status line is too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_size += len(name) + len(value) + 4
        if self.head_size > MAX_HEAD:
            raise Dropped("the upstream's response head is too large")
        self.raw_headers.append((name.decode("ascii", "surrogateescape"), value.decode("utf-8", "surrogateescape")))

    def on_headers_complete(self) -> None:
        assert self.parser is not None
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            # An interim answer (100 Continue, 103 Early Hints): the final one follows. (A 101
            # ends in HttpParserUpgrade: nothing asked for a protocol switch on this path.)
            return
        response = Response(self, status, self.reason.decode("latin-1"), CIMultiDictProxy(CIMultiDict(self.raw_headers)))
        self.response = response
        self.keep_alive = self.parser.should_keep_alive()
        if self.head is not None and not self.head.done():
            self.head.set_result(response)
        if self.head_only:
            # A HEAD's answer has no body whatever its Content-Length says (RFC 9110 §9.3.2);
            # httptools cannot be told, so the parser stops here and the connection is not reused.
            response._end()
            self._disarm()
            raise _HeadDone()

    def on_body(self, body: bytes) -> None:
        if self.response is not None:
            self.response._feed(body)

    def on_message_complete(self) -> None:
        response = self.response
        if response is None:
            return  # an interim answer ended
        self._disarm()
        if self.parser is None or not self.parser.should_keep_alive():
            self.keep_alive = False
        response._end()

    # -- failure and timeouts -------------------------------------------------------------------

    def _until_close(self, response: Response) -> bool:
        if response.content_length is not None or response.status in (204, 304) or self.head_only:
            return False
        coding = response.headers.get("Transfer-Encoding", "")
        return not coding.lower().rstrip().endswith("chunked")

    def _fail(self, error: BaseException) -> None:
        head = self.head
        if head is not None and not head.done():
            head.set_exception(error)
        if self.response is not None:
            self.response._fail(error)
        self.keep_alive = False

    def _arm_timer(self) -> None:
        self.last_read = self.loop.time()
        if self.timer is None:
            self.timer = self.loop.call_at(self.last_read + self.pool.read_timeout, self._check_timer)

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _check_timer(self) -> None:
        # One timer per exchange, moved on lazily: data_received only notes the time.
        self.timer = None
        timeout = self.pool.read_timeout
        if self.reading_paused:  # the client is slow to take the body, not the upstream to send it
            self.timer = self.loop.call_later(timeout, self._check_timer)
            return
        deadline = self.last_read + timeout
        if self.loop.time() + 0.001 < deadline:
            self.timer = self.loop.call_at(deadline, self._check_timer)
            return
        self._fail(ReadTimeout())
        self.close()


class _HeadDone(Exception):
    """Stops the parser after a HEAD response's head."""


class Pool:
    """One upstream's connections: at most ``limit`` in use, idle ones reused newest first."""

    def __init__(
        self,
        limit: int,
        keepalive_timeout: float,
        connect_timeout: float,
        read_timeout: float,
        ssl_context: ssl.SSLContext | None,
        server_name: str | None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.limit = limit
        self.keepalive_timeout = keepalive_timeout
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.ssl = ssl_context
        self.server_name = server_name
        self.idle: dict[str, list[Connection]] = {}
        self.in_use = 0
        self.waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self.every: set[Connection] = set()
        self.closed = False
        self._addresses: dict[str, tuple[str, int, bool]] = {}

    async def request(
        self,
        origin: str,
        method: str,
        target: str,
        headers: CIMultiDict[str],
        body: bytes | AsyncIterable[bytes] | None,
    ) -> Response:
        """Send ``method target`` to ``origin``; the response with its head read.

        An idempotent request sent on a reused connection that the upstream closed before
        answering (it timed the connection out as the request left) is sent once more on a new
        connection when its body can be sent again (RFC 9112 §9.3.1), as aiohttp's and Go's
        clients do.
        """
        chunked = False
        if body is None:
            if method not in NO_BODY_METHODS and "Content-Length" not in headers:
                headers["Content-Length"] = "0"
        elif isinstance(body, bytes):
            headers["Content-Length"] = str(len(body))
        elif "Content-Length" not in headers:
            headers["Transfer-Encoding"] = "chunked"
            chunked = True
        lines = [f"{method} {target} HTTP/1.1\r\n"]
        lines += [f"{name}: {value}\r\n" for name, value in headers.items()]
        lines.append("\r\n")
        text = "".join(lines)
        if text.count("\n") != len(lines) or text.count("\r") != len(lines):
            raise ValueError("a header value holds a line break")
        head = text.encode("utf-8", "surrogateescape")
        replayable = method in IDEMPOTENT and (body is None or isinstance(body, bytes))
        await self._acquire()
        try:
            connection = await self._connection(origin)
            try:
                return await connection.exchange(head, body, chunked, method == "HEAD")
            except Dropped:
                if not (connection.reused and not connection.received and replayable):
                    raise
            connection = await self._connect(origin)
            return await connection.exchange(head, body, chunked, method == "HEAD")
        except BaseException:
            self._release_slot()
            raise

    async def close(self) -> None:
        self.closed = True
        for connection in list(self.every):
            connection.close()
        self.idle.clear()

    # -- connections ----------------------------------------------------------------------------

    async def _connection(self, origin: str) -> Connection:
        idle = self.idle.get(origin)
        while idle:
            connection = idle.pop()
            if connection.idle_handle is not None:
                connection.idle_handle.cancel()
                connection.idle_handle = None
            if not connection.lost:
                connection.reused = True
                return connection
        return await self._connect(origin)

    async def _connect(self, origin: str) -> Connection:
        host, port, tls = self._address(origin)
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, connection = await self.loop.create_connection(
                    lambda: Connection(self, origin),
                    host,
                    port,
                    ssl=(self.ssl or True) if tls else None,
                    server_hostname=(self.server_name or host) if tls else None,
                )
        except TimeoutError:
            raise Unreachable(f"no connection to {origin} within {self.connect_timeout}s") from None
        except (OSError, ssl.SSLError) as exc:
            raise Unreachable(f"{origin}: {exc}") from None
        self.every.add(connection)
        return connection

    def _address(self, origin: str) -> tuple[str, int, bool]:
        address = self._addresses.get(origin)
        if address is None:
            url = URL(origin)
            address = self._addresses[origin] = (url.raw_host or "", url.port or 80, url.scheme == "https")
        return address

    def checked_in(self, connection: Connection, reusable: bool) -> None:
        """A connection's exchange is over: its slot is free, and it is kept for the next
        request when it can be."""
        self._release_slot()
        if not reusable or self.closed or self.keepalive_timeout <= 0:
            connection.close()
            return
        connection.reused = False
        connection.idle_handle = self.loop.call_later(self.keepalive_timeout, connection.close)
        self.idle.setdefault(connection.origin, []).append(connection)

    def lost(self, connection: Connection) -> None:
        self.every.discard(connection)
        if connection.idle_handle is not None:  # it was idle: out of the idle list too
            connection.idle_handle.cancel()
            connection.idle_handle = None
            idle = self.idle.get(connection.origin)
            if idle and connection in idle:
                idle.remove(connection)

    # -- the in-use limit -----------------------------------------------------------------------

    async def _acquire(self) -> None:
        if self.in_use < self.limit and not self.waiters:
            self.in_use += 1
            return
        waiter = self.loop.create_future()
        self.waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self._release_slot()  # handed a slot just as we were cancelled: pass it on
            else:
                self.waiters.remove(waiter)
            raise

    def _release_slot(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes straight to the waiter
                return
        self.in_use -= 1
