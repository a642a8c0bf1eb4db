"""The audit log's rows: how entries sit in the ``audit_log`` table, read back and checked.

The entry format itself (canonical body, hash chain, genesis hash) is specified and implemented
in :mod:`certbroker.audit.events`; a body here is just its stored text, so the chain code serves
every event kind. Backend-neutral: the SQL here runs on any
:class:`~certbroker.audit.store.base.Connection` and asks ``conn.backend`` where SQLite and
PostgreSQL differ. Appending (chain and Merkle tree in one transaction) is
:mod:`certbroker.audit.append`.

Archival (:mod:`certbroker.audit.archive`) removes the oldest rows after exporting them; the
``audit_archives`` table then holds the *watermark*: the last archived sequence and its chain
hash, where the live rows continue (:func:`archived_head`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, LiteralString

# The format names were defined here before they moved to the entry model; re-exported so
# `from certbroker.audit.store.rows import canonical_body` (and the others) keeps working.
from certbroker.audit.events import (
    AUDIT_UNAVAILABLE,
    FORMAT_VERSION,
    GENESIS_HASH,
    canonical_body,
    chain_hash,
    epoch_time,
    iso_time,
)
from certbroker.audit.store import compact
from certbroker.audit.store.base import Connection

__all__ = [
    "AUDIT_UNAVAILABLE",
    "FORMAT_VERSION",
    "GENESIS_HASH",
    "INDEXED_COLUMNS",
    "ChainResult",
    "StoredRow",
    "archived_head",
    "bodies_between",
    "canonical_body",
    "chain_hash",
    "check_chain",
    "epoch_time",
    "hash_at",
    "insert_compact",
    "insert_rows",
    "iso_time",
    "iter_rows",
    "prev_hashes",
    "read_tail",
    "select_rows",
]

INDEXED_COLUMNS = (
    "entry_id",
    "time",
    "clerk",
    "subject_id",
    "matter_code",
    "record_type",
    "decision",
)
"""Body keys copied into their own columns so queries can use indexes. They are not covered by
the hash directly, so :func:`check_chain` compares each one with the hashed body."""

#: The notice outbox (:mod:`certbroker.audit.outbox`), in both backends' schemas: one row per
#: access, inserted in the entry's transaction, ``sent`` set once a message broker has it. Both
#: dialects accept these statements as written (PostgreSQL's search_path is the log's schema);
#: the partial index keeps the relay's look-up of unsent notices cheap as the table grows.
OUTBOX_DDL: tuple[LiteralString, ...] = (
    """CREATE TABLE IF NOT EXISTS audit_outbox (
        entry_id   TEXT PRIMARY KEY,
        seq        BIGINT NOT NULL,
        subject_id TEXT NOT NULL,
        due        TEXT NOT NULL,
        notice     TEXT NOT NULL,
        sent       TEXT
    )""",
    "CREATE INDEX IF NOT EXISTS audit_outbox_unsent ON audit_outbox (due) WHERE sent IS NULL",
)

ROW_COLUMNS = "seq, body, prev_hash, entry_hash, " + ", ".join(INDEXED_COLUMNS)
_INSERT_COLUMNS = ("seq", *INDEXED_COLUMNS, "body", "prev_hash", "entry_hash")
_INSERT_TYPES = ("bigint", *("text" for _ in INDEXED_COLUMNS), "text", "text", "text")


@dataclass(frozen=True)
class StoredRow:
    """One row as stored. ``columns`` holds the :data:`INDEXED_COLUMNS` values."""

    seq: int
    body: str
    prev_hash: str
    entry_hash: str
    columns: Mapping[str, str]


def archived_head(conn: Connection) -> tuple[int, str]:
    """(last archived sequence, its entry hash): where the live rows continue the chain.

    (0, genesis) when nothing was archived (or the SQLite file predates archival).
    """
    if not conn.backend.has_table(conn, "audit_archives"):
        return 0, GENESIS_HASH
    row = conn.execute(
        "SELECT last_seq, last_entry_hash FROM audit_archives ORDER BY last_seq DESC LIMIT 1"
    ).fetchone()
    return (0, GENESIS_HASH) if row is None else (int(row[0]), str(row[1]))


def has_compact(conn: Connection) -> bool:
    """Whether the log has the version 2 table (an SQLite file opened read-only before a
    writer of this version touched it has not)."""
    return conn.backend.has_table(conn, "audit_entries")


def read_tail(conn: Connection) -> tuple[int, str]:
    """(sequence, entry hash) of the last entry, live or archived; (0, genesis) if none."""
    if has_compact(conn):
        row = conn.execute(
            "SELECT seq, entry_hash FROM audit_entries ORDER BY seq DESC LIMIT 1"
        ).fetchone()
        if row is not None:
            return int(row[0]), compact.hash_hex(row[1])
    tail = conn.execute("SELECT seq, entry_hash FROM audit_log ORDER BY seq DESC LIMIT 1")
    row = tail.fetchone()
    return archived_head(conn) if row is None else (int(row[0]), str(row[1]))


def hash_at(conn: Connection, seq: int) -> str:
    """The entry hash of entry ``seq`` (genesis for 0), live or the archived watermark;
    ``KeyError`` if it is neither."""
    if seq == 0:
        return GENESIS_HASH
    if has_compact(conn):
        row = conn.execute("SELECT entry_hash FROM audit_entries WHERE seq = ?", (seq,)).fetchone()
        if row is not None:
            return compact.hash_hex(row[0])
    row = conn.execute("SELECT entry_hash FROM audit_log WHERE seq = ?", (seq,)).fetchone()
    if row is not None:
        return str(row[0])
    archived, archived_hash = archived_head(conn)
    if seq == archived:
        return archived_hash
    raise KeyError(f"entry {seq} is not in the live log")


def prev_hashes(conn: Connection, seqs: Sequence[int]) -> dict[int, str]:
    """The hash before each of the entries ``seqs`` (``seq - 1``'s entry hash), in as few
    queries as possible (readers of scattered rows: a citizen's entries)."""
    wanted = sorted({seq - 1 for seq in seqs})
    found: dict[int, str] = {}
    for start in range(0, len(wanted), 256):
        chunk = wanted[start : start + 256]
        marks = ", ".join("?" * len(chunk))
        if has_compact(conn):
            sql = f"SELECT seq, entry_hash FROM audit_entries WHERE seq IN ({marks})"  # noqa: S608
            found.update((int(s), compact.hash_hex(h)) for s, h in conn.execute(sql, chunk))
        sql = f"SELECT seq, entry_hash FROM audit_log WHERE seq IN ({marks})"  # noqa: S608
        found.update((int(s), str(h)) for s, h in conn.execute(sql, chunk))
    for before in wanted:
        if before not in found:
            found[before] = hash_at(conn, before)  # genesis or the archived watermark
    return {seq: found[seq - 1] for seq in seqs}


def bodies_between(conn: Connection, first: int, last: int) -> list[str]:
    """The hashed bodies of the live entries ``first..last`` (either format), in order."""
    sql = "SELECT body FROM audit_log WHERE seq BETWEEN ? AND ? ORDER BY seq"
    bodies = [str(body) for (body,) in conn.execute(sql, (first, last))]
    if has_compact(conn):
        terms = compact.Terms(bulk=False)  # at most a node's 16 entries
        sql = compact.select_sql(["seq BETWEEN ? AND ?"])
        bodies += [compact.body_text(conn, terms, v) for v in conn.execute(sql, (first, last))]
    return bodies


def insert_compact(
    conn: Connection,
    terms: compact.Terms,
    rows: Sequence[StoredRow],
    fields: Sequence[Mapping[str, object]],
) -> None:
    """Insert ``rows`` (whose bodies are ``fields``) as version 2 rows of ``audit_entries``."""
    values = [
        compact.encode(conn, terms, r.seq, f, r.entry_hash)
        for r, f in zip(rows, fields, strict=True)
    ]
    conn.backend.insert_many(conn, "audit_entries", compact.COLUMNS, compact.COLUMN_TYPES, values)


def insert_rows(conn: Connection, rows: Sequence[StoredRow]) -> None:
    """Insert chained ``rows`` into ``audit_log`` (in as few statements as the backend can)."""
    values = [(r.seq, *r.columns.values(), r.body, r.prev_hash, r.entry_hash) for r in rows]
    conn.backend.insert_many(conn, "audit_log", _INSERT_COLUMNS, _INSERT_TYPES, values)


def _row(values: Sequence[Any]) -> StoredRow:
    seq, body, prev_hash, entry_hash, *indexed = values
    return StoredRow(
        seq=int(seq),
        body=str(body),
        prev_hash=str(prev_hash),
        entry_hash=str(entry_hash),
        columns={name: str(value) for name, value in zip(INDEXED_COLUMNS, indexed, strict=True)},
    )


def _compact_row(
    conn: Connection, terms: compact.Terms, values: Sequence[Any], prev_hash: str
) -> StoredRow:
    """A version 2 row as a :class:`StoredRow`: its body rebuilt, its hashes as hex."""
    fields = compact.decode(conn, terms, values)
    return StoredRow(
        seq=int(values[0]),
        body=canonical_body(fields),
        prev_hash=prev_hash,
        entry_hash=compact.hash_hex(values[-1]),
        columns={name: str(fields[name]) for name in INDEXED_COLUMNS},
    )


def iter_rows(conn: Connection, after: int = 0) -> Iterator[StoredRow]:
    """Every live row with ``seq > after`` in ``seq`` order, both formats (version 1 rows
    come first: a log switches format once), streamed (one consistent snapshot on a reader
    connection even while others write)."""
    sql = f"SELECT {ROW_COLUMNS} FROM audit_log WHERE seq > ? ORDER BY seq"  # noqa: S608
    last: StoredRow | None = None
    for values in conn.backend.stream(conn, sql, (after,)):
        last = _row(values)
        yield last
    if not has_compact(conn):
        return
    start = after if last is None else last.seq
    prev: str | None = None if last is None else last.entry_hash
    terms = compact.Terms()
    terms.load(conn)
    sql = compact.select_sql(["seq > ?"])
    for values in conn.backend.stream(conn, sql, (start,)):
        if prev is None:
            prev = hash_at(conn, int(values[0]) - 1)
        row = _compact_row(conn, terms, values, prev)
        prev = row.entry_hash
        yield row


def select_rows(
    conn: Connection,
    *,
    equals: Mapping[str, str],
    since: str | None,
    until: str | None,
    limit: int,
) -> list[StoredRow]:
    """The newest ``limit`` rows matching all conditions, returned oldest first.

    ``equals`` keys must be :data:`INDEXED_COLUMNS`; ``since`` is inclusive, ``until`` exclusive.
    """
    clauses: list[str] = []
    params: list[object] = []
    for column, value in equals.items():
        if column not in INDEXED_COLUMNS:
            raise ValueError(f"cannot filter on {column!r}")
        clauses.append(f"{column} = ?")
        params.append(value)
    if since is not None:
        clauses.append("time >= ?")
        params.append(since)
    if until is not None:
        clauses.append("time < ?")
        params.append(until)
    where = " AND ".join(clauses) or "1 = 1"
    # Column names come from the fixed allow-list above; every value is a bound parameter.
    sql = (
        f"SELECT * FROM (SELECT {ROW_COLUMNS} FROM audit_log WHERE {where} "  # noqa: S608
        "ORDER BY seq DESC LIMIT ?) AS newest ORDER BY seq"
    )
    rows = [_row(values) for values in conn.execute(sql, (*params, limit))]
    newer = _select_compact(conn, equals, since, until, limit)
    return (rows + newer)[-limit:] if limit else []


def _select_compact(
    conn: Connection, equals: Mapping[str, str], since: str | None, until: str | None, limit: int
) -> list[StoredRow]:
    """:func:`select_rows` on the version 2 rows."""
    if not has_compact(conn):
        return []
    terms = compact.reader_terms(conn)
    stored = compact.term_ids(conn, terms, equals)
    if stored is None:
        return []
    clauses = [f"{column} = ?" for column in stored]
    params: list[object] = list(stored.values())
    for bound, op in ((since, ">="), (until, "<")):
        if bound is not None:
            clauses.append(f"time {op} ?")
            params.append(compact.time_ms(bound))
    where = " AND ".join(clauses) or "1 = 1"
    columns = ", ".join(compact.COLUMNS)
    sql = (
        f"SELECT * FROM (SELECT {columns} FROM audit_entries WHERE {where} "  # noqa: S608
        "ORDER BY seq DESC LIMIT ?) AS newest ORDER BY seq"
    )
    found = list(conn.execute(sql, (*params, limit)))
    before = prev_hashes(conn, [int(values[0]) for values in found])
    return [_compact_row(conn, terms, values, before[int(values[0])]) for values in found]


@dataclass(frozen=True)
class ChainResult:
    """Outcome of :func:`check_chain`; ``head_hash`` is the last entry's hash when intact."""

    entries: int
    first_bad: int | None
    problem: str
    head_hash: str


def check_chain(
    rows: Iterable[StoredRow], *, start: int = 1, prev_hash: str = GENESIS_HASH
) -> ChainResult:
    """Recompute the chain over ``rows`` (in stored order) and find the first bad entry.

    Positions count from ``start`` (1, or the first live sequence after archival, chaining
    from ``prev_hash``) and equal the sequence an intact entry there must carry, so a missing,
    inserted or swapped entry shows up as the first position whose entry does not fit.
    Rows after the first bad one are only counted.
    """
    prev = prev_hash
    count = 0
    remaining_rows = iter(rows)
    for row in remaining_rows:
        position = start + count
        count += 1
        problem = _row_problem(position, prev, row)
        if problem:
            remaining = sum(1 for _ in remaining_rows)
            return ChainResult(count + remaining, position, f"entry {position}: {problem}", "")
        prev = row.entry_hash
    return ChainResult(count, None, "", prev)


def _row_problem(position: int, prev: str, row: StoredRow) -> str:
    """Why ``row`` cannot be entry ``position`` following hash ``prev``; "" if it can."""
    if row.seq != position:
        return f"stored sequence is {row.seq} (entry missing, inserted or out of order)"
    try:
        data = json.loads(row.body)
    except ValueError:
        return "body is not valid JSON"
    if not isinstance(data, dict):
        return "body is not a JSON object"
    body_seq = data.get("seq")
    if type(body_seq) is not int or body_seq != position:
        return f"body carries sequence {body_seq!r} (entry moved or inserted)"
    if row.prev_hash != prev:
        return "prev_hash does not match the previous entry's hash"
    if chain_hash(row.prev_hash, row.body) != row.entry_hash:
        return "entry_hash does not match the entry's contents (entry edited)"
    for name in INDEXED_COLUMNS:
        if data.get(name) != row.columns[name]:
            return f"column {name} differs from the hashed body (entry edited)"
    return ""
