"""The ``rate_limit`` policy: a list of limits per route, decided together in one store call.

``rate_limit: [{key: ip, limit: 100, window: 15m}, {key: user, limit: 1000, window: 1m,
algorithm: sliding_window}]``. What express-rate-limit with rate-limit-redis does, plus what
Kong, Envoy's ratelimit service and nginx limit_req users expect:

- Keys: ``ip`` (the client address after listen.trusted_proxies), ``user`` (the JWT subject, or
  the ip when anonymous), ``header:<Name>`` (the ip when the header is absent), ``route`` (one
  counter for the route), ``global`` (one counter for every route that has this limit).
  Addresses in ``allow`` are never limited.
- Algorithms: gateway.stores.algorithms (fixed_window, sliding_window, token_bucket/GCRA), the
  same in the memory store and in Redis (Lua).
- One decision per request: every limit of the route goes to the store in one call (one EVALSHA
  on Redis), atomically; a denied request consumes none of the limits. The keys of a decision share
  a hash tag (Redis Cluster): the client's identity when every limit counts the same identity,
  else the route, or ``global`` when a global limit is among them.
- A key that is over its limit is remembered in the process until it may pass again, so a flood
  from one client costs no store round trips.
- When the store fails (Redis down, slow, circuit open), ``redis.on_failure`` decides: ``memory``
  enforces the same limits per process, ``allow`` lets requests through, ``deny`` answers 503.
  Never a 5xx under memory or allow.
- Answers: 429 problem with Retry-After; the IETF RateLimit headers (draft-6, -7 or -8, as
  express-rate-limit writes them) and optionally X-RateLimit-*, describing the limit closest to
  exhaustion. ``dry_run`` counts and logs would-be denials but lets the request through.
- Limits keyed by user run right after auth (which finds the user); the others before it, so a
  flood of bad tokens is cut off before any signature is checked.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import logging
import math
import re
import time
from collections import OrderedDict
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from gateway.errors import DependencyUnavailable
from gateway.forwarded import in_networks
from gateway.metrics import UNMATCHED
from gateway.pipeline import Exchange, Policy, PolicyContext, Reply, problem
from gateway.settings import Duration, Network, Settings
from gateway.stores import Hit, MemoryStore, Outcome
from gateway.stores.algorithms import keys_for

log = logging.getLogger("gateway")

KEY = re.compile(r"^(ip|user|route|global|header:[!#$%&'*+.^_`|~0-9A-Za-z-]+)$")
REMEMBERED_DENIALS = 100_000  # over-limit keys remembered per policy (bounded LRU)
MAX_IDENTITY = 128  # longer header values are hashed into the key


def duration_words(seconds: float) -> str:
    """express-rate-limit's policy name for a window: 15min, 1hr, 2days, 30sec."""
    if seconds < 60:
        return f"{seconds:g}sec"
    if seconds < 3600:
        return f"{seconds / 60:g}min"
    if seconds < 86400:
        hours = seconds / 3600
        return f"{hours:g}hr{'s' if hours > 1 else ''}"
    days = seconds / 86400
    return f"{days:g}day{'s' if days > 1 else ''}"


class LimitSettings(Settings):
    """One limit of a route's ``rate_limit`` list."""

    key: str = Field("ip", description="ip | user | route | global | header:<Name>")
    limit: int = Field(gt=0, description="requests per window")
    window: Duration = Field(gt=0, description="e.g. 1s, 1m, 15m")
    algorithm: Literal["fixed_window", "sliding_window", "token_bucket"] = "fixed_window"
    burst: int | None = Field(None, gt=0, description="token_bucket: requests allowed at once (default: the limit)")
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9._:-]+$", description="shown in headers, logs and metrics (default: ip-100-in-15min)")
    standard_headers: Literal["draft-6", "draft-7", "draft-8", False] = "draft-8"
    legacy_headers: bool = Field(False, description="also X-RateLimit-Limit/-Remaining/-Reset")
    dry_run: bool = Field(False, description="count and log would-be denials, add the headers, but let requests through")
    allow: tuple[Network, ...] = Field((), description="client addresses (CIDRs) this limit never applies to")
    message: str | None = Field(None, description="the 429's detail instead of the default")

    @field_validator("key")
    @classmethod
    def _key(cls, value: str) -> str:
        if not KEY.match(value):
            raise PydanticCustomError("key", "expected ip, user, route, global or header:<Name>, got {got}", {"got": repr(value)})
        return value

    @field_validator("window")
    @classmethod
    def _whole_ms(cls, value: float) -> float:
        if value < 0.001:
            raise PydanticCustomError("window", "expected a window of at least 1ms, got {got}", {"got": value})
        return value

    @model_validator(mode="after")
    def _burst_for_buckets(self) -> "LimitSettings":
        if self.burst is not None and self.algorithm != "token_bucket":
            raise PydanticCustomError("burst", "burst applies to algorithm: token_bucket only")
        return self

    def label(self) -> str:
        return self.name or f"{self.key.replace(':', '-')}-{self.limit}-in-{duration_words(self.window)}"


