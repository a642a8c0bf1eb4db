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
import hashlib
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from cachetools import TLRUCache

T = TypeVar("T")


@dataclass(frozen=True)
class RecordKey:
    """What a cached record answers: one record type of one citizen, exactly these fields."""

    record_type: str
    subject_id: str
    fields: tuple[str, ...]  # sorted: the same set always makes the same key


def record_key(record_type: str, subject_id: str, fields: tuple[str, ...]) -> RecordKey:
    return RecordKey(record_type, subject_id, tuple(sorted(fields)))


@dataclass
class _Entry(Generic[T]):
    value: T
    expires: float
    weight: int


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    coalesced: int = 0


@dataclass
class RecordCache(Generic[T]):
    """A bounded (entries and bytes) per-entry-TTL cache with single-flight fetching.

    ``sizeof`` gives a value's size in bytes. Each entry weighs at least
    ``max_bytes // max_entries``, so the one byte budget also bounds the number of entries.
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
        self._cache: TLRUCache[Hashable, _Entry[T]] = TLRUCache(
            maxsize=self.max_bytes,
            ttu=lambda _key, entry, _now: entry.expires,
            timer=self.clock,
            getsizeof=lambda entry: entry.weight,
        )
        self._inflight: dict[Hashable, asyncio.Future[T]] = {}

    def __len__(self) -> int:
        return len(self._cache)

    def get(self, key: Hashable) -> T | None:
        entry = self._cache.get(key)
        return None if entry is None else entry.value

    def put(self, key: Hashable, value: T, ttl_s: float) -> None:
        if ttl_s <= 0:
            return
        weight = max(self.sizeof(value), self._floor)
        if weight > self.max_bytes:
            return  # larger than the whole cache: not worth evicting everything for
        self._cache[key] = _Entry(value, self.clock() + ttl_s, weight)

    def clear(self) -> None:
        self._cache.clear()

    async def get_or_fetch(
        self, key: Hashable, ttl_s: float, fetch: Callable[[], Awaitable[T]]
    ) -> tuple[T, bool]:
        """The cached value (and True), or the fetched one (and False).

        With ``ttl_s`` <= 0 the record type is never cached: every call fetches, and calls are
        not coalesced either (each lookup reaches the department). Otherwise concurrent calls
        for one key share a single fetch; a failed fetch is not cached and fails every waiter.
        """
        if ttl_s <= 0:
            self.stats.misses += 1
            return await fetch(), False
        cached = self.get(key)
        if cached is not None:
            self.stats.hits += 1
            return cached, True
        pending = self._inflight.get(key)
        if pending is not None:
            self.stats.coalesced += 1
            # shield: one waiter giving up (its caller's deadline) must not cancel the others'.
            return await asyncio.shield(pending), False
        self.stats.misses += 1
        task = asyncio.ensure_future(fetch())
        self._inflight[key] = task
        try:
            value = await asyncio.shield(task)
        finally:
            if task.done():
                self._inflight.pop(key, None)
            else:  # our caller was cancelled: leave the fetch to the others, clean up later
                task.add_done_callback(lambda _t: self._inflight.pop(key, None))
        self.put(key, value, ttl_s)
        return value, False


@dataclass
class TokenCache(Generic[T]):
    """Verified tokens → principal, keyed by the token's SHA-256 (the token is never stored).

    An entry lives until the earlier of the token's ``exp`` and ``max_age_s`` after it was
    verified; ``clear()`` drops everything (call it when issuer keys change).
    """

    max_entries: int = 10_000
    max_age_s: float = 300.0
    clock: Callable[[], float] = time.time

    def __post_init__(self) -> None:
        self._cache: TLRUCache[bytes, _Entry[T]] = TLRUCache(
            maxsize=self.max_entries, ttu=lambda _k, entry, _now: entry.expires, timer=self.clock
        )

    @staticmethod
    def _key(token: str) -> bytes:
        return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()

    def get(self, token: str) -> T | None:
        entry = self._cache.get(self._key(token))
        if entry is None:
            return None
        if self.clock() >= entry.expires:  # the timer may be coarse; exp is exact
            self._cache.pop(self._key(token), None)
            return None
        return entry.value

    def put(self, token: str, principal: T, exp: float) -> None:
        expires = min(exp, self.clock() + self.max_age_s)
        if expires > self.clock():
            self._cache[self._key(token)] = _Entry(principal, expires, 1)

    def clear(self) -> None:
        self._cache.clear()

    def __len__(self) -> int:
        return len(self._cache)
