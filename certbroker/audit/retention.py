"""Archive retention: removing archive files past their retention, leaving signed tombstones.

Live retention is archival (``[audit] archive_after_days``, :mod:`certbroker.audit.archive`).
Archive retention (``[audit] archive_retention_days``; 0 = keep for ever) ends an archive
file's life, and is an explicit act (``certbroker audit remove-archives``), never automatic:

1. the removal is itself an audit entry (kind ``retention``, the operator as clerk, the range
   in ``case_number``) appended to the log: the chain records who removed what, and when;
2. a *tombstone* row goes into the append-only ``audit_tombstones`` table: the archive's range,
   last entry hash, file SHA-256, the time and the signed checkpoint note covering the range,
   all signed (Ed25519, the checkpoint key) as canonical JSON; then the file is deleted.

``audit verify --with-archives`` (:func:`certbroker.audit.archive.verify_with_archives`) then
tells a file *removed under retention* (a tombstone whose signature verifies and which names
exactly that archive: the chain goes on from its last hash, the entries are counted as
removed) from a *missing* file (DELETED).
"""

from __future__ import annotations

import asyncio
import base64
import getpass
import time
from collections.abc import Callable
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path

from certbroker.audit.archive import ArchiveRecord, archives
from certbroker.audit.events import AuditEvent, iso_time
from certbroker.audit.integrity.proofs import CheckpointSigner, checkpoints
from certbroker.audit.log import open_audit_log
from certbroker.audit.store.db import backend_for
from certbroker.audit.tombstone import Tombstone, tombstones
from certbroker.config import AuditLocation


def due(db: AuditLocation, retention_days: float, now: datetime) -> list[ArchiveRecord]:
    """The archives whose newest entry is older than ``retention_days`` at ``now`` and that
    have no tombstone yet (oldest first). An archive's age is that of its archival time."""
    if not retention_days > 0:
        raise ValueError("archive retention must be > 0 days")
    cutoff = iso_time(now - timedelta(days=retention_days))
    with closing(backend_for(db).connect_read()) as conn:
        removed = tombstones(conn)
        records = archives(conn)
    return [r for r in records if r.time < cutoff and r.last_seq not in removed]


def remove_archives(
    db: AuditLocation,
    signer: CheckpointSigner,
    directory: Path,
    retention_days: float,
    *,
    operator: str | None = None,
    clock: Callable[[], float] | None = None,
) -> list[Tombstone]:
    """Remove the archive files past ``retention_days`` (see the module docstring); the
    tombstones written. Blocking."""
    now = datetime.now(UTC) if clock is None else datetime.fromtimestamp(clock(), tz=UTC)
    who = operator or getpass.getuser()
    made: list[Tombstone] = []
    for record in due(db, retention_days, now):
        with closing(backend_for(db).connect_read()) as conn:
            covering = [c.note for c in checkpoints(conn, record.last_seq, record.last_seq)]
        if not covering:
            raise RuntimeError(f"no checkpoint of size {record.last_seq}: archive not removed")
        _record_removal(db, record, who, clock)
        stone = Tombstone(
            record.first_seq, record.last_seq, record.last_entry_hash, record.file_name,
            record.file_sha256, iso_time(now), covering[0], "",
        )  # fmt: skip
        signature = base64.b64encode(signer.private_key.sign(stone.signed_text())).decode()
        stone = Tombstone(**{**stone.__dict__, "signature": signature})
        with backend_for(db).write_transaction() as conn:
            conn.execute(
                "INSERT INTO audit_tombstones (first_seq, last_seq, last_entry_hash, file_name, "
                "file_sha256, removed_at, checkpoint, signature) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (stone.first_seq, stone.last_seq, stone.last_entry_hash, stone.file_name,
                 stone.file_sha256, stone.removed_at, stone.checkpoint, stone.signature),
            )  # fmt: skip
        (directory / record.file_name).unlink(missing_ok=True)
        made.append(stone)
    return made


def _record_removal(
    db: AuditLocation, record: ArchiveRecord, who: str, clock: Callable[[], float] | None
) -> None:
    """The removal as an audit entry, before the file goes ("no audit, no action")."""
    event = AuditEvent(
        kind="retention",
        clerk=who,
        office="",
        roles=("operator",),
        subject_id="",
        matter_code="",
        case_number=f"archive {record.first_seq}..{record.last_seq} {record.file_name}",
        consent_method="",
        record_type="",
        decision="",
        rule_id="archive_retention",
        withheld_fields=(),
        outcome="OK",
        status="OK",
        policy_version="",
        department="",
        latency_ms=0.0,
        decision_id=record.file_sha256,
    )

    async def append() -> None:
        # The log goes on in the format it has (a compact log stays compact).
        async with open_audit_log(db, clock=clock or time.time) as log:
            await log.append(event)

    asyncio.run(append())
