"""``certbroker audit report|anomalies|prove``: the broker's Audit service from an auditor's
terminal.

Every command calls a running broker's ``certbroker.v1.Audit`` service with an auditor token
from ``--token`` or ``$CERTBROKER_TOKEN`` (development: ``certbroker token issue --sub aud-1
--roles auditor --office audit-office``); each call is itself an entry in the audit log. Output
is a table aligned by display width (CJK names line up), or ``--json``.

Exit codes: 0 done, 1 the broker refused the call (status and reason on stderr), 2 usage (no
token, a time that does not parse, no public key); ``prove`` also exits like ``audit verify``
when what the broker served does not verify (15 not proven, 16 wrong key, 17 bad checkpoint).
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc
from google.protobuf import timestamp_pb2
from google.protobuf.message import Message

from certbroker.audit.integrity import checkpoint
from certbroker.audit.verify import receipts
from certbroker.cli import client, jsonout
from certbroker.cli.table import printable, render_table
from certbroker.v1 import audit_pb2, audit_pb2_grpc

StateOption = Callable[[argparse.ArgumentParser], None]
_Use = Callable[[audit_pb2_grpc.AuditStub, tuple[tuple[str, str]]], int]
MAX_SEQUENCES_SHOWN = 8


def _call(args: argparse.Namespace, use: _Use) -> int:
    """Run ``use(stub, metadata)`` against ``--target`` with the token; 1 on an RPC error."""
    token = client.token_or_error(
        args, "an auditor token: `certbroker token issue --roles auditor ...`"
    )
    if token is None:
        return 2
    channel, stub = client.audit_stub(args.target)
    try:
        return use(stub, client.bearer(token))
    except grpc.RpcError as exc:
        print(f"error: {client.call_error(exc)}", file=sys.stderr)
        return 1
    finally:
        channel.close()


def _range(args: argparse.Namespace) -> audit_pb2.TimeRange | None:
    """--since/--until as a TimeRange; ValueError names the bad option."""
    moments: dict[str, dt.datetime | None] = {}
    for name in ("since", "until"):
        value = getattr(args, name)
        try:
            moments[name] = client.parse_time(value) if value else None
        except ValueError:
            raise ValueError(f"--{name}: not an ISO 8601 time: {value!r}") from None
    return client.time_range(moments["since"], moments["until"])


def _when(stamp: timestamp_pb2.Timestamp) -> str:
    return f"{stamp.ToDatetime(tzinfo=dt.UTC):%Y-%m-%d %H:%M:%S}Z"


def _print_json(message: Message) -> None:
    print(jsonout.message(message, indent=2, sort_keys=True))


def _sequences(values: Sequence[int]) -> str:
    shown = ",".join(str(v) for v in values[:MAX_SEQUENCES_SHOWN])
    more = len(values) - MAX_SEQUENCES_SHOWN
    return shown + (f",… (+{more})" if more > 0 else "")


def _with_range(args: argparse.Namespace, run: Callable[[audit_pb2.TimeRange | None], int]) -> int:
    try:
        span = _range(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return run(span)


def cmd_report(args: argparse.Namespace) -> int:
    """Every access to one citizen's records: the report a citizen can be handed."""

    def run(span: audit_pb2.TimeRange | None) -> int:
        def use(stub: audit_pb2_grpc.AuditStub, md: tuple[tuple[str, str]]) -> int:
            request = audit_pb2.CitizenReportRequest(subject_id=args.subject_id, time=span)
            reply = stub.CitizenReport(request, metadata=md, timeout=args.timeout)
            if args.json:
                _print_json(reply)
                return 0
            header = (
                "TIME",
                "CLERK",
                "OFFICE",
                "MATTER",
                "CASE",
                "RECORD TYPE",
                "DEPARTMENT",
                "DECISION",
                "OUTCOME",
                "FIELDS RELEASED",
            )
            rows = [
                (
                    _when(a.time),
                    a.clerk,
                    a.office,
                    f"{a.matter_code} {a.matter_name}".strip(),
                    a.case_number,
                    a.record_type,
                    a.department,
                    a.decision,
                    a.outcome,
                    ",".join(a.fields),
                )
                for a in reply.accesses
            ]
            print(f"accesses to the records of {printable(reply.subject_id)}:")
            print(render_table(header, rows))
            print(f"({len(rows)} accesses)")
            return 0

        return _call(args, use)

    return _with_range(args, run)


def cmd_anomalies(args: argparse.Namespace) -> int:
    """Findings over the lookups in the time range, each with the entries behind it."""

    def run(span: audit_pb2.TimeRange | None) -> int:
        def use(stub: audit_pb2_grpc.AuditStub, md: tuple[tuple[str, str]]) -> int:
            request = audit_pb2.AnomaliesRequest(time=span)
            reply = stub.Anomalies(request, metadata=md, timeout=args.timeout)
            if args.json:
                _print_json(reply)
                return 0
            rows = [
                (f.rule, f.clerk, _sequences(list(f.sequences)), f.description)
                for f in reply.findings
            ]
            print(render_table(("RULE", "CLERK", "ENTRIES", "DESCRIPTION"), rows))
            print(f"({len(rows)} findings)")
            return 0

        return _call(args, use)

    return _with_range(args, run)


