"""What an evidence document says, and the salted digests that tie it to the audit log.

For every released record (an *item*: one record type about one citizen, with its own audit
entry) the broker draws a 16-byte random ``salt`` and computes, over the record's content as
released (:func:`record_content`: top-level field name → JSON value, masked values as masked)::

    field digest   d[name] = hex(SHA-256(salt || canonical_json([name, value])))
    content digest D       = hex(SHA-256(canonical_json(d)))       (d: name → field digest)

The item's audit entry records ``D`` (``released_digest``) and the released field paths
(``released_fields``), never the values or the salt; the evidence carries the content, the
salt, ``d`` and ``D``. Without the salt nobody can test a guess of a value against the log;
with the evidence anyone can recompute ``D`` and find it in the (signed, Merkle-proven) entry,
and ``d`` names the field that changed when a copy was edited. ``canonical_json`` is
:func:`certbroker.evidence.jws.canonical_json`.

:func:`payload` builds the signed object (keys in docs/evidence.md); :class:`Issuer` signs it.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final

from google.protobuf import json_format

from certbroker.audit.events import Receipt, iso_time
from certbroker.contract import generic
from certbroker.contract.fields import GENERIC_CASE
from certbroker.evidence import jws, keys
from certbroker.ids import new_id
from certbroker.v1 import records_pb2

TYPE: Final = "certbroker-evidence"
VERSION: Final = 1
SALT_BYTES: Final = 16


def _json_value(value: Any) -> Any:
    """A record value as evidence JSON: integral floats as integers (JSON has one number type:
    85.0 and 85 must digest alike in every language), times as ISO 8601 UTC text."""
    if isinstance(value, dict):
        return {k: _json_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_value(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    return value


def record_content(record: records_pb2.Record) -> dict[str, Any]:
    """The released record's fields by top-level name: a typed record in the protobuf JSON
    mapping (field names as in the .proto, int64 as text, unset fields absent), a
    catalogue-declared one by declared name (decimals and dates as text)."""
    case = record.WhichOneof("record")
    if case is None:
        return {}
    if case == GENERIC_CASE:
        data: dict[str, Any] = generic.to_dict(record.generic)
    else:
        data = json_format.MessageToDict(getattr(record, case), preserving_proto_field_name=True)
    value = _json_value(data)
    assert isinstance(value, dict)
    return value


def field_digest(salt: bytes, name: str, value: object) -> str:
    """``hex(SHA-256(salt || canonical_json([name, value])))``."""
    return hashlib.sha256(salt + jws.canonical_json([name, value])).hexdigest()


def field_digests(salt: bytes, content: Mapping[str, object]) -> dict[str, str]:
    """The field digest of every field of ``content``."""
    return {name: field_digest(salt, name, value) for name, value in content.items()}


def content_digest(digests: Mapping[str, str]) -> str:
    """``hex(SHA-256(canonical_json(digests)))``: what the audit entry records."""
    return hashlib.sha256(jws.canonical_json(dict(digests))).hexdigest()


@dataclass(frozen=True)
class Released:
    """One item's content as released, salted and digested (before its entry is written)."""

    salt: bytes
    content: dict[str, Any]
    digests: dict[str, str]
    digest: str
    fields: tuple[str, ...]  # the released field paths (the decision's), for the audit entry


def release(
    record: records_pb2.Record, fields: Sequence[str], salt: bytes | None = None
) -> Released:
    """Salt and digest a released record; ``fields`` are the paths the decision released."""
    salt = os.urandom(SALT_BYTES) if salt is None else salt
    content = record_content(record)
    digests = field_digests(salt, content)
    return Released(salt, content, digests, content_digest(digests), tuple(fields))


@dataclass(frozen=True)
class Item:
    """One released record in an evidence document, with its audit entry's receipt."""

    subject_id: str
    relation: str
    matter_code: str
    record_type: str
    department: str
    as_of: str
    rule_id: str
    decision_id: str
    masked_fields: tuple[str, ...]
    withheld_fields: tuple[str, ...]
    entry: Receipt
    released: Released


@dataclass(frozen=True)
class Call:
    """What an evidence document says about the call as a whole."""

    kind: str  # "lookup", "bundle" or "package"
    clerk_sub: str
    clerk_name: str
    office: str
    matter_code: str  # the matter, or the package's code
    matter_name: str
    case_number: str
    consent_method: str
    consent_reference: str
    policy_version: str
    bundle_id: str
    entry: Receipt  # the call's own entry: the lookup's, or the bundle/package entry


def _receipt(receipt: Receipt) -> dict[str, Any]:
    return {
        "entry_id": receipt.entry_id,
        "entry_hash": receipt.entry_hash,
        "sequence": receipt.sequence,
    }


def _item(item: Item) -> dict[str, Any]:
    r = item.released
    return {
        "subject_id": item.subject_id,
        "relation": item.relation,
        "matter_code": item.matter_code,
        "record_type": item.record_type,
        "department": item.department,
        "as_of": item.as_of,
        "rule_id": item.rule_id,
        "decision_id": item.decision_id,
        "masked_fields": list(item.masked_fields),
        "withheld_fields": list(item.withheld_fields),
        "released_fields": list(r.fields),
        "entry": _receipt(item.entry),
        "content": r.content,
        "salt": jws.b64url(r.salt),
        "digests": r.digests,
        "content_digest": r.digest,
    }


def payload(
    evidence_id: str, issued_at: datetime, call: Call, items: Sequence[Item]
) -> dict[str, Any]:
    """The evidence object that gets signed (docs/evidence.md lists its keys)."""
    return {
        "typ": TYPE,
        "v": VERSION,
        "evidence_id": evidence_id,
        "issued_at": iso_time(issued_at),
        "kind": call.kind,
        "clerk": {"sub": call.clerk_sub, "name": call.clerk_name, "office": call.office},
        "matter": {"code": call.matter_code, "name": call.matter_name},
        "case_number": call.case_number,
        "consent": {"method": call.consent_method, "reference": call.consent_reference},
        "policy_version": call.policy_version,
        "bundle_id": call.bundle_id,
        "entry": _receipt(call.entry),
        "items": [_item(i) for i in items],
    }


class Issuer:
    """Signs evidence with the current key of ``state_dir``'s key ring (:mod:`keys`).

    :meth:`reload` re-reads the ring (after ``certbroker keys rotate --evidence``; the broker
    calls it on SIGHUP)."""

    def __init__(self, state_dir: Path) -> None:
        self._state_dir = state_dir
        self._lock = threading.Lock()
        self._key = keys.load(state_dir)

    @property
    def kid(self) -> str:
        """The key id new evidence is signed with."""
        return self._key.kid

    def reload(self) -> None:
        """Take the ring's current key (a rotation since the start)."""
        key = keys.load(self._state_dir)
        with self._lock:
            self._key = key

    def jwks(self) -> str:
        """Every evidence public key of the ring, as JWKS text."""
        return keys.jwks_text(self._state_dir)

    def sign(self, evidence: Mapping[str, Any]) -> str:
        """The compact JWS of ``evidence``."""
        key = self._key
        return jws.sign(evidence, key.private_key, key.kid)

    def issue(self, call: Call, items: Sequence[Item], issued_at: datetime) -> str:
        """A new evidence document (fresh evidence id) of ``items`` released by ``call``."""
        return self.sign(payload(new_id(), issued_at, call, items))
