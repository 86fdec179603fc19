"""TLS: termination on the public listener, HSTS only over TLS, the plain-HTTP redirect listener,
certificate reload on SIGHUP, and TLS with certificate checks towards upstreams.

Certificates are made here with `cryptography`: a test CA and leaf certificates for loopback.
Clients are Python's ssl module and aiohttp, verifying against the test CA.
"""

from __future__ import annotations

import asyncio
import datetime
import signal
import socket
import ssl
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.config import parse_config
from gateway.errors import ConfigError
from tests.conftest import Upstream, assert_problem, base_config, free_port, parse_raw_response

# -- certificates -------------------------------------------------------------------------------


@dataclass
class Authority:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_authority(name: str = "gateway test CA") -> Authority:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(key, hashes.SHA256())
    )
    return Authority(key, cert)


def issue(authority: Authority, folder: Path, stem: str, dns: tuple[str, ...] = ("localhost",), ips: tuple[str, ...] = ("127.0.0.1",)) -> tuple[Path, Path, int]:
    """A leaf certificate and key written to folder/<stem>.pem and .key; returns (cert, key, serial)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    names = [x509.DNSName(name) for name in dns] + [x509.IPAddress(IPv4Address(ip)) for ip in ips]
    serial = x509.random_serial_number()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(dns[0] if dns else ips[0]))
        .issuer_name(authority.cert.subject)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(authority.key, hashes.SHA256())
    )
    cert_path, key_path = folder / f"{stem}.pem", folder / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return cert_path, key_path, serial


@pytest.fixture
def authority(tmp_path: Path) -> Authority:
    made = make_authority()
    (tmp_path / "ca.pem").write_bytes(made.pem())
    return made


def client_context(tmp_path: Path, **options: Any) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    for name, value in options.items():
        setattr(context, name, value)
    return context


def with_headers(config: dict[str, Any], **block: Any) -> dict[str, Any]:
    config["defaults"] = {"security_headers": {"preset": "helmet", **block}}
    return config


def tls_config(upstream_url: str, tls: dict[str, Any] | None = None, **listen: Any) -> dict[str, Any]:
    config = with_headers(base_config(upstream_url))
    config["listen"]["tls"] = {"cert": "gateway.pem", "key": "gateway.key", **(tls or {})}
    config["listen"].update(listen)
    return config


def peer_serial(port: int, context: ssl.SSLContext) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, context.wrap_socket(raw, server_hostname="localhost") as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def handshake(port: int, context: ssl.SSLContext) -> str:
    """The TLS version agreed, or raises ssl.SSLError when the server refuses."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, context.wrap_socket(raw, server_hostname="localhost") as tls:
        version = tls.version()
    assert version is not None
    return version


# -- termination --------------------------------------------------------------------------------


async def test_the_public_listener_serves_https_with_the_configured_certificate(authority, tmp_path, upstream, start_gateway) -> None:
    _, _, serial = issue(authority, tmp_path, "gateway")
    gateway = await start_gateway(tls_config(upstream.url))
    context = client_context(tmp_path)
    async with aiohttp.ClientSession() as session, session.get(f"https://localhost:{gateway.port}/orders", ssl=context) as response:
        assert response.status == 200
    assert upstream.requests[0].headers["X-Forwarded-Proto"] == "https"
    assert await asyncio.to_thread(peer_serial, gateway.port, context) == serial


async def test_plain_http_on_the_tls_port_gets_no_answer_from_the_upstream(authority, tmp_path, upstream, start_gateway) -> None:
    issue(authority, tmp_path, "gateway")
    gateway = await start_gateway(tls_config(upstream.url))
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientError):
            async with session.get(f"http://127.0.0.1:{gateway.port}/", timeout=aiohttp.ClientTimeout(total=5)) as response:
                await response.read()
    assert upstream.requests == []


async def test_min_version_13_refuses_a_client_that_stops_at_tls_12(authority, tmp_path, upstream, start_gateway) -> None:
    issue(authority, tmp_path, "gateway")
    default = await start_gateway(tls_config(upstream.url))
    strict = await start_gateway(tls_config(upstream.url, {"min_version": "1.3"}))
    only_12 = client_context(tmp_path, maximum_version=ssl.TLSVersion.TLSv1_2)
    assert await asyncio.to_thread(handshake, default.port, only_12) == "TLSv1.2"
    with pytest.raises(ssl.SSLError):
        await asyncio.to_thread(handshake, strict.port, only_12)
    assert await asyncio.to_thread(handshake, strict.port, client_context(tmp_path)) == "TLSv1.3"


