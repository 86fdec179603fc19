"""The ``auth`` policy: JWT bearer tokens verified with pyjwt, then roles, scopes and claims.

Per route: ``auth: {required: true, roles: [...], scopes: [...], claims: {...}}``. The issuers
live in the top-level ``auth.jwt`` block: one issuer, or a list of them chosen by the token's
``iss``. Each issuer has its own keys (``secret`` for HS*, ``public_key`` or ``jwks_url`` for
RS/PS/ES/EdDSA), audience, leeway and claim mapping.

Decisions (RFC 8725, JWT best current practices):
- The algorithm comes from the configuration, never from the token: the token's ``alg`` must
  be in its issuer's allow-list, ``none`` cannot be configured, and an issuer has either a
  secret (HS* only) or public keys (asymmetric only), so an HS256 token can never be checked
  against an RSA public key used as an HMAC secret (the classic key-confusion attack).
- The token header's ``jku``, ``x5u``, ``jwk`` and ``x5c`` are never read (see gateway.jwks).
- A failed check answers 401 with ``WWW-Authenticate: Bearer error="invalid_token"`` and a
  detail that says nothing about why (RFC 6750 §3.1); the reason goes to the log and the access
  log. A valid token without the route's roles, scopes or claims answers 403
  ``error="insufficient_scope"``. Keys that cannot be had at all (a JWKS endpoint that never
  answered) fail closed: 503.
- A verified token is remembered, keyed by its SHA-256, until its ``exp`` (bounded LRU), so a
  client repeating its token skips the signature check. Roles, scopes and claims are checked on
  every request, since routes differ.
- ``forward_claims`` header names are reserved: a client's copies are removed on every route,
  with or without auth, so no upstream ever trusts a header a client made up.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections import OrderedDict
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union
from urllib.parse import quote, unquote_plus

import jwt
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from pydantic import Discriminator, Field, Tag, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from gateway.errors import DependencyUnavailable
from gateway.jwks import PUBLIC_KEY_TYPES, JwksKeys, KeyUnavailable, key_fits
from gateway.metrics import UNMATCHED
from gateway.pipeline import Exchange, Policy, PolicyContext, Reply, problem
from gateway.settings import Duration, Settings, Size, header_name

log = logging.getLogger("gateway")

HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
ASYMMETRIC_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
Algorithm = Literal["HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"]
# RFC 7518 §3.2: an HMAC key at least as long as the hash output.
HMAC_MIN_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
REALM = 'Bearer realm="gateway"'
INVALID_TOKEN = f'{REALM}, error="invalid_token"'
INSUFFICIENT_SCOPE = f'{REALM}, error="insufficient_scope"'
# Left as they are in a forwarded claim. "%" is encoded too, so that percent-decoding gives the
# claim back and two claims never forward alike ("caf%C3%A9" and "café").
_PRINTABLE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")
_EDGE_SPACES = re.compile(r"^ +| +$")  # trimmed as OWS by the upstream's parser (RFC 9110 §5.5)


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------


class JwksSettings(Settings):
    min_ttl: Duration = Field(60.0, gt=0, description="keys are kept at least this long, whatever the endpoint's max-age")
    max_ttl: Duration = Field(3600.0, gt=0, description="and refetched at least this often")
    unknown_kid_interval: Duration = Field(30.0, ge=0, description="a token with an unknown kid refetches the set at most once per interval")
    retry_interval: Duration = Field(30.0, gt=0, description="after a failed fetch, try again this often")
    timeout: Duration = Field(5.0, gt=0, description="one fetch of the endpoint")


def _algorithms(value: Any) -> Any:
    if isinstance(value, (list, tuple)) and any(isinstance(a, str) and a.lower() == "none" for a in value):
        raise PydanticCustomError("algorithms", "'none' is never accepted: an unsigned token proves nothing (RFC 8725 §3.1)")
    return value


class IssuerSettings(Settings):
    """One issuer: its keys, the claims it must carry and how they map to roles and headers."""

    issuer: str | None = Field(None, description="the iss claim tokens must carry (required when several issuers are configured)")
    algorithms: tuple[Algorithm, ...] = Field(("RS256",), min_length=1, description="allow-list; 'none' is never accepted")
    secret: str | None = Field(None, description="for HS256/384/512: at least as many bytes as the hash (32/48/64)")
    public_key: str | None = Field(None, description="a PEM file with the public key, relative to the config file")
    jwks_url: str | None = Field(None, description="the issuer's JWKS endpoint, fetched by the gateway", pattern=r"^https?://")
    jwks: JwksSettings = JwksSettings()
    audience: str | tuple[str, ...] | None = Field(None, description="the token's aud must contain one of these")
    leeway: Duration = Field(0.0, ge=0, description="clock skew allowed for exp, nbf and iat")
    required_claims: tuple[str, ...] = Field(("exp",), description="claims a token must have")
    roles_claim: str = Field("roles", description="claim holding roles: a list or a space-separated string; a.b reads nested claims")
    scopes_claim: str = Field("scope", description="claim holding scopes (OAuth 'scope' string or 'scp' list)")
    forward_claims: dict[str, str] = Field({}, description="claim → request header set for the upstream")
    subject_claim: str = Field("sub", description="the claim that names the user (rate limits by user, logs)")

    _public_key: Any = None  # parsed at load

    @field_validator("algorithms", mode="before")
    @classmethod
    def _no_none(cls, value: Any) -> Any:
        return _algorithms(value)

    @field_validator("forward_claims")
    @classmethod
    def _header_names(cls, value: dict[str, str]) -> dict[str, str]:
        for header in value.values():
            header_name(header)
        return value

    @model_validator(mode="after")
    def _keys_fit_algorithms(self, info: ValidationInfo) -> "IssuerSettings":
        sources = [name for name in ("secret", "public_key", "jwks_url") if getattr(self, name)]
        if len(sources) != 1:
            raise PydanticCustomError("keys", "give exactly one of secret (HS*), public_key or jwks_url, got {got}", {"got": ", ".join(sources) or "none"})
        hmac = [a for a in self.algorithms if a in HMAC_ALGORITHMS]
        if self.secret:
            if len(hmac) != len(self.algorithms):
                raise PydanticCustomError("keys", "a secret verifies HS256/384/512 only; for {other} give public_key or jwks_url (a separate issuer block)", {"other": ", ".join(a for a in self.algorithms if a not in hmac)})
            shortest = max(HMAC_MIN_BYTES[a] for a in hmac)
            if len(self.secret.encode()) < shortest:
                raise PydanticCustomError("keys", "the secret must have at least {n} bytes for {algs} (RFC 7518 §3.2)", {"n": shortest, "algs": ", ".join(hmac)})
        elif hmac:
            raise PydanticCustomError("keys", "{algs} need a secret; with public keys only RS/PS/ES/EdDSA can be verified", {"algs": ", ".join(hmac)})
        if self.public_key:
            base = (info.context or {}).get("base_dir") or Path.cwd()
            path = Path(base) / self.public_key
            try:
                key = load_pem_public_key(path.read_bytes())
            except OSError as exc:
                raise PydanticCustomError("keys", "cannot read public_key {path}: {why}", {"path": str(path), "why": exc.strerror or str(exc)})
            except ValueError:
                raise PydanticCustomError("keys", "public_key {path} is not a PEM public key", {"path": str(path)})
            unfit = [a for a in self.algorithms if not key_fits(key, a)]
            if unfit or not isinstance(key, PUBLIC_KEY_TYPES):
                raise PydanticCustomError("keys", "the key in {path} cannot verify {algs}", {"path": str(path), "algs": ", ".join(unfit)})
            self._public_key = key
        return self


class TokenSources(Settings):
    header: bool = Field(True, description="Authorization: Bearer <token>")
    cookie: str | None = Field(None, description="the name of a cookie holding the token")
    query: str | None = Field(None, description="a query parameter holding the token (off by default: URLs end up in logs)")
    max_size: Size = Field(8192, gt=0, description="longer tokens are refused (401) before any parsing")


def _issuer_form(value: Any) -> str:
    return "issuers[many]" if isinstance(value, (list, tuple)) else ("issuers[off]" if value is None else "issuers[one]")


def _any_of(schema: dict[str, Any]) -> None:
    schema["anyOf"] = schema.pop("oneOf")  # the schema stays what it was before the tags


# Tagged by the value's shape, so a bad single issuer is reported once at its key path, not
# also as "auth.jwt: expected a list" (and a bad list not also as "expected a mapping"). The
# tags hold "[" so that config errors leave them out of the key path, as other non-keys.
Issuers = Annotated[
    Union[
        Annotated[IssuerSettings, Tag("issuers[one]")],
        Annotated[tuple[IssuerSettings, ...], Tag("issuers[many]")],
        Annotated[None, Tag("issuers[off]")],
    ],
    Discriminator(_issuer_form),
]


class AuthGlobal(Settings):
    """The top-level ``auth`` block."""

    jwt: Issuers = Field(None, description="one issuer, or a list chosen by the token's iss", json_schema_extra=_any_of)
    token: TokenSources = TokenSources()
    forward_authorization: bool = Field(True, description="send the client's Authorization header on to the upstream")
    cache_size: int = Field(10000, ge=0, description="verified tokens remembered until their exp (0: verify every time)")

    def issuers(self) -> tuple[IssuerSettings, ...]:
        if self.jwt is None:
            return ()
        return self.jwt if isinstance(self.jwt, tuple) else (self.jwt,)

    @model_validator(mode="after")
    def _issuers_named(self) -> "AuthGlobal":
        issuers = self.issuers()
        if len(issuers) > 1:
            names = [i.issuer for i in issuers]
            if None in names:
                raise PydanticCustomError("issuers", "with several issuers, each needs `issuer` (tokens are matched by their iss)")
            if len(set(names)) != len(names):
                raise PydanticCustomError("issuers", "an issuer is listed twice")
        return self


class AuthSettings(Settings):
    """A route's ``auth`` block."""

    required: bool = Field(True, description="false: anonymous requests pass, a token that is present must still be valid")
    roles: tuple[str, ...] = Field((), description="the token needs any one of these roles")
    scopes: tuple[str, ...] = Field((), description="the token needs all of these scopes")
    claims: dict[str, str | int | bool] = Field({}, description="claims that must have exactly these values")
    issuers: tuple[str, ...] | None = Field(None, description="accept tokens of these issuers only (default: any configured)")


