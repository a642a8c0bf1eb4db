"""Every tamper case, on both audit backends (SQLite file and PostgreSQL schema).

The same log (20 entries, signed checkpoints at 8 and 20) is written through the backend's
real store; an attacker with the database's own rights (append-only triggers bypassed) then
edits, deletes, inserts, reorders, truncates or consistently rewrites rows, or adds a checkpoint
signed by another key. ``verify_db`` (and the CLI's exit code) must name the problem and the
first bad entry. Export files taken from either backend are tampered the same way.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from certbroker.audit import QueryFilter, open_audit_log, query
from certbroker.audit.export import export, verify_db, verify_export
from certbroker.audit.integrity import proofs as audit_proofs
from certbroker.audit.integrity.tree import load_state
from certbroker.audit.store import PostgresBackend, SQLiteBackend, backend_for, compact
from certbroker.audit.verify.chain import verify
from certbroker.audit.verify.report import (
    DELETED,
    EDITED,
    INSERTED,
    OK,
    REORDERED,
    REWRITTEN,
    TRUNCATED,
    WRONG_KEY,
)
from certbroker.config import AuditLocation, PostgresLocation
from tests.audit.pg_support import attacker, fresh_schema
from tests.audit.test_audit import make_event
from tests.audit.test_audit_integrity import TAMPERS

N = 20
BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@dataclass
class Log:
    location: AuditLocation
    signer: audit_proofs.CheckpointSigner
    tmp: Path


def fill(location: AuditLocation, n: int, start: int = 0, entry_format: int = 1) -> list[int]:
    async def go() -> list[int]:
        async with open_audit_log(location, entry_format=entry_format) as log:
            return [
                (await log.append(make_event(clerk=f"clerk-{start + i}"))).sequence
                for i in range(n)
            ]

    return asyncio.run(go())


@pytest.fixture(params=BACKENDS)
def location(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[AuditLocation]:
    if request.param == "sqlite":
        yield tmp_path / "audit.sqlite"
        return
    with fresh_schema() as pg:
        yield pg


@pytest.fixture
def entry_format() -> int:
    """The format the log is written in: 1, unless a test parametrizes ``entry_format``."""
    return 1


@pytest.fixture
def log(location: AuditLocation, tmp_path: Path, entry_format: int) -> Log:
    signer = audit_proofs.CheckpointSigner.load(tmp_path)
    fill(location, 8, entry_format=entry_format)
    audit_proofs.sign_checkpoint(location, signer)
    fill(location, N - 8, start=8, entry_format=entry_format)
    audit_proofs.sign_checkpoint(location, signer)
    return Log(location, signer, tmp_path)


def test_the_log_verifies_and_reads_back_on_both_backends(log: Log) -> None:
    report = verify_db(log.location, log.signer.public_key)
    assert (report.code, report.entries, report.checkpoints) == (OK, N, 2), report
    assert verify(log.location).ok
    assert [e.sequence for e in query(log.location, QueryFilter(clerk="clerk-3"))] == [4]
    latest = audit_proofs.latest_checkpoint(log.location)
    assert latest is not None
    assert latest.size == N


# --- one backend interface, chosen once from the location ------------------------------------


def test_the_backend_is_chosen_from_the_location(tmp_path: Path) -> None:
    path = tmp_path / "audit.sqlite"
    assert backend_for(path) == SQLiteBackend(path)
    assert backend_for(str(path)) == SQLiteBackend(path)  # a str is an SQLite path
    pg = PostgresLocation("postgresql://nobody@127.0.0.1:1/none", "certbroker")
    assert backend_for(pg) == PostgresBackend(pg)  # nothing connects until asked
    with pytest.raises(TypeError, match="not an audit location"):
        backend_for(42)  # type: ignore[arg-type]


def test_every_connection_knows_its_backend(log: Log) -> None:
    backend = backend_for(log.location)
    assert backend.exists()
    with closing(backend.connect_read()) as conn:
        assert conn.backend == backend
        assert conn.backend.has_table(conn, "audit_archives")
        assert not conn.backend.has_table(conn, "no_such_table")
        size, _ = load_state(conn)
    assert size == N
    with backend.write_transaction() as conn:
        assert conn.backend == backend


SQLITE_ONLY = """
import asyncio, io, sys
from pathlib import Path

