"""Issue 18 end to end: a real broker's log written in entry format 1, then (the broker
restarted) in format 2, then archived across the switch. Everything that reads the log reads
it as one log, through its public surfaces only: the Audit service (Query, CitizenReport,
Anomalies, Overview -- what the console shows --, checkpoints, inclusion and consistency
proofs, Export), the Citizen service (MyAccesses, Dispute), ``certbroker audit verify
[--with-archives]`` and ``stats``, and ``certbroker evidence prove`` / ``verify`` of evidence
whose entry is in either format.

The log, on the broker's audit clock (:class:`~tests.helpers.FakeClock`):

==================  ======  =============================================================
time                format  entries
==================  ======  =============================================================
``OLD``             1       a subject's lookups (one with evidence) and denials
``OLD`` + 1 min     2       the same again after the restart (the denials: one burst)
``OLD`` + 2 min     2       ``BULK`` entries through the broker's log (past sequence 64)
``RECENT``          2       the same lookups again (one with evidence)
==================  ======  =============================================================

Archiving the entries older than ``CUTOFF_DAYS`` moves every format 1 entry and the first
format 2 ones (the cut on a multiple of 32) to an archive file; the broker keeps running.
Afterwards the citizen's readers (CitizenReport, MyAccesses, Dispute) read the archived
accesses from the archive file and then the live ones, and name an archive file they could not
use (missing, changed) instead of using it; Query and Anomalies read the live remainder; proofs
reach the archived entries by sequence (their nodes kept, or rebuilt from the archive file),
evidence proven while its entry was live still verifies, and ``evidence prove`` proves it again
from the archive file the broker reads (not from a changed one); an archived entry is not found
by its id in the proof RPC (that lookup is live only: the client asks by sequence).
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest

from certbroker.adapters.demo import synthetic
from certbroker.audit.anomalies import CITIZEN_DISPUTE, DENIAL_BURST
from certbroker.audit.export import verify_export
from certbroker.audit.integrity import checkpoint, merkle
from certbroker.audit.integrity.proofs import KEY_NAME, ORIGIN
from certbroker.audit.verify.report import OK
from certbroker.cli import client
from certbroker.cli import main as cli
from certbroker.evidence import verify as ev
from certbroker.v1 import audit_pb2, audit_pb2_grpc, broker_pb2, citizen_pb2, citizen_pb2_grpc
from tests.audit.test_audit import make_event
from tests.helpers import DEFAULT_OFFICE, Env, FakeClock, make_config, running_env

DAY = 86_400.0
NOW = time.time()
OLD = NOW - 30 * DAY
RECENT = NOW - 1 * DAY
CUTOFF_DAYS = 10
TRANSFER = "BDC-ZY-001"
CASE = "GZ20260302-000918"
CLERK = "clerk-0918"
BULK = 60


def run(argv: Sequence[str]) -> tuple[int, str]:
    """A ``certbroker`` command in-process: (exit code, stdout)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(list(argv))
    return code, out.getvalue()


# --- the clerk's side ------------------------------------------------------------------------


def lookup(env: Env, record_type: str, subject: str, *, evidence: bool = False) -> Any:
    """One Lookup by the scenario's clerk: the reply, or the audit entry id of its refusal."""
    request = client.lookup_request(record_type, subject, TRANSFER, CASE)
    request.evidence = evidence
    token = env.token(name="王芳", sub=CLERK)
    try:
        return env.stub.Lookup(request, metadata=env.md(token), timeout=30)
    except grpc.RpcError as exc:
        return str(client.call_error(exc).metadata["audit_entry_id"])


def accesses(env: Env, subject: str) -> tuple[list[str], broker_pb2.LookupResponse]:
    """Two allowed lookups of ``subject`` (the first with evidence) and three denials (a
    record this matter does not need): their entry ids, and the reply carrying evidence."""
    first = lookup(env, "marriage", subject, evidence=True)
    second = lookup(env, "household", subject)
    denied = [lookup(env, "social_security", subject) for _ in range(3)]
    assert isinstance(first, broker_pb2.LookupResponse)
    assert isinstance(second, broker_pb2.LookupResponse)
    assert first.evidence
    assert all(isinstance(d, str) for d in denied), denied
    return [first.receipt.entry_id, second.receipt.entry_id, *denied], first


# --- the auditor's and the citizen's side ----------------------------------------------------


