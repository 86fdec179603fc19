"""Path normalisation, route matching, and what clients get for paths and heads that are refused."""

from __future__ import annotations

import asyncio

import pytest

from gateway.routing import BadPath, decoded_path, normalise_path
from tests.conftest import assert_problem, base_config, parse_raw_response, raw_request


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("/api/products", "/api/products"),
        ("/api/../admin", "/admin"),
        ("/%2e%2e/admin", "/admin"),
        ("/api/%2E%2E/%2e/admin", "/admin"),
        ("//admin", "/admin"),
        ("/api//products///7", "/api/products/7"),
        ("/api/./products/", "/api/products/"),
        ("/../../etc/passwd", "/etc/passwd"),
        ("/api/products/..", "/api/"),
        ("/%7Euser/%41bc", "/~user/Abc"),
        ("/caf%c3%a9", "/caf%C3%A9"),
        ("/a%20b", "/a%20b"),
        ("/", "/"),
    ],
)
def test_paths_are_normalised(raw, normal):
    assert normalise_path(raw) == normal


@pytest.mark.parametrize(
    "raw",
    ["/x#frag", "/api/%2F..%2Fadmin", "/api%5c..%5cadmin", "/a\\..\\admin", "/api/%00", "/api/%zz", "/api/%4", "/api/..;/admin", "/api/.;x/y", "api", "/a b"],
)
def test_dangerous_paths_are_refused(raw):
    with pytest.raises(BadPath):
        normalise_path(raw)


def test_escaped_slashes_can_be_kept_inside_their_segment():
    normal = normalise_path("/api/a%2fb/../c", keep_escaped_slashes=True)
    assert normal == "/api/c"
    assert normalise_path("/repos/org%2Fname", keep_escaped_slashes=True) == "/repos/org%2Fname"
    assert decoded_path("/repos/org%2Fname", keep_escaped_slashes=True) == "/repos/org%2Fname"
    assert decoded_path("/caf%C3%A9") == "/café"


def routed_config(upstream_url: str) -> dict:
    config = base_config(upstream_url)
    config["routes"] = [
        {"name": "products", "match": {"path": "/api/products", "methods": ["GET"]}, "upstream": "api"},
        {"name": "products-admin", "match": {"path": "/api/products", "methods": ["DELETE"], "host": "admin.example"}, "upstream": "api"},
        {"name": "orders", "match": {"path_regex": "^/api/orders/[0-9]+$", "methods": ["GET", "PUT"]}, "upstream": "api"},
        {"name": "shop", "match": {"path": "/shop", "host": "*.example.com"}, "upstream": "api"},
    ]
    return config


async def test_a_prefix_matches_whole_segments_only(start_gateway, upstream, client):
    gw = await start_gateway(routed_config(upstream.url))
    for path, status in [("/api/products", 200), ("/api/products/7", 200), ("/api/productsx", 404), ("/api/product", 404)]:
        async with client.get(gw.url + path) as resp:
            assert resp.status == status, path


async def test_get_routes_answer_head_and_other_methods_get_405_with_allow(start_gateway, upstream, client):
    gw = await start_gateway(routed_config(upstream.url))
    async with client.head(gw.url + "/api/products") as resp:
        assert resp.status == 200
    before = len(upstream.requests)
    async with client.post(gw.url + "/api/products", data=b"x") as resp:
        assert_problem(resp.status, resp.headers, await resp.read(), 405)
        assert resp.headers["Allow"] == "GET, HEAD"
    assert len(upstream.requests) == before


async def test_path_regex_and_host_patterns_select_routes(start_gateway, upstream, client):
    gw = await start_gateway(routed_config(upstream.url))
    async with client.put(gw.url + "/api/orders/12", data=b"{}") as resp:
        assert resp.status == 200
    async with client.get(gw.url + "/api/orders/abc") as resp:
        assert resp.status == 404
    async with client.delete(gw.url + "/api/products/1", headers={"Host": "admin.example:8080"}) as resp:
        assert resp.status == 200
    async with client.get(gw.url + "/shop/x", headers={"Host": "eu.example.com"}) as resp:
        assert resp.status == 200
    async with client.get(gw.url + "/shop/x", headers={"Host": "example.com"}) as resp:
        assert resp.status == 404
    async with client.get(gw.url + "/shop/x", headers={"Host": "evil-example.com"}) as resp:
        assert resp.status == 404


@pytest.mark.parametrize("attack", ["/api/../admin", "/%2e%2e/admin", "//admin", "/api/products/%2e%2e/%2e%2e/admin", "/./admin"])
async def test_traversal_cannot_reach_a_route_its_policies_did_not_see(start_gateway, upstream, attack):
    config = base_config(upstream.url)
    config["routes"] = [{"name": "public", "match": {"path": "/api"}, "upstream": "api"}]
    gw = await start_gateway(config)
    raw = f"GET {attack} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".encode()
    status, headers, body = parse_raw_response(await raw_request(gw.port, raw))
    # /admin is no route's: a 404 from the gateway, and nothing reaches the upstream.
    assert_problem(status, headers, body, 404)
    assert upstream.requests == []


