"""Hostile clients on raw sockets: smuggling, proxy abuse, malformed heads, slow clients.

Each test checks the answer a user relies on (a 4xx problem, never a 5xx; the connection closed
where the framing can no longer be trusted) AND what reached the upstream: nothing, or exactly
the one request expected. After each hostile request a normal request on a new connection must
still be served (the gateway is not wedged).
"""

from __future__ import annotations

import asyncio
import json
from typing import AsyncIterator

import pytest

from conftest import assert_problem, base_config, parse_raw_response, raw_request

SMUGGLED = b"GET /admin HTTP/1.1\r\nHost: a\r\n\r\n"  # what an attacker hopes the upstream sees next
LIMITS = {"header_timeout": "1s", "body_timeout": "1s", "max_request_line": "1kb", "max_header_size": "2kb"}


async def hostile_gateway(start_gateway, target: str):  # type: ignore[no-untyped-def]
    config = base_config(target)
    config["listen"]["limits"] = dict(LIMITS)
    return await start_gateway(config)


async def until_closed(port: int, data: bytes, timeout: float = 3.0) -> bytes:
    """Send raw bytes; return all the gateway sends, failing unless it closes within `timeout`."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        chunks = []
        async with asyncio.timeout(timeout):  # a TimeoutError here: the connection stayed open
            while chunk := await reader.read(65536):
                chunks.append(chunk)
        return b"".join(chunks)
    finally:
        writer.close()


def one_problem(raw: bytes, status: int) -> dict:
    """Exactly one answer on the connection, and it is the gateway's problem+json with `status`."""
    assert raw.count(b"HTTP/1.") == 1, raw
    got, headers, body = parse_raw_response(raw)
    assert got < 500, raw
    return assert_problem(got, headers, body, status)


