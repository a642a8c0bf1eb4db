"""Log integrity: Merkle tree beside the chain, proofs, signed checkpoints, export + verify."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from certbroker.audit import SQLiteAuditLog
from certbroker.audit.export import export, verify_db, verify_export
from certbroker.audit.integrity import checkpoint, merkle
from certbroker.audit.integrity import proofs as audit_proofs
from certbroker.audit.integrity.tree import body_leaf
from certbroker.audit.verify.report import (
    BAD_CHECKPOINT,
    DELETED,
    EDITED,
    INSERTED,
    MALFORMED,
    OK,
    REORDERED,
    REWRITTEN,
    TRUNCATED,
    WRONG_KEY,
)
from tests.audit.test_audit import make_event
from tests.helpers import stored_rows

N = 20


FORMATS = [1, 2]  # entry formats, for the cases cheap enough to run on both


def fill(path: Path, n: int, start: int = 0, entry_format: int = 1) -> list[int]:
    async def go() -> list[int]:
        async with SQLiteAuditLog(path, entry_format=entry_format) as log:
            return [
                (await log.append(make_event(clerk=f"clerk-{start + i}"))).sequence
                for i in range(n)
            ]

    return asyncio.run(go())


@pytest.fixture
def entry_format() -> int:
    """The format the log is written in: 1, unless a test parametrizes ``entry_format``."""
    return 1


@pytest.fixture
def log(tmp_path: Path, entry_format: int) -> tuple[Path, audit_proofs.CheckpointSigner]:
    db = tmp_path / "audit.sqlite"
    signer = audit_proofs.CheckpointSigner.load(tmp_path)
    fill(db, 8, entry_format=entry_format)
    audit_proofs.sign_checkpoint(db, signer)
    fill(db, N - 8, start=8, entry_format=entry_format)
    audit_proofs.sign_checkpoint(db, signer)
    return db, signer


def bodies(db: Path) -> list[str]:
    """The stored bodies as hashed (format 2: rebuilt from the row)."""
    return [row.body for row in stored_rows(db)]


@pytest.mark.parametrize("entry_format", FORMATS)
def test_tree_matches_reference_and_leaf_is_the_stored_body(log: tuple[Path, object]) -> None:
    db, _ = log
    leaves = [merkle.leaf_hash(b.encode("utf-8")) for b in bodies(db)]
    for size in range(N + 1):
        assert audit_proofs.tree_root(db, size) == merkle.root(leaves[:size])
    cp = audit_proofs.latest_checkpoint(db)
    assert cp is not None
    assert cp.size == N
    assert cp.root_hash == merkle.root(leaves)


@pytest.mark.parametrize("entry_format", FORMATS)
def test_inclusion_proof_of_a_receipt_verifies_against_a_signed_checkpoint(
    log: tuple[Path, audit_proofs.CheckpointSigner],
) -> None:
    db, signer = log
    cp = audit_proofs.latest_checkpoint(db)
    assert cp is not None
    head = checkpoint.open_note(
        cp.note, signer.public_key, audit_proofs.KEY_NAME, origin=audit_proofs.ORIGIN
    )
    for seq in (1, 7, 8, 13, N):
        leaf, proof = audit_proofs.inclusion_proof(db, seq, head.size)
        assert leaf == body_leaf(bodies(db)[seq - 1])
        assert merkle.verify_inclusion(leaf, seq - 1, head.size, proof, head.root_hash)
        assert not merkle.verify_inclusion(leaf, seq % N, head.size, proof, head.root_hash)
    with pytest.raises(ValueError):
        audit_proofs.inclusion_proof(db, N + 1, N)


@pytest.mark.parametrize("entry_format", FORMATS)
def test_consistency_between_two_checkpoints_verifies(
    log: tuple[Path, audit_proofs.CheckpointSigner],
) -> None:
    db, signer = log
    with sqlite3.connect(db) as conn:
        notes = [str(n) for (n,) in conn.execute("SELECT note FROM checkpoints ORDER BY id")]
    old, new = (checkpoint.open_note(n, signer.public_key, audit_proofs.KEY_NAME) for n in notes)
    proof = audit_proofs.consistency_proof(db, old.size, new.size)
    assert merkle.verify_consistency(old.size, new.size, old.root_hash, new.root_hash, proof)
    assert not merkle.verify_consistency(old.size, new.size, new.root_hash, new.root_hash, proof)


def test_a_pre_merkle_log_is_backfilled(tmp_path: Path) -> None:
    # Format 1: a log from before the Merkle tables predates format 2 too.
    db = tmp_path / "audit.sqlite"
    fill(db, 5)
    with sqlite3.connect(db) as conn:
        conn.execute("DROP TABLE merkle_state")
        conn.execute("DROP TABLE merkle_nodes")
    fill(db, 3)
    leaves = [merkle.leaf_hash(b.encode()) for b in bodies(db)]
    assert audit_proofs.tree_root(db, 8) == merkle.root(leaves)


def test_default_key_is_created_with_its_public_key(tmp_path: Path) -> None:
    signer = audit_proofs.CheckpointSigner.load(tmp_path)
    assert signer.public_key_path == tmp_path / "checkpoint-key" / "public-key.pem"
    again = audit_proofs.CheckpointSigner.load(tmp_path)
    assert again.public_key.public_bytes_raw() == signer.public_key.public_bytes_raw()
    custom = audit_proofs.CheckpointSigner.load(tmp_path, tmp_path / "k" / "cp.pem")
    assert custom.public_key_path.exists()


# --- export + offline verification ---------------------------------------------------------


def write_export(db: Path, path: Path, first: int = 1, last: int | None = None) -> list[bytes]:
    with path.open("wb") as out:
        export(db, out, first, last)
    return path.read_bytes().splitlines(keepends=True)


def rehash(lines: list[bytes], start: int = 1) -> list[bytes]:
    """Recompute every entry's chain hash: an internally consistent rewrite."""
    import hashlib

    header = json.loads(lines[0])
    prev = header["prev_hash"]
    out = [lines[0]]
    for line in lines[1:]:
        entry = json.loads(line)
        body = line[line.index(b'"body":') + 7 : -2]
        prev = hashlib.sha256(prev.encode() + body).hexdigest()
        out.append(line.replace(entry["entry_hash"].encode(), prev.encode()))
    return out


