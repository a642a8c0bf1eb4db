"""Verify the live database: the entries, and every stored table that proofs, exports and
receipts are served from.

The entries are walked by the one checker of :mod:`certbroker.audit.verify.report`. The rest
of the store is not trusted because the entries are fine: the broker answers inclusion and
consistency proofs from ``merkle_nodes``, exports pick checkpoints by the ``checkpoints.size``
column, the writer continues the tree from ``merkle_state``. So each of them is checked against
what it is derived from:

``checkpoints``
    each note opened (with the public key: its signature too), and the row's ``size``,
    ``root_hash`` and ``time`` columns equal to what the note says (BAD_CHECKPOINT otherwise);
    each signed root equal to the entries' (REWRITTEN) or, for archived sizes, to the stored
    tree's (BAD_TREE).
``audit_log``
    beyond the chain: the ``prev_hash`` column, the indexed columns and the sequence inside
    the body agree with the hashed body (EDITED).
``audit_entries`` / ``audit_terms`` (format version 2)
    each row decodable (MALFORMED otherwise); its body is rebuilt from the row and the terms,
    so any changed value is a hash mismatch (EDITED).
``merkle_nodes``
    every stored node equal to the node recomputed from the live entries (the nodes under
    archived entries only read: those entries are in the archive files), no node missing and
    none beyond the tree (BAD_TREE). Below level ``STORED_LEVEL`` a node completed by a
    compact (version 2) writer is not stored: it may be missing, and if present must be right.
``merkle_state`` (SQLite)
    the size and frontier of that tree (BAD_TREE).
``audit_archives``
    readable, as the live rows chain on from its last hash.

Rows are read strictly: a value that is not of its column's kind (text that is not UTF-8, a
hash that is not 32 bytes, a size that is not a non-negative integer...) is MALFORMED, with its
location, never a crash.

Without a public key, everything but the signatures is checked; if there are checkpoints, the
report is UNVERIFIED_CHECKPOINTS rather than intact (the notes, unverified, are still compared
with the entries, to say whether they agree). ``chain_only`` skips the checkpoints on purpose
and says so.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from contextlib import closing
from typing import Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from certbroker.audit.events import GENESIS_HASH, iso_time
from certbroker.audit.integrity.checkpoint import Checkpoint
from certbroker.audit.integrity.merkle import (
    HASH_SIZE,
    CompactRange,
    leaf_hash,
    node_hash,
    perfect_subtree_hasher,
)
from certbroker.audit.integrity.tree import STORED_LEVEL, frontier_positions, node_reader
from certbroker.audit.store import compact
from certbroker.audit.store.base import Connection, UndecodableText
from certbroker.audit.store.db import backend_for
from certbroker.audit.store.rows import INDEXED_COLUMNS, has_compact
from certbroker.audit.verify.report import (
    BAD_CHECKPOINT,
    BAD_TREE,
    EDITED,
    MALFORMED,
    OK,
    UNVERIFIED_CHECKPOINTS,
    Entry,
    IntegrityReport,
    Malformed,
    check_entries,
    open_note,
)
from certbroker.config import AuditLocation
from certbroker.errors import BrokerError

_HEX64: Final = re.compile(r"[0-9a-f]{64}")


def verify_db(
    db: AuditLocation, public_key: Ed25519PublicKey | None, *, chain_only: bool = False
) -> IntegrityReport:
    """Verify the live database at ``db`` (see the module docstring); opens it read-only, in
    one snapshot.

    ``public_key`` None: the checkpoints are read but their signatures cannot be checked
    (UNVERIFIED_CHECKPOINTS if there are any). ``chain_only``: the checkpoints are not looked
    at (the key is then ignored), and the report says so.

    After archival the live rows start past the watermark and chain from the last archived
    hash; the archive files themselves are checked by
    :func:`certbroker.audit.archive.verify_with_archives`. ``FileNotFoundError`` if there is no
    log, ``Unavailable`` if PostgreSQL cannot be reached.
    """
    backend = backend_for(db)
    with closing(backend.connect_read()) as conn:
        try:
            backend.snapshot(conn)
            backend.keep_undecodable_text(conn)
            return _verify(conn, None if chain_only else public_key, chain_only=chain_only)
        except Malformed as exc:
            return exc.report()
        except (FileNotFoundError, BrokerError):
            raise
        except Exception as exc:  # noqa: BLE001 - a row no check above foresaw: still no crash
            msg = f"the store could not be read: {type(exc).__name__}: {exc}"
            return IntegrityReport(MALFORMED, 0, None, msg)


def _verify(
    conn: Connection, public_key: Ed25519PublicKey | None, *, chain_only: bool
) -> IntegrityReport:
    archived, archived_hash = _archived_head(conn)
    heads: list[Checkpoint] = []
    stored_checkpoints = 0
    if chain_only:
        (stored_checkpoints,) = conn.execute("SELECT count(*) FROM checkpoints").fetchone()
    else:
        opened = _checkpoints(conn, public_key)
        if isinstance(opened, IntegrityReport):
            return opened
        heads = opened
    signed = heads if public_key is not None else []
    start = _nodes_at(conn, frontier_positions(archived), "the archived entries' frontier")
    if isinstance(start, IntegrityReport):
        return start
    rows = _LiveRows(conn, archived, archived_hash)
    report = check_entries(
        rows,
        [h for h in signed if h.size >= archived],  # smaller ones: against the stored tree
        start=archived + 1,
        prev_hash=archived_hash.encode("ascii"),
        frontier=start,
    )
    if not report.ok:
        return report
    if rows.problem is not None:
        return _with(rows.problem, report)
    size = archived + report.entries
    roots: dict[int, bytes] = {h.size: b"" for h in heads}  # filled by the tree check
    frontier = _check_tree(conn, archived, size, roots, start, rows.first_compact)
    if isinstance(frontier, IntegrityReport):
        return _with(frontier, report)
    bad = _check_state(conn, size, frontier)
    if bad is not None:
        return _with(bad, report)
    for head in signed:
        if head.size < archived and roots.get(head.size) != head.root_hash:
            msg = (
                f"the stored Merkle nodes of the archived entries disagree with the signed "
                f"checkpoint of size {head.size}"
            )
            return _with(IntegrityReport(BAD_TREE, 0, None, msg, location="merkle_nodes"), report)
    notes = list(report.notes)
    if archived:
        notes.append(f"entries 1..{archived} are archived; verify them with --with-archives")
    if chain_only:
        msg = (
            f"checkpoints NOT checked (--chain-only): {stored_checkpoints} stored; a consistent "
            "rewrite of the log would pass this check"
        )
        notes = [msg, *(n for n in notes if "covered by a checkpoint" not in n)]
        return IntegrityReport(OK, report.entries, None, "", 0, notes, chain_only=True)
    if public_key is None and heads:
        return _unverified(heads, roots, report.entries)
    if public_key is None:
        notes.append("no checkpoint public key given, and no checkpoint is stored")
    return IntegrityReport(OK, report.entries, None, "", report.checkpoints, notes)


def _with(problem: IntegrityReport, walk: IntegrityReport) -> IntegrityReport:
    """A problem found after the walk, with the walk's entry and checkpoint counts."""
    return IntegrityReport(
        problem.code,
        walk.entries,
        problem.first_bad,
        problem.problem,
        walk.checkpoints,
        location=problem.location,
    )


