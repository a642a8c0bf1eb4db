"""AdmissionQueue: concurrent admissions share commits, stay exact, and share a failure."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

from certbroker import errors
from certbroker.lookup.admission import AdmissionQueue
from certbroker.policy.counters import Admission, SqliteQuotaCounter
from certbroker.policy.quota import Quota

RATE = Quota("rate", ("window_clerk",), "lookups", 20, 60)


class Counting(SqliteQuotaCounter):
    """The real counter, remembering the size of every transaction."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.batches: list[int] = []

    def admit_many(self, calls: Sequence[Admission]) -> list[list[Quota | None]]:
        self.batches.append(len(calls))
        return super().admit_many(calls)


def test_concurrent_admissions_share_commits_and_stay_exact(tmp_path: Path) -> None:
    counter = Counting(tmp_path / "quotas.sqlite")

    async def main() -> list[list[Quota | None]]:
        queue = AdmissionQueue(counter)
        calls = [queue.admit("c1", [f"s{i}"], [RATE], 1_800_000_000.0) for i in range(50)]
        return await asyncio.gather(*calls)

    try:
        verdicts = asyncio.run(main())
    finally:
        counter.close()
    assert [v[0] for v in verdicts] == [None] * 20 + [RATE] * 30  # in arrival order
    assert sum(counter.batches) == 50
    assert len(counter.batches) < 50  # batched: the first alone, the rest while it committed


def test_a_failed_batch_fails_each_of_its_callers(tmp_path: Path) -> None:
    counter = SqliteQuotaCounter(tmp_path / "quotas.sqlite")
    counter.close()  # every transaction now fails

    async def main() -> list[object]:
        queue = AdmissionQueue(counter)
        calls = [queue.admit("c1", ["s"], [RATE], 1_800_000_000.0) for _ in range(3)]
        return await asyncio.gather(*calls, return_exceptions=True)

    results = asyncio.run(main())
    assert all(isinstance(r, errors.Unavailable) for r in results), results
    assert {r.reason for r in results if isinstance(r, errors.Unavailable)} == {"QUOTA_UNAVAILABLE"}


def test_a_queue_flushes_again_after_it_went_idle(tmp_path: Path) -> None:
    counter = SqliteQuotaCounter(tmp_path / "quotas.sqlite")
    limit = Quota("rate", ("window_clerk",), "lookups", 1, 60)

    async def main() -> list[list[Quota | None]]:
        queue = AdmissionQueue(counter)
        first = await queue.admit("c1", ["a"], [limit], 1_800_000_000.0)
        return [first, await queue.admit("c1", ["b"], [limit], 1_800_000_000.0)]

    try:
        assert asyncio.run(main()) == [[None], [limit]]
    finally:
        counter.close()
