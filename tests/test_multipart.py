"""multipart/form-data bodies: text fields sanitized and validated, file parts untouched."""

from __future__ import annotations

import aiohttp

from tests.conftest import assert_problem, base_config

PNG = b"\x89PNG\r\n\x1a\n<script>alert(1)</script>\x00\xff" * 50  # bytes that look like markup


def form() -> aiohttp.FormData:
    data = aiohttp.FormData()
    data.add_field("bio", "<b>Potter</b><script>alert(1)</script> & glazer")
    data.add_field("email", "ada@example.com")
    data.add_field("avatar", PNG, filename="avatar.png", content_type="image/png")
    return data


async def test_text_fields_are_sanitized_and_file_parts_pass_byte_for_byte(upstream, start_gateway, client) -> None:
    config = base_config(upstream.url)
    config["routes"][0]["sanitize"] = {"mode": "strip"}
    gateway = await start_gateway(config)
    async with client.post(gateway.url + "/profile", data=form()) as response:
        assert response.status == 200
    received = upstream.requests[0]
    assert int(received.headers["Content-Length"]) == len(received.body)
    assert b"Potter & glazer" in received.body and b"<b>" not in received.body.split(b"\x89PNG")[0]
    assert PNG in received.body  # the file part, markup-looking bytes and all, untouched


async def test_multipart_text_fields_are_validated_and_failures_forward_nothing(upstream, start_gateway, client) -> None:
    config = base_config(upstream.url)
    config["routes"][0]["validate"] = {"fields": {"email": {"format": "email", "required": True}, "bio": {"max_length": 10}}}
    gateway = await start_gateway(config)
    async with client.post(gateway.url + "/profile", data=form()) as response:
        document = assert_problem(response.status, response.headers, await response.read(), 422)
    assert document["errors"] == [{"field": "bio", "rule": "max_length", "message": "expected at most 10 characters"}]
    assert upstream.requests == []


async def test_a_multipart_body_without_its_closing_boundary_is_a_400(upstream, start_gateway, client) -> None:
    config = base_config(upstream.url)
    config["routes"][0]["sanitize"] = {"mode": "strip"}
    gateway = await start_gateway(config)
    body = b'--b1\r\nContent-Disposition: form-data; name="bio"\r\n\r\n<b>x</b>\r\n'
    async with client.post(gateway.url + "/profile", data=body, headers={"Content-Type": "multipart/form-data; boundary=b1"}) as response:
        assert_problem(response.status, response.headers, await response.read(), 400)
    assert upstream.requests == []
