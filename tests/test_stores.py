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

import asyncio
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable

import pytest

from gateway.config import Redis
from gateway.errors import DependencyUnavailable
from gateway.stores import Hit, MemoryStore, Outcome, Store
from gateway.stores.algorithms import keys_for
from gateway.stores.redis import RedisStore
from tests.conftest import RedisServer


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


StoreFactory = Callable[..., Awaitable[StoreUnderTest]]  # (max_entries: int | None = None)


async def memory_store(max_entries: int | None = None) -> StoreUnderTest:
    clock = FakeClock()

    async def advance(seconds: float) -> None:
        clock.now += seconds

    store = MemoryStore(clock=clock) if max_entries is None else MemoryStore(max_entries=max_entries, clock=clock)
    return StoreUnderTest(store, advance)


async def redis_store(max_entries: int | None = None, *, server: RedisServer) -> StoreUnderTest:
    store = RedisStore(Redis(url=server.url, timeout=2.0, key_prefix="test:"))
    await store.client.flushdb()

    async def advance(seconds: float) -> None:
        # Redis keeps its own time: age every key by lowering its PTTL (deleting those at zero).
        async for key in store.client.scan_iter(match="test:*"):
            pttl = await store.client.pttl(key)
            if pttl > 0:
                left = pttl - int(seconds * 1000)
                await (store.client.pexpire(key, left) if left > 0 else store.client.delete(key))

    return StoreUnderTest(store, advance)


# One entry per implementation.
STORES = [pytest.param(memory_store, id="memory"), pytest.param(redis_store, id="redis")]


@pytest.fixture(params=STORES)
async def make_store(request: pytest.FixtureRequest) -> AsyncIterator[StoreFactory]:
    made: list[StoreUnderTest] = []
    extra = {"server": request.getfixturevalue("redis_server")} if request.param is redis_store else {}

    async def make(max_entries: int | None = None) -> StoreUnderTest:
        subject = await request.param(max_entries, **extra)
        made.append(subject)
        return subject

    yield make
    for subject in made:
        await subject.store.close()


@pytest.fixture
async def subject(make_store: StoreFactory) -> StoreUnderTest:
    return await make_store()


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


async def test_get_many_reads_several_keys_in_order_with_none_for_missing_ones(subject: StoreUnderTest) -> None:
    await subject.store.set("{t}:a", b"one", ttl=10)
    await subject.store.set("{t}:c", b"three", ttl=1)
    await subject.advance(2)
    await subject.store.set("{t}:d", b"four", ttl=10)
    assert await subject.store.get_many("{t}:a", "{t}:b", "{t}:c", "{t}:d") == [b"one", None, None, b"four"]


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
# add (the cache's lock across gateways)
# ---------------------------------------------------------------------------------------------


async def test_add_stores_only_when_the_key_is_missing_and_says_which_call_did(subject: StoreUnderTest) -> None:
    assert await subject.store.add("lock", b"first", ttl=5) is True
    assert await subject.store.add("lock", b"second", ttl=5) is False
    assert await subject.store.get("lock") == b"first"


async def test_an_added_key_expires_and_can_be_added_again(subject: StoreUnderTest) -> None:
    await subject.store.add("lock", b"first", ttl=2)
    await subject.advance(2.1)
    assert await subject.store.add("lock", b"second", ttl=2) is True
    assert await subject.store.get("lock") == b"second"


# ---------------------------------------------------------------------------------------------
# Indexes (the cache's purge by URL, prefix and tag)
# ---------------------------------------------------------------------------------------------

NOW_MS = 1_700_000_000_000


async def test_index_take_removes_and_returns_the_members_with_a_prefix_in_byte_order(subject: StoreUnderTest) -> None:
    store = subject.store
    await store.index_add("ix", ["p/b/2", "p/a/1", "t/x", "p/ab"], NOW_MS + 60_000, NOW_MS)
    assert await store.index_take("ix", "p/a", 10) == ["p/a/1", "p/ab"]
    assert await store.index_take("ix", "p/a", 10) == []  # taken once
    assert await store.index_take("ix", "p/", 10) == ["p/b/2"]
    assert await store.index_take("ix", "t/", 10) == ["t/x"]
    assert await store.index_take("nothing", "p", 10) == []


