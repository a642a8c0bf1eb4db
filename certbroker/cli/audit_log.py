"""``certbroker audit verify|export|checkpoint|archive|pg-grants``: log integrity commands.

Kept apart from the query/report commands in :mod:`certbroker.cli.main`; function names here all
start
with ``integrity_`` so the two never collide. Every command that opens the log finds it the way
the broker does: ``--db FILE`` (SQLite) or ``--dsn DSN [--schema S]`` (PostgreSQL) when given,
else the configuration (``--config FILE``, then ``CERTBROKER_AUDIT_*`` variables; see
:mod:`certbroker.config`), else ``<state-dir>/audit.sqlite``. ``pg-grants`` opens nothing: it
prints SQL for an operator to run.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from certbroker import config
from certbroker.audit import archive as audit_archive
from certbroker.audit.export import export, verify_db, verify_export
from certbroker.audit.integrity import checkpoint
from certbroker.audit.integrity import proofs as audit_proofs
from certbroker.audit.retention import remove_archives
from certbroker.audit.segment import is_segment, open_envelope, opened_export
from certbroker.audit.stats import log_stats
from certbroker.audit.store.db import backend_for
from certbroker.audit.store.postgres import grant_statements
from certbroker.audit.verify.report import (
    EXIT_CODES_HELP,
    UNVERIFIED_CHECKPOINTS,
    IntegrityReport,
)
from certbroker.cli import jsonout
from certbroker.config import AuditLocation, PostgresLocation
from certbroker.errors import BrokerError

StateOption = Callable[[argparse.ArgumentParser], None]


@dataclass(frozen=True)
class Target:
    """The log a command works on, and where its keys and archives are."""

    location: AuditLocation
    state_dir: Path
    checkpoint_key: Path | None
    archive_dir: Path
    archive_after_days: float
    archive_retention_days: float = 0.0


def add_location_options(parser: argparse.ArgumentParser) -> None:
    """``--db``, ``--dsn``, ``--schema`` and ``--config``: which audit log (see the module)."""
    parser.add_argument("--db", type=Path, help="SQLite audit file (default <state-dir>/...)")
    parser.add_argument(
        "--dsn", help="PostgreSQL audit store: libpq DSN or URL (default [audit] dsn / env)"
    )
    parser.add_argument("--schema", help="PostgreSQL schema (default [audit] schema)")
    parser.add_argument(
        "--config",
        type=Path,
        help="broker configuration file ([audit]); --state-dir, if given, overrides its state_dir",
    )
    # "Not given" must be told apart from the default, so that --state-dir beats the file's
    # (and CERTBROKER_STATE_DIR's) state_dir only when it is really on the command line.
    parser.set_defaults(state_dir=None)


def target(args: argparse.Namespace) -> Target:
    """Resolve the location options (ConfigError / ValueError if they are invalid)."""
    overrides = {} if args.state_dir is None else {"state_dir": args.state_dir}
    cfg = config.load(args.config, **overrides)
    location: AuditLocation = cfg.audit_location
    if args.db is not None and args.dsn:
        raise config.ConfigError("give --db (SQLite) or --dsn (PostgreSQL), not both")
    if args.db is not None:
        location = Path(args.db)
    elif args.dsn:
        location = PostgresLocation(args.dsn, args.schema or cfg.audit_schema)
    elif args.schema and cfg.audit_dsn:  # the configured PostgreSQL log, another schema
        location = PostgresLocation(cfg.audit_dsn, args.schema)
    return Target(
        location,
        cfg.state_dir,
        cfg.checkpoint_key,
        cfg.archive_directory,
        cfg.archive_after_days,
        cfg.archive_retention_days,
    )


def _state_dir(args: argparse.Namespace) -> Path:
    """``--state-dir`` as given, else the configured one (file, environment, default)."""
    return args.state_dir if args.state_dir is not None else config.load(args.config).state_dir


def existing_location(args: argparse.Namespace) -> AuditLocation | None:
    """The audit log the options name (for ``audit query`` in :mod:`certbroker.cli.main`), or None
    after printing why there is none to read."""
    found = _existing(args)
    return None if found is None else found.location


def _existing(args: argparse.Namespace) -> Target | None:
    """The target, or None after printing why it cannot be used (no log, unreachable)."""
    try:
        found = target(args)
        backend = backend_for(found.location)
        if backend.exists():
            return found
        print(f"error: no audit log at {backend.display}", file=sys.stderr)
    except (BrokerError, ValueError) as exc:  # ConfigError is a ValueError
        print(f"error: {_message(exc)}", file=sys.stderr)
    return None


def _message(exc: Exception) -> str:
    return exc.message if isinstance(exc, BrokerError) else str(exc)


def _print(report: IntegrityReport, what: str, as_json: bool = False) -> int:
    if as_json:  # one object for scripts: the same facts as the text, exit code unchanged
        print(
            jsonout.dumps(
                {
                    "ok": report.ok,
                    "code": report.code,
                    "problem_name": report.name,
                    "entries": report.entries,
                    "first_bad": report.first_bad,
                    "location": report.location or None,
                    "problem": report.problem,
                    "checkpoints": report.checkpoints,
                    "chain_only": report.chain_only,
                    "notes": report.notes,
                    "verified": what,
                },
            )
        )
        return report.code
    for note in report.notes:
        print(f"note: {note}")
    if report.ok and report.chain_only:
        print(
            f"ok (chain only): {report.entries} entries, hash chain and Merkle tree intact; "
            f"signed checkpoints NOT checked ({what})"
        )
        return 0
    if report.ok:
        print(
            f"ok: {report.entries} entries, hash chain intact, "
            f"{report.checkpoints} signed checkpoint(s) match ({what})"
        )
        return 0
    where = "" if report.first_bad is None else f" first bad entry at index {report.first_bad}:"
    at = f" [{report.location}]" if report.location not in report.problem else ""
    # Without the key nothing is shown to be tampered with; it is just not shown intact.
    verdict = "NOT VERIFIED" if report.code == UNVERIFIED_CHECKPOINTS else "TAMPERED"
    print(f"{verdict} ({report.name}):{where} {report.problem}{at}")
    return report.code


def _public_key(args: argparse.Namespace, found: Target | None) -> Ed25519PublicKey | None:
    if args.public_key is not None:
        return checkpoint.load_public_key(args.public_key)
    if found is not None and found.checkpoint_key is not None:
        default = found.checkpoint_key.with_suffix(".pub.pem")
    else:
        state_dir = found.state_dir if found is not None else _state_dir(args)
        default = state_dir / "checkpoint-key" / "public-key.pem"
    return checkpoint.load_public_key(default) if default.exists() else None


def integrity_verify(args: argparse.Namespace) -> int:
    """Verify an export (offline), the live database, or the live database and its archives.

    Without a public key (none given, none at the default place) checkpoints cannot be checked:
    exit 18 if there are any, unless ``--chain-only`` asks for the chain alone."""
    if args.chain_only and (args.public_key is not None or args.with_archives is not None):
        print(
            "error: --chain-only checks no checkpoint: drop --public-key / --with-archives",
            file=sys.stderr,
        )
        return 2
    found = None
    if args.export is None:  # the live log (an export is verified offline, on its own)
        found = _existing(args)
        if found is None:
            return 2
    try:
        key = None if args.chain_only else _public_key(args, found)
    except (OSError, ValueError) as exc:
        print(f"error: --public-key: {exc}", file=sys.stderr)
        return 2
    if args.export is not None:
        if not args.export.exists():
            print(f"error: no export at {args.export}", file=sys.stderr)
            return 2
        try:
            auditor = _auditor_key(args)
            if is_segment(args.export):  # a compressed (maybe encrypted) archive segment
                open_envelope(args.export, key)
                with opened_export(args.export, auditor) as plain:
                    report = verify_export(plain, key, chain_only=args.chain_only)
            else:
                report = verify_export(args.export, key, chain_only=args.chain_only)
        except (OSError, ValueError) as exc:  # SegmentError is a ValueError
            print(f"error: {args.export}: {exc}", file=sys.stderr)
            return 1
        return _print(report, f"export {args.export}", args.json)
    assert found is not None
    what = backend_for(found.location).display
    try:
        if args.with_archives is not None:
            if key is None:
                print("error: --with-archives needs the checkpoint public key", file=sys.stderr)
                return 2
            directory = args.with_archives or found.archive_dir
            report = audit_archive.verify_with_archives(
                found.location, key, directory, auditor_key=_auditor_key(args)
            )
            return _print(report, f"{what} and the archives in {directory}", args.json)
        report = verify_db(found.location, key, chain_only=args.chain_only)
        return _print(report, what, args.json)
    except BrokerError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:  # the auditor key
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _auditor_key(args: argparse.Namespace) -> X25519PrivateKey | None:
    """``--auditor-key``: the X25519 private key (PEM) encrypted archives are read with."""
    if args.auditor_key is None:
        return None
    key = serialization.load_pem_private_key(args.auditor_key.read_bytes(), password=None)
    if not isinstance(key, X25519PrivateKey):
        raise ValueError(f"--auditor-key {args.auditor_key}: not an X25519 private key")
    return key


def _recipient(path: Path | None) -> X25519PublicKey | None:
    """``--encrypt-to``: an auditor's X25519 public key (PEM)."""
    if path is None:
        return None
    key = serialization.load_pem_public_key(path.read_bytes())
    if not isinstance(key, X25519PublicKey):
        raise ValueError(f"--encrypt-to {path}: not an X25519 public key")
    return key


