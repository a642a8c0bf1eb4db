"""The group-commit writer: one thread appending queued audit bodies to a store, batch by batch.

Store-agnostic (any :class:`BatchStore`; the broker's is
:class:`certbroker.audit.append.ChainStore`, on SQLite or PostgreSQL). Callers on any event loop
``await write(...)``; the event loop never touches the disk or the network.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from certbroker.audit.events import AUDIT_UNAVAILABLE
from certbroker.audit.store.rows import StoredRow
from certbroker.config import MAX_WAIT_S
from certbroker.errors import Unavailable

log = logging.getLogger(__name__)

CommitHook = Callable[[int, float], None]
"""``on_commit(entries, seconds)``: called after each committed batch (e.g. for metrics)."""
LockHook = Callable[[float], None]
"""``on_lock_wait(seconds)``: the time a batch waited for the log's cross-process write lock."""


class BatchStore(Protocol):
    """What the group-commit writer needs from a store. Called from one thread only.

    A store may also offer ``exclusive()``, a context manager that makes it the next writer
    of a log shared with other processes (``WriterSession.exclusive`` in
    :mod:`certbroker.audit.store.base`); the writer then holds it while it collects a batch.
    """

    def write_batch(self, bodies: Sequence[Mapping[str, object]]) -> list[StoredRow]:
        """Append ``bodies`` in order, all in one durable transaction, or none of them."""
        ...

    def close(self) -> None:
        """Release the store's connection."""
        ...


@dataclass
class _Pending:
    bodies: Sequence[Mapping[str, object]]  # one caller's entries: stored together or not at all
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[list[StoredRow]]


_Outcome = list[StoredRow] | BaseException


def _settle(batch: Sequence[tuple[_Pending, _Outcome]]) -> None:
    """Hand every caller of a batch its rows (or its error); called from the writer thread.

    One ``call_soon_threadsafe`` per event loop and batch, not per caller: each one writes to
    the loop's wake-up pipe (a system call) and schedules a callback, and under load a batch
    holds dozens of callers, nearly always of the same loop.
    """
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Pending, _Outcome]]] = {}
    for pending, result in batch:
        by_loop.setdefault(pending.loop, []).append((pending, result))
    for loop, items in by_loop.items():
        # A closed loop means nobody is waiting any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_resolve, items)


def _resolve(items: Sequence[tuple[_Pending, _Outcome]]) -> None:
    """On the callers' loop: complete their futures."""
    for pending, result in items:
        future = pending.future
        if future.done():  # the caller was cancelled; its entry is stored anyway
            continue
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)


