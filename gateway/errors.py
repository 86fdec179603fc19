"""The gateway's error tree and its RFC 9457 problem responses.

    GatewayError
    ├── ConfigError            a config file that cannot be served; names file and key paths
    ├── DependencyUnavailable  a store or key server cannot answer; the pipeline applies the
    │                          policy's failure mode (STYLE.md habit 3)
    └── UpstreamError          the upstream could not give a response
        ├── UpstreamConnectError   no connection (after retries)          → 502
        ├── UpstreamTimeout        no response within timeouts.read       → 504
        └── NoHealthyTarget        every target is ejected or unhealthy   → 503 + Retry-After

A *denial* is never an exception: policies return a problem reply built with :func:`problem`.
Problem bodies never carry exception text, stack traces or internal addresses.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from http import HTTPStatus
from json.encoder import encode_basestring_ascii  # type: ignore[attr-defined]
from typing import Any

from multidict import CIMultiDict

PROBLEM_BASE = "https://gateway.dev/problems/"
PROBLEM_CONTENT_TYPE = "application/problem+json"

# The problem `type` slug for each status the gateway answers on its own.
PROBLEM_TYPES = {
    400: "bad-request",
    401: "unauthorized",
    403: "forbidden",
    404: "no-route",
    405: "method-not-allowed",
    408: "request-timeout",
    413: "payload-too-large",
    414: "uri-too-long",
    415: "unsupported-media-type",
    422: "validation-failed",
    429: "rate-limited",
    431: "header-fields-too-large",
    500: "internal-error",
    502: "bad-gateway",
    503: "unavailable",
    504: "gateway-timeout",
    505: "http-version-not-supported",
}


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""


@dataclass(frozen=True)
class ConfigIssue:
    path: str  # key path such as "routes[1].rate_limit[0].window"; "" for the whole file
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ConfigError(GatewayError):
    """A config file that cannot be served. Lists every issue found, each with its key path."""

    def __init__(self, file: str, issues: list[ConfigIssue]) -> None:
        self.file = file
        self.issues = issues
        super().__init__(str(self))

    def __str__(self) -> str:
        if len(self.issues) == 1:
            return f"{self.file}: {self.issues[0]}"
        lines = [f"{self.file}: {len(self.issues)} errors"]
        lines += [f"  {issue}" for issue in self.issues]
        return "\n".join(lines)


class DependencyUnavailable(GatewayError):
    """A shared dependency (store, key server) cannot answer; raised at its boundary."""


class UpstreamError(GatewayError):
    status = 502
    detail = "the upstream could not be reached"


class UpstreamConnectError(UpstreamError):
    status = 502
    detail = "the upstream could not be reached"


class UpstreamTimeout(UpstreamError):
    status = 504
    detail = "the upstream did not answer in time"


class NoHealthyTarget(UpstreamError):
    status = 503
    detail = "no healthy upstream target is available"

    def __init__(self, retry_after: float) -> None:
        super().__init__(self.detail)
        self.retry_after = max(1, math.ceil(retry_after))


def problem_body(status: int, detail: str, request_id: str, extra: dict[str, Any] | None = None) -> bytes:
    if not extra:  # the common case: only the request id differs between two such answers
        return _problem_head(status, detail) + encode_basestring_ascii(request_id).encode() + b"}"
    document = {**_problem_fields(status, detail), "request_id": request_id, **extra}
    return json.dumps(document, separators=(",", ":")).encode()


def _problem_fields(status: int, detail: str) -> dict[str, Any]:
    return {"type": PROBLEM_BASE + PROBLEM_TYPES.get(status, "error"), "title": HTTPStatus(status).phrase, "status": status, "detail": detail}


@functools.lru_cache(maxsize=512)
def _problem_head(status: int, detail: str) -> bytes:
    """problem_body's bytes up to the request id's value, as json.dumps writes them."""
    return json.dumps(_problem_fields(status, detail), separators=(",", ":")).encode()[:-1] + b',"request_id":'


def problem_headers(extra: dict[str, str] | None = None) -> CIMultiDict[str]:
    headers: CIMultiDict[str] = CIMultiDict({"Content-Type": PROBLEM_CONTENT_TYPE, "Cache-Control": "no-store"})
    if extra:
        headers.update(extra)
    return headers
