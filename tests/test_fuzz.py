"""Property-based fuzzing of what clients send: request lines, header blocks, JSON bodies, JWTs.

One gateway process (``python -m gateway run``, on uvloop, as it is deployed) serves the whole
module, in front of a real recording upstream, with the policies a real API has: JWT auth on
every route, rate limits, security headers everywhere, a cached GET route and a POST route that
sanitizes and validates JSON. Hypothesis writes the bytes; each example goes out on a raw socket
of its own, and the properties are what a user of the gateway relies on:

- an answer comes within READ_TIMEOUT, else the example fails as a hang;
- its status is below 500. The gateway's 5xx are for failed dependencies (502/503/504, and no
  dependency fails here) and 505 for a request line of another HTTP version, allowed only for
  such lines; any other 5xx fails the example;
- it is the gateway's own problem+json with nothing forwarded, or the one request the upstream
  received, and then that request passed every check: its path is in normal form under the
  route, its body is valid JSON that meets the field rules and holds no markup, its token was
  signed with the issuer's secret and carries valid claims;
- the gateway keeps serving: afterwards a normal request on a new connection is answered 200
  by the upstream; and after each test the gateway's log holds no error.

A connection closed without any answer is accepted only for a head larger than the limits: the
gateway answers 414/431 and closes at once, and the bytes the client is still sending make the
kernel reset the connection, which can discard the answer before the client reads it (RFC 9112
§9.6). Every other input gets an answer: a client is always told what was wrong with its request.

The examples are derandomized (the same ones on every run, so CI cannot flake on a new seed),
and no example database is written. What fuzzing with other seeds found is pinned with
``@example``, so that it runs every time. Most examples have one part fuzzed and the rest as a
client sends it (``mostly``): input refused by the parser never reaches the code behind it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote

import pytest
import yaml
from aiohttp import web
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from jwcrypto import jwk
from jwcrypto import jwt as jwc_jwt

from tests.conftest import Upstream, base_config, free_port, wait_until_ready

# Hypothesis keeps caches (Unicode tables, constants from the source) in ./.hypothesis unless told
# otherwise: out of the repository, and out of the way of a CI that points it elsewhere.
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", os.path.join(tempfile.gettempdir(), "gateway-hypothesis"))
READ_TIMEOUT = 5.0  # no answer within this: the example hangs
QUIET = 0.2  # after an answer on a kept-alive connection: how long to wait for another
ISSUER = "https://issuer.example"
AUDIENCE = "marketplace-api"
HS_SECRET = "fuzz-tests-secret-that-is-at-least-32-bytes-long"
SUBJECT = "fuzz-user"
LEEWAY = 30
MAX_REQUEST_LINE = 2048
MAX_HEADER_SIZE = 8192
LIMITS = {
    "max_request_line": "2kb",
    "max_header_size": "8kb",
    "max_headers": 40,
    "header_timeout": "1s",
    "body_timeout": "300ms",  # bodies shorter than their Content-Length cost this much
    "keepalive_timeout": "2s",
}
SKU = re.compile(r"[A-Z0-9-]{4,20}")
DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
TAG_OPEN = re.compile(r"<[A-Za-z/!?]")  # what an HTML parser reads as the start of markup
SECURITY_HEADERS = ("content-security-policy", "x-content-type-options", "x-frame-options")
HOP_BY_HOP = ("connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade")
# On a failure Hypothesis writes a patch with the failing example, importing libcst, which
# imports a deprecated mypy_extensions.TypedDict: with filterwarnings = error that warning would
# replace the report of the failure itself.
pytestmark = pytest.mark.filterwarnings("ignore:mypy_extensions.TypedDict is deprecated:DeprecationWarning")
FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    # function_scoped_fixture: `gateway` runs once around all of a test's examples on purpose.
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture],
)


# -- tokens -------------------------------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


HS_KEY = jwk.JWK(kty="oct", k=b64url(HS_SECRET.encode()))
NOW = int(time.time())


def good_claims(**overrides: Any) -> dict[str, Any]:
    return {"iss": ISSUER, "aud": AUDIENCE, "sub": SUBJECT, "iat": NOW, "exp": NOW + 3600, **overrides}


def mint(claims: dict[str, Any]) -> str:
    """A token signed by jwcrypto (not pyjwt, which the gateway verifies with)."""
    token = jwc_jwt.JWT(header={"alg": "HS256", "typ": "JWT"}, claims=claims)
    token.make_signed_token(HS_KEY)
    return token.serialize()


def hs256(header: bytes, payload: bytes) -> str:
    """A token over arbitrary header and payload bytes, signed with the issuer's secret."""
    signing_input = f"{b64url(header)}.{b64url(payload)}"
    signature = hmac.new(HS_SECRET.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


TOKEN = mint(good_claims())


def lenient_b64decode(segment: str) -> bytes | None:
    """Base64url as pyjwt reads it: padding added, characters outside the alphabet skipped."""
    try:
        data = segment.encode("ascii")
        return base64.urlsafe_b64decode(data + b"=" * (-len(data) % 4))
    except (ValueError, UnicodeEncodeError):
        return None


def numeric(value: Any) -> float | None:
    """A NumericDate as pyjwt reads one (int(value), so "123" counts), or None."""
    if isinstance(value, bool):
        return float(value)
    try:
        return float(int(value))
    except (ValueError, TypeError, OverflowError):
        return None


def may_pass(token: str) -> bool:
    """Whether a token may be accepted at all: HS256 over exactly its signing input with the
    issuer's secret (so only the secret's holder made it), and claims that are all valid."""
    signing_input, _, signature_segment = token.strip(" \t").rpartition(".")  # OWS is no part of it
    signature = lenient_b64decode(signature_segment)
    expected = hmac.new(HS_SECRET.encode(), signing_input.encode("utf-8", "surrogateescape"), hashlib.sha256).digest()
    if not signing_input or signature is None or not hmac.compare_digest(signature, expected):
        return False
    header_segment, _, payload_segment = signing_input.partition(".")
    try:
        header = json.loads(lenient_b64decode(header_segment) or b"")
        claims = json.loads(lenient_b64decode(payload_segment) or b"")
    except ValueError:
        return False
    if not isinstance(header, dict) or header.get("alg") != "HS256" or not isinstance(claims, dict):
        return False
    now = time.time()
    exp, nbf, iat = numeric(claims.get("exp")), numeric(claims.get("nbf", 0)), numeric(claims.get("iat", 0))
    audience = claims.get("aud")
    return (
        claims.get("iss") == ISSUER
        and (audience == AUDIENCE or isinstance(audience, list) and AUDIENCE in audience and all(isinstance(a, str) for a in audience))
        and isinstance(claims.get("sub"), str)
        and exp is not None
        and exp > now - LEEWAY
        and nbf is not None
        and nbf <= now + LEEWAY
        and iat is not None
        and iat <= now + LEEWAY
    )


# -- the gateway and its upstream ------------------------------------------------------------------


def gateway_config(upstream_url: str, port: int, admin_port: int) -> dict[str, Any]:
    config = base_config(upstream_url)
    config["listen"].update(port=port, limits=dict(LIMITS))
    config["admin"] = {"host": "127.0.0.1", "port": admin_port}
    config["logging"] = {"level": "warning", "access_log": False}
    config["defaults"] = {
        "security_headers": {"preset": "helmet"},
        "rate_limit": [{"key": "ip", "limit": 1_000_000, "window": "1m"}],
    }
    config["auth"] = {
        "jwt": {
            "issuer": ISSUER,
            "audience": AUDIENCE,
            "algorithms": ["HS256"],
            "secret": HS_SECRET,
            "leeway": f"{LEEWAY}s",
            "required_claims": ["exp", "sub"],
            "forward_claims": {"sub": "X-User-Id"},
        }
    }
    config["routes"] = [
        {
            "name": "products",
            "match": {"path": "/api/products", "methods": ["GET"]},
            "upstream": "api",
            "auth": {"required": True},
            "cache": {"ttl": "1m", "key": ["user"]},
        },
        {
            "name": "orders",
            "match": {"path": "/api/orders", "methods": ["POST"]},
            "upstream": "api",
            "auth": {"required": True},
            "rate_limit": [
                {"key": "ip", "limit": 1_000_000, "window": "1m"},
                {"key": "user", "limit": 1_000_000, "window": "1m", "algorithm": "sliding_window"},
            ],
            "sanitize": {"mode": "strip"},
            "validate": {
                "max_body": "64kb",
                "content_types": ["application/json", "application/x-www-form-urlencoded"],
                "fields": {
                    "email": {"format": "email", "required": True},
                    "name": {"type": "string", "max_length": 100},
                    "quantity": {"type": "integer", "minimum": 1, "maximum": 1000},
                    "sku": {"type": "string", "pattern": "^[A-Z0-9-]{4,20}$"},
                    "when": {"format": "date"},
                    "tags": {"type": "array", "max_length": 10},
                    "items[].note": {"type": "string", "max_length": 200},
                },
                "additional_fields": "allow",
            },
        },
    ]
    return config


class RawUpstream(Upstream):
    """The recorder, keeping request bodies as they arrive (aiohttp would inflate a gzip one, and
    answer 500 itself to a body labelled gzip that is not), for every path."""

    async def start(self) -> None:
        app = web.Application(client_max_size=1024**3)
        app.router.add_route("*", r"/{tail:[\s\S]*}", self._handle)  # any path: "." stops at an encoded %0A
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5, auto_decompress=False)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()


