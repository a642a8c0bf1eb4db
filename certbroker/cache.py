"""Caches on the fast path: verified tokens and department records.

Both caches sit *behind* the checks they could otherwise bypass:

* the token cache only skips the signature check of a token already verified, and never
  outlives the token's ``exp`` (nor a maximum age); it is cleared when issuer keys are reloaded;
* the record cache is read only after the policy decision for the current request, and is keyed
  by the exact set of fields that decision released, so one clerk's allowed fields never answer
  another clerk's request. Masks are applied after the cache, per request, on a copy.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, NamedTuple, TypeVar

T = TypeVar("T")


class RecordKey(NamedTuple):
    """What a cached record answers: one record type of one citizen, exactly these fields.

    A named tuple: made and hashed in C (several times per lookup: the cache, its LRU order,
    the fetches in flight), where a frozen dataclass hashed a new tuple each time."""

    record_type: str
    subject_id: str
    fields: tuple[str, ...]  # sorted: the same set always makes the same key


def record_key(record_type: str, subject_id: str, fields: tuple[str, ...]) -> RecordKey:
    return RecordKey(record_type, subject_id, tuple(sorted(fields)))


class Served(enum.StrEnum):
    """How :meth:`RecordCache.get_or_fetch` answered (also the metric label)."""

    HIT = "hit"  # from the cache
    COALESCED = "coalesced"  # from an identical fetch another caller had in flight
    MISS = "miss"  # this caller's own fetch (then cached)
    UNCACHED = "uncached"  # this caller's own fetch; the record type is never cached

    @property
    def shared(self) -> bool:
        """True when this caller did not reach the source itself."""
        return self in (Served.HIT, Served.COALESCED)


@dataclass(slots=True)
class _Entry(Generic[T]):
    value: T
    expires: float
    weight: int
    stored: float = 0.0


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    coalesced: int = 0
    uncached: int = 0


@dataclass
class RecordCache(Generic[T]):
    """A bounded (entries and bytes) per-entry-TTL cache with single-flight fetching.

    ``sizeof`` gives a value's size in bytes. Each entry weighs at least
    ``max_bytes // max_entries``, so the one byte budget also bounds the number of entries.
    When full, the least recently used entries go first. An expired entry is never served;
    it is dropped when next read, or evicted in its turn (it is not being used).
    """

    max_entries: int = 10_000
    max_bytes: int = 64 * 1024 * 1024
    sizeof: Callable[[T], int] = lambda value: 1
    clock: Callable[[], float] = time.monotonic
    stats: CacheStats = field(default_factory=CacheStats)

    def __post_init__(self) -> None:
        if self.max_entries < 1 or self.max_bytes < self.max_entries:
            raise ValueError("max_entries must be >= 1 and max_bytes >= max_entries")
        self._floor = self.max_bytes // self.max_entries
        # Plain LRU order in an OrderedDict: a hit is one dict read, one clock read and one
        # move_to_end (cachetools' TLRUCache took several times that on every hit).
        self._cache: OrderedDict[Hashable, _Entry[T]] = OrderedDict()
        self._weight = 0
        self._inflight: dict[Hashable, asyncio.Future[T]] = {}

    def __len__(self) -> int:
        return len(self._cache)

    def get(self, key: Hashable, max_age_s: float | None = None) -> T | None:
        """The cached value, or None. ``max_age_s`` also refuses an entry stored longer ago
        than that: a TTL lowered since the entry was stored takes effect at once."""
        entry = self._cache.get(key)
        if entry is None:
            return None
        now = self.clock()
        if now >= entry.expires or (max_age_s is not None and now - entry.stored >= max_age_s):
            self._drop(key)
            return None
        self._cache.move_to_end(key)
        return entry.value

    def put(self, key: Hashable, value: T, ttl_s: float) -> None:
        if ttl_s <= 0:
            return
        weight = max(self.sizeof(value), self._floor)
        if weight > self.max_bytes:
            return  # larger than the whole cache: not worth evicting everything for
        self._drop(key)
        now = self.clock()
        self._cache[key] = _Entry(value, now + ttl_s, weight, now)
        self._weight += weight
        while self._weight > self.max_bytes:
            _, evicted = self._cache.popitem(last=False)
            self._weight -= evicted.weight

    def _drop(self, key: Hashable) -> None:
        entry = self._cache.pop(key, None)
        if entry is not None:
            self._weight -= entry.weight

    def clear(self) -> None:
        self._cache.clear()
        self._weight = 0

    async def get_or_fetch(
        self,
        key: Hashable,
        ttl_s: float,
        fetch: Callable[[], Awaitable[T]],
        *,
        wait_s: float | None = None,
    ) -> tuple[T, Served]:
        """The value for ``key`` and how it was served.

        With ``ttl_s`` <= 0 the record type is never cached: every call fetches, and calls are
        not coalesced either (each lookup reaches the department). Otherwise an entry is used
        only while younger than ``ttl_s`` (the TTL in force now, not when it was stored), and
        concurrent calls for one key share a single fetch; a failed fetch is not cached and
        fails every waiter. A caller joining a fetch already in flight waits at most
        ``wait_s`` (its own budget; the fetch keeps its starter's) and then gets TimeoutError.
        """
        if ttl_s <= 0:
            self.stats.uncached += 1
            return await fetch(), Served.UNCACHED
        cached = self.get(key, max_age_s=ttl_s)
        if cached is not None:
            self.stats.hits += 1
            return cached, Served.HIT
        pending = self._inflight.get(key)
        if pending is not None:
            self.stats.coalesced += 1
            # shield: one waiter giving up (its caller's deadline) must not cancel the others'.
            return await asyncio.wait_for(asyncio.shield(pending), wait_s), Served.COALESCED
        self.stats.misses += 1
        task = asyncio.ensure_future(self._fill(key, ttl_s, fetch))
        self._inflight[key] = task
        # Also when every caller has gone: the fetch finishes (and is cached) on its own.
        task.add_done_callback(lambda _t: self._drop_inflight(key, task))
        return await asyncio.shield(task), Served.MISS

    async def _fill(self, key: Hashable, ttl_s: float, fetch: Callable[[], Awaitable[T]]) -> T:
        value = await fetch()
        self.put(key, value, ttl_s)
        return value

    def _drop_inflight(self, key: Hashable, task: asyncio.Future[T]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # retrieved: a fetch every caller abandoned logs no "never retrieved"


@dataclass
class TokenCache(Generic[T]):
    """Verified tokens → principal, keyed by the token's SHA-256 (the token is never stored).

    An entry lives until the earlier of the token's ``exp`` and ``max_age_s`` after it was
    verified; ``clear()`` drops everything (call it when issuer keys change). Full, it drops
    the oldest entry (insertion order). A plain dict: a hit is one hash, one dict read and one
    clock read (cachetools' TLRUCache, before, walked its expiry order on every read).
    """

    max_entries: int = 10_000
    max_age_s: float = 300.0
    clock: Callable[[], float] = time.time

    def __post_init__(self) -> None:
        self._cache: dict[bytes, tuple[T, float]] = {}

    @staticmethod
    def _key(token: str) -> bytes:
        return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()

    def get(self, token: str) -> T | None:
        key = self._key(token)
        entry = self._cache.get(key)
        if entry is None:
            return None
        if self.clock() >= entry[1]:  # exp (or the max age) reached: verified in full again
            self._cache.pop(key, None)
            return None
        return entry[0]

    def put(self, token: str, principal: T, exp: float) -> None:
        now = self.clock()
        expires = min(exp, now + self.max_age_s)
        if expires <= now:
            return
        key = self._key(token)
        self._cache.pop(key, None)  # a re-verified token moves to the young end
        while len(self._cache) >= self.max_entries:
            del self._cache[next(iter(self._cache))]
        self._cache[key] = (principal, expires)

    def clear(self) -> None:
        self._cache.clear()

    def __len__(self) -> int:
        return len(self._cache)