async def test_tls_12_clients_offering_only_ciphers_without_forward_secrecy_are_refused(authority, tmp_path, upstream, start_gateway) -> None:
    issue(authority, tmp_path, "gateway")
    gateway = await start_gateway(tls_config(upstream.url))
    static_rsa = client_context(tmp_path, maximum_version=ssl.TLSVersion.TLSv1_2)
    static_rsa.set_ciphers("AES128-GCM-SHA256:AES256-SHA256:AES128-SHA")  # RSA key exchange, no ECDHE
    with pytest.raises(ssl.SSLError):
        await asyncio.to_thread(handshake, gateway.port, static_rsa)


def test_a_missing_certificate_file_is_a_config_error_at_its_key(tmp_path) -> None:
    config = tls_config("http://127.0.0.1:9")
    with pytest.raises(ConfigError) as caught:
        parse_config(config, str(tmp_path / "gateway.yaml"), tmp_path)
    assert {issue.path for issue in caught.value.issues} == {"listen.tls.cert", "listen.tls.key"}
    assert "no such file" in str(caught.value)


def test_a_key_that_does_not_match_the_certificate_is_a_config_error(authority, tmp_path) -> None:
    issue(authority, tmp_path, "gateway")
    issue(authority, tmp_path, "other")
    config = tls_config("http://127.0.0.1:9", {"key": "other.key"})
    with pytest.raises(ConfigError) as caught:
        parse_config(config, str(tmp_path / "gateway.yaml"), tmp_path)
    [problem] = caught.value.issues
    assert problem.path == "listen.tls" and "cannot serve" in problem.message


# -- HSTS -----------------------------------------------------------------------------------------


async def test_hsts_is_sent_over_tls_and_not_over_plain_http(authority, tmp_path, upstream, start_gateway) -> None:
    issue(authority, tmp_path, "gateway")
    over_tls = await start_gateway(tls_config(upstream.url))
    plain = await start_gateway(with_headers(base_config(upstream.url)))
    async with aiohttp.ClientSession() as session:
        async with session.get(f"https://localhost:{over_tls.port}/", ssl=client_context(tmp_path)) as response:
            assert response.headers["Strict-Transport-Security"] == "max-age=31536000; includeSubDomains"
        async with session.get(plain.url + "/") as response:
            assert "Strict-Transport-Security" not in response.headers
            assert response.headers["X-Frame-Options"] == "SAMEORIGIN"  # the other headers are sent


@pytest.mark.parametrize("trusted, sent", [(["127.0.0.1/32"], True), (["10.0.0.0/8"], False)])
async def test_behind_a_tls_proxy_hsts_follows_x_forwarded_proto_from_trusted_peers_only(trusted: list[str], sent: bool, upstream, start_gateway, client) -> None:
    gateway = await start_gateway(with_headers(base_config(upstream.url, listen={"host": "127.0.0.1", "port": 0, "trusted_proxies": trusted})))
    async with client.get(gateway.url + "/", headers={"X-Forwarded-Proto": "https"}) as response:
        assert ("Strict-Transport-Security" in response.headers) is sent


async def test_over_http_sends_hsts_on_plain_http_too(upstream, start_gateway, client) -> None:
    config = with_headers(base_config(upstream.url), hsts={"max_age": "1d", "over_http": True})
    gateway = await start_gateway(config)
    async with client.get(gateway.url + "/") as response:
        assert response.headers["Strict-Transport-Security"] == "max-age=86400; includeSubDomains"


# -- the redirect listener ------------------------------------------------------------------------


async def test_the_plain_http_listener_redirects_to_the_same_url_over_https(authority, tmp_path, upstream, start_gateway) -> None:
    issue(authority, tmp_path, "gateway")
    gateway = await start_gateway(tls_config(upstream.url, {"redirect_http": {"host": "127.0.0.1", "port": 0}}))
    redirect_port = gateway.listeners.addresses["redirect"][1]
    plain = f"http://127.0.0.1:{redirect_port}"
    async with aiohttp.ClientSession() as session:
        async with session.get(plain + "/a/b?c=1&d", headers={"Host": "Shop.Example:8080"}, allow_redirects=False) as response:
            assert response.status == 301
            assert response.headers["Location"] == f"https://shop.example:{gateway.port}/a/b?c=1&d"
        async with session.post(plain + "/orders", data=b"{}", headers={"Host": "shop.example"}, allow_redirects=False) as response:
            assert response.status == 308  # keeps the method and body
            assert response.headers["Location"] == f"https://shop.example:{gateway.port}/orders"
    assert upstream.requests == []


async def test_the_redirect_names_the_public_https_port_when_given(authority, tmp_path, upstream, start_gateway) -> None:
    issue(authority, tmp_path, "gateway")
    gateway = await start_gateway(tls_config(upstream.url, {"redirect_http": {"host": "127.0.0.1", "port": 0, "https_port": 443}}))
    redirect_port = gateway.listeners.addresses["redirect"][1]
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{redirect_port}/x", headers={"Host": "shop.example"}, allow_redirects=False) as response:
            assert response.headers["Location"] == "https://shop.example/x"