def _unverified(
    heads: Sequence[Checkpoint], roots: dict[int, bytes], entries: int
) -> IntegrityReport:
    """Every check but the signatures passed, and there are checkpoints: not intact, but say
    whether their (unverified) notes agree with the entries (``roots``: the tree's root at
    each of their sizes, absent beyond the tree)."""
    disagree = [h.size for h in heads if roots.get(h.size) != h.root_hash]
    msg = f"{len(heads)} stored checkpoint(s), and no public key to check their signatures"
    if disagree:
        msg += (
            f"; the notes (unverified) DISAGREE with the entries at size(s) "
            f"{', '.join(map(str, disagree))}: the log or the checkpoints were altered"
        )
    else:
        msg += "; their notes (unverified) agree with the entries"
    msg += " (give --public-key, or --chain-only to check the chain alone)"
    return IntegrityReport(UNVERIFIED_CHECKPOINTS, entries, None, msg, 0, location="checkpoints")


# --- reading values strictly --------------------------------------------------------------


def _kind(value: object) -> str:
    """What a stored value is, for a message."""
    if value is None:
        return "NULL"
    if isinstance(value, UndecodableText):
        return f"text that is not UTF-8 ({value.raw[:16]!r})"
    if isinstance(value, bytes | memoryview):
        return f"a blob of {len(value)} bytes"
    if isinstance(value, str):
        return f"the text {value[:40]!r}"
    return f"{type(value).__name__} {value!r}"[:60]


