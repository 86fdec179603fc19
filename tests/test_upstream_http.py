"""The gateway's HTTP/1.1 client to upstreams (gateway/upstream_http.py), seen from both ends.

Each upstream here is a raw asyncio server that writes exact bytes, so every case controls what
the gateway reads off the wire. The gateway runs as a process (on uvloop, as deployed) in front of
it, and is reached over real sockets by aiohttp's client or by raw bytes.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from multidict import CIMultiDict

from tests.conftest import GatewayProcess, assert_problem, base_config, free_port, parse_raw_response

TIMEOUT = aiohttp.ClientTimeout(total=15)  # a hung gateway fails the test, it does not stall it


# -- a raw upstream ----------------------------------------------------------------------------


@dataclass
class RawRequest:
    """A request as the upstream read it off the wire."""

    method: str
    target: str
    headers: CIMultiDict[str]
    connection: int  # which accepted connection carried it: 0, 1, ...
    body: bytes = b""  # de-chunked when it came chunked
    chunked: bool = False


@dataclass
class RawConnection:
    """One accepted connection, for a handler to read requests from and write bytes to."""

    upstream: "RawUpstream"
    index: int
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def read_head(self) -> RawRequest | None:
        """The next request's head (recorded at once), or None when the gateway closed first."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None
        request_line, *lines = head[:-4].decode("latin-1").split("\r\n")
        method, target, _ = request_line.split(" ")
        headers = CIMultiDict((name, value.strip()) for name, _, value in (line.partition(":") for line in lines))
        request = RawRequest(method, target, headers, self.index)
        self.upstream.requests.append(request)
        return request

    async def read_body(self, request: RawRequest) -> None:
        """The body as framed by Content-Length or chunked coding (RFC 9112 §6-7)."""
        if request.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while size := int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16):
                parts.append(await self.reader.readexactly(size))
                assert await self.reader.readexactly(2) == b"\r\n"
            while await self.reader.readuntil(b"\r\n") != b"\r\n":  # trailer fields
                pass
            request.body, request.chunked = b"".join(parts), True
        else:
            request.body = await self.reader.readexactly(int(request.headers.get("Content-Length", "0")))

    async def read_request(self) -> RawRequest | None:
        request = await self.read_head()
        if request is not None:
            await self.read_body(request)
        return request

    async def send(self, *parts: bytes, pause: float = 0.0) -> None:
        """Write the parts in separate writes, `pause` seconds apart."""
        for i, part in enumerate(parts):
            if i and pause:
                await asyncio.sleep(pause)
            self.writer.write(part)
            await self.writer.drain()

    async def until_closed_by_peer(self) -> None:
        """Answer nothing more; return once the gateway closed the connection."""
        while await self.reader.read(65536):
            pass

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


ConnectionHandler = Callable[[RawConnection], Awaitable[None]]


@dataclass
class RawUpstream:
    """An asyncio server on a free port of 127.0.0.1; `handler` runs for each accepted connection."""

    handler: ConnectionHandler
    requests: list[RawRequest] = field(default_factory=list)
    accepted: int = 0
    open_now: int = 0
    most_open: int = 0  # the most connections open at once
    server: asyncio.Server | None = None
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def url(self) -> str:
        assert self.server is not None
        return "http://127.0.0.1:%d" % self.server.sockets[0].getsockname()[1]

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)  # the OS picks a free port

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        connection = RawConnection(self, self.accepted, reader, writer)
        self.accepted += 1
        self.open_now += 1
        self.most_open = max(self.most_open, self.open_now)
        try:
            await self.handler(connection)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the gateway closed the connection mid-exchange: so be it
        except asyncio.CancelledError:
            pass  # stop(): the test is over
        finally:
            self.open_now -= 1
            writer.close()
            self.tasks.discard(task)


@pytest.fixture
async def raw_upstream() -> AsyncIterator[Callable[[ConnectionHandler], Awaitable[RawUpstream]]]:
    started: list[RawUpstream] = []

    async def start(handler: ConnectionHandler) -> RawUpstream:
        upstream = RawUpstream(handler)
        await upstream.start()
        started.append(upstream)
        return upstream

    yield start
    for upstream in started:
        await upstream.stop()


def response(body: bytes = b"", *headers: str, status: str = "200 OK") -> bytes:
    """An HTTP/1.1 response framed by Content-Length."""
    head = "".join(f"{line}\r\n" for line in (f"HTTP/1.1 {status}", f"Content-Length: {len(body)}", *headers))
    return head.encode() + b"\r\n" + body


