"""The policy chain: Exchange, Reply, Policy, Pipeline and the dependency failure modes.

A route runs its policies' request hooks in registry order (gateway.policies.POLICIES); any hook
may answer locally by returning a Reply, which ends the chain. Every response, the upstream's or
a local one, then passes the response hooks in reverse order before it is sent. When a hook
raises DependencyUnavailable, the pipeline (not the policy) applies the policy's failure mode.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Literal, Sequence

from multidict import CIMultiDict

from gateway.errors import DependencyUnavailable, problem_body, problem_headers

if TYPE_CHECKING:
    from aiohttp import web

    from gateway.errors import ConfigIssue
    from gateway.forwarded import Forwarding
    from gateway.routing import Route
    from gateway.stores.base import Store
    from gateway.upstream_http import Response

log = logging.getLogger("gateway")

FailureMode = Literal["open", "closed"]


class Exchange:
    """One request's journey through the gateway: what the policies read and leave behind."""

    __slots__ = (
        "request",
        "request_id",
        "client_ip",
        "method",
        "path",
        "match_path",
        "query",
        "route",
        "forwarding",
        "traceparent",
        "_upstream_headers",
        "subject",
        "started",
        "target",
        "upstream_status",
        "bytes_in",
        "bytes_out",
        "notes",
        "state",
        "trace_id",
        "upstream_ms",
    )

    def __init__(self, request: "web.BaseRequest", request_id: str, client_ip: str, started: float) -> None:
        self.request = request
        self.request_id = request_id
        self.client_ip = client_ip
        self.method = request.method
        self.path = ""  # the normal form of the path: matched on, forwarded
        self.match_path = ""  # its percent-decoded form
        self.query = ""  # the raw query string, forwarded as sent
        self.route: Route | None = None
        self.forwarding: Forwarding | None = None  # builds upstream_headers (set when routed)
        self.traceparent = ""  # sent upstream
        self._upstream_headers: CIMultiDict[str] | None = None
        self.subject: str | None = None  # the authenticated user, set by an auth policy
        self.started = started
        self.target: str | None = None  # the upstream target that answered
        self.upstream_status: int | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.notes: dict[str, Any] = {}  # extra access-log fields left by policies
        self.state: dict[str, Any] = {}  # what a policy's request hook leaves for its response hook
        self.trace_id: str | None = None  # W3C trace id, logged so logs join traces
        self.upstream_ms: float | None = None  # until the upstream's response head

    @property
    def upstream_headers(self) -> CIMultiDict[str]:
        """The request headers to forward, built when first needed (a cache hit or a refusal
        never needs them)."""
        headers = self._upstream_headers
        if headers is None:
            if self.forwarding is None:
                headers = CIMultiDict()
            else:
                headers = self.forwarding.upstream_headers(self.request, self.request.remote, self.request_id)
                headers["traceparent"] = self.traceparent
            self._upstream_headers = headers
        return headers

    @upstream_headers.setter
    def upstream_headers(self, headers: CIMultiDict[str]) -> None:
        self._upstream_headers = headers


@dataclass(slots=True)
class Reply:
    """A response on its way to the client: made locally (body) or streamed from the upstream."""

    status: int
    headers: CIMultiDict[str]
    body: bytes = b""
    upstream: "Response | None" = None