def integrity_export(args: argparse.Namespace) -> int:
    """Write a segment of the live log to ``--out``."""
    found = _existing(args)
    if found is None:
        return 2
    try:
        with args.out.open("wb") as out:
            first, last = export(found.location, out, args.first, args.last)
    except (ValueError, BrokerError) as exc:
        print(f"error: {_message(exc)}", file=sys.stderr)
        return 2
    print(f"exported entries {first}..{last} to {args.out}")
    return 0


def integrity_checkpoint(args: argparse.Namespace) -> int:
    """Sign a checkpoint of the current tree now (offline; the server does it periodically)."""
    found = _existing(args)
    if found is None:
        return 2
    signer = audit_proofs.CheckpointSigner.load(found.state_dir, args.key or found.checkpoint_key)
    try:
        head = audit_proofs.sign_checkpoint(found.location, signer)
    except BrokerError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    print(head.note, end="")
    return 0


def integrity_archive(args: argparse.Namespace) -> int:
    """Move entries older than N days to an archive file (what the broker does periodically)."""
    found = _existing(args)
    if found is None:
        return 2
    days = args.older_than_days if args.older_than_days is not None else found.archive_after_days
    if not days > 0:
        print("error: give --older-than-days N (or [audit] archive_after_days)", file=sys.stderr)
        return 2
    signer = audit_proofs.CheckpointSigner.load(found.state_dir, args.key or found.checkpoint_key)
    directory = args.dir or found.archive_dir
    try:
        recipient = _recipient(args.encrypt_to)
        made = audit_archive.archive_older_than(
            found.location,
            signer,
            directory,
            days,
            compress=args.compress or recipient is not None,
            recipient=recipient,
        )
    except (BrokerError, OSError, ValueError) as exc:
        print(f"error: {_message(exc)}", file=sys.stderr)
        return 1
    if made is None:
        print(f"nothing to archive: no live entry is older than {days:g} days")
    else:
        print(f"archived entries {made.first_seq}..{made.last_seq} to {directory / made.file_name}")
    return 0


