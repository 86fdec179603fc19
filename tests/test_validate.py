"""The validate policy end to end: formats, field rules, form bodies, body limits, config errors.

Every refused request is answered by the gateway with problem+json and forwards nothing (the
recording upstream's ``requests`` stays empty); every accepted one reaches the upstream intact.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.config import parse_config
from gateway.errors import ConfigError
from tests.conftest import assert_problem, base_config, parse_raw_response

JSON = {"Content-Type": "application/json"}
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def validated(upstream_url: str, **validate: Any) -> dict[str, Any]:
    config = base_config(upstream_url)
    config["routes"][0]["validate"] = validate
    return config


async def post(client, gateway, body: bytes | str | Any, headers: dict[str, str] | None = None) -> tuple[int, Any, bytes]:
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    async with client.post(gateway.url + "/api/users", data=data, headers=JSON if headers is None else headers) as response:
        return response.status, response.headers, await response.read()


async def refused(client, gateway, upstream, body: Any, status: int = 422, headers: dict[str, str] | None = None) -> dict[str, Any]:
    """Post; the gateway answers `status` itself and the upstream receives nothing."""
    document = assert_problem(*await post(client, gateway, body, headers), status)
    assert upstream.requests == []
    return document


async def accepted(client, gateway, upstream, body: Any, headers: dict[str, str] | None = None) -> None:
    """Post; the upstream receives the body byte for byte and the client gets its answer."""
    raw = body if isinstance(body, bytes) else (body.encode() if isinstance(body, str) else json.dumps(body).encode())
    status, _, answer = await post(client, gateway, raw, headers)
    assert status == 200, answer
    assert [(r.method, r.body) for r in upstream.requests] == [("POST", raw)]


async def one_response(port: int, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes; read the one response they get (the connection may stay open)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        status, headers, _ = parse_raw_response(head)
        return status, headers, await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 5)
    finally:
        writer.close()


def rules_broken(document: dict[str, Any]) -> list[tuple[str, str]]:
    return [(error["field"], error["rule"]) for error in document["errors"]]


# -- formats ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "value", "valid"),
    [
        ("email", "ada@example.com", True),
        ("email", "first.last+tag@mail.example.org", True),
        ("email", "ada.example.com", False),
        ("email", "ada@", False),
        ("email", "ada lovelace@example.com", False),
        ("url", "https://shop.example/items?id=7", True),
        ("url", "http://example.com", True),
        ("url", "shop.example/items", False),
        ("url", "javascript:alert(1)", False),
        ("uuid", "123e4567-e89b-12d3-a456-426614174000", True),
        ("uuid", "123e4567-e89b-12d3-a456-42661417400", False),
        ("uuid", "zzze4567-e89b-12d3-a456-426614174000", False),
        ("ipv4", "192.168.0.1", True),
        ("ipv4", "256.1.1.1", False),
        ("ipv4", "1.2.3", False),
        ("ipv4", "::1", False),
        ("ipv6", "2001:db8::8a2e:370:7334", True),
        ("ipv6", "::1", True),
        ("ipv6", "2001:db8:::1", False),
        ("ipv6", "192.168.0.1", False),
        ("domain", "shop.example.co.uk", True),
        ("domain", "localhost", False),
        ("domain", "-bad.example", False),
        ("domain", "sp ace.example", False),
        ("phone", "+14155552671", True),
        ("phone", "+1 415 555 2671", True),
        ("phone", "415 555 2671", False),  # national numbers need phone_region
        ("phone", "hello", False),
        ("phone", "+1", False),
        ("phone", "junk +14155552671", False),  # a number hidden in text is not a phone number
        ("phone", "+14155552671\u0000", False),
        ("date", "2024-02-29", True),
        ("date", "2023-02-29", False),
        ("date", "2024-1-5", False),
        ("date", "2024-13-01", False),
        ("date", "2024-02-29T10:00:00Z", False),
        ("date", "2024-02-29\n", False),
        ("date-time", "2024-02-29T12:30:00Z", True),
        ("date-time", "2024-02-29T12:30:00.123+02:00", True),
        ("date-time", "2024-02-29T12:30:00-05:30", True),
        ("date-time", "2024-02-29T12:30:00", False),  # no zone
        ("date-time", "2024-02-29 12:30:00Z", False),
        ("date-time", "2023-02-29T12:30:00Z", False),
        ("date-time", "2024-02-29T12:30:61Z", False),
    ],
)
async def test_each_format_accepts_valid_samples_and_refuses_invalid_ones(upstream, start_gateway, client, fmt: str, value: str, valid: bool) -> None:
    gateway = await start_gateway(validated(upstream.url, fields={"value": {"format": fmt}}))
    if valid:
        await accepted(client, gateway, upstream, {"value": value})
    else:
        document = await refused(client, gateway, upstream, {"value": value})
        assert document["errors"] == [{"field": "value", "rule": "format", "message": f"expected a valid {fmt}"}]
        assert document["type"] == "https://gateway.dev/problems/validation-failed"


async def test_a_national_phone_number_is_valid_only_with_its_phone_region(upstream, start_gateway, client) -> None:
    gateway = await start_gateway(validated(upstream.url, fields={"phone": {"format": "phone", "phone_region": "US"}}))
    await accepted(client, gateway, upstream, {"phone": "415 555 2671"})
    status, headers, body = await post(client, gateway, {"phone": "555 2671"})
    assert rules_broken(assert_problem(status, headers, body, 422)) == [("phone", "format")]
    assert len(upstream.requests) == 1  # only the valid one


# -- rules --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("wanted", "value", "valid"),
    [
        ("string", "text", True),
        ("string", 5, False),
        ("integer", 5, True),
        ("integer", -3, True),
        ("integer", True, False),  # a boolean is not an integer
        ("integer", 5.5, False),
        ("integer", "5", False),
        ("number", 1, True),  # an integer is a number
        ("number", 2.5, True),
        ("number", "2.5", False),
        ("number", False, False),
        ("boolean", True, True),
        ("boolean", 0, False),
        ("boolean", "true", False),
        ("object", {"a": 1}, True),
        ("object", [1], False),
        ("array", [1, "a"], True),
        ("array", {"a": 1}, False),
        ("array", "[]", False),
    ],
)
async def test_type_rules_tell_json_types_apart(upstream, start_gateway, client, wanted: str, value: Any, valid: bool) -> None:
    gateway = await start_gateway(validated(upstream.url, fields={"value": {"type": wanted}}))
    if valid:
        await accepted(client, gateway, upstream, {"value": value})
    else:
        document = await refused(client, gateway, upstream, {"value": value})
        assert rules_broken(document) == [("value", "type")]
        assert document["errors"][0]["message"].startswith(f"expected {wanted}, got ")


async def test_a_missing_or_null_required_field_is_reported_as_required(upstream, start_gateway, client) -> None:
    gateway = await start_gateway(validated(upstream.url, fields={"email": {"format": "email", "required": True}, "name": {"type": "string"}}))
    document = await refused(client, gateway, upstream, {"name": "Ada"})
    assert document["errors"] == [{"field": "email", "rule": "required", "message": "is required"}]
    assert rules_broken(await refused(client, gateway, upstream, {"email": None})) == [("email", "required")]
    await accepted(client, gateway, upstream, {"email": "ada@example.com"})  # name is optional


async def test_a_post_without_a_body_misses_its_required_fields(upstream, start_gateway, client) -> None:
    gateway = await start_gateway(validated(upstream.url, fields={"email": {"required": True}, "name": {}}))
    async with client.post(gateway.url + "/api/users") as response:
        document = assert_problem(response.status, response.headers, await response.read(), 422)
    assert rules_broken(document) == [("email", "required")]
    assert upstream.requests == []


async def test_reads_without_a_body_are_not_validated(upstream, start_gateway, client) -> None:
    gateway = await start_gateway(validated(upstream.url, fields={"email": {"required": True}}))
    async with client.get(gateway.url + "/api/users") as response:
        assert response.status == 200
    assert [r.method for r in upstream.requests] == ["GET"]


@pytest.mark.parametrize(
    ("rule", "value", "broken"),
    [
        ({"min_length": 2, "max_length": 4}, "ab", None),
        ({"min_length": 2, "max_length": 4}, "abcd", None),
        ({"min_length": 2, "max_length": 4}, "a", "min_length"),
        ({"min_length": 2, "max_length": 4}, "abcde", "max_length"),
        ({"max_length": 3}, "ééé", None),  # characters, not bytes
        ({"min_length": 1, "max_length": 2}, [1, 2], None),
        ({"min_length": 1, "max_length": 2}, [], "min_length"),
        ({"min_length": 1, "max_length": 2}, [1, 2, 3], "max_length"),
        ({"minimum": 0, "maximum": 10}, 0, None),
        ({"minimum": 0, "maximum": 10}, 10, None),
        ({"minimum": 0, "maximum": 10}, -1, "minimum"),
        ({"minimum": 0, "maximum": 10}, 10.5, "maximum"),
        ({"enum": ["red", "green"]}, "green", None),
        ({"enum": ["red", "green"]}, "blue", "enum"),
        ({"enum": ["red", "green"]}, "RED", "enum"),
        ({"enum": [1, 2]}, 2, None),
        ({"enum": [0, 1]}, True, "enum"),  # true is not 1
        ({"enum": [True]}, 1, "enum"),
        ({"pattern": r"^[A-Z]{3}-\d{4}$"}, "ABC-1234", None),
        ({"pattern": r"^[A-Z]{3}-\d{4}$"}, "xABC-1234", "pattern"),
        ({"pattern": r"^[A-Z]{3}-\d{4}$"}, "ABC-12345", "pattern"),
        ({"pattern": r"^[a-z]+$"}, "a" * 1025, "pattern"),  # patterns never see more than 1024 characters
    ],
    ids=lambda value: json.dumps(value, ensure_ascii=False)[:40] if isinstance(value, (dict, str)) else None,
)
async def test_length_range_enum_and_pattern_rules(upstream, start_gateway, client, rule: dict[str, Any], value: Any, broken: str | None) -> None:
    gateway = await start_gateway(validated(upstream.url, fields={"value": rule}))
    if broken is None:
        await accepted(client, gateway, upstream, {"value": value})
    else:
        assert rules_broken(await refused(client, gateway, upstream, {"value": value})) == [("value", broken)]


async def test_nested_paths_and_array_items_are_named_where_they_failed(upstream, start_gateway, client) -> None:
    fields = {"address.city": {"type": "string", "required": True}, "items[].sku": {"pattern": r"^SKU-\d+$", "required": True}}
    gateway = await start_gateway(validated(upstream.url, fields=fields))
    body = {"address": {"city": 7}, "items": [{"sku": "SKU-1"}, {"sku": "sku 2"}, {"name": "no sku"}]}
    document = await refused(client, gateway, upstream, body)
    assert rules_broken(document) == [("address.city", "type"), ("items[1].sku", "pattern"), ("items[2].sku", "required")]
    assert document["detail"] == "invalid fields: address.city, items[1].sku, items[2].sku"
    assert rules_broken(await refused(client, gateway, upstream, {"items": []})) == [("address.city", "required")]
    await accepted(client, gateway, upstream, {"address": {"city": "Oslo"}, "items": [{"sku": "SKU-1"}, {"sku": "SKU-22"}]})


async def test_every_invalid_field_is_reported_at_once(upstream, start_gateway, client) -> None:
    fields = {
        "email": {"format": "email", "required": True},
        "age": {"type": "integer", "minimum": 18},
        "name": {"type": "string", "max_length": 5},
        "role": {"enum": ["buyer", "seller"]},
    }
    gateway = await start_gateway(validated(upstream.url, fields=fields))
    document = await refused(client, gateway, upstream, {"age": 12, "name": "Alexandra", "role": "admin"})
    assert sorted(rules_broken(document)) == [("age", "minimum"), ("email", "required"), ("name", "max_length"), ("role", "enum")]


async def test_a_body_that_is_not_an_object_fails_the_whole_document(upstream, start_gateway, client) -> None:
    gateway = await start_gateway(validated(upstream.url, fields={"email": {"required": True}}))
    document = await refused(client, gateway, upstream, [{"email": "ada@example.com"}])
    assert rules_broken(document) == [("", "type")]


@pytest.mark.parametrize("mode", ["allow", "strip", "reject"])
async def test_additional_fields_are_allowed_stripped_or_rejected(upstream, start_gateway, client, mode: str) -> None:
    gateway = await start_gateway(validated(upstream.url, additional_fields=mode, fields={"name": {"type": "string"}, "address.city": {"type": "string"}}))
    body = b'{"name":"Ada","is_admin":true,"address":{"city":"Oslo","zip":"0150"}}'
    if mode == "allow":
        await accepted(client, gateway, upstream, body)
    elif mode == "reject":
        document = await refused(client, gateway, upstream, body)
        assert document["errors"] == [{"field": "is_admin", "rule": "additional", "message": "is not an accepted field"}]
    else:
        status, _, _ = await post(client, gateway, body)
        assert status == 200
        (received,) = upstream.requests
        assert json.loads(received.body) == {"name": "Ada", "address": {"city": "Oslo", "zip": "0150"}}  # top level only
        assert int(received.headers["Content-Length"]) == len(received.body)
        assert "Transfer-Encoding" not in received.headers


async def test_strip_leaves_a_body_without_extra_fields_byte_for_byte(upstream, start_gateway, client) -> None:
    gateway = await start_gateway(validated(upstream.url, additional_fields="strip", fields={"name": {"type": "string"}}))
    await accepted(client, gateway, upstream, b'{ "name" : "Ada" }')


# -- form bodies --------------------------------------------------------------------------------


async def test_form_fields_meet_string_rules_and_coerce_integers_and_booleans(upstream, start_gateway, client) -> None:
    fields = {
        "email": {"format": "email", "required": True},
        "name": {"type": "string", "min_length": 2, "max_length": 10},
        "age": {"type": "integer", "minimum": 18},
        "newsletter": {"type": "boolean"},
    }
    gateway = await start_gateway(validated(upstream.url, fields=fields))
    await accepted(client, gateway, upstream, "email=ada%40example.com&name=Ada&age=36&newsletter=true", FORM)
    upstream.requests.clear()
    document = await refused(client, gateway, upstream, "email=nope&name=A&age=17&newsletter=yes", headers=FORM)
    assert rules_broken(document) == [("email", "format"), ("name", "min_length"), ("age", "minimum"), ("newsletter", "type")]
    assert rules_broken(await refused(client, gateway, upstream, "email=ada%40example.com&age=3.5", headers=FORM)) == [("age", "type")]
    assert rules_broken(await refused(client, gateway, upstream, "name=Ada", headers=FORM)) == [("email", "required")]


async def test_strip_removes_extra_form_fields_and_keeps_the_order_of_the_rest(upstream, start_gateway, client) -> None:
    gateway = await start_gateway(validated(upstream.url, additional_fields="strip", fields={"name": {}, "age": {"type": "integer"}}))
    status, _, _ = await post(client, gateway, "age=36&is_admin=1&name=Ada+L", FORM)
    assert status == 200
    (received,) = upstream.requests
    assert received.body == b"age=36&name=Ada+L"
    assert received.headers["Content-Length"] == str(len(received.body))


async def test_a_repeated_form_field_is_checked_in_every_copy(upstream, start_gateway, client) -> None:
    # Upstreams differ on which copy they read (first, last, all): every copy must be valid.
    gateway = await start_gateway(validated(upstream.url, fields={"role": {"enum": ["buyer", "seller"]}}))
    document = await refused(client, gateway, upstream, "role=admin&role=buyer", headers=FORM)
    assert rules_broken(document) == [("role", "enum")]
    await accepted(client, gateway, upstream, "role=buyer&role=seller", FORM)


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        pytest.param(b"name=%FF", "UTF-8", id="percent-encoded bytes that are not UTF-8"),
        pytest.param(b"name=\xff", "UTF-8", id="raw bytes that are not UTF-8"),
        pytest.param(b"&".join(b"f%d=1" % i for i in range(1001)), "fields", id="more fields than max_members"),
    ],
)
async def test_an_unreadable_form_body_is_a_400_not_a_500(upstream, start_gateway, client, body: bytes, detail: str) -> None:
    gateway = await start_gateway(validated(upstream.url, fields={"name": {"type": "string"}}))
    document = await refused(client, gateway, upstream, body, 400, FORM)
    assert detail in document["detail"]


# -- body limits ----------------------------------------------------------------------------------


async def test_a_declared_length_over_max_body_is_refused_before_the_body_is_sent(upstream, start_gateway) -> None:
    gateway = await start_gateway(validated(upstream.url, max_body="1kb", fields={"name": {}}))
    head = b"POST /api/users HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1025\r\n\r\n"
    document = assert_problem(*await one_response(gateway.port, head), 413)  # no body sent at all
    assert document["type"] == "https://gateway.dev/problems/payload-too-large"
    assert upstream.requests == []


async def test_a_body_of_exactly_max_body_is_accepted(upstream, start_gateway, client) -> None:
    gateway = await start_gateway(validated(upstream.url, max_body="64b", fields={"name": {}}))
    body = b'{"name":"' + b"a" * 53 + b'"}'
    assert len(body) == 64
    await accepted(client, gateway, upstream, body)


async def test_a_chunked_body_crossing_max_body_is_refused_while_it_streams(upstream, start_gateway) -> None:
    gateway = await start_gateway(validated(upstream.url, max_body="1kb", fields={"name": {}}))
    head = b"POST /api/users HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunk = b'{"name":"' + b"a" * 1100
    # No terminating chunk: the answer must come while the client is still "sending".
    assert_problem(*await one_response(gateway.port, head + b"%x\r\n%s\r\n" % (len(chunk), chunk)), 413)
    assert upstream.requests == []


async def test_a_streamed_body_without_content_length_is_bounded_too(upstream, start_gateway, client) -> None:
    gateway = await start_gateway(validated(upstream.url, max_body="4kb", fields={"name": {}}))

    async def pieces(count: int) -> AsyncIterator[bytes]:
        yield b'{"name":"'
        for _ in range(count):
            yield b"a" * 512
        yield b'"}'

    async with client.post(gateway.url + "/api/users", data=pieces(16), headers=JSON) as response:
        assert_problem(response.status, response.headers, await response.read(), 413)
    assert upstream.requests == []
    async with client.post(gateway.url + "/api/users", data=pieces(2), headers=JSON) as response:
        assert response.status == 200
    assert upstream.requests[0].body == b'{"name":"' + b"a" * 1024 + b'"}'


async def test_a_slow_body_is_timed_per_read_not_as_a_whole(upstream, start_gateway, client) -> None:
    config = validated(upstream.url, fields={"name": {}})
    config["listen"]["limits"] = {"body_timeout": "300ms"}
    gateway = await start_gateway(config)

    async def trickle(pause: float, count: int) -> AsyncIterator[bytes]:
        yield b'{"name":"'
        for _ in range(count):
            await asyncio.sleep(pause)
            yield b"a"
        yield b'"}'

    async with client.post(gateway.url + "/api/users", data=trickle(0.1, 5), headers=JSON) as response:
        assert response.status == 200  # 0.5 s in all, never 0.3 s between two reads
    assert upstream.requests[0].body == b'{"name":"aaaaa"}'
    upstream.requests.clear()
    async with client.post(gateway.url + "/api/users", data=trickle(0.6, 1), headers=JSON) as response:
        assert_problem(response.status, response.headers, await response.read(), 408)
    assert upstream.requests == []


@pytest.mark.parametrize("content_type", ["text/plain", "application/xml", "application/octet-stream", "multipart/form-data; boundary=b"])
async def test_a_media_type_outside_content_types_is_a_415(upstream, start_gateway, client, content_type: str) -> None:
    gateway = await start_gateway(validated(upstream.url, content_types=["Application/JSON"], fields={"name": {}}))
    document = await refused(client, gateway, upstream, b'{"name": "Ada"}', 415, {"Content-Type": content_type})
    assert document["detail"] == "expected a body of type application/json"


async def test_json_with_a_charset_parameter_is_still_json(upstream, start_gateway, client) -> None:
    gateway = await start_gateway(validated(upstream.url, content_types=["application/json"], fields={"name": {"type": "string"}}))
    await accepted(client, gateway, upstream, b'{"name": "Ada"}', {"Content-Type": "application/json; charset=utf-8"})


async def test_field_rules_cannot_be_skipped_by_sending_another_media_type(upstream, start_gateway, client) -> None:
    # Without content_types the rules still hold: a body the gateway cannot check is refused.
    gateway = await start_gateway(validated(upstream.url, fields={"email": {"format": "email", "required": True}}))
    await refused(client, gateway, upstream, b'{"email": "not an email"}', 415, {"Content-Type": "text/plain"})
    await accepted(client, gateway, upstream, b'{"email": "ada@example.com"}', {"Content-Type": "application/vnd.shop+json"})


async def test_a_route_without_field_rules_lets_any_body_within_max_body_through(upstream, start_gateway, client) -> None:
    gateway = await start_gateway(validated(upstream.url, max_body="1kb"))
    await accepted(client, gateway, upstream, b"just text", {"Content-Type": "text/plain"})
    for body in (b"5", b'"text"', b"[1, 2]", b"a=1&a=2"):
        upstream.requests.clear()
        await accepted(client, gateway, upstream, body, JSON if body != b"a=1&a=2" else FORM)


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        pytest.param(b'{"name": "Ada"', "not valid JSON", id="unclosed object"),
        pytest.param(b"{'name': 'Ada'}", "not valid JSON", id="single quotes"),
        pytest.param(b'{"name": "\xff\xfe"}', "not UTF-8", id="invalid UTF-8"),
        pytest.param(b'{"name": "Ada", "name": "admin"}', "duplicate", id="a duplicate key, which parsers resolve differently"),
        pytest.param(b'{"age": NaN}', "number", id="NaN, which RFC 8259 section 6 excludes"),
        pytest.param(b'{"age": -Infinity}', "number", id="-Infinity"),
        pytest.param(b'{"age": 1e400}', "number", id="a number that overflows to infinity"),
        pytest.param(b'{"age": ' + b"9" * 5000 + b"}", "number", id="an integer past the integer-string limit"),
    ],
)
async def test_a_body_that_is_not_json_is_a_400(upstream, start_gateway, client, body: bytes, detail: str) -> None:
    gateway = await start_gateway(validated(upstream.url, fields={"name": {"type": "string"}, "age": {"type": "number"}}))
    document = await refused(client, gateway, upstream, body, 400)
    assert detail in document["detail"]


@pytest.mark.parametrize(
    ("body", "limits", "detail"),
    [
        pytest.param(b"[" * 33 + b"]" * 33, {}, "nested deeper than 32", id="33 nested arrays"),
        pytest.param(b'{"a":' * 33 + b"1" + b"}" * 33, {}, "nested deeper than 32", id="33 nested objects"),
        pytest.param(b"[" * 100_000, {}, "nested deeper", id="100000 unclosed brackets"),
        pytest.param(b"[" * 100_000 + b"]" * 100_000, {}, "nested deeper", id="100000 nested arrays"),
        pytest.param(b"[[[[1]]]]", {"max_depth": 3}, "nested deeper than 3", id="a configured max_depth"),
        pytest.param(json.dumps({f"k{i}": i for i in range(1001)}).encode(), {}, "more than 1000 members", id="1001 keys"),
        pytest.param(json.dumps({"list": list(range(11))}).encode(), {"max_members": 10}, "more than 10 members", id="a configured max_members"),
        pytest.param(json.dumps({"name": "a" * 65537}).encode(), {}, "longer than 65536", id="a string over 65536 characters"),
        pytest.param(json.dumps({"n" * 17: 1}).encode(), {"max_string": 16}, "key is longer than 16", id="a key over a configured max_string"),
    ],
)
async def test_json_beyond_the_guards_is_a_400_never_a_500(upstream, start_gateway, client, body: bytes, limits: dict[str, int], detail: str) -> None:
    gateway = await start_gateway(validated(upstream.url, max_body="2mb", json_limits=limits, fields={"name": {}}))
    document = await refused(client, gateway, upstream, body, 400)
    assert detail in document["detail"]


async def test_json_right_at_the_guards_is_accepted(upstream, start_gateway, client) -> None:
    gateway = await start_gateway(validated(upstream.url, max_body="2mb", fields={"name": {}}))
    await accepted(client, gateway, upstream, b'{"deep":' + b"[" * 31 + b"]" * 31 + b"}")
    upstream.requests.clear()
    await accepted(client, gateway, upstream, json.dumps({"name": "a" * 65536, **{f"k{i}": i for i in range(999)}}).encode())


# -- config errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("validate", "path", "words"),
    [
        ({"fields": {"name": {"pattern": "(a+)+$"}}}, "routes[0].validate.fields.name.pattern", "ReDoS"),
        ({"fields": {"name": {"pattern": "(a|aa)*"}}}, "routes[0].validate.fields.name.pattern", "ReDoS"),
        ({"fields": {"name": {"pattern": r"^(\w+\s?)*$"}}}, "routes[0].validate.fields.name.pattern", "ReDoS"),
        ({"fields": {"name": {"pattern": r"^((\w+)\s?)+$"}}}, "routes[0].validate.fields.name.pattern", "ReDoS"),  # nested group
        ({"fields": {"name": {"pattern": r"^(?:(?:a|b)c)+$"}}}, "routes[0].validate.fields.name.pattern", "ReDoS"),
        ({"fields": {"name": {"pattern": r"^([()]+)+$"}}}, "routes[0].validate.fields.name.pattern", "ReDoS"),  # parens in a class
        ({"fields": {"name": {"pattern": r"^(\d+){2,}$"}}}, "routes[0].validate.fields.name.pattern", "ReDoS"),
        ({"fields": {"name": {"pattern": "^([a-z]"}}}, "routes[0].validate.fields.name.pattern", "regular expression"),
        ({"fields": {"name": {"format": "zipcode"}}}, "routes[0].validate.fields.name.format", "'date-time', got 'zipcode'"),
        ({"fields": {"name": {"min_length": 5, "max_length": 2}}}, "routes[0].validate.fields.name", "min_length is larger than max_length"),
        ({"fields": {"name": {"phone_region": "US"}}}, "routes[0].validate.fields.name", "format: phone"),
        ({"fields": {"phone": {"format": "phone", "phone_region": "us"}}}, "routes[0].validate.fields.phone.phone_region", "A-Z"),
        ({"fields": {"a..b": {"type": "string"}}}, "routes[0].validate.fields", "'a..b'"),
        ({"fields": {"items[0].sku": {}}}, "routes[0].validate.fields", "'items[0].sku'"),
        ({"fields": {"name": {"type": "text"}}}, "routes[0].validate.fields.name.type", "got 'text'"),
        ({"fields": {"name": {"maxLength": 3}}}, "routes[0].validate.fields.name.maxLength", "unknown key"),
        ({"fields": {"name": {"min_length": -1}}}, "routes[0].validate.fields.name.min_length", "greater than or equal to 0"),
        ({"additional_fields": "drop"}, "routes[0].validate.additional_fields", "got 'drop'"),
        ({"max_body": "lots"}, "routes[0].validate.max_body", "lots"),
        ({"json_limits": {"max_depth": 0}}, "routes[0].validate.json_limits.max_depth", "greater than 0"),
    ],
    ids=lambda value: json.dumps(value) if isinstance(value, dict) else "",
)
def test_a_bad_validate_block_is_a_config_error_at_its_key_path(validate: dict[str, Any], path: str, words: str) -> None:
    config = base_config("http://127.0.0.1:9")
    config["routes"][0]["validate"] = validate
    with pytest.raises(ConfigError) as caught:
        parse_config(config, "gateway.yaml")
    assert [issue.path for issue in caught.value.issues] == [path]
    assert words in caught.value.issues[0].message
    assert f"gateway.yaml: {path}: " in str(caught.value)


@pytest.mark.parametrize("pattern", [r"^[a-z]+$", r"^[A-Z]{3}-\d{4}$", r"^\d{1,3}(\.\d{1,3}){3}$", r"^(foo|bar)$", r"^\(\d+\)+$", r"^[(]a+[)]*$"])
def test_a_pattern_without_nested_repetition_is_accepted(pattern: str) -> None:
    config = base_config("http://127.0.0.1:9")
    config["routes"][0]["validate"] = {"fields": {"name": {"pattern": pattern}}}
    parse_config(config)


# -- Expect: 100-continue -----------------------------------------------------------------------------


async def _expect_continue(port: int, body: bytes, extra_head: bytes = b"") -> tuple[bytes, bytes]:
    """Send the head with Expect: 100-continue; return (the interim answer, the final answer)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            b"POST /api/users HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nExpect: 100-continue\r\n"
            + b"Content-Length: %d\r\n" % len(body) + extra_head + b"\r\n"
        )
        await writer.drain()
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
        if interim.startswith(b"HTTP/1.1 100"):
            writer.write(body)
            await writer.drain()
            final = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
        else:
            final, interim = interim, b""
        _, headers, _ = parse_raw_response(final + b"\r\n\r\n")
        final += await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 3)
        return interim, final
    finally:
        writer.close()