def answering(reply: Callable[[RawRequest], bytes], delay: float = 0.0) -> ConnectionHandler:
    """A handler that answers every request on its connection (keep-alive), `delay` seconds late."""

    async def handler(connection: RawConnection) -> None:
        while (request := await connection.read_request()) is not None:
            await asyncio.sleep(delay)
            await connection.send(reply(request))

    return handler


def echo_path(request: RawRequest) -> bytes:
    return response(f"answer to {request.method} {request.target}".encode(), "Content-Type: text/plain")


def then_silence(answer: bytes) -> ConnectionHandler:
    """A handler that reads a request, writes `answer` (may be nothing), then holds the
    connection without a further byte until the gateway closes it."""

    async def handler(connection: RawConnection) -> None:
        await connection.read_request()
        await connection.send(answer)
        await connection.until_closed_by_peer()

    return handler


def first_connection(handler: ConnectionHandler) -> ConnectionHandler:
    """`handler` runs on the first connection; every later one answers its requests with echo_path."""

    async def dispatch(connection: RawConnection) -> None:
        await (handler if connection.index == 0 else answering(echo_path))(connection)

    return dispatch


# -- the gateway and its clients ---------------------------------------------------------------


def gateway_for(gateway_process: Any, upstream: RawUpstream, **settings: Any) -> GatewayProcess:
    """A gateway process whose upstream `api` is the raw server; settings go under upstreams.api.

    A route /log-marker leads to a dead upstream `marker`, for log_until_now().
    """
    config = base_config(upstream.url)
    config["upstreams"]["api"].update(settings)
    config["upstreams"]["marker"] = {"targets": [f"http://127.0.0.1:{free_port()}"], "health": {"passive": False}}
    config["routes"].insert(0, {"name": "marker", "match": {"path": "/log-marker"}, "upstream": "marker"})
    return gateway_process(config)


def closing_request(method: str, target: str, *headers: str) -> bytes:
    """A request head for roundtrip(): the gateway closes the connection after its answer."""
    return "".join(f"{line}\r\n" for line in (f"{method} {target} HTTP/1.1", "Host: gw", "Connection: close", *headers, "")).encode()


async def roundtrip(port: int, data: bytes, deadline: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes on a new connection; the response's status, headers and body.

    The body is Content-Length bytes, or for a HEAD or a response without one, every byte until
    the gateway closes the connection (the request says Connection: close). A gateway that holds
    back any of it fails the deadline.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 24)  # heads of any size
    try:
        writer.write(data)
        async with asyncio.timeout(deadline):
            status, headers, _ = parse_raw_response(await reader.readuntil(b"\r\n\r\n"))
            if "content-length" in headers and not data.startswith(b"HEAD "):
                body = await reader.readexactly(int(headers["content-length"]))
            else:
                body = await reader.read()
    finally:
        writer.close()
    return status, headers, body


async def get(client: aiohttp.ClientSession, url: str) -> tuple[int, bytes]:
    async with client.get(url, timeout=TIMEOUT) as resp:
        return resp.status, await resp.read()


async def log_until_now(process: GatewayProcess, client: aiohttp.ClientSession) -> list[dict[str, Any]]:
    """The gateway's log records, all of those logged so far written out.

    Log lines reach the file through one queue and one writer thread: once the line a request to
    the dead `marker` upstream logs is there, so is every line logged before it.
    """
    async with client.get(process.url + "/log-marker", timeout=TIMEOUT) as resp:
        assert resp.status == 502
    deadline = time.monotonic() + 10
    while True:
        records = process.log_records()
        if any(r.get("upstream") == "marker" for r in records):
            return records
        assert time.monotonic() < deadline, "the marker line never reached the log"
        await asyncio.sleep(0.05)


def upstream_failures(records: list[dict[str, Any]]) -> list[str]:
    """The messages that say an attempt on upstream `api` failed or its target was ejected."""
    return [r["message"] for r in records if r.get("upstream") == "api" and r.get("message") in ("upstream attempt failed", "target ejected")]


EJECT_AT_FIRST_FAILURE = {"retries": 0, "health": {"passive": {"failures": 1, "eject_for": "30s"}}}


# -- message framing ---------------------------------------------------------------------------