class UpstreamThread:
    """The recording upstream on an event loop of its own, so the tests can be plain functions
    (Hypothesis runs synchronous tests) that talk to the gateway over blocking sockets."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="upstream", daemon=True)
        self.server = RawUpstream(free_port())

    def __enter__(self) -> Upstream:
        self.thread.start()
        self.server.handler = self.answer
        self.server.read_body = False  # `answer` reads it: not for an upgrade, whose body never ends
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(10)
        return self.server

    async def answer(self, request: web.Request) -> web.StreamResponse:
        """The recorder's JSON, as an API answers; under /api/products/ws a WebSocket endpoint
        too, which accepts a valid handshake and closes at once."""
        if "Upgrade" not in request.headers:
            # Recorded at its head; kept only once the whole body has come (as the recorder does).
            received = self.server.requests.pop()
            received.body = await request.read()
            self.server.requests.append(received)
        elif request.path.startswith("/api/products/ws") and web.WebSocketResponse().can_prepare(request).ok:
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            await ws.close()
            return ws
        return web.json_response({"upstream": self.server.port, "path": request.raw_path, "method": request.method})

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class Stack:
    """The running gateway process and its upstream (a plain class: Hypothesis prints a
    dataclass field by field with every failing example, the upstream's records included)."""

    def __init__(self, process: subprocess.Popen[bytes], port: int, upstream: Upstream, log_path: Path) -> None:
        self.process = process
        self.port = port
        self.upstream = upstream
        self.log_path = log_path
        self.log_offset = 0
        self.probes = 0

    def __repr__(self) -> str:  # Hypothesis prints it with every failing example
        return f"Stack(port={self.port}, upstream={self.upstream.url})"

    def new_log_records(self) -> list[dict[str, Any]]:
        with open(self.log_path, "rb") as log:
            log.seek(self.log_offset)
            data = log.read()
        self.log_offset += len(data)
        records = []
        for line in data.decode(errors="replace").splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                records.append({"level": "error", "message": line})  # not the gateway's format: a crash
        return records


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    directory = tmp_path_factory.mktemp("fuzz")
    with UpstreamThread() as upstream:
        port, admin_port = free_port(), free_port()
        config_path = directory / "gateway.yaml"
        config_path.write_text(yaml.safe_dump(gateway_config(upstream.url, port, admin_port)))
        log_path = directory / "gateway.log"
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", "gateway", "run", "-c", str(config_path)],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=directory,
                start_new_session=True,
            )
        try:
            wait_until_ready(f"http://127.0.0.1:{admin_port}", process)
            yield Stack(process, port, upstream, log_path)
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)


@pytest.fixture
def gateway(stack: Stack) -> Iterator[Stack]:
    """The module's gateway for one test, whose log must then hold no error: an exception caught
    without a 5xx, a background task that failed. Checked after all of the test's examples, not
    after each: the log is written off the event loop and may lag an answer."""
    stack.new_log_records()
    yield stack
    time.sleep(0.2)
    errors = [r for r in stack.new_log_records() if r.get("level") in ("error", "critical")]
    assert not errors, errors


# -- a raw client ---------------------------------------------------------------------------------


@dataclass
class Response:
    version: str
    status: int
    headers: list[tuple[str, str]]  # names lower-cased, in order
    body: bytes

    def header(self, name: str) -> str | None:
        return next((value for key, value in self.headers if key == name), None)

    @property
    def closes(self) -> bool:
        """The connection ends after this response (RFC 9112 §9.3)."""
        connection = (self.header("connection") or "").lower()
        return "close" in connection or self.version == "1.0" and "keep-alive" not in connection

    @property
    def from_upstream(self) -> bool:
        """The upstream's answer (the recorder's JSON, or its WebSocket), not one the gateway made."""
        return self.status == 101 or self.status == 200 and (self.header("content-type") or "").startswith("application/json")

    @property
    def cache_hit(self) -> bool:
        return "; hit" in (self.header("cache-status") or "")


@dataclass
class Outcome:
    responses: list[Response] = field(default_factory=list)
    interim: list[Response] = field(default_factory=list)  # 1xx
    elapsed: float = 0.0


