"""Proofs and signed checkpoints over the stored audit Merkle tree
(:mod:`certbroker.audit.integrity.tree`).

What the Audit service and the CLI call:

- :func:`inclusion_proof` ``(db, sequence, tree_size)``: RFC 9162 PATH for entry ``sequence``
  (leaf index ``sequence - 1``) in the tree of the first ``tree_size`` entries.
- :func:`consistency_proof` ``(db, old, new)``: RFC 9162 PROOF that tree ``old`` is a prefix.
- :func:`sign_checkpoint` ``(db, signer)``: sign the current tree head (a C2SP checkpoint note,
  :mod:`certbroker.audit.integrity.checkpoint`) and store it in the ``checkpoints`` table; on
  demand, or every ``[audit] checkpoint_interval_s`` from
  :func:`certbroker.audit.maintenance.checkpoint_task` on the broker's loop.
- :func:`latest_checkpoint` ``(db)``: the newest stored one, or ``None``.

``db`` is the log's :data:`~certbroker.config.AuditLocation` (an SQLite path or a PostgreSQL
DSN + schema). All functions are blocking (run them in a thread from the event loop); proofs
open the log read-only. Checkpoints are signed with the Ed25519 key of
:class:`CheckpointSigner`: ``[audit] checkpoint_key`` or, by default,
``<state_dir>/checkpoint-key/signing-key.pem`` (created on first use) with
``public-key.pem`` beside it, the file auditors need.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from certbroker.audit.events import iso_time
from certbroker.audit.integrity import checkpoint
from certbroker.audit.integrity.merkle import (
    CompactRange,
    consistency_path,
    inclusion_path,
    perfect_subtree_hasher,
)
from certbroker.audit.integrity.tree import ArchivedLeaves, load_state, node_reader, root_at
from certbroker.audit.store.base import Connection
from certbroker.audit.store.db import backend_for
from certbroker.auth.keyfiles import ed25519_key_files
from certbroker.config import AuditLocation

ORIGIN: Final = "certbroker/audit"
"""The checkpoint origin line: which log a checkpoint is about."""
KEY_NAME: Final = "certbroker-audit"
"""The signed-note key name of checkpoint signatures."""


@dataclass(frozen=True)
class StoredCheckpoint:
    """A row of the ``checkpoints`` table: the parsed head and the signed note text."""

    size: int
    root_hash: bytes
    time: str
    note: str


@dataclass(frozen=True)
class CheckpointSigner:
    """The checkpoint key pair. :meth:`load` finds or creates it."""

    private_key: Ed25519PrivateKey
    public_key_path: Path
    origin: str = ORIGIN
    key_name: str = KEY_NAME

    @property
    def public_key(self) -> Ed25519PublicKey:
        """The key auditors verify checkpoints with."""
        return self.private_key.public_key()

    @classmethod
    def load(cls, state_dir: Path, key_path: Path | None = None) -> CheckpointSigner:
        """``key_path`` if configured (created with ``<name>.pub.pem`` beside it if missing),
        else ``state_dir/checkpoint-key/signing-key.pem`` (+ ``public-key.pem``)."""
        if key_path is None:
            files = ed25519_key_files(state_dir / "checkpoint-key")
            return cls(files.private_key, files.public_key_path)
        public = key_path.with_suffix(".pub.pem")
        if not key_path.exists():
            key_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            try:
                return cls(checkpoint.generate_key(key_path, public), public)
            except FileExistsError:
                pass  # another process created it a moment ago: load that one
        return cls(checkpoint.load_private_key(key_path), public)


def _connect(db: AuditLocation) -> Connection:
    return backend_for(db).connect_read()


def tree_size(db: AuditLocation) -> int:
    """The number of leaves (entries) the stored tree covers."""
    with closing(_connect(db)) as conn:
        return load_state(conn)[0]


def inclusion_proof(
    db: AuditLocation, sequence: int, size: int, *, archived: ArchivedLeaves | None = None
) -> tuple[bytes, list[bytes]]:
    """(leaf hash, RFC 9162 inclusion path) of entry ``sequence`` in the tree of ``size``.

    The low nodes of archived compact entries (which nobody stored) come from ``archived``
    (:func:`certbroker.audit.archive.archived_leaves`); without it, or if it cannot read
    them, KeyError. ValueError unless ``1 <= sequence <= size <= stored size``.
    """
    with closing(_connect(db)) as conn:
        stored, _ = load_state(conn)
        if not 1 <= sequence <= size <= stored:
            raise ValueError(f"no entry {sequence} in a tree of {size} (log has {stored})")
        node = node_reader(conn, archived)
        return node(0, sequence - 1), inclusion_path(
            sequence - 1, size, perfect_subtree_hasher(node)
        )


def consistency_proof(
    db: AuditLocation, old: int, new: int, *, archived: ArchivedLeaves | None = None
) -> list[bytes]:
    """RFC 9162 consistency proof from tree ``old`` to tree ``new`` (``0 <= old <= new``);
    ``archived`` as for :func:`inclusion_proof` (KeyError without a node it needs)."""
    with closing(_connect(db)) as conn:
        stored, _ = load_state(conn)
        if not 0 <= old <= new <= stored:
            raise ValueError(f"no consistency proof from {old} to {new} (log has {stored})")
        return consistency_path(old, new, perfect_subtree_hasher(node_reader(conn, archived)))


def tree_root(db: AuditLocation, size: int) -> bytes:
    """MTH of the first ``size`` entries, from stored nodes."""
    with closing(_connect(db)) as conn:
        return root_at(conn, size)


def _stored(row: tuple[object, ...]) -> StoredCheckpoint:
    size, root_hash, when, note = row
    return StoredCheckpoint(int(str(size)), bytes(root_hash), str(when), str(note))  # type: ignore[call-overload]


def latest_checkpoint(db: AuditLocation) -> StoredCheckpoint | None:
    """The most recently signed checkpoint, or None if there is none yet."""
    with closing(_connect(db)) as conn:
        row = conn.execute(
            "SELECT size, root_hash, time, note FROM checkpoints ORDER BY id DESC LIMIT 1"
        ).fetchone()
    return None if row is None else _stored(tuple(row))


def checkpoints(conn: Connection, low: int = 0, high: int | None = None) -> list[StoredCheckpoint]:
    """Stored checkpoints with ``low <= size <= high``, oldest first."""
    rows = conn.execute(
        "SELECT size, root_hash, time, note FROM checkpoints WHERE size >= ? AND size <= ? "
        "ORDER BY id",
        (low, 2**63 - 1 if high is None else high),
    ).fetchall()
    return [_stored(tuple(row)) for row in rows]


def sign_checkpoint(
    db: AuditLocation,
    signer: CheckpointSigner,
    *,
    clock: Callable[[], float] = time.time,
    size: int | None = None,
) -> StoredCheckpoint:
    """Sign the current tree head of ``db`` (or, with ``size``, the head of its first ``size``
    entries) and store it in ``checkpoints``; return it.

    Reads the tree state and inserts the checkpoint under the log's write lock, so the head
    signed is one that is committed. The writer of entries is not involved.
    """
    with backend_for(db).write_transaction() as conn:
        stored, frontier = load_state(conn)
        if size is None or size == stored:
            size, root = stored, CompactRange(stored, frontier).root()
        else:
            root = root_at(conn, size)  # ValueError beyond the stored tree
        head = checkpoint.Checkpoint(
            signer.origin, size, root, datetime.fromtimestamp(clock(), tz=UTC)
        )
        note = checkpoint.sign(head, signer.private_key, signer.key_name)
        when = iso_time(head.time)
        conn.execute(
            "INSERT INTO checkpoints (size, root_hash, time, note) VALUES (?, ?, ?, ?)",
            (size, head.root_hash, when, note),
        )
    return StoredCheckpoint(size, head.root_hash, when, note)