# ---------------------------------------------------------------------------------------------
# Verification, shared by every route of a config generation
# ---------------------------------------------------------------------------------------------


class TokenRejected(Exception):
    """The token is missing, malformed, or fails a check; the message is for logs only."""


class Issuer:
    def __init__(self, settings: IssuerSettings, clock: Any) -> None:
        self.settings = settings
        self.algorithms = frozenset(settings.algorithms)
        self.hmac_secret = settings.secret.encode() if settings.secret else None
        self.public_key = settings._public_key
        self.jwks = JwksKeys(settings.jwks_url, settings.jwks, clock) if settings.jwks_url else None
        self.options = {"require": list(settings.required_claims), "verify_aud": settings.audience is not None}
        self.audience = list(settings.audience) if isinstance(settings.audience, tuple) else settings.audience

    async def key_for(self, algorithm: str, kid: str | None) -> Any:
        if self.hmac_secret is not None:
            return self.hmac_secret
        if self.public_key is not None:
            return self.public_key
        assert self.jwks is not None
        try:
            key = await self.jwks.key(kid, algorithm)
        except KeyUnavailable:
            raise DependencyUnavailable(f"no JWKS keys from {self.jwks.url} yet") from None
        if key is None:
            raise TokenRejected("no key for this kid")
        return key