def _unique_names(value: tuple[LimitSettings, ...]) -> tuple[LimitSettings, ...]:
    seen: set[str] = set()
    for limit in value:
        if limit.label() in seen:
            raise PydanticCustomError("names", "two limits are both named {name}: give one a `name`", {"name": repr(limit.label())})
        seen.add(limit.label())
    return value


class Limit:
    """One configured limit, with everything per-request work needs precomputed."""

    def __init__(self, settings: LimitSettings, route: str | None) -> None:
        self.settings = settings
        self.label = settings.label()
        self.kind, _, self.header = settings.key.partition(":")
        self.window_ms = max(int(round(settings.window * 1000)), 1)
        self.window_s = math.ceil(settings.window)
        self.burst = settings.burst or 0
        self.allow = settings.allow
        self.route = route or UNMATCHED
        self.scope = "*" if self.kind == "global" else self.route  # in the store key
        self.draft = settings.standard_headers
        self.detail = settings.message or f"limit of {settings.limit} per {duration_words(settings.window)} for {settings.key} exceeded"

    def identity(self, exchange: Exchange) -> str | None:
        """Who this request counts as; None when the limit does not apply (allow list)."""
        if self.allow and in_networks(exchange.client_ip, self.allow):
            return None
        if self.kind == "ip":
            return f"ip:{exchange.client_ip}"
        if self.kind == "user":
            return f"user:{exchange.subject}" if exchange.subject is not None else f"ip:{exchange.client_ip}"
        if self.kind == "header":
            value = exchange.request.headers.get(self.header)
            if value is None:
                return f"ip:{exchange.client_ip}"
            if len(value) > MAX_IDENTITY:
                value = hashlib.sha256(value.encode("utf-8", "surrogateescape")).hexdigest()
            return f"h:{value}"
        return "-"  # route, global


@functools.lru_cache(maxsize=4096)  # a flooding client's key comes again and again
def partition_key(key: str) -> str:
    """express-rate-limit's draft-8 pk: base64 of the first 12 hex digits of the key's SHA-256."""
    return base64.b64encode(hashlib.sha256(key.encode()).hexdigest()[:12].encode()).decode()


