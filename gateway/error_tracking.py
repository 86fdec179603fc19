"""Optional error tracking with Sentry: unexpected exceptions only, tagged, with secrets scrubbed.

Off unless ``error_tracking.sentry_dsn`` is set; sentry-sdk is not even imported then. What is
sent: exceptions that reached the gateway's error boundary (the 500s), never the expected 4xx
answers. Each event carries the request id, route, upstream and the JWT subject, and the request's
method, path and headers with Authorization, Cookie, Set-Cookie, the forwarded-claim headers and
the configured ``scrub_headers`` replaced by ``[Filtered]``; no query string and no body is sent.
sentry-sdk collects no personal data by default and its default integrations are off (its logging integration would turn every error log
line into an event), so only what the gateway captures leaves.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gateway import __version__

if TYPE_CHECKING:
    from gateway.pipeline import Exchange

ALWAYS_SCRUBBED = frozenset({"authorization", "cookie", "set-cookie", "proxy-authorization", "x-api-key"})
FILTERED = "[Filtered]"


class ErrorTracker:
    def __init__(self, settings: Any, scrub_headers: frozenset[str] = frozenset()) -> None:
        import sentry_sdk

        self.sdk = sentry_sdk
        self.scrubbed = ALWAYS_SCRUBBED | {name.lower() for name in settings.scrub_headers} | scrub_headers
        sentry_sdk.init(
            dsn=settings.sentry_dsn,
            environment=settings.environment,
            release=f"gateway@{__version__}",
            sample_rate=settings.sample_rate,
            traces_sample_rate=settings.traces_sample_rate,
            # Frame locals would carry headers, tokens and bodies past any scrubbing.
            include_local_variables=False,
            default_integrations=False,
            auto_enabling_integrations=False,
            before_send=self._scrub_event,
        )

    def capture(self, error: BaseException, exchange: "Exchange") -> None:
        """Send one unexpected exception with the request's context (scrubbed)."""
        route = exchange.route
        request = exchange.request
        with self.sdk.new_scope() as scope:
            scope.set_tag("request_id", exchange.request_id)
            scope.set_tag("route", route.name if route is not None else "(unmatched)")
            if route is not None:
                scope.set_tag("upstream", route.upstream.name)
            if exchange.subject is not None:
                scope.set_user({"id": exchange.subject})
            scope.set_context(
                "request",
                {"method": exchange.method, "path": exchange.path or request.path, "headers": self._headers(request.headers.items())},
            )
            self.sdk.capture_exception(error)

    def _headers(self, items: Any) -> dict[str, str]:
        return {name: (FILTERED if name.lower() in self.scrubbed else value) for name, value in items}

    def _scrub_event(self, event: dict[str, Any], hint: dict[str, Any]) -> dict[str, Any]:
        # A last pass over anything that carries headers, whoever put it there.
        for holder in (event.get("request"), event.get("contexts", {}).get("request")):
            if isinstance(holder, dict) and isinstance(holder.get("headers"), dict):
                holder["headers"] = self._headers(holder["headers"].items())
            if isinstance(holder, dict):
                holder.pop("query_string", None)
                holder.pop("data", None)
                holder.pop("cookies", None)
        return event

    def close(self) -> None:
        client = self.sdk.get_client()
        client.flush(timeout=2.0)
        client.close()


def setup(settings: Any, scrub_headers: frozenset[str] = frozenset()) -> ErrorTracker | None:
    """An ErrorTracker when a DSN is configured, else None (and nothing imported)."""
    if settings is None or not settings.sentry_dsn:
        return None
    return ErrorTracker(settings, scrub_headers)