def integrity_remove_archives(args: argparse.Namespace) -> int:
    """Remove archive files past their retention, each leaving an audit entry and a signed
    tombstone (:mod:`certbroker.audit.retention`)."""
    found = _existing(args)
    if found is None:
        return 2
    days = (
        args.older_than_days if args.older_than_days is not None else found.archive_retention_days
    )
    if not days > 0:
        print(
            "error: give --older-than-days N (or [audit] archive_retention_days)", file=sys.stderr
        )
        return 2
    signer = audit_proofs.CheckpointSigner.load(found.state_dir, args.key or found.checkpoint_key)
    directory = args.dir or found.archive_dir
    try:
        removed = remove_archives(found.location, signer, directory, days, operator=args.operator)
    except (BrokerError, OSError, RuntimeError, ValueError) as exc:
        print(f"error: {_message(exc)}", file=sys.stderr)
        return 1
    if not removed:
        print(f"nothing to remove: no archive is older than {days:g} days")
    for stone in removed:
        print(
            f"removed {stone.file_name} (entries {stone.first_seq}..{stone.last_seq}); "
            "signed tombstone recorded"
        )
    return 0


def integrity_stats(args: argparse.Namespace) -> int:
    """Entries, bytes per entry, oldest live entry, archives and the next retention action."""
    found = _existing(args)
    if found is None:
        return 2
    try:
        directory = args.dir or found.archive_dir
        got = log_stats(found.location, directory, found.archive_after_days, datetime.now(UTC))
    except (BrokerError, OSError, ValueError) as exc:
        print(f"error: {_message(exc)}", file=sys.stderr)
        return 1
    if args.json:
        print(jsonout.dumps({**dataclasses.asdict(got), "bytes_per_entry": got.bytes_per_entry}))
        return 0
    print(f"entries          {got.entries:,} ({got.live:,} live, {got.archived:,} archived)")
    print(f"live formats     v1 {got.live_v1:,}, v2 (compact) {got.live_v2:,}")
    print(f"live store       {got.live_bytes:,} bytes, {got.bytes_per_entry:,.0f} bytes/entry")
    print(f"oldest live      {got.oldest_live or '-'}")
    print(f"newest           {got.newest or '-'}")
    print(f"archives         {len(got.archives)} file(s), {got.archive_bytes:,} bytes")
    for a in got.archives:
        size = "MISSING" if a.size is None else f"{a.size:,} bytes"
        print(f"  {a.file_name}  entries {a.first_seq}..{a.last_seq}  {size}")
    print(f"next retention   {got.next_action}")
    return 0


