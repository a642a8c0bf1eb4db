"""The Audit service's checkpoint, proof and export RPCs on a real broker, verified client-side
with the checkpoint public key and certbroker.audit.integrity.merkle only."""

from __future__ import annotations

import asyncio
import hashlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from certbroker import audit
from certbroker.adapters.demo import synthetic
from certbroker.audit.events import AuditEvent
from certbroker.audit.export import export, verify_export
from certbroker.audit.integrity import checkpoint, merkle
from certbroker.audit.integrity.proofs import KEY_NAME, ORIGIN
from certbroker.audit.service.proofs import CHUNK_SIZE, export_chunks
from certbroker.audit.verify.report import EDITED
from certbroker.cli import client
from certbroker.v1 import audit_pb2, audit_pb2_grpc, broker_pb2
from tests.helpers import Env, make_config, running_env, stored_rows

CASE = "GZ20260302-000001"


@pytest.fixture
def penv(tmp_path: Path, dataset_dir: Path) -> Iterator[Env]:
    """A broker that signs checkpoints only on demand (no periodic one during a test)."""
    cfg = make_config(tmp_path, dataset_dir, checkpoint_interval_s=3600.0)
    with running_env(cfg, dataset_dir) as env:
        yield env


def stub(env: Env) -> audit_pb2_grpc.AuditStub:
    return audit_pb2_grpc.AuditStub(env.channel)


def auditor(env: Env) -> Any:
    return env.md(env.token(roles=("auditor",), sub="aud-1", office="audit-office"))


def lookup(env: Env, record_type: str = "marriage") -> broker_pb2.LookupResponse:
    subject, _ = synthetic.sample_couple(env.dataset_dir)
    request = client.lookup_request(record_type, subject, "BDC-ZY-001", CASE)
    response: broker_pb2.LookupResponse = env.stub.Lookup(
        request, metadata=env.md(env.token()), timeout=30
    )
    return response


def fresh(env: Env) -> tuple[audit_pb2.Checkpoint, checkpoint.Checkpoint]:
    """A checkpoint signed now, and what its note says once its signature verifies."""
    head = stub(env).GetCheckpoint(
        audit_pb2.GetCheckpointRequest(fresh=True), metadata=auditor(env), timeout=30
    )
    return head, signed(env, head)


def signed(env: Env, head: audit_pb2.Checkpoint) -> checkpoint.Checkpoint:
    opened = checkpoint.open_note(head.note, public_key(env), KEY_NAME, origin=ORIGIN)
    assert (opened.size, opened.root_hash) == (head.size, head.root_hash)
    assert head.time.ToDatetime().replace(microsecond=0) == opened.time.replace(
        microsecond=0, tzinfo=None
    )
    return opened


def public_key(env: Env) -> Any:
    return checkpoint.load_public_key(env.state_dir / "checkpoint-key" / "public-key.pem")


def stored(env: Env, sequence: int) -> tuple[str, str]:
    """(body as hashed, prev_hash) of an entry, read from the SQLite file itself."""
    (row,) = [r for r in stored_rows(env.state_dir / "audit.sqlite") if r.seq == sequence]
    return row.body, row.prev_hash


def last_entry(env: Env) -> audit.AuditEntry:
    return audit.query(env.state_dir / "audit.sqlite", audit.QueryFilter(limit=1))[-1]


def test_a_lookup_receipt_is_proven_in_a_signed_checkpoint(penv: Env) -> None:
    receipts = [lookup(penv, rt).receipt for rt in ("marriage", "household", "marriage")]
    receipt = receipts[1]
    head, cp = fresh(penv)
    assert head.size >= 3
    proof = stub(penv).GetInclusionProof(
        audit_pb2.InclusionProofRequest(entry_id=receipt.entry_id, tree_size=head.size),
        metadata=auditor(penv),
        timeout=30,
    )
    assert (proof.leaf_index, proof.tree_size) == (receipt.sequence - 1, head.size)
    assert proof.hashes
    # The proven leaf is the receipt's entry: its body hashes to the leaf and to the receipt.
    body, prev = stored(penv, receipt.sequence)
    assert proof.leaf_hash == hashlib.sha256(b"\x00" + body.encode()).digest()
    assert hashlib.sha256((prev + body).encode()).hexdigest() == receipt.entry_hash
    assert merkle.verify_inclusion(
        proof.leaf_hash, proof.leaf_index, proof.tree_size, list(proof.hashes), cp.root_hash
    )
    bent = bytes([proof.leaf_hash[0] ^ 1]) + proof.leaf_hash[1:]
    assert not merkle.verify_inclusion(
        bent, proof.leaf_index, proof.tree_size, list(proof.hashes), cp.root_hash
    )
    entry = last_entry(penv)
    assert (entry.event.rule_id, entry.event.outcome) == ("audit.get_inclusion_proof", "OK")
    assert entry.event.decision_id.split(";") == [
        f"entry_id={receipt.entry_id}",
        f"tree_size={head.size}",
        f"sequence={receipt.sequence}",
    ]
    # By sequence, with tree_size 0 = the latest checkpoint: the same proof.
    by_sequence = stub(penv).GetInclusionProof(
        audit_pb2.InclusionProofRequest(sequence=receipt.sequence),
        metadata=auditor(penv),
        timeout=30,
    )
    assert by_sequence == proof
    summary = last_entry(penv).event.decision_id.split(";")
    assert summary == [f"sequence={receipt.sequence}", f"tree_size={head.size}"]


