"""Read archived audit entries: what the readers of the live log need once entries moved out.

:func:`certbroker.audit.scan.scan` reads the live log only. :func:`search` reads the archive
files that ``audit_archives`` records (:mod:`certbroker.audit.archive`: plain exports and
zstd segments) for the entries matching a scan :class:`~certbroker.audit.scan.Criteria`, in
sequence order; :func:`scan_with_archives` puts them before the live matches, as one log.

Trust: a file is used only if its SHA-256 is the one recorded when it was archived. For a
plain export the digest is computed in the same pass that reads it, and its matches are kept
back until the whole file hashed right. A file that is missing, changed or unreadable is
never silently skipped nor used: it is returned as :class:`Unsearched` with the reason, for
the caller to report. An encrypted segment needs the auditor's private key, which the broker
does not hold: its range is returned as unsearched too (``ENCRYPTED``), and so is a file
removed under retention (``REMOVED``: missing, and a tombstone names it).

Speed: a citizen's report over a few hundred thousand archived entries must not parse each
one. When the criteria name a subject or a clerk, each raw line is first tested for that
value as bytes (as stored, or JSON-escaped) and only the lines holding it are sliced and
parsed; the sequence bounds skip whole files by their recorded range.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Final, TypeVar

from certbroker.audit.archive import ArchiveRecord, archives
from certbroker.audit.events import AuditEntry, iso_time, parse_entry
from certbroker.audit.export import entry_line
from certbroker.audit.scan import Criteria, scan
from certbroker.audit.segment import SegmentError, is_segment, opened_export
from certbroker.audit.store.db import backend_for
from certbroker.audit.tombstone import Tombstone, tombstones
from certbroker.config import AuditLocation

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Why an archived range was not searched (:attr:`Unsearched.reason`).
ENCRYPTED: Final = "ENCRYPTED"
FILE_MISSING: Final = "FILE_MISSING"
FILE_CHANGED: Final = "FILE_CHANGED"
FILE_UNREADABLE: Final = "FILE_UNREADABLE"
REMOVED: Final = "REMOVED"

_WHY: Final = {
    ENCRYPTED: "encrypted to the auditor's key",
    FILE_MISSING: "its archive file is missing",
    FILE_CHANGED: "its archive file differs from the one archived (sha256)",
    FILE_UNREADABLE: "its archive file cannot be read",
    REMOVED: "removed under retention (a tombstone records it)",
}
_BLOCK: Final = 1 << 20
_EQUALS: Final = (
    "clerk",
    "office",
    "subject_id",
    "matter_code",
    "case_number",
    "record_type",
    "decision",
)


@dataclass(frozen=True)
class Unsearched:
    """Archived entries ``first_seq..last_seq`` (in ``file_name``) that were not searched."""

    first_seq: int
    last_seq: int
    file_name: str
    reason: str  # ENCRYPTED | FILE_MISSING | FILE_CHANGED | FILE_UNREADABLE | REMOVED

    def describe(self) -> str:
        """One line for a person (names the range and the reason, no entry contents)."""
        return f"entries {self.first_seq}..{self.last_seq} not searched: {_WHY[self.reason]}"


@dataclass
class Found:
    """What a search found: the matching entries in sequence order, the ranges not searched."""

    entries: list[AuditEntry] = field(default_factory=list)
    unsearched: list[Unsearched] = field(default_factory=list)


def matches(entry: AuditEntry, criteria: Criteria) -> bool:
    """Whether ``entry`` is one ``criteria`` selects (every criterion, as the scan applies
    them in SQL and on the parsed entries)."""
    event = entry.event
    for name in _EQUALS:
        wanted = getattr(criteria, name)
        if wanted is not None and getattr(event, name) != wanted:
            return False
    if criteria.kinds and event.kind not in criteria.kinds:
        return False
    if entry.sequence <= criteria.after or 0 < criteria.before <= entry.sequence:
        return False
    # Stored times are fixed-width ISO text (iso_time): text order is time order.
    if criteria.since is not None and entry.time < iso_time(criteria.since):
        return False
    return criteria.until is None or entry.time < iso_time(criteria.until)


def _needles(criteria: Criteria) -> tuple[bytes, ...]:
    """Byte strings one of which every matching entry's line holds (() = no prefilter): the
    subject's (else the clerk's) value, raw UTF-8 or JSON-escaped, however the body was
    encoded."""
    value = criteria.subject_id if criteria.subject_id is not None else criteria.clerk
    if not value:
        return ()
    forms = {
        value.encode("utf-8"),
        json.dumps(value)[1:-1].encode("ascii"),
        json.dumps(value, ensure_ascii=False)[1:-1].encode("utf-8"),
    }
    # A line never holds a raw line break (bodies are JSON): such a form cannot match.
    return tuple(sorted(form for form in forms if b"\n" not in form))


def search(
    db: AuditLocation, directory: Path, criteria: Criteria, *, limit: int | None = None
) -> Found:
    """The archived entries of ``db`` (files in ``directory``) matching ``criteria``, in
    sequence order, at most ``limit`` (None = all), and the archived ranges that could not be
    searched (module docstring). Blocking; reads every file in the criteria's sequence bounds
    whole (its digest) until ``limit`` matches are found."""
    found = Found()
    if limit == 0 or not backend_for(db).exists():
        return found
    with closing(backend_for(db).connect_read()) as conn:
        records = archives(conn)
        removed = tombstones(conn)
    needles = _needles(criteria)
    for record in records:
        if record.last_seq <= criteria.after:
            continue
        if 0 < criteria.before <= record.first_seq:
            break
        want = None if limit is None else limit - len(found.entries)
        reason = _search_file(record, directory / record.file_name, criteria, needles, want, found)
        if reason == FILE_MISSING and _removed(record, removed):
            reason = REMOVED
        if reason is not None:
            gap = Unsearched(record.first_seq, record.last_seq, record.file_name, reason)
            if reason not in (
                ENCRYPTED,
                REMOVED,
            ):  # an operator must look: the file should be there, intact
                log.warning("archive file %s: %s", record.file_name, gap.describe())
            found.unsearched.append(gap)
        if limit is not None and len(found.entries) >= limit:
            break
    return found


def scan_with_archives(
    db: AuditLocation, directory: Path | None, criteria: Criteria, *, limit: int | None = None
) -> Found:
    """:func:`~certbroker.audit.scan.scan` across the archives and the live log: the archived
    matches (when ``directory`` is given) then the live ones, in sequence order, at most
    ``limit``. ``FileNotFoundError`` if there is no log yet."""
    found = Found()
    if directory is not None:
        found = search(db, directory, criteria, limit=limit)
        if limit is not None and len(found.entries) >= limit:
            return found
    rest = None if limit is None else limit - len(found.entries)
    found.entries += scan(db, criteria, limit=rest)
    return found


class ArchiveUnreadable(Exception):
    """The archive file holding an entry cannot be used (:attr:`gap` says why)."""

    def __init__(self, gap: Unsearched) -> None:
        super().__init__(gap.describe())
        self.gap = gap


def entry_at(db: AuditLocation, directory: Path, sequence: int) -> tuple[str, str]:
    """(body exactly as hashed, previous chain hash) of archived entry ``sequence`` of ``db``,
    read from its archive file in ``directory`` once the file's sha256 is the recorded one.
    KeyError if the entry is not archived; :class:`ArchiveUnreadable` if its file cannot be
    used (missing, changed, encrypted, unreadable). Blocking; reads the file whole."""
    with closing(backend_for(db).connect_read()) as conn:
        records = archives(conn)
        removed = tombstones(conn)
    record = next((r for r in records if r.first_seq <= sequence <= r.last_seq), None)
    if record is None:
        raise KeyError(f"entry {sequence} is not archived")

    def read(f: BinaryIO, sha: hashlib._Hash | None) -> list[tuple[str, str]]:
        got: list[tuple[str, str]] = []

        def take(seq: int, body: bytes, prev_hash: str, _: str) -> bool:
            got.append((body.decode("utf-8"), prev_hash))
            return False

        # Its line begins so (export format); a body holding the text too is only a candidate
        # whose own sequence is then checked.
        _walk(f, sha, (b'{"seq":%d,' % sequence,), sequence - 1, sequence + 1, take)
        return got

    got, reason = _checked(record, directory / record.file_name, read)
    if reason == FILE_MISSING and _removed(record, removed):
        reason = REMOVED
    if reason is not None:
        raise ArchiveUnreadable(
            Unsearched(record.first_seq, record.last_seq, record.file_name, reason)
        )
    if not got:  # the recorded sha256 matched: the archiver wrote a file without the entry
        gap = Unsearched(record.first_seq, record.last_seq, record.file_name, FILE_UNREADABLE)
        raise ArchiveUnreadable(gap)
    return got[0]


def _removed(record: ArchiveRecord, removed: dict[int, Tombstone]) -> bool:
    """Whether a tombstone names exactly this archive (its signature is for ``audit verify
    --with-archives`` to check: a reader only says why the entries are not there)."""
    stone = removed.get(record.last_seq)
    return stone is not None and (stone.first_seq, stone.file_name, stone.file_sha256) == (
        record.first_seq,
        record.file_name,
        record.file_sha256,
    )


def _search_file(
    record: ArchiveRecord,
    path: Path,
    criteria: Criteria,
    needles: tuple[bytes, ...],
    limit: int | None,
    found: Found,
) -> str | None:
    """Add the matches in one archive file to ``found``; the reason it was not searched, or
    None."""

    def read(f: BinaryIO, sha: hashlib._Hash | None) -> list[AuditEntry]:
        kept: list[AuditEntry] = []

        def take(seq: int, body: bytes, prev_hash: str, entry_hash: str) -> bool:
            entry = parse_entry(seq, body.decode("utf-8"), prev_hash, entry_hash)
            if matches(entry, criteria):
                kept.append(entry)
            return limit is None or len(kept) < limit

        _walk(f, sha, needles, criteria.after, criteria.before, take)
        return kept

    kept, reason = _checked(record, path, read)
    found.entries += kept
    return reason


def _checked(
    record: ArchiveRecord, path: Path, read: Callable[[BinaryIO, hashlib._Hash | None], list[T]]
) -> tuple[list[T], str | None]:
    """``read`` of the export an archive file holds, if the file is the one archived: its
    result, or [] and the reason the file was not used. A plain export's digest is computed
    while ``read`` reads it (``read`` must read it to the end), and the result dropped if it
    is wrong; a segment's is checked first, then its export decompressed for ``read``."""
    if not path.is_file():
        return [], FILE_MISSING
    try:
        if not is_segment(path):
            sha = hashlib.sha256()
            with path.open("rb") as f:
                got = read(f, sha)
            if sha.hexdigest() != record.file_sha256:
                return [], FILE_CHANGED
            return got, None
        if _sha256(path) != record.file_sha256:
            return [], FILE_CHANGED
        with path.open("rb") as f:
            if json.loads(f.readline()).get("encryption") is not None:
                return [], ENCRYPTED
        with opened_export(path) as plain, plain.open("rb") as f:
            return read(f, None), None
    except (OSError, ValueError, SegmentError):  # SegmentError: also a zstd failure
        return [], FILE_UNREADABLE