def _text(value: object, where: str, first_bad: int | None = None) -> str:
    if isinstance(value, str):
        return value
    raise Malformed(where, f"{_kind(value)} where text is stored", first_bad)


def _integer(value: object, where: str, first_bad: int | None = None, minimum: int = 0) -> int:
    if type(value) is int and value >= minimum:
        return value
    raise Malformed(where, f"{_kind(value)} where an integer >= {minimum} is stored", first_bad)


def _hash(value: object, where: str, first_bad: int | None = None) -> bytes:
    if isinstance(value, bytes | memoryview) and len(value) == HASH_SIZE:
        return bytes(value)
    raise Malformed(where, f"{_kind(value)} where a {HASH_SIZE}-byte hash is stored", first_bad)


def _key(value: object) -> str:
    """A row key for a location: as stored, whatever it is."""
    return str(value) if type(value) is int else repr(value)


# --- the tables ---------------------------------------------------------------------------


ArchiveRow = tuple[int, int, str, str, str, str]
"""An ``audit_archives`` row: first_seq, last_seq, last_entry_hash, file_name, file_sha256,
time (the order of :class:`certbroker.audit.archive.ArchiveRecord`)."""


def archive_rows(conn: Connection) -> list[ArchiveRow]:
    """Every ``audit_archives`` row, oldest first, read strictly (:class:`Malformed` names a
    bad value; call :meth:`~certbroker.audit.store.base.Backend.keep_undecodable_text` on
    ``conn`` first). [] when the table is not there (an SQLite file from before archival)."""
    if not conn.backend.has_table(conn, "audit_archives"):
        return []
    rows: list[ArchiveRow] = []
    sql = (
        "SELECT last_seq, first_seq, last_entry_hash, file_name, file_sha256, time "
        "FROM audit_archives ORDER BY last_seq"
    )
    for last, first, last_hash, name, digest, when in conn.execute(sql).fetchall():
        where = f"audit_archives[last_seq={_key(last)}]."
        last_seq = _integer(last, where + "last_seq", minimum=1)
        first_seq = _integer(first, where + "first_seq", minimum=1)
        entry_hash = _text(last_hash, where + "last_entry_hash", last_seq)
        if not _HEX64.fullmatch(entry_hash):  # the next entry chains from it
            raise Malformed(where + "last_entry_hash", "not 64 lowercase hex digits", last_seq)
        file_name = _text(name, where + "file_name")
        file_sha256 = _text(digest, where + "file_sha256")
        written = _text(when, where + "time")
        rows.append((first_seq, last_seq, entry_hash, file_name, file_sha256, written))
    return rows


def _archived_head(conn: Connection) -> tuple[int, str]:
    """(last archived sequence, its entry hash), where the live rows continue the chain;
    (0, genesis) when nothing was archived."""
    rows = archive_rows(conn)
    return (rows[-1][1], rows[-1][2]) if rows else (0, GENESIS_HASH)


