"""TLS: the public listener's certificates (reloaded on SIGHUP), the plain-HTTP listener that
redirects to HTTPS, and the client contexts towards upstreams.

Server defaults follow Mozilla's "intermediate" profile: TLS 1.2 or newer, ECDHE key exchange
with AEAD ciphers only (TLS 1.3's suites are OpenSSL's, all AEAD), no compression, no
renegotiation, ALPN ``http/1.1``.
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path
from typing import Any

from aiohttp import web

from gateway.routing import request_host, valid_host

log = logging.getLogger("gateway")

# Mozilla intermediate (TLS 1.2 suites; TLS 1.3 suites are not set by cipher strings).
INTERMEDIATE_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
        "DHE-RSA-AES128-GCM-SHA256",
        "DHE-RSA-AES256-GCM-SHA384",
        "DHE-RSA-CHACHA20-POLY1305",
    ]
)
VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def server_context(cert: Path, key: Path, min_version: str, ciphers: str) -> ssl.SSLContext:
    """A server context with the certificate chain loaded; raises OSError or ssl.SSLError."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = VERSIONS[min_version]
    context.set_ciphers(ciphers)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    context.set_alpn_protocols(["http/1.1"])
    context.load_cert_chain(cert, key)
    return context


class Certificates:
    """The public listener's context. ``reload()`` loads the files again into the same context,
    so connections made after it get the new certificate and those open keep theirs."""

    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self.context = server_context(settings.cert, settings.key, settings.min_version, settings.ciphers)

    def reload(self) -> bool:
        settings = self.settings
        try:
            # Loaded into a new context first: a key that does not match its certificate (a
            # renewal caught half-written) must not leave the live context half-replaced.
            server_context(settings.cert, settings.key, settings.min_version, settings.ciphers)
            self.context.load_cert_chain(settings.cert, settings.key)
        except (OSError, ssl.SSLError) as exc:
            log.error("certificate reload failed; the previous certificate stays", extra={"cert": str(settings.cert), "error": str(exc)})
            return False
        log.info("certificate reloaded", extra={"cert": str(settings.cert)})
        return True


def redirect_app(https_port: int) -> web.Server:
    """The plain-HTTP listener of ``listen.tls.redirect_http``: every request is sent to the same
    host, path and query over HTTPS (301 for GET and HEAD, 308 for the others, which keeps the
    method and body)."""
    port_suffix = "" if https_port == 443 else f":{https_port}"

    async def redirect(request: web.BaseRequest) -> web.StreamResponse:
        host = request.headers.get("Host", "")
        if not valid_host(host) or not host:
            return web.Response(status=400, text="a valid Host header is required\n", headers={"Cache-Control": "no-store"})
        status = 301 if request.method in ("GET", "HEAD") else 308
        location = f"https://{request_host(host)}{port_suffix}{request.raw_path}"
        return web.Response(status=status, headers={"Location": location, "Cache-Control": "no-store"})

    return web.Server(redirect)


def client_context(verify: bool, ca_file: Path | None) -> ssl.SSLContext:
    """The context of TLS connections to an upstream: verifying (the system's CAs, or the
    configured file's), or, with ``verify: false``, accepting any certificate."""
    if not verify:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    return ssl.create_default_context(cafile=str(ca_file) if ca_file is not None else None)
