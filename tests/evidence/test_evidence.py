"""Signed evidence documents end to end: a real broker issues them, the CLI verifies them
offline (every bad input with its own exit code), proves them against the audit log, rotates
the key, and prints the A4 page whose text and QR code are read back with poppler and zbar."""

from __future__ import annotations

import base64
import json
import os
import shutil
import sqlite3
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from certbroker.adapters.demo import synthetic
from certbroker.cli import client
from certbroker.cli import main as cli
from certbroker.evidence import document, jws, keys, pdf
from certbroker.evidence import verify as ev
from certbroker.v1 import audit_pb2, audit_pb2_grpc, broker_pb2
from tests import helpers
from tests.helpers import Env, make_config, running_env

CASE = "GZ20260302-000777"
TRANSFER = "BDC-ZY-001"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, dataset_dir: Path) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("evidence")
    with running_env(make_config(tmp, dataset_dir), dataset_dir) as env:
        yield env


@pytest.fixture(autouse=True)
def no_token_in_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CERTBROKER_TOKEN", raising=False)


def run(argv: Sequence[str]) -> int:
    """One CLI command in-process, as `certbroker ...` runs it."""
    return cli.main(list(argv))


def clerk(env: Env) -> str:
    return env.token(name="李敏", sub="clerk-0417")


def auditor(env: Env) -> list[str]:
    token = env.token(roles=("auditor",), sub="aud-1", office="audit-office")
    return ["--target", env.broker.target, "--token", token]


def lookup(env: Env, subject: str, record_type: str = "marriage") -> broker_pb2.LookupResponse:
    request = client.lookup_request(record_type, subject, TRANSFER, CASE, consent_reference="R-7")
    request.evidence = True
    reply: broker_pb2.LookupResponse = env.stub.Lookup(request, metadata=env.md(clerk(env)))
    return reply


def verify(env: Env, path: Path, *extra: str) -> int:
    return run(["evidence", "verify", str(path), "--state-dir", str(env.state_dir), *extra])


def stored_body(env: Env, entry_id: str) -> dict[str, Any]:
    body = helpers.stored_body(env.state_dir / "audit.sqlite", entry_id)
    assert body is not None
    return body


def payload_of(compact: str) -> dict[str, Any]:
    return jws.parse(compact).payload


def resign(compact: str, change: Any, key: Ed25519PrivateKey | None = None) -> str:
    """``compact`` with its payload changed by ``change(payload)``, signed again by ``key``
    (another key) or, without one, keeping the old signature (an edited copy)."""
    payload = payload_of(compact)
    change(payload)
    if key is not None:
        return jws.sign(payload, key, keys.jwk(key.public_key())["kid"])
    head, _, sig = compact.split(".")
    return f"{head}.{jws.b64url(jws.canonical_json(payload))}.{sig}"


@pytest.fixture(scope="module")
def single(
    env: Env, dataset_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, broker_pb2.LookupResponse]:
    seller, _ = synthetic.sample_couple(dataset_dir)
    reply = lookup(env, seller)
    path = tmp_path_factory.mktemp("single") / "evidence.jws"
    path.write_text(reply.evidence + "\n")
    return path, reply


def test_lookup_evidence_ties_the_released_record_to_its_entry(
    env: Env, single: tuple[Path, broker_pb2.LookupResponse], capsys: pytest.CaptureFixture[str]
) -> None:
    path, reply = single
    payload = payload_of(reply.evidence)
    (item,) = payload["items"]
    assert payload["entry"]["entry_id"] == reply.receipt.entry_id == item["entry"]["entry_id"]
    assert payload["clerk"] == {"sub": "clerk-0417", "name": "李敏", "office": "gz-haizhu-24h-01"}
    assert payload["matter"]["code"] == TRANSFER
    assert payload["matter"]["name"]
    assert payload["case_number"] == CASE
    assert payload["consent"]["reference"] == "R-7"
    assert item["content"] == document.record_content(reply.record)  # exactly as answered
    body = stored_body(env, reply.receipt.entry_id)
    # The log holds the salted digest and the field names, never a value or the salt.
    assert body["released_digest"] == item["content_digest"]
    assert body["released_fields"] == item["released_fields"]
    assert body["released_fields"]
    for value in item["content"].values():
        assert json.dumps(value, ensure_ascii=False).strip('"') not in json.dumps(
            body, ensure_ascii=False
        )
    assert item["salt"] not in json.dumps(body)
    assert verify(env, path) == ev.INTACT
    out = capsys.readouterr().out
    assert "INTACT" in out
    assert "not checked against the audit log" in out
    # A lookup without the flag: no evidence, and its entry has no released_* keys at all.
    plain = env.stub.Lookup(
        client.lookup_request("household", item["subject_id"], TRANSFER, CASE),
        metadata=env.md(clerk(env)),
    )
    assert plain.evidence == ""
    assert "released_digest" not in stored_body(env, plain.receipt.entry_id)


