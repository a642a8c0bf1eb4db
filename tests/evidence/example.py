"""The worked example of docs/evidence.md, built from fixed inputs with the RFC 8037 (A.1)
example key, so the documented bytes can be recomputed (tests/evidence/test_format.py)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from certbroker.audit.events import Receipt
from certbroker.evidence import document, jws, keys

#: RFC 8037 Appendix A.1's Ed25519 private key ("d") -- public, for examples only.
RFC8037_D = "nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A"
SALT = bytes(range(16))
CONTENT = {"marital_status": "已婚", "registered_on": "2000-07-07"}


def private_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(jws.b64url_decode(RFC8037_D))


def payload() -> dict[str, Any]:
    entry = Receipt("01a23c78be6574c2a4f6ea3eaa5d56fb", "ab" * 32, 42)
    released = document.Released(
        SALT,
        dict(CONTENT),
        document.field_digests(SALT, CONTENT),
        document.content_digest(document.field_digests(SALT, CONTENT)),
        ("marital_status", "registered_on"),
    )
    item = document.Item(
        subject_id="110101199003071234",
        relation="",
        matter_code="BDC-ZY-001",
        record_type="marriage",
        department="civil_affairs",
        as_of="2026-03-02T08:30:00.000Z",
        rule_id="window-clerk-24h",
        decision_id="01a23c78be6574c2a4f6ea3eaa5d56fa",
        masked_fields=(),
        withheld_fields=("spouse_name",),
        entry=entry,
        released=released,
    )
    call = document.Call(
        kind="lookup",
        clerk_sub="clerk-0417",
        clerk_name="李敏",
        office="gz-haizhu-24h-01",
        matter_code="BDC-ZY-001",
        matter_name="不动产转移登记",
        case_number="GZ20260302-000123",
        consent_method="id_card_read",
        consent_reference="READER-07/0417",
        policy_version="bf2cbad166c51c9e",
        bundle_id="",
        entry=entry,
    )
    when = datetime(2026, 3, 2, 8, 30, 0, 123000, tzinfo=UTC)
    return document.payload("01a23c78be6a794cbcd9d5c29033bf92", when, call, [item])


def compact() -> str:
    key = private_key()
    return jws.sign(payload(), key, keys.jwk(key.public_key())["kid"])


def jwks() -> str:
    return '{"keys": [' + jws.canonical_json(keys.jwk(private_key().public_key())).decode() + "]}"