def _checkpoints(
    conn: Connection, public_key: Ed25519PublicKey | None
) -> list[Checkpoint] | IntegrityReport:
    """Every ``checkpoints`` row: its note opened (verified if there is a key) and its columns
    equal to what the note says. The first problem as a report."""
    heads = []
    sql = "SELECT id, size, root_hash, time, note FROM checkpoints ORDER BY id"
    for row_id, size, root_hash, when, note in conn.backend.stream(conn, sql):
        where = f"checkpoints[id={_key(row_id)}]."
        columns = (
            _integer(size, where + "size"),
            _hash(root_hash, where + "root_hash"),
            _text(when, where + "time"),
        )
        head = open_note(_text(note, where + "note"), public_key, where + "note")
        if isinstance(head, IntegrityReport):
            return head
        said = (head.size, head.root_hash, iso_time(head.time))
        for column, stored, expected in zip(
            ("size", "root_hash", "time"), columns, said, strict=True
        ):
            if stored != expected:
                note_kind = "signed note" if public_key is not None else "note (unverified)"
                msg = (
                    f"{where}{column}: the row says {_shown(stored)} but its {note_kind} says "
                    f"{_shown(expected)} (the row was altered)"
                )
                return IntegrityReport(BAD_CHECKPOINT, 0, None, msg, location=where + column)
        heads.append(head)
    return heads


def _shown(value: object) -> str:
    return value.hex() if isinstance(value, bytes) else repr(value)


class _LiveRows:
    """The live ``audit_log`` rows as the walk's entries, read strictly.

    What the walk does not look at is compared on the way, and the first difference kept in
    :attr:`problem` (EDITED): the ``prev_hash`` column, the sequence inside the body and the
    indexed columns, all of which queries and reports read instead of the hashed body. It only
    counts if the walk finds nothing earlier.
    """

    def __init__(self, conn: Connection, after: int, prev_hash: str) -> None:
        self._conn = conn
        self._after = after
        self._prev = prev_hash
        self.problem: IntegrityReport | None = None
        self.first_compact: int | None = None  # the first version 2 entry, if any

    def __iter__(self) -> Iterator[Entry]:
        conn = self._conn
        sql = f"SELECT {', '.join(_ROW_COLUMNS)} FROM audit_log WHERE seq > ? ORDER BY seq"  # noqa: S608
        prev = self._prev
        last = self._after
        for values in conn.backend.stream(conn, sql, (self._after,)):
            seq, body, prev_column, entry_hash, *indexed = values
            # The common case tested in one go; _refuse names the bad value (it raises).
            if type(seq) is not int or any(type(v) is not str for v in values[1:]):
                _refuse(values)
            if self.problem is None:
                self._compare(seq, prev, body, prev_column, indexed)
            prev = entry_hash
            # UTF-8, not ASCII: a stored hash with other characters is a mismatch, not a crash.
            yield seq, body.encode("utf-8"), entry_hash.encode("utf-8")
            last = seq
        if has_compact(conn):
            yield from self._compact(max(self._after, last))

    def _compact(self, after: int) -> Iterator[Entry]:
        """The version 2 rows after ``after``: each body rebuilt from its row and the terms
        (a row or term that cannot be decoded is MALFORMED, at its location)."""
        conn = self._conn
        terms = compact.Terms()
        terms.load(conn)
        sql = compact.select_sql(["seq > ?"])
        for values in conn.backend.stream(conn, sql, (after,)):
            seq = _integer(values[0], f"audit_entries[seq={_key(values[0])}].seq")
            if self.first_compact is None:
                self.first_compact = seq
            try:
                body = compact.body_text(conn, terms, values)
                entry_hash = compact.hash_hex(values[-1])
            except (ValueError, TypeError, KeyError) as exc:
                raise Malformed(f"audit_entries[seq={seq}]", str(exc), seq) from None
            yield seq, body.encode("utf-8"), entry_hash.encode("ascii")

    def _compare(
        self, seq: int, prev: str, body: str, prev_column: str, indexed: Sequence[str]
    ) -> None:
        where = f"audit_log[seq={seq}]."
        column, why = "", ""
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            column, why = "body", "body is not a JSON object"
        elif prev_column != prev:
            column, why = "prev_hash", "prev_hash does not match the previous entry's hash"
        elif type(data.get("seq")) is not int or data["seq"] != seq:
            column, why = "body", f"body carries sequence {data.get('seq')!r}"
        else:
            for name, value in zip(INDEXED_COLUMNS, indexed, strict=True):
                if data.get(name) != value:
                    column, why = name, f"column {name} differs from the hashed body"
                    break
        if why:
            msg = f"entry {seq}: {why} (entry edited)"
            self.problem = IntegrityReport(EDITED, 0, seq, msg, location=where + column)


