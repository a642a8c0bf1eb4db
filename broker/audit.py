"""Tamper-evident audit log of lookup decisions: no audit, no answer.

The servicer awaits ``log.append(event)`` for every lookup (allowed, denied or failed) before
the response leaves the broker. If the entry cannot be written durably, ``append`` raises
:class:`broker.errors.Unavailable` with reason ``AUDIT_UNAVAILABLE`` and the lookup fails with
UNAVAILABLE. Entries say who asked for what and what was decided; never record contents.

Entry format (enough for an auditor to re-implement verification)
-----------------------------------------------------------------
Entries are numbered ``seq`` = 1, 2, 3, ... without gaps. The *body* of an entry is a JSON
object with exactly these keys (strings unless stated)::

    v                format version, the integer 1
    seq              the entry's sequence number (integer)
    entry_id         random UUID4 as 32 lowercase hex digits
    time             UTC, milliseconds, e.g. "2025-03-01T08:30:00.123Z"
    kind             "lookup" or "bundle" (below); other components add their own
    clerk, office    who asked, from which office
    roles            array of strings
    subject_id, matter_code, case_number, consent_method, record_type
    decision         "allow", "deny", or "" when no decision was reached
    rule_id          the policy rule that matched
    withheld_fields  array of field paths the policy withheld
    outcome          "OK" or the error reason code (e.g. "POLICY_DENIED")
    status           gRPC status code name (e.g. "PERMISSION_DENIED")
    policy_version   hash of the policy set in force
    department, decision_id
    latency_ms       number, rounded to 0.001
    bundle_id        the matter bundle (LookupMatter call) the entry belongs to, "" if none
    relation         the subject's relation to the case within a bundle ("seller", ...), or ""
    item_entry_ids   array of strings: on a "bundle" entry, the entry ids of its items
    outcome_counts   object, outcome → number of items (integers): on a "bundle" entry

``kind`` is "lookup" for one record about one citizen (a ``Lookup``, or one item of a bundle,
then with ``bundle_id`` and ``relation``) and "bundle" for the entry that closes a
``LookupMatter`` call: written after its items, it lists them in ``item_entry_ids`` and counts
their outcomes; its own ``outcome``/``status`` are those of the call (an invalid or
unauthenticated bundle has a bundle entry and no items).

Compatibility: the last four keys were added without changing ``v``; entries written before
lack them, and readers take a missing one as empty ("", [] or {}). The chain and its
verification are over the stored text and do not depend on which keys a body has.

Canonical encoding: ``json.dumps(body, sort_keys=True, separators=(",", ":"),
ensure_ascii=False)``, i.e. keys sorted (all are ASCII), no whitespace, non-ASCII characters
written raw, the text taken as UTF-8.

Chain: ``entry_hash = hex(SHA-256(UTF-8(prev_hash + body)))`` in lowercase, where ``prev_hash``
is the previous entry's ``entry_hash`` and, for entry 1, 64 ``"0"`` characters. The hash is over
the body text exactly as stored (SQLite table ``audit_log``, column ``body``), so a verifier need
not re-encode anything. Walking the rows in ``seq`` order, entry at position *n* is intact when
its ``seq`` column and body ``seq`` are *n*, its ``prev_hash`` column equals the previous
``entry_hash``, the recomputed hash equals its ``entry_hash`` column, and the columns kept for
indexing (``entry_id, time, clerk, subject_id, matter_code, record_type, decision``) equal the
body's values.

What a chain cannot show by itself: entries cut from the *end*, or a rewrite of every entry
from some point on. Both are caught by comparing with a head hash kept elsewhere (a
:class:`Receipt`, or :attr:`VerifyReport.head_hash` published earlier) -- or a signed checkpoint:

Merkle tree: the entries are also the leaves of an RFC 9162 Merkle tree (:mod:`broker.merkle`).
Leaf *i* (0-based) is entry ``seq = i + 1`` and its leaf hash is ``SHA-256(0x00 || UTF-8(body))``
over the ``body`` column text exactly as stored (the same text the chain covers; in an export,
the bytes after ``"body":`` on the entry's line). The tree's frontier and perfect-subtree nodes
are stored in the same transaction as the entries (:mod:`broker.audit_tree`); signed
checkpoints and proofs are in :mod:`broker.audit_proofs`, export and verification with named
problems and exit codes in :mod:`broker.audit_export` / :mod:`broker.audit_verify`.
The chain is kept: old logs verify unchanged and it locates an edited entry exactly.

Write path
----------
``append`` only queues the entry (with its id and time) and awaits a future. One dedicated
writer thread takes everything queued (up to ``max_batch``) and writes it in ONE transaction,
one fsync: ``BEGIN IMMEDIATE``, read the stored tail, insert the chained rows, ``COMMIT``. Reading
the tail inside the write lock keeps the chain right with several writer processes on one file.
Every caller in the batch then gets its :class:`Receipt`; if the transaction fails, all of them
get ``Unavailable`` and nothing of the batch is stored. The event loop never waits on disk.
``append_many`` queues several entries as one unit (``max_batch`` counts callers, not entries):
they are consecutive and share a transaction, so a bundle's items and its bundle entry are
stored together or not at all.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sqlite3
import time
import unicodedata
import uuid
from collections.abc import Callable, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self

from broker.audit_store import (
    AUDIT_UNAVAILABLE,
    GENESIS_HASH,
    BatchStore,
    GroupCommitWriter,
    SQLiteStore,
    StoredRow,
    canonical_body,
    chain_hash,
    check_chain,
    connect_readonly,
    epoch_time,
    iso_time,
    iter_rows,
    select_rows,
)
from broker.errors import Unavailable
from broker.validation import CONTROL_CATEGORIES

__all__ = [
    "AUDIT_UNAVAILABLE",
    "GENESIS_HASH",
    "AuditEntry",
    "AuditEvent",
    "AuditLog",
    "BatchingAuditLog",
    "QueryFilter",
    "Receipt",
    "SQLiteAuditLog",
    "VerifyReport",
    "canonical_body",
    "chain_hash",
    "format_table",
    "query",
    "verify",
]

DECISIONS = frozenset({"allow", "deny", ""})
_LIST_FIELDS = frozenset({"roles", "withheld_fields", "item_entry_ids"})
#: Keys added after format version 1 was first written, and what their absence means.
_LATER_FIELDS: Mapping[str, Any] = {
    "bundle_id": "",
    "relation": "",
    "item_entry_ids": (),
    "outcome_counts": {},
}


@dataclass(frozen=True)
class AuditEvent:
    """What the servicer knows about one lookup or bundle. Identifiers and decisions only,
    no contents. The fields with defaults are the bundle links (see the module docstring)."""

    kind: str
    clerk: str
    office: str
    roles: tuple[str, ...]
    subject_id: str
    matter_code: str
    case_number: str
    consent_method: str
    record_type: str
    decision: str
    rule_id: str
    withheld_fields: tuple[str, ...]
    outcome: str
    status: str
    policy_version: str
    department: str
    latency_ms: float
    decision_id: str
    bundle_id: str = ""
    relation: str = ""
    item_entry_ids: tuple[str, ...] = ()
    outcome_counts: Mapping[str, int] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class Receipt:
    """Proof the entry is durably stored: its id, chain hash and sequence number."""

    entry_id: str
    entry_hash: str
    sequence: int


@dataclass(frozen=True)
class AuditEntry:
    """A stored entry as read back. ``time`` is ISO 8601 UTC with milliseconds."""

    sequence: int
    entry_id: str
    time: str
    event: AuditEvent
    prev_hash: str
    entry_hash: str


class AuditLog(Protocol):
    """The plug point the server depends on."""

    async def append(self, event: AuditEvent) -> Receipt:
        """Store ``event`` durably and return its receipt, or raise ``Unavailable``."""
        ...

    async def append_many(
        self,
        events: Sequence[AuditEvent],
        *,
        link: Callable[[list[str]], AuditEvent] | None = None,
    ) -> list[Receipt]:
        """Store ``events`` (and ``link(their entry ids)`` after them) as consecutive entries,
        all or none; their receipts in order, or raise ``Unavailable``."""
        ...

    async def aclose(self) -> None:
        """Finish queued appends and release the store."""
        ...


def _event_fields(event: AuditEvent) -> dict[str, object]:
    """The event as body fields, checked: a malformed event must not reach the log."""
    fields: dict[str, object] = {}
    for field in dataclasses.fields(AuditEvent):
        value: Any = getattr(event, field.name)
        if field.name == "latency_ms":
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError("latency_ms must be a number")
            if not math.isfinite(value):
                raise ValueError("latency_ms must be finite")
            value = round(float(value), 3)
        elif field.name in _LIST_FIELDS:
            if not isinstance(value, tuple) or not all(isinstance(v, str) for v in value):
                raise TypeError(f"{field.name} must be a tuple of str")
            value = list(value)
        elif field.name == "outcome_counts":
            value = _counts(value)
        elif not isinstance(value, str):
            raise TypeError(f"{field.name} must be str")
        fields[field.name] = value
    if event.decision not in DECISIONS:
        raise ValueError(f"decision must be one of {sorted(DECISIONS)}")
    return fields


def _counts(value: object) -> dict[str, int]:
    if not isinstance(value, Mapping):
        raise TypeError("outcome_counts must be a mapping")
    counts: dict[str, int] = {}
    for key, count in value.items():
        if not isinstance(key, str) or isinstance(count, bool) or not isinstance(count, int):
            raise TypeError("outcome_counts must map str to int")
        counts[key] = count
    return counts


class BatchingAuditLog:
    """An :class:`AuditLog` over any :class:`~broker.audit_store.BatchStore`, with group commit.

    ``commits`` counts committed transactions (batches), for tests and metrics.
    """

    def __init__(
        self, store: BatchStore, *, max_batch: int = 256, clock: Callable[[], float] = time.time
    ) -> None:
        self._writer = GroupCommitWriter(store, max_batch=max_batch)
        self._clock = clock

    @property
    def commits(self) -> int:
        """Transactions committed so far; fewer than appends when batching works."""
        return self._writer.commits

    async def append(self, event: AuditEvent) -> Receipt:
        """Queue ``event`` for the writer thread and wait until it is durably stored.

        Raises ``Unavailable("AUDIT_UNAVAILABLE")`` if the log is closed or the write fails,
        ``TypeError``/``ValueError`` for a malformed event. Cancelling the caller does not
        withdraw the entry: the lookup happened and is recorded.
        """
        fields = _event_fields(event)
        fields["entry_id"] = uuid.uuid4().hex
        # The time of the decision, not of the later commit.
        fields["time"] = epoch_time(self._clock())
        row = await self._writer.write(fields)
        return Receipt(row.columns["entry_id"], row.entry_hash, row.seq)

    async def append_many(
        self,
        events: Sequence[AuditEvent],
        *,
        link: Callable[[list[str]], AuditEvent] | None = None,
    ) -> list[Receipt]:
        """Store ``events`` as consecutive entries in ONE transaction: all of them, or none and
        ``Unavailable("AUDIT_UNAVAILABLE")``. Receipts come back in order.

        ``link``, if given, builds one more entry from the entry ids of ``events``, stored right
        after them in the same transaction (a bundle entry naming its items), its receipt last.
        All entries carry the same time. Malformed events raise before anything is queued.
        """
        bodies = [_event_fields(event) for event in events]
        for fields in bodies:
            fields["entry_id"] = uuid.uuid4().hex
        if link is not None:
            closing = _event_fields(link([str(fields["entry_id"]) for fields in bodies]))
            closing["entry_id"] = uuid.uuid4().hex
            bodies.append(closing)
        if not bodies:
            return []
        moment = epoch_time(self._clock())
        for fields in bodies:
            fields["time"] = moment
        rows = await self._writer.write_many(bodies)
        return [Receipt(row.columns["entry_id"], row.entry_hash, row.seq) for row in rows]

    async def aclose(self) -> None:
        """Write everything already queued, then stop the writer and close the store."""
        await self._writer.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class SQLiteAuditLog(BatchingAuditLog):
    """The default :class:`AuditLog`: an SQLite file in WAL mode with ``synchronous=FULL``.

    Creates the file (mode 0600) and schema if needed and continues an existing chain.
    Raises ``Unavailable("AUDIT_UNAVAILABLE")`` if the file cannot be opened that way.
    ``busy_timeout`` is how long a batch waits for another process's write lock.
    """

    def __init__(
        self,
        path: Path,
        *,
        max_batch: int = 256,
        clock: Callable[[], float] = time.time,
        busy_timeout: float = 10.0,
    ) -> None:
        self.path = Path(path)
        try:
            store = SQLiteStore(self.path, busy_timeout=busy_timeout)
        except (OSError, sqlite3.Error) as exc:
            raise Unavailable(AUDIT_UNAVAILABLE, "cannot open the audit log") from exc
        try:
            # Read back from the writer connection itself, before the writer thread owns it.
            self.pragmas: dict[str, object] = {
                name: store.pragma(name) for name in ("journal_mode", "synchronous")
            }
        except BaseException:
            store.close()
            raise
        super().__init__(store, max_batch=max_batch, clock=clock)


@dataclass(frozen=True)
class VerifyReport:
    """Result of :func:`verify`.

    ``first_bad`` is the sequence (1-based position) of the first entry that fails; ``problem``
    says why ("" when intact). ``head_hash`` is the last entry's hash when intact (compare it
    with a receipt kept elsewhere to catch a cut tail), else "".
    """

    ok: bool
    entries: int
    first_bad: int | None
    problem: str
    head_hash: str = ""


def verify(path: Path) -> VerifyReport:
    """Recompute the whole chain of the audit file at ``path``; opens it read-only.

    Raises ``FileNotFoundError`` if there is no file; an unreadable database is reported as
    not ok with ``first_bad=None``.
    """
    try:
        with closing(connect_readonly(Path(path))) as conn:
            result = check_chain(iter_rows(conn))
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - sqlite3 errors, or tampered values of any type
        return VerifyReport(False, 0, None, f"audit log unreadable: {exc}")
    return VerifyReport(
        ok=result.first_bad is None,
        entries=result.entries,
        first_bad=result.first_bad,
        problem=result.problem,
        head_hash=result.head_hash,
    )


@dataclass(frozen=True)
class QueryFilter:
    """Conditions for :func:`query`; ``None`` means any. All given conditions must hold.

    ``decision=""`` selects entries where no decision was reached. ``since`` is inclusive,
    ``until`` exclusive; both must be timezone-aware and compare at millisecond precision.
    ``limit`` keeps the newest matches.
    """

    clerk: str | None = None
    subject_id: str | None = None
    matter_code: str | None = None
    record_type: str | None = None
    decision: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    limit: int = 1000


def query(path: Path, flt: QueryFilter) -> list[AuditEntry]:
    """Entries matching ``flt``: the newest ``flt.limit`` of them, oldest first. Read-only.

    Reads bodies as stored without checking the chain; run :func:`verify` for that.
    """
    if flt.limit < 0:
        raise ValueError("limit must not be negative")
    candidates = {
        "clerk": flt.clerk,
        "subject_id": flt.subject_id,
        "matter_code": flt.matter_code,
        "record_type": flt.record_type,
        "decision": flt.decision,
    }
    equals = {column: value for column, value in candidates.items() if value is not None}
    since = None if flt.since is None else iso_time(flt.since)
    until = None if flt.until is None else iso_time(flt.until)
    with closing(connect_readonly(Path(path))) as conn:
        rows = select_rows(conn, equals=equals, since=since, until=until, limit=flt.limit)
    return [_entry(row) for row in rows]


def _entry(row: StoredRow) -> AuditEntry:
    try:
        data = _parse_body(row.body)
        kwargs: dict[str, Any] = {}
        for field in dataclasses.fields(AuditEvent):
            value = data[field.name] if field.name in data else _LATER_FIELDS[field.name]
            kwargs[field.name] = tuple(value) if field.name in _LIST_FIELDS else value
        kwargs["latency_ms"] = float(kwargs["latency_ms"])
        event = AuditEvent(**kwargs)
        return AuditEntry(
            row.seq, str(data["entry_id"]), str(data["time"]), event, row.prev_hash, row.entry_hash
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"audit entry {row.seq} is malformed; run verify") from exc


def _parse_body(body: str) -> dict[str, Any]:
    data = json.loads(body)
    if not isinstance(data, dict):
        raise ValueError("body is not a JSON object")
    return data


_TABLE_COLUMNS: tuple[tuple[str, Callable[[AuditEntry], str]], ...] = (
    ("SEQ", lambda e: str(e.sequence)),
    ("TIME", lambda e: e.time),
    ("CLERK", lambda e: e.event.clerk),
    ("OFFICE", lambda e: e.event.office),
    ("SUBJECT", lambda e: e.event.subject_id),
    ("MATTER", lambda e: e.event.matter_code),
    ("CASE", lambda e: e.event.case_number),
    ("RECORD TYPE", lambda e: _record_type_cell(e.event)),
    ("DECISION", lambda e: e.event.decision),
    ("RULE", lambda e: e.event.rule_id),
    ("OUTCOME", lambda e: e.event.outcome),
)


def _record_type_cell(event: AuditEvent) -> str:
    if event.kind == "bundle":  # a bundle has no record type of its own; say what it holds
        return f"[bundle of {len(event.item_entry_ids)}]"
    return event.record_type


def display_width(text: str) -> int:
    """Terminal columns ``text`` takes: wide/fullwidth (CJK) count 2, combining marks 0."""
    width = 0
    for ch in text:
        if unicodedata.combining(ch):
            continue
        width += 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1
    return width


def _printable(text: str) -> str:
    # Values come from callers' tokens and requests: escape control and format characters so
    # a crafted value cannot break the table or send escape sequences to the auditor's terminal.
    out = []
    for ch in text:
        if unicodedata.category(ch) in CONTROL_CATEGORIES:
            out.append(ch.encode("unicode_escape").decode("ascii"))
        else:
            out.append(ch)
    return "".join(out) or "-"


def format_table(entries: Sequence[AuditEntry]) -> str:
    """Entries as an aligned text table (header, rule, one line per entry), for terminals.

    Aligns by display width, so CJK names line up; empty values show as ``-``.
    """
    header = [name for name, _ in _TABLE_COLUMNS]
    rows = [[_printable(cell(entry)) for _, cell in _TABLE_COLUMNS] for entry in entries]
    widths = [max(display_width(line[i]) for line in [header, *rows]) for i in range(len(header))]

    def render(cells: Sequence[str]) -> str:
        padded = [
            cell + " " * (width - display_width(cell))
            for cell, width in zip(cells, widths, strict=True)
        ]
        return "  ".join(padded).rstrip()

    rule = ["-" * width for width in widths]
    return "\n".join(render(line) for line in [header, rule, *rows])
