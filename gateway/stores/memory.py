"""The embedded in-memory store: one process, bounded, no dependencies.

Entries expire lazily on access and are evicted least-recently-used once `max_entries` is
reached, so memory stays bounded whatever keys clients cause to be made.
"""

from __future__ import annotations

import bisect
import heapq
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from gateway.stores.algorithms import CHECKS, state_ttl_ms
from gateway.stores.base import Hit, Outcome, Store

DEFAULT_MAX_ENTRIES = 100_000
PRUNE_PER_ADD = 64  # expired index members dropped per index_add, as the Redis store does


@dataclass
class _Index:
    names: list[str] = field(default_factory=list)  # sorted, for prefix ranges
    expires: dict[str, int] = field(default_factory=dict)  # member → wall-clock ms
    heap: list[tuple[int, str]] = field(default_factory=list)  # (expires, member); stale pairs skipped

    def drop(self, member: str) -> None:
        if self.expires.pop(member, None) is not None:
            del self.names[bisect.bisect_left(self.names, member)]

    def pop_soonest(self, now_ms: int | None) -> bool:
        """Drop the member that expires first (only when it has expired, given now_ms)."""
        while self.heap:
            expires, member = self.heap[0]
            if self.expires.get(member) != expires:
                heapq.heappop(self.heap)  # replaced by a later expiry, or taken
                continue
            if now_ms is not None and expires > now_ms:
                return False
            heapq.heappop(self.heap)
            self.drop(member)
            return True
        return False


class MemoryStore(Store):
    name = "memory"
    shared = False

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_entries = max_entries
        self.clock = clock
        self._entries: OrderedDict[str, tuple[float, Any]] = OrderedDict()  # key → (expires, value)
        self._indexes: dict[str, _Index] = {}

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

    async def get_many(self, *keys: str) -> list[bytes | None]:
        return [await self.get(key) for key in keys]

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        self._put(key, self.clock() + ttl, value)

    async def delete(self, *keys: str) -> int:
        removed = 0
        for key in keys:
            if self._live(key) is not None:
                del self._entries[key]
                removed += 1
        return removed

    async def add(self, key: str, value: bytes, ttl: float) -> bool:
        if self._live(key) is not None:
            return False
        self._put(key, self.clock() + ttl, value)
        return True

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

    async def index_add(self, index: str, members: Sequence[str], expires_ms: int, now_ms: int) -> None:
        found = self._indexes.setdefault(index, _Index())
        for _ in range(PRUNE_PER_ADD):
            if not found.pop_soonest(now_ms):
                break
        for member in members:
            if member not in found.expires:
                bisect.insort(found.names, member)
            elif found.expires[member] >= expires_ms:
                continue
            found.expires[member] = expires_ms
            heapq.heappush(found.heap, (expires_ms, member))
        while len(found.expires) > self.max_entries:  # bounded like the entries themselves
            found.pop_soonest(None)

    async def index_take(self, index: str, prefix: str, count: int) -> list[str]:
        found = self._indexes.get(index)
        if found is None:
            return []
        start = bisect.bisect_left(found.names, prefix)
        taken = [name for name in found.names[start : start + count] if name.startswith(prefix)]
        for member in taken:
            found.drop(member)
        if not found.expires:
            del self._indexes[index]
        return taken

    async def ping(self) -> float:
        return 0.0