_ROW_COLUMNS: Final = ("seq", "body", "prev_hash", "entry_hash", *INDEXED_COLUMNS)


def _refuse(values: Sequence[object]) -> None:
    """Raise :class:`Malformed` for the first value of an ``audit_log`` row (in
    :data:`_ROW_COLUMNS` order) that is not of its kind."""
    seq = _integer(values[0], f"audit_log[seq={_key(values[0])}].seq")
    for name, value in zip(_ROW_COLUMNS[1:], values[1:], strict=True):
        _text(value, f"audit_log[seq={seq}].{name}", seq)


def _level(conn: Connection, level: int) -> Iterator[tuple[int, bytes]]:
    """The stored nodes of one level, in index order, read strictly."""
    sql = "SELECT idx, hash FROM merkle_nodes WHERE level = ? ORDER BY idx"
    for idx, digest in conn.backend.stream(conn, sql, (level,)):
        if type(idx) is int and type(digest) is bytes and len(digest) == HASH_SIZE:
            yield idx, digest  # the common case; below, the location of a bad value
            continue
        where = f"merkle_nodes[level={level},idx={_key(idx)}]."
        index = _integer(idx, where + "idx", minimum=-(2**63))
        yield index, _hash(digest, where + "hash", _first_leaf(level, index))


def _first_leaf(level: int, index: int) -> int | None:
    """The first entry under node (level, index), or None if there is none."""
    return (index << level) + 1 if index >= 0 else None


def _leaves(conn: Connection, archived: int) -> Iterator[bytes]:
    """The leaf hashes of the live entries (both formats), in order: the walk read them
    strictly already."""
    sql = "SELECT body FROM audit_log WHERE seq > ? ORDER BY seq"
    last = archived
    for (body,) in conn.backend.stream(conn, sql, (archived,)):
        last += 1
        yield leaf_hash(str(body).encode("utf-8"))
    if has_compact(conn):
        terms = compact.Terms()
        terms.load(conn)
        sql = compact.select_sql(["seq > ?"])
        for values in conn.backend.stream(conn, sql, (last,)):
            yield leaf_hash(compact.body_text(conn, terms, values).encode("utf-8"))


class _StoredLevel:
    """The stored nodes of one level, consumed in index order as the tree is rebuilt."""

    def __init__(self, conn: Connection, level: int) -> None:
        self.level = level
        self._nodes = _level(conn, level)
        self.head = next(self._nodes, None)

    def take(self, index: int, archived: int) -> bytes | IntegrityReport | None:
        """The stored hash of node ``index`` (None if not stored), passing the nodes before
        it that lie under archived entries; any other node before it is outside the tree."""
        while self.head is not None and self.head[0] < index:
            got = self.head[0]
            if got < 0 or (got + 1) << self.level > archived:
                where = f"merkle_nodes[level={self.level},idx={got}]"
                msg = f"{where}: a node outside the tree"
                return IntegrityReport(BAD_TREE, 0, None, msg, location=where)
            self.head = next(self._nodes, None)
        if self.head is not None and self.head[0] == index:
            digest = self.head[1]
            self.head = next(self._nodes, None)
            return digest
        return None