async def test_a_head_answer_with_content_length_and_no_body_ends_at_its_head_and_the_next_request_is_answered(raw_upstream, gateway_process):
    """A HEAD answer's Content-Length describes a body that never comes: the client gets the head at once, and the next request its own answer."""

    def reply(request: RawRequest) -> bytes:
        if request.method == "HEAD":
            return b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\nContent-Type: text/plain\r\n\r\n"
        return echo_path(request)

    upstream = await raw_upstream(answering(reply))
    gw = gateway_for(gateway_process, upstream)
    status, headers, body = await roundtrip(gw.port, closing_request("HEAD", "/doc"), deadline=3)
    assert (status, headers["content-length"], body) == (200, "1000", b"")
    status, _, body = await roundtrip(gw.port, closing_request("GET", "/next"))
    assert (status, body) == (200, b"answer to GET /next")
    assert [(r.method, r.target) for r in upstream.requests] == [("HEAD", "/doc"), ("GET", "/next")]


@pytest.mark.parametrize(
    "head",
    [b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Type: text/plain\r\n\r\n", b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n"],
    ids=["http1.1-connection-close", "http1.0"],
)
async def test_a_body_delimited_by_the_upstream_closing_arrives_whole(head, raw_upstream, gateway_process, client):
    """A response with neither Content-Length nor chunked coding ends where the upstream closes: the client gets all of it."""
    parts = [b"first part|", b"x" * 100_000, b"|last part"]

    async def handler(connection: RawConnection) -> None:
        await connection.read_request()
        await connection.send(head, *parts, pause=0.05)
        await connection.close()

    gw = gateway_for(gateway_process, await raw_upstream(handler))
    assert await get(client, gw.url + "/stream") == (200, b"".join(parts))


async def test_a_chunked_answer_sent_in_separate_writes_arrives_whole(raw_upstream, gateway_process, client):
    """A chunked response trickling in, a chunk's size line and data split over writes, reaches the client whole."""
    pieces = [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/plain\r\n\r\n",
        b"5\r\nhello\r\n",
        b"7\r\n",  # a size line alone ...
        b", world\r\n",  # ... then its data
        b"%x\r\n%s\r\n" % (20_000, b"y" * 20_000),
        b"0\r\n\r\n",
    ]

    async def handler(connection: RawConnection) -> None:
        while await connection.read_request() is not None:
            await connection.send(*pieces, pause=0.05)

    gw = gateway_for(gateway_process, await raw_upstream(handler))
    assert await get(client, gw.url + "/chunks") == (200, b"hello, world" + b"y" * 20_000)


@pytest.mark.parametrize(
    "interim",
    [
        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload; as=style\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </app.js>; rel=preload; as=script\r\n\r\n",
    ],
    ids=["103", "100", "100-then-103"],
)
async def test_interim_answers_before_the_final_one_are_skipped(interim, raw_upstream, gateway_process, client):
    """1xx answers ahead of the final 200 are passed over: the client gets the 200, its headers and its body."""

    async def handler(connection: RawConnection) -> None:
        while await connection.read_request() is not None:
            await connection.send(interim, response(b"final body", "X-Final: yes"), pause=0.05)

    gw = gateway_for(gateway_process, await raw_upstream(handler))
    async with client.get(gw.url + "/hints", timeout=TIMEOUT) as resp:
        assert (resp.status, await resp.read()) == (200, b"final body")
        assert resp.headers["X-Final"] == "yes" and "Link" not in resp.headers


# -- connections: reuse, staleness, limits -----------------------------------------------------


async def test_sequential_requests_reuse_one_upstream_connection(raw_upstream, gateway_process, client):
    """Two requests one after the other reach the upstream over one kept-alive connection."""
    upstream = await raw_upstream(answering(echo_path))
    gw = gateway_for(gateway_process, upstream)
    assert await get(client, gw.url + "/one") == (200, b"answer to GET /one")
    assert await get(client, gw.url + "/two") == (200, b"answer to GET /two")
    assert upstream.accepted == 1
    assert [(r.target, r.connection) for r in upstream.requests] == [("/one", 0), ("/two", 0)]


async def test_a_connection_the_upstream_closed_while_idle_is_not_held_against_the_next_request(raw_upstream, gateway_process, client):
    """The upstream closes a kept-alive connection while it is idle: the next GET still gets a 200, and no target is ejected."""
    closed = asyncio.Event()

    async def handler(connection: RawConnection) -> None:
        await connection.send(echo_path(await connection.read_request()))  # keep-alive, as far as the gateway knows
        await asyncio.sleep(0.1)
        await connection.close()  # its own idle timeout, say
        closed.set()

    upstream = await raw_upstream(first_connection(handler))
    gw = gateway_for(gateway_process, upstream, **EJECT_AT_FIRST_FAILURE)
    assert await get(client, gw.url + "/one") == (200, b"answer to GET /one")
    await asyncio.wait_for(closed.wait(), 5)
    await asyncio.sleep(0.2)
    assert await get(client, gw.url + "/two") == (200, b"answer to GET /two")
    assert [(r.target, r.connection) for r in upstream.requests] == [("/one", 0), ("/two", 1)]
    assert upstream_failures(await log_until_now(gw, client)) == []


