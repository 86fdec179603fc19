"""Sentry error tracking against a local endpoint standing in for Sentry's ingestion."""

from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator

import pytest
from aiohttp import web

from gateway.pipeline import Policy
from gateway.policies import POLICIES
from gateway.settings import Settings
from tests.conftest import assert_problem, base_config, free_port


class Ingest:
    """Records the envelopes a Sentry SDK posts (https://develop.sentry.dev/sdk/envelopes/)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.events: list[dict[str, Any]] = []
        self.runner: web.AppRunner | None = None

    @property
    def dsn(self) -> str:
        return f"http://publickey@127.0.0.1:{self.port}/42"

    async def receive(self, request: web.Request) -> web.Response:
        body = await request.read()  # aiohttp has already undone Content-Encoding
        lines = body.split(b"\n")
        for index in range(1, len(lines) - 1, 2):  # item header, item payload
            item = json.loads(lines[index])
            if item.get("type") == "event":
                self.events.append(json.loads(lines[index + 1]))
        return web.json_response({})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/api/42/envelope/", self.receive)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def wait_for(self, count: int, timeout: float = 10.0) -> None:
        for _ in range(int(timeout / 0.05)):
            if len(self.events) >= count:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"expected {count} events, got {len(self.events)}")


@pytest.fixture
async def ingest() -> AsyncIterator[Ingest]:
    server = Ingest()
    await server.start()
    yield server
    assert server.runner is not None
    await server.runner.cleanup()


class BrokenSettings(Settings):
    on: bool = True


class Broken(Policy):
    """Fails on /boom with an unexpected error; everything else passes."""

    name = "broken"
    settings_type = BrokenSettings

    async def on_request(self, exchange):  # type: ignore[no-untyped-def]
        if exchange.path == "/boom":
            raise RuntimeError("the database password is hunter2")  # the message is the app's business
        return None


def tracked(upstream_url: str, dsn: str) -> dict[str, Any]:
    config = base_config(upstream_url)
    config["routes"][0]["broken"] = {}
    config["routes"][0]["auth"] = {"required": False}
    config["auth"] = {"jwt": {"secret": "k" * 32, "algorithms": ["HS256"], "forward_claims": {"sub": "X-User-Id"}}}
    config["error_tracking"] = {"sentry_dsn": dsn, "environment": "test", "scrub_headers": ["X-Session"]}
    return config


async def test_an_unexpected_error_is_sent_with_its_context_and_without_secrets(ingest, upstream, start_gateway, client) -> None:
    import jwt as pyjwt

    token = pyjwt.encode({"sub": "ada", "exp": 9999999999}, "k" * 32, algorithm="HS256")
    gateway = await start_gateway(tracked(upstream.url, ingest.dsn), policies=(*POLICIES, Broken))
    headers = {"Authorization": f"Bearer {token}", "Cookie": "session=abc", "X-Session": "s3cret", "X-User-Id": "spoofed", "X-Request-ID": "req-77"}
    async with client.get(gateway.url + "/boom?token=abc", headers=headers) as response:
        assert_problem(response.status, response.headers, await response.read(), 500)
    await ingest.wait_for(1)
    event = ingest.events[0]
    assert event["tags"]["request_id"] == "req-77"
    assert event["tags"]["route"] == "all" and event["tags"]["upstream"] == "api"
    assert event["user"]["id"] == "ada"
    assert event["environment"] == "test"
    assert event["exception"]["values"][-1]["type"] == "RuntimeError"
    sent = event["contexts"]["request"]
    assert sent["path"] == "/boom" and "token=abc" not in json.dumps(event)
    for name in ("Authorization", "Cookie", "X-Session", "X-User-Id"):
        assert sent["headers"][name] == "[Filtered]"
    assert token not in json.dumps(event) and "s3cret" not in json.dumps(event)


async def test_expected_4xx_answers_are_never_sent(ingest, upstream, start_gateway, client) -> None:
    gateway = await start_gateway(tracked(upstream.url, ingest.dsn), policies=(*POLICIES, Broken))
    for path, headers in (("/nowhere/%00", {}), ("/", {"Authorization": "Bearer junk"})):
        async with client.get(gateway.url + path, headers=headers) as response:
            assert 400 <= response.status < 500
    async with client.get(gateway.url + "/boom") as response:
        assert response.status == 500
    await ingest.wait_for(1)
    await asyncio.sleep(0.3)
    assert len(ingest.events) == 1  # only the 500


async def test_without_a_dsn_sentry_is_not_loaded(upstream, start_gateway) -> None:
    import subprocess
    import sys

    code = "from gateway.app import Gateway; import sys; print('sentry_sdk' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
    gateway = await start_gateway(base_config(upstream.url))
    assert gateway.gateway.error_tracker is None
