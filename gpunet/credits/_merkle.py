"""RFC 6962 / RFC 9162 Merkle trees: hashing, proofs and their verification.

Pure functions over SHA-256 digests (``bytes`` of length 32):

* ``leaf_hash(data) = SHA-256(0x00 || data)`` and
  ``node_hash(l, r) = SHA-256(0x01 || l || r)``: the distinct prefixes keep a leaf
  from ever passing for an interior node.
* :class:`MerkleTree` is an append-only tree that keeps every complete subtree's
  hash (in one ``bytearray`` per level, 64 bytes per leaf in all), so roots at any
  past size, inclusion proofs and consistency proofs cost O(log² n) hashes.
* :func:`verify_inclusion` and :func:`verify_consistency` follow RFC 9162
  sections 2.1.3.2 and 2.1.4.2; they return nothing or raise :class:`ProofError`
  carrying the evidence (sizes, computed and expected digests).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Sequence

from gpunet.errors import ProofError

logger = logging.getLogger(__name__)

LEAF_PREFIX = b"\x00"
NODE_PREFIX = b"\x01"
HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()

_sha256 = hashlib.sha256


def leaf_hash(data: bytes) -> bytes:
    """Return the RFC 6962 hash of a leaf: ``SHA-256(0x00 || data)``."""
    return _sha256(LEAF_PREFIX + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """Return the RFC 6962 hash of an interior node: ``SHA-256(0x01 || left || right)``."""
    return _sha256(NODE_PREFIX + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two strictly below ``n`` (``n >= 2``)."""
    return 1 << ((n - 1).bit_length() - 1)


def subtree_levels(leaves: bytes, height: int | None = None) -> list[bytes]:
    """Return the hashes of the complete subtrees over concatenated leaf hashes, level by level.

    ``leaves`` holds 32-byte leaf hashes back to back; level ``h`` of the answer holds, back
    to back, the hash of every complete subtree of ``2**h`` leaves, left to right (level 0
    is ``leaves``). Up to level ``height``, or to the top. A slice of a larger tree gives
    that tree's nodes when its first leaf's index is a multiple of ``2**height``, so that
    slices hashed apart (in parallel) join level by level.
    """
    levels = [bytes(leaves)]
    sha = _sha256
    prefix = NODE_PREFIX
    pair = 2 * HASH_SIZE
    while len(levels[-1]) >= pair and (height is None or len(levels) <= height):
        buf = levels[-1]
        levels.append(b"".join([sha(prefix + buf[i : i + pair]).digest() for i in range(0, len(buf) - pair + 1,
                                                                                          pair)]))
    return levels


def roots_from_levels(levels: Sequence[bytes], sizes: Iterable[int]) -> dict[int, bytes]:
    """Return ``{size: root}`` from :func:`subtree_levels` of a whole tree (RFC 6962's split:
    each size's perfect subtrees folded from the right)."""
    sizes = sorted(set(sizes))
    n = len(levels[0]) // HASH_SIZE
    for size in sizes:
        if not 0 <= size <= n:
            raise ProofError(f"tree size {size} is outside 0..{n}", evidence={"size": size, "tree_size": n})
    out: dict[int, bytes] = {}
    for size in sizes:
        if size == 0:
            out[0] = EMPTY_ROOT
            continue
        nodes = []
        offset = 0
        for level in range(size.bit_length() - 1, -1, -1):
            if size >> level & 1:
                start = (offset >> level) * HASH_SIZE
                nodes.append(levels[level][start : start + HASH_SIZE])
                offset += 1 << level
        root = nodes[-1]
        for node in reversed(nodes[:-1]):
            root = node_hash(node, root)
        out[size] = root
    return out


