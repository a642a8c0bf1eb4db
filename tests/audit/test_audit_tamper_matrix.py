"""The tamper matrix: every way of altering a stored log, at its first, a middle and its last
position, is named by ``certbroker audit verify`` with its exact exit code, index and location.

Rows are mutations: entries edited, deleted, swapped, inserted, truncated or consistently
rewritten without re-signing; checkpoint rows (``size``, ``root_hash``, ``time``, the note);
Merkle tree rows (leaves, inner nodes, the cached frontier); malformed values; and no key, the
wrong key, ``--chain-only``. Columns are the live SQLite store, an export, and a representative
subset on a PostgreSQL store (its backend code differs: types, no ``merkle_state``).

The base log (20 entries, checkpoints signed at 8, 15 and 20) is built once per module; each
case alters a copy as an attacker with the file's or the database's own rights would
(append-only triggers bypassed) and runs the verify command in-process
(``certbroker.cli.main.main``, ``--json``). :func:`test_a_real_subprocess_gives_the_same_verdict`
shows that the real command prints the very same verdict and exit code.

The log is in entry format 1 (``MATRIX_FORMAT``): the matrix alters ``audit_log``'s columns
(the JSON body, its indexed copies, the hex hashes) and names their exact locations. The same
kinds of tampering of format 2 rows (``audit_entries``, ``audit_terms``) are in
test_audit_backends.py, test_audit_integrity.py and test_audit_compact.py.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import os
import secrets
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from certbroker.audit.events import GENESIS_HASH
from certbroker.audit.export import export
from certbroker.audit.integrity import checkpoint, merkle
from certbroker.audit.integrity import proofs as audit_proofs
from certbroker.audit.verify.report import (
    BAD_CHECKPOINT,
    BAD_TREE,
    DELETED,
    EDITED,
    INSERTED,
    MALFORMED,
    OK,
    REORDERED,
    REWRITTEN,
    TRUNCATED,
    UNVERIFIED_CHECKPOINTS,
    WRONG_KEY,
)
from certbroker.cli.main import main
from certbroker.config import AuditLocation, PostgresLocation
from tests.audit.pg_support import admin_url, attacker
from tests.audit.test_audit_backends import fill

MATRIX_FORMAT = 1  # the rows every mutation below alters (see the module docstring)
N = 20
SIGNED = (8, 15, 20)
FIRST, MIDDLE, LAST = 1, 10, N
FORGED = hashlib.sha256(b"forged").digest()

Expect = tuple[int, int | None, str | None]
"""(exit code, first bad entry, location) as ``--json`` prints them."""


def rewritten_from(p: int) -> int:
    """REWRITTEN's index for a rewrite starting at entry ``p``: the first entry after the
    last checkpoint that still matches."""
    return max([s for s in SIGNED if s < p], default=0) + 1


# --- the base log, once per module ---------------------------------------------------------


@dataclass(frozen=True)
class Base:
    db: Path
    export: bytes
    pem: Path
    other_pem: Path
    no_key: Path  # a state directory without a checkpoint key


def build(location: AuditLocation, state: Path) -> audit_proofs.CheckpointSigner:
    signer = audit_proofs.CheckpointSigner.load(state)
    done = 0
    for size in SIGNED:
        fill(location, size - done, start=done, entry_format=MATRIX_FORMAT)
        audit_proofs.sign_checkpoint(location, signer)
        done = size
    return signer


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Base:
    tmp = tmp_path_factory.mktemp("matrix")
    db = tmp / "base.sqlite"
    signer = build(db, tmp / "state")
    out = io.BytesIO()
    export(db, out)
    other = tmp / "other.pub.pem"
    checkpoint.generate_key(tmp / "other.pem", other)
    (tmp / "empty").mkdir()
    return Base(db, out.getvalue(), signer.public_key_path, other, tmp / "empty")


@pytest.fixture(scope="module")
def pg_base(tmp_path_factory: pytest.TempPathFactory, base: Base) -> Iterator[PostgresLocation]:
    """The same log in a PostgreSQL schema, signed with the same key (copied state dir)."""
    import psycopg

    url = admin_url()
    location = PostgresLocation(url, f"t_{secrets.token_hex(6)}")
    state = tmp_path_factory.mktemp("pg-state")
    (state / "checkpoint-key").mkdir(mode=0o700)
    for name in ("signing-key.pem", "public-key.pem"):
        source = base.pem.parent / name
        (state / "checkpoint-key" / name).write_bytes(source.read_bytes())
        os.chmod(state / "checkpoint-key" / name, 0o600)
    try:
        build(location, state)
        yield location
    finally:
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute(f"DROP SCHEMA IF EXISTS {location.schema} CASCADE")


PG_TABLES = ("audit_log", "merkle_nodes", "checkpoints", "audit_archives", "audit_meta")


@contextlib.contextmanager
def pg_copy(source: PostgresLocation) -> Iterator[PostgresLocation]:
    """A copy of the base schema's tables (keys, identity and all; not the triggers, which
    the attacker bypasses anyway), dropped afterwards."""
    import psycopg

    copy = PostgresLocation(source.dsn, f"t_{secrets.token_hex(6)}")
    with psycopg.connect(source.dsn, autocommit=True) as admin:
        admin.execute(f"CREATE SCHEMA {copy.schema}")
        for table in PG_TABLES:
            admin.execute(
                f"CREATE TABLE {copy.schema}.{table} (LIKE {source.schema}.{table} INCLUDING ALL)"
            )
            admin.execute(
                f"INSERT INTO {copy.schema}.{table} OVERRIDING SYSTEM VALUE "
                f"SELECT * FROM {source.schema}.{table}"
            )
    try:
        yield copy
    finally:
        with psycopg.connect(source.dsn, autocommit=True) as admin:
            admin.execute(f"DROP SCHEMA IF EXISTS {copy.schema} CASCADE")


def sqlite_copy(base: Base, path: Path) -> Path:
    with (
        contextlib.closing(sqlite3.connect(base.db)) as src,
        contextlib.closing(sqlite3.connect(path)) as dst,
    ):
        src.backup(dst)
    return path


# --- running the command -------------------------------------------------------------------


def verify_in_process(*args: str) -> tuple[int, str]:
    """``certbroker audit verify ARGS`` through the CLI's own entry point: (exit code, stdout)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["audit", "verify", *args])
    return code, out.getvalue()


