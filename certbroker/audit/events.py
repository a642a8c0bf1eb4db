"""Tamper-evident audit log of lookup decisions: no audit, no answer.

The servicer awaits ``log.append(event)`` for every lookup (allowed, denied or failed) before
the response leaves the broker. If the entry cannot be written durably, ``append`` raises
:class:`certbroker.errors.Unavailable` with reason ``AUDIT_UNAVAILABLE`` and the lookup fails with
UNAVAILABLE. Entries say who asked for what and what was decided; never record contents.

Entry format (enough for an auditor to re-implement verification)
-----------------------------------------------------------------
Entries are numbered ``seq`` = 1, 2, 3, ... without gaps. The *body* of an entry is a JSON
object with exactly these keys (strings unless stated)::

    v                format version, the integer 1
    seq              the entry's sequence number (integer)
    entry_id         UUIDv7 as 32 lowercase hex digits (time-ordered: certbroker.ids)
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
    from_cache       boolean: true when the record was not fetched for this entry (served from
                     the broker's record cache, or shared with an identical fetch in flight)

``kind`` is "lookup" for one record about one citizen (a ``Lookup``, or one item of a bundle,
then with ``bundle_id`` and ``relation``) and "bundle" for the entry that closes a
``LookupMatter`` call: written after its items, it lists them in ``item_entry_ids`` and counts
their outcomes; its own ``outcome``/``status`` are those of the call (an invalid or
unauthenticated bundle has a bundle entry and no items).

Compatibility: the last five keys were added without changing ``v``; entries written before
lack them, and readers take a missing one as empty ("", [], {} or false). The chain and its
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

Merkle tree: the entries are also the leaves of an RFC 9162 Merkle tree
(:mod:`certbroker.audit.integrity.merkle`).
Leaf *i* (0-based) is entry ``seq = i + 1`` and its leaf hash is ``SHA-256(0x00 || UTF-8(body))``
over the ``body`` column text exactly as stored (the same text the chain covers; in an export,
the bytes after ``"body":`` on the entry's line). The tree's frontier and perfect-subtree nodes
are stored in the same transaction as the entries (:mod:`certbroker.audit.integrity.tree`); signed
checkpoints and proofs are in :mod:`certbroker.audit.integrity.proofs`, export and verification
with named
problems and exit codes in :mod:`certbroker.audit.export` / :mod:`certbroker.audit.verify.report`.
The chain is kept: old logs verify unchanged and it locates an edited entry exactly.

Write path
----------
``append`` only queues the entry (with its id and time) and awaits a future. One dedicated
writer thread (:mod:`certbroker.audit.writer`) takes everything queued (up to ``max_batch``) and
writes it in ONE transaction, one fsync: take the log's write lock, read the stored tail,
insert the chained rows and tree nodes, COMMIT. Reading the tail under the lock keeps one chain
with several writer processes: SQLite's ``BEGIN IMMEDIATE`` on one file
(:mod:`certbroker.audit.store.sqlite`), or an advisory transaction lock on one PostgreSQL schema
(:mod:`certbroker.audit.store.postgres`, ``[audit] dsn``; append-only enforced by the database
there).
Every caller in the batch then gets its :class:`Receipt`; if the transaction fails, all of them
get ``Unavailable`` and nothing of the batch is stored. The event loop never waits on I/O.
``append_many`` queues several entries as one unit (``max_batch`` counts callers, not entries):
they are consecutive and share a transaction, so a bundle's items and its bundle entry are
stored together or not at all.

Archival (:mod:`certbroker.audit.archive`) moves the oldest entries to signed export files; the
live log then starts after them, chaining from the last archived hash.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from certbroker.audit.log import (
    BatchingAuditLog,
    PostgresAuditLog,
    Receipt,
    SQLiteAuditLog,
    open_audit_log,
)
from certbroker.audit.store.db import connect_read
from certbroker.audit.store.rows import (
    AUDIT_UNAVAILABLE,
    GENESIS_HASH,
    StoredRow,
    canonical_body,
    chain_hash,
    iso_time,
    select_rows,
)
from certbroker.audit.verify.chain import VerifyReport, verify
from certbroker.cli.table import display_width, format_table
from certbroker.config import AuditLocation, PostgresLocation

__all__ = [
    "AUDIT_UNAVAILABLE",
    "GENESIS_HASH",
    "AuditEntry",
    "AuditEvent",
    "AuditLocation",
    "AuditLog",
    "BatchingAuditLog",
    "PostgresAuditLog",
    "PostgresLocation",
    "QueryFilter",
    "Receipt",
    "SQLiteAuditLog",
    "VerifyReport",
    "canonical_body",
    "chain_hash",
    "display_width",
    "format_table",
    "open_audit_log",
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
    "from_cache": False,
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
    from_cache: bool = False  # the record came from the broker's cache, not the department


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


#: AuditEvent fields holding a plain string (all but the lists, numbers, counts and flags).
_STR_FIELDS = tuple(
    f.name
    for f in dataclasses.fields(AuditEvent)
    if f.name not in _LIST_FIELDS | {"latency_ms", "outcome_counts", "from_cache"}
)


def _event_fields(event: AuditEvent) -> dict[str, object]:
    """The event as body fields, checked: a malformed event must not reach the log."""
    # Every lookup comes through here: the fields straight from the instance, then the checks
    # by kind, rather than a walk of dataclasses.fields() per call.
    fields: dict[str, Any] = dict(vars(event))
    for name in _STR_FIELDS:
        if not isinstance(fields[name], str):
            raise TypeError(f"{name} must be str")
    latency = fields["latency_ms"]
    if isinstance(latency, bool) or not isinstance(latency, int | float):
        raise TypeError("latency_ms must be a number")
    if not math.isfinite(latency):
        raise ValueError("latency_ms must be finite")
    fields["latency_ms"] = round(float(latency), 3)
    for name in _LIST_FIELDS:
        value = fields[name]
        if not isinstance(value, tuple) or not all(isinstance(v, str) for v in value):
            raise TypeError(f"{name} must be a tuple of str")
        fields[name] = list(value)
    fields["outcome_counts"] = _counts(fields["outcome_counts"])
    if not isinstance(fields["from_cache"], bool):
        raise TypeError("from_cache must be a bool")
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


def query(db: AuditLocation | str, flt: QueryFilter) -> list[AuditEntry]:
    """Entries matching ``flt`` in the live log at ``db`` (SQLite path or PostgreSQL): the
    newest ``flt.limit`` of them, oldest first. Read-only.

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
    with contextlib.closing(connect_read(db)) as conn:
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