class MerkleTree:
    """An append-only RFC 6962 tree over leaf hashes, keeping all complete subtrees.

    ``levels[h]`` holds, back to back, the hashes of the complete subtrees of
    ``2**h`` leaves, left to right. Appending is O(log n) amortized O(1).
    """

    def __init__(self, leaf_hashes: Iterable[bytes] = ()) -> None:
        self._levels: list[bytearray] = [bytearray()]
        self._size = 0
        self.extend(leaf_hashes)

    @classmethod
    def from_levels(cls, levels: Sequence[bytes]) -> MerkleTree:
        """Return the tree whose complete subtrees are ``levels`` (as :func:`subtree_levels` gives
        them for a whole tree): the same layout, nothing hashed again."""
        tree = cls()
        tree._levels = [bytearray(level) for level in levels] or [bytearray()]
        tree._size = len(tree._levels[0]) // HASH_SIZE
        return tree

    @property
    def size(self) -> int:
        """The number of leaves."""
        return self._size

    def _node(self, level: int, index: int) -> bytes:
        start = index * HASH_SIZE
        return bytes(self._levels[level][start : start + HASH_SIZE])

    def append(self, leaf: bytes) -> None:
        """Append one leaf hash (already hashed with :func:`leaf_hash`)."""
        self.extend([leaf])

    def extend(self, leaf_hashes: Iterable[bytes]) -> None:
        """Append leaf hashes in order, level by level: each level takes the new nodes, then
        hashes the pairs they complete (the first may pair with a node already there)."""
        carry = list(leaf_hashes)
        for leaf in carry:
            if len(leaf) != HASH_SIZE:
                raise ValueError(f"a leaf hash has {HASH_SIZE} bytes, got {len(leaf)}")
        self._size += len(carry)
        sha, prefix, pair = _sha256, NODE_PREFIX, 2 * HASH_SIZE
        level = 0
        while carry:
            if len(self._levels) == level:
                self._levels.append(bytearray())
            buf = self._levels[level]
            before = len(buf) // HASH_SIZE
            buf += b"".join(carry)
            # Pairs (2j, 2j+1) completed now: 2j+1 in [before, before + len(carry)).
            chunk = bytes(buf[before // 2 * pair : (before + len(carry)) // 2 * pair])
            carry = [sha(prefix + chunk[i : i + pair]).digest() for i in range(0, len(chunk), pair)]
            level += 1

    def leaf(self, index: int) -> bytes:
        """Return the leaf hash at ``index``."""
        if not 0 <= index < self._size:
            raise IndexError(f"leaf {index} is outside a tree of {self._size} leaves")
        return self._node(0, index)

    def subtree_hash(self, start: int, end: int) -> bytes:
        """Return MTH over leaves ``[start, end)`` for an RFC 6962 subtree range."""
        n = end - start
        if n <= 0:
            return EMPTY_ROOT
        if n & (n - 1) == 0 and start % n == 0:
            level = n.bit_length() - 1
            return self._node(level, start >> level)
        k = _split(n)
        return node_hash(self.subtree_hash(start, start + k), self.subtree_hash(start + k, end))

    def root(self, size: int | None = None) -> bytes:
        """Return the root hash of the tree at ``size`` leaves (default: all of it)."""
        size = self._size if size is None else size
        self._check_size(size)
        return self.subtree_hash(0, size)

    def _check_size(self, size: int) -> None:
        if not 0 <= size <= self._size:
            raise ProofError(
                f"tree size {size} is outside 0..{self._size}: the ledger has {self._size} entries",
                evidence={"size": size, "tree_size": self._size},
            )

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        """Return the RFC 6962 audit path for leaf ``index`` in the tree of ``size`` leaves."""
        size = self._size if size is None else size
        self._check_size(size)
        if not 0 <= index < size:
            raise ProofError(
                f"entry {index} is not in a tree of {size} entries",
                index=index,
                evidence={"index": index, "size": size},
            )
        proof: list[bytes] = []
        start, end = 0, size
        while end - start > 1:
            k = _split(end - start)
            if index < start + k:
                proof.append(self.subtree_hash(start + k, end))
                end = start + k
            else:
                proof.append(self.subtree_hash(start, start + k))
                start = start + k
        proof.reverse()
        return proof

    def consistency_proof(self, first: int, second: int | None = None) -> list[bytes]:
        """Return the RFC 6962 consistency proof between tree sizes ``first`` and ``second``."""
        second = self._size if second is None else second
        self._check_size(second)
        if not 0 <= first <= second:
            raise ProofError(
                f"no consistency proof from size {first} to size {second}: need 0 <= first <= second",
                evidence={"first": first, "second": second},
            )
        if first == 0 or first == second:
            return []
        proof: list[bytes] = []
        m, start, end, complete = first, 0, second, True
        while True:
            n = end - start
            if m == n:
                if not complete:
                    proof.append(self.subtree_hash(start, end))
                break
            k = _split(n)
            if m <= k:
                proof.append(self.subtree_hash(start + k, end))
                end = start + k
            else:
                proof.append(self.subtree_hash(start, start + k))
                m -= k
                start += k
                complete = False
        proof.reverse()
        return proof


def _check_hash(name: str, value: bytes) -> None:
    if not isinstance(value, (bytes, bytearray)) or len(value) != HASH_SIZE:
        raise ProofError(
            f"{name} must be a {HASH_SIZE}-byte SHA-256 digest, got {value!r:.80}",
            evidence={name: repr(value)[:80]},
        )


def root_from_inclusion_proof(index: int, size: int, leaf: bytes, proof: Sequence[bytes]) -> bytes:
    """Return the root implied by an inclusion proof (RFC 9162 2.1.3.2), or raise ProofError."""
    if not 0 <= index < size:
        raise ProofError(
            f"entry index {index} is outside a tree of {size} entries",
            index=index,
            evidence={"index": index, "size": size},
        )
    _check_hash("leaf hash", leaf)
    for i, p in enumerate(proof):
        _check_hash(f"proof[{i}]", p)
    fn, sn, r = index, size - 1, bytes(leaf)
    for p in proof:
        if sn == 0:
            raise ProofError(
                f"inclusion proof for entry {index} at size {size} is too long ({len(proof)} hashes)",
                index=index,
                evidence={"index": index, "size": size, "proof_length": len(proof)},
            )
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError(
            f"inclusion proof for entry {index} at size {size} is too short ({len(proof)} hashes)",
            index=index,
            evidence={"index": index, "size": size, "proof_length": len(proof)},
        )
    return r


def verify_inclusion(index: int, size: int, leaf: bytes, proof: Sequence[bytes], root: bytes) -> None:
    """Check that ``leaf`` sits at ``index`` in the tree of ``size`` leaves with ``root``.

    Returns nothing; raises :class:`ProofError` with the computed and expected root.
    """
    _check_hash("root", root)
    computed = root_from_inclusion_proof(index, size, leaf, proof)
    if computed != root:
        raise ProofError(
            f"root hash at size {size} mismatched for entry {index}: "
            f"computed {computed.hex()}, expected {bytes(root).hex()}",
            index=index,
            evidence={"index": index, "size": size, "computed": computed.hex(), "expected": bytes(root).hex()},
        )


def verify_consistency(
    first: int, second: int, first_root: bytes, second_root: bytes, proof: Sequence[bytes]
) -> None:
    """Check that the tree of ``second`` leaves extends the tree of ``first`` leaves.

    RFC 9162 2.1.4.2. Returns nothing; raises :class:`ProofError` with the evidence.
    """
    _check_hash("first root", first_root)
    _check_hash("second root", second_root)
    for i, p in enumerate(proof):
        _check_hash(f"proof[{i}]", p)
    ev = {"first": first, "second": second, "proof_length": len(proof)}
    if not 0 <= first <= second:
        raise ProofError(f"consistency needs 0 <= first <= second, got {first} and {second}", evidence=ev)
    if first == second:
        if proof:
            raise ProofError(f"consistency proof between equal sizes {first} must be empty", evidence=ev)
        if bytes(first_root) != bytes(second_root):
            raise ProofError(
                f"roots at the same size {first} differ: {bytes(first_root).hex()} and {bytes(second_root).hex()}",
                evidence=ev,
            )
        return
    if first == 0:
        if proof:
            raise ProofError("consistency proof from the empty tree must be empty", evidence=ev)
        return
    if not proof:
        raise ProofError(f"consistency proof from size {first} to {second} is empty", evidence=ev)
    path = list(proof)
    if first & (first - 1) == 0:
        path.insert(0, bytes(first_root))
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise ProofError(
                f"consistency proof from size {first} to {second} is too long ({len(proof)} hashes)", evidence=ev
            )
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError(
            f"consistency proof from size {first} to {second} is too short ({len(proof)} hashes)", evidence=ev
        )
    if fr != bytes(first_root):
        raise ProofError(
            f"root hash at size {first} mismatched: computed {fr.hex()}, expected {bytes(first_root).hex()}",
            evidence={**ev, "computed": fr.hex(), "expected": bytes(first_root).hex()},
        )
    if sr != bytes(second_root):
        raise ProofError(
            f"root hash at size {second} mismatched: computed {sr.hex()}, expected {bytes(second_root).hex()}",
            evidence={**ev, "computed": sr.hex(), "expected": bytes(second_root).hex()},
        )