async def test_a_get_on_a_reused_connection_closed_before_its_answer_is_resent_on_a_new_one(raw_upstream, gateway_process, client):
    """The upstream closes a reused connection as the next GET arrives on it: the GET is sent again on a new connection and gets a 200, and no target is ejected."""

    async def handler(connection: RawConnection) -> None:
        await connection.send(echo_path(await connection.read_request()))
        await connection.read_request()  # the next request arrives just as the upstream gives up on the connection
        await connection.close()

    upstream = await raw_upstream(first_connection(handler))
    gw = gateway_for(gateway_process, upstream, **EJECT_AT_FIRST_FAILURE)
    assert await get(client, gw.url + "/one") == (200, b"answer to GET /one")
    assert await get(client, gw.url + "/two") == (200, b"answer to GET /two")
    assert [(r.target, r.connection) for r in upstream.requests] == [("/one", 0), ("/two", 0), ("/two", 1)]
    assert upstream_failures(await log_until_now(gw, client)) == []


async def test_a_streamed_post_on_a_reused_connection_closed_before_its_answer_is_a_502_not_a_replay(raw_upstream, gateway_process, client):
    """The upstream closes a reused connection as a chunked POST arrives on it: the body cannot be sent again, so the client gets a 502 and the POST reached the upstream once."""

    async def handler(connection: RawConnection) -> None:
        await connection.send(echo_path(await connection.read_request()))
        await connection.read_head()
        await connection.close()

    upstream = await raw_upstream(first_connection(handler))
    gw = gateway_for(gateway_process, upstream, **EJECT_AT_FIRST_FAILURE)
    status, _, body = await roundtrip(gw.port, closing_request("GET", "/one"))
    assert (status, body) == (200, b"answer to GET /one")
    # The client's body has begun and is not finished: the gateway cannot have it all to resend.
    post = closing_request("POST", "/orders", "Transfer-Encoding: chunked", "Content-Type: text/plain") + b"5\r\nhello\r\n"
    status, headers, body = await roundtrip(gw.port, post)
    assert_problem(status, headers, body, 502)
    assert [(r.method, r.target, r.connection) for r in upstream.requests] == [("GET", "/one", 0), ("POST", "/orders", 0)]
    assert sorted(upstream_failures(await log_until_now(gw, client))) == ["target ejected", "upstream attempt failed"]


async def test_max_connections_caps_the_connections_open_to_the_upstream(raw_upstream, gateway_process, client):
    """With max_connections: 1, three concurrent slow requests all get a 200 while the upstream never has more than one connection open."""
    upstream = await raw_upstream(answering(echo_path, delay=0.3))
    gw = gateway_for(gateway_process, upstream, max_connections=1)
    results = await asyncio.gather(*(get(client, gw.url + f"/slow/{n}") for n in range(3)))
    assert results == [(200, f"answer to GET /slow/{n}".encode()) for n in range(3)]
    assert upstream.most_open == 1
    assert len(upstream.requests) == 3


# -- failures ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer",
    [b"HTTP/1.1 2OO OK\r\nContent-Length: 2\r\n\r\nok", b"garbage bytes, not HTTP at all\r\n\r\n", b"HTTP/1.1 200 OK\r\nNo colon in this line\r\n\r\n"],
    ids=["letters-in-status", "not-http", "header-without-colon"],
)
async def test_a_malformed_answer_is_a_502_problem(answer, raw_upstream, gateway_process, client):
    """An answer that is not valid HTTP/1.1 gives the client a 502 application/problem+json (the upstream keeps the connection open)."""

    gw = gateway_for(gateway_process, await raw_upstream(then_silence(answer)))  # only the parse can end the exchange
    async with client.get(gw.url + "/bad", timeout=TIMEOUT) as resp:
        assert_problem(resp.status, resp.headers, await resp.read(), 502)


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-Filler-%04d: %s\r\n" % (n, b"v" * 40) for n in range(2000)) + b"\r\n",
        b"HTTP/1.1 200 OK\r\nX-Huge: " + b"v" * 70_000 + b"\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 " + b"O" * 70_000 + b"\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-Endless: " + b"v" * 70_000,  # and no end of line yet
    ],
    ids=["many-headers", "one-huge-header", "huge-reason-phrase", "unfinished-huge-header"],
)
async def test_an_answer_head_over_64_kib_is_a_502(head, raw_upstream, gateway_process):
    """An upstream response head larger than 64 KiB is refused: the client gets a 502 problem."""
    assert len(head) > 64 * 1024

    gw = gateway_for(gateway_process, await raw_upstream(then_silence(head)))
    assert_problem(*await roundtrip(gw.port, closing_request("GET", "/big-head"), deadline=10), 502)


