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

import json
import re
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import IO, Any, Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from certbroker.audit.events import GENESIS_HASH
from certbroker.audit.integrity import checkpoint
from certbroker.audit.integrity.merkle import CompactRange, leaf_hash
from certbroker.audit.integrity.proofs import ORIGIN, checkpoints
from certbroker.audit.integrity.tree import frontier_at, load_state
from certbroker.audit.store.base import Connection
from certbroker.audit.store.db import backend_for
from certbroker.audit.store.rows import archived_head
from certbroker.audit.verify.chain import verify as verify_chain
from certbroker.audit.verify.parallel import check_export
from certbroker.audit.verify.report import (
    EDITED,
    MALFORMED,
    REWRITTEN,
    Entry,
    IntegrityReport,
    check_entries,
    open_checkpoints,
)
from certbroker.config import AuditLocation

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
            row = conn.execute("SELECT entry_hash FROM audit_log WHERE seq = ?", (first - 1,))
            prev = str(row.fetchone()[0])
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
        rows = backend.stream(
            conn,
            "SELECT seq, entry_hash, body FROM audit_log WHERE seq BETWEEN ? AND ? ORDER BY seq",
            (first, last),
        )
        for seq, entry_hash, body in rows:
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
            raise _Malformed(f"line {number}: {exc}") from None


class _Malformed(Exception):
    pass


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
    return data


_HEX64 = re.compile(r"[0-9a-f]{64}")


def verify_export(path: Path, public_key: Ed25519PublicKey) -> IntegrityReport:
    """Verify an export file offline with only the checkpoint public key."""
    with path.open("rb") as f:
        try:
            head = _header(f.readline())
            frontier = [bytes.fromhex(h) for h in head["frontier"]]
            CompactRange(head["from"] - 1, frontier)  # validates the frontier's shape
        except (ValueError, TypeError) as exc:
            return IntegrityReport(MALFORMED, 0, None, f"header: {exc}")
        heads, bad = open_checkpoints([str(n) for n in head["checkpoints"]], public_key)
        if bad is not None:
            return bad
        try:
            return check_export(
                f,
                heads,
                _entries,
                start=head["from"],
                prev_hash=str(head["prev_hash"]).encode("ascii"),
                frontier=frontier,
                expected_last=head["to"],
            )
        except _Malformed as exc:
            return IntegrityReport(MALFORMED, 0, None, str(exc))


def _db_entries(conn: Connection, after: int) -> Iterator[Entry]:
    for seq, body, entry_hash in conn.backend.stream(
        conn, "SELECT seq, body, entry_hash FROM audit_log WHERE seq > ? ORDER BY seq", (after,)
    ):
        yield int(seq), str(body).encode("utf-8"), str(entry_hash).encode("ascii")


def verify_db(db: AuditLocation, public_key: Ed25519PublicKey | None) -> IntegrityReport:
    """Verify the live database: chain, indexed columns, Merkle tables and, if a key is
    given, every stored checkpoint (signature and root). Opens the log read-only.

    After archival the live rows start past the watermark and chain from the last archived
    hash; checkpoints of archived sizes are checked with the archives
    (:func:`certbroker.audit.archive.verify_with_archives`).
    """
    backend = backend_for(db)
    with closing(backend.connect_read()) as conn:
        backend.snapshot(conn)
        notes = [c.note for c in checkpoints(conn)]
        heads: list[checkpoint.Checkpoint] = []
        if public_key is not None:
            heads, bad = open_checkpoints(notes, public_key)
            if bad is not None:
                return bad
        archived, archived_hash = archived_head(conn)
        try:
            start_frontier = frontier_at(conn, archived)
        except KeyError as exc:
            msg = f"the Merkle nodes of the archived entries are missing: {exc}"
            return IntegrityReport(REWRITTEN, 0, None, msg, len(heads))
        report = check_entries(
            _db_entries(conn, archived),
            heads,
            start=archived + 1,
            prev_hash=archived_hash.encode("ascii"),
            frontier=start_frontier,
        )
        if not report.ok:
            return report
        size, frontier = load_state(conn)
        tree = CompactRange(archived, start_frontier)
        for _, body, _ in _db_entries(conn, archived):
            tree.append(leaf_hash(body))
        if size != tree.size or CompactRange(size, frontier).root() != tree.root():
            msg = "the stored Merkle tree does not match the entries"
            return IntegrityReport(REWRITTEN, report.entries, None, msg, len(heads))
    chain = verify_chain(db)  # also compares the indexed columns with the hashed bodies
    if not chain.ok:
        return IntegrityReport(EDITED, chain.entries, chain.first_bad, chain.problem, len(heads))
    if archived:
        report.notes.append(f"entries 1..{archived} are archived; verify them with --with-archives")
    if public_key is None:
        report.notes.append("no checkpoint public key given: checkpoints not checked")
    return report
