"""The citizen's readers across archive files of every kind, on a real broker.

A subject's accesses in three rounds on the broker's audit clock: 30 days ago (then archived to
a zstd segment), 20 days ago (then archived to a segment encrypted to an auditor's key) and a
day ago (live). CitizenReport and MyAccesses list the first and last rounds, in order, and
name the encrypted range as not searched: the broker does not hold the auditor's key.
:mod:`certbroker.audit.archived` is also checked directly: its subject prefilter must not lose
an entry, and a changed segment is reported, not read.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import closing
from itertools import pairwise
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from certbroker.adapters.demo import synthetic
from certbroker.audit import archived
from certbroker.audit.archive import archive_older_than, archives
from certbroker.audit.events import GENESIS_HASH, parse_entry
from certbroker.audit.integrity import proofs as audit_proofs
from certbroker.audit.retention import remove_archives
from certbroker.audit.scan import Criteria, scan
from certbroker.audit.store.db import backend_for
from certbroker.config import AuditLocation
from tests.audit.pg_support import fresh_schema
from tests.audit.test_audit import StepClock
from tests.audit.test_audit_compact import BACKENDS, HOUR, NEW, OLD, START, fill
from tests.audit.test_mixed_log_end_to_end import (
    accesses,
    citizen_report_reply,
    my_accesses_reply,
    run,
)
from tests.helpers import FakeClock, make_config, running_env

DAY = 86_400.0
NOW = time.time()


def test_citizen_readers_read_zstd_archives_and_name_encrypted_ranges(
    tmp_path: Path, dataset_dir: Path
) -> None:
    subject, _ = synthetic.sample_couple(dataset_dir)
    auditor_key = X25519PrivateKey.generate()
    recipient = tmp_path / "auditor.pub.pem"
    recipient.write_bytes(
        auditor_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    clock = FakeClock(NOW - 30 * DAY)
    # Format 1: an archive cuts exactly at the age cutoff (format 2 cuts on multiples of 32).
    cfg = make_config(tmp_path, dataset_dir, audit_entry_format=1, checkpoint_interval_s=3600.0)
    directory = cfg.archive_directory
    archive = ["audit", "archive", "--state-dir", str(cfg.state_dir), "--dir", str(directory),
               "--older-than-days", "10"]  # fmt: skip
    with running_env(cfg, dataset_dir, audit_clock=clock) as env:
        first, first_reply = accesses(env, subject)
        code, out = run([*archive, "--compress"])
        assert code == 0, out
        clock.now = NOW - 20 * DAY
        second, second_reply = accesses(env, subject)
        code, out = run([*archive, "--encrypt-to", str(recipient)])
        assert code == 0, out
        clock.now = NOW - DAY
        third, _ = accesses(env, subject)
        assert sorted(p.name.endswith(".jsonl.zst") for p in directory.iterdir()) == [True, True]

        report = citizen_report_reply(env, subject)
        for reply in (report, my_accesses_reply(env, subject)):
            assert [a.entry_id for a in reply.accesses] == [*first, *third]
            (gap,) = reply.unsearched
            assert gap.reason == "ENCRYPTED"
            assert gap.first_sequence <= second_reply.receipt.sequence <= gap.last_sequence
            assert gap.first_sequence > first_reply.receipt.sequence
            assert "encrypted to the auditor's key" in gap.description
        # An archived access comes with the same details as a live one.
        archived_access = report.accesses[0]
        assert (archived_access.decision, archived_access.record_type) == ("allow", "marriage")
        assert archived_access.fields
        assert len(second) == 5

    # Directly: the prefilter finds what parsing every entry finds; a changed segment is named.
    location = cfg.audit_location
    criteria = Criteria(subject_id=subject, kinds=("lookup",))
    found = archived.search(location, directory, criteria)
    assert [e.entry_id for e in found.entries] == first
    assert [g.reason for g in found.unsearched] == ["ENCRYPTED"]
    everything = archived.search(location, directory, Criteria())
    assert [e.entry_id for e in everything.entries if archived.matches(e, criteria)] == first
    assert len(scan(location, Criteria(subject_id=subject, kinds=("lookup",)))) == 5
    paged = archived.scan_with_archives(location, directory, criteria, limit=2)
    assert [e.entry_id for e in paged.entries] == first[:2]
    with closing(backend_for(location).connect_read()) as conn:
        plain_name = archives(conn)[0].file_name
    segment = directory / plain_name
    data = bytearray(segment.read_bytes())
    data[-10] ^= 1
    segment.write_bytes(bytes(data))
    changed = archived.search(location, directory, criteria)
    assert changed.entries == []
    assert [g.reason for g in changed.unsearched] == ["FILE_CHANGED", "ENCRYPTED"]


@pytest.fixture(params=BACKENDS)
def mixed(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[AuditLocation, audit_proofs.CheckpointSigner]]:
    """A log of entries in format 1, then format 2 (SQLite or PostgreSQL), and its signer."""
    signer = audit_proofs.CheckpointSigner.load(tmp_path)

    def filled(where: AuditLocation) -> tuple[AuditLocation, audit_proofs.CheckpointSigner]:
        clock = StepClock(START, step=HOUR)
        fill(where, clock, OLD, 1)
        fill(where, clock, NEW, 2)
        return where, signer

    if request.param == "sqlite":
        yield filled(tmp_path / "audit.sqlite")
        return
    with fresh_schema() as pg:
        yield filled(pg)


def test_search_by_blocks_finds_what_reading_every_entry_finds(
    mixed: tuple[AuditLocation, audit_proofs.CheckpointSigner],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Both entry formats, in SQLite and PostgreSQL; blocks of 97 bytes, so matching lines
    and the lines before them straddle block ends."""
    location, signer = mixed
    directory = tmp_path / "archive"
    later = START + 1000 * DAY
    record = archive_older_than(location, signer, directory, 1, clock=lambda: later)
    assert record is not None
    every = archived.search(location, directory, Criteria())
    assert not every.unsearched
    assert [e.sequence for e in every.entries] == list(range(1, record.last_seq + 1))
    assert every.entries[0].prev_hash == GENESIS_HASH
    assert all(b.prev_hash == a.entry_hash for a, b in pairwise(every.entries))
    monkeypatch.setattr(archived, "_BLOCK", 97)
    subjects = sorted({e.event.subject_id for e in every.entries} - {""})
    clerks = sorted({e.event.clerk for e in every.entries} - {""})
    assert len(subjects) > 1
    assert len(clerks) > 1
    for criteria in (
        *(Criteria(subject_id=s) for s in subjects),
        *(Criteria(clerk=c, decision="deny") for c in clerks),
        Criteria(subject_id=subjects[0], after=10, before=record.last_seq - 5),
    ):
        found = archived.search(location, directory, criteria)
        assert found.entries == [e for e in every.entries if archived.matches(e, criteria)]
        assert found.entries
    for seq in (1, 2, record.last_seq // 2, record.last_seq):
        body, prev_hash = archived.entry_at(location, directory, seq)
        entry = every.entries[seq - 1]
        assert prev_hash == entry.prev_hash
        assert parse_entry(seq, body, prev_hash, entry.entry_hash) == entry
    with pytest.raises(KeyError):
        archived.entry_at(location, directory, record.last_seq + 1)
    # Removed under retention (a tombstone names the file): said so, not "missing".
    (stone,) = remove_archives(location, signer, directory, 1, clock=lambda: later + 2 * DAY)
    assert stone.file_name == record.file_name
    gone = archived.search(location, directory, Criteria(subject_id=subjects[0]))
    assert gone.entries == []
    assert [g.reason for g in gone.unsearched] == ["REMOVED"]
    with pytest.raises(archived.ArchiveUnreadable) as info:
        archived.entry_at(location, directory, 1)
    assert info.value.gap.reason == "REMOVED"
