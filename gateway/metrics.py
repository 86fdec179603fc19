"""Prometheus metrics: one registry per gateway (never the global default), served on the admin
listener at /metrics (never on the public port).

With ``workers > 1`` every worker writes its samples to files in PROMETHEUS_MULTIPROC_DIR (the
supervisor makes an empty one before forking) and a scrape, whichever worker answers it, reads
them all (prometheus-client's multiprocess mode), so one scrape sees the whole gateway.

Labels stay bounded whatever clients send: ``route`` is a route's name or ``(unmatched)``, never
a path; ``method`` is one of the standard methods or ``OTHER``; ``limit`` and ``reason`` come
from the config or a fixed list.
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, values
from prometheus_client.multiprocess import MultiProcessCollector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
UNMATCHED = "(unmatched)"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"})
# From a cache hit on loopback (~0.2 ms) to a slow upstream (tens of seconds).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
REDIS_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)
SIZE_BUCKETS = (256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216)


def method_label(method: str) -> str:
    return method if method in METHODS else "OTHER"


class Metrics:
    """Every metric the gateway exports, made once per process."""

    def __init__(self, version: str = "") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.multiprocess = bool(os.environ.get(MULTIPROC_ENV))
        if self.multiprocess:
            # prometheus-client picks file-backed values when it is imported; the supervisor sets
            # the directory later than that, so pick again (metrics look the class up when made).
            values.ValueClass = values.get_value_class()
        r = self.registry
        # Gauges in multiprocess mode need a rule for combining the workers' values.
        live_sum: dict[str, Any] = {"multiprocess_mode": "livesum"} if self.multiprocess else {}
        live_max: dict[str, Any] = {"multiprocess_mode": "livemax"} if self.multiprocess else {}

        self.request_duration = Histogram(
            "http_request_duration_seconds", "Time from the request head to the end of the response.",
            ("method", "route", "status_code"), buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.in_flight = Gauge("http_requests_in_flight", "Requests being served.", registry=r, **live_sum)
        self.request_bytes = Histogram("http_request_body_bytes", "Request body bytes read from clients.", ("route",), buckets=SIZE_BUCKETS, registry=r)
        self.response_bytes = Histogram("http_response_body_bytes", "Response body bytes sent to clients.", ("route",), buckets=SIZE_BUCKETS, registry=r)
        self.upstream_duration = Histogram(
            "upstream_request_duration_seconds", "Time until the upstream's response head, per target.",
            ("upstream", "target", "status_code"), buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.target_up = Gauge("upstream_target_up", "1 when the target takes requests, 0 when down or ejected.", ("upstream", "target"), registry=r, **live_max)
        self.rate_limit_decisions = Counter(
            "rate_limit_decisions", "Rate-limit decisions: allowed, denied, dry_run (would have been denied).",
            ("route", "limit", "decision"), registry=r,
        )  # fmt: skip
        self.store_fallback = Counter(
            "store_fallback_decisions", "Decisions made without the shared store, by on_failure mode (memory, allow, deny).",
            ("mode",), registry=r,
        )  # fmt: skip
        self.redis_up = Gauge("redis_up", "1 when the last Redis call succeeded (circuit closed), 0 otherwise.", registry=r, **live_max)
        self.redis_circuit_transitions = Counter("redis_circuit_transitions", "Circuit breaker transitions towards Redis.", ("state",), registry=r)
        self.redis_duration = Histogram("redis_command_duration_seconds", "Redis calls as the gateway sees them.", ("command",), buckets=REDIS_BUCKETS, registry=r)
        self.auth_failures = Counter("auth_failures", "Requests refused by auth.", ("route", "reason"), registry=r)
        self.cache_requests = Counter(
            "cache_requests", "Requests on cached routes by result: hit, stale (served stale), miss, bypass. Hit ratio: hit / all.",
            ("route", "result"), registry=r,
        )  # fmt: skip
        self.sanitize_rejections = Counter("sanitize_rejections", "Requests refused by sanitize (mode: reject).", ("route", "reason"), registry=r)
        self.validation_failures = Counter(
            "validation_failures", "Requests refused by validate, by the first failed rule (or body: too_large, content_type, malformed).",
            ("route", "reason"), registry=r,
        )  # fmt: skip
        self.jwks_refreshes = Counter("jwks_refreshes", "JWKS fetches by result.", ("result",), registry=r)
        self.config_reloads = Counter("config_reloads", "Config reloads by result.", ("result",), registry=r)
        self.build_info = Gauge("gateway_build_info", "The running gateway's version.", ("version",), registry=r, **live_max)
        self.build_info.labels(version=version or "unknown").set(1)
        # labels() costs a lock and a dict build per call: the children of the per-request
        # metrics are looked up once per label set (all bounded, see above) and kept.
        self._answered: dict[tuple[str, str, int], tuple[Any, Any, Any]] = {}
        self._upstream: dict[tuple[str, str, str], Any] = {}
        self._redis: dict[str, Any] = {}

    def answered(self, method: str, route: str, status: int, seconds: float, bytes_in: int, bytes_out: int) -> None:
        """One request answered: its duration and body sizes."""
        key = (method_label(method), route, status)
        children = self._answered.get(key)
        if children is None:
            children = self._answered[key] = (
                self.request_duration.labels(method=key[0], route=route, status_code=str(status)),
                self.request_bytes.labels(route=route),
                self.response_bytes.labels(route=route),
            )
        duration, request_bytes, response_bytes = children
        duration.observe(seconds)
        request_bytes.observe(bytes_in)
        response_bytes.observe(bytes_out)

    def upstream_answered(self, upstream: str, target: str, outcome: str, seconds: float) -> None:
        """One upstream attempt: the time until its response head (or its failure)."""
        key = (upstream, target, outcome)
        child = self._upstream.get(key)
        if child is None:
            child = self._upstream[key] = self.upstream_duration.labels(upstream=upstream, target=target, status_code=outcome)
        child.observe(seconds)

    def redis_called(self, command: str, seconds: float) -> None:
        """One Redis call (or pipeline of decisions), as the gateway saw it."""
        child = self._redis.get(command)
        if child is None:
            child = self._redis[command] = self.redis_duration.labels(command=command)
        child.observe(seconds)

    def exposition(self) -> bytes:
        """The text format of every metric; in multiprocess mode, of every worker together."""
        if self.multiprocess:
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)
