"""security_headers: helmet's set header for header, presets, overrides, leaks, gateway-made answers."""

from __future__ import annotations

from typing import Any, AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from gateway.config import parse_config
from gateway.errors import ConfigError
from gateway.policies.headers import PRESETS, SecurityHeadersPolicy, SecurityHeadersSettings, resolve
from tests.conftest import assert_problem, base_config, free_port, parse_raw_response, raw_request

# helmet 8.3.0, `helmet()` with no options: the headers it sets, value for value, taken from its
# source (helmet/index.cjs: getDefaultDirectives and each middleware's default option).
HELMET_8_3_0 = {
    "Content-Security-Policy": (
        "default-src 'self';base-uri 'self';font-src 'self' https: data:;form-action 'self';"
        "frame-ancestors 'self';img-src 'self' data:;object-src 'none';script-src 'self';"
        "script-src-attr 'none';style-src 'self' https: 'unsafe-inline';upgrade-insecure-requests"
    ),
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Origin-Agent-Cluster": "?1",
    "Referrer-Policy": "no-referrer",
    "Strict-Transport-Security": "max-age=31536000; includeSubDomains",
    "X-Content-Type-Options": "nosniff",
    "X-DNS-Prefetch-Control": "off",
    "X-Download-Options": "noopen",
    "X-Frame-Options": "SAMEORIGIN",
    "X-Permitted-Cross-Domain-Policies": "none",
    "X-XSS-Protection": "0",
}
HELMET_REMOVES = ("X-Powered-By",)
LEAKS = {"X-Powered-By": "Express", "Server": "Apache/2.4.1 (Unix)", "X-AspNet-Version": "4.0.30319", "X-AspNetMvc-Version": "5.2"}
POLICIES = (SecurityHeadersPolicy,)


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    """As a TLS-terminating proxy in front of the gateway sends requests: HSTS is sent only to
    requests that came over TLS (tests/test_tls.py has the plain-HTTP cases)."""
    async with aiohttp.ClientSession(headers={"X-Forwarded-Proto": "https"}) as session:
        yield session


def config_with(upstream_url: str, route_block: Any = None, defaults: Any = None, top: Any = None) -> dict[str, Any]:
    config = base_config(upstream_url)
    config["listen"]["trusted_proxies"] = ["127.0.0.1/32"]
    if route_block is not None:
        config["routes"][0]["security_headers"] = route_block
    if defaults is not None:
        config["defaults"] = {"security_headers": defaults}
    if top is not None:
        config["security_headers"] = top
    return config