def edit(line: bytes) -> bytes:
    return line.replace(b'"clerk-', b'"clerX-')


TAMPERS = {
    "edited": (lambda ls: [*ls[:5], edit(ls[5]), *ls[6:]], EDITED, 5),
    "deleted": (lambda ls: [*ls[:5], *ls[6:]], DELETED, 5),
    "reordered": (lambda ls: [*ls[:5], ls[6], ls[5], *ls[7:]], REORDERED, 5),
    "inserted": (lambda ls: [*ls[:5], edit(ls[5]), *ls[5:]], INSERTED, 5),
    "truncated": (lambda ls: ls[:-3], TRUNCATED, N - 2),
    "rewritten": (lambda ls: rehash([*ls[:12], edit(ls[12]), *ls[13:]]), REWRITTEN, 9),
}


@pytest.mark.parametrize("entry_format", FORMATS)
@pytest.mark.parametrize("case", sorted(TAMPERS))
def test_every_tamper_on_an_export_is_named_with_its_first_bad_index(
    log: tuple[Path, audit_proofs.CheckpointSigner], tmp_path: Path, case: str
) -> None:
    db, signer = log
    path = tmp_path / "export.jsonl"
    lines = write_export(db, path)
    assert verify_export(path, signer.public_key).code == OK
    tamper, code, first_bad = TAMPERS[case]
    path.write_bytes(b"".join(tamper(lines)))
    report = verify_export(path, signer.public_key)
    assert (report.code, report.first_bad) == (code, first_bad), report


@pytest.mark.parametrize(
    "change",
    [
        {"prev_hash": "é" * 64},
        {"prev_hash": "0" * 63},
        {"prev_hash": "G" * 64},
        {"frontier": ["ü" * 64]},
        {"frontier": [7]},
        {"from": "1"},
    ],
)
def test_a_hostile_header_is_malformed_not_a_crash(
    log: tuple[Path, audit_proofs.CheckpointSigner], tmp_path: Path, change: dict[str, object]
) -> None:
    db, signer = log
    path = tmp_path / "export.jsonl"
    lines = write_export(db, path, 9, N)  # a segment: its header carries a real frontier
    header = json.loads(lines[0]) | change
    path.write_bytes(json.dumps(header).encode() + b"\n" + b"".join(lines[1:]))
    report = verify_export(path, signer.public_key)
    assert report.code == MALFORMED, report


def test_truncation_without_header_claim_is_caught_by_the_checkpoint(
    log: tuple[Path, audit_proofs.CheckpointSigner], tmp_path: Path
) -> None:
    db, signer = log
    path = tmp_path / "export.jsonl"
    lines = write_export(db, path)
    header = json.loads(lines[0])
    header["to"] = N - 3
    lines[0] = json.dumps(header).encode() + b"\n"
    path.write_bytes(b"".join(lines[:-3]))
    report = verify_export(path, signer.public_key)
    assert (report.code, report.first_bad) == (TRUNCATED, N - 2)
    assert "signed checkpoint" in report.problem


def test_a_segment_export_verifies_and_a_wrong_key_is_refused(
    log: tuple[Path, audit_proofs.CheckpointSigner], tmp_path: Path
) -> None:
    db, signer = log
    path = tmp_path / "segment.jsonl"
    write_export(db, path, 9, N)
    report = verify_export(path, signer.public_key)
    assert report.ok
    assert report.entries == N - 8
    assert report.checkpoints == 2
    other = Ed25519PrivateKey.generate().public_key()
    assert verify_export(path, other).code == WRONG_KEY


