"""What makes the audit log tamper-evident beyond its hash chain: a Merkle tree and signed
checkpoints.

- :mod:`~certbroker.audit.integrity.merkle`: RFC 9162 hashing, proofs and their verification
  (pure functions over leaf hashes).
- :mod:`~certbroker.audit.integrity.checkpoint`: C2SP signed checkpoint notes (pure).
- :mod:`~certbroker.audit.integrity.tree`: the tree as stored next to the entries, written in
  the same transaction (on either store backend).
- :mod:`~certbroker.audit.integrity.proofs`: proofs and signed checkpoints of a stored log, and
  the checkpoint key (:class:`CheckpointSigner`).

The names below are those of a stored log; the pure Merkle functions of the same names
(``merkle.inclusion_proof`` over a list of leaf hashes) stay in their module.
"""

from certbroker.audit.integrity.checkpoint import Checkpoint, CheckpointError
from certbroker.audit.integrity.merkle import CompactRange
from certbroker.audit.integrity.proofs import (
    KEY_NAME,
    ORIGIN,
    CheckpointSigner,
    StoredCheckpoint,
    consistency_proof,
    inclusion_proof,
    latest_checkpoint,
    sign_checkpoint,
    tree_root,
    tree_size,
)

__all__ = [
    "KEY_NAME",
    "ORIGIN",
    "Checkpoint",
    "CheckpointError",
    "CheckpointSigner",
    "CompactRange",
    "StoredCheckpoint",
    "consistency_proof",
    "inclusion_proof",
    "latest_checkpoint",
    "sign_checkpoint",
    "tree_root",
    "tree_size",
]
