"""Archival: move old audit entries from the live log to signed export files, and verify across.

An archive file is an export (:mod:`certbroker.audit.export` format) of sequences ``a..b``, all
older than the cutoff, whose header carries a signed checkpoint of size ``b``: it verifies
offline on its own. Archiving one segment (:func:`archive_older_than`):

1. sign a checkpoint covering ``b`` (unless one exists), export ``a..b`` to
   ``audit-<a>-<b>.jsonl.partial`` (mode 0600), fsync, verify it offline, rename it into place;
2. in ONE transaction under the log's write lock: record ``(first_seq, last_seq,
   last_entry_hash, file_name, file_sha256, time)`` in the append-only ``audit_archives`` table
   and delete rows ``a..b`` from ``audit_log`` / ``audit_entries``. On PostgreSQL the
   append-only triggers allow exactly that: deleting rows at or below the recorded watermark.
   The Merkle nodes stay, so proofs keep working (they hold hashes only, no entry contents).
   Compact (format 2) entries have no stored node below ``STORED_LEVEL``: a segment ending in
   them ends at a multiple of ``2**STORED_LEVEL`` (no such node spans the cut), and the low
   nodes that consistency proofs from a checkpoint inside the segment need are stored before
   the rows go. Inclusion proofs of archived compact entries come from the archive file.

If the transaction fails, the file is removed again and the live log is unchanged. The live
log then starts at ``b + 1``, chaining from the recorded last hash (see
:func:`certbroker.audit.store.rows.archived_head`). :func:`verify_with_archives` checks every
archive file offline, its sha256 against the table, that each continues the previous one, and
the live remainder; a break is reported with the first bad index and the usual exit codes
(:mod:`certbroker.audit.verify.report`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import BinaryIO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from certbroker.audit.events import GENESIS_HASH, iso_time
from certbroker.audit.export import entry_bodies, export, verify_db, verify_export
from certbroker.audit.integrity.merkle import leaf_hash
from certbroker.audit.integrity.proofs import CheckpointSigner, checkpoints, sign_checkpoint
from certbroker.audit.integrity.tree import (
    STORED_LEVEL,
    ArchivedLeaves,
    computed_node,
    frontier_positions,
)
from certbroker.audit.segment import (
    SegmentError,
    is_segment,
    open_envelope,
    opened_export,
    write_segment,
)
from certbroker.audit.store.base import Connection
from certbroker.audit.store.compact import time_ms
from certbroker.audit.store.db import backend_for
from certbroker.audit.store.postgres import PostgresBackend, detach_archived
from certbroker.audit.store.rows import archived_head, has_compact, hash_at, read_tail
from certbroker.audit.tombstone import Tombstone, tombstones
from certbroker.audit.verify.live import archive_rows
from certbroker.audit.verify.report import DELETED, EDITED, INSERTED, OK, IntegrityReport, Malformed
from certbroker.config import AuditLocation


@dataclass(frozen=True)
class ArchiveRecord:
    """A row of ``audit_archives``: which entries went to which file."""

    first_seq: int
    last_seq: int
    last_entry_hash: str
    file_name: str
    file_sha256: str
    time: str


def archives(conn: Connection) -> list[ArchiveRecord]:
    """Every archived segment, oldest first ([] for a log never archived)."""
    if archived_head(conn)[0] == 0:  # also covers an SQLite file without the table
        return []
    rows = conn.execute(
        "SELECT first_seq, last_seq, last_entry_hash, file_name, file_sha256, time "
        "FROM audit_archives ORDER BY last_seq"
    ).fetchall()
    return [
        ArchiveRecord(int(a), int(b), str(h), str(name), str(sha), str(t))
        for a, b, h, name, sha, t in rows
    ]


def _segment(db: AuditLocation, cutoff: str) -> tuple[int, int]:
    """(first, last) of the oldest live entries all older than ``cutoff``; last < first if
    there are none."""
    backend = backend_for(db)
    with closing(backend.connect_read()) as conn:
        backend.snapshot(conn)
        archived, _ = archived_head(conn)
        (newer,) = conn.execute(
            "SELECT min(seq) FROM audit_log WHERE time >= ?", (cutoff,)
        ).fetchone()
        if newer is None and has_compact(conn):
            (newer,) = conn.execute(
                "SELECT min(seq) FROM audit_entries WHERE time >= ?", (time_ms(cutoff),)
            ).fetchone()
        if newer is None:
            top, _ = read_tail(conn)
            last = max(archived, top)
        else:
            last = int(newer) - 1
        if has_compact(conn) and _is_compact(conn, last):
            # A compact writer stores no node below STORED_LEVEL; one spanning the cut could
            # then be recomputed from neither side. Cut where no such node spans it.
            last -= last % (1 << STORED_LEVEL)
    return archived + 1, last


def _is_compact(conn: Connection, seq: int) -> bool:
    """Whether entry ``seq`` is a live version 2 entry."""
    row = conn.execute("SELECT 1 FROM audit_entries WHERE seq = ?", (seq,)).fetchone()
    return row is not None


def archive_older_than(
    db: AuditLocation,
    signer: CheckpointSigner,
    directory: Path,
    days: float,
    *,
    clock: Callable[[], float] = time.time,
    compress: bool = False,
    recipient: X25519PublicKey | None = None,
) -> ArchiveRecord | None:
    """Move the live entries older than ``days`` to one archive file in ``directory``.

    ``compress``: the file is a zstd-compressed, signed segment (:mod:`certbroker.audit.segment`,
    ``.jsonl.zst``), encrypted to ``recipient`` (an auditor's X25519 key) if given; else a
    plain export (``.jsonl``). Either way the export is verified before any row is deleted.
    Returns the new record, or None when no entry is old enough. Blocking.
    """
    if recipient is not None and not compress:
        raise ValueError("encrypted archives are compressed segments: give compress=True")
    if not days > 0:
        raise ValueError("days must be > 0")
    cutoff = iso_time(datetime.fromtimestamp(clock(), tz=UTC) - timedelta(days=days))
    first, last = _segment(db, cutoff)
    if last < first:
        return None
    with closing(backend_for(db).connect_read()) as conn:
        covered = any(c.size == last for c in checkpoints(conn, last, last))
    if not covered:  # the file must carry a signed head of exactly its last entry
        sign_checkpoint(db, signer, size=last, clock=clock)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    name = f"audit-{first:012d}-{last:012d}.jsonl"
    final = directory / name
    partial = directory / f".{name}.partial"
    digest, last_hash = _write(db, partial, first, last)
    report = verify_export(partial, signer.public_key)
    if not report.ok:  # never delete live rows for a file that does not verify
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"archive file did not verify: {report.name} {report.problem}")
    if compress:
        name += ".zst"
        final = directory / name
        digest = _pack(partial, directory / f".{name}.partial", signer, recipient)
        partial = directory / f".{name}.partial"
    partial.replace(final)
    _fsync_dir(directory)
    record = ArchiveRecord(
        first, last, last_hash, name, digest, iso_time(datetime.fromtimestamp(clock(), tz=UTC))
    )
    try:
        _commit(db, record)
    except BaseException:
        final.unlink(missing_ok=True)
        raise
    return record


def _write(db: AuditLocation, path: Path, first: int, last: int) -> tuple[str, str]:
    """Export ``first..last`` to ``path`` (0600, fsynced); its sha256 and last entry hash."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # entries name citizens
    with os.fdopen(fd, "wb") as out:
        export(db, out, first, last)
        out.flush()
        os.fsync(out.fileno())
    digest, last_line = _digest(path)
    return digest, str(json.loads(last_line)["entry_hash"])


def _pack(
    plain: Path, packed: Path, signer: CheckpointSigner, recipient: X25519PublicKey | None
) -> str:
    """The verified export ``plain`` as a segment at ``packed`` (removing ``plain``); its
    sha256. The envelope is checked after writing, as anyone will check it."""
    with plain.open("rb") as f:
        header = json.loads(f.readline())
    _, last_line = _digest(plain)
    facts = {
        "from": header["from"],
        "to": header["to"],
        "prev_hash": header["prev_hash"],
        "last_entry_hash": json.loads(last_line)["entry_hash"],
    }

    def copy(out: BinaryIO) -> None:
        with plain.open("rb") as source:
            for block in iter(lambda: source.read(1 << 20), b""):
                out.write(block)

    try:
        write_segment(packed, copy, facts, signer.private_key, signer.key_name, recipient=recipient)
        open_envelope(packed, signer.public_key)
    except BaseException:
        packed.unlink(missing_ok=True)
        raise
    finally:
        plain.unlink(missing_ok=True)
    digest, _ = _digest(packed)
    return digest


def _digest(path: Path) -> tuple[str, bytes]:
    """(sha256 hex of the file, its last line)."""
    sha = hashlib.sha256()
    last = b""
    with path.open("rb") as f:
        for line in f:
            sha.update(line)
            last = line
    return sha.hexdigest(), last


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit(db: AuditLocation, record: ArchiveRecord) -> None:
    """Record the archive and delete its rows, in one transaction under the write lock."""
    with backend_for(db).write_transaction() as conn:
        archived, _ = archived_head(conn)
        if archived != record.first_seq - 1:  # another archiver got there first
            raise RuntimeError(f"archive watermark moved to {archived} while exporting")
        try:
            stored_hash = hash_at(conn, record.last_seq)
        except KeyError:
            stored_hash = ""
        if stored_hash != record.last_entry_hash:
            raise RuntimeError(f"entry {record.last_seq} does not match the archive file")
        _keep_nodes(conn, record)
        conn.execute(
            "INSERT INTO audit_archives (first_seq, last_seq, last_entry_hash, file_name, "
            "file_sha256, time) VALUES (?, ?, ?, ?, ?, ?)",
            (
                record.first_seq,
                record.last_seq,
                record.last_entry_hash,
                record.file_name,
                record.file_sha256,
                record.time,
            ),
        )
        conn.execute(
            "DELETE FROM audit_log WHERE seq BETWEEN ? AND ?", (record.first_seq, record.last_seq)
        )
        if has_compact(conn):
            if isinstance(conn.backend, PostgresBackend):  # whole months: detach them
                detach_archived(conn, record.first_seq, record.last_seq)
            conn.execute(
                "DELETE FROM audit_entries WHERE seq BETWEEN ? AND ?",
                (record.first_seq, record.last_seq),
            )


def _keep_nodes(conn: Connection, record: ArchiveRecord) -> None:
    """Store the tree nodes that proofs and verification will need once the entries are gone
    and that a compact writer did not store (below ``STORED_LEVEL`` they are recomputed from
    the entries): the frontier at the archive's end, and for every checkpoint inside it
    every low node of the ``2**STORED_LEVEL`` leaves its size ends in (a consistency proof
    from that size needs its frontier and the right siblings up to ``STORED_LEVEL``)."""
    inside = {c.size for c in checkpoints(conn, record.first_seq - 1, record.last_seq)}
    wanted = {p for p in frontier_positions(record.last_seq) if p[0] < STORED_LEVEL}
    for size in inside:
        block = size >> STORED_LEVEL  # the leaves size - 1 and size: its right part
        if size % (1 << STORED_LEVEL):
            wanted |= {
                (level, index)
                for level in range(STORED_LEVEL)
                for index in range(
                    block << (STORED_LEVEL - level), (block + 1) << (STORED_LEVEL - level)
                )
            }
    missing: list[tuple[int, int, bytes]] = []
    for level, index in sorted(wanted):
        try:
            conn.backend.read_nodes(conn, ((level, index),))
        except KeyError:
            try:
                missing.append((level, index, computed_node(conn, level, index)))
            except KeyError:
                continue  # past the log's end (no proof needs it) or already archived
    if missing:
        types = ("integer", "bigint", "bytea")
        conn.backend.insert_many(conn, "merkle_nodes", ("level", "idx", "hash"), types, missing)


def verify_with_archives(
    db: AuditLocation,
    public_key: Ed25519PublicKey,
    directory: Path,
    *,
    auditor_key: X25519PrivateKey | None = None,
) -> IntegrityReport:
    """Verify every archive file of ``db`` in ``directory``, their continuity, and the live log.

    Compressed segments are opened on the fly; an encrypted one is read with ``auditor_key``,
    and without it only its signed envelope is checked (the report notes which).

    Entries are numbered across archives and the live log, so ``first_bad`` is the sequence
    of the first entry that fails wherever it is.
    """
    backend = backend_for(db)
    with closing(backend.connect_read()) as conn:
        backend.keep_undecodable_text(conn)  # a hostile row is MALFORMED, not a crash
        try:
            records = [ArchiveRecord(*row) for row in archive_rows(conn)]
        except Malformed as exc:
            return exc.report()
        removed = tombstones(conn)
    entries = signed = 0
    unread: list[str] = []  # encrypted segments checked by their envelope only
    prev_last, prev_hash = 0, GENESIS_HASH
    for record in records:
        report = _check_archive(
            record,
            directory,
            public_key,
            prev_last,
            prev_hash,
            auditor_key,
            removed.get(record.last_seq),
        )
        if not report.ok:
            return dataclasses.replace(report, entries=entries + report.entries)
        entries += report.entries
        signed += report.checkpoints
        unread += [n for n in report.notes if "encrypted" in n or "retention" in n]
        prev_last, prev_hash = record.last_seq, record.last_entry_hash
    live = verify_db(db, public_key)
    if not live.ok:
        return dataclasses.replace(live, entries=entries + live.entries)
    notes = [n for n in live.notes if "--with-archives" not in n and "precedes" not in n]
    notes.insert(0, f"{len(records)} archive file(s) verified: entries 1..{prev_last}")
    notes[1:1] = unread
    return dataclasses.replace(
        live, entries=entries + live.entries, checkpoints=signed + live.checkpoints, notes=notes
    )


def _check_segment(
    record: ArchiveRecord,
    path: Path,
    public_key: Ed25519PublicKey,
    prev_hash: str,
    auditor_key: X25519PrivateKey | None,
) -> IntegrityReport:
    """A segment: its signed envelope (range, chain joins, payload hash) against the record,
    then the export inside verified offline, unless it is encrypted and no key is given."""
    try:
        envelope = open_envelope(path, public_key)
    except SegmentError as exc:
        return IntegrityReport(EDITED, 0, record.first_seq, f"{record.file_name}: {exc}")
    said = (envelope.get("from"), envelope.get("to"), envelope.get("prev_hash"))
    if said != (record.first_seq, record.last_seq, prev_hash):
        msg = f"{record.file_name} does not hold the range or chain the archive recorded"
        return IntegrityReport(EDITED, 0, record.first_seq, msg)
    if envelope.get("last_entry_hash") != record.last_entry_hash:
        msg = f"{record.file_name} ends with another entry than the one archived"
        return IntegrityReport(EDITED, 0, record.last_seq, msg)
    digest, _ = _digest(path)
    if digest != record.file_sha256:
        msg = f"{record.file_name} differs from the file archived (sha256)"
        return IntegrityReport(EDITED, 0, record.first_seq, msg)
    count = record.last_seq - record.first_seq + 1
    if envelope.get("encryption") is not None and auditor_key is None:
        note = f"{record.file_name}: encrypted; its signed envelope verified (entries unread)"
        return IntegrityReport(OK, count, None, "", 0, [note])
    try:
        with opened_export(path, auditor_key) as plain:
            report = verify_export(plain, public_key)
    except SegmentError as exc:
        return IntegrityReport(EDITED, 0, record.first_seq, f"{record.file_name}: {exc}")
    if not report.ok:
        return dataclasses.replace(report, problem=f"{record.file_name}: {report.problem}")
    return report


def _check_archive(
    record: ArchiveRecord,
    directory: Path,
    public_key: Ed25519PublicKey,
    prev_last: int,
    prev_hash: str,
    auditor_key: X25519PrivateKey | None = None,
    removed: Tombstone | None = None,
) -> IntegrityReport:
    """One archive file: present, verifying offline, the file recorded, continuing the last."""
    path = directory / record.file_name
    if record.first_seq != prev_last + 1:
        code = DELETED if record.first_seq > prev_last + 1 else INSERTED
        msg = f"archives jump from entry {prev_last} to {record.first_seq}"
        return IntegrityReport(code, 0, prev_last + 1, msg)
    if not path.is_file():
        names = (record.first_seq, record.last_seq, record.last_entry_hash, record.file_name,
                 record.file_sha256)  # fmt: skip
        if removed is not None and removed.verifies(public_key, names):
            note = (
                f"entries {record.first_seq}..{record.last_seq} ({record.file_name}) were "
                f"removed under retention at {removed.removed_at} (signed tombstone)"
            )
            return IntegrityReport(OK, 0, None, "", 0, [note])
        msg = f"archive file {record.file_name} (entries {record.first_seq}..) is missing"
        if removed is not None:
            msg += "; its tombstone does not verify or names another file"
        return IntegrityReport(DELETED, 0, record.first_seq, msg)
    if is_segment(path):
        return _check_segment(record, path, public_key, prev_hash, auditor_key)
    report = verify_export(path, public_key)
    if not report.ok:
        return dataclasses.replace(report, problem=f"{record.file_name}: {report.problem}")
    digest, last_line = _digest(path)
    with path.open("rb") as f:
        header = json.loads(f.readline())
    if (header.get("from"), header.get("to")) != (record.first_seq, record.last_seq):
        msg = f"{record.file_name} holds {header.get('from')}..{header.get('to')}, not the range"
        return IntegrityReport(EDITED, report.entries, record.first_seq, msg)
    if header.get("prev_hash") != prev_hash:
        msg = f"{record.file_name} does not continue the previous archive's chain"
        return IntegrityReport(EDITED, report.entries, record.first_seq, msg)
    if json.loads(last_line).get("entry_hash") != record.last_entry_hash:
        msg = f"{record.file_name} ends with another entry than the one archived"
        return IntegrityReport(EDITED, report.entries, record.last_seq, msg)
    if digest != record.file_sha256:
        msg = f"{record.file_name} differs from the file archived (sha256)"
        return IntegrityReport(EDITED, report.entries, record.first_seq, msg)
    return report


def archived_leaves(db: AuditLocation, directory: Path) -> ArchivedLeaves:
    """``leaves(first, last)``: the leaf hashes of archived entries ``first..last`` of ``db``,
    read from their archive files in ``directory`` (plain exports and segments; not encrypted
    ones, whose entries only the auditor's key reads). What an inclusion proof of an archived
    compact entry needs: nodes below ``STORED_LEVEL`` were never stored for those entries.

    The reader keeps the leaves it read: made per proof, it reads each archive file once for
    the ``2**STORED_LEVEL`` entries around the ones asked. KeyError if they cannot be read
    (no such archive, the file missing, encrypted or not an export); a file that was altered
    gives leaves whose proof does not verify against a signed checkpoint.
    """
    found: dict[int, bytes] = {}
    block = 1 << STORED_LEVEL

    def leaves(first: int, last: int) -> list[bytes]:
        if not all(seq in found for seq in range(first, last + 1)):
            low = (first - 1) // block * block + 1
            high = ((last - 1) // block + 1) * block
            with closing(backend_for(db).connect_read()) as conn:
                records = [r for r in archives(conn) if r.first_seq <= high and r.last_seq >= low]
            for record in records:
                try:
                    _read_leaves(directory / record.file_name, low, high, found)
                except (OSError, SegmentError, Malformed) as exc:
                    raise KeyError(f"archive file {record.file_name}: {exc}") from None
        try:
            return [found[seq] for seq in range(first, last + 1)]
        except KeyError:
            raise KeyError(f"entries {first}..{last} are not in the archive files") from None

    return leaves


def _read_leaves(path: Path, low: int, high: int, found: dict[int, bytes]) -> None:
    """The leaf hashes of entries ``low..high`` in the archive file ``path``, into ``found``."""
    with _plain_export(path) as plain, plain.open("rb") as f:
        f.readline()  # the header
        for seq, body in entry_bodies(f):
            if seq > high:
                break
            if seq >= low:
                found[seq] = leaf_hash(body)


@contextmanager
def _plain_export(path: Path) -> Iterator[Path]:
    """The export an archive file holds: itself, or a segment's, decompressed for the block."""
    if not is_segment(path):
        yield path
        return
    with opened_export(path) as plain:
        yield plain
