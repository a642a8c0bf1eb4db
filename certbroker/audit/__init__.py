"""Tamper-evident audit log of lookup decisions: no audit, no answer.

Every lookup is appended (:class:`AuditLog`) before the broker answers; the entry format, hash
chain and Merkle leaves are specified in :mod:`certbroker.audit.events`. This package's names,
for the server, the CLI and tests (modules inside the package import the defining modules, never
this one):

- entries: :class:`AuditEvent`, :class:`AuditEntry`, :class:`Receipt`, :func:`canonical_body`,
  :func:`chain_hash` (:mod:`~certbroker.audit.events`);
- writing: :func:`open_audit_log` and the log classes (:mod:`~certbroker.audit.log`, group
  commit in :mod:`~certbroker.audit.writer`, the append step in :mod:`~certbroker.audit.append`);
- reading: :func:`query` (:mod:`~certbroker.audit.query`), auditors' scans
  (:mod:`~certbroker.audit.scan`, :mod:`~certbroker.audit.anomalies`);
- checking: :func:`verify_chain` (:mod:`certbroker.audit.verify`, which also has the full
  checker), export and offline verification (:mod:`~certbroker.audit.export`), archival
  (:mod:`~certbroker.audit.archive`);
- signed checkpoints: :class:`CheckpointSigner` (:mod:`certbroker.audit.integrity`) and the
  broker's periodic :func:`checkpoint_task` (:mod:`~certbroker.audit.maintenance`).

Storage is :mod:`certbroker.audit.store`: one backend interface, SQLite or PostgreSQL, chosen
from ``Config.audit_location``.
"""

from certbroker.audit.events import (
    AUDIT_UNAVAILABLE,
    GENESIS_HASH,
    AuditEntry,
    AuditEvent,
    AuditLog,
    Receipt,
    canonical_body,
    chain_hash,
)
from certbroker.audit.integrity.proofs import CheckpointSigner
from certbroker.audit.log import (
    BackendAuditLog,
    BatchingAuditLog,
    PostgresAuditLog,
    SQLiteAuditLog,
    WriterOptions,
    open_audit_log,
)
from certbroker.audit.maintenance import checkpoint_task
from certbroker.audit.query import QueryFilter, query

# Re-exported as verify_chain: the name `verify` here is the certbroker.audit.verify package.
from certbroker.audit.verify.chain import VerifyReport
from certbroker.audit.verify.chain import verify as verify_chain

__all__ = [
    "AUDIT_UNAVAILABLE",
    "GENESIS_HASH",
    "AuditEntry",
    "AuditEvent",
    "AuditLog",
    "BackendAuditLog",
    "BatchingAuditLog",
    "CheckpointSigner",
    "PostgresAuditLog",
    "QueryFilter",
    "Receipt",
    "SQLiteAuditLog",
    "VerifyReport",
    "WriterOptions",
    "canonical_body",
    "chain_hash",
    "checkpoint_task",
    "open_audit_log",
    "query",
    "verify_chain",
]
