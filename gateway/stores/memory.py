"""The embedded in-memory store: one process, bounded, no dependencies.

Entries expire lazily on access and are evicted least-recently-used once `max_entries` is
reached, so memory stays bounded whatever keys clients cause to be made.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any, Callable, Sequence

from gateway.stores.algorithms import CHECKS, state_ttl_ms
from gateway.stores.base import Hit, Outcome, Store

DEFAULT_MAX_ENTRIES = 100_000


class MemoryStore(Store):
    name = "memory"
    shared = False

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_entries = max_entries
        self.clock = clock
        self._entries: OrderedDict[str, tuple[float, Any]] = OrderedDict()  # key → (expires, value)

    def __len__(self) -> int:
        return len(self._entries)

    def _live(self, key: str) -> Any:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] <= self.clock():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry[1]

    def _put(self, key: str, expires: float, value: Any) -> None:
        self._entries[key] = (expires, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    async def get(self, key: str) -> bytes | None:
        value = self._live(key)
        return value if isinstance(value, bytes) else None

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        self._put(key, self.clock() + ttl, value)

    async def delete(self, *keys: str) -> int:
        removed = 0
        for key in keys:
            if self._live(key) is not None:
                del self._entries[key]
                removed += 1
        return removed

    async def incr(self, key: str, amount: int, ttl: float) -> int:
        current = self._live(key)
        if isinstance(current, int):
            expires = self._entries[key][0]
            value = current + amount
        else:
            expires = self.clock() + ttl
            value = amount
        self._put(key, expires, value)
        return value

    async def hit(self, hits: Sequence[Hit], now_ms: int) -> list[Outcome]:
        checks = [CHECKS[hit.algorithm](self._live, hit, now_ms) for hit in hits]
        if all(outcome.allowed for outcome, _ in checks):
            clock = self.clock()
            for hit, (_, state) in zip(hits, checks):
                self._put(hit.keys[0], clock + state_ttl_ms(hit, state, now_ms) / 1000, state)
        return [outcome for outcome, _ in checks]

    async def ping(self) -> float:
        return 0.0
