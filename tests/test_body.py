"""Bodies read whole: the markup fast path must not let escaped markup through."""

from __future__ import annotations

import json

import pytest

from gateway.policies.sanitize import might_hold_markup
from tests.conftest import base_config


@pytest.mark.parametrize(
    ("raw", "kind", "expected"),
    [
        (b'{"bio": "plain text & more"}', "json", False),
        (b'{"bio": "\\u003cscript\\u003e"}', "json", True),  # "<" written as a JSON escape
        (b'{"bio": "\\u003Cb>"}', "json", True),
        (b"bio=%3Cb%3Ehi", "form", True),
        (b"bio=%3cb%3ehi", "form", True),
        (b"bio=hello+world", "form", False),
        (b"--b\r\n...<b>...", "multipart", True),
    ],
)
def test_the_fast_path_sees_markup_however_the_body_encodes_it(raw: bytes, kind: str, expected: bool) -> None:
    assert might_hold_markup(raw, kind) is expected


async def test_markup_hidden_in_json_escapes_is_still_removed(upstream, start_gateway, client) -> None:
    config = base_config(upstream.url)
    config["routes"][0]["sanitize"] = {"mode": "strip"}
    gateway = await start_gateway(config)
    body = b'{"bio": "\\u003cscript\\u003ealert(1)\\u003c/script\\u003eHello", "n": 1}'
    async with client.post(gateway.url + "/p", data=body, headers={"Content-Type": "application/json"}) as response:
        assert response.status == 200
    assert json.loads(upstream.requests[0].body) == {"bio": "Hello", "n": 1}


async def test_a_clean_body_reaches_the_upstream_byte_for_byte(upstream, start_gateway, client) -> None:
    config = base_config(upstream.url)
    config["routes"][0]["sanitize"] = {"mode": "strip"}
    gateway = await start_gateway(config)
    body = b'{ "name" : "Oak bowl",\n  "price": 30.50, "tags": ["wood"] }'
    async with client.post(gateway.url + "/p", data=body, headers={"Content-Type": "application/json"}) as response:
        assert response.status == 200
    assert upstream.requests[0].body == body


async def test_with_html_output_a_body_without_markup_is_still_escaped(upstream, start_gateway, client) -> None:
    config = base_config(upstream.url)
    config["routes"][0]["sanitize"] = {"mode": "strip", "output": "html"}
    gateway = await start_gateway(config)
    async with client.post(gateway.url + "/p", json={"title": "Tom & Jerry"}) as response:
        assert response.status == 200
    assert json.loads(upstream.requests[0].body) == {"title": "Tom &amp; Jerry"}