def _walk(
    f: BinaryIO,
    sha: hashlib._Hash | None,
    needles: tuple[bytes, ...],
    after: int,
    before: int,
    take: Callable[[int, bytes, str, str], bool],
) -> None:
    """Call ``take(seq, body, prev_hash, entry_hash)`` for each entry of an export (header
    first) in ``after < seq < before`` (0: no bound) whose line holds one of ``needles`` (or
    any, with none), until it returns False. With ``sha``, every byte of the file is fed to
    it: the file is then read to its end whatever ``take`` says."""
    header = f.readline()
    if sha is not None:
        sha.update(header)
    first_prev = str(json.loads(header)["prev_hash"])

    def visit(line: bytes, previous: bytes) -> bool:
        """``take`` of one candidate line (``previous``: the line before, b"" for none)."""
        seq, body, entry_hash = entry_line(line)
        if 0 < before <= seq:
            return False
        if seq <= after:
            return True
        prev_hash = entry_line(previous)[2].decode("ascii") if previous else first_prev
        return take(seq, body, prev_hash, entry_hash.decode("ascii"))

    if needles:
        _walk_blocks(f, sha, needles, visit)
        return
    previous = b""  # the line before: its entry hash is the chain's previous hash
    wanted = True
    for line in f:
        if sha is not None:
            sha.update(line)
        if wanted:
            wanted = visit(line, previous)
        if not wanted and sha is None:
            return
        previous = line


