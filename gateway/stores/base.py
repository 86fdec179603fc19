"""The store interface that rate limiting and caching speak to.

Implementations raise DependencyUnavailable (gateway.errors) when they cannot answer, wrapping
their backend's own errors once, here at the boundary, so policies never import a client library.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

Algorithm = Literal["fixed_window", "sliding_window", "token_bucket"]


@dataclass(frozen=True, slots=True)
class Hit:
    """One limit of one request, as the store decides it (times in milliseconds).

    ``keys`` are the store keys the algorithm keeps its state in: one, or for sliding_window the
    current and the previous window's (the caller names them, so every key a script touches is
    declared, as Redis Cluster wants). Keys of one decision share a hash tag.
    """

    algorithm: Algorithm
    keys: tuple[str, ...]
    limit: int
    window_ms: int
    burst: int = 0  # token_bucket: how many requests may come at once (0: the limit)
    cost: int = 1


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a store decided for one limit (milliseconds)."""

    allowed: bool
    remaining: int
    reset_ms: int  # until the limit is fully available again (the window ends, the bucket refills)
    retry_ms: int  # until this request would be allowed; 0 when it is


class Store(ABC):
    """Keys with a time to live; values are bytes, counters are integers."""

    name: str  # "memory", "redis"; shown by `gateway check` and /readyz
    shared: bool  # True when every gateway process sees the same state
    broadcasts: bool = False  # True when publish() reaches every process's listen()

    @abstractmethod
    async def get(self, key: str) -> bytes | None:
        """The value, or None when missing or expired."""

    @abstractmethod
    async def get_many(self, *keys: str) -> list[bytes | None]:
        """The values of several keys in one round trip (keys of one hash tag, for a cluster)."""

    @abstractmethod
    async def set(self, key: str, value: bytes, ttl: float) -> None:
        """Store a value that expires after ttl seconds."""

    @abstractmethod
    async def delete(self, *keys: str) -> int:
        """Remove keys; return how many existed."""

    @abstractmethod
    async def add(self, key: str, value: bytes, ttl: float) -> bool:
        """Store a value only when the key is missing (a lock); True when this call stored it."""

    @abstractmethod
    async def incr(self, key: str, amount: int, ttl: float) -> int:
        """Add to a counter and return the new value; a new counter expires after ttl seconds."""

    @abstractmethod
    async def hit(self, hits: Sequence[Hit], now_ms: int) -> list[Outcome]:
        """Decide every limit of one request in one atomic step.

        When every limit allows, each consumes its cost; when any denies, none consumes anything
        (a denied request does not use up the other limits). ``now_ms`` is the caller's wall
        clock, so every gateway instance and every store count in the same time.
        """

    @abstractmethod
    async def index_add(self, index: str, members: Sequence[str], expires_ms: int, now_ms: int) -> None:
        """Add members to an index kept in byte order; each member lasts until ``expires_ms``
        (wall clock, the later time wins). Each call also drops a few members that expired, so
        an index stays about as large as what is still alive."""

    @abstractmethod
    async def index_take(self, index: str, prefix: str, count: int) -> list[str]:
        """Remove and return up to ``count`` members that start with ``prefix``."""

    @abstractmethod
    async def ping(self) -> float:
        """Seconds one round trip takes; raises DependencyUnavailable when the store is down."""

    async def publish(self, channel: str, message: bytes) -> None:
        """Send a message to every process listening on the channel (stores that broadcast)."""
        raise NotImplementedError(f"the {self.name} store does not broadcast")

    async def listen(self, channel: str, on_message: Callable[[bytes], None], on_state: Callable[[bool], None]) -> None:
        """Until cancelled: ``on_message`` for each message published on the channel;
        ``on_state(True)`` once subscribed (messages from then on arrive) and ``on_state(False)``
        whenever messages may be missed from then on (the connection is lost)."""
        raise NotImplementedError(f"the {self.name} store does not broadcast")

    async def close(self) -> None:
        """Release connections and tasks."""