class Hang(AssertionError):
    pass


class RawConnection:
    """Blocking reads of whole HTTP/1.1 responses, each framed as RFC 9112 §6.3 says."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline
        self.buffer = b""
        self.eof = False

    def _more(self, quiet_until: float | None = None) -> bool:
        """Read more bytes; False at the end of the connection, or when quiet past quiet_until."""
        if self.eof:
            return False
        until = self.deadline if quiet_until is None else min(quiet_until, self.deadline)
        remaining = until - time.monotonic()
        if remaining <= 0:
            if quiet_until is not None and quiet_until < self.deadline:
                return False
            raise Hang(f"no complete answer within {READ_TIMEOUT}s; got {self.buffer[:300]!r}")
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:
            return self._more(quiet_until)
        except ConnectionResetError:
            self.eof = True
            return False
        if not chunk:
            self.eof = True
            return False
        self.buffer += chunk
        return True

    def _take(self, size: int) -> bytes:
        while len(self.buffer) < size:
            if not self._more():
                raise AssertionError(f"the connection ended inside a response body: {self.buffer[:300]!r}")
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def _line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            if not self._more():
                raise AssertionError(f"the connection ended inside a chunked body: {self.buffer[:300]!r}")
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def response(self, head_request: bool, quiet_until: float | None = None) -> Response | None:
        """The next response, or None when the connection ends (or stays quiet) before one."""
        while b"\r\n\r\n" not in self.buffer:
            if not self._more(quiet_until if not self.buffer else None):
                assert not self.buffer, f"the connection ended inside a response head: {self.buffer[:300]!r}"
                return None
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        match = re.fullmatch(r"HTTP/(1\.[01]) (\d{3}) .*", lines[0])
        assert match, f"not an HTTP/1.x status line: {lines[0]!r}"
        status = int(match.group(2))
        headers = []
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            assert colon and name == name.strip(), f"malformed response header line {line!r}"
            headers.append((name.lower(), value.strip()))
        response = Response(match.group(1), status, headers, b"")
        if head_request or 100 <= status < 200 or status in (204, 304):
            return response
        if "chunked" in (response.header("transfer-encoding") or "").lower():
            chunks = []
            while size := int(self._line().split(b";")[0], 16):
                chunks.append(self._take(size))
                assert self._take(2) == b"\r\n"
            while self._line():  # trailer fields, then the empty line
                pass
            response.body = b"".join(chunks)
        elif (length := response.header("content-length")) is not None:
            response.body = self._take(int(length))
        else:
            while self._more():
                pass
            response.body, self.buffer = self.buffer, b""
        return response


def exchange(port: int, data: bytes, head_request: bool = False) -> Outcome:
    """Send raw bytes on a new connection; read every response until the connection ends or stays
    quiet for QUIET after an answer. Raises Hang when no answer is complete in READ_TIMEOUT."""
    started = time.monotonic()
    outcome = Outcome()
    with socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT) as sock:
        connection = RawConnection(sock, started + READ_TIMEOUT)
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused part way (a head over the limits); its answer may still be readable
        quiet_until = None
        while (response := connection.response(head_request, quiet_until)) is not None:
            if response.status == 101:
                outcome.responses.append(response)
                break  # WebSocket frames follow, not HTTP
            if response.status < 200:
                outcome.interim.append(response)
                continue
            outcome.responses.append(response)
            if response.closes:
                break  # the gateway reads no more here: what follows is not an answer to anything
            quiet_until = time.monotonic() + QUIET
    outcome.elapsed = time.monotonic() - started
    return outcome


# -- the properties every example must keep ---------------------------------------------------------


def gateway_log(stack: Stack) -> str:
    with open(stack.log_path, "rb") as log:
        log.seek(max(0, log.seek(0, os.SEEK_END) - 4000))
        return log.read().decode(errors="replace")


def check_answers(
    stack: Stack, sent: bytes, outcome: Outcome, before: int, version_ok: bool = True, head_request: bool = False, handshake: bool = False
) -> list[Response]:
    """What holds for every example: answers below 500 with the security headers, the gateway's
    own as problem+json; the upstream received one request per answer it made, and none else
    (a WebSocket `handshake` it declined may be sent again as the plain GET it then is)."""

    def context(what: str = "") -> str:  # only on a failure: it reads the gateway's log
        return f"{what}\nsent {sent[:600]!r}\ngot {outcome}\ngateway log tail:\n{gateway_log(stack)}"

    if not outcome.responses:
        assert len(sent.partition(b"\r\n\r\n")[0]) > min(MAX_HEADER_SIZE, MAX_REQUEST_LINE), context("closed without an answer")
    for response in outcome.responses:
        event(f"status {response.status}")  # --hypothesis-show-statistics shows what the examples reached
        if response.status == 505:
            assert not version_ok, context("505 for an HTTP/1.x request line")
        else:
            assert response.status < 500, context()
        for name in SECURITY_HEADERS if response.status != 101 else ():  # 101: WebSocket frames follow
            assert response.header(name), context(f"{name} missing")
        if not response.from_upstream:
            assert (response.header("content-type") or "").startswith("application/problem+json"), context()
            if not head_request:
                problem = json.loads(response.body)
                assert problem["status"] == response.status and problem["request_id"], context()
    forwarded = sum(1 for r in outcome.responses if r.from_upstream and not r.cache_hit)
    received = len(stack.upstream.requests) - before
    retried = 1 if handshake and forwarded else 0
    assert forwarded <= received <= forwarded + retried, context(f"the upstream got {stack.upstream.requests[before:]}")
    return outcome.responses


def still_serves(stack: Stack) -> None:
    """A normal request on a new connection is answered by the upstream; the process is alive."""
    stack.probes += 1
    path = f"/api/products/probe/{stack.probes}"
    before = len(stack.upstream.requests)
    outcome = exchange(stack.port, f"GET {path} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n".encode())
    assert [r.status for r in outcome.responses] == [200], f"{outcome}\n{gateway_log(stack)}"
    assert json.loads(outcome.responses[0].body)["path"] == path
    assert [r.path for r in stack.upstream.requests[before:]] == [path]
    assert stack.process.poll() is None, gateway_log(stack)


def assert_normal_path(path: str, prefixes: tuple[str, ...]) -> None:
    """A forwarded path: under the route that took it, in normal form (no dot segments, no empty
    segments, no NUL, no backslash, printable ASCII only)."""
    assert any(path == p or path.startswith(p + "/") for p in prefixes), path
    assert all(" " < c < "\x7f" for c in path) and "\\" not in path, path
    assert "%00" not in path and "//" not in path, path
    for segment in path.split("/"):
        assert unquote(segment) not in (".", ".."), path


class Blob(bytes):
    """Bytes with a short repr: Hypothesis prints failing examples, and some are 100 kB long."""

    def __repr__(self) -> str:
        if len(self) <= 400:
            return bytes.__repr__(self)
        return f"Blob({bytes(self[:300])!r} + ... {len(self)} bytes in all)"


# -- 1. request lines -----------------------------------------------------------------------------

TOKEN_CHARS = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
PATH_CHARS = TOKEN_CHARS + b"/?=;:@,()[]{}\"<>\\ \t%"


def bytes_of(alphabet: bytes, min_size: int = 0, max_size: int = 12) -> st.SearchStrategy[bytes]:
    return st.lists(st.sampled_from(alphabet), min_size=min_size, max_size=max_size).map(bytes)


def mostly(usual: st.SearchStrategy[Any], *odd: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """`usual` three times in four, else one of the `odd`: enough plausible input gets past the
    parser to the routes, policies and upstream, where the rest of the bugs live. (Not
    one_of(usual, usual, usual, ...): Hypothesis flattens that and keeps each strategy once.)"""
    rare = st.one_of(*odd)
    return st.integers(0, 3).flatmap(lambda n: usual if n < 3 else rare)


USUAL_METHODS = st.sampled_from([b"GET", b"GET", b"HEAD", b"POST"])
METHODS = st.one_of(
    st.sampled_from([b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"TRACE", b"CONNECT", b"PRI", b"QUERY", b"get", b"Get", b"PROPFIND", b"M-SEARCH"]),
    bytes_of(TOKEN_CHARS, 1, 12),
    st.binary(min_size=1, max_size=8),
)
# Segments a normaliser must take apart, all of them valid: dot segments plain and encoded,
# unreserved characters encoded, encoded controls that stay encoded, parameters.
PLAIN_SEGMENTS = st.sampled_from(
    [b"api", b"products", b"orders", b"x", b"..", b".", b"", b"%2e%2e", b"%2E%2e", b".%2e", b"%2e", b"%7e", b"%7E", b"~", b"%41",
     b"caf%c3%a9", b"%e2%80%ae", b";jsessionid=1", b"a;b", b"*", b"@", b":", b"%20", b"%252e%252e", b"%0d%0aX-Injected:%201"]
)
HOSTILE_SEGMENTS = st.one_of(
    st.sampled_from(
        [b"..;", b"..;x", b"%2f", b"%2F", b"%5c", b"\\", b"%00", b"\x00", b"%", b"%zz", b"%4", b"caf\xc3\xa9", b"\xff", b"\xe9", b"a b",
         b"#frag", b"%u002e", b"%c0%ae%c0%ae", b"\xef\xbc\x8e\xef\xbc\x8e", b"x" * 300, b"\r", b"\x7f"]
    ),
    bytes_of(PATH_CHARS, 0, 12),
    st.binary(max_size=6),
)
USUAL_PREFIXES = st.sampled_from([b"/api/products/", b"/api/products", b"/api/orders"])
PREFIXES = st.sampled_from([b"/api/orders/", b"/", b"//", b"", b"/API/products/", b"/api//products/", b"/api/./products/", b"/x/../api/products/"])
USUAL_QUERIES = st.sampled_from([b"", b"", b"?a=1", b"?a=1&a=2", b"?q=%3Cb%3E", b"?x=%00", b"?"])
QUERIES = st.one_of(bytes_of(PATH_CHARS + b"&", 0, 20).map(lambda q: b"?" + q), st.binary(max_size=10).map(lambda q: b"?" + q))


def targets(segments: st.SearchStrategy[bytes], prefixes: st.SearchStrategy[bytes], queries: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    return st.builds(lambda prefix, parts, query: prefix + b"/".join(parts) + query, prefixes, st.lists(segments, max_size=5), queries)


USUAL_TARGETS = targets(PLAIN_SEGMENTS, USUAL_PREFIXES, USUAL_QUERIES)
TARGETS = mostly(
    targets(mostly(PLAIN_SEGMENTS, HOSTILE_SEGMENTS), mostly(USUAL_PREFIXES, PREFIXES), mostly(USUAL_QUERIES, QUERIES)),
    st.sampled_from(
        [b"*", b"http://evil.example/api/products/x", b"http://gw/api/products/x", b"https://gw:443/api/products", b"gw:80",
         b"//evil.example/api/products", b"http:/api/products", b"/api/products/" + b"a" * 2100]
    ),
    st.binary(max_size=40),
)
GOOD_VERSIONS = (b"HTTP/1.1", b"HTTP/1.0")
VERSIONS = st.one_of(
    st.sampled_from(
        [b"HTTP/0.9", b"HTTP/2.0", b"HTTP/2", b"HTTP/1.2", b"HTTP/3.0", b"http/1.1", b"HTTP/01.1", b"HTTP/1.10", b"HTTP/1", b"HTTP/9.9", b"",
         b"HTTP/1.1\x00", b"HTTP\\1.1", b"HTTPS/1.1", b"HTTP/1.1 x"]
    ),
    st.binary(max_size=10),
)
SPACES = st.sampled_from([b" ", b"  ", b"\t", b""])


@st.composite
def request_lines(draw: st.DrawFn) -> tuple[Blob, bytes, bytes]:
    """(line, method, version), the version only when the line is method SP target SP version
    (RFC 9112 §3): ``GET /xHTTP/1.1`` or ``GET  HTTP/1.1`` read as HTTP/0.9 lines are right to.

    Most lines have one part fuzzed and the others as a client sends them, so that they get past
    the parser; some have every part fuzzed; some only a path for the normaliser to take apart."""
    odd = draw(st.sampled_from(["none", "none", "method", "target", "target", "version", "spacing", "all"]))
    method = draw(METHODS if odd in ("method", "all") else USUAL_METHODS)
    target = draw(TARGETS if odd in ("target", "all") else USUAL_TARGETS)
    version = draw(VERSIONS if odd in ("version", "all") else st.sampled_from(GOOD_VERSIONS))
    first, second, end = (draw(SPACES), draw(SPACES), draw(st.sampled_from([b"\n", b"\r\n"]))) if odd in ("spacing", "all") else (b" ", b" ", b"\r\n")
    line = method + first + target + (second + version if version else b"")
    well_formed = first == second == b" " and target and not re.search(rb"\s", target)
    return Blob(line + end), method, version if well_formed else b""


@settings(FUZZ, max_examples=1000)
@given(request_lines())
@example((Blob(b"GET /api/products/x HTTP/2.0\r\n"), b"GET", b"HTTP/2.0"))  # was answered "HTTP/2.0 505"
@example((Blob(b"GET /api/products/x\r\n"), b"GET", b""))  # HTTP/0.9: was answered "HTTP/0.9 505"
@example((Blob(b"CONNECT \r\n"), b"CONNECT", b""))  # no target at all: the connection hung, no answer
@example((Blob(b"HEAD * HTTP/1.1\r\n"), b"HEAD", b"HTTP/1.1"))
@example((Blob(b"GET /x/../api/products/%2e%2e/api/products/a//b HTTP/1.1\r\n"), b"GET", b"HTTP/1.1"))
def test_any_request_line_is_answered_below_500_and_only_normal_paths_reach_the_upstream(gateway: Stack, example: tuple[bytes, bytes, bytes]) -> None:
    line, method, version = example
    data = line + f"Host: gw\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n".encode()
    before = len(gateway.upstream.requests)
    outcome = exchange(gateway.port, data, head_request=method == b"HEAD")
    check_answers(gateway, data, outcome, before, version_ok=version in GOOD_VERSIONS, head_request=method == b"HEAD")
    for received in gateway.upstream.requests[before:]:
        path = received.path.partition("?")[0]
        if received.method in ("GET", "HEAD"):
            assert_normal_path(path, ("/api/products",))
        else:
            assert received.method == "POST", received
            assert_normal_path(path, ("/api/orders",))
    still_serves(gateway)


# -- 2. header blocks --------------------------------------------------------------------------------

KNOWN_NAMES = st.sampled_from(  # the first is what Hypothesis shrinks towards: a harmless one
    [b"X-Request-ID", b"Host", b"Content-Length", b"Transfer-Encoding", b"Connection", b"Expect", b"Authorization", b"Cookie", b"X-Forwarded-For",
     b"X-Forwarded-Host", b"X-Forwarded-Proto", b"Forwarded", b"Cache-Control", b"Pragma", b"If-None-Match",
     b"If-Modified-Since", b"Range", b"Content-Type", b"Content-Encoding", b"Upgrade", b"TE", b"Trailer", b"Keep-Alive",
     b"Proxy-Connection", b"X-User-Id", b"x-user-id", b"Origin", b"Access-Control-Request-Method", b"Accept-Encoding",
     b"traceparent", b"Via", b"Max-Forwards", b"content-length", b"transfer-encoding", b"Sec-WebSocket-Key", b"Sec-WebSocket-Version"]
)
HEADER_NAMES = st.one_of(KNOWN_NAMES, bytes_of(TOKEN_CHARS, 1, 16), st.binary(min_size=0, max_size=12))
FIELD_VALUES = st.sampled_from(  # each one valid field-content, if not always a valid value
    [b"0", b"3", b" 3", b"3 ", b"3, 3", b"+3", b"-1", b"0x3", b"03", b"99999999999999999999999", b"chunked", b"CHUNKED",
     b"chunked, identity", b"identity, chunked", b"gzip, chunked", b"xchunked", b"identity", b"close", b"keep-alive",
     b"Upgrade", b"websocket", b"100-continue", b"no-store", b"no-cache", b"max-age=0", b"only-if-cached", b"*",
     b"bytes=0-1", b"bytes=-1,0-", b"W/\"x\"", b"Bearer " + TOKEN.encode(), b"Bearer", b"Bearer x.y.z", b"application/json",
     b"x-user-id", b"1.2.3.4, 5.6.7.8", b"for=\"[::1]\";proto=https", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
     b"00-zz-yy-01", b"caf\xc3\xa9", b"", b"\xef\xbb\xbf", b"x" * 3000, b"y" * 9000]
)
HEADER_VALUES = st.one_of(
    FIELD_VALUES,
    st.sampled_from([b"a" * 64 + b"\x00", b"caf\xe9", b"\x7f", b"a\rb", b"a\nb"]),
    st.binary(max_size=40),
    st.integers(0, 20000).map(lambda n: b"v" * n),
)
PRINTABLE = bytes(range(0x20, 0x7F))
SEPARATORS = st.sampled_from([b": ", b":", b":\t", b" : ", b"\t: ", b":  ", b": \x0b"])
LINE_ENDS = st.sampled_from([b"\r\n", b"\n", b"\r", b"\r\r\n", b"\r\n "])  # the last: obs-fold
FRAMED_BODIES = st.sampled_from([b"", b"abc", b"3\r\nabc\r\n0\r\n\r\n", b"0\r\n\r\n", b"abc" + b"GET /api/products/smuggled HTTP/1.1\r\nHost: gw\r\n\r\n"])
WS_HANDSHAKE = [b"Upgrade: websocket", b"Connection: Upgrade", b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", b"Sec-WebSocket-Version: 13"]
# Lines that mean something together: a random draw seldom puts both halves in one head.
HEADER_GROUPS = st.sampled_from(
    [WS_HANDSHAKE[:2], WS_HANDSHAKE, WS_HANDSHAKE[:3], [b"Content-Length: 3", b"Transfer-Encoding: chunked"],
     [b"Transfer-Encoding: chunked", b"Content-Length: 3"], [b"Content-Length: 3", b"Content-Length: 3"],
     [b"Content-Length: 3", b"Content-Length: 4"], [b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked"],
     [b"Transfer-Encoding: gzip", b"Transfer-Encoding: chunked"], [b"Expect: 100-continue"], [b"Connection: keep-alive"],
     [b"X-User-Id: admin"], [b"Host: evil.example"], [b"Host: a", b"Host: b"], [b"Authorization: Bearer x.y.z"],
     [b"Cache-Control: only-if-cached"], [b"Content-Type: text/html"], [b"Content-Encoding: gzip"]]
)
HEADER_LINES = mostly(
    st.tuples(mostly(KNOWN_NAMES, bytes_of(TOKEN_CHARS, 1, 16)), mostly(FIELD_VALUES, bytes_of(PRINTABLE, 0, 40))).map(lambda t: t[0] + b": " + t[1] + b"\r\n"),
    st.tuples(HEADER_NAMES, SEPARATORS, HEADER_VALUES, LINE_ENDS).map(lambda t: b"".join(t)),
    HEADER_GROUPS.map(lambda lines: b"".join(line + b"\r\n" for line in lines)),
)
HEADER_TARGETS = {b"/api/orders": b"POST", b"/api/products/h": b"GET", b"/api/products/ws": b"GET"}


def request(line: bytes, *lines: bytes, body: bytes = b"") -> Blob:
    """`line` HTTP/1.1 with the headers a client sends, these `lines` among them, and `body`."""
    head = [line + b" HTTP/1.1", b"Host: gw", b"Authorization: Bearer " + TOKEN.encode(), *lines, b"Connection: close"]
    return Blob(b"\r\n".join(head) + b"\r\n\r\n" + body)


@st.composite
def header_blocks(draw: st.DrawFn) -> Blob:
    """A request with fuzzed header lines before and after the ones a client normally sends."""
    target = draw(st.sampled_from(list(HEADER_TARGETS)))
    method = HEADER_TARGETS[target]
    lines = [b"Host: gw", b"Authorization: Bearer " + TOKEN.encode()]
    body = b""
    if method == b"POST":
        body = b'{"email": "ada@shop.example", "quantity": 2}'
        lines += [b"Content-Type: application/json", b"Content-Length: %d" % len(body)]
    block = b"".join(line + b"\r\n" for line in lines)
    for text in draw(st.lists(HEADER_LINES, min_size=1, max_size=6)):
        block = text + block if draw(st.booleans()) else block + text
    block += b"Connection: close\r\n"
    body = draw(mostly(st.just(body), FRAMED_BODIES))
    return Blob(method + b" " + target + b" HTTP/1.1\r\n" + block + b"\r\n" + body)


@settings(FUZZ, max_examples=600)
@given(header_blocks())
# An upstream that answers a WebSocket handshake as an ordinary GET: was a 502.
@example(request(b"GET /api/products/h", *WS_HANDSHAKE))
# A handshake the client got wrong (no key, no version), to an upstream that speaks WebSocket: was a 500.
@example(request(b"GET /api/products/ws", *WS_HANDSHAKE[:2]))
# A body labelled gzip that is not: a 500 where the body is read, and where it streams a 502
# counted against the (healthy) target, so that five of them ejected it: 503 for everyone.
@example(request(b"POST /api/orders", b"Content-Type: application/json", b"Content-Encoding: gzip", b"Content-Length: 28", body=b'{"email": "ada@shop.example"}'))
@example(request(b"GET /api/products/h", b"Content-Encoding: gzip", b"Content-Length: 3", body=b"abc"))
def test_any_header_block_is_answered_below_500_and_never_desyncs_the_upstream(gateway: Stack, data: Blob) -> None:
    gateway.probes += 1
    # A query of its own: the cache answers none of these, so each shows what reaches the upstream.
    data = Blob(data.replace(b" /api/products/h HTTP/1.1", b" /api/products/h?n=%d HTTP/1.1" % gateway.probes, 1))
    before = len(gateway.upstream.requests)
    outcome = exchange(gateway.port, data)
    check_answers(gateway, data, outcome, before, handshake=b"upgrade: websocket" in data.lower())
    for received in gateway.upstream.requests[before:]:
        assert received.path.partition("?")[0].encode() in HEADER_TARGETS, received
        # The claim header is the gateway's alone: a client's copy never reaches the upstream.
        assert [v for k, v in received.header_items if k.lower() == "x-user-id"] == [SUBJECT], received
        # Hop-by-hop headers are the gateway's own to set, per connection: none of the client's
        # pass (the Upgrade of a WebSocket handshake the gateway makes itself is its own).
        if "Sec-WebSocket-Key" not in received.headers:
            assert not [k for k, _ in received.header_items if k.lower() in HOP_BY_HOP[1:]], received
        for name, value in received.header_items:
            assert not set(name + value) & {"\r", "\n", "\x00"}, received
    still_serves(gateway)


# -- 3. JSON bodies ---------------------------------------------------------------------------------

MARKUP = [
    "<script>alert(1)</script>", "<b>bold</b>", "<img src=x onerror=alert(1)>", "a < b", "5 > 3", "Tom & Jerry", "&lt;b&gt;",
    "<!-- c -->", "<svg><script>x</script></svg>", "<a href='javascript:alert(1)'>x</a>", "<<b>script>", "\\u003cb>", "<", "</",
    "<\x00script>", "<scr\ud800ipt>", "\ud800<b>", "<b>\udfff</b>", "＜script＞", "<math><mi xlink:href=x>",
]
TEXT = st.one_of(st.text(max_size=30), st.sampled_from(MARKUP))
ODD_TEXT = st.one_of(
    TEXT,
    st.text(st.characters(exclude_categories=()), max_size=12),  # lone surrogates, controls, non-characters
    st.sampled_from(["\x00", "\u2028\u2029", "\ufeff", "\U0001f600", "e\u0301", "\u202e", "\uffff", "\ud83d", "\udc00\ud800", "a" * 300]),
)
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-(10**60), 10**60), st.floats(allow_nan=False, allow_infinity=False), ODD_TEXT,
)
DOCUMENTS = st.recursive(
    SCALARS, lambda children: st.lists(children, max_size=5) | st.dictionaries(ODD_TEXT, children, max_size=5), max_leaves=16
)
EMAILS = mostly(
    st.just("ada@shop.example"),
    st.sampled_from(
        ["ada@shop.example\n", "ada@shop.example\r\nBcc: x@evil.example", "<b>ada</b>@shop.example", "ada@", "a\x00@shop.example", "ada@shop.example<script>"]
    ),
    ODD_TEXT,
    SCALARS,
)
SKUS = mostly(
    st.from_regex(SKU, fullmatch=True),
    st.builds(lambda sku, tail: sku + tail, st.from_regex(SKU, fullmatch=True), st.sampled_from(["\n", "\r\n", " ", "<b>", "\x00", "\u0660"])),
    SCALARS,
)
# Orders as a client sends them, most fields valid (so that many reach the upstream, sanitized),
# some not, of any type.
ORDERS = st.fixed_dictionaries(
    {"email": EMAILS},
    optional={
        "name": mostly(TEXT, ODD_TEXT, SCALARS),
        "quantity": mostly(st.integers(1, 1000), st.integers(-2, 1002), st.sampled_from([1.0, 2.5, True, "2", 10**400]), SCALARS),
        "sku": SKUS,
        "when": mostly(st.sampled_from(["2024-02-29", "2025-12-31"]), st.sampled_from(["2024-02-30", "2024-01-01\n", "٢٠٢٤-٠١-٠١", "2024-1-1"]), ODD_TEXT),
        "tags": mostly(st.lists(TEXT, max_size=10), st.lists(ODD_TEXT, max_size=12)),
        "items": mostly(st.lists(st.fixed_dictionaries({}, optional={"note": mostly(TEXT, ODD_TEXT, SCALARS)}), max_size=3), SCALARS),
        "bio": DOCUMENTS,
    },
)


def encode(document: Any, ascii_only: bool) -> bytes:
    # surrogatepass: a lone surrogate becomes bytes that are not UTF-8 (the gateway must say 400)
    return json.dumps(document, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


RAW_BODIES = st.one_of(
    st.integers(1, 100_000).map(lambda n: b"[" * n + b"]" * n),
    st.sampled_from([30, 31, 32, 33, 1000]).map(lambda n: b'{"email":"ada@shop.example","bio":' + b'{"a":' * n + b"1" + b"}" * n + b"}"),
    st.sampled_from([20, 309, 400, 4300, 4301, 10000]).map(lambda n: b'{"email":"ada@shop.example","quantity":' + b"9" * n + b"}"),
    st.sampled_from(
        [b"1e400", b"-1e400", b"1e-400", b"NaN", b"Infinity", b"-Infinity", b"-0", b"1.0", b"1E2", b"0x10", b"01", b"1_000", b"\"1\""]
    ).map(lambda n: b'{"email":"ada@shop.example","quantity":' + n + b"}"),
    st.sampled_from(
        [b'{"email":"ada@shop.example","email":"<script>x</script>"}', b'{"email":"ada@shop.example","quantity":1,"quantity":"x"}',
         b'{"email":"ada@shop.example","\\u0065mail":"x"}', b'{"email":"ada@shop.example"} trailing', b"\xef\xbb\xbf{\"email\":\"ada@shop.example\"}",
         b'{"email":"ada@shop.example",}', b"{'email':'ada@shop.example'}", b'{"email":"ada@shop.example" /* c */}', b"",
         b'{"email":"ada@shop.example","name":"\\ud800<b>x</b>"}', b'{"email":"ada@shop.example","name":"<b>\\udfff</b>"}',
         b'{"email":"ada@shop.example","name":"\\u003cscript\\u003ex"}', b'{"email":"ada@shop.example","name":"a\\u0000b"}',
         b"null", b"[]", b"\"ada@shop.example\"", b"1", b" " * 70000, json.dumps({"email": "ada@shop.example"}).encode("utf-16")]
    ),
    st.binary(max_size=200),
)
CONTENT_TYPES = mostly(
    st.just(b"application/json"),
    st.sampled_from(
        [b"application/json; charset=utf-8", b"APPLICATION/JSON", b"application/vnd.api+json", b"application/json;charset=latin-1",
         b"text/plain", b"application/x-www-form-urlencoded", b"multipart/form-data; boundary=xyz", b"", b"application/json, text/plain"]
    ),
    st.none(),
)


def strict_json(raw: bytes) -> Any:
    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        assert len({key for key, _ in pairs}) == len(pairs), f"duplicate keys forwarded: {raw[:300]!r}"
        return dict(pairs)

    def no_constant(name: str) -> Any:
        raise AssertionError(f"{name} forwarded: {raw[:300]!r}")

    return json.loads(raw.decode("utf-8"), object_pairs_hook=unique, parse_constant=no_constant)


def strings_of(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from strings_of(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from strings_of(item)


def assert_meets_the_rules(document: Any) -> None:
    """The route's field rules, checked again on what the upstream received."""
    assert isinstance(document, dict), document
    email = document.get("email")
    assert isinstance(email, str) and "@" in email and not set(email) & {"\r", "\n", "\x00"}, email
    name = document.get("name")
    assert name is None or isinstance(name, str) and len(name) <= 100, name
    quantity = document.get("quantity")
    assert quantity is None or type(quantity) is int and 1 <= quantity <= 1000, quantity
    sku = document.get("sku")
    assert sku is None or isinstance(sku, str) and SKU.fullmatch(sku), f"sku {sku!r} does not match ^[A-Z0-9-]{{4,20}}$"
    when = document.get("when")
    assert when is None or isinstance(when, str) and DATE.fullmatch(when), when
    tags = document.get("tags")
    assert tags is None or isinstance(tags, list) and len(tags) <= 10, tags
    items = document.get("items")
    if isinstance(items, list):
        for item in items:
            note = item.get("note") if isinstance(item, dict) else None
            assert note is None or isinstance(note, str) and len(note) <= 200, note


