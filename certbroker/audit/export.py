"""Export a segment of the audit log as JSON Lines, and verify exports and the live database.

Export file format (UTF-8, one JSON value per line, ``\\n`` line ends)::

    {"certbroker_audit_export":1,"checkpoints":[<note>,...],"frontier":[<hex>,...],
     "from":N,"origin":"certbroker/audit","prev_hash":"<hex>","to":M}
    {"seq":N,"entry_hash":"<64 hex>","body":<the stored body, byte for byte>}
    ...                                             one line per entry, N..M in order

The first line (header) carries the signed checkpoint notes with ``N-1 <= size <= M``, the chain
hash of entry ``N-1`` (``prev_hash``; 64 zeros for N = 1) and the Merkle frontier of the first
``N-1`` entries (hex, leftmost first), so a segment that does not start at 1 can still be
checked against checkpoints (a false frontier cannot match a signed root). Each entry line is
written with exactly that key order and spacing, and ``body`` is the stored canonical body
text embedded verbatim: the Merkle leaf and the chain are computed over those bytes, so the
verifier slices them out without re-encoding (see :mod:`certbroker.audit.events`).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import IO, Any, Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from certbroker.audit.events import GENESIS_HASH
from certbroker.audit.integrity import checkpoint
from certbroker.audit.integrity.merkle import CompactRange
from certbroker.audit.integrity.proofs import ORIGIN, checkpoints
from certbroker.audit.integrity.tree import frontier_at, load_state
from certbroker.audit.store.db import backend_for
from certbroker.audit.store.rows import archived_head, hash_at, iter_rows
from certbroker.audit.verify.live import verify_db
from certbroker.audit.verify.parallel import check_export
from certbroker.audit.verify.report import (
    MALFORMED,
    UNVERIFIED_CHECKPOINTS,
    Entry,
    IntegrityReport,
    Malformed,
    open_checkpoints,
)
from certbroker.config import AuditLocation

__all__ = ["FORMAT", "entry_line", "export", "verify_db", "verify_export"]

FORMAT: Final = 1
_PREFIX: Final = b'{"seq":'
_HASH_KEY: Final = b',"entry_hash":"'
_BODY_KEY: Final = b'","body":'


def export(
    db: AuditLocation, out: IO[bytes], first: int | None = None, last: int | None = None
) -> tuple[int, int]:
    """Write entries ``first..last`` of ``db`` to ``out``; returns the range written.

    ``first`` defaults to the first live entry (1, or the one after the archived ones),
    ``last`` to the end. Reads one consistent snapshot.
    """
    backend = backend_for(db)
    with closing(backend.connect_read()) as conn:
        backend.snapshot(conn)  # one read snapshot for header and entries
        size, _ = load_state(conn)
        archived, archived_hash = archived_head(conn)
        first = archived + 1 if first is None else first
        last = size if last is None else last
        if not archived + 1 <= first <= last + 1 or last > size:
            where = f"{archived + 1}..{size}" + (f" ({archived} archived)" if archived else "")
            raise ValueError(f"range {first}..{last} outside the log's {where}")
        prev = GENESIS_HASH
        if first - 1 == archived:
            prev = archived_hash
        elif first > 1:
            prev = hash_at(conn, first - 1)
        header = {
            "certbroker_audit_export": FORMAT,
            "origin": ORIGIN,
            "from": first,
            "to": last,
            "prev_hash": prev,
            "frontier": [h.hex() for h in frontier_at(conn, first - 1)],
            "checkpoints": [c.note for c in checkpoints(conn, first - 1, last)],
        }
        out.write(json.dumps(header, sort_keys=True, separators=(",", ":")).encode() + b"\n")
        for row in iter_rows(conn, first - 1):  # both entry formats, bodies as hashed
            if row.seq > last:
                break
            seq, entry_hash, body = row.seq, row.entry_hash, row.body
            out.write(
                b"%s%d%s%s%s%s}\n"
                % (
                    _PREFIX,
                    seq,
                    _HASH_KEY,
                    str(entry_hash).encode(),
                    _BODY_KEY,
                    str(body).encode("utf-8"),
                )
            )
    return first, last


def _parse_line(line: bytes) -> Entry:
    """Slice an entry line written by :func:`export`; ValueError if it is not one."""
    if not line.startswith(_PREFIX) or not line.endswith(b"}\n"):
        raise ValueError("not an entry line")
    comma = line.index(b",", 7)
    seq = int(line[7:comma])
    h_end = comma + len(_HASH_KEY) + 64
    if line[comma : comma + len(_HASH_KEY)] != _HASH_KEY or line[h_end : h_end + 9] != _BODY_KEY:
        raise ValueError("entry line keys out of place")
    return seq, line[h_end + 9 : -2], line[comma + len(_HASH_KEY) : h_end]


def entry_line(line: bytes) -> Entry:
    """(sequence, body exactly as hashed, entry hash) of one entry line of an export;
    ValueError if it is not one. Checks nothing else: :func:`verify_export` does."""
    return _parse_line(line if line.endswith(b"\n") else line + b"\n")


def _entries(lines: Iterator[bytes], first_line: int = 2) -> Iterator[Entry]:
    # The hot path of offline verification: plain slicing, no JSON decoding (see _parse_line).
    hash_key, body_key, hk = _HASH_KEY, _BODY_KEY, len(_HASH_KEY)
    for number, line in enumerate(lines, first_line):
        comma = line.find(b",", 7)
        h_end = comma + hk + 64
        try:
            if (
                line[:7] != _PREFIX
                or line[-2:] != b"}\n"
                or line[comma : comma + hk] != hash_key
                or line[h_end : h_end + 9] != body_key
            ):
                yield _parse_line(line if line.endswith(b"\n") else line + b"\n")
                continue
            yield int(line[7:comma]), line[h_end + 9 : -2], line[comma + hk : h_end]
        except ValueError as exc:
            raise _Malformed(number, str(exc)) from None


def entry_bodies(lines: Iterator[bytes]) -> Iterator[tuple[int, bytes]]:
    """(sequence, body exactly as hashed) of each entry line of an export (the lines after
    its header); :class:`~certbroker.audit.verify.report.Malformed` at a line that is not an
    entry. Checks nothing else: :func:`verify_export` does."""
    for seq, body, _ in _entries(lines):
        yield seq, body


class _Malformed(Malformed):
    """Export line ``number`` is not an entry line."""

    def __init__(self, number: int, message: str) -> None:
        super().__init__(f"line {number}", message)
        self.number = number

    def at(self, start: int) -> IntegrityReport:
        """The MALFORMED report, naming the entry the line holds in an export from ``start``."""
        self.first_bad = start + self.number - 2
        return self.report()


def _header(line: bytes) -> dict[str, Any]:
    data = json.loads(line)
    if not isinstance(data, dict) or data.get("certbroker_audit_export") != FORMAT:
        raise ValueError("first line is not a certbroker audit export header")
    for key, kind in (("from", int), ("to", int), ("prev_hash", str)):
        if not isinstance(data.get(key), kind):
            raise ValueError(f"header field {key!r} missing or wrong")
    if not isinstance(data.get("frontier"), list) or not isinstance(data.get("checkpoints"), list):
        raise ValueError("header frontier/checkpoints missing")
    # A hostile header must be MALFORMED, not a crash: the hash is later used as ASCII bytes.
    if not _HEX64.fullmatch(data["prev_hash"]):
        raise ValueError("header prev_hash is not 64 lowercase hex digits")
    if not all(isinstance(h, str) and _HEX64.fullmatch(h) for h in data["frontier"]):
        raise ValueError("header frontier holds something other than 64-hex hashes")
    if not all(isinstance(n, str) for n in data["checkpoints"]):
        raise ValueError("header checkpoints holds something other than note texts")
    return data


_HEX64 = re.compile(r"[0-9a-f]{64}")


def verify_export(
    path: Path, public_key: Ed25519PublicKey | None, *, chain_only: bool = False
) -> IntegrityReport:
    """Verify an export file offline with only the checkpoint public key.

    Without a key (None) the entries, chain and header are checked, but if the header carries
    checkpoints the report is UNVERIFIED_CHECKPOINTS, not intact (their notes, unverified,
    are still compared with the entries to say whether they agree). ``chain_only``: the
    checkpoints are not looked at, and the report says so.
    """
    with path.open("rb") as f:
        try:
            head = _header(f.readline())
            frontier = [bytes.fromhex(h) for h in head["frontier"]]
            CompactRange(head["from"] - 1, frontier)  # validates the frontier's shape
        except (ValueError, TypeError) as exc:
            return IntegrityReport(MALFORMED, 0, None, f"header: {exc}", location="header")
        notes: list[str] = [] if chain_only else head["checkpoints"]
        key = None if chain_only else public_key
        heads, bad = open_checkpoints(notes, key, "header checkpoints[{}]")
        if bad is not None:
            return bad
        start = head["from"]
        entries_at = f.tell() if f.seekable() else None  # a pipe is read once

        def walk(checkpoints: list[checkpoint.Checkpoint]) -> IntegrityReport:
            if entries_at is not None:
                f.seek(entries_at)
            try:
                return check_export(
                    f,
                    checkpoints,
                    _entries,
                    start=start,
                    prev_hash=str(head["prev_hash"]).encode("ascii"),
                    frontier=frontier,
                    expected_last=head["to"],
                )
            except _Malformed as exc:
                return exc.at(start)

        report = walk(heads if key is not None else [])
        if not report.ok or key is not None:
            return report
        if chain_only:
            msg = (
                f"checkpoints NOT checked (--chain-only): {len(head['checkpoints'])} in the "
                "header; a consistent rewrite would pass this check"
            )
            notes = [msg, *(n for n in report.notes if "covered by a checkpoint" not in n)]
            return dataclasses.replace(report, notes=notes, chain_only=True)
        if not heads:
            return report
        # No key: the entries hold up; say whether the (unverified) notes agree with them.
        msg = f"{len(heads)} checkpoint(s) in the header, and no public key to check them"
        claimed = walk(heads) if entries_at is not None else None
        if claimed is None:
            msg += "; not compared with the entries (read from a pipe)"
        elif claimed.ok:
            msg += "; their notes (unverified) agree with the entries"
        else:
            msg += f"; the notes (unverified) DISAGREE with the entries: {claimed.problem}"
        msg += " (give --public-key, or --chain-only to check the chain alone)"
        return IntegrityReport(
            UNVERIFIED_CHECKPOINTS, report.entries, None, msg, 0, location="header checkpoints"
        )