def leaky(extra: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    async def handler(request: web.Request) -> web.Response:
        return web.json_response({"ok": True}, headers={**LEAKS, **(extra or {})})

    return handler


def config_issues(raw: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(raw, policies=POLICIES)
    return {issue.path: issue.message for issue in caught.value.issues}


# -- the presets ------------------------------------------------------------------------------


async def test_the_helmet_preset_sends_helmets_default_headers_value_for_value(upstream, start_gateway, client) -> None:
    upstream.handler = leaky()
    gateway = await start_gateway(config_with(upstream.url, {"preset": "helmet"}), policies=POLICIES)
    async with client.get(gateway.url + "/api/products") as response:
        assert response.status == 200
        sent = {name: response.headers.getall(name) for name in HELMET_8_3_0}
        for name in (*HELMET_REMOVES, *LEAKS):
            assert name not in response.headers
    assert sent == {name: [value] for name, value in HELMET_8_3_0.items()}


async def test_a_route_without_a_preset_gets_helmet(upstream, start_gateway, client) -> None:
    gateway = await start_gateway(config_with(upstream.url, defaults={"headers": {}}), policies=POLICIES)
    async with client.get(gateway.url + "/") as response:
        assert {name: response.headers[name] for name in HELMET_8_3_0} == HELMET_8_3_0


def test_the_helmet_preset_adds_no_header_helmet_leaves_off() -> None:
    values = resolve(SecurityHeadersSettings(preset="helmet"), {}).header_values()
    assert values == HELMET_8_3_0  # Permissions-Policy and Cross-Origin-Embedder-Policy stay off


async def test_the_strict_preset_forbids_loading_framing_and_storing(upstream, start_gateway, client) -> None:
    gateway = await start_gateway(config_with(upstream.url, {"preset": "strict"}), policies=POLICIES)
    async with client.get(gateway.url + "/") as response:
        headers = response.headers
    assert headers["Content-Security-Policy"] == "default-src 'none';base-uri 'none';form-action 'none';frame-ancestors 'none'"
    assert headers["X-Frame-Options"] == "DENY"
    assert headers["Cache-Control"] == "no-store"
    assert headers["Strict-Transport-Security"] == "max-age=63072000; includeSubDomains"
    assert headers["X-Content-Type-Options"] == "nosniff"


async def test_the_strict_preset_leaves_an_upstream_cache_control_alone(upstream, start_gateway, client) -> None:
    upstream.handler = leaky({"Cache-Control": "public, max-age=60"})
    gateway = await start_gateway(config_with(upstream.url, {"preset": "strict"}), policies=POLICIES)
    async with client.get(gateway.url + "/") as response:
        assert response.headers.getall("Cache-Control") == ["public, max-age=60"]


# -- overriding, dropping, keeping ------------------------------------------------------------


async def test_a_route_overrides_one_header_and_drops_another(upstream, start_gateway, client) -> None:
    block = {"preset": "helmet", "headers": {"X-Frame-Options": "DENY", "Content-Security-Policy": False}}
    gateway = await start_gateway(config_with(upstream.url, block), policies=POLICIES)
    async with client.get(gateway.url + "/") as response:
        headers = response.headers
    assert headers.getall("X-Frame-Options") == ["DENY"]
    assert "Content-Security-Policy" not in headers
    assert headers["Referrer-Policy"] == "no-referrer"  # the rest of the preset stays


async def test_false_on_a_route_switches_the_defaults_headers_off(upstream, start_gateway, client) -> None:
    config = config_with(upstream.url, False, defaults={"preset": "helmet"})
    upstream.handler = leaky()
    gateway = await start_gateway(config, policies=POLICIES)
    async with client.get(gateway.url + "/") as response:
        assert "Content-Security-Policy" not in response.headers
        assert response.headers["X-Powered-By"] == "Express"  # nothing removed either


async def test_the_gateways_value_replaces_the_upstreams_so_no_header_is_sent_twice(upstream, start_gateway, client) -> None:
    upstream.handler = leaky({name: "upstream-value" for name in HELMET_8_3_0 if name != "X-XSS-Protection"})
    gateway = await start_gateway(config_with(upstream.url, {"preset": "helmet"}), policies=POLICIES)
    async with client.get(gateway.url + "/") as response:
        for name, value in HELMET_8_3_0.items():
            assert response.headers.getall(name) == [value]


async def test_keep_upstream_lets_the_upstreams_value_win_and_fills_in_when_it_sent_none(upstream, start_gateway, client) -> None:
    block = {"keep_upstream": ["Content-Security-Policy", "X-Frame-Options"]}
    gateway = await start_gateway(config_with(upstream.url, block), policies=POLICIES)
    upstream.handler = leaky({"Content-Security-Policy": "default-src 'none'"})
    async with client.get(gateway.url + "/") as response:
        assert response.headers.getall("Content-Security-Policy") == ["default-src 'none'"]
        assert response.headers.getall("X-Frame-Options") == ["SAMEORIGIN"]  # filled in


async def test_leak_headers_are_removed_and_the_remove_list_can_be_replaced(upstream, start_gateway, client) -> None:
    upstream.handler = leaky({"X-Backend": "db-7"})
    gateway = await start_gateway(config_with(upstream.url, {"remove": ["X-Backend"]}), policies=POLICIES)
    async with client.get(gateway.url + "/") as response:
        assert "X-Backend" not in response.headers
        assert response.headers["X-Powered-By"] == "Express"  # the route's list replaced the default


async def test_a_kept_header_is_never_removed(upstream, start_gateway, client) -> None:
    upstream.handler = leaky()
    gateway = await start_gateway(config_with(upstream.url, {"keep_upstream": ["Server"]}), policies=POLICIES)
    async with client.get(gateway.url + "/") as response:
        assert response.headers.getall("Server") == ["Apache/2.4.1 (Unix)"]
        assert "X-Powered-By" not in response.headers


async def test_csp_directives_merge_over_the_presets_in_its_order(upstream, start_gateway, client) -> None:
    block = {"csp": {"directives": {"img-src": ["'self'", "data:", "https:"], "script-src-attr": None, "connect-src": "'self' https://api.example"}}}
    gateway = await start_gateway(config_with(upstream.url, block), policies=POLICIES)
    async with client.get(gateway.url + "/") as response:
        csp = response.headers["Content-Security-Policy"].split(";")
    assert "img-src 'self' data: https:" in csp
    assert not any(d.startswith("script-src-attr") for d in csp)
    assert csp[-1] == "connect-src 'self' https://api.example"  # new directives come last
    assert csp[0] == "default-src 'self'"


async def test_report_only_sends_the_report_only_header_with_its_reporting_endpoint(upstream, start_gateway, client) -> None:
    block = {
        "csp": {"report_only": True, "directives": {"report-uri": "/csp-reports", "report-to": "csp"}},
        "reporting_endpoints": {"csp": "https://reports.example/csp"},
    }
    gateway = await start_gateway(config_with(upstream.url, block), policies=POLICIES)
    async with client.get(gateway.url + "/") as response:
        headers = response.headers
    assert "Content-Security-Policy" not in headers
    assert headers["Content-Security-Policy-Report-Only"].endswith(";report-uri /csp-reports;report-to csp")
    assert headers["Reporting-Endpoints"] == 'csp="https://reports.example/csp"'


async def test_a_raw_csp_string_is_sent_as_written(upstream, start_gateway, client) -> None:
    gateway = await start_gateway(config_with(upstream.url, {"csp": "default-src 'none'; img-src 'self'"}), policies=POLICIES)
    async with client.get(gateway.url + "/") as response:
        assert response.headers.getall("Content-Security-Policy") == ["default-src 'none'; img-src 'self'"]


async def test_permissions_policy_and_coep_are_sent_when_configured(upstream, start_gateway, client) -> None:
    block = {
        "permissions_policy": {"camera": [], "geolocation": ["self", "https://maps.example"], "fullscreen": ["*"]},
        "cross_origin_embedder_policy": "require-corp",
    }
    gateway = await start_gateway(config_with(upstream.url, block), policies=POLICIES)
    async with client.get(gateway.url + "/") as response:
        assert response.headers["Permissions-Policy"] == 'camera=(), geolocation=(self "https://maps.example"), fullscreen=*'
        assert response.headers["Cross-Origin-Embedder-Policy"] == "require-corp"


def test_hsts_with_preload_is_built_from_its_parts() -> None:
    block = SecurityHeadersSettings.model_validate({"hsts": {"max_age": "730d", "preload": True}})
    assert resolve(block, {}).header_values()["Strict-Transport-Security"] == "max-age=63072000; includeSubDomains; preload"


# -- presets defined in the config --------------------------------------------------------------


async def test_a_configured_preset_extends_helmet_and_routes_use_it(upstream, start_gateway, client) -> None:
    top = {
        "presets": {
            "marketplace": {
                "csp": {"directives": {"style-src": ["'self'", "'unsafe-inline'"], "img-src": ["'self'", "data:", "https:"]}},
                "hsts": {"max_age": "365d", "include_subdomains": True, "preload": True},
                "headers": {"Referrer-Policy": "same-origin"},
            }
        }
    }
    gateway = await start_gateway(config_with(upstream.url, {"preset": "marketplace"}, top=top), policies=POLICIES)
    async with client.get(gateway.url + "/") as response:
        headers = response.headers
    csp = headers["Content-Security-Policy"].split(";")
    assert "style-src 'self' 'unsafe-inline'" in csp and "img-src 'self' data: https:" in csp
    assert "object-src 'none'" in csp  # inherited from helmet
    assert headers["Strict-Transport-Security"] == "max-age=31536000; includeSubDomains; preload"
    assert headers["Referrer-Policy"] == "same-origin"
    assert headers["X-Frame-Options"] == "SAMEORIGIN"


async def test_redefining_helmet_in_the_config_changes_it_for_every_route(upstream, start_gateway, client) -> None:
    top = {"presets": {"helmet": {"headers": {"X-Frame-Options": "DENY"}}}}
    gateway = await start_gateway(config_with(upstream.url, defaults={"preset": "helmet"}, top=top), policies=POLICIES)
    async with client.get(gateway.url + "/") as response:
        assert response.headers["X-Frame-Options"] == "DENY"
        assert response.headers["Referrer-Policy"] == "no-referrer"


def test_the_built_in_presets_are_data_that_validate() -> None:
    assert set(PRESETS) == {"helmet", "strict"}
    for preset in PRESETS.values():
        assert isinstance(preset, SecurityHeadersSettings)


# -- what the gateway answers itself ------------------------------------------------------------


async def test_gateway_made_errors_carry_the_security_headers_and_no_store(upstream, start_gateway, client) -> None:
    config = config_with(upstream.url, defaults={"preset": "helmet"})
    config["routes"][0]["match"] = {"path": "/api", "methods": ["GET"]}
    config["upstreams"]["dead"] = {"targets": [f"http://127.0.0.1:{free_port()}"], "timeouts": {"connect": "1s"}, "retries": 0}
    config["routes"].append({"name": "dead", "match": {"path": "/dead"}, "upstream": "dead"})
    gateway = await start_gateway(config, policies=POLICIES)
    for method, path, status in (("GET", "/nowhere", 404), ("DELETE", "/api/x", 405), ("GET", "/dead", 502), ("GET", "/api/%2e%2e%2F", 400)):
        async with client.request(method, gateway.url + path) as response:
            assert_problem(response.status, response.headers, await response.read(), status)
            assert response.headers.getall("Cache-Control") == ["no-store"]
            for name, value in HELMET_8_3_0.items():
                assert response.headers.getall(name) == [value], (path, name)
    assert upstream.requests == []


async def test_malformed_requests_refused_before_routing_carry_the_security_headers(upstream, start_gateway) -> None:
    config = config_with(upstream.url, defaults={"preset": "strict"})
    config["listen"]["limits"] = {"max_header_size": "1kb"}
    gateway = await start_gateway(config, policies=POLICIES)
    for data, status in (
        (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 4096 + b"\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
    ):
        got, headers, body = parse_raw_response(await raw_request(gateway.port, data))
        assert_problem(got, headers, body, status)
        assert headers["x-frame-options"] == "DENY"
        assert headers["content-security-policy"].startswith("default-src 'none'")
        assert headers["cache-control"] == "no-store"
        assert "server" not in headers
    assert upstream.requests == []


async def test_unexpected_errors_answer_a_500_with_the_security_headers(upstream, start_gateway, client) -> None:
    class Broken(SecurityHeadersPolicy):
        name = "broken"

        def on_response(self, exchange, reply) -> None:  # type: ignore[no-untyped-def]
            if reply.upstream is not None:
                raise RuntimeError("boom")

    config = config_with(upstream.url, {"preset": "strict"})
    config["routes"][0]["broken"] = {}
    gateway = await start_gateway(config, policies=(SecurityHeadersPolicy, Broken))
    async with client.get(gateway.url + "/") as response:
        assert_problem(response.status, response.headers, await response.read(), 500)
        assert response.headers["X-Frame-Options"] == "DENY"


# -- the Server header -------------------------------------------------------------------------


async def test_the_gateway_sends_no_server_header_of_its_own_by_default(upstream, start_gateway, client) -> None:
    upstream.handler = leaky()
    gateway = await start_gateway(config_with(upstream.url, defaults={"preset": "helmet"}), policies=POLICIES)
    for path in ("/", "/%00"):  # an upstream answer with a Server header removed, and a local one
        async with client.get(gateway.url + path) as response:
            assert "Server" not in response.headers


async def test_the_gateways_server_header_is_configurable(upstream, start_gateway, client) -> None:
    upstream.handler = leaky()
    config = config_with(upstream.url, defaults={"preset": "helmet"}, top={"server": "edge"})
    gateway = await start_gateway(config, policies=POLICIES)
    for path in ("/", "/%00"):
        async with client.get(gateway.url + path) as response:
            assert response.headers.getall("Server") == ["edge"]


async def test_without_the_policy_the_upstreams_server_header_passes_through(upstream, start_gateway, client) -> None:
    upstream.handler = leaky()
    gateway = await start_gateway(config_with(upstream.url), policies=POLICIES)
    async with client.get(gateway.url + "/") as response:
        assert response.headers.getall("Server") == ["Apache/2.4.1 (Unix)"]


# -- config errors -------------------------------------------------------------------------------


def route_block_issues(block: Any, top: Any = None) -> dict[str, str]:
    return config_issues(config_with("http://127.0.0.1:1", block, top=top))


@pytest.mark.parametrize(
    ("block", "path", "message"),
    [
        ({"csp": {"directives": {"frame-acestors": "'none'"}}}, "routes[0].security_headers.csp.directives", "unknown CSP directive 'frame-acestors'; did you mean 'frame-ancestors'?"),
        ({"csp": {"directives": {"script-src": "'self'; object-src *"}}}, "routes[0].security_headers.csp.directives", "may not contain ';' or ','"),
        ({"csp": {"directives": {"img-src": ["'self',data:"]}}}, "routes[0].security_headers.csp.directives", "may not contain ';' or ','"),
        ({"csp": {"directives": {"script-src": ["self"]}}}, "routes[0].security_headers.csp.directives", "write \"'self'\""),
        ({"csp": {"directives": {"script-src": ["nonce-abc"]}}}, "routes[0].security_headers.csp.directives", "write \"'nonce-abc'\""),
        ({"csp": {"use_defaults": False, "directives": {"img-src": "'self'"}}}, "routes[0].security_headers", "needs a default-src"),
        ({"csp": "default-src 'self'\r\nX-Injected: 1"}, "routes[0].security_headers.csp", "without line breaks"),
        ({"csp": {"polcy": "default-src 'none'"}}, "routes[0].security_headers.csp.polcy", "did you mean 'policy'?"),
        ({"preset": "helmit"}, "routes[0].security_headers", "unknown preset 'helmit'; did you mean 'helmet'?"),
        ({"headers": {"X-Frame-Options": "ALLOW-FROM https://x.example"}}, "routes[0].security_headers.headers", "expected one of DENY, SAMEORIGIN"),
        ({"headers": {"Referrer-Policy": "no-referer"}}, "routes[0].security_headers.headers", "Referrer-Policy: expected tokens from"),
        ({"headers": {"X-XSS-Protection": "1; mode=block"}}, "routes[0].security_headers.headers", "expected one of 0"),
        ({"headers": {"X-Frame-Options": "DENY", "x-frame-options": "SAMEORIGIN"}}, "routes[0].security_headers.headers", "given twice"),
        ({"headers": {"X Bad": "1"}}, "routes[0].security_headers.headers", "expected a header name"),
        ({"hsts": {"max_age": "30d", "preload": True}}, "routes[0].security_headers.hsts", "preload needs max_age of at least 365d"),
        ({"permissions_policy": {"camera": ["evil.example"]}}, "routes[0].security_headers.permissions_policy", "expected self, * or an origin"),
        ({"cross_origin_embedder_policy": "require-cors"}, "routes[0].security_headers.cross_origin_embedder_policy", "expected one of"),
    ],
)
def test_a_bad_security_headers_block_is_a_config_error_at_its_key_path(block: Any, path: str, message: str) -> None:
    issues = route_block_issues(block)
    assert path in issues, issues
    assert message in issues[path]


def test_presets_that_extend_each_other_in_a_circle_are_refused() -> None:
    issues = route_block_issues({"preset": "a"}, top={"presets": {"a": {"preset": "b"}, "b": {"preset": "a"}}})
    assert "circle" in issues["security_headers.presets.a"]


def test_an_unknown_security_headers_key_gets_a_suggestion() -> None:
    issues = route_block_issues({"keep_upstreams": ["Server"]})
    assert "did you mean 'keep_upstream'?" in issues["routes[0].security_headers.keep_upstreams"]


def test_a_server_header_with_a_line_break_is_refused() -> None:
    issues = route_block_issues(None, top={"server": "edge\r\nSet-Cookie: x=1"})
    assert "without line breaks" in issues["security_headers.server"]


async def test_reload_picks_up_new_header_values(upstream, start_gateway, client, tmp_path) -> None:
    import yaml

    config = config_with(upstream.url, {"headers": {"X-Frame-Options": "SAMEORIGIN"}})
    gateway = await start_gateway(config, policies=POLICIES)
    config["routes"][0]["security_headers"]["headers"]["X-Frame-Options"] = "DENY"
    config["listen"]["port"] = gateway.port
    gateway.gateway.config_path.write_text(yaml.safe_dump(config))  # type: ignore[union-attr]
    gateway.gateway.policies = POLICIES
    assert await gateway.gateway.reload()
    async with client.get(gateway.url + "/") as response:
        assert response.headers["X-Frame-Options"] == "DENY"


@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_headers_are_the_same_for_get_and_head(method: str, upstream, start_gateway, client) -> None:
    gateway = await start_gateway(config_with(upstream.url, {"preset": "helmet"}), policies=POLICIES)
    async with client.request(method, gateway.url + "/") as response:
        assert {name: response.headers[name] for name in HELMET_8_3_0} == HELMET_8_3_0