def _walk_blocks(
    f: BinaryIO,
    sha: hashlib._Hash | None,
    needles: tuple[bytes, ...],
    visit: Callable[[bytes, bytes], bool],
) -> None:
    """:func:`_walk` with a prefilter, by blocks: each block is hashed whole and searched for
    the needles (``bytes.find``); only the lines holding one are cut out and visited. A few
    hundred thousand entries cost about a hash and a search of the file, no per-line work."""
    wanted = True
    previous = b""  # the last whole line of the blocks before
    carry = b""  # a line begun in the block before
    while True:
        block = f.read(_BLOCK)
        if sha is not None:
            sha.update(block)
        if not wanted:
            if block and sha is not None:
                continue  # hash to the end
            return
        data = carry + block if carry else block
        cut = len(data) if not block else data.rfind(b"\n") + 1  # whole lines: data[:cut]
        starts: set[int] = set()
        for needle in needles:
            at = data.find(needle, 0, cut)
            while at >= 0:
                starts.add(data.rfind(b"\n", 0, at) + 1)
                at = data.find(needle, at + len(needle), cut)
        for start in sorted(starts):
            end = data.find(b"\n", start, cut)
            line = data[start : cut if end < 0 else end + 1]
            before = previous if start == 0 else data[data.rfind(b"\n", 0, start - 1) + 1 : start]
            if not visit(line, before):
                wanted = False
                break
        if cut:
            previous = data[data.rfind(b"\n", 0, cut - 1) + 1 : cut]
        carry = data[cut:]
        if not block:
            return


def _sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            sha.update(block)
    return sha.hexdigest()
