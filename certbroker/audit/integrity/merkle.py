"""Append-only Merkle tree with Certificate Transparency v2 hashing (RFC 9162 §2.1).

The audit log's entries are the leaves of one Merkle tree, so an auditor holding a signed
checkpoint (tree size + root hash, :mod:`certbroker.audit.integrity.checkpoint`) can check, offline
and in
O(log n) hashes, that an entry is in the log (inclusion proof) and that a later checkpoint
extends an earlier one without rewriting history (consistency proof).

Hashing (RFC 9162 §2.1.1), SHA-256 throughout::

    MTH({})       = SHA-256("")                           the empty tree
    MTH({d(0)})   = SHA-256(0x00 || d(0))                 a leaf
    MTH(D[n])     = SHA-256(0x01 || MTH(D[0:k]) || MTH(D[k:n]))
                    where k is the largest power of two smaller than n

The distinct 0x00/0x01 prefixes keep a leaf from ever being mistaken for an inner node
(second-preimage resistance). Proofs are lists of 32-byte node hashes, bottom to top, exactly
as RFC 9162 §2.1.3.1 (PATH) and §2.1.4.1 (PROOF) define them, so any CT/transparency-dev
verifier accepts what this module produces and vice versa.

Everything here works on *leaf hashes* (``leaf_hash(entry_bytes)``), never on the entries, so a
store can keep 32 bytes per entry and hash each entry exactly once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from typing import Final

HASH_SIZE: Final = 32
EMPTY_ROOT: Final = hashlib.sha256(b"").digest()
"""MTH of the empty tree (RFC 9162 §2.1.1): SHA-256 of the empty string."""
MAX_TREE_SIZE: Final = 2**64 - 1
"""Tree sizes and indices are uint64 on the wire (RFC 9162 §4); anything larger is malformed."""
_MAX_PROOF_LEN: Final = 64
"""No valid proof for a uint64-sized tree has more nodes than this; longer ones are rejected
before any hashing, so a hostile proof cannot make a verifier do unbounded work."""

_LEAF_PREFIX: Final = b"\x00"
_NODE_PREFIX: Final = b"\x01"

SubtreeHash = Callable[[int, int], bytes]
"""``subtree_hash(start, end)`` returns MTH(D[start:end]) of the log's leaves, ``start < end``.

Proof generation only asks for what the proof contains, so a store can answer from a table of
cached inner nodes (:func:`perfect_subtree_hasher`) instead of loading every leaf."""


def leaf_hash(data: bytes) -> bytes:
    """RFC 9162 §2.1.1: the hash of one log entry, ``SHA-256(0x00 || data)``."""
    return hashlib.sha256(_LEAF_PREFIX + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """RFC 9162 §2.1.1: an inner node, ``SHA-256(0x01 || left || right)``."""
    return hashlib.sha256(_NODE_PREFIX + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two strictly smaller than ``n`` (``n >= 2``), RFC 9162 §2.1.1's k."""
    return 1 << ((n - 1).bit_length() - 1)


def _mth(hashes: Sequence[bytes], start: int, end: int) -> bytes:
    # Index bounds instead of slices: slicing would copy O(n) per level, O(n log n) in all.
    n = end - start
    if n == 1:
        return hashes[start]
    k = _split(n)
    return node_hash(_mth(hashes, start, start + k), _mth(hashes, start + k, end))


def root(leaf_hashes: Sequence[bytes]) -> bytes:
    """MTH of the whole list, by the recursive definition of RFC 9162 §2.1.1.

    The reference implementation; :class:`CompactRange` gives the same root incrementally.
    """
    if not leaf_hashes:
        return EMPTY_ROOT
    return _mth(leaf_hashes, 0, len(leaf_hashes))


def subtree_hasher(leaf_hashes: Sequence[bytes]) -> SubtreeHash:
    """A :data:`SubtreeHash` over an in-memory list of leaf hashes (O(end - start) per call)."""

    def subtree(start: int, end: int) -> bytes:
        if not 0 <= start < end <= len(leaf_hashes):
            raise ValueError(f"subtree [{start}, {end}) outside the {len(leaf_hashes)} leaves")
        return _mth(leaf_hashes, start, end)

    return subtree


