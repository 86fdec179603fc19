"""The store contract, run over every store implementation (as `limits` runs each test over all
its storages, and Kong's specs over each strategy).

Each implementation is one entry in :data:`STORES`: a factory that builds the store and a way to
make time pass for it. The memory store takes an injected clock. A Redis store cannot, but it can
be moved forward the same way by lowering the PTTL of every key the test made by the elapsed time
(and deleting those that reach zero), so these tests still never sleep.

Bounding memory by a count of entries is the memory store's own duty (Redis bounds memory with
``maxmemory`` and its eviction policy); those tests run where the factory supports ``max_entries``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable

import pytest

from gateway.stores import MemoryStore, Store


class FakeClock:
    """A monotonic clock that moves only when a test says so."""

    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class StoreUnderTest:
    store: Store
    advance: Callable[[float], Awaitable[None]]  # make `seconds` pass for the store
    bounded: bool  # honours max_entries with least-recently-used eviction


StoreFactory = Callable[..., Awaitable[StoreUnderTest]]  # (max_entries: int | None = None)


async def memory_store(max_entries: int | None = None) -> StoreUnderTest:
    clock = FakeClock()

    async def advance(seconds: float) -> None:
        clock.now += seconds

    store = MemoryStore(clock=clock) if max_entries is None else MemoryStore(max_entries=max_entries, clock=clock)
    return StoreUnderTest(store, advance, bounded=True)


# One entry per implementation; a Redis store is one more pytest.param here.
STORES = [pytest.param(memory_store, id="memory")]


@pytest.fixture(params=STORES)
async def make_store(request: pytest.FixtureRequest) -> AsyncIterator[StoreFactory]:
    made: list[StoreUnderTest] = []

    async def make(max_entries: int | None = None) -> StoreUnderTest:
        subject = await request.param(max_entries)
        made.append(subject)
        return subject

    yield make
    for subject in made:
        await subject.store.close()


@pytest.fixture
async def subject(make_store: StoreFactory) -> StoreUnderTest:
    return await make_store()


async def bounded(make_store: StoreFactory, max_entries: int) -> StoreUnderTest:
    subject = await make_store(max_entries)
    if not subject.bounded:
        pytest.skip(f"{subject.store.name} bounds memory by its own configuration, not max_entries")
    return subject


# ---------------------------------------------------------------------------------------------
# get / set / delete
# ---------------------------------------------------------------------------------------------


async def test_a_missing_key_reads_as_none(subject: StoreUnderTest) -> None:
    assert await subject.store.get("never-set") is None


async def test_a_value_that_was_set_reads_back_as_the_same_bytes(subject: StoreUnderTest) -> None:
    value = b"\x00\xffbinary \r\n value" * 100
    await subject.store.set("page", value, ttl=60)
    assert await subject.store.get("page") == value
    assert await subject.store.get("other") is None


async def test_setting_a_key_again_replaces_its_value_and_its_ttl(subject: StoreUnderTest) -> None:
    await subject.store.set("page", b"first", ttl=10)
    await subject.advance(8)
    await subject.store.set("page", b"second", ttl=10)
    await subject.advance(8)  # 16s after the first set, 8s after the second
    assert await subject.store.get("page") == b"second"
    await subject.advance(3)
    assert await subject.store.get("page") is None


async def test_a_value_expires_after_its_ttl(subject: StoreUnderTest) -> None:
    await subject.store.set("page", b"v", ttl=10)
    await subject.advance(9.9)
    assert await subject.store.get("page") == b"v"
    await subject.advance(0.2)
    assert await subject.store.get("page") is None


async def test_a_short_ttl_expires_while_a_long_one_lives(subject: StoreUnderTest) -> None:
    await subject.store.set("short", b"s", ttl=0.25)
    await subject.store.set("long", b"l", ttl=3600)
    await subject.advance(1)
    assert await subject.store.get("short") is None
    assert await subject.store.get("long") == b"l"


async def test_delete_removes_keys_and_counts_those_that_existed(subject: StoreUnderTest) -> None:
    await subject.store.set("a", b"1", ttl=60)
    await subject.store.set("b", b"2", ttl=60)
    await subject.store.set("c", b"3", ttl=60)
    assert await subject.store.delete("a", "b", "missing") == 2
    assert await subject.store.get("a") is None
    assert await subject.store.get("b") is None
    assert await subject.store.get("c") == b"3"
    assert await subject.store.delete("a") == 0


async def test_delete_counts_only_live_keys(subject: StoreUnderTest) -> None:
    await subject.store.set("expired", b"1", ttl=1)
    await subject.store.set("live", b"2", ttl=60)
    await subject.advance(2)
    assert await subject.store.delete("expired", "live") == 1


async def test_delete_removes_a_counter_too(subject: StoreUnderTest) -> None:
    await subject.store.incr("hits", 5, ttl=60)
    assert await subject.store.delete("hits") == 1
    assert await subject.store.incr("hits", 1, ttl=60) == 1


async def test_deleting_no_keys_counts_zero(subject: StoreUnderTest) -> None:
    assert await subject.store.delete() == 0


# ---------------------------------------------------------------------------------------------
# Counters
# ---------------------------------------------------------------------------------------------


async def test_incr_creates_a_counter_at_the_amount_and_adds_to_it(subject: StoreUnderTest) -> None:
    assert await subject.store.incr("hits", 1, ttl=60) == 1
    assert await subject.store.incr("hits", 1, ttl=60) == 2
    assert await subject.store.incr("hits", 5, ttl=60) == 7
    assert await subject.store.incr("hits", -3, ttl=60) == 4


async def test_counters_are_independent_per_key(subject: StoreUnderTest) -> None:
    assert await subject.store.incr("ip:10.0.0.1", 1, ttl=60) == 1
    assert await subject.store.incr("ip:10.0.0.2", 1, ttl=60) == 1
    assert await subject.store.incr("ip:10.0.0.1", 1, ttl=60) == 2


async def test_a_new_counter_expires_after_its_ttl(subject: StoreUnderTest) -> None:
    assert await subject.store.incr("hits", 3, ttl=10) == 3
    await subject.advance(9.9)
    assert await subject.store.incr("hits", 1, ttl=10) == 4
    await subject.advance(0.2)
    assert await subject.store.incr("hits", 1, ttl=10) == 1


async def test_later_increments_keep_the_original_expiry(subject: StoreUnderTest) -> None:
    # A fixed window: the counter made at t=0 with ttl 10 ends at t=10, however often it is hit,
    # and whatever ttl later increments pass.
    assert await subject.store.incr("window", 1, ttl=10) == 1
    await subject.advance(6)
    assert await subject.store.incr("window", 1, ttl=10) == 2
    assert await subject.store.incr("window", 1, ttl=1000) == 3
    await subject.advance(3.9)  # t=9.9
    assert await subject.store.incr("window", 1, ttl=10) == 4
    await subject.advance(0.2)  # t=10.1: the window is over
    assert await subject.store.incr("window", 1, ttl=10) == 1
    await subject.advance(9.8)  # t=19.9: the new window, made at t=10.1, still runs
    assert await subject.store.incr("window", 1, ttl=10) == 2


# ---------------------------------------------------------------------------------------------
# Health
# ---------------------------------------------------------------------------------------------


async def test_ping_answers_with_a_round_trip_time_in_seconds(subject: StoreUnderTest) -> None:
    seconds = await subject.store.ping()
    assert isinstance(seconds, float)
    assert 0.0 <= seconds < 1.0


async def test_a_store_names_itself_and_says_whether_it_is_shared(subject: StoreUnderTest) -> None:
    assert subject.store.name in ("memory", "redis")
    assert subject.store.shared is (subject.store.name != "memory")


# ---------------------------------------------------------------------------------------------
# Bounded memory
# ---------------------------------------------------------------------------------------------


async def test_max_entries_bounds_the_number_of_keys_kept(make_store: StoreFactory) -> None:
    subject = await bounded(make_store, max_entries=10)
    for index in range(1000):
        await subject.store.set(f"key:{index}", str(index).encode(), ttl=3600)
    kept = [index for index in range(1000) if await subject.store.get(f"key:{index}") is not None]
    assert kept == list(range(990, 1000))


async def test_the_least_recently_used_key_is_evicted_first(make_store: StoreFactory) -> None:
    subject = await bounded(make_store, max_entries=3)
    store = subject.store
    await store.set("a", b"a", ttl=60)
    await store.set("b", b"b", ttl=60)
    await store.set("c", b"c", ttl=60)
    assert await store.get("a") == b"a"  # a is now the most recently used; b the least
    await store.set("d", b"d", ttl=60)
    assert await store.get("b") is None
    assert [await store.get(key) for key in ("a", "c", "d")] == [b"a", b"c", b"d"]


async def test_counters_count_against_the_bound_and_an_increment_is_a_use(make_store: StoreFactory) -> None:
    subject = await bounded(make_store, max_entries=2)
    store = subject.store
    assert await store.incr("first", 1, ttl=60) == 1
    await store.set("second", b"2", ttl=60)
    assert await store.incr("first", 1, ttl=60) == 2  # first is used again; second is now the oldest
    await store.set("third", b"3", ttl=60)
    assert await store.get("second") is None
    assert await store.get("third") == b"3"
    assert await store.incr("first", 1, ttl=60) == 3


async def test_replacing_a_key_does_not_evict_another(make_store: StoreFactory) -> None:
    subject = await bounded(make_store, max_entries=2)
    store = subject.store
    await store.set("a", b"1", ttl=60)
    await store.set("b", b"1", ttl=60)
    await store.set("a", b"2", ttl=60)
    assert (await store.get("a"), await store.get("b")) == (b"2", b"1")
