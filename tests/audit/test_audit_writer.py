"""The group-commit writer's batching window and its bounds."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from certbroker import audit, config
from certbroker.audit.store.rows import StoredRow
from certbroker.audit.writer import MAX_WAIT_S, GroupCommitWriter


class RecordingStore:
    """A BatchStore keeping each committed batch's bodies in memory."""

    def __init__(self) -> None:
        self.batches: list[list[Mapping[str, object]]] = []
        self.closed = threading.Event()

    def write_batch(self, bodies: Sequence[Mapping[str, object]]) -> list[StoredRow]:
        start = sum(len(b) for b in self.batches)
        self.batches.append(list(bodies))
        return [StoredRow(start + i + 1, str(b), "", "", {}) for i, b in enumerate(bodies)]

    def close(self) -> None:
        self.closed.set()


@pytest.mark.parametrize("wait", [-0.001, MAX_WAIT_S + 0.001])
def test_window_outside_its_bound_is_refused(wait: float) -> None:
    with pytest.raises(ValueError, match="max_wait_s"):
        GroupCommitWriter(RecordingStore(), max_wait_s=wait)


def test_with_a_window_every_caller_gets_its_own_rows_in_order() -> None:
    store = RecordingStore()

    async def run() -> list[list[StoredRow]]:
        writer = GroupCommitWriter(store, max_batch=4, max_wait_s=0.005)
        results = await asyncio.gather(
            *(writer.write_many([{"n": i, "part": p} for p in range(2)]) for i in range(10))
        )
        await writer.aclose()
        return results

    results = asyncio.run(run())
    stored = [body for batch in store.batches for body in batch]
    assert len(stored) == 20
    assert store.closed.is_set()
    for i, rows in enumerate(results):  # each caller's two entries, consecutive, in order
        assert [r.body for r in rows] == [str({"n": i, "part": 0}), str({"n": i, "part": 1})]
        assert rows[1].seq == rows[0].seq + 1
    # max_batch counts callers: a caller's entries are never split across transactions.
    assert all(len(batch) <= 8 for batch in store.batches)


def test_closing_during_an_open_window_stores_what_was_queued() -> None:
    store = RecordingStore()

    async def run() -> StoredRow:
        writer = GroupCommitWriter(store, max_wait_s=MAX_WAIT_S)
        pending = asyncio.ensure_future(writer.write({"n": 1}))
        await asyncio.sleep(0)  # queued; the writer now holds its batch open
        await writer.aclose()
        return await pending

    row = asyncio.run(run())
    assert row.seq == 1
    assert store.batches == [[{"n": 1}]]


def test_batching_settings_reach_the_log(tmp_path: Path) -> None:
    path = tmp_path / "certbroker.toml"
    path.write_text("[audit]\nmax_batch = 32\nbatch_wait_ms = 1.5\n")
    cfg = config.load(path, env={})
    assert (cfg.audit_max_batch, cfg.audit_batch_wait_ms) == (32, 1.5)
    path.write_text("[audit]\nbatch_wait_ms = 500\n")
    with pytest.raises(config.ConfigError, match="batch_wait_ms"):
        config.load(path, env={})
    path.write_text("[audit]\nmax_batch = 0\n")
    with pytest.raises(config.ConfigError, match="max_batch"):
        config.load(path, env={})


def test_sqlite_log_with_a_window_commits_and_chains(tmp_path: Path) -> None:
    db = tmp_path / "audit.sqlite"

    async def run() -> None:
        log = audit.open_audit_log(db, max_wait_s=0.002)
        async with log:
            await asyncio.gather(*(log.append(_event(i)) for i in range(12)))

    asyncio.run(run())
    assert audit.verify_chain(db).ok
    assert len(audit.query(db, audit.QueryFilter())) == 12


def _event(i: int) -> audit.AuditEvent:
    return audit.AuditEvent(
        kind="lookup",
        clerk=f"clerk-{i}",
        office="gz-haizhu-24h-01",
        roles=("window_clerk",),
        subject_id="",
        matter_code="BDC-ZY-001",
        case_number="",
        consent_method="",
        record_type="marriage",
        decision="deny",
        rule_id="default-deny",
        withheld_fields=(),
        outcome="POLICY_DENIED",
        status="PERMISSION_DENIED",
        policy_version="v",
        department="civil_affairs",
        latency_ms=0.1,
        decision_id="",
    )
