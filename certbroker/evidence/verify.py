"""Offline verification of an evidence document: no broker, no database, a few hashes.

Inputs: the evidence (a file holding the compact JWS, or the JSON ``{"evidence": <JWS>,
"proof": <proof>}`` that ``certbroker evidence prove --embed`` writes), the evidence JWKS, and
optionally an audit-log proof (:func:`proof_object`, from ``certbroker evidence prove``) with
the checkpoint public key it is checked against. Steps, in order, each with its exit code:

1. The envelope and payload parse (:mod:`certbroker.evidence.jws`) and have the expected
   shape, else :data:`MALFORMED` (a truncated file, a re-encoded one, not evidence at all).
2. The header's ``kid`` is in the JWKS, else :data:`UNKNOWN_KEY` (signed by another key).
3. Every item's content matches its salted field digests and content digest, else
   :data:`CONTENT_CHANGED`, naming the item and the field.
4. The Ed25519 signature verifies, else :data:`SIGNATURE_BAD` (e.g. a tampered QR payload).
5. With a proof: the checkpoint note is signed by the checkpoint key; each item's entry body
   hashes (chain: ``SHA-256(prev_hash + body)``) to the entry hash in the evidence, its Merkle
   leaf leads to the checkpoint's root, and the body's ``released_digest`` is the item's
   content digest -- else :data:`NOT_IN_LOG` (the entry is missing or is another one), or
   :data:`CONTENT_CHANGED` when the log records another digest.

All pass: :data:`INTACT`. Step 3 comes before 4 so that an edited copy says *which field*
changed, not only that the signature broke.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from certbroker.audit.integrity import checkpoint, merkle
from certbroker.audit.integrity.proofs import KEY_NAME, ORIGIN
from certbroker.evidence import document, jws

INTACT: Final = 0
CONTENT_CHANGED: Final = 10
SIGNATURE_BAD: Final = 11
UNKNOWN_KEY: Final = 12
NOT_IN_LOG: Final = 13
MALFORMED: Final = 14
EXIT_CODES: Final = {
    INTACT: "intact",
    CONTENT_CHANGED: "content changed",
    SIGNATURE_BAD: "signature bad",
    UNKNOWN_KEY: "unknown key",
    NOT_IN_LOG: "entry not in the log",
    MALFORMED: "malformed file",
}
PROOF_FORMAT: Final = "certbroker-evidence-proof/1"


@dataclass
class Outcome:
    """The verdict: ``code`` (one of the constants), why, and what the evidence says."""

    code: int
    problem: str = ""
    evidence: dict[str, Any] = field(default_factory=dict)
    kid: str = ""
    proven: bool = False  # checked against a signed checkpoint

    @property
    def verdict(self) -> str:
        """The code's name (:data:`EXIT_CODES`)."""
        return EXIT_CODES[self.code]


class _Fail(Exception):
    def __init__(self, code: int, problem: str) -> None:
        super().__init__(problem)
        self.code = code
        self.problem = problem


@dataclass(frozen=True)
class Document:
    """An evidence file as read: the compact JWS and the proof embedded with it, if any."""

    compact: str
    proof: dict[str, Any] | None = None


