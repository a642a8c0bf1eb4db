"""Tests for the tamper-evident audit log (certbroker.audit: events, log, writer, append, store)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import sqlite3
import threading
import unicodedata
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from contextlib import closing
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest

from certbroker.audit import (
    AuditEvent,
    AuditLog,
    BatchingAuditLog,
    QueryFilter,
    Receipt,
    SQLiteAuditLog,
    query,
)
from certbroker.audit.append import ChainStore
from certbroker.audit.store.rows import StoredRow
from certbroker.audit.store.sqlite import (
    SQLITE_CHUNK,
    WAL_CHECKPOINT_PAGES,
    WRITER_CACHE_KIB,
    SQLiteBackend,
)
from certbroker.audit.verify.chain import verify
from certbroker.cli.table import format_table
from certbroker.errors import Unavailable, to_status

T = TypeVar("T")
GENESIS = "0" * 64
START = 1_700_000_000.0  # 2023-11-14T22:13:20Z


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


class StepClock:
    """A clock that advances ``step`` seconds per reading."""

    def __init__(self, start: float = START, step: float = 60.0) -> None:
        self.now = start
        self.step = step

    def __call__(self) -> float:
        value = self.now
        self.now += self.step
        return value


def make_event(**overrides: Any) -> AuditEvent:
    fields: dict[str, Any] = {
        "kind": "lookup",
        "clerk": "clerk-1",
        "office": "hall-07",
        "roles": ("clerk", "household_reader"),
        "subject_id": "110101199003074514",
        "matter_code": "M-HOUSING",
        "case_number": "CASE-2024-0001",
        "consent_method": "id_card_read",
        "record_type": "household",
        "decision": "allow",
        "rule_id": "housing-household",
        "withheld_fields": ("members.id_number",),
        "outcome": "OK",
        "status": "OK",
        "policy_version": "a" * 64,
        "department": "public_security",
        "latency_ms": 12.5,
        "decision_id": "dec-1",
    }
    fields.update(overrides)
    return AuditEvent(**fields)


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def canonical(body: Mapping[str, Any]) -> str:
    """The documented encoding, written out independently of the module."""
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def rows(path: Path) -> list[tuple[Any, ...]]:
    with closing(sqlite3.connect(path)) as conn:
        return conn.execute(
            "SELECT seq, body, prev_hash, entry_hash FROM audit_log ORDER BY seq"
        ).fetchall()


def append_all(path: Path, events: Sequence[AuditEvent], **kwargs: Any) -> list[Receipt]:
    async def main() -> list[Receipt]:
        async with SQLiteAuditLog(path, **kwargs) as log:
            return [await log.append(event) for event in events]

    return run(main())


# --- append, receipt, chain ---------------------------------------------------------------


def test_receipt_hash_matches_the_documented_formula(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    event = make_event(clerk="张三", office="朝阳区政务大厅")
    [receipt] = append_all(path, [event], clock=lambda: START + 0.25)

    assert receipt.sequence == 1
    expected = {
        **{
            f.name: getattr(event, f.name)
            for f in dataclasses.fields(AuditEvent)
            if f.name not in EVIDENCE_ONLY
        },
        "roles": ["clerk", "household_reader"],
        "withheld_fields": ["members.id_number"],
        "entry_id": receipt.entry_id,
        "time": "2023-11-14T22:13:20.250Z",
        "seq": 1,
        "v": 1,
    }
    body_text = canonical(expected)
    [(seq, body, prev_hash, entry_hash)] = rows(path)
    assert (seq, body, prev_hash) == (1, body_text, GENESIS)
    assert "张三" in body  # raw UTF-8, not \u escapes
    assert receipt.entry_hash == sha256_hex(GENESIS + body_text) == entry_hash
    assert len(receipt.entry_id) == 32
    int(receipt.entry_id, 16)


def test_body_holds_exactly_the_documented_keys(tmp_path: Path) -> None:
    # Guards against anything (e.g. record contents) sneaking into the hashed body.
    path = tmp_path / "audit.db"
    append_all(path, [make_event()])
    [(_, body, _, _)] = rows(path)
    event_keys = {f.name for f in dataclasses.fields(AuditEvent)}
    assert set(json.loads(body)) == event_keys - EVIDENCE_ONLY | {"entry_id", "time", "seq", "v"}
    # A lookup that issued evidence adds the digest and the field names, never the values.
    evidence = dataclasses.replace(
        make_event(), released_fields=("name",), released_digest="0" * 64
    )
    append_all(path, [evidence])
    body = rows(path)[1][1]
    assert set(json.loads(body)) == event_keys | {"entry_id", "time", "seq", "v"}


#: Entry keys written only by a lookup that issued an evidence document (certbroker.evidence).
EVIDENCE_ONLY = {"released_fields", "released_digest"}


def test_chain_links_every_entry(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    receipts = append_all(path, [make_event(clerk=f"c{i}") for i in range(30)])

    assert [r.sequence for r in receipts] == list(range(1, 31))
    prev = GENESIS
    for (seq, body, prev_hash, entry_hash), receipt in zip(rows(path), receipts, strict=True):
        assert prev_hash == prev
        assert entry_hash == sha256_hex(prev_hash + body) == receipt.entry_hash
        assert json.loads(body)["seq"] == seq
        prev = entry_hash
    report = verify(path)
    assert report.ok
    assert (report.entries, report.first_bad, report.problem) == (30, None, "")
    assert report.head_hash == receipts[-1].entry_hash


def test_reopening_continues_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    first = append_all(path, [make_event() for _ in range(3)])
    [fourth] = append_all(path, [make_event(clerk="later")])

    assert fourth.sequence == 4
    assert rows(path)[3][2] == first[-1].entry_hash
    report = verify(path)
    assert report.ok
    assert report.entries == 4


def test_writer_connection_is_wal_with_synchronous_full(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"

    async def main() -> dict[str, object]:
        async with SQLiteAuditLog(path) as log:
            return log.settings

    # and the page cache and checkpoint interval that keep appends to a large log fast
    assert run(main()) == {
        "journal_mode": "wal",
        "synchronous": 2,
        "cache_size": -WRITER_CACHE_KIB,
        "wal_autocheckpoint": WAL_CHECKPOINT_PAGES,
    }
    with closing(sqlite3.connect(path)) as conn:  # WAL is a property of the file
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert os.stat(path).st_mode & 0o777 == 0o600


def test_sqlite_log_is_the_audit_log_plug_point(tmp_path: Path) -> None:
    async def main() -> Receipt:
        log: AuditLog = SQLiteAuditLog(tmp_path / "audit.db")
        try:
            return await log.append(make_event())
        finally:
            await log.aclose()

    assert run(main()).sequence == 1


# --- group commit -------------------------------------------------------------------------


def test_concurrent_appends_share_transactions(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"

    async def main() -> tuple[list[Receipt], int, list[threading.Thread]]:
        log = SQLiteAuditLog(path)
        with closing(sqlite3.connect(path, isolation_level=None)) as blocker:
            # Hold the write lock so the writer cannot commit until all 200 are queued:
            # batching is then certain, not a matter of thread timing.
            blocker.execute("BEGIN IMMEDIATE")
            tasks = [
                asyncio.create_task(log.append(make_event(case_number=f"C{i}"))) for i in range(200)
            ]
            await asyncio.sleep(0)  # each task runs up to its await: all 200 are queued
            blocker.execute("COMMIT")
            receipts = await asyncio.gather(*tasks)
        writers = [t for t in threading.enumerate() if t.name == "certbroker-audit-writer"]
        await log.aclose()
        return receipts, log.commits, writers

    receipts, commits, writers = run(main())

    assert [r.sequence for r in receipts] == list(range(1, 201))  # queue order, no gaps
    assert len({r.entry_id for r in receipts}) == 200
    assert len(writers) == 1
    assert 1 <= commits <= 2 < 200
    assert len(rows(path)) == 200
    report = verify(path)
    assert report.ok
    assert report.entries == 200


def test_callers_on_several_event_loops_are_each_answered(tmp_path: Path) -> None:
    """Loops in three threads append at once (their entries share batches as they come):
    every caller gets its own receipt, on its own loop, and the chain has no gaps."""
    path = tmp_path / "audit.db"
    log = SQLiteAuditLog(path)
    start = threading.Barrier(3)
    results: dict[int, list[Receipt]] = {}

    def caller(index: int) -> None:
        async def main() -> list[Receipt]:
            start.wait()
            events = [make_event(case_number=f"L{index}-{i}") for i in range(50)]
            return list(await asyncio.gather(*(log.append(e) for e in events)))

        results[index] = asyncio.run(main())

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    run(log.aclose())
    assert sorted(results) == [0, 1, 2]
    sequences = sorted(r.sequence for receipts in results.values() for r in receipts)
    assert sequences == list(range(1, 151))
    assert len({r.entry_id for receipts in results.values() for r in receipts}) == 150
    assert verify(path).ok


def test_batch_size_is_bounded(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"

    async def main() -> int:
        async with SQLiteAuditLog(path, max_batch=8) as log:
            with closing(sqlite3.connect(path, isolation_level=None)) as blocker:
                blocker.execute("BEGIN IMMEDIATE")
                tasks = [asyncio.create_task(log.append(make_event())) for _ in range(50)]
                await asyncio.sleep(0)
                blocker.execute("COMMIT")
                await asyncio.gather(*tasks)
            return log.commits

    assert run(main()) >= 7  # ceil(50 / 8)
    assert verify(path).entries == 50


def test_two_writers_on_one_file_keep_one_chain(tmp_path: Path) -> None:
    # Two logs stand in for two broker processes: the tail is read inside each write
    # transaction, so their batches interleave without forking the chain.
    path = tmp_path / "audit.db"

    async def main() -> list[Receipt]:
        async with SQLiteAuditLog(path) as one, SQLiteAuditLog(path) as two:
            appends = [
                log.append(make_event(clerk=name))
                for _ in range(100)
                for log, name in ((one, "one"), (two, "two"))
            ]
            return await asyncio.gather(*appends)

    receipts = run(main())
    assert sorted(r.sequence for r in receipts) == list(range(1, 201))
    report = verify(path)
    assert report.ok
    assert report.entries == 200


@contextlib.contextmanager
def writer_lock_held(log_path: Path) -> Iterator[None]:
    """Hold ``log_path``'s writer lock file as another process's writer would."""
    fd = os.open(f"{log_path}-writer.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def test_writers_queue_on_the_writer_lock_file(tmp_path: Path) -> None:
    # Another process's writer holds the lock: our entries wait for it (in the kernel, not in
    # SQLite's sleeping busy wait), and all that queued meanwhile go in ONE transaction.
    path = tmp_path / "audit.db"

    async def main() -> tuple[bool, list[Receipt], int]:
        async with SQLiteAuditLog(path) as log:
            await log.append(make_event(clerk="first"))
            lock = tmp_path / "audit.db-writer.lock"
            assert os.stat(lock).st_mode & 0o777 == 0o600
            commits = log.commits
            with writer_lock_held(path):
                pending = asyncio.gather(*(log.append(make_event()) for _ in range(20)))
                await asyncio.sleep(0.3)
                waited = not pending.done()
            receipts = await asyncio.wait_for(pending, 30)
            return waited, receipts, log.commits - commits

    waited, receipts, commits = run(main())
    assert waited
    assert sorted(r.sequence for r in receipts) == list(range(2, 22))
    assert commits == 1
    assert verify(path).entries == 21


def test_a_writer_lock_held_too_long_elsewhere_fails_closed(tmp_path: Path) -> None:
    # A stuck writer in another process: after busy_timeout the append is refused, not hung,
    # and the log takes entries again once the lock is free.
    path = tmp_path / "audit.db"

    async def main() -> tuple[BaseException | None, Receipt]:
        async with SQLiteAuditLog(path, busy_timeout=0.2) as log:
            refused: BaseException | None = None
            with writer_lock_held(path):
                try:
                    await asyncio.wait_for(log.append(make_event(clerk="stuck")), 30)
                except Unavailable as exc:
                    refused = exc
            return refused, await log.append(make_event(clerk="after"))

    refused, receipt = run(main())
    assert isinstance(refused, Unavailable)
    assert refused.reason == "AUDIT_UNAVAILABLE"
    assert receipt.sequence == 1
    assert [json.loads(r[1])["clerk"] for r in rows(path)] == ["after"]


class GatedStore:
    """A BatchStore wrapper that holds the first batch until the test opens the gate."""

    def __init__(self, inner: ChainStore) -> None:
        self.inner = inner
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.batches: list[list[str]] = []

    def write_batch(self, bodies: Sequence[Mapping[str, object]]) -> list[StoredRow]:
        self.entered.set()
        self.gate.wait(timeout=60)
        self.batches.append([str(b["clerk"]) for b in bodies])
        return self.inner.write_batch(bodies)

    def close(self) -> None:
        self.inner.close()


def test_a_failed_batch_fails_every_caller_in_it(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    store = GatedStore(ChainStore.open(SQLiteBackend(path)))
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute(
            "CREATE TRIGGER poison BEFORE INSERT ON audit_log WHEN NEW.clerk = 'poison' "
            "BEGIN SELECT RAISE(ABORT, 'disk full'); END"
        )

    async def main() -> tuple[Receipt, list[Receipt | BaseException], int]:
        async with BatchingAuditLog(store) as log:
            primer = asyncio.create_task(log.append(make_event(clerk="primer")))
            await asyncio.to_thread(store.entered.wait)  # writer holds [primer] at the gate
            clerks = ["good-1", "poison", "good-2", "good-3"]
            tasks = [asyncio.create_task(log.append(make_event(clerk=c))) for c in clerks]
            await asyncio.sleep(0)  # all four queued behind the primer
            store.gate.set()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            return await primer, results, log.commits

    primer, results, commits = run(main())

    assert store.batches == [["primer"], ["good-1", "poison", "good-2", "good-3"]]
    assert primer.sequence == 1
    assert commits == 1
    for result in results:
        assert isinstance(result, Unavailable)
        assert result.reason == "AUDIT_UNAVAILABLE"
    assert len(rows(path)) == 1
    assert verify(path).ok


def test_a_store_batch_is_one_transaction(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    store = ChainStore.open(SQLiteBackend(path))

    def body(clerk: str) -> dict[str, object]:
        return {
            "entry_id": clerk,
            "time": "2024-01-01T00:00:00.000Z",
            "clerk": clerk,
            "subject_id": "s",
            "matter_code": "m",
            "record_type": "household",
            "decision": "allow",
        }

    try:
        with closing(sqlite3.connect(path, isolation_level=None)) as conn:
            conn.execute(
                "CREATE TRIGGER poison BEFORE INSERT ON audit_log WHEN NEW.clerk = 'poison' "
                "BEGIN SELECT RAISE(ABORT, 'disk full'); END"
            )
        with pytest.raises(sqlite3.IntegrityError, match="disk full"):
            store.write_batch([body("a"), body("poison"), body("c")])
        assert rows(path) == []
        written = store.write_batch([body("a"), body("c")])
        assert [r.seq for r in written] == [1, 2]
    finally:
        store.close()


def test_batches_larger_than_one_insert_statement_are_stored_whole(tmp_path: Path) -> None:
    # Rows go in as multi-row INSERTs of SQLITE_CHUNK rows: full chunks and a rest.
    path = tmp_path / "audit.db"
    sizes = [1, SQLITE_CHUNK, SQLITE_CHUNK + 1, 2 * SQLITE_CHUNK + 7]

    async def main() -> list[list[Receipt]]:
        async with SQLiteAuditLog(path) as log:
            return [await log.append_many([make_event()] * n) for n in sizes]

    batches = run(main())
    assert [len(b) for b in batches] == sizes
    assert [r.sequence for b in batches for r in b] == list(range(1, sum(sizes) + 1))
    report = verify(path)
    assert report.ok
    assert report.entries == sum(sizes)


def test_write_failure_raises_unavailable_and_leaves_no_partial_entry(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"

    async def main() -> None:
        async with SQLiteAuditLog(path) as log:
            for _ in range(3):
                await log.append(make_event())
            with closing(sqlite3.connect(path, isolation_level=None)) as saboteur:
                saboteur.execute(
                    "CREATE TRIGGER disk_full BEFORE INSERT ON audit_log "
                    "BEGIN SELECT RAISE(ABORT, 'disk full'); END"
                )
            results = await asyncio.gather(
                *(log.append(make_event()) for _ in range(20)), return_exceptions=True
            )
            for result in results:
                assert isinstance(result, Unavailable)
                assert result.reason == "AUDIT_UNAVAILABLE"
                assert to_status(result)[0] == grpc.StatusCode.UNAVAILABLE
            assert len(rows(path)) == 3
            report = verify(path)
            assert report.ok
            assert report.entries == 3

            with closing(sqlite3.connect(path, isolation_level=None)) as saboteur:
                saboteur.execute("DROP TRIGGER disk_full")
            after = await log.append(make_event())
            assert after.sequence == 4

    run(main())
    assert verify(path).ok


def test_cancelled_caller_still_gets_its_entry_written(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    store = GatedStore(ChainStore.open(SQLiteBackend(path)))

    async def main() -> None:
        async with BatchingAuditLog(store) as log:
            task = asyncio.create_task(log.append(make_event()))
            await asyncio.to_thread(store.entered.wait)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            store.gate.set()

    run(main())
    assert len(rows(path)) == 1


def test_append_after_close_is_unavailable(tmp_path: Path) -> None:
    async def main() -> None:
        log = SQLiteAuditLog(tmp_path / "audit.db")
        await log.aclose()
        await log.aclose()  # idempotent
        with pytest.raises(Unavailable) as info:
            await log.append(make_event())
        assert info.value.reason == "AUDIT_UNAVAILABLE"

    run(main())


@pytest.mark.parametrize(
    "bad",
    [
        {"latency_ms": float("nan")},
        {"latency_ms": float("inf")},
        {"decision": "maybe"},
        {"roles": ["clerk"]},
    ],
)
def test_malformed_events_are_refused(tmp_path: Path, bad: dict[str, Any]) -> None:
    path = tmp_path / "audit.db"

    async def main() -> None:
        async with SQLiteAuditLog(path) as log:
            with pytest.raises((TypeError, ValueError)):
                await log.append(make_event(**bad))

    run(main())
    assert rows(path) == []


def test_unopenable_path_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(Unavailable) as info:
        SQLiteAuditLog(tmp_path / "missing-dir" / "audit.db")
    assert info.value.reason == "AUDIT_UNAVAILABLE"


# --- verify: tampering --------------------------------------------------------------------

Tamper = Callable[[sqlite3.Connection], None]


def _body(conn: sqlite3.Connection, seq: int) -> str:
    return str(conn.execute("SELECT body FROM audit_log WHERE seq = ?", (seq,)).fetchone()[0])


def _hash(conn: sqlite3.Connection, seq: int) -> str:
    return str(conn.execute("SELECT entry_hash FROM audit_log WHERE seq = ?", (seq,)).fetchone()[0])


def edit_body(seq: int) -> Tamper:
    def tamper(conn: sqlite3.Connection) -> None:
        body = _body(conn, seq)
        edited = body.replace(f'"clerk":"clerk-{seq}"', '"clerk":"mallory"')
        assert edited != body
        conn.execute("UPDATE audit_log SET body = ? WHERE seq = ?", (edited, seq))

    return tamper


def edit_body_and_rehash(conn: sqlite3.Connection) -> None:
    # A careful forger recomputes the edited entry's own hash; the next entry still
    # points at the old one.
    edited = _body(conn, 5).replace('"decision":"deny"', '"decision":"allow"')
    assert edited != _body(conn, 5)
    prev = _hash(conn, 4)
    conn.execute(
        "UPDATE audit_log SET body = ?, decision = 'allow', entry_hash = ? WHERE seq = 5",
        (edited, sha256_hex(prev + edited)),
    )


def set_column(column: str, value: str) -> Tamper:
    def tamper(conn: sqlite3.Connection) -> None:
        conn.execute(f"UPDATE audit_log SET {column} = ? WHERE seq = 5", (value,))

    return tamper


def delete_entry(conn: sqlite3.Connection) -> None:
    conn.execute("DELETE FROM audit_log WHERE seq = 5")


def swap_entries(conn: sqlite3.Connection) -> None:
    # Exchange the rows' positions: seq 4 <-> 7.
    conn.execute("UPDATE audit_log SET seq = -1 WHERE seq = 4")
    conn.execute("UPDATE audit_log SET seq = 4 WHERE seq = 7")
    conn.execute("UPDATE audit_log SET seq = 7 WHERE seq = -1")


def insert_forged(self_consistent: bool) -> Tamper:
    def tamper(conn: sqlite3.Connection) -> None:
        # Make room at 5 by moving 5.. up by one (negate first: seq is unique).
        conn.execute("UPDATE audit_log SET seq = -seq WHERE seq >= 5")
        conn.execute("UPDATE audit_log SET seq = 1 - seq WHERE seq < 0")
        body = json.loads(_body(conn, 6))
        body.update(entry_id="f" * 32, clerk="mallory", seq=5)
        text = canonical(body)
        prev = _hash(conn, 4)
        entry_hash = sha256_hex(prev + text) if self_consistent else "e" * 64
        conn.execute(
            "INSERT INTO audit_log (seq, entry_id, time, clerk, subject_id, matter_code, "
            "record_type, decision, body, prev_hash, entry_hash) "
            "VALUES (5, ?, ?, 'mallory', ?, ?, ?, ?, ?, ?, ?)",
            (
                body["entry_id"],
                body["time"],
                body["subject_id"],
                body["matter_code"],
                body["record_type"],
                body["decision"],
                text,
                prev,
                entry_hash,
            ),
        )

    return tamper


@pytest.mark.parametrize(
    ("tamper", "first_bad"),
    [
        pytest.param(edit_body(5), 5, id="edit-body-middle"),
        pytest.param(edit_body(1), 1, id="edit-body-first"),
        pytest.param(edit_body(10), 10, id="edit-body-last"),
        pytest.param(edit_body_and_rehash, 6, id="edit-and-rehash"),
        pytest.param(set_column("clerk", "mallory"), 5, id="edit-indexed-clerk"),
        pytest.param(set_column("subject_id", "X"), 5, id="edit-indexed-subject"),
        pytest.param(set_column("decision", "allow"), 5, id="edit-indexed-decision"),
        pytest.param(set_column("time", "2020-01-01T00:00:00.000Z"), 5, id="edit-indexed-time"),
        pytest.param(set_column("entry_hash", "e" * 64), 5, id="edit-entry-hash"),
        pytest.param(set_column("prev_hash", "e" * 64), 5, id="edit-prev-hash"),
        pytest.param(set_column("body", "not json"), 5, id="garbage-body"),
        pytest.param(delete_entry, 5, id="delete-middle"),
        pytest.param(swap_entries, 4, id="swap"),
        pytest.param(insert_forged(self_consistent=True), 6, id="insert-consistent-forgery"),
        pytest.param(insert_forged(self_consistent=False), 5, id="insert-bad-forgery"),
    ],
)
def test_verify_finds_the_first_tampered_entry(
    tmp_path: Path, tamper: Tamper, first_bad: int
) -> None:
    path = tmp_path / "audit.db"
    decisions = ["allow", "deny"]
    append_all(
        path,
        [make_event(clerk=f"clerk-{i}", decision=decisions[i % 2]) for i in range(1, 11)],
    )
    assert verify(path).ok
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        tamper(conn)
    before = path.read_bytes()

    report = verify(path)

    assert not report.ok
    assert report.first_bad == first_bad, report.problem
    assert report.problem.startswith(f"entry {first_bad}: ")
    assert report.head_hash == ""
    assert report.entries == len(rows(path))
    assert path.read_bytes() == before  # verify never writes


def test_verify_empty_and_missing(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"

    async def main() -> None:
        await SQLiteAuditLog(path).aclose()

    run(main())
    assert verify(path) == verify(path)
    report = verify(path)
    assert (report.ok, report.entries, report.first_bad) == (True, 0, None)
    with pytest.raises(FileNotFoundError):
        verify(tmp_path / "nope.db")


# --- query and table ----------------------------------------------------------------------

EVENTS = [
    make_event(clerk="alice", subject_id="S1", matter_code="M-HOUSING", record_type="household"),
    make_event(
        clerk="bob",
        subject_id="S2",
        matter_code="M-PENSION",
        record_type="social_security",
        decision="deny",
        outcome="POLICY_DENIED",
        status="PERMISSION_DENIED",
    ),
    make_event(
        clerk="alice",
        subject_id="S2",
        matter_code="M-PENSION",
        record_type="social_security",
        decision="",
        rule_id="",
        outcome="BAD_SUBJECT_ID",
        status="INVALID_ARGUMENT",
    ),
    make_event(clerk="carol", subject_id="S1", matter_code="M-HOUSING", record_type="property"),
    make_event(clerk="alice", subject_id="S3", matter_code="M-MARRIAGE", record_type="marriage"),
]


def at(index: int) -> datetime:
    """Time of the entry at ``index`` under ``StepClock()``."""
    return datetime.fromtimestamp(START, UTC) + timedelta(minutes=index)


@pytest.fixture
def populated(tmp_path: Path) -> Path:
    path = tmp_path / "audit.db"
    append_all(path, EVENTS, clock=StepClock())
    return path


@pytest.mark.parametrize(
    ("flt", "expected"),
    [
        (QueryFilter(), [1, 2, 3, 4, 5]),
        (QueryFilter(clerk="alice"), [1, 3, 5]),
        (QueryFilter(subject_id="S2"), [2, 3]),
        (QueryFilter(matter_code="M-HOUSING"), [1, 4]),
        (QueryFilter(record_type="property"), [4]),
        (QueryFilter(decision="deny"), [2]),
        (QueryFilter(decision=""), [3]),
        (QueryFilter(clerk="alice", decision="allow"), [1, 5]),
        (QueryFilter(since=at(1)), [2, 3, 4, 5]),
        (QueryFilter(until=at(3)), [1, 2, 3]),
        (QueryFilter(since=at(1), until=at(3)), [2, 3]),
        (QueryFilter(since=at(1).astimezone(timezone(timedelta(hours=8))), until=at(3)), [2, 3]),
        (QueryFilter(limit=2), [4, 5]),
        (QueryFilter(clerk="alice", limit=2), [3, 5]),
        (QueryFilter(limit=0), []),
        (QueryFilter(clerk="nobody"), []),
    ],
)
def test_query_filters(populated: Path, flt: QueryFilter, expected: list[int]) -> None:
    assert [e.sequence for e in query(populated, flt)] == expected


def test_query_returns_the_stored_events(populated: Path) -> None:
    entries = query(populated, QueryFilter())
    assert [e.event for e in entries] == EVENTS
    assert entries[1].time == "2023-11-14T22:14:20.000Z"
    assert entries[0].prev_hash == GENESIS
    assert entries[1].prev_hash == entries[0].entry_hash


def test_query_rejects_naive_times(populated: Path) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        query(populated, QueryFilter(since=datetime(2024, 1, 1)))


def display_width(text: str) -> int:
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def test_format_table_has_the_columns(populated: Path) -> None:
    table = format_table(query(populated, QueryFilter()))
    header, rule, *lines = table.splitlines()
    for column in (
        "SEQ",
        "TIME",
        "CLERK",
        "OFFICE",
        "SUBJECT",
        "MATTER",
        "CASE",
        "RECORD TYPE",
        "DECISION",
        "RULE",
        "OUTCOME",
    ):
        assert column in header
    assert set(rule) <= {"-", " "}
    assert len(lines) == 5
    assert "POLICY_DENIED" in lines[1]
    assert "social_security" in lines[1]
    assert " - " in lines[2]  # undecided entry: empty decision shown as "-"
    empty = format_table([]).splitlines()
    assert len(empty) == 2
    assert empty[0].split() == header.split()


def test_format_table_aligns_cjk_by_display_width(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    append_all(
        path,
        [
            make_event(clerk="张三丰", office="OFFICE-A"),
            make_event(clerk="bob", office="OFFICE-B"),
            make_event(clerk="ｗｉｄｅ", office="OFFICE-C"),
        ],
    )
    header, _, *lines = format_table(query(path, QueryFilter())).splitlines()
    column = display_width(header[: header.index("OFFICE")])
    for line, office in zip(lines, ["OFFICE-A", "OFFICE-B", "OFFICE-C"], strict=True):
        assert display_width(line[: line.index(office)]) == column


def test_format_table_escapes_control_characters(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    append_all(path, [make_event(clerk="evil\x1b[2J\nnext")])
    table = format_table(query(path, QueryFilter()))
    assert "\x1b" not in table
    assert "\\x1b[2J\\nnext" in table
    assert len(table.splitlines()) == 3


# --- commit hook (metrics) --------------------------------------------------------------------


def test_on_commit_reports_each_batch_and_a_raising_hook_never_breaks_the_audit(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit.db"
    seen: list[tuple[int, float]] = []

    def hook(entries: int, seconds: float) -> None:
        seen.append((entries, seconds))
        raise RuntimeError("metrics backend down")

    async def main() -> list[int]:
        async with SQLiteAuditLog(path, on_commit=hook) as log:
            one = await log.append(make_event())
            two = await log.append_many([make_event(), make_event()])
            with closing(sqlite3.connect(path, isolation_level=None)) as saboteur:
                saboteur.execute(
                    "CREATE TRIGGER disk_full BEFORE INSERT ON audit_log "
                    "BEGIN SELECT RAISE(ABORT, 'disk full'); END"
                )
            with pytest.raises(Unavailable):
                await log.append(make_event())  # not committed: no hook call
            return [one.sequence, *(r.sequence for r in two)]

    assert run(main()) == [1, 2, 3]
    assert [entries for entries, _ in seen] == [1, 2]
    assert all(seconds >= 0 for _, seconds in seen)
