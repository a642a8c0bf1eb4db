"""MemoryQuotaCounter (one broker process): the stores' semantics exactly -- compared call by
call with the SQLite counter -- an exact limit, sliding windows, distinct citizens per clerk,
bounded memory (pruning, idle clerks swept), inline admission, and the choice of counter."""

from __future__ import annotations

import asyncio
import random
import threading
from pathlib import Path

import pytest

from certbroker.lookup.admission import AdmissionQueue
from certbroker.policy.counters import (
    MemoryQuotaCounter,
    PostgresQuotaCounter,
    SqliteQuotaCounter,
    open_counter,
)
from certbroker.policy.quota import MAX_PER_S, Quota
from tests.audit.pg_support import fresh_schema

T0 = 1_800_000_000.0
CITIZENS = Quota("citizens", ("window_clerk",), "distinct_subjects", 3, 3600)
LOOKUPS = Quota("lookups", ("window_clerk",), "lookups", 5, 60)


@pytest.fixture
def counter() -> MemoryQuotaCounter:
    return MemoryQuotaCounter()


def test_exactly_the_limit_is_admitted(counter: MemoryQuotaCounter) -> None:
    verdicts = [counter.admit("c1", [f"s{i}"], [LOOKUPS], T0 + i)[0] for i in range(7)]
    assert verdicts == [None] * 5 + [LOOKUPS] * 2
    many = Quota("many", ("window_clerk",), "lookups", 1000, 60)
    assert counter.admit("c2", ["a"] * 1001, [many], T0) == [None] * 1000 + [many]


def test_the_window_slides(counter: MemoryQuotaCounter) -> None:
    for i in range(5):
        assert counter.admit("c1", ["a"], [LOOKUPS], T0 + i) == [None]
    assert counter.admit("c1", ["a"], [LOOKUPS], T0 + 59.5) == [LOOKUPS]
    # A lookup at T0 leaves the window at T0 + 60 exactly (the window is (now - 60, now]).
    assert counter.admit("c1", ["a", "a"], [LOOKUPS], T0 + 60) == [None, LOOKUPS]
    assert counter.admit("c1", ["a"] * 5, [LOOKUPS], T0 + 200) == [None] * 5


def test_distinct_citizens_per_clerk(counter: MemoryQuotaCounter) -> None:
    assert counter.admit("c1", ["a", "b", "c"], [CITIZENS], T0) == [None, None, None]
    assert counter.admit("c1", ["d"], [CITIZENS], T0 + 10) == [CITIZENS]  # the 4th citizen
    assert counter.admit("c1", ["a", "b", "a"], [CITIZENS], T0 + 20) == [None] * 3  # seen
    assert counter.admit("c2", ["d", "e", "f"], [CITIZENS], T0 + 20) == [None] * 3  # per clerk
    # a, b were seen again at T0 + 20; c leaves the window an hour after T0: room for one.
    assert counter.admit("c1", ["d", "e"], [CITIZENS], T0 + 3600) == [None, CITIZENS]


def test_refused_lookups_count_toward_nothing(counter: MemoryQuotaCounter) -> None:
    both = [CITIZENS, LOOKUPS]
    verdicts = counter.admit("c1", ["a", "a", "b", "b", "c", "c", "d"], both, T0)
    assert verdicts == [None, None, None, None, None, LOOKUPS, CITIZENS]
    assert counter.admit("c1", ["a"] * 5, both, T0 + 60) == [None] * 5
    assert counter.admit("c1", ["a"], both, T0 + 61) == [LOOKUPS]


def test_the_same_verdicts_as_the_sqlite_store() -> None:
    """Random calls of three clerks (each with its roles' quotas: both kinds, one, overlapping
    windows) on both counters: every verdict equal (the SQLite store is what several
    processes share)."""
    quotas = [
        Quota("d", ("r",), "distinct_subjects", 4, 120),
        Quota("d-long", ("r",), "distinct_subjects", 6, 900),
        Quota("l", ("r",), "lookups", 6, 60),
        Quota("l-long", ("r",), "lookups", 15, 300),
    ]
    roles = {"c1": quotas, "c2": quotas[:2], "c3": quotas[2:], "c4": [quotas[0], quotas[3]]}
    rng = random.Random(19)
    memory, sqlite = MemoryQuotaCounter(), SqliteQuotaCounter(":memory:")
    try:
        now, admitted = T0, 0
        for _ in range(600):
            now += rng.choice([0.0, 0.5, 3.0, 10.0, 30.0, 61.0])
            clerk = rng.choice(list(roles))
            subjects = [f"s{rng.randrange(9)}" for _ in range(rng.randint(1, 4))]
            applied = roles[clerk]
            expected = sqlite.admit(clerk, subjects, applied, now)
            assert memory.admit(clerk, subjects, applied, now) == expected, (clerk, now)
            admitted += expected.count(None)
        assert 0 < admitted < 600 * 2.5  # both admissions and refusals were compared
    finally:
        sqlite.close()