@st.composite
def json_requests(draw: st.DrawFn) -> tuple[bytes, bytes | None, bool]:
    """(body, content type, chunked)."""
    kind = draw(st.sampled_from(["order", "order", "order", "document", "raw", "raw"]))
    if kind == "raw":
        body = draw(RAW_BODIES)
    else:
        body = encode(draw(ORDERS if kind == "order" else DOCUMENTS), ascii_only=draw(mostly(st.just(True), st.just(False))))
    return Blob(body), draw(CONTENT_TYPES), draw(st.integers(0, 4)) == 0


@settings(FUZZ, max_examples=800)
@given(json_requests())
# An unpaired surrogate escape in a string the sanitizer cleans: was a 500 (nh3 cannot take it).
@example((Blob(b'{"email":"ada@shop.example","name":"\\ud800<b>x</b>"}'), b"application/json", False))
# A format rule on a value that is no string: {"email": false} was forwarded.
@example((Blob(b'{"email":false}'), b"application/json", False))
# Python's $ matches before a final newline: "ABCD\n" passed ^[A-Z0-9-]{4,20}$.
@example((Blob(b'{"email":"ada@shop.example","sku":"ABCD\\n"}'), b"application/json", False))
def test_any_json_body_is_answered_below_500_and_only_clean_valid_json_reaches_the_upstream(gateway: Stack, example: tuple[bytes, bytes | None, bool]) -> None:
    body, content_type, chunked = example
    head = b"POST /api/orders HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer " + TOKEN.encode() + b"\r\n"
    if content_type is not None:
        head += b"Content-Type: " + content_type + b"\r\n"
    if chunked:
        middle = len(body) // 2
        pieces = [p for p in (body[:middle], body[middle:]) if p]
        framed = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
        data = head + b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + framed
    else:
        data = head + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body
    before = len(gateway.upstream.requests)
    outcome = exchange(gateway.port, data)
    responses = check_answers(gateway, data, outcome, before)
    assert len(responses) == 1, outcome
    response = responses[0]
    if not response.from_upstream:
        assert response.status in (400, 413, 415, 422), response
    kind = (content_type or b"").split(b";")[0].strip().lower()
    for received in gateway.upstream.requests[before:]:
        if kind == b"application/x-www-form-urlencoded":
            pairs = parse_qsl(received.body.decode("utf-8"), keep_blank_values=True)
            assert dict(pairs).get("email"), pairs
            assert not [value for _, value in pairs if TAG_OPEN.search(value)], pairs
            continue
        document = strict_json(received.body)
        assert_meets_the_rules(document)
        assert not [s for s in strings_of(document) if TAG_OPEN.search(s)], document
        if b"<" not in body and b"\\u003c" not in body.lower():
            assert received.body == body  # nothing to clean: forwarded byte for byte
    still_serves(gateway)


