"""The notice outbox: one row per access, written in the SAME transaction as its audit entry.

A citizen is told of every lookup of their records (allowed or denied). The notice is a row of
table ``audit_outbox``, inserted by :class:`NoticeOutbox` -- the append hook of
:class:`certbroker.audit.append.ChainStore` -- inside the transaction that appends the entry, so
there is no access without its notice and no notice without its access (a batch whose notices
cannot be written is not stored at all, and its callers get AUDIT_UNAVAILABLE). A relay
(:mod:`certbroker.citizen.relay`) later publishes the rows to a message broker, at least once,
the entry id being the idempotency key, and marks them ``sent``; with no broker configured the
rows are simply kept.

A notice names the entry, the citizen, the time, the office (and the clerk when the policy
shows clerk numbers), the matter and the record type: never a record's contents. What it says
is built by the ``notice`` function given to the hook (the citizen package's
:func:`certbroker.citizen.notices.notice_fields`); this module only stores rows::

    audit_outbox(entry_id PRIMARY KEY, seq, subject_id, due, notice, sent)

``due`` is when the notice may be sent (the entry's time, or later for a covert matter's
disclosure delay), ``notice`` its JSON text, ``sent`` the time the broker acknowledged it
(NULL until then). The table is not part of the hash chain or the Merkle tree (it is mutable:
``sent`` is set), and is not under the PostgreSQL append-only triggers.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass
from typing import Any

from certbroker.audit.store.base import Backend, Connection
from certbroker.audit.store.rows import OUTBOX_DDL, StoredRow

__all__ = [
    "OUTBOX_DDL",
    "NoticeOutbox",
    "Pending",
    "is_access",
    "mark_sent",
    "pending",
    "read_notices",
]

#: ``notice(entry body fields)`` -> (the notice as JSON values, when it is due), or None for
#: an entry that is no access (the body is the entry as appended, ``entry_id`` and ``time``
#: included).
NoticeFor = Callable[[Mapping[str, object]], tuple[Mapping[str, object], str] | None]


def is_access(fields: Mapping[str, object]) -> bool:
    """Whether an entry is an access to a citizen's records, of which they are told: a
    lookup (alone or a bundle's item) of a subject that policy allowed or denied. Invalid
    requests, refused callers and the broker's own entries reached no decision on anyone."""
    return (
        fields.get("kind") == "lookup"
        and bool(fields.get("subject_id"))
        and fields.get("decision") in ("allow", "deny")
    )


class NoticeOutbox:
    """The append hook (:class:`certbroker.audit.append.AppendHook`) writing notice rows."""

    def __init__(self, notice: NoticeFor) -> None:
        self._notice = notice

    def prepare(self, conn: Connection) -> None:
        """Create the table if a log written before it lacks it (in the writer's first
        transaction, under its lock). Only then: a PostgreSQL broker role may not CREATE."""
        if not conn.backend.has_table(conn, "audit_outbox"):
            for statement in OUTBOX_DDL:
                conn.execute(statement)

    def rows_appended(
        self,
        conn: Connection,
        bodies: Sequence[Mapping[str, object]],
        rows: Sequence[StoredRow],
    ) -> None:
        """Insert the notices of the accesses among ``rows`` (appended from ``bodies``, in
        order), in the appending transaction. Raising rolls the whole batch back."""
        values: list[Sequence[Any]] = []
        for fields, row in zip(bodies, rows, strict=True):
            if not is_access(fields):
                continue
            made = self._notice({**fields, "entry_id": row.columns["entry_id"]})
            if made is None:
                continue
            notice, due = made
            text = json.dumps(notice, sort_keys=True, ensure_ascii=False, allow_nan=False)
            values.append((row.columns["entry_id"], row.seq, fields["subject_id"], due, text))
        if values:
            conn.backend.insert_many(
                conn,
                "audit_outbox",
                ("entry_id", "seq", "subject_id", "due", "notice"),
                ("text", "bigint", "text", "text", "text"),
                values,
            )


@dataclass(frozen=True)
class Pending:
    """An unsent notice: its entry id and JSON text."""

    entry_id: str
    seq: int
    notice: str


def pending(backend: Backend, now: str, limit: int) -> list[Pending]:
    """Up to ``limit`` unsent notices due at ``now`` (ISO time), oldest entry first; [] when
    there is no log or no outbox yet."""
    if not backend.exists():
        return []
    with closing(backend.connect_read()) as conn:
        if not backend.has_table(conn, "audit_outbox"):
            return []
        rows = conn.execute(
            "SELECT entry_id, seq, notice FROM audit_outbox WHERE sent IS NULL AND due <= ? "
            "ORDER BY seq LIMIT ?",
            (now, limit),
        ).fetchall()
    return [Pending(str(r[0]), int(r[1]), str(r[2])) for r in rows]


def mark_sent(backend: Backend, entry_ids: Sequence[str], now: str) -> None:
    """Record that the broker acknowledged these notices (they are not sent again)."""
    if not entry_ids:
        return
    with backend.write_transaction() as conn:
        marks = ", ".join("?" * len(entry_ids))
        conn.execute(
            f"UPDATE audit_outbox SET sent = ? WHERE entry_id IN ({marks})",  # noqa: S608
            (now, *entry_ids),
        )


def read_notices(backend: Backend, subject_id: str | None = None) -> Iterator[dict[str, Any]]:
    """Every notice in the outbox (of ``subject_id``, if given), oldest first, with its
    ``sent`` time (``None`` = not sent yet) under the key ``sent``."""
    if not backend.exists():
        return
    with closing(backend.connect_read()) as conn:
        if not backend.has_table(conn, "audit_outbox"):
            return
        sql = "SELECT notice, sent FROM audit_outbox"
        params: tuple[str, ...] = ()
        if subject_id is not None:
            sql, params = sql + " WHERE subject_id = ?", (subject_id,)
        for notice, sent in conn.execute(sql + " ORDER BY seq", params).fetchall():
            yield {**json.loads(str(notice)), "sent": None if sent is None else str(sent)}
