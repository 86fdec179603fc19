"""auth: JWT bearer tokens against a real JWKS server, minted by jwcrypto (not pyjwt).

The gateway verifies with pyjwt; every token here is made by jwcrypto or by hand (alg none, key
confusion, tampering, junk), so the tests do not share the implementation's blind spots. The
key server is a real aiohttp app on 127.0.0.1 whose key set, Cache-Control and failures a test
changes while the gateway runs.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Literal

import aiohttp
import pytest
from aiohttp import web
from jwcrypto import jwk
from jwcrypto import jwt as jwc_jwt

from gateway.config import parse_config
from gateway.errors import ConfigError
from gateway.jwks import JwksKeys
from gateway.policies.auth import JwksSettings
from tests.conftest import RunningGateway, Upstream, assert_problem, base_config, free_port

ISSUER = "https://issuer.example"
AUDIENCE = "marketplace-api"
OTHER_ISSUER = "https://partner.example"
HS_SECRET = "s3cret-that-is-at-least-32-bytes-long!!"
DROP = object()  # a claim left out of a token

# Generated once for the module: RSA key generation is slow.
RSA_KEY = jwk.JWK.generate(kty="RSA", size=2048, kid="rsa-1")
RSA_NEXT = jwk.JWK.generate(kty="RSA", size=2048, kid="rsa-2")
ATTACKER_KEY = jwk.JWK.generate(kty="RSA", size=2048, kid="attacker-1")
EC_KEY = jwk.JWK.generate(kty="EC", crv="P-256", kid="ec-1")
ED_KEY = jwk.JWK.generate(kty="OKP", crv="Ed25519", kid="ed-1")
HS_KEY = jwk.JWK(kty="oct", k=base64.urlsafe_b64encode(HS_SECRET.encode()).rstrip(b"=").decode())
ALGORITHM_OF = {"rsa-1": "RS256", "rsa-2": "RS256", "attacker-1": "RS256", "ec-1": "ES256", "ed-1": "EdDSA"}

INVALID_TOKEN = 'Bearer realm="gateway", error="invalid_token"'
INSUFFICIENT_SCOPE = 'Bearer realm="gateway", error="insufficient_scope"'


# -- tokens -------------------------------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def segment(value: Any) -> str:
    return b64url(json.dumps(value).encode())


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    values: dict[str, Any] = {"iss": ISSUER, "aud": AUDIENCE, "sub": "user-1", "iat": now, "exp": now + 300, "jti": uuid.uuid4().hex}
    values.update(overrides)
    return {name: value for name, value in values.items() if value is not DROP}


def public_jwk(key: jwk.JWK, **extra: Any) -> dict[str, Any]:
    data = key.export_public(as_dict=True)
    data.update({"use": "sig", "alg": ALGORITHM_OF[data["kid"]], **extra})
    return data


def mint(key: jwk.JWK, header: dict[str, Any] | None = None, **claim_overrides: Any) -> str:
    """A token signed by jwcrypto with the key's algorithm and kid (header entries override)."""
    if key is HS_KEY:
        values: dict[str, Any] = {"alg": "HS256"}
    else:
        values = {"alg": ALGORITHM_OF[key["kid"]], "kid": key["kid"]}
    values.update(header or {})
    token = jwc_jwt.JWT(header={k: v for k, v in values.items() if v is not DROP}, claims=claims(**claim_overrides))
    token.make_signed_token(key)
    return token.serialize()


def forge(header: dict[str, Any], payload: dict[str, Any], signature: bytes = b"") -> str:
    """A token put together by hand, signed with whatever the attacker has (or nothing)."""
    return f"{segment(header)}.{segment(payload)}.{b64url(signature)}"


def hs256_with(secret: bytes, header: dict[str, Any], payload: dict[str, Any]) -> str:
    signing_input = f"{segment(header)}.{segment(payload)}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# -- the key server --------------------------------------------------------------------------------


@dataclass
class KeyServer:
    """A JWKS endpoint whose keys, freshness and failures a test changes at run time."""

    port: int
    keys: list[dict[str, Any]] = field(default_factory=list)
    max_age: int = 3600
    failing: Literal[None, "500"] = None
    chunked: bool = False
    requests: int = 0
    runner: web.AppRunner | None = None
    hangup: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/.well-known/jwks.json"

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        if self.failing == "500":
            return web.Response(status=500, text="key store on fire")
        headers = {"Cache-Control": f"public, max-age={self.max_age}", "Content-Type": "application/json"}
        body = json.dumps({"keys": self.keys}).encode()
        if not self.chunked:
            return web.Response(body=body, headers=headers)
        response = web.StreamResponse(headers=headers)
        response.enable_chunked_encoding()
        await response.prepare(request)
        middle = len(body) // 2
        await response.write(body[:middle])
        await asyncio.sleep(0.05)  # the second half arrives later, as from a slow or busy server
        await response.write(body[middle:])
        await response.write_eof()
        return response

    async def _anything(self, request: web.Request) -> web.Response:
        self.requests += 1
        return web.json_response({"keys": self.keys})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/.well-known/jwks.json", self._serve)
        app.router.add_route("*", "/{tail:.*}", self._anything)
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def hang_up(self) -> None:
        """Closed: from now on every connection is counted and closed without an answer."""
        await self.stop()

        async def close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.requests += 1
            writer.close()

        self.hangup = await asyncio.start_server(close, "127.0.0.1", self.port)

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
        if self.hangup is not None:
            self.hangup.close()
            await self.hangup.wait_closed()
            self.hangup = None


@pytest.fixture
async def key_server_factory() -> AsyncIterator[Callable[..., Awaitable[KeyServer]]]:
    started: list[KeyServer] = []

    async def make(*keys: jwk.JWK) -> KeyServer:
        server = KeyServer(free_port(), keys=[public_jwk(key) for key in keys])
        await server.start()
        started.append(server)
        return server

    yield make
    for server in started:
        await server.stop()


@pytest.fixture
async def keys(key_server_factory: Callable[..., Awaitable[KeyServer]]) -> KeyServer:
    return await key_server_factory(RSA_KEY, EC_KEY, ED_KEY)