class Verified:
    __slots__ = ("claims", "issuer", "expires")

    def __init__(self, claims: dict[str, Any], issuer: Issuer, expires: float) -> None:
        self.claims = claims
        self.issuer = issuer
        self.expires = expires


class Authenticator:
    """Every configured issuer, their keys and the memory of verified tokens."""

    def __init__(self, settings: AuthGlobal, wall_clock: Any = time.time, clock: Any = time.monotonic, metrics: Any = None) -> None:
        self.settings = settings
        self.wall_clock = wall_clock
        self.issuers = tuple(Issuer(s, clock) for s in settings.issuers())
        self.by_name = {i.settings.issuer: i for i in self.issuers}
        self.single = self.issuers[0] if len(self.issuers) == 1 else None
        self.cache: OrderedDict[bytes, Verified] = OrderedDict()
        if metrics is not None:
            for issuer in self.issuers:
                if issuer.jwks is not None:
                    issuer.jwks.on_fetch = lambda result: metrics.jwks_refreshes.labels(result=result).inc()
                    for result in ("ok", "error"):
                        metrics.jwks_refreshes.labels(result=result)
        self.cache_size = settings.cache_size

    async def start(self) -> None:
        for issuer in self.issuers:
            if issuer.jwks is not None:
                await issuer.jwks.start()

    async def close(self) -> None:
        for issuer in self.issuers:
            if issuer.jwks is not None:
                await issuer.jwks.close()

    def readiness(self) -> tuple[str, dict[str, Any], str]:
        checks = {i.jwks.url: i.jwks.status() for i in self.issuers if i.jwks is not None}
        states = {check["status"] for check in checks.values()}
        level = "unready" if "down" in states else ("degraded" if "stale" in states else "ready")
        return "jwks", checks, level

    async def verify(self, token: str) -> Verified:
        digest = hashlib.sha256(token.encode()).digest()
        now = self.wall_clock()
        remembered = self.cache.get(digest)
        if remembered is not None:
            if remembered.expires > now:
                self.cache.move_to_end(digest)
                return remembered
            del self.cache[digest]
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError as exc:
            raise TokenRejected(f"malformed: {exc}") from None
        algorithm = header.get("alg")
        iss = unverified.get("iss")
        if not isinstance(algorithm, str) or not isinstance(iss, (str, type(None))):
            # A list or object here would be unhashable below: a 401, never a 500.
            raise TokenRejected("alg or iss is not a string")
        issuer = self.single or self.by_name.get(iss)  # type: ignore[arg-type]
        if issuer is None:
            raise TokenRejected("unknown issuer")
        if algorithm not in issuer.algorithms:
            raise TokenRejected(f"algorithm {algorithm!r} not allowed")
        kid = header.get("kid")
        key = await issuer.key_for(algorithm, kid if isinstance(kid, str) else None)
        settings = issuer.settings
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=issuer.audience,
                issuer=settings.issuer,
                leeway=settings.leeway,
                options=issuer.options,  # type: ignore[arg-type]
            )
        except jwt.PyJWTError as exc:
            raise TokenRejected(type(exc).__name__) from None
        verified = Verified(claims, issuer, self._expiry(claims, now))
        if self.cache_size:
            self.cache[digest] = verified
            if len(self.cache) > self.cache_size:
                self.cache.popitem(last=False)
        return verified

    @staticmethod
    def _expiry(claims: dict[str, Any], now: float) -> float:
        exp = claims.get("exp")
        # Without exp a token is remembered briefly, so revocation by key rotation still bites.
        return float(exp) if isinstance(exp, (int, float)) else now + 60.0


