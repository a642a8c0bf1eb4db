"""``certbroker audit verify|export|checkpoint``: log integrity commands (see broker.audit_verify).

Kept apart from the query/report commands in :mod:`broker.cli`; function names here all start
with ``integrity_`` so the two never collide.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from broker import audit_proofs, checkpoint
from broker.audit_export import export, verify_db, verify_export
from broker.audit_verify import EXIT_CODES_HELP, IntegrityReport

StateOption = Callable[[argparse.ArgumentParser], None]


def _db(args: argparse.Namespace) -> Path:
    return Path(args.db or args.state_dir / "audit.sqlite")


def _print(report: IntegrityReport, what: str) -> int:
    for note in report.notes:
        print(f"note: {note}")
    if report.ok:
        print(
            f"ok: {report.entries} entries, hash chain intact, "
            f"{report.checkpoints} signed checkpoint(s) match ({what})"
        )
        return 0
    where = "" if report.first_bad is None else f" first bad entry at index {report.first_bad}:"
    print(f"TAMPERED ({report.name}):{where} {report.problem}")
    return report.code


def _public_key(args: argparse.Namespace) -> Ed25519PublicKey | None:
    if args.public_key is not None:
        return checkpoint.load_public_key(args.public_key)
    default = args.state_dir / "checkpoint-key" / "public-key.pem"
    return checkpoint.load_public_key(default) if default.exists() else None


def integrity_verify(args: argparse.Namespace) -> int:
    """Verify an export (offline) or the live database."""
    try:
        key = _public_key(args)
    except (OSError, ValueError) as exc:
        print(f"error: --public-key: {exc}", file=sys.stderr)
        return 2
    if args.export is not None:
        if key is None:
            print("error: --export needs --public-key", file=sys.stderr)
            return 2
        if not args.export.exists():
            print(f"error: no export at {args.export}", file=sys.stderr)
            return 2
        return _print(verify_export(args.export, key), f"export {args.export}")
    path = _db(args)
    if not path.exists():
        print(f"error: no audit log at {path}", file=sys.stderr)
        return 2
    return _print(verify_db(path, key), str(path))


def integrity_export(args: argparse.Namespace) -> int:
    """Write a segment of the live log to ``--out``."""
    path = _db(args)
    if not path.exists():
        print(f"error: no audit log at {path}", file=sys.stderr)
        return 2
    try:
        with args.out.open("wb") as out:
            first, last = export(path, out, args.first, args.last)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"exported entries {first}..{last} to {args.out}")
    return 0


def integrity_checkpoint(args: argparse.Namespace) -> int:
    """Sign a checkpoint of the current tree now (offline; the server does it periodically)."""
    path = _db(args)
    if not path.exists():
        print(f"error: no audit log at {path}", file=sys.stderr)
        return 2
    signer = audit_proofs.CheckpointSigner.load(args.state_dir, args.key)
    head = audit_proofs.sign_checkpoint(path, signer)
    print(head.note, end="")
    return 0


def add_integrity_parsers(
    aud: argparse._SubParsersAction[argparse.ArgumentParser], state: StateOption
) -> None:
    """Register ``verify``, ``export`` and ``checkpoint`` under ``certbroker audit``."""
    s = aud.add_parser(
        "verify",
        help="verify the hash chain, Merkle tree and signed checkpoints (live log or export)",
        description="Verify the audit log or an export. " + EXIT_CODES_HELP,
        epilog=EXIT_CODES_HELP,
    )
    state(s)
    s.add_argument("--db", type=Path, help="audit database (default <state-dir>/audit.sqlite)")
    s.add_argument("--export", type=Path, help="verify this export file offline instead")
    s.add_argument(
        "--public-key",
        type=Path,
        help="checkpoint public key PEM (default <state-dir>/checkpoint-key/public-key.pem)",
    )
    s.set_defaults(func=integrity_verify)
    s = aud.add_parser("export", help="write a segment of the log and its checkpoints (JSONL)")
    state(s)
    s.add_argument("--db", type=Path)
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--from", dest="first", type=int, default=1, help="first sequence (1)")
    s.add_argument("--to", dest="last", type=int, help="last sequence (default: the end)")
    s.set_defaults(func=integrity_export)
    s = aud.add_parser("checkpoint", help="sign a checkpoint of the log now")
    state(s)
    s.add_argument("--db", type=Path)
    s.add_argument("--key", type=Path, help="checkpoint signing key ([audit] checkpoint_key)")
    s.set_defaults(func=integrity_checkpoint)