# -- 4. JWTs ------------------------------------------------------------------------------------------

B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
REGISTERED_CLAIMS = frozenset({"iss", "sub", "aud", "exp", "nbf", "iat", "jti"})  # RFC 7519 §4.1: checked when present
HEADER_SEGMENT, PAYLOAD_SEGMENT, SIGNATURE_SEGMENT = TOKEN.split(".")
ANY_JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20)),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)
CLAIM_VALUES = st.one_of(
    ANY_JSON,
    st.sampled_from(
        ["9999999999", str(NOW + 3600), 1e308, -1, 0, NOW - 3600, NOW + 3600, NOW + 10**6, 2**64, -(2**63), True, [AUDIENCE],
         [AUDIENCE, 1], ISSUER.upper(), ISSUER + "/", [ISSUER], {"iss": ISSUER}]
    ),
)
ALGS = st.one_of(
    st.sampled_from(["HS256", "HS384", "HS512", "RS256", "ES256", "PS256", "EdDSA", "none", "None", "NONE", "nOnE", "", "HS256 ", "hs256", "HS256\x00"]),
    ANY_JSON,
)
SUBJECTS = st.one_of(
    st.sampled_from([" admin", "admin ", " ", "caf%C3%A9", "a%41", "100%", "a,b", "\t", "\r\nX-Injected: 1", "\x00", "café", "\U0001f600", "ADMIN"]),
    st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=40),
)


