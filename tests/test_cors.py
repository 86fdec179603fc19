"""cors: preflights answered by the gateway, grants on responses, Vary, and config errors.

Over real sockets: a recording upstream, the gateway on 127.0.0.1, an aiohttp client that sends
the headers a browser would (Origin, Access-Control-Request-Method/-Headers).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from aiohttp import web

from gateway.config import parse_config
from gateway.errors import ConfigError
from gateway.pipeline import Exchange, Policy, Reply, problem
from gateway.policies.cors import CorsPolicy
from gateway.settings import Settings
from tests.conftest import assert_problem, base_config, free_port

SHOP = "https://shop.example"
POLICIES = (CorsPolicy,)
PREFLIGHT_VARY = "Origin, Access-Control-Request-Method, Access-Control-Request-Headers"
MARKETPLACE = {
    "origins": [SHOP, "https://*.example.com"],
    "methods": ["GET", "PUT"],
    "headers": ["Authorization", "X-Trace"],
    "expose_headers": ["RateLimit", "X-Request-ID"],
    "credentials": True,
    "max_age": "10m",
}


def cors_config(upstream_url: str, block: dict[str, Any], **route: Any) -> dict[str, Any]:
    config = base_config(upstream_url)
    config["routes"][0].update(cors=block, **route)
    return config


def access_control(headers: Any) -> dict[str, str]:
    """Every Access-Control-* response header; a header sent twice fails the test."""
    names = [name for name in headers if name.lower().startswith("access-control-")]
    assert len(names) == len({name.lower() for name in names}), names
    return {name: headers[name] for name in names}


def preflight_headers(origin: str, method: str, request_headers: str | None = None) -> dict[str, str]:
    headers = {"Origin": origin, "Access-Control-Request-Method": method}
    if request_headers is not None:
        headers["Access-Control-Request-Headers"] = request_headers
    return headers


def answering(headers: dict[str, str]):  # type: ignore[no-untyped-def]
    async def handler(request: web.Request) -> web.Response:
        return web.json_response({"ok": True}, headers=headers)

    return handler


# -- preflights -------------------------------------------------------------------------------


async def test_an_allowed_preflight_is_answered_204_with_exactly_the_cors_headers_and_never_forwarded(
    upstream, start_gateway, client
) -> None:
    gateway = await start_gateway(cors_config(upstream.url, MARKETPLACE), policies=POLICIES)
    headers = preflight_headers(SHOP, "PUT", "authorization,X-TRACE")
    async with client.options(gateway.url + "/api/products/7", headers=headers) as response:
        assert response.status == 204
        assert await response.read() == b""
        assert response.headers.get("Content-Length", "0") == "0"  # RFC 9110 §8.6: none on a 204
        assert access_control(response.headers) == {
            "Access-Control-Allow-Origin": SHOP,
            "Access-Control-Allow-Credentials": "true",
            "Access-Control-Allow-Methods": "GET, PUT",
            "Access-Control-Allow-Headers": "Authorization, X-Trace",
            "Access-Control-Max-Age": "600",
        }
        assert response.headers.getall("Vary") == [PREFLIGHT_VARY]
    assert upstream.requests == []


async def test_a_preflight_is_answered_on_a_route_whose_methods_do_not_include_options(upstream, start_gateway, client) -> None:
    block = {"origins": [SHOP], "methods": ["GET", "POST"], "headers": ["Content-Type"]}
    config = cors_config(upstream.url, block, match={"path": "/api/orders", "methods": ["GET", "POST"]})
    gateway = await start_gateway(config, policies=POLICIES)
    async with client.options(gateway.url + "/api/orders", headers=preflight_headers(SHOP, "POST", "content-type")) as response:
        assert response.status == 204
        assert access_control(response.headers) == {
            "Access-Control-Allow-Origin": SHOP,
            "Access-Control-Allow-Methods": "GET, POST",
            "Access-Control-Allow-Headers": "Content-Type",
        }  # no credentials, no max_age: those headers are not sent
    assert upstream.requests == []


async def test_a_preflight_that_asks_for_no_headers_gets_no_allow_headers(upstream, start_gateway, client) -> None:
    gateway = await start_gateway(cors_config(upstream.url, MARKETPLACE), policies=POLICIES)
    async with client.options(gateway.url + "/", headers=preflight_headers(SHOP, "PUT")) as response:
        assert response.status == 204
        assert "Access-Control-Allow-Headers" not in response.headers
        assert response.headers["Access-Control-Allow-Methods"] == "GET, PUT"


async def test_a_preflight_for_a_safelisted_method_is_answered_even_when_methods_do_not_list_it(upstream, start_gateway, client) -> None:
    # Browsers send GET, HEAD and POST without checking Access-Control-Allow-Methods (Fetch §2.2.1).
    block = {"origins": [SHOP], "methods": ["PUT"], "headers": ["X-Trace"]}
    gateway = await start_gateway(cors_config(upstream.url, block), policies=POLICIES)
    async with client.options(gateway.url + "/", headers=preflight_headers(SHOP, "POST", "x-trace")) as response:
        assert response.status == 204
        assert response.headers["Access-Control-Allow-Origin"] == SHOP


@pytest.mark.parametrize(
    ("origin", "method", "request_headers", "reason"),
    [
        ("https://evil.example", "PUT", "authorization", "origin not allowed"),
        (SHOP, "DELETE", "authorization", "method not allowed"),
        (SHOP, "PUT", "authorization, x-evil-header", "request header is not allowed"),
    ],
    ids=["for an unknown origin", "for a method not listed", "for a header not listed"],
)
async def test_a_refused_preflight_is_a_403_problem_without_cors_headers_and_is_not_forwarded(
    upstream, start_gateway, client, origin: str, method: str, request_headers: str, reason: str
) -> None:
    gateway = await start_gateway(cors_config(upstream.url, MARKETPLACE), policies=POLICIES)
    async with client.options(gateway.url + "/api/x", headers=preflight_headers(origin, method, request_headers)) as response:
        body = await response.read()
        document = assert_problem(response.status, response.headers, body, 403)
        assert access_control(response.headers) == {}
        assert response.headers.getall("Vary") == [PREFLIGHT_VARY]
    assert document["detail"].startswith("CORS preflight refused: ")
    assert reason in document["detail"]
    assert b"evil" not in body  # the untrusted value is never repeated back
    assert upstream.requests == []


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        ("https://a.example.com", True),
        ("https://a.b.example.com", True),
        ("https://example.com", False),
        ("https://evilexample.com", False),
        ("http://a.example.com", False),
        ("https://a.example.com.evil.test", False),
        ("https://a.example.com:8443", False),
        ("https://a_b.example.com", False),
        ("null", False),
    ],
)
async def test_a_wildcard_subdomain_pattern_allows_subdomains_and_refuses_look_alikes(
    upstream, start_gateway, client, origin: str, allowed: bool
) -> None:
    block = {"origins": ["https://*.example.com"], "methods": ["PUT"]}
    gateway = await start_gateway(cors_config(upstream.url, block), policies=POLICIES)
    async with client.options(gateway.url + "/", headers=preflight_headers(origin, "PUT")) as response:
        assert response.status == (204 if allowed else 403)
        assert response.headers.get("Access-Control-Allow-Origin") == (origin if allowed else None)
    async with client.get(gateway.url + "/", headers={"Origin": origin}) as response:
        assert response.status == 200
        assert response.headers.get("Access-Control-Allow-Origin") == (origin if allowed else None)
    assert [r.method for r in upstream.requests] == ["GET"]


async def test_the_null_origin_is_refused_unless_listed_by_itself(upstream, start_gateway, client) -> None:
    config = base_config(upstream.url)
    config["routes"] = [
        {"name": "patterns", "match": {"path": "/a"}, "upstream": "api", "cors": {"origins": [SHOP, "https://*.example.com"]}},
        {"name": "listed", "match": {"path": "/b"}, "upstream": "api", "cors": {"origins": ["null"]}},
    ]
    gateway = await start_gateway(config, policies=POLICIES)
    async with client.options(gateway.url + "/a", headers=preflight_headers("null", "GET", "x-a")) as response:
        assert response.status == 403
    async with client.get(gateway.url + "/a", headers={"Origin": "null"}) as response:
        assert "Access-Control-Allow-Origin" not in response.headers
    async with client.get(gateway.url + "/b", headers={"Origin": "null"}) as response:
        assert response.headers["Access-Control-Allow-Origin"] == "null"


async def test_configured_origins_match_what_browsers_send_whatever_their_case_or_default_port(upstream, start_gateway, client) -> None:
    block = {"origins": ["HTTPS://Shop.Example:443", "http://localhost:3000"]}
    gateway = await start_gateway(cors_config(upstream.url, block), policies=POLICIES)
    for origin in (SHOP, "http://localhost:3000"):
        async with client.get(gateway.url + "/", headers={"Origin": origin}) as response:
            assert response.headers["Access-Control-Allow-Origin"] == origin
    async with client.get(gateway.url + "/", headers={"Origin": "http://localhost:3001"}) as response:
        assert "Access-Control-Allow-Origin" not in response.headers


# -- actual requests --------------------------------------------------------------------------


async def test_an_allowed_origin_gets_its_origin_echoed_with_credentials_and_exposed_headers(upstream, start_gateway, client) -> None:
    gateway = await start_gateway(cors_config(upstream.url, MARKETPLACE), policies=POLICIES)
    async with client.get(gateway.url + "/api/products", headers={"Origin": "https://app.example.com"}) as response:
        assert response.status == 200
        assert access_control(response.headers) == {
            "Access-Control-Allow-Origin": "https://app.example.com",
            "Access-Control-Allow-Credentials": "true",
            "Access-Control-Expose-Headers": "RateLimit, X-Request-ID",
        }
        assert response.headers.getall("Vary") == ["Origin"]
    assert upstream.requests[0].headers["Origin"] == "https://app.example.com"  # forwarded as sent


async def test_the_upstreams_own_cors_headers_are_replaced_not_duplicated(upstream, start_gateway, client) -> None:
    upstream.handler = answering(
        {
            "Access-Control-Allow-Origin": "*",
            "Access-Control-Allow-Credentials": "true",
            "Access-Control-Expose-Headers": "X-Internal",
            "Access-Control-Allow-Methods": "GET, PUT, DELETE",
        }
    )
    block = {"origins": [SHOP], "expose_headers": ["RateLimit"]}
    gateway = await start_gateway(cors_config(upstream.url, block), policies=POLICIES)
    async with client.get(gateway.url + "/", headers={"Origin": SHOP}) as response:
        assert response.headers.getall("Access-Control-Allow-Origin") == [SHOP]
        assert access_control(response.headers) == {
            "Access-Control-Allow-Origin": SHOP,
            "Access-Control-Expose-Headers": "RateLimit",
        }


async def test_a_disallowed_origin_gets_no_cors_headers_even_when_the_upstream_sends_them_but_gets_vary(
    upstream, start_gateway, client
) -> None:
    upstream.handler = answering({"Access-Control-Allow-Origin": "*", "Access-Control-Allow-Credentials": "true"})
    gateway = await start_gateway(cors_config(upstream.url, MARKETPLACE), policies=POLICIES)
    async with client.get(gateway.url + "/", headers={"Origin": "https://evil.example"}) as response:
        assert response.status == 200  # CORS is the browser's rule: the request itself is served
        assert access_control(response.headers) == {}
        assert response.headers.getall("Vary") == ["Origin"]


async def test_a_request_without_origin_gets_no_cors_headers_but_vary_origin(upstream, start_gateway, client) -> None:
    gateway = await start_gateway(cors_config(upstream.url, MARKETPLACE), policies=POLICIES)
    async with client.get(gateway.url + "/") as response:
        assert access_control(response.headers) == {}
        assert response.headers.getall("Vary") == ["Origin"]


@pytest.mark.parametrize(
    ("upstream_vary", "sent"),
    [
        (["Accept-Encoding"], ["Accept-Encoding, Origin"]),
        (["accept-encoding, origin"], ["accept-encoding, origin"]),
        (["Accept-Encoding", "ORIGIN"], ["Accept-Encoding, ORIGIN"]),
        (["*"], ["*"]),
    ],
    ids=["adds Origin", "keeps an origin token it already has", "joins two fields without a duplicate", "leaves Vary star alone"],
)
async def test_vary_origin_is_merged_into_the_upstreams_vary(
    upstream, start_gateway, client, upstream_vary: list[str], sent: list[str]
) -> None:
    async def handler(request: web.Request) -> web.Response:
        response = web.json_response({"ok": True})
        for value in upstream_vary:
            response.headers.add("Vary", value)
        return response

    upstream.handler = handler
    gateway = await start_gateway(cors_config(upstream.url, {"origins": [SHOP]}), policies=POLICIES)
    async with client.get(gateway.url + "/", headers={"Origin": SHOP}) as response:
        assert response.headers.getall("Vary") == sent
        assert response.headers["Access-Control-Allow-Origin"] == SHOP


async def test_any_origin_without_credentials_sends_star_on_every_response_and_no_vary_origin(upstream, start_gateway, client) -> None:
    block = {"origins": ["*"], "expose_headers": ["RateLimit"], "headers": ["X-Trace"]}
    gateway = await start_gateway(cors_config(upstream.url, block), policies=POLICIES)
    for headers in ({"Origin": SHOP}, {"Origin": "null"}, {}):
        async with client.get(gateway.url + "/", headers=headers) as response:
            assert access_control(response.headers) == {
                "Access-Control-Allow-Origin": "*",
                "Access-Control-Expose-Headers": "RateLimit",
            }
            assert "Vary" not in response.headers
    async with client.options(gateway.url + "/", headers=preflight_headers(SHOP, "GET", "x-trace")) as response:
        assert response.status == 204
        assert response.headers["Access-Control-Allow-Origin"] == "*"
        assert response.headers.getall("Vary") == ["Access-Control-Request-Method, Access-Control-Request-Headers"]


async def test_an_options_request_without_a_requested_method_is_forwarded_like_any_request(upstream, start_gateway, client) -> None:
    config = cors_config(upstream.url, {"origins": [SHOP]}, match={"path": "/", "methods": ["GET", "OPTIONS"]})
    gateway = await start_gateway(config, policies=POLICIES)
    async with client.options(gateway.url + "/things", headers={"Origin": SHOP}) as response:
        assert response.status == 200
        assert json.loads(await response.read())["method"] == "OPTIONS"
        assert response.headers["Access-Control-Allow-Origin"] == SHOP
    assert [(r.method, r.path) for r in upstream.requests] == [("OPTIONS", "/things")]


async def test_a_502_from_the_gateway_carries_the_grant_so_the_page_can_read_the_problem(start_gateway, client) -> None:
    config = cors_config(f"http://127.0.0.1:{free_port()}", {"origins": [SHOP], "credentials": True})
    gateway = await start_gateway(config, policies=POLICIES)
    async with client.get(gateway.url + "/", headers={"Origin": SHOP}) as response:
        assert_problem(response.status, response.headers, await response.read(), 502)
        assert response.headers["Access-Control-Allow-Origin"] == SHOP
        assert response.headers["Access-Control-Allow-Credentials"] == "true"
        assert response.headers.getall("Vary") == ["Origin"]


class DenySettings(Settings):
    path: str


class DenyPolicy(Policy):
    """Stands for auth or rate limiting: answers a path locally with a 401 problem."""

    name = "deny"
    settings_type = DenySettings

    async def on_request(self, exchange: Exchange) -> Reply | None:
        return problem(exchange, 401, "a token is required") if exchange.path == self.settings.path else None


async def test_a_denial_from_a_later_policy_carries_the_grant_and_a_preflight_never_reaches_it(upstream, start_gateway, client) -> None:
    config = cors_config(upstream.url, {"origins": [SHOP], "headers": ["Authorization"]}, deny={"path": "/private"})
    gateway = await start_gateway(config, policies=(CorsPolicy, DenyPolicy))
    async with client.get(gateway.url + "/private", headers={"Origin": SHOP}) as response:
        assert_problem(response.status, response.headers, await response.read(), 401)
        assert response.headers["Access-Control-Allow-Origin"] == SHOP
    async with client.options(gateway.url + "/private", headers=preflight_headers(SHOP, "GET", "authorization")) as response:
        assert response.status == 204  # answered before the policy that needs a token
    assert upstream.requests == []


async def test_a_cors_block_under_defaults_applies_to_routes_that_do_not_switch_it_off(upstream, start_gateway, client) -> None:
    config = base_config(upstream.url)
    config["defaults"] = {"cors": {"origins": [SHOP]}}
    config["routes"] = [
        {"name": "public", "match": {"path": "/public"}, "upstream": "api"},
        {"name": "internal", "match": {"path": "/internal"}, "upstream": "api", "cors": False},
    ]
    gateway = await start_gateway(config, policies=POLICIES)
    async with client.get(gateway.url + "/public", headers={"Origin": SHOP}) as response:
        assert response.headers["Access-Control-Allow-Origin"] == SHOP
    async with client.get(gateway.url + "/internal", headers={"Origin": SHOP}) as response:
        assert access_control(response.headers) == {}
        assert "Vary" not in response.headers


# -- config errors ----------------------------------------------------------------------------


def config_issues(block: dict[str, Any]) -> dict[str, str]:
    raw = cors_config("http://127.0.0.1:8081", block)
    with pytest.raises(ConfigError) as caught:
        parse_config(raw, policies=POLICIES)
    return {issue.path: issue.message for issue in caught.value.issues}


@pytest.mark.parametrize(
    ("block", "path", "says"),
    [
        ({"origins": ["*"], "credentials": True}, "routes[0].cors", "cannot be used with credentials: true"),
        ({"origins": [SHOP, "https://shop.example/app"]}, "routes[0].cors.origins[1]", "an origin has no path"),
        ({"origins": [SHOP, "https://shop.example/"]}, "routes[0].cors.origins[1]", "no path, query or trailing slash"),
        ({"origins": [SHOP, "https://exa*mple.com"]}, "routes[0].cors.origins[1]", "'*' stands alone, or as the whole leftmost label"),
        ({"origins": ["https://*.com"]}, "routes[0].cors.origins[0]", "two or more labels after '*.'"),
        ({"origins": ["*", SHOP]}, "routes[0].cors.origins", "list it alone"),
        ({"origins": ["shop.example"]}, "routes[0].cors.origins[0]", "only http:// and https:// origins"),
        ({"origins": [SHOP], "methods": ["GET", "delete"]}, "routes[0].cors.methods[1]", "expected an upper-case method such as 'DELETE'"),
        ({"origins": [SHOP], "methods": ["TRACE"]}, "routes[0].cors.methods[0]", "forbidden method"),
        ({"origins": [SHOP], "headers": ["*"]}, "routes[0].cors.headers[0]", "expected a header name"),
        ({"origins": [SHOP], "max_age": "10 minutes"}, "routes[0].cors.max_age", "expected a duration"),
        ({"methods": ["GET"]}, "routes[0].cors.origins", "required key is missing"),
    ],
    ids=[
        "star with credentials",
        "an origin with a path",
        "an origin with a trailing slash",
        "a star inside a label",
        "a pattern over a top-level domain",
        "star among other origins",
        "an origin without a scheme",
        "a lower-case method",
        "a forbidden method",
        "a star for headers",
        "a bad max_age",
        "no origins",
    ],
)
def test_a_bad_cors_block_is_a_config_error_naming_the_key_path(block: dict[str, Any], path: str, says: str) -> None:
    issues = config_issues(block)
    assert list(issues) == [path]
    assert says in issues[path]


def test_a_config_error_in_the_default_cors_block_names_its_path() -> None:
    raw = base_config("http://127.0.0.1:8081")
    raw["defaults"] = {"cors": {"origins": ["https://shop.example/"]}}
    with pytest.raises(ConfigError) as caught:
        parse_config(raw, policies=POLICIES)
    assert [issue.path for issue in caught.value.issues] == ["defaults.cors.origins[0]"]
