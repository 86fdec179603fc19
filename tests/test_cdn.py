"""cdn: what downstream caches are told, over real sockets; and its config errors.

The rules (gateway/policies/cdn.py, docs/cdn.md): only GET/HEAD answered 2xx/3xx; an upstream's
private/no-store is left alone; Set-Cookie or an authenticated request makes Cache-Control
private and removes every shared-cache header; Vary is merged; a header is never sent twice.
"""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp import web
from multidict import CIMultiDict

from gateway.config import parse_config
from gateway.errors import ConfigError
from gateway.pipeline import Exchange, Policy, Reply
from gateway.policies.cdn import CdnPolicy
from gateway.settings import Settings
from tests.conftest import assert_problem, base_config, free_port

POLICIES = (CdnPolicy,)

# The block of CONFIG.md, with the surrogate headers and a shared-only directive added.
BLOCK = {
    "cache_control": "public, max-age=3600, s-maxage=600",
    "cdn_cache_control": "public, max-age=86400",
    "surrogate_control": "max-age=604800",
    "surrogate_key": ["products", "catalog"],
    "vary": ["Accept-Encoding"],
}
# What a cacheable anonymous GET is sent with that block.
SHARED = {
    "Cache-Control": "public, max-age=3600, s-maxage=600",
    "CDN-Cache-Control": "public, max-age=86400",
    "Surrogate-Control": "max-age=604800",
    "Surrogate-Key": "products catalog",
}
SHARED_ONLY = ("CDN-Cache-Control", "Surrogate-Control", "Surrogate-Key")
# What an upstream that believes its response is cacheable might send besides.
UPSTREAM_SHARED = {"CDN-Cache-Control": "max-age=60", "Surrogate-Control": "max-age=60", "Surrogate-Key": "user-7"}


def config_with(upstream_url: str, block: Any = BLOCK) -> dict[str, Any]:
    config = base_config(upstream_url)
    config["routes"][0]["cdn"] = block
    return config


def answering(status: int = 200, headers: Any = None, body: bytes = b'{"ok":true}'):  # type: ignore[no-untyped-def]
    async def handler(request: web.Request) -> web.Response:
        answer_body = None if status in (204, 304) or 300 <= status < 400 else body
        return web.Response(status=status, headers=CIMultiDict(headers or {}), body=answer_body)

    return handler


def caching_headers(headers: Any) -> dict[str, list[str]]:
    names = ("Cache-Control", *SHARED_ONLY, "Vary")
    return {name: headers.getall(name) for name in names if name in headers}


# -- cacheable responses --------------------------------------------------------------------------


async def test_a_get_answered_200_gets_the_configured_cache_control_instead_of_the_upstreams_and_the_cdn_headers(upstream, start_gateway, client) -> None:
    upstream.handler = answering(200, {"Cache-Control": "no-cache", **UPSTREAM_SHARED})
    gateway = await start_gateway(config_with(upstream.url), policies=POLICIES)
    async with client.get(gateway.url + "/api/products") as response:
        assert response.status == 200
        assert caching_headers(response.headers) == {**{name: [value] for name, value in SHARED.items()}, "Vary": ["Accept-Encoding"]}


async def test_a_head_request_gets_the_same_caching_headers_as_a_get(upstream, start_gateway, client) -> None:
    gateway = await start_gateway(config_with(upstream.url), policies=POLICIES)
    async with client.head(gateway.url + "/api/products") as response:
        assert response.status == 200
        assert caching_headers(response.headers) == {**{name: [value] for name, value in SHARED.items()}, "Vary": ["Accept-Encoding"]}


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
async def test_a_response_to_a_method_other_than_get_or_head_is_left_as_the_upstream_sent_it(upstream, start_gateway, client, method: str) -> None:
    upstream.handler = answering(200, {"Cache-Control": "no-cache", "Vary": "Origin"})
    gateway = await start_gateway(config_with(upstream.url), policies=POLICIES)
    async with client.request(method, gateway.url + "/api/products", data=b"{}") as response:
        assert response.status == 200
        assert caching_headers(response.headers) == {"Cache-Control": ["no-cache"], "Vary": ["Origin"]}


