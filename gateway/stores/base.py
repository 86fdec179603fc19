"""The store interface that rate limiting and caching speak to.

Implementations raise DependencyUnavailable (gateway.errors) when they cannot answer, wrapping
their backend's own errors once, here at the boundary, so policies never import a client library.
"""

from __future__ import annotations

from abc import ABC, abstractmethod


class Store(ABC):
    """Keys with a time to live; values are bytes, counters are integers."""

    name: str  # "memory", "redis"; shown by `gateway check` and /readyz
    shared: bool  # True when every gateway process sees the same state

    @abstractmethod
    async def get(self, key: str) -> bytes | None:
        """The value, or None when missing or expired."""

    @abstractmethod
    async def set(self, key: str, value: bytes, ttl: float) -> None:
        """Store a value that expires after ttl seconds."""

    @abstractmethod
    async def delete(self, *keys: str) -> int:
        """Remove keys; return how many existed."""

    @abstractmethod
    async def incr(self, key: str, amount: int, ttl: float) -> int:
        """Add to a counter and return the new value; a new counter expires after ttl seconds."""

    @abstractmethod
    async def ping(self) -> float:
        """Seconds one round trip takes; raises DependencyUnavailable when the store is down."""

    async def close(self) -> None:
        """Release connections and tasks."""
