"""Verification keys of one JWT issuer: a shared secret, a PEM public key, or a JWKS endpoint.

The JWKS endpoint is fetched with the gateway's own aiohttp client (never pyjwt's blocking
urllib client), at start and then in the background, each time after the endpoint's
``Cache-Control: max-age`` bounded by ``jwks.min_ttl``/``max_ttl``. A ``kid`` the set does not
have triggers at most one refetch per ``jwks.unknown_kid_interval``, shared by every request
waiting for it, so a flood of made-up kids costs the issuer one request per interval. When the
endpoint fails, the last good keys keep serving and readiness reports them stale.

Keys are chosen by the configuration only: the token header's ``jku``, ``x5u``, ``jwk`` and
``x5c`` are never read (RFC 8725 §3.10: fetching keys named by the token lets an attacker sign
with their own).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from datetime import datetime, timezone
from typing import Any, Callable

import aiohttp
import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

log = logging.getLogger("gateway")

MAX_JWKS_BYTES = 1024 * 1024
_MAX_AGE = re.compile(r"(?:^|,)\s*max-age\s*=\s*\"?(\d+)", re.IGNORECASE)

# The key type (and curve) each algorithm may be verified with (RFC 7518 §3, RFC 8037).
KEY_TYPES: dict[str, tuple[type, ...]] = {
    **{f"RS{n}": (rsa.RSAPublicKey,) for n in (256, 384, 512)},
    **{f"PS{n}": (rsa.RSAPublicKey,) for n in (256, 384, 512)},
    "ES256": (ec.EllipticCurvePublicKey,),
    "ES384": (ec.EllipticCurvePublicKey,),
    "ES512": (ec.EllipticCurvePublicKey,),
    "EdDSA": (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey),
}
CURVES = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1"}
PUBLIC_KEY_TYPES = tuple({t for types in KEY_TYPES.values() for t in types})


def key_fits(key: Any, algorithm: str) -> bool:
    """Whether a public key may verify a token signed with ``algorithm`` (never HS*: see auth)."""
    types = KEY_TYPES.get(algorithm)
    if types is None or not isinstance(key, types):
        return False
    curve = CURVES.get(algorithm)
    return curve is None or key.curve.name == curve


def _now_iso(wall: float) -> str:
    return datetime.fromtimestamp(wall, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


class KeyUnavailable(Exception):
    """No key could be had for a token right now (the JWKS endpoint has never answered)."""


class JwksKeys:
    """A JWKS endpoint's keys, kept fresh in the background."""

    def __init__(
        self,
        url: str,
        settings: Any,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.settings = settings
        self.clock = clock
        self.keys: dict[str | None, tuple[Any, str | None]] = {}  # kid → (public key, its "alg" member)
        self.fetched_at: float | None = None  # monotonic time of the last good fetch
        self.fetched_wall: float | None = None
        self.expires_at = 0.0  # when the keys are due for a refresh
        self.last_error: str | None = None
        self.fetches = 0  # requests made to the endpoint (for tests and metrics)
        self.on_fetch: Callable[[str], None] | None = None  # called with "ok" or "error", e.g. a metric
        self._last_unknown_kid_fetch = -float("inf")
        self._inflight: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._refresher: asyncio.Task[None] | None = None

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.settings.timeout),
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        await self.refresh()
        self._refresher = asyncio.create_task(self._refresh_loop())

    async def close(self) -> None:
        for task in (self._refresher, self._inflight):
            if task is not None:
                task.cancel()
                try:
                    await task
                except (asyncio.CancelledError, Exception):
                    pass
        if self._session is not None:
            await self._session.close()

    async def _refresh_loop(self) -> None:
        while True:
            wait = self.expires_at - self.clock()
            if self.fetched_at is None or self.last_error is not None:
                # The keys are past due (or never came): expires_at lies behind, so without this
                # a failing endpoint would be asked again every 50ms instead of every retry_interval.
                wait = self.settings.retry_interval
            await asyncio.sleep(max(wait, 0.05))
            await self.refresh()

    # -- fetching --------------------------------------------------------------------------

    async def refresh(self) -> None:
        """Fetch once; concurrent callers share the same request."""
        if self._inflight is None or self._inflight.done():
            self._inflight = asyncio.create_task(self._fetch())
        await asyncio.shield(self._inflight)

    async def _fetch(self) -> None:
        assert self._session is not None
        self.fetches += 1
        try:
            async with self._session.get(self.url, allow_redirects=False) as response:
                if response.status != 200:
                    raise ValueError(f"HTTP {response.status}")
                # content.read(n) returns what has arrived so far, not the whole body: a chunked
                # or slow answer would be cut short. Read to the end, bounded.
                body = bytearray()
                async for chunk in response.content.iter_chunked(64 * 1024):
                    body += chunk
                    if len(body) > MAX_JWKS_BYTES:
                        raise ValueError("the key set is larger than 1 MiB")
                keys = self._parse(bytes(body))
                ttl = self._ttl(response.headers.get("Cache-Control", ""))
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            reason = str(exc) or type(exc).__name__
            if self.last_error is None:  # one line per transition, not per attempt
                log.warning("JWKS fetch failed; the last good keys keep serving", extra={"url": self.url, "error": reason})
            self.last_error = reason
            if self.on_fetch is not None:
                self.on_fetch("error")
            return
        if self.last_error is not None and self.fetched_at is not None:
            log.info("JWKS fetch recovered", extra={"url": self.url})
        self.keys = keys
        if self.on_fetch is not None:
            self.on_fetch("ok")
        self.last_error = None
        self.fetched_at = self.clock()
        self.fetched_wall = time.time()
        self.expires_at = self.fetched_at + ttl

    def _parse(self, body: bytes) -> dict[str | None, tuple[Any, str | None]]:
        try:
            document = json.loads(body)
            entries = document["keys"]
            assert isinstance(entries, list)
        except (ValueError, KeyError, TypeError, AssertionError, RecursionError):
            raise ValueError("not a JWKS document (a JSON object with a 'keys' list)") from None
        keys: dict[str | None, tuple[Any, str | None]] = {}
        for data in entries:
            if not isinstance(data, dict) or data.get("use") not in (None, "sig"):
                continue  # an encryption key must not verify signatures (RFC 7517 §4.2)
            try:
                key = jwt.PyJWK(data).key
            except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError, KeyError):
                continue  # one unusable key does not spoil the set
            if not isinstance(key, PUBLIC_KEY_TYPES):
                continue  # private, symmetric ("oct") or unknown keys never verify here
            kid = data.get("kid")
            keys[kid if isinstance(kid, str) else None] = (key, data.get("alg"))
        if entries and not keys:
            raise ValueError("the key set has no usable signature key")
        return keys

    def _ttl(self, cache_control: str) -> float:
        match = _MAX_AGE.search(cache_control)
        max_age = float(match.group(1)) if match else self.settings.max_ttl
        return min(max(max_age, self.settings.min_ttl), self.settings.max_ttl)

    # -- lookup ----------------------------------------------------------------------------

    async def key(self, kid: str | None, algorithm: str) -> Any | None:
        """The public key for a token's kid and alg, or None when there is none that fits.

        An unknown kid refetches the set at most once per unknown_kid_interval. Raises
        KeyUnavailable when the endpoint has never answered (the gateway cannot decide).
        """
        found = self._lookup(kid, algorithm)
        if found is not None:
            return found
        now = self.clock()
        # A kid the set lacks (or no kid, with no single fitting key) may mean the issuer rotated.
        # A known kid whose key does not fit the algorithm is refused without asking again.
        unknown = kid is None or kid not in self.keys
        if unknown and now - self._last_unknown_kid_fetch >= self.settings.unknown_kid_interval:
            self._last_unknown_kid_fetch = now
            await self.refresh()
            found = self._lookup(kid, algorithm)
        elif self._inflight is not None and not self._inflight.done():
            await asyncio.shield(self._inflight)  # a refetch is on its way: its answer counts
            found = self._lookup(kid, algorithm)
        if found is None and self.fetched_at is None:
            raise KeyUnavailable(self.url)
        return found

    def _lookup(self, kid: str | None, algorithm: str) -> Any | None:
        if kid is None:
            # No kid: usable only when exactly one key of the set fits the algorithm.
            fitting = [key for key, alg in self.keys.values() if key_fits(key, algorithm) and alg in (None, algorithm)]
            return fitting[0] if len(fitting) == 1 else None
        entry = self.keys.get(kid)
        if entry is None:
            return None
        key, alg = entry
        if alg not in (None, algorithm) or not key_fits(key, algorithm):
            return None  # the set says which algorithm a key is for (RFC 7517 §4.4)
        return key

    # -- readiness -------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        if self.fetched_at is None:
            state = "down"
        elif self.last_error is not None or self.clock() > self.expires_at + self.settings.retry_interval:
            state = "stale"
        else:
            state = "fresh"
        check: dict[str, Any] = {"status": state, "url": self.url, "keys": len(self.keys)}
        if self.fetched_wall is not None:
            check["fetched_at"] = _now_iso(self.fetched_wall)
        if self.last_error is not None:
            check["error"] = self.last_error
        return check