@pytest.mark.parametrize("status", [404, 500])
async def test_an_error_from_the_upstream_is_left_as_the_upstream_sent_it(upstream, start_gateway, client, status: int) -> None:
    upstream.handler = answering(status, {"Cache-Control": "max-age=5", "Vary": "Origin"})
    gateway = await start_gateway(config_with(upstream.url), policies=POLICIES)
    async with client.get(gateway.url + "/api/products/404") as response:
        assert response.status == status
        assert caching_headers(response.headers) == {"Cache-Control": ["max-age=5"], "Vary": ["Origin"]}


async def test_the_gateways_own_502_keeps_no_store_and_gets_no_cdn_headers(start_gateway, client) -> None:
    gateway = await start_gateway(config_with(f"http://127.0.0.1:{free_port()}"), policies=POLICIES)
    async with client.get(gateway.url + "/api/products") as response:
        assert_problem(response.status, response.headers, await response.read(), 502)
        assert caching_headers(response.headers) == {"Cache-Control": ["no-store"]}


@pytest.mark.parametrize("status", [301, 304])
async def test_a_redirect_or_not_modified_answer_gets_the_caching_headers(upstream, start_gateway, client, status: int) -> None:
    upstream.handler = answering(status, {"Location": "/api/products/", "ETag": '"v1"', "Cache-Control": "no-cache"})
    gateway = await start_gateway(config_with(upstream.url), policies=POLICIES)
    async with client.get(gateway.url + "/api/products", headers={"If-None-Match": '"v1"'}, allow_redirects=False) as response:
        assert response.status == status
        assert caching_headers(response.headers) == {**{name: [value] for name, value in SHARED.items()}, "Vary": ["Accept-Encoding"]}


async def test_keep_upstream_keeps_the_upstreams_cache_control_and_adds_a_missing_cdn_cache_control(upstream, start_gateway, client) -> None:
    upstream.handler = answering(200, {"Cache-Control": "public, max-age=60", "Surrogate-Control": "max-age=120"})
    gateway = await start_gateway(config_with(upstream.url, {**BLOCK, "keep_upstream": True}), policies=POLICIES)
    async with client.get(gateway.url + "/api/products") as response:
        assert caching_headers(response.headers) == {
            "Cache-Control": ["public, max-age=60"],
            "CDN-Cache-Control": ["public, max-age=86400"],
            "Surrogate-Control": ["max-age=120"],
            "Surrogate-Key": ["products catalog"],
            "Vary": ["Accept-Encoding"],
        }


async def test_keep_upstream_adds_the_configured_cache_control_when_the_upstream_sent_none(upstream, start_gateway, client) -> None:
    gateway = await start_gateway(config_with(upstream.url, {**BLOCK, "keep_upstream": True}), policies=POLICIES)
    async with client.get(gateway.url + "/api/products") as response:
        assert response.headers.getall("Cache-Control") == ["public, max-age=3600, s-maxage=600"]


async def test_a_header_configured_as_null_is_not_added_and_the_upstreams_stays(upstream, start_gateway, client) -> None:
    upstream.handler = answering(200, {"Cache-Control": "max-age=30"})
    block = {"cache_control": None, "cdn_cache_control": "max-age=86400"}
    gateway = await start_gateway(config_with(upstream.url, block), policies=POLICIES)
    async with client.get(gateway.url + "/api/products") as response:
        assert caching_headers(response.headers) == {"Cache-Control": ["max-age=30"], "CDN-Cache-Control": ["max-age=86400"]}


async def test_directives_are_sent_in_canonical_form(upstream, start_gateway, client) -> None:
    gateway = await start_gateway(config_with(upstream.url, {"cache_control": "Public,max-age=0060 ,  Immutable"}), policies=POLICIES)
    async with client.get(gateway.url + "/") as response:
        assert response.headers.getall("Cache-Control") == ["public, max-age=60, immutable"]