class RateLimitPolicy(Policy):
    """Decides the route's limits; 429 when one is exceeded (see the module doc)."""

    name = "rate_limit"
    settings_type = Annotated[tuple[LimitSettings, ...], Field(min_length=1), AfterValidator(_unique_names)]
    failure_mode = "open"  # the policy applies redis.on_failure itself

    def __init__(self, settings: tuple[LimitSettings, ...], context: PolicyContext) -> None:
        super().__init__(settings, context)
        self.limits = tuple(Limit(limit, context.route) for limit in settings)
        self.kinds = {limit.kind for limit in self.limits}
        if "user" in self.kinds:
            self.runs_after = "auth"
        redis = context.config.redis
        self.on_failure = redis.on_failure if redis is not None else "memory"
        self.store = context.store
        self.metrics = context.metrics
        self.fallback: MemoryStore = context.shared("rate_limit_fallback", FallbackStore)
        self.wall_ms = lambda: int(time.time() * 1000)
        self.denied: OrderedDict[str, int] = OrderedDict()  # key → until (ms): over the limit
        # Every series exists from the start (rate() sees the first), looked up once here.
        self.decisions = {
            (limit, decision): self.metrics.rate_limit_decisions.labels(route=limit.route, limit=limit.label, decision=decision)
            for limit in self.limits
            for decision in ("allowed", "denied", "dry_run")
        }
        self.metrics.store_fallback.labels(mode=self.on_failure)

    async def on_request(self, exchange: Exchange) -> Reply | None:
        now = self.wall_ms()
        applied: list[tuple[Limit, str]] = []
        for limit in self.limits:
            identity = limit.identity(exchange)
            if identity is not None:
                applied.append((limit, identity))
        if not applied:
            return None
        tag = self._tag(applied)
        bases = [f"rl:{{{tag}}}:{limit.scope}:{limit.label}:{identity}" for limit, identity in applied]
        outcomes = self._remembered(bases, now)
        if outcomes is None:
            hits = [
                Hit(limit.settings.algorithm, keys_for(limit.settings.algorithm, base, limit.window_ms, now), limit.settings.limit, limit.window_ms, limit.burst)
                for (limit, _), base in zip(applied, bases)
            ]
            try:
                outcomes = await self.store.hit(hits, now)
            except DependencyUnavailable:
                exchange.notes["rate_limit_store"] = self.on_failure
                self.metrics.store_fallback.labels(mode=self.on_failure).inc()
                if self.on_failure == "allow":
                    return None
                if self.on_failure == "deny":
                    return problem(exchange, 503, "the rate limit cannot be decided right now", {"Retry-After": "1"})
                outcomes = await self.fallback.hit(hits, now)
        return self._answer(exchange, applied, bases, outcomes, now)

    def _tag(self, applied: list[tuple[Limit, str]]) -> str:
        if "global" in self.kinds:
            return "global"
        identities = {identity for _, identity in applied}
        scope = applied[0][0].scope
        return f"{scope}|{identities.pop()}" if len(identities) == 1 and "route" not in self.kinds else scope

    def _remembered(self, bases: list[str], now: int) -> list[Outcome] | None:
        """Outcomes without asking the store, when a key is known to be over its limit."""
        for index, base in enumerate(bases):
            until = self.denied.get(base)
            if until is None:
                continue
            if until <= now:
                del self.denied[base]
                continue
            outcomes = [Outcome(True, 0, 0, 0)] * len(bases)
            outcomes[index] = Outcome(False, 0, until - now, until - now)
            return outcomes
        return None

    def _answer(self, exchange: Exchange, applied: list[tuple[Limit, str]], bases: list[str], outcomes: list[Outcome], now: int) -> Reply | None:
        denied = [i for i, outcome in enumerate(outcomes) if not outcome.allowed]
        for (limit, _), outcome in zip(applied, outcomes):
            decision = "allowed" if outcome.allowed else ("dry_run" if limit.settings.dry_run else "denied")
            self.decisions[limit, decision].inc()
        if denied:
            chosen = max(denied, key=lambda i: outcomes[i].retry_ms)
        else:
            chosen = min(range(len(outcomes)), key=lambda i: (outcomes[i].remaining / applied[i][0].settings.limit, outcomes[i].reset_ms))
        limit, outcome = applied[chosen][0], outcomes[chosen]
        headers = self._headers(limit, outcome, bases[chosen], now)
        if not denied:
            exchange.state["rate_limit"] = headers
            return None
        for i in denied:
            if outcomes[i].retry_ms > 0 and not applied[i][0].settings.dry_run:
                self._remember(bases[i], now + outcomes[i].retry_ms)
        if all(applied[i][0].settings.dry_run for i in denied):
            exchange.notes["rate_limit"] = f"dry_run:{limit.label}"
            log.info("rate limit exceeded (dry run)", extra={"request_id": exchange.request_id, "limit": limit.label, "route": limit.scope})
            exchange.state["rate_limit"] = headers
            return None
        exchange.notes["rate_limit"] = f"denied:{limit.label}"
        headers["Retry-After"] = str(max(math.ceil(outcome.retry_ms / 1000), 1))
        reply = problem(exchange, 429, limit.detail, headers)
        return reply

    def _remember(self, base: str, until: int) -> None:
        self.denied[base] = until
        self.denied.move_to_end(base)
        if len(self.denied) > REMEMBERED_DENIALS:
            self.denied.popitem(last=False)

    @staticmethod
    def _headers(limit: Limit, outcome: Outcome, key: str, now: int) -> dict[str, str]:
        reset = max(math.ceil(outcome.reset_ms / 1000), 0)
        quota = limit.settings.limit
        headers: dict[str, str] = {}
        if limit.draft == "draft-6":
            headers["RateLimit-Policy"] = f"{quota};w={limit.window_s}"
            headers["RateLimit-Limit"] = str(quota)
            headers["RateLimit-Remaining"] = str(outcome.remaining)
            headers["RateLimit-Reset"] = str(reset)
        elif limit.draft == "draft-7":
            headers["RateLimit-Policy"] = f"{quota};w={limit.window_s}"
            headers["RateLimit"] = f"limit={quota}, remaining={outcome.remaining}, reset={reset}"
        elif limit.draft == "draft-8":
            headers["RateLimit-Policy"] = f'"{limit.label}"; q={quota}; w={limit.window_s}; pk=:{partition_key(key)}:'
            headers["RateLimit"] = f'"{limit.label}"; r={outcome.remaining}; t={reset}'
        if limit.settings.legacy_headers:
            headers["X-RateLimit-Limit"] = str(quota)
            headers["X-RateLimit-Remaining"] = str(outcome.remaining)
            headers["X-RateLimit-Reset"] = str(math.ceil((now + outcome.reset_ms) / 1000))
        return headers

    def on_response(self, exchange: Exchange, reply: Reply) -> None:
        headers = exchange.state.get("rate_limit")
        if headers:
            reply.headers.update(headers)


class FallbackStore(MemoryStore):
    """The per-process limits that serve while Redis is down (redis.on_failure: memory)."""

    async def start(self) -> None:
        pass
