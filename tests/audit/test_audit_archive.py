"""Archival on both backends: old entries move to signed export files; verification spans them.

Entries are written one day apart (a stepping clock), so "older than N days" picks an exact
prefix. After archiving, the live log starts after the watermark and keeps its chain; proofs
still work (the Merkle nodes stay); ``verify --with-archives`` checks every file, the joins
between them and the live remainder, and names a deleted or edited archive file.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from certbroker import config
from certbroker.adapters.demo import synthetic
from certbroker.audit import open_audit_log
from certbroker.audit.archive import ArchiveRecord, archive_older_than, verify_with_archives
from certbroker.audit.export import export, verify_db
from certbroker.audit.integrity import merkle
from certbroker.audit.integrity import proofs as audit_proofs
from certbroker.audit.verify.chain import verify
from certbroker.audit.verify.report import BAD_TREE, DELETED, EDITED, MALFORMED, OK
from certbroker.auth.authenticator import DevIdentityProvider
from certbroker.cli import client
from certbroker.config import AuditLocation, PostgresLocation
from certbroker.v1 import broker_pb2_grpc
from tests.audit.pg_support import attacker, fresh_schema
from tests.audit.test_audit import StepClock, make_event
from tests.helpers import BrokerThread, make_config

DAY = 86_400.0
START = 1_700_000_000.0
BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@dataclass
class Log:
    location: AuditLocation
    signer: audit_proofs.CheckpointSigner
    archive: Path
    clock: StepClock  # the next entry's time; one day per entry


def fill(log: Log, n: int) -> list[int]:
    async def go() -> list[int]:
        async with open_audit_log(log.location, clock=log.clock) as writer:
            return [(await writer.append(make_event(clerk=f"c{i}"))).sequence for i in range(n)]

    return asyncio.run(go())


@pytest.fixture(params=BACKENDS)
def location(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[AuditLocation]:
    if request.param == "sqlite":
        yield tmp_path / "audit.sqlite"
        return
    with fresh_schema() as pg:
        yield pg


@pytest.fixture
def log(location: AuditLocation, tmp_path: Path) -> Log:
    made = Log(
        location,
        audit_proofs.CheckpointSigner.load(tmp_path),
        tmp_path / "archive",
        StepClock(START, step=DAY),
    )
    fill(made, 10)  # entry n written at START + (n - 1) days
    return made


def archive(log: Log, days: float, now_days: float) -> ArchiveRecord | None:
    """Archive entries older than ``days``, as seen ``now_days`` after START."""
    return archive_older_than(
        log.location, log.signer, log.archive, days, clock=lambda: START + now_days * DAY
    )


def test_old_entries_move_to_a_signed_file_and_the_live_log_continues(log: Log) -> None:
    made = archive(log, days=5, now_days=10)  # cutoff START + 5 days: entries 1..5
    assert made is not None
    assert (made.first_seq, made.last_seq) == (1, 5)
    path = log.archive / made.file_name
    assert path.stat().st_mode & 0o777 == 0o600
    header = json.loads(path.read_bytes().splitlines()[0])
    assert (header["from"], header["to"]) == (1, 5)
    notes = header["checkpoints"]
    assert any("\n5\n" in note for note in notes)  # a signed head of exactly its last entry

    live = verify_db(log.location, log.signer.public_key)
    assert (live.code, live.entries) == (OK, 5), live
    assert any("1..5 are archived" in note for note in live.notes)
    assert verify(log.location).archived == 5

    assert fill(log, 3) == [11, 12, 13]  # the chain continues after the archive
    assert verify(log.location).ok
    full = verify_with_archives(log.location, log.signer.public_key, log.archive)
    assert (full.code, full.entries) == (OK, 13), full


def test_proofs_still_work_for_archived_entries(log: Log) -> None:
    archive(log, days=5, now_days=10)
    bodies = (log.archive / "audit-000000000001-000000000005.jsonl").read_bytes().splitlines()
    leaf, path = audit_proofs.inclusion_proof(log.location, 2, 10)
    body = bodies[2][bodies[2].index(b'"body":') + 7 : -1]
    assert leaf == merkle.leaf_hash(body)
    assert merkle.verify_inclusion(leaf, 1, 10, path, audit_proofs.tree_root(log.location, 10))
    with (log.archive / "x.jsonl").open("wb") as out, pytest.raises(ValueError, match="archived"):
        export(log.location, out, 3, 7)


def test_the_archived_part_of_the_tree_is_checked_too(log: Log) -> None:
    audit_proofs.sign_checkpoint(log.location, log.signer, size=3)
    archive(log, days=5, now_days=10)  # 1..5, with a checkpoint of size 5
    # A leaf of an archived entry: its entry is gone, but its parent no longer adds up.
    with attacker(log.location) as conn:
        conn.execute("UPDATE merkle_nodes SET hash = ? WHERE level = 0 AND idx = 2", (bytes(32),))
    report = verify_db(log.location, log.signer.public_key)
    assert (report.code, report.first_bad, report.location) == (
        BAD_TREE,
        3,
        "merkle_nodes[level=1,idx=1].hash",
    ), report
    # The whole tree rebuilt around it, and the checkpoint of size 5 taken away: the
    # checkpoint of size 3 still tells.
    with attacker(log.location) as conn:
        leaves = [
            bytes(h)
            for (h,) in conn.execute(
                "SELECT hash FROM merkle_nodes WHERE level = 0 ORDER BY idx"
            ).fetchall()
        ]
        nodes: list[tuple[int, int, bytes]] = []
        tree = merkle.CompactRange(on_node=lambda level, idx, h: nodes.append((level, idx, h)))
        tree.extend(leaves)
        conn.execute("DELETE FROM merkle_nodes")
        for node in nodes:
            conn.execute("INSERT INTO merkle_nodes (level, idx, hash) VALUES (?, ?, ?)", node)
        if isinstance(log.location, Path):
            conn.execute("UPDATE merkle_state SET frontier = ?", (b"".join(tree.frontier),))
        conn.execute("DELETE FROM checkpoints WHERE size = 5")
    report = verify_db(log.location, log.signer.public_key)
    assert (report.code, report.location) == (BAD_TREE, "merkle_nodes"), report
    assert "checkpoint of size 3" in report.problem


def test_a_malformed_archive_row_is_named(log: Log) -> None:
    archive(log, days=5, now_days=10)
    with attacker(log.location) as conn:
        if isinstance(log.location, Path):  # SQLite keeps any bytes as text
            conn.execute("UPDATE audit_archives SET file_name = CAST(? AS TEXT)", (b"\xff",))
            column = "file_name"
        else:
            conn.execute("UPDATE audit_archives SET last_entry_hash = 'not a hash'")
            column = "last_entry_hash"
    expected = (MALFORMED, f"audit_archives[last_seq=5].{column}")
    report = verify_db(log.location, log.signer.public_key)
    assert (report.code, report.location) == expected, report
    report = verify_with_archives(log.location, log.signer.public_key, log.archive)
    assert (report.code, report.location) == expected, report


def test_nothing_old_enough_archives_nothing(log: Log) -> None:
    assert archive(log, days=30, now_days=10) is None
    assert not log.archive.exists()
    made = archive(log, days=1, now_days=100)  # everything: the live log is then empty
    assert made is not None
    assert (made.first_seq, made.last_seq) == (1, 10)
    assert archive(log, days=1, now_days=100) is None
    assert fill(log, 2) == [11, 12]
    assert verify_with_archives(log.location, log.signer.public_key, log.archive).entries == 12


def test_two_archives_and_the_live_log_verify_as_one(log: Log) -> None:
    first = archive(log, days=7, now_days=10)  # 1..3
    second = archive(log, days=3, now_days=10)  # 4..7
    assert first is not None
    assert second is not None
    assert [(first.first_seq, first.last_seq), (second.first_seq, second.last_seq)] == [
        (1, 3),
        (4, 7),
    ]
    report = verify_with_archives(log.location, log.signer.public_key, log.archive)
    assert (report.code, report.entries) == (OK, 10), report
    assert report.notes[0].startswith("2 archive file(s) verified")


@pytest.fixture
def archived(log: Log) -> tuple[Log, ArchiveRecord, ArchiveRecord]:
    first = archive(log, days=7, now_days=10)
    second = archive(log, days=3, now_days=10)
    assert first is not None
    assert second is not None
    return log, first, second


def test_a_deleted_archive_file_is_caught(
    archived: tuple[Log, ArchiveRecord, ArchiveRecord],
) -> None:
    log, _, second = archived
    (log.archive / second.file_name).unlink()
    report = verify_with_archives(log.location, log.signer.public_key, log.archive)
    assert (report.code, report.first_bad) == (DELETED, 4), report
    assert second.file_name in report.problem


def test_an_edited_archive_file_is_caught_at_the_entry(
    archived: tuple[Log, ArchiveRecord, ArchiveRecord],
) -> None:
    log, _, second = archived
    path = log.archive / second.file_name
    lines = path.read_bytes().splitlines(keepends=True)
    lines[2] = lines[2].replace(b'"clerk":"c4"', b'"clerk":"cX"')  # entry 5 (line 0 = header)
    path.write_bytes(b"".join(lines))
    report = verify_with_archives(log.location, log.signer.public_key, log.archive)
    assert (report.code, report.first_bad) == (EDITED, 5), report


def test_an_archive_file_swapped_for_another_is_caught(
    archived: tuple[Log, ArchiveRecord, ArchiveRecord],
) -> None:
    log, _, second = archived
    path = log.archive / second.file_name
    # A file that verifies on its own (the same entries, one checkpoint fewer) is still not
    # the file that was archived: its sha256 differs from the one recorded.
    lines = path.read_bytes().splitlines(keepends=True)
    header = json.loads(lines[0])
    header["checkpoints"] = header["checkpoints"][-1:]
    lines[0] = json.dumps(header, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    path.write_bytes(b"".join(lines))
    report = verify_with_archives(log.location, log.signer.public_key, log.archive)
    assert (report.code, report.first_bad) == (EDITED, 4), report
    assert "sha256" in report.problem


def test_an_edited_live_remainder_is_caught_after_archives(
    archived: tuple[Log, ArchiveRecord, ArchiveRecord],
) -> None:
    log, _, _ = archived
    audit_proofs.sign_checkpoint(log.location, log.signer)  # covers all 10
    with attacker(log.location) as conn:
        conn.execute("UPDATE audit_log SET body = replace(body, '\"c8\"', '\"cX\"') WHERE seq = 9")
    report = verify_with_archives(log.location, log.signer.public_key, log.archive)
    assert (report.code, report.first_bad) == (EDITED, 9), report


def where(location: AuditLocation) -> list[str]:
    if isinstance(location, PostgresLocation):
        return ["--dsn", location.dsn, "--schema", location.schema]
    return ["--db", str(location)]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "certbroker", "audit", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def test_cli_archive_and_verify_with_archives(log: Log, tmp_path: Path) -> None:
    # Entries are dated from 2023 on: older than 30 days is all of them.
    key = ["--state-dir", str(tmp_path), "--key", str(tmp_path / "cp" / "key.pem")]
    made = cli(
        "archive", *where(log.location), *key, "--dir", str(log.archive), "--older-than-days", "30"
    )
    assert made.returncode == 0, made.stdout + made.stderr
    assert "archived entries 1..10" in made.stdout
    pem = str(tmp_path / "cp" / "key.pub.pem")
    args = ["verify", *where(log.location), "--public-key", pem]
    ok = cli(*args, "--with-archives", str(log.archive))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "ok: 10 entries" in ok.stdout
    next(log.archive.glob("audit-*.jsonl")).unlink()
    gone = cli(*args, "--with-archives", str(log.archive))
    assert gone.returncode == DELETED, gone.stdout
    assert "first bad entry at index 1" in gone.stdout
    assert cli(*args).returncode == 0  # the live log alone is intact (and says what is archived)


def test_the_broker_archives_on_its_own(tmp_path: Path, dataset_dir: Path) -> None:
    cfg = make_config(
        tmp_path,
        dataset_dir,
        archive_after_days=1.0,
        archive_interval_s=0.05,
        checkpoint_interval_s=0.05,
    )
    week_ago = time.time() - 7 * DAY
    broker = BrokerThread(cfg, audit_clock=lambda: week_ago)
    try:
        # Entries of format 2 are archived 32 at a time (archive.py: no unstored Merkle node
        # may span the cut): 31 through the broker's log, then the lookup.
        assert broker.broker is not None
        broker.call(broker.broker.audit.append_many([make_event() for _ in range(31)]))
        subject, _ = synthetic.sample_couple(dataset_dir)
        token = broker_token(cfg)
        with grpc.insecure_channel(broker.target) as channel:
            stub = broker_pb2_grpc.CertificateBrokerStub(channel)
            request = client.lookup_request("marriage", subject, "BDC-ZY-001", "GZ20261121-000001")
            stub.Lookup(request, metadata=client.bearer(token), timeout=30)
        deadline = time.monotonic() + 60  # a wait for the background task, not a speed check
        while not any(cfg.archive_directory.glob("audit-*.jsonl")):
            assert time.monotonic() < deadline, "the broker never archived"
            time.sleep(0.05)
    finally:
        broker.stop()
    signer = audit_proofs.CheckpointSigner.load(cfg.state_dir)
    report = verify_with_archives(cfg.audit_location, signer.public_key, cfg.archive_directory)
    assert (report.code, report.entries) == (OK, 32), report


def broker_token(cfg: config.Config) -> str:
    return DevIdentityProvider(cfg.state_dir).issue(
        "clerk-archive", ("window_clerk",), "gz-haizhu-24h-01"
    )