async def test_the_normalised_path_is_what_gets_forwarded(start_gateway, upstream):
    gw = await start_gateway(base_config(upstream.url))
    raw = b"GET /api/v1/../products//%7e7/./x?q=a%2Fb&z HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    status, _, _ = parse_raw_response(await raw_request(gw.port, raw))
    assert status == 200
    assert upstream.requests[-1].path == "/api/products/~7/x?q=a%2Fb&z"


@pytest.mark.parametrize("path", ["/api/x#frag", "/api/%2F..%2Fadmin", "/api/..;/admin", "/api/%00x", "/api/%gg", "/a\\b"])
async def test_refused_paths_are_a_400_problem_and_not_forwarded(start_gateway, upstream, path):
    gw = await start_gateway(base_config(upstream.url))
    raw = f"GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".encode()
    status, headers, body = parse_raw_response(await raw_request(gw.port, raw))
    assert_problem(status, headers, body, 400)
    assert upstream.requests == []


async def test_too_many_headers_is_a_431(start_gateway, upstream):
    config = base_config(upstream.url)
    config["listen"]["limits"] = {"max_headers": 20}
    gw = await start_gateway(config)
    headers = "".join(f"X-H{i}: v\r\n" for i in range(30))
    raw = f"GET /x HTTP/1.1\r\nHost: a\r\n{headers}\r\n".encode()
    status, headers_out, body = parse_raw_response(await raw_request(gw.port, raw))
    assert_problem(status, headers_out, body, 431)
    assert upstream.requests == []


async def test_headers_larger_than_max_header_size_are_a_431(start_gateway, upstream):
    config = base_config(upstream.url)
    config["listen"]["limits"] = {"max_header_size": "2kb"}
    gw = await start_gateway(config)
    one_big = f"GET /x HTTP/1.1\r\nHost: a\r\nX-Big: {'a' * 3000}\r\n\r\n".encode()
    many_small = ("GET /x HTTP/1.1\r\nHost: a\r\n" + "".join(f"X-H{i}: {'b' * 100}\r\n" for i in range(25)) + "\r\n").encode()
    for raw in (one_big, many_small):
        status, headers, body = parse_raw_response(await raw_request(gw.port, raw))
        assert_problem(status, headers, body, 431)
    assert upstream.requests == []
    within = f"GET /x HTTP/1.1\r\nHost: a\r\nX-Ok: {'c' * 1500}\r\nConnection: close\r\n\r\n".encode()
    status, _, _ = parse_raw_response(await raw_request(gw.port, within))
    assert status == 200


async def test_a_request_line_longer_than_max_request_line_is_a_414(start_gateway, upstream):
    config = base_config(upstream.url)
    config["listen"]["limits"] = {"max_request_line": "1kb"}
    gw = await start_gateway(config)
    raw = f"GET /{'a' * 2000} HTTP/1.1\r\nHost: a\r\n\r\n".encode()
    status, headers, body = parse_raw_response(await raw_request(gw.port, raw))
    assert_problem(status, headers, body, 414)
    assert upstream.requests == []


async def test_a_malformed_request_is_a_400_problem(start_gateway, upstream):
    gw = await start_gateway(base_config(upstream.url))
    for raw in (
        b"GET /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        b"NOT A REQUEST\r\n\r\n",
    ):
        status, headers, body = parse_raw_response(await raw_request(gw.port, raw))
        assert_problem(status, headers, body, 400)
        assert b"Traceback" not in body
    assert upstream.requests == []


async def test_a_client_that_sends_its_head_too_slowly_gets_a_408(start_gateway, upstream):
    config = base_config(upstream.url)
    config["listen"]["limits"] = {"header_timeout": "300ms"}
    gw = await start_gateway(config)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"GET /x HTTP/1.1\r\nHost: a\r\n")
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 5)  # the gateway answers, then closes
    writer.close()
    status, headers, body = parse_raw_response(data)
    assert_problem(status, headers, body, 408)
    assert upstream.requests == []


async def test_a_slow_head_on_a_kept_alive_connection_is_timed_out_too(start_gateway, upstream):
    config = base_config(upstream.url)
    config["listen"]["limits"] = {"header_timeout": "300ms"}
    gw = await start_gateway(config)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
    first = await asyncio.wait_for(reader.readuntil(b"}"), 5)
    assert first.startswith(b"HTTP/1.1 200")
    await asyncio.sleep(0.5)  # idle between requests is the keep-alive timeout's business
    writer.write(b"GET /y HTTP/1.1\r\n")
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert data.startswith(b"HTTP/1.1 408")
    assert [r.path for r in upstream.requests] == ["/x"]


async def test_an_idle_kept_alive_connection_is_closed_after_the_keepalive_timeout(start_gateway, upstream):
    config = base_config(upstream.url)
    config["listen"]["limits"] = {"keepalive_timeout": "300ms"}
    gw = await start_gateway(config)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
    assert (await asyncio.wait_for(reader.readuntil(b"}"), 5)).startswith(b"HTTP/1.1 200")
    started = asyncio.get_running_loop().time()
    assert await asyncio.wait_for(reader.read(), 10) == b""  # closed by the gateway
    assert asyncio.get_running_loop().time() - started >= 0.25
    writer.close()
