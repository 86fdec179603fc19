"""Bodies read whole: the markup fast path must not let escaped markup through."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gateway.body import JsonGuards, _check, _within_guards
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


LONE_SURROGATE = st.builds("{}{}{}".format, st.text(max_size=6), st.sampled_from(["\ud800", "\udbff", "\udc00", "\udfff"]), st.text(max_size=6))
TEXT = st.text(max_size=20) | LONE_SURROGATE
JSON_DOCUMENTS = st.recursive(
    st.none() | st.booleans() | st.integers() | TEXT,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(TEXT, children, max_size=5),
    max_leaves=25,
)


@settings(derandomize=True, max_examples=800, deadline=None)
@example(document={"bio": "\ud800"}, ascii_only=True, guards=JsonGuards())  # an escaped lone surrogate
@example(document=["abcd"], ascii_only=True, guards=JsonGuards(max_string=3))
@example(document=[[[1]]], ascii_only=True, guards=JsonGuards(max_depth=2))
@example(document=[1, 2, 3], ascii_only=True, guards=JsonGuards(max_members=2))
@given(
    document=JSON_DOCUMENTS,
    ascii_only=st.booleans(),
    guards=st.builds(JsonGuards, max_depth=st.integers(1, 5), max_members=st.integers(1, 6), max_string=st.integers(1, 24)),
)
def test_a_body_the_text_bounds_pass_is_one_the_guard_walk_passes(document: Any, ascii_only: bool, guards: JsonGuards) -> None:
    """The walk over a parsed body is skipped when the text's bounds hold: that may never let
    through a body the walk refuses (too deep, too many members, a long string, a lone surrogate)."""
    raw = json.dumps(document, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return  # not a body parse_json reads at all (it refuses it as not UTF-8)
    if _within_guards(raw, guards):
        _check(json.loads(raw), guards, 1)  # raises BodyError when a guard is broken