def perfect_subtree_hasher(node: Callable[[int, int], bytes]) -> SubtreeHash:
    """A :data:`SubtreeHash` built from stored perfect subtrees.

    ``node(level, index)`` returns the root of the perfect subtree of ``2**level`` leaves
    starting at leaf ``index * 2**level`` (level 0 = the leaf hashes), as reported by
    :class:`CompactRange`'s ``on_node`` callback. Every range a proof asks for decomposes into
    O(log n) such nodes, so a store that keeps them serves proofs in O(log n) lookups.
    """

    def subtree(start: int, end: int) -> bytes:
        n = end - start
        if n < 1 or start < 0:
            raise ValueError(f"empty or negative subtree [{start}, {end})")
        if n & (n - 1) == 0 and start % n == 0:
            return node(n.bit_length() - 1, start // n)
        # Not a stored node: split as MTH does. Unaligned power-of-two ranges also land here
        # and still get the right MTH, just with more lookups.
        k = _split(n)  # n >= 2 here: a single leaf is always an aligned level-0 node
        return node_hash(subtree(start, start + k), subtree(start + k, end))

    return subtree


def inclusion_path(index: int, size: int, subtree: SubtreeHash) -> list[bytes]:
    """RFC 9162 §2.1.3.1: PATH(index, D[size]), the inclusion proof of leaf ``index``.

    Raises ValueError unless ``0 <= index < size``.
    """
    if not 0 <= index < size <= MAX_TREE_SIZE:
        raise ValueError(f"no inclusion proof for index {index} in a tree of size {size}")
    path: list[bytes] = []
    start, end = 0, size
    # Walk down from the root; each level contributes the sibling subtree's hash. The RFC
    # lists them leaf-first, so collect top-down and reverse.
    while end - start > 1:
        k = _split(end - start)
        if index < start + k:
            path.append(subtree(start + k, end))
            end = start + k
        else:
            path.append(subtree(start, start + k))
            start += k
    path.reverse()
    return path


def consistency_path(old_size: int, new_size: int, subtree: SubtreeHash) -> list[bytes]:
    """RFC 9162 §2.1.4.1: PROOF(old_size, D[new_size]) that the first tree is a prefix.

    As in transparency-dev, the proof is empty when ``old_size == 0`` or
    ``old_size == new_size`` (the RFC defines PROOF only for ``0 < m < n``). Raises ValueError
    unless ``0 <= old_size <= new_size``.
    """
    if not 0 <= old_size <= new_size <= MAX_TREE_SIZE:
        raise ValueError(f"no consistency proof from size {old_size} to {new_size}")
    if old_size in (0, new_size):
        return []
    path: list[bytes] = []
    m, start, end = old_size, 0, new_size
    while m != end - start:
        k = _split(end - start)
        if m <= k:
            path.append(subtree(start + k, end))
            end = start + k
        else:
            path.append(subtree(start, start + k))
            start, m = start + k, m - k
    # SUBPROOF's flag b is "never went right", i.e. start == 0: then [0, end) is the whole old
    # tree, whose hash the verifier has (old root). Otherwise the RFC adds MTH(D[start:end]).
    if start != 0:
        path.append(subtree(start, end))
    path.reverse()
    return path


def inclusion_proof(leaf_hashes: Sequence[bytes], index: int, size: int) -> list[bytes]:
    """Inclusion proof of leaf ``index`` in the tree of the first ``size`` leaf hashes."""
    if size > len(leaf_hashes):
        raise ValueError(f"tree size {size} exceeds the {len(leaf_hashes)} leaves given")
    return inclusion_path(index, size, subtree_hasher(leaf_hashes))


def consistency_proof(leaf_hashes: Sequence[bytes], old_size: int, new_size: int) -> list[bytes]:
    """Consistency proof between the trees of the first ``old_size`` and ``new_size`` leaves."""
    if new_size > len(leaf_hashes):
        raise ValueError(f"tree size {new_size} exceeds the {len(leaf_hashes)} leaves given")
    return consistency_path(old_size, new_size, subtree_hasher(leaf_hashes))


def _is_size(value: object) -> bool:
    # bool is an int subclass; True as a tree size is a caller bug, not a size of 1.
    return type(value) is int and 0 <= value <= MAX_TREE_SIZE


def _is_hash(value: object) -> bool:
    return isinstance(value, bytes) and len(value) == HASH_SIZE


def _is_proof(proof: object) -> bool:
    return (
        isinstance(proof, Sequence)
        and not isinstance(proof, (bytes, str))
        and len(proof) <= _MAX_PROOF_LEN
        and all(_is_hash(p) for p in proof)
    )


def verify_inclusion(
    leaf_hash: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes
) -> bool:
    """RFC 9162 §2.1.3.2: does ``proof`` show leaf ``index`` of ``size`` has ``leaf_hash``?

    The RFC's iterative algorithm, step for step. Malformed input (``index >= size``, size 0,
    hashes not 32 bytes, a proof too short or too long) gives False, never an exception.
    """
    if not (_is_size(index) and _is_size(size) and _is_hash(leaf_hash) and _is_hash(root)):
        return False
    if not _is_proof(proof) or index >= size:  # step 1
        return False
    fn, sn = index, size - 1  # step 2
    r = leaf_hash  # step 3
    for p in proof:  # step 4
        if sn == 0:  # 4a: proof longer than the path to the root
            return False
        if fn & 1 or fn == sn:  # 4b: p is a left sibling
            r = node_hash(p, r)
            # On the right border a node with no right sibling is promoted unchanged;
            # skip those levels.
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1  # 4c
        sn >>= 1
    return sn == 0 and r == root  # step 5


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> bool:
    """RFC 9162 §2.1.4.2: does ``proof`` show the ``old_size`` tree is a prefix of the new one?

    The RFC's iterative algorithm for ``0 < old_size < new_size``. Beyond the RFC, as in
    transparency-dev: equal sizes need an empty proof and equal roots; ``old_size == 0``
    needs an empty proof and ``old_root`` = the empty-tree hash (the empty tree is a prefix of
    every tree). ``old_size > new_size`` or any malformed input gives False, never an exception.
    """
    if not (_is_size(old_size) and _is_size(new_size) and _is_proof(proof)):
        return False
    if not (_is_hash(old_root) and _is_hash(new_root)) or old_size > new_size:
        return False
    if old_size == new_size:
        return not proof and old_root == new_root and (old_size > 0 or old_root == EMPTY_ROOT)
    if old_size == 0:
        return not proof and old_root == EMPTY_ROOT
    if not proof:  # step 1
        return False
    path = list(proof)
    if old_size & (old_size - 1) == 0:  # step 2: the old root is itself a node of the new tree
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1  # step 3
    while fn & 1:  # step 4
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]  # step 5
    for c in path[1:]:  # step 6
        if sn == 0:  # 6a
            return False
        if fn & 1 or fn == sn:  # 6b: c is left of the path, so in both trees
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:  # c is right of the path: only in the new tree
            sr = node_hash(sr, c)
        fn >>= 1  # 6c
        sn >>= 1
    return sn == 0 and fr == old_root and sr == new_root  # step 7