def repad(segment: str, how: str) -> str:
    if how == "padding":
        return segment + "=" * (-len(segment) % 4 or 4)
    if how == "standard":
        return segment.replace("-", "+").replace("_", "/")
    if how == "space":
        return segment[:5] + " " + segment[5:]
    if how == "junk":
        return segment[:5] + "!" + segment[5:]
    if how == "last-bits":  # the same bytes, other unused trailing bits
        return segment[:-1] + B64URL[B64URL.index(segment[-1]) ^ 1]
    if how == "truncated":
        return segment[:-1]
    if how == "extended":
        return segment + "A"
    return segment


@st.composite
def tokens(draw: st.DrawFn) -> tuple[str, bool]:
    """(token, must_pass): must_pass only for tokens the issuer's secret signed with valid claims."""
    kind = draw(st.sampled_from(["segments", "garbage-payload", "alg", "claims", "subject", "padding", "shape"]))
    if kind == "segments":
        alphabet = st.sampled_from(B64URL + "=+/ .\\%")
        return ".".join(draw(st.lists(st.text(alphabet, max_size=60), min_size=1, max_size=6))), False
    if kind == "garbage-payload":
        header = json.dumps({"alg": "HS256", "typ": "JWT"}).encode()
        payload = draw(st.one_of(st.binary(max_size=60), ANY_JSON.map(lambda v: json.dumps(v).encode())))
        return hs256(header, payload), False
    if kind == "alg":
        optional = {"typ": ANY_JSON, "kid": ANY_JSON, "crit": ANY_JSON, "b64": ANY_JSON, "jku": st.just("http://evil.example/jwks")}
        header = draw(st.fixed_dictionaries({"alg": ALGS}, optional=optional))
        signature = draw(st.sampled_from(["hs256", "empty", "good", "junk"]))
        payload = json.dumps(good_claims()).encode()
        if signature == "hs256":
            return hs256(json.dumps(header).encode(), payload), False
        unsigned = f"{b64url(json.dumps(header).encode())}.{b64url(payload)}"
        return unsigned + "." + {"empty": "", "good": SIGNATURE_SEGMENT, "junk": "AAAA"}[signature], False
    if kind == "claims":
        replaced = draw(st.dictionaries(st.sampled_from(["iss", "aud", "sub", "exp", "nbf", "iat", "jti"]), CLAIM_VALUES, max_size=3))
        dropped = draw(st.lists(st.sampled_from(["iss", "aud", "sub", "exp", "iat"]), max_size=2))
        claims = {k: v for k, v in good_claims(**replaced).items() if k not in dropped}
        return hs256(json.dumps({"alg": "HS256"}).encode(), json.dumps(claims).encode()), False
    if kind == "subject":  # valid tokens whatever their subject and extra claims: they must pass
        extra = draw(st.dictionaries(st.text(max_size=10).filter(lambda k: k not in REGISTERED_CLAIMS), ANY_JSON, max_size=3))
        return mint({**good_claims(sub=draw(SUBJECTS)), **extra}), True
    if kind == "padding":
        which = draw(st.integers(0, 2))
        how = draw(st.sampled_from(["padding", "standard", "space", "junk", "last-bits", "truncated", "extended"]))
        parts = [HEADER_SEGMENT, PAYLOAD_SEGMENT, SIGNATURE_SEGMENT]
        parts[which] = repad(parts[which], how)
        return ".".join(parts), False
    shape = draw(st.sampled_from(["trailing-dot", "leading-dot", "two", "five", "doubled", "spaces", "empty", "huge", "non-ascii"]))
    return {
        "trailing-dot": TOKEN + ".",
        "leading-dot": "." + TOKEN,
        "two": f"{HEADER_SEGMENT}.{PAYLOAD_SEGMENT}",
        "five": f"{TOKEN}.{PAYLOAD_SEGMENT}.{SIGNATURE_SEGMENT}",
        "doubled": f"{TOKEN} {TOKEN}",
        "spaces": f" {TOKEN} ",
        "empty": "",
        "huge": TOKEN + "A" * 9000,
        "non-ascii": TOKEN[:-3] + "é" + TOKEN[-2:],
    }[shape], False


