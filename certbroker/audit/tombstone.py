"""Signed tombstones of archive files removed under retention (table ``audit_tombstones``).

Written by :mod:`certbroker.audit.retention`, read by
:func:`certbroker.audit.archive.verify_with_archives` to tell "removed under retention" from
"missing".
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from certbroker.audit.store.base import Connection

TOMBSTONE_FORMAT = 1


@dataclass(frozen=True)
class Tombstone:
    """A removed archive, as recorded (``signature`` over :meth:`signed_text`)."""

    first_seq: int
    last_seq: int
    last_entry_hash: str
    file_name: str
    file_sha256: str
    removed_at: str
    checkpoint: str
    signature: str

    def signed_text(self) -> bytes:
        """What the signature covers: every field but itself, canonical JSON."""
        fields: dict[str, Any] = {
            "certbroker_audit_tombstone": TOMBSTONE_FORMAT,
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
            "last_entry_hash": self.last_entry_hash,
            "file_name": self.file_name,
            "file_sha256": self.file_sha256,
            "removed_at": self.removed_at,
            "checkpoint": self.checkpoint,
        }
        return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()

    def verifies(
        self, public_key: Ed25519PublicKey, archive: tuple[int, int, str, str, str]
    ) -> bool:
        """Whether the signature holds and the tombstone names exactly ``archive`` (first and
        last sequence, last entry hash, file name, file SHA-256)."""
        names = (self.first_seq, self.last_seq, self.last_entry_hash, self.file_name,
                 self.file_sha256)  # fmt: skip
        if names != archive:
            return False
        try:
            public_key.verify(base64.b64decode(self.signature), self.signed_text())
        except (InvalidSignature, ValueError):
            return False
        return True


def tombstones(conn: Connection) -> dict[int, Tombstone]:
    """The stored tombstones by ``last_seq`` ({} when the table is not there)."""
    if not conn.backend.has_table(conn, "audit_tombstones"):
        return {}
    rows = conn.execute(
        "SELECT first_seq, last_seq, last_entry_hash, file_name, file_sha256, removed_at, "
        "checkpoint, signature FROM audit_tombstones ORDER BY last_seq"
    ).fetchall()
    found = {}
    for row in rows:
        try:
            stone = Tombstone(int(row[0]), int(row[1]), *(str(v) for v in row[2:]))
        except (TypeError, ValueError):
            continue  # unreadable: the archive then counts as missing
        found[stone.last_seq] = stone
    return found