def verify_subprocess(*args: str) -> tuple[int, str]:
    done = subprocess.run(
        [sys.executable, "-m", "certbroker", "audit", "verify", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    return done.returncode, done.stdout


def verdict(code: int, stdout: str) -> Expect:
    data = json.loads(stdout)
    assert data["code"] == code
    assert data["ok"] is (code == OK)
    return code, data["first_bad"], data["location"]


def where(location: AuditLocation) -> list[str]:
    if isinstance(location, PostgresLocation):
        return ["--dsn", location.dsn, "--schema", location.schema]
    return ["--db", str(location)]


def key_args(base: Base, mode: str) -> list[str]:
    return {
        "key": ["--public-key", str(base.pem)],
        "no-key": ["--state-dir", str(base.no_key)],
        "chain-only": ["--state-dir", str(base.no_key), "--chain-only"],
        "wrong-key": ["--public-key", str(base.other_pem)],
    }[mode]


# --- mutations of a stored log (SQLite or PostgreSQL, through pg_support.attacker) ----------


def _value(conn: Any, sql: str, *params: Any) -> Any:
    return conn.execute(sql, params).fetchone()[0]


def _hash(conn: Any, seq: int) -> str:
    if seq == 0:
        return GENESIS_HASH
    return str(_value(conn, "SELECT entry_hash FROM audit_log WHERE seq = ?", seq))


def _body(conn: Any, seq: int) -> str:
    return str(_value(conn, "SELECT body FROM audit_log WHERE seq = ?", seq))


def _is_sqlite(conn: Any) -> bool:
    return isinstance(conn, sqlite3.Connection)


def edit(conn: Any, p: int) -> None:
    conn.execute(
        "UPDATE audit_log SET body = replace(body, '\"clerk-', '\"clerX-') WHERE seq = ?", (p,)
    )


def delete(conn: Any, p: int) -> None:
    conn.execute("DELETE FROM audit_log WHERE seq = ?", (p,))


def swap(conn: Any, p: int) -> None:
    conn.execute("UPDATE audit_log SET seq = -1 WHERE seq = ?", (p,))
    conn.execute("UPDATE audit_log SET seq = ? WHERE seq = ?", (p, p + 1))
    conn.execute("UPDATE audit_log SET seq = ? WHERE seq = -1", (p + 1,))


def insert(conn: Any, p: int) -> None:
    """A forged entry at ``p``, chained onto entry ``p - 1``; the rest renumbered after it."""
    conn.execute("UPDATE audit_log SET seq = -seq WHERE seq >= ?", (p,))
    conn.execute("UPDATE audit_log SET seq = 1 - seq WHERE seq < 0")
    body = json.loads(_body(conn, p + 1))
    body.update(entry_id="f" * 32, clerk="mallory")
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    prev = _hash(conn, p - 1)
    conn.execute(
        "INSERT INTO audit_log (seq, entry_id, time, clerk, subject_id, matter_code, "
        "record_type, decision, body, prev_hash, entry_hash) "
        "VALUES (?, ?, ?, 'mallory', ?, ?, ?, ?, ?, ?, ?)",
        (
            p,
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


def truncate(conn: Any, p: int) -> None:
    conn.execute("DELETE FROM audit_log WHERE seq >= ?", (p,))


def rechain(conn: Any, p: int) -> None:
    """Edit entry ``p`` and re-hash the chain from it: consistent, but not re-signed."""
    prev = _hash(conn, p - 1)
    for seq in range(p, N + 1):
        body = _body(conn, seq)
        if seq == p:
            body = body.replace('"clerk-', '"clerX-', 1)
        entry_hash = hashlib.sha256((prev + body).encode()).hexdigest()
        conn.execute(
            "UPDATE audit_log SET body = ?, clerk = ?, prev_hash = ?, entry_hash = ? WHERE seq = ?",
            (body, json.loads(body)["clerk"], prev, entry_hash, seq),
        )
        prev = entry_hash


def rebuild_tree(conn: Any) -> None:
    """Recompute every Merkle node (and SQLite's cached state) from the entries as stored."""
    nodes: list[tuple[int, int, bytes]] = []
    tree = merkle.CompactRange(on_node=lambda level, idx, h: nodes.append((level, idx, h)))
    for (body,) in conn.execute("SELECT body FROM audit_log ORDER BY seq").fetchall():
        tree.append(merkle.leaf_hash(str(body).encode()))
    conn.execute("DELETE FROM merkle_nodes")
    for node in nodes:
        conn.execute("INSERT INTO merkle_nodes (level, idx, hash) VALUES (?, ?, ?)", node)
    if _is_sqlite(conn):
        conn.execute(
            "UPDATE merkle_state SET size = ?, frontier = ?", (tree.size, b"".join(tree.frontier))
        )


def rewrite(conn: Any, p: int) -> None:
    """The full consistent rewrite: chain re-hashed and Merkle tables rebuilt."""
    rechain(conn, p)
    rebuild_tree(conn)


def checkpoint_column(column: str, value: Callable[[Any, int], Any]) -> Callable[[Any, int], None]:
    def mutate(conn: Any, k: int) -> None:
        conn.execute(f"UPDATE checkpoints SET {column} = ? WHERE id = ?", (value(conn, k), k))

    return mutate


def _size_of(conn: Any, k: int) -> int:
    return int(_value(conn, "SELECT size FROM checkpoints WHERE id = ?", k))


def _bad_signature(conn: Any, k: int) -> str:
    """The note of checkpoint ``k`` with one bit of its signature flipped."""
    note = str(_value(conn, "SELECT note FROM checkpoints WHERE id = ?", k))
    text, _, sig = note[:-1].rpartition(" ")
    blob = bytearray(base64.b64decode(sig))
    blob[-1] ^= 1
    return f"{text} {base64.b64encode(bytes(blob)).decode()}\n"


def node(level: int, value: Callable[[Any], Any] = lambda conn: FORGED) -> Callable[..., None]:
    def mutate(conn: Any, idx: int) -> None:
        conn.execute(
            "UPDATE merkle_nodes SET hash = ? WHERE level = ? AND idx = ?",
            (value(conn), level, idx),
        )

    return mutate


def delete_leaf(conn: Any, idx: int) -> None:
    conn.execute("DELETE FROM merkle_nodes WHERE level = 0 AND idx = ?", (idx,))


def extra_leaf(conn: Any, idx: int) -> None:
    conn.execute("INSERT INTO merkle_nodes (level, idx, hash) VALUES (0, ?, ?)", (idx, FORGED))


def frontier_hash(conn: Any, k: int) -> None:
    frontier = bytes(_value(conn, "SELECT frontier FROM merkle_state"))
    forged = frontier[: 32 * k] + FORGED + frontier[32 * (k + 1) :]
    conn.execute("UPDATE merkle_state SET frontier = ?", (forged,))


def not_utf8(column: str, table: str = "audit_log", key: str = "seq") -> Callable[..., None]:
    """SQLite keeps whatever bytes it is given as TEXT."""

    def mutate(conn: Any, row: int) -> None:
        conn.execute(
            f"UPDATE {table} SET {column} = CAST(? AS TEXT) WHERE {key} = ?",
            (b'{"seq":\xff\xfe}', row),
        )

    return mutate


def short_hash(conn: Any) -> bytes | str:
    # SQLite: text in a blob column; PostgreSQL (bytea only): a blob that is not 32 bytes.
    return "not a hash" if _is_sqlite(conn) else b"\x01\x02\x03"


def bad_size(conn: Any, k: int) -> Any:
    return "eight" if _is_sqlite(conn) else -1


def bad_root(conn: Any, k: int) -> None:
    if _is_sqlite(conn):
        not_utf8("root_hash", "checkpoints", "id")(conn, k)
    else:
        conn.execute("UPDATE checkpoints SET root_hash = ? WHERE id = ?", (b"\x01\x02", k))


def nothing(conn: Any, p: int) -> None:
    pass


# --- the live stores -----------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    mutate: Callable[[Any, int], None]
    expect: Callable[[int], Expect]
    positions: tuple[int, ...] = (FIRST, MIDDLE, LAST)
    mode: str = "key"  # key, no-key, chain-only, wrong-key
    postgres: bool = True  # in the PostgreSQL subset


CHECKPOINT_ROWS = (1, 2, 3)  # ids of the checkpoints of size 8, 15, 20
LEVEL_2 = (0, 2, 4)  # the five level-2 nodes of 20 leaves: first, middle, last


def _cp(column: str) -> Callable[[int], Expect]:
    return lambda k: (BAD_CHECKPOINT, None, f"checkpoints[id={k}].{column}")


LIVE: dict[str, Case] = {
    "intact": Case(nothing, lambda p: (OK, None, None), (0,)),
    "edit": Case(edit, lambda p: (EDITED, p, None)),
    "delete": Case(delete, lambda p: (TRUNCATED if p == N else DELETED, p, None)),
    "swap": Case(swap, lambda p: (REORDERED, p, None), (FIRST, MIDDLE, N - 1)),
    "insert": Case(insert, lambda p: (INSERTED, p, None)),
    "insert-before-checkpoint": Case(insert, lambda p: (INSERTED, p, None), SIGNED),
    "truncate": Case(truncate, lambda p: (TRUNCATED, p, None)),
    "rewrite": Case(rewrite, lambda p: (REWRITTEN, rewritten_from(p), None)),
    "rewrite-tree-kept": Case(rechain, lambda p: (REWRITTEN, rewritten_from(p), None)),
    # Without a key nothing may pass as intact: the rewrite is "not verified" ...
    "rewrite-no-key": Case(
        rewrite, lambda p: (UNVERIFIED_CHECKPOINTS, None, "checkpoints"), mode="no-key"
    ),
    # ... or, if the attacker left the tree alone, the tree names the entry.
    "rewrite-tree-kept-no-key": Case(
        rechain,
        lambda p: (BAD_TREE, p, f"merkle_nodes[level=0,idx={p - 1}].hash"),
        mode="no-key",
    ),
    "checkpoint-root_hash": Case(
        checkpoint_column("root_hash", lambda conn, k: FORGED), _cp("root_hash"), CHECKPOINT_ROWS
    ),
    "checkpoint-size": Case(
        checkpoint_column("size", lambda conn, k: _size_of(conn, k) - 1),
        _cp("size"),
        CHECKPOINT_ROWS,
    ),
    "checkpoint-time": Case(
        checkpoint_column("time", lambda conn, k: "2001-02-03T04:05:06.007Z"),
        _cp("time"),
        CHECKPOINT_ROWS,
        postgres=False,
    ),
    "checkpoint-note": Case(
        checkpoint_column("note", _bad_signature), _cp("note"), CHECKPOINT_ROWS
    ),
    # The row disagreeing with its own note needs no key to be seen.
    "checkpoint-root_hash-no-key": Case(
        checkpoint_column("root_hash", lambda conn, k: FORGED),
        _cp("root_hash"),
        CHECKPOINT_ROWS,
        mode="no-key",
        postgres=False,
    ),
    "wrong-key": Case(
        nothing, lambda p: (WRONG_KEY, None, "checkpoints[id=1].note"), (0,), mode="wrong-key"
    ),
    "tree-leaf": Case(
        lambda conn, p: node(0)(conn, p - 1),
        lambda p: (BAD_TREE, p, f"merkle_nodes[level=0,idx={p - 1}].hash"),
    ),
    "tree-inner": Case(
        node(2), lambda j: (BAD_TREE, 4 * j + 1, f"merkle_nodes[level=2,idx={j}].hash"), LEVEL_2
    ),
    "tree-leaf-missing": Case(
        lambda conn, p: delete_leaf(conn, p - 1),
        lambda p: (BAD_TREE, p, f"merkle_nodes[level=0,idx={p - 1}]"),
    ),
    "tree-leaf-extra": Case(
        extra_leaf, lambda idx: (BAD_TREE, None, f"merkle_nodes[level=0,idx={idx}]"), (N,)
    ),
    "tree-frontier": Case(
        frontier_hash,
        lambda k: (BAD_TREE, None, "merkle_state[id=1].frontier"),
        (0, 1),  # 20 = 16 + 4: two frontier hashes
        postgres=False,  # PostgreSQL keeps no frontier
    ),
    "tree-size": Case(
        lambda conn, p: conn.execute("UPDATE merkle_state SET size = ?", (p,)),
        lambda p: (BAD_TREE, None, "merkle_state[id=1].size"),
        (N - 1,),
        postgres=False,
    ),
    "malformed-body": Case(
        not_utf8("body"),
        lambda p: (MALFORMED, p, f"audit_log[seq={p}].body"),
        postgres=False,  # PostgreSQL refuses text that is not UTF-8
    ),
    "malformed-entry_hash": Case(
        not_utf8("entry_hash"),
        lambda p: (MALFORMED, p, f"audit_log[seq={p}].entry_hash"),
        postgres=False,
    ),
    "malformed-clerk": Case(
        not_utf8("clerk"), lambda p: (MALFORMED, p, f"audit_log[seq={p}].clerk"), postgres=False
    ),
    "malformed-root_hash": Case(
        bad_root, lambda k: (MALFORMED, None, f"checkpoints[id={k}].root_hash"), CHECKPOINT_ROWS
    ),
    "malformed-size": Case(
        checkpoint_column("size", bad_size),
        lambda k: (MALFORMED, None, f"checkpoints[id={k}].size"),
        CHECKPOINT_ROWS,
    ),
    "malformed-node": Case(
        lambda conn, p: node(0, short_hash)(conn, p - 1),
        lambda p: (MALFORMED, p, f"merkle_nodes[level=0,idx={p - 1}].hash"),
    ),
    "malformed-frontier": Case(
        lambda conn, p: conn.execute("UPDATE merkle_state SET frontier = ?", (b"\x01\x02",)),
        lambda p: (MALFORMED, None, "merkle_state[id=1].frontier"),
        (0,),
        postgres=False,
    ),
    "intact-no-key": Case(
        nothing, lambda p: (UNVERIFIED_CHECKPOINTS, None, "checkpoints"), (0,), mode="no-key"
    ),
    "intact-chain-only": Case(nothing, lambda p: (OK, None, None), (0,), mode="chain-only"),
    "edit-chain-only": Case(edit, lambda p: (EDITED, p, None), mode="chain-only"),
    "tree-leaf-chain-only": Case(
        lambda conn, p: node(0)(conn, p - 1),
        lambda p: (BAD_TREE, p, f"merkle_nodes[level=0,idx={p - 1}].hash"),
        mode="chain-only",
        postgres=False,
    ),
}


def grid(cases: Mapping[str, Case | ExportCase], postgres: bool = False) -> list[tuple[str, int]]:
    """(case, position) pairs; ``postgres``: only those of the PostgreSQL subset."""
    return [
        (name, at)
        for name, case in cases.items()
        if not postgres or getattr(case, "postgres", False)
        for at in case.positions
    ]


def run_live(base: Base, location: AuditLocation, name: str, at: int) -> Expect:
    case = LIVE[name]
    with attacker(location) as conn:
        case.mutate(conn, at)
    return verdict(*verify_in_process(*where(location), *key_args(base, case.mode), "--json"))


@pytest.mark.parametrize(("name", "at"), grid(LIVE))
def test_live_sqlite(base: Base, tmp_path: Path, name: str, at: int) -> None:
    location = sqlite_copy(base, tmp_path / "audit.sqlite")
    assert run_live(base, location, name, at) == LIVE[name].expect(at)


@pytest.mark.postgres
@pytest.mark.parametrize(("name", "at"), grid(LIVE, postgres=True))
def test_live_postgres(base: Base, pg_base: PostgresLocation, name: str, at: int) -> None:
    with pg_copy(pg_base) as location:
        assert run_live(base, location, name, at) == LIVE[name].expect(at)


# --- exports -------------------------------------------------------------------------------

Lines = list[bytes]  # header, then one line per entry (entry p at index p)


def _entry_body(line: bytes) -> bytes:
    return line[line.index(b'"body":') + 7 : -2]


def _line(seq: int, entry_hash: str, body: bytes) -> bytes:
    return b'{"seq":%d,"entry_hash":"%s","body":%s}\n' % (seq, entry_hash.encode(), body)


def _prev(lines: Lines, p: int) -> str:
    if p == 1:
        return str(json.loads(lines[0])["prev_hash"])
    return str(json.loads(lines[p - 1])["entry_hash"])


def x_edit(lines: Lines, p: int) -> Lines:
    return [*lines[:p], lines[p].replace(b'"clerk-', b'"clerX-'), *lines[p + 1 :]]


def x_rechain(lines: Lines, p: int) -> Lines:
    out, prev = x_edit(lines, p)[:p], _prev(lines, p)
    for seq, line in enumerate(x_edit(lines, p)[p:], p):
        prev = hashlib.sha256(prev.encode() + _entry_body(line)).hexdigest()
        out.append(_line(seq, prev, _entry_body(line)))
    return out


def x_insert(lines: Lines, p: int) -> Lines:
    """A forged entry chained onto entry ``p - 1``; the later lines renumbered after it."""
    body = _entry_body(lines[p]).replace(b'"clerk-', b'"clerX-')
    forged = _line(p, hashlib.sha256(_prev(lines, p).encode() + body).hexdigest(), body)
    later = [
        line.replace(b'{"seq":%d,' % seq, b'{"seq":%d,' % (seq + 1), 1)
        for seq, line in enumerate(lines[p:], p)
    ]
    return [*lines[:p], forged, *later]


def x_note(lines: Lines, k: int) -> Lines:
    header = json.loads(lines[0])
    note = header["checkpoints"][k]
    text, _, sig = note[:-1].rpartition(" ")
    blob = bytearray(base64.b64decode(sig))
    blob[-1] ^= 1
    header["checkpoints"][k] = f"{text} {base64.b64encode(bytes(blob)).decode()}\n"
    return [json.dumps(header).encode() + b"\n", *lines[1:]]


def x_malformed(lines: Lines, p: int) -> Lines:
    return [*lines[:p], lines[p].replace(b'"entry_hash"', b'"entry_hsh"'), *lines[p + 1 :]]


def x_appended(lines: Lines, p: int) -> Lines:
    """An entry after the header's last one, chained on."""
    body = _entry_body(lines[N]).replace(b'"clerk-', b'"clerX-')
    prev = str(json.loads(lines[N])["entry_hash"])
    return [*lines, _line(p, hashlib.sha256(prev.encode() + body).hexdigest(), body)]


@dataclass(frozen=True)
class ExportCase:
    mutate: Callable[[Lines, int], Lines]
    expect: Callable[[int], Expect]
    positions: tuple[int, ...] = (FIRST, MIDDLE, LAST)
    mode: str = "key"


EXPORT: dict[str, ExportCase] = {
    "intact": ExportCase(lambda ls, p: ls, lambda p: (OK, None, None), (0,)),
    "edit": ExportCase(x_edit, lambda p: (EDITED, p, None)),
    "delete": ExportCase(
        lambda ls, p: [*ls[:p], *ls[p + 1 :]], lambda p: (TRUNCATED if p == N else DELETED, p, None)
    ),
    "swap": ExportCase(
        lambda ls, p: [*ls[:p], ls[p + 1], ls[p], *ls[p + 2 :]],
        lambda p: (REORDERED, p, None),
        (FIRST, MIDDLE, N - 1),
    ),
    "insert": ExportCase(x_insert, lambda p: (INSERTED, p, None)),
    "insert-before-checkpoint": ExportCase(x_insert, lambda p: (INSERTED, p, None), SIGNED),
    "appended": ExportCase(x_appended, lambda p: (INSERTED, p, None), (N + 1,)),
    "truncate": ExportCase(lambda ls, p: ls[:p], lambda p: (TRUNCATED, p, None)),
    "rewrite": ExportCase(x_rechain, lambda p: (REWRITTEN, rewritten_from(p), None)),
    "rewrite-no-key": ExportCase(
        x_rechain, lambda p: (UNVERIFIED_CHECKPOINTS, None, "header checkpoints"), mode="no-key"
    ),
    "checkpoint-note": ExportCase(
        x_note, lambda k: (BAD_CHECKPOINT, None, f"header checkpoints[{k}]"), (0, 1, 2)
    ),
    "malformed-line": ExportCase(x_malformed, lambda p: (MALFORMED, p, f"line {p + 1}")),
    "wrong-key": ExportCase(
        lambda ls, p: ls, lambda p: (WRONG_KEY, None, "header checkpoints[0]"), (0,), "wrong-key"
    ),
    "intact-no-key": ExportCase(
        lambda ls, p: ls,
        lambda p: (UNVERIFIED_CHECKPOINTS, None, "header checkpoints"),
        (0,),
        "no-key",
    ),
    "intact-chain-only": ExportCase(
        lambda ls, p: ls, lambda p: (OK, None, None), (0,), "chain-only"
    ),
    "edit-chain-only": ExportCase(x_edit, lambda p: (EDITED, p, None), mode="chain-only"),
}


def run_export(base: Base, tmp_path: Path, name: str, at: int) -> Expect:
    case = EXPORT[name]
    path = tmp_path / "export.jsonl"
    path.write_bytes(b"".join(case.mutate(base.export.splitlines(keepends=True), at)))
    args = ["--export", str(path), *key_args(base, case.mode), "--json"]
    return verdict(*verify_in_process(*args))


@pytest.mark.parametrize(("name", "at"), grid(EXPORT))
def test_export(base: Base, tmp_path: Path, name: str, at: int) -> None:
    assert run_export(base, tmp_path, name, at) == EXPORT[name].expect(at)


# --- the real command, and what it prints --------------------------------------------------

SUBPROCESS = [
    ("live", "malformed-root_hash", 2),
    ("live", "insert", LAST),
    ("live", "tree-inner", 2),
    ("live", "rewrite-no-key", MIDDLE),
    ("live", "checkpoint-size", 3),
    ("export", "malformed-line", MIDDLE),
    ("export", "intact-chain-only", 0),
]
TEXT_TOO = {"rewrite-no-key", "malformed-line"}


@pytest.mark.parametrize(("where_", "name", "at"), SUBPROCESS)
def test_a_real_subprocess_gives_the_same_verdict(
    base: Base, tmp_path: Path, where_: str, name: str, at: int
) -> None:
    if where_ == "live":
        location = sqlite_copy(base, tmp_path / "audit.sqlite")
        with attacker(location) as conn:
            LIVE[name].mutate(conn, at)
        args = [*where(location), *key_args(base, LIVE[name].mode)]
    else:
        path = tmp_path / "export.jsonl"
        lines = EXPORT[name].mutate(base.export.splitlines(keepends=True), at)
        path.write_bytes(b"".join(lines))
        args = ["--export", str(path), *key_args(base, EXPORT[name].mode)]
    assert verify_subprocess(*args, "--json") == verify_in_process(*args, "--json")
    if name in TEXT_TOO:  # and the text a person reads (the codes' names, the location)
        assert verify_subprocess(*args) == verify_in_process(*args)


def test_without_a_key_a_rewritten_copy_is_not_reported_intact(base: Base, tmp_path: Path) -> None:
    """The issue's case: entry edited, chain re-hashed, Merkle tables rebuilt, no key found."""
    location = sqlite_copy(base, tmp_path / "audit.sqlite")
    with attacker(location) as conn:
        rewrite(conn, MIDDLE)
    code, out = verify_in_process("--db", str(location), "--state-dir", str(base.no_key))
    assert code == UNVERIFIED_CHECKPOINTS, out
    assert out.startswith("NOT VERIFIED (UNVERIFIED_CHECKPOINTS):")
    assert "DISAGREE with the entries at size(s) 15, 20" in out
    code, out = verify_in_process("--db", str(location), "--public-key", str(base.pem))
    assert code == REWRITTEN, out
    assert "first bad entry at index 9" in out


def test_chain_only_says_the_checkpoints_were_not_checked(base: Base, tmp_path: Path) -> None:
    location = sqlite_copy(base, tmp_path / "audit.sqlite")
    with attacker(location) as conn:
        rewrite(conn, MIDDLE)
    code, out = verify_in_process("--db", str(location), "--chain-only")
    assert code == OK
    assert "note: checkpoints NOT checked (--chain-only): 3 stored" in out
    verdict_line = out.splitlines()[-1]
    assert verdict_line.startswith("ok (chain only): 20 entries, hash chain and Merkle tree")
    assert "signed checkpoints NOT checked" in verdict_line
    data = json.loads(verify_in_process("--db", str(location), "--chain-only", "--json")[1])
    assert (data["ok"], data["chain_only"], data["checkpoints"]) == (True, True, 0)
    # --chain-only and a key contradict each other: a usage error, not a silent choice.
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code, _ = verify_in_process("--db", str(location), "--chain-only", "--public-key", "k")
    assert code == 2
    assert "--chain-only" in err.getvalue()


def test_an_intact_log_with_its_key_says_ok(base: Base, tmp_path: Path) -> None:
    location = sqlite_copy(base, tmp_path / "audit.sqlite")
    code, out = verify_in_process("--db", str(location), "--public-key", str(base.pem))
    assert (code, out.splitlines()[-1]) == (
        OK,
        f"ok: {N} entries, hash chain intact, 3 signed checkpoint(s) match ({location})",
    )
