"""The three rate-limit algorithms as plain functions over a key's state (milliseconds).

The memory store runs these; the Redis store runs their twins in ``lua/*.lua``, line for line the
same arithmetic, so a limit behaves the same whichever store decides it (tests/test_stores.py
runs one set of cases against both). Each algorithm has a ``check`` that reads the state and says
whether the request fits, and a ``commit`` that writes the new state; a decision checks every
limit first and commits only when all allow.

- fixed_window: a counter that starts with the first request and ends ``window`` later (what
  express-rate-limit with rate-limit-redis does). Cheap; allows a burst of 2x across a window edge.
- sliding_window: the current window's count plus the previous window's, weighted by how much of
  it still overlaps the sliding window (Cloudflare's estimate). No 2x burst at the edge; two
  counters per key.
- token_bucket: GCRA (the generic cell rate algorithm): one timestamp per key, the theoretical
  arrival time; ``limit`` per ``window`` on average, up to ``burst`` at once.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from gateway.stores.base import Hit, Outcome

State = Callable[[str], Any]  # read a key's live value (None when missing or expired)


def fixed_window_check(read: State, hit: Hit, now: int) -> tuple[Outcome, Any]:
    entry = read(hit.keys[0])  # (count, ends_at)
    count, ends_at = entry if entry is not None else (0, now + hit.window_ms)
    allowed = count + hit.cost <= hit.limit
    used = count + hit.cost if allowed else count
    reset = ends_at - now
    return Outcome(allowed, max(hit.limit - used, 0), reset, 0 if allowed else reset), (used, ends_at)


def sliding_window_check(read: State, hit: Hit, now: int) -> tuple[Outcome, Any]:
    window = hit.window_ms
    current = read(hit.keys[0]) or 0
    previous = read(hit.keys[1]) or 0
    elapsed = now % window
    weight = (window - elapsed) / window
    estimate = previous * weight + current
    allowed = estimate + hit.cost <= hit.limit
    used = estimate + hit.cost if allowed else estimate
    remaining = max(math.floor(hit.limit - used), 0)
    reset = window - elapsed  # the current window becomes the previous one, and room opens up
    retry = 0 if allowed else _sliding_retry(hit, previous, current, elapsed)
    return Outcome(allowed, remaining, reset, retry), current + hit.cost


def _sliding_retry(hit: Hit, previous: int, current: int, elapsed: int) -> int:
    """Milliseconds until the weighted count leaves room for this request's cost."""
    window, room = hit.window_ms, hit.limit - hit.cost
    if current <= room and previous > 0:
        # Within this window, once enough of the previous one has slid out.
        wait = (window - elapsed) - room * window / previous + current * window / previous
        return max(math.ceil(wait), 1)
    # In the next window, where this window's count is the one that slides out.
    if current == 0:
        return window - elapsed
    into_next = window * (1 - room / current) if room < current else 0
    return math.ceil((window - elapsed) + max(into_next, 0)) or 1


def token_bucket_check(read: State, hit: Hit, now: int) -> tuple[Outcome, Any]:
    interval = hit.window_ms / hit.limit  # one request's worth of time
    burst = hit.burst or hit.limit
    tat = max(read(hit.keys[0]) or now, now)  # theoretical arrival time
    new_tat = tat + hit.cost * interval
    allow_at = new_tat - burst * interval
    allowed = now >= allow_at
    if allowed:
        remaining = math.floor((now - allow_at) / interval)
        return Outcome(True, remaining, math.ceil(new_tat - now), 0), new_tat
    return Outcome(False, 0, math.ceil(tat - now), math.ceil(allow_at - now)), tat


CHECKS = {
    "fixed_window": fixed_window_check,
    "sliding_window": sliding_window_check,
    "token_bucket": token_bucket_check,
}


def keys_for(algorithm: str, base: str, window_ms: int, now_ms: int) -> tuple[str, ...]:
    """The store keys a limit keeps its state in; sliding windows are aligned to the epoch."""
    if algorithm == "sliding_window":
        index = now_ms // window_ms
        return f"{base}:{index}", f"{base}:{index - 1}"
    return (base,)


def state_ttl_ms(hit: Hit, state: Any, now: int) -> int:
    """How long the committed state must live (every key has a TTL: nothing grows unbounded)."""
    if hit.algorithm == "fixed_window":
        return max(state[1] - now, 1)
    if hit.algorithm == "sliding_window":
        return 2 * hit.window_ms
    return max(math.ceil(state - now), 1)