def test_later_checkpoint_is_consistent_with_an_earlier_one(penv: Env) -> None:
    lookup(penv)
    lookup(penv, "household")
    old_head, old = fresh(penv)
    for _ in range(3):
        lookup(penv)
    new_head, new = fresh(penv)
    assert new.size > old.size
    latest = stub(penv).GetCheckpoint(
        audit_pb2.GetCheckpointRequest(), metadata=auditor(penv), timeout=30
    )
    assert latest == new_head
    proof = stub(penv).GetConsistencyProof(
        audit_pb2.ConsistencyProofRequest(old_size=old.size, new_size=new.size),
        metadata=auditor(penv),
        timeout=30,
    )
    assert (proof.old_size, proof.new_size) == (old.size, new.size)
    hashes = list(proof.hashes)
    assert merkle.verify_consistency(old.size, new.size, old.root_hash, new.root_hash, hashes)
    assert not merkle.verify_consistency(old.size, new.size, new.root_hash, old.root_hash, hashes)
    to_latest = stub(penv).GetConsistencyProof(
        audit_pb2.ConsistencyProofRequest(old_size=old.size),
        metadata=auditor(penv),
        timeout=30,
    )
    assert to_latest == proof
    assert old_head.size == old.size


def test_without_a_checkpoint_defaults_are_not_found(penv: Env) -> None:
    lookup(penv)
    calls: list[Any] = [
        lambda s, md: s.GetCheckpoint(audit_pb2.GetCheckpointRequest(), metadata=md),
        lambda s, md: s.GetInclusionProof(audit_pb2.InclusionProofRequest(sequence=1), metadata=md),
        lambda s, md: s.GetConsistencyProof(audit_pb2.ConsistencyProofRequest(), metadata=md),
        lambda s, md: list(s.Export(audit_pb2.ExportRequest(), metadata=md)),
    ]
    for call in calls:
        with pytest.raises(grpc.RpcError) as info:
            call(stub(penv), auditor(penv))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        error = client.call_error(info.value)
        assert error.reason == "NO_CHECKPOINT"
        entry = last_entry(penv)
        assert (entry.event.outcome, entry.event.status) == ("NO_CHECKPOINT", "NOT_FOUND")
        assert error.metadata["audit_entry_id"] == entry.entry_id
    # Explicit sizes need no checkpoint.
    proof = stub(penv).GetInclusionProof(
        audit_pb2.InclusionProofRequest(sequence=1, tree_size=1), metadata=auditor(penv)
    )
    assert (proof.leaf_index, proof.tree_size, list(proof.hashes)) == (0, 1, [])


def test_export_streams_chunks_that_verify_offline(penv: Env, tmp_path: Path) -> None:
    lookup(penv)
    assert penv.broker.broker is not None
    events = [_event(clerk=f"clerk-{i:03d}") for i in range(400)]
    penv.broker.call(penv.broker.broker.audit.append_many(events))
    head, _ = fresh(penv)
    chunks = [
        c.data
        for c in stub(penv).Export(audit_pb2.ExportRequest(), metadata=auditor(penv), timeout=60)
    ]
    assert len(chunks) >= 3
    assert all(len(c) == CHUNK_SIZE for c in chunks[:-1])
    whole = tmp_path / "export.jsonl"
    whole.write_bytes(b"".join(chunks))
    report = verify_export(whole, public_key(penv))
    assert report.ok, report.problem
    assert (report.entries, report.checkpoints) == (head.size, 1)
    entry = last_entry(penv)
    assert entry.event.rule_id == "audit.export"
    assert entry.event.decision_id.split(";")[-2:] == ["from=1", f"to={head.size}"]
    # A segment verifies too; an edited one does not.
    segment = b"".join(
        c.data
        for c in stub(penv).Export(
            audit_pb2.ExportRequest(from_sequence=100, to_sequence=head.size),
            metadata=auditor(penv),
            timeout=60,
        )
    )
    part = tmp_path / "segment.jsonl"
    part.write_bytes(segment)
    assert verify_export(part, public_key(penv)).ok
    assert segment.count(b"\n") == head.size - 100 + 2
    part.write_bytes(segment.replace(b'"clerk":"clerk-200"', b'"clerk":"clerk-999"', 1))
    edited = verify_export(part, public_key(penv))
    assert edited.code == EDITED


def _event(**overrides: Any) -> AuditEvent:
    fields: dict[str, Any] = {
        "kind": "lookup",
        "clerk": "clerk-001",
        "office": "gz-tianhe-hall-01",
        "roles": ("window_clerk",),
        "subject_id": "110101199003077774",
        "matter_code": "BDC-ZY-001",
        "case_number": CASE,
        "consent_method": "id_card_read",
        "record_type": "marriage",
        "decision": "allow",
        "rule_id": "window-clerk-hall",
        "withheld_fields": ("certificate_number",),
        "outcome": "OK",
        "status": "OK",
        "policy_version": "v" * 64,
        "department": "civil_affairs",
        "latency_ms": 1.0,
        "decision_id": "d" * 32,
    }
    fields.update(overrides)
    return AuditEvent(**fields)