async def test_the_redirect_listener_refuses_an_invalid_host(authority, tmp_path, upstream, start_gateway) -> None:
    issue(authority, tmp_path, "gateway")
    gateway = await start_gateway(tls_config(upstream.url, {"redirect_http": {"host": "127.0.0.1", "port": 0}}))
    redirect_port = gateway.listeners.addresses["redirect"][1]
    for host in (b"evil.example/path", b"a b", b""):
        reader, writer = await asyncio.open_connection("127.0.0.1", redirect_port)
        writer.write(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n")
        status, headers, _ = parse_raw_response(await reader.read())
        writer.close()
        assert status == 400 and "location" not in headers, host


# -- reload on SIGHUP -----------------------------------------------------------------------------


async def test_sighup_loads_renewed_certificate_files_and_keeps_the_old_one_when_they_are_broken(authority, tmp_path, upstream, gateway_process) -> None:
    _, _, first = issue(authority, tmp_path, "gateway")
    process = gateway_process(tls_config(upstream.url))
    context = client_context(tmp_path)
    assert await asyncio.to_thread(peer_serial, process.port, context) == first

    _, _, renewed = issue(authority, tmp_path, "gateway")  # the same paths, new files
    process.signal(signal.SIGHUP)
    await eventually_serial(process.port, context, renewed)

    (tmp_path / "gateway.key").write_text("not a key")
    process.signal(signal.SIGHUP)
    await eventually_logged(process, "certificate reload failed")
    assert await asyncio.to_thread(peer_serial, process.port, context) == renewed


async def eventually_serial(port: int, context: ssl.SSLContext, serial: int, timeout: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while await asyncio.to_thread(peer_serial, port, context) != serial:
        assert asyncio.get_running_loop().time() < deadline, "the renewed certificate was not served"
        await asyncio.sleep(0.05)


async def eventually_logged(process: Any, message: str, timeout: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not any(str(record.get("message", "")).startswith(message) for record in process.log_records()):
        assert asyncio.get_running_loop().time() < deadline, f"{message!r} was not logged"
        await asyncio.sleep(0.05)


# -- towards upstreams ----------------------------------------------------------------------------


@pytest.fixture
async def https_upstream(authority: Authority, tmp_path: Path) -> AsyncIterator[Upstream]:
    """The recording upstream over TLS, with a certificate for upstream.internal only."""
    cert, key, _ = issue(authority, tmp_path, "upstream", dns=("upstream.internal",), ips=())
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    recorder = Upstream(free_port())
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", recorder._handle)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", recorder.port, ssl_context=context).start()
    yield recorder
    await runner.cleanup()


def upstream_tls_config(port: int, tls: dict[str, Any]) -> dict[str, Any]:
    config = base_config(f"https://127.0.0.1:{port}")
    config["upstreams"]["api"]["tls"] = tls
    config["upstreams"]["api"]["retries"] = 0
    return config


async def test_an_https_upstream_is_checked_against_the_configured_ca_and_name(https_upstream, start_gateway, client) -> None:
    gateway = await start_gateway(upstream_tls_config(https_upstream.port, {"ca_file": "ca.pem", "server_name": "upstream.internal"}))
    async with client.get(gateway.url + "/orders") as response:
        assert response.status == 200
    assert [r.path for r in https_upstream.requests] == ["/orders"]


@pytest.mark.parametrize(
    "tls",
    [
        pytest.param({"server_name": "upstream.internal"}, id="unknown-ca"),
        pytest.param({"ca_file": "ca.pem"}, id="wrong-name"),
    ],
)
async def test_an_upstream_certificate_that_does_not_verify_is_a_502_and_nothing_is_sent(tls: dict[str, Any], https_upstream, start_gateway, client) -> None:
    gateway = await start_gateway(upstream_tls_config(https_upstream.port, tls))
    async with client.get(gateway.url + "/orders") as response:
        problem = assert_problem(response.status, response.headers, await response.read(), 502)
    assert problem["detail"] == "the upstream could not be reached"  # no TLS internals to the client
    assert https_upstream.requests == []


async def test_verify_false_accepts_any_upstream_certificate(https_upstream, start_gateway, client) -> None:
    gateway = await start_gateway(upstream_tls_config(https_upstream.port, {"verify": False}))
    async with client.get(gateway.url + "/orders") as response:
        assert response.status == 200
    assert len(https_upstream.requests) == 1


def test_a_missing_ca_file_is_a_config_error_at_its_key(tmp_path) -> None:
    config = upstream_tls_config(1, {"ca_file": "missing.pem"})
    with pytest.raises(ConfigError) as caught:
        parse_config(config, str(tmp_path / "gateway.yaml"), tmp_path)
    assert [issue.path for issue in caught.value.issues] == ["upstreams.api.tls.ca_file"]