async def test_expect_100_continue_gets_the_body_asked_for_and_validated(upstream, start_gateway) -> None:
    gateway = await start_gateway(validated(upstream.url, fields={"email": {"format": "email", "required": True}}))
    body = b'{"email": "ada@example.com"}'
    interim, final = await _expect_continue(gateway.port, body)
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert parse_raw_response(final)[0] == 200
    assert [r.body for r in upstream.requests] == [body]
    assert "expect" not in {name.lower() for name in upstream.requests[0].headers}


async def test_expect_100_continue_with_an_invalid_body_is_a_422(upstream, start_gateway) -> None:
    gateway = await start_gateway(validated(upstream.url, fields={"email": {"format": "email", "required": True}}))
    interim, final = await _expect_continue(gateway.port, b'{"email": "nope"}')
    assert interim.startswith(b"HTTP/1.1 100")
    assert rules_broken(assert_problem(*parse_raw_response(final), 422)) == [("email", "format")]
    assert upstream.requests == []


async def test_expect_100_continue_over_max_body_is_refused_without_asking_for_the_body(upstream, start_gateway) -> None:
    gateway = await start_gateway(validated(upstream.url, max_body="16b", fields={"email": {}}))
    interim, final = await _expect_continue(gateway.port, b'{"email": "ada@example.com"}')
    assert interim == b""  # no 100 Continue: the client never has to send the body
    assert_problem(*parse_raw_response(final), 413)
    assert upstream.requests == []