#: PostgreSQL truncates longer identifiers (NAMEDATALEN - 1 bytes): a longer name would grant
#: to a different, truncated role than the one asked for.
_PG_IDENTIFIER_BYTES = 63


def integrity_pg_grants(args: argparse.Namespace) -> int:
    """Print the GRANT statements for a PostgreSQL role of the audit store, one per line, each
    ending in ``;`` (pipe them to ``psql`` as the schema's owner). Connects to nothing."""
    role: str = args.role
    if not role or len(role.encode()) > _PG_IDENTIFIER_BYTES or not role.isprintable():
        print(
            f"error: --role: 1 to {_PG_IDENTIFIER_BYTES} bytes, printable characters only",
            file=sys.stderr,
        )
        return 2
    try:
        schema = args.schema or config.load(args.config).audit_schema
    except config.ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not config.SCHEMA_RE.fullmatch(schema):
        print(f"error: --schema {schema!r}: lowercase letters, digits and _ only", file=sys.stderr)
        return 2
    try:  # psycopg (the postgres extra) quotes the names; an SQLite-only install lacks it
        statements = grant_statements(schema, role, archiver=args.archiver)
    except ImportError as exc:
        print(f"error: the PostgreSQL driver is not installed ({exc})", file=sys.stderr)
        return 2
    for statement in statements:
        print(f"{statement};")
    return 0