def _check_archived_nodes(conn: Connection, archived: int) -> IntegrityReport | None:
    """The stored nodes under archived entries cannot be rebuilt here (the entries are in the
    archive files), but each whose two children are stored must be their hash."""
    for level in range(1, archived.bit_length()):
        below = _level(conn, level - 1)
        child = next(below, None)
        for index, digest in _level(conn, level):
            if index < 0 or (index + 1) << level > archived:
                break
            pair: dict[int, bytes] = {}
            while child is not None and child[0] <= 2 * index + 1:
                if child[0] >= 2 * index:
                    pair[child[0]] = child[1]
                child = next(below, None)
            if len(pair) == 2 and node_hash(pair[2 * index], pair[2 * index + 1]) != digest:
                where = f"merkle_nodes[level={level},idx={index}]"
                msg = f"{where}.hash differs from the hash of the two below it"
                first = _first_leaf(level, index)
                return IntegrityReport(BAD_TREE, 0, first, msg, location=f"{where}.hash")
    return None


def _archived_roots(
    conn: Connection, sizes: Sequence[int], roots: dict[int, bytes]
) -> IntegrityReport | None:
    """``roots[size]`` for the checkpoint ``sizes`` inside the archived entries, from the
    stored nodes (their entries are in the archive files)."""
    subtree = perfect_subtree_hasher(node_reader(conn))
    for size in sizes:
        try:
            roots[size] = subtree(0, size) if size else CompactRange().root()
        except KeyError:
            msg = f"the stored Merkle nodes lack the tree of the first {size} entries"
            return IntegrityReport(BAD_TREE, 0, None, msg, location="merkle_nodes")
    return None


def _check_tree(
    conn: Connection,
    archived: int,
    size: int,
    roots: dict[int, bytes],
    start: Sequence[bytes],
    first_compact: int | None,
) -> IntegrityReport | tuple[bytes, ...]:
    """Every stored node against the tree rebuilt from the live entries (continuing the
    archived entries' frontier ``start``); a node missing, wrong, or beyond a tree of
    ``size`` leaves is BAD_TREE. Nodes below :data:`STORED_LEVEL` whose last leaf is a
    version 2 entry (``first_compact`` on) may be missing. Returns the tree's frontier.

    On the way, the root at each size in ``roots`` that the tree reaches is filled in (and
    the others removed), and ``roots[size]`` set: the leaves are streamed once anyway, where
    asking the stored nodes would take O(log n) lookups per checkpoint. Sizes below
    ``archived`` are read from the stored nodes."""
    levels = size.bit_length()
    stored = [_StoredLevel(conn, level) for level in range(levels)]
    problem: list[IntegrityReport] = []
    optional_from = size + 1 if first_compact is None else first_compact

    def on_node(level: int, index: int, digest: bytes) -> None:
        if problem:
            return
        got = stored[level].take(index, archived)
        where = f"merkle_nodes[level={level},idx={index}]"
        first = _first_leaf(level, index)
        if isinstance(got, IntegrityReport):
            problem.append(got)
        elif got is None:
            if level >= STORED_LEVEL or (index + 1) << level < optional_from:
                msg = f"{where}: missing"
                problem.append(IntegrityReport(BAD_TREE, 0, first, msg, location=where))
        elif got != digest:
            what = f"entry {first}'s leaf hash" if level == 0 else "the hash of the two below it"
            msg = f"{where}.hash differs from {what} (proofs served from it are wrong)"
            problem.append(IntegrityReport(BAD_TREE, 0, first, msg, location=f"{where}.hash"))

    wanted = set(roots)
    roots.clear()
    bad = _check_archived_nodes(conn, archived) or _archived_roots(
        conn, sorted(s for s in wanted if s <= archived), roots
    )
    if bad is not None:
        return bad
    tree = CompactRange(archived, list(start), on_node=on_node)
    for digest in _leaves(conn, archived):
        tree.append(digest)
        if problem:
            return problem[0]
        if tree.size in wanted:
            roots[tree.size] = tree.root()
    for stored_level in stored:  # nodes past the end of the rebuilt tree
        index = size >> stored_level.level
        got = stored_level.take(index, archived)
        if isinstance(got, IntegrityReport):
            return got
        if got is None and stored_level.head is not None:
            index = stored_level.head[0]
        if got is not None or stored_level.head is not None:
            where = f"merkle_nodes[level={stored_level.level},idx={index}]"
            msg = f"{where}: a node beyond the tree of the {size} entries"
            return IntegrityReport(BAD_TREE, 0, None, msg, location=where)
    sql = (
        "SELECT level, idx FROM merkle_nodes WHERE level < 0 OR level >= ? "
        "ORDER BY level, idx LIMIT 1"
    )
    extra = conn.execute(sql, (levels,)).fetchone()
    if extra is not None:
        where = f"merkle_nodes[level={_key(extra[0])},idx={_key(extra[1])}]"
        _integer(extra[0], where + ".level", minimum=-(2**63))
        msg = f"{where}: a node beyond the tree of the {size} entries"
        return IntegrityReport(BAD_TREE, 0, None, msg, location=where)
    roots[size] = tree.root()
    return tree.frontier


