"""Checking one entry against a signed checkpoint, from what the Audit service serves.

``certbroker audit prove`` and the web console's "verify" button both ask the broker for the
latest checkpoint, an inclusion proof of the entry in it and a one-entry export, and check them
here, with the checkpoint public key only: the checkpoint's signature, the proof against the
signed root, and that the exported entry is the proven leaf (and the receipt's entry).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from certbroker.audit.integrity import checkpoint, merkle
from certbroker.audit.integrity.proofs import KEY_NAME, ORIGIN
from certbroker.audit.verify.report import BAD_CHECKPOINT, REWRITTEN, WRONG_KEY
from certbroker.v1 import audit_pb2


class ProofError(Exception):
    """Something the broker served does not verify; ``code`` is the matching
    ``certbroker audit verify`` exit code (16 wrong key, 17 bad checkpoint, 15 no proof)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def open_checkpoint(
    head: audit_pb2.Checkpoint, public_key: Ed25519PublicKey
) -> checkpoint.Checkpoint:
    """The checkpoint a ``Checkpoint`` message carries, once its note's signature verifies
    with ``public_key``; the message's size and root must be the signed ones."""
    try:
        signed = checkpoint.open_note(head.note, public_key, KEY_NAME, origin=ORIGIN)
    except checkpoint.CheckpointError as exc:
        code = WRONG_KEY if exc.reason == checkpoint.WRONG_KEY else BAD_CHECKPOINT
        raise ProofError(code, f"checkpoint: {exc}") from None
    if (signed.size, signed.root_hash) != (head.size, head.root_hash):
        raise ProofError(BAD_CHECKPOINT, "checkpoint size/root differ from its signed note")
    return signed


def check_inclusion(signed: checkpoint.Checkpoint, proof: audit_pb2.InclusionProof) -> None:
    """Raise ProofError unless ``proof`` puts its leaf in the tree ``signed`` commits to."""
    if proof.tree_size != signed.size or not merkle.verify_inclusion(
        proof.leaf_hash, proof.leaf_index, proof.tree_size, list(proof.hashes), signed.root_hash
    ):
        raise ProofError(
            REWRITTEN,
            f"the inclusion proof of entry {proof.leaf_index + 1} does not lead to the root "
            f"signed for size {signed.size}",
        )


def exported_entry(data: bytes) -> tuple[str, bytes, str]:
    """(prev_hash, body bytes, entry_hash) of a one-entry export
    (:mod:`certbroker.audit.export`)."""
    try:
        head, line = data.split(b"\n")[:2]
        key = b'","body":'
        at = line.index(key)
        entry_hash = line[at - 64 : at].decode("ascii")
        return str(json.loads(head)["prev_hash"]), line[at + len(key) : -1], entry_hash
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise ProofError(REWRITTEN, "the exported entry is malformed") from None


def check_entry(
    prev: str,
    body: bytes,
    entry_hash: str,
    proof: audit_pb2.InclusionProof,
    *,
    entry_id: str = "",
    receipt_hash: str = "",
) -> None:
    """The exported entry is the proven leaf, and the receipt's entry (id, hash prefix)."""
    if hashlib.sha256(b"\x00" + body).digest() != proof.leaf_hash:
        raise ProofError(REWRITTEN, "the exported entry is not the proven leaf")
    if hashlib.sha256(prev.encode() + body).hexdigest() != entry_hash:
        raise ProofError(REWRITTEN, "the exported entry does not match its chain hash")
    fields: dict[str, Any] = json.loads(body)
    if entry_id and fields.get("entry_id") != entry_id:
        raise ProofError(REWRITTEN, "the proven entry has another entry_id")
    if receipt_hash and not entry_hash.startswith(receipt_hash):
        raise ProofError(REWRITTEN, "the proven entry's hash is not the receipt's")


@dataclass(frozen=True)
class Proven:
    """An entry found in a signed checkpoint."""

    sequence: int
    entry_hash: str
    checkpoint: checkpoint.Checkpoint


def prove(
    head: audit_pb2.Checkpoint,
    proof: audit_pb2.InclusionProof,
    export: bytes,
    public_key: Ed25519PublicKey,
    *,
    entry_id: str = "",
    receipt_hash: str = "",
) -> Proven:
    """Check all of it (module docstring); raise :class:`ProofError` at the first failure."""
    signed = open_checkpoint(head, public_key)
    check_inclusion(signed, proof)
    prev, body, entry_hash = exported_entry(export)
    check_entry(prev, body, entry_hash, proof, entry_id=entry_id, receipt_hash=receipt_hash)
    return Proven(proof.leaf_index + 1, entry_hash, signed)