# -- what must stay private -----------------------------------------------------------------------


@pytest.mark.parametrize("upstream_value", ["private, max-age=60", "no-store", 'private="Set-Cookie"', "No-Store, max-age=0"])
async def test_an_upstream_private_or_no_store_is_left_alone_and_no_cdn_header_is_added(upstream, start_gateway, client, upstream_value: str) -> None:
    upstream.handler = answering(200, {"Cache-Control": upstream_value})
    gateway = await start_gateway(config_with(upstream.url), policies=POLICIES)
    async with client.get(gateway.url + "/api/me") as response:
        assert caching_headers(response.headers) == {"Cache-Control": [upstream_value], "Vary": ["Accept-Encoding"]}


async def test_a_response_with_set_cookie_becomes_private_and_loses_the_cdn_headers_the_upstream_sent(upstream, start_gateway, client) -> None:
    upstream.handler = answering(200, {"Cache-Control": "public, max-age=300", "Set-Cookie": "session=abc; HttpOnly", **UPSTREAM_SHARED})
    gateway = await start_gateway(config_with(upstream.url), policies=POLICIES)
    async with client.get(gateway.url + "/api/products") as response:
        assert response.headers.getall("Set-Cookie") == ["session=abc; HttpOnly"]
        assert caching_headers(response.headers) == {"Cache-Control": ["private, max-age=3600"], "Vary": ["Accept-Encoding"]}


async def test_a_request_with_authorization_gets_a_private_answer_without_cdn_headers(upstream, start_gateway, client) -> None:
    upstream.handler = answering(200, {"Cache-Control": "public, max-age=300", **UPSTREAM_SHARED})
    gateway = await start_gateway(config_with(upstream.url), policies=POLICIES)
    async with client.get(gateway.url + "/api/products", headers={"Authorization": "Bearer t0ken"}) as response:
        assert caching_headers(response.headers) == {"Cache-Control": ["private, max-age=3600"], "Vary": ["Accept-Encoding"]}


class LoginSettings(Settings):
    subject: str = "user-7"


class LoginPolicy(Policy):
    """Stands in for an auth policy: marks every request as authenticated (no header needed)."""

    name = "login"
    settings_type = LoginSettings

    async def on_request(self, exchange: Exchange) -> Reply | None:
        exchange.subject = self.settings.subject
        return None


async def test_a_request_an_auth_policy_authenticated_gets_a_private_answer_without_cdn_headers(upstream, start_gateway, client) -> None:
    config = config_with(upstream.url)
    config["routes"][0]["login"] = {}
    gateway = await start_gateway(config, policies=(LoginPolicy, CdnPolicy))
    async with client.get(gateway.url + "/api/products") as response:
        assert caching_headers(response.headers) == {"Cache-Control": ["private, max-age=3600"], "Vary": ["Accept-Encoding"]}


async def test_set_cookie_on_an_upstream_no_store_keeps_no_store_and_still_drops_the_cdn_headers(upstream, start_gateway, client) -> None:
    upstream.handler = answering(200, {"Cache-Control": "no-store", "Set-Cookie": "session=abc", **UPSTREAM_SHARED})
    gateway = await start_gateway(config_with(upstream.url), policies=POLICIES)
    async with client.get(gateway.url + "/api/products") as response:
        assert caching_headers(response.headers) == {"Cache-Control": ["no-store"], "Vary": ["Accept-Encoding"]}


async def test_keep_upstream_with_set_cookie_makes_the_upstreams_cache_control_private(upstream, start_gateway, client) -> None:
    upstream.handler = answering(200, {"Cache-Control": "public, max-age=60, s-maxage=300, must-revalidate", "Set-Cookie": "a=b"})
    gateway = await start_gateway(config_with(upstream.url, {**BLOCK, "keep_upstream": True}), policies=POLICIES)
    async with client.get(gateway.url + "/api/products") as response:
        assert caching_headers(response.headers) == {"Cache-Control": ["private, max-age=60, must-revalidate"], "Vary": ["Accept-Encoding"]}