SCHEMES = st.sampled_from(["Bearer ", "Bearer ", "Bearer ", "bearer ", "BEARER ", "Bearer  ", "Bearer\t", "Basic ", "", "Bearer"])


@settings(FUZZ, max_examples=800)
@given(tokens(), SCHEMES)
# Forwarded as X-User-Id "admin": the upstream's parser trims the space (RFC 9110 §5.5).
@example((mint(good_claims(sub=" admin")), True), "Bearer ")
# Forwarded as "caf%C3%A9", which is what "café" is forwarded as too: two users, one X-User-Id.
@example((mint(good_claims(sub="caf%C3%A9")), True), "Bearer ")
def test_any_token_is_answered_401_unless_the_issuer_signed_it_with_valid_claims(gateway: Stack, example: tuple[str, bool], scheme: str) -> None:
    token, must_pass = example
    gateway.probes += 1
    path = f"/api/products/token/{gateway.probes}"  # a new path each time: never a cache hit
    data = f"GET {path} HTTP/1.1\r\nHost: gw\r\nAuthorization: {scheme}{token}\r\nConnection: close\r\n\r\n".encode("utf-8", "surrogatepass")
    before = len(gateway.upstream.requests)
    outcome = exchange(gateway.port, data)
    (response,) = check_answers(gateway, data, outcome, before)
    if response.status == 200:
        assert may_pass(token), f"a token that must be refused was accepted: {token!r}"
        (received,) = gateway.upstream.requests[before:]
        subject = json.loads(lenient_b64decode(token.split(".")[1]) or b"")["sub"]
        (forwarded,) = [v for k, v in received.header_items if k.lower() == "x-user-id"]
        assert all(" " <= c < "\x7f" for c in forwarded) and unquote(forwarded) == subject, (forwarded, subject)
    else:
        assert response.status in (400, 401, 431), response
        if response.status == 401:
            assert (response.header("www-authenticate") or "").startswith('Bearer realm="gateway"'), response
        if must_pass and scheme == "Bearer ":
            raise AssertionError(f"a valid token was refused with {response.status}: {token!r}")
    still_serves(gateway)