def read_document(raw: bytes) -> Document:
    """An evidence file's bytes: a compact JWS, or ``{"evidence": ..., "proof": ...}``.

    :class:`jws.MalformedError` if it is neither."""
    if len(raw) > jws.MAX_BYTES * 2:
        raise jws.MalformedError("file too large")
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise jws.MalformedError("not UTF-8 text") from None
    if not text.startswith("{"):
        return Document(text)
    try:
        data = json.loads(text)
    except ValueError:
        raise jws.MalformedError("not JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("evidence"), str):
        raise jws.MalformedError('a JSON evidence file needs an "evidence" string')
    proof = data.get("proof")
    if proof is not None and not isinstance(proof, dict):
        raise jws.MalformedError('"proof" is not an object')
    return Document(data["evidence"], proof)


# --- the payload's shape ----------------------------------------------------------------------

_CALL_KEYS: Final = {
    "typ": str, "v": int, "evidence_id": str, "issued_at": str, "kind": str, "clerk": dict,
    "matter": dict, "case_number": str, "consent": dict, "policy_version": str,
    "bundle_id": str, "entry": dict, "items": list,
}  # fmt: skip
_ITEM_KEYS: Final = {
    "subject_id": str, "relation": str, "matter_code": str, "record_type": str,
    "department": str, "as_of": str, "rule_id": str, "decision_id": str, "masked_fields": list,
    "withheld_fields": list, "released_fields": list, "entry": dict, "content": dict,
    "salt": str, "digests": dict, "content_digest": str,
}  # fmt: skip
_ENTRY_KEYS: Final = {"entry_id": str, "entry_hash": str, "sequence": int}


def _shape(obj: Mapping[str, Any], keys: Mapping[str, type], where: str) -> None:
    for name, kind in keys.items():
        value = obj.get(name)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise jws.MalformedError(f"{where}{name} is missing or not a {kind.__name__}")


def check_shape(payload: Mapping[str, Any]) -> None:
    """:class:`jws.MalformedError` unless ``payload`` has every key of a version-1 evidence."""
    _shape(payload, _CALL_KEYS, "")
    if payload["typ"] != document.TYPE or payload["v"] != document.VERSION:
        raise jws.MalformedError(f"not {document.TYPE} version {document.VERSION}")
    _shape(payload["entry"], _ENTRY_KEYS, "entry.")
    for index, item in enumerate(payload["items"]):
        where = f"items[{index}]."
        if not isinstance(item, dict):
            raise jws.MalformedError(f"items[{index}] is not an object")
        _shape(item, _ITEM_KEYS, where)
        _shape(item["entry"], _ENTRY_KEYS, where + "entry.")
        if not all(isinstance(v, str) for v in item["digests"].values()):
            raise jws.MalformedError(f"{where}digests are not text")


# --- the steps ----------------------------------------------------------------------------------


def mask_id(subject_id: str) -> str:
    """A resident ID shown with only its last 4 characters."""
    return "*" * max(0, len(subject_id) - 4) + subject_id[-4:]


def _label(index: int, item: Mapping[str, Any]) -> str:
    return f"item {index + 1} ({item['record_type']} of {mask_id(item['subject_id'])})"


def changed_fields(item: Mapping[str, Any]) -> list[str]:
    """Fields of ``item`` whose content no longer matches its salted digest (added, removed or
    changed); ``["(digests)"]`` when the digests themselves no longer give the content digest.
    """
    salt = jws.b64url_decode(item["salt"])
    content, digests = item["content"], item["digests"]
    changed = [
        name
        for name in sorted(set(content) | set(digests))
        if name not in content
        or name not in digests
        or document.field_digest(salt, name, content[name]) != digests[name]
    ]
    if not changed and document.content_digest(digests) != item["content_digest"]:
        changed = ["(digests)"]
    return changed


def _check_content(payload: Mapping[str, Any]) -> None:
    for index, item in enumerate(payload["items"]):
        changed = changed_fields(item)
        if changed:
            raise _Fail(
                CONTENT_CHANGED,
                f"{_label(index, item)}: field {', '.join(changed)} changed since it was signed",
            )


def _check_proof(
    payload: Mapping[str, Any], proof: Mapping[str, Any], checkpoint_key: Ed25519PublicKey
) -> None:
    """Step 5 (see the module docstring)."""
    try:
        signed = checkpoint.open_note(
            str(proof["checkpoint"]), checkpoint_key, KEY_NAME, origin=ORIGIN
        )
    except (KeyError, checkpoint.CheckpointError) as exc:
        raise _Fail(NOT_IN_LOG, f"the proof's checkpoint does not verify: {exc}") from None
    entries = proof.get("entries")
    by_id = (
        {e.get("entry_id"): e for e in entries if isinstance(e, dict)}
        if isinstance(entries, list)
        else {}
    )
    for index, item in enumerate(payload["items"]):
        want = item["entry"]
        entry = by_id.get(want["entry_id"])
        if entry is None:
            raise _Fail(
                NOT_IN_LOG, f"{_label(index, item)}: the proof has no entry {want['entry_id']}"
            )
        try:
            body = str(entry["body"])
            prev = str(entry["prev_hash"])
            path = [bytes.fromhex(h) for h in entry["hashes"]]
            leaf_index = int(entry["leaf_index"])
            size = int(entry["tree_size"])
            recorded = json.loads(body)
        except (KeyError, TypeError, ValueError):
            raise _Fail(MALFORMED, f"the proof's entry {want['entry_id']} is malformed") from None
        chained = hashlib.sha256((prev + body).encode("utf-8")).hexdigest()
        leaf = merkle.leaf_hash(body.encode("utf-8"))
        if (
            chained != want["entry_hash"]
            or recorded.get("entry_id") != want["entry_id"]
            or leaf_index != want["sequence"] - 1
            or size != signed.size
            or not merkle.verify_inclusion(leaf, leaf_index, size, path, signed.root_hash)
        ):
            raise _Fail(
                NOT_IN_LOG,
                f"{_label(index, item)}: audit entry {want['sequence']} is not in the log "
                f"signed at size {signed.size}",
            )
        if recorded.get("released_digest") != item["content_digest"]:
            raise _Fail(
                CONTENT_CHANGED,
                f"{_label(index, item)}: the audit entry records another content digest",
            )


def verify(
    raw: bytes,
    jwks: Mapping[str, Ed25519PublicKey],
    *,
    proof: Mapping[str, Any] | None = None,
    checkpoint_key: Ed25519PublicKey | None = None,
) -> Outcome:
    """Verify an evidence file's bytes (see the module docstring); never raises on bad input.

    ``proof`` overrides one embedded in the file; it is checked only with ``checkpoint_key``
    (without it, an embedded or given proof is an error: it cannot be trusted)."""
    outcome = Outcome(INTACT)
    try:
        doc = read_document(raw)
        envelope = jws.parse(doc.compact)
        check_shape(envelope.payload)
        outcome.evidence, outcome.kid = envelope.payload, envelope.kid
        key = jwks.get(envelope.kid)
        if key is None:
            raise _Fail(UNKNOWN_KEY, f"key {envelope.kid} is not in the evidence key set")
        _check_content(envelope.payload)
        if not envelope.verifies(key):
            raise _Fail(SIGNATURE_BAD, f"the signature by key {envelope.kid} does not verify")
        given = proof if proof is not None else doc.proof
        if given is not None:
            if checkpoint_key is None:
                raise _Fail(NOT_IN_LOG, "a proof needs the checkpoint public key to be checked")
            _check_proof(envelope.payload, given, checkpoint_key)
            outcome.proven = True
    except jws.MalformedError as exc:
        outcome.code, outcome.problem = MALFORMED, str(exc)
    except _Fail as exc:
        outcome.code, outcome.problem = exc.code, exc.problem
    return outcome


def proof_object(checkpoint_note: str, entries: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """A proof file's content: the checkpoint note and, per entry, ``entry_id``, ``sequence``,
    ``prev_hash``, ``body`` (verbatim), ``leaf_index``, ``tree_size``, ``hashes`` (hex)."""
    return {"format": PROOF_FORMAT, "checkpoint": checkpoint_note, "entries": list(entries)}


def summary_lines(outcome: Outcome) -> list[str]:
    """What the evidence says, for a person (empty when it could not be read)."""
    e = outcome.evidence
    if not e:
        return []
    lines = [
        f"evidence {e['evidence_id']} issued {e['issued_at']} (key {outcome.kid})",
        f"clerk {e['clerk'].get('name') or e['clerk'].get('sub')} ({e['clerk'].get('sub')}), "
        f"office {e['clerk'].get('office')}",
        f"matter {e['matter'].get('code')} {e['matter'].get('name')}, "
        f"case {e['case_number'] or '-'}, consent {e['consent'].get('method')} "
        f"{e['consent'].get('reference')}".rstrip(),
        f"audit entry {e['entry']['sequence']} {e['entry']['entry_hash']}",
    ]
    for index, item in enumerate(e["items"]):
        lines.append(
            f"  {_label(index, item)} from {item['department']} as of {item['as_of']}, "
            f"rule {item['rule_id']}, entry {item['entry']['sequence']}"
        )
        lines.extend(
            f"    {name}: {json.dumps(v, ensure_ascii=False)}"
            for name, v in item["content"].items()
        )
    return lines
