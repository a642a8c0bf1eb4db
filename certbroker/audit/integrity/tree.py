"""The audit log's Merkle tree as stored next to the entries (tables ``merkle_*``).

Leaf *i* (0-based) of the tree is entry ``seq = i + 1``; its leaf hash is
``merkle.leaf_hash(UTF-8(body))`` over the ``body`` column text exactly as stored (the same
text the hash chain covers). Written in the SAME transaction as the entries, so the tree can
never disagree with a committed log:

``merkle_nodes`` (``level, idx, hash``)
    Every perfect subtree reported by ``CompactRange``'s ``on_node`` (level 0 = leaf hashes),
    so inclusion and consistency proofs at ANY tree size take O(log n) lookups through
    :func:`certbroker.audit.integrity.merkle.perfect_subtree_hasher` and never load the leaves.
    Append-only: a node, once complete, never changes. Archival keeps them (they hold hashes
    only).
``merkle_state`` (SQLite only; one row, ``id = 1``)
    ``size`` = number of leaves, ``frontier`` = the
    :class:`~certbroker.audit.integrity.merkle.CompactRange` frontier, its 32-byte hashes
    concatenated (leftmost first): a cache, so an append reads no node. PostgreSQL has no such
    row to update (its audit tables are append-only): there the size is the number of stored
    leaves and the frontier is read from ``merkle_nodes`` in one query.

Entries of format version 2 (:mod:`certbroker.audit.store.compact`) store only the nodes at
level :data:`STORED_LEVEL` and above: a node below it covers at most ``2**STORED_LEVEL / 2``
leaves and is recomputed from their entries when a proof needs it (:func:`node_reader`), which
cuts the tree's storage from two nodes per entry to one per ``2**(STORED_LEVEL - 1)``. Nodes
that a version 1 writer stored stay, and are used.

The tables are created with the rest of the schema by each backend, and how nodes and the
cached frontier are written and read is the backend's business
(:meth:`~certbroker.audit.store.base.Backend.save_tree`, ``load_tree``, ``read_nodes``); this
module is the tree logic on top. A log written before these tables existed is completed on the
writer's first open (:func:`backfill`).
"""

from __future__ import annotations

from collections.abc import Callable

from certbroker.audit.integrity.merkle import (
    HASH_SIZE,
    CompactRange,
    leaf_hash,
    perfect_subtree_hasher,
    root,
)
from certbroker.audit.store.base import Connection, Node
from certbroker.audit.store.rows import archived_head, bodies_between

STORED_LEVEL = 5
"""The lowest level a compact (format version 2) writer stores: nodes below it are recomputed
from at most 16 entries each."""


def body_leaf(body: str) -> bytes:
    """The RFC 9162 leaf hash of an entry: over its stored body text as UTF-8."""
    return leaf_hash(body.encode("utf-8"))


class TreeWriter:
    """Appends leaves inside the caller's open write transaction and persists the nodes.

    ``state`` = (size, frontier) known to be the stored one (the writer's own last commit);
    otherwise it is read from the database. ``min_level``: the lowest level stored (0, or
    :data:`STORED_LEVEL` for a compact writer).
    """

    def __init__(
        self,
        conn: Connection,
        state: tuple[int, list[bytes]] | None = None,
        *,
        min_level: int = 0,
    ) -> None:
        self._conn = conn
        self._nodes: list[Node] = []
        self._min_level = min_level
        size, frontier = load_state(conn) if state is None else state
        self.range = CompactRange(size, list(frontier), on_node=self._on_node)

    def _on_node(self, level: int, index: int, digest: bytes) -> None:
        if level >= self._min_level:
            self._nodes.append((level, index, digest))

    def append(self, body: str) -> None:
        """Add the entry with stored body ``body`` as the next leaf."""
        self.range.append(body_leaf(body))

    def flush(self) -> None:
        """Write the new nodes (and the backend's cached state); still inside the caller's
        transaction."""
        conn = self._conn
        conn.backend.save_tree(conn, self._nodes, self.range.size, self.range.frontier)
        self._nodes.clear()


def frontier_positions(size: int) -> list[tuple[int, int]]:
    """(level, index) of the perfect subtrees making up the first ``size`` leaves, leftmost
    first: the nodes of a CompactRange frontier."""
    out: list[tuple[int, int]] = []
    start = 0
    for level in range(size.bit_length() - 1, -1, -1):
        if size >> level & 1:
            out.append((level, start >> level))
            start += 1 << level
    return out


