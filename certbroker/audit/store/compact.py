"""Entry format version 2: the compact stored form of an entry (table ``audit_entries``).

Version 1 stores each entry's canonical JSON body as text *and* copies seven of its values
into indexed columns, with both chain hashes as hex text: about 1,460 bytes per entry on
SQLite. Version 2 stores every value once, typed, and rebuilds the hashed body from them.

What is hashed (the format an auditor re-implements)
    The body of a version 2 entry is the canonical JSON object of
    :mod:`certbroker.audit.events` with ``"v": 2`` and every key present (none missing, so
    nothing is "read as empty"). The chain hash and the Merkle leaf are over that text, exactly
    as for version 1; an export carries that text, so offline verification is unchanged.
What is stored (one row of ``audit_entries``)
    ``seq`` (the primary key), ``entry_id`` (the UUIDv7's 16 bytes), ``time`` (milliseconds
    since the epoch), the :data:`COLUMN_FIELDS` (``clerk``, ``matter_code``, ``record_type``,
    ``decision``, ``kind``, ``office``, ``outcome`` as term ids, below; ``subject_id`` and
    ``case_number`` as text: what the indexes and the anomaly rules read), ``rest`` (a JSON
    array of the other values, positionally, :data:`REST_FIELDS`, repeated strings as term
    ids, trailing defaults left out) and ``entry_hash`` (32 bytes). There is no ``prev_hash``
    column: it is the previous row's ``entry_hash``, and the verifier recomputes every hash
    from the rebuilt body, so a changed value anywhere in the row is a hash mismatch.
``audit_terms`` (``id``, ``term``)
    Strings that repeat across entries (clerks, offices, roles, matters, rules, the policy
    version...) are stored once and referenced by id. Append-only like the entries; a term row
    altered later changes every body rebuilt from it, which verification reports.

A log holds version 1 entries (``audit_log``) and then, once a writer with
``entry_format = 2`` appends, version 2 entries (``audit_entries``): sequences continue, the
chain and the tree run across both tables. Readers take both (:mod:`certbroker.audit.store.rows`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from certbroker.audit.events import canonical_body, iso_time
from certbroker.audit.store.base import Connection

COMPACT_VERSION: Final = 2
"""The ``v`` of an entry stored compactly."""

#: The values stored in columns of their own, in :data:`COLUMNS` order after ``time``;
#: ``True`` marks a value stored as a term id. The indexed ones (clerk, subject) and what the
#: anomaly rules count over a day (kind, office, case number, decision, outcome:
#: :mod:`certbroker.audit.anomaly_scan`), so that counting reads no JSON.
COLUMN_FIELDS: Final[tuple[tuple[str, bool], ...]] = (
    ("clerk", True),
    ("subject_id", False),
    ("matter_code", True),
    ("record_type", True),
    ("decision", True),
    ("kind", True),
    ("office", True),
    ("case_number", False),
    ("outcome", True),
)
#: The values of ``rest``, in order; ``True`` marks a value stored as a term id.
REST_FIELDS: Final[tuple[tuple[str, bool], ...]] = (
    ("roles", True),
    ("consent_method", True),
    ("rule_id", True),
    ("withheld_fields", True),
    ("status", True),
    ("policy_version", True),
    ("department", True),
    ("decision_id", False),
    ("latency_ms", False),
    ("bundle_id", False),
    ("relation", True),
    ("item_entry_ids", False),
    ("outcome_counts", False),
    ("from_cache", False),
    ("released_fields", False),
    ("released_digest", False),
)
#: Trailing values equal to these are left out of ``rest`` (most lookups are not bundled).
_TRAILING_DEFAULTS: Final[Mapping[str, object]] = {
    "bundle_id": "",
    "relation": "",
    "item_entry_ids": [],
    "outcome_counts": {},
    "from_cache": False,
    "released_fields": [],
    "released_digest": "",
}
#: Values a body leaves out when empty (an entry that issued no evidence has neither key:
#: :data:`certbroker.audit.events._OPTIONAL_FIELDS`); the rebuilt body must leave them out too.
_OPTIONAL: Final = ("released_fields", "released_digest")
#: The columns stored as term ids.
TERM_COLUMNS: Final = tuple(name for name, interned in COLUMN_FIELDS if interned)
#: Column order of ``audit_entries`` (and of :func:`encode`'s tuples).
COLUMNS: Final = (
    "seq",
    "entry_id",
    "time",
    *(name for name, _ in COLUMN_FIELDS),
    "rest",
    "entry_hash",
)
COLUMN_TYPES: Final = (
    "bigint",
    "bytea",
    "bigint",
    *("integer" if interned else "text" for _, interned in COLUMN_FIELDS),
    "text",
    "bytea",
)
_LISTS: Final = frozenset({"roles", "withheld_fields"})
#: Every body key a compact row holds (besides seq and v, which the row implies).
_KNOWN: Final = frozenset(
    {"entry_id", "time", *(name for name, _ in COLUMN_FIELDS), *(name for name, _ in REST_FIELDS)}
)
_ID: Final = re.compile(r"[0-9a-f]{32}")
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MS: Final = timedelta(milliseconds=1)


def time_ms(text: str) -> int:
    """A stored time text (:func:`~certbroker.audit.events.iso_time`) as epoch milliseconds;
    ``ValueError`` if it is not in that exact form (it could not be rebuilt byte for byte)."""
    moment = datetime.fromisoformat(text)
    millis = (moment - _EPOCH) // _MS
    if ms_time(millis) != text:
        raise ValueError(f"time {text!r} is not in the canonical form")
    return millis


def ms_time(millis: int) -> str:
    """Epoch milliseconds as the stored time text."""
    return iso_time(_EPOCH + millis * _MS)


class Terms:
    """The ``audit_terms`` dictionary as one connection sees it, cached both ways.

    Terms are append-only: an id, once committed, always names the same string, so the cache
    never goes stale; it only misses terms added since (read on demand). A writer's terms
    added in a transaction that rolled back are cached too: the writer drops its
    :class:`Terms` on any failed batch (:class:`certbroker.audit.append.ChainStore`).
    """

    def __init__(self, *, bulk: bool = True) -> None:
        self._ids: dict[str, int] = {}
        self._terms: dict[int, str] = {}
        self._top = 0
        # bulk: a missing id loads every newer term (many rows to decode); else just that one
        # (a few rows, e.g. the 16 entries under a Merkle node).
        self._bulk = bulk

    def load(self, conn: Connection) -> None:
        """Read every term added since the last load."""
        for term_id, term in conn.execute(
            "SELECT id, term FROM audit_terms WHERE id > ? ORDER BY id", (self._top,)
        ):
            if type(term_id) is not int or not isinstance(term, str):
                raise ValueError(f"audit_terms[id={term_id!r}] is not an id and a text")
            self._add(term_id, term)

    def _add(self, term_id: int, term: str) -> None:
        self._ids[term] = term_id
        self._terms[term_id] = term
        self._top = max(self._top, term_id)

    def id_for(self, conn: Connection, term: str) -> int:
        """The id of ``term``, adding it (inside the caller's write transaction) if new."""
        found = self._ids.get(term)
        if found is not None:
            return found
        self.load(conn)  # another writer may have added it
        found = self._ids.get(term)
        if found is not None:
            return found
        term_id = self._top + 1
        conn.execute("INSERT INTO audit_terms (id, term) VALUES (?, ?)", (term_id, term))
        self._add(term_id, term)
        return term_id

    def find(self, conn: Connection, term: str) -> int | None:
        """The id of ``term`` if it is stored (for queries), else None."""
        found = self._ids.get(term)
        if found is None:
            row = conn.execute("SELECT id FROM audit_terms WHERE term = ?", (term,)).fetchone()
            if row is None:
                return None
            found = int(row[0])
            self._ids[term] = found
        return found

    def term(self, conn: Connection, term_id: object) -> str:
        """The string of ``term_id``; ``ValueError`` if there is no such term."""
        if type(term_id) is not int:
            raise ValueError(f"term id {term_id!r} is not an integer")
        found = self._terms.get(term_id)
        if found is None and not self._bulk:
            row = conn.execute("SELECT term FROM audit_terms WHERE id = ?", (term_id,)).fetchone()
            if row is not None and isinstance(row[0], str):
                found = self._terms[term_id] = row[0]
        if found is None:
            # One query for all the terms added since (a few thousand at most: clerks,
            # offices, rules...), not one per id: a PostgreSQL round trip each would dominate.
            self.load(conn)
            found = self._terms.get(term_id)
            if found is None:
                raise ValueError(f"term {term_id} is not stored")
        return found


#: Readers' term dictionaries, one per log (by its display name): committed terms never
#: change, and a reader only ever sees committed ones, so a process keeps them between reads
#: (loading a city's few thousand terms per query would dominate a citizen report). The
#: verifier never uses these: it reads the terms afresh, as stored.
_READER_TERMS: dict[str, Terms] = {}


def reader_terms(conn: Connection) -> Terms:
    """The shared :class:`Terms` of the log ``conn`` reads (for queries, not verification)."""
    # Keyed by the first compact entry's hash too: a log created anew at the same place (or
    # whose first compact rows were archived) starts a fresh dictionary.
    first = conn.execute("SELECT entry_hash FROM audit_entries ORDER BY seq LIMIT 1").fetchone()
    key = f"{conn.backend.display}#{b'' if first is None else bytes(first[0])!r}"
    found = _READER_TERMS.get(key)
    if found is None:
        if len(_READER_TERMS) > 64:  # many logs in one process (tests): keep it bounded
            _READER_TERMS.clear()
        found = _READER_TERMS[key] = Terms()
    return found


def _term_text(name: str, value: object) -> str:
    if name in _LISTS:  # a list of strings is one term: its canonical JSON text
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    if not isinstance(value, str):
        raise TypeError(f"{name} must be str")
    return value


def _text(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be str")
    return value


def encode(
    conn: Connection, terms: Terms, seq: int, fields: Mapping[str, object], entry_hash: str
) -> tuple[Any, ...]:
    """The ``audit_entries`` row (in :data:`COLUMNS` order) of entry ``seq`` with body
    ``fields`` (without ``seq``/``v``), adding new terms. ``ValueError`` for a value the
    compact form cannot rebuild byte for byte (an entry id that is not a UUIDv7's 32 hex
    digits, a time not in canonical form)."""
    unknown = fields.keys() - _KNOWN
    if unknown:  # a field added to AuditEvent must be added to REST_FIELDS, or it is lost
        raise ValueError(f"the compact format has no place for {sorted(unknown)}")
    entry_id = str(fields["entry_id"])
    if not _ID.fullmatch(entry_id):
        raise ValueError(f"entry id {entry_id!r} is not 32 lowercase hex digits")
    rest: list[object] = []
    for name, interned in REST_FIELDS:
        value = fields.get(name, _TRAILING_DEFAULTS[name]) if name in _OPTIONAL else fields[name]
        rest.append(terms.id_for(conn, _term_text(name, value)) if interned else value)
    while len(rest) > len(REST_FIELDS) - len(_TRAILING_DEFAULTS):
        name = REST_FIELDS[len(rest) - 1][0]
        if fields.get(name, _TRAILING_DEFAULTS[name]) != _TRAILING_DEFAULTS[name]:
            break
        rest.pop()
    return (
        seq,
        bytes.fromhex(entry_id),
        time_ms(str(fields["time"])),
        *(
            terms.id_for(conn, _term_text(name, fields[name]))
            if interned
            else _text(name, fields[name])
            for name, interned in COLUMN_FIELDS
        ),
        json.dumps(rest, separators=(",", ":"), ensure_ascii=False, allow_nan=False),
        bytes.fromhex(entry_hash),
    )


def decode(conn: Connection, terms: Terms, values: Sequence[object]) -> dict[str, object]:
    """The body fields (with ``seq`` and ``v``) of an ``audit_entries`` row in
    :data:`COLUMNS` order; ``ValueError``/``TypeError`` if the row cannot be one."""
    if len(values) != len(COLUMNS):
        raise ValueError("not a row of audit_entries")
    seq, entry_id, millis, *columns, rest, _ = values
    if not isinstance(entry_id, bytes | memoryview) or len(entry_id) != 16:
        raise ValueError("entry_id is not 16 bytes")
    if type(millis) is not int or not isinstance(rest, str):
        raise ValueError("time or rest of the wrong kind")
    packed = json.loads(rest)
    if not isinstance(packed, list) or len(packed) > len(REST_FIELDS):
        raise ValueError("rest is not an array of the entry's values")
    fields: dict[str, object] = {
        "v": COMPACT_VERSION,
        "seq": seq,
        "entry_id": bytes(entry_id).hex(),
        "time": ms_time(millis),
    }
    for (name, interned), stored in zip(COLUMN_FIELDS, columns, strict=True):
        if interned:
            fields[name] = terms.term(conn, stored)
        elif isinstance(stored, str):
            fields[name] = stored
        else:
            raise ValueError(f"{name} of the wrong kind")
    for index, (name, interned) in enumerate(REST_FIELDS):
        if index >= len(packed):
            value: object = _TRAILING_DEFAULTS[name]
        elif interned:
            value = terms.term(conn, packed[index])
            if name in _LISTS:
                value = json.loads(value)
        else:
            value = packed[index]
        if name not in _OPTIONAL or value:
            fields[name] = value
    return fields


def body_text(conn: Connection, terms: Terms, values: Sequence[object]) -> str:
    """The hashed body of an ``audit_entries`` row: :func:`decode`, canonically encoded."""
    return canonical_body(decode(conn, terms, values))


def hash_hex(value: object) -> str:
    """A stored 32-byte ``entry_hash`` as the hex the chain and receipts use; ``ValueError``
    if it is not 32 bytes."""
    if not isinstance(value, bytes | memoryview) or len(value) != 32:
        raise ValueError("entry_hash is not 32 bytes")
    return bytes(value).hex()


def term_ids(conn: Connection, terms: Terms, equals: Mapping[str, str]) -> dict[str, object] | None:
    """``equals`` (column → value) as the stored column values of ``audit_entries``: term ids
    for :data:`TERM_COLUMNS`. None when a value is not a stored term (nothing can match)."""
    out: dict[str, object] = {}
    for column, value in equals.items():
        if column in TERM_COLUMNS:
            found = terms.find(conn, value)
            if found is None:
                return None
            out[column] = found
        elif column == "entry_id":
            if not _ID.fullmatch(value):
                return None
            out[column] = bytes.fromhex(value)
        elif column == "time":
            out[column] = time_ms(value)
        else:
            out[column] = value
    return out


_REST_INDEX: Final = {name: index for index, (name, _) in enumerate(REST_FIELDS)}


def rest_element(conn: Connection, name: str) -> str:
    """SQL for the ``rest`` value ``name`` of a row (NULL when left out as a trailing
    default); an integer for a value stored as a term id."""
    term = REST_FIELDS[_REST_INDEX[name]][1]
    return conn.backend.json_element("rest", _REST_INDEX[name], integer=term)


def select_sql(where: Iterable[str]) -> str:
    """``SELECT`` of every :data:`COLUMNS` value of ``audit_entries`` rows matching ``where``
    (trusted SQL fragments), in ``seq`` order."""
    clauses = " AND ".join(where) or "1 = 1"
    return f"SELECT {', '.join(COLUMNS)} FROM audit_entries WHERE {clauses} ORDER BY seq"  # noqa: S608