async def test_an_empty_block_still_makes_set_cookie_responses_private(upstream, start_gateway, client) -> None:
    upstream.handler = answering(200, {"Cache-Control": "public, max-age=60", "Set-Cookie": "a=b", "CDN-Cache-Control": "max-age=600"})
    gateway = await start_gateway(config_with(upstream.url, {}), policies=POLICIES)
    async with client.get(gateway.url + "/api/products") as response:
        assert caching_headers(response.headers) == {"Cache-Control": ["private, max-age=60"]}
    upstream.handler = answering(200, {"Set-Cookie": "a=b"})
    async with client.get(gateway.url + "/api/products") as response:
        assert caching_headers(response.headers) == {"Cache-Control": ["private"]}


# -- Vary -----------------------------------------------------------------------------------------


async def test_vary_is_merged_into_the_upstreams_without_duplicates_keeping_its_order(upstream, start_gateway, client) -> None:
    upstream.handler = answering(200, {"Vary": "accept-encoding, Origin"})
    gateway = await start_gateway(config_with(upstream.url, {**BLOCK, "vary": ["Accept-Encoding", "Accept-Language"]}), policies=POLICIES)
    async with client.get(gateway.url + "/api/products") as response:
        assert response.headers.getall("Vary") == ["accept-encoding, Origin, Accept-Language"]


async def test_an_upstream_vary_star_stays_star(upstream, start_gateway, client) -> None:
    upstream.handler = answering(200, {"Vary": "*"})
    gateway = await start_gateway(config_with(upstream.url), policies=POLICIES)
    async with client.get(gateway.url + "/api/products") as response:
        assert response.headers.getall("Vary") == ["*"]


async def test_vary_is_merged_on_private_answers_too(upstream, start_gateway, client) -> None:
    upstream.handler = answering(200, {"Vary": "Origin", "Set-Cookie": "a=b"})
    gateway = await start_gateway(config_with(upstream.url), policies=POLICIES)
    async with client.get(gateway.url + "/api/products") as response:
        assert response.headers.getall("Vary") == ["Origin, Accept-Encoding"]


# -- switching and duplicates ---------------------------------------------------------------------


async def test_a_route_with_cdn_false_under_a_defaults_block_gets_no_caching_headers(upstream, start_gateway, client) -> None:
    upstream.handler = answering(200, {"Cache-Control": "no-cache"})
    config = base_config(upstream.url)
    config["defaults"] = {"cdn": BLOCK}
    config["routes"] = [
        {"name": "off", "match": {"path": "/api/admin"}, "upstream": "api", "cdn": False},
        {"name": "inherits", "match": {"path": "/"}, "upstream": "api"},
    ]
    gateway = await start_gateway(config, policies=POLICIES)
    async with client.get(gateway.url + "/api/admin/stats") as response:
        assert caching_headers(response.headers) == {"Cache-Control": ["no-cache"]}
    async with client.get(gateway.url + "/api/products") as response:
        assert response.headers.getall("Cache-Control") == [SHARED["Cache-Control"]]
        assert response.headers.getall("CDN-Cache-Control") == [SHARED["CDN-Cache-Control"]]


async def test_no_caching_header_is_sent_twice_even_when_the_upstream_sent_several(upstream, start_gateway, client) -> None:
    repeated = CIMultiDict(
        [
            ("Cache-Control", "no-cache"),
            ("Cache-Control", "max-age=5"),
            ("CDN-Cache-Control", "max-age=1"),
            ("CDN-Cache-Control", "max-age=2"),
            ("Surrogate-Key", "a"),
            ("Surrogate-Key", "b"),
            ("Vary", "Origin"),
            ("Vary", "Accept-Encoding"),
        ]
    )
    upstream.handler = answering(200, repeated)
    gateway = await start_gateway(config_with(upstream.url), policies=POLICIES)
    async with client.get(gateway.url + "/api/products") as response:
        assert caching_headers(response.headers) == {**{name: [value] for name, value in SHARED.items()}, "Vary": ["Origin, Accept-Encoding"]}