def frontier_at(conn: Connection, size: int) -> list[bytes]:
    """The CompactRange frontier of the first ``size`` leaves, from stored nodes (the ones
    below :data:`STORED_LEVEL` recomputed from the entries if not stored).

    KeyError if a node is missing.
    """
    positions = frontier_positions(size)
    try:
        return conn.backend.read_nodes(conn, positions)  # one round trip on PostgreSQL
    except KeyError:
        node = node_reader(conn)
        return [node(level, index) for level, index in positions]


def computed_node(conn: Connection, level: int, index: int) -> bytes:
    """Node (level, index) recomputed from its entries' bodies; KeyError if it is above the
    recomputed levels or one of its entries is not live (archived)."""
    if level >= STORED_LEVEL:
        raise KeyError(f"merkle node ({level}, {index}) not stored")
    first = (index << level) + 1
    bodies = bodies_between(conn, first, first + (1 << level) - 1)
    if len(bodies) != 1 << level:
        raise KeyError(f"merkle node ({level}, {index}): its entries are not all live")
    return root([body_leaf(body) for body in bodies])


def load_state(conn: Connection) -> tuple[int, list[bytes]]:
    """The stored tree size and frontier ((0, []) for an empty or pre-Merkle log); for a
    backend that keeps no frontier, the size is the log's and the frontier read from nodes."""
    size, cached = conn.backend.load_tree(conn)
    if cached is None:  # the backend keeps no frontier: read it from the nodes
        return size, frontier_at(conn, size)
    return size, [cached[i : i + HASH_SIZE] for i in range(0, len(cached), HASH_SIZE)]


def backfill(conn: Connection) -> int:
    """Add leaves for stored entries the tree does not cover yet (an SQLite log from before
    the tree). Call inside a write transaction; returns how many leaves were added."""
    writer = TreeWriter(conn)
    start = writer.range.size
    added = 0
    for (body,) in conn.execute("SELECT body FROM audit_log WHERE seq > ? ORDER BY seq", (start,)):
        writer.append(str(body))
        added += 1
    if added:
        writer.flush()
    return added


ArchivedLeaves = Callable[[int, int], list[bytes]]
"""``leaves(first, last)``: the leaf hashes of the archived entries ``first..last``, read from
their archive files (:func:`certbroker.audit.archive.archived_leaves`); KeyError if they
cannot be read there."""


def node_reader(
    conn: Connection, archived: ArchivedLeaves | None = None
) -> Callable[[int, int], bytes]:
    """``node(level, index)`` from ``merkle_nodes``, or recomputed from the entries below
    :data:`STORED_LEVEL` (:func:`computed_node`), taking the leaves of archived entries from
    ``archived`` if given; KeyError if it is neither."""

    def node(level: int, index: int) -> bytes:
        try:
            (digest,) = conn.backend.read_nodes(conn, ((level, index),))
        except KeyError:
            try:
                return computed_node(conn, level, index)  # below STORED_LEVEL: not stored
            except KeyError:
                if archived is None or level >= STORED_LEVEL:
                    raise
                return _node_across_archive(conn, level, index, archived)
        return digest

    return node


def _node_across_archive(
    conn: Connection, level: int, index: int, archived: ArchivedLeaves
) -> bytes:
    """A low node some of whose entries are archived (a compact writer did not store it, and
    archival kept only the ones checkpoints need): the archived leaves from the archive
    files, the others from the live entries."""
    first = (index << level) + 1
    last = first + (1 << level) - 1
    watermark, _ = archived_head(conn)
    leaves = archived(first, min(last, watermark)) if first <= watermark else []
    live = bodies_between(conn, max(first, watermark + 1), last)
    leaves += [body_leaf(body) for body in live]
    if len(leaves) != 1 << level:
        raise KeyError(f"merkle node ({level}, {index}): its entries are neither live nor archived")
    return root(leaves)


def root_at(conn: Connection, size: int) -> bytes:
    """MTH of the first ``size`` leaves, from stored nodes (O(log n) lookups)."""
    stored, _ = load_state(conn)
    if not 0 <= size <= stored:
        raise ValueError(f"tree size {size} outside 0..{stored}")
    if size == 0:
        return CompactRange().root()
    return perfect_subtree_hasher(node_reader(conn))(0, size)