def auditor(env: Env) -> str:
    return env.token(roles=("auditor",), sub="aud-18", office="audit-office")


def audit_stub(env: Env) -> audit_pb2_grpc.AuditStub:
    return audit_pb2_grpc.AuditStub(env.channel)


def query(env: Env, **fields: Any) -> list[audit_pb2.AuditEntry]:
    request = audit_pb2.QueryRequest(page_size=1000, **fields)
    return list(audit_stub(env).Query(request, metadata=env.md(auditor(env)), timeout=30))


def citizen_report_reply(env: Env, subject: str) -> audit_pb2.CitizenReportResponse:
    request = audit_pb2.CitizenReportRequest(subject_id=subject)
    reply: audit_pb2.CitizenReportResponse = audit_stub(env).CitizenReport(
        request, metadata=env.md(auditor(env)), timeout=30
    )
    return reply


def citizen_report(env: Env, subject: str) -> list[str]:
    """The entry ids of the citizen report, in its order, once it says nothing was left out."""
    reply = citizen_report_reply(env, subject)
    assert not reply.unsearched, reply.unsearched
    return [a.entry_id for a in reply.accesses]


def anomalies(env: Env) -> list[audit_pb2.Finding]:
    request = audit_pb2.AnomaliesRequest()
    return list(audit_stub(env).Anomalies(request, metadata=env.md(auditor(env))).findings)


def overview(env: Env) -> tuple[int, int]:
    """The console's counts of the clerk's hall over the whole scenario: (allowed, denied)."""
    time = audit_pb2.TimeRange()
    time.since.FromSeconds(int(OLD - DAY))
    time.until.FromSeconds(int(NOW + DAY))
    request = audit_pb2.OverviewRequest(time=time, office=DEFAULT_OFFICE)
    reply = audit_stub(env).Overview(request, metadata=env.md(auditor(env)), timeout=30)
    return sum(h.allowed for h in reply.hours), sum(h.denied for h in reply.hours)


def citizen_stub(env: Env) -> citizen_pb2_grpc.CitizenStub:
    return citizen_pb2_grpc.CitizenStub(env.channel)


def my_accesses_reply(env: Env, subject: str) -> citizen_pb2.MyAccessesResponse:
    reply: citizen_pb2.MyAccessesResponse = citizen_stub(env).MyAccesses(
        citizen_pb2.MyAccessesRequest(page_size=1000),
        metadata=env.md(env.idp.issue_citizen(subject)),
        timeout=30,
    )
    return reply


def my_accesses(env: Env, subject: str) -> dict[str, bool]:
    """The citizen's own accesses, in order: entry id -> disputed; nothing left out."""
    reply = my_accesses_reply(env, subject)
    assert not reply.unsearched, reply.unsearched
    return {a.entry_id: a.disputed for a in reply.accesses}


def dispute(env: Env, subject: str, entry_id: str) -> None:
    citizen_stub(env).Dispute(
        citizen_pb2.DisputeRequest(entry_id=entry_id, text="不是我办的"),
        metadata=env.md(env.idp.issue_citizen(subject)),
        timeout=30,
    )


def checkpoint_key(env: Env) -> Path:
    return env.state_dir / "checkpoint-key" / "public-key.pem"


def fresh_head(env: Env) -> checkpoint.Checkpoint:
    """A checkpoint signed now, once its signature verifies."""
    head = audit_stub(env).GetCheckpoint(
        audit_pb2.GetCheckpointRequest(fresh=True), metadata=env.md(auditor(env)), timeout=30
    )
    key = checkpoint.load_public_key(checkpoint_key(env))
    return checkpoint.open_note(head.note, key, KEY_NAME, origin=ORIGIN)


def proven(env: Env, head: checkpoint.Checkpoint, **request: Any) -> int:
    """The sequence of an entry (by ``entry_id`` or ``sequence``) whose inclusion proof in
    ``head`` verifies."""
    proof = audit_stub(env).GetInclusionProof(
        audit_pb2.InclusionProofRequest(tree_size=head.size, **request),
        metadata=env.md(auditor(env)),
        timeout=30,
    )
    assert merkle.verify_inclusion(
        proof.leaf_hash, proof.leaf_index, head.size, list(proof.hashes), head.root_hash
    ), request
    return int(proof.leaf_index) + 1