def test_memory_is_bounded_by_the_windows(counter: MemoryQuotaCounter) -> None:
    rate = Quota("rate", ("window_clerk",), "lookups", 10, 60)
    wide = Quota("wide", ("window_clerk",), "distinct_subjects", 100_000, 600)
    admitted = 0
    for i in range(2000):  # a new citizen a second for over half an hour: 10 a minute admitted
        admitted += counter.admit("c1", [f"s{i}"], [rate, wide], T0 + i) == [None]
    assert admitted > 300
    state = counter._clerks["c1"]
    assert 0 < len(state.at) - state.first <= rate.limit  # only rows the minute can see
    assert len(state.at) <= 2 * rate.limit + 64  # pruned rows are compacted away
    assert 0 < len(state.subjects) <= 10 * 10  # only citizens the 10 minutes can see
    # Without a distinct_subjects quota in force no citizen is kept at all.
    counter.admit("c1", ["x"], [rate], T0 + 5000)
    assert state.subjects == {}


def test_idle_clerks_are_swept_after_a_day(counter: MemoryQuotaCounter) -> None:
    counter.admit("c1", ["a"], [LOOKUPS], T0)
    counter.admit("c2", ["a"], [LOOKUPS], T0 + 100)
    counter.admit("c3", ["a"], [LOOKUPS], T0 + MAX_PER_S + 50)
    assert len(counter) == 2  # c1's last lookup is a day old: gone; c2's not yet
    counter.admit("c3", ["a"], [LOOKUPS], T0 + MAX_PER_S + 200)
    assert len(counter) == 1


def test_a_clock_stepping_back_never_frees_room_early(counter: MemoryQuotaCounter) -> None:
    for _ in range(5):
        counter.admit("c1", ["a"], [LOOKUPS], T0 + 30)
    # The clock steps back 20 s: the five still count, stamped at T0 + 30.
    assert counter.admit("c1", ["a"], [LOOKUPS], T0 + 10) == [LOOKUPS]
    assert counter.admit("c1", ["a"], [LOOKUPS], T0 + 89) == [LOOKUPS]
    assert counter.admit("c1", ["a"], [LOOKUPS], T0 + 90) == [None]


def test_exact_when_threads_race(counter: MemoryQuotaCounter) -> None:
    limit = Quota("burst", ("window_clerk",), "lookups", 40, 60)
    admitted: list[bool] = []

    def work(index: int) -> None:
        for call in range(25):
            verdict = counter.admit("c1", [f"s{index}-{call}"], [limit], T0)
            admitted.append(verdict[0] is None)  # list.append is atomic

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert (len(admitted), sum(admitted)) == (100, 40)


def test_admission_is_inline_on_the_event_loop(counter: MemoryQuotaCounter) -> None:
    """The queue asks the memory counter at once: the coroutine finishes without suspending
    (no task, no thread hop), so no event loop is even needed."""
    queue = AdmissionQueue(counter)
    call = queue.admit("c1", ["a"], [LOOKUPS], T0)
    with pytest.raises(StopIteration) as done:
        call.send(None)
    assert done.value.value == [None]
    assert asyncio.run(queue.admit("c1", ["a"] * 5, [LOOKUPS], T0)) == [None] * 4 + [LOOKUPS]


# ---- the choice of counter (open_counter, the one place) ----


def test_one_process_counts_in_memory(tmp_path: Path) -> None:
    counter = open_counter(tmp_path / "audit.sqlite", tmp_path / "state", workers=1)
    assert isinstance(counter, MemoryQuotaCounter)
    assert counter.inline
    assert not (tmp_path / "state").exists()  # nothing written


def test_workers_share_the_state_dir_file(tmp_path: Path) -> None:
    counter = open_counter(tmp_path / "audit.sqlite", tmp_path / "state", workers=2)
    try:
        assert isinstance(counter, SqliteQuotaCounter)
        assert not counter.inline
        assert (tmp_path / "state" / "quotas.sqlite").exists()
    finally:
        counter.close()


@pytest.mark.postgres
@pytest.mark.parametrize("workers", [1, 2])
def test_a_cluster_counts_in_postgres(tmp_path: Path, workers: int) -> None:
    with fresh_schema() as location:
        counter = open_counter(location, tmp_path / "state", workers=workers)
        try:
            assert isinstance(counter, PostgresQuotaCounter)
            assert not counter.inline
        finally:
            counter.close()