def read_claim(claims: dict[str, Any], path: str) -> Any:
    """A claim by name, or a nested one by dotted path (Keycloak's realm_access.roles)."""
    if path in claims:
        return claims[path]
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def as_set(value: Any) -> frozenset[str]:
    """A roles/scopes claim as a set: a space-separated string or a list of strings."""
    if isinstance(value, str):
        return frozenset(value.split())
    if isinstance(value, (list, tuple)):
        return frozenset(str(item) for item in value)
    return frozenset()


def header_value(value: Any) -> str | None:
    """A claim as a request header value: lists comma-joined, nothing that could break a line."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        value = ",".join(str(item) for item in value)
    if not isinstance(value, (str, int, float)):
        return None
    return _EDGE_SPACES.sub(lambda m: "%20" * len(m.group()), quote(str(value), safe=_PRINTABLE))


# The auth_failures_total reasons: a fixed set, whatever a token contains.
_REASONS = {
    "ExpiredSignatureError": "expired",
    "ImmatureSignatureError": "not_yet_valid",
    "InvalidAudienceError": "audience",
    "InvalidIssuerError": "issuer",
    "MissingRequiredClaimError": "missing_claim",
    "InvalidSignatureError": "signature",
    "DecodeError": "malformed",
    "missing": "missing",
    "too large": "too_large",
    "unknown issuer": "issuer",
    "no key for this kid": "unknown_key",
    "missing role": "role",
    "missing scope": "scope",
    "issuer not accepted on this route": "issuer",
}


def reason_label(reason: str) -> str:
    if reason in _REASONS:
        return _REASONS[reason]
    if reason.startswith("malformed"):
        return "malformed"
    if reason.startswith("algorithm"):
        return "algorithm"
    if reason.startswith("claim"):
        return "claim"
    return "invalid"


# ---------------------------------------------------------------------------------------------
# The policy
# ---------------------------------------------------------------------------------------------


class AuthPolicy(Policy):
    """Verifies the route's bearer token and checks its roles, scopes and claims."""

    name = "auth"
    settings_type = AuthSettings
    global_settings_type: ClassVar[Any] = AuthGlobal
    failure_mode = "closed"

    def __init__(self, settings: AuthSettings, context: PolicyContext) -> None:
        super().__init__(settings, context)
        self.global_settings: AuthGlobal = context.config.auth
        self.authenticator: Authenticator = context.shared("auth", lambda: Authenticator(self.global_settings, metrics=context.metrics))
        sources = self.global_settings.token
        self.from_header = sources.header
        self.cookie = sources.cookie
        self.query = sources.query
        self.max_size = sources.max_size
        self.strip_authorization = not self.global_settings.forward_authorization
        self.metrics = context.metrics
        self.route = context.route or UNMATCHED
        if self.metrics is not None:  # every series exists from the start (rate() sees the first)
            for reason in {*_REASONS.values(), "malformed", "algorithm", "claim", "invalid"}:
                self.metrics.auth_failures.labels(route=self.route, reason=reason)
        self.roles = frozenset(settings.roles)
        self.scopes = frozenset(settings.scopes)
        self.claims = tuple(settings.claims.items())
        self.issuers = frozenset(settings.issuers) if settings.issuers is not None else None

    @classmethod
    def reserved_request_headers(cls, config: Any) -> tuple[str, ...]:
        return tuple(header for issuer in config.auth.issuers() for header in issuer.forward_claims.values())

    @classmethod
    def config_issues(cls, config: Any) -> list[Any]:
        from gateway.errors import ConfigIssue

        if config.auth.jwt is not None:
            return []
        blocks = [(f"routes[{i}].auth", r.auth) for i, r in enumerate(config.routes)] + [("defaults.auth", config.defaults.auth)]
        return [ConfigIssue(path, "auth needs issuers: add an auth.jwt block (keys, issuer, audience)") for path, block in blocks if isinstance(block, AuthSettings)]

    async def on_request(self, exchange: Exchange) -> Reply | None:
        token = self._token(exchange)
        if token is None:
            if self.settings.required:
                return self._deny(exchange, 401, "missing", REALM)
            return None
        if len(token) > self.max_size:
            return self._deny(exchange, 401, "too large", INVALID_TOKEN)
        try:
            verified = await self.authenticator.verify(token)
        except TokenRejected as exc:
            return self._deny(exchange, 401, str(exc), INVALID_TOKEN)
        issuer = verified.issuer.settings
        if self.issuers is not None and issuer.issuer not in self.issuers:
            return self._deny(exchange, 401, "issuer not accepted on this route", INVALID_TOKEN)
        claims = verified.claims
        if self.roles and not self.roles & as_set(read_claim(claims, issuer.roles_claim)):
            return self._deny(exchange, 403, "missing role", INSUFFICIENT_SCOPE)
        if self.scopes and not self.scopes <= as_set(read_claim(claims, issuer.scopes_claim)):
            return self._deny(exchange, 403, "missing scope", INSUFFICIENT_SCOPE)
        for name, expected in self.claims:
            value = read_claim(claims, name)
            if type(value) is not type(expected) or value != expected:  # true is not 1
                return self._deny(exchange, 403, f"claim {name} does not match", INSUFFICIENT_SCOPE)
        subject = claims.get(issuer.subject_claim)
        exchange.subject = str(subject) if subject is not None else None
        headers = exchange.upstream_headers
        for claim, header in issuer.forward_claims.items():
            value = header_value(read_claim(claims, claim))
            if value is not None:
                headers[header] = value
        if self.strip_authorization:
            headers.popall("Authorization", None)
        return None

    def _token(self, exchange: Exchange) -> str | None:
        request = exchange.request
        # Taken out of the query first, whichever source wins: it is never forwarded.
        from_query = self._token_from_query(exchange) if self.query is not None and exchange.query else None
        if self.from_header:
            authorization = request.headers.get("Authorization")
            if authorization is not None:
                scheme, _, credentials = authorization.partition(" ")
                if scheme.lower() == "bearer" and credentials.strip():
                    return credentials.strip()
        if self.cookie is not None:
            value = request.cookies.get(self.cookie)
            if value:
                return value
        return from_query

    def _token_from_query(self, exchange: Exchange) -> str | None:
        """The token parameter's value; the parameter is removed from the forwarded query
        (upstream access logs keep URLs), the rest of the query is left byte for byte."""
        token = None
        kept = []
        for part in exchange.query.split("&"):
            name, _, value = part.partition("=")
            if unquote_plus(name) == self.query:
                token = token or unquote_plus(value) or None
            else:
                kept.append(part)
        exchange.query = "&".join(kept)
        return token

    def _deny(self, exchange: Exchange, status: int, reason: str, challenge: str) -> Reply:
        exchange.notes["auth"] = reason
        self.metrics.auth_failures.labels(route=self.route, reason=reason_label(reason)).inc()
        log.info("request refused by auth", extra={"request_id": exchange.request_id, "status": status, "reason": reason})
        detail = "a valid access token is required" if status == 401 else "the access token does not grant access to this resource"
        return problem(exchange, status, detail, {"WWW-Authenticate": challenge})