def add_integrity_parsers(
    aud: argparse._SubParsersAction[argparse.ArgumentParser], state: StateOption
) -> None:
    """Register ``verify``, ``export``, ``checkpoint``, ``archive`` and ``pg-grants`` under
    ``certbroker audit``."""
    s = aud.add_parser(
        "verify",
        help="verify the hash chain, Merkle tree and signed checkpoints (live log or export)",
        description="Verify the audit log or an export. " + EXIT_CODES_HELP,
        epilog=EXIT_CODES_HELP,
    )
    state(s)
    add_location_options(s)
    s.add_argument("--export", type=Path, help="verify this export file offline instead")
    s.add_argument(
        "--auditor-key",
        type=Path,
        help="X25519 private key (PEM) that reads encrypted archive segments",
    )
    s.add_argument(
        "--with-archives",
        nargs="?",
        const="",
        type=lambda v: Path(v) if v else "",
        metavar="DIR",
        help="also verify the archive files (default dir: [audit] archive_dir) and that they "
        "join up with each other and the live log",
    )
    s.add_argument(
        "--public-key",
        type=Path,
        help="checkpoint public key PEM (default <state-dir>/checkpoint-key/public-key.pem)",
    )
    s.add_argument(
        "--chain-only",
        action="store_true",
        help="check the entries, hash chain and Merkle tree but NOT the signed checkpoints "
        "(exit 0 then does not mean a rewrite would have been caught); without it, a log with "
        "checkpoints and no public key exits 18",
    )
    s.add_argument("--json", action="store_true", help="print the verdict as one JSON object")
    s.set_defaults(func=integrity_verify)
    s = aud.add_parser("export", help="write a segment of the log and its checkpoints (JSONL)")
    state(s)
    add_location_options(s)
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--from", dest="first", type=int, help="first sequence (first live entry)")
    s.add_argument("--to", dest="last", type=int, help="last sequence (default: the end)")
    s.set_defaults(func=integrity_export)
    s = aud.add_parser("checkpoint", help="sign a checkpoint of the log now")
    state(s)
    add_location_options(s)
    s.add_argument("--key", type=Path, help="checkpoint signing key ([audit] checkpoint_key)")
    s.set_defaults(func=integrity_checkpoint)
    s = aud.add_parser("archive", help="move old entries to a signed archive file")
    state(s)
    add_location_options(s)
    s.add_argument(
        "--older-than-days", type=float, help="age cutoff (default [audit] archive_after_days)"
    )
    s.add_argument("--dir", type=Path, help="archive directory (default [audit] archive_dir)")
    s.add_argument("--key", type=Path, help="checkpoint signing key ([audit] checkpoint_key)")
    s.add_argument(
        "--compress", action="store_true", help="write a zstd-compressed signed segment (.zst)"
    )
    s.add_argument(
        "--encrypt-to",
        type=Path,
        help="encrypt the segment to this auditor's X25519 public key (PEM); implies --compress",
    )
    s.set_defaults(func=integrity_archive)
    s = aud.add_parser(
        "remove-archives",
        help="remove archive files past retention, leaving signed tombstones (audited)",
    )
    state(s)
    add_location_options(s)
    s.add_argument(
        "--older-than-days", type=float, help="retention (default [audit] archive_retention_days)"
    )
    s.add_argument("--dir", type=Path, help="archive directory (default [audit] archive_dir)")
    s.add_argument("--key", type=Path, help="checkpoint signing key ([audit] checkpoint_key)")
    s.add_argument("--operator", help="who removes them, for the audit entry (default: OS user)")
    s.set_defaults(func=integrity_remove_archives)
    s = aud.add_parser(
        "stats", help="entries, bytes per entry, archives and the next retention action"
    )
    state(s)
    add_location_options(s)
    s.add_argument("--dir", type=Path, help="archive directory (default [audit] archive_dir)")
    s.add_argument("--json", action="store_true", help="one JSON object")
    s.set_defaults(func=integrity_stats)
    s = aud.add_parser(
        "pg-grants",
        help="print the GRANTs for a PostgreSQL role of the audit store (for psql)",
        description="Print the GRANT statements a dedicated PostgreSQL role needs: SELECT and "
        "INSERT for a broker, plus what `audit archive` needs with --archiver. Run them as the "
        "schema's owner once the schema exists (the first broker start creates it).",
    )
    s.add_argument("--role", required=True, help="the PostgreSQL role to grant to")
    s.add_argument("--schema", help="the audit schema (default [audit] schema, certbroker)")
    s.add_argument("--config", type=Path, help="broker configuration file ([audit] schema)")
    s.add_argument(
        "--archiver",
        action="store_true",
        help="also INSERT on audit_archives and DELETE on audit_log (archived rows only)",
    )
    s.set_defaults(func=integrity_pg_grants)
