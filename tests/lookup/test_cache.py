from __future__ import annotations

import asyncio
from typing import Any

import pytest

from certbroker.cache import RecordCache, Served, TokenCache, record_key
from tests.helpers import FakeClock


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 30))


class Counter:
    """A fetch that counts its calls and can be held open."""

    def __init__(self, value: str = "record") -> None:
        self.calls = 0
        self.value = value
        self.release = asyncio.Event()
        self.hold = False

    async def __call__(self) -> str:
        self.calls += 1
        if self.hold:
            await self.release.wait()
        return f"{self.value}-{self.calls}"


def test_ttl_zero_never_caches() -> None:
    cache: RecordCache[str] = RecordCache()
    fetch = Counter()

    async def main() -> list[tuple[str, Served]]:
        return [await cache.get_or_fetch("k", 0, fetch) for _ in range(3)]

    uncached = Served.UNCACHED
    assert run(main()) == [("record-1", uncached), ("record-2", uncached), ("record-3", uncached)]
    assert len(cache) == 0
    assert (cache.stats.uncached, cache.stats.misses, cache.stats.hits) == (3, 0, 0)


def test_ttl_zero_is_not_coalesced_either() -> None:
    """Every lookup of a never-cached record type reaches the department, even concurrent ones."""
    cache: RecordCache[str] = RecordCache()

    async def main() -> list[tuple[str, Served]]:
        fetch = Counter()
        fetch.hold = True
        waiters = [asyncio.create_task(cache.get_or_fetch("k", 0, fetch)) for _ in range(5)]
        await asyncio.sleep(0)
        fetch.release.set()
        results = await asyncio.gather(*waiters)
        assert fetch.calls == 5
        return results

    results = run(main())
    assert {served for _, served in results} == {Served.UNCACHED}
    assert cache.stats.coalesced == 0


def test_hit_until_ttl_then_refetch() -> None:
    clock = FakeClock(1000.0)
    cache: RecordCache[str] = RecordCache(clock=clock)
    fetch = Counter()
    assert run(cache.get_or_fetch("k", 60, fetch)) == ("record-1", Served.MISS)
    clock.now += 59
    assert run(cache.get_or_fetch("k", 60, fetch)) == ("record-1", Served.HIT)
    clock.now += 2
    assert run(cache.get_or_fetch("k", 60, fetch)) == ("record-2", Served.MISS)
    assert (cache.stats.hits, cache.stats.misses) == (1, 2)


def test_a_lowered_ttl_applies_to_entries_already_cached() -> None:
    """A policy reload that shortens a record type's TTL needs no cache flush."""
    clock = FakeClock(1000.0)
    cache: RecordCache[str] = RecordCache(clock=clock)
    fetch = Counter()
    assert run(cache.get_or_fetch("k", 600, fetch)) == ("record-1", Served.MISS)
    clock.now += 61
    assert run(cache.get_or_fetch("k", 600, fetch)) == ("record-1", Served.HIT)
    assert run(cache.get_or_fetch("k", 60, fetch)) == ("record-2", Served.MISS)
    assert run(cache.get_or_fetch("k", 0, fetch)) == ("record-3", Served.UNCACHED)
    assert run(cache.get_or_fetch("k", 60, fetch)) == ("record-2", Served.HIT)


def test_different_released_fields_never_share_an_entry() -> None:
    cache: RecordCache[str] = RecordCache()
    narrow = record_key("marriage", "11010519491231002X", ("marital_status",))
    wide = record_key("marriage", "11010519491231002X", ("marital_status", "spouse_name"))
    assert narrow != wide
    assert record_key("marriage", "x", ("b", "a")) == record_key("marriage", "x", ("a", "b"))
    cache.put(wide, "with spouse", 60)
    assert cache.get(narrow) is None


def test_single_flight_coalesces_concurrent_fetches() -> None:
    cache: RecordCache[str] = RecordCache()

    async def main() -> list[tuple[str, Served]]:
        fetch = Counter()
        fetch.hold = True
        waiters = [asyncio.create_task(cache.get_or_fetch("k", 60, fetch)) for _ in range(20)]
        await asyncio.sleep(0)  # let every waiter reach the in-flight fetch
        fetch.release.set()
        results = await asyncio.gather(*waiters)
        assert fetch.calls == 1
        return results

    results = run(main())
    assert {value for value, _ in results} == {"record-1"}
    assert [served for _, served in results].count(Served.COALESCED) == 19
    assert [served for _, served in results].count(Served.MISS) == 1
    assert (cache.stats.coalesced, cache.stats.misses) == (19, 1)
    assert run(cache.get_or_fetch("k", 60, Counter())) == ("record-1", Served.HIT)


def test_failed_fetch_fails_every_waiter_and_is_not_cached() -> None:
    cache: RecordCache[str] = RecordCache()
    calls = 0

    async def broken() -> str:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0)
        raise RuntimeError("department down")

    async def main() -> list[Any]:
        waiters = [cache.get_or_fetch("k", 60, broken) for _ in range(5)]
        return await asyncio.gather(*waiters, return_exceptions=True)

    results = run(main())
    assert all(isinstance(r, RuntimeError) for r in results)
    assert calls == 1
    assert cache.get("k") is None