def test_a_checkpoint_signed_by_another_key_is_refused(
    log: tuple[Path, audit_proofs.CheckpointSigner], tmp_path: Path
) -> None:
    db, signer = log
    rogue = audit_proofs.CheckpointSigner(Ed25519PrivateKey.generate(), tmp_path / "x")
    audit_proofs.sign_checkpoint(db, rogue)
    path = tmp_path / "export.jsonl"
    write_export(db, path)
    assert verify_export(path, signer.public_key).code == WRONG_KEY
    assert verify_db(db, signer.public_key).code == WRONG_KEY


def test_an_altered_checkpoint_is_refused(
    log: tuple[Path, audit_proofs.CheckpointSigner], tmp_path: Path
) -> None:
    db, signer = log
    path = tmp_path / "export.jsonl"
    lines = write_export(db, path)
    lines[0] = lines[0].replace(f"\\n{N}\\n".encode(), f"\\n{N - 1}\\n".encode())
    path.write_bytes(b"".join(lines))
    assert verify_export(path, signer.public_key).code == BAD_CHECKPOINT


# --- the live database -----------------------------------------------------------------------


def _renumber(conn: sqlite3.Connection, table: str) -> None:
    conn.execute(f"UPDATE {table} SET seq = -1 WHERE seq = 6")
    conn.execute(f"UPDATE {table} SET seq = 6 WHERE seq = 7")
    conn.execute(f"UPDATE {table} SET seq = 7 WHERE seq = -1")


# (format 1 statement, format 2 statement, code, first bad entry); in format 2 an entry's
# sequence is one of its hashed values, so a swap is an edit (see test_audit_backends).
DB_TAMPERS = {
    "edited": (
        "UPDATE audit_log SET body = replace(body, 'clerk-5', 'clerX-5') WHERE seq = 6",
        "UPDATE audit_entries SET subject_id = 'X' || subject_id WHERE seq = 6",
        EDITED,
        6,
    ),
    "deleted": (
        "DELETE FROM audit_log WHERE seq = 6",
        "DELETE FROM audit_entries WHERE seq = 6",
        DELETED,
        6,
    ),
    "truncated": (
        "DELETE FROM audit_log WHERE seq > 17",
        "DELETE FROM audit_entries WHERE seq > 17",
        TRUNCATED,
        18,
    ),
}


@pytest.mark.parametrize("entry_format", FORMATS)
@pytest.mark.parametrize("case", [*sorted(DB_TAMPERS), "reordered"])
def test_tamper_on_the_live_db(
    log: tuple[Path, audit_proofs.CheckpointSigner], case: str, entry_format: int
) -> None:
    db, signer = log
    assert verify_db(db, signer.public_key).code == OK
    with sqlite3.connect(db) as conn:
        if case == "reordered":
            _renumber(conn, "audit_log" if entry_format == 1 else "audit_entries")
            code, first_bad = (REORDERED if entry_format == 1 else EDITED), 6
        else:
            *statements, code, first_bad = DB_TAMPERS[case]
            conn.execute(statements[entry_format - 1])
    report = verify_db(db, signer.public_key)
    assert (report.code, report.first_bad) == (code, first_bad), report


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "certbroker", "audit", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def test_cli_export_and_verify_exit_codes(
    log: tuple[Path, audit_proofs.CheckpointSigner], tmp_path: Path
) -> None:
    db, signer = log
    path = tmp_path / "export.jsonl"
    pem = str(signer.public_key_path)
    assert cli("export", "--db", str(db), "--out", str(path)).returncode == 0
    ok = cli("verify", "--export", str(path), "--public-key", pem)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    lines = path.read_bytes().splitlines(keepends=True)
    expected = {
        "edited": 10,
        "deleted": 11,
        "inserted": 12,
        "reordered": 13,
        "truncated": 14,
        "rewritten": 15,
    }
    for case, exit_code in expected.items():
        tamper, _, first_bad = TAMPERS[case]
        bad = tmp_path / f"{case}.jsonl"
        bad.write_bytes(b"".join(tamper(lines)))
        out = cli("verify", "--export", str(bad), "--public-key", pem)
        assert out.returncode == exit_code, out.stdout
        assert f"first bad entry at index {first_bad}" in out.stdout
        as_json = cli("verify", "--export", str(bad), "--public-key", pem, "--json")
        verdict = json.loads(as_json.stdout)
        assert as_json.returncode == exit_code
        assert (verdict["ok"], verdict["code"], verdict["first_bad"]) == (
            False,
            exit_code,
            first_bad,
        )
        assert verdict["problem_name"] == case.upper()
    other = tmp_path / "other.pem"
    checkpoint.generate_key(tmp_path / "other-key.pem", other)
    assert cli("verify", "--export", str(path), "--public-key", str(other)).returncode == 16
    live = cli("verify", "--db", str(db), "--public-key", pem)
    assert live.returncode == 0
    assert "2 signed checkpoint(s)" in live.stdout
    assert "11 deleted entry" in cli("verify", "--help").stdout