# -- config and requests ---------------------------------------------------------------------------


def jwks_issuer(url: str, **extra: Any) -> dict[str, Any]:
    return {"issuer": ISSUER, "audience": AUDIENCE, "algorithms": ["RS256", "ES256", "EdDSA"], "jwks_url": url, **extra}


def hs_issuer(**extra: Any) -> dict[str, Any]:
    return {"issuer": ISSUER, "audience": AUDIENCE, "algorithms": ["HS256"], "secret": HS_SECRET, **extra}


def auth_config(upstream: Upstream, issuers: Any, route: dict[str, Any] | None = None, **top: Any) -> dict[str, Any]:
    config = base_config(upstream.url)
    config["routes"][0]["auth"] = {"required": True} if route is None else route
    config["auth"] = {"jwt": issuers, **top}
    return config


@dataclass
class Answer:
    status: int
    headers: Any
    body: bytes


async def fetch(client: aiohttp.ClientSession, url: str, token: str | None = None, headers: dict[str, str] | None = None) -> Answer:
    sent = dict(headers or {})
    if token is not None:
        sent.update(bearer(token))
    async with client.get(url, headers=sent) as response:
        return Answer(response.status, response.headers, await response.read())


def assert_refused(answer: Answer, status: int, challenge: str, upstream: Upstream, reached_before: int = 0) -> dict[str, Any]:
    """A 401/403 from the gateway: problem+json, the Bearer challenge, and nothing sent upstream."""
    document = assert_problem(answer.status, answer.headers, answer.body, status)
    assert answer.headers.getall("WWW-Authenticate") == [challenge]
    assert len(upstream.requests) == reached_before, [r.path for r in upstream.requests]
    return document


async def readiness(client: aiohttp.ClientSession, gateway: RunningGateway) -> tuple[int, dict[str, Any]]:
    async with client.get(gateway.admin_url + "/readyz") as response:
        return response.status, await response.json()


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


# -- valid tokens ----------------------------------------------------------------------------------


@pytest.mark.parametrize("key", [RSA_KEY, EC_KEY, ED_KEY], ids=["RS256", "ES256", "EdDSA"])
async def test_a_token_signed_with_a_key_from_the_jwks_reaches_the_upstream(key: jwk.JWK, keys, upstream, start_gateway, client) -> None:
    gateway = await start_gateway(auth_config(upstream, jwks_issuer(keys.url)))
    answer = await fetch(client, gateway.url + "/api/orders", mint(key, sub="alice"))
    assert answer.status == 200, answer.body
    assert [r.path for r in upstream.requests] == ["/api/orders"]


async def test_an_hs256_token_made_with_the_configured_secret_reaches_the_upstream(upstream, start_gateway, client) -> None:
    gateway = await start_gateway(auth_config(upstream, hs_issuer()))
    answer = await fetch(client, gateway.url + "/", mint(HS_KEY))
    assert answer.status == 200, answer.body
    assert len(upstream.requests) == 1


async def test_a_token_verified_with_a_public_key_pem_file_reaches_the_upstream(upstream, start_gateway, client, tmp_path: Path) -> None:
    (tmp_path / "issuer.pem").write_bytes(RSA_KEY.export_to_pem())
    issuer = {"issuer": ISSUER, "audience": AUDIENCE, "algorithms": ["RS256"], "public_key": "issuer.pem"}
    gateway = await start_gateway(auth_config(upstream, issuer))
    assert (await fetch(client, gateway.url + "/", mint(RSA_KEY))).status == 200
    answer = await fetch(client, gateway.url + "/", mint(RSA_NEXT))
    assert_refused(answer, 401, INVALID_TOKEN, upstream, reached_before=1)


# -- refused tokens: 401 invalid_token -------------------------------------------------------------


async def test_a_request_without_a_token_gets_a_bare_bearer_challenge(keys, upstream, start_gateway, client) -> None:
    gateway = await start_gateway(auth_config(upstream, jwks_issuer(keys.url)))
    answer = await fetch(client, gateway.url + "/", headers={"Authorization": "Basic dXNlcjpwYXNz"})
    assert_refused(answer, 401, 'Bearer realm="gateway"', upstream)  # RFC 6750 §3.1: no error code without a token


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"exp": int(time.time()) - 120}, id="expired"),
        pytest.param({"nbf": int(time.time()) + 3600}, id="not-yet-valid"),
        pytest.param({"exp": DROP}, id="without-exp"),
        pytest.param({"iss": "https://evil.example"}, id="wrong-iss"),
        pytest.param({"iss": "https://issuer.exam"}, id="iss-a-prefix-of-the-issuer"),  # CVE-2024-53861: partial iss matching
        pytest.param({"iss": DROP}, id="no-iss"),
        pytest.param({"aud": "other-api"}, id="wrong-aud"),
        pytest.param({"aud": "marketplace"}, id="aud-a-prefix-of-the-audience"),
        pytest.param({"aud": DROP}, id="no-aud"),
    ],
)
async def test_a_well_signed_token_failing_a_claim_check_is_refused_without_saying_why(overrides: dict[str, Any], keys, upstream, start_gateway, client) -> None:
    gateway = await start_gateway(auth_config(upstream, jwks_issuer(keys.url)))
    answer = await fetch(client, gateway.url + "/", mint(RSA_KEY, **overrides))
    document = assert_refused(answer, 401, INVALID_TOKEN, upstream)
    assert document["detail"] == "a valid access token is required"  # RFC 6750 §3.1: the reason is logged only


async def test_leeway_accepts_a_token_that_expired_within_it(keys, upstream, start_gateway, client) -> None:
    gateway = await start_gateway(auth_config(upstream, jwks_issuer(keys.url, leeway="5m")))
    assert (await fetch(client, gateway.url + "/", mint(RSA_KEY, exp=int(time.time()) - 60))).status == 200
    answer = await fetch(client, gateway.url + "/", mint(RSA_KEY, exp=int(time.time()) - 600))
    assert_refused(answer, 401, INVALID_TOKEN, upstream, reached_before=1)


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
async def test_an_unsigned_alg_none_token_is_refused(alg: str, keys, upstream, start_gateway, client) -> None:
    gateway = await start_gateway(auth_config(upstream, jwks_issuer(keys.url)))
    for signature in (b"", b"x"):
        answer = await fetch(client, gateway.url + "/", forge({"alg": alg, "typ": "JWT"}, claims(), signature))
        assert_refused(answer, 401, INVALID_TOKEN, upstream)


