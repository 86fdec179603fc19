"""A circuit breaker, so that a dead or slow dependency costs no per-request timeout.

closed: calls go through; ``failures`` consecutive failures open it.
open: calls fail at once (no network, no timeout) for ``cooldown`` seconds, doubling up to
``max_cooldown`` while the dependency stays down.
half-open: one probe call goes through; success closes the breaker, failure opens it again.

Each transition is logged once (not once per request) and counted in ``transitions``.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Literal

log = logging.getLogger("gateway")

State = Literal["closed", "open", "half_open"]


class CircuitBreaker:
    def __init__(
        self,
        name: str,
        failures: int = 3,
        cooldown: float = 1.0,
        max_cooldown: float = 4.0,  # a probe costs one request one timeout; sharing resumes within seconds
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.threshold = failures
        self.base_cooldown = cooldown
        self.max_cooldown = max_cooldown
        self.clock = clock
        self.state: State = "closed"
        self.failures = 0
        self.cooldown = cooldown
        self.opened_at = 0.0
        self.probing = False
        self.transitions: dict[str, int] = {"open": 0, "half_open": 0, "closed": 0}
        self.on_transition: Callable[[str], None] | None = None  # e.g. a metric

    def allow(self) -> bool:
        """Whether a call may go through now (in half-open, only the one probe)."""
        if self.state == "closed":
            return True
        if self.state == "open" and self.clock() - self.opened_at >= self.cooldown:
            self._move("half_open")
        if self.state == "half_open" and not self.probing:
            self.probing = True
            return True
        return False

    def succeeded(self) -> None:
        self.failures = 0
        if self.state != "closed":
            self.probing = False
            self.cooldown = self.base_cooldown
            self._move("closed")

    def failed(self, reason: str) -> None:
        self.failures += 1
        if self.state == "half_open":
            self.probing = False
            self.cooldown = min(self.cooldown * 2, self.max_cooldown)
            self._open(reason)
        elif self.state == "closed" and self.failures >= self.threshold:
            self._open(reason)

    def abandoned(self) -> None:
        """A call was given up before it ended (its request was cancelled): it says nothing of the
        dependency, but a half-open probe must not stay taken, or no call would ever go again."""
        self.probing = False

    def _open(self, reason: str) -> None:
        self.opened_at = self.clock()
        self._move("open", reason)

    def _move(self, state: State, reason: str | None = None) -> None:
        if state == self.state:
            return
        self.state = state
        self.transitions[state] += 1
        extra = {"dependency": self.name, "state": state, "retry_in_s": self.cooldown if state == "open" else None}
        if reason:
            extra["error"] = reason
        level = logging.WARNING if state == "open" else logging.INFO
        log.log(level, "circuit breaker %s: %s", self.name, state, extra=extra)
        if self.on_transition is not None:
            self.on_transition(state)
