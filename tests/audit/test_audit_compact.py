"""Entry format version 2 (compact rows) on both backends, and logs mixing both formats.

A log starts in format 1 (JSON bodies in ``audit_log``) and goes on in format 2
(``audit_entries`` + ``audit_terms``): everything that reads it must treat it as one log.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from certbroker import config, policy
from certbroker.audit import open_audit_log
from certbroker.audit.anomalies import NO_CASE_NUMBER, find
from certbroker.audit.append import ChainStore
from certbroker.audit.archive import archive_older_than, archived_leaves, verify_with_archives
from certbroker.audit.events import event_fields
from certbroker.audit.export import export, verify_db, verify_export
from certbroker.audit.integrity import merkle
from certbroker.audit.integrity import proofs as audit_proofs
from certbroker.audit.query import QueryFilter, query
from certbroker.audit.retention import remove_archives
from certbroker.audit.scan import Criteria, scan
from certbroker.audit.segment import SegmentError, open_envelope, opened_export
from certbroker.audit.stats import log_stats
from certbroker.audit.store import compact
from certbroker.audit.store.db import backend_for
from certbroker.audit.verify.report import BAD_TREE, DELETED, EDITED, MALFORMED, OK, REWRITTEN
from certbroker.cli import main as cli
from certbroker.config import AuditLocation
from tests.audit.pg_support import attacker, fresh_schema, run_sql
from tests.audit.test_audit import StepClock, make_event

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
START = 1_700_000_000.0
HOUR = 3600.0
DAY = 86_400.0
OLD, NEW = 40, 45  # entries in format 1, then in format 2


@pytest.fixture(params=BACKENDS)
def location(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[AuditLocation]:
    if request.param == "sqlite":
        yield tmp_path / "audit.sqlite"
        return
    with fresh_schema() as pg:
        yield pg


def fill(location: AuditLocation, clock: StepClock, count: int, entry_format: int) -> None:
    async def go() -> None:
        async with open_audit_log(location, clock=clock, entry_format=entry_format) as log:
            for i in range(count):
                event = make_event(
                    clerk=f"clerk-{i % 3}",
                    subject_id=f"33030219900101{i % 7:04d}",
                    case_number="" if i % 11 == 0 else f"CASE-{i}",
                    decision="deny" if i % 4 == 0 else "allow",
                )
                if i % 5 == 0:  # a bundle: its items and the closing entry, as one unit
                    await log.append_many(
                        (event, event),
                        link=lambda ids: make_event(
                            kind="bundle", item_entry_ids=tuple(ids), outcome_counts={"OK": 2}
                        ),
                    )
                else:
                    await log.append(event)

    asyncio.run(go())


@pytest.fixture
def mixed(
    location: AuditLocation, tmp_path: Path
) -> tuple[AuditLocation, audit_proofs.CheckpointSigner]:
    signer = audit_proofs.CheckpointSigner.load(tmp_path)
    clock = StepClock(START, step=HOUR)
    fill(location, clock, OLD, 1)
    audit_proofs.sign_checkpoint(location, signer)
    fill(location, clock, NEW, 2)
    audit_proofs.sign_checkpoint(location, signer)
    return location, signer


def count(location: AuditLocation, table: str) -> int:
    with attacker(location) as conn:
        (n,) = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
    return int(n)


def test_a_mixed_log_verifies_exports_and_proves(
    mixed: tuple[AuditLocation, audit_proofs.CheckpointSigner], tmp_path: Path
) -> None:
    location, signer = mixed
    total = audit_proofs.tree_size(location)
    assert count(location, "audit_entries") > 0
    assert count(location, "audit_log") > 0
    assert count(location, "audit_log") + count(location, "audit_entries") == total
    report = verify_db(location, signer.public_key)
    assert (report.code, report.entries) == (OK, total), report
    # The export carries the hashed bodies: version 1 and 2, each as hashed.
    out = tmp_path / "export.jsonl"
    with out.open("wb") as f:
        export(location, f)
    versions = {json.loads(line)["body"]["v"] for line in out.read_bytes().splitlines()[1:]}
    assert versions == {1, 2}
    assert verify_export(out, signer.public_key).code == OK
    # Proofs for entries of both formats, from nodes stored or recomputed.
    root = audit_proofs.tree_root(location, total)
    leaves = [
        merkle.leaf_hash(
            json.dumps(
                json.loads(line)["body"], sort_keys=True, separators=(",", ":"), ensure_ascii=False
            ).encode()
        )
        for line in out.read_bytes().splitlines()[1:]
    ]
    assert merkle.root(leaves) == root
    for seq in (1, 7, total // 2, total - 3, total):
        leaf, path = audit_proofs.inclusion_proof(location, seq, total)
        assert leaf == leaves[seq - 1]
        assert merkle.verify_inclusion(leaf, seq - 1, total, path, root)
    for old in (1, 5, 33, total - 1):
        proof = audit_proofs.consistency_proof(location, old, total)
        assert merkle.verify_consistency(
            old, total, audit_proofs.tree_root(location, old), root, proof
        )
    # The compact writer stores no node below the stored level.
    with attacker(location) as conn:
        (low,) = conn.execute(
            "SELECT count(*) FROM merkle_nodes WHERE level < 5 AND idx >= ?",
            (((total >> 4) + 1) * 16,),
        ).fetchone()
    assert low == 0


def test_queries_reports_and_anomalies_read_both_formats(
    mixed: tuple[AuditLocation, audit_proofs.CheckpointSigner],
) -> None:
    location, _ = mixed
    subject = "330302199001010003"
    entries = scan(location, Criteria(subject_id=subject, kinds=("lookup",)))
    versions = set()
    for entry in entries:
        assert entry.event.subject_id == subject
        versions.add(entry.sequence > audit_proofs.tree_size(location) // 2)
    assert versions == {True, False}  # old and new entries both reported
    clerk = query(location, QueryFilter(clerk="clerk-1", decision="deny", limit=1000))
    assert clerk
    assert all(e.event.clerk == "clerk-1" and e.event.decision == "deny" for e in clerk)
    assert query(location, QueryFilter(clerk="nobody")) == []
    since = datetime.fromtimestamp(START, tz=UTC) + timedelta(hours=OLD - 5)
    window = scan(location, Criteria(since=since, until=since + timedelta(hours=12)))
    assert window
    assert {e.time >= since.isoformat()[:19] for e in window} == {True}
    found = find(window, policy.load(config.DEFAULT_POLICY_DIR))
    assert any(f.rule == NO_CASE_NUMBER for f in found)
    # Bundles keep their links in format 2.
    bundle = scan(location, Criteria(kinds=("bundle",), after=OLD * 2))
    assert bundle
    assert bundle[-1].event.outcome_counts == {"OK": 2}
    assert len(bundle[-1].event.item_entry_ids) == 2


def test_a_changed_compact_value_or_term_is_caught(
    mixed: tuple[AuditLocation, audit_proofs.CheckpointSigner],
) -> None:
    location, signer = mixed
    total = audit_proofs.tree_size(location)
    with attacker(location) as conn:
        conn.execute(
            "UPDATE audit_entries SET subject_id = '110101199003070000' WHERE seq = ?", (total - 2,)
        )
    report = verify_db(location, signer.public_key)
    assert (report.code, report.first_bad) in {(EDITED, total - 2), (REWRITTEN, total - 2)}, report
    with attacker(location) as conn:
        conn.execute("UPDATE audit_entries SET subject_id = 'x' WHERE seq = ?", (total - 2,))
        conn.execute("UPDATE audit_terms SET term = 'clerk-9' WHERE term = 'clerk-2'")
    assert not verify_db(location, signer.public_key).ok


def test_a_stored_node_removed_or_a_row_undecodable_is_reported(
    mixed: tuple[AuditLocation, audit_proofs.CheckpointSigner],
) -> None:
    location, signer = mixed
    total = audit_proofs.tree_size(location)
    with attacker(location) as conn:
        conn.execute("DELETE FROM merkle_nodes WHERE level = 5 AND idx = 0")
    report = verify_db(location, signer.public_key)
    assert (report.code, report.location) == (BAD_TREE, "merkle_nodes[level=5,idx=0]"), report
    with attacker(location) as conn:
        conn.execute("UPDATE audit_entries SET rest = 'not json' WHERE seq = ?", (total,))
    report = verify_db(location, signer.public_key)
    assert (report.code, report.first_bad) == (MALFORMED, total), report


def test_archiving_across_the_formats_verifies_with_the_archives(
    mixed: tuple[AuditLocation, audit_proofs.CheckpointSigner], tmp_path: Path
) -> None:
    location, signer = mixed
    total = audit_proofs.tree_size(location)
    now = START + (OLD + NEW) * HOUR
    directory = tmp_path / "archive"
    made = archive_older_than(
        location, signer, directory, days=8 * HOUR / 86_400, clock=lambda: now
    )
    assert made is not None
    assert made.last_seq > count(location, "audit_log")
    assert verify_with_archives(location, signer.public_key, directory).code == OK
    report = verify_db(location, signer.public_key)
    assert report.code == OK, report
    leaf, path = audit_proofs.inclusion_proof(location, made.last_seq + 1, total)
    root = audit_proofs.tree_root(location, total)
    assert merkle.verify_inclusion(leaf, made.last_seq, total, path, root)
    assert verify_export(directory / made.file_name, signer.public_key).code == OK
    # Proofs into the archived range: consistency from the checkpoint inside it needs no file
    # (archival kept its nodes); inclusion of every archived entry, the nodes nobody stored
    # read back from the archive file.
    with closing(backend_for(location).connect_read()) as conn:
        stored = audit_proofs.checkpoints(conn)
    (inside,) = [c.size for c in stored if c.size < made.last_seq]
    assert inside % 32
    proof = audit_proofs.consistency_proof(location, inside, total)
    assert merkle.verify_consistency(
        inside, total, audit_proofs.tree_root(location, inside), root, proof
    )
    from_files = archived_leaves(location, directory)
    for seq in range(1, made.last_seq + 1):
        leaf, path = audit_proofs.inclusion_proof(location, seq, total, archived=from_files)
        assert merkle.verify_inclusion(leaf, seq - 1, total, path, root), seq
    # Without the file: the last archived 32 entries (no checkpoint inside) have no low node.
    assert inside >> 5 < (made.last_seq - 1) >> 5
    with pytest.raises(KeyError):
        audit_proofs.inclusion_proof(location, made.last_seq, total)
    # `audit stats` sees both formats, the archive and when the next one is due.
    got = log_stats(location, directory, 8 * HOUR / 86_400, datetime.fromtimestamp(now, tz=UTC))
    assert (got.entries, got.archived) == (total, made.last_seq)
    assert got.live_v1 == 0
    assert got.live_v2 == total - made.last_seq
    assert [(a.first_seq, a.last_seq, a.size) for a in got.archives] == [
        (1, made.last_seq, (directory / made.file_name).stat().st_size)
    ]
    assert got.bytes_per_entry > 0
    assert got.next_action.startswith("archive")


def test_times_and_ids_rebuild_byte_for_byte() -> None:
    for text in (
        "2026-03-01T08:30:00.123Z",
        "1970-01-01T00:00:00.000Z",
        "2099-12-31T23:59:59.999Z",
    ):
        assert compact.ms_time(compact.time_ms(text)) == text
    with pytest.raises(ValueError):
        compact.time_ms("2026-03-01T08:30:00Z")


@pytest.mark.parametrize("encrypted", [False, True], ids=["zstd", "zstd+encrypted"])
def test_compressed_segments_are_signed_and_verify_offline(
    mixed: tuple[AuditLocation, audit_proofs.CheckpointSigner],
    tmp_path: Path,
    encrypted: bool,
) -> None:
    location, signer = mixed
    auditor = X25519PrivateKey.generate()
    directory = tmp_path / "archive"
    now = START + (OLD + NEW) * HOUR
    made = archive_older_than(
        location,
        signer,
        directory,
        days=8 * HOUR / 86_400,
        clock=lambda: now,
        compress=True,
        recipient=auditor.public_key() if encrypted else None,
    )
    assert made is not None
    path = directory / made.file_name
    assert made.file_name.endswith(".jsonl.zst")
    envelope = open_envelope(path, signer.public_key)
    assert (envelope["from"], envelope["to"]) == (1, made.last_seq)
    assert (envelope["encryption"] is not None) == encrypted
    # The entries are readable from the segment, with the auditor's key when encrypted.
    if encrypted:
        with pytest.raises(SegmentError), opened_export(path):
            pass
    with opened_export(path, auditor if encrypted else None) as plain:
        assert b"33030219900101" in plain.read_bytes()
    report = verify_with_archives(location, signer.public_key, directory)
    assert (report.code, report.entries) == (OK, audit_proofs.tree_size(location)), report
    # An archived compact entry's proof reads the segment; an encrypted one only its auditor.
    total = audit_proofs.tree_size(location)
    from_files = archived_leaves(location, directory)
    if encrypted:
        with pytest.raises(KeyError, match="encrypted"):
            audit_proofs.inclusion_proof(location, made.last_seq, total, archived=from_files)
    else:
        leaf, proof = audit_proofs.inclusion_proof(
            location, made.last_seq, total, archived=from_files
        )
        root = audit_proofs.tree_root(location, total)
        assert merkle.verify_inclusion(leaf, made.last_seq - 1, total, proof, root)
    if encrypted:
        assert any("encrypted" in note for note in report.notes)
        full = verify_with_archives(location, signer.public_key, directory, auditor_key=auditor)
        assert full.code == OK, full
        other = X25519PrivateKey.generate()  # not the auditor's: nothing decrypts
        wrong = verify_with_archives(location, signer.public_key, directory, auditor_key=other)
        assert wrong.code == EDITED
        assert "does not decrypt" in wrong.problem
    # One byte of the payload changed: the signed envelope no longer matches.
    data = bytearray(path.read_bytes())
    data[-10] ^= 1
    path.write_bytes(bytes(data))
    assert verify_with_archives(location, signer.public_key, directory).code == EDITED


def test_the_cli_archives_encrypted_verifies_with_the_auditor_key_and_reports_stats(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "audit.sqlite"
    fill(db, StepClock(START, step=HOUR), 40, 2)
    auditor = X25519PrivateKey.generate()
    (tmp_path / "auditor.pem").write_bytes(
        auditor.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (tmp_path / "auditor.pub.pem").write_bytes(
        auditor.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    where = ["--db", str(db), "--state-dir", str(tmp_path / "state")]
    archives = str(tmp_path / "archive")
    to = str(tmp_path / "auditor.pub.pem")
    archive = ["audit", "archive", *where, "--older-than-days", "1", "--dir", archives]
    assert cli.main([*archive, "--encrypt-to", to]) == 0
    assert cli.main(["audit", "verify", *where, "--with-archives", archives]) == 0
    assert "encrypted; its signed envelope verified" in capsys.readouterr().out
    assert cli.main(["audit", "verify", *where, "--with-archives", archives,
                     "--auditor-key", str(tmp_path / "auditor.pem")]) == 0  # fmt: skip
    capsys.readouterr()
    assert cli.main(["audit", "stats", *where, "--dir", archives, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["entries"] == got["archived"] + got["live_v2"]
    assert got["archived"] % 32 == 0
    assert got["archived"] > 0
    assert got["archives"][0]["size"] > 0


def test_an_archive_removed_under_retention_leaves_a_signed_tombstone(
    mixed: tuple[AuditLocation, audit_proofs.CheckpointSigner], tmp_path: Path
) -> None:
    location, signer = mixed
    directory = tmp_path / "archive"
    now = START + (OLD + NEW) * HOUR
    made = archive_older_than(
        location, signer, directory, days=8 * HOUR / 86_400, clock=lambda: now, compress=True
    )
    assert made is not None
    assert remove_archives(location, signer, directory, 30, clock=lambda: now + DAY) == []
    (stone,) = remove_archives(
        location, signer, directory, 1, operator="officer-7", clock=lambda: now + 2 * DAY
    )
    assert (stone.first_seq, stone.last_seq) == (1, made.last_seq)
    assert not (directory / made.file_name).exists()
    # The removal is itself in the log, and the log still verifies.
    (entry,) = scan(location, Criteria(kinds=("retention",)))
    assert entry.event.clerk == "officer-7"
    assert made.file_name in entry.event.case_number
    report = verify_with_archives(location, signer.public_key, directory)
    assert report.code == OK, report
    assert any("removed under retention" in note for note in report.notes)
    # A tombstone that does not name the file (or none at all) is a missing archive.
    with attacker(location) as conn:
        conn.execute("UPDATE audit_tombstones SET file_sha256 = ?", ("0" * 64,))
    assert verify_with_archives(location, signer.public_key, directory).code == DELETED
    with attacker(location) as conn:
        conn.execute("DELETE FROM audit_tombstones")
    assert verify_with_archives(location, signer.public_key, directory).code == DELETED


@pytest.mark.postgres
def test_postgresql_partitions_by_month_append_only_and_archives_a_month_by_detaching(
    tmp_path: Path,
) -> None:
    import psycopg

    with fresh_schema() as pg:
        signer = audit_proofs.CheckpointSigner.load(tmp_path)
        clock = StepClock(START, step=DAY)  # 2023-11-14 on: a call a day for two months
        fill(pg, clock, 60, 2)
        months = [
            name
            for (name,) in run_sql(
                pg,
                "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                "JOIN pg_class p ON p.oid = i.inhparent JOIN pg_namespace n "
                "ON n.oid = p.relnamespace WHERE p.relname = 'audit_entries' AND n.nspname = ? "
                "ORDER BY 1",
                (pg.schema,),
            )
        ]
        assert months[0] == "audit_entries_p202311"
        assert len(months) >= 5  # the months written, and two ahead
        # Append-only on every partition, reached directly, even for the owner.
        for statement in (
            f"UPDATE {months[1]} SET subject_id = 'x'",
            f"DELETE FROM {months[1]}",
            f"TRUNCATE {months[1]}",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                run_sql(pg, statement)
        # Archive up to the end of December 2023: November's partition is detached whole.
        now = datetime(2024, 1, 1, tzinfo=UTC).timestamp() + 20 * DAY
        made = archive_older_than(pg, signer, tmp_path / "archive", days=20, clock=lambda: now)
        assert made is not None
        left = {
            name
            for (name,) in run_sql(
                pg,
                "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                "JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'audit_entries' "
                "AND c.relnamespace = p.relnamespace AND p.relnamespace = ?::regnamespace",
                (pg.schema,),
            )
        }
        assert "audit_entries_p202311" not in left
        assert "audit_entries_p202401" in left
        report = verify_with_archives(pg, signer.public_key, tmp_path / "archive")
        assert report.code == OK, report
        fill(pg, clock, 3, 2)  # appends go on after the detach
        assert verify_db(pg, signer.public_key).ok


def test_a_broker_configured_for_format_2_writes_compact_entries(
    tmp_path: Path, dataset_dir: Path, couple: tuple[str, str]
) -> None:
    from tests.helpers import make_config, running_env
    from tests.lookup.test_lookup import lookup

    cfg = make_config(tmp_path, dataset_dir, audit_entry_format=2)
    with running_env(cfg, dataset_dir) as env:
        response = lookup(env, env.token(sub="clerk-042"), "marriage", couple[0])
    db = env.state_dir / "audit.sqlite"
    assert count(db, "audit_log") == 0
    assert count(db, "audit_entries") >= 1
    (entry,) = query(db, QueryFilter(subject_id=couple[0], record_type="marriage"))
    assert (entry.entry_id, entry.entry_hash) == (
        response.receipt.entry_id,
        response.receipt.entry_hash,
    )
    assert entry.event.clerk == "clerk-042"
    assert verify_db(db, None, chain_only=True).ok


def test_a_field_the_compact_format_has_no_place_for_fails_the_append(tmp_path: Path) -> None:
    # A field added to AuditEvent must be added to compact.REST_FIELDS: if it were dropped
    # silently, the rebuilt body would no longer be the hashed one.
    fields = event_fields(make_event())
    fields |= {"entry_id": "0" * 32, "time": "2026-03-01T08:30:00.123Z", "new_field": "x"}
    store = ChainStore.open(backend_for(tmp_path / "audit.sqlite"), entry_format=2)
    try:
        with pytest.raises(ValueError, match="new_field"):
            store.write_batch([fields])
        del fields["new_field"]
        (row,) = store.write_batch([fields])
        assert row.seq == 1
    finally:
        store.close()