async def test_hs256_signed_with_the_rsa_public_key_pem_is_refused(upstream, start_gateway, client, tmp_path: Path) -> None:
    pem = RSA_KEY.export_to_pem()
    (tmp_path / "issuer.pem").write_bytes(pem)
    issuer = {"issuer": ISSUER, "audience": AUDIENCE, "algorithms": ["RS256"], "public_key": "issuer.pem"}
    gateway = await start_gateway(auth_config(upstream, issuer))
    for secret in (pem, pem.strip()):
        answer = await fetch(client, gateway.url + "/", hs256_with(secret, {"alg": "HS256", "typ": "JWT"}, claims()))
        assert_refused(answer, 401, INVALID_TOKEN, upstream)


async def test_hs256_signed_with_a_jwks_key_as_secret_is_refused(keys, upstream, start_gateway, client) -> None:
    gateway = await start_gateway(auth_config(upstream, jwks_issuer(keys.url)))
    for secret in (RSA_KEY.export_to_pem(), json.dumps(public_jwk(RSA_KEY)).encode()):
        answer = await fetch(client, gateway.url + "/", hs256_with(secret, {"alg": "HS256", "kid": "rsa-1"}, claims()))
        assert_refused(answer, 401, INVALID_TOKEN, upstream)


async def test_a_token_whose_alg_is_not_in_the_allow_list_is_refused(keys, upstream, start_gateway, client) -> None:
    gateway = await start_gateway(auth_config(upstream, jwks_issuer(keys.url, algorithms=["RS256"])))
    answer = await fetch(client, gateway.url + "/", mint(EC_KEY))
    assert_refused(answer, 401, INVALID_TOKEN, upstream)


async def test_a_token_whose_alg_does_not_fit_its_kids_key_is_refused(keys, upstream, start_gateway, client) -> None:
    gateway = await start_gateway(auth_config(upstream, jwks_issuer(keys.url)))
    # Signed with the EC key but naming the RSA key's kid, and the other way round.
    for token in (mint(EC_KEY, {"kid": "rsa-1"}), mint(RSA_KEY, {"kid": "ec-1"})):
        assert_refused(await fetch(client, gateway.url + "/", token), 401, INVALID_TOKEN, upstream)


async def test_a_token_with_a_tampered_payload_is_refused(keys, upstream, start_gateway, client) -> None:
    gateway = await start_gateway(auth_config(upstream, jwks_issuer(keys.url), {"required": True, "roles": ["admin"]}))
    header, _, signature = mint(RSA_KEY, roles=["user"]).split(".")
    tampered = f"{header}.{segment(claims(roles=['admin']))}.{signature}"
    assert_refused(await fetch(client, gateway.url + "/", tampered), 401, INVALID_TOKEN, upstream)


