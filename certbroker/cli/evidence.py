"""``certbroker evidence verify|prove|pdf|keys`` and ``certbroker keys rotate --evidence``.

``verify`` works offline, with no broker and no database (:mod:`certbroker.evidence.verify`);
its exit codes: 0 intact, 10 content changed (the field is named), 11 signature bad (also: a
scanned QR text that is not this evidence's), 12 unknown key, 13 entry not in the log,
14 malformed file, 2 usage (a file or key that cannot be read). ``prove`` asks a running
broker's Audit service (an auditor token) once for what ``verify --proof`` needs: the signed
checkpoint, each item's audit entry as stored (an archived one read by the broker from its
archive file) and its inclusion proof; it exits 13 when an entry is not in the log (or is
archived in a file the broker cannot read: encrypted, missing or changed), 14 for a
malformed evidence file, 1 when the broker refuses.
``pdf`` writes the printable A4 page (:mod:`certbroker.evidence.pdf`). ``keys`` fetches the
evidence JWKS (Audit ``GetEvidenceKeys``); ``certbroker keys rotate --evidence`` makes a new
evidence key in a state directory (a running broker takes it on SIGHUP).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from certbroker.audit.integrity import checkpoint
from certbroker.cli.auditor import _call as audit_call
from certbroker.evidence import jws, keys, pdf
from certbroker.evidence import verify as evidence
from certbroker.v1 import audit_pb2, audit_pb2_grpc

StateOption = Callable[[argparse.ArgumentParser], None]
DEFAULT_TARGET = "127.0.0.1:50051"


def _fail(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError as exc:
        print(f"error: cannot read {path}: {exc.strerror or exc}", file=sys.stderr)
        return None


def cmd_verify(args: argparse.Namespace) -> int:
    """Verify an evidence file offline; the exit code says what (module docstring)."""
    raw = _read(args.file)
    keys_path = args.keys or keys.jwks_path(args.state_dir)
    jwks_raw = _read(keys_path)
    if raw is None or jwks_raw is None:
        return 2
    try:
        jwks = keys.public_keys(jwks_raw)
    except ValueError as exc:
        return _fail(f"{keys_path}: {exc}")
    proof: dict[str, Any] | None = None
    if args.proof is not None:
        proof_raw = _read(args.proof)
        if proof_raw is None:
            return 2
        try:
            proof = json.loads(proof_raw)
            if not isinstance(proof, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            print(f"MALFORMED: {args.proof} is not a proof file ({exc})")
            return evidence.MALFORMED
    key = None
    if args.checkpoint_key is not None:
        try:
            key = checkpoint.load_public_key(args.checkpoint_key)
        except (OSError, ValueError) as exc:
            return _fail(f"--checkpoint-key: {exc}")
    outcome = evidence.verify(raw, jwks, proof=proof, checkpoint_key=key)
    if outcome.code == evidence.INTACT and args.qr is not None:
        compact = evidence.read_document(raw).compact
        if not pdf.qr_matches(args.qr, compact):
            outcome.code, outcome.problem = (
                evidence.SIGNATURE_BAD,
                "the QR text is not this evidence's",
            )
    for line in evidence.summary_lines(outcome):
        print(line)
    if outcome.code == evidence.INTACT:
        where = (
            "proven in the audit log"
            if outcome.proven
            else ("not checked against the audit log (certbroker evidence prove, then --proof)")
        )
        print(f"INTACT: signature by {outcome.kid} and content verify; {where}")
    else:
        print(f"{outcome.verdict.upper().replace(' ', '_')}: {outcome.problem}")
    return outcome.code


class _Archived(Exception):
    """The entry is archived and the broker cannot read its archive file (the message says
    why)."""


def _entry_proof(
    stub: audit_pb2_grpc.AuditStub, metadata: Any, entry: dict[str, Any], size: int
) -> dict[str, Any]:
    """One entry's stored body, previous hash and inclusion proof in the tree of ``size``.

    A live entry is found by its id and its body exported; an archived one (ids are looked up
    in the live log only) by the sequence the evidence names, its body and previous hash then
    come with the proof, read by the broker from the archive file. Whether it is the entry
    the evidence names is for ``verify`` to check (the body's hash and Merkle path).
    """
    try:
        proof = stub.GetInclusionProof(
            audit_pb2.InclusionProofRequest(entry_id=entry["entry_id"], tree_size=size),
            metadata=metadata,
        )
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.NOT_FOUND or "archived" not in (exc.details() or ""):
            raise
        proof = stub.GetInclusionProof(
            audit_pb2.InclusionProofRequest(sequence=int(entry["sequence"]), tree_size=size),
            metadata=metadata,
        )
        if not proof.HasField("archived"):  # not archived after all: the id is not in the log
            raise
    sequence = proof.leaf_index + 1
    if proof.HasField("archived"):
        if proof.archived.HasField("unreadable"):
            raise _Archived(proof.archived.unreadable.description)
        body, prev_hash = proof.archived.body, proof.archived.prev_hash
        if json.loads(body).get("entry_id") != entry["entry_id"]:
            raise ValueError("the archived entry at the sequence is another entry")
    else:
        data = b"".join(
            c.data
            for c in stub.Export(
                audit_pb2.ExportRequest(from_sequence=sequence, to_sequence=sequence),
                metadata=metadata,
            )
        )
        header_line, entry_line = data.decode("utf-8").splitlines()[:2]
        marker = '"body":'
        body = entry_line[entry_line.index(marker) + len(marker) : -1]  # verbatim: audit.export
        prev_hash = json.loads(header_line)["prev_hash"]
    return {
        "entry_id": entry["entry_id"],
        "sequence": sequence,
        "prev_hash": prev_hash,
        "body": body,
        "leaf_index": proof.leaf_index,
        "tree_size": proof.tree_size,
        "hashes": [h.hex() for h in proof.hashes],
    }


def cmd_prove(args: argparse.Namespace) -> int:
    """Fetch the proof of an evidence file's entries from the Audit service, once."""
    raw = _read(args.file)
    if raw is None:
        return 2
    try:
        doc = evidence.read_document(raw)
        payload = jws.parse(doc.compact).payload
        evidence.check_shape(payload)
    except jws.MalformedError as exc:
        print(f"MALFORMED: {exc}")
        return evidence.MALFORMED
    entries = [item["entry"] for item in payload["items"]]
    newest = max((e["sequence"] for e in entries), default=0)
    out: Path = args.output or args.file.with_name(args.file.name + ".proof.json")

    def use(stub: audit_pb2_grpc.AuditStub, metadata: Any) -> int:
        try:
            head = stub.GetCheckpoint(audit_pb2.GetCheckpointRequest(), metadata=metadata)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
            head = None
        if head is None or head.size < newest:  # no checkpoint covers the evidence yet
            head = stub.GetCheckpoint(audit_pb2.GetCheckpointRequest(fresh=True), metadata=metadata)
        try:
            found = [_entry_proof(stub, metadata, e, head.size) for e in entries]
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
            print(f"NOT_IN_LOG: {exc.details()}")
            return evidence.NOT_IN_LOG
        except _Archived as exc:
            print(f"NOT_IN_LOG: the entry is archived and the broker cannot read it: {exc}")
            return evidence.NOT_IN_LOG
        except (ValueError, IndexError, KeyError, UnicodeDecodeError):
            # An export that is not one entry line after its header: the log is not as
            # documented (certbroker.audit.export); nothing to prove the evidence with.
            print("NOT_IN_LOG: the broker's export of the entry is not an entry")
            return evidence.NOT_IN_LOG
        proof = evidence.proof_object(head.note, found)
        target = args.file if args.embed else out
        document = {"evidence": doc.compact, "proof": proof} if args.embed else proof
        target.write_text(json.dumps(document, ensure_ascii=False, indent=1) + "\n")
        print(f"proof of {len(found)} entries (checkpoint size {head.size}) in {target}")
        return 0

    return audit_call(args, use)


def cmd_pdf(args: argparse.Namespace) -> int:
    """Render the printable page of an evidence file (verify it first: this only reads it)."""
    raw = _read(args.file)
    if raw is None:
        return 2
    try:
        compact = evidence.read_document(raw).compact
        evidence.check_shape(jws.parse(compact).payload)
        qr = pdf.render(compact, args.output)
    except jws.MalformedError as exc:
        print(f"MALFORMED: {exc}")
        return evidence.MALFORMED
    except OSError as exc:
        return _fail(f"cannot write {args.output}: {exc.strerror or exc}")
    what = "the whole evidence" if qr == compact else "its summary"
    print(f"wrote {args.output} (QR code carries {what})")
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    """Fetch every evidence public key (JWKS) from a running broker's Audit service."""

    def use(stub: audit_pb2_grpc.AuditStub, metadata: Any) -> int:
        reply = stub.GetEvidenceKeys(audit_pb2.GetEvidenceKeysRequest(), metadata=metadata)
        args.output.write_text(reply.jwks)
        count = len(keys.public_keys(reply.jwks))
        print(f"wrote {args.output}: {count} keys, current {reply.current_kid}")
        return 0

    return audit_call(args, use)


def cmd_rotate(args: argparse.Namespace) -> int:
    """``keys rotate --evidence``: a new evidence key; the old ones stay published."""
    if not args.evidence:
        return _fail("say which key to rotate: --evidence")
    try:
        key = keys.rotate(args.state_dir)
    except (OSError, ValueError) as exc:
        return _fail(f"cannot rotate the evidence key in {args.state_dir}: {exc}")
    print(f"new evidence key {key.kid}; public keys in {keys.jwks_path(args.state_dir)}")
    print("a running broker signs with it after SIGHUP (certbroker policy reload) or a restart")
    return 0


def _auditor(s: argparse.ArgumentParser) -> None:
    s.add_argument("--target", default=DEFAULT_TARGET)
    s.add_argument("--token", help="auditor JWT (default: $CERTBROKER_TOKEN)")


def add_parsers(sub: Any, state: StateOption) -> None:
    """Add ``evidence`` and ``keys`` to the top-level subcommands."""
    ev = sub.add_parser(
        "evidence", help="verify, prove and print signed evidence documents (调取凭证)"
    ).add_subparsers(dest="evidence_command", required=True)
    s = ev.add_parser(
        "verify", help="verify an evidence file offline (exit 0 intact, 10-14 why not)"
    )
    state(s)
    s.add_argument("file", type=Path, help="the evidence: compact JWS, or JSON with a proof")
    s.add_argument(
        "--keys", type=Path, help="evidence JWKS (default <state-dir>/evidence-keys/jwks.json)"
    )
    s.add_argument("--checkpoint-key", type=Path, metavar="PEM", help="checkpoint public key")
    s.add_argument("--proof", type=Path, help="proof file from `certbroker evidence prove`")
    s.add_argument("--qr", metavar="TEXT", help="a scanned QR text to match against the file")
    s.set_defaults(func=cmd_verify)
    s = ev.add_parser("prove", help="fetch the audit-log proof of an evidence file (auditor)")
    _auditor(s)
    s.add_argument("file", type=Path)
    s.add_argument("-o", "--output", type=Path, help="proof file (default FILE.proof.json)")
    s.add_argument("--embed", action="store_true", help="write FILE as JSON with the proof in it")
    s.set_defaults(func=cmd_prove)
    s = ev.add_parser("pdf", help="the printable A4 page (Chinese, with a QR code)")
    s.add_argument("file", type=Path)
    s.add_argument("-o", "--output", type=Path, required=True)
    s.set_defaults(func=cmd_pdf)
    s = ev.add_parser("keys", help="fetch every evidence public key (JWKS) from the broker")
    _auditor(s)
    s.add_argument("-o", "--output", type=Path, required=True)
    s.set_defaults(func=cmd_keys)

    ks = sub.add_parser("keys", help="signing keys").add_subparsers(
        dest="keys_command", required=True
    )
    s = ks.add_parser("rotate", help="make a new signing key (old public keys stay published)")
    state(s)
    s.add_argument("--evidence", action="store_true", help="the evidence key")
    s.set_defaults(func=cmd_rotate)
