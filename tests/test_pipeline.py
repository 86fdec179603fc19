"""The policy chain: order, local replies, response hooks, failure modes, plugging in a policy."""

from __future__ import annotations

import json
from typing import Literal

from hypothesis import given, settings, strategies as st

from gateway.errors import PROBLEM_BASE, DependencyUnavailable, problem_body
from gateway.pipeline import Exchange, Policy, Reply, problem
from gateway.settings import Settings
from tests.conftest import assert_problem, base_config


class TagSettings(Settings):
    label: str
    deny_path: str | None = None
    fail: Literal["never", "open", "closed"] = "never"


class TagPolicy(Policy):
    """Stamps the upstream request and the response; may deny a path or fail to decide."""

    name = "tag"
    settings_type = TagSettings

    def __init__(self, settings: TagSettings, context) -> None:
        super().__init__(settings, context)
        if settings.fail != "never":
            self.failure_mode = settings.fail

    async def on_request(self, exchange: Exchange) -> Reply | None:
        if self.settings.fail != "never":
            raise DependencyUnavailable("store is down")
        exchange.upstream_headers.add("X-Trail", f"tag:{self.settings.label}")
        if exchange.path == self.settings.deny_path:
            return problem(exchange, 403, "denied by tag")
        return None

    def on_response(self, exchange: Exchange, reply: Reply) -> None:
        reply.headers.add("X-Trail", f"tag:{self.settings.label}")


class StampSettings(Settings):
    value: str = "stamp"


class StampPolicy(Policy):
    name = "stamp"
    settings_type = StampSettings

    async def on_request(self, exchange: Exchange) -> Reply | None:
        exchange.upstream_headers.add("X-Trail", f"stamp:{self.settings.value}")
        return None

    def on_response(self, exchange: Exchange, reply: Reply) -> None:
        reply.headers.add("X-Trail", f"stamp:{self.settings.value}")


class HeaderOnlyPolicy(Policy):
    """Only a response hook: its request side costs nothing."""

    name = "header_only"
    settings_type = StampSettings

    def on_response(self, exchange: Exchange, reply: Reply) -> None:
        reply.headers["X-Header-Only"] = self.settings.value


POLICIES = (TagPolicy, StampPolicy, HeaderOnlyPolicy)


async def test_request_hooks_run_in_registry_order_and_response_hooks_in_reverse(start_gateway, upstream, client):
    config = base_config(upstream.url)
    config["routes"][0].update(tag={"label": "t"}, stamp={"value": "s"})
    gw = await start_gateway(config, policies=POLICIES)
    async with client.get(gw.url + "/x") as resp:
        assert resp.status == 200
        assert resp.headers.getall("X-Trail") == ["stamp:s", "tag:t"]
    assert upstream.requests[-1].header_items.count(("X-Trail", "tag:t")) == 1
    trail = [value for name, value in upstream.requests[-1].header_items if name == "X-Trail"]
    assert trail == ["tag:t", "stamp:s"]


async def test_a_local_reply_ends_the_chain_and_still_gets_response_hooks(start_gateway, upstream, client):
    config = base_config(upstream.url)
    config["routes"][0].update(tag={"label": "t", "deny_path": "/secret"}, stamp={"value": "s"})
    gw = await start_gateway(config, policies=POLICIES)
    async with client.get(gw.url + "/secret") as resp:
        assert_problem(resp.status, resp.headers, await resp.read(), 403)
        # stamp never saw the request, but every response passes every response hook
        assert resp.headers.getall("X-Trail") == ["stamp:s", "tag:t"]
    assert upstream.requests == []


async def test_a_failing_policy_with_failure_mode_closed_answers_503(start_gateway, upstream, client):
    config = base_config(upstream.url)
    config["routes"][0]["tag"] = {"label": "t", "fail": "closed"}
    gw = await start_gateway(config, policies=POLICIES)
    async with client.get(gw.url + "/x") as resp:
        assert_problem(resp.status, resp.headers, await resp.read(), 503)
    assert upstream.requests == []


async def test_a_failing_policy_with_failure_mode_open_lets_the_request_through(start_gateway, upstream, client):
    config = base_config(upstream.url)
    config["routes"][0]["tag"] = {"label": "t", "fail": "open"}
    gw = await start_gateway(config, policies=POLICIES)
    async with client.get(gw.url + "/x") as resp:
        assert resp.status == 200
    assert len(upstream.requests) == 1