def problem(
    exchange: Exchange,
    status: int,
    detail: str,
    headers: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> Reply:
    """An RFC 9457 problem reply made by the gateway (CONFIG.md, "Errors")."""
    return Reply(status, problem_headers(headers), problem_body(status, detail, exchange.request_id, extra))


@dataclass(frozen=True)
class PolicyContext:
    """What a policy may use besides its settings: shared collaborators, handed in (no globals)."""

    config: Any  # the whole GatewayConfig, for top-level blocks a policy owns
    store: "Store"
    route: str | None = None  # the route the policy serves (None: requests no route took)
    metrics: Any = None  # gateway.metrics.Metrics: the policy's counters
    clock: Callable[[], float] = time.monotonic
    extras: dict[str, Any] = field(default_factory=dict)
    resources: dict[str, Any] = field(default_factory=dict)

    def shared(self, key: str, factory: Callable[[], Any]) -> Any:
        """One object per config generation for every route's policy (a key set, a client).

        The runtime starts each (``await start()``) before serving, asks it for ``readiness()``
        when it has one, and closes it (``await close()``) when the generation retires.
        """
        if key not in self.resources:
            self.resources[key] = factory()
        return self.resources[key]


class Policy:
    """One step of a route's chain, built once from its validated settings.

    Subclasses set ``name`` (the config block) and ``settings_type`` (its model), and override
    one or both hooks; a hook that is not overridden costs nothing per request.
    """

    name: ClassVar[str]
    settings_type: ClassVar[Any]
    failure_mode: FailureMode = "closed"  # when on_request raises DependencyUnavailable
    answers_preflight: ClassVar[bool] = False  # True: routes with this policy take CORS preflights
    runs_after: str | None = None  # set (from settings) to run right after that policy instead
    global_settings_type: ClassVar[Any] = None  # a top-level block of the same name, when the policy has one

    def __init__(self, settings: Any, context: PolicyContext) -> None:
        self.settings = settings
        self.context = context

    @classmethod
    def reserved_request_headers(cls, config: Any) -> tuple[str, ...]:
        """Request headers only this policy may send upstream: client copies are removed on
        every route, whether the policy runs there or not (e.g. the claims auth forwards)."""
        return ()

    @classmethod
    def config_issues(cls, config: Any) -> list["ConfigIssue"]:
        """Checks across blocks once the whole config validated (unknown names, circles)."""
        return []

    async def on_request(self, exchange: Exchange) -> Reply | None:
        """Return None to go on, or a Reply to answer now (a denial, a cache hit).

        Raise DependencyUnavailable only when the policy cannot decide.
        """
        return None

    async def on_upstream(self, exchange: Exchange, reply: Reply) -> None:
        """The upstream's response head has arrived (reply.upstream): a policy may read the body
        into reply.body (setting reply.upstream to None), e.g. to store it, or replace the reply's
        status and headers (a 304 revalidating a stored response). Runs before on_response."""

    async def on_upstream_error(self, exchange: Exchange, error: Exception) -> Reply | None:
        """The upstream failed (502/503/504): return a Reply to answer instead (a stale copy)."""
        return None

    def on_response(self, exchange: Exchange, reply: Reply) -> None:
        """Adjust a response (upstream or local) in place before it is sent."""

    async def close(self) -> None:
        """Release what the policy opened (tasks, sessions); called when its config retires."""


def _overrides(policy: Policy, hook: str) -> bool:
    return getattr(type(policy), hook) is not getattr(Policy, hook)


class Pipeline:
    """A route's policies in order: request hooks forward, response hooks in reverse."""

    __slots__ = ("policies", "answers_preflight", "_request", "_response", "_upstream", "_upstream_error")

    def __init__(self, policies: Sequence[Policy]) -> None:
        ordered = list(policies)
        # The one exception to registry order, decided from settings at load: e.g. rate limits
        # keyed by user must run after auth has found the user.
        for policy in [p for p in ordered if p.runs_after]:
            anchor = next((p for p in ordered if p.name == policy.runs_after), None)
            if anchor is not None:
                ordered.remove(policy)
                ordered.insert(ordered.index(anchor) + 1, policy)
        self.policies = tuple(ordered)
        self.answers_preflight = any(p.answers_preflight for p in self.policies)
        self._request = tuple(p for p in self.policies if _overrides(p, "on_request"))
        self._upstream = tuple(p for p in self.policies if _overrides(p, "on_upstream"))
        self._upstream_error = tuple(p for p in self.policies if _overrides(p, "on_upstream_error"))
        self._response: tuple[Callable[[Exchange, Reply], None], ...] = tuple(
            p.on_response for p in reversed(self.policies) if _overrides(p, "on_response")
        )

    async def on_request(self, exchange: Exchange) -> Reply | None:
        for policy in self._request:
            try:
                reply = await policy.on_request(exchange)
            except DependencyUnavailable as exc:
                reply = self._failed(policy, exchange, exc)
            if reply is not None:
                return reply
        return None

    async def on_upstream(self, exchange: Exchange, reply: Reply) -> None:
        for policy in self._upstream:
            await policy.on_upstream(exchange, reply)

    async def on_upstream_error(self, exchange: Exchange, error: Exception) -> Reply | None:
        for policy in self._upstream_error:
            reply = await policy.on_upstream_error(exchange, error)
            if reply is not None:
                return reply
        return None

    def on_response(self, exchange: Exchange, reply: Reply) -> None:
        for hook in self._response:
            hook(exchange, reply)

    @staticmethod
    def _failed(policy: Policy, exchange: Exchange, exc: DependencyUnavailable) -> Reply | None:
        exchange.notes.setdefault("degraded", []).append(policy.name)
        if policy.failure_mode == "open":
            return None
        return problem(exchange, 503, f"{policy.name} cannot decide right now", {"Retry-After": "1"})

    async def close(self) -> None:
        for policy in self.policies:
            await policy.close()

