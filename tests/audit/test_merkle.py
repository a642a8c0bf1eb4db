"""Tests for certbroker.audit.integrity.merkle: RFC 9162 §2.1 hashing, proofs and verifiers.

Known answers come from Certificate Transparency's reference tree (the 8 leaves below, used by
the CT C++ implementation, Trillian and transparency-dev/merkle ``proof/verify_test.go``); the
mutation probes mirror transparency-dev's ``corruptInclusionProof``/``corruptConsistencyProof``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import pytest

from certbroker.audit.integrity.merkle import (
    EMPTY_ROOT,
    CompactRange,
    consistency_path,
    consistency_proof,
    inclusion_path,
    inclusion_proof,
    leaf_hash,
    node_hash,
    perfect_subtree_hasher,
    root,
    subtree_hasher,
    verify_consistency,
    verify_inclusion,
)

LEAVES = [
    b"",
    b"\x00",
    b"\x10",
    b"\x20\x21",
    b"\x30\x31",
    b"\x40\x41\x42\x43",
    b"\x50\x51\x52\x53\x54\x55\x56\x57",
    b"\x60\x61\x62\x63\x64\x65\x66\x67\x68\x69\x6a\x6b\x6c\x6d\x6e\x6f",
]
LEAF_HASHES = [leaf_hash(d) for d in LEAVES]

# ROOTS[n] = MTH of the first n reference leaves.
ROOTS = [
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]

# (index, size, proof): transparency-dev's inclusionProofs, whose leaf numbers are 1-based.
INCLUSION_VECTORS = [
    (
        0,
        8,
        [
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ],
    ),
    (
        5,
        8,
        [
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
    (2, 3, ["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"]),
    (
        1,
        5,
        [
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        ],
    ),
    (0, 1, []),
]

CONSISTENCY_VECTORS = [
    (
        1,
        8,
        [
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ],
    ),
    (
        6,
        8,
        [
            "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
    (
        2,
        5,
        [
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        ],
    ),
    (
        6,
        7,
        [
            "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
    (1, 1, []),
]

SOME_HASH = bytes.fromhex("abacaba000000000000000000000000000000000000000000060061e00123456")
MAX_N = 40  # every (index, size) and (m, n) pair up to this many leaves
MANY = [leaf_hash(i.to_bytes(2, "big") * 3) for i in range(2 * MAX_N + 1)]
MANY_ROOTS = [root(MANY[:n]) for n in range(len(MANY) + 1)]


def h(hex_digest: str) -> bytes:
    return bytes.fromhex(hex_digest)


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


# -- hashing: known answers, checked independently of the module --------------------------


def test_empty_tree_and_leaf_hash_match_rfc9162_by_hand() -> None:
    assert h(ROOTS[0]) == sha256(b"") == EMPTY_ROOT == root([])
    assert leaf_hash(b"") == sha256(b"\x00") == h(ROOTS[1])
    assert node_hash(b"L" * 32, b"R" * 32) == sha256(b"\x01" + b"L" * 32 + b"R" * 32)


def test_reference_roots_recomputed_with_hashlib_only() -> None:
    # The published vectors themselves, rebuilt from the RFC's definition without broker code.
    lh = [sha256(b"\x00" + d) for d in LEAVES]

    def mth(xs: list[bytes]) -> bytes:
        if len(xs) == 0:
            return sha256(b"")
        if len(xs) == 1:
            return xs[0]
        k = 1
        while k * 2 < len(xs):
            k *= 2
        return sha256(b"\x01" + mth(xs[:k]) + mth(xs[k:]))

    assert [mth(lh[:n]).hex() for n in range(9)] == ROOTS


@pytest.mark.parametrize("n", range(9))
def test_root_matches_reference_vectors(n: int) -> None:
    assert root(LEAF_HASHES[:n]).hex() == ROOTS[n]
    tree = CompactRange()
    tree.extend(LEAF_HASHES[:n])
    assert tree.root().hex() == ROOTS[n]


@pytest.mark.parametrize(("index", "size", "proof"), INCLUSION_VECTORS)
def test_inclusion_proof_matches_reference_vectors(index: int, size: int, proof: list[str]) -> None:
    assert [p.hex() for p in inclusion_proof(LEAF_HASHES, index, size)] == proof
    assert verify_inclusion(LEAF_HASHES[index], index, size, [h(p) for p in proof], h(ROOTS[size]))


@pytest.mark.parametrize(("m", "n", "proof"), CONSISTENCY_VECTORS)
def test_consistency_proof_matches_reference_vectors(m: int, n: int, proof: list[str]) -> None:
    assert [p.hex() for p in consistency_proof(LEAF_HASHES, m, n)] == proof
    assert verify_consistency(m, n, h(ROOTS[m]), h(ROOTS[n]), [h(p) for p in proof])


# -- the incremental tree ------------------------------------------------------------------


def test_incremental_root_equals_recursive_root_for_every_size() -> None:
    tree = CompactRange()
    assert tree.root() == EMPTY_ROOT
    for n in range(1, len(MANY) + 1):
        tree.append(MANY[n - 1])
        assert tree.size == n
        assert len(tree.frontier) == n.bit_count()  # O(log n) state
        assert tree.root() == root(MANY[:n]), n


def test_compact_range_resumes_from_saved_frontier() -> None:
    whole = CompactRange()
    whole.extend(MANY)
    for n in range(len(MANY)):
        first = CompactRange()
        first.extend(MANY[:n])
        resumed = CompactRange(first.size, first.frontier)
        resumed.extend(MANY[n:])
        assert resumed.root() == whole.root()
    copy = whole.copy()
    copy.append(SOME_HASH)
    assert whole.size == len(MANY)
    assert copy.size == len(MANY) + 1


@pytest.mark.parametrize(
    ("size", "frontier"),
    [(1, []), (0, [SOME_HASH]), (3, [SOME_HASH]), (1, [b"short"]), (-1, []), (2**64, [])],
)
def test_compact_range_rejects_inconsistent_state(size: int, frontier: list[bytes]) -> None:
    with pytest.raises(ValueError):
        CompactRange(size, frontier)


def test_compact_range_rejects_bad_leaf_hash() -> None:
    with pytest.raises(ValueError):
        CompactRange().append(b"x" * 31)


def test_stored_nodes_serve_the_same_proofs() -> None:
    # A store keeping what on_node reports can answer proofs without the leaf list.
    nodes: dict[tuple[int, int], bytes] = {}

    def store(level: int, index: int, digest: bytes) -> None:
        assert (level, index) not in nodes  # each perfect subtree reported once
        nodes[(level, index)] = digest

    tree = CompactRange(on_node=store)
    tree.extend(MANY[:MAX_N])
    assert len(nodes) == 2 * MAX_N - MAX_N.bit_count()  # all perfect subtrees of [0, 40)
    stored = perfect_subtree_hasher(lambda level, index: nodes[(level, index)])
    for size in range(1, MAX_N + 1):
        for index in range(size):
            assert inclusion_path(index, size, stored) == inclusion_proof(MANY, index, size)
        for m in range(size + 1):
            assert consistency_path(m, size, stored) == consistency_proof(MANY, m, size)
    # Arbitrary (unaligned) ranges still get their MTH.
    assert stored(3, 7) == subtree_hasher(MANY)(3, 7) == root(MANY[3:7])


@pytest.mark.parametrize(("index", "size"), [(0, 0), (3, 3), (-1, 3), (0, 9)])
def test_inclusion_proof_generation_rejects_bad_arguments(index: int, size: int) -> None:
    with pytest.raises(ValueError):
        inclusion_proof(LEAF_HASHES, index, size)


@pytest.mark.parametrize(("m", "n"), [(3, 2), (-1, 2), (1, 9)])
def test_consistency_proof_generation_rejects_bad_arguments(m: int, n: int) -> None:
    with pytest.raises(ValueError):
        consistency_proof(LEAF_HASHES, m, n)


# -- mutation probes (transparency-dev corruptInclusionProof / corruptConsistencyProof) --------


def flip(node: bytes, bit: int) -> bytes:
    return bytes([node[0] ^ (1 << bit)]) + node[1:]


def corrupt_inclusion(
    index: int, size: int, proof: list[bytes], root_hash: bytes, leaf: bytes
) -> list[tuple[str, tuple[Any, ...]]]:
    probes: list[tuple[str, tuple[Any, ...]]] = [
        ("index - 1", (leaf, index - 1, size, proof, root_hash)),
        ("index + 1", (leaf, index + 1, size, proof, root_hash)),
        ("index ^ 2", (leaf, index ^ 2, size, proof, root_hash)),
        ("size * 2", (leaf, index, size * 2, proof, root_hash)),
        ("size // 2", (leaf, index, size // 2, proof, root_hash)),
        ("wrong leaf", (b"WrongLeaf", index, size, proof, root_hash)),
        ("other leaf", (SOME_HASH, index, size, proof, root_hash)),
        ("empty root", (leaf, index, size, proof, EMPTY_ROOT)),
        ("random root", (leaf, index, size, proof, SOME_HASH)),
        ("short root", (leaf, index, size, proof, root_hash[:-1])),
        ("trailing garbage", (leaf, index, size, [*proof, b""], root_hash)),
        ("trailing root", (leaf, index, size, [*proof, root_hash], root_hash)),
        ("preceding garbage", (leaf, index, size, [b"", *proof], root_hash)),
        ("preceding root", (leaf, index, size, [root_hash, *proof], root_hash)),
    ]
    for i in range(len(proof)):
        for bit in (0, 3, 7):
            bad = [*proof[:i], flip(proof[i], bit), *proof[i + 1 :]]
            probes.append((f"proof[{i}] bit {bit}", (leaf, index, size, bad, root_hash)))
        last_byte = [*proof[:i], proof[i][:-1] + bytes([proof[i][-1] ^ 1]), *proof[i + 1 :]]
        probes.append((f"proof[{i}] last bit", (leaf, index, size, last_byte, root_hash)))
        dropped = [*proof[:i], *proof[i + 1 :]]
        probes.append((f"without proof[{i}]", (leaf, index, size, dropped, root_hash)))
    if proof:
        probes.append(("truncated", (leaf, index, size, proof[:-1], root_hash)))
    if len(proof) > 1:
        inserted = [proof[0], SOME_HASH, *proof[1:]]
        probes.append(("inserted component", (leaf, index, size, inserted, root_hash)))
        for i in range(len(proof) - 1):
            swapped = [*proof[:i], proof[i + 1], proof[i], *proof[i + 2 :]]
            if swapped != proof:
                probes.append((f"swapped {i},{i + 1}", (leaf, index, size, swapped, root_hash)))
        probes.append(("reversed", (leaf, index, size, proof[::-1], root_hash)))
    return probes


def corrupt_consistency(
    m: int, n: int, root1: bytes, root2: bytes, proof: list[bytes]
) -> list[tuple[str, tuple[Any, ...]]]:
    probes: list[tuple[str, tuple[Any, ...]]] = [
        ("m - 1", (m - 1, n, root1, root2, proof)),
        ("m + 1", (m + 1, n, root1, root2, proof)),
        ("m ^ 2", (m ^ 2, n, root1, root2, proof)),
        ("n * 2", (m, n * 2, root1, root2, proof)),
        ("n // 2", (m, n // 2, root1, root2, proof)),
        ("wrong root1", (m, n, b"WrongRoot", root2, proof)),
        ("wrong root2", (m, n, root1, b"WrongRoot", proof)),
        ("other root1", (m, n, SOME_HASH, root2, proof)),
        ("other root2", (m, n, root1, SOME_HASH, proof)),
        ("swapped roots", (m, n, root2, root1, proof)),
        ("empty proof", (m, n, root1, root2, [])),
        ("trailing garbage", (m, n, root1, root2, [*proof, b""])),
        ("trailing root1", (m, n, root1, root2, [*proof, root1])),
        ("trailing root2", (m, n, root1, root2, [*proof, root2])),
        ("preceding garbage", (m, n, root1, root2, [b"", *proof])),
        ("preceding root1", (m, n, root1, root2, [root1, *proof])),
        ("preceding root2", (m, n, root1, root2, [root2, *proof])),
        ("preceding proof[0]", (m, n, root1, root2, [proof[0], *proof])),
        ("truncated", (m, n, root1, root2, proof[:-1])),
        ("first dropped", (m, n, root1, root2, proof[1:])),
    ]
    for i in range(len(proof)):
        for bit in (0, 4, 7):
            bad = [*proof[:i], flip(proof[i], bit), *proof[i + 1 :]]
            probes.append((f"proof[{i}] bit {bit}", (m, n, root1, root2, bad)))
    for i in range(len(proof) - 1):
        swapped = [*proof[:i], proof[i + 1], proof[i], *proof[i + 2 :]]
        if swapped != proof:
            probes.append((f"swapped {i},{i + 1}", (m, n, root1, root2, swapped)))
    return probes


def test_every_inclusion_proof_verifies_and_every_corruption_fails() -> None:
    checked = 0
    for size in range(1, MAX_N + 1):
        for index in range(size):
            proof = inclusion_proof(MANY, index, size)
            assert verify_inclusion(MANY[index], index, size, proof, MANY_ROOTS[size])
            assert verify_inclusion(MANY[index], index, size, tuple(proof), MANY_ROOTS[size])
            for desc, args in corrupt_inclusion(index, size, proof, MANY_ROOTS[size], MANY[index]):
                assert not verify_inclusion(*args), (index, size, desc)
                checked += 1
            # Another leaf's hash at this position never verifies.
            assert not verify_inclusion(MANY[index + 1], index, size, proof, MANY_ROOTS[size])
            # Nor does the proof against another genuine checkpoint. (A size off by one with the
            # *same* root can pass the RFC algorithm, e.g. (0, 3) as (0, 4): harmless, since no
            # size-4 tree has that root and a signed checkpoint binds size and root together.)
            for other in {size - 1, size + 1, size * 2, size // 2} - {0, size}:
                if index < other:
                    assert not verify_inclusion(MANY[index], index, other, proof, MANY_ROOTS[other])
    assert checked > 10_000


def test_every_consistency_proof_verifies_and_every_corruption_fails() -> None:
    checked = 0
    for n in range(1, MAX_N + 1):
        for m in range(n + 1):
            proof = consistency_proof(MANY, m, n)
            assert verify_consistency(m, n, MANY_ROOTS[m], MANY_ROOTS[n], proof), (m, n)
            if m in (0, n):
                assert proof == []
                continue
            for desc, args in corrupt_consistency(m, n, MANY_ROOTS[m], MANY_ROOTS[n], proof):
                assert not verify_consistency(*args), (m, n, desc)
                checked += 1
            # Other genuine checkpoints: the proof is for (m, n) only.
            for m2, n2 in {(m - 1, n), (m + 1, n), (m, n - 1), (m, n + 1)} - {(m, n)}:
                if 0 < m2 < n2:
                    args2 = (m2, n2, MANY_ROOTS[m2], MANY_ROOTS[n2], proof)
                    assert not verify_consistency(*args2), (m, n, m2, n2)
            # A rewritten history (a different leaf inside the old tree) is not consistent
            # with the checkpoint signed before the rewrite, in either direction.
            forged = [*MANY[: m - 1], SOME_HASH, *MANY[m:n]]
            assert not verify_consistency(m, n, MANY_ROOTS[m], root(forged[:n]), proof)
            assert not verify_consistency(m, n, root(forged[:m]), MANY_ROOTS[n], proof)
            forged_proof = consistency_proof(forged, m, n)
            assert not verify_consistency(m, n, MANY_ROOTS[m], root(forged), forged_proof)
    assert checked > 10_000


@pytest.mark.parametrize(("index", "size"), [(0, 0), (1, 0), (1, 1), (2, 1), (5, 5)])
def test_inclusion_rejects_index_outside_tree(index: int, size: int) -> None:
    for leaf, root_hash in [(SOME_HASH, EMPTY_ROOT), (EMPTY_ROOT, EMPTY_ROOT)]:
        assert not verify_inclusion(leaf, index, size, [], root_hash)


def test_single_leaf_tree() -> None:
    digest = leaf_hash(b"data")
    assert verify_inclusion(digest, 0, 1, [], digest)
    assert not verify_inclusion(digest, 0, 1, [], b"")
    assert not verify_inclusion(b"", 0, 1, [], digest)
    assert not verify_inclusion(b"", 0, 1, [], b"")


@pytest.mark.parametrize(
    ("m", "n", "root1", "root2", "proof", "ok"),
    [
        (0, 0, EMPTY_ROOT, EMPTY_ROOT, [], True),
        (0, 5, EMPTY_ROOT, SOME_HASH, [], True),  # the empty tree is a prefix of any tree
        (1, 1, SOME_HASH, SOME_HASH, [], True),
        (0, 0, SOME_HASH, SOME_HASH, [], False),  # a size-0 tree has exactly one root
        (0, 5, SOME_HASH, SOME_HASH, [], False),
        (0, 0, EMPTY_ROOT, SOME_HASH, [], False),
        (1, 1, EMPTY_ROOT, SOME_HASH, [], False),  # equal sizes, different roots
        (0, 0, EMPTY_ROOT, EMPTY_ROOT, [EMPTY_ROOT], False),  # equal, but a proof given
        (0, 1, EMPTY_ROOT, SOME_HASH, [EMPTY_ROOT], False),
        (1, 1, SOME_HASH, SOME_HASH, [EMPTY_ROOT], False),
        (1, 0, SOME_HASH, EMPTY_ROOT, [], False),  # time travel to the past
        (2, 1, SOME_HASH, SOME_HASH, [], False),
        (1, 2, SOME_HASH, EMPTY_ROOT, [], False),  # empty proof for a real extension
    ],
)
def test_consistency_edge_cases(
    m: int, n: int, root1: bytes, root2: bytes, proof: list[bytes], ok: bool
) -> None:
    assert verify_consistency(m, n, root1, root2, proof) is ok


MALFORMED: list[Any] = [None, "", "00" * 32, 1.5, True, -1, 2**64, [SOME_HASH], bytearray(32)]


@pytest.mark.parametrize("bad", MALFORMED)
def test_verifiers_reject_malformed_input_without_raising(bad: Any) -> None:
    proof = inclusion_proof(MANY, 3, 10)
    good: Sequence[Any] = (MANY[3], 3, 10, proof, MANY_ROOTS[10])
    for pos in range(5):
        args = [*good]
        args[pos] = bad
        assert verify_inclusion(*args) is False
    cproof = consistency_proof(MANY, 3, 10)
    cgood: Sequence[Any] = (3, 10, MANY_ROOTS[3], MANY_ROOTS[10], cproof)
    for pos in range(5):
        args = [*cgood]
        args[pos] = bad
        assert verify_consistency(*args) is False
    assert not verify_inclusion(MANY[3], 3, 10, [*proof[:-1], bad], MANY_ROOTS[10])
    assert not verify_consistency(3, 10, MANY_ROOTS[3], MANY_ROOTS[10], [*cproof[:-1], bad])


def test_verifiers_reject_huge_proofs_and_sizes_cheaply() -> None:
    assert not verify_inclusion(SOME_HASH, 0, 2**64 - 1, [SOME_HASH] * 65, SOME_HASH)
    assert not verify_inclusion(SOME_HASH, 0, 2**64, [SOME_HASH] * 64, SOME_HASH)
    assert not verify_consistency(1, 2**64 - 1, SOME_HASH, SOME_HASH, [SOME_HASH] * 10**6)