def _check_state(conn: Connection, size: int, frontier: Sequence[bytes]) -> IntegrityReport | None:
    """``merkle_state``, where the backend keeps it (SQLite): the writer continues the tree
    from its size and frontier, so they must be those of the checked tree (``size`` leaves,
    ``frontier``)."""
    if not conn.backend.has_table(conn, "merkle_state"):
        return None
    rows = conn.execute("SELECT id, size, frontier FROM merkle_state ORDER BY id").fetchall()
    if not rows:
        if size == 0:
            return None
        msg = f"merkle_state: no row, though the tree has {size} leaves"
        return IntegrityReport(BAD_TREE, 0, None, msg, location="merkle_state")
    for row_id, size_column, cached in rows:
        where = f"merkle_state[id={_key(row_id)}]."
        if row_id != 1:
            msg = f"{where[:-1]}: a row other than the one (id 1) the writer keeps"
            return IntegrityReport(BAD_TREE, 0, None, msg, location=where[:-1])
        stored_size = _integer(size_column, where + "size")
        if not isinstance(cached, bytes | memoryview) or len(cached) % HASH_SIZE:
            raise Malformed(where + "frontier", f"{_kind(cached)}, not {HASH_SIZE}-byte hashes")
        if stored_size != size:
            msg = f"{where}size: {stored_size}, but the tree has {size} leaves"
            return IntegrityReport(BAD_TREE, 0, None, msg, location=where + "size")
        if bytes(cached) != b"".join(frontier):
            msg = f"{where}frontier is not the frontier of the stored tree (appends would fork)"
            return IntegrityReport(BAD_TREE, 0, None, msg, location=where + "frontier")
    return None


def _nodes_at(
    conn: Connection, positions: Sequence[tuple[int, int]], what: str
) -> list[bytes] | IntegrityReport:
    """The stored nodes at ``positions`` (level, index), read strictly; BAD_TREE if one is
    missing."""
    hashes = []
    for level, index in positions:
        where = f"merkle_nodes[level={level},idx={index}]"
        row = conn.execute(
            "SELECT hash FROM merkle_nodes WHERE level = ? AND idx = ?", (level, index)
        ).fetchone()
        if row is None:
            msg = f"{where}: missing ({what} needs it)"
            return IntegrityReport(BAD_TREE, 0, _first_leaf(level, index), msg, location=where)
        hashes.append(_hash(row[0], where + ".hash", _first_leaf(level, index)))
    return hashes