class GroupCommitWriter:
    """One dedicated thread writing queued bodies to a :class:`BatchStore`, a batch at a time.

    Callers on any event loop ``await write(fields)``; the event loop never touches the disk.
    ``commits`` counts committed batches. ``on_commit(entries, seconds)``, if given, is called
    on the writer thread after each successful commit with the number of entries and the time
    the store took; ``on_lock_wait(seconds)`` with the time each batch waited for the store's
    cross-process write lock (``exclusive()``; about 0 for a store of one process). An
    exception from either is logged and never affects the audit.
    """

    def __init__(
        self,
        store: BatchStore,
        *,
        max_batch: int = 256,
        max_wait_s: float = 0.0,
        on_commit: CommitHook | None = None,
        on_lock_wait: LockHook | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if not 0.0 <= max_wait_s <= MAX_WAIT_S:
            raise ValueError(f"max_wait_s must be within 0..{MAX_WAIT_S}")
        self._store = store
        self._max_batch = max_batch
        self._max_wait_s = max_wait_s
        self._on_commit = on_commit
        self._on_lock_wait = on_lock_wait
        # A store shared with other processes (SQLite) offers its cross-process write lock;
        # holding it while the batch is collected lets the batch grow during the wait.
        self._exclusive: Callable[[], contextlib.AbstractContextManager[object]] = getattr(
            store, "exclusive", contextlib.nullcontext
        )
        # None is the stop marker. The lock makes "check closed, then enqueue" atomic with
        # "mark closed, then enqueue stop", so nothing is ever queued behind the stop marker.
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self.commits = 0
        self._thread = threading.Thread(
            target=self._run, name="certbroker-audit-writer", daemon=True
        )
        self._thread.start()

    async def write(self, fields: Mapping[str, object]) -> StoredRow:
        """Queue one body and wait for its stored row; ``Unavailable`` if it was not stored."""
        (row,) = await self.write_many([fields])
        return row

    async def write_many(self, bodies: Sequence[Mapping[str, object]]) -> list[StoredRow]:
        """Queue ``bodies`` as consecutive entries of ONE transaction (all stored, or none and
        ``Unavailable``) and wait for their rows, in order."""
        loop = asyncio.get_running_loop()
        pending = _Pending(list(bodies), loop, loop.create_future())
        with self._lock:
            if self._closed:
                raise Unavailable(AUDIT_UNAVAILABLE, "audit log is closed")
            self._queue.put(pending)
        return await pending.future

    async def aclose(self) -> None:
        """Write everything already queued, then stop the thread and close the store."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._queue.put(None)
        await asyncio.to_thread(self._thread.join)

    def _run(self) -> None:
        try:
            stop = False
            while not stop:
                first = self._queue.get()
                if first is None:
                    break
                batch = [first]
                # Whatever queued up while the previous batch was being fsynced goes into
                # this one: that is the group commit, and it needs no timer. max_wait_s > 0
                # additionally holds the batch open that long after its first entry (measured
                # slower on SQLite here, hence off by default; it may suit a remote store).
                stop = self._collect(batch, time.monotonic() + self._max_wait_s)
                try:
                    locking = time.perf_counter()
                    with self._exclusive():
                        self._lock_waited(time.perf_counter() - locking)
                        # Waiting for another process's writer is more time for entries to
                        # queue up here: they join this batch instead of waiting for the next.
                        if not stop:
                            stop = self._collect(batch, 0.0)
                        self._write(batch)
                except Exception as exc:  # the store's lock timed out: nothing was written
                    log.error("audit write lock of %d callers failed", len(batch), exc_info=exc)
                    _settle([(p, _unavailable("audit log unavailable", exc)) for p in batch])
        finally:
            with self._lock:
                self._closed = True
            self._fail_leftovers()
            try:
                self._store.close()
            except Exception:
                log.exception("closing the audit store failed")

    def _lock_waited(self, seconds: float) -> None:
        if self._on_lock_wait is not None:
            try:
                self._on_lock_wait(seconds)
            except Exception:  # a metrics hook must never break the audit
                log.exception("audit on_lock_wait hook failed")

    def _collect(self, batch: list[_Pending], deadline: float) -> bool:
        """Add queued callers to ``batch`` (up to max_batch), waiting until ``deadline`` for
        more; True if the stop marker was reached."""
        while len(batch) < self._max_batch:
            try:
                wait = deadline - time.monotonic()
                item = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
            except queue.Empty:
                return False
            if item is None:
                return True
            batch.append(item)
        return False

    def _write(self, batch: list[_Pending]) -> None:
        bodies = [body for p in batch for body in p.bodies]
        began = time.perf_counter()
        try:
            rows = self._store.write_batch(bodies)
            if len(rows) != len(bodies):  # a store bug; fail closed rather than leave callers
                raise RuntimeError(f"store returned {len(rows)} rows for {len(bodies)} entries")
        except Exception as exc:
            # The store rolled back: nothing of this batch is stored, so every caller fails.
            log.error("audit write of %d entries failed", len(bodies), exc_info=exc)
            _settle([(p, _unavailable("audit log unavailable", exc)) for p in batch])
            return
        elapsed = time.perf_counter() - began
        self.commits += 1
        start = 0
        settled: list[tuple[_Pending, _Outcome]] = []
        for pending in batch:
            settled.append((pending, rows[start : start + len(pending.bodies)]))
            start += len(pending.bodies)
        _settle(settled)
        if self._on_commit is not None:
            try:
                self._on_commit(len(rows), elapsed)
            except Exception:  # a metrics hook must never break the audit
                log.exception("audit on_commit hook failed")

    def _fail_leftovers(self) -> None:
        # Only reachable if the loop above died; normally nothing is queued behind the stop.
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                _settle([(item, _unavailable("audit log is closed", None))])


def _unavailable(message: str, cause: BaseException | None) -> Unavailable:
    # A fresh exception per caller: one instance raised in many tasks would share a traceback.
    err = Unavailable(AUDIT_UNAVAILABLE, message)
    err.__cause__ = cause
    return err
