"""The audit entry model: what one entry says, how it is encoded and chained (the format spec).

Every lookup (allowed, denied or failed) is appended to the audit log as an entry before the
response leaves the broker (:class:`AuditLog`): no audit, no answer. If the entry cannot be
written durably, ``append`` raises :class:`certbroker.errors.Unavailable` with reason
:data:`AUDIT_UNAVAILABLE` and the lookup fails with UNAVAILABLE. Entries say who asked for what
and what was decided; never record contents.

This module is the bottom of :mod:`certbroker.audit`: it imports nothing else of the package,
and the store, the writer, the log and the readers all build on it.

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
    released_fields  array of the field paths released, and
    released_digest  hex salted SHA-256 digest of the released content: both present only when
                     the lookup issued an evidence document (certbroker.evidence.document; the
                     salt is only in the evidence, the values nowhere in the log)

``kind`` is "lookup" for one record about one citizen (a ``Lookup``, or one item of a bundle,
then with ``bundle_id`` and ``relation``) and "bundle" for the entry that closes a
``LookupMatter`` call: written after its items, it lists them in ``item_entry_ids`` and counts
their outcomes; its own ``outcome``/``status`` are those of the call (an invalid or
unauthenticated bundle has a bundle entry and no items).

Compatibility: the last seven keys were added without changing ``v``; entries written before
lack them, and readers take a missing one as empty ("", [], {} or false). The two
``released_*`` keys are written only when set (most entries have no evidence). The chain and its
verification are over the stored text and do not depend on which keys a body has.

Canonical encoding (:func:`canonical_body`): ``json.dumps(body, sort_keys=True,
separators=(",", ":"), ensure_ascii=False)``, i.e. keys sorted (all are ASCII), no whitespace,
non-ASCII characters written raw, the text taken as UTF-8.

Chain (:func:`chain_hash`): ``entry_hash = hex(SHA-256(UTF-8(prev_hash + body)))`` in
lowercase, where ``prev_hash`` is the previous entry's ``entry_hash`` and, for entry 1, 64
``"0"`` characters (:data:`GENESIS_HASH`). The hash is over the body text exactly as stored
(table ``audit_log``, column ``body``), so a verifier need not re-encode anything. Walking the
rows in ``seq`` order, entry at position *n* is intact when its ``seq`` column and body ``seq``
are *n*, its ``prev_hash`` column equals the previous ``entry_hash``, the recomputed hash equals
its ``entry_hash`` column, and the columns kept for indexing (``entry_id, time, clerk,
subject_id, matter_code, record_type, decision``) equal the body's values.

What a chain cannot show by itself: entries cut from the *end*, or a rewrite of every entry
from some point on. Both are caught by comparing with a head hash kept elsewhere (a
:class:`Receipt`, or :attr:`~certbroker.audit.verify.chain.VerifyReport.head_hash` published
earlier) -- or a signed checkpoint:

Merkle tree: the entries are also the leaves of an RFC 9162 Merkle tree
(:mod:`certbroker.audit.integrity.merkle`). Leaf *i* (0-based) is entry ``seq = i + 1`` and its
leaf hash is ``SHA-256(0x00 || UTF-8(body))`` over the ``body`` column text exactly as stored
(the same text the chain covers; in an export, the bytes after ``"body":`` on the entry's
line). The tree's frontier and perfect-subtree nodes are stored in the same transaction as the
entries (:mod:`certbroker.audit.integrity.tree`); signed checkpoints and proofs are in
:mod:`certbroker.audit.integrity.proofs`, export and verification with named problems and exit
codes in :mod:`certbroker.audit.export` / :mod:`certbroker.audit.verify.report`. The chain is
kept: old logs verify unchanged and it locates an edited entry exactly.

Write path
----------
``append`` only queues the entry (with its id and time) and awaits a future. One dedicated
writer thread (:mod:`certbroker.audit.writer`) takes everything queued (up to ``max_batch``) and
writes it in ONE transaction, one fsync (:mod:`certbroker.audit.append`): take the log's write
lock, read the stored tail, insert the chained rows and tree nodes, COMMIT. Reading the tail
under the lock keeps one chain with several writer processes: SQLite's ``BEGIN IMMEDIATE`` on
one file (:mod:`certbroker.audit.store.sqlite`), or an advisory transaction lock on one
PostgreSQL schema (:mod:`certbroker.audit.store.postgres`, ``[audit] dsn``; append-only enforced
by the database there). Every caller in the batch then gets its :class:`Receipt`; if the
transaction fails, all of them get ``Unavailable`` and nothing of the batch is stored. The
event loop never waits on I/O. ``append_many`` queues several entries as one unit
(``max_batch`` counts callers, not entries): they are consecutive and share a transaction, so a
bundle's items and its bundle entry are stored together or not at all.

Archival (:mod:`certbroker.audit.archive`) moves the oldest entries to signed export files; the
live log then starts after them, chaining from the last archived hash.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

__all__ = [
    "AUDIT_UNAVAILABLE",
    "DECISIONS",
    "FORMAT_VERSION",
    "GENESIS_HASH",
    "AuditEntry",
    "AuditEvent",
    "AuditLog",
    "Receipt",
    "canonical_body",
    "chain_hash",
    "entry_from_fields",
    "epoch_time",
    "event_fields",
    "iso_time",
    "parse_entry",
]

AUDIT_UNAVAILABLE = "AUDIT_UNAVAILABLE"
"""The reason code of every append that could not be stored."""

GENESIS_HASH = "0" * 64
"""``prev_hash`` of the first entry."""

FORMAT_VERSION = 1
"""Value of the ``v`` key in every body; bump it if the body's meaning ever changes."""