async def test_a_token_with_a_tampered_or_missing_signature_is_refused(keys, upstream, start_gateway, client) -> None:
    gateway = await start_gateway(auth_config(upstream, jwks_issuer(keys.url)))
    for key in (RSA_KEY, EC_KEY, ED_KEY):
        header, payload, signature = mint(key).split(".")
        raw = bytearray(base64.urlsafe_b64decode(signature + "=="))
        raw[len(raw) // 2] ^= 0x01
        for bad in (b64url(bytes(raw)), "", signature[:-8]):
            assert_refused(await fetch(client, gateway.url + "/", f"{header}.{payload}.{bad}"), 401, INVALID_TOKEN, upstream)


async def test_a_token_signed_by_a_key_the_jwks_does_not_have_is_refused(keys, upstream, start_gateway, client) -> None:
    gateway = await start_gateway(auth_config(upstream, jwks_issuer(keys.url)))
    for token in (mint(ATTACKER_KEY), mint(ATTACKER_KEY, {"kid": "rsa-1"}), mint(ATTACKER_KEY, {"kid": DROP})):
        assert_refused(await fetch(client, gateway.url + "/", token), 401, INVALID_TOKEN, upstream)


async def test_a_jwks_key_meant_for_encryption_never_verifies_a_signature(key_server_factory, upstream, start_gateway, client) -> None:
    keys = await key_server_factory()
    keys.keys = [public_jwk(RSA_KEY, use="enc"), public_jwk(EC_KEY)]
    gateway = await start_gateway(auth_config(upstream, jwks_issuer(keys.url)))
    assert (await fetch(client, gateway.url + "/", mint(EC_KEY))).status == 200
    assert_refused(await fetch(client, gateway.url + "/", mint(RSA_KEY)), 401, INVALID_TOKEN, upstream, reached_before=1)


# -- keys named by the token are never fetched -----------------------------------------------------


async def test_a_jku_or_x5u_header_pointing_to_an_attackers_jwks_is_never_fetched(keys, key_server_factory, upstream, start_gateway, client) -> None:
    attacker = await key_server_factory(ATTACKER_KEY)
    gateway = await start_gateway(auth_config(upstream, jwks_issuer(keys.url)))
    tokens = [
        mint(ATTACKER_KEY, {"jku": attacker.url}),
        mint(ATTACKER_KEY, {"jku": attacker.url, "kid": "rsa-1"}),
        mint(ATTACKER_KEY, {"x5u": f"http://127.0.0.1:{attacker.port}/cert.pem"}),
        mint(ATTACKER_KEY, {"jwk": public_jwk(ATTACKER_KEY)}),  # an embedded key is not trusted either
    ]
    for token in tokens:
        assert_refused(await fetch(client, gateway.url + "/", token), 401, INVALID_TOKEN, upstream)
    assert attacker.requests == 0


# -- junk ------------------------------------------------------------------------------------------


JUNK = {
    "ten-kilobytes": "x" * 10240,
    "ten-kilobytes-shaped-like-a-jwt": f"{segment({'alg': 'RS256', 'kid': 'rsa-1'})}.{b64url(b'a' * 7600)}.{b64url(b'b' * 256)}",
    "one-word": "not-a-jwt",
    "three-empty-parts": "..",
    "three-letters": "a.b.c",
    "two-parts": f"{segment({'alg': 'RS256'})}.{segment(claims())}",
    "header-not-json": f"{b64url(b'{alg')}.{segment(claims())}.c2ln",
    "header-a-json-list": f"{segment(['RS256'])}.{segment(claims())}.c2ln",
    "header-not-utf8": f"{b64url(bytes([0xFF, 0xFE, 0x7B]))}.{segment(claims())}.c2ln",
    "alg-a-list": forge({"alg": ["RS256"], "kid": "rsa-1"}, claims(), b"sig"),
    "alg-an-object": forge({"alg": {"name": "RS256"}, "kid": "rsa-1"}, claims(), b"sig"),
    "alg-a-number": forge({"alg": 256, "kid": "rsa-1"}, claims(), b"sig"),
    "kid-a-number": forge({"alg": "RS256", "kid": 1}, claims(), b"sig"),
    "kid-an-object": forge({"alg": "RS256", "kid": {"$ne": None}}, claims(), b"sig"),
    "payload-a-json-list": forge({"alg": "RS256", "kid": "rsa-1"}, [1, 2], b"sig"),  # type: ignore[arg-type]
    "exp-a-string": forge({"alg": "RS256", "kid": "rsa-1"}, claims(exp="tomorrow"), b"sig"),
    "base64-junk-below-the-size-limit": ".".join(b64url(bytes(range(256)) * 8) for _ in range(3)),
}


@pytest.mark.parametrize("token", list(JUNK.values()), ids=list(JUNK))
async def test_a_junk_token_is_a_401_never_a_500(token: str, keys, upstream, start_gateway, client) -> None:
    gateway = await start_gateway(auth_config(upstream, jwks_issuer(keys.url)))
    assert_refused(await fetch(client, gateway.url + "/", token), 401, INVALID_TOKEN, upstream)


@pytest.mark.parametrize("iss", [["https://issuer.example"], {"url": "https://issuer.example"}, 7, None], ids=["list", "object", "number", "null"])
async def test_a_junk_iss_with_several_issuers_is_a_401_never_a_500(iss: Any, keys, upstream, start_gateway, client) -> None:
    issuers = [jwks_issuer(keys.url), hs_issuer(issuer=OTHER_ISSUER)]
    gateway = await start_gateway(auth_config(upstream, issuers))
    assert_refused(await fetch(client, gateway.url + "/", mint(RSA_KEY, iss=iss)), 401, INVALID_TOKEN, upstream)


# -- JWKS: rotation, unknown kids, failures -----------------------------------------------------


async def test_a_rotated_in_key_is_picked_up_at_its_first_token(keys, upstream, start_gateway, client) -> None:
    gateway = await start_gateway(auth_config(upstream, jwks_issuer(keys.url)))
    assert keys.requests == 1  # fetched at start; max-age 1h keeps it
    keys.keys = [public_jwk(RSA_NEXT)]
    answer = await fetch(client, gateway.url + "/", mint(RSA_NEXT))
    assert answer.status == 200, answer.body
    assert keys.requests == 2


async def test_a_rotated_in_key_is_picked_up_for_tokens_without_a_kid_too(keys, upstream, start_gateway, client) -> None:
    keys.keys = [public_jwk(EC_KEY)]  # no RSA key yet: a kid-less RS256 token has none that fits
    gateway = await start_gateway(auth_config(upstream, jwks_issuer(keys.url)))
    keys.keys = [public_jwk(EC_KEY), public_jwk(RSA_NEXT)]
    answer = await fetch(client, gateway.url + "/", mint(RSA_NEXT, {"kid": DROP}))
    assert answer.status == 200, answer.body
    assert keys.requests == 2


async def test_a_flood_of_unknown_kids_costs_the_jwks_endpoint_one_request_per_interval(keys, upstream, start_gateway, client) -> None:
    issuer = jwks_issuer(keys.url, jwks={"unknown_kid_interval": "1h"})
    gateway = await start_gateway(auth_config(upstream, issuer))
    tokens = [mint(ATTACKER_KEY, {"kid": f"made-up-{n}"}) for n in range(60)]
    answers = await asyncio.gather(*(fetch(client, gateway.url + "/", token) for token in tokens))
    for answer in answers:
        assert_refused(answer, 401, INVALID_TOKEN, upstream)
    assert keys.requests == 2  # the start, then one refetch shared by the whole flood
    for token in tokens[:10]:
        assert_refused(await fetch(client, gateway.url + "/", token), 401, INVALID_TOKEN, upstream)
    assert keys.requests == 2


async def test_an_unknown_kid_refetches_again_once_the_interval_has_passed(keys) -> None:
    now = [1000.0]
    settings = JwksSettings.model_validate({"unknown_kid_interval": "30s"})
    key_set = JwksKeys(keys.url, settings, clock=lambda: now[0])
    await key_set.start()
    try:
        assert keys.requests == 1
        assert await key_set.key("made-up", "RS256") is None
        assert keys.requests == 2
        now[0] += 29.0
        assert await key_set.key("made-up-2", "RS256") is None
        assert keys.requests == 2
        keys.keys = [public_jwk(RSA_NEXT)]
        now[0] += 1.0
        assert await key_set.key("rsa-2", "RS256") is not None
        assert keys.requests == 3
    finally:
        await key_set.close()


async def test_a_key_set_sent_in_several_chunks_is_read_whole(keys, upstream, start_gateway, client) -> None:
    keys.chunked = True
    gateway = await start_gateway(auth_config(upstream, jwks_issuer(keys.url)))
    answer = await fetch(client, gateway.url + "/", mint(ED_KEY))
    assert answer.status == 200, answer.body
    status, body = await readiness(client, gateway)
    assert (status, body["checks"]["jwks"][keys.url]["status"]) == (200, "fresh")


@pytest.mark.parametrize("failure", ["500", "closed"])
async def test_a_jwks_endpoint_down_after_start_keeps_verifying_with_cached_keys_and_reports_degraded(
    failure: str, keys, upstream, start_gateway, client
) -> None:
    keys.max_age = 0  # refetch as often as min_ttl allows
    issuer = jwks_issuer(keys.url, jwks={"min_ttl": "100ms", "max_ttl": "100ms", "retry_interval": "1h"})
    gateway = await start_gateway(auth_config(upstream, issuer))
    status, body = await readiness(client, gateway)
    assert (status, body["status"], body["checks"]["jwks"][keys.url]["status"]) == (200, "ready", "fresh")

    if failure == "500":
        keys.failing = "500"
    else:
        await keys.hang_up()

    async def stale() -> bool:
        return (await readiness(client, gateway))[1]["checks"]["jwks"][keys.url]["status"] == "stale"

    await eventually(stale)
    status, body = await readiness(client, gateway)
    assert status == 200
    assert body["status"] == "degraded"
    assert body["checks"]["jwks"][keys.url]["keys"] == 3
    for key in (RSA_KEY, EC_KEY, ED_KEY):  # new tokens, so the verified-token memory does not answer
        answer = await fetch(client, gateway.url + "/", mint(key))
        assert answer.status == 200, answer.body
    # A failed endpoint is retried every retry_interval (1h here), not hammered.
    attempts = keys.requests
    await asyncio.sleep(0.5)
    assert keys.requests <= attempts + 1


async def test_a_jwks_endpoint_that_recovers_makes_readiness_ready_again(keys, upstream, start_gateway, client) -> None:
    keys.max_age = 0
    issuer = jwks_issuer(keys.url, jwks={"min_ttl": "100ms", "max_ttl": "100ms", "retry_interval": "100ms"})
    gateway = await start_gateway(auth_config(upstream, issuer))
    keys.failing = "500"

    async def jwks_status(expected: str) -> bool:
        return (await readiness(client, gateway))[1]["checks"]["jwks"][keys.url]["status"] == expected

    await eventually(lambda: jwks_status("stale"))
    keys.failing = None
    await eventually(lambda: jwks_status("fresh"))
    status, body = await readiness(client, gateway)
    assert (status, body["status"]) == (200, "ready")


async def test_a_jwks_endpoint_down_from_the_start_answers_503_and_readiness_is_unready(upstream, start_gateway, client) -> None:
    dead_url = f"http://127.0.0.1:{free_port()}/.well-known/jwks.json"
    gateway = await start_gateway(auth_config(upstream, jwks_issuer(dead_url)))
    for token in (mint(RSA_KEY), mint(RSA_KEY, {"kid": DROP})):
        answer = await fetch(client, gateway.url + "/", token)
        assert_problem(answer.status, answer.headers, answer.body, 503)
        assert "WWW-Authenticate" not in answer.headers  # not the token's fault: the client may retry
        assert answer.headers["Retry-After"]
    assert upstream.requests == []
    status, body = await readiness(client, gateway)
    assert status == 503
    assert body["status"] == "unready"
    assert body["checks"]["jwks"][dead_url]["status"] == "down"


# -- forwarded claims and the Authorization header -----------------------------------------------


async def test_spoofed_forwarded_claim_headers_are_dropped_on_routes_with_and_without_auth(keys, upstream, start_gateway, client) -> None:
    config = auth_config(upstream, jwks_issuer(keys.url, forward_claims={"sub": "X-User-Id", "email": "X-User-Email"}))
    config["routes"].insert(0, {"name": "open", "match": {"path": "/open"}, "upstream": "api"})
    gateway = await start_gateway(config)
    spoofed = {"X-User-Id": "admin", "x-user-email": "ceo@shop.example"}
    assert (await fetch(client, gateway.url + "/open", headers=spoofed)).status == 200
    assert (await fetch(client, gateway.url + "/api", mint(RSA_KEY, sub="alice"), headers=spoofed)).status == 200  # a token without email
    open_request, auth_request = upstream.requests
    assert not {"x-user-id", "x-user-email"} & {name.lower() for name, _ in open_request.header_items}
    assert [(n, v) for n, v in auth_request.header_items if n.lower() in ("x-user-id", "x-user-email")] == [("X-User-Id", "alice")]


async def test_forward_claims_reach_the_upstream_including_lists_nested_claims_and_unsafe_characters(keys, upstream, start_gateway, client) -> None:
    forward = {"sub": "X-User-Id", "email": "X-User-Email", "groups": "X-User-Groups", "realm_access.roles": "X-User-Roles", "name": "X-User-Name"}
    issuer = jwks_issuer(keys.url, forward_claims=forward, roles_claim="realm_access.roles")
    gateway = await start_gateway(auth_config(upstream, issuer, {"required": True, "roles": ["admin"]}))
    token = mint(EC_KEY, sub="u-42", email="a@shop.example", groups=["buyers", "beta"], realm_access={"roles": ["user", "admin"]}, name="Zoë\r\nX-Injected: 1")
    answer = await fetch(client, gateway.url + "/", token)
    assert answer.status == 200, answer.body
    (received,) = upstream.requests
    assert received.headers["X-User-Id"] == "u-42"
    assert received.headers["X-User-Email"] == "a@shop.example"
    assert received.headers["X-User-Groups"] == "buyers,beta"
    assert received.headers["X-User-Roles"] == "user,admin"
    assert received.headers["X-User-Name"] == "Zo%C3%AB%0D%0AX-Injected: 1"
    assert "X-Injected" not in received.headers


async def test_authorization_is_forwarded_by_default(keys, upstream, start_gateway, client) -> None:
    gateway = await start_gateway(auth_config(upstream, jwks_issuer(keys.url)))
    token = mint(RSA_KEY)
    assert (await fetch(client, gateway.url + "/", token)).status == 200
    assert upstream.requests[0].headers["Authorization"] == f"Bearer {token}"


async def test_forward_authorization_false_strips_authorization_before_the_upstream(keys, upstream, start_gateway, client) -> None:
    gateway = await start_gateway(auth_config(upstream, jwks_issuer(keys.url), forward_authorization=False))
    assert (await fetch(client, gateway.url + "/", mint(RSA_KEY))).status == 200
    assert "Authorization" not in upstream.requests[0].headers


# -- roles, scopes and claims: 403 insufficient_scope ---------------------------------------------


async def test_a_token_with_any_one_of_the_routes_roles_passes(keys, upstream, start_gateway, client) -> None:
    gateway = await start_gateway(auth_config(upstream, jwks_issuer(keys.url), {"required": True, "roles": ["admin", "editor"]}))
    assert (await fetch(client, gateway.url + "/", mint(RSA_KEY, roles=["editor"]))).status == 200
    assert (await fetch(client, gateway.url + "/", mint(RSA_KEY, roles="viewer admin"))).status == 200  # a space-separated string
    assert len(upstream.requests) == 2


@pytest.mark.parametrize("roles", [["viewer"], [], DROP, "editorial", {"admin": True}], ids=["other-role", "empty", "no-claim", "substring", "object"])
async def test_a_valid_token_without_the_routes_role_is_a_403_insufficient_scope(roles: Any, keys, upstream, start_gateway, client) -> None:
    gateway = await start_gateway(auth_config(upstream, jwks_issuer(keys.url), {"required": True, "roles": ["admin", "editor"]}))
    document = assert_refused(await fetch(client, gateway.url + "/", mint(RSA_KEY, roles=roles)), 403, INSUFFICIENT_SCOPE, upstream)
    assert document["detail"] == "the access token does not grant access to this resource"


async def test_an_invalid_token_on_a_route_with_roles_is_a_401_not_a_403(keys, upstream, start_gateway, client) -> None:
    gateway = await start_gateway(auth_config(upstream, jwks_issuer(keys.url), {"required": True, "roles": ["admin"]}))
    answer = await fetch(client, gateway.url + "/", mint(RSA_KEY, roles=["admin"], exp=int(time.time()) - 60))
    assert_refused(answer, 401, INVALID_TOKEN, upstream)


async def test_scopes_must_all_be_granted(keys, upstream, start_gateway, client) -> None:
    gateway = await start_gateway(auth_config(upstream, jwks_issuer(keys.url), {"required": True, "scopes": ["orders:read", "orders:write"]}))
    assert (await fetch(client, gateway.url + "/", mint(RSA_KEY, scope="profile orders:write orders:read"))).status == 200
    for scope in ("orders:read", "orders:read,orders:write", DROP):
        answer = await fetch(client, gateway.url + "/", mint(RSA_KEY, scope=scope))
        assert_refused(answer, 403, INSUFFICIENT_SCOPE, upstream, reached_before=1)


async def test_scopes_can_come_from_a_list_claim_such_as_scp(keys, upstream, start_gateway, client) -> None:
    issuer = jwks_issuer(keys.url, scopes_claim="scp")
    gateway = await start_gateway(auth_config(upstream, issuer, {"required": True, "scopes": ["orders:read"]}))
    assert (await fetch(client, gateway.url + "/", mint(RSA_KEY, scp=["orders:read"]))).status == 200
    answer = await fetch(client, gateway.url + "/", mint(RSA_KEY, scope="orders:read"))  # the wrong claim
    assert_refused(answer, 403, INSUFFICIENT_SCOPE, upstream, reached_before=1)


async def test_claims_on_the_route_must_match_exactly(keys, upstream, start_gateway, client) -> None:
    route = {"required": True, "claims": {"tenant": "acme", "email_verified": True}}
    gateway = await start_gateway(auth_config(upstream, jwks_issuer(keys.url), route))
    assert (await fetch(client, gateway.url + "/", mint(RSA_KEY, tenant="acme", email_verified=True))).status == 200
    for overrides in ({"tenant": "acme-evil", "email_verified": True}, {"tenant": "ACME", "email_verified": True}, {"tenant": "acme", "email_verified": False}, {"tenant": "acme", "email_verified": 1}, {"tenant": "acme"}):
        answer = await fetch(client, gateway.url + "/", mint(RSA_KEY, **overrides))
        assert_refused(answer, 403, INSUFFICIENT_SCOPE, upstream, reached_before=1)


# -- where the token comes from --------------------------------------------------------------------


async def test_a_token_in_the_configured_cookie_is_accepted(keys, upstream, start_gateway, client) -> None:
    gateway = await start_gateway(auth_config(upstream, jwks_issuer(keys.url), token={"cookie": "access_token"}))
    answer = await fetch(client, gateway.url + "/", headers={"Cookie": f"theme=dark; access_token={mint(ED_KEY)}"})
    assert answer.status == 200, answer.body
    bad = await fetch(client, gateway.url + "/", headers={"Cookie": f"access_token={mint(ATTACKER_KEY)}"})
    assert_refused(bad, 401, INVALID_TOKEN, upstream, reached_before=1)


async def test_a_token_in_a_cookie_is_ignored_unless_configured(keys, upstream, start_gateway, client) -> None:
    gateway = await start_gateway(auth_config(upstream, jwks_issuer(keys.url)))
    answer = await fetch(client, gateway.url + "/", headers={"Cookie": f"access_token={mint(RSA_KEY)}"})
    assert_refused(answer, 401, 'Bearer realm="gateway"', upstream)


async def test_a_token_in_the_query_is_accepted_and_removed_from_the_forwarded_query(keys, upstream, start_gateway, client) -> None:
    gateway = await start_gateway(auth_config(upstream, jwks_issuer(keys.url), token={"query": "access_token"}))
    token = mint(RSA_KEY)
    answer = await fetch(client, f"{gateway.url}/api/orders?page=2&access_token={token}&sort=desc")
    assert answer.status == 200, answer.body
    assert [r.path for r in upstream.requests] == ["/api/orders?page=2&sort=desc"]
    assert token not in str(upstream.requests[0].header_items)
    bad = await fetch(client, f"{gateway.url}/api/orders?access_token={mint(ATTACKER_KEY)}")
    assert_refused(bad, 401, INVALID_TOKEN, upstream, reached_before=1)


async def test_the_token_parameter_is_never_forwarded_and_the_rest_of_the_query_keeps_its_bytes(keys, upstream, start_gateway, client) -> None:
    gateway = await start_gateway(auth_config(upstream, jwks_issuer(keys.url), token={"query": "access_token"}))
    leaked = mint(RSA_KEY)
    # The header's token wins; the query's copy is removed all the same.
    answer = await fetch(client, f"{gateway.url}/search?q=a%20b&flag&access_token={leaked}&x=1+2", mint(RSA_KEY, sub="header"))
    assert answer.status == 200, answer.body
    assert [r.path for r in upstream.requests] == ["/search?q=a%20b&flag&x=1+2"]


async def test_a_token_in_the_query_is_ignored_unless_configured(keys, upstream, start_gateway, client) -> None:
    gateway = await start_gateway(auth_config(upstream, jwks_issuer(keys.url)))
    answer = await fetch(client, f"{gateway.url}/?access_token={mint(RSA_KEY)}")
    assert_refused(answer, 401, 'Bearer realm="gateway"', upstream)


# -- required: false, several issuers --------------------------------------------------------------


async def test_an_optional_route_lets_anonymous_requests_through_but_refuses_a_bad_token(keys, upstream, start_gateway, client) -> None:
    issuer = jwks_issuer(keys.url, forward_claims={"sub": "X-User-Id"})
    gateway = await start_gateway(auth_config(upstream, issuer, {"required": False}))
    anonymous = await fetch(client, gateway.url + "/", headers={"X-User-Id": "admin"})
    assert anonymous.status == 200
    assert "X-User-Id" not in upstream.requests[0].headers
    assert (await fetch(client, gateway.url + "/", mint(RSA_KEY, sub="bob"))).status == 200
    assert upstream.requests[1].headers["X-User-Id"] == "bob"
    for token in (mint(RSA_KEY, exp=int(time.time()) - 60), "junk"):
        assert_refused(await fetch(client, gateway.url + "/", token), 401, INVALID_TOKEN, upstream, reached_before=2)


async def test_several_issuers_are_chosen_by_the_tokens_iss(keys, key_server_factory, upstream, start_gateway, client) -> None:
    partner_keys = await key_server_factory(RSA_NEXT)
    issuers = [
        jwks_issuer(keys.url, forward_claims={"iss": "X-Issuer"}),
        jwks_issuer(partner_keys.url, issuer=OTHER_ISSUER, audience="partner-api", algorithms=["RS256"], forward_claims={"iss": "X-Issuer"}),
        hs_issuer(issuer="https://internal.example", audience=None),
    ]
    gateway = await start_gateway(auth_config(upstream, issuers))
    accepted = [
        mint(RSA_KEY),
        mint(RSA_NEXT, iss=OTHER_ISSUER, aud="partner-api"),
        mint(HS_KEY, iss="https://internal.example", aud=DROP),
    ]
    for token in accepted:
        answer = await fetch(client, gateway.url + "/", token)
        assert answer.status == 200, answer.body
    assert [r.headers.get("X-Issuer") for r in upstream.requests] == [ISSUER, OTHER_ISSUER, None]
    refused = [
        mint(RSA_KEY, iss="https://unknown.example"),  # no such issuer
        mint(RSA_KEY, iss=OTHER_ISSUER, aud="partner-api"),  # the first issuer's key, the partner's iss
        mint(RSA_NEXT, iss=OTHER_ISSUER),  # the partner's key and iss, the first issuer's audience
        mint(HS_KEY, iss=ISSUER),  # HS256 is not allowed for the JWKS issuer
        mint(EC_KEY, iss=OTHER_ISSUER, aud="partner-api"),  # ES256 is allowed for the first issuer only
    ]
    for token in refused:
        assert_refused(await fetch(client, gateway.url + "/", token), 401, INVALID_TOKEN, upstream, reached_before=3)


async def test_a_route_can_accept_only_some_of_the_issuers(keys, upstream, start_gateway, client) -> None:
    issuers = [jwks_issuer(keys.url), hs_issuer(issuer=OTHER_ISSUER)]
    gateway = await start_gateway(auth_config(upstream, issuers, {"required": True, "issuers": [OTHER_ISSUER]}))
    assert (await fetch(client, gateway.url + "/", mint(HS_KEY, iss=OTHER_ISSUER))).status == 200
    assert_refused(await fetch(client, gateway.url + "/", mint(RSA_KEY)), 401, INVALID_TOKEN, upstream, reached_before=1)


# -- the verified-token memory ---------------------------------------------------------------------


@pytest.mark.parametrize("cache_size", [10000, 0])
async def test_a_verified_token_is_remembered_until_exp_even_after_its_key_is_rotated_out(cache_size: int, keys, upstream, start_gateway, client) -> None:
    gateway = await start_gateway(auth_config(upstream, jwks_issuer(keys.url), cache_size=cache_size))
    remembered = mint(RSA_KEY)
    assert (await fetch(client, gateway.url + "/", remembered)).status == 200
    keys.keys = [public_jwk(RSA_NEXT)]
    assert (await fetch(client, gateway.url + "/", mint(RSA_NEXT))).status == 200  # refetches: rsa-1 is gone
    assert keys.requests == 2
    assert_refused(await fetch(client, gateway.url + "/", mint(RSA_KEY)), 401, INVALID_TOKEN, upstream, reached_before=2)
    again = await fetch(client, gateway.url + "/", remembered)
    if cache_size:
        assert again.status == 200, again.body  # not verified again: answered from memory
    else:
        assert_refused(again, 401, INVALID_TOKEN, upstream, reached_before=2)


async def test_a_remembered_token_still_needs_the_roles_of_each_route(keys, upstream, start_gateway, client) -> None:
    config = auth_config(upstream, jwks_issuer(keys.url))
    config["routes"].insert(0, {"name": "admin", "match": {"path": "/admin"}, "upstream": "api", "auth": {"required": True, "roles": ["admin"]}})
    gateway = await start_gateway(config)
    token = mint(RSA_KEY, roles=["user"])
    assert (await fetch(client, gateway.url + "/shop", token)).status == 200
    assert_refused(await fetch(client, gateway.url + "/admin", token), 403, INSUFFICIENT_SCOPE, upstream, reached_before=1)


async def test_a_remembered_token_is_refused_once_it_expires(keys, upstream, start_gateway, client) -> None:
    gateway = await start_gateway(auth_config(upstream, jwks_issuer(keys.url)))
    token = mint(RSA_KEY, exp=int(time.time()) + 2)
    assert (await fetch(client, gateway.url + "/", token)).status == 200

    async def expired() -> bool:
        return (await fetch(client, gateway.url + "/", token)).status == 401

    await eventually(expired, timeout=10.0)
    assert_refused(await fetch(client, gateway.url + "/", token), 401, INVALID_TOKEN, upstream, reached_before=len(upstream.requests))


# -- config errors ---------------------------------------------------------------------------------


def config_issues(auth: Any, tmp_path: Path) -> dict[str, str]:
    config = base_config("http://127.0.0.1:1")
    config["routes"][0]["auth"] = {"required": True}
    if auth is not None:
        config["auth"] = auth
    with pytest.raises(ConfigError) as caught:
        parse_config(config, str(tmp_path / "gateway.yaml"), tmp_path)
    return {issue.path: issue.message for issue in caught.value.issues}


JWKS_URL = "http://127.0.0.1:1/.well-known/jwks.json"


@pytest.mark.parametrize(
    ("auth", "path", "message"),
    [
        pytest.param({"jwt": {"algorithms": ["RS256", "none"], "jwks_url": JWKS_URL}}, "auth.jwt.algorithms", "'none' is never accepted", id="alg-none"),
        pytest.param({"jwt": [{"issuer": "a", "jwks_url": JWKS_URL}, {"issuer": "b", "algorithms": ["None"], "jwks_url": JWKS_URL}]}, "auth.jwt[1].algorithms", "'none' is never accepted", id="alg-none-in-a-list"),
        pytest.param({"jwt": {"algorithms": ["HS256"], "secret": "0123456789"}}, "auth.jwt", "at least 32 bytes", id="short-secret"),
        pytest.param({"jwt": {"algorithms": ["RS256"], "secret": HS_SECRET}}, "auth.jwt", "a secret verifies HS256/384/512 only", id="secret-with-rs256"),
        pytest.param({"jwt": {"algorithms": ["HS256", "RS256"], "secret": HS_SECRET}}, "auth.jwt", "a secret verifies HS256/384/512 only", id="secret-with-hs256-and-rs256"),
        pytest.param({"jwt": {"algorithms": ["RS256"], "secret": HS_SECRET, "jwks_url": JWKS_URL}}, "auth.jwt", "exactly one of secret", id="secret-and-jwks-url"),
        pytest.param({"jwt": {"algorithms": ["HS256"], "jwks_url": JWKS_URL}}, "auth.jwt", "HS256 need a secret", id="hs256-with-jwks"),
        pytest.param({"jwt": {"algorithms": ["RS256"], "public_key": "ec.pem"}}, "auth.jwt", "cannot verify RS256", id="ec-pem-for-rs256"),
        pytest.param({"jwt": {"algorithms": ["ES384"], "public_key": "ec.pem"}}, "auth.jwt", "cannot verify ES384", id="p256-pem-for-es384"),
        pytest.param({"jwt": {"algorithms": ["RS256"], "public_key": "missing.pem"}}, "auth.jwt", "cannot read public_key", id="missing-pem"),
        pytest.param({"jwt": [{"jwks_url": JWKS_URL}, {"jwks_url": JWKS_URL}]}, "auth", "each needs `issuer`", id="unnamed-issuers"),
        pytest.param({"jwt": {"jwks_url": JWKS_URL, "forward_claims": {"sub": "X User"}}}, "auth.jwt.forward_claims", "header name", id="bad-header-name"),
        pytest.param({"jwt": {"jwks_url": JWKS_URL, "jwks": {"unknown_kid_intervall": "1s"}}}, "auth.jwt.jwks.unknown_kid_intervall", "did you mean 'unknown_kid_interval'", id="misspelt-key"),
        pytest.param(None, "routes[0].auth", "add an auth.jwt block", id="route-auth-without-issuers"),
        pytest.param({"token": {"cookie": "t"}}, "routes[0].auth", "add an auth.jwt block", id="auth-block-without-jwt"),
    ],
)
def test_a_bad_auth_config_is_an_error_at_its_key_path(auth: Any, path: str, message: str, tmp_path: Path) -> None:
    (tmp_path / "ec.pem").write_bytes(EC_KEY.export_to_pem())
    issues = config_issues(auth, tmp_path)
    assert path in issues, issues
    assert message in issues[path]
    # The single-issuer form is not also reported as a failed list (and the other way round).
    assert not any(m.startswith(("expected a list", "expected a mapping")) for m in issues.values()), issues


async def test_the_access_log_names_the_user_and_why_a_token_was_refused(keys, upstream, start_gateway, client) -> None:
    import io
    import json

    from gateway.access_log import AccessLog

    stream = io.StringIO()
    access_log = AccessLog(True, True, stream)
    gateway = await start_gateway(auth_config(upstream, jwks_issuer(keys.url)), access_log=access_log)
    assert (await fetch(client, gateway.url + "/", mint(RSA_KEY, sub="ada"))).status == 200
    assert (await fetch(client, gateway.url + "/", mint(RSA_KEY, exp=int(time.time()) - 600))).status == 401
    access_log.close()
    allowed, refused = (json.loads(line) for line in stream.getvalue().strip().splitlines()[-2:])
    assert allowed["user"] == "ada" and allowed["status"] == 200
    assert refused["user"] is None and refused["status"] == 401 and refused["auth"] == "ExpiredSignatureError"
