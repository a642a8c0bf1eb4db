"""Scenario "Notice outbox": what writing the access notices adds to the audit transaction.

Every lookup's audit entry and its notice row (:mod:`certbroker.audit.outbox`) commit in one
transaction. This scenario times that transaction -- ``ChainStore.write_batch``: take the
write lock, chain the entries, insert them and their Merkle nodes, COMMIT with fsync -- with
and without the outbox hook, on the same kind of store, for a lone lookup (a batch of 1) and
for a group commit under load (a batch of 32 lookups), alternating which goes first each round.
The difference is what the outbox costs a lookup. SQLite always (the embedded default: WAL,
``synchronous=FULL``); PostgreSQL too when a server is reachable (as in "Audit backends").
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from bench.audit_backends import drop_schema, postgres
from bench.harness import Options, Result, percentile
from certbroker.audit.append import ChainStore
from certbroker.audit.events import AuditEvent, epoch_time, event_fields
from certbroker.audit.outbox import NoticeOutbox
from certbroker.audit.store.base import Connection
from certbroker.audit.store.db import backend_for
from certbroker.audit.store.rows import StoredRow
from certbroker.citizen.notices import notices_of
from certbroker.config import DEFAULT_POLICY_DIR, AuditLocation, PostgresLocation
from certbroker.ids import new_id
from certbroker.policy import load

SECTION = "Notice outbox"
BATCHES = (1, 32)
SUBJECT = "110101199003070011"


def _bodies(n: int) -> list[dict[str, object]]:
    """``n`` lookup entries as the broker appends them (allowed marriage lookups)."""
    now = epoch_time(time.time())
    out = []
    for i in range(n):
        fields = event_fields(
            AuditEvent(
                kind="lookup",
                clerk="bench",
                office="gz-haizhu-24h-01",
                roles=("window_clerk",),
                subject_id=SUBJECT,
                matter_code="BDC-ZY-001",
                case_number=f"GZ20260101-{i:06d}",
                consent_method="id_card_read",
                record_type="marriage",
                decision="allow",
                rule_id="window-clerk-24h",
                withheld_fields=(),
                outcome="OK",
                status="OK",
                policy_version="0" * 64,
                department="civil_affairs",
                latency_ms=1.0,
                decision_id=new_id(),
            )
        )
        out.append(fields | {"entry_id": new_id(), "time": now})
    return out


class _TimedOutbox(NoticeOutbox):
    """The outbox hook, timing its own part of each transaction (building and inserting the
    notices): the fsync is shared with the entries, so this is what the outbox adds in-line."""

    def __init__(self) -> None:
        policy = load(DEFAULT_POLICY_DIR)
        super().__init__(notices_of(lambda: policy))
        self.samples: list[float] = []

    def rows_appended(
        self, conn: Connection, bodies: Sequence[Mapping[str, object]], rows: Sequence[StoredRow]
    ) -> None:
        started = time.perf_counter()
        super().rows_appended(conn, bodies, rows)
        self.samples.append((time.perf_counter() - started) * 1000)


def _time_batches(
    location: AuditLocation, hook: _TimedOutbox | None, batch: int, count: int
) -> list[float]:
    """Milliseconds of each of ``count`` transactions of ``batch`` entries."""
    store = ChainStore.open(backend_for(location), hook=hook)
    samples = []
    try:
        for _ in range(count):
            bodies = _bodies(batch)
            started = time.perf_counter()
            store.write_batch(bodies)
            samples.append((time.perf_counter() - started) * 1000)
    finally:
        store.close()
    return samples


@contextlib.contextmanager
def _stores(base: Path) -> Iterator[dict[str, tuple[AuditLocation, AuditLocation]]]:
    """Per backend: (a log written without the hook, a log written with it)."""
    with postgres() as pg:
        stores: dict[str, tuple[AuditLocation, AuditLocation]] = {
            "SQLite": (base / "plain.sqlite", base / "outbox.sqlite")
        }
        if pg is not None:
            stores["PostgreSQL"] = (
                PostgresLocation(pg.dsn, pg.schema),
                PostgresLocation(pg.dsn, pg.schema + "_o"),
            )
        try:
            yield stores
        finally:
            if pg is not None:
                drop_schema(PostgresLocation(pg.dsn, pg.schema + "_o"))


def run(options: Options) -> Result:
    """Time the audit transaction with and without the outbox; report the difference."""
    rounds = options.count(full=5, smoke=1)
    count = 5 if options.smoke else 200
    rows = []
    with tempfile.TemporaryDirectory(prefix="certbroker-bench-") as tmp, _stores(Path(tmp)) as s:
        for backend, (plain, hooked) in s.items():
            for batch in BATCHES:
                samples: dict[bool, list[float]] = {False: [], True: []}
                timed = _TimedOutbox()
                for n in range(rounds):
                    for with_outbox in (n % 2 == 1, n % 2 == 0):  # alternate who goes first
                        where, hook = (hooked, timed) if with_outbox else (plain, None)
                        samples[with_outbox] += _time_batches(where, hook, batch, count)
                rows.append(
                    (
                        backend,
                        str(batch),
                        f"{statistics.median(samples[False]):.3f}",
                        f"{statistics.median(samples[True]):.3f}",
                        f"{statistics.median(timed.samples):.3f}",
                        f"{percentile(timed.samples, 99):.3f}",
                        f"{statistics.median(timed.samples) * 1000 / batch:.0f}",
                    )
                )
    return Result(
        section=SECTION,
        setup=(
            f"The audit transaction (ChainStore.write_batch, fsync included) for batches of "
            f"{' and '.join(map(str, BATCHES))} lookup entries, without and with the notice "
            f"outbox hook; {rounds} alternating round(s) of {count} transactions each."
        ),
        header=(
            "backend",
            "batch",
            "txn median ms",
            "txn median ms, outbox",
            "outbox part median ms",
            "outbox part p99 ms",
            "outbox µs / lookup",
        ),
        rows=rows,
        verdict=(
            "The outbox part (building and inserting the batch's notices, inside the "
            "transaction) is what each lookup's audit transaction gains; the whole-transaction "
            "medians are dominated by the commit's fsync and vary with the disk."
        ),
    )
