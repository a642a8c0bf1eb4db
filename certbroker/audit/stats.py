"""What an audit log holds and costs: ``certbroker audit stats``.

Entries (live, per format version, archived), the live store's size and bytes per entry, the
oldest and newest live entries, the archive files and their sizes, and the next retention
action (``[audit] archive_after_days``). Read-only, on either backend.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from certbroker.audit.store import compact
from certbroker.audit.store.base import Connection
from certbroker.audit.store.db import backend_for
from certbroker.audit.store.rows import archived_head, has_compact, read_tail
from certbroker.audit.verify.live import archive_rows
from certbroker.config import AuditLocation, PostgresLocation


@dataclass(frozen=True)
class ArchiveFile:
    """One archived segment: its entries and its file (``size`` None: the file is missing)."""

    first_seq: int
    last_seq: int
    file_name: str
    size: int | None


@dataclass(frozen=True)
class LogStats:
    """See the module docstring. Times are the stored ISO texts; sizes in bytes."""

    entries: int
    live_v1: int
    live_v2: int
    archived: int
    live_bytes: int
    oldest_live: str | None
    newest: str | None
    archives: list[ArchiveFile] = field(default_factory=list)
    next_action: str = ""

    @property
    def live(self) -> int:
        """Entries in the live store."""
        return self.live_v1 + self.live_v2

    @property
    def bytes_per_entry(self) -> float:
        """Live store bytes per live entry (0 when there is none)."""
        return self.live_bytes / self.live if self.live else 0.0

    @property
    def archive_bytes(self) -> int:
        """The archive files' total size (missing files count 0)."""
        return sum(a.size or 0 for a in self.archives)


def _count_and_span(conn: Connection, table: str) -> tuple[int, object, object]:
    row = conn.execute(f"SELECT count(*), min(seq), max(seq) FROM {table}").fetchone()  # noqa: S608
    return int(row[0]), row[1], row[2]


def _time_of(conn: Connection, seq: object) -> str | None:
    if seq is None:
        return None
    if has_compact(conn):
        row = conn.execute("SELECT time FROM audit_entries WHERE seq = ?", (seq,)).fetchone()
        if row is not None:
            return compact.ms_time(int(row[0]))
    row = conn.execute("SELECT time FROM audit_log WHERE seq = ?", (seq,)).fetchone()
    return None if row is None else str(row[0])


def _store_bytes(location: AuditLocation, conn: Connection) -> int:
    if isinstance(location, PostgresLocation):
        (size,) = conn.execute(
            "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = ? AND c.relkind IN ('r', 'p')",
            (location.schema,),
        ).fetchone()
        return int(size)
    path = Path(location)
    return sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists())


def log_stats(
    db: AuditLocation, archive_dir: Path, archive_after_days: float, now: datetime
) -> LogStats:
    """The statistics of the log at ``db`` (archive files looked up in ``archive_dir``);
    ``now`` (aware) dates the next retention action. ``FileNotFoundError`` without a log."""
    backend = backend_for(db)
    with contextlib.closing(backend.connect_read()) as conn:
        backend.snapshot(conn)
        v1, first1, _ = _count_and_span(conn, "audit_log")
        v2, first2, _ = (0, None, None)
        if has_compact(conn):
            v2, first2, _ = _count_and_span(conn, "audit_entries")
        archived, _ = archived_head(conn)
        tail, _ = read_tail(conn)
        oldest_seq = first1 if first1 is not None else first2
        oldest = _time_of(conn, oldest_seq)
        newest = _time_of(conn, tail) if tail > archived else None
        files = [
            ArchiveFile(first, last, name, _size(archive_dir / name))
            for first, last, _, name, _, _ in archive_rows(conn)
        ]
        size = _store_bytes(db, conn)
    return LogStats(
        tail, v1, v2, archived, size, oldest, newest, files,
        _next_action(oldest, archive_after_days, now),
    )  # fmt: skip


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None


def _next_action(oldest: str | None, days: float, now: datetime) -> str:
    if days <= 0:
        return "none: live retention is not set ([audit] archive_after_days = 0)"
    if oldest is None:
        return f"none: no live entry (entries are archived {days:g} days after they are written)"
    due = datetime.fromisoformat(oldest) + timedelta(days=days)
    if due <= now:
        return f"archive now: the oldest live entry ({oldest}) is older than {days:g} days"
    return f"archive at {due.isoformat()}: the oldest live entry ({oldest}) turns {days:g} days"
