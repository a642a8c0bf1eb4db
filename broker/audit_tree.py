"""The audit log's Merkle tree as stored next to the entries (SQLite tables ``merkle_*``).

Leaf *i* (0-based) of the tree is entry ``seq = i + 1``; its leaf hash is
``merkle.leaf_hash(UTF-8(body))`` over the ``body`` column text exactly as stored (the same
text the hash chain covers). Two tables, written in the SAME transaction as the entries, so the
tree can never disagree with a committed log:

``merkle_state`` (one row, ``id = 1``)
    ``size`` = number of leaves, ``frontier`` = the :class:`~broker.merkle.CompactRange`
    frontier, its 32-byte hashes concatenated (leftmost first). Enough to append and to get the
    current root without reading any entry.
``merkle_nodes`` (``level, idx, hash``)
    Every perfect subtree reported by ``CompactRange``'s ``on_node`` (level 0 = leaf hashes),
    so inclusion and consistency proofs at ANY tree size take O(log n) lookups through
    :func:`broker.merkle.perfect_subtree_hasher` and never load the leaves.

A log written before these tables existed is backfilled on first open by the writer.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

from broker.merkle import HASH_SIZE, CompactRange, leaf_hash, perfect_subtree_hasher

TREE_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS merkle_state (
        id       INTEGER PRIMARY KEY CHECK (id = 1),
        size     INTEGER NOT NULL,
        frontier BLOB NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS merkle_nodes (
        level INTEGER NOT NULL,
        idx   INTEGER NOT NULL,
        hash  BLOB NOT NULL,
        PRIMARY KEY (level, idx)
    ) WITHOUT ROWID""",
)
_INSERT_NODE = "INSERT OR REPLACE INTO merkle_nodes (level, idx, hash) VALUES (?, ?, ?)"


def body_leaf(body: str) -> bytes:
    """The RFC 9162 leaf hash of an entry: over its stored body text as UTF-8."""
    return leaf_hash(body.encode("utf-8"))


class TreeWriter:
    """Appends leaves inside the caller's open write transaction and persists the nodes."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self._nodes: list[tuple[int, int, bytes]] = []
        size, frontier = load_state(conn)
        self.range = CompactRange(size, frontier, on_node=self._on_node)

    def _on_node(self, level: int, index: int, digest: bytes) -> None:
        self._nodes.append((level, index, digest))

    def append(self, body: str) -> None:
        """Add the entry with stored body ``body`` as the next leaf."""
        self.range.append(body_leaf(body))

    def flush(self) -> None:
        """Write the new nodes and the state; still inside the caller's transaction."""
        self._conn.executemany(_INSERT_NODE, self._nodes)
        self._nodes.clear()
        self._conn.execute(
            "INSERT OR REPLACE INTO merkle_state (id, size, frontier) VALUES (1, ?, ?)",
            (self.range.size, b"".join(self.range.frontier)),
        )


def load_state(conn: sqlite3.Connection) -> tuple[int, list[bytes]]:
    """The stored tree size and frontier ((0, []) for an empty or pre-Merkle log)."""
    row = conn.execute("SELECT size, frontier FROM merkle_state WHERE id = 1").fetchone()
    if row is None:
        return 0, []
    blob = bytes(row[1])
    return int(row[0]), [blob[i : i + HASH_SIZE] for i in range(0, len(blob), HASH_SIZE)]


def backfill(conn: sqlite3.Connection) -> int:
    """Add leaves for stored entries the tree does not cover yet (a log from before the tree).

    Call inside a write transaction; returns how many leaves were added.
    """
    writer = TreeWriter(conn)
    start = writer.range.size
    added = 0
    for (body,) in conn.execute("SELECT body FROM audit_log WHERE seq > ? ORDER BY seq", (start,)):
        writer.append(str(body))
        added += 1
    if added:
        writer.flush()
    return added


def node_reader(conn: sqlite3.Connection) -> Callable[[int, int], bytes]:
    """``node(level, index)`` from ``merkle_nodes``; KeyError if it is not stored."""

    def node(level: int, index: int) -> bytes:
        row = conn.execute(
            "SELECT hash FROM merkle_nodes WHERE level = ? AND idx = ?", (level, index)
        ).fetchone()
        if row is None:
            raise KeyError(f"merkle node ({level}, {index}) not stored")
        return bytes(row[0])

    return node


def root_at(conn: sqlite3.Connection, size: int) -> bytes:
    """MTH of the first ``size`` leaves, from stored nodes (O(log n) lookups)."""
    stored, _ = load_state(conn)
    if not 0 <= size <= stored:
        raise ValueError(f"tree size {size} outside 0..{stored}")
    if size == 0:
        return CompactRange().root()
    return perfect_subtree_hasher(node_reader(conn))(0, size)