async def test_index_take_hands_out_at_most_count_members_per_call(subject: StoreUnderTest) -> None:
    members = [f"m{i:03d}" for i in range(25)]
    await subject.store.index_add("ix", members, NOW_MS + 60_000, NOW_MS)
    batches = [await subject.store.index_take("ix", "m", 10) for _ in range(4)]
    assert [len(batch) for batch in batches] == [10, 10, 5, 0]
    assert sum(batches, []) == members


async def test_adding_a_member_again_keeps_one_copy(subject: StoreUnderTest) -> None:
    await subject.store.index_add("ix", ["a"], NOW_MS + 1_000, NOW_MS)
    await subject.store.index_add("ix", ["a"], NOW_MS + 60_000, NOW_MS)
    assert await subject.store.index_take("ix", "", 10) == ["a"]


async def test_expired_members_are_dropped_by_later_adds_so_an_index_does_not_grow(subject: StoreUnderTest) -> None:
    store = subject.store
    await store.index_add("ix", [f"old{i}" for i in range(10)], NOW_MS + 1_000, NOW_MS)
    await store.index_add("ix", ["kept"], NOW_MS + 60_000, NOW_MS)
    await store.index_add("ix", ["new"], NOW_MS + 60_000, NOW_MS + 2_000)  # the old ones expired
    assert await store.index_take("ix", "", 100) == ["kept", "new"]


async def test_a_member_lasts_until_its_latest_expiry(subject: StoreUnderTest) -> None:
    store = subject.store
    await store.index_add("ix", ["a"], NOW_MS + 60_000, NOW_MS)
    await store.index_add("ix", ["a"], NOW_MS + 1_000, NOW_MS)  # an earlier expiry does not shorten it
    await store.index_add("ix", ["b"], NOW_MS + 60_000, NOW_MS + 2_000)
    assert await store.index_take("ix", "", 10) == ["a", "b"]


async def test_members_may_hold_nul_separators_and_non_ascii(subject: StoreUnderTest) -> None:
    members = ["p\x00/caf\u00e9\x00\x00key1", "p\x00/caf\u00e9s\x00\x00key2"]
    await subject.store.index_add("ix", members, NOW_MS + 60_000, NOW_MS)
    assert await subject.store.index_take("ix", "p\x00/caf\u00e9\x00", 10) == members[:1]


async def test_a_redis_index_expires_with_its_last_member(redis_server: RedisServer) -> None:
    subject = await redis_store(server=redis_server)
    store = subject.store
    assert isinstance(store, RedisStore)
    await store.index_add("ix", ["a"], NOW_MS + 5_000, NOW_MS)
    await store.index_add("ix", ["b"], NOW_MS + 30_000, NOW_MS)
    ttls = [await store.client.pttl(key) for key in ("test:ix", "test:ix:exp")]
    await store.close()
    assert all(5_000 < ttl <= 30_000 for ttl in ttls)


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


async def test_max_entries_bounds_the_number_of_keys_kept() -> None:
    subject = await memory_store(max_entries=10)  # bounding by count is the memory store's duty
    for index in range(1000):
        await subject.store.set(f"key:{index}", str(index).encode(), ttl=3600)
    kept = [index for index in range(1000) if await subject.store.get(f"key:{index}") is not None]
    assert kept == list(range(990, 1000))


async def test_the_least_recently_used_key_is_evicted_first() -> None:
    subject = await memory_store(max_entries=3)  # bounding by count is the memory store's duty
    store = subject.store
    await store.set("a", b"a", ttl=60)
    await store.set("b", b"b", ttl=60)
    await store.set("c", b"c", ttl=60)
    assert await store.get("a") == b"a"  # a is now the most recently used; b the least
    await store.set("d", b"d", ttl=60)
    assert await store.get("b") is None
    assert [await store.get(key) for key in ("a", "c", "d")] == [b"a", b"c", b"d"]


