"""The evidence format, byte for byte: RFC 8037 vectors, the worked example of
docs/evidence.md (recomputed, so the document cannot drift), a verifier in another language
(docs/evidence-verify.mjs on stock Node.js) agreeing with ours, and the audit entry's new keys
staying optional (older entries parse and chain unchanged)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from certbroker.audit import events
from certbroker.evidence import document, jws, keys
from certbroker.evidence import verify as ev
from tests.evidence import example

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "evidence.md"


def test_rfc8037_thumbprint_and_signature_vectors() -> None:
    public = example.private_key().public_key()
    jwk = keys.jwk(public)
    assert jwk["x"] == "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"  # RFC 8037 A.2
    assert jwk["kid"] == "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"  # RFC 8037 A.3
    # RFC 8037 A.4: the JWS of "Example of Ed25519 signing" with header {"alg":"EdDSA"}.
    signing_input = b"eyJhbGciOiJFZERTQSJ9.RXhhbXBsZSBvZiBFZDI1NTE5IHNpZ25pbmc"
    signature = (
        "hgyY0il_MGCjP0JzlnLWG1PPOt7-09PGcvMg3AIbQR6dWbhijcNR4ki4iylGjg5BhVsPt9g7sVvpAr_MuM0KAg"
    )
    envelope = jws.Envelope({}, {}, signing_input, jws.b64url_decode(signature))
    assert envelope.verifies(public)
    assert jws.b64url(example.private_key().sign(signing_input)) == signature


def test_the_documented_worked_example_is_what_the_code_produces() -> None:
    text = DOC.read_text(encoding="utf-8")
    compact = example.compact()
    block = text.split("signed (Ed25519 is deterministic", 1)[1].split("```", 2)[1]
    assert "".join(block.split()) == compact
    head, payload, _ = compact.split(".")
    assert jws.b64url_decode(head).decode() in text
    assert jws.b64url_decode(payload).decode() in text
    item = example.payload()["items"][0]
    for digest in (*item["digests"].values(), item["content_digest"]):
        assert digest in text
    assert example.jwks() in text
    outcome = ev.verify(compact.encode(), keys.public_keys(example.jwks()))
    assert outcome.code == ev.INTACT


def _node() -> str:
    found = shutil.which("node")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("node is not installed (apt-get install nodejs)")
        pytest.skip("node is not installed")
    return found


@pytest.mark.parametrize(
    ("case", "code"),
    [("intact", 0), ("edited", 10), ("resigned", 11), ("other key", 12), ("truncated", 14)],
)
def test_a_stock_node_verifier_agrees(case: str, code: int, tmp_path: Path) -> None:
    compact = example.compact()
    head, _, sig = compact.split(".")
    payload = example.payload()
    if case == "edited":
        payload["items"][0]["content"]["marital_status"] = "未婚"
        compact = f"{head}.{jws.b64url(jws.canonical_json(payload))}.{sig}"
    elif case == "resigned":
        payload["case_number"] = "GZ-OTHER"
        compact = f"{head}.{jws.b64url(jws.canonical_json(payload))}.{sig}"
    elif case == "other key":
        other = Ed25519PrivateKey.generate()
        compact = jws.sign(payload, other, keys.jwk(other.public_key())["kid"])
    elif case == "truncated":
        compact = compact[: len(compact) // 3]
    (tmp_path / "jwks.json").write_text(example.jwks())
    (tmp_path / "evidence.jws").write_text(compact)
    ours = ev.verify(compact.encode(), keys.public_keys(example.jwks())).code
    node = subprocess.run(
        [_node(), str(ROOT / "docs" / "evidence-verify.mjs"), "jwks.json", "evidence.jws"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert (ours, node.returncode) == (code, code), node.stdout + node.stderr


def test_digests_name_the_changed_field_and_floats_digest_like_json() -> None:
    salt = bytes(16)
    content = document._json_value({"area_sqm": 85.0, "rooms": [{"a": 1.5}]})
    assert content == {"area_sqm": 85, "rooms": [{"a": 1.5}]}
    item = {
        "salt": jws.b64url(salt),
        "content": dict(content),
        "digests": document.field_digests(salt, content),
        "content_digest": document.content_digest(document.field_digests(salt, content)),
    }
    assert ev.changed_fields(item) == []
    item["content"] = {**content, "area_sqm": 86}
    assert ev.changed_fields(item) == ["area_sqm"]
    item["content"] = {"rooms": content["rooms"]}
    assert ev.changed_fields(item) == ["area_sqm"]


def _event(**kw: object) -> events.AuditEvent:
    fields: dict[str, object] = {
        f: "" for f in ("kind", "clerk", "office", "subject_id", "matter_code", "case_number")
    }
    fields |= dict.fromkeys(
        ("consent_method", "record_type", "rule_id", "outcome", "status", "policy_version"), ""
    )
    fields |= {"department": "", "decision_id": "", "decision": "allow", "roles": ()}
    fields |= {"withheld_fields": (), "latency_ms": 1.0, "kind": "lookup"}
    return events.AuditEvent(**(fields | kw))  # type: ignore[arg-type]


def test_released_keys_are_optional_in_audit_entries() -> None:
    plain = events.event_fields(_event())
    assert "released_digest" not in plain
    assert "released_fields" not in plain
    with_evidence = events.event_fields(
        _event(released_fields=("name",), released_digest="ab" * 32)
    )
    assert with_evidence["released_fields"] == ["name"]
    assert with_evidence["released_digest"] == "ab" * 32
    # An entry written before these keys existed reads back with them empty.
    old = {**plain, "entry_id": "0" * 32, "time": "2025-01-01T00:00:00.000Z", "seq": 1, "v": 1}
    entry = events.parse_entry(1, events.canonical_body(old), events.GENESIS_HASH, "")
    assert entry.event.released_fields == ()
    assert entry.event.released_digest == ""
    body = events.canonical_body({**old, **with_evidence})
    assert events.parse_entry(1, body, events.GENESIS_HASH, "").event.released_fields == ("name",)
    assert re.search(r'"released_digest":"(ab)+"', body)
    assert json.loads(body)["released_fields"] == ["name"]