async def still_serves(gw, upstream) -> None:  # type: ignore[no-untyped-def]
    """A well-formed request on a new connection is served and reaches the upstream."""
    before = len(upstream.requests)
    raw = await until_closed(gw.port, b"GET /healthy HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    status, _, body = parse_raw_response(raw)
    assert status == 200, raw
    assert json.loads(body)["path"] == "/healthy"
    assert [r.path for r in upstream.requests[before:]] == ["/healthy"]


class Sniffer:
    """A raw TCP upstream that records every byte it gets (the recording `upstream` fixture's
    router answers some hostile requests, CONNECT among them, before they are recorded)."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.server: asyncio.base_events.Server | None = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            self.received += head
            self.received += await asyncio.wait_for(reader.read(65536), 0.2)
        except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError):
            pass
        body = b'{"path": "sniffed"}'
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
        writer.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"


@pytest.fixture
async def sniffer() -> AsyncIterator[Sniffer]:
    sniff = Sniffer()
    sniff.server = await asyncio.start_server(sniff._handle, "127.0.0.1", 0)
    yield sniff
    sniff.server.close()
    await sniff.server.wait_closed()


# -- 1. request smuggling -------------------------------------------------------------------

CHUNKED_ABC = b"3\r\nabc\r\n0\r\n\r\n"
REFUSED_FRAMING = {
    "content-length with chunked": b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 15\r\nTransfer-Encoding: chunked\r\n\r\n" + CHUNKED_ABC,
    "chunked with content-length": b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 15\r\n\r\n" + CHUNKED_ABC,
    "tab-chunked with content-length": b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 15\r\nTransfer-Encoding:\tchunked\r\n\r\n" + CHUNKED_ABC,
    "two content-lengths": b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 35\r\n\r\nabc" + SMUGGLED,
    "the same content-length twice": b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
    "content-length list": b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 3\r\n\r\nabc",
    "content-length +3": b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: +3\r\n\r\nabc",
    "content-length -1": b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\nabc",
    "xchunked": b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n" + CHUNKED_ABC,
    "space before colon": b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n" + CHUNKED_ABC,
    "chunked, identity": b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n" + CHUNKED_ABC,
    "vertical tab": b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\x0bchunked\r\n\r\n" + CHUNKED_ABC,
    "two transfer-encodings": b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n" + CHUNKED_ABC,
    "bare LF head": b"GET /x HTTP/1.1\nHost: a\n\n",
    "bare LF in one header": b"GET /x HTTP/1.1\r\nHost: a\nX-A: b\r\n\r\n",
    "bare LF chunk lines": b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\nabc\n0\n\n",
    "chunk size 0x1": b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0x1\r\na\r\n0\r\n\r\n",
    "chunk size +1": b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n+1\r\na\r\n0\r\n\r\n",
    "chunk size -1": b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\na\r\n0\r\n\r\n",
    "chunk ext with a stray quote": b'POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1;ext=bad"quote\r\na\r\n0\r\n\r\n',
    "huge chunk size": b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffff\r\na\r\n0\r\n\r\n",
    "space after chunk size": b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1 \r\na\r\n0\r\n\r\n",
    "chunk longer than its size": b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nabc\r\n0\r\n\r\n",
}


@pytest.mark.parametrize("request_bytes", list(REFUSED_FRAMING.values()), ids=list(REFUSED_FRAMING))
async def test_ambiguous_framing_is_a_400_and_the_connection_closes(start_gateway, upstream, request_bytes):
    gw = await hostile_gateway(start_gateway, upstream.url)
    # A second request rides behind every hostile one: it must die with the connection.
    raw = await until_closed(gw.port, request_bytes + SMUGGLED)
    one_problem(raw, 400)
    assert upstream.requests == []
    await still_serves(gw, upstream)


ACCEPTED_FRAMING = {
    # RFC 9110 §5.6.3: a tab is whitespace like a space; §7.8 coding names are case-insensitive.
    "tab before chunked": b"Transfer-Encoding:\tchunked\r\n",
    "CHUNKED": b"Transfer-Encoding: CHUNKED\r\n",
    # llhttp takes `identity` before the final `chunked`; the body is read as chunked (the final
    # coding, RFC 9112 §6.3) and sent on with the gateway's own framing, so no desync follows.
    "identity, chunked": b"Transfer-Encoding: identity, chunked\r\n",
    "a valid chunk extension": b"Transfer-Encoding: chunked\r\n",
}


@pytest.mark.parametrize("header", list(ACCEPTED_FRAMING.values()), ids=list(ACCEPTED_FRAMING))
async def test_unusual_but_unambiguous_chunked_framing_forwards_exactly_one_request(start_gateway, upstream, header):
    gw = await hostile_gateway(start_gateway, upstream.url)
    body = b"3;ext=ok\r\nabc\r\n0\r\n\r\n" if b"CHUNKED" not in header else CHUNKED_ABC
    raw = await until_closed(gw.port, b"POST /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n" + header + b"\r\n" + body)
    status, _, _ = parse_raw_response(raw)
    assert status == 200, raw
    assert [(r.method, r.path, r.body) for r in upstream.requests] == [("POST", "/x", b"abc")]
    # Re-framed by the gateway: the client's Transfer-Encoding is hop-by-hop, never copied.
    assert upstream.requests[0].headers.get("Transfer-Encoding", "chunked") == "chunked"
    assert "Content-Length" not in upstream.requests[0].headers


@pytest.mark.parametrize("method", ["POST", "GET"])
async def test_a_request_hidden_in_a_body_stays_that_bodys_bytes(start_gateway, upstream, method):
    gw = await hostile_gateway(start_gateway, upstream.url)
    head = f"{method} /x HTTP/1.1\r\nHost: a\r\nContent-Length: {len(SMUGGLED)}\r\nConnection: close\r\n\r\n".encode()
    raw = await until_closed(gw.port, head + SMUGGLED)
    assert raw.count(b"HTTP/1.1 ") == 1, raw
    assert parse_raw_response(raw)[0] == 200
    # One request, for /x, carrying the would-be /admin request as opaque body bytes.
    assert [(r.method, r.path, r.body) for r in upstream.requests] == [(method, "/x", SMUGGLED)]
    await still_serves(gw, upstream)


async def test_a_transfer_encoding_on_http_1_0_is_read_then_the_connection_closes(start_gateway, upstream):
    # RFC 9112 §6.1: such a message's framing is suspect; it may be processed, then the
    # connection MUST close, so what follows is never read as another request.
    gw = await hostile_gateway(start_gateway, upstream.url)
    head = b"POST /x HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    raw = await until_closed(gw.port, head + CHUNKED_ABC)
    assert parse_raw_response(raw)[0] == 200
    assert [(r.path, r.body) for r in upstream.requests] == [("/x", b"abc")]
    # With bytes after it in the same read, llhttp refuses the whole message: safe, if strict.
    one_problem(await until_closed(gw.port, head + CHUNKED_ABC + SMUGGLED), 400)
    assert len(upstream.requests) == 1
    await still_serves(gw, upstream)


# -- 2. not an open proxy; Host; bytes that have no place in a head -------------------------


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n",
        b"CONNECT /x HTTP/1.1\r\nHost: a\r\n\r\n",  # was forwarded, and its tunnel bytes after it
    ],
    ids=["authority-form", "origin-form"],
)
async def test_connect_is_refused_with_a_405_and_nothing_is_forwarded(start_gateway, upstream, sniffer, request_bytes):
    gw = await hostile_gateway(start_gateway, sniffer.url)
    raw = await until_closed(gw.port, request_bytes + SMUGGLED)  # closed: the rest would be tunnel bytes
    one_problem(raw, 405)
    allow = parse_raw_response(raw)[1]["allow"]
    assert "GET" in allow and "CONNECT" not in allow
    assert bytes(sniffer.received) == b""
    raw = await until_closed(gw.port, b"GET /ok HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert parse_raw_response(raw)[0] == 200
    assert bytes(sniffer.received).startswith(b"GET /ok HTTP/1.1\r\n")


@pytest.mark.parametrize("host", [b"evil.example", b"a"])
async def test_an_absolute_form_target_is_refused_not_proxied(start_gateway, upstream, sniffer, host):
    gw = await hostile_gateway(start_gateway, sniffer.url)
    raw = await until_closed(gw.port, b"GET http://evil.example/x HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n")
    assert "path" in one_problem(raw, 400)["detail"]
    assert bytes(sniffer.received) == b""


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /x HTTP/1.1\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: a b\r\nConnection: close\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: a/b\r\nConnection: close\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: user@a\r\nConnection: close\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: a:80x\r\nConnection: close\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    ],
    ids=["missing", "space", "slash", "userinfo", "bad port", "two"],
)
async def test_a_missing_or_invalid_host_is_a_400(start_gateway, upstream, request_bytes):
    gw = await hostile_gateway(start_gateway, upstream.url)
    one_problem(await until_closed(gw.port, request_bytes), 400)
    assert upstream.requests == []
    await still_serves(gw, upstream)


@pytest.mark.parametrize("host", ["", "a:8080", "[::1]:80", "127.0.0.1", "shop.example."])
async def test_well_formed_hosts_are_served(start_gateway, upstream, host):
    # The empty Host is valid (RFC 9110 §7.2); an HTTP/1.0 request may have none at all.
    gw = await hostile_gateway(start_gateway, upstream.url)
    raw = await until_closed(gw.port, f"GET /x HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    assert parse_raw_response(raw)[0] == 200
    raw = await until_closed(gw.port, b"GET /y HTTP/1.0\r\n\r\n")
    assert parse_raw_response(raw)[0] == 200
    assert [r.path for r in upstream.requests] == ["/x", "/y"]


BAD_BYTES = {
    "NUL in path": b"GET /x\x00y HTTP/1.1\r\nHost: a\r\n\r\n",
    "%00 in path": b"GET /x%00y HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    "control in path": b"GET /x\x01y HTTP/1.1\r\nHost: a\r\n\r\n",
    "UTF-8 in path": b"GET /caf\xc3\xa9 HTTP/1.1\r\nHost: a\r\n\r\n",
    "latin-1 in path": b"GET /caf\xe9 HTTP/1.1\r\nHost: a\r\n\r\n",
    "NUL in header value": b"GET /x HTTP/1.1\r\nHost: a\r\nX-A: b\x00c\r\n\r\n",
    "CR in header value": b"GET /x HTTP/1.1\r\nHost: a\r\nX-A: b\rc\r\n\r\n",
    "control in header value": b"GET /x HTTP/1.1\r\nHost: a\r\nX-A: b\x01c\r\n\r\n",
    "non-UTF-8 header value": b"GET /x HTTP/1.1\r\nHost: a\r\nX-A: caf\xe9\r\nConnection: close\r\n\r\n",  # was forwarded as "caf"
    "non-ASCII header name": b"GET /x HTTP/1.1\r\nHost: a\r\nX-\xc3\xa9: b\r\n\r\n",
    "obs-fold": b"GET /x HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\n\r\n",
}


@pytest.mark.parametrize("request_bytes", list(BAD_BYTES.values()), ids=list(BAD_BYTES))
async def test_bytes_that_have_no_place_in_a_head_are_a_400(start_gateway, upstream, request_bytes):
    gw = await hostile_gateway(start_gateway, upstream.url)
    one_problem(await until_closed(gw.port, request_bytes), 400)
    assert upstream.requests == []
    await still_serves(gw, upstream)


async def test_utf8_in_a_header_value_is_forwarded_unchanged(start_gateway, upstream):
    # obs-text (RFC 9110 §5.5) that is UTF-8 is passed on byte for byte, as nginx does.
    gw = await hostile_gateway(start_gateway, upstream.url)
    raw = await until_closed(gw.port, b"GET /x HTTP/1.1\r\nHost: a\r\nX-A: caf\xc3\xa9\r\nConnection: close\r\n\r\n")
    assert parse_raw_response(raw)[0] == 200
    assert [r.headers["X-A"] for r in upstream.requests] == ["café"]


# -- 3. limits and slow clients -------------------------------------------------------------


async def test_an_oversized_request_line_is_a_414(start_gateway, upstream):
    gw = await hostile_gateway(start_gateway, upstream.url)
    one_problem(await until_closed(gw.port, f"GET /{'a' * 1100} HTTP/1.1\r\nHost: a\r\n\r\n".encode()), 414)
    assert upstream.requests == []
    await still_serves(gw, upstream)


async def test_an_oversized_header_is_a_431(start_gateway, upstream):
    gw = await hostile_gateway(start_gateway, upstream.url)
    one_problem(await until_closed(gw.port, f"GET /x HTTP/1.1\r\nHost: a\r\nX-Big: {'b' * 2100}\r\n\r\n".encode()), 431)
    assert upstream.requests == []
    await still_serves(gw, upstream)


async def test_a_slow_head_is_a_408_and_the_connection_closes(start_gateway, upstream):
    gw = await hostile_gateway(start_gateway, upstream.url)
    loop = asyncio.get_running_loop()
    started = loop.time()
    raw = await until_closed(gw.port, b"GET /x HTTP/1.1\r\nHost: a\r\nX-Half: ", timeout=3)
    assert loop.time() - started >= 0.9  # header_timeout: 1s
    one_problem(raw, 408)
    assert upstream.requests == []
    await still_serves(gw, upstream)


async def test_a_slow_body_is_a_408_and_no_complete_request_is_forwarded(start_gateway, upstream):
    gw = await hostile_gateway(start_gateway, upstream.url)
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    started = loop.time()
    writer.write(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n12345")
    try:
        raw = await asyncio.wait_for(reader.readuntil(b"}"), 3)  # the problem body ends the answer
    finally:
        writer.close()
    assert loop.time() - started >= 0.9  # body_timeout: 1s
    one_problem(raw, 408)
    # The gateway will not read another request here. (aiohttp then lingers up to 10 s for the
    # rest of the body before it closes the socket, as nginx's lingering_close does, 5 s idle.)
    assert parse_raw_response(raw)[1]["connection"] == "close"
    # The head and 5 bytes were streamed on; the upstream connection was then cut, so the
    # upstream never received a whole request.
    assert upstream.requests == []
    await still_serves(gw, upstream)


async def test_a_quiet_client_gets_nothing_before_its_head_completes(start_gateway, upstream):
    # raw_request stops when the server goes quiet: half a head gets no early answer.
    gw = await hostile_gateway(start_gateway, upstream.url)
    assert await raw_request(gw.port, b"GET /x HTTP/1.1\r\nHost", read_timeout=0.3) == b""
    assert upstream.requests == []


async def test_idle_connections_cannot_exhaust_the_listener(upstream, start_gateway) -> None:
    """listen.limits.max_connections: over the limit, the longest-idle connection is closed."""
    import asyncio as _asyncio

    config = base_config(upstream.url)
    config["listen"]["limits"] = {"max_connections": 5}
    gateway = await start_gateway(config)
    idle = []
    for _ in range(5):  # five clients that sent nothing and keep their sockets open
        reader, writer = await _asyncio.open_connection("127.0.0.1", gateway.port)
        idle.append((reader, writer))
    await _asyncio.sleep(0.1)
    data = await raw_request(gateway.port, b"GET /x HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
    assert parse_raw_response(data)[0] == 200  # the sixth still gets an answer
    closed = 0
    for reader, writer in idle:
        try:
            if await _asyncio.wait_for(reader.read(1), 1.0) == b"":
                closed += 1
        except _asyncio.TimeoutError:
            pass
        writer.close()
    assert closed >= 1  # an idle one made room


async def test_when_every_connection_is_busy_a_new_one_is_refused_and_the_busy_ones_finish(upstream, start_gateway) -> None:
    import asyncio as _asyncio

    from aiohttp import web as _web

    release = _asyncio.Event()

    async def slow(request: _web.Request) -> _web.Response:
        await release.wait()
        return _web.json_response({"ok": True})

    upstream.handler = slow
    config = base_config(upstream.url)
    config["listen"]["limits"] = {"max_connections": 3}
    gateway = await start_gateway(config)
    busy = [_asyncio.create_task(raw_request(gateway.port, b"GET /x HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n", read_timeout=10)) for _ in range(3)]
    for _ in range(100):
        if len(upstream.requests) == 3:
            break
        await _asyncio.sleep(0.05)
    assert len(upstream.requests) == 3
    refused = await raw_request(gateway.port, b"GET /y HTTP/1.1\r\nHost: gw\r\n\r\n", read_timeout=2)
    assert refused == b""  # closed at once: no answer, nothing forwarded
    release.set()
    answers = await _asyncio.gather(*busy)
    assert [parse_raw_response(a)[0] for a in answers] == [200, 200, 200]
    assert [r.path for r in upstream.requests].count("/y") == 0


async def test_trace_is_refused_unless_a_route_lists_it(upstream, start_gateway) -> None:
    config = base_config(upstream.url)
    config["routes"].insert(0, {"name": "diagnostics", "match": {"path": "/diag", "methods": ["TRACE"]}, "upstream": "api"})
    gateway = await start_gateway(config)
    data = await raw_request(gateway.port, b"TRACE /x HTTP/1.1\r\nHost: gw\r\nCookie: session=secret\r\nConnection: close\r\n\r\n")
    status, headers, body = parse_raw_response(data)
    assert_problem(status, headers, body, 405)
    assert "TRACE" not in headers["allow"] and "GET" in headers["allow"]
    assert upstream.requests == []
    data = await raw_request(gateway.port, b"TRACE /diag HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
    assert parse_raw_response(data)[0] == 200  # listed on purpose: forwarded
    assert [r.method for r in upstream.requests] == ["TRACE"]


async def test_request_lines_of_other_http_versions_are_a_505(upstream, start_gateway) -> None:
    gateway = await start_gateway(base_config(upstream.url))
    # aiohttp's parser refuses versions it cannot read (400); those it reads but the gateway does
    # not serve (2.0 framed as HTTP/1, and 0.9) get a 505 problem.
    for line, expected in ((b"GET /x HTTP/2.0", 505), (b"GET /x", 505), (b"GET /x HTTP/1.2", 400), (b"GET /x HTTP/3.0", 400)):
        data = await raw_request(gateway.port, line + b"\r\nHost: gw\r\nConnection: close\r\n\r\n")
        status, headers, body = parse_raw_response(data)
        assert_problem(status, headers, body, expected)
    assert upstream.requests == []
