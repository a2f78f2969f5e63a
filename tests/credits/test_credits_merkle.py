"""RFC 6962 hashing and proofs against published vectors, every small tree, and tampering."""

from __future__ import annotations

import hashlib
import json

import pytest

from credits_helpers import DATA
from gpunet.credits import MerkleTree, ProofError, leaf_hash, node_hash, verify_consistency, verify_inclusion
from gpunet.credits._merkle import EMPTY_ROOT, subtree_levels

VECTORS = json.loads((DATA / "rfc6962_vectors.json").read_text())
LEAVES = [leaf_hash(bytes.fromhex(x)) for x in VECTORS["leaf_inputs"]]


def h(x: str) -> bytes:
    return bytes.fromhex(x)


def root_from_leaves(leaves: list[bytes]) -> bytes:
    """RFC 6962's MTH as the RFC writes it (split at the largest power of two below n): the
    reference the tree's level-by-level hashing is checked against."""
    if not leaves:
        return EMPTY_ROOT
    if len(leaves) == 1:
        return leaves[0]
    k = 1 << ((len(leaves) - 1).bit_length() - 1)
    return node_hash(root_from_leaves(leaves[:k]), root_from_leaves(leaves[k:]))


def test_leaf_and_node_prefixes_differ():
    assert leaf_hash(b"ab") == hashlib.sha256(b"\x00ab").digest()
    assert node_hash(b"a" * 32, b"b" * 32) == hashlib.sha256(b"\x01" + b"a" * 32 + b"b" * 32).digest()
    # A leaf whose data is two hashes is not the node over them.
    assert leaf_hash(b"a" * 32 + b"b" * 32) != node_hash(b"a" * 32, b"b" * 32)


@pytest.mark.parametrize("size", range(len(VECTORS["roots"])))
def test_roots_match_rfc6962_vectors(size):
    tree = MerkleTree(LEAVES)
    assert tree.root(size).hex() == VECTORS["roots"][size]
    assert root_from_leaves(LEAVES[:size]).hex() == VECTORS["roots"][size]
    assert EMPTY_ROOT.hex() == VECTORS["roots"][0]


@pytest.mark.parametrize("case", VECTORS["inclusion"], ids=lambda c: f"{c['index']}@{c['size']}")
def test_inclusion_vectors(case):
    tree = MerkleTree(LEAVES)
    assert [p.hex() for p in tree.inclusion_proof(case["index"], case["size"])] == case["proof"]
    verify_inclusion(case["index"], case["size"], LEAVES[case["index"]], [h(p) for p in case["proof"]],
                     h(VECTORS["roots"][case["size"]]))


@pytest.mark.parametrize("case", VECTORS["consistency"], ids=lambda c: f"{c['first']}-{c['second']}")
def test_consistency_vectors(case):
    tree = MerkleTree(LEAVES)
    assert [p.hex() for p in tree.consistency_proof(case["first"], case["second"])] == case["proof"]
    verify_consistency(case["first"], case["second"], h(VECTORS["roots"][case["first"]]),
                       h(VECTORS["roots"][case["second"]]), [h(p) for p in case["proof"]])


def test_every_proof_of_every_small_tree_verifies():
    leaves = [leaf_hash(str(i).encode()) for i in range(40)]
    tree = MerkleTree()
    for leaf in leaves:
        tree.append(leaf)
    assert MerkleTree(leaves).root() == tree.root()
    for size in range(1, 41):
        root = tree.root(size)
        assert root == root_from_leaves(leaves[:size])
        for index in range(size):
            verify_inclusion(index, size, leaves[index], tree.inclusion_proof(index, size), root)
        for first in range(size + 1):
            verify_consistency(first, size, tree.root(first), root, tree.consistency_proof(first, size))


@pytest.mark.parametrize("chunks", [(1, 2, 3, 70, 5, 100), (65, 65, 1, 1, 130), (3, 200, 0, 7)])
def test_extending_in_chunks_of_any_size_gives_the_same_tree(chunks):
    leaves = [leaf_hash(str(i).encode()) for i in range(sum(chunks))]
    tree, done = MerkleTree(), 0
    for n in chunks:
        tree.extend(leaves[done : done + n])
        done += n
        assert tree.size == done and tree.root() == root_from_leaves(leaves[:done])
    assert all(tree.root(size) == root_from_leaves(leaves[:size]) for size in range(0, done + 1, 7))


def test_a_tree_made_from_hashed_levels_is_the_tree_of_its_leaves():
    leaves = [leaf_hash(str(i).encode()) for i in range(41)]
    for size in range(len(leaves)):
        made = MerkleTree.from_levels(subtree_levels(b"".join(leaves[:size])))
        whole = MerkleTree(leaves[:size])
        assert made.size == size and made.root() == whole.root()
        assert all(made.consistency_proof(first) == whole.consistency_proof(first) for first in range(size + 1))
        made.extend(leaves[size:])  # it grows like any other
        assert made.root() == MerkleTree(leaves).root()


def test_a_leaf_hash_of_the_wrong_length_is_refused():
    with pytest.raises(ValueError, match="a leaf hash has 32 bytes"):
        MerkleTree().append(b"short")


def _flip(b: bytes, bit: int = 0) -> bytes:
    return bytes([b[0] ^ (1 << bit)]) + b[1:]


def test_tampered_inclusion_proofs_fail_with_evidence():
    tree = MerkleTree(LEAVES)
    proof = tree.inclusion_proof(5, 8)
    root = tree.root()
    cases = [
        ("flipped proof hash", dict(index=5, size=8, leaf=LEAVES[5], proof=[_flip(proof[0])] + proof[1:])),
        ("flipped leaf", dict(index=5, size=8, leaf=_flip(LEAVES[5]), proof=proof)),
        ("wrong index", dict(index=4, size=8, leaf=LEAVES[5], proof=proof)),
        ("proof too long", dict(index=5, size=8, leaf=LEAVES[5], proof=proof + [proof[0]])),
        ("proof too short", dict(index=5, size=8, leaf=LEAVES[5], proof=proof[:-1])),
        ("index outside", dict(index=8, size=8, leaf=LEAVES[5], proof=proof)),
        ("not a digest", dict(index=5, size=8, leaf=b"short", proof=proof)),
    ]
    for name, kw in cases:
        with pytest.raises(ProofError) as err:
            verify_inclusion(kw["index"], kw["size"], kw["leaf"], kw["proof"], root)
        assert err.value.evidence or err.value.index is not None, name
    with pytest.raises(ProofError, match="root hash at size 8 mismatched for entry 5: computed [0-9a-f]{64}, expected"):
        verify_inclusion(5, 8, LEAVES[5], proof, _flip(root))


def test_tampered_consistency_proofs_fail():
    tree = MerkleTree(LEAVES)
    proof = tree.consistency_proof(3, 7)
    r3, r7 = tree.root(3), tree.root(7)
    verify_consistency(3, 7, r3, r7, proof)
    for bad in ([_flip(proof[0])] + proof[1:], proof[:-1], proof + [proof[0]], []):
        with pytest.raises(ProofError):
            verify_consistency(3, 7, r3, r7, bad)
    with pytest.raises(ProofError, match="root hash at size 3 mismatched"):
        verify_consistency(3, 7, _flip(r3), r7, proof)
    with pytest.raises(ProofError):
        verify_consistency(7, 3, r7, r3, proof)


def test_proofs_outside_the_tree_are_refused():
    tree = MerkleTree(LEAVES)
    with pytest.raises(ProofError, match="not in a tree of 8"):
        tree.inclusion_proof(8)
    with pytest.raises(ProofError, match="outside 0..8"):
        tree.root(9)