async def test_counters_count_against_the_bound_and_an_increment_is_a_use() -> None:
    subject = await memory_store(max_entries=2)  # bounding by count is the memory store's duty
    store = subject.store
    assert await store.incr("first", 1, ttl=60) == 1
    await store.set("second", b"2", ttl=60)
    assert await store.incr("first", 1, ttl=60) == 2  # first is used again; second is now the oldest
    await store.set("third", b"3", ttl=60)
    assert await store.get("second") is None
    assert await store.get("third") == b"3"
    assert await store.incr("first", 1, ttl=60) == 3


async def test_replacing_a_key_does_not_evict_another() -> None:
    subject = await memory_store(max_entries=2)  # bounding by count is the memory store's duty
    store = subject.store
    await store.set("a", b"1", ttl=60)
    await store.set("b", b"1", ttl=60)
    await store.set("a", b"2", ttl=60)
    assert (await store.get("a"), await store.get("b")) == (b"2", b"1")


# ---------------------------------------------------------------------------------------------
# Rate-limit decisions: the same algorithms in every store
# ---------------------------------------------------------------------------------------------


class Timeline:
    """The caller's clock (what the gateway passes as now_ms), moved together with the store's."""

    def __init__(self, subject: StoreUnderTest, start_ms: int = 1_800_000_000_000) -> None:
        self.subject = subject
        self.now = start_ms

    async def advance(self, ms: int) -> None:
        self.now += ms
        await self.subject.advance(ms / 1000)

    async def hit(self, *hits: Hit) -> list[Outcome]:
        return await self.subject.store.hit(hits, self.now)

    async def admitted(self, limit: Hit, attempts: int) -> int:
        return sum([(await self.hit(limit))[0].allowed for _ in range(attempts)])


def limit(algorithm: str, name: str, limit: int, window_ms: int, burst: int = 0, now: int = 0) -> Hit:
    return Hit(algorithm, keys_for(algorithm, "{t}:" + name, window_ms, now), limit, window_ms, burst)  # type: ignore[arg-type]


async def test_a_fixed_window_admits_the_limit_then_refuses_until_it_ends(subject: StoreUnderTest) -> None:
    time = Timeline(subject)
    window = limit("fixed_window", "fw", 3, 10_000)
    outcomes = [(await time.hit(window))[0] for _ in range(4)]
    assert [o.allowed for o in outcomes] == [True, True, True, False]
    assert [o.remaining for o in outcomes] == [2, 1, 0, 0]
    assert outcomes[3].retry_ms == outcomes[3].reset_ms and 9_900 <= outcomes[3].retry_ms <= 10_000
    await time.advance(6_000)
    assert (await time.hit(window))[0].allowed is False  # the window started with the first request
    await time.advance(4_100)
    assert await time.admitted(window, 5) == 3


async def test_a_sliding_window_has_no_double_burst_at_the_window_edge(subject: StoreUnderTest) -> None:
    time = Timeline(subject)  # start_ms is a multiple of the window: the window starts now
    await time.advance(9_900)
    assert await time.admitted(limit("sliding_window", "sw", 10, 10_000, now=time.now), 10) == 10
    await time.advance(200)  # a new window; the last one still weighs 98%
    assert await time.admitted(limit("sliding_window", "sw", 10, 10_000, now=time.now), 10) == 0
    await time.advance(5_000)  # 51% of the previous window has slid out: it weighs 4.9
    assert await time.admitted(limit("sliding_window", "sw", 10, 10_000, now=time.now), 10) == 5


async def test_a_sliding_window_says_when_to_retry_and_is_right(subject: StoreUnderTest) -> None:
    time = Timeline(subject)
    assert await time.admitted(limit("sliding_window", "sw", 4, 1_000, now=time.now), 4) == 4
    await time.advance(1_100)  # the previous window still weighs 90%: 3.6 of 4
    denied = (await time.hit(limit("sliding_window", "sw", 4, 1_000, now=time.now)))[0]
    assert not denied.allowed and denied.retry_ms > 0
    await time.advance(denied.retry_ms - 20)
    assert not (await time.hit(limit("sliding_window", "sw", 4, 1_000, now=time.now)))[0].allowed
    await time.advance(20)
    assert (await time.hit(limit("sliding_window", "sw", 4, 1_000, now=time.now)))[0].allowed