async def test_routes_inherit_default_blocks_replace_them_or_switch_them_off(start_gateway, upstream, client):
    config = base_config(upstream.url)
    config["defaults"] = {"stamp": {"value": "default"}}
    config["routes"] = [
        {"name": "inherits", "match": {"path": "/a"}, "upstream": "api"},
        {"name": "replaces", "match": {"path": "/b"}, "upstream": "api", "stamp": {"value": "own"}},
        {"name": "off", "match": {"path": "/c"}, "upstream": "api", "stamp": False},
    ]
    gw = await start_gateway(config, policies=POLICIES)
    trails = {}
    for path in ("/a", "/b", "/c"):
        async with client.get(gw.url + path) as resp:
            trails[path] = resp.headers.getall("X-Trail", [])
    assert trails == {"/a": ["stamp:default"], "/b": ["stamp:own"], "/c": []}


async def test_gateway_made_errors_without_a_route_get_the_default_response_hooks(start_gateway, upstream, client):
    config = base_config(upstream.url)
    config["defaults"] = {"header_only": {"value": "on-404"}}
    config["routes"][0]["match"] = {"path": "/api"}
    gw = await start_gateway(config, policies=POLICIES)
    async with client.get(gw.url + "/nowhere") as resp:
        assert_problem(resp.status, resp.headers, await resp.read(), 404)
        assert resp.headers["X-Header-Only"] == "on-404"


async def test_hooks_a_policy_does_not_override_are_not_in_the_chain(start_gateway, upstream):
    config = base_config(upstream.url)
    config["routes"][0].update(header_only={"value": "v"}, stamp={"value": "s"})
    gw = await start_gateway(config, policies=POLICIES)
    pipeline = gw.gateway.runtime.router.routes[0].pipeline
    assert [type(p).__name__ for p in pipeline.policies] == ["StampPolicy", "HeaderOnlyPolicy"]
    assert [type(p).__name__ for p in pipeline._request] == ["StampPolicy"]
    assert len(pipeline._response) == 2


class BrokenPolicy(Policy):
    name = "broken"
    settings_type = StampSettings

    async def on_request(self, exchange: Exchange) -> Reply | None:
        raise RuntimeError("secret internal detail at 10.1.2.3")


async def test_an_unexpected_exception_is_a_500_problem_and_its_traceback_stays_in_the_log(start_gateway, upstream, client, caplog):
    import logging

    config = base_config(upstream.url)
    config["routes"][0]["broken"] = {}
    gw = await start_gateway(config, policies=(BrokenPolicy,))
    gateway_logger = logging.getLogger("gateway")
    gateway_logger.addHandler(caplog.handler)
    try:
        async with client.get(gw.url + "/x", headers={"X-Request-ID": "boom-1"}) as resp:
            body = await resp.read()
            document = assert_problem(resp.status, resp.headers, body, 500)
    finally:
        gateway_logger.removeHandler(caplog.handler)
    assert b"secret" not in body and b"10.1.2.3" not in body and b"Traceback" not in body
    assert document["request_id"] == "boom-1" == resp.headers["X-Request-ID"]
    record = next(r for r in caplog.records if r.getMessage() == "unexpected error")
    assert record.exc_info and "secret internal detail" in str(record.exc_info[1])
    assert record.request_id == "boom-1"
    assert upstream.requests == []


@settings(max_examples=300, derandomize=True)
@given(
    status=st.sampled_from([400, 401, 403, 404, 405, 413, 429, 502, 503]),
    detail=st.text(),
    request_id=st.text(),
    extra=st.none() | st.dictionaries(st.sampled_from(["allowed", "errors", "request_id", "status"]), st.text()),
)
def test_a_problem_body_is_the_json_of_its_fields_in_order(status: int, detail: str, request_id: str, extra: dict[str, str] | None) -> None:
    # The body of a problem without extra members is put together from a remembered head and
    # the request id: it must stay byte for byte what json.dumps writes for the same document.
    document = json.loads(problem_body(status, detail, request_id, extra))
    assert list(document)[:5] == ["type", "title", "status", "detail", "request_id"]
    assert document == {
        "type": document["type"], "title": document["title"], "status": status, "detail": detail, "request_id": request_id, **(extra or {}),
    }
    assert document["type"].startswith(PROBLEM_BASE)
    expected = json.dumps(document, separators=(",", ":")).encode()
    assert problem_body(status, detail, request_id, extra) == expected