sys.modules["psycopg"] = None  # as if the postgres extra were not installed: import fails

from certbroker import audit
from certbroker.audit.archive import verify_with_archives
from certbroker.audit.export import export, verify_db
from certbroker.audit.integrity import proofs

db, state = Path(sys.argv[1]), Path(sys.argv[2])
event = audit.AuditEvent(
    "lookup", "clerk-1", "hall-07", ("clerk",), "s", "M", "C", "id_card_read", "household",
    "allow", "rule", (), "OK", "OK", "v", "dept", 1.0, "dec-1",
)


async def main() -> None:
    async with audit.open_audit_log(db) as log:
        await log.append_many([event] * 3)


asyncio.run(main())
signer = proofs.CheckpointSigner.load(state)
proofs.sign_checkpoint(db, signer)
assert proofs.inclusion_proof(db, 2, 3)[1]
assert audit.verify_chain(db).ok
assert [e.sequence for e in audit.query(db, audit.QueryFilter())] == [1, 2, 3]
assert export(db, io.BytesIO()) == (1, 3)
assert verify_db(db, signer.public_key).ok
assert verify_with_archives(db, signer.public_key, state / "archive").ok
assert "psycopg" not in {name.partition(".")[0] for name in sys.modules if sys.modules[name]}
print("ok")
"""


def test_an_sqlite_only_install_never_imports_psycopg(tmp_path: Path) -> None:
    """psycopg is imported where a PostgreSQL server is talked to, never with the package."""
    done = subprocess.run(
        [sys.executable, "-c", SQLITE_ONLY, str(tmp_path / "audit.sqlite"), str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert (done.returncode, done.stdout) == (0, "ok\n"), done.stderr


# --- the live database --------------------------------------------------------------------


def _hash(conn: Any, seq: int) -> str:
    return str(conn.execute("SELECT entry_hash FROM audit_log WHERE seq = ?", (seq,)).fetchone()[0])


def _body(conn: Any, seq: int) -> str:
    return str(conn.execute("SELECT body FROM audit_log WHERE seq = ?", (seq,)).fetchone()[0])


def edited(conn: Any) -> None:
    conn.execute("UPDATE audit_log SET body = replace(body, 'clerk-5', 'clerX-5') WHERE seq = 6")


def deleted(conn: Any) -> None:
    conn.execute("DELETE FROM audit_log WHERE seq = 6")


def inserted(conn: Any) -> None:
    # Make room at 6 (negate first: seq is unique), then a forged copy of entry 6, chained.
    conn.execute("UPDATE audit_log SET seq = -seq WHERE seq >= 6")
    conn.execute("UPDATE audit_log SET seq = 1 - seq WHERE seq < 0")
    body = json.loads(_body(conn, 7))
    body.update(entry_id="f" * 32, clerk="mallory")
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    prev = _hash(conn, 5)
    conn.execute(
        "INSERT INTO audit_log (seq, entry_id, time, clerk, subject_id, matter_code, "
        "record_type, decision, body, prev_hash, entry_hash) "
        "VALUES (6, ?, ?, 'mallory', ?, ?, ?, ?, ?, ?, ?)",
        (
            body["entry_id"],
            body["time"],
            body["subject_id"],
            body["matter_code"],
            body["record_type"],
            body["decision"],
            text,
            prev,
            hashlib.sha256((prev + text).encode()).hexdigest(),
        ),
    )


def reordered(conn: Any) -> None:
    conn.execute("UPDATE audit_log SET seq = -1 WHERE seq = 6")
    conn.execute("UPDATE audit_log SET seq = 6 WHERE seq = 7")
    conn.execute("UPDATE audit_log SET seq = 7 WHERE seq = -1")


def truncated(conn: Any) -> None:
    conn.execute("DELETE FROM audit_log WHERE seq > 17")


def rewritten(conn: Any) -> None:
    # Edit entry 13 and re-chain everything after it: internally consistent, so only the
    # signed checkpoint of size 20 can tell (the last one still matching is of size 8).
    prev = _hash(conn, 12)
    for seq in range(13, N + 1):
        body = _body(conn, seq)
        if seq == 13:
            body = body.replace('"clerk-12"', '"clerX-12"')
        entry_hash = hashlib.sha256((prev + body).encode()).hexdigest()
        conn.execute(
            "UPDATE audit_log SET body = ?, clerk = ?, prev_hash = ?, entry_hash = ? WHERE seq = ?",
            (body, json.loads(body)["clerk"], prev, entry_hash, seq),
        )
        prev = entry_hash


# The same tampering of format 2 rows (audit_entries: values typed, strings as audit_terms ids,
# no prev_hash column, the hashed body rebuilt from the row).


SUBJECT = compact.COLUMNS.index("subject_id")


def _compact_values(conn: Any, seq: int) -> list[Any]:
    return list(conn.execute(compact.select_sql(["seq = ?"]), (seq,)).fetchone())


def _compact_body(conn: Any, values: Sequence[Any]) -> str:
    return compact.body_text(conn, compact.Terms(), values)


def _compact_hash(conn: Any, seq: int) -> str:
    return bytes(_compact_values(conn, seq)[-1]).hex()


def edited_v2(conn: Any) -> None:
    conn.execute("UPDATE audit_entries SET subject_id = 'X' || subject_id WHERE seq = 6")


def deleted_v2(conn: Any) -> None:
    conn.execute("DELETE FROM audit_entries WHERE seq = 6")


def inserted_v2(conn: Any) -> None:
    # A forged copy of entry 6 (another entry id), chained on entry 5; the rest renumbered.
    conn.execute("UPDATE audit_entries SET seq = seq + 100 WHERE seq >= 6")
    conn.execute("UPDATE audit_entries SET seq = seq - 99 WHERE seq >= 106")
    values = _compact_values(conn, 7)
    values[0], values[1] = 6, bytes.fromhex("f" * 32)
    prev = _compact_hash(conn, 5)
    values[-1] = hashlib.sha256((prev + _compact_body(conn, values)).encode()).digest()
    marks = ", ".join("?" * len(compact.COLUMNS))
    conn.execute(
        f"INSERT INTO audit_entries ({', '.join(compact.COLUMNS)}) VALUES ({marks})", values
    )


def reordered_v2(conn: Any) -> None:
    conn.execute("UPDATE audit_entries SET seq = -1 WHERE seq = 6")
    conn.execute("UPDATE audit_entries SET seq = 6 WHERE seq = 7")
    conn.execute("UPDATE audit_entries SET seq = 7 WHERE seq = -1")


def truncated_v2(conn: Any) -> None:
    conn.execute("DELETE FROM audit_entries WHERE seq > 17")


def rewritten_v2(conn: Any) -> None:
    # Entry 13 edited and every hash after it recomputed from the rebuilt bodies.
    prev = _compact_hash(conn, 12)
    for seq in range(13, N + 1):
        values = _compact_values(conn, seq)
        if seq == 13:
            values[SUBJECT] = "X" + values[SUBJECT]
        entry_hash = hashlib.sha256((prev + _compact_body(conn, values)).encode()).digest()
        conn.execute(
            "UPDATE audit_entries SET subject_id = ?, entry_hash = ? WHERE seq = ?",
            (values[SUBJECT], entry_hash, seq),
        )
        prev = entry_hash.hex()


# Format 2 stores no sequence apart from the row's own, which the rebuilt (hashed) body
# carries: a row moved or renumbered is a row whose hashed value changed, EDITED at the first
# row renumbered (format 1 bodies keep their sequence, which tells an insertion or a swap).
LIVE_TAMPERS = {
    "edited": ((edited, edited_v2), (EDITED, 6), (EDITED, 6)),
    "deleted": ((deleted, deleted_v2), (DELETED, 6), (DELETED, 6)),
    "inserted": ((inserted, inserted_v2), (INSERTED, 6), (EDITED, 7)),
    "reordered": ((reordered, reordered_v2), (REORDERED, 6), (EDITED, 6)),
    "truncated": ((truncated, truncated_v2), (TRUNCATED, 18), (TRUNCATED, 18)),
    "rewritten": ((rewritten, rewritten_v2), (REWRITTEN, 9), (REWRITTEN, 9)),
}


@pytest.mark.parametrize("entry_format", [1, 2])
@pytest.mark.parametrize("case", sorted(LIVE_TAMPERS))
def test_every_tamper_of_the_live_log_is_named(log: Log, case: str, entry_format: int) -> None:
    tampers, *expected = LIVE_TAMPERS[case]
    with attacker(log.location) as conn:
        tampers[entry_format - 1](conn)
    report = verify_db(log.location, log.signer.public_key)
    assert (report.code, report.first_bad) == expected[entry_format - 1], report


def test_a_rewrite_is_only_caught_with_the_checkpoint_key(log: Log) -> None:
    with attacker(log.location) as conn:
        rewritten(conn)
    assert verify(log.location).ok  # the chain alone is consistent...
    assert verify_db(log.location, log.signer.public_key).code == REWRITTEN  # ...the tree is not


def test_a_checkpoint_signed_by_another_key_is_refused(log: Log) -> None:
    rogue = audit_proofs.CheckpointSigner(Ed25519PrivateKey.generate(), log.tmp / "rogue.pem")
    audit_proofs.sign_checkpoint(log.location, rogue)
    assert verify_db(log.location, log.signer.public_key).code == WRONG_KEY


# --- exports from either backend ------------------------------------------------------------


@pytest.mark.parametrize("entry_format", [1, 2])
@pytest.mark.parametrize("case", sorted(TAMPERS))
def test_every_tamper_of_an_export_is_named(log: Log, case: str, entry_format: int) -> None:
    path = log.tmp / "export.jsonl"
    with path.open("wb") as out:
        export(log.location, out)
    assert verify_export(path, log.signer.public_key).code == OK
    tamper, code, first_bad = TAMPERS[case]
    path.write_bytes(b"".join(tamper(path.read_bytes().splitlines(keepends=True))))
    report = verify_export(path, log.signer.public_key)
    assert (report.code, report.first_bad) == (code, first_bad), report


# --- the command line --------------------------------------------------------------------


def cli(location: AuditLocation, *args: str) -> subprocess.CompletedProcess[str]:
    if isinstance(location, PostgresLocation):
        where = ["--dsn", location.dsn, "--schema", location.schema]
    else:
        where = ["--db", str(location)]
    return subprocess.run(
        [sys.executable, "-m", "certbroker", "audit", args[0], *where, *args[1:]],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def test_cli_verify_exit_codes_on_both_backends(log: Log) -> None:
    pem = str(log.signer.public_key_path)
    ok = cli(log.location, "verify", "--public-key", pem)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert f"ok: {N} entries" in ok.stdout
    assert "2 signed checkpoint(s)" in ok.stdout
    out = log.tmp / "cli-export.jsonl"
    assert cli(log.location, "export", "--out", str(out)).returncode == 0
    assert verify_export(out, log.signer.public_key).ok
    with attacker(log.location) as conn:
        deleted(conn)
    bad = cli(log.location, "verify", "--public-key", pem)
    assert bad.returncode == DELETED, bad.stdout + bad.stderr
    assert "first bad entry at index 6" in bad.stdout
    table = cli(log.location, "query", "--clerk", "clerk-2")
    assert table.returncode == 0, table.stderr
    assert "(1 entries)" in table.stdout