def test_a_cancelled_caller_does_not_cancel_the_shared_fetch() -> None:
    cache: RecordCache[str] = RecordCache()

    async def main() -> tuple[str, Served]:
        fetch = Counter()
        fetch.hold = True
        leader = asyncio.create_task(cache.get_or_fetch("k", 60, fetch))
        await asyncio.sleep(0)
        follower = asyncio.create_task(cache.get_or_fetch("k", 60, fetch))
        await asyncio.sleep(0)
        leader.cancel()
        fetch.release.set()
        return await follower

    assert run(main()) == ("record-1", Served.COALESCED)
    assert cache.get("k") == "record-1"  # the starter's cancellation did not lose the result


def test_a_fetch_every_caller_abandoned_still_fills_the_cache() -> None:
    cache: RecordCache[str] = RecordCache()

    async def main() -> None:
        fetch = Counter()
        fetch.hold = True
        caller = asyncio.create_task(cache.get_or_fetch("k", 60, fetch))
        await asyncio.sleep(0)
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        fetch.release.set()
        for _ in range(10):  # let the orphaned fetch finish
            await asyncio.sleep(0)
        assert await cache.get_or_fetch("k", 60, fetch) == ("record-1", Served.HIT)
        assert fetch.calls == 1

    run(main())


def test_a_joiner_waits_only_its_own_budget() -> None:
    """A caller joining a slow fetch gives up at its own deadline; the fetch goes on for the
    one who started it."""
    cache: RecordCache[str] = RecordCache()

    async def main() -> None:
        fetch = Counter()
        fetch.hold = True
        leader = asyncio.create_task(cache.get_or_fetch("k", 60, fetch))
        await asyncio.sleep(0)
        with pytest.raises(TimeoutError):
            await cache.get_or_fetch("k", 60, fetch, wait_s=0)
        fetch.release.set()
        assert await leader == ("record-1", Served.MISS)
        assert fetch.calls == 1

    run(main())


def test_bounded_by_entries_and_bytes() -> None:
    cache: RecordCache[str] = RecordCache(max_entries=3, max_bytes=300, sizeof=len)
    for i in range(10):
        cache.put(f"k{i}", "x", 60)
    assert len(cache) == 3
    cache.clear()
    cache.put("big", "y" * 250, 60)
    cache.put("small", "z", 60)
    assert len(cache) == 1  # 250 + 100 (the per-entry floor) > 300 bytes: one was evicted
    cache.put("huge", "w" * 301, 60)
    assert cache.get("huge") is None
    with pytest.raises(ValueError, match="max_entries"):
        RecordCache(max_entries=0)


def test_token_cache_lives_until_exp_or_max_age() -> None:
    clock = FakeClock(1000.0)
    tokens: TokenCache[str] = TokenCache(max_age_s=300, clock=clock)
    tokens.put("tok-a", "clerk-a", exp=clock.now + 60)
    tokens.put("tok-b", "clerk-b", exp=clock.now + 10_000)
    tokens.put("tok-old", "clerk-c", exp=clock.now - 1)  # already expired: not stored
    assert tokens.get("tok-a") == "clerk-a"
    assert tokens.get("tok-old") is None
    clock.now += 60
    assert tokens.get("tok-a") is None  # exp reached: refused on the next call
    assert tokens.get("tok-b") == "clerk-b"
    clock.now += 241
    assert tokens.get("tok-b") is None  # max age reached
    tokens.put("tok-c", "clerk-c", exp=clock.now + 60)
    tokens.clear()
    assert tokens.get("tok-c") is None
    assert len(tokens) == 0


def test_token_cache_keys_are_hashes_not_tokens() -> None:
    tokens: TokenCache[str] = TokenCache()
    tokens.put("secret.token.value", "clerk", exp=1e12)
    assert all(isinstance(k, bytes) and len(k) == 32 for k in tokens._cache)


def test_a_hit_keeps_an_entry_when_the_cache_is_full() -> None:
    """Least recently used goes first: an entry read since keeps its place."""
    cache: RecordCache[str] = RecordCache(max_entries=3, max_bytes=300, sizeof=len)
    for key in ("a", "b", "c"):
        cache.put(key, "x", 60)
    assert cache.get("a") == "x"  # "b" is now the least recently used
    cache.put("d", "x", 60)
    assert cache.get("b") is None
    assert [cache.get(k) for k in ("a", "c", "d")] == ["x", "x", "x"]


def test_replacing_an_entry_frees_its_weight() -> None:
    cache: RecordCache[str] = RecordCache(max_entries=2, max_bytes=200, sizeof=len)
    for i in range(50):
        cache.put("same", f"v{i}", 60)
    cache.put("other", "y", 60)
    assert (cache.get("same"), cache.get("other")) == ("v49", "y")


def test_an_expired_entry_is_dropped_when_read() -> None:
    clock = FakeClock(1000.0)
    cache: RecordCache[str] = RecordCache(clock=clock)
    cache.put("k", "v", 10)
    clock.now += 10
    assert cache.get("k") is None
    assert len(cache) == 0


def test_token_cache_is_bounded_oldest_first() -> None:
    clock = FakeClock(1000.0)
    tokens: TokenCache[str] = TokenCache(max_entries=2, clock=clock)
    for name in ("one", "two", "three"):
        tokens.put(f"tok-{name}", name, exp=clock.now + 60)
    assert len(tokens) == 2
    assert tokens.get("tok-one") is None
    assert (tokens.get("tok-two"), tokens.get("tok-three")) == ("two", "three")
