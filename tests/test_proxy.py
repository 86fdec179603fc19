"""Forwarding over real sockets: headers both ways, request ids, upstream failures, balancing."""

from __future__ import annotations

import asyncio
import json
import re

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import assert_problem, base_config, free_port, parse_raw_response, raw_request


async def test_a_request_is_forwarded_with_its_method_path_query_and_body(start_gateway, upstream, client):
    gw = await start_gateway(base_config(upstream.url))
    async with client.post(gw.url + "/api/orders?b=2&a=1", data=b'{"qty": 3}', headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 200
        assert (await resp.json())["upstream"] == upstream.port
    received = upstream.requests[-1]
    assert (received.method, received.path, received.body) == ("POST", "/api/orders?b=2&a=1", b'{"qty": 3}')
    assert received.headers["Content-Type"] == "application/json"


async def test_the_upstream_gets_the_target_host_and_forwarded_headers(start_gateway, upstream, client):
    gw = await start_gateway(base_config(upstream.url))
    async with client.get(gw.url + "/x", headers={"Host": "shop.example", "X-Forwarded-For": "6.6.6.6", "X-Forwarded-Proto": "https"}) as resp:
        assert resp.status == 200
    headers = upstream.requests[-1].headers
    assert headers["Host"] == f"127.0.0.1:{upstream.port}"
    # The client is not a trusted proxy: what it claims is replaced, not extended.
    assert headers["X-Forwarded-For"] == "127.0.0.1"
    assert headers["X-Forwarded-Proto"] == "http"
    assert headers["X-Forwarded-Host"] == "shop.example"
    assert headers["Via"] == "1.1 gateway"


async def test_a_trusted_proxy_extends_x_forwarded_for_and_names_the_client(start_gateway, upstream, client):
    config = base_config(upstream.url)
    config["listen"]["trusted_proxies"] = ["127.0.0.0/8"]
    config["logging"]["access_log"] = True
    gw = await start_gateway(config)
    headers = {"X-Forwarded-For": "203.0.113.9, 10.1.1.1", "X-Forwarded-Proto": "https", "Via": "1.1 edge"}
    async with client.get(gw.url + "/x", headers=headers) as resp:
        assert resp.status == 200
    received = upstream.requests[-1].headers
    assert received["X-Forwarded-For"] == "203.0.113.9, 10.1.1.1, 127.0.0.1"
    assert received["X-Forwarded-Proto"] == "https"
    assert received["Via"] == "1.1 edge, 1.1 gateway"
    forwarding = gw.gateway.runtime.forwarding
    assert forwarding.client_ip("127.0.0.1", "203.0.113.9, 10.1.1.1") == "10.1.1.1"
    assert forwarding.client_ip("127.0.0.1", "203.0.113.9, 127.0.0.5") == "203.0.113.9"
    assert forwarding.client_ip("198.51.100.1", "203.0.113.9") == "198.51.100.1"


async def test_preserve_host_sends_the_clients_host(start_gateway, upstream, client):
    config = base_config(upstream.url)
    config["upstreams"]["api"]["preserve_host"] = True
    gw = await start_gateway(config)
    async with client.get(gw.url + "/x", headers={"Host": "shop.example"}) as resp:
        assert resp.status == 200
    assert upstream.requests[-1].headers["Host"] == "shop.example"


async def test_hop_by_hop_headers_are_removed_in_both_directions(start_gateway, upstream):
    async def answer(request: web.Request) -> web.StreamResponse:
        response = web.Response(text="ok", headers={"Connection": "X-Internal", "X-Internal": "secret", "Keep-Alive": "timeout=5", "X-Kept": "1"})
        return response

    upstream.handler = answer
    gw = await start_gateway(base_config(upstream.url))
    request = (
        b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, X-Drop-Me\r\nX-Drop-Me: 1\r\nKeep-Alive: 300\r\n"
        b"TE: trailers\r\nProxy-Authorization: Basic abc\r\nProxy-Connection: keep-alive\r\nUpgrade: h2c\r\nX-Kept: yes\r\n\r\n"
    )
    status, headers, _ = parse_raw_response(await raw_request(gw.port, request, read_timeout=1))
    assert status == 200
    received = {name.lower() for name in upstream.requests[-1].headers}
    for name in ("x-drop-me", "keep-alive", "te", "proxy-authorization", "proxy-connection", "upgrade"):
        assert name not in received
    assert upstream.requests[-1].headers["X-Kept"] == "yes"
    assert "x-internal" not in headers and "keep-alive" not in headers
    assert headers["x-kept"] == "1"


async def test_a_well_formed_request_id_is_kept_and_echoed(start_gateway, upstream, client):
    gw = await start_gateway(base_config(upstream.url))
    async with client.get(gw.url + "/x", headers={"X-Request-ID": "trace-42:a.b_c"}) as resp:
        assert resp.headers["X-Request-ID"] == "trace-42:a.b_c"
    assert upstream.requests[-1].headers["X-Request-ID"] == "trace-42:a.b_c"


async def test_a_malformed_request_id_is_replaced(start_gateway, upstream, client):
    gw = await start_gateway(base_config(upstream.url))
    for bad in ("a" * 129, "has space", "semi;colon", "<script>"):
        async with client.get(gw.url + "/x", headers={"X-Request-ID": bad}) as resp:
            new_id = resp.headers["X-Request-ID"]
        assert new_id != bad and len(new_id) == 32
        assert upstream.requests[-1].headers["X-Request-ID"] == new_id


async def test_no_route_is_a_404_problem_with_the_request_id(start_gateway, upstream, client):
    config = base_config(upstream.url)
    config["routes"][0]["match"] = {"path": "/api"}
    gw = await start_gateway(config)
    async with client.get(gw.url + "/apix", headers={"X-Request-ID": "abc"}) as resp:
        document = assert_problem(resp.status, resp.headers, await resp.read(), 404)
        assert document["request_id"] == "abc" == resp.headers["X-Request-ID"]
        assert resp.headers["Cache-Control"] == "no-store"
    assert upstream.requests == []


async def test_a_refused_connection_is_a_502_problem_without_internal_details(start_gateway, client):
    dead = f"http://127.0.0.1:{free_port()}"
    gw = await start_gateway(base_config(dead))
    async with client.get(gw.url + "/x") as resp:
        body = await resp.read()
        document = assert_problem(resp.status, resp.headers, body, 502)
    assert "127.0.0.1" not in body.decode() and "Error" not in document["detail"]


async def test_an_upstream_slower_than_the_read_timeout_is_a_504(start_gateway, upstream, client):
    async def slow(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(3)
        return web.Response(text="late")

    upstream.handler = slow
    config = base_config(upstream.url)
    config["upstreams"]["api"]["timeouts"]["read"] = "300ms"
    gw = await start_gateway(config)
    async with client.get(gw.url + "/x") as resp:
        assert_problem(resp.status, resp.headers, await resp.read(), 504)


async def test_upstream_errors_pass_through_as_the_upstream_sent_them(start_gateway, upstream, client):
    async def teapot(request: web.Request) -> web.StreamResponse:
        return web.Response(status=418, text="short and stout", headers={"X-Why": "tea"})

    upstream.handler = teapot
    gw = await start_gateway(base_config(upstream.url))
    async with client.get(gw.url + "/x") as resp:
        assert resp.status == 418
        assert await resp.text() == "short and stout"
        assert resp.headers["X-Why"] == "tea"


async def test_round_robin_spreads_requests_over_targets(start_gateway, upstream_factory, client):
    a, b, c = [await upstream_factory() for _ in range(3)]
    gw = await start_gateway(base_config(a.url, b.url, c.url))
    for _ in range(9):
        async with client.get(gw.url + "/x") as resp:
            assert resp.status == 200
    assert [len(a.requests), len(b.requests), len(c.requests)] == [3, 3, 3]


async def test_random_balance_reaches_every_target(start_gateway, upstream_factory, client):
    a, b = [await upstream_factory() for _ in range(2)]
    config = base_config(a.url, b.url)
    config["upstreams"]["api"]["balance"] = "random"
    gw = await start_gateway(config)
    for _ in range(40):
        async with client.get(gw.url + "/x") as resp:
            assert resp.status == 200
    assert len(a.requests) + len(b.requests) == 40
    assert a.requests and b.requests


async def test_least_conn_avoids_the_busy_target(start_gateway, upstream_factory, client):
    slow, fast = [await upstream_factory() for _ in range(2)]
    release = asyncio.Event()

    async def hold(request: web.Request) -> web.StreamResponse:
        await release.wait()
        return web.Response(text="slow")

    slow.handler = hold
    config = base_config(slow.url, fast.url)
    config["upstreams"]["api"]["balance"] = "least_conn"
    gw = await start_gateway(config)
    held = asyncio.ensure_future(client.get(gw.url + "/held"))
    while not slow.requests:
        await asyncio.sleep(0.01)
    for _ in range(5):
        async with client.get(gw.url + "/x") as resp:
            assert resp.status == 200
    assert len(fast.requests) == 5 and len(slow.requests) == 1
    release.set()
    (await held).release()


async def test_idempotent_requests_are_retried_on_another_target(start_gateway, upstream, client):
    dead = f"http://127.0.0.1:{free_port()}"
    gw = await start_gateway(base_config(dead, upstream.url))
    for _ in range(4):
        async with client.get(gw.url + "/x") as resp:
            assert resp.status == 200


async def test_a_503_from_one_target_is_retried_on_another_for_get(start_gateway, upstream_factory, client):
    failing, healthy = [await upstream_factory() for _ in range(2)]

    async def unavailable(request: web.Request) -> web.StreamResponse:
        return web.Response(status=503, text="down")

    failing.handler = unavailable
    gw = await start_gateway(base_config(failing.url, healthy.url))
    for _ in range(4):
        async with client.get(gw.url + "/x") as resp:
            assert resp.status == 200
    assert len(healthy.requests) == 4


async def test_post_is_never_retried(start_gateway, upstream_factory, client):
    failing, healthy = [await upstream_factory() for _ in range(2)]

    async def unavailable(request: web.Request) -> web.StreamResponse:
        return web.Response(status=503, text="down")

    failing.handler = unavailable
    gw = await start_gateway(base_config(failing.url, healthy.url))
    statuses = []
    for _ in range(4):
        async with client.post(gw.url + "/x", data=b"order") as resp:
            statuses.append(resp.status)
    # Round robin alternates: the POSTs that hit the failing target get its 503, not a retry.
    assert sorted(statuses) == [200, 200, 503, 503]
    assert len(failing.requests) == 2 and len(healthy.requests) == 2


async def test_post_to_a_dead_target_is_a_502_not_a_retry(start_gateway, upstream, client):
    dead = f"http://127.0.0.1:{free_port()}"
    config = base_config(dead, upstream.url)
    config["upstreams"]["api"]["health"] = {"passive": False}
    gw = await start_gateway(config)
    statuses = []
    for _ in range(2):
        async with client.post(gw.url + "/x", data=b"payload") as resp:
            statuses.append(resp.status)
    assert sorted(statuses) == [200, 502]


async def test_a_failing_target_is_ejected_and_all_ejected_is_a_503_with_retry_after(start_gateway, upstream, client):
    async def broken(request: web.Request) -> web.StreamResponse:
        return web.Response(status=502, text="bad")

    upstream.handler = broken
    config = base_config(upstream.url)
    config["upstreams"]["api"].update(retries=0, health={"passive": {"failures": 3, "eject_for": "30s"}})
    gw = await start_gateway(config)
    for _ in range(3):
        async with client.get(gw.url + "/x") as resp:
            assert resp.status == 502
    async with client.get(gw.url + "/x") as resp:
        assert_problem(resp.status, resp.headers, await resp.read(), 503)
        assert 1 <= int(resp.headers["Retry-After"]) <= 30
    assert len(upstream.requests) == 3
    async with client.get(gw.admin_url + "/readyz") as resp:
        body = await resp.json()
    assert body["checks"]["upstreams"]["api"]["targets"][upstream.url]["status"] == "ejected"


async def test_an_ejected_target_returns_after_eject_for(start_gateway, upstream, client):
    calls = []

    async def flaky(request: web.Request) -> web.StreamResponse:
        calls.append(1)
        return web.Response(status=503 if len(calls) <= 2 else 200, text="x")

    upstream.handler = flaky
    config = base_config(upstream.url)
    config["upstreams"]["api"].update(retries=0, health={"passive": {"failures": 2, "eject_for": "200ms"}})
    gw = await start_gateway(config)
    for _ in range(2):
        async with client.get(gw.url + "/x") as resp:
            assert resp.status == 503
    async with client.get(gw.url + "/x") as resp:
        assert resp.status == 503 and "Retry-After" in resp.headers  # ejected: the gateway's own 503
    await asyncio.sleep(0.3)
    async with client.get(gw.url + "/x") as resp:
        assert resp.status == 200


async def test_active_checks_take_a_target_out_and_back(start_gateway, upstream_factory, client):
    a, b = [await upstream_factory() for _ in range(2)]
    healthy = {"a": True}

    async def health(request: web.Request) -> web.StreamResponse:
        if request.path == "/health":
            return web.Response(status=200 if healthy["a"] else 500)
        return web.json_response({"upstream": "a"})

    a.handler = health
    config = base_config(a.url, b.url)
    config["upstreams"]["api"]["health"] = {"active": {"path": "/health", "interval": "50ms", "failures": 1, "successes": 1}}
    gw = await start_gateway(config)
    healthy["a"] = False
    await asyncio.sleep(0.3)
    before = len([r for r in a.requests if r.path != "/health"])
    for _ in range(4):
        async with client.get(gw.url + "/x") as resp:
            assert resp.status == 200
    assert len([r for r in a.requests if r.path != "/health"]) == before
    healthy["a"] = True
    await asyncio.sleep(0.3)
    for _ in range(4):
        async with client.get(gw.url + "/x") as resp:
            assert resp.status == 200
    assert len([r for r in a.requests if r.path != "/health"]) > before


async def test_expect_100_continue_is_answered_and_the_body_forwarded(start_gateway, upstream):
    gw = await start_gateway(base_config(upstream.url))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
    await writer.drain()
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert interim.startswith(b"HTTP/1.1 100")
    writer.write(b"hello")
    await writer.drain()
    final = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert final.startswith(b"HTTP/1.1 200")
    writer.close()
    assert upstream.requests[-1].body == b"hello"
    assert "Expect" not in upstream.requests[-1].headers


async def test_a_chunked_request_body_is_forwarded(start_gateway, upstream):
    gw = await start_gateway(base_config(upstream.url))
    request = b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    status, _, _ = parse_raw_response(await raw_request(gw.port, request))
    assert status == 200
    assert upstream.requests[-1].body == b"hello world"


async def test_a_client_that_stalls_mid_body_gets_a_408(start_gateway, upstream):
    config = base_config(upstream.url)
    config["listen"]["limits"] = {"body_timeout": "300ms"}
    gw = await start_gateway(config)
    request = b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\nonly part"
    status, headers, body = parse_raw_response(await raw_request(gw.port, request, read_timeout=3))
    assert_problem(status, headers, body, 408)


async def test_websocket_upgrades_are_relayed_both_ways(start_gateway, upstream, client):
    async def echo(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(protocols=["chat"])
        await ws.prepare(request)
        async for message in ws:
            if message.type == aiohttp.WSMsgType.TEXT:
                await ws.send_str("echo:" + message.data)
            elif message.type == aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(message.data[::-1])
        return ws

    upstream.handler = echo
    gw = await start_gateway(base_config(upstream.url))
    async with client.ws_connect(gw.url + "/ws", protocols=["chat"]) as ws:
        assert ws.protocol == "chat"
        await ws.send_str("hi")
        assert (await ws.receive(timeout=5)).data == "echo:hi"
        await ws.send_bytes(b"abc")
        assert (await ws.receive(timeout=5)).data == b"cba"
    assert upstream.requests[-1].headers["X-Forwarded-For"] == "127.0.0.1"


async def test_a_refused_websocket_handshake_is_a_problem_response(start_gateway, upstream, client):
    async def refuse(request: web.Request) -> web.StreamResponse:
        return web.Response(status=403, text="no")

    upstream.handler = refuse
    gw = await start_gateway(base_config(upstream.url))
    async with client.get(gw.url + "/ws", headers={"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version": "13"}) as resp:
        assert_problem(resp.status, resp.headers, await resp.read(), 403)


async def test_the_access_log_has_one_line_per_request(start_gateway, upstream, client, tmp_path):
    import io

    from gateway.access_log import AccessLog

    stream = io.StringIO()
    log = AccessLog(True, True, stream)
    gw = await start_gateway(base_config(upstream.url), access_log=log)
    async with client.post(gw.url + "/api/x?q=1", data=b"12345", headers={"X-Request-ID": "rid-1"}) as resp:
        await resp.read()
    log.close()
    line = json.loads(stream.getvalue().strip().splitlines()[-1])
    assert line["request_id"] == "rid-1"
    assert (line["method"], line["path"], line["route"], line["status"]) == ("POST", "/api/x", "all", 200)
    assert line["upstream"] == upstream.url and line["upstream_status"] == 200
    assert line["bytes_in"] == 5 and line["bytes_out"] > 0 and line["duration_ms"] > 0
    assert line["client_ip"] == "127.0.0.1" and line["time"].endswith("Z")


async def test_under_load_the_access_log_writes_every_line_a_batch_at_a_time(start_gateway, upstream, client):
    # One write (and one wake-up of the writer thread) per request cost the event loop GIL
    # handoffs; lines are gathered instead. None may be lost for it.
    import io

    from gateway.access_log import AccessLog

    class Stream(io.StringIO):
        writes = 0

        def write(self, text: str) -> int:
            Stream.writes += 1
            return super().write(text)

    stream = Stream()
    log = AccessLog(True, True, stream)
    gw = await start_gateway(base_config(upstream.url), access_log=log)

    async def one(n: int) -> None:
        async with client.get(gw.url + f"/x?n={n}", headers={"X-Request-ID": f"rid-{n:04d}"}) as resp:
            await resp.read()

    for wave in range(10):
        await asyncio.gather(*(one(wave * 40 + i) for i in range(40)))
    log.close()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert sorted(line["request_id"] for line in lines) == [f"rid-{n:04d}" for n in range(400)]
    assert all(line["status"] == 200 for line in lines)
    assert Stream.writes <= 100, f"{Stream.writes} writes for 400 lines"


@pytest.mark.parametrize("timestamp", [0.5, 1700000000.0, 1700000000.9995, 1700000000.123999, 1764424898.9999996, 4102444799.999])
def test_log_times_are_utc_iso_with_milliseconds_as_datetime_writes_them(timestamp: float) -> None:
    """Log lines' times: the date and time of day are formatted once per second, the same text as datetime's."""
    from datetime import datetime, timezone

    from gateway.access_log import _iso

    expected = datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    _iso(timestamp - 1)  # another second memoised first
    assert _iso(timestamp) == expected


async def test_an_upstream_that_dies_mid_body_leaves_the_client_a_truncated_response(start_gateway, upstream, client):
    async def dies(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()  # chunked: only the final chunk says the body is whole
        await response.prepare(request)
        await response.write(b"partial")
        await asyncio.sleep(0.1)
        request.transport.abort()
        return response

    upstream.handler = dies
    gw = await start_gateway(base_config(upstream.url))
    async with client.get(gw.url + "/x") as resp:
        assert resp.status == 200
        try:
            await resp.read()
        except aiohttp.ClientPayloadError:
            pass
        else:
            raise AssertionError("the client was shown a complete body")


async def test_a_client_traceparent_is_passed_on_and_logged_and_a_trace_is_started_otherwise(start_gateway, upstream, client):
    import io

    from gateway.access_log import AccessLog

    stream = io.StringIO()
    log = AccessLog(True, True, stream)
    gw = await start_gateway(base_config(upstream.url), access_log=log)
    incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    for headers in ({"traceparent": incoming}, {}, {"traceparent": "00-zz-broken-01"}):
        async with client.get(gw.url + "/", headers=headers) as resp:
            await resp.read()
    log.close()
    lines = [json.loads(line) for line in stream.getvalue().strip().splitlines()]
    sent = [r.headers["traceparent"] for r in upstream.requests]
    assert sent[0] == incoming and lines[0]["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    for header, line in zip(sent[1:], lines[1:]):  # none, or a malformed one: a new trace
        assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-00", header) and header.split("-")[1] == line["trace_id"]
    assert sent[1] != sent[2]
    assert all(line["upstream_ms"] > 0 for line in lines)


@pytest.mark.parametrize(("strict", "status", "state"), [((), 200, "degraded"), (("upstreams",), 503, "unready")])
async def test_readiness_follows_the_configured_rule_when_an_upstream_is_down(strict, status, state, start_gateway, client):
    config = base_config(f"http://127.0.0.1:{free_port()}")
    config["upstreams"]["api"]["health"] = {"passive": {"failures": 1, "eject_for": "1m"}}
    config["admin"] = {"host": "127.0.0.1", "port": 0, "unready_when_degraded": list(strict)}
    gw = await start_gateway(config)
    async with client.get(gw.url + "/") as resp:
        assert resp.status == 502
    async with client.get(gw.admin_url + "/readyz") as resp:
        body = await resp.json()
        assert resp.status == status and body["status"] == state
        assert body["checks"]["upstreams"]["api"]["status"] == "down"


RAW_ANSWERS = {
    # path → what the upstream writes, in one write (the whole answer arrives with its head)
    "/small": b"HTTP/1.1 203 Fine Thanks\r\nContent-Length: 5\r\nX-Kept: yes\r\n\r\nhello",
    "/chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhel\r\n2\r\nlo\r\n0\r\n\r\n",
    "/empty": b"HTTP/1.1 204 No Content\r\nX-Kept: yes\r\n\r\n",
    "/not-modified": b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\n\r\n',
}


@pytest.mark.parametrize(
    ("method", "path", "status", "reason", "body", "length"),
    [
        pytest.param("GET", "/small", 203, "Fine Thanks", b"hello", "5", id="a small answer keeps its status line and headers"),
        pytest.param("GET", "/chunked", 200, "OK", b"hello", None, id="a chunked answer arrives whole"),
        pytest.param("HEAD", "/small", 203, "Fine Thanks", b"", "1234", id="HEAD keeps the upstream's Content-Length"),
        pytest.param("GET", "/empty", 204, "No Content", b"", None, id="204 has no body and no length"),
        pytest.param("GET", "/not-modified", 304, "Not Modified", b"", None, id="304 has no body"),
    ],
)
async def test_an_answer_that_came_whole_goes_to_the_client_as_the_upstream_gave_it(start_gateway, method, path, status, reason, body, length):
    # Small answers that arrive with their head are written to the client together with the head;
    # streamed or not, the client must see the same status line, headers and body.
    connections: list[asyncio.StreamWriter] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        head = await reader.readuntil(b"\r\n\r\n")
        asked_method, asked_path = head.split(b" ")[:2]
        raw = RAW_ANSWERS[asked_path.decode()]
        if asked_method == b"HEAD":
            raw = raw.replace(b"Content-Length: 5", b"Content-Length: 1234").rpartition(b"\r\n\r\n")[0] + b"\r\n\r\n"
        writer.write(raw)
        await writer.drain()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        gw = await start_gateway(base_config(f"http://127.0.0.1:{port}"))
        raw = await raw_request(gw.port, f"{method} {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".encode())
        status_line = raw.partition(b"\r\n")[0].decode()
        got_status, headers, got_body = parse_raw_response(raw)
        if headers.get("transfer-encoding") == "chunked":
            got_body = dechunk(got_body)
        assert status_line == f"HTTP/1.1 {status} {reason}"
        assert (got_status, got_body) == (status, body)
        if length is not None:
            assert headers.get("content-length") == length
        if status in (204, 304):
            assert "content-length" not in headers and "transfer-encoding" not in headers
        if b"X-Kept" in RAW_ANSWERS[path]:
            assert headers["x-kept"] == "yes"
    finally:
        for writer in connections:
            writer.close()
        server.close()


def dechunk(data: bytes) -> bytes:
    body = b""
    while True:
        size, _, data = data.partition(b"\r\n")
        if int(size, 16) == 0:
            return body
        body, data = body + data[: int(size, 16)], data[int(size, 16) + 2 :]