def consistent(env: Env, old: checkpoint.Checkpoint, new: checkpoint.Checkpoint) -> bool:
    proof = audit_stub(env).GetConsistencyProof(
        audit_pb2.ConsistencyProofRequest(old_size=old.size, new_size=new.size),
        metadata=env.md(auditor(env)),
        timeout=30,
    )
    hashes = list(proof.hashes)
    return merkle.verify_consistency(old.size, new.size, old.root_hash, new.root_hash, hashes)


def exported(env: Env, path: Path, first: int = 0) -> Path:
    """The service's export from ``first`` (0: the live log's start) to the latest checkpoint,
    once it verifies offline with the checkpoint key; its bodies' versions."""
    chunks = audit_stub(env).Export(
        audit_pb2.ExportRequest(from_sequence=first), metadata=env.md(auditor(env)), timeout=60
    )
    path.write_bytes(b"".join(c.data for c in chunks))
    report = verify_export(path, checkpoint.load_public_key(checkpoint_key(env)))
    assert report.code == OK, report
    return path


def versions(export: Path) -> set[int]:
    return {json.loads(line)["body"]["v"] for line in export.read_bytes().splitlines()[1:]}


def prove(env: Env, reply: broker_pb2.LookupResponse, tmp: Path, name: str) -> tuple[Path, Path]:
    """``certbroker evidence prove``: the evidence file and the proof fetched for it."""
    path = tmp / f"{name}.jws"
    path.write_text(reply.evidence + "\n")
    proof = tmp / f"{name}.proof.json"
    target = ["--target", env.broker.target, "--token", auditor(env)]
    code, out = run(["evidence", "prove", str(path), "-o", str(proof), *target])
    assert code == 0, out
    return path, proof


def verify_evidence(env: Env, files: tuple[Path, Path]) -> int:
    """``certbroker evidence verify`` of an evidence file with its proof: the exit code."""
    path, proof = files
    key = checkpoint_key(env)
    argv = ["evidence", "verify", str(path), "--state-dir", str(env.state_dir)]
    code, out = run([*argv, "--proof", str(proof), "--checkpoint-key", str(key)])
    assert (code == ev.INTACT) == ("proven in the audit log" in out), out
    return code


def audit_cli(env: Env, command: str, *extra: str) -> tuple[int, dict[str, Any]]:
    """``certbroker audit verify|stats ... --json`` on the broker's state directory."""
    code, out = run(["audit", command, "--state-dir", str(env.state_dir), *extra, "--json"])
    answer: dict[str, Any] = json.loads(out)
    return code, answer


# --- the scenario ----------------------------------------------------------------------------