DECISIONS = frozenset({"allow", "deny", ""})

_LIST_FIELDS = frozenset({"roles", "withheld_fields", "item_entry_ids", "released_fields"})
#: Keys added after format version 1 was first written, and what their absence means.
_LATER_FIELDS: Mapping[str, Any] = {
    "bundle_id": "",
    "relation": "",
    "item_entry_ids": (),
    "outcome_counts": {},
    "from_cache": False,
    "released_fields": (),
    "released_digest": "",
}
#: Later keys left out of a body when empty (evidence only): entries stay as short as before.
_OPTIONAL_FIELDS = ("released_fields", "released_digest")


def canonical_body(fields: Mapping[str, object]) -> str:
    """The canonical JSON text of an entry body: sorted keys, no whitespace, raw UTF-8."""
    return json.dumps(
        fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def chain_hash(prev_hash: str, body: str) -> str:
    """``SHA-256(prev_hash_hex + body)`` over UTF-8, as lowercase hex."""
    return hashlib.sha256((prev_hash + body).encode("utf-8")).hexdigest()


def iso_time(moment: datetime) -> str:
    """An aware datetime as the stored time text: UTC, millisecond precision, ``Z`` suffix.

    Fixed width, so text order is time order and range queries compare strings.
    """
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError("audit times must be timezone-aware")
    text = moment.astimezone(UTC).isoformat(timespec="milliseconds")
    return text.removesuffix("+00:00") + "Z"


def epoch_time(seconds: float) -> str:
    """:func:`iso_time` of a POSIX timestamp (what an injected clock returns)."""
    return iso_time(datetime.fromtimestamp(seconds, tz=UTC))


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
    released_fields: tuple[str, ...] = ()  # with evidence: the field paths released
    released_digest: str = ""  # with evidence: the salted digest of the released content


@dataclass(frozen=True)
class AuditEntry:
    """A stored entry as read back. ``time`` is ISO 8601 UTC with milliseconds."""

    sequence: int
    entry_id: str
    time: str
    event: AuditEvent
    prev_hash: str
    entry_hash: str


@dataclass(frozen=True)
class Receipt:
    """Proof the entry is durably stored: its id, chain hash and sequence number."""

    entry_id: str
    entry_hash: str
    sequence: int


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


def event_fields(event: AuditEvent) -> dict[str, object]:
    """The event as body fields (JSON values), checked: a malformed event must not reach the
    log. ``TypeError``/``ValueError`` name the bad field. The caller adds ``entry_id`` and
    ``time``; the store adds ``seq`` and ``v``."""
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
    for name in _OPTIONAL_FIELDS:
        if not fields[name]:
            del fields[name]
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


def parse_entry(sequence: int, body: str, prev_hash: str, entry_hash: str) -> AuditEntry:
    """The entry stored as ``body`` (at ``sequence``, with its chain hashes), read back.

    Keys added after format version 1 (see the module docstring) read as empty when missing.
    Does not check the chain; ``ValueError`` if the body is not an entry (run verify).
    """
    try:
        data = json.loads(body)
        if not isinstance(data, dict):
            raise ValueError("body is not a JSON object")
    except ValueError as exc:
        raise ValueError(f"audit entry {sequence} is malformed; run verify") from exc
    return entry_from_fields(sequence, data, prev_hash, entry_hash)


def entry_from_fields(
    sequence: int, data: Mapping[str, Any], prev_hash: str, entry_hash: str
) -> AuditEntry:
    """:func:`parse_entry` of a body already decoded (a compact row's values, which need no
    JSON round trip); ``ValueError`` if they are not an entry's."""
    try:
        kwargs: dict[str, Any] = {}
        for field in dataclasses.fields(AuditEvent):
            value = data[field.name] if field.name in data else _LATER_FIELDS[field.name]
            kwargs[field.name] = tuple(value) if field.name in _LIST_FIELDS else value
        kwargs["latency_ms"] = float(kwargs["latency_ms"])
        event = AuditEvent(**kwargs)
        return AuditEntry(
            sequence, str(data["entry_id"]), str(data["time"]), event, prev_hash, entry_hash
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"audit entry {sequence} is malformed; run verify") from exc