async def test_keep_upstream_leaves_the_upstreams_lines_as_sent_and_adds_no_copy_of_its_own(upstream, start_gateway, client) -> None:
    repeated = CIMultiDict([("Cache-Control", "no-cache"), ("Cache-Control", "max-age=5"), ("CDN-Cache-Control", "max-age=1")])
    upstream.handler = answering(200, repeated)
    gateway = await start_gateway(config_with(upstream.url, {**BLOCK, "keep_upstream": True}), policies=POLICIES)
    async with client.get(gateway.url + "/api/products") as response:
        assert caching_headers(response.headers) == {
            "Cache-Control": ["no-cache", "max-age=5"],
            "CDN-Cache-Control": ["max-age=1"],
            "Surrogate-Control": [SHARED["Surrogate-Control"]],
            "Surrogate-Key": [SHARED["Surrogate-Key"]],
            "Vary": ["Accept-Encoding"],
        }


# -- config errors --------------------------------------------------------------------------------


def config_issues(block: Any) -> dict[str, str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(config_with("http://127.0.0.1:1", block), policies=POLICIES)
    return {issue.path: issue.message for issue in caught.value.issues}


@pytest.mark.parametrize(
    ("block", "key", "message"),
    [
        ({"cache_control": "max_age=60"}, "cache_control", "unknown directive 'max_age'; did you mean 'max-age'?"),
        ({"cache_control": "max-age=1h"}, "cache_control", "max-age takes a number of seconds, got '1h': write seconds: max-age=3600"),
        ({"cache_control": "public, private"}, "cache_control", "public contradicts private"),
        ({"cache_control": "no-store, public"}, "cache_control", "public contradicts no-store"),
        ({"cache_control": ""}, "cache_control", "expected Cache-Control directives such as 'public, max-age=3600', got ''"),
        ({"cache_control": "public max-age=60"}, "cache_control", "expected directives separated by commas"),
        ({"cache_control": "public\r\nSet-Cookie: a=b"}, "cache_control", "without CR, LF"),
        ({"cache_control": "max-age=-1"}, "cache_control", "max-age takes a number of seconds, got '-1'"),
        ({"cache_control": "max-age"}, "cache_control", "max-age needs a number of seconds"),
        ({"cache_control": "public=yes"}, "cache_control", "public takes no value"),
        ({"cache_control": "max-age=60, max-age=120"}, "cache_control", "max-age is given twice"),
        ({"cache_control": 3600}, "cache_control", "expected a string"),
        ({"cdn_cache_control": "public, max-age=1d"}, "cdn_cache_control", "write seconds: max-age=86400"),
        ({"surrogate_control": "max-ag=60"}, "surrogate_control", "did you mean 'max-age'?"),
        ({"surrogate_key": ["two words"]}, "surrogate_key", "without spaces"),
        ({"vary": ["Accept Encoding"]}, "vary", "expected request header names"),
        ({"vary": ["Origin", "origin"]}, "vary", "given twice"),
        ({"cache_controll": "public"}, "cache_controll", "did you mean 'cache_control'?"),
    ],
)
def test_a_bad_cdn_block_is_a_config_error_at_its_key_path(block: Any, key: str, message: str) -> None:
    issues = config_issues(block)
    path = f"routes[0].cdn.{key}"
    assert path in issues, issues
    assert message in issues[path]


def test_a_bad_cdn_block_under_defaults_is_reported_at_its_own_path() -> None:
    config = base_config("http://127.0.0.1:1")
    config["defaults"] = {"cdn": {"cache_control": "max_age=60"}}
    with pytest.raises(ConfigError) as caught:
        parse_config(config, policies=POLICIES)
    assert [issue.path for issue in caught.value.issues] == ["defaults.cdn.cache_control"]