BAD: list[tuple[str, str, Any]] = [
    ("BAD_SEQUENCE", "get_inclusion_proof", audit_pb2.InclusionProofRequest()),
    ("BAD_SEQUENCE", "get_inclusion_proof", audit_pb2.InclusionProofRequest(sequence=-3)),
    ("BAD_SEQUENCE", "get_inclusion_proof", audit_pb2.InclusionProofRequest(sequence=10**6)),
    (
        "BAD_SEQUENCE",
        "get_inclusion_proof",
        audit_pb2.InclusionProofRequest(sequence=3, tree_size=2),
    ),
    (
        "BAD_TREE_SIZE",
        "get_inclusion_proof",
        audit_pb2.InclusionProofRequest(sequence=1, tree_size=10**6),
    ),
    (
        "BAD_TREE_SIZE",
        "get_inclusion_proof",
        audit_pb2.InclusionProofRequest(sequence=1, tree_size=-1),
    ),
    ("BAD_ENTRY_ID", "get_inclusion_proof", audit_pb2.InclusionProofRequest(entry_id="x\x1b")),
    (
        "ENTRY_NOT_FOUND",
        "get_inclusion_proof",
        audit_pb2.InclusionProofRequest(entry_id="0" * 32),
    ),
    (
        "AMBIGUOUS_ENTRY",
        "get_inclusion_proof",
        audit_pb2.InclusionProofRequest(entry_id="0" * 32, sequence=1),
    ),
    (
        "BAD_SIZE_RANGE",
        "get_consistency_proof",
        audit_pb2.ConsistencyProofRequest(old_size=3, new_size=2),
    ),
    (
        "BAD_SIZE_RANGE",
        "get_consistency_proof",
        audit_pb2.ConsistencyProofRequest(old_size=10**6),
    ),
    ("BAD_TREE_SIZE", "get_consistency_proof", audit_pb2.ConsistencyProofRequest(old_size=-1)),
    (
        "BAD_TREE_SIZE",
        "get_consistency_proof",
        audit_pb2.ConsistencyProofRequest(new_size=10**6),
    ),
    ("BAD_SEQUENCE_RANGE", "export", audit_pb2.ExportRequest(from_sequence=3, to_sequence=2)),
    ("BAD_SEQUENCE_RANGE", "export", audit_pb2.ExportRequest(to_sequence=10**6)),
    ("BAD_SEQUENCE_RANGE", "export", audit_pb2.ExportRequest(from_sequence=-1)),
    ("BAD_SEQUENCE_RANGE", "export", audit_pb2.ExportRequest(from_sequence=10**6)),
]
METHODS = {
    "get_inclusion_proof": "GetInclusionProof",
    "get_consistency_proof": "GetConsistencyProof",
    "export": "Export",
}


def test_bad_arguments_are_refused_with_a_reason_and_audited(penv: Env) -> None:
    for _ in range(3):
        lookup(penv)
    fresh(penv)
    for reason, rpc, request in BAD:
        method = getattr(stub(penv), METHODS[rpc])

        def call(method: Any = method, request: Any = request, rpc: str = rpc) -> None:
            reply = method(request, metadata=auditor(penv), timeout=30)
            if rpc == "export":
                list(reply)  # a streaming call fails when read

        with pytest.raises(grpc.RpcError) as info:
            call()
        not_found = reason.endswith("NOT_FOUND")
        expected = grpc.StatusCode.NOT_FOUND if not_found else grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.code() == expected, (reason, request)
        error = client.call_error(info.value)
        assert error.reason == reason, request
        entry = last_entry(penv)
        assert (entry.event.rule_id, entry.event.outcome) == (f"audit.{rpc}", reason)
        assert (entry.event.clerk, entry.event.decision) == ("aud-1", "")
        assert error.metadata["audit_entry_id"] == entry.entry_id
        assert "\x1b" not in entry.event.decision_id


def test_export_chunks_equal_the_export_and_stop_when_abandoned(tmp_path: Path) -> None:
    db = tmp_path / "audit.sqlite"

    async def main() -> None:
        async with audit.SQLiteAuditLog(db) as log:
            await log.append_many([_event(clerk=f"c{i}") for i in range(50)])
        expected = io.BytesIO()
        export(db, expected, 2, 40)
        got = [c async for c in export_chunks(db, 2, 40, chunk_size=1000, ahead=1)]
        assert b"".join(got) == expected.getvalue()
        assert [len(c) for c in got[:-1]] == [1000] * (len(got) - 1)
        assert len(got) > 3
        # A client that goes away after one chunk: the export thread must stop (if it kept
        # waiting for a slot, asyncio.run would never finish shutting its executor down).
        stream = export_chunks(db, 1, 50, chunk_size=100, ahead=1)
        assert len(await anext(stream)) == 100
        await stream.aclose()

    asyncio.run(main())