def test_prove_then_verify_against_the_signed_checkpoint(
    env: Env,
    single: tuple[Path, broker_pb2.LookupResponse],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path, _ = single
    proof = tmp_path / "proof.json"
    assert run(["evidence", "prove", str(path), "-o", str(proof), *auditor(env)]) == 0
    key = str(env.state_dir / "checkpoint-key" / "public-key.pem")
    capsys.readouterr()
    assert verify(env, path, "--proof", str(proof), "--checkpoint-key", key) == ev.INTACT
    assert "proven in the audit log" in capsys.readouterr().out
    # Embedded: one file carries the evidence and its proof.
    embedded = tmp_path / "embedded.json"
    shutil.copy(path, embedded)
    assert run(["evidence", "prove", str(embedded), "--embed", *auditor(env)]) == 0
    assert verify(env, embedded, "--checkpoint-key", key) == ev.INTACT
    # A proof of another entry does not prove this evidence.
    data = json.loads(proof.read_text())
    data["entries"][0]["body"] = data["entries"][0]["body"].replace('"seq":', '"seq": ')
    proof.write_text(json.dumps(data))
    assert verify(env, path, "--proof", str(proof), "--checkpoint-key", key) == ev.NOT_IN_LOG


def test_an_edited_copy_fails_naming_the_field(
    env: Env,
    single: tuple[Path, broker_pb2.LookupResponse],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, reply = single
    content = payload_of(reply.evidence)["items"][0]["content"]
    name = sorted(content)[0]

    def edit(payload: dict[str, Any]) -> None:
        payload["items"][0]["content"][name] = "篡改"

    edited = tmp_path / "edited.jws"
    edited.write_text(resign(reply.evidence, edit))
    capsys.readouterr()
    assert verify(env, edited) == ev.CONTENT_CHANGED
    out = capsys.readouterr().out
    assert f"field {name} changed" in out
    assert "Traceback" not in out

    def recase(payload: dict[str, Any]) -> None:
        payload["case_number"] = "GZ-OTHER"

    other_case = tmp_path / "case.jws"
    other_case.write_text(resign(reply.evidence, recase))
    assert verify(env, other_case) == ev.SIGNATURE_BAD


def test_bad_inputs_each_have_their_own_exit_code(
    env: Env,
    dataset_dir: Path,
    single: tuple[Path, broker_pb2.LookupResponse],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, reply = single
    compact = reply.evidence
    codes = {}
    truncated = tmp_path / "truncated.jws"
    truncated.write_text(compact[: len(compact) // 2])
    codes["truncated"] = verify(env, truncated)
    head, body, sig = compact.split(".")
    padded = tmp_path / "reencoded.jws"  # standard base64 with padding: not the signed text
    padded.write_text(".".join([head, base64.b64encode(jws.b64url_decode(body)).decode(), sig]))
    codes["re-encoded"] = verify(env, padded)
    other = tmp_path / "other-key.jws"
    other.write_text(resign(compact, lambda p: None, Ed25519PrivateKey.generate()))
    codes["other key"] = verify(env, other)
    qr = pdf.qr_payload(compact)
    assert qr == compact  # one lookup fits in the QR code whole
    tampered_qr = tmp_path / "qr.txt"
    tampered_qr.write_text(resign(qr, lambda p: p.update(evidence_id="0" * 32)))
    codes["tampered QR"] = verify(env, tampered_qr)
    codes["entry deleted"] = _prove_after_the_entry_is_deleted(dataset_dir, tmp_path)
    assert codes == {
        "truncated": ev.MALFORMED,
        "re-encoded": ev.MALFORMED,
        "other key": ev.UNKNOWN_KEY,
        "tampered QR": ev.SIGNATURE_BAD,
        "entry deleted": ev.NOT_IN_LOG,
    }
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"\xff\xfe{not evidence")
    assert verify(env, garbage) == ev.MALFORMED
    assert (
        run(["evidence", "verify", str(tmp_path / "missing.jws"), "--keys", str(tmp_path / "x")])
        == 2
    )
    assert "Traceback" not in capsys.readouterr().err


def _prove_after_the_entry_is_deleted(dataset_dir: Path, tmp_path: Path) -> int:
    """Evidence whose entry was then cut from the log, the log rebuilt consistent without it
    (the last entry deleted, the Merkle tree rebuilt from the rest on the next start): prove's
    exit code. A broker of its own: this log is broken on purpose."""
    cfg = make_config(tmp_path / "deleted", dataset_dir)
    seller, _ = synthetic.sample_couple(dataset_dir)
    with running_env(cfg, dataset_dir) as own:
        gone = lookup(own, seller, "household")
    evidence = tmp_path / "deleted.jws"
    evidence.write_text(gone.evidence)
    with sqlite3.connect(cfg.state_dir / "audit.sqlite") as conn:
        # The entry in whichever format it is stored (audit_entries keeps the id's bytes).
        conn.execute("DELETE FROM audit_log WHERE entry_id = ?", (gone.receipt.entry_id,))
        entry_id = bytes.fromhex(gone.receipt.entry_id)
        conn.execute("DELETE FROM audit_entries WHERE entry_id = ?", (entry_id,))
        conn.execute("DELETE FROM merkle_nodes")
        conn.execute("DELETE FROM merkle_state")
    with running_env(cfg, dataset_dir) as own:
        return run(["evidence", "prove", str(evidence), *auditor(own)])


def test_bundle_evidence_covers_every_released_item_and_the_report_uses_the_names(
    env: Env, dataset_dir: Path, tmp_path: Path
) -> None:
    seller, spouse = synthetic.sample_couple(dataset_dir)
    request = client.lookup_matter_request(
        TRANSFER, CASE, [(seller, "seller"), (spouse, "co_owner")], "id_card_read", "R-8"
    )
    request.evidence = True
    reply = env.stub.LookupMatter(request, metadata=env.md(clerk(env)))
    payload = payload_of(reply.evidence)
    answered = [i for i in reply.items if i.WhichOneof("result") == "response"]
    assert len(payload["items"]) == len(answered) >= 4
    assert payload["kind"] == "bundle"
    assert payload["entry"]["entry_id"] == reply.receipt.entry_id
    assert payload["bundle_id"] == reply.bundle_id
    for item, answer in zip(payload["items"], answered, strict=True):
        assert item["entry"]["entry_id"] == answer.response.receipt.entry_id
        assert (
            stored_body(env, answer.response.receipt.entry_id)["released_digest"]
            == item["content_digest"]
        )
    path = tmp_path / "bundle.jws"
    path.write_text(reply.evidence)
    assert verify(env, path) == ev.INTACT
    # The citizen report lists exactly the recorded field names.
    stub = audit_pb2_grpc.AuditStub(env.channel)
    token = env.token(roles=("auditor",), sub="aud-1", office="audit-office")
    report = stub.CitizenReport(
        audit_pb2.CitizenReportRequest(subject_id=spouse), metadata=env.md(token)
    )
    recorded = {i["entry"]["entry_id"]: i["released_fields"] for i in payload["items"]}
    shown = {a.entry_id: list(a.fields) for a in report.accesses if a.entry_id in recorded}
    assert shown
    assert all(shown[k] == recorded[k] for k in shown)


def test_rotation_keeps_old_evidence_verifiable(
    env: Env, single: tuple[Path, broker_pb2.LookupResponse], dataset_dir: Path, tmp_path: Path
) -> None:
    path, reply = single
    old_kid = jws.parse(reply.evidence).kid
    for _ in range(2):
        assert run(["keys", "rotate", "--evidence", "--state-dir", str(env.state_dir)]) == 0
    assert env.broker.broker is not None
    env.broker.call(env.broker.broker.reload_now())  # as on SIGHUP
    seller, _ = synthetic.sample_couple(dataset_dir)
    new = lookup(env, seller, "household")
    new_kid = jws.parse(new.evidence).kid
    assert new_kid != old_kid
    jwks = tmp_path / "jwks.json"
    assert run(["evidence", "keys", "-o", str(jwks), *auditor(env)]) == 0
    published = keys.public_keys(jwks.read_bytes())
    assert {old_kid, new_kid} <= set(published)
    assert len(published) >= 3
    fresh = tmp_path / "new.jws"
    fresh.write_text(new.evidence)
    for evidence in (path, fresh):
        assert verify(env, evidence, "--keys", str(jwks)) == ev.INTACT


def _need(tool: str) -> str:
    found = shutil.which(tool)
    if found is None:
        message = f"{tool} is not installed (apt-get install poppler-utils zbar-tools)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return found


def _render(compact: str, tmp_path: Path) -> tuple[str, list[str]]:
    """(pdftotext's text, zbarimg's decoded QR codes) of the page ``evidence pdf`` writes."""
    source = tmp_path / "evidence.jws"
    source.write_text(compact)
    out = tmp_path / "调取凭证.pdf"
    assert run(["evidence", "pdf", str(source), "-o", str(out)]) == 0
    text = subprocess.run(
        [_need("pdftotext"), "-layout", str(out), "-"], capture_output=True, text=True, check=True
    ).stdout
    subprocess.run(
        [_need("pdftoppm"), "-r", "150", "-png", str(out), str(tmp_path / "page")], check=True
    )
    codes = []
    for page in sorted(tmp_path.glob("page*.png")):
        scan = subprocess.run(
            [_need("zbarimg"), "--raw", "-q", str(page)],
            capture_output=True,
            text=True,
            check=False,
        )
        codes += [line for line in scan.stdout.splitlines() if line]
    return text, codes


def test_pdf_page_reads_back_in_chinese_with_a_verifiable_qr_code(
    env: Env, single: tuple[Path, broker_pb2.LookupResponse], tmp_path: Path
) -> None:
    _, reply = single
    payload = payload_of(reply.evidence)
    text, codes = _render(reply.evidence, tmp_path)
    for label in ("数据调取凭证", "经办人", "办件号", "办理事项", "审计回执", "婚姻", "李敏", CASE):
        assert label in text, label
    item = payload["items"][0]
    assert ev.mask_id(item["subject_id"]) in text
    assert item["subject_id"] not in text
    value = next(v for v in item["content"].values() if isinstance(v, str) and len(v) > 1)
    assert value in text
    assert codes == [reply.evidence]  # the whole evidence, verifiable from a scan alone
    scanned = tmp_path / "scanned.jws"
    scanned.write_text(codes[0])
    assert verify(env, scanned) == ev.INTACT


def test_bundle_pdf_qr_carries_the_summary(env: Env, dataset_dir: Path, tmp_path: Path) -> None:
    seller, spouse = synthetic.sample_couple(dataset_dir)
    request = client.lookup_matter_request(
        TRANSFER, CASE, [(seller, "seller"), (spouse, "co_owner")], "id_card_read", ""
    )
    request.evidence = True
    reply = env.stub.LookupMatter(request, metadata=env.md(clerk(env)))
    _, codes = _render(reply.evidence, tmp_path)
    assert codes == [pdf.qr_summary(reply.evidence)]
    path = tmp_path / "evidence.jws"  # written by _render
    assert verify(env, path, "--qr", codes[0]) == ev.INTACT
    assert verify(env, path, "--qr", codes[0].replace(":", ";", 1)) == ev.SIGNATURE_BAD