def test_every_reader_reads_a_log_of_both_formats_live_and_archived(
    tmp_path: Path, dataset_dir: Path
) -> None:
    subject, spouse = synthetic.sample_couple(dataset_dir)
    clock = FakeClock(OLD)
    # Checkpoints and archives only when the test asks (no periodic task during the test).
    cfg1 = make_config(tmp_path, dataset_dir, audit_entry_format=1, checkpoint_interval_s=3600.0)
    with running_env(cfg1, dataset_dir, audit_clock=clock) as env:
        v1_ids, v1_reply = accesses(env, subject)
        lookup(env, "marriage", spouse)
        head_v1 = fresh_head(env)  # a tree of format 1 entries only
        code, stats = audit_cli(env, "stats")
        last_v1 = stats["live_v1"]  # the checkpoint's call is an entry too
        assert (code, last_v1) == (0, head_v1.size + 1)
    clock.advance(60)
    cfg2 = make_config(tmp_path, dataset_dir, audit_entry_format=2, checkpoint_interval_s=3600.0)
    with running_env(cfg2, dataset_dir, audit_clock=clock) as env:
        v2_old_ids, v2_old_reply = accesses(env, subject)
        clock.advance(60)
        assert env.broker.broker is not None
        bulk = [make_event(clerk=f"clerk-bulk-{i % 4}") for i in range(BULK)]
        env.broker.call(env.broker.broker.audit.append_many(bulk))
        clock.now = RECENT
        v2_new_ids, v2_new_reply = accesses(env, subject)
        lookup(env, "household", spouse)
        mine = {*v1_ids, *v2_old_ids, *v2_new_ids}

        # --- the live log holds both formats --------------------------------------------------
        code, stats = audit_cli(env, "stats")
        assert code == 0
        assert stats["live_v1"] == last_v1
        assert stats["live_v2"] > 0
        assert stats["archived"] == 0
        code, verdict = audit_cli(env, "verify")
        assert (code, verdict["ok"]) == (OK, True), verdict
        head = fresh_head(env)
        assert versions(exported(env, tmp_path / "whole.jsonl")) == {1, 2}

        # Query, the citizen report, the citizen's own view: every access, in both formats.
        found = query(env, subject_id=subject)
        assert {e.entry_id for e in found} >= mine
        assert all(e.subject_id == subject for e in found)
        denials = query(env, clerk=CLERK, decision="deny")
        assert {e.entry_id for e in denials} >= {*v1_ids[2:], *v2_old_ids[2:], *v2_new_ids[2:]}
        assert set(citizen_report(env, subject)) == mine
        # The citizen disputes an access written in format 1; the dispute is in format 2.
        dispute(env, subject, v1_ids[1])
        assert my_accesses(env, subject) == {i: i == v1_ids[1] for i in mine}
        # The console's overview counts the hall's lookups of both formats (3 allowed and 3
        # denied per round, and the spouse's two).
        assert overview(env) == (8, 9)
        # Inclusion proofs of entries in either format, by entry id; consistency across.
        sequences = {i: proven(env, head, entry_id=i) for i in sorted(mine)}
        assert {s <= last_v1 for s in sequences.values()} == {True, False}
        assert consistent(env, head_v1, head)
        # Anomalies: one denial burst across the restart, the denials of both formats in it;
        # the citizen's dispute, naming the format 1 entry.
        denied = {sequences[i] for i in (*v1_ids[2:], *v2_old_ids[2:])}
        findings = anomalies(env)
        bursts = [f for f in findings if f.rule == DENIAL_BURST and f.clerk == CLERK]
        assert [f for f in bursts if denied <= set(f.sequences)], bursts
        disputes = [f for f in findings if f.rule == CITIZEN_DISPUTE]
        assert [f for f in disputes if sequences[v1_ids[1]] in f.sequences], disputes
        # Evidence proven against the log, its entry in format 1 and in format 2.
        evidence = {
            "v1": prove(env, v1_reply, tmp_path, "v1"),
            "v2-old": prove(env, v2_old_reply, tmp_path, "v2-old"),
            "v2-new": prove(env, v2_new_reply, tmp_path, "v2-new"),
        }
        for files in evidence.values():
            assert verify_evidence(env, files) == ev.INTACT
        proven_bodies = {
            name: json.loads(files[1].read_text())["entries"][0]["body"]
            for name, files in evidence.items()
        }
        assert {name: json.loads(body)["v"] for name, body in proven_bodies.items()} == {
            "v1": 1,
            "v2-old": 2,
            "v2-new": 2,
        }

        # --- archived across the switch, the broker running -----------------------------------
        archive = cfg2.archive_directory  # where the broker looks for its archive files
        code, out = run(
            ["audit", "archive", "--state-dir", str(env.state_dir), "--dir", str(archive),
             "--older-than-days", str(CUTOFF_DAYS)]
        )  # fmt: skip
        assert code == 0, out
        code, stats = audit_cli(env, "stats", "--dir", str(archive))
        last_archived = stats["archived"]
        assert last_archived > last_v1  # every format 1 entry, and format 2 ones
        assert last_archived % 32 == 0
        assert stats["live_v1"] == 0
        assert (
            max(sequences[i] for i in v2_old_ids)
            <= last_archived
            < min(sequences[i] for i in v2_new_ids)
        )
        code, verdict = audit_cli(env, "verify", "--with-archives", str(archive))
        assert (code, verdict["ok"]) == (OK, True), verdict
        code, verdict = audit_cli(env, "verify")  # the live remainder alone
        assert (code, verdict["ok"]) == (OK, True), verdict
        (segment,) = archive.glob("audit-*.jsonl")
        assert versions(segment) == {1, 2}

        # The citizen's readers read the archived accesses, then the live ones, oldest first;
        # an archived access can still be disputed. Query reads what is live.
        live = {i for i in mine if sequences[i] > last_archived}
        assert live == set(v2_new_ids)
        in_order = sorted(mine, key=lambda i: sequences[i])
        assert citizen_report(env, subject) == in_order
        dispute(env, subject, v2_old_ids[0])  # archived, written in format 2
        seen = my_accesses(env, subject)
        assert list(seen) == in_order
        assert seen == {i: i in (v1_ids[1], v2_old_ids[0]) for i in mine}
        lookups = [e for e in query(env, subject_id=subject) if e.kind == "lookup"]
        assert {e.entry_id for e in lookups} == live
        anomalies(env)  # reads the live remainder without error
        # An archive file changed by one byte (here: an access's clerk) is never used: the
        # readers answer with the rest and name the range they could not search.
        original = segment.read_bytes()
        assert original.count(CLERK.encode()) > 0
        segment.write_bytes(original.replace(CLERK.encode(), b"clerk-0919", 1))
        for reply in (citizen_report_reply(env, subject), my_accesses_reply(env, subject)):
            assert [a.entry_id for a in reply.accesses] == [i for i in in_order if i in live]
            (gap,) = reply.unsearched
            assert (gap.first_sequence, gap.last_sequence) == (1, last_archived)
            assert gap.reason == "FILE_CHANGED"
            assert "differs from the one archived" in gap.description
        segment.write_bytes(original)
        later = fresh_head(env)
        tail = exported(env, tmp_path / "live.jsonl")
        assert json.loads(tail.read_bytes().splitlines()[1])["seq"] == last_archived + 1
        # Proofs: live entries by id; archived ones by sequence, in both formats (their
        # Merkle nodes stay); the old checkpoints stay consistent with the new head.
        for i in live:
            assert proven(env, later, entry_id=i) == sequences[i]
        for i in (*v1_ids, *v2_old_ids):
            assert proven(env, later, sequence=sequences[i]) == sequences[i]
        assert consistent(env, head_v1, later)
        assert consistent(env, head, later)
        # Without its archive file, an archived compact entry's proof is refused by name, and
        # the citizen's readers say which range they could not search.
        moved = segment.rename(tmp_path / segment.name)
        (gap,) = citizen_report_reply(env, subject).unsearched
        assert (gap.first_sequence, gap.reason) == (1, "FILE_MISSING")
        assert [a.entry_id for a in my_accesses_reply(env, subject).accesses] == sorted(
            live, key=lambda i: sequences[i]
        )
        archived_v2 = last_archived  # a bulk entry: no checkpoint inside its 32 leaves
        with pytest.raises(grpc.RpcError) as info:
            proven(env, later, sequence=archived_v2)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert client.call_error(info.value).reason == "ENTRY_ARCHIVED"
        moved.rename(segment)
        assert proven(env, later, sequence=archived_v2) == archived_v2
        # Evidence: the proofs fetched while the entries were live still verify offline; the
        # live one can be proven again.
        for files in evidence.values():
            assert verify_evidence(env, files) == ev.INTACT
        again = prove(env, v2_new_reply, tmp_path, "v2-new-again")
        assert verify_evidence(env, again) == ev.INTACT
        # Evidence whose entry is archived (either format) is proven again from the archive
        # file, by the broker: the same proof as when it was live, against the new head.
        for name, reply in (("v1", v1_reply), ("v2-old", v2_old_reply)):
            files = prove(env, reply, tmp_path, f"{name}-archived")
            assert verify_evidence(env, files) == ev.INTACT
            proof = json.loads(files[1].read_text())
            assert proof["entries"][0]["body"] == proven_bodies[name]
            assert proof["entries"][0]["tree_size"] == later.size
        # ... but not from a changed archive file: NOT_IN_LOG, naming why.
        segment.write_bytes(original.replace(CLERK.encode(), b"clerk-0919", 1))
        (tmp_path / "v1.jws").write_text(v1_reply.evidence + "\n")
        target = ["--target", env.broker.target, "--token", auditor(env)]
        code, out = run(["evidence", "prove", str(tmp_path / "v1.jws"), "-o",
                         str(tmp_path / "v1-changed.proof.json"), *target])  # fmt: skip
        assert code == ev.NOT_IN_LOG, out
        assert "differs from the one archived" in out
        segment.write_bytes(original)
        # An archived entry's id is not in the live log, and the answer says why.
        with pytest.raises(grpc.RpcError) as info:
            proven(env, later, entry_id=v1_ids[0])
        assert client.call_error(info.value).reason == "ENTRY_NOT_FOUND"
        assert f"entries 1..{last_archived} are archived" in (info.value.details() or "")