async def test_a_token_bucket_allows_a_burst_then_the_steady_rate(subject: StoreUnderTest) -> None:
    time = Timeline(subject)
    bucket = limit("token_bucket", "tb", 10, 10_000, burst=3)  # one per second, three at once
    outcomes = [(await time.hit(bucket))[0] for _ in range(4)]
    assert [o.allowed for o in outcomes] == [True, True, True, False]
    assert [o.remaining for o in outcomes] == [2, 1, 0, 0]
    assert outcomes[3].retry_ms == 1_000
    await time.advance(999)
    assert not (await time.hit(bucket))[0].allowed
    await time.advance(1)
    assert (await time.hit(bucket))[0].allowed
    await time.advance(10_000)  # a long pause refills the bucket to its burst, not beyond
    assert await time.admitted(bucket, 5) == 3


async def test_a_denied_request_consumes_none_of_the_other_limits(subject: StoreUnderTest) -> None:
    time = Timeline(subject)
    wide = limit("fixed_window", "wide", 100, 60_000)
    narrow = limit("token_bucket", "narrow", 2, 60_000, burst=2)
    for _ in range(5):
        await time.hit(wide, narrow)
    outcomes = await time.hit(wide, narrow)
    assert [o.allowed for o in outcomes] == [True, False]
    assert outcomes[0].remaining == 97  # only the two admitted requests counted


async def test_every_rate_limit_key_expires(subject: StoreUnderTest) -> None:
    time = Timeline(subject)
    hits = [limit("fixed_window", "a", 5, 1_000), limit("sliding_window", "b", 5, 1_000, now=time.now), limit("token_bucket", "c", 5, 1_000)]
    await time.hit(*hits)
    await time.advance(2_100)  # two windows: nothing is left of any of them
    fresh = await time.hit(limit("fixed_window", "a", 5, 1_000), limit("sliding_window", "b", 5, 1_000, now=time.now), limit("token_bucket", "c", 5, 1_000))
    assert [o.remaining for o in fresh] == [4, 4, 4]
    if isinstance(subject.store, RedisStore):
        keys = [key async for key in subject.store.client.scan_iter(match="test:*")]
        assert keys and all([await subject.store.client.pttl(key) > 0 for key in keys])


async def test_redis_decisions_made_together_share_one_connection_and_each_gets_its_own_answer(redis_server: RedisServer) -> None:
    subject = await redis_store(server=redis_server)
    store = subject.store
    decisions = [limit("fixed_window", "shared", 20, 60_000) for _ in range(30)]
    outcomes = await asyncio.gather(*(store.hit([hit], NOW_MS) for hit in decisions))
    clients = int(redis_server.command("INFO", "clients").decode().split("connected_clients:")[1].split()[0])
    await store.close()
    assert sorted(o[0].remaining for o in outcomes if o[0].allowed) == list(range(20))  # 20 admitted, each its own count
    assert sum(not o[0].allowed for o in outcomes) == 10
    assert clients <= 2  # one pipeline on one connection (and this INFO's own), not 30 connections


async def test_a_decision_cut_off_by_the_timeout_leaves_no_late_reply_for_the_next_one(redis_server: RedisServer) -> None:
    """A decision that timed out drops its connection: Redis's late reply never answers another decision."""
    # Redis sleeps 1.6 s. The first decision (sent at 0.1 s) times out at 1.1 s; the second is sent
    # at once, while Redis still sleeps, and is answered at 1.6 s, well within its own second. On the
    # first one's connection (one per pool here) it would have read the first one's late reply.
    store = RedisStore(Redis(url=redis_server.url, timeout=1.0, key_prefix="test:", pool_size=1))
    await store.client.flushdb()
    sleeping = asyncio.create_task(asyncio.to_thread(redis_server.command, "DEBUG", "SLEEP", "1.6"))
    await asyncio.sleep(0.1)
    with pytest.raises(DependencyUnavailable):
        await store.hit([limit("fixed_window", "first", 10, 60_000)], NOW_MS)
    [outcome] = await store.hit([limit("fixed_window", "second", 5, 60_000)], NOW_MS)
    await sleeping
    await store.close()
    assert (outcome.allowed, outcome.remaining) == (True, 4)  # its own count, not the first decision's (9)
