"""Quota admissions from the event loop: concurrent lookups' admissions share one transaction.

A counter that is ``inline`` (:class:`~certbroker.policy.counters.MemoryQuotaCounter`, a broker
that is one process) is simply called on the event loop; what follows is about the others.

A :class:`~certbroker.policy.counters.QuotaCounter` is a database (the state dir's SQLite,
shared by the workers, or PostgreSQL): each admission waits on a lock and a commit, which must
not stall the event loop, so it runs on a worker thread. A thread hop per lookup costs more
than the admission itself (the thread wins the GIL back from a busy event loop after every
statement), so :class:`AdmissionQueue` batches: the admissions that arrive while one batch is
being committed form the next, run in ONE transaction on one thread hop
(:meth:`~certbroker.policy.counters.QuotaCounter.admit_many`), in arrival order, each seeing
the ones before it. Exactness is the counter's: batching changes how many commits, not what is
counted. Under light load a batch is one admission, as before.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from certbroker.policy.counters import Admission, QuotaCounter
from certbroker.policy.quota import Quota

__all__ = ["AdmissionQueue"]


class AdmissionQueue:
    """Admissions to ``counter``, batched per commit (see the module docstring). Used from one
    event loop."""

    def __init__(self, counter: QuotaCounter) -> None:
        self._counter = counter
        self._pending: list[tuple[Admission, asyncio.Future[list[Quota | None]]]] = []
        self._flushing: asyncio.Task[None] | None = None

    async def admit(
        self, clerk: str, subjects: Sequence[str], quotas: Sequence[Quota], now: float
    ) -> list[Quota | None]:
        """:meth:`QuotaCounter.admit`, in the next batch. Raises what the counter raises
        (``Unavailable`` ``QUOTA_UNAVAILABLE``). An ``inline`` counter (in memory) is asked
        right here, on the event loop: nothing to batch, no thread hop."""
        if self._counter.inline:
            return self._counter.admit(clerk, subjects, quotas, now)
        future: asyncio.Future[list[Quota | None]] = asyncio.get_running_loop().create_future()
        self._pending.append(((clerk, subjects, quotas, now), future))
        if self._flushing is None:
            self._flushing = asyncio.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        """Commit batches until none is waiting. A caller cancelled meanwhile still counted if
        its batch was under way (as a lookup whose fetch then fails)."""
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    verdicts = await asyncio.to_thread(
                        self._counter.admit_many, [call for call, _ in batch]
                    )
                except Exception as exc:  # noqa: BLE001 - handed to every caller of the batch
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), verdict in zip(batch, verdicts, strict=True):
                    if not future.done():
                        future.set_result(verdict)
        finally:
            self._flushing = None
            for _, future in self._pending:  # only when this task itself was cancelled
                future.cancel()
            self._pending = []