class CompactRange:
    """The tree over leaves [0, size), kept as its frontier: O(log n) hashes, O(1) amortised append.

    The frontier is the list of roots of the perfect subtrees that ``size``'s binary digits
    decompose [0, size) into, largest (leftmost) first: for 6 leaves, MTH(D[0:4]) and
    MTH(D[4:6]). Appending a leaf merges equal-sized subtrees like a binary counter carries,
    and folding the frontier right-to-left gives exactly RFC 9162's MTH, because MTH splits
    at the largest power of two, i.e. the first frontier subtree. That is all a log of
    millions of entries needs in memory to publish its root at every size.

    ``on_node(level, index, hash)`` is called for every perfect subtree completed by an append
    (the leaf itself at level 0 included), so a store can persist inner nodes and answer proofs
    through :func:`perfect_subtree_hasher` without re-reading leaves.
    """

    __slots__ = ("_frontier", "_on_node", "_size")

    def __init__(
        self,
        size: int = 0,
        frontier: Iterable[bytes] = (),
        *,
        on_node: Callable[[int, int, bytes], None] | None = None,
    ) -> None:
        """Start empty, or resume a saved state (``size`` and its :attr:`frontier`)."""
        hashes = list(frontier)
        if not _is_size(size) or len(hashes) != size.bit_count():
            raise ValueError(f"a tree of size {size} has {size.bit_count()} frontier hashes")
        if not all(_is_hash(h) for h in hashes):
            raise ValueError("frontier hashes must be 32-byte bytes")
        self._size = size
        self._frontier = hashes
        self._on_node = on_node

    @property
    def size(self) -> int:
        """The number of leaves appended so far."""
        return self._size

    @property
    def frontier(self) -> tuple[bytes, ...]:
        """Roots of the perfect subtrees covering [0, size), leftmost first; save to resume."""
        return tuple(self._frontier)

    def append(self, leaf_hash: bytes) -> None:
        """Add the next leaf (its :func:`leaf_hash`)."""
        if not _is_hash(leaf_hash):
            raise ValueError("a leaf hash is 32 bytes")
        if self._size == MAX_TREE_SIZE:
            raise ValueError("tree is full")
        h, index, level = leaf_hash, self._size, 0
        if self._on_node is not None:
            self._on_node(0, index, h)
        # A node with an odd index is a right child whose left sibling is the last frontier
        # entry: merge, like a binary counter's carry (one per trailing 1 bit of the old size).
        while index & 1:
            h = node_hash(self._frontier.pop(), h)
            index >>= 1
            level += 1
            if self._on_node is not None:
                self._on_node(level, index, h)
        self._frontier.append(h)
        self._size += 1

    def extend(self, leaf_hashes: Iterable[bytes]) -> None:
        """Append several leaves in order."""
        for h in leaf_hashes:
            self.append(h)

    def root(self) -> bytes:
        """MTH of the leaves so far (RFC 9162 §2.1.1); the empty-tree hash when there are none."""
        if not self._frontier:
            return EMPTY_ROOT
        r = self._frontier[-1]
        for h in reversed(self._frontier[:-1]):
            r = node_hash(h, r)
        return r

    def copy(self) -> CompactRange:
        """An independent copy (same callback), e.g. to compute a root speculatively."""
        return CompactRange(self._size, self._frontier, on_node=self._on_node)
