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
from contextlib import closing
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from certbroker.adapters.demo import synthetic
from certbroker.audit import archived
from certbroker.audit.archive import archives
from certbroker.audit.scan import Criteria, scan
from certbroker.audit.store.db import backend_for
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