def cmd_prove(args: argparse.Namespace) -> int:
    """Prove one entry (a lookup's receipt) is in a signed checkpoint, checked here."""
    try:
        args.entry_hash = _receipt_hash(args.entry_hash)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        key_file = args.public_key or args.state_dir / "checkpoint-key" / "public-key.pem"
        public_key = checkpoint.load_public_key(key_file)
    except (OSError, ValueError) as exc:
        print(f"error: --public-key: {exc}", file=sys.stderr)
        return 2

    def use(stub: audit_pb2_grpc.AuditStub, md: tuple[tuple[str, str]]) -> int:
        head = stub.GetCheckpoint(
            audit_pb2.GetCheckpointRequest(fresh=args.fresh), metadata=md, timeout=args.timeout
        )
        request = audit_pb2.InclusionProofRequest(
            entry_id=args.entry_id or "", sequence=args.sequence or 0, tree_size=head.size
        )
        proof = stub.GetInclusionProof(request, metadata=md, timeout=args.timeout)
        sequence = proof.leaf_index + 1
        segment = audit_pb2.ExportRequest(from_sequence=sequence, to_sequence=sequence)
        data = b"".join(c.data for c in stub.Export(segment, metadata=md, timeout=args.timeout))
        try:
            proven = receipts.prove(
                head,
                proof,
                data,
                public_key,
                entry_id=args.entry_id or "",
                receipt_hash=args.entry_hash or "",
            )
        except receipts.ProofError as exc:
            print(f"NOT PROVEN: {exc}")
            return exc.code
        signed, entry_hash = proven.checkpoint, proven.entry_hash
        print(
            f"ok: entry #{sequence} (sha256:{entry_hash}) is in the checkpoint of "
            f"{signed.size} entries signed at {signed.time:%Y-%m-%d %H:%M:%S}Z, "
            f"root {signed.root_hash.hex()}"
        )
        return 0

    return _call(args, use)


def _receipt_hash(text: str | None) -> str | None:
    """``--entry-hash`` as printed on a receipt (``sha256:0f3a…``): 8 to 64 hex digits."""
    if text is None:
        return None
    cleaned = text.strip().lower().removeprefix("sha256:").rstrip("…")
    if not 8 <= len(cleaned) <= 64 or any(c not in "0123456789abcdef" for c in cleaned):
        raise ValueError("--entry-hash: expected 8 to 64 hex digits of the receipt's hash")
    return cleaned


def add_parsers(
    aud: argparse._SubParsersAction[argparse.ArgumentParser], state: StateOption
) -> None:
    """Register ``report``, ``anomalies`` and ``prove`` under ``certbroker audit``."""

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--target", default="127.0.0.1:50051", help="the broker")
        sp.add_argument("--token", help="auditor JWT (default: $CERTBROKER_TOKEN)")
        sp.add_argument("--timeout", type=float, default=30.0)

    def span(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--since", help="ISO 8601 time, inclusive (no zone = UTC)")
        sp.add_argument("--until", help="ISO 8601 time, exclusive (no zone = UTC)")
        sp.add_argument("--json", action="store_true", help="the service's answer as JSON")

    s = aud.add_parser(
        "report", help="every access to one citizen's records (Audit service, auditors)"
    )
    s.add_argument("subject_id", help="the citizen's resident ID")
    common(s)
    span(s)
    s.set_defaults(func=cmd_report)

    s = aud.add_parser("anomalies", help="patterns worth a look (Audit service, auditors)")
    common(s)
    span(s)
    s.set_defaults(func=cmd_anomalies)

    s = aud.add_parser(
        "prove",
        help="prove an entry (a lookup's receipt) is in a signed checkpoint (auditors)",
        epilog="exit codes: 0 proven, 1 refused by the broker, 2 usage, 15 not proven, "
        "16 checkpoint signed by the wrong key, 17 checkpoint signature invalid",
    )
    which = s.add_mutually_exclusive_group(required=True)
    which.add_argument("--entry-id", help="the receipt's entry id")
    which.add_argument("--sequence", type=int, help="the receipt's sequence number")
    s.add_argument("--entry-hash", help="the receipt's entry hash (a prefix will do)")
    s.add_argument("--fresh", action="store_true", help="have a new checkpoint signed first")
    state(s)
    s.add_argument(
        "--public-key",
        type=Path,
        help="checkpoint public key PEM (default <state-dir>/checkpoint-key/public-key.pem)",
    )
    common(s)
    s.set_defaults(func=cmd_prove)