async def test_an_upstream_that_never_answers_is_a_504_after_the_read_timeout(raw_upstream, gateway_process, client):
    """An upstream that takes the request and says nothing gives the client a 504 once timeouts.read has passed."""

    gw = gateway_for(gateway_process, await raw_upstream(then_silence(b"")), timeouts={"connect": "1s", "read": "500ms"})
    started = time.monotonic()
    async with client.get(gw.url + "/silent", timeout=TIMEOUT) as resp:
        assert_problem(resp.status, resp.headers, await resp.read(), 504)
    assert 0.45 <= time.monotonic() - started < 10


async def test_an_upstream_closing_mid_body_cuts_the_client_and_the_next_request_is_served(raw_upstream, gateway_process, client):
    """The upstream sends a head and part of its Content-Length body, then closes: the client's connection is cut short, and the next request is answered whole."""

    async def handler(connection: RawConnection) -> None:
        await connection.read_request()
        await connection.send(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n", b"z" * 400, pause=0.05)
        await connection.close()

    gw = gateway_for(gateway_process, await raw_upstream(first_connection(handler)))
    with pytest.raises((aiohttp.ClientPayloadError, aiohttp.ClientConnectionError)):
        async with client.get(gw.url + "/cut", timeout=TIMEOUT) as resp:
            assert (resp.status, resp.headers["Content-Length"]) == (200, "1000")
            await resp.read()  # 400 of 1000 bytes, then the end of the connection
    assert await get(client, gw.url + "/next") == (200, b"answer to GET /next")


# -- the request as the upstream sees it -------------------------------------------------------


async def test_a_post_with_content_length_arrives_with_that_length_and_body(raw_upstream, gateway_process, client):
    """A JSON POST with Content-Length reaches the upstream with the same Content-Length and the exact body."""
    upstream = await raw_upstream(answering(echo_path))
    gw = gateway_for(gateway_process, upstream)
    payload = b'{"order": 42, "items": ["a", "b"], "note": "caf\xc3\xa9"}'
    async with client.post(gw.url + "/orders", data=payload, headers={"Content-Type": "application/json"}, timeout=TIMEOUT) as resp:
        assert resp.status == 200
    (received,) = upstream.requests
    assert received.headers.getall("Content-Length") == [str(len(payload))]
    assert (received.body, received.chunked, "Transfer-Encoding" in received.headers) == (payload, False, False)


async def test_a_post_without_a_body_arrives_with_content_length_zero(raw_upstream, gateway_process):
    """A POST that carries no body framing at all reaches the upstream with Content-Length: 0."""
    upstream = await raw_upstream(answering(echo_path))
    gw = gateway_for(gateway_process, upstream)
    status, _, _ = await roundtrip(gw.port, closing_request("POST", "/ping"))
    assert status == 200
    (received,) = upstream.requests
    assert received.headers.getall("Content-Length") == ["0"]
    assert (received.body, "Transfer-Encoding" in received.headers) == (b"", False)


async def test_a_chunked_upload_arrives_chunked_and_whole(raw_upstream, gateway_process, client):
    """A client's chunked upload (no Content-Length) reaches the upstream chunked, without Content-Length, and whole."""
    parts = [b"first,", b"second," * 1000, b"third"]

    async def upload() -> AsyncIterator[bytes]:
        for part in parts:
            yield part
            await asyncio.sleep(0.05)

    upstream = await raw_upstream(answering(echo_path))
    gw = gateway_for(gateway_process, upstream)
    async with client.post(gw.url + "/upload", data=upload(), timeout=TIMEOUT) as resp:
        assert resp.status == 200
    (received,) = upstream.requests
    assert (received.chunked, "Content-Length" in received.headers) == (True, False)
    assert received.body == b"".join(parts)
